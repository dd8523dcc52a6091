//! Loading a policy: read one YAML file or every `*.yaml`/`*.yml` file of a directory, parse each into
//! DTOs, then validate the whole and build the runtime `Policy`. Every error names the file, line,
//! column and field path and says what was expected; all errors found are reported, not just the first.

use super::dto::{
    FailureModeDto, LlmRouteDto, OverMaxDto, OverrunDto, PeriodDto, PolicyFile, ProviderDto,
    QuotaDto, RouteDto, SubjectDto, TokenKindDto, UpstreamDto,
};
use super::{
    FailureMode, LimitSpec, LlmRoute, Policy, QuotaLimits, RatePeriod, Route, Subject, Tier,
    Upstream,
};
use crate::calendar::CalendarPeriod;
use crate::llm::Provider;
use crate::llm::TokenKinds;
use crate::llm::price::{Price, PriceList};
use crate::names::NameKind;
use chrono_tz::Tz;
use serde_saphyr::{Location, Spanned};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// One problem in a policy source.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The source as a whole: unreadable, or a directory without policy files.
    #[error("{file}: {message}")]
    Source { file: String, message: String },
    /// A spot in a file.
    #[error("{file}:{line}:{column}: {path}: {message}")]
    At {
        file: String,
        line: u32,
        column: u32,
        path: String,
        message: String,
    },
}

/// Every problem found in a policy; a policy with any of them is not enforced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

/// Load a policy file, or every policy file directly inside a directory (in name order).
pub fn load_path(path: &Path) -> Result<Policy, PolicyErrors> {
    parse_sources(&read_sources(path)?)
}

/// The named texts of a policy file, or of every policy file directly inside a directory.
pub fn read_sources(path: &Path) -> Result<Vec<(String, String)>, PolicyErrors> {
    let display = path.display().to_string();
    let source_err = |message: String| {
        PolicyErrors(vec![PolicyError::Source {
            file: display.clone(),
            message,
        }])
    };
    let meta = std::fs::metadata(path).map_err(|e| source_err(format!("cannot read: {e}")))?;
    let mut files = Vec::new();
    if meta.is_dir() {
        let entries =
            std::fs::read_dir(path).map_err(|e| source_err(format!("cannot read: {e}")))?;
        for entry in entries.flatten() {
            let p = entry.path();
            let is_yaml = p.extension().is_some_and(|e| e == "yaml" || e == "yml");
            if is_yaml && p.is_file() {
                files.push(p);
            }
        }
        files.sort();
        if files.is_empty() {
            return Err(source_err(
                "no policy files (*.yaml, *.yml) in this directory".into(),
            ));
        }
    } else {
        files.push(path.to_path_buf());
    }
    let mut sources = Vec::with_capacity(files.len());
    for f in files {
        let name = f.display().to_string();
        match std::fs::read_to_string(&f) {
            Ok(text) => sources.push((name, text)),
            Err(e) => {
                return Err(PolicyErrors(vec![PolicyError::Source {
                    file: name,
                    message: format!("cannot read: {e}"),
                }]));
            }
        }
    }
    // Price books the files include, read once each (a book inside a policy directory is one of
    // its files already).
    let mut errors = Vec::new();
    for i in 0..sources.len() {
        let Some((book, at)) = models_file_of(&sources[i].0, &sources[i].1) else {
            continue;
        };
        let name = book.display().to_string();
        if sources.iter().any(|(n, _)| *n == name) {
            continue;
        }
        match std::fs::read_to_string(&book) {
            Ok(text) => sources.push((name, text)),
            Err(e) => errors.push(PolicyError::At {
                file: sources[i].0.clone(),
                line: at.line() as u32,
                column: at.column() as u32,
                path: "models_file".into(),
                message: format!("cannot read the price book `{name}`: {e}"),
            }),
        }
    }
    if !errors.is_empty() {
        return Err(PolicyErrors(errors));
    }
    Ok(sources)
}

