//! Faults a test asks for, per request, by header or query parameter (the
//! header wins): delay, cut, forced status, missing usage, output length, and the token kinds
//! to report besides input and output (cached input, cache writes and reads, reasoning).

use std::time::Duration;

use axum::extract::Query;
use axum::http::{HeaderMap, StatusCode, Uri};

/// `(header, query parameter)` names of every fault.
pub const DELAY_MS: (&str, &str) = ("x-mock-delay-ms", "delay_ms");
pub const CUT_AFTER: (&str, &str) = ("x-mock-cut-after", "cut_after");
pub const STATUS: (&str, &str) = ("x-mock-status", "status");
pub const OMIT_USAGE: (&str, &str) = ("x-mock-omit-usage", "omit_usage");
pub const TOKENS: (&str, &str) = ("x-mock-tokens", "tokens");
pub const IGNORE_MAX_TOKENS: (&str, &str) = ("x-mock-ignore-max-tokens", "ignore_max_tokens");
/// OpenAI: prompt tokens reported as cached (at most the prompt).
pub const CACHED_TOKENS: (&str, &str) = ("x-mock-cached-tokens", "cached_tokens");
/// Anthropic: `cache_creation_input_tokens` to report.
pub const CACHE_WRITE: (&str, &str) = ("x-mock-cache-write", "cache_write");
/// Anthropic: `cache_read_input_tokens` to report.
pub const CACHE_READ: (&str, &str) = ("x-mock-cache-read", "cache_read");
/// OpenAI: reasoning tokens, reported on top of the visible output (which they are part of in
/// `completion_tokens`/`output_tokens`).
pub const REASONING_TOKENS: (&str, &str) = ("x-mock-reasoning-tokens", "reasoning_tokens");
/// Streams: the whole event stream in one body with its `Content-Length`, as an upstream (or a
/// cache in front of one) that buffered it sends it.
pub const WHOLE: (&str, &str) = ("x-mock-whole", "whole");
/// Non-stream answers: this many bytes of trailing whitespace after the JSON (still valid JSON),
/// as a verbose answer (`logprobs`, many choices) is large.
pub const PAD_BYTES: (&str, &str) = ("x-mock-pad-bytes", "pad_bytes");
/// Upper bound on padding.
pub const MAX_PAD_BYTES: u64 = 64 << 20;

/// Output tokens when neither the fault nor `max_tokens` says otherwise.
pub const DEFAULT_TOKENS: u64 = 20;
/// Upper bound on requested tokens, so one request cannot exhaust memory.
pub const MAX_TOKENS: u64 = 1_000_000;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults {
    /// Sleep before every SSE event, or once before a non-stream answer.
    pub delay: Option<Duration>,
    /// Abort the body after this many content events.
    pub cut_after: Option<u64>,
    /// Answer this error status instead of a completion.
    pub status: Option<StatusCode>,
    /// Leave usage out everywhere.
    pub omit_usage: bool,
    /// Output tokens to produce (before `max_tokens` truncation).
    pub tokens: Option<u64>,
    /// Behave like an upstream that does not honour `max_tokens`.
    pub ignore_max_tokens: bool,
    pub cached_tokens: u64,
    pub cache_write: u64,
    pub cache_read: u64,
    pub reasoning_tokens: u64,
    /// Send a stream as one body with its length (no delay or cut applies).
    pub whole: bool,
    /// Trailing whitespace after a non-stream answer's JSON, in bytes.
    pub pad_bytes: u64,
}

