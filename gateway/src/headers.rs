//! How a decision is shown to clients: the `RateLimit-Policy` / `RateLimit` fields of
//! draft-ietf-httpapi-ratelimit-headers-10 (structured-field lists), `Retry-After`, and the JSON
//! body of a refusal.

use chrono::{DateTime, SecondsFormat, Utc};
use quota::engine::{Decision, LimitState};
use std::fmt::Write;

/// Whole seconds, rounded up: a client that waits this long will not be refused again for time.
pub fn ceil_s(ns: i64) -> i64 {
    if ns <= 0 {
        0
    } else {
        (ns + 999_999_999) / 1_000_000_000
    }
}

/// A structured-field list with one item per windowed limit (in-flight limits have no window and
/// no item): `"<quota>-<slot>";<params>, ...`, the params written by `params`.
fn sf_list(d: &Decision, params: impl Fn(&mut String, &LimitState)) -> Option<String> {
    let mut out = String::new();
    for l in d.limits.iter().filter(|l| l.window_s > 0) {
        if !out.is_empty() {
            out.push_str(", ");
        }
        let _ = write!(out, "\"{}-{}\"", l.quota_type, l.slot.name());
        params(&mut out, l);
    }
    (!out.is_empty()).then_some(out)
}

/// `RateLimit-Policy: "lookup-minute";q=5;w=60, "lookup-day";q=100;w=86400`, built when the
/// policy loaded (`quota::policy::policy_header`).
pub fn ratelimit_policy(d: &Decision) -> Option<&str> {
    d.policy_header.as_deref()
}

/// `RateLimit: "lookup-minute";r=4;t=12, "lookup-day";r=99;t=3600`
pub fn ratelimit(d: &Decision) -> Option<String> {
    sf_list(d, |out, l| {
        let _ = write!(out, ";r={};t={}", l.remaining, ceil_s(l.reset_after_ns));
    })
}

pub fn rfc3339(ns: i64) -> String {
    DateTime::<Utc>::from_timestamp_nanos(ns).to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// The body of a 429: which quota, its limit, what remains, when it resets, how long to wait.
pub fn refusal_body(quota: &str, d: &Decision, request_id: &str) -> serde_json::Value {
    let binding = d.binding();
    let retry_ns = d.retry_after_ns();
    serde_json::json!({
        "error": "quota_exceeded",
        "message": format!("quota `{quota}` exhausted; retry after {} s", ceil_s(retry_ns)),
        "quota": quota,
        "window": binding.map(|l| l.slot.name()),
        "limit": binding.map_or(0, |l| l.limit),
        "remaining": binding.map_or(0, |l| l.remaining),
        "reset_at": rfc3339(d.now_ns + retry_ns),
        "retry_after_s": ceil_s(retry_ns),
        "request_id": request_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use quota::engine::Reason;
    use quota::policy::Slot;

    fn decision() -> Decision {
        Decision {
            allowed: false,
            reason: Reason::QuotaExceeded,
            limits: vec![
                LimitState {
                    quota_type: "lookup".into(),
                    slot: Slot::Minute,
                    quota: 5,
                    window_s: 60,
                    limit: 5,
                    remaining: 3,
                    reset_after_ns: 24_000_000_000,
                    retry_after_ns: 0,
                    allowed: true,
                },
                LimitState {
                    quota_type: "lookup".into(),
                    slot: Slot::Day,
                    quota: 100,
                    window_s: 86_400,
                    limit: 100,
                    remaining: 0,
                    reset_after_ns: 3_600_000_000_000,
                    retry_after_ns: 3_599_500_000_000,
                    allowed: false,
                },
            ],
            replayed: false,
            now_ns: 1_795_000_000_000_000_000,
            degraded: None,
            policy_header: None,
        }
    }

    #[test]
    fn structured_fields_list_every_limit() {
        let d = decision();
        assert_eq!(
            ratelimit(&d).unwrap(),
            "\"lookup-minute\";r=3;t=24, \"lookup-day\";r=0;t=3600"
        );
    }

    #[test]
    fn refusal_names_the_refusing_limit_and_rounds_the_wait_up() {
        let body = refusal_body("lookup", &decision(), "r1");
        assert_eq!(body["window"], "day");
        assert_eq!(body["limit"], 100);
        assert_eq!(body["remaining"], 0);
        assert_eq!(body["retry_after_s"], 3600);
        assert_eq!(
            body["reset_at"],
            rfc3339(1_795_000_000_000_000_000 + 3_599_500_000_000)
        );
    }
}
