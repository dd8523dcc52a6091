//! The control plane as a fleet: two `control-plane serve` instances on one PostgreSQL database,
//! gateways following different instances, changes written through either reaching both, a
//! killed instance failed over without a missed revision, concurrent writes through both in one
//! line of revisions — and no API key or token in plain text anywhere but its creation response.

use serde_json::{Value, json};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tollgate_e2e::*;

fn fleet_policy(upstream: SocketAddr, extra_subjects: &str) -> String {
    acme_policy(upstream, "fleet-test", extra_subjects)
}

async fn status_of(gw: &Gateway, path: &str, key: &str) -> u16 {
    client()
        .get(gw.url(path))
        .bearer_auth(key)
        .send()
        .await
        .expect("request")
        .status()
        .as_u16()
}

async fn until_status(gw: &Gateway, path: &str, key: &str, want: u16, within: Duration) -> bool {
    eventually(within, || async { status_of(gw, path, key).await == want }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_postgres_serve_one_fleet_and_fail_over() {
    let mock = MockUpstream::start();
    let db = Db::postgres();
    let mut a = ControlPlane::start(&db);
    let b = a.another();
    let (key, token) = a.seed_acme(fleet_policy(mock.addr, "")).await;
    let snaps = TempDir::new("snapshots");
    let urls_a = [a.url(""), b.url("")];
    let urls_b = [b.url(""), a.url("")];
    let gws = [
        Gateway::following_urls(&urls_a, &token, &snaps.0.join("a.json")),
        Gateway::following_urls(&urls_b, &token, &snaps.0.join("b.json")),
    ];
    for gw in &gws {
        assert!(
            until_status(gw, "/lookup", &key, 200, Duration::from_secs(10)).await,
            "a gateway enforces the key issued through instance a"
        );
    }

    // 20 tier changes, alternately through each instance, reach both gateways.
    let mut samples = Vec::new();
    for i in 0..20 {
        let cp = if i % 2 == 0 { &a } else { &b };
        let (tier, want) = if i % 2 == 0 {
            ("pro", 200)
        } else {
            ("free", 403)
        };
        let started = Instant::now();
        cp.set_tier("acme", tier).await;
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
    figure("cp_fleet_propagation_p99_ms", format!("{p99:.1}"));
    assert!(p99 <= 1000.0, "p99 propagation {p99:.1} ms");

    // 50 writes through each instance at once, all to one subject: one line of revisions, and
    // each write saw the one before it (no lost update).
    let writes = (0..100).map(|i| {
        let (cp, tier) = if i % 2 == 0 {
            (&a, "pro")
        } else {
            (&b, "free")
        };
        async move { cp.set_tier("race", tier).await }
    });
    let mut answers: Vec<Value> = futures_util::future::join_all(writes).await;
    answers.sort_by_key(|v| v["revision"].as_u64().expect("revision"));
    let first = answers[0]["revision"].as_u64().expect("revision");
    for (k, v) in answers.iter().enumerate() {
        assert_eq!(
            v["revision"].as_u64(),
            Some(first + k as u64),
            "revisions are consecutive: {v}"
        );
        if k > 0 {
            assert_eq!(
                v["before_tier"],
                answers[k - 1]["after_tier"],
                "write at revision {} saw the write before it",
                first + k as u64
            );
        } else {
            assert_eq!(v["before_tier"], Value::Null, "the first write created it");
        }
    }
    let last = answers.last().expect("answers");
    let (_, race) = b.call("GET", "/v1/subjects/race", None).await;
    assert_eq!(race["tier"], last["after_tier"], "the last write stands");
    let (_, changes) = a.call("GET", "/v1/changes?limit=1000", None).await;
    let race_revisions: Vec<u64> = changes
        .as_array()
        .expect("changes")
        .iter()
        .filter(|c| c["target"] == "race")
        .map(|c| c["revision"].as_u64().expect("revision"))
        .collect();
    assert_eq!(
        race_revisions.len(),
        100,
        "every write is in the change log"
    );

    // The instance gateway 0 follows dies; it fails over to b and misses nothing.
    a.kill();
    let mut written = Vec::new();
    for i in 0..6 {
        let tier = if i % 2 == 0 { "pro" } else { "free" };
        let body = b.set_tier("acme", tier).await;
        written.push(body["revision"].as_u64().expect("revision"));
    }
    let last = *written.last().expect("written");
    let caught_up = eventually(Duration::from_secs(15), || async {
        get_json(gws[0].api_url("/status")).await["control_plane"]["revision"]
            .as_u64()
            .is_some_and(|r| r >= last)
    })
    .await;
    let st = get_json(gws[0].api_url("/status")).await;
    let applied = st["control_plane"]["revision"].as_u64().unwrap_or(0);
    let missed = written.iter().filter(|r| **r > applied).count();
    figure("cp_failover_missed_revisions", missed);
    assert!(caught_up, "the gateway followed the other instance: {st}");
    assert_eq!(missed, 0);
    assert_eq!(st["control_plane"]["url"], b.url(""), "{st}");
    assert_eq!(
        status_of(&gws[0], "/exports/x", &key).await,
        403,
        "the last change (free) is enforced"
    );
}

/// Read a response body as text with the control plane's admin token (or `token`).
async fn text(url: String, token: &str) -> String {
    client()
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .expect("request")
        .text()
        .await
        .unwrap_or_default()
}

/// The first event of a watch stream (the full snapshot).
async fn first_watch_event(cp: &ControlPlane, token: &str) -> String {
    use futures_util::StreamExt;
    let resp = client()
        .get(cp.url("/v1/watch"))
        .bearer_auth(token)
        .send()
        .await
        .expect("watch");
    let mut body = resp.bytes_stream();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(chunk)) = body.next().await {
            buf.extend_from_slice(&chunk);
            if buf.windows(2).any(|w| w == b"\n\n") {
                break;
            }
        }
    })
    .await;
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_key_or_token_in_plain_text_outside_its_creation_response() {
    let mock = MockUpstream::start();
    let db = Db::sqlite();
    let cp = ControlPlane::start(&db);
    let file_key = format!("plain-policy-key-{}", unique_prefix());
    let subjects = format!("subjects:\n  - {{ key: {file_key}, id: filed, tier: pro }}\n");
    let (key, token) = cp.seed_acme(fleet_policy(mock.addr, &subjects)).await;
    let (editor, _) = cp.issue_token("ops", "editor").await;
    let snaps = TempDir::new("snapshots");
    let snapshot = snaps.0.join("gw.json");
    let gw = Gateway::following(&cp, &token, &snapshot);
    assert!(
        until_status(&gw, "/exports/x", &file_key, 200, Duration::from_secs(10)).await,
        "a key given in the policy works, though only its hash is stored"
    );
    assert!(until_status(&gw, "/lookup", &key, 200, Duration::from_secs(10)).await);

    // Every answer a viewer, an editor or the admin can read.
    let mut seen = Vec::new();
    for path in [
        "/healthz",
        "/openapi.json",
        "/v1/revision",
        "/v1/policies",
        "/v1/policies/active",
        "/v1/policies/1",
        "/v1/policies/diff?from=1",
        "/v1/tiers",
        "/v1/subjects",
        "/v1/subjects/acme",
        "/v1/subjects/filed",
        "/v1/tokens",
        "/v1/changes",
    ] {
        seen.push((format!("GET {path}"), text(cp.url(path), &cp.admin).await));
        seen.push((
            format!("GET {path} (editor)"),
            text(cp.url(path), &editor).await,
        ));
    }
    let snapshot_event = first_watch_event(&cp, &token).await;
    assert!(
        snapshot_event.contains("event: snapshot"),
        "the watch stream was read: {snapshot_event:?}"
    );
    seen.push(("watch stream".into(), snapshot_event));
    seen.push((
        "gateway /status".into(),
        text(gw.api_url("/status"), "").await,
    ));
    seen.push((
        "gateway /metrics".into(),
        text(gw.api_url("/metrics"), "").await,
    ));
    // Revocations answer too (and log).
    let (_, subject) = cp.call("GET", "/v1/subjects/acme", None).await;
    let key_id = subject["keys"][0]["id"]
        .as_str()
        .expect("key id")
        .to_string();
    let (status, body) = cp
        .call("DELETE", &format!("/v1/subjects/acme/keys/{key_id}"), None)
        .await;
    assert_eq!(status, 204);
    seen.push(("key revocation".into(), body.to_string()));
    let editor_id = editor.split('_').nth(1).expect("token id").to_string();
    let (status, body) = cp
        .call("DELETE", &format!("/v1/tokens/{editor_id}"), None)
        .await;
    assert_eq!(status, 204);
    seen.push(("token revocation".into(), body.to_string()));
    assert!(
        until_status(&gw, "/lookup", &key, 401, Duration::from_secs(10)).await,
        "the revoked key is refused"
    );
    seen.push((
        "snapshot file".into(),
        std::fs::read_to_string(&snapshot).expect("snapshot file"),
    ));
    for (name, log) in [("control-plane log", &cp.log), ("gateway log", &gw.log)] {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        assert!(!text.is_empty(), "{name} was captured");
        seen.push((name.into(), text));
    }

    let secrets = [
        ("policy key", file_key.as_str()),
        ("issued key", key.as_str()),
        ("viewer token", token.as_str()),
        ("editor token", editor.as_str()),
        ("admin token", cp.admin.as_str()),
    ];
    let mut found = 0;
    for (place, text) in &seen {
        for (what, secret) in secrets {
            if text.contains(secret) {
                found += 1;
                eprintln!("{what} found in {place}");
            }
        }
    }
    figure("plaintext_secrets_found", found);
    assert_eq!(found, 0);
    let active = text(cp.url("/v1/policies/active"), &cp.admin).await;
    assert!(active.contains("key_sha256"), "{active}");

    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&snapshot)
        .expect("snapshot")
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o777,
        0o600,
        "the snapshot file is the owner's alone"
    );
}

