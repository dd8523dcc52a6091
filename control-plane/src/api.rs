//! The REST API: policies (versions, history, diff, rollback, dry-run), tiers, subjects and their
//! API keys, the payment-webhook entitlement endpoint, admin tokens, the change log, and the
//! OpenAPI document generated from these handlers.
//!
//! Every write takes the write lock, compiles the state it would publish with the gateway's own
//! policy code (refusing it with 422 and every error's line and column), commits it with the
//! change log entry, publishes it to watching gateways and emits an audit event.

use crate::auth::{Actor, Admin, Billing, Editor, Role, Viewer, sha256_hex};
use crate::error::{ApiError, ErrorBody};
use crate::state::{AppState, validate};
use crate::store::{Change, KeyRecord, PolicyVersion, SubjectRecord, TokenRecord};
use crate::write::{self, Entitlement, NewKey, NewToken, Op, Outcome};
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use bytes::Bytes;
use quota::policy::PolicyDoc;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;
use utoipa::{IntoParams, OpenApi, ToSchema};

pub fn app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/openapi.json", get(openapi))
        .route("/v1/policies", get(list_policies).post(create_policy))
        .route("/v1/policies/active", get(active_policy))
        .route("/v1/policies/validate", post(validate_policy))
        .route("/v1/policies/diff", get(diff_policies))
        .route("/v1/policies/{version}", get(get_policy))
        .route("/v1/policies/{version}/rollback", post(rollback_policy))
        .route("/v1/tiers", get(list_tiers))
        .route("/v1/subjects", get(list_subjects))
        .route(
            "/v1/subjects/{id}",
            get(get_subject).put(put_subject).delete(delete_subject),
        )
        .route("/v1/subjects/{id}/keys", post(create_key))
        .route("/v1/subjects/{id}/keys/{key_id}", delete(revoke_key))
        .route("/v1/entitlements", post(change_entitlement))
        .route("/v1/tokens", get(list_tokens).post(create_token))
        .route("/v1/tokens/{id}", delete(revoke_token))
        .route("/v1/tokens/bootstrap/rotate", post(rotate_bootstrap))
        .route("/v1/revision", get(revision))
        .route("/v1/changes", get(list_changes))
        .route("/v1/watch", get(crate::watch::watch))
        .with_state(state)
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Tollgate control plane", description = "Policies, subjects and entitlements of a Tollgate gateway fleet. Every /v1 route needs `Authorization: Bearer <token>`: viewer tokens read, editor tokens change policies and subjects, admin tokens manage tokens, billing tokens (for a payment webhook) only post entitlements."),
    paths(
        healthz, list_policies, create_policy, active_policy, validate_policy, diff_policies,
        get_policy, rollback_policy, list_tiers, list_subjects, get_subject, put_subject,
        delete_subject, create_key, revoke_key, change_entitlement, list_tokens, create_token,
        revoke_token, rotate_bootstrap, revision, list_changes, crate::watch::watch
    ),
    components(schemas(ErrorBody, PolicyVersion, SubjectRecord, KeyRecord, TokenRecord, Change, NewKey, NewToken)),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

async fn openapi() -> impl IntoResponse {
    axum::Json(ApiDoc::openapi())
}

/// Liveness, and the revision being served.
#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "`{\"status\": \"ok\", \"revision\": N}`")))]
async fn healthz(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let revision = state.published.borrow().revision;
    axum::Json(json!({ "status": "ok", "revision": revision }))
}

/// How far ahead of this clock a provider's `event_time` may be (its clock may run ahead a little).
const EVENT_CLOCK_SKEW_MS: i64 = 5 * 60_000;

