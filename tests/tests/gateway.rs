//! End-to-end: a real `gateway` process in front of a real `mock-upstream` process, checked the way
//! a client or an operator would check them.

use reqwest::StatusCode;
use serde_json::Value;
use std::process::Command;
use std::time::{Duration, Instant};
use tollgate_e2e::{
    Backend, Gateway, MockUpstream, bin, client, eventually, figure, get_json, policy, post_json,
    workspace_root,
};

/// Each quota test body runs once per counter backend: in memory and on the shared Redis.
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(tollgate_e2e::Backend::Memory).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(tollgate_e2e::Backend::shared_redis()).await;
                }
            )*
        }
    };
}

on_every_backend!(
    admits_up_to_the_limit_then_refuses_with_429_body_and_headers,
    daily_quota_resets_at_the_subjects_local_midnight,
    concurrent_requests_on_one_key_admit_exactly_the_limit,
    editing_the_policy_changes_the_enforced_limit_without_restart,
    broken_policy_keeps_the_old_limit_and_status_shows_the_error,
    check_with_a_repeated_request_id_charges_once,
);

const LOOKUP: &[(&str, &str, &str, u64)] = &[("lookup", "/lookup", "lookup", 1)];

async fn upstream_requests(mock: &MockUpstream) -> u64 {
    let v: Value = get_json(mock.url("/_mock/requests")).await;
    v["total"].as_u64().unwrap()
}

/// A policy where subject `key-free` may make `daily` lookups a day.
fn free_lookup(upstream: std::net::SocketAddr, daily: u64) -> String {
    let tiers = format!("  free:\n    lookup: {{ daily: {daily} }}");
    policy(upstream, LOOKUP, &tiers, &["free"])
}

/// Status of `GET /lookup` with `key`.
async fn lookup(gw: &Gateway, key: &str) -> StatusCode {
    get(gw, "/lookup", key).await.status()
}

async fn get(gw: &Gateway, path: &str, key: &str) -> reqwest::Response {
    client()
        .get(gw.url(path))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
}

async fn admits_up_to_the_limit_then_refuses_with_429_body_and_headers(backend: Backend) {
    let mock = MockUpstream::start();
    let gw = Gateway::start_on(&backend, &free_lookup(mock.addr, 3), &[]);
    for i in 0..3u64 {
        let r = client()
            .get(gw.url("/lookup/42"))
            .header("x-api-key", "key-free")
            .header("x-request-id", format!("req-{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            r.headers()["x-request-id"],
            format!("req-{i}").as_str(),
            "propagated"
        );
        assert_eq!(
            r.headers()["ratelimit-policy"],
            "\"lookup-day\";q=3;w=86400"
        );
        let rl = r.headers()["ratelimit"].to_str().unwrap().to_string();
        assert!(
            rl.starts_with(&format!("\"lookup-day\";r={};t=", 2 - i)),
            "{rl}"
        );
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["path"], "/lookup/42", "answered by the upstream");
        assert_eq!(
            body["request_id"],
            format!("req-{i}").as_str(),
            "upstream saw the request id"
        );
    }
    let r = get(&gw, "/lookup/42", "key-free").await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let h = r.headers().clone();
    let retry: i64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=86_400).contains(&retry), "Retry-After {retry}");
    assert_eq!(h["ratelimit-policy"], "\"lookup-day\";q=3;w=86400");
    assert!(
        h["ratelimit"]
            .to_str()
            .unwrap()
            .starts_with("\"lookup-day\";r=0;t=")
    );
    assert!(
        !h["x-request-id"].is_empty(),
        "a request id is created when absent"
    );
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "quota_exceeded");
    assert_eq!(body["quota"], "lookup");
    assert_eq!(body["limit"], 3);
    assert_eq!(body["remaining"], 0);
    assert_eq!(body["retry_after_s"], retry);
    let reset = chrono::DateTime::parse_from_rfc3339(body["reset_at"].as_str().unwrap()).unwrap();
    assert_eq!(
        reset.format("%H:%M:%S").to_string(),
        "00:00:00",
        "UTC subject resets at midnight"
    );
    assert_eq!(
        upstream_requests(&mock).await,
        3,
        "the refused request never reached the upstream"
    );
}

