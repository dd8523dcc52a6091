//! Enforcement integrity, tried as a careless client and as an attacker would: output ceilings
//! and streams cut at their reservation, paths that try to escape their route, the API
//! listener's token, names and numbers from the network, pathological prompts.

use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;
use tollgate_e2e::post_as as post;
use tollgate_e2e::{Gateway, MockUpstream, client, eventually, figure, get_json, post_json};

const QUOTA: u64 = 100_000;

fn policy(upstream: std::net::SocketAddr, llm_extra: &str) -> String {
    format!(
        "upstreams:\n  up: {{ address: '{upstream}', read_timeout_ms: 20000 }}\n\
         routes:\n\
         \x20 - {{ name: chat, match: {{ path_prefix: /v1/chat/completions }}, upstream: up, quota: requests,\n\
         \x20     llm: {{ provider: openai, tokens: tokens, default_max_tokens: 60000{llm_extra} }} }}\n\
         \x20 - {{ name: messages, match: {{ path_prefix: /v1/messages }}, upstream: up, quota: requests,\n\
         \x20     llm: {{ provider: anthropic, tokens: tokens, default_max_tokens: 60000{llm_extra} }} }}\n\
         \x20 - {{ name: lookup, match: {{ path_prefix: /lookup }}, upstream: up, quota: lookup }}\n\
         \x20 - {{ name: exports, match: {{ path_prefix: /exports }}, upstream: up, quota: export }}\n\
         tiers:\n  free:\n    requests: {{ daily: 100000 }}\n    tokens: {{ daily: {QUOTA} }}\n    lookup: {{ daily: 1000 }}\n\
         \x20 pro:\n    requests: {{ daily: 100000 }}\n    tokens: {{ daily: {QUOTA} }}\n    lookup: {{ daily: 1000 }}\n    export: {{ daily: 1000 }}\n\
         subjects:\n  - {{ key: k1, id: u1, tier: free }}\n  - {{ key: k2, id: u2, tier: free }}\n  - {{ key: k3, id: u3, tier: free }}\n\
         \x20 - {{ key: kp, id: pro1, tier: pro }}\n"
    )
}

/// Tokens `subject` has used today.
async fn tokens_used(gw: &Gateway, subject: &str) -> u64 {
    let r = post_json(
        gw.api_url("/check"),
        &json!({ "subject": subject, "quota": "tokens", "cost": 0 }),
    )
    .await;
    QUOTA - r["remaining"].as_u64().expect("remaining")
}

async fn wait_settled(gw: &Gateway, n: u64) {
    assert!(
        eventually(Duration::from_secs(20), || async {
            let m = tollgate_e2e::metrics(gw).await;
            tollgate_e2e::metric(&m, "llm_settlements_total{result=\"charged\"}").unwrap_or(0) >= n
        })
        .await,
        "{n} settlements"
    );
}

fn chat(stream: bool) -> Value {
    json!({ "model": "gpt-4o-mini", "stream": stream,
        "messages": [{ "role": "user", "content": "write as much as you can" }] })
}

