//! The API listener (a separate address from the proxy): `POST /check` (CheckAndConsume on the same
//! engine), `GET /metrics` (Prometheus), `GET /status` (enforced policy and last load error),
//! `GET /healthz`.

use crate::headers::{ceil_s, rfc3339};
use crate::state::AppState;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use quota::engine::Reason;
use quota::storage::AnyStore;
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

pub fn app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/check", post(check))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .route("/healthz", get(|| async { "ok" }))
        .route("/test/clock", post(set_clock))
        .with_state(state)
}

/// Errors of the API, each with a status and a JSON body `{error, detail}`.
#[derive(Debug, thiserror::Error)]
enum ApiError {
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("unknown subject `{0}`")]
    UnknownSubject(String),
    #[error("subject `{0}` is disabled")]
    Disabled(String),
    #[error("not found")]
    NotFound,
    #[error("quota service unavailable")]
    Unavailable(#[from] quota::EngineError),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            ApiError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            ApiError::UnknownSubject(_) => (StatusCode::NOT_FOUND, "unknown_subject"),
            ApiError::Disabled(_) => (StatusCode::FORBIDDEN, "subject_disabled"),
            ApiError::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Unavailable(e) => {
                tracing::error!(error = %e, "check failed");
                (StatusCode::SERVICE_UNAVAILABLE, "quota_unavailable")
            }
        };
        let body = json!({ "error": code, "detail": self.to_string() });
        (status, axum::Json(body)).into_response()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckRequest {
    subject: String,
    quota: String,
    #[serde(default = "one")]
    cost: u64,
    request_id: Option<String>,
}

fn one() -> u64 {
    1
}

async fn check(State(state): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiError> {
    let req: CheckRequest =
        serde_json::from_slice(&body).map_err(|e| ApiError::Invalid(e.to_string()))?;
    let policy = state.policy.load_full();
    let subject = policy
        .subject_by_id(&req.subject)
        .ok_or_else(|| ApiError::UnknownSubject(req.subject.clone()))?;
    if !subject.enabled {
        return Err(ApiError::Disabled(req.subject));
    }
    let d = state
        .engine
        .decide(
            subject,
            &req.quota,
            req.cost,
            req.request_id.as_deref(),
            state.clock.now_ns(),
            policy.failure,
        )
        .await?;
    // A replay was recorded when first decided; free probes (cost 0) record nothing.
    if !d.replayed && req.cost > 0 {
        let refused = (!d.allowed).then_some(match d.reason {
            Reason::NotInTier => "quota_not_in_tier",
            _ => "quota_exceeded",
        });
        state.record_decision(
            subject,
            req.request_id.as_deref(),
            &req.quota,
            req.cost,
            refused,
        );
    }
    let binding = d.binding();
    let retry_ns = d.retry_after_ns();
    let reset_ns = if d.allowed {
        binding.map_or(0, |l| l.reset_after_ns)
    } else {
        retry_ns
    };
    let local = chrono::DateTime::<chrono::Utc>::from_timestamp_nanos(d.now_ns)
        .with_timezone(&subject.time_zone);
    let body = json!({
        "allowed": d.allowed,
        // The subject's local date: the day its daily counters count.
        "day": local.format("%Y-%m-%d").to_string(),
        "reason": match d.reason {
            Reason::WithinLimits => "within_limits",
            Reason::Unlimited => "unlimited",
            Reason::QuotaExceeded => "quota_exceeded",
            Reason::NotInTier => "quota_not_in_tier",
        },
        "limit": binding.map(|l| l.limit),
        "remaining": binding.map(|l| l.remaining),
        "reset_at": binding.map(|_| rfc3339(d.now_ns + reset_ns)),
        "retry_after_ms": (retry_ns + 999_999) / 1_000_000,
        "replayed": d.replayed,
        "degraded": d.degraded.map(|m| format!("{m:?}")),
        "limits": d.limits.iter().map(|l| json!({
            "window": l.slot.name(),
            "limit": l.limit,
            "remaining": l.remaining,
            "reset_after_s": ceil_s(l.reset_after_ns),
        })).collect::<Vec<_>>(),
    });
    Ok(axum::Json(body).into_response())
}

async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    state.metrics.sync_backend(state.engine.store());
    state.metrics.sync_audit(state.audit.counts());
    if let Some(k) = &state.kafka {
        state.metrics.sync_kafka(&k.stats());
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

fn unix_rfc3339(t: SystemTime) -> String {
    let ns = t
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
    rfc3339(ns)
}

async fn status(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let policy = state.policy.load();
    let s = state.policy.status();
    axum::Json(json!({
        "policy": {
            "version": policy.version,
            "hash": policy.hash,
            "loaded_at": unix_rfc3339(s.loaded_at),
            "source": state.sources.lock().map(|s| s.describe()).unwrap_or_default(),
            "file": state.config_path.as_ref().map(|p| p.display().to_string()),
            "routes": policy.routes.len(),
            "subjects": policy.subjects().count(),
        },
        "control_plane": state.control_plane.as_ref().map(|l| json!({
            "url": l.url,
            "connected": !l.unreachable(),
            "revision": l.applied(),
            "latest_revision": l.latest(),
            "snapshot": l.snapshot_path.display().to_string(),
        })),
        "last_error": s.last_error.map(|(message, since)| json!({
            "message": message,
            "since": unix_rfc3339(since),
        })),
        "backend": match state.engine.store() {
            AnyStore::Memory(_) => json!({ "kind": "memory", "state": "up" }),
            AnyStore::Redis(r) => json!({
                "kind": "redis",
                "state": if r.stats().up { "up" } else { "down" },
            }),
            AnyStore::Leased(l) => json!({
                "kind": "redis",
                "leases": true,
                "state": if l.redis().stats().up { "up" } else { "down" },
                "lease_units_held": l.held_units(),
            }),
        },
        "failure_mode": format!("{:?}", policy.failure.mode),
        "guardrail": policy.guardrail.as_ref().map(|g| json!({
            "quota": &*g.quota,
            "threshold": g.threshold,
            "tripped": state.guardrail.snapshot().iter().map(|(s, since)| json!({
                "subject": &**s,
                "since": rfc3339(*since),
            })).collect::<Vec<_>>(),
        })),
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetClock {
    /// RFC 3339.
    now: String,
}

/// Only with `gateway run --test-clock`: set the gateway's clock, for tests of calendar resets.
async fn set_clock(State(state): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiError> {
    let req: SetClock =
        serde_json::from_slice(&body).map_err(|e| ApiError::Invalid(e.to_string()))?;
    let t = chrono::DateTime::parse_from_rfc3339(&req.now)
        .ok()
        .and_then(|t| t.timestamp_nanos_opt())
        .ok_or_else(|| {
            ApiError::Invalid(format!(
                "`now`: expected an RFC 3339 time, got `{}`",
                req.now
            ))
        })?;
    if !state.clock.set(t) {
        return Err(ApiError::NotFound);
    }
    tracing::warn!(now = %req.now, "gateway clock set by the test API");
    Ok(axum::Json(json!({ "now": rfc3339(state.clock.now_ns()) })).into_response())
}