impl Faults {
    /// Read the faults of one request. A malformed value is an error (rather
    /// than silently ignored) so a typo in a test fails loudly.
    pub fn from_request(headers: &HeaderMap, uri: &Uri) -> Result<Self, String> {
        // An undecodable query string carries no faults; it is not our business
        // to reject it on plain endpoints.
        let query: Vec<(String, String)> = Query::try_from_uri(uri)
            .map(|Query(q)| q)
            .unwrap_or_default();
        let lookup = |(header, param): (&str, &str)| -> Result<Option<(String, String)>, String> {
            if let Some(value) = headers.get(header) {
                let value = value
                    .to_str()
                    .map_err(|_| format!("{header}: value is not ASCII"))?;
                return Ok(Some((header.to_owned(), value.trim().to_owned())));
            }
            Ok(query
                .iter()
                .find(|(k, _)| k == param)
                .map(|(_, v)| (param.to_owned(), v.trim().to_owned())))
        };

        let delay = lookup(DELAY_MS)?
            .map(|(name, v)| parse_u64(&name, &v))
            .transpose()?
            .map(Duration::from_millis);
        let cut_after = lookup(CUT_AFTER)?
            .map(|(name, v)| parse_u64(&name, &v))
            .transpose()?;
        let status = lookup(STATUS)?
            .map(|(name, v)| parse_status(&name, &v))
            .transpose()?;
        let omit_usage = lookup(OMIT_USAGE)?
            .map(|(name, v)| parse_bool(&name, &v))
            .transpose()?
            .unwrap_or(false);
        let ignore_max_tokens = lookup(IGNORE_MAX_TOKENS)?
            .map(|(name, v)| parse_bool(&name, &v))
            .transpose()?
            .unwrap_or(false);
        let whole = lookup(WHOLE)?
            .map(|(name, v)| parse_bool(&name, &v))
            .transpose()?
            .unwrap_or(false);
        let tokens = lookup(TOKENS)?
            .map(|(name, v)| parse_u64(&name, &v))
            .transpose()?;
        if let Some(n) = tokens
            && n > MAX_TOKENS
        {
            return Err(format!("{}: at most {MAX_TOKENS}", TOKENS.1));
        }
        let count = |names: (&str, &str)| -> Result<u64, String> {
            let n = lookup(names)?
                .map(|(name, v)| parse_u64(&name, &v))
                .transpose()?
                .unwrap_or(0);
            if n > MAX_TOKENS {
                return Err(format!("{}: at most {MAX_TOKENS}", names.1));
            }
            Ok(n)
        };
        let pad_bytes = lookup(PAD_BYTES)?
            .map(|(name, v)| parse_u64(&name, &v))
            .transpose()?
            .unwrap_or(0);
        if pad_bytes > MAX_PAD_BYTES {
            return Err(format!("{}: at most {MAX_PAD_BYTES}", PAD_BYTES.1));
        }
        let cached_tokens = count(CACHED_TOKENS)?;
        let cache_write = count(CACHE_WRITE)?;
        let cache_read = count(CACHE_READ)?;
        let reasoning_tokens = count(REASONING_TOKENS)?;
        Ok(Self {
            delay,
            cut_after,
            status,
            omit_usage,
            tokens,
            ignore_max_tokens,
            whole,
            pad_bytes,
            cached_tokens,
            cache_write,
            cache_read,
            reasoning_tokens,
        })
    }

    /// Output tokens to produce given the request's `max_tokens`, and whether
    /// that limit truncated the output.
    pub fn output_tokens(&self, max_tokens: Option<u64>) -> (u64, bool) {
        let wanted = self.tokens.unwrap_or(DEFAULT_TOKENS);
        match max_tokens {
            Some(max) if max < wanted && !self.ignore_max_tokens => (max, true),
            _ => (wanted, false),
        }
    }

    /// The one delay before a non-stream answer.
    pub async fn sleep_once(&self) {
        if let Some(delay) = self.delay {
            tokio::time::sleep(delay).await;
        }
    }
}

fn parse_u64(name: &str, value: &str) -> Result<u64, String> {
    value
        .parse()
        .map_err(|_| format!("{name}: expected a non-negative integer, got {value:?}"))
}

fn parse_status(name: &str, value: &str) -> Result<StatusCode, String> {
    let code: u16 = value
        .parse()
        .map_err(|_| format!("{name}: expected an HTTP status, got {value:?}"))?;
    if !(400..=599).contains(&code) {
        return Err(format!("{name}: status must be 400..=599, got {code}"));
    }
    StatusCode::from_u16(code).map_err(|e| format!("{name}: {e}"))
}

fn parse_bool(name: &str, value: &str) -> Result<bool, String> {
    match value.to_ascii_lowercase().as_str() {
        // A bare `?omit_usage` means "on".
        "" | "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(format!("{name}: expected 1/true or 0/false, got {value:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn parse(headers: &[(&'static str, &'static str)], uri: &str) -> Result<Faults, String> {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.insert(*k, HeaderValue::from_static(v));
        }
        let uri: Uri = uri.parse().expect("uri");
        Faults::from_request(&map, &uri)
    }

    #[test]
    fn query_and_header_header_wins() {
        let f = parse(
            &[("x-mock-tokens", "7"), ("x-mock-omit-usage", "true")],
            "/v1/messages?tokens=3&delay_ms=15&cut_after=2&status=503",
        )
        .expect("faults");
        assert_eq!(f.tokens, Some(7));
        assert!(f.omit_usage);
        assert_eq!(f.delay, Some(Duration::from_millis(15)));
        assert_eq!(f.cut_after, Some(2));
        assert_eq!(f.status, Some(StatusCode::SERVICE_UNAVAILABLE));
    }

    #[test]
    fn bad_values_are_errors() {
        assert!(parse(&[("x-mock-status", "abc")], "/").is_err());
        assert!(parse(&[], "/?status=200").is_err());
        assert!(parse(&[], "/?tokens=-1").is_err());
        assert!(parse(&[], "/?tokens=1000001").is_err());
        assert!(parse(&[], "/?omit_usage=maybe").is_err());
        assert_eq!(parse(&[], "/").expect("none"), Faults::default());
    }

    #[test]
    fn max_tokens_truncates() {
        let f = Faults {
            tokens: Some(10),
            ..Faults::default()
        };
        assert_eq!(f.output_tokens(Some(4)), (4, true));
        assert_eq!(f.output_tokens(Some(10)), (10, false));
        assert_eq!(f.output_tokens(None), (10, false));
        assert_eq!(
            Faults::default().output_tokens(None),
            (DEFAULT_TOKENS, false)
        );
    }
}
