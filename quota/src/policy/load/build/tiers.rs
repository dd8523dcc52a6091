//! Tiers and their quota types' limits (rates, calendar limits, `concurrent`, `unlimited`); the
//! limit checks are shared with subjects' overrides.

use super::Builder;
use crate::calendar::CalendarPeriod;
use crate::names::NameKind;
use crate::policy::dto::{PeriodDto, QuotaDto};
use crate::policy::{LimitSpec, QuotaLimits, RatePeriod, Tier};
use serde_saphyr::Spanned;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

impl<'a> Builder<'a> {
    pub(super) fn tier(
        &mut self,
        file: &str,
        name: &str,
        quotas: &Spanned<BTreeMap<String, Spanned<QuotaDto>>>,
    ) {
        if self.tiers.contains_key(name) {
            self.err(
                file,
                quotas.referenced,
                format!("tiers.{name}"),
                format!("tier `{name}` is defined twice"),
            );
            return;
        }
        self.name(
            file,
            quotas.referenced,
            format!("tiers.{name}"),
            NameKind::Tier,
            name,
        );
        let mut out = HashMap::new();
        for (quota, dto) in &quotas.value {
            let path = format!("tiers.{name}.{quota}");
            if !self.name(file, dto.referenced, &path, NameKind::QuotaType, quota) {
                continue;
            }
            self.declared_quotas.insert(quota.clone());
            if let Some(limits) = self.quota(file, &path, dto) {
                out.insert(Arc::<str>::from(quota.as_str()), limits);
            }
        }
        self.tiers
            .insert(name.to_string(), Arc::new(Tier::new(name.into(), out)));
    }

    pub(super) fn quota(
        &mut self,
        file: &str,
        path: &str,
        dto: &Spanned<QuotaDto>,
    ) -> Option<QuotaLimits> {
        let q = &dto.value;
        let has_limits = !q.rates.is_empty()
            || q.daily.is_some()
            || q.monthly.is_some()
            || q.concurrent.is_some();
        if q.unlimited {
            if has_limits {
                self.err(
                    file,
                    dto.referenced,
                    path,
                    "`unlimited: true` cannot be combined with rates, daily or monthly",
                );
                return None;
            }
            return Some(QuotaLimits::Unlimited);
        }
        if !has_limits {
            self.err(
                file,
                dto.referenced,
                path,
                "expected at least one of `rates`, `daily`, `monthly`, `concurrent`, or `unlimited: true`",
            );
            return None;
        }
        let before = self.errors.len();
        let mut specs = Vec::new();
        let mut periods = HashSet::new();
        for (i, rate) in q.rates.iter().enumerate() {
            let r = &rate.value;
            let rpath = format!("{path}.rates[{i}]");
            if r.limit.value == 0 {
                self.err(
                    file,
                    r.limit.referenced,
                    format!("{rpath}.limit"),
                    "expected a limit of at least 1",
                );
            }
            let burst = r.burst.as_ref().map_or(r.limit.value, |b| b.value);
            if let Some(b) = &r.burst
                && b.value == 0
            {
                self.err(
                    file,
                    b.referenced,
                    format!("{rpath}.burst"),
                    "expected a burst of at least 1",
                );
            }
            if !periods.insert(r.per) {
                self.err(
                    file,
                    rate.referenced,
                    format!("{rpath}.per"),
                    "only one rate per period (second, minute, hour) is allowed",
                );
            }
            let period = match r.per {
                PeriodDto::Second => RatePeriod::Second,
                PeriodDto::Minute => RatePeriod::Minute,
                PeriodDto::Hour => RatePeriod::Hour,
            };
            specs.push(LimitSpec::Rate {
                limit: r.limit.value,
                period,
                burst,
            });
        }
        for (field, value, period) in [
            ("daily", &q.daily, CalendarPeriod::Day),
            ("monthly", &q.monthly, CalendarPeriod::Month),
        ] {
            if let Some(v) = value {
                if v.value == 0 {
                    self.err(file, v.referenced, format!("{path}.{field}"), "expected a limit of at least 1 (remove the quota type from the tier to deny it)");
                }
                specs.push(LimitSpec::Calendar {
                    limit: v.value,
                    period,
                });
            }
        }
        if let Some(c) = &q.concurrent {
            let quota_type = path.rsplit('.').next().unwrap_or_default().to_string();
            self.concurrent_at.push((
                file.to_string(),
                c.referenced,
                format!("{path}.concurrent"),
                quota_type,
            ));
            if c.value == 0 {
                self.err(
                    file,
                    c.referenced,
                    format!("{path}.concurrent"),
                    "expected at least 1 request in flight",
                );
            }
            specs.push(LimitSpec::Concurrent { limit: c.value });
        }
        (self.errors.len() == before).then_some(QuotaLimits::Limited(specs))
    }
}
