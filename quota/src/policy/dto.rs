//! The policy file format as written by policy authors (serde DTOs). Every struct rejects unknown
//! fields, so a misspelled key is an error instead of a silently ignored setting. Values that other
//! parts of the file refer to are `Spanned`, so cross-reference errors can point at the spot.

use serde::Deserialize;
use serde_saphyr::Spanned;
use std::collections::BTreeMap;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// A label for this policy version; the enforced version also carries a content hash.
    pub version: Option<Spanned<String>>,
    pub failure_mode: Option<Spanned<FailureModeDto>>,
    /// With `failure_mode: local`: the share of each limit one gateway enforces on its own.
    pub local_share: Option<Spanned<f64>>,
    #[serde(default)]
    pub upstreams: BTreeMap<String, Spanned<UpstreamDto>>,
    #[serde(default)]
    pub routes: Vec<Spanned<RouteDto>>,
    #[serde(default)]
    pub tiers: BTreeMap<String, Spanned<BTreeMap<String, Spanned<QuotaDto>>>>,
    #[serde(default)]
    pub subjects: Vec<Spanned<SubjectDto>>,
    /// Refuse (or divert) `expensive` routes when a subject's spend nears its budget.
    pub guardrail: Option<Spanned<GuardrailDto>>,
    /// Prices of LLM models, per million tokens; a `default` entry prices unknown models.
    #[serde(default)]
    pub models: BTreeMap<String, Spanned<ModelDto>>,
    /// A price book: a YAML file holding only `models:`, path relative to this file. Its entries
    /// join this file's `models`.
    pub models_file: Option<Spanned<String>>,
    /// The tier given to keys the gateway cannot look up while its control plane is unreachable;
    /// without one such keys get 503 and a `Retry-After`.
    pub guest_tier: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardrailDto {
    /// The quota type holding spend (its daily limit is the budget).
    pub quota: Spanned<String>,
    /// Share of the budget at which expensive routes stop, in (0, 1].
    #[serde(default = "default_threshold")]
    pub threshold: f64,
}

fn default_threshold() -> f64 {
    0.95
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelDto {
    pub input_per_million: f64,
    pub output_per_million: f64,
    /// OpenAI cached prompt tokens (default: the input price).
    pub cached_input_per_million: Option<f64>,
    /// Anthropic cache writes (default: the input price).
    pub cache_write_per_million: Option<f64>,
    /// Anthropic cache reads (default: `cached_input_per_million`, else the input price).
    pub cache_read_per_million: Option<f64>,
    /// Input of embeddings calls (default: the input price).
    pub embedding_per_million: Option<f64>,
}

/// A token kind, as `llm.tokens_count` names it.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TokenKindDto {
    Input,
    CachedInput,
    CacheWrite,
    CacheRead,
    /// Output, reasoning included.
    Output,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ProviderDto {
    Openai,
    Anthropic,
}

/// Token metering and billing of an LLM route.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmRouteDto {
    pub provider: ProviderDto,
    /// Quota type counting prompt + completion tokens.
    pub tokens: Spanned<String>,
    /// The token kinds `tokens` counts (default: all of them, every input kind and the output).
    pub tokens_count: Option<Spanned<Vec<TokenKindDto>>>,
    /// Quota type counting money in micro-units (1e-6 of the currency), priced by `models`.
    pub spend: Option<Spanned<String>>,
    /// Output tokens reserved when a request gives no `max_tokens`.
    #[serde(default = "default_max_tokens")]
    pub default_max_tokens: u64,
    #[serde(default = "default_max_body")]
    pub max_body_bytes: u64,
    /// After a client disconnects, keep reading the upstream this long for its usage.
    #[serde(default = "default_drain_ms")]
    pub drain_ms: u64,
    #[serde(default = "default_drain_bytes")]
    pub drain_bytes: u64,
    /// A reservation not settled within this time is released (its gateway died).
    #[serde(default = "default_reservation_ms")]
    pub reservation_ttl_ms: u64,
    /// The most output tokens a client may ask for; above it `over_max_output` decides.
    pub max_output_tokens: Option<u64>,
    #[serde(default)]
    pub over_max_output: OverMaxDto,
    /// Output past the reservation: `cut` ends the stream, `bill` lets it finish and charges it.
    #[serde(default)]
    pub on_overrun: OverrunDto,
    /// Prompt tokens counted per image (default: the provider's documented maximum per image).
    pub image_tokens: Option<u64>,
    /// Paths under this route forwarded without metering tokens (charged as one request),
    /// besides the provider's token-counting endpoint. Other paths that are not a generation
    /// endpoint (chat, completions, messages) are refused: they cannot be metered.
    #[serde(default)]
    pub unmetered_paths: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OverMaxDto {
    #[default]
    Reject,
    Clamp,
}

#[derive(Debug, Deserialize, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OverrunDto {
    #[default]
    Cut,
    Bill,
}