/// A change the serving instance did not make (the CLI writing to its database) reaches the
/// gateway through the periodic revision check, though no stream event announces it; the rotated
/// bootstrap token is dead, and a restart with it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_rotates_the_bootstrap_token_and_a_quiet_gateway_still_catches_up() {
    let mock = MockUpstream::start();
    let db = Db::sqlite();
    let mut cp = ControlPlane::start(&db);
    let (key, token) = cp.seed_acme(fleet_policy(mock.addr, "")).await;
    let snaps = TempDir::new("snapshots");
    let snapshot = snaps.0.join("gw.json");
    let snapshot_arg = snapshot.to_str().expect("utf-8").to_string();
    let url = cp.url("");
    let gw = Gateway::start_with(
        &fleet_policy(mock.addr, ""),
        &[
            "--control-plane",
            &url,
            "--control-plane-token",
            &token,
            "--control-plane-snapshot",
            &snapshot_arg,
            "--control-plane-check-ms",
            "200",
            "--control-plane-resync-after-ms",
            "400",
        ],
    );
    assert!(until_status(&gw, "/lookup", &key, 200, Duration::from_secs(10)).await);

    let out = output_ok(std::process::Command::new(bin("control-plane")).args([
        "token",
        "rotate-bootstrap",
        "--database",
        &cp.db_url,
    ]));
    let new_admin = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(new_admin.starts_with("tga_bootstrap_"), "{new_admin}");
    // The database's revision, read directly: asking the control plane would publish it.
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&cp.db_url).await.expect("database");
    let stored: i64 = sqlx::query_scalar("SELECT MAX(revision) FROM changes")
        .fetch_one(&pool)
        .await
        .expect("revision");
    pool.close().await;
    let stored = u64::try_from(stored).expect("revision");
    let caught_up = eventually(Duration::from_secs(5), || async {
        let st = get_json(gw.api_url("/status")).await;
        let applied = st["control_plane"]["revision"].as_u64().unwrap_or(0);
        applied >= stored
    })
    .await;
    assert!(caught_up, "the gateway learnt of the CLI's revision");
    let m = metrics(&gw).await;
    assert!(
        metric(&m, "subscription_snapshot_refresh_seconds_count").unwrap_or(0) >= 1,
        "refresh latency is measured"
    );

    let old = client()
        .get(cp.url("/v1/tokens"))
        .bearer_auth(&cp.admin)
        .send()
        .await
        .expect("request");
    assert_eq!(old.status(), 401, "the rotated token is dead");
    let new = client()
        .get(cp.url("/v1/tokens"))
        .bearer_auth(&new_admin)
        .send()
        .await
        .expect("request");
    assert_eq!(new.status(), 200);

    // A restart with the old token in TOLLGATE_ADMIN_TOKEN is refused, not silently re-armed.
    cp.kill();
    let out = std::process::Command::new(bin("control-plane"))
        .args(["serve", "--listen", "127.0.0.1:0", "--database", &cp.db_url])
        .env("TOLLGATE_ADMIN_TOKEN", &cp.admin)
        .output()
        .expect("control-plane serve");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("rotated or revoked"), "{err}");
    assert!(!err.contains(&cp.admin), "the token is not echoed");
}

