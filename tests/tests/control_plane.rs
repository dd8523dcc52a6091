//! The control plane with real gateways: entitlement changes reach every gateway within a second,
//! gateways keep enforcing (and restart from their saved snapshot) while the control plane is
//! down and catch up when it returns, and bad policies are refused. Each test runs on SQLite and
//! on PostgreSQL.

use serde_json::{Value, json};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tollgate_e2e::*;

fn cp_policy(upstream: SocketAddr) -> String {
    acme_policy(upstream, "cp-test", "")
}

/// GET `path` through `gw` with `key`.
async fn get(gw: &Gateway, path: &str, key: &str) -> reqwest::Response {
    client()
        .get(gw.url(path))
        .bearer_auth(key)
        .send()
        .await
        .expect("request")
}

async fn status_of(gw: &Gateway, path: &str, key: &str) -> (u16, Option<String>) {
    let r = get(gw, path, key).await;
    let retry = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    (r.status().as_u16(), retry)
}

/// Poll until `path` answers `want` for `key`.
async fn until_status(gw: &Gateway, path: &str, key: &str, want: u16, within: Duration) -> bool {
    eventually(within, || async {
        status_of(gw, path, key).await.0 == want
    })
    .await
}

async fn propagation(db: Db) {
    let mock = MockUpstream::start();
    let cp = ControlPlane::start(&db);
    let (key, token) = cp.seed_acme(cp_policy(mock.addr)).await;
    let snaps = TempDir::new("snapshots");
    let gws = [
        Gateway::following(&cp, &token, &snaps.0.join("a.json")),
        Gateway::following(&cp, &token, &snaps.0.join("b.json")),
    ];
    for gw in &gws {
        assert!(
            until_status(gw, "/lookup", &key, 200, Duration::from_secs(10)).await,
            "a gateway enforces the control plane's key"
        );
        assert_eq!(
            status_of(gw, "/exports/x", &key).await.0,
            403,
            "free has no export"
        );
    }
    let mut samples = Vec::new();
    for i in 0..20 {
        let (tier, want) = if i % 2 == 0 {
            ("pro", 200)
        } else {
            ("free", 403)
        };
        let started = Instant::now();
        let (status, body) = cp
            .call(
                "POST",
                "/v1/entitlements",
                Some(json!({ "subject": "acme", "tier": tier, "idempotency_key": format!("evt-{i}") })),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        for gw in &gws {
            assert!(
                until_status(gw, "/exports/x", &key, want, Duration::from_secs(5)).await,
                "change {i} ({tier}) reached every gateway"
            );
        }
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    samples.sort_by(f64::total_cmp);
    let p99 = samples[(samples.len() * 99).div_ceil(100) - 1];
    figure("entitlement_propagation_p99_ms", format!("{p99:.1}"));
    assert!(p99 < 1000.0, "p99 propagation {p99:.1} ms");

    // A payment provider retrying its webhook changes nothing the second time.
    let before = cp.call("GET", "/healthz", None).await.1["revision"].clone();
    let (status, body) = cp
        .call(
            "POST",
            "/v1/entitlements",
            Some(json!({ "subject": "acme", "tier": "free", "idempotency_key": "evt-19" })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["replayed"], true);
    assert_eq!(cp.call("GET", "/healthz", None).await.1["revision"], before);

    let m = metrics(&gws[0]).await;
    assert!(metric(&m, "subscription_snapshot_refresh{result=\"applied\"}").unwrap_or(0) >= 21);
    assert_eq!(metric(&m, "quota_snapshot_drift"), Some(0));
}

#[tokio::test]
async fn tier_upgrade_reaches_two_gateways_within_a_second_sqlite() {
    propagation(Db::sqlite()).await;
}

#[tokio::test]
async fn tier_upgrade_reaches_two_gateways_within_a_second_postgres() {
    propagation(Db::postgres()).await;
}

async fn outage(db: Db) {
    let mock = MockUpstream::start();
    let mut cp = ControlPlane::start(&db);
    let (key, token) = cp.seed_acme(cp_policy(mock.addr)).await;
    let snaps = TempDir::new("snapshots");
    let snapshot = snaps.0.join("gw.json");
    let gw = Gateway::following(&cp, &token, &snapshot);
    assert!(until_status(&gw, "/lookup", &key, 200, Duration::from_secs(10)).await);
    let revision = cp.call("GET", "/healthz", None).await.1["revision"]
        .as_u64()
        .expect("revision");

    cp.kill();
    assert!(
        eventually(Duration::from_secs(10), || async {
            get_json(gw.api_url("/status")).await["control_plane"]["connected"] == false
        })
        .await
    );
    assert_eq!(
        status_of(&gw, "/lookup", &key).await.0,
        200,
        "known keys still served"
    );
    assert_eq!(
        status_of(&gw, "/lookup", "tg_never_seen").await,
        (503, Some("3".into())),
        "an unknown key may be one issued meanwhile: retry, not 401"
    );

    // A gateway restarted while the control plane is away starts from its saved snapshot.
    drop(gw);
    let gw = Gateway::following(&cp, &token, &snapshot);
    assert_eq!(status_of(&gw, "/lookup", &key).await.0, 200);
    assert_eq!(status_of(&gw, "/exports/x", &key).await.0, 403);
    let st = get_json(gw.api_url("/status")).await;
    assert_eq!(st["control_plane"]["revision"], revision, "{st}");
    assert_eq!(
        st["policy"]["source"],
        format!("control-plane revision {revision}")
    );

    // Back: a change made now reaches the gateway.
    cp.restart();
    let body = cp.set_tier("acme", "pro").await;
    let latest = body["revision"].as_u64().expect("revision");
    assert!(
        until_status(&gw, "/exports/x", &key, 200, Duration::from_secs(15)).await,
        "the gateway caught up after the outage"
    );
    let st = get_json(gw.api_url("/status")).await;
    assert_eq!(st["control_plane"]["revision"], latest, "{st}");
    assert_eq!(st["control_plane"]["connected"], true);

    // Neither process logged a secret.
    for log in [&gw.log, &cp.log] {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        assert!(!text.is_empty(), "{} was captured", log.display());
        for secret in [&key, &token, &cp.admin] {
            assert!(
                !text.contains(secret.as_str()),
                "{} logs a secret",
                log.display()
            );
        }
    }
}

#[tokio::test]
async fn gateways_outlast_a_control_plane_outage_sqlite() {
    outage(Db::sqlite()).await;
}

#[tokio::test]
async fn gateways_outlast_a_control_plane_outage_postgres() {
    outage(Db::postgres()).await;
}

#[tokio::test]
async fn a_broken_policy_over_rest_is_refused_and_the_fleet_keeps_the_old_one() {
    let mock = MockUpstream::start();
    let db = Db::sqlite();
    let cp = ControlPlane::start(&db);
    let (key, token) = cp.seed_acme(cp_policy(mock.addr)).await;
    let snaps = TempDir::new("snapshots");
    let gw = Gateway::following(&cp, &token, &snaps.0.join("gw.json"));
    assert!(until_status(&gw, "/lookup", &key, 200, Duration::from_secs(10)).await);
    let broken = cp_policy(mock.addr).replace("quota: export", "quota: exprot");
    let (status, body) = cp
        .call("POST", "/v1/policies", Some(Value::String(broken)))
        .await;
    assert_eq!(status, 422, "{body}");
    let first = body["errors"][0].as_str().unwrap_or_default();
    assert!(
        first.starts_with("control-plane policy v2:6:")
            && first.contains("routes[1].quota")
            && first.contains("exprot"),
        "{body}"
    );
    let active = cp.call("GET", "/v1/policies/active", None).await.1;
    assert_eq!(active["version"], 1, "{active}");
    assert_eq!(status_of(&gw, "/lookup", &key).await.0, 200);
    assert_eq!(
        get_json(gw.api_url("/status")).await["last_error"],
        Value::Null,
        "the gateway never saw it"
    );
}

#[tokio::test]
async fn unknown_keys_get_the_guest_tier_while_the_control_plane_is_away_and_disabled_subjects_403()
{
    let mock = MockUpstream::start();
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let snaps = TempDir::new("snapshots");
    let snapshot = snaps.0.join("gw.json");
    let args = [
        "--control-plane",
        &nowhere,
        "--control-plane-token",
        "unused-token",
        "--control-plane-snapshot",
        snapshot.to_str().expect("utf-8"),
    ];
    let file = format!(
        "{}subjects:
  - {{ key: file-key, id: local, tier: pro }}
  - {{ key: off-key, id: off, tier: free, enabled: false }}
guest_tier: free
",
        cp_policy(mock.addr)
    );
    let gw = Gateway::start_with(&file, &args);
    assert_eq!(
        status_of(&gw, "/exports/x", "file-key").await.0,
        200,
        "file subjects work"
    );
    assert_eq!(
        status_of(&gw, "/lookup", "who-knows").await.0,
        200,
        "guest tier"
    );
    assert_eq!(
        status_of(&gw, "/exports/x", "who-knows").await.0,
        403,
        "guests get the guest tier only"
    );
    assert_eq!(
        status_of(&gw, "/lookup", "off-key").await.0,
        403,
        "disabled subject"
    );
    let r = client()
        .post(gw.api_url("/check"))
        .json(&json!({ "subject": "off", "quota": "lookup" }))
        .send()
        .await
        .expect("check");
    assert_eq!(r.status(), 403, "/check refuses a disabled subject too");
    assert_eq!(
        get_json(gw.api_url("/status")).await["control_plane"]["connected"],
        false
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_restored_to_an_older_revision_is_not_trusted_for_unknown_keys() {
    let mock = MockUpstream::start();
    let db = Db::sqlite();
    let mut cp = ControlPlane::start(&db);
    let (key, token) = cp.seed_acme(cp_policy(mock.addr)).await;
    let snaps = TempDir::new("snapshots");
    let gw = Gateway::following(&cp, &token, &snaps.0.join("gw.json"));
    assert!(until_status(&gw, "/lookup", &key, 200, Duration::from_secs(10)).await);

    // A backup of the database, then a change made after it.
    cp.kill();
    let Db::Sqlite(dir) = &db else { unreachable!() };
    let backup = TempDir::new("backup");
    let files = ["cp.db", "cp.db-wal", "cp.db-shm"];
    for f in files {
        let _ = std::fs::copy(dir.0.join(f), backup.0.join(f));
    }
    cp.restart();
    cp.set_tier("acme", "pro").await;
    assert!(until_status(&gw, "/exports/x", &key, 200, Duration::from_secs(10)).await);

    // The database is restored from the backup: the control plane is behind the gateway.
    cp.kill();
    for f in files {
        let _ = std::fs::remove_file(dir.0.join(f));
        let _ = std::fs::copy(backup.0.join(f), dir.0.join(f));
    }
    cp.restart();
    assert!(
        eventually(Duration::from_secs(10), || async {
            let st = get_json(gw.api_url("/status")).await;
            st["control_plane"]["connected"] == false
                && metric(&metrics(&gw).await, "control_plane_connected") == Some(1)
        })
        .await,
        "streaming again, but not current"
    );
    assert_eq!(
        status_of(&gw, "/exports/x", &key).await.0,
        200,
        "the newer entitlement stays in force"
    );
    assert_eq!(
        status_of(&gw, "/lookup", "tg_issued_after_the_backup").await,
        (503, Some("3".into())),
        "a key this gateway does not know cannot be checked against a restored control plane"
    );

    // A change made on the restored control plane is obeyed although its revision number is
    // not above the gateway's: a revoked key stops working.
    cp.revoke_first_key("acme").await;
    assert!(
        until_status(&gw, "/lookup", &key, 401, Duration::from_secs(10)).await,
        "the key revoked after the restore is refused"
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            get_json(gw.api_url("/status")).await["control_plane"]["connected"] == true
        })
        .await,
        "current again"
    );
}

/// Upstream credentials live in the gateways' environment, not the control plane's: a policy
/// whose header names a variable the control plane lacks is published, a gateway that has it
/// sends it, and a gateway that lacks it refuses only that upstream's route (503) while every
/// later revision, a key revocation among them, still reaches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_variable_only_the_gateways_have_does_not_stop_the_fleet() {
    const VAR: &str = "VENDOR_E2E_KEY";
    let mock = MockUpstream::start();
    let cp = ControlPlane::start(&Db::sqlite());
    let policy = format!(
        "version: vendor-creds
upstreams:
  up: {{ address: '{addr}' }}
  vendor: {{ address: '{addr}', headers: {{ authorization: 'Bearer ${{{VAR}}}' }} }}
routes:
  - {{ name: lookup, match: {{ path_prefix: /lookup }}, upstream: up, quota: lookup }}
  - {{ name: vendor, match: {{ path_prefix: /vendor }}, upstream: vendor, quota: lookup }}
tiers:
  free:
    lookup: {{ unlimited: true }}
",
        addr = mock.addr
    );
    let (key, token) = cp.seed_acme(policy).await;
    let snaps = TempDir::new("snapshots");
    let with = Gateway::following_env(&cp, &token, &snaps.0.join("a.json"), &[(VAR, "sk-v1")]);
    let without = Gateway::following(&cp, &token, &snaps.0.join("b.json"));
    for gw in [&with, &without] {
        assert!(until_status(gw, "/lookup", &key, 200, Duration::from_secs(10)).await);
    }
    let r = get(&with, "/vendor/x", &key).await;
    assert_eq!(r.status(), 200);
    let echo: Value = r.json().await.expect("json");
    assert_eq!(
        echo["authorization"], "Bearer sk-v1",
        "the gateway's own value"
    );

    let r = get(&without, "/vendor/x", &key).await;
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"], "upstream_unconfigured", "{body}");
    assert!(
        !body.to_string().contains(VAR),
        "the client is not told the variable: {body}"
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            std::fs::read_to_string(&without.log).is_ok_and(|l| l.contains(VAR))
        })
        .await,
        "the operator is told which variable is missing"
    );

    // A revocation still reaches the gateway that lacks the variable.
    cp.revoke_first_key("acme").await;
    for gw in [&with, &without] {
        assert!(
            until_status(gw, "/lookup", &key, 401, Duration::from_secs(10)).await,
            "the revoked key is refused"
        );
    }
}

