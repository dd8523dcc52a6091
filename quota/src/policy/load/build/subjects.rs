//! Subjects (the holders of API keys): id, tier, time zone and per-subject overrides, and the
//! parsing of `key_sha256` digests.

use super::{Builder, list};
use crate::names::NameKind;
use crate::policy::dto::SubjectDto;
use crate::policy::{Subject, Tier};
use chrono_tz::Tz;
use std::sync::Arc;

impl<'a> Builder<'a> {
    pub(super) fn subject(&mut self, file: &str, i: usize, s: &SubjectDto) -> Option<Subject> {
        let path = format!("subjects[{i}]");
        let before = self.errors.len();
        match &s.key {
            Some(key) if key.value.trim().is_empty() => {
                self.err(
                    file,
                    key.referenced,
                    format!("{path}.key"),
                    "expected a non-empty API key",
                );
            }
            None if s.key_sha256.is_empty() => {
                let msg = "a subject needs `key` or `key_sha256` (its API keys)";
                self.err(file, s.tier.referenced, path.clone(), msg);
            }
            _ => {}
        }
        self.name(
            file,
            s.tier.referenced,
            format!("{path}.id"),
            NameKind::Subject,
            &s.id,
        );
        if s.id == crate::policy::GUEST_SUBJECT {
            let msg = format!(
                "the subject id `{}` is reserved for keys admitted under `guest_tier`",
                crate::policy::GUEST_SUBJECT
            );
            self.err(file, s.tier.referenced, format!("{path}.id"), msg);
        }
        let tier = self.tiers.get(&s.tier.value).cloned();
        if tier.is_none() {
            let mut known: Vec<&str> = self.tiers.keys().map(String::as_str).collect();
            known.sort();
            let msg = format!(
                "unknown tier `{}`; defined tiers: {}",
                s.tier.value,
                list(&known)
            );
            self.err(file, s.tier.referenced, format!("{path}.tier"), msg);
        }
        let tz = s.time_zone.value.parse::<Tz>().ok();
        if tz.is_none() {
            let msg = format!(
                "unknown time zone `{}`; expected an IANA name such as `Europe/Berlin` or `UTC`",
                s.time_zone.value
            );
            self.err(
                file,
                s.time_zone.referenced,
                format!("{path}.time_zone"),
                msg,
            );
        }
        let mut tier = tier?;
        if !s.overrides.is_empty() {
            let mut quotas = tier.quotas.clone();
            for (quota, dto) in &s.overrides {
                let qpath = format!("{path}.overrides.{quota}");
                if !self.declared_quotas.contains(quota) {
                    let msg = format!("quota type `{quota}` is not defined by any tier");
                    self.err(file, dto.referenced, qpath, msg);
                } else if let Some(limits) = self.quota(file, &qpath, dto) {
                    quotas.insert(quota.as_str().into(), limits);
                }
            }
            tier = Arc::new(Tier::new(tier.name.clone(), quotas));
        }
        if self.errors.len() != before {
            return None;
        }
        Some(Subject {
            id: s.id.as_str().into(),
            tier,
            time_zone: tz?,
            enabled: s.enabled,
        })
    }
}

pub(super) fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        let digit = |c: u8| (c as char).to_digit(16);
        out[i] = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    Some(out)
}
