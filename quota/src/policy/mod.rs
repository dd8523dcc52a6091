//! The enforced policy: runtime types built from the YAML DTOs (`dto`) by the loader (`load`).
//! A `Policy` is immutable; a reload builds a whole new one and swaps it in.

pub mod dto;
mod load;
mod wire;

pub use load::{PolicyError, PolicyErrors, load_path, parse_layered, parse_sources, read_sources};
pub use wire::{PolicyDoc, Snapshot, SubjectEntry};

use crate::calendar::CalendarPeriod;
use crate::limiter::Limit;
use crate::llm::Provider;
use crate::llm::price::Price;
use chrono_tz::Tz;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

/// What a gateway does when the shared counter store is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailureMode {
    /// Admit, count locally, log.
    FailOpen,
    /// Refuse with 503 and `Retry-After`.
    #[default]
    FailClosed,
    /// Each gateway enforces its configured share of the limit on its own.
    Local,
}

/// The failure mode and, for `Local`, the share of each limit one gateway enforces alone.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FailurePolicy {
    pub mode: FailureMode,
    /// In (0, 1]; with N gateways, 1/N keeps the fleet within the limit during an outage.
    pub local_share: f64,
}

impl Default for FailurePolicy {
    fn default() -> Self {
        Self {
            mode: FailureMode::default(),
            local_share: 1.0,
        }
    }
}

/// A whole, validated policy, compiled: what a gateway enforces.
#[derive(Debug)]
pub struct Policy {
    /// The author's label (`version:`), or `unversioned`.
    pub version: String,
    /// SHA-256 of the source files, hex; identifies exactly what is enforced.
    pub hash: String,
    pub failure: FailurePolicy,
    /// Most specific first: longest path prefix, then declaration order.
    pub routes: Vec<Route>,
    pub tiers: HashMap<String, Arc<Tier>>,
    /// By API key.
    subjects: HashMap<String, Arc<Subject>>,
    /// By the SHA-256 of the API key (keys issued by the control plane are only stored hashed).
    subjects_by_hash: HashMap<[u8; 32], Arc<Subject>>,
    subjects_by_id: HashMap<Arc<str>, Arc<Subject>>,
    /// For keys that cannot be looked up while the control plane is unreachable: its tier.
    pub guest_tier: Option<Arc<Tier>>,
    /// The one subject all such keys are counted as (built here, not per request).
    pub guest: Option<Arc<Subject>>,
    /// Every quota type some tier defines.
    quota_types: HashSet<String>,
    /// Model prices, longest name first (a price applies to names it prefixes).
    models: Vec<(String, Price)>,
    pub guardrail: Option<Guardrail>,
}

/// When a subject's spend reaches `threshold` of its budget, `expensive` routes are refused or
/// sent to their fallback upstream.
#[derive(Debug, Clone)]
pub struct Guardrail {
    pub quota: Arc<str>,
    pub threshold: f64,
}

impl Policy {
    /// No routes, no subjects: what a gateway enforces before it has any policy (every request
    /// is refused).
    pub fn empty() -> Self {
        Self {
            version: "none".into(),
            hash: String::new(),
            failure: FailurePolicy::default(),
            routes: Vec::new(),
            tiers: HashMap::new(),
            subjects: HashMap::new(),
            subjects_by_hash: HashMap::new(),
            subjects_by_id: HashMap::new(),
            guest_tier: None,
            guest: None,
            quota_types: HashSet::new(),
            models: Vec::new(),
            guardrail: None,
        }
    }

    /// The route for a request, most specific match first.
    pub fn route(&self, method: &str, host: Option<&str>, path: &str) -> Option<&Route> {
        self.routes
            .iter()
            .find(|r| r.matches(method, host.map(host_name), path))
    }

    /// Every upstream the routes send to (fallbacks included), once each, in route order.
    pub fn upstreams(&self) -> Vec<&Arc<Upstream>> {
        let mut seen = std::collections::HashSet::new();
        self.routes
            .iter()
            .flat_map(|r| std::iter::once(&r.upstream).chain(&r.fallback_upstream))
            .filter(|up| seen.insert(up.name.clone()))
            .collect()
    }

    /// Every distinct subject (one subject may hold several API keys).
    pub fn subjects(&self) -> impl Iterator<Item = &Arc<Subject>> {
        self.subjects_by_id.values()
    }

    /// Whether any tier names quota type `quota` (only those become counters and metric series).
    pub fn defines_quota(&self, quota: &str) -> bool {
        self.quota_types.contains(quota)
    }