/// The overrun figure: the most any subject went over its token quota here.
fn overrun(used: u64) -> u64 {
    used.saturating_sub(QUOTA)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_max_tokens_cannot_bill_past_the_quota() {
    let mock = MockUpstream::start();
    let gw = Gateway::start(&policy(mock.addr, ""));
    let mut answered = 0;
    for rid in ["n1", "n2"] {
        let r = post(
            &gw,
            "k1",
            rid,
            "/v1/chat/completions",
            &chat(false),
            &[("x-mock-tokens", "90000")],
        )
        .await;
        if r.status() == StatusCode::OK {
            answered += 1;
            let v: Value = r.json().await.expect("json");
            assert_eq!(
                v["choices"][0]["finish_reason"], "length",
                "the upstream was held to the reservation"
            );
        } else {
            assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        }
    }
    assert_eq!(answered, 1, "the second request cannot reserve 60000 more");
    wait_settled(&gw, 1).await;
    let used = tokens_used(&gw, "u1").await;
    let produced = get_json(mock.url("/stats/n1")).await;
    assert_eq!(
        produced["tokens_sent"], 60000,
        "asked for exactly the reservation"
    );
    assert!(used <= QUOTA, "billed {used} of {QUOTA}");
    figure("overrun_tokens_max", overrun(used));
}

/// The SSE events of a body, without the blank lines.
fn events(body: &str) -> Vec<&str> {
    body.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_past_its_reservation_is_cut_with_an_error_event() {
    let mock = MockUpstream::start();
    let gw = Gateway::start(&policy(
        mock.addr,
        ", max_output_tokens: 500, over_max_output: clamp",
    ));
    // An upstream that ignores max_tokens: the gateway must stop it at the reservation itself.
    let mut body = chat(true);
    body["max_tokens"] = json!(90000);
    let r = post(
        &gw,
        "k2",
        "cut1",
        "/v1/chat/completions",
        &body,
        &[
            ("x-mock-tokens", "90000"),
            ("x-mock-ignore-max-tokens", "1"),
        ],
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    let text = r.text().await.expect("body");
    let evs = events(&text);
    let last: Value = serde_json::from_str(
        evs.last()
            .and_then(|e| e.strip_prefix("data: "))
            .expect("a data event"),
    )
    .expect("the last event is JSON");
    assert_eq!(last["error"]["code"], "output_limit_reached", "{last}");
    let mut delivered = 0;
    for e in &evs[..evs.len() - 1] {
        let v: Value = serde_json::from_str(e.strip_prefix("data: ").expect("data"))
            .expect("every event is whole JSON");
        if v["choices"][0]["delta"]["content"]
            .as_str()
            .is_some_and(|c| !c.is_empty())
        {
            delivered += 1;
        }
    }
    assert_eq!(delivered, 500, "one token per event, cut at the ceiling");
    // The upstream is hung up on at the cut, not read to its end: it stops generating what
    // nobody receives. (Its 90000 tokens are far more than socket buffers hold.)
    let stats = || async { get_json(mock.url("/stats/cut1")).await };
    assert!(
        eventually(Duration::from_secs(20), || async {
            stats().await["client_disconnected"] == true
        })
        .await,
        "the gateway closed the upstream: {}",
        stats().await
    );
    assert_eq!(stats().await["completed"], false);
    wait_settled(&gw, 1).await;
    let used = tokens_used(&gw, "u2").await;
    let prompt = used - delivered;
    assert!(
        (5..50).contains(&prompt),
        "billed the prompt estimate ({prompt}) and the delivered tokens"
    );

    // Anthropic: the prompt is reported at the start, so the bill is exact.
    let body = json!({ "model": "claude-3-5-haiku", "stream": true, "max_tokens": 300,
        "messages": [{ "role": "user", "content": "write as much as you can" }] });
    let before = tokens_used(&gw, "u2").await;
    let r = post(
        &gw,
        "k2",
        "cut2",
        "/v1/messages",
        &body,
        &[("x-mock-tokens", "5000"), ("x-mock-ignore-max-tokens", "1")],
    )
    .await;
    let text = r.text().await.expect("body");
    let evs = events(&text);
    assert!(
        evs.last()
            .expect("events")
            .starts_with("event: error\ndata: {"),
        "{:?}",
        evs.last()
    );
    let delivered = evs.iter().filter(|e| e.contains("\"text_delta\"")).count() as u64;
    assert_eq!(delivered, 300);
    wait_settled(&gw, 2).await;
    let prompt = get_json(mock.url("/stats/cut2")).await["prompt_tokens"]
        .as_u64()
        .expect("prompt");
    assert_eq!(
        tokens_used(&gw, "u2").await - before,
        prompt + delivered,
        "prompt + delivered"
    );
    let m = tollgate_e2e::metrics(&gw).await;
    assert_eq!(
        tollgate_e2e::metric(&m, "llm_stream_cuts_total{reason=\"reservation\"}"),
        Some(2)
    );
    figure("overrun_tokens_max", overrun(tokens_used(&gw, "u2").await));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asking_for_more_than_the_route_allows_is_refused_or_clamped() {
    let mock = MockUpstream::start();
    let gw = Gateway::start(&policy(mock.addr, ", max_output_tokens: 1000"));
    let mut body = chat(false);
    body["max_completion_tokens"] = json!(5000);
    let r = post(&gw, "k3", "big", "/v1/chat/completions", &body, &[]).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"], "max_tokens_too_large");
    assert_eq!(tokens_used(&gw, "u3").await, 0, "nothing reserved");

    let gw = Gateway::start(&policy(
        mock.addr,
        ", max_output_tokens: 1000, over_max_output: clamp",
    ));
    let r = post(
        &gw,
        "k3",
        "clamped",
        "/v1/chat/completions",
        &body,
        &[("x-mock-tokens", "5000")],
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    let produced = get_json(mock.url("/stats/clamped")).await;
    assert_eq!(
        produced["tokens_sent"], 1000,
        "the upstream was asked for 1000"
    );
    // Several outputs share the cap.
    body["n"] = json!(4);
    body["max_completion_tokens"] = json!(500);
    let faults = [("x-mock-tokens", "5000")];
    let r = post(
        &gw,
        "k3",
        "clamped4",
        "/v1/chat/completions",
        &body,
        &faults,
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    let produced = get_json(mock.url("/stats/clamped4")).await;
    assert_eq!(
        produced["tokens_sent"], 250,
        "each of the 4 outputs was asked for 1000 / 4"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_generation_endpoints_reserve_tokens() {
    let mock = MockUpstream::start();
    let gw = Gateway::start(&policy(mock.addr, ""));
    let body = json!({ "model": "claude-3-5-haiku",
        "messages": [{ "role": "user", "content": "count me" }] });
    let r = post(&gw, "k3", "ct", "/v1/messages/count_tokens", &body, &[]).await;
    assert_ne!(
        r.status(),
        StatusCode::BAD_REQUEST,
        "forwarded, not parsed as a message"
    );
    assert_eq!(tokens_used(&gw, "u3").await, 0, "no tokens billed");
    let counts = get_json(mock.url("/_mock/requests")).await;
    assert_eq!(
        counts["by_path"]["/v1/messages/count_tokens"], 1,
        "it reached the upstream"
    );
    let m = tollgate_e2e::metrics(&gw).await;
    assert_eq!(
        tollgate_e2e::metric(&m, "llm_settlements_total{result=\"charged\"}").unwrap_or(0),
        0,
        "no reservation was made or settled for it"
    );
    let r = post(&gw, "k3", "b", "/v1/messages/batches", &body, &[]).await;
    assert_eq!(
        r.status(),
        StatusCode::NOT_FOUND,
        "batches cannot be metered"
    );
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"], "unmetered_endpoint");
}

/// Send `path` raw (no client-side normalization) and return the status.
async fn raw_request(addr: std::net::SocketAddr, method: &str, path: &str, key: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    let head = String::from_utf8_lossy(&out);
    head.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_cannot_escape_the_route_they_are_billed_to() {
    let mock = MockUpstream::start();
    let gw = Gateway::start(&policy(mock.addr, ""));
    // (method, raw path, expected status, the path the upstream must see)
    let cases: &[(&str, &str, u16, Option<&str>)] = &[
        ("GET", "/lookup/../exports/1", 403, None),
        ("GET", "/lookup/%2e%2e/exports/1", 403, None),
        ("GET", "/lookup/%2E./exports/1", 403, None),
        ("GET", "/lookup/.%2e/exports/1", 403, None),
        ("GET", "/lookup/a%2f..%2f..%2fexports/1", 400, None),
        ("GET", "/lookup/a%5c..%5cexports", 400, None),
        ("GET", "/lookup/a\\..\\exports", 400, None),
        ("GET", "/lookup/%00", 400, None),
        // Java servers strip `;` parameters and then climb: refused, not passed on.
        ("GET", "/lookup/..;/exports/1", 400, None),
        ("GET", "/lookup/%2e%2e;x/exports/1", 400, None),
        ("GET", "/lookup/a;v=1/42", 200, Some("/lookup/a;v=1/42")),
        ("GET", "//lookup//42", 200, Some("/lookup/42")),
        ("GET", "/lookup/./42", 200, Some("/lookup/42")),
        ("GET", "/lookup/x/../43", 200, Some("/lookup/43")),
        ("GET", "/lookupx", 404, None),
        (
            "POST",
            "/v1/chat/completions/%2e%2e/%2e%2e/completions",
            404,
            None,
        ),
        ("POST", "/v1/chat/completions/../../completions", 404, None),
        (
            "POST",
            "/v1/chat/%63ompletions",
            200,
            Some("/v1/chat/completions"),
        ),
        (
            "POST",
            "/v1//chat/./completions",
            200,
            Some("/v1/chat/completions"),
        ),
        ("POST", "/v1/chat/completions%2f..%2fx", 400, None),
    ];
    for (i, (method, path, want, upstream_path)) in cases.iter().enumerate() {
        let before = get_json(mock.url("/_mock/requests")).await;
        let got = raw_request(gw.proxy, method, path, "k1").await;
        assert_eq!(got, *want, "{method} {path}");
        let after = get_json(mock.url("/_mock/requests")).await;
        let grew: Vec<String> = after["by_path"]
            .as_object()
            .expect("by_path")
            .iter()
            .filter(|(p, n)| {
                before["by_path"][p.as_str()].as_u64().unwrap_or(0) < n.as_u64().unwrap_or(0)
            })
            .map(|(p, _)| p.clone())
            .collect();
        match upstream_path {
            Some(p) => assert_eq!(grew, vec![p.to_string()], "case {i}: {path}"),
            None => assert!(grew.is_empty(), "case {i}: {path} reached {grew:?}"),
        }
    }
    figure("path_escape_cases", cases.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_needs_its_token_when_one_is_set() {
    let mock = MockUpstream::start();
    let gw = Gateway::start_with_env(
        &policy(mock.addr, ""),
        &[("TOLLGATE_API_TOKEN", "s3cret-api")],
    );
    let check = json!({ "subject": "u1", "quota": "lookup", "cost": 1 });
    for (auth, want) in [
        (None, 401),
        (Some("Bearer wrong"), 401),
        (Some("Bearer s3cret-api"), 200),
    ] {
        let mut r = client().post(gw.api_url("/check")).json(&check);
        let mut s = client().get(gw.api_url("/status"));
        if let Some(a) = auth {
            r = r.header("authorization", a);
            s = s.header("authorization", a);
        }
        assert_eq!(r.send().await.expect("check").status().as_u16(), want);
        assert_eq!(s.send().await.expect("status").status().as_u16(), want);
    }
    for open in ["/metrics", "/healthz"] {
        let r = client().get(gw.api_url(open)).send().await.expect("get");
        assert_eq!(r.status(), StatusCode::OK, "{open} stays open");
    }
}

#[test]
fn a_public_api_without_a_token_refuses_to_start() {
    let dir = std::env::temp_dir().join(format!("tg-noauth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("p.yaml");
    std::fs::write(&file, policy("127.0.0.1:9".parse().expect("addr"), "")).expect("write");
    let out = std::process::Command::new(tollgate_e2e::bin("gateway"))
        .args(["run", "--config"])
        .arg(&file)
        .args(["--listen", "127.0.0.1:0", "--api-listen", "0.0.0.0:0"])
        .env_remove("TOLLGATE_API_TOKEN")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not a loopback address and has no token"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_from_the_network_are_checked_before_they_become_series() {
    let mock = MockUpstream::start();
    let gw = Gateway::start(&policy(mock.addr, ""));
    for (body, code) in [
        (
            json!({ "subject": "u1", "quota": "a\u{0}b", "cost": 1 }),
            "invalid_request",
        ),
        (
            json!({ "subject": "u1", "quota": "nope", "cost": 1 }),
            "unknown_quota",
        ),
        (
            json!({ "subject": "u{1}", "quota": "lookup", "cost": 1 }),
            "invalid_request",
        ),
        (
            json!({ "subject": "u1", "quota": "lookup", "cost": u64::MAX }),
            "invalid_request",
        ),
    ] {
        let r = client()
            .post(gw.api_url("/check"))
            .json(&body)
            .send()
            .await
            .expect("check");
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{body}");
        let v: Value = r.json().await.expect("json");
        assert_eq!(v["error"], code, "{body}");
    }
    let m = tollgate_e2e::metrics(&gw).await;
    assert!(!m.contains("type=\"a"), "no series for the NUL name");
    assert!(
        !m.contains("type=\"nope\""),
        "no series for an unknown quota"
    );
    // A model name is a name too.
    let body = json!({ "model": "gpt\u{0}x", "messages": [] });
    let r = post(&gw, "k1", "m", "/v1/chat/completions", &body, &[]).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pathological_prompt_does_not_stop_the_gateway() {
    let mock = MockUpstream::start();
    let gw = Gateway::start(&policy(mock.addr, ""));
    let body = json!({ "model": "gpt-4o-mini", "max_tokens": 10,
        "messages": [{ "role": "user", "content": " ".repeat(1_100_000) }] });
    let r = post(&gw, "kp", "spaces", "/v1/chat/completions", &body, &[]).await;
    assert!(
        r.status().is_client_error() || r.status().is_success(),
        "{}",
        r.status()
    );
    // Still serving.
    let r = client()
        .get(gw.url("/lookup/1"))
        .bearer_auth("kp")
        .send()
        .await
        .expect("lookup");
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_subject_is_answered_before_its_body_is_read() {
    let mock = MockUpstream::start();
    let gw = Gateway::start(&policy(mock.addr, ""));
    // Use up u1's tokens.
    let r = post_json(
        gw.api_url("/check"),
        &json!({ "subject": "u1", "quota": "tokens", "cost": QUOTA }),
    )
    .await;
    assert_eq!(r["allowed"], true);
    // Announce a 4 MiB body and send only the headers: the answer must come without it.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(gw.proxy)
        .await
        .expect("connect");
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer k1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        4 << 20
    );
    s.write_all(head.as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("answered without the body")
        .expect("read");
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 429"), "{text}");
}

/// The official SDKs, as users run them: a stream the gateway cuts ends in an API error they raise,
/// after exactly the reserved tokens. Needs `TOLLGATE_PYTHON` (a Python with the `openai` and
/// `anthropic` packages; `scripts/test` sets it up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_sdks_see_a_cut_stream_as_an_api_error() {
    let python = std::env::var("TOLLGATE_PYTHON").expect(
        "TOLLGATE_PYTHON: a Python with the openai and anthropic packages (scripts/test sets it)",
    );
    let mock = MockUpstream::start();
    let gw = Gateway::start(&policy(mock.addr, ""));
    let base = format!("http://{}", gw.proxy);
    let v = tollgate_e2e::sdk_report(&python, "cut_stream.py", &[&base, "kp"]).await;
    for sdk in ["openai", "anthropic"] {
        assert_eq!(v[sdk]["api_error"], true, "{sdk}: {}", v[sdk]);
        assert_eq!(
            v[sdk]["chunks"], 200,
            "{sdk}: the reserved tokens, then the error"
        );
    }
}

/// Every counter backend, with the gateway arguments that choose it.
fn backends() -> [(&'static str, tollgate_e2e::Backend, Vec<&'static str>); 3] {
    [
        ("memory", tollgate_e2e::Backend::Memory, vec![]),
        (
            "redis-leases",
            tollgate_e2e::Backend::shared_redis(),
            vec![],
        ),
        (
            "redis",
            tollgate_e2e::Backend::shared_redis(),
            vec!["--no-leases"],
        ),
    ]
}

/// A plain request admitted but never sent (its upstream refuses connections) gives its units
/// back, on every backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsent_request_gives_its_units_back() {
    let dead = tollgate_e2e::free_port();
    let yaml = format!(
        "upstreams:\n  down: {{ address: '127.0.0.1:{dead}', connect_timeout_ms: 500 }}\n\
         routes:\n  - {{ name: lookup, match: {{ path_prefix: /lookup }}, upstream: down, quota: lookup }}\n\
         tiers:\n  t:\n    lookup: {{ daily: 5, rates: [ {{ limit: 10, per: minute }} ] }}\n\
         subjects:\n  - {{ key: k1, id: u1, tier: t }}\n"
    );
    for (name, backend, args) in backends() {
        let gw = Gateway::start_on(&backend, &yaml, &args);
        for _ in 0..3 {
            let r = client()
                .get(gw.url("/lookup/1"))
                .bearer_auth("k1")
                .send()
                .await
                .expect("request");
            assert_eq!(r.status(), StatusCode::BAD_GATEWAY, "{name}");
        }
        let remaining = || async {
            let v = post_json(
                gw.api_url("/check"),
                &json!({ "subject": "u1", "quota": "lookup", "cost": 0 }),
            )
            .await;
            v["limits"]
                .as_array()
                .expect("limits")
                .iter()
                .map(|l| l["remaining"].as_u64().expect("remaining"))
                .collect::<Vec<_>>()
        };
        assert!(
            eventually(Duration::from_secs(10), || async {
                remaining().await == vec![10, 5]
            })
            .await,
            "{name}: every unit back, got {:?}",
            remaining().await
        );
        let m = tollgate_e2e::metrics(&gw).await;
        assert_eq!(
            tollgate_e2e::metric(&m, "quota_released_total{type=\"lookup\"}"),
            Some(3),
            "{name}"
        );
    }
}

/// `n` (and `best_of`) make the upstream generate that many outputs, each up to `max_tokens`:
/// the reservation and the route's cap count them all, and every output-limit field a client sends
/// is covered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_output_a_call_asks_for_is_reserved() {
    let mock = MockUpstream::start();
    let gw = Gateway::start(&policy(mock.addr, ""));
    // 50 outputs of 3000 tokens: 150,000 tokens, beyond the 100,000 a day.
    let mut body = chat(false);
    body["n"] = json!(50);
    body["max_tokens"] = json!(3000);
    let r = post(&gw, "k1", "many", "/v1/chat/completions", &body, &[]).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(tokens_used(&gw, "u1").await, 0, "nothing reserved");
    body["n"] = json!(0);
    let r = post(&gw, "k1", "none", "/v1/chat/completions", &body, &[]).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    let gw = Gateway::start(&policy(mock.addr, ", max_output_tokens: 1000"));
    body["n"] = json!(4);
    body["max_tokens"] = json!(500);
    let r = post(&gw, "k1", "capped", "/v1/chat/completions", &body, &[]).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST, "4 x 500 is over 1000");
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"], "max_tokens_too_large", "{v}");
    // An upstream may read either name: the larger one sent is the ceiling.
    let mut both = chat(false);
    both["max_completion_tokens"] = json!(10);
    both["max_tokens"] = json!(5000);
    let r = post(&gw, "k1", "both", "/v1/chat/completions", &both, &[]).await;
    assert_eq!(
        r.status(),
        StatusCode::BAD_REQUEST,
        "max_tokens 5000 is over 1000"
    );
}

/// A plain answer too large to keep for its usage is billed its whole reservation, not the
/// prompt alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_too_large_to_read_is_billed_its_reservation() {
    let mock = MockUpstream::start();
    let gw = Gateway::start(&policy(mock.addr, ""));
    let mut body = chat(false);
    body["max_tokens"] = json!(2000);
    let padding = (40u64 << 20).to_string();
    let r = post(
        &gw,
        "k1",
        "huge",
        "/v1/chat/completions",
        &body,
        &[("x-mock-tokens", "2000"), ("x-mock-pad-bytes", &padding)],
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    let received = r.bytes().await.expect("body").len() as u64;
    assert!(
        received > 40 << 20,
        "the whole answer is relayed ({received} bytes)"
    );
    wait_settled(&gw, 1).await;
    let used = tokens_used(&gw, "u1").await;
    assert!(
        used > 2000,
        "billed the prompt and the 2000 output tokens reserved, got {used}"
    );
}

/// An upstream that takes the request and does not answer in time is not sent it again (it may
/// be generating it), and the call is billed its reservation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_upstream_sat_on_is_sent_once_and_billed() {
    let mock = MockUpstream::start();
    let yaml = policy(mock.addr, "").replace("read_timeout_ms: 20000", "read_timeout_ms: 300");
    let gw = Gateway::start(&yaml);
    let mut body = chat(false);
    body["max_tokens"] = json!(400);
    // A kept-alive connection first: a failure on a reused connection is where a retry could
    // happen.
    let r = post(&gw, "k1", "warm", "/v1/chat/completions", &body, &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    wait_settled(&gw, 1).await;
    let before = tokens_used(&gw, "u1").await;
    let r = post(
        &gw,
        "k1",
        "slow",
        "/v1/chat/completions",
        &body,
        &[("x-mock-delay-ms", "1500")],
    )
    .await;
    assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"], "upstream_timeout", "{v}");
    assert_eq!(get_json(mock.url("/stats/slow")).await["attempts"], 1);
    wait_settled(&gw, 2).await;
    let billed = tokens_used(&gw, "u1").await - before;
    assert!(
        billed > 400,
        "the prompt and the 400 output tokens reserved, got {billed}"
    );
}

/// A call that outlives its reservation's `reservation_ttl_ms` keeps its hold (its gateway renews
/// it), so a `concurrent` limit still counts it: only a gateway that died lets a hold lapse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_longer_than_its_reservation_ttl_keeps_its_hold() {
    let mock = MockUpstream::start();
    let yaml = policy(mock.addr, ", reservation_ttl_ms: 600").replace(
        &format!("tokens: {{ daily: {QUOTA} }}"),
        &format!("tokens: {{ daily: {QUOTA}, concurrent: 1 }}"),
    );
    for (name, backend, args) in backends() {
        let gw = Gateway::start_on(&backend, &yaml, &args);
        // 20 events 100 ms apart: about 2 s, over three times the reservation's ttl.
        let slow = [("x-mock-tokens", "20"), ("x-mock-delay-ms", "100")];
        let rid = format!("long-{name}");
        let long = post(&gw, "k1", &rid, "/v1/chat/completions", &chat(true), &slow).await;
        assert_eq!(long.status(), StatusCode::OK, "{name}");
        let reading = tokio::spawn(long.text());
        // Past two ttls into the stream.
        assert!(
            eventually(Duration::from_secs(20), || async {
                let s = get_json(mock.url(&format!("/stats/{rid}"))).await;
                s["chunks_sent"].as_u64().unwrap_or(0) >= 13
            })
            .await,
            "{name}: the stream went on"
        );
        let second = post(
            &gw,
            "k1",
            &format!("second-{name}"),
            "/v1/chat/completions",
            &chat(false),
            &[],
        )
        .await;
        assert_eq!(
            second.status(),
            StatusCode::TOO_MANY_REQUESTS,
            "{name}: the running stream still holds the one concurrent slot"
        );
        reading.await.expect("task").expect("the stream ends");
        wait_settled(&gw, 1).await;
        let third = post(
            &gw,
            "k1",
            &format!("third-{name}"),
            "/v1/chat/completions",
            &chat(false),
            &[],
        )
        .await;
        assert_eq!(
            third.status(),
            StatusCode::OK,
            "{name}: the slot is free once settled"
        );
    }
}

/// A hand-written HTTP/1.1 upstream on loopback: the `i`th request on a connection (its header
/// and a body of its Content-Length) gets `answer(i, its header)`, and `None` hangs up without
/// answering. After `connections` connections it stops listening (connections are refused).
async fn raw_upstream<F>(connections: usize, answer: F) -> std::net::SocketAddr
where
    F: Fn(usize, &str) -> Option<Vec<u8>> + Send + Sync + 'static,
{
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        for _ in 0..connections {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 << 10];
                let mut seen = Vec::new();
                for i in 0.. {
                    // The whole request: its header and a body of its Content-Length.
                    let head = loop {
                        let text = String::from_utf8_lossy(&seen).to_lowercase();
                        if let Some(end) = text.find("\r\n\r\n") {
                            let len = text[..end]
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .and_then(|v| v.trim().parse::<usize>().ok())
                                .unwrap_or(0);
                            if seen.len() >= end + 4 + len {
                                let head = String::from_utf8_lossy(&seen[..end]).into_owned();
                                seen.drain(..end + 4 + len);
                                break head;
                            }
                        }
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    };
                    let Some(bytes) = answer(i, &head) else {
                        return;
                    };
                    if conn.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// An upstream that closes a kept-alive connection as the next request arrives on it has not
/// processed that request: the gateway sends it again on a new connection, once, and the client
/// sees a normal answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_on_a_connection_the_upstream_closed_is_sent_again() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let answered = Arc::new(AtomicUsize::new(0));
    let count = answered.clone();
    // Each connection answers its first request (keeping the connection open, as HTTP/1.1
    // allows) and closes when a second one arrives on it, unanswered.
    let addr = raw_upstream(usize::MAX, move |i, _| {
        let body = r#"{"id":"c","object":"chat.completion","model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":1,"total_tokens":10}}"#;
        (i == 0).then(|| {
            count.fetch_add(1, Ordering::SeqCst);
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes()
        })
    })
    .await;
    let gw = Gateway::start(&policy(addr, ""));
    for rid in ["first", "second", "third"] {
        let r = post(&gw, "k1", rid, "/v1/chat/completions", &chat(false), &[]).await;
        assert_eq!(r.status(), StatusCode::OK, "{rid}");
    }
    assert_eq!(
        answered.load(Ordering::SeqCst),
        3,
        "each request answered once"
    );
}

/// An upstream asked for `identity` that compresses anyway (or sends a body that is not what
/// its content type says) produced output the gateway cannot read: the answer is relayed as it
/// is and billed its reservation, never the prompt alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_the_gateway_cannot_read_is_billed_its_reservation() {
    // gzip's magic, then bytes no JSON or SSE reader can make sense of.
    let gzipped: &[u8] = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\xab\x56\x2a\xc9";
    let cases: [(&str, &str, &[u8]); 3] = [
        ("text/event-stream", "content-encoding: gzip\r\n", gzipped),
        ("application/json", "content-encoding: gzip\r\n", gzipped),
        (
            "application/json",
            "",
            b"<html>upstream proxy error page</html>",
        ),
    ];
    for (i, (kind, encoding, body)) in cases.into_iter().enumerate() {
        let mut answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: {kind}\r\n{encoding}content-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        answer.extend_from_slice(body);
        let addr = raw_upstream(usize::MAX, move |_, _| Some(answer.clone())).await;
        let gw = Gateway::start(&policy(addr, ""));
        let mut req = chat(kind == "text/event-stream");
        req["max_tokens"] = 500.into();
        let r = post(
            &gw,
            "k1",
            &format!("raw{i}"),
            "/v1/chat/completions",
            &req,
            &[],
        )
        .await;
        assert_eq!(r.status(), StatusCode::OK, "{kind} {encoding}");
        assert_eq!(
            r.bytes().await.expect("body").as_ref(),
            body,
            "relayed as it is"
        );
        wait_settled(&gw, 1).await;
        let used = tokens_used(&gw, "u1").await;
        assert!(
            (500..600).contains(&used),
            "{kind} {encoding}: billed {used}, the prompt and its 500 reserved output"
        );
    }
}

/// A `request_id` replays its first decision only for the same request: reused for another
/// quota or cost it is refused (409), never a free pass, on every backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_cannot_replay_a_decision_for_another_request() {
    let mock = MockUpstream::start();
    for (name, backend, args) in backends() {
        let gw = Gateway::start_on(&backend, &policy(mock.addr, ""), &args);
        let check = |quota: &str, cost: u64| {
            let body =
                json!({ "subject": "pro1", "quota": quota, "cost": cost, "request_id": "r" });
            client().post(gw.api_url("/check")).json(&body).send()
        };
        let first = check("lookup", 1).await.expect("check");
        assert_eq!(first.status(), StatusCode::OK, "{name}");
        let again: Value = check("lookup", 1)
            .await
            .expect("check")
            .json()
            .await
            .expect("json");
        assert_eq!(
            (&again["allowed"], &again["replayed"]),
            (&json!(true), &json!(true)),
            "{name}"
        );
        for (quota, cost) in [("export", 1000), ("lookup", 500)] {
            let r = check(quota, cost).await.expect("check");
            assert_eq!(r.status(), StatusCode::CONFLICT, "{name}: {quota} {cost}");
            let v: Value = r.json().await.expect("json");
            assert_eq!(v["error"], "request_id_reused", "{name}: {v}");
        }
        let export = post_json(
            gw.api_url("/check"),
            &json!({ "subject": "pro1", "quota": "export", "cost": 0 }),
        )
        .await;
        assert_eq!(
            export["remaining"], 1000,
            "{name}: nothing taken from export"
        );
    }
}

/// Send `head` (a request's line and headers, without the blank line) raw; the status and body.
async fn raw_http(addr: std::net::SocketAddr, head: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!("{head}\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The target and Host a route is chosen (and billed) by are the ones the upstream acts on: a
/// target that is not a path (`x:/exports`, absolute form) or an HTTP/1.1 request without Host is
/// refused before any charge, a host route matches its name with a trailing dot or a port too,
/// and method-override headers do not reach the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_target_and_host_billed_are_the_ones_the_upstream_sees() {
    let mock = MockUpstream::start();
    let yaml = format!(
        "upstreams:\n  up: {{ address: '{}' }}\n\
         routes:\n\
         \x20 - {{ name: premium, match: {{ host: premium.example.com, path_prefix: / }}, upstream: up, quota: export }}\n\
         \x20 - {{ name: any, match: {{ path_prefix: / }}, upstream: up, quota: lookup }}\n\
         tiers:\n  free:\n    lookup: {{ daily: 1000 }}\n  pro:\n    lookup: {{ daily: 1000 }}\n    export: {{ daily: 1000 }}\n\
         subjects:\n  - {{ key: k1, id: u1, tier: free }}\n",
        mock.addr
    );
    let gw = Gateway::start(&yaml);
    let auth = "authorization: Bearer k1";
    let cases: &[(&str, u16, Option<&str>)] = &[
        (
            &*format!("GET x:/exports HTTP/1.1\r\nhost: gw\r\n{auth}"),
            400,
            Some("invalid_path"),
        ),
        (
            &*format!("GET http://premium.example.com/x HTTP/1.1\r\n{auth}"),
            400,
            Some("invalid_path"),
        ),
        // With a Host that disagrees, pingora refuses it itself.
        (
            &*format!("GET http://premium.example.com/x HTTP/1.1\r\nhost: gw\r\n{auth}"),
            400,
            None,
        ),
        (
            &*format!("GET /x HTTP/1.1\r\n{auth}"),
            400,
            Some("invalid_path"),
        ),
        // The free tier has no export quota: the premium route refuses it.
        (
            &*format!("GET /x HTTP/1.1\r\nhost: premium.example.com.\r\n{auth}"),
            403,
            None,
        ),
        (
            &*format!("GET /x HTTP/1.1\r\nhost: Premium.Example.com.:8080\r\n{auth}"),
            403,
            None,
        ),
        (
            &*format!("GET /x HTTP/1.1\r\nhost: gw\r\n{auth}"),
            200,
            None,
        ),
    ];
    let reached = || async {
        get_json(mock.url("/_mock/requests")).await["total"]
            .as_u64()
            .unwrap_or(0)
    };
    for (head, want, code) in cases {
        let before = reached().await;
        let (status, body) = raw_http(gw.proxy, head).await;
        assert_eq!(status, *want, "{head}: {body}");
        if let Some(code) = code {
            let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            assert_eq!(v["error"], *code, "{head}: {body}");
        }
        let sent = reached().await - before;
        assert_eq!(sent, u64::from(*want == 200), "{head}: upstream calls");
    }

    // Method overrides stay at the gateway.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let keep = seen.clone();
    let addr = raw_upstream(usize::MAX, move |_, head| {
        *keep.lock().expect("lock") = head.to_ascii_lowercase();
        Some(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec())
    })
    .await;
    let gw = Gateway::start(&policy(addr, ""));
    let (status, _) = raw_http(
        gw.proxy,
        "POST /lookup/1 HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer k1\r\nx-http-method-override: DELETE\r\nx-method-override: DELETE\r\nx-http-method: DELETE\r\ncontent-length: 0",
    )
    .await;
    assert_eq!(status, 200);
    let head = seen.lock().expect("lock").clone();
    assert!(head.starts_with("post /lookup/1"), "{head}");
    assert!(
        !head.contains("override") && !head.contains("x-http-method"),
        "{head}"
    );
}

/// A request that reached the upstream on a kept-alive connection, whose retry then cannot
/// connect, may have been served: its units are not given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_may_have_been_served_is_not_refunded() {
    // One connection: its first request is answered, its second read and hung up on; then the
    // listener is gone, so the retry cannot connect.
    let addr = raw_upstream(1, |i, _| {
        (i == 0).then(|| b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec())
    })
    .await;
    let gw = Gateway::start(&policy(addr, ""));
    let used = || async {
        let r = post_json(
            gw.api_url("/check"),
            &json!({ "subject": "u1", "quota": "lookup", "cost": 0 }),
        )
        .await;
        1000 - r["remaining"].as_u64().expect("remaining")
    };
    let get = |rid: &'static str| {
        client()
            .get(gw.url("/lookup/1"))
            .bearer_auth("k1")
            .header("x-request-id", rid)
            .send()
    };
    assert_eq!(get("first").await.expect("first").status(), StatusCode::OK);
    let second = get("second").await.expect("second").status();
    assert!(second.is_server_error(), "{second}");
    assert!(
        eventually(Duration::from_secs(5), || async {
            tollgate_e2e::metric(
                &tollgate_e2e::metrics(&gw).await,
                "gateway_requests_total{route=\"lookup\",status=\"5xx\"}",
            )
            .unwrap_or(0)
                >= 1
        })
        .await
    );
    assert_eq!(
        used().await,
        2,
        "the second request reached the upstream: it stays charged"
    );
}
