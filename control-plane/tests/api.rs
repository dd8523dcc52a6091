//! The REST API driven in-process (`app(state)`, no sockets), on SQLite and on PostgreSQL:
//! roles on every route group, versions, diff, rollback, dry-run validation, webhook
//! idempotency, hashed keys, the OpenAPI document, and no secret in the logs.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use control_plane::{AppState, Store, app};
use http_body_util::BodyExt;
use quota::audit::NoSink;
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tower::ServiceExt;

const ADMIN: &str = "bootstrap-admin-token-for-tests";

const POLICY: &str = "version: api-test
upstreams:
  up: { address: '127.0.0.1:9' }
routes:
  - { name: lookup, match: { path_prefix: /lookup }, upstream: up, quota: lookup }
tiers:
  free:
    lookup: { daily: 10 }
  pro:
    lookup: { daily: 1000 }
";

struct Api {
    router: axum::Router,
    state: Arc<AppState>,
    _db: Option<PgDb>,
}

/// A fresh PostgreSQL database, dropped afterwards.
struct PgDb {
    admin: String,
    name: String,
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        // Dropped inside a runtime: do it on a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                if let Ok(pool) = sqlx::AnyPool::connect(&admin).await {
                    let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                    let _ = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&pool).await;
                }
            });
        })
        .join();
    }
}

async fn api(pg: bool) -> Api {
    api_with(pg, Box::new(NoSink)).await
}

async fn api_with(pg: bool, audit: Box<dyn quota::audit::AuditSink>) -> Api {
    sqlx::any::install_default_drivers();
    let (url, db) = if pg {
        let admin = std::env::var("TOLLGATE_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let name = format!("tgcp_{}", uuid::Uuid::now_v7().simple());
        let pool = sqlx::AnyPool::connect(&admin).await.expect("postgres");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&pool)
            .await
            .expect("create database");
        let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
        (
            format!("{base}/{name}"),
            Some(PgDb {
                admin: admin.clone(),
                name,
            }),
        )
    } else {
        ("sqlite::memory:".to_string(), None)
    };
    let store = Store::connect(&url).await.expect("store");
    // As an operator's earlier start left it (outside the write path: no revision, no event).
    sqlx::query(
        "INSERT INTO admin_tokens (id, name, role, sha256, created_by, created_at_ms)
         VALUES ('bootstrap', 'bootstrap', 'admin', $1, 'test', 0)",
    )
    .bind(control_plane::auth::sha256_hex(ADMIN.as_bytes()))
    .execute(store.pool())
    .await
    .expect("token");
    let state = AppState::new(store, audit, Duration::from_millis(200))
        .await
        .expect("state");
    Api {
        router: app(state.clone()),
        state,
        _db: db,
    }
}

impl Api {
    async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Body,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let resp = self
            .router
            .clone()
            .oneshot(req.body(body).expect("request"))
            .await
            .expect("response");
        let status = resp.status();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn json(&self, method: &str, path: &str, token: &str, v: Value) -> (StatusCode, Value) {
        self.call(method, path, Some(token), Body::from(v.to_string()))
            .await
    }

    /// Post an entitlement change as the admin.
    async fn entitle(&self, body: Value) -> (StatusCode, Value) {
        self.json("POST", "/v1/entitlements", ADMIN, body).await
    }

    /// Open a watch stream at `uri` (200 expected); its body.
    async fn watch(&self, uri: &str, token: &str) -> Body {
        let resp = self
            .router
            .clone()
            .oneshot(
                Request::builder()
                    .uri(uri)
                    .header("authorization", format!("Bearer {token}"))
                    .header("user-agent", "tollgate-gateway/test")
                    .body(Body::empty())
                    .expect("request"),
            )
            .await
            .expect("response");
        assert_eq!(resp.status(), StatusCode::OK);
        resp.into_body()
    }