/// The price book policy file `name` includes (`models_file:`), resolved against the file's
/// directory, and where it is named. `None` when there is none or the file does not parse (its
/// parse reports that).
fn models_file_of(name: &str, text: &str) -> Option<(std::path::PathBuf, Location)> {
    #[derive(serde::Deserialize)]
    struct Includes {
        models_file: Option<Spanned<String>>,
    }
    let inc: Includes = serde_saphyr::from_str(text).ok()?;
    let m = inc.models_file?;
    Some((resolve_book(name, &m.value), m.referenced))
}

/// `book` relative to the directory of policy file `name` (absolute paths as they are), with
/// `.` segments dropped so that the same file always gets the same name.
fn resolve_book(name: &str, book: &str) -> std::path::PathBuf {
    let dir = Path::new(name).parent().unwrap_or(Path::new(""));
    dir.join(book).components().collect()
}

/// Build a policy from named YAML texts (a file name or any label used in error messages).
pub fn parse_sources(sources: &[(String, String)]) -> Result<Policy, PolicyErrors> {
    parse_layered(sources, sources.len())
}

/// Build a policy from named YAML texts where the subjects of `sources[overlay_from..]` take the
/// place of earlier sources' subjects with the same id or API key: the control plane's
/// entitlements over those of a policy file.
pub fn parse_layered(
    sources: &[(String, String)],
    overlay_from: usize,
) -> Result<Policy, PolicyErrors> {
    let mut errors = Vec::new();
    let mut parsed = Vec::with_capacity(sources.len());
    let mut hasher = Sha256::new();
    for (name, text) in sources {
        hasher.update(text.as_bytes());
        hasher.update([0u8]);
        match parse_file(name, text) {
            Ok(file) => parsed.push((name.as_str(), file)),
            Err(e) => errors.push(e),
        }
    }
    check_price_books(&parsed, &mut errors);
    if !errors.is_empty() {
        return Err(PolicyErrors(errors));
    }
    let hash = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    Builder::default().build(parsed, hash, overlay_from)
}

/// Every `models_file` names a source that was read as a price book, and a price book holds
/// prices only (operators update it without touching limits).
fn check_price_books(parsed: &[(&str, PolicyFile)], errors: &mut Vec<PolicyError>) {
    let mut books = HashSet::new();
    for (name, doc) in parsed {
        let Some(m) = &doc.models_file else { continue };
        let book = resolve_book(name, &m.value).display().to_string();
        if !parsed.iter().any(|(n, _)| *n == book) {
            errors.push(PolicyError::At {
                file: name.to_string(),
                line: m.referenced.line() as u32,
                column: m.referenced.column() as u32,
                path: "models_file".into(),
                message: format!(
                    "the price book `{book}` was not loaded: `models_file` is read only from policy files on disk"
                ),
            });
        }
        books.insert(book);
    }
    for (name, doc) in parsed {
        if !books.contains(*name) {
            continue;
        }
        let other = [
            ("upstreams", doc.upstreams.is_empty()),
            ("routes", doc.routes.is_empty()),
            ("tiers", doc.tiers.is_empty()),
            ("subjects", doc.subjects.is_empty()),
            ("guardrail", doc.guardrail.is_none()),
            ("guest_tier", doc.guest_tier.is_none()),
            ("failure_mode", doc.failure_mode.is_none()),
            ("local_share", doc.local_share.is_none()),
            ("models_file", doc.models_file.is_none()),
        ]
        .into_iter()
        .find(|(_, empty)| !empty);
        if let Some((field, _)) = other {
            errors.push(PolicyError::At {
                file: name.to_string(),
                line: 1,
                column: 1,
                path: field.into(),
                message: "a price book (`models_file`) holds only `models` (and `version`)".into(),
            });
        }
    }
}