/// The latest revision in the database and the one this instance serves. Gateways ask it at a
/// fixed interval, so a quiet stream cannot hide that they are behind; an instance that finds
/// itself behind the database publishes at once.
#[utoipa::path(get, path = "/v1/revision", tag = "gateways", security(("bearer" = [])),
    responses((status = 200, description = "`{\"revision\": N, \"published\": N}`"), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn revision(State(state): State<Arc<AppState>>, _: Viewer) -> Result<Response, ApiError> {
    let stored = state.store.revision().await?;
    let mut published = state.published.borrow().revision;
    if stored > published {
        published = state.publish().await?;
    }
    Ok(axum::Json(json!({ "revision": stored, "published": published })).into_response())
}

// ---------------------------------------------------------------------------------------------
// Policies

/// The policy history, newest first (without the documents).
#[utoipa::path(get, path = "/v1/policies", tag = "policies", security(("bearer" = [])),
    responses((status = 200, body = Vec<PolicyVersion>), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn list_policies(
    State(state): State<Arc<AppState>>,
    _: Viewer,
) -> Result<Response, ApiError> {
    Ok(axum::Json(state.store.policy_history().await?).into_response())
}

#[derive(Debug, Deserialize, IntoParams)]
struct PolicyQuery {
    /// Why this version exists, kept in the history.
    comment: Option<String>,
}

/// Upload a policy document (YAML, the gateway's format) as a new version and make it active.
#[utoipa::path(post, path = "/v1/policies", tag = "policies", security(("bearer" = [])),
    params(PolicyQuery),
    request_body(content = String, content_type = "application/yaml", description = "the policy YAML"),
    responses((status = 201, body = PolicyVersion), (status = 422, body = ErrorBody, description = "refused; each error has file:line:column: field: reason"),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn create_policy(
    State(state): State<Arc<AppState>>,
    Editor(actor): Editor,
    Query(q): Query<PolicyQuery>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let yaml = yaml_body(&body)?;
    let v = put_policy(&state, &actor, yaml, q.comment.unwrap_or_default()).await?;
    Ok((StatusCode::CREATED, axum::Json(v)).into_response())
}

fn yaml_body(body: &Bytes) -> Result<String, ApiError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| ApiError::BadRequest("the policy must be UTF-8 text".into()))?;
    if text.trim().is_empty() {
        return Err(ApiError::BadRequest(
            "send the policy YAML as the request body".into(),
        ));
    }
    Ok(text.to_string())
}

pub(crate) async fn put_policy(
    state: &AppState,
    actor: &Actor,
    yaml: String,
    comment: String,
) -> Result<PolicyVersion, ApiError> {
    let Outcome::Policy { version, .. } =
        write::apply(state, actor, Op::Policy { yaml, comment }).await?
    else {
        return Err(ApiError::Internal(
            "a policy write answered otherwise".into(),
        ));
    };
    state
        .store
        .policy(version)
        .await?
        .ok_or_else(|| ApiError::Internal("the new version vanished".into()))
}

/// The active policy version, with its document.
#[utoipa::path(get, path = "/v1/policies/active", tag = "policies", security(("bearer" = [])),
    responses((status = 200, body = PolicyVersion), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn active_policy(
    State(state): State<Arc<AppState>>,
    _: Viewer,
) -> Result<Response, ApiError> {
    let p = state
        .store
        .active_policy()
        .await?
        .ok_or_else(|| ApiError::NotFound("no policy has been uploaded yet".into()))?;
    Ok(axum::Json(p).into_response())
}

/// One policy version, with its document.
#[utoipa::path(get, path = "/v1/policies/{version}", tag = "policies", security(("bearer" = [])),
    params(("version" = u64, Path, description = "policy version number")),
    responses((status = 200, body = PolicyVersion), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn get_policy(
    State(state): State<Arc<AppState>>,
    _: Viewer,
    Path(version): Path<String>,
) -> Result<Response, ApiError> {
    Ok(axum::Json(stored_version(&state, &version).await?).into_response())
}

/// A stored policy version named by `v3` or `3`.
pub(crate) async fn stored_version(
    state: &AppState,
    version: &str,
) -> Result<PolicyVersion, ApiError> {
    let v: u64 = version
        .trim_start_matches('v')
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("`{version}` is not a version number")))?;
    state
        .store
        .policy(v)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no policy version {v}")))
}

/// Check a policy document against the current subjects without changing anything.
#[utoipa::path(post, path = "/v1/policies/validate", tag = "policies", security(("bearer" = [])),
    request_body(content = String, content_type = "application/yaml"),
    responses((status = 200, description = "`{\"valid\": true, \"label\", \"routes\", \"tiers\"}`"), (status = 422, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn validate_policy(
    State(state): State<Arc<AppState>>,
    _: Editor,
    body: Bytes,
) -> Result<Response, ApiError> {
    let yaml = yaml_body(&body)?;
    Ok(axum::Json(dry_run(&state, yaml).await?).into_response())
}

/// The dry run of a policy document against the current subjects (the validate endpoint's, and
/// the console editor's): what it would enforce, or every error with its line and column.
pub(crate) async fn dry_run(state: &AppState, yaml: String) -> Result<serde_json::Value, ApiError> {
    let mut snap = state.store.snapshot().await?;
    let next = snap.policy.as_ref().map_or(1, |p| p.version + 1);
    snap.policy = Some(PolicyDoc {
        version: next,
        yaml,
    });
    let p = validate(snap).await?;
    let mut tiers: Vec<&String> = p.tiers.keys().collect();
    tiers.sort();
    Ok(json!({
        "valid": true,
        "label": p.version,
        "routes": p.routes.iter().map(|r| &*r.name).collect::<Vec<_>>(),
        "tiers": tiers,
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
struct DiffQuery {
    /// Older version.
    from: String,
    /// Newer version; the active one when omitted.
    to: Option<String>,
}

/// A unified diff between two policy versions.
#[utoipa::path(get, path = "/v1/policies/diff", tag = "policies", security(("bearer" = [])),
    params(DiffQuery),
    responses((status = 200, description = "`{\"from\", \"to\", \"diff\"}` with a unified diff"), (status = 404, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn diff_policies(
    State(state): State<Arc<AppState>>,
    _: Viewer,
    Query(q): Query<DiffQuery>,
) -> Result<Response, ApiError> {
    let (from, to, diff) = diff(&state, &q.from, q.to.as_deref()).await?;
    Ok(axum::Json(json!({ "from": from, "to": to, "diff": diff })).into_response())
}

/// The unified diff from version `from` to `to` (the active one when `None`).
pub(crate) async fn diff(
    state: &AppState,
    from: &str,
    to: Option<&str>,
) -> Result<(u64, u64, String), ApiError> {
    let from = stored_version(state, from).await?;
    let to = match to {
        Some(v) => stored_version(state, v).await?,
        None => state
            .store
            .active_policy()
            .await?
            .ok_or_else(|| ApiError::NotFound("no active policy".into()))?,
    };
    let (a, b) = (from.yaml.unwrap_or_default(), to.yaml.unwrap_or_default());
    let diff = similar::TextDiff::from_lines(&a, &b)
        .unified_diff()
        .header(&format!("v{}", from.version), &format!("v{}", to.version))
        .to_string();
    Ok((from.version, to.version, diff))
}

/// Make an older version's document active again, as a new version (history only grows, so
/// gateways never see the version number go back).
#[utoipa::path(post, path = "/v1/policies/{version}/rollback", tag = "policies", security(("bearer" = [])),
    params(("version" = u64, Path, description = "the version to restore")),
    responses((status = 201, body = PolicyVersion), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn rollback_policy(
    State(state): State<Arc<AppState>>,
    Editor(actor): Editor,
    Path(version): Path<String>,
) -> Result<Response, ApiError> {
    let p = rollback(&state, &actor, &version).await?;
    Ok((StatusCode::CREATED, axum::Json(p)).into_response())
}

/// Restore `version`'s document as a new version.
pub(crate) async fn rollback(
    state: &AppState,
    actor: &Actor,
    version: &str,
) -> Result<PolicyVersion, ApiError> {
    let old = stored_version(state, version).await?;
    let comment = format!("rollback to v{}", old.version);
    put_policy(state, actor, old.yaml.unwrap_or_default(), comment).await
}

/// The tiers of the active policy and the quota types each includes.
#[utoipa::path(get, path = "/v1/tiers", tag = "subjects", security(("bearer" = [])),
    responses((status = 200, description = "`{\"tier\": [\"quota type\", …]}`"), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn list_tiers(State(state): State<Arc<AppState>>, _: Viewer) -> Result<Response, ApiError> {
    let p = active_compiled(&state).await?;
    let tiers: BTreeMap<&str, Vec<&str>> = p
        .tiers
        .iter()
        .map(|(name, t)| {
            let mut q: Vec<&str> = t.quotas.keys().map(|k| &**k).collect();
            q.sort();
            (name.as_str(), q)
        })
        .collect();
    Ok(axum::Json(tiers).into_response())
}

/// The active policy compiled without the control plane's subjects (its tiers, routes, quota
/// types), as the tiers endpoint and the console read it.
pub(crate) async fn active_compiled(state: &AppState) -> Result<quota::policy::Policy, ApiError> {
    let mut snap = state.store.snapshot().await?;
    snap.subjects.clear();
    validate(snap).await
}

// ---------------------------------------------------------------------------------------------
// Subjects and keys

/// Every subject with its tier, overrides and keys (never the keys themselves).
#[utoipa::path(get, path = "/v1/subjects", tag = "subjects", security(("bearer" = [])),
    responses((status = 200, body = Vec<SubjectRecord>), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn list_subjects(
    State(state): State<Arc<AppState>>,
    _: Viewer,
) -> Result<Response, ApiError> {
    Ok(axum::Json(state.store.subjects().await?).into_response())
}

#[utoipa::path(get, path = "/v1/subjects/{id}", tag = "subjects", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 200, body = SubjectRecord), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn get_subject(
    State(state): State<Arc<AppState>>,
    _: Viewer,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let s = state
        .store
        .subject(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no subject `{id}`")))?;
    Ok(axum::Json(s).into_response())
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct PutSubject {
    tier: String,
    /// IANA name; daily quotas reset at the subject's local midnight. Default UTC (or unchanged).
    time_zone: Option<String>,
    /// Per quota type, limits in the policy's tier syntax, replacing the tier's.
    #[schema(value_type = Option<Object>)]
    overrides: Option<BTreeMap<String, serde_json::Value>>,
    enabled: Option<bool>,
}

/// Create or change a subject.
#[utoipa::path(put, path = "/v1/subjects/{id}", tag = "subjects", security(("bearer" = [])),
    params(("id" = String, Path)), request_body = PutSubject,
    responses((status = 200, body = SubjectRecord), (status = 422, body = ErrorBody), (status = 409, body = ErrorBody, description = "no policy uploaded yet"),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn put_subject(
    State(state): State<Arc<AppState>>,
    Editor(actor): Editor,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: PutSubject = json_body(&body)?;
    let op = Op::PutSubject {
        id: id.clone(),
        tier: req.tier,
        time_zone: req.time_zone,
        overrides: req.overrides,
        enabled: req.enabled,
    };
    write::apply(&state, &actor, op).await?;
    let s = state.store.subject(&id).await?;
    Ok(axum::Json(s).into_response())
}

fn json_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("request body: {e}")))
}

/// Delete a subject and its keys.
#[utoipa::path(delete, path = "/v1/subjects/{id}", tag = "subjects", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn delete_subject(
    State(state): State<Arc<AppState>>,
    Editor(actor): Editor,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    write::apply(&state, &actor, Op::DeleteSubject { id }).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Issue an API key for a subject. The response is the only time the key is shown.
#[utoipa::path(post, path = "/v1/subjects/{id}/keys", tag = "subjects", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 201, body = NewKey), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn create_key(
    State(state): State<Arc<AppState>>,
    Editor(actor): Editor,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let Outcome::Key(key) = write::apply(&state, &actor, Op::IssueKey { subject: id }).await?
    else {
        return Err(ApiError::Internal("a key write answered otherwise".into()));
    };
    Ok((StatusCode::CREATED, axum::Json(key)).into_response())
}

/// Revoke one of a subject's API keys.
#[utoipa::path(delete, path = "/v1/subjects/{id}/keys/{key_id}", tag = "subjects", security(("bearer" = [])),
    params(("id" = String, Path), ("key_id" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn revoke_key(
    State(state): State<Arc<AppState>>,
    Editor(actor): Editor,
    Path((subject, key_id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    write::apply(&state, &actor, Op::RevokeKey { subject, key_id }).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct EntitlementChange {
    subject: String,
    /// The tier the subscription now grants.
    tier: String,
    /// The payment provider's event id: a repeated call with the same key changes nothing and
    /// gets the first answer again. The `Idempotency-Key` header works too.
    idempotency_key: Option<String>,
    /// For a subject created by this call; default UTC.
    time_zone: Option<String>,
    /// When the provider's event happened (RFC 3339). An event older than the last one applied
    /// to the subject changes nothing and is answered `"superseded": true`.
    event_time: Option<String>,
}

/// Set a subject's tier in one call, shaped for a payment webhook (creates the subject if new).
#[utoipa::path(post, path = "/v1/entitlements", tag = "subjects", security(("bearer" = [])),
    request_body = EntitlementChange,
    responses((status = 200, description = "`{\"subject\", \"before_tier\", \"after_tier\", \"revision\", \"replayed\"}`"),
        (status = 409, body = ErrorBody, description = "idempotency key reused with another request"), (status = 422, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn change_entitlement(
    State(state): State<Arc<AppState>>,
    Billing(actor): Billing,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: EntitlementChange = json_body(&body)?;
    let key = req.idempotency_key.clone().or_else(|| {
        headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    });
    let event_ms = req
        .event_time
        .as_deref()
        .map(|t| {
            chrono::DateTime::parse_from_rfc3339(t)
                .map(|d| d.timestamp_millis())
                .map_err(|e| {
                    ApiError::BadRequest(format!("`event_time` `{t}`: expected RFC 3339: {e}"))
                })
        })
        .transpose()?;
    // An event from the future would supersede every real one after it, for good.
    if let Some(at) = event_ms
        && at > chrono::Utc::now().timestamp_millis() + EVENT_CLOCK_SKEW_MS
    {
        return Err(ApiError::BadRequest(format!(
            "`event_time` is more than {} minutes in the future; send the provider's time of \
             the event",
            EVENT_CLOCK_SKEW_MS / 60_000
        )));
    }
    let request_sha = sha256_hex(
        &serde_json::to_vec(&(&req.subject, &req.tier, &req.time_zone, event_ms))
            .unwrap_or_default(),
    );
    let op = Op::Entitlement(Entitlement {
        subject: req.subject,
        tier: req.tier,
        time_zone: req.time_zone,
        idempotency: key.map(|k| (k, request_sha)),
        event_ms,
    });
    let Outcome::Entitlement(answer) = write::apply(&state, &actor, op).await? else {
        return Err(ApiError::Internal(
            "an entitlement write answered otherwise".into(),
        ));
    };
    Ok(axum::Json(answer).into_response())
}

// ---------------------------------------------------------------------------------------------
// Tokens and the change log

/// Every admin token (never the tokens themselves).
#[utoipa::path(get, path = "/v1/tokens", tag = "tokens", security(("bearer" = [])),
    responses((status = 200, body = Vec<TokenRecord>), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn list_tokens(State(state): State<Arc<AppState>>, _: Admin) -> Result<Response, ApiError> {
    Ok(axum::Json(state.store.tokens().await?).into_response())
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct NewTokenRequest {
    /// Who or what uses it (`gateway-eu-1`, `billing-webhook`).
    name: String,
    /// viewer, editor or admin. Gateways need viewer.
    role: String,
}

/// Create a token.
#[utoipa::path(post, path = "/v1/tokens", tag = "tokens", security(("bearer" = [])),
    request_body = NewTokenRequest,
    responses((status = 201, body = NewToken), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn create_token(
    State(state): State<Arc<AppState>>,
    Admin(actor): Admin,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: NewTokenRequest = json_body(&body)?;
    let role = Role::parse(&req.role).ok_or_else(|| {
        ApiError::BadRequest(format!(
            "role `{}`: expected viewer, editor, admin or billing",
            req.role
        ))
    })?;
    let op = Op::CreateToken {
        name: req.name,
        role,
    };
    let Outcome::Token(token) = write::apply(&state, &actor, op).await? else {
        return Err(ApiError::Internal(
            "a token write answered otherwise".into(),
        ));
    };
    Ok((StatusCode::CREATED, axum::Json(token)).into_response())
}

/// Revoke a token at once.
#[utoipa::path(delete, path = "/v1/tokens/{id}", tag = "tokens", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn revoke_token(
    State(state): State<Arc<AppState>>,
    Admin(actor): Admin,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    write::apply(&state, &actor, Op::RevokeToken { id }).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Replace the bootstrap admin token with a new one (shown once); the old one is refused from
/// now on, also when a later start passes it in `TOLLGATE_ADMIN_TOKEN`.
#[utoipa::path(post, path = "/v1/tokens/bootstrap/rotate", tag = "tokens", security(("bearer" = [])),
    responses((status = 201, body = NewToken), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn rotate_bootstrap(
    State(state): State<Arc<AppState>>,
    Admin(actor): Admin,
) -> Result<Response, ApiError> {
    let Outcome::Token(token) = write::apply(&state, &actor, Op::RotateBootstrap).await? else {
        return Err(ApiError::Internal(
            "a token write answered otherwise".into(),
        ));
    };
    Ok((StatusCode::CREATED, axum::Json(token)).into_response())
}

#[derive(Debug, Deserialize, IntoParams)]
struct ChangesQuery {
    /// At most this many, newest first (default 100).
    limit: Option<u32>,
}

/// Who changed what, newest first.
#[utoipa::path(get, path = "/v1/changes", tag = "policies", security(("bearer" = [])),
    params(ChangesQuery),
    responses((status = 200, body = Vec<Change>), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn list_changes(
    State(state): State<Arc<AppState>>,
    _: Viewer,
    Query(q): Query<ChangesQuery>,
) -> Result<Response, ApiError> {
    let limit = q.limit.unwrap_or(100).min(10_000);
    Ok(axum::Json(state.store.changes(limit).await?).into_response())
}