async fn daily_quota_resets_at_the_subjects_local_midnight(backend: Backend) {
    let mock = MockUpstream::start();
    let yaml = free_lookup(mock.addr, 2).replace("time_zone: UTC", "time_zone: America/New_York");
    let gw = Gateway::start_on(&backend, &yaml, &["--test-clock"]);
    // 23:59:50 in New York (UTC-5 in November).
    gw.set_clock("2026-11-22T04:59:50Z").await;
    for _ in 0..2 {
        assert_eq!(lookup(&gw, "key-free").await, StatusCode::OK);
    }
    let refused = get(&gw, "/lookup", "key-free").await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(
        body["reset_at"], "2026-11-22T05:00:00Z",
        "local midnight, not UTC midnight"
    );
    assert!(
        (9..=10).contains(&body["retry_after_s"].as_i64().unwrap()),
        "{body}"
    );
    gw.set_clock("2026-11-22T05:00:01Z").await;
    let r = get(&gw, "/lookup", "key-free").await;
    assert_eq!(r.status(), StatusCode::OK, "a new local day");
    assert!(
        r.headers()["ratelimit"]
            .to_str()
            .unwrap()
            .starts_with("\"lookup-day\";r=1;")
    );
}

#[tokio::test]
async fn the_clock_cannot_be_moved_without_test_clock() {
    let mock = MockUpstream::start();
    let gw = Gateway::start(&free_lookup(mock.addr, 2));
    let r = client()
        .post(gw.api_url("/test/clock"))
        .json(&serde_json::json!({ "now": "2030-01-01T00:00:00Z" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn unknown_key_is_401_and_unknown_route_is_404() {
    let mock = MockUpstream::start();
    let gw = Gateway::start(&free_lookup(mock.addr, 3));
    let r = client().get(gw.url("/lookup")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "unauthorized");
    let r = get(&gw, "/lookup", "not-a-key").await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = get(&gw, "/elsewhere", "key-free").await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(r.headers()["content-type"], "application/json");
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "no_route");
    assert_eq!(upstream_requests(&mock).await, 0);
}

#[tokio::test]
async fn quota_type_missing_from_the_tier_is_403() {
    let mock = MockUpstream::start();
    let routes = &[
        ("lookup", "/lookup", "lookup", 1),
        ("export", "/exports", "export", 1),
    ];
    let tiers = "  free:\n    lookup: { daily: 3 }\n  pro:\n    lookup: { daily: 3 }\n    export: { daily: 3 }";
    let gw = Gateway::start(&policy(mock.addr, routes, tiers, &["free", "pro"]));
    let r = get(&gw, "/exports/1", "key-free").await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "quota_not_in_tier"
    );
    assert_eq!(
        get(&gw, "/exports/1", "key-pro").await.status(),
        StatusCode::OK
    );
}

async fn concurrent_requests_on_one_key_admit_exactly_the_limit(backend: Backend) {
    let mock = MockUpstream::start();
    let gw = Gateway::start_on(&backend, &free_lookup(mock.addr, 40), &[]);
    let c = client();
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let (c, url) = (c.clone(), gw.url("/lookup"));
            tokio::spawn(async move {
                c.get(url)
                    .bearer_auth("key-free")
                    .send()
                    .await
                    .unwrap()
                    .status()
            })
        })
        .collect();
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => refused += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!((ok, refused), (40, 60));
    assert_eq!(upstream_requests(&mock).await, 40);
}

async fn editing_the_policy_changes_the_enforced_limit_without_restart(backend: Backend) {
    let mock = MockUpstream::start();
    let gw = Gateway::start_on(&backend, &free_lookup(mock.addr, 2), &[]);
    for _ in 0..2 {
        assert_eq!(lookup(&gw, "key-free").await, StatusCode::OK);
    }
    assert_eq!(lookup(&gw, "key-free").await, StatusCode::TOO_MANY_REQUESTS);
    let edited = Instant::now();
    gw.rewrite_policy(&free_lookup(mock.addr, 4));
    let applied = eventually(Duration::from_secs(2), || async {
        lookup(&gw, "key-free").await == StatusCode::OK
    })
    .await;
    assert!(applied, "new limit enforced within 2 s");
    figure("policy_reload_ms", edited.elapsed().as_millis());
    // Counters survived the change: 2 used before + 1 just now, so exactly one more fits in 4.
    assert_eq!(lookup(&gw, "key-free").await, StatusCode::OK);
    assert_eq!(lookup(&gw, "key-free").await, StatusCode::TOO_MANY_REQUESTS);
}