fn parse_file(name: &str, text: &str) -> Result<PolicyFile, PolicyError> {
    let mut field_path = String::new();
    let result = serde_saphyr::with_deserializer_from_str(text, |de| {
        serde_path_to_error::deserialize::<_, PolicyFile>(de).map_err(|e| {
            field_path = clean_path(&e.path().to_string());
            e.into_inner()
        })
    });
    result.map_err(|e| {
        let loc = e.location().unwrap_or(Location::UNKNOWN);
        PolicyError::At {
            file: name.to_string(),
            line: loc.line() as u32,
            column: loc.column() as u32,
            path: if field_path.is_empty() || field_path == "?" {
                "(document)".into()
            } else {
                field_path
            },
            message: bare_message(&e.without_snippet().to_string()),
        }
    })
}

/// `Spanned` values show up as an inner `value` field in serde paths; users never wrote it.
fn clean_path(path: &str) -> String {
    path.replace(".value", "")
        .replace(".referenced", "")
        .replace(".defined", "")
}

/// The YAML library prefixes messages with `error: line N column M: `; we print the location
/// ourselves, in `file:line:column` form.
fn bare_message(rendered: &str) -> String {
    let first = rendered.lines().next().unwrap_or(rendered);
    let first = first.strip_prefix("error: ").unwrap_or(first);
    match first.find(" column ") {
        Some(i) if first.starts_with("line ") => first[i + 8..]
            .split_once(": ")
            .map_or(first, |(_, rest)| rest),
        _ => first,
    }
    .split(" at line ")
    .next()
    .unwrap_or_default()
    .to_string()
}