fn default_max_tokens() -> u64 {
    4096
}
fn default_max_body() -> u64 {
    4 << 20
}
fn default_drain_ms() -> u64 {
    30_000
}
fn default_drain_bytes() -> u64 {
    8 << 20
}
fn default_reservation_ms() -> u64 {
    600_000
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FailureModeDto {
    FailOpen,
    FailClosed,
    Local,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamDto {
    /// `host:port`.
    pub address: Spanned<String>,
    #[serde(default)]
    pub tls: bool,
    /// TLS server name; defaults to the host part of `address`.
    pub sni: Option<String>,
    #[serde(default = "default_connect_ms")]
    pub connect_timeout_ms: u64,
    #[serde(default = "default_io_ms")]
    pub read_timeout_ms: u64,
    #[serde(default = "default_io_ms")]
    pub write_timeout_ms: u64,
    /// How long an idle pooled connection to this upstream is kept.
    #[serde(default = "default_idle_ms")]
    pub idle_timeout_ms: u64,
    /// Check the upstream's certificate (chain and name). Off only for test upstreams.
    #[serde(default = "yes")]
    pub tls_verify: bool,
    /// PEM file of the certificate authorities to trust for this upstream, instead of the
    /// system's.
    pub ca_file: Option<Spanned<String>>,
    /// Where the upstream's API lives, e.g. `/anthropic` or `/api`: prepended to every path sent
    /// to it.
    pub base_path: Option<Spanned<String>>,
    /// Headers set on every request to this upstream, e.g. the provider's API key. `${NAME}` is
    /// replaced by the environment variable NAME when the policy loads (keep secrets out of files).
    #[serde(default)]
    pub headers: BTreeMap<String, Spanned<String>>,
}

fn default_connect_ms() -> u64 {
    2_000
}
fn default_io_ms() -> u64 {
    60_000
}
fn default_idle_ms() -> u64 {
    60_000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteDto {
    pub name: String,
    #[serde(rename = "match")]
    pub matcher: MatchDto,
    pub upstream: Spanned<String>,
    pub quota: Spanned<String>,
    #[serde(default = "one")]
    pub cost: u64,
    #[serde(default)]
    pub expensive: bool,
    /// With `expensive`: where to send requests while the guardrail is tripped (instead of
    /// refusing them), e.g. a cache.
    pub fallback_upstream: Option<Spanned<String>>,
    /// Meter and bill this route's LLM traffic (request tokens, streamed usage).
    pub llm: Option<Spanned<LlmRouteDto>>,
    /// Remove `match.path_prefix` from the path sent upstream.
    #[serde(default)]
    pub strip_prefix: bool,
    /// Replace `match.path_prefix` with this prefix in the path sent upstream.
    pub rewrite: Option<Spanned<String>>,
}

fn one() -> u64 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchDto {
    pub method: Option<Spanned<String>>,
    pub host: Option<String>,
    pub path_prefix: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaDto {
    #[serde(default)]
    pub rates: Vec<Spanned<RateDto>>,
    pub daily: Option<Spanned<u64>>,
    pub monthly: Option<Spanned<u64>>,
    /// Requests of this type in flight at once (LLM streams), per subject.
    pub concurrent: Option<Spanned<u64>>,
    #[serde(default)]
    pub unlimited: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateDto {
    pub limit: Spanned<u64>,
    pub per: PeriodDto,
    /// Bucket capacity; defaults to `limit`.
    pub burst: Option<Spanned<u64>>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum PeriodDto {
    Second,
    Minute,
    Hour,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubjectDto {
    /// The API key itself; or give `key_sha256`, so the file need not hold keys.
    pub key: Option<Spanned<String>>,
    /// SHA-256 (hex) of API keys of this subject.
    #[serde(default)]
    pub key_sha256: Vec<Spanned<String>>,
    pub id: String,
    pub tier: Spanned<String>,
    #[serde(default = "utc")]
    pub time_zone: Spanned<String>,
    /// Per quota type: limits that replace the tier's for this subject alone.
    #[serde(default)]
    pub overrides: BTreeMap<String, Spanned<QuotaDto>>,
    /// A disabled subject's keys are refused with 403.
    #[serde(default = "yes")]
    pub enabled: bool,
}

fn yes() -> bool {
    true
}

fn utc() -> Spanned<String> {
    Spanned::new(
        "UTC".to_string(),
        serde_saphyr::Location::UNKNOWN,
        serde_saphyr::Location::UNKNOWN,
    )
}
