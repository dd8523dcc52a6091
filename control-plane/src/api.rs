//! The REST API: policies (versions, history, diff, rollback, dry-run), tiers, subjects and their
//! API keys, the payment-webhook entitlement endpoint, admin tokens, the change log, and the
//! OpenAPI document generated from these handlers.
//!
//! Every write takes the write lock, compiles the state it would publish with the gateway's own
//! policy code (refusing it with 422 and every error's line and column), commits it with the
//! change log entry, publishes it to watching gateways and emits an audit event.

use crate::auth::{Actor, BOOTSTRAP_ID, Role, random_secret, sha256_hex};
use crate::error::{ApiError, ErrorBody};
use crate::state::{AppState, validate};
use crate::store::{Change, KeyRecord, PolicyVersion, Store, SubjectRecord, TokenRecord};
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use bytes::Bytes;
use quota::audit::EventBody;
use quota::names::{self, NameKind};
use quota::policy::{PolicyDoc, SubjectEntry};
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
        .route("/v1/changes", get(list_changes))
        .route("/v1/watch", get(crate::watch::watch))
        .with_state(state)
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Tollgate control plane", description = "Policies, subjects and entitlements of a Tollgate gateway fleet. Every /v1 route needs `Authorization: Bearer <token>`: viewer tokens read, editor tokens change policies and subjects, admin tokens manage tokens."),
    paths(
        healthz, list_policies, create_policy, active_policy, validate_policy, diff_policies,
        get_policy, rollback_policy, list_tiers, list_subjects, get_subject, put_subject,
        delete_subject, create_key, revoke_key, change_entitlement, list_tokens, create_token,
        revoke_token, list_changes, crate::watch::watch
    ),
    components(schemas(ErrorBody, PolicyVersion, SubjectRecord, KeyRecord, TokenRecord, Change)),
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

// ---------------------------------------------------------------------------------------------
// Policies