    pub fn subject_by_id(&self, id: &str) -> Option<&Arc<Subject>> {
        self.subjects_by_id.get(id)
    }

    /// The price of `model`: its own entry, else the longest entry it is a version of (the entry's
    /// name then a version suffix: `gpt-4o-2024-08-06` of `gpt-4o`), else `default`. Another
    /// suffix names another model (`o1-pro` is not `o1`, `gpt-4o-mini` not `gpt-4o`), often
    /// dearer: it takes `default`, or is refused without one.
    pub fn price(&self, model: &str) -> Option<Price> {
        // Longest first (sorted at load).
        self.models
            .iter()
            .find(|(name, _)| model == name)
            .or_else(|| {
                self.models.iter().find(|(name, _)| {
                    model
                        .strip_prefix(name.as_str())
                        .is_some_and(is_version_suffix)
                })
            })
            .or_else(|| self.models.iter().find(|(name, _)| name == "default"))
            .map(|(_, p)| *p)
    }
}

/// The name in a Host value: without its port, and without the trailing dot of a fully
/// qualified name (`api.example.com.:443` is `api.example.com`, as servers read it).
fn host_name(h: &str) -> &str {
    let name = match h.rsplit_once(':') {
        Some((name, port))
            if port.bytes().all(|b| b.is_ascii_digit())
                && (!name.contains(':') || name.ends_with(']')) =>
        {
            name
        }
        _ => h,
    };
    name.strip_suffix('.').unwrap_or(name)
}

/// A model version after its base name: `-2024-08-06`, `-20241022`, `-0613`, `@20241022`,
/// `-v2@20241022`, `-latest`, `-v1:0` (dates, numbers and version tags; no other words).
fn is_version_suffix(rest: &str) -> bool {
    let Some(tag) = rest.strip_prefix(['-', '@', ':']) else {
        return false;
    };
    tag == "latest"
        || tag.split(['-', ':', '.', '@']).all(|part| {
            let digits = part.strip_prefix('v').unwrap_or(part);
            !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
        })
}

/// Where a gateway learns which subject an API key belongs to. The policy file is one source; the
/// control plane is another.
pub trait EntitlementSource: Send + Sync {
    fn subject_for_key(&self, api_key: &str) -> Option<Arc<Subject>>;
}

impl EntitlementSource for Policy {
    fn subject_for_key(&self, api_key: &str) -> Option<Arc<Subject>> {
        if let Some(s) = self.subjects.get(api_key) {
            return Some(s.clone());
        }
        if self.subjects_by_hash.is_empty() {
            return None;
        }
        let digest: [u8; 32] = Sha256::digest(api_key.as_bytes()).into();
        self.subjects_by_hash.get(&digest).cloned()
    }
}

#[derive(Debug)]
pub struct Subject {
    pub id: Arc<str>,
    /// The tier's limits, with the subject's own overrides applied (the name stays the tier's).
    pub tier: Arc<Tier>,
    pub time_zone: Tz,
    /// Disabled subjects' keys are refused (403) rather than unknown (401).
    pub enabled: bool,
}

/// The hex SHA-256 of an API key, as policies and the control plane store it.
/// The subject that keys unknown to a gateway are counted as while the control plane is
/// unreachable and the policy names a `guest_tier`; no real subject may take this id.
pub const GUEST_SUBJECT: &str = "guest";

pub fn key_sha256_hex(api_key: &str) -> String {
    let digest = Sha256::digest(api_key.as_bytes());
    let mut out = String::with_capacity(64);
    for b in digest {
        use std::fmt::Write;
        let _ = write!(out, "{b:02x}");
    }
    out
}

#[derive(Debug)]
pub struct Tier {
    pub name: Arc<str>,
    /// Per quota type. A type missing here is not part of the tier: requests for it are refused.
    pub quotas: HashMap<Arc<str>, QuotaLimits>,
    /// Per limited quota type, its `RateLimit-Policy` field value, built once at load.
    pub policy_headers: HashMap<Arc<str>, Arc<str>>,
}

impl Tier {
    pub fn new(name: Arc<str>, quotas: HashMap<Arc<str>, QuotaLimits>) -> Tier {
        let policy_headers = quotas
            .iter()
            .filter_map(|(q, l)| match l {
                QuotaLimits::Limited(specs) => Some((q.clone(), policy_header(q, specs)?)),
                QuotaLimits::Unlimited => None,
            })
            .collect();
        Tier {
            name,
            quotas,
            policy_headers,
        }
    }
}

