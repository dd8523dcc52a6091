//! Building the runtime `Policy` from parsed DTOs: the `Builder` that collects every error, and the
//! whole-policy pass (definitions first, then what refers to them, then cross-section checks).
//! Each section's validation lives in its own file: `header` (file-wide settings and model prices),
//! `upstreams`, `tiers` (tiers and quota limits), `routes` (routes and their LLM metering) and
//! `subjects`.

mod header;
mod routes;
mod subjects;
mod tiers;
mod upstreams;

use super::error::{PolicyError, PolicyErrors};
use crate::llm::price::Price;
use crate::names::NameKind;
use crate::policy::dto::{PolicyFile, SubjectDto};
use crate::policy::{EnvMode, FailureMode, Policy, Route, Subject, Tier, Upstream};
use serde_saphyr::{Location, Spanned};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use subjects::parse_sha256;

#[derive(Default)]
pub(super) struct Builder<'a> {
    env: EnvMode,
    errors: Vec<PolicyError>,
    version: Option<(String, &'a str)>,
    failure_mode: Option<FailureMode>,
    local_share: Option<f64>,
    upstreams: HashMap<String, Arc<Upstream>>,
    tiers: HashMap<String, Arc<Tier>>,
    /// Names defined but invalid (already reported): references to them are not errors again.
    broken_upstreams: HashSet<String>,
    declared_quotas: HashSet<String>,
    models: Vec<(String, Price)>,
    guardrail: Option<(crate::policy::dto::GuardrailDto, &'a str)>,
    guest_tier: Option<(Spanned<String>, &'a str)>,
    /// Where `concurrent` was set, per quota type: checked once routes are known.
    concurrent_at: Vec<(String, Location, String, String)>,
}

impl<'a> Builder<'a> {
    pub(super) fn new(env: EnvMode) -> Self {
        Self {
            env,
            ..Self::default()
        }
    }

    fn err(
        &mut self,
        file: &str,
        loc: Location,
        path: impl Into<String>,
        message: impl Into<String>,
    ) {
        self.errors.push(PolicyError::At {
            file: file.to_string(),
            line: loc.line() as u32,
            column: loc.column() as u32,
            path: path.into(),
            message: message.into(),
        });
    }

    /// Check a name against the shared rule; false (and an error) when it breaks it.
    fn name(
        &mut self,
        file: &str,
        loc: Location,
        path: impl Into<String>,
        kind: NameKind,
        name: &str,
    ) -> bool {
        match crate::names::check(kind, name) {
            Ok(()) => true,
            Err(e) => {
                self.err(file, loc, path, e.to_string());
                false
            }
        }
    }

    pub(super) fn build(
        mut self,
        files: Vec<(&'a str, PolicyFile)>,
        hash: String,
        overlay_from: usize,
    ) -> Result<Policy, PolicyErrors> {
        // Definitions first (upstreams, tiers), then what refers to them (routes, subjects), so the
        // order of files in a directory does not matter.
        for (file, doc) in &files {
            self.header(file, doc);
            for (name, up) in &doc.upstreams {
                self.upstream(file, name, up);
            }
            for (name, quotas) in &doc.tiers {
                self.tier(file, name, quotas);
            }
        }
        let mut defined_quotas: Vec<String> = self.declared_quotas.iter().cloned().collect();
        defined_quotas.sort();
        let mut routes = Vec::new();
        let mut subjects = HashMap::new();
        let mut subjects_by_hash = HashMap::new();
        let mut subjects_by_id: HashMap<Arc<str>, Arc<Subject>> = HashMap::new();
        let mut over_ids = HashSet::new();
        let mut over_keys = HashSet::new();
        for (_, doc) in files.iter().skip(overlay_from) {
            for s in &doc.subjects {
                over_ids.insert(s.value.id.as_str());
                over_keys.extend(s.value.key.iter().map(|k| k.value.clone()));
                over_keys.extend(
                    s.value
                        .key_sha256
                        .iter()
                        .map(|h| h.value.to_ascii_lowercase()),
                );
            }
        }
        let overridden = |s: &SubjectDto| {
            over_ids.contains(s.id.as_str())
                || s.key.as_ref().is_some_and(|k| {
                    over_keys.contains(&k.value)
                        || over_keys.contains(&crate::policy::key_sha256_hex(&k.value))
                })
                || s.key_sha256
                    .iter()
                    .any(|h| over_keys.contains(&h.value.to_ascii_lowercase()))
        };
        for (file_i, (file, doc)) in files.iter().enumerate() {
            for (i, route) in doc.routes.iter().enumerate() {
                if let Some(r) = self.route(file, i, route, &defined_quotas) {
                    if routes.iter().any(|o: &Route| o.name == r.name) {
                        self.err(
                            file,
                            route.referenced,
                            format!("routes[{i}].name"),
                            format!("route `{}` is defined twice", r.name),
                        );
                    }
                    routes.push(r);
                }
            }
            for (i, subject) in doc.subjects.iter().enumerate() {
                if file_i < overlay_from && overridden(&subject.value) {
                    continue;
                }
                if let Some(s) = self.subject(file, i, &subject.value) {
                    // Several keys of one subject share one entitlement; they must agree on it.
                    let s = match subjects_by_id.get(&s.id) {
                        Some(known)
                            if known.tier.name == s.tier.name
                                && known.time_zone == s.time_zone
                                && known.enabled == s.enabled
                                && subject.value.overrides.is_empty() =>
                        {
                            known.clone()
                        }
                        Some(known) => {
                            let msg = format!(
                                "subject `{}` is already defined with tier `{}` and time zone `{}`; all its keys must agree, and overrides go on its first entry",
                                s.id, known.tier.name, known.time_zone
                            );
                            self.err(file, subject.referenced, format!("subjects[{i}]"), msg);
                            continue;
                        }
                        None => {
                            let s = Arc::new(s);
                            subjects_by_id.insert(s.id.clone(), s.clone());
                            s
                        }
                    };
                    if let Some(key) = &subject.value.key
                        && subjects.insert(key.value.clone(), s.clone()).is_some()
                    {
                        self.err(
                            file,
                            key.referenced,
                            format!("subjects[{i}].key"),
                            "this API key is already given to another subject",
                        );
                    }
                    for (j, h) in subject.value.key_sha256.iter().enumerate() {
                        let path = format!("subjects[{i}].key_sha256[{j}]");
                        let Some(digest) = parse_sha256(&h.value) else {
                            let msg = "expected a SHA-256 as 64 hexadecimal digits";
                            self.err(file, h.referenced, path, msg);
                            continue;
                        };
                        if subjects_by_hash.insert(digest, s.clone()).is_some() {
                            let msg = "this API key is already given to another subject";
                            self.err(file, h.referenced, path, msg);
                        }
                    }
                }
            }
        }
        let guardrail = self.guardrail.take().and_then(|(g, file)| {
            if !defined_quotas.contains(&g.quota.value) {
                let msg = format!("quota type `{}` is not defined by any tier", g.quota.value);
                self.err(file, g.quota.referenced, "guardrail.quota", msg);
                return None;
            }
            if !(g.threshold > 0.0 && g.threshold <= 1.0) {
                self.err(
                    file,
                    g.quota.referenced,
                    "guardrail.threshold",
                    "expected a share in (0, 1], such as 0.95",
                );
                return None;
            }
            Some(crate::policy::Guardrail {
                quota: g.quota.value.as_str().into(),
                threshold: g.threshold,
            })
        });
        let guest_tier = self.guest_tier.take().and_then(|(name, file)| {
            let tier = self.tiers.get(&name.value).cloned();
            if tier.is_none() {
                let msg = format!("unknown tier `{}`", name.value);
                self.err(file, name.referenced, "guest_tier", msg);
            }
            tier
        });
        // An in-flight limit is held by LLM reservations; elsewhere it would never be taken.
        let llm_tokens: HashSet<&str> = routes
            .iter()
            .filter_map(|r| r.llm.as_ref().map(|l| &*l.tokens_quota))
            .collect();
        for (file, loc, path, quota_type) in std::mem::take(&mut self.concurrent_at) {
            if !llm_tokens.contains(quota_type.as_str()) {
                let msg = format!(
                    "`concurrent` limits streams in flight: `{quota_type}` must be the `llm.tokens` quota of an LLM route"
                );
                self.err(&file, loc, path, msg);
            }
        }
        if routes.is_empty() && self.errors.is_empty() {
            // Most often a file caught half-written by an editor: enforcing it would refuse everything.
            let file = files.first().map_or("(policy)", |(f, _)| *f);
            self.err(
                file,
                Location::UNKNOWN,
                "routes",
                "no routes defined; a policy needs at least one route",
            );
        }
        if !self.errors.is_empty() {
            return Err(PolicyErrors(self.errors));
        }
        // Most specific route first; the sort is stable, so equal prefixes keep file order.
        routes.sort_by_key(|r| std::cmp::Reverse(r.path_prefix.len()));
        self.models
            .sort_by_key(|(name, _)| std::cmp::Reverse(name.len()));
        Ok(Policy {
            version: self
                .version
                .map_or_else(|| "unversioned".to_string(), |(v, _)| v),
            hash,
            failure: crate::policy::FailurePolicy {
                mode: self.failure_mode.unwrap_or_default(),
                local_share: self.local_share.unwrap_or(1.0),
            },
            routes,
            tiers: self.tiers,
            subjects,
            subjects_by_hash,
            subjects_by_id,
            guest: guest_tier.clone().map(|tier| {
                Arc::new(Subject {
                    id: crate::policy::GUEST_SUBJECT.into(),
                    tier,
                    time_zone: chrono_tz::UTC,
                    enabled: true,
                })
            }),
            guest_tier,
            quota_types: std::mem::take(&mut self.declared_quotas),
            models: self.models,
            guardrail,
        })
    }
}

fn list(items: &[&str]) -> String {
    if items.is_empty() {
        "(none)".into()
    } else {
        items.join(", ")
    }
}