    async fn token(&self, role: &str) -> String {
        let (s, b) = self
            .json(
                "POST",
                "/v1/tokens",
                ADMIN,
                json!({ "name": role, "role": role }),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
        b["token"].as_str().expect("token").to_string()
    }
}

async fn roles_guard_every_route_group(pg: bool) {
    let api = api(pg).await;
    let viewer = api.token("viewer").await;
    let editor = api.token("editor").await;
    let billing = api.token("billing").await;
    let (s, _) = api
        .call("POST", "/v1/policies", Some(ADMIN), Body::from(POLICY))
        .await;
    assert_eq!(s, StatusCode::CREATED);
    // (method, path, body, the least role that may call it)
    let routes: &[(&str, &str, &str, &str)] = &[
        ("GET", "/v1/policies", "", "viewer"),
        ("GET", "/v1/policies/active", "", "viewer"),
        ("GET", "/v1/policies/1", "", "viewer"),
        ("GET", "/v1/policies/diff?from=1", "", "viewer"),
        ("POST", "/v1/policies/validate", POLICY, "editor"),
        ("POST", "/v1/policies", POLICY, "editor"),
        ("POST", "/v1/policies/1/rollback", "", "editor"),
        ("GET", "/v1/tiers", "", "viewer"),
        ("GET", "/v1/subjects", "", "viewer"),
        ("PUT", "/v1/subjects/s1", r#"{"tier":"free"}"#, "editor"),
        ("GET", "/v1/subjects/s1", "", "viewer"),
        ("POST", "/v1/subjects/s1/keys", "", "editor"),
        (
            "POST",
            "/v1/entitlements",
            r#"{"subject":"s2","tier":"pro"}"#,
            "billing",
        ),
        ("DELETE", "/v1/subjects/s2", "", "editor"),
        ("GET", "/v1/changes", "", "viewer"),
        ("GET", "/v1/tokens", "", "admin"),
        (
            "POST",
            "/v1/tokens",
            r#"{"name":"x","role":"viewer"}"#,
            "admin",
        ),
    ];
    for (method, path, body, least) in routes {
        let (s, b) = api.call(method, path, None, Body::from(*body)).await;
        assert_eq!(
            s,
            StatusCode::UNAUTHORIZED,
            "{method} {path} without a token"
        );
        assert_eq!(b["error"], "unauthorized");
        let (s, _) = api
            .call(method, path, Some("tga_nope_wrong"), Body::from(*body))
            .await;
        assert_eq!(
            s,
            StatusCode::UNAUTHORIZED,
            "{method} {path} with a made-up token"
        );
        let too_weak = match *least {
            "viewer" => None,
            "editor" | "billing" => Some(&viewer),
            _ => Some(&editor),
        };
        // A payment webhook's token does its one thing and nothing else.
        if *least != "billing" {
            let (s, b) = api
                .call(method, path, Some(&billing), Body::from(*body))
                .await;
            assert_eq!(s, StatusCode::FORBIDDEN, "{method} {path} as billing: {b}");
        }
        if let Some(t) = too_weak {
            let (s, b) = api.call(method, path, Some(t), Body::from(*body)).await;
            assert_eq!(
                s,
                StatusCode::FORBIDDEN,
                "{method} {path} with a weaker role: {b}"
            );
            assert_eq!(b["error"], "forbidden");
        }
        let enough = match *least {
            "viewer" => &viewer,
            "editor" => &editor,
            "billing" => &billing,
            _ => ADMIN,
        };
        let (s, b) = api
            .call(method, path, Some(enough), Body::from(*body))
            .await;
        assert!(s.is_success(), "{method} {path} as {least}: {s} {b}");
    }
    // The watch stream too (its body never ends, so only the status is read).
    for (token, want) in [
        (None, 401),
        (Some(billing.as_str()), 403),
        (Some(editor.as_str()), 200),
    ] {
        let mut req = Request::builder().uri("/v1/watch");
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let resp = api
            .router
            .clone()
            .oneshot(req.body(Body::empty()).expect("request"))
            .await
            .expect("response");
        assert_eq!(resp.status().as_u16(), want);
    }
    // Every write names its actor.
    let (_, changes) = api
        .call("GET", "/v1/changes", Some(&viewer), Body::empty())
        .await;
    let actors: Vec<&str> = changes
        .as_array()
        .expect("changes")
        .iter()
        .map(|c| c["actor"].as_str().unwrap_or(""))
        .collect();
    assert!(
        actors.contains(&"token:editor")
            && actors.contains(&"token:billing")
            && actors.contains(&"token:bootstrap"),
        "{changes}"
    );
    // A revoked token stops working at once.
    let id = viewer.split('_').nth(1).expect("id");
    let (s, _) = api
        .call(
            "DELETE",
            &format!("/v1/tokens/{id}"),
            Some(ADMIN),
            Body::empty(),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = api
        .call("GET", "/v1/policies", Some(&viewer), Body::empty())
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn roles_guard_every_route_group_sqlite() {
    roles_guard_every_route_group(false).await;
}

#[tokio::test]
async fn roles_guard_every_route_group_postgres() {
    roles_guard_every_route_group(true).await;
}

async fn policy_versions(pg: bool) {
    let api = api(pg).await;
    let (s, b) = api
        .call(
            "POST",
            "/v1/policies?comment=first",
            Some(ADMIN),
            Body::from(POLICY),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    assert_eq!(
        (b["version"].as_u64(), b["label"].as_str()),
        (Some(1), Some("api-test"))
    );
    let v2 = POLICY.replace("daily: 10 }", "daily: 20 }");
    let (s, _) = api
        .call("POST", "/v1/policies", Some(ADMIN), Body::from(v2.clone()))
        .await;
    assert_eq!(s, StatusCode::CREATED);

    // Dry run: errors with line and column, and nothing changes.
    let broken = POLICY.replace("daily: 10", "daily: ten");
    let before = api.state.store.revision().await.expect("revision");
    let (s, b) = api
        .call(
            "POST",
            "/v1/policies/validate",
            Some(ADMIN),
            Body::from(broken.clone()),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert_eq!(b["error"], "invalid");
    let first = b["errors"][0].as_str().expect("error line");
    assert!(
        first.starts_with("control-plane policy v3:8:22: tiers.free.lookup.daily:"),
        "{first}"
    );
    assert!(first.contains("tiers.free.lookup"), "{first}");
    let (s, b) = api
        .call("POST", "/v1/policies", Some(ADMIN), Body::from(broken))
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert_eq!(api.state.store.revision().await.expect("revision"), before);
    let (s, b) = api
        .call(
            "POST",
            "/v1/policies/validate",
            Some(ADMIN),
            Body::from(v2.clone()),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["routes"], json!(["lookup"]));

    // History, diff, rollback.
    let (_, hist) = api
        .call("GET", "/v1/policies", Some(ADMIN), Body::empty())
        .await;
    let versions: Vec<u64> = hist
        .as_array()
        .expect("history")
        .iter()
        .filter_map(|v| v["version"].as_u64())
        .collect();
    assert_eq!(versions, [2, 1]);
    assert_eq!(hist[1]["comment"], "first");
    let (_, d) = api
        .call(
            "GET",
            "/v1/policies/diff?from=1&to=2",
            Some(ADMIN),
            Body::empty(),
        )
        .await;
    let diff = d["diff"].as_str().expect("diff");
    assert!(
        diff.contains("-    lookup: { daily: 10 }\n+    lookup: { daily: 20 }"),
        "{diff}"
    );
    let (s, b) = api
        .call(
            "POST",
            "/v1/policies/1/rollback",
            Some(ADMIN),
            Body::empty(),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    assert_eq!(b["version"], 3);
    assert_eq!(b["yaml"], POLICY);
    assert_eq!(b["comment"], "rollback to v1");
    let (s, _) = api
        .call(
            "POST",
            "/v1/policies/9/rollback",
            Some(ADMIN),
            Body::empty(),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // A policy that drops a tier a subject is on is refused, naming the subject.
    let (s, _) = api
        .json("PUT", "/v1/subjects/acme", ADMIN, json!({ "tier": "pro" }))
        .await;
    assert_eq!(s, StatusCode::OK);
    let (_, key) = api
        .call("POST", "/v1/subjects/acme/keys", Some(ADMIN), Body::empty())
        .await;
    let no_pro = POLICY.replace("  pro:\n    lookup: { daily: 1000 }\n", "");
    let (s, b) = api
        .call("POST", "/v1/policies", Some(ADMIN), Body::from(no_pro))
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert!(
        b["errors"][0]
            .as_str()
            .unwrap_or("")
            .contains("unknown tier `pro`"),
        "{b}"
    );

    // What gateways receive: the active document and key hashes, never the key.
    let snap = api.state.store.snapshot().await.expect("snapshot");
    assert_eq!(snap.policy.as_ref().map(|p| p.version), Some(3));
    let key = key["key"].as_str().expect("key");
    assert_eq!(
        snap.subjects[0].key_sha256,
        [quota::policy::key_sha256_hex(key)]
    );
    let policy = snap.compile(&[]).expect("compiles");
    use quota::policy::EntitlementSource;
    assert_eq!(
        policy.subject_for_key(key).map(|s| s.id.to_string()),
        Some("acme".into())
    );
    let listed = api
        .call("GET", "/v1/subjects/acme", Some(ADMIN), Body::empty())
        .await
        .1;
    assert!(!listed.to_string().contains(key), "{listed}");
}

#[tokio::test]
async fn policies_are_versioned_diffed_rolled_back_and_validated_sqlite() {
    policy_versions(false).await;
}

#[tokio::test]
async fn policies_are_versioned_diffed_rolled_back_and_validated_postgres() {
    policy_versions(true).await;
}

async fn subjects_and_webhook(pg: bool) {
    let api = api(pg).await;
    let (s, b) = api
        .json("PUT", "/v1/subjects/acme", ADMIN, json!({ "tier": "free" }))
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "subjects need a policy first: {b}");
    api.call("POST", "/v1/policies", Some(ADMIN), Body::from(POLICY))
        .await;
    let bad = [
        (json!({ "tier": "gold" }), "unknown tier `gold`"),
        (
            json!({ "tier": "free", "time_zone": "Mars/Base" }),
            "unknown time zone",
        ),
        (
            json!({ "tier": "free", "overrides": { "lookup": { "daily": 0 } } }),
            "overrides.lookup",
        ),
        (
            json!({ "tier": "free", "overrides": { "nope": { "daily": 5 } } }),
            "quota type `nope`",
        ),
    ];
    for (body, want) in bad {
        let (s, b) = api
            .json("PUT", "/v1/subjects/acme", ADMIN, body.clone())
            .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {b}");
        assert!(b.to_string().contains(want), "{body}: {b}");
    }
    let (s, b) = api
        .json(
            "PUT",
            "/v1/subjects/acme",
            ADMIN,
            json!({ "tier": "free", "time_zone": "Europe/Berlin", "overrides": { "lookup": { "daily": 50 } } }),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["overrides"]["lookup"]["daily"], 50);
    let (_, key) = api
        .call("POST", "/v1/subjects/acme/keys", Some(ADMIN), Body::empty())
        .await;
    let key = key["key"].as_str().expect("key").to_string();
    let policy = api
        .state
        .store
        .snapshot()
        .await
        .expect("snap")
        .compile(&[])
        .expect("compiles");
    use quota::policy::EntitlementSource;
    let acme = policy.subject_for_key(&key).expect("acme");
    assert_eq!(acme.time_zone, chrono_tz::Europe::Berlin);
    assert_eq!(
        acme.tier.quotas.get("lookup"),
        Some(&quota::policy::QuotaLimits::Limited(vec![
            quota::policy::LimitSpec::Calendar {
                limit: 50,
                period: quota::calendar::CalendarPeriod::Day,
            }
        ])),
        "the override replaces the tier's limit"
    );

    // The webhook: one call upgrades; a retry with the same key changes nothing; the same key
    // with a different request is a conflict.
    let call = json!({ "subject": "acme", "tier": "pro", "idempotency_key": "evt_1" });
    let (s, first) = api.entitle(call.clone()).await;
    assert_eq!(s, StatusCode::OK, "{first}");
    assert_eq!(
        (first["before_tier"].as_str(), first["after_tier"].as_str()),
        (Some("free"), Some("pro"))
    );
    let rev = api.state.store.revision().await.expect("rev");
    let (s, again) = api.entitle(call).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(again["replayed"], true);
    assert_eq!(again["revision"], first["revision"]);
    assert_eq!(api.state.store.revision().await.expect("rev"), rev);
    let (s, _) = api
        .entitle(json!({ "subject": "acme", "tier": "free", "idempotency_key": "evt_1" }))
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    // A new customer is created by its first webhook.
    let (s, b) = api
        .entitle(json!({ "subject": "newco", "tier": "free", "time_zone": "Asia/Tokyo" }))
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["before_tier"], Value::Null);
    let (_, newco) = api
        .call("GET", "/v1/subjects/newco", Some(ADMIN), Body::empty())
        .await;
    assert_eq!(newco["time_zone"], "Asia/Tokyo");

    // Disable, revoke a key.
    let (s, b) = api
        .json(
            "PUT",
            "/v1/subjects/acme",
            ADMIN,
            json!({ "tier": "pro", "enabled": false }),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let key_id = b["keys"][0]["id"].as_str().expect("key id").to_string();
    let policy = api
        .state
        .store
        .snapshot()
        .await
        .expect("snap")
        .compile(&[])
        .expect("compiles");
    assert!(!policy.subject_for_key(&key).expect("still known").enabled);
    let (s, _) = api
        .call(
            "DELETE",
            &format!("/v1/subjects/acme/keys/{key_id}"),
            Some(ADMIN),
            Body::empty(),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let policy = api
        .state
        .store
        .snapshot()
        .await
        .expect("snap")
        .compile(&[])
        .expect("compiles");
    assert!(
        policy.subject_for_key(&key).is_none(),
        "a revoked key is unknown"
    );
}

#[tokio::test]
async fn subjects_keys_and_the_webhook_sqlite() {
    subjects_and_webhook(false).await;
}

#[tokio::test]
async fn subjects_keys_and_the_webhook_postgres() {
    subjects_and_webhook(true).await;
}

#[tokio::test]
async fn openapi_document_lists_every_route() {
    let api = api(false).await;
    let (s, doc) = api.call("GET", "/openapi.json", None, Body::empty()).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        doc["openapi"].as_str().unwrap_or("").starts_with("3."),
        "{doc}"
    );
    for path in [
        "/v1/policies",
        "/v1/policies/{version}/rollback",
        "/v1/subjects/{id}/keys",
        "/v1/entitlements",
        "/v1/tokens",
        "/v1/watch",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} missing");
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
}

/// Log lines written while the API handles requests carrying secrets.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn tokens_and_keys_never_reach_the_logs() {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let api = api(false).await;
    let editor = api.token("editor").await;
    api.call("POST", "/v1/policies", Some(&editor), Body::from(POLICY))
        .await;
    api.json(
        "PUT",
        "/v1/subjects/acme",
        &editor,
        json!({ "tier": "free" }),
    )
    .await;
    let (_, key) = api
        .call(
            "POST",
            "/v1/subjects/acme/keys",
            Some(&editor),
            Body::empty(),
        )
        .await;
    api.call("GET", "/v1/tokens", Some(&editor), Body::empty())
        .await;
    let text = String::from_utf8(logs.0.lock().expect("lock").clone()).expect("utf-8");
    assert!(
        text.contains("change committed"),
        "logs were captured: {text}"
    );
    for secret in [ADMIN, editor.as_str(), key["key"].as_str().expect("key")] {
        assert!(!text.contains(secret), "a secret was logged");
    }
}

/// Keeps every event emitted.
#[derive(Default)]
struct Collect(Mutex<Vec<quota::audit::AuditEvent>>);

impl quota::audit::AuditSink for Collect {
    fn emit(&self, event: quota::audit::AuditEvent) {
        self.0.lock().expect("lock").push(event);
    }
    fn counts(&self) -> quota::audit::SinkCounts {
        quota::audit::SinkCounts::default()
    }
}

#[tokio::test]
async fn every_admin_change_is_an_audit_event_with_its_actor() {
    use quota::audit::EventBody;
    let events = Arc::new(Collect::default());
    let api = api_with(false, Box::new(events.clone())).await;
    api.call("POST", "/v1/policies", Some(ADMIN), Body::from(POLICY))
        .await;
    api.call("POST", "/v1/policies", Some(ADMIN), Body::from(POLICY))
        .await;
    api.entitle(json!({ "subject": "acme", "tier": "free" }))
        .await;
    api.entitle(json!({ "subject": "acme", "tier": "pro" }))
        .await;
    let got: Vec<(Option<String>, EventBody)> = events
        .0
        .lock()
        .expect("lock")
        .iter()
        .map(|e| (e.subject.clone(), e.body.clone()))
        .collect();
    let actor = "token:bootstrap".to_string();
    assert_eq!(
        got,
        vec![
            (
                None,
                EventBody::PolicyChanged {
                    actor: actor.clone(),
                    before_version: None,
                    after_version: "v1".into()
                }
            ),
            (
                None,
                EventBody::PolicyChanged {
                    actor: actor.clone(),
                    before_version: Some("v1".into()),
                    after_version: "v2".into()
                }
            ),
            (
                Some("acme".into()),
                EventBody::EntitlementChanged {
                    actor: actor.clone(),
                    before_tier: None,
                    after_tier: "free".into()
                }
            ),
            (
                Some("acme".into()),
                EventBody::EntitlementChanged {
                    actor,
                    before_tier: Some("free".into()),
                    after_tier: "pro".into()
                }
            ),
        ]
    );
}

#[tokio::test]
async fn a_subject_without_keys_still_binds_policy_changes() {
    let api = api(false).await;
    api.call("POST", "/v1/policies", Some(ADMIN), Body::from(POLICY))
        .await;
    let (s, _) = api
        .json("PUT", "/v1/subjects/later", ADMIN, json!({ "tier": "pro" }))
        .await;
    assert_eq!(s, StatusCode::OK);
    // Dropping `pro` would break `later` the moment it gets a key: refused now.
    let no_pro = POLICY.replace("  pro:\n    lookup: { daily: 1000 }\n", "");
    let (s, b) = api
        .call("POST", "/v1/policies", Some(ADMIN), Body::from(no_pro))
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert!(b.to_string().contains("unknown tier `pro`"), "{b}");
}

#[tokio::test]
async fn revoking_a_token_ends_its_watch_stream() {
    let api = api(false).await;
    let viewer = api.token("viewer").await;
    let mut body = api.watch("/v1/watch", &viewer).await;
    let first = body.frame().await.expect("a first event").expect("frame");
    assert!(first.data_ref().is_some());
    let id = viewer.split('_').nth(1).expect("id");
    api.call(
        "DELETE",
        &format!("/v1/tokens/{id}"),
        Some(ADMIN),
        Body::empty(),
    )
    .await;
    // Heartbeats come every 200 ms here; the stream must end at the next one.
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(_)) = body.frame().await {}
    })
    .await;
    assert!(ended.is_ok(), "the stream ended after the revocation");
}

/// A document with thousands of errors is answered with the first thousand and their count.
#[tokio::test]
async fn a_policy_with_thousands_of_errors_gets_a_bounded_answer() {
    let api = api(false).await;
    let quotas: Vec<String> = (0..1500).map(|i| format!("q{i}: {{ daily: 0 }}")).collect();
    let many = format!("{POLICY}  huge: {{ {} }}\n", quotas.join(", "));
    let (s, b) = api
        .call(
            "POST",
            "/v1/policies/validate",
            Some(ADMIN),
            Body::from(many),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(b["errors"].as_array().map(Vec::len), Some(1000));
    assert!(
        b["detail"].as_str().unwrap_or("").contains("1500 error"),
        "{}",
        b["detail"]
    );
}

/// A watcher cannot claim a revision that was never published: the gateways page would list a
/// fake gateway as current.
#[tokio::test]
async fn a_watch_stream_cannot_claim_a_revision_never_published() {
    let api = api(false).await;
    let viewer = api.token("viewer").await;
    let mut body = api.watch("/v1/watch?since=999999999", &viewer).await;
    body.frame().await.expect("a first event").expect("frame");
    let published = api.state.published.borrow().revision;
    let listed = api.state.gateways.list();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].revision, published, "{listed:?}");
}

#[tokio::test]
async fn a_policy_is_checked_with_whichever_subjects_gateways_may_compile() {
    let api = api(false).await;
    api.call("POST", "/v1/policies", Some(ADMIN), Body::from(POLICY))
        .await;
    let (s, _) = api
        .json("PUT", "/v1/subjects/acme", ADMIN, json!({ "tier": "free" }))
        .await;
    assert_eq!(s, StatusCode::OK);
    // The document's own `acme` names a tier that does not exist. While the control plane's
    // `acme` has no key, gateways compile the document's entry: refused.
    let with_doc_subject = format!(
        "{POLICY}subjects:\n  - {{ id: acme, tier: gold, key_sha256: ['{}'] }}\n",
        "ab".repeat(32)
    );
    let (s, b) = api
        .call(
            "POST",
            "/v1/policies",
            Some(ADMIN),
            Body::from(with_doc_subject.clone()),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert!(b.to_string().contains("unknown tier `gold`"), "{b}");
    // With a key, the control plane's `acme` hides the document's: still refused, since revoking
    // that key would bring the document's entry back.
    let (s, _) = api
        .call("POST", "/v1/subjects/acme/keys", Some(ADMIN), Body::empty())
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, b) = api
        .call(
            "POST",
            "/v1/policies",
            Some(ADMIN),
            Body::from(with_doc_subject),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    let (_, active) = api
        .call("GET", "/v1/policies/active", Some(ADMIN), Body::empty())
        .await;
    assert_eq!(
        active["version"], 1,
        "the active version is unchanged: {active}"
    );
}

#[tokio::test]
async fn blank_idempotency_keys_and_the_reserved_guest_id_are_refused() {
    let api = api(false).await;
    api.call("POST", "/v1/policies", Some(ADMIN), Body::from(POLICY))
        .await;
    api.json("PUT", "/v1/subjects/acme", ADMIN, json!({ "tier": "free" }))
        .await;
    let (s, b) = api
        .entitle(json!({ "subject": "acme", "tier": "pro", "idempotency_key": " " }))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    let (s, b) = api
        .json(
            "PUT",
            "/v1/subjects/guest",
            ADMIN,
            json!({ "tier": "free" }),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert!(b.to_string().contains("reserved"), "{b}");
}

#[tokio::test]
async fn names_that_would_break_keys_labels_or_the_ledger_are_refused_with_400() {
    let api = api(false).await;
    api.call("POST", "/v1/policies", Some(ADMIN), Body::from(POLICY))
        .await;
    // `{` splits a Redis Cluster hash tag, a space a label, NUL is refused by PostgreSQL.
    for id in ["%7Bacme%7D", "acme%20corp", "ac%00me"] {
        let (s, b) = api
            .json(
                "PUT",
                &format!("/v1/subjects/{id}"),
                ADMIN,
                json!({ "tier": "free" }),
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{id}: {b}");
        assert!(
            b["detail"]
                .as_str()
                .is_some_and(|d| d.starts_with("invalid subject id")),
            "{id}: {b}"
        );
        assert!(
            !b.to_string().contains("\\u0000"),
            "the raw name is not echoed: {b}"
        );
    }
    for subject in ["{acme}", "acme corp", "ac\0me"] {
        let (s, b) = api
            .entitle(json!({ "subject": subject, "tier": "pro" }))
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{subject:?}: {b}");
    }
    let (s, b) = api
        .entitle(json!({ "subject": "acme", "tier": "pro/x" }))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    assert!(b.to_string().contains("invalid tier name"), "{b}");
    let (s, b) = api
        .json(
            "PUT",
            "/v1/subjects/acme",
            ADMIN,
            json!({ "tier": "free", "overrides": { "look up": { "daily": 5 } } }),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    assert!(b.to_string().contains("invalid quota type"), "{b}");
    // Nothing was written; a valid name still is.
    let (_, list) = api
        .call("GET", "/v1/subjects", Some(ADMIN), Body::empty())
        .await;
    assert_eq!(list, json!([]));
    let (s, b) = api
        .json(
            "PUT",
            "/v1/subjects/alice@example.com",
            ADMIN,
            json!({ "tier": "free" }),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
}

async fn unreadable_messages_are_kept(pg: bool) {
    let api = api(pg).await;
    let ledger = control_plane::ledger::Ledger::new(api.state.store.pool().clone())
        .await
        .expect("ledger");
    // An event type this consumer does not know yet (a newer gateway), redelivered once.
    let newer = audit_kafka::Unreadable {
        topic: "tollgate-audit".into(),
        partition: 2,
        offset: 41,
        payload: br#"{"type":"QuotaTransferred","schema_version":2}"#.to_vec(),
        error: "unknown variant `QuotaTransferred`".into(),
    };
    for _ in 0..2 {
        ledger
            .write_batch(&[], std::slice::from_ref(&newer))
            .await
            .expect("write");
    }
    assert_eq!(ledger.unreadable_count().await.expect("count"), 1);
    let payload: String = sqlx::query_scalar("SELECT payload FROM quota_audit_unreadable")
        .fetch_one(api.state.store.pool())
        .await
        .expect("row");
    assert!(payload.contains("QuotaTransferred"), "{payload}");
}

#[tokio::test]
async fn unreadable_messages_are_kept_once_sqlite() {
    unreadable_messages_are_kept(false).await;
}

#[tokio::test]
async fn unreadable_messages_are_kept_once_postgres() {
    unreadable_messages_are_kept(true).await;
}

#[tokio::test]
async fn a_late_older_entitlement_event_does_not_undo_a_newer_one() {
    let api = api(false).await;
    api.call("POST", "/v1/policies", Some(ADMIN), Body::from(POLICY))
        .await;
    let event = |tier: &str, at: &str, id: &str| json!({ "subject": "acme", "tier": tier, "event_time": at, "idempotency_key": id });
    // An event dated in the future would freeze the subject's entitlement: refused.
    let (s, b) = api
        .entitle(event("pro", "9999-01-01T00:00:00Z", "e0"))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    let (s, b) = api
        .entitle(event("free", "2026-12-01T10:00:00Z", "e1"))
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    // The upgrade happened at 10:05 and arrives first…
    let (s, up) = api
        .entitle(event("pro", "2026-12-01T10:05:00Z", "e3"))
        .await;
    assert_eq!(s, StatusCode::OK, "{up}");
    assert_eq!(up["superseded"], false);
    // …then the provider delivers an older downgrade (10:02) late.
    let (s, late) = api
        .entitle(event("free", "2026-12-01T10:02:00Z", "e2"))
        .await;
    assert_eq!(s, StatusCode::OK, "{late}");
    assert_eq!(late["superseded"], true, "{late}");
    assert_eq!(late["after_tier"], "pro", "{late}");
    assert_eq!(late["revision"], up["revision"], "nothing was written");
    let (_, subject) = api
        .call("GET", "/v1/subjects/acme", Some(ADMIN), Body::empty())
        .await;
    assert_eq!(subject["tier"], "pro", "the newer upgrade stands");
    // Its retry gets the same answer; a newer event still applies.
    let (_, again) = api
        .entitle(event("free", "2026-12-01T10:02:00Z", "e2"))
        .await;
    assert_eq!(again["superseded"], true);
    assert_eq!(again["replayed"], true);
    let (_, newer) = api
        .entitle(event("free", "2026-12-01T11:00:00Z", "e4"))
        .await;
    assert_eq!(newer["superseded"], false, "{newer}");
    assert_eq!(newer["after_tier"], "free");
    // A tier set by hand is a change as of now: an event from before it, delivered after it,
    // does not undo it (by the subject API, or through the webhook's path without a date).
    let a_minute_ago = (chrono::Utc::now() - chrono::Duration::minutes(1)).to_rfc3339();
    for (id, method, path, by_hand) in [
        ("s3", "PUT", "/v1/subjects/s3", json!({ "tier": "pro" })),
        (
            "s4",
            "POST",
            "/v1/entitlements",
            json!({ "subject": "s4", "tier": "pro" }),
        ),
    ] {
        let dated = |tier: &str, at: &str, key: String| json!({ "subject": id, "tier": tier, "event_time": at, "idempotency_key": key });
        let (s, b) = api
            .entitle(dated("free", "2026-12-01T10:00:00Z", format!("{id}-first")))
            .await;
        assert_eq!(s, StatusCode::OK, "{b}");
        let (s, b) = api.json(method, path, ADMIN, by_hand).await;
        assert_eq!(s, StatusCode::OK, "{method} {path}: {b}");
        let (_, late) = api
            .entitle(dated("free", &a_minute_ago, format!("{id}-late")))
            .await;
        assert_eq!(late["superseded"], true, "after {method} {path}: {late}");
        let (_, subject) = api
            .call(
                "GET",
                &format!("/v1/subjects/{id}"),
                Some(ADMIN),
                Body::empty(),
            )
            .await;
        assert_eq!(subject["tier"], "pro", "after {method} {path}");
    }
    // Creating a subject is no tier change: the checkout event behind it, dated before and
    // delivered after, still applies.
    let (s, b) = api
        .json("PUT", "/v1/subjects/s5", ADMIN, json!({ "tier": "free" }))
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let checkout = json!({ "subject": "s5", "tier": "pro", "event_time": a_minute_ago, "idempotency_key": "s5-checkout" });
    let (_, applied) = api.entitle(checkout).await;
    assert_eq!(applied["superseded"], false, "{applied}");
    assert_eq!(applied["after_tier"], "pro", "{applied}");
    let (s, b) = api.entitle(event("pro", "yesterday", "e5")).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
}

#[tokio::test]
async fn every_kind_of_write_is_in_the_change_log_and_an_audit_event_with_its_actor() {
    use quota::audit::EventBody;
    let events = Arc::new(Collect::default());
    let api = api_with(false, Box::new(events.clone())).await;
    let editor = api.token("editor").await;
    let editor_id = editor.split('_').nth(1).expect("id").to_string();
    api.call("POST", "/v1/policies", Some(&editor), Body::from(POLICY))
        .await;
    api.json(
        "PUT",
        "/v1/subjects/acme",
        &editor,
        json!({ "tier": "free" }),
    )
    .await;
    api.json(
        "POST",
        "/v1/entitlements",
        &editor,
        json!({ "subject": "acme", "tier": "pro" }),
    )
    .await;
    let (_, key) = api
        .call(
            "POST",
            "/v1/subjects/acme/keys",
            Some(&editor),
            Body::empty(),
        )
        .await;
    let key_id = key["id"].as_str().expect("key id");
    let (s, _) = api
        .call(
            "DELETE",
            &format!("/v1/subjects/acme/keys/{key_id}"),
            Some(&editor),
            Body::empty(),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = api
        .call("DELETE", "/v1/subjects/acme", Some(&editor), Body::empty())
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = api
        .call(
            "DELETE",
            &format!("/v1/tokens/{editor_id}"),
            Some(ADMIN),
            Body::empty(),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (_, changes) = api
        .call("GET", "/v1/changes", Some(ADMIN), Body::empty())
        .await;
    let mut log: Vec<(String, String, String)> = changes
        .as_array()
        .expect("changes")
        .iter()
        .map(|c| {
            (
                c["kind"].as_str().unwrap_or_default().to_string(),
                c["actor"].as_str().unwrap_or_default().to_string(),
                c["detail"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    log.reverse();
    let kinds: Vec<(&str, &str)> = log
        .iter()
        .map(|(k, a, _)| (k.as_str(), a.as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("token", "token:bootstrap"),
            ("policy", "token:editor"),
            ("subject", "token:editor"),
            ("subject", "token:editor"),
            ("key", "token:editor"),
            ("key", "token:editor"),
            ("subject", "token:editor"),
            ("token", "token:bootstrap"),
        ],
        "{log:?}"
    );
    assert!(
        log[4].2.ends_with("issued") && log[5].2.ends_with("revoked"),
        "{log:?}"
    );
    let got: Vec<(String, String)> = events
        .0
        .lock()
        .expect("lock")
        .iter()
        .map(|e| match &e.body {
            EventBody::PolicyChanged { actor, .. } => ("policy".into(), actor.clone()),
            EventBody::EntitlementChanged { actor, .. } => ("subject".into(), actor.clone()),
            EventBody::CredentialChanged {
                actor,
                credential,
                action,
                ..
            } => (format!("{credential} {action}"), actor.clone()),
            other => (format!("{other:?}"), String::new()),
        })
        .collect();
    let want: Vec<(String, String)> = [
        ("token issued", "token:bootstrap"),
        ("policy", "token:editor"),
        ("subject", "token:editor"),
        ("subject", "token:editor"),
        ("api_key issued", "token:editor"),
        ("api_key revoked", "token:editor"),
        ("subject", "token:editor"),
        ("token revoked", "token:bootstrap"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(got, want);
}

#[tokio::test]
async fn the_bootstrap_token_is_rotated_and_revoked() {
    let api = api(false).await;
    let (s, rotated) = api
        .call(
            "POST",
            "/v1/tokens/bootstrap/rotate",
            Some(ADMIN),
            Body::empty(),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{rotated}");
    let new = rotated["token"].as_str().expect("token").to_string();
    let (s, _) = api
        .call("GET", "/v1/tokens", Some(ADMIN), Body::empty())
        .await;
    assert_eq!(
        s,
        StatusCode::UNAUTHORIZED,
        "the old bootstrap token is dead"
    );
    let (s, _) = api
        .call("GET", "/v1/tokens", Some(&new), Body::empty())
        .await;
    assert_eq!(s, StatusCode::OK, "the new one works");
    let retired = control_plane::auth::sha256_hex(ADMIN.as_bytes());
    assert!(api.state.store.is_retired(&retired).await.expect("store"));
    // The only admin token cannot be revoked (nobody could manage tokens any more)…
    let (s, b) = api
        .call("DELETE", "/v1/tokens/bootstrap", Some(&new), Body::empty())
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");
    // …but once another admin exists it can.
    let (s, other) = api
        .json(
            "POST",
            "/v1/tokens",
            &new,
            json!({ "name": "ops", "role": "admin" }),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let other = other["token"].as_str().expect("token").to_string();
    let (s, _) = api
        .call(
            "DELETE",
            "/v1/tokens/bootstrap",
            Some(&other),
            Body::empty(),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = api
        .call("GET", "/v1/tokens", Some(&new), Body::empty())
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (_, changes) = api
        .call("GET", "/v1/changes", Some(&other), Body::empty())
        .await;
    let details: Vec<&str> = changes
        .as_array()
        .expect("changes")
        .iter()
        .filter_map(|c| c["detail"].as_str())
        .collect();
    assert!(details.contains(&"bootstrap token rotated"), "{details:?}");
    assert!(
        details.contains(&"token `bootstrap` revoked"),
        "{details:?}"
    );
}

#[tokio::test]
async fn an_internal_error_answers_a_fixed_message_and_an_id_found_in_the_log() {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let api = api(false).await;
    // The database goes away under the running API.
    api.state.store.pool().close().await;
    let (s, b) = api
        .call("GET", "/v1/subjects", Some(ADMIN), Body::empty())
        .await;
    // Verifying the token needs the database too: whichever step fails, the answer is the same.
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR, "{b}");
    assert_eq!(b["error"], "internal");
    assert_eq!(b["detail"], control_plane::error::INTERNAL_MESSAGE);
    let id = b["error_id"].as_str().expect("error id");
    let text = String::from_utf8(logs.0.lock().expect("lock").clone()).expect("utf-8");
    let line = text
        .lines()
        .find(|l| l.contains(id))
        .expect("the id is in the log");
    assert!(line.contains("cause"), "{line}");
    assert!(!b.to_string().to_lowercase().contains("pool"), "{b}");
}

#[test]
fn plain_keys_in_an_uploaded_policy_are_stored_as_hashes() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let api = api(false).await;
        let with_key = format!(
            "{POLICY}subjects:\n  - {{ key: very-secret-key-1, id: filed, tier: pro }}  # a note\n"
        );
        let (s, b) = api
            .call("POST", "/v1/policies", Some(ADMIN), Body::from(with_key))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
        let (_, active) = api
            .call("GET", "/v1/policies/active", Some(ADMIN), Body::empty())
            .await;
        let yaml = active["yaml"].as_str().expect("yaml");
        assert!(!yaml.contains("very-secret-key-1"), "{yaml}");
        assert!(
            yaml.contains(&quota::policy::key_sha256_hex("very-secret-key-1")),
            "{yaml}"
        );
        assert!(
            yaml.contains("# a note"),
            "the document is otherwise as written"
        );
        let snap = api.state.store.snapshot().await.expect("snapshot");
        let policy = snap.compile(&[]).expect("compiles");
        use quota::policy::EntitlementSource;
        assert!(policy.subject_for_key("very-secret-key-1").is_some());
    });
}

#[tokio::test]
async fn policies_stored_with_plain_keys_are_hashed_at_start_as_a_revision() {
    let api = api(false).await;
    api.call("POST", "/v1/policies", Some(ADMIN), Body::from(POLICY))
        .await;
    // As an older version stored it: the key in plain text.
    let plain =
        format!("{POLICY}subjects:\n  - {{ key: old-plain-key-7, id: legacy, tier: pro }}\n");
    sqlx::query("UPDATE policy_versions SET yaml = $1 WHERE version = 1")
        .bind(&plain)
        .execute(api.state.store.pool())
        .await
        .expect("update");
    let before = api.state.store.revision().await.expect("revision");
    let operator = control_plane::auth::Actor {
        name: "operator".into(),
        role: control_plane::auth::Role::Admin,
    };
    control_plane::write::apply(
        &api.state,
        &operator,
        control_plane::write::Op::HashStoredKeys,
    )
    .await
    .expect("rewrite");
    let (_, active) = api
        .call("GET", "/v1/policies/active", Some(ADMIN), Body::empty())
        .await;
    let yaml = active["yaml"].as_str().expect("yaml");
    assert!(!yaml.contains("old-plain-key-7"), "{yaml}");
    assert!(yaml.contains(&quota::policy::key_sha256_hex("old-plain-key-7")));
    let after = api.state.store.revision().await.expect("revision");
    assert_eq!(after, before + 1, "gateways get the rewritten document");
    assert_eq!(api.state.published.borrow().revision, after);
    // Nothing left to do: no further revision.
    control_plane::write::apply(
        &api.state,
        &operator,
        control_plane::write::Op::HashStoredKeys,
    )
    .await
    .expect("rewrite");
    assert_eq!(api.state.store.revision().await.expect("revision"), after);
}