/// The token a payment webhook holds moves subjects between tiers and does nothing else: it
/// reads nothing, publishes no policy, issues no key (nor signs in to the console: see
/// `console.rs`).
#[tokio::test]
async fn a_billing_token_changes_entitlements_and_nothing_else() {
    let mock = MockUpstream::start();
    let cp = ControlPlane::start(&Db::sqlite());
    cp.seed_acme(cp_policy(mock.addr)).await;
    let (billing, _) = cp.issue_token("stripe-webhook", "billing").await;
    let send = |method: &str, path: &str, body: Option<Value>| {
        let mut req = client()
            .request(method.parse().expect("method"), cp.url(path))
            .bearer_auth(&billing);
        if let Some(b) = body {
            req = req.json(&b);
        }
        req.send()
    };
    let r = send(
        "POST",
        "/v1/entitlements",
        Some(json!({ "subject": "acme", "tier": "pro" })),
    )
    .await
    .expect("request");
    assert_eq!(r.status(), 200);
    let (_, subject) = cp.call("GET", "/v1/subjects/acme", None).await;
    assert_eq!(subject["tier"], "pro", "{subject}");
    let (_, changes) = cp.call("GET", "/v1/changes", None).await;
    assert!(
        changes.to_string().contains("token:stripe-webhook"),
        "the change names its actor: {changes}"
    );

    for (method, path, body) in [
        ("GET", "/v1/subjects/acme", None),
        ("GET", "/v1/policies/active", None),
        ("GET", "/v1/watch", None),
        ("POST", "/v1/subjects/acme/keys", None),
        ("PUT", "/v1/subjects/acme", Some(json!({ "tier": "free" }))),
        (
            "POST",
            "/v1/tokens",
            Some(json!({ "name": "x", "role": "admin" })),
        ),
    ] {
        let r = send(method, path, body).await.expect("request");
        assert_eq!(r.status(), 403, "{method} {path}");
    }
    let (_, subject) = cp.call("GET", "/v1/subjects/acme", None).await;
    assert_eq!(subject["tier"], "pro", "nothing else changed: {subject}");
    assert_eq!(
        subject["keys"].as_array().map(Vec::len),
        Some(1),
        "{subject}"
    );
}