/// A stand-in control plane whose stream goes quiet at a stale revision (its heartbeats keep
/// saying 1) while its revision endpoint says 2: the gateway resyncs by itself once it has been
/// behind for longer than the threshold, and the reconnection brings revision 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_behind_a_quiet_stream_resyncs_after_the_threshold() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mock = MockUpstream::start();
    let policy = fleet_policy(mock.addr, "");
    let snapshot_json = move |revision: u64, tier: &str| {
        json!({
            "revision": revision,
            "policy": { "version": 1, "yaml": policy },
            "subjects": [{
                "id": "acme", "tier": tier, "time_zone": "UTC", "enabled": true,
                "key_sha256": [quota::policy::key_sha256_hex("stand-in-key")],
            }],
        })
        .to_string()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let streams = Arc::new(AtomicUsize::new(0));
    let served = streams.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let streams = served.clone();
            let snapshot_json = snapshot_json.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head);
                if head.starts_with("GET /v1/revision") {
                    let body = r#"{"revision":2,"published":2}"#;
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = conn.write_all(resp.as_bytes()).await;
                    return;
                }
                let (revision, tier) = if streams.fetch_add(1, Ordering::SeqCst) == 0 {
                    (1, "free")
                } else {
                    (2, "pro")
                };
                let start = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\nevent: snapshot\nid: {revision}\ndata: {}\n\n",
                    snapshot_json(revision, tier)
                );
                if conn.write_all(start.as_bytes()).await.is_err() {
                    return;
                }
                loop {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let beat = format!(
                        "event: heartbeat\ndata: {{\"revision\":{revision},\"every_ms\":300}}\n\n"
                    );
                    if conn.write_all(beat.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let snaps = TempDir::new("snapshots");
    let snapshot = snaps.0.join("gw.json");
    let snapshot_arg = snapshot.to_str().expect("utf-8").to_string();
    let url = format!("http://{addr}");
    let gw = Gateway::start_with(
        &fleet_policy(mock.addr, ""),
        &[
            "--control-plane",
            &url,
            "--control-plane-token",
            "stand-in-token",
            "--control-plane-snapshot",
            &snapshot_arg,
            "--control-plane-check-ms",
            "100",
            "--control-plane-resync-after-ms",
            "400",
        ],
    );
    assert!(
        until_status(&gw, "/lookup", "stand-in-key", 200, Duration::from_secs(10)).await,
        "revision 1 applied"
    );
    assert!(
        until_status(
            &gw,
            "/exports/x",
            "stand-in-key",
            200,
            Duration::from_secs(10)
        )
        .await,
        "the gateway resynced and enforces revision 2"
    );
    assert!(streams.load(Ordering::SeqCst) >= 2, "it reconnected");
    let m = metrics(&gw).await;
    assert!(
        metric(&m, "subscription_snapshot_refresh{result=\"resync\"}").unwrap_or(0) >= 1,
        "the resync is counted"
    );
    let st = get_json(gw.api_url("/status")).await;
    assert_eq!(st["control_plane"]["revision"], 2, "{st}");
}