async fn broken_policy_keeps_the_old_limit_and_status_shows_the_error(backend: Backend) {
    let mock = MockUpstream::start();
    let good = free_lookup(mock.addr, 2);
    let gw = Gateway::start_on(&backend, &good, &[]);
    let status = || async { get_json(gw.api_url("/status")).await };
    let before = status().await;
    assert_eq!(before["last_error"], Value::Null);
    assert_eq!(lookup(&gw, "key-free").await, StatusCode::OK);
    gw.rewrite_policy(&good.replace("daily: 2", "daily: two"));
    assert!(
        eventually(Duration::from_secs(5), || async {
            status().await["last_error"] != Value::Null
        })
        .await,
        "/status reports the rejected file"
    );
    let s = status().await;
    let msg = s["last_error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("policy.yaml:") && msg.contains("tiers.free.lookup.daily: invalid u64"),
        "{msg}"
    );
    assert!(s["last_error"]["since"].is_string());
    assert_eq!(
        s["policy"]["hash"], before["policy"]["hash"],
        "old policy still enforced"
    );
    // The old limit (2) still applies: one more admitted, then refused.
    assert_eq!(lookup(&gw, "key-free").await, StatusCode::OK);
    assert_eq!(lookup(&gw, "key-free").await, StatusCode::TOO_MANY_REQUESTS);
    let metrics = tollgate_e2e::metrics(&gw).await;
    assert!(
        metrics.contains("policy_reload_total{result=\"error\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("quota_consumed_total{type=\"lookup\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("quota_reject_total{type=\"lookup\"} 1"),
        "{metrics}"
    );
    // Fixing the file clears the error.
    gw.rewrite_policy(&good.replace("daily: 2", "daily: 3"));
    assert!(
        eventually(Duration::from_secs(5), || async {
            status().await["last_error"] == Value::Null
        })
        .await
    );
}

async fn check_with_a_repeated_request_id_charges_once(backend: Backend) {
    let mock = MockUpstream::start();
    let gw = Gateway::start_on(&backend, &free_lookup(mock.addr, 10), &[]);
    let check_url = gw.api_url("/check");
    let check = |id: &'static str| {
        let url = check_url.clone();
        async move {
            let body = serde_json::json!({ "subject": "user-free", "quota": "lookup", "cost": 3, "request_id": id });
            post_json(url, &body).await
        }
    };
    let first = check("r1").await;
    assert_eq!(first["allowed"], true);
    assert_eq!(first["remaining"], 7);
    let again = check("r1").await;
    assert_eq!(again["replayed"], true);
    assert_eq!(again["remaining"], first["remaining"]);
    assert_eq!(again["reset_at"], first["reset_at"]);
    let other = check("r2").await;
    assert_eq!(
        other["remaining"], 4,
        "charged 3 once for r1, then 3 for r2"
    );
    // The proxy and /check share one engine.
    assert_eq!(lookup(&gw, "key-free").await, StatusCode::OK);
    let after = check("r3").await;
    assert_eq!(after["remaining"], 0);
    assert_eq!(check("r4").await["allowed"], false);
    let bad = client()
        .post(gw.api_url("/check"))
        .body("{\"subject\": 1}")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        bad.json::<Value>().await.unwrap()["error"],
        "invalid_request"
    );
}