/// The policy history, newest first (without the documents).
#[utoipa::path(get, path = "/v1/policies", tag = "policies", security(("bearer" = [])),
    responses((status = 200, body = Vec<PolicyVersion>), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn list_policies(
    State(state): State<Arc<AppState>>,
    actor: Actor,
) -> Result<Response, ApiError> {
    actor.require(Role::Viewer)?;
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
    actor: Actor,
    Query(q): Query<PolicyQuery>,
    body: Bytes,
) -> Result<Response, ApiError> {
    actor.require(Role::Editor)?;
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

async fn put_policy(
    state: &AppState,
    actor: &Actor,
    yaml: String,
    comment: String,
) -> Result<PolicyVersion, ApiError> {
    let _write = state.write_lock.lock().await;
    let mut snap = state.store.snapshot().await?;
    let before = snap.policy.as_ref().map(|p| p.version);
    let next = state
        .store
        .policy_history()
        .await?
        .first()
        .map_or(1, |p| p.version + 1);
    snap.policy = Some(PolicyDoc {
        version: next,
        yaml: yaml.clone(),
    });
    let compiled = validate(snap).await?;
    let mut w = state.store.begin().await?;
    let version =
        Store::insert_policy(&mut w, &yaml, &compiled.version, &comment, &actor.name).await?;
    let detail = format!("policy v{version} ({})", compiled.version);
    Store::commit(w, "policy", &format!("v{version}"), &actor.name, &detail).await?;
    state.publish_committed().await;
    state.audit(
        None,
        EventBody::PolicyChanged {
            actor: actor.name.clone(),
            before_version: before.map(|v| format!("v{v}")),
            after_version: format!("v{version}"),
        },
    );
    tracing::info!(actor = %actor.name, version, label = %compiled.version, "policy version created");
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
    actor: Actor,
) -> Result<Response, ApiError> {
    actor.require(Role::Viewer)?;
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
    actor: Actor,
    Path(version): Path<String>,
) -> Result<Response, ApiError> {
    actor.require(Role::Viewer)?;
    Ok(axum::Json(stored_version(&state, &version).await?).into_response())
}

/// A stored policy version named by `v3` or `3`.
async fn stored_version(state: &AppState, version: &str) -> Result<PolicyVersion, ApiError> {
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
    actor: Actor,
    body: Bytes,
) -> Result<Response, ApiError> {
    actor.require(Role::Editor)?;
    let yaml = yaml_body(&body)?;
    let mut snap = state.store.snapshot().await?;
    let next = snap.policy.as_ref().map_or(1, |p| p.version + 1);
    snap.policy = Some(PolicyDoc {
        version: next,
        yaml,
    });
    let p = validate(snap).await?;
    let mut tiers: Vec<&String> = p.tiers.keys().collect();
    tiers.sort();
    Ok(axum::Json(json!({
        "valid": true,
        "label": p.version,
        "routes": p.routes.iter().map(|r| &*r.name).collect::<Vec<_>>(),
        "tiers": tiers,
    }))
    .into_response())
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
    actor: Actor,
    Query(q): Query<DiffQuery>,
) -> Result<Response, ApiError> {
    actor.require(Role::Viewer)?;
    let from = stored_version(&state, &q.from).await?;
    let to = match &q.to {
        Some(v) => stored_version(&state, v).await?,
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
    Ok(axum::Json(json!({ "from": from.version, "to": to.version, "diff": diff })).into_response())
}

/// Make an older version's document active again, as a new version (history only grows, so
/// gateways never see the version number go back).
#[utoipa::path(post, path = "/v1/policies/{version}/rollback", tag = "policies", security(("bearer" = [])),
    params(("version" = u64, Path, description = "the version to restore")),
    responses((status = 201, body = PolicyVersion), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn rollback_policy(
    State(state): State<Arc<AppState>>,
    actor: Actor,
    Path(version): Path<String>,
) -> Result<Response, ApiError> {
    actor.require(Role::Editor)?;
    let old = stored_version(&state, &version).await?;
    let comment = format!("rollback to v{}", old.version);
    let p = put_policy(&state, &actor, old.yaml.unwrap_or_default(), comment).await?;
    Ok((StatusCode::CREATED, axum::Json(p)).into_response())
}

/// The tiers of the active policy and the quota types each includes.
#[utoipa::path(get, path = "/v1/tiers", tag = "subjects", security(("bearer" = [])),
    responses((status = 200, description = "`{\"tier\": [\"quota type\", …]}`"), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn list_tiers(
    State(state): State<Arc<AppState>>,
    actor: Actor,
) -> Result<Response, ApiError> {
    actor.require(Role::Viewer)?;
    let mut snap = state.store.snapshot().await?;
    snap.subjects.clear();
    let p = validate(snap).await?;
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

// ---------------------------------------------------------------------------------------------
// Subjects and keys

/// Every subject with its tier, overrides and keys (never the keys themselves).
#[utoipa::path(get, path = "/v1/subjects", tag = "subjects", security(("bearer" = [])),
    responses((status = 200, body = Vec<SubjectRecord>), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn list_subjects(
    State(state): State<Arc<AppState>>,
    actor: Actor,
) -> Result<Response, ApiError> {
    actor.require(Role::Viewer)?;
    Ok(axum::Json(state.store.subjects().await?).into_response())
}

#[utoipa::path(get, path = "/v1/subjects/{id}", tag = "subjects", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 200, body = SubjectRecord), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn get_subject(
    State(state): State<Arc<AppState>>,
    actor: Actor,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    actor.require(Role::Viewer)?;
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
    actor: Actor,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    actor.require(Role::Editor)?;
    let req: PutSubject = json_body(&body)?;
    check_subject_names(&id, &req.tier, req.overrides.iter().flat_map(|o| o.keys()))?;
    let _write = state.write_lock.lock().await;
    let mut snap = state.store.snapshot().await?;
    require_policy(&snap)?;
    let before = snap.subjects.iter().find(|s| s.id == id).cloned();
    let entry = SubjectEntry {
        id: id.clone(),
        tier: req.tier,
        time_zone: req
            .time_zone
            .or_else(|| before.as_ref().map(|b| b.time_zone.clone()))
            .unwrap_or_else(|| "UTC".into()),
        enabled: req
            .enabled
            .or(before.as_ref().map(|b| b.enabled))
            .unwrap_or(true),
        overrides: req
            .overrides
            .or_else(|| before.as_ref().map(|b| b.overrides.clone()))
            .unwrap_or_default(),
        key_sha256: before
            .as_ref()
            .map(|b| b.key_sha256.clone())
            .unwrap_or_default(),
    };
    write_subject(
        &state,
        &actor,
        &mut snap,
        entry,
        before.map(|b| b.tier),
        None,
    )
    .await?;
    drop(_write);
    let s = state.store.subject(&id).await?;
    Ok(axum::Json(s).into_response())
}

/// A name from a request checked by the one rule of `quota::names` (subject ids, tiers and quota
/// types end up in Redis keys, metric labels and the ledger): 400 with the reason otherwise.
fn check_name(kind: NameKind, name: &str) -> Result<(), ApiError> {
    names::check(kind, name).map_err(|e| ApiError::BadRequest(e.to_string()))
}

/// The names a subject write brings: its id, tier and the quota types it overrides.
fn check_subject_names<'a>(
    id: &str,
    tier: &str,
    overrides: impl IntoIterator<Item = &'a String>,
) -> Result<(), ApiError> {
    check_name(NameKind::Subject, id)?;
    check_name(NameKind::Tier, tier)?;
    for quota in overrides {
        check_name(NameKind::QuotaType, quota)?;
    }
    Ok(())
}

fn require_policy(snap: &quota::policy::Snapshot) -> Result<(), ApiError> {
    if snap.policy.is_none() {
        return Err(ApiError::Conflict(
            "upload a policy first (POST /v1/policies): a subject's tier is checked against it"
                .into(),
        ));
    }
    Ok(())
}

fn json_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("request body: {e}")))
}

/// Validate the snapshot with `entry` in place, then write it; the caller holds the write lock.
async fn write_subject(
    state: &AppState,
    actor: &Actor,
    snap: &mut quota::policy::Snapshot,
    mut entry: SubjectEntry,
    before_tier: Option<String>,
    idempotency: Option<(&str, &str, serde_json::Value)>,
) -> Result<u64, ApiError> {
    snap.subjects.retain(|s| s.id != entry.id);
    snap.subjects.push(entry.clone());
    validate(snap.clone()).await?;
    entry.key_sha256.clear();
    let mut w = state.store.begin().await?;
    Store::upsert_subject(&mut w, &entry, &actor.name).await?;
    let revision = w.revision;
    if let Some((key, request_sha, mut response)) = idempotency {
        response["revision"] = revision.into();
        Store::record_entitlement_request(&mut w, key, request_sha, &response.to_string()).await?;
    }
    let detail = format!(
        "tier {} → {}, time zone {}, enabled {}",
        before_tier.as_deref().unwrap_or("(new)"),
        entry.tier,
        entry.time_zone,
        entry.enabled
    );
    Store::commit(w, "subject", &entry.id, &actor.name, &detail).await?;
    state.publish_committed().await;
    state.audit(
        Some(&entry.id),
        EventBody::EntitlementChanged {
            actor: actor.name.clone(),
            before_tier,
            after_tier: entry.tier.clone(),
        },
    );
    Ok(revision)
}

/// Delete a subject and its keys.
#[utoipa::path(delete, path = "/v1/subjects/{id}", tag = "subjects", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn delete_subject(
    State(state): State<Arc<AppState>>,
    actor: Actor,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    actor.require(Role::Editor)?;
    let _write = state.write_lock.lock().await;
    let before = state.store.subject(&id).await?;
    let mut w = state.store.begin().await?;
    if !Store::delete_subject(&mut w, &id).await? {
        return Err(ApiError::NotFound(format!("no subject `{id}`")));
    }
    Store::commit(w, "subject", &id, &actor.name, "deleted").await?;
    state.publish_committed().await;
    state.audit(
        Some(&id),
        EventBody::EntitlementChanged {
            actor: actor.name.clone(),
            before_tier: before.map(|b| b.tier),
            after_tier: String::new(),
        },
    );
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Debug, Serialize, ToSchema)]
struct NewKey {
    id: String,
    /// The API key. Shown this once: only its hash is stored.
    key: String,
    prefix: String,
    subject: String,
    revision: u64,
}