#[derive(Default)]
struct Builder<'a> {
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
    guardrail: Option<(super::dto::GuardrailDto, &'a str)>,
    guest_tier: Option<(Spanned<String>, &'a str)>,
    /// Where `concurrent` was set, per quota type: checked once routes are known.
    concurrent_at: Vec<(String, Location, String, String)>,
}

impl<'a> Builder<'a> {
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

    fn build(
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
                        || over_keys.contains(&super::key_sha256_hex(&k.value))
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
            Some(super::Guardrail {
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
            failure: super::FailurePolicy {
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
                    id: super::GUEST_SUBJECT.into(),
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

    fn header(&mut self, file: &'a str, doc: &PolicyFile) {
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
                super::dto::GuardrailDto {
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

    fn upstream(&mut self, file: &str, name: &str, up: &Spanned<UpstreamDto>) {
        let path = format!("upstreams.{name}");
        if self.upstreams.contains_key(name) {
            self.err(
                file,
                up.referenced,
                &path,
                format!("upstream `{name}` is defined twice"),
            );
            return;
        }
        let dto = &up.value;
        let addr = dto.address.value.trim();
        let host = match addr.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
                host
            }
            _ => {
                self.err(
                    file,
                    dto.address.referenced,
                    format!("{path}.address"),
                    format!("expected `host:port` with a port from 1 to 65535, got `{addr}`"),
                );
                self.broken_upstreams.insert(name.to_string());
                return;
            }
        };
        for (field, v) in [
            ("connect_timeout_ms", dto.connect_timeout_ms),
            ("read_timeout_ms", dto.read_timeout_ms),
            ("write_timeout_ms", dto.write_timeout_ms),
            ("idle_timeout_ms", dto.idle_timeout_ms),
        ] {
            if v == 0 {
                self.err(
                    file,
                    up.referenced,
                    format!("{path}.{field}"),
                    "expected a timeout of at least 1 ms",
                );
            }
        }
        let mut headers = Vec::with_capacity(dto.headers.len());
        for (name, value) in &dto.headers {
            let hpath = format!("{path}.headers.{name}");
            let Ok(hname) = http::HeaderName::from_bytes(name.as_bytes()) else {
                self.err(
                    file,
                    value.referenced,
                    &hpath,
                    format!("`{name}` is not a valid header name"),
                );
                continue;
            };
            match expand_env(&value.value) {
                Err(var) => {
                    let msg = format!("environment variable `{var}` is not set");
                    self.err(file, value.referenced, &hpath, msg);
                }
                Ok(v) => match http::HeaderValue::from_str(&v) {
                    Ok(mut hv) => {
                        hv.set_sensitive(true);
                        headers.push((hname, hv));
                    }
                    Err(_) => self.err(file, value.referenced, &hpath, "not a valid header value"),
                },
            }
        }
        let base_path = match &dto.base_path {
            Some(b) => self.prefix_path(file, b, format!("{path}.base_path")),
            None => String::new(),
        };
        let sni = dto.sni.clone().unwrap_or_else(|| {
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_string()
        });
        let Ok(host) = http::HeaderValue::from_str(&sni) else {
            let msg = format!("`{sni}` is not a valid host name");
            self.err(file, up.referenced, format!("{path}.sni"), msg);
            self.broken_upstreams.insert(name.to_string());
            return;
        };
        self.upstreams.insert(
            name.to_string(),
            Arc::new(Upstream {
                name: name.into(),
                address: addr.to_string(),
                literal: addr.parse().ok(),
                tls: dto.tls,
                sni,
                host,
                connect_timeout: Duration::from_millis(dto.connect_timeout_ms),
                read_timeout: Duration::from_millis(dto.read_timeout_ms),
                write_timeout: Duration::from_millis(dto.write_timeout_ms),
                idle_timeout: Duration::from_millis(dto.idle_timeout_ms),
                tls_verify: dto.tls_verify,
                ca_file: dto.ca_file.as_ref().map(|c| c.value.clone()),
                base_path,
                headers,
            }),
        );
    }

    fn tier(
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

    fn quota(&mut self, file: &str, path: &str, dto: &Spanned<QuotaDto>) -> Option<QuotaLimits> {
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

    fn route(
        &mut self,
        file: &str,
        i: usize,
        route: &Spanned<RouteDto>,
        quotas: &[String],
    ) -> Option<Route> {
        let r = &route.value;
        let path = format!("routes[{i}]");
        let before = self.errors.len();
        let upstream = self.upstreams.get(&r.upstream.value).cloned();
        if upstream.is_none() && !self.broken_upstreams.contains(&r.upstream.value) {
            let mut known: Vec<&str> = self.upstreams.keys().map(String::as_str).collect();
            known.sort();
            let msg = format!(
                "unknown upstream `{}`; defined upstreams: {}",
                r.upstream.value,
                list(&known)
            );
            self.err(file, r.upstream.referenced, format!("{path}.upstream"), msg);
        }
        if !quotas.contains(&r.quota.value) {
            let known: Vec<&str> = quotas.iter().map(String::as_str).collect();
            let msg = format!(
                "quota type `{}` is not defined by any tier; defined quota types: {}",
                r.quota.value,
                list(&known)
            );
            self.err(file, r.quota.referenced, format!("{path}.quota"), msg);
        }
        self.name(
            file,
            route.referenced,
            format!("{path}.name"),
            NameKind::Route,
            &r.name,
        );
        let prefix = &r.matcher.path_prefix;
        // Requests are matched by their normalized path: a prefix in another form never matches.
        match crate::http_path::normalize(&prefix.value) {
            Ok(n) if n == prefix.value.as_str() => {}
            Ok(n) => {
                let msg = format!(
                    "`{}` is not in normal form (requests are matched after normalization); write `{n}`",
                    prefix.value
                );
                self.err(
                    file,
                    prefix.referenced,
                    format!("{path}.match.path_prefix"),
                    msg,
                );
            }
            Err(e) => {
                let msg = match e {
                    crate::http_path::PathError::NotAbsolute => {
                        format!("expected a path starting with `/`, got `{}`", prefix.value)
                    }
                    e => format!("`{}` is not a valid path: {e}", prefix.value),
                };
                self.err(
                    file,
                    prefix.referenced,
                    format!("{path}.match.path_prefix"),
                    msg,
                );
            }
        }
        let upstream_prefix = match (&r.rewrite, r.strip_prefix) {
            (Some(new), true) => {
                self.err(
                    file,
                    new.referenced,
                    format!("{path}.rewrite"),
                    "`rewrite` and `strip_prefix` exclude each other (`strip_prefix` is `rewrite: \"\"`)",
                );
                None
            }
            (Some(new), false) => Some(self.prefix_path(file, new, format!("{path}.rewrite"))),
            (None, true) => Some(String::new()),
            (None, false) => None,
        };
        let llm = r.llm.as_ref().map(|l| {
            self.llm_route_distinct(file, &path, &r.quota, &l.value);
            self.llm_route(file, &path, &l.value, quotas)
        });
        let fallback_upstream = r.fallback_upstream.as_ref().and_then(|f| {
            let up = self.upstreams.get(&f.value).cloned();
            if up.is_none() {
                let msg = format!("unknown upstream `{}`", f.value);
                self.err(file, f.referenced, format!("{path}.fallback_upstream"), msg);
            }
            up
        });
        let method = r.matcher.method.as_ref().map(|m| {
            if m.value.is_empty() || !m.value.bytes().all(|b| b.is_ascii_alphabetic()) {
                self.err(
                    file,
                    m.referenced,
                    format!("{path}.match.method"),
                    format!(
                        "expected an HTTP method such as GET or POST, got `{}`",
                        m.value
                    ),
                );
            }
            m.value.to_ascii_uppercase()
        });
        if self.errors.len() != before {
            return None;
        }
        Some(Route {
            name: r.name.as_str().into(),
            method,
            host: r.matcher.host.as_ref().map(|h| h.to_ascii_lowercase()),
            path_prefix: prefix.value.clone(),
            upstream: upstream?,
            quota: r.quota.value.as_str().into(),
            cost: r.cost,
            expensive: r.expensive,
            fallback_upstream,
            llm: llm.flatten().map(Arc::new),
            upstream_prefix,
        })
    }

    /// A path put in front of upstream paths (`base_path`, `rewrite`): empty, or normalized and
    /// without a trailing slash.
    fn prefix_path(&mut self, file: &str, p: &Spanned<String>, field: String) -> String {
        let v = p.value.trim_end_matches('/');
        if v.is_empty() {
            return String::new();
        }
        match crate::http_path::normalize(v) {
            Ok(n) if n == v => v.to_string(),
            Ok(n) => {
                let msg = format!("`{}` is not in normal form; write `{n}`", p.value);
                self.err(file, p.referenced, field, msg);
                String::new()
            }
            Err(e) => {
                let msg = format!("`{}` is not a valid path prefix: {e}", p.value);
                self.err(file, p.referenced, field, msg);
                String::new()
            }
        }
    }

    fn llm_route_distinct(
        &mut self,
        file: &str,
        path: &str,
        route_quota: &Spanned<String>,
        l: &LlmRouteDto,
    ) {
        let spend = l.spend.as_ref().map(|s| s.value.as_str());
        let clash =
            if l.tokens.value == route_quota.value || spend == Some(route_quota.value.as_str()) {
                Some("the route's `quota` must differ from `llm.tokens` and `llm.spend`")
            } else if spend == Some(l.tokens.value.as_str()) {
                Some("`llm.tokens` and `llm.spend` must be different quota types")
            } else {
                None
            };
        if let Some(msg) = clash {
            self.err(file, l.tokens.referenced, format!("{path}.llm.tokens"), msg);
        }
    }

    fn llm_route(
        &mut self,
        file: &str,
        path: &str,
        l: &LlmRouteDto,
        quotas: &[String],
    ) -> Option<LlmRoute> {
        let before = self.errors.len();
        for (field, q) in [("tokens", Some(&l.tokens)), ("spend", l.spend.as_ref())] {
            if let Some(q) = q
                && !quotas.contains(&q.value)
            {
                let known: Vec<&str> = quotas.iter().map(String::as_str).collect();
                let msg = format!(
                    "quota type `{}` is not defined by any tier; defined quota types: {}",
                    q.value,
                    list(&known)
                );
                self.err(file, q.referenced, format!("{path}.llm.{field}"), msg);
            }
        }
        if let Some(spend) = &l.spend
            && self.models.is_empty()
        {
            self.err(
                file,
                spend.referenced,
                format!("{path}.llm.spend"),
                "spend is priced by `models`, which has no entry",
            );
        }
        for (field, v) in [
            ("default_max_tokens", l.default_max_tokens),
            ("max_body_bytes", l.max_body_bytes),
            ("reservation_ttl_ms", l.reservation_ttl_ms),
        ] {
            if v == 0 {
                self.err(
                    file,
                    l.tokens.referenced,
                    format!("{path}.llm.{field}"),
                    "expected a value of at least 1",
                );
            }
        }
        if let Some(kinds) = &l.tokens_count
            && kinds.value.is_empty()
        {
            self.err(
                file,
                kinds.referenced,
                format!("{path}.llm.tokens_count"),
                "expected at least one token kind (input, cached_input, cache_write, cache_read, output)",
            );
        }
        if l.max_output_tokens == Some(0) {
            self.err(
                file,
                l.tokens.referenced,
                format!("{path}.llm.max_output_tokens"),
                "expected a value of at least 1",
            );
        }
        for (i, p) in l.unmetered_paths.iter().enumerate() {
            if !matches!(crate::http_path::normalize(&p.value), Ok(n) if n == p.value.as_str()) {
                let msg = format!(
                    "expected a normalized path starting with `/`, got `{}`",
                    p.value
                );
                self.err(
                    file,
                    p.referenced,
                    format!("{path}.llm.unmetered_paths[{i}]"),
                    msg,
                );
            }
        }
        (self.errors.len() == before).then(|| LlmRoute {
            provider: match l.provider {
                ProviderDto::Openai => Provider::OpenAi,
                ProviderDto::Anthropic => Provider::Anthropic,
            },
            tokens_quota: l.tokens.value.as_str().into(),
            tokens_count: match &l.tokens_count {
                None => TokenKinds::ALL,
                Some(kinds) => kinds.value.iter().fold(TokenKinds::NONE, |k, d| {
                    k.with(match d {
                        TokenKindDto::Input => TokenKinds::INPUT,
                        TokenKindDto::CachedInput => TokenKinds::CACHED_INPUT,
                        TokenKindDto::CacheWrite => TokenKinds::CACHE_WRITE,
                        TokenKindDto::CacheRead => TokenKinds::CACHE_READ,
                        TokenKindDto::Output => TokenKinds::OUTPUT,
                    })
                }),
            },
            spend_quota: l.spend.as_ref().map(|s| s.value.as_str().into()),
            default_max_tokens: l.default_max_tokens,
            max_body_bytes: l.max_body_bytes,
            drain: Duration::from_millis(l.drain_ms),
            drain_bytes: l.drain_bytes,
            reservation_ttl: Duration::from_millis(l.reservation_ttl_ms),
            max_output_tokens: l.max_output_tokens,
            clamp_max_output: l.over_max_output == OverMaxDto::Clamp,
            cut_overrun: l.on_overrun == OverrunDto::Cut,
            image_tokens: l.image_tokens,
            unmetered_paths: l.unmetered_paths.iter().map(|p| p.value.clone()).collect(),
        })
    }

    fn subject(&mut self, file: &str, i: usize, s: &SubjectDto) -> Option<Subject> {
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
        if s.id == super::GUEST_SUBJECT {
            let msg = format!(
                "the subject id `{}` is reserved for keys admitted under `guest_tier`",
                super::GUEST_SUBJECT
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

fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
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

/// Replace every `${NAME}` with the environment variable NAME; the name of a missing one is the
/// error.
fn expand_env(value: &str) -> Result<String, String> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        let Some(len) = rest[start + 2..].find('}') else {
            break;
        };
        let name = &rest[start + 2..start + 2 + len];
        out.push_str(&rest[..start]);
        out.push_str(&std::env::var(name).map_err(|_| name.to_string())?);
        rest = &rest[start + 3 + len..];
    }
    out.push_str(rest);
    Ok(out)
}

fn list(items: &[&str]) -> String {
    if items.is_empty() {
        "(none)".into()
    } else {
        items.join(", ")
    }
}
