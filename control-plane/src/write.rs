//! The one write path. Every change — policy, subject, API key, entitlement, token — is an `Op`
//! that `apply` checks against the actor's role, validates (names, and the whole state compiled
//! with the gateway's own policy code), writes with its change-log entry in one transaction at the
//! next revision (on PostgreSQL under the database-wide advisory lock, so any number of instances
//! hand out revisions in one line), publishes to watching gateways, and emits as an audit event
//! with its actor. Handlers only parse requests and shape answers.

use crate::auth::{Actor, BOOTSTRAP_ID, Role, random_secret, sha256_hex};
use crate::error::ApiError;
use crate::secrets::{RewriteError, hash_plain_keys};
use crate::state::{AppState, validate};
use crate::store::{Store, Write};
use quota::audit::EventBody;
use quota::names::{self, NameKind};
use quota::policy::{PolicyDoc, Snapshot, SubjectEntry};
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// A change an actor asks for.
#[derive(Debug)]
pub enum Op {
    Policy {
        yaml: String,
        comment: String,
    },
    PutSubject {
        id: String,
        tier: String,
        time_zone: Option<String>,
        overrides: Option<BTreeMap<String, Value>>,
        enabled: Option<bool>,
    },
    DeleteSubject {
        id: String,
    },
    Entitlement(Entitlement),
    IssueKey {
        subject: String,
    },
    RevokeKey {
        subject: String,
        key_id: String,
    },
    CreateToken {
        name: String,
        role: Role,
    },
    /// Any token, the bootstrap one included (then only while another admin token exists).
    RevokeToken {
        id: String,
    },
    /// A new bootstrap token replaces the current one, which is refused from then on.
    RotateBootstrap,
    /// The operator's `TOLLGATE_ADMIN_TOKEN` at start (its hash).
    SetBootstrap {
        sha256: String,
    },
    /// At start: stored policy documents that still hold plain keys (stored before keys were
    /// hashed on upload) are rewritten in place, as a revision, so gateways replace their
    /// snapshot files too.
    HashStoredKeys,
}

/// A payment provider's webhook call.
#[derive(Debug)]
pub struct Entitlement {
    pub subject: String,
    pub tier: String,
    pub time_zone: Option<String>,
    /// (idempotency key, hash of the request it answered).
    pub idempotency: Option<(String, String)>,
    /// The provider's time of the event (ms since the epoch): an older one than the last applied
    /// is superseded and changes nothing.
    pub event_ms: Option<i64>,
}

impl Op {
    fn role(&self) -> Role {
        match self {
            Op::Policy { .. }
            | Op::PutSubject { .. }
            | Op::DeleteSubject { .. }
            | Op::IssueKey { .. }
            | Op::RevokeKey { .. } => Role::Editor,
            Op::Entitlement(_) => Role::Billing,
            Op::CreateToken { .. }
            | Op::RevokeToken { .. }
            | Op::RotateBootstrap
            | Op::SetBootstrap { .. }
            | Op::HashStoredKeys => Role::Admin,
        }
    }

    /// Names that end up in Redis keys, metric labels or the ledger, checked before anything.
    fn check_names(&self) -> Result<(), ApiError> {
        match self {
            Op::PutSubject {
                id,
                tier,
                overrides,
                ..
            } => {
                check_name(NameKind::Subject, id)?;
                check_name(NameKind::Tier, tier)?;
                for quota in overrides.iter().flat_map(|o| o.keys()) {
                    check_name(NameKind::QuotaType, quota)?;
                }
            }
            Op::Entitlement(e) => {
                check_name(NameKind::Subject, &e.subject)?;
                check_name(NameKind::Tier, &e.tier)?;
                if let Some((k, _)) = &e.idempotency
                    && k.trim().is_empty()
                {
                    return Err(ApiError::BadRequest(
                        "`idempotency_key` (or the Idempotency-Key header) must not be blank"
                            .into(),
                    ));
                }
            }
            Op::CreateToken { name, .. } if name.trim().is_empty() => {
                return Err(ApiError::BadRequest("`name` must not be empty".into()));
            }
            _ => {}
        }
        Ok(())
    }
}

