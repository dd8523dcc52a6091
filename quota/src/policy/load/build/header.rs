//! The file-wide settings of a policy (`version`, `failure_mode`, `guest_tier`, `guardrail`,
//! `local_share`) and its model price list (`models`), each set in at most one file.

use super::Builder;
use crate::llm::price::{Price, PriceList};
use crate::names::NameKind;
use crate::policy::FailureMode;
use crate::policy::dto::{FailureModeDto, PolicyFile};

impl<'a> Builder<'a> {
    pub(super) fn header(&mut self, file: &'a str, doc: &PolicyFile) {
        if let Some(v) = &doc.version {
            if let Some((_, first)) = &self.version {
                let msg = format!("`version` is already set in {first}");
                self.err(file, v.referenced, "version", msg);
            } else {
                self.version = Some((v.value.clone(), file));
            }
        }
        if let Some(m) = &doc.failure_mode {
            if self.failure_mode.is_some() {
                self.err(
                    file,
                    m.referenced,
                    "failure_mode",
                    "`failure_mode` is set in more than one file",
                );
            }
            self.failure_mode = Some(match m.value {
                FailureModeDto::FailOpen => FailureMode::FailOpen,
                FailureModeDto::FailClosed => FailureMode::FailClosed,
                FailureModeDto::Local => FailureMode::Local,
            });
        }
        if let Some(g) = &doc.guest_tier {
            if self.guest_tier.is_some() {
                let msg = "`guest_tier` is set in more than one file";
                self.err(file, g.referenced, "guest_tier", msg);
            }
            self.guest_tier = Some((g.clone(), file));
        }
        if let Some(g) = &doc.guardrail {
            if self.guardrail.is_some() {
                self.err(
                    file,
                    g.referenced,
                    "guardrail",
                    "`guardrail` is set in more than one file",
                );
            }
            self.guardrail = Some((
                crate::policy::dto::GuardrailDto {
                    quota: g.value.quota.clone(),
                    threshold: g.value.threshold,
                },
                file,
            ));
        }
        for (name, m) in &doc.models {
            let valid = |v: f64| v.is_finite() && v >= 0.0;
            if !self.name(
                file,
                m.referenced,
                format!("models.{name}"),
                NameKind::Model,
                name,
            ) {
                continue;
            }
            let d = &m.value;
            let bad = [
                ("input_per_million", Some(d.input_per_million)),
                ("output_per_million", Some(d.output_per_million)),
                ("cached_input_per_million", d.cached_input_per_million),
                ("cache_write_per_million", d.cache_write_per_million),
                ("cache_read_per_million", d.cache_read_per_million),
                ("embedding_per_million", d.embedding_per_million),
            ]
            .into_iter()
            .find(|(_, v)| v.is_some_and(|v| !valid(v)));
            if let Some((field, v)) = bad {
                self.err(
                    file,
                    m.referenced,
                    format!("models.{name}.{field}"),
                    format!(
                        "expected a price of 0 or more per million tokens, got {}",
                        v.unwrap_or_default()
                    ),
                );
            } else if self.models.iter().any(|(n, _)| n == name) {
                self.err(
                    file,
                    m.referenced,
                    format!("models.{name}"),
                    format!("model `{name}` is priced twice"),
                );
            } else {
                let price = Price::from_list(PriceList {
                    input: d.input_per_million,
                    output: d.output_per_million,
                    cached_input: d.cached_input_per_million,
                    cache_write: d.cache_write_per_million,
                    cache_read: d.cache_read_per_million,
                    embedding: d.embedding_per_million,
                });
                self.models.push((name.clone(), price));
            }
        }
        if let Some(share) = &doc.local_share {
            if !(share.value > 0.0 && share.value <= 1.0) {
                let msg = format!(
                    "expected a share in (0, 1], such as 0.25 for one of four gateways, got {}",
                    share.value
                );
                self.err(file, share.referenced, "local_share", msg);
            } else if self.local_share.is_some() {
                self.err(
                    file,
                    share.referenced,
                    "local_share",
                    "`local_share` is set in more than one file",
                );
            }
            self.local_share = Some(share.value);
        }
    }
}