/// The `RateLimit-Policy` items of one quota type (draft-ietf-httpapi-ratelimit-headers-10):
/// `"<quota>-<slot>";q=<units>;w=<seconds>` per windowed limit; in-flight limits have no window
/// and no item.
pub fn policy_header(quota: &str, specs: &[LimitSpec]) -> Option<Arc<str>> {
    use std::fmt::Write;
    let mut out = String::new();
    for spec in specs {
        let (q, w) = spec.quota_and_window_s();
        if w <= 0 {
            continue;
        }
        if !out.is_empty() {
            out.push_str(", ");
        }
        let _ = write!(out, "\"{quota}-{}\";q={q};w={w}", spec.slot().name());
    }
    (!out.is_empty()).then(|| out.into())
}

#[derive(Debug, Clone, PartialEq)]
pub enum QuotaLimits {
    Unlimited,
    Limited(Vec<LimitSpec>),
}

/// One limit of a quota type, independent of any subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitSpec {
    Rate {
        limit: u64,
        period: RatePeriod,
        burst: u64,
    },
    Calendar {
        limit: u64,
        period: CalendarPeriod,
    },
    /// In flight at once: held by reservations, released when they settle or expire.
    Concurrent {
        limit: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RatePeriod {
    Second,
    Minute,
    Hour,
}

impl RatePeriod {
    pub fn seconds(self) -> i64 {
        match self {
            RatePeriod::Second => 1,
            RatePeriod::Minute => 60,
            RatePeriod::Hour => 3600,
        }
    }
}

/// Which counter of a subject's quota type a limit uses. It excludes the limit's value, so a
/// changed limit keeps counting on the same counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Slot {
    Second,
    Minute,
    Hour,
    Day,
    Month,
    Concurrent,
}

impl Slot {
    pub fn name(self) -> &'static str {
        match self {
            Slot::Second => "second",
            Slot::Minute => "minute",
            Slot::Hour => "hour",
            Slot::Day => "day",
            Slot::Month => "month",
            Slot::Concurrent => "concurrent",
        }
    }
}

impl LimitSpec {
    pub fn slot(&self) -> Slot {
        match self {
            LimitSpec::Rate { period, .. } => match period {
                RatePeriod::Second => Slot::Second,
                RatePeriod::Minute => Slot::Minute,
                RatePeriod::Hour => Slot::Hour,
            },
            LimitSpec::Calendar { period, .. } => match period {
                CalendarPeriod::Day => Slot::Day,
                CalendarPeriod::Month => Slot::Month,
            },
            LimitSpec::Concurrent { .. } => Slot::Concurrent,
        }
    }

    /// The quota as a header shows it: units per window of `w` seconds (calendar windows are
    /// nominal: a day is 86400 s, a month 30 days).
    pub fn quota_and_window_s(&self) -> (u64, i64) {
        match *self {
            LimitSpec::Rate { limit, period, .. } => (limit, period.seconds()),
            LimitSpec::Calendar { limit, period } => match period {
                CalendarPeriod::Day => (limit, 86_400),
                CalendarPeriod::Month => (limit, 30 * 86_400),
            },
            LimitSpec::Concurrent { limit } => (limit, 0),
        }
    }

    /// The limiter for this spec at `now_ns` for a subject in `tz`.
    pub fn limit_at(&self, tz: Tz, now_ns: i64) -> Limit {
        match *self {
            LimitSpec::Rate {
                limit,
                period,
                burst,
            } => Limit::Bucket {
                emission_ns: period.seconds() * 1_000_000_000
                    / i64::try_from(limit.max(1)).unwrap_or(i64::MAX),
                burst,
            },
            LimitSpec::Calendar { limit, period } => {
                let w = crate::calendar::window(period, tz, now_ns);
                Limit::Window {
                    limit,
                    window: w.id,
                    reset_at_ns: w.reset_at_ns,
                }
            }
            // One everlasting window; a refused client may retry in a second.
            LimitSpec::Concurrent { limit } => Limit::Window {
                limit,
                window: crate::limiter::EVERLASTING_WINDOW,
                reset_at_ns: now_ns.saturating_add(1_000_000_000),
            },
        }
    }
}