/// What a write produced, for the handler's answer.
#[derive(Debug)]
pub enum Outcome {
    Policy {
        version: u64,
        revision: u64,
    },
    Subject {
        revision: u64,
    },
    Deleted {
        revision: u64,
    },
    Key(NewKey),
    Token(NewToken),
    /// The webhook's answer: applied, replayed or superseded.
    Entitlement(Value),
}

#[derive(Debug, Serialize, ToSchema)]
pub struct NewKey {
    pub id: String,
    /// The API key. Shown this once: only its hash is stored.
    pub key: String,
    pub prefix: String,
    pub subject: String,
    pub revision: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct NewToken {
    pub id: String,
    pub name: String,
    pub role: String,
    /// Shown this once: only its hash is stored.
    pub token: String,
    pub revision: u64,
}

/// What a committed write records: the change-log line and the audit event.
struct Record {
    kind: &'static str,
    target: String,
    detail: String,
    subject: Option<String>,
    audit: EventBody,
    outcome: Outcome,
}

/// Apply `op` for `actor`: the only way state changes.
pub async fn apply(state: &AppState, actor: &Actor, op: Op) -> Result<Outcome, ApiError> {
    actor.require(op.role())?;
    op.check_names()?;
    // A policy's keys are hashed before anything else sees the document.
    let op = match op {
        Op::Policy { yaml, comment } => Op::Policy {
            yaml: match hash_plain_keys(&yaml) {
                Ok(Some(hashed)) => hashed,
                Ok(None) => yaml,
                // Let the policy checks say what is wrong with it; refuse it if they do not.
                Err(RewriteError::Unparsable) => {
                    let mut snap = state.store.snapshot().await?;
                    let version = snap.policy.as_ref().map_or(1, |p| p.version + 1);
                    snap.policy = Some(PolicyDoc { version, yaml });
                    validate(snap).await?;
                    return Err(ApiError::BadRequest(RewriteError::Unparsable.to_string()));
                }
                Err(e) => return Err(ApiError::BadRequest(e.to_string())),
            },
            comment,
        },
        op => op,
    };
    let _local = state.write_lock.lock().await;
    let mut w = state.store.begin().await?;
    let snap = Store::read_snapshot(&mut w.tx).await?;
    let record = match write(&mut w, snap, actor, op).await? {
        Step::Commit(r) => r,
        Step::Done(outcome) => {
            // Nothing changed (a replay), or only the webhook's idempotency record.
            w.tx.commit()
                .await
                .map_err(crate::store::StoreError::from)?;
            return Ok(outcome);
        }
    };
    let revision =
        Store::commit(w, record.kind, &record.target, &actor.name, &record.detail).await?;
    state.publish_committed().await;
    state.audit(record.subject.as_deref(), record.audit);
    tracing::info!(actor = %actor.name, kind = record.kind, target = %record.target, revision, "change committed");
    Ok(record.outcome)
}

enum Step {
    Commit(Record),
    Done(Outcome),
}

async fn write(
    w: &mut Write<'_>,
    mut snap: Snapshot,
    actor: &Actor,
    op: Op,
) -> Result<Step, ApiError> {
    let revision = w.revision;
    let record = match op {
        Op::Policy { yaml, comment } => {
            let before = snap.policy.as_ref().map(|p| p.version);
            snap.policy = Some(PolicyDoc {
                version: before.map_or(1, |v| v + 1),
                yaml: yaml.clone(),
            });
            let compiled = validate(snap).await?;
            let version =
                Store::insert_policy(w, &yaml, &compiled.version, &comment, &actor.name).await?;
            Record {
                kind: "policy",
                target: format!("v{version}"),
                detail: format!("policy v{version} ({})", compiled.version),
                subject: None,
                audit: EventBody::PolicyChanged {
                    actor: actor.name.clone(),
                    before_version: before.map(|v| format!("v{v}")),
                    after_version: format!("v{version}"),
                },
                outcome: Outcome::Policy { version, revision },
            }
        }
        Op::PutSubject {
            id,
            tier,
            time_zone,
            overrides,
            enabled,
        } => {
            require_policy(&snap)?;
            let before = snap.subjects.iter().find(|s| s.id == id).cloned();
            if before.as_ref().is_some_and(|b| b.tier != tier) {
                // A tier changed by hand is an entitlement change as of now (see `entitlement`).
                // Creating a subject is not: its checkout event, dated before, must still apply.
                let newest = Store::entitlement_event(w, &id).await?;
                let at = w.now_ms.max(newest.unwrap_or(i64::MIN));
                Store::record_entitlement_event(w, &id, at).await?;
            }
            let entry = SubjectEntry {
                id,
                tier,
                time_zone: time_zone
                    .or_else(|| before.as_ref().map(|b| b.time_zone.clone()))
                    .unwrap_or_else(|| "UTC".into()),
                enabled: enabled
                    .or(before.as_ref().map(|b| b.enabled))
                    .unwrap_or(true),
                overrides: overrides
                    .or_else(|| before.as_ref().map(|b| b.overrides.clone()))
                    .unwrap_or_default(),
                key_sha256: before
                    .as_ref()
                    .map(|b| b.key_sha256.clone())
                    .unwrap_or_default(),
            };
            subject_record(w, &mut snap, actor, entry, before.map(|b| b.tier)).await?
        }
        Op::Entitlement(e) => return entitlement(w, snap, actor, e).await,
        Op::DeleteSubject { id } => {
            let before = snap
                .subjects
                .iter()
                .find(|s| s.id == id)
                .map(|s| s.tier.clone());
            if !Store::delete_subject(w, &id).await? {
                return Err(ApiError::NotFound(format!("no subject `{id}`")));
            }
            Record {
                kind: "subject",
                detail: "deleted".into(),
                subject: Some(id.clone()),
                target: id,
                audit: EventBody::EntitlementChanged {
                    actor: actor.name.clone(),
                    before_tier: before,
                    after_tier: String::new(),
                },
                outcome: Outcome::Deleted { revision },
            }
        }
        Op::IssueKey { subject } => {
            if !snap.subjects.iter().any(|s| s.id == subject) {
                return Err(ApiError::NotFound(format!("no subject `{subject}`")));
            }
            let key = format!("tg_{}", random_secret());
            let key_id = random_secret()[..16].to_string();
            let prefix = key[..10].to_string();
            let hash = quota::policy::key_sha256_hex(&key);
            Store::insert_key(w, &subject, &key_id, &hash, &prefix, &actor.name).await?;
            Record {
                kind: "key",
                target: subject.clone(),
                detail: format!("key {key_id} ({prefix}…) issued"),
                subject: Some(subject.clone()),
                audit: credential(actor, "api_key", &key_id, "issued"),
                outcome: Outcome::Key(NewKey {
                    id: key_id,
                    key,
                    prefix,
                    subject,
                    revision,
                }),
            }
        }
        Op::RevokeKey { subject, key_id } => {
            if !Store::revoke_key(w, &subject, &key_id).await? {
                return Err(ApiError::NotFound(format!(
                    "subject `{subject}` has no active key `{key_id}`"
                )));
            }
            Record {
                kind: "key",
                target: subject.clone(),
                detail: format!("key {key_id} revoked"),
                subject: Some(subject),
                audit: credential(actor, "api_key", &key_id, "revoked"),
                outcome: Outcome::Deleted { revision },
            }
        }
        Op::CreateToken { name, role } => {
            let id = random_secret()[..16].to_string();
            let token = format!("tga_{id}_{}", random_secret());
            let hash = sha256_hex(token.as_bytes());
            Store::put_token(w, &id, &name, role.name(), &hash, &actor.name, false).await?;
            Record {
                kind: "token",
                target: id.clone(),
                detail: format!("token `{name}` ({}) created", role.name()),
                subject: None,
                audit: credential(actor, "token", &id, "issued"),
                outcome: Outcome::Token(NewToken {
                    id,
                    name,
                    role: role.name().into(),
                    token,
                    revision,
                }),
            }
        }
        Op::RevokeToken { id } => {
            let Some(old) = Store::live_token(w, &id).await? else {
                return Err(ApiError::NotFound(format!("no active token `{id}`")));
            };
            if id == BOOTSTRAP_ID {
                if Store::other_admins(w, BOOTSTRAP_ID).await? == 0 {
                    return Err(ApiError::Conflict(
                        "the bootstrap token is the only admin token: create another admin token first"
                            .into(),
                    ));
                }
                Store::retire(w, &old.sha256).await?;
            }
            Store::revoke_token(w, &id).await?;
            Record {
                kind: "token",
                target: id.clone(),
                detail: format!("token `{}` revoked", old.name),
                subject: None,
                audit: credential(actor, "token", &id, "revoked"),
                outcome: Outcome::Deleted { revision },
            }
        }
        Op::RotateBootstrap => {
            let token = format!("tga_{BOOTSTRAP_ID}_{}", random_secret());
            install_bootstrap(w, &sha256_hex(token.as_bytes()), actor).await?;
            Record {
                kind: "token",
                target: BOOTSTRAP_ID.into(),
                detail: "bootstrap token rotated".into(),
                subject: None,
                audit: credential(actor, "token", BOOTSTRAP_ID, "rotated"),
                outcome: Outcome::Token(NewToken {
                    id: BOOTSTRAP_ID.into(),
                    name: "bootstrap".into(),
                    role: "admin".into(),
                    token,
                    revision,
                }),
            }
        }
        Op::SetBootstrap { sha256 } => {
            install_bootstrap(w, &sha256, actor).await?;
            Record {
                kind: "token",
                target: BOOTSTRAP_ID.into(),
                detail: "bootstrap token set from the environment".into(),
                subject: None,
                audit: credential(actor, "token", BOOTSTRAP_ID, "issued"),
                outcome: Outcome::Deleted { revision },
            }
        }
        Op::HashStoredKeys => {
            let mut rewritten = Vec::new();
            for (version, yaml) in Store::policy_documents(w).await? {
                match hash_plain_keys(&yaml) {
                    Ok(Some(hashed)) => {
                        Store::rewrite_policy_document(w, version, &hashed).await?;
                        rewritten.push(format!("v{version}"));
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(version, error = %e, "a stored policy may hold plain-text API keys that could not be hashed in place")
                    }
                }
            }
            let Some(active) = snap.policy.as_ref().map(|p| format!("v{}", p.version)) else {
                return Ok(Step::Done(Outcome::Deleted { revision: 0 }));
            };
            if rewritten.is_empty() {
                return Ok(Step::Done(Outcome::Deleted { revision: 0 }));
            }
            Record {
                kind: "policy",
                target: active.clone(),
                detail: format!(
                    "plain-text API keys replaced by their hashes in {}",
                    rewritten.join(", ")
                ),
                subject: None,
                audit: EventBody::PolicyChanged {
                    actor: actor.name.clone(),
                    before_version: Some(active.clone()),
                    after_version: active,
                },
                outcome: Outcome::Deleted { revision },
            }
        }
    };
    Ok(Step::Commit(record))
}

/// Make `sha256` the one live bootstrap token: a different live one is retired first.
async fn install_bootstrap(w: &mut Write<'_>, sha256: &str, actor: &Actor) -> Result<(), ApiError> {
    if let Some(old) = Store::live_token(w, BOOTSTRAP_ID).await?
        && old.sha256 != sha256
    {
        Store::retire(w, &old.sha256).await?;
    }
    Store::put_token(
        w,
        BOOTSTRAP_ID,
        "bootstrap",
        "admin",
        sha256,
        &actor.name,
        true,
    )
    .await?;
    Ok(())
}

fn credential(actor: &Actor, credential: &str, id: &str, action: &str) -> EventBody {
    EventBody::CredentialChanged {
        actor: actor.name.clone(),
        credential: credential.into(),
        id: id.into(),
        action: action.into(),
    }
}

/// Validate the snapshot with `entry` in place, then write it.
async fn subject_record(
    w: &mut Write<'_>,
    snap: &mut Snapshot,
    actor: &Actor,
    mut entry: SubjectEntry,
    before_tier: Option<String>,
) -> Result<Record, ApiError> {
    snap.subjects.retain(|s| s.id != entry.id);
    snap.subjects.push(entry.clone());
    validate(snap.clone()).await?;
    entry.key_sha256.clear();
    Store::upsert_subject(w, &entry, &actor.name).await?;
    let detail = format!(
        "tier {} → {}, time zone {}, enabled {}",
        before_tier.as_deref().unwrap_or("(new)"),
        entry.tier,
        entry.time_zone,
        entry.enabled
    );
    Ok(Record {
        kind: "subject",
        target: entry.id.clone(),
        detail,
        subject: Some(entry.id.clone()),
        audit: EventBody::EntitlementChanged {
            actor: actor.name.clone(),
            before_tier,
            after_tier: entry.tier,
        },
        outcome: Outcome::Subject {
            revision: w.revision,
        },
    })
}

async fn entitlement(
    w: &mut Write<'_>,
    mut snap: Snapshot,
    actor: &Actor,
    e: Entitlement,
) -> Result<Step, ApiError> {
    // Read under the write lock: a retry racing the first call, through any instance, waits.
    if let Some((key, request_sha)) = &e.idempotency
        && let Some((sha, stored)) = Store::entitlement_request(w, key).await?
    {
        if &sha != request_sha {
            return Err(ApiError::Conflict(
                "this idempotency key was used for a different request".into(),
            ));
        }
        let mut v: Value = serde_json::from_str(&stored)
            .map_err(|err| ApiError::Internal(format!("stored response: {err}")))?;
        v["replayed"] = true.into();
        return Ok(Step::Done(Outcome::Entitlement(v)));
    }
    require_policy(&snap)?;
    let before = snap.subjects.iter().find(|s| s.id == e.subject).cloned();
    let before_tier = before.as_ref().map(|b| b.tier.clone());
    let newest = Store::entitlement_event(w, &e.subject).await?;
    if let (Some(at), Some(newest)) = (e.event_ms, newest)
        && newest > at
    {
        // A late delivery of an older event: the newer one stands.
        let answer = json!({
            "subject": e.subject,
            "before_tier": before_tier,
            "after_tier": before_tier,
            "requested_tier": e.tier,
            "revision": snap.revision,
            "replayed": false,
            "superseded": true,
        });
        if let Some((key, request_sha)) = &e.idempotency {
            Store::record_entitlement_request(w, key, request_sha, &answer.to_string()).await?;
        }
        tracing::info!(actor = %actor.name, subject = %e.subject, "entitlement event superseded by a newer one");
        return Ok(Step::Done(Outcome::Entitlement(answer)));
    }
    let entry = SubjectEntry {
        id: e.subject.clone(),
        tier: e.tier.clone(),
        time_zone: before
            .as_ref()
            .map(|b| b.time_zone.clone())
            .or(e.time_zone)
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
    let mut record = subject_record(w, &mut snap, actor, entry, before_tier.clone()).await?;
    let answer = json!({
        "subject": e.subject,
        "before_tier": before_tier,
        "after_tier": e.tier,
        "revision": w.revision,
        "replayed": false,
        "superseded": false,
    });
    if let Some((key, request_sha)) = &e.idempotency {
        Store::record_entitlement_request(w, key, request_sha, &answer.to_string()).await?;
    }
    // Undated changes (the console, a webhook without `event_time`) happen now: a provider's
    // event from before them, delivered late, must not undo them either.
    let at = e
        .event_ms
        .unwrap_or(w.now_ms)
        .max(newest.unwrap_or(i64::MIN));
    Store::record_entitlement_event(w, &e.subject, at).await?;
    record.outcome = Outcome::Entitlement(answer);
    Ok(Step::Commit(record))
}

/// A name from a request checked by the one rule of `quota::names`: 400 with the reason otherwise.
fn check_name(kind: NameKind, name: &str) -> Result<(), ApiError> {
    names::check(kind, name).map_err(|e| ApiError::BadRequest(e.to_string()))
}

fn require_policy(snap: &Snapshot) -> Result<(), ApiError> {
    if snap.policy.is_none() {
        return Err(ApiError::Conflict(
            "upload a policy first (POST /v1/policies): a subject's tier is checked against it"
                .into(),
        ));
    }
    Ok(())
}
