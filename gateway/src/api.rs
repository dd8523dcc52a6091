//! The API listener (a separate address from the proxy): `POST /check` (CheckAndConsume on the same
//! engine), `GET /metrics` (Prometheus), `GET /status` (enforced policy and last load error),
//! `GET /healthz`. With a token configured, everything but `/metrics` and `/healthz` needs
//! `Authorization: Bearer <token>`: `/check` charges any subject, `/status` describes the fleet.

use crate::admit::{Ask, admit};
use crate::headers::{ceil_s, rfc3339};
use crate::state::AppState;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use quota::engine::Reason;
use quota::names::NameKind;
use quota::storage::AnyStore;
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// The router of the API listener. `token`: the bearer token the private endpoints need (`None`:
/// open, which the server allows only on a loopback address or with `--api-insecure`).
pub fn app(state: Arc<AppState>, token: Option<ApiToken>) -> Router {
    let private = Router::new()
        .route("/check", post(check))
        .route("/status", get(status));
    #[cfg(feature = "test-clock")]
    let private = private.route("/test/clock", post(set_clock));
    let private = match token {
        Some(t) => private.layer(axum::middleware::from_fn_with_state(Arc::new(t), authorize)),
        None => private,
    };
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .merge(private)
        .with_state(state)
}

/// The API listener's bearer token, kept as its SHA-256 so comparing takes the same time whatever
/// the candidate is.
pub struct ApiToken([u8; 32]);

impl ApiToken {
    /// `None` for an empty token: an empty secret would admit anyone who sends `Bearer `.
    pub fn new(token: &str) -> Option<Self> {
        let token = token.trim();
        (!token.is_empty()).then(|| Self(Sha256::digest(token.as_bytes()).into()))
    }

    fn admits(&self, candidate: &str) -> bool {
        let got: [u8; 32] = Sha256::digest(candidate.as_bytes()).into();
        got.iter()
            .zip(&self.0)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

async fn authorize(
    State(token): State<Arc<ApiToken>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim());
    match presented {
        Some(t) if token.admits(t) => next.run(req).await,
        _ => {
            let body = json!({
                "error": "unauthorized",
                "detail": "this endpoint needs `Authorization: Bearer <API token>`",
            });
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                axum::Json(body),
            )
                .into_response()
        }
    }
}

/// The largest `cost` one check may charge. Far above any real request, far enough below `u64`
/// (and the ledger's signed 64-bit sums) that no sum of checks can overflow.
pub const MAX_COST: u64 = 1_000_000_000_000;

/// Errors of the API, each with a status and a JSON body `{error, detail}`.
#[derive(Debug, thiserror::Error)]
enum ApiError {
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("unknown subject `{0}`")]
    UnknownSubject(String),
    #[error("the policy defines no quota type `{0}`")]
    UnknownQuota(String),
    #[error("subject `{0}` is disabled")]
    Disabled(String),
    #[error(
        "`request_id` `{0}` was first used for a different request (another quota or cost); \
         a repeat must ask for the same, a new request needs a new id"
    )]
    RequestIdReused(String),
    #[cfg(feature = "test-clock")]
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
            ApiError::UnknownQuota(_) => (StatusCode::BAD_REQUEST, "unknown_quota"),
            ApiError::Disabled(_) => (StatusCode::FORBIDDEN, "subject_disabled"),
            ApiError::RequestIdReused(_) => (StatusCode::CONFLICT, "request_id_reused"),
            #[cfg(feature = "test-clock")]
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
    // Names go into Redis keys, metric labels and the ledger: checked before anything else.
    check_name(NameKind::Subject, &req.subject)?;
    check_name(NameKind::QuotaType, &req.quota)?;
    if let Some(id) = &req.request_id
        && (id.is_empty() || id.len() > 200 || id.bytes().any(|b| !b.is_ascii_graphic()))
    {
        return Err(ApiError::Invalid(
            "`request_id`: 1 to 200 printable ASCII characters".into(),
        ));
    }
    if req.cost > MAX_COST {
        return Err(ApiError::Invalid(format!(
            "`cost`: at most {MAX_COST} per check"
        )));
    }
    let policy = state.policy.load_full();
    // Only quota types the policy defines become counters, events and metric series.
    if !policy.defines_quota(&req.quota) {
        return Err(ApiError::UnknownQuota(req.quota));
    }
    let subject = policy
        .subject_by_id(&req.subject)
        .ok_or_else(|| ApiError::UnknownSubject(req.subject.clone()))?;
    if !subject.enabled {
        return Err(ApiError::Disabled(req.subject));
    }
    let ask = Ask::Consume {
        quota: &req.quota,
        cost: req.cost,
        idempotency_key: req.request_id.as_deref(),
    };
    let now = state.clock.now_ns();
    let rid = req.request_id.as_deref();
    let d = match admit(&state, subject, rid, ask, now, policy.failure).await {
        Ok(d) => d,
        Err(quota::EngineError::Storage(quota::storage::StorageError::IdempotencyConflict)) => {
            return Err(ApiError::RequestIdReused(
                req.request_id.unwrap_or_default(),
            ));
        }
        Err(e) => return Err(e.into()),
    };
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
            "url": l.url(),
            "urls": l.urls,
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

#[cfg(feature = "test-clock")]
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetClock {
    /// RFC 3339.
    now: String,
}

fn check_name(kind: NameKind, name: &str) -> Result<(), ApiError> {
    quota::names::check(kind, name).map_err(|e| ApiError::Invalid(e.to_string()))
}

/// Only in builds with the `test-clock` feature, run with `--test-clock`: set the gateway's clock,
/// for tests of calendar resets.
#[cfg(feature = "test-clock")]
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