#[derive(Debug)]
pub struct Route {
    pub name: Arc<str>,
    /// Upper case; `None` matches any method.
    pub method: Option<String>,
    /// Lower case, without port; `None` matches any host.
    pub host: Option<String>,
    pub path_prefix: String,
    pub upstream: Arc<Upstream>,
    pub quota: Arc<str>,
    pub cost: u64,
    pub expensive: bool,
    pub fallback_upstream: Option<Arc<Upstream>>,
    pub llm: Option<Arc<LlmRoute>>,
    /// What replaces `path_prefix` in the path sent upstream (`strip_prefix`: empty; `rewrite`:
    /// its value); `None` keeps the path.
    pub upstream_prefix: Option<String>,
}

impl Route {
    /// The path (and query) the upstream `up` receives for the normalized client path `path`:
    /// the route's prefix replaced when it says so, then the upstream's base path in front.
    pub fn upstream_path<'a>(
        &self,
        up: &Upstream,
        path_and_query: &'a str,
    ) -> std::borrow::Cow<'a, str> {
        use std::borrow::Cow;
        let rest = match &self.upstream_prefix {
            Some(new) => {
                let prefix = self.path_prefix.trim_end_matches('/');
                // What follows the prefix: empty, `/…` or `?…` (routes match at segment bounds).
                let tail = path_and_query
                    .strip_prefix(prefix)
                    .unwrap_or(path_and_query);
                let new = new.trim_end_matches('/');
                Cow::Owned(if new.is_empty() && !tail.starts_with('/') {
                    format!("/{tail}")
                } else {
                    format!("{new}{tail}")
                })
            }
            None => Cow::Borrowed(path_and_query),
        };
        if up.base_path.is_empty() {
            return rest;
        }
        Cow::Owned(format!("{}{rest}", up.base_path))
    }
}

/// How an LLM route is metered and billed.
#[derive(Debug)]
pub struct LlmRoute {
    pub provider: Provider,
    pub tokens_quota: Arc<str>,
    /// The token kinds `tokens_quota` counts.
    pub tokens_count: crate::llm::TokenKinds,
    pub spend_quota: Option<Arc<str>>,
    pub default_max_tokens: u64,
    pub max_body_bytes: u64,
    pub drain: Duration,
    pub drain_bytes: u64,
    pub reservation_ttl: Duration,
    /// The most output tokens a client may ask for.
    pub max_output_tokens: Option<u64>,
    /// Above `max_output_tokens`: refuse (400) or clamp to it.
    pub clamp_max_output: bool,
    /// Cut streams at their reservation (`true`) or bill what they produced past it.
    pub cut_overrun: bool,
    /// Prompt tokens per image; `None`: the provider's documented maximum.
    pub image_tokens: Option<u64>,
    /// Paths forwarded unmetered (normalized, matched at segment boundaries).
    pub unmetered_paths: Vec<String>,
}

impl Route {
    fn matches(&self, method: &str, host: Option<&str>, path: &str) -> bool {
        self.method
            .as_deref()
            .is_none_or(|m| m.eq_ignore_ascii_case(method))
            && self
                .host
                .as_deref()
                .is_none_or(|h| host.is_some_and(|got| got.eq_ignore_ascii_case(h)))
            && crate::http_path::under(path, &self.path_prefix)
    }
}

#[derive(Debug)]
pub struct Upstream {
    pub name: Arc<str>,
    /// `host:port`
    pub address: String,
    /// `address` when it is an IP address and port (no lookup needed).
    pub literal: Option<std::net::SocketAddr>,
    pub tls: bool,
    pub sni: String,
    /// `sni` as the Host header sent to TLS upstreams.
    pub host: http::HeaderValue,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    pub idle_timeout: Duration,
    pub tls_verify: bool,
    /// PEM file of the authorities trusted for this upstream (`None`: the system's).
    pub ca_file: Option<String>,
    /// Prepended to every path sent to this upstream; empty or `/…` without a trailing slash.
    pub base_path: String,
    /// Set on every request to this upstream (environment variables already expanded).
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// The environment variable a header needs and this process lacks, in a policy compiled
    /// with [`EnvMode::Lenient`]: requests for this upstream are refused instead of being sent
    /// without their credentials.
    pub unresolved: Option<String>,
}

/// What a `${NAME}` in an upstream header does when NAME is not set in this process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EnvMode {
    /// The policy is refused (a policy file: its operator is there to set the variable).
    #[default]
    Strict,
    /// The upstream is marked [`Upstream::unresolved`] and the rest of the policy applies: a
    /// control plane's snapshot, whose secrets live in the gateways' environment, not its own,
    /// and whose revisions (key revocations among them) must not stop at one missing variable.
    Lenient,
}