#[tokio::test]
async fn sse_stream_passes_through_unchanged() {
    let mock = MockUpstream::start();
    let routes = &[("chat", "/v1/chat/completions", "llm", 1)];
    let gw = Gateway::start(&policy(
        mock.addr,
        routes,
        "  pro:\n    llm: { unlimited: true }",
        &["pro"],
    ));
    let body = serde_json::json!({
        "model": "gpt-4o-mini", "stream": true,
        "messages": [{ "role": "user", "content": "say something" }],
    });
    let fetch = |url: String| {
        let body = body.clone();
        async move {
            let r = client()
                .post(url)
                .bearer_auth("key-pro")
                .header("x-request-id", "same-id")
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            assert_eq!(r.headers()["content-type"], "text/event-stream");
            r.text().await.unwrap()
        }
    };
    let direct = fetch(mock.url("/v1/chat/completions")).await;
    let proxied = fetch(gw.url("/v1/chat/completions")).await;
    // `created` is a timestamp in seconds; the rest of the stream must be identical.
    let strip = |s: &str| {
        s.lines()
            .map(|l| {
                l.split("\"created\":").next().unwrap_or(l).to_string()
                    + l.split_once("\"model\"").map_or("", |(_, r)| r)
            })
            .collect::<Vec<_>>()
    };
    assert!(direct.ends_with("data: [DONE]\n\n"), "{direct}");
    assert_eq!(strip(&proxied), strip(&direct));
}

#[tokio::test]
async fn unreachable_upstream_is_a_502_and_counted() {
    let dead = format!("127.0.0.1:{}", tollgate_e2e::free_port())
        .parse()
        .unwrap();
    let gw = Gateway::start(&policy(
        dead,
        LOOKUP,
        "  free:\n    lookup: { daily: 5 }",
        &["free"],
    ));
    assert_eq!(lookup(&gw, "key-free").await, StatusCode::BAD_GATEWAY);
    let metrics = tollgate_e2e::metrics(&gw).await;
    assert!(
        metrics.contains("upstream_errors_total{upstream=\"up\"} 1"),
        "{metrics}"
    );
}

#[test]
fn gateway_check_prints_the_located_error_of_every_invalid_fixture() {
    let root = workspace_root();
    let ok = Command::new(bin("gateway"))
        .args(["check", "policies/example.yaml"])
        .current_dir(&root)
        .output()
        .unwrap();
    assert!(ok.status.success());
    assert!(String::from_utf8_lossy(&ok.stdout).starts_with("policies/example.yaml: OK"));
    let mut fixtures: Vec<_> = std::fs::read_dir(root.join("policies/invalid"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    fixtures.sort();
    assert!(fixtures.len() >= 10);
    for f in fixtures {
        let rel = format!("policies/invalid/{}", f.to_string_lossy());
        let out = Command::new(bin("gateway"))
            .args(["check", &rel])
            .current_dir(&root)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{rel}");
        let err = String::from_utf8_lossy(&out.stderr);
        let prefix = format!("{rel}:");
        let first = err.lines().next().unwrap_or_default();
        let loc: Vec<&str> = first
            .strip_prefix(&prefix)
            .unwrap_or_else(|| panic!("{rel}: {err}"))
            .splitn(3, ':')
            .collect();
        assert!(
            loc[0].parse::<u32>().unwrap() > 0 && loc[1].parse::<u32>().unwrap() > 0,
            "{rel}: line and column in {first}"
        );
    }
}

#[tokio::test]
async fn the_clients_key_stays_at_the_gateway_and_the_upstream_gets_its_own() {
    let mock = MockUpstream::start();
    let yaml = free_lookup(mock.addr, 5).replace(
        "read_timeout_ms: 10000 }",
        "read_timeout_ms: 10000, headers: { authorization: 'Bearer ${TG_TEST_UPSTREAM_KEY}' } }",
    );
    let policy_dir = tollgate_e2e::TempDir::new("creds");
    let file = policy_dir.0.join("p.yaml");
    std::fs::write(&file, &yaml).unwrap();
    // Without the variable the policy is refused, naming it.
    let out = Command::new(bin("gateway"))
        .args(["check", file.to_str().unwrap()])
        .env_remove("TG_TEST_UPSTREAM_KEY")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("environment variable `TG_TEST_UPSTREAM_KEY` is not set")
    );
    let gw = Gateway::start_with_env(&yaml, &[("TG_TEST_UPSTREAM_KEY", "sk-upstream-123")]);
    let r = client()
        .get(gw.url("/lookup"))
        .header("x-api-key", "key-free")
        .send()
        .await
        .unwrap();
    let echo: Value = r.json().await.unwrap();
    assert_eq!(echo["authorization"], "Bearer sk-upstream-123");
    assert_eq!(
        echo["x_api_key"],
        Value::Null,
        "the Tollgate key is not forwarded"
    );
}