/// Issue an API key for a subject. The response is the only time the key is shown.
#[utoipa::path(post, path = "/v1/subjects/{id}/keys", tag = "subjects", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 201, body = NewKey), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn create_key(
    State(state): State<Arc<AppState>>,
    actor: Actor,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    actor.require(Role::Editor)?;
    let _write = state.write_lock.lock().await;
    if state.store.subject(&id).await?.is_none() {
        return Err(ApiError::NotFound(format!("no subject `{id}`")));
    }
    let key = format!("tg_{}", random_secret());
    let key_id = random_secret()[..16].to_string();
    let prefix = key[..10].to_string();
    let mut w = state.store.begin().await?;
    let revision = w.revision;
    Store::insert_key(
        &mut w,
        &id,
        &key_id,
        &quota::policy::key_sha256_hex(&key),
        &prefix,
        &actor.name,
    )
    .await?;
    let detail = format!("key {key_id} ({prefix}…) issued");
    Store::commit(w, "key", &id, &actor.name, &detail).await?;
    state.publish_committed().await;
    let body = NewKey {
        id: key_id,
        key,
        prefix,
        subject: id,
        revision,
    };
    Ok((StatusCode::CREATED, axum::Json(body)).into_response())
}

/// Revoke one of a subject's API keys.
#[utoipa::path(delete, path = "/v1/subjects/{id}/keys/{key_id}", tag = "subjects", security(("bearer" = [])),
    params(("id" = String, Path), ("key_id" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn revoke_key(
    State(state): State<Arc<AppState>>,
    actor: Actor,
    Path((id, key_id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    actor.require(Role::Editor)?;
    let _write = state.write_lock.lock().await;
    let mut w = state.store.begin().await?;
    if !Store::revoke_key(&mut w, &id, &key_id).await? {
        return Err(ApiError::NotFound(format!(
            "subject `{id}` has no active key `{key_id}`"
        )));
    }
    Store::commit(w, "key", &id, &actor.name, &format!("key {key_id} revoked")).await?;
    state.publish_committed().await;
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
}

/// Set a subject's tier in one call, shaped for a payment webhook (creates the subject if new).
#[utoipa::path(post, path = "/v1/entitlements", tag = "subjects", security(("bearer" = [])),
    request_body = EntitlementChange,
    responses((status = 200, description = "`{\"subject\", \"before_tier\", \"after_tier\", \"revision\", \"replayed\"}`"),
        (status = 409, body = ErrorBody, description = "idempotency key reused with another request"), (status = 422, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn change_entitlement(
    State(state): State<Arc<AppState>>,
    actor: Actor,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    actor.require(Role::Editor)?;
    let req: EntitlementChange = json_body(&body)?;
    check_subject_names(&req.subject, &req.tier, [])?;
    let key = req.idempotency_key.clone().or_else(|| {
        headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    });
    // A blank key would make every such call a replay of the first one.
    if key.as_deref().is_some_and(|k| k.trim().is_empty()) {
        return Err(ApiError::BadRequest(
            "`idempotency_key` (or the Idempotency-Key header) must not be blank".into(),
        ));
    }
    let request_sha = sha256_hex(
        &serde_json::to_vec(&(&req.subject, &req.tier, &req.time_zone)).unwrap_or_default(),
    );
    let replay = |stored: String, sha: String| -> Result<Response, ApiError> {
        if sha != request_sha {
            return Err(ApiError::Conflict(
                "this idempotency key was used for a different request".into(),
            ));
        }
        let mut v: serde_json::Value = serde_json::from_str(&stored)
            .map_err(|e| ApiError::Internal(format!("stored response: {e}")))?;
        v["replayed"] = true.into();
        Ok(axum::Json(v).into_response())
    };
    if let Some(k) = &key
        && let Some((sha, stored)) = state.store.entitlement_request(k).await?
    {
        return replay(stored, sha);
    }
    let _write = state.write_lock.lock().await;
    // Checked again under the lock: a retry may have raced the first call.
    if let Some(k) = &key
        && let Some((sha, stored)) = state.store.entitlement_request(k).await?
    {
        return replay(stored, sha);
    }
    let mut snap = state.store.snapshot().await?;
    require_policy(&snap)?;
    let before = snap.subjects.iter().find(|s| s.id == req.subject).cloned();
    let entry = SubjectEntry {
        id: req.subject.clone(),
        tier: req.tier.clone(),
        time_zone: before
            .as_ref()
            .map(|b| b.time_zone.clone())
            .or(req.time_zone.clone())
            .unwrap_or_else(|| "UTC".into()),
        enabled: before.as_ref().is_none_or(|b| b.enabled),
        overrides: before
            .as_ref()
            .map(|b| b.overrides.clone())
            .unwrap_or_default(),
        key_sha256: before
            .as_ref()
            .map(|b| b.key_sha256.clone())
            .unwrap_or_default(),
    };
    let before_tier = before.map(|b| b.tier);
    let response = |revision: u64| {
        json!({
            "subject": req.subject,
            "before_tier": before_tier,
            "after_tier": req.tier,
            "revision": revision,
            "replayed": false,
        })
    };
    let idem = key
        .as_deref()
        .map(|k| (k, request_sha.as_str(), response(0)));
    let revision =
        write_subject(&state, &actor, &mut snap, entry, before_tier.clone(), idem).await?;
    tracing::info!(actor = %actor.name, subject = %req.subject, tier = %req.tier, revision, "entitlement changed");
    Ok(axum::Json(response(revision)).into_response())
}

// ---------------------------------------------------------------------------------------------
// Tokens and the change log

/// Every admin token (never the tokens themselves).
#[utoipa::path(get, path = "/v1/tokens", tag = "tokens", security(("bearer" = [])),
    responses((status = 200, body = Vec<TokenRecord>), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn list_tokens(
    State(state): State<Arc<AppState>>,
    actor: Actor,
) -> Result<Response, ApiError> {
    actor.require(Role::Admin)?;
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

#[derive(Debug, Serialize, ToSchema)]
struct NewToken {
    id: String,
    name: String,
    role: String,
    /// Shown this once: only its hash is stored.
    token: String,
}

/// Create a token.
#[utoipa::path(post, path = "/v1/tokens", tag = "tokens", security(("bearer" = [])),
    request_body = NewTokenRequest,
    responses((status = 201, body = NewToken), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn create_token(
    State(state): State<Arc<AppState>>,
    actor: Actor,
    body: Bytes,
) -> Result<Response, ApiError> {
    actor.require(Role::Admin)?;
    let req: NewTokenRequest = json_body(&body)?;
    let role = Role::parse(&req.role).ok_or_else(|| {
        ApiError::BadRequest(format!(
            "role `{}`: expected viewer, editor or admin",
            req.role
        ))
    })?;
    if req.name.trim().is_empty() {
        return Err(ApiError::BadRequest("`name` must not be empty".into()));
    }
    let id = random_secret()[..16].to_string();
    let token = format!("tga_{id}_{}", random_secret());
    state
        .store
        .put_token(
            &id,
            &req.name,
            role.name(),
            &sha256_hex(token.as_bytes()),
            &actor.name,
            false,
        )
        .await?;
    tracing::info!(actor = %actor.name, id = %id, name = %req.name, role = role.name(), "token created");
    let body = NewToken {
        id,
        name: req.name,
        role: role.name().into(),
        token,
    };
    Ok((StatusCode::CREATED, axum::Json(body)).into_response())
}

/// Revoke a token at once.
#[utoipa::path(delete, path = "/v1/tokens/{id}", tag = "tokens", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn revoke_token(
    State(state): State<Arc<AppState>>,
    actor: Actor,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    actor.require(Role::Admin)?;
    if id == BOOTSTRAP_ID {
        return Err(ApiError::Conflict(
            "the bootstrap token is set by the operator at start; change it there".into(),
        ));
    }
    if !state.store.revoke_token(&id).await? {
        return Err(ApiError::NotFound(format!("no active token `{id}`")));
    }
    tracing::info!(actor = %actor.name, id = %id, "token revoked");
    Ok(StatusCode::NO_CONTENT.into_response())
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
    actor: Actor,
    Query(q): Query<ChangesQuery>,
) -> Result<Response, ApiError> {
    actor.require(Role::Viewer)?;
    let limit = q.limit.unwrap_or(100).min(10_000);
    Ok(axum::Json(state.store.changes(limit).await?).into_response())
}
