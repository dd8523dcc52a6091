//! LLM billing end to end (real gateway + mock-upstream, memory and Redis): one path for streamed
//! and plain responses — reserve, meter, settle — checked against what the mock upstream says it
//! really produced.

use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;
use tollgate_e2e::post_as as post;
use tollgate_e2e::{
    Backend, Gateway, MockUpstream, client, eventually, figure, get_json, post_json,
};

macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(tollgate_e2e::Backend::Memory).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(tollgate_e2e::Backend::shared_redis()).await;
                }
            )*
        }
    };
}

on_every_backend!(
    completed_streams_and_plain_responses_are_billed_exactly,
    a_client_that_did_not_ask_for_usage_gets_the_direct_stream,
    a_stream_sent_whole_is_relayed_with_its_length_and_billed_exactly,
    a_failed_upstream_call_releases_the_reservation,
    a_stream_cut_by_the_upstream_bills_what_was_produced,
    client_disconnects_are_billed_from_the_real_usage,
    a_retry_after_a_dropped_stream_charges_each_upstream_call_once,
    concurrent_mixed_requests_keep_tokens_and_money_exact,
    in_flight_streams_are_limited_and_always_released,
    a_reservation_the_budget_cannot_cover_is_refused_before_the_upstream,
    the_cost_guardrail_stops_expensive_routes_near_the_budget,
);

const SUBJECTS: usize = 50;
const IN_PRICE: u64 = 150_000; // micro-units per million input tokens (0.15)
const OUT_PRICE: u64 = 600_000; // 0.60

/// Subjects `k0`..`k49` (ids `u0`..), each with its own counters: per-stream billing is readable.
fn llm_policy(upstream: std::net::SocketAddr, tokens_limits: &str, spend_daily: u64) -> String {
    let mut y = format!(
        "upstreams:\n  up: {{ address: '{upstream}', read_timeout_ms: 10000 }}\n\
         models:\n  default: {{ input_per_million: 0.15, output_per_million: 0.60 }}\n\
         routes:\n\
         \x20 - {{ name: chat, match: {{ path_prefix: /v1/chat/completions }}, upstream: up, quota: requests,\n\
         \x20     llm: {{ provider: openai, tokens: tokens, spend: spend, default_max_tokens: 500, drain_ms: 10000 }} }}\n\
         \x20 - {{ name: messages, match: {{ path_prefix: /v1/messages }}, upstream: up, quota: requests,\n\
         \x20     llm: {{ provider: anthropic, tokens: tokens, spend: spend }} }}\n\
         tiers:\n  t:\n    requests: {{ daily: 100000 }}\n    tokens: {tokens_limits}\n    spend: {{ daily: {spend_daily} }}\n\
         subjects:\n"
    );
    for i in 0..SUBJECTS {
        y.push_str(&format!("  - {{ key: k{i}, id: u{i}, tier: t }}\n"));
    }
    y
}

fn default_policy(upstream: std::net::SocketAddr) -> String {
    llm_policy(
        upstream,
        "{ daily: 1000000, monthly: 10000000 }",
        100_000_000,
    )
}

fn chat(stream: bool, usage: bool) -> Value {
    let mut b = json!({
        "model": "gpt-4o-mini",
        "stream": stream,
        "max_tokens": 300,
        "messages": [{ "role": "user", "content": "tell me about the rate limits" }],
    });
    if usage {
        b["stream_options"] = json!({ "include_usage": true });
    }
    b
}

/// What subject `u{i}` has been charged so far: (requests, tokens today, tokens this month, money).
async fn charged(gw: &Gateway, i: usize) -> (u64, u64, u64, u64) {
    let used = |q: &'static str, window: &'static str, limit: u64| async move {
        let r = post_json(
            gw.api_url("/check"),
            &json!({ "subject": format!("u{i}"), "quota": q, "cost": 0 }),
        )
        .await;
        let l = r["limits"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["window"] == window)
            .unwrap()
            .clone();
        limit - l["remaining"].as_u64().unwrap()
    };
    (
        used("requests", "day", 100_000).await,
        used("tokens", "day", 1_000_000).await,
        used("tokens", "month", 10_000_000).await,
        used("spend", "day", 100_000_000).await,
    )
}

/// The mock's own record of a call: (prompt tokens, output tokens produced).
async fn produced(mock: &MockUpstream, rid: &str) -> (u64, u64) {
    let s = get_json(mock.url(&format!("/stats/{rid}"))).await;
    (
        s["prompt_tokens"].as_u64().unwrap(),
        s["tokens_sent"].as_u64().unwrap(),
    )
}

fn money(prompt: u64, completion: u64) -> u64 {
    (prompt * IN_PRICE + completion * OUT_PRICE).div_ceil(1_000_000)
}

async fn settled_count(gw: &Gateway) -> u64 {
    let m = tollgate_e2e::metrics(gw).await;
    tollgate_e2e::metric(&m, "llm_settlements_total{result=\"charged\"}").unwrap_or(0)
}

async fn wait_settled(gw: &Gateway, n: u64) {
    assert!(
        eventually(Duration::from_secs(20), || async {
            settled_count(gw).await >= n
        })
        .await,
        "{n} settlements"
    );
}

async fn completed_streams_and_plain_responses_are_billed_exactly(backend: Backend) {
    let mock = MockUpstream::start();
    let gw = Gateway::start_on(&backend, &default_policy(mock.addr), &[]);
    let r = post(
        &gw,
        "k0",
        "s1",
        "/v1/chat/completions",
        &chat(true, true),
        &[("x-mock-tokens", "37")],
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    let text = r.text().await.unwrap();
    assert!(
        text.contains("\"usage\":{\"prompt_tokens\""),
        "the client asked for usage and gets it"
    );
    let r = post(
        &gw,
        "k0",
        "j1",
        "/v1/chat/completions",
        &chat(false, false),
        &[("x-mock-tokens", "12")],
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    let body = json!({ "model": "claude-3-5-haiku", "stream": true, "max_tokens": 100,
        "messages": [{ "role": "user", "content": "hello there" }] });
    let r = post(
        &gw,
        "k0",
        "a1",
        "/v1/messages",
        &body,
        &[("x-mock-tokens", "9")],
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.text().await.unwrap().contains("message_stop"));
    wait_settled(&gw, 3).await;
    let mut tokens = 0;
    let mut micros = 0;
    for rid in ["s1", "j1", "a1"] {
        let (p, c) = produced(&mock, rid).await;
        tokens += p + c;
        micros += money(p, c);
    }
    assert_eq!(
        charged(&gw, 0).await,
        (3, tokens, tokens, micros),
        "requests, day, month, money"
    );
}

async fn a_client_that_did_not_ask_for_usage_gets_the_direct_stream(backend: Backend) {
    let mock = MockUpstream::start();
    let gw = Gateway::start_on(&backend, &default_policy(mock.addr), &[]);
    let body = chat(true, false);
    let direct = client()
        .post(mock.url("/v1/chat/completions"))
        .header("x-request-id", "same")
        .json(&body)
        .send()
        .await
        .unwrap();
    let direct = direct.text().await.unwrap();
    let proxied = post(&gw, "k0", "same", "/v1/chat/completions", &body, &[])
        .await
        .text()
        .await
        .unwrap();
    // `created` is a timestamp in seconds: compare the streams without it.
    let strip = |s: &str| regex_free_strip(s);
    assert!(
        !direct.contains("usage"),
        "a direct call without include_usage has no usage"
    );
    assert_eq!(
        strip(&proxied),
        strip(&direct),
        "byte-identical apart from `created`"
    );
    wait_settled(&gw, 1).await;
    let (p, c) = produced(&mock, "same").await;
    assert_eq!(
        charged(&gw, 0).await.1,
        p + c,
        "billed from the usage the gateway asked for"
    );
}

/// An upstream that sends a stream in one sized body (a buffering upstream or cache): the client
/// gets the same stream (the injected usage chunk removed) with its exact `Content-Length`, and
/// the call is billed from the usage, as for a stream relayed as it comes.
async fn a_stream_sent_whole_is_relayed_with_its_length_and_billed_exactly(backend: Backend) {
    let mock = MockUpstream::start();
    let gw = Gateway::start_on(&backend, &default_policy(mock.addr), &[]);
    let body = chat(true, false);
    let faults = [("x-mock-whole", "true"), ("x-mock-tokens", "25")];
    let mut direct = client()
        .post(mock.url("/v1/chat/completions"))
        .header("x-request-id", "w0");
    for (k, v) in faults {
        direct = direct.header(k, v);
    }
    let direct = direct.json(&body).send().await.unwrap();
    assert!(direct.content_length().is_some(), "the mock sends it sized");
    // The mock names the completion after the request id.
    let direct = direct
        .text()
        .await
        .unwrap()
        .replace("chatcmpl-w0", "chatcmpl-w1");
    let r = post(&gw, "k0", "w1", "/v1/chat/completions", &body, &faults).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    assert!(r.headers().get("transfer-encoding").is_none());
    let length = r.content_length().expect("relayed with a Content-Length");
    let proxied = r.text().await.unwrap();
    assert_eq!(proxied.len() as u64, length, "the length is the body's");
    assert!(proxied.ends_with("data: [DONE]\n\n"));
    assert_eq!(
        regex_free_strip(&proxied),
        regex_free_strip(&direct),
        "the stream as the upstream would send it to the client, usage chunk removed"
    );
    wait_settled(&gw, 1).await;
    let (p, c) = produced(&mock, "w1").await;
    assert_eq!(c, 25);
    assert_eq!(charged(&gw, 0).await, (1, p + c, p + c, money(p, c)));
}

/// Remove the digits after each `"created":`.
fn regex_free_strip(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("\"created\":") {
        out.push_str(&rest[..i + 10]);
        rest = rest[i + 10..].trim_start_matches(|c: char| c.is_ascii_digit());
    }
    out.push_str(rest);
    out
}

async fn a_failed_upstream_call_releases_the_reservation(backend: Backend) {
    let mock = MockUpstream::start();
    let gw = Gateway::start_on(&backend, &default_policy(mock.addr), &[]);
    for (rid, stream) in [("f1", true), ("f2", false)] {
        let r = post(
            &gw,
            "k0",
            rid,
            "/v1/chat/completions",
            &chat(stream, false),
            &[("x-mock-status", "503")],
        )
        .await;
        assert_eq!(
            r.status(),
            StatusCode::SERVICE_UNAVAILABLE,
            "the upstream's answer is passed on"
        );
    }
    wait_settled(&gw, 2).await;
    assert_eq!(
        charged(&gw, 0).await,
        (0, 0, 0, 0),
        "nothing produced, nothing charged"
    );
}

async fn a_stream_cut_by_the_upstream_bills_what_was_produced(backend: Backend) {
    let mock = MockUpstream::start();
    let gw = Gateway::start_on(&backend, &default_policy(mock.addr), &[]);
    let r = post(
        &gw,
        "k0",
        "cut1",
        "/v1/chat/completions",
        &chat(true, false),
        &[("x-mock-cut-after", "5")],
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    let _ = r.text().await;
    wait_settled(&gw, 1).await;
    let (_, c) = produced(&mock, "cut1").await;
    assert_eq!(c, 5);
    let (requests, tokens, _, _) = charged(&gw, 0).await;
    // No usage came: the prompt as counted by the gateway, plus the 5 tokens received.
    let prompt_estimate = tokens - 5;
    assert_eq!(requests, 1);
    assert!(
        (5..40).contains(&prompt_estimate),
        "prompt estimate {prompt_estimate}"
    );
}

async fn client_disconnects_are_billed_from_the_real_usage(backend: Backend) {
    let mock = MockUpstream::start();
    let gw = Gateway::start_on(&backend, &default_policy(mock.addr), &[]);
    let mut tasks = Vec::new();
    // One client for all: building one loads the TLS roots, too slow to do 50 times at once.
    let http = client();
    for i in 0..SUBJECTS {
        let url = gw.url("/v1/chat/completions");
        let http = http.clone();
        // Pseudo-random but reproducible: lengths 40..160, cut after 1..30 chunks.
        let tokens = 40 + (i * 37) % 120;
        let keep = 1 + (i * 13) % 30;
        tasks.push(tokio::spawn(async move {
            let r = http
                .post(url)
                .bearer_auth(format!("k{i}"))
                .header("x-request-id", format!("d{i}"))
                .header("x-mock-tokens", tokens.to_string())
                .header("x-mock-delay-ms", "3")
                .json(&chat(true, false))
                .send()
                .await
                .unwrap();
            // Read `keep` events (chunks may carry several), then leave.
            let mut body = r.bytes_stream();
            let mut seen = 0;
            while seen < keep {
                match body.next().await {
                    Some(Ok(chunk)) => seen += chunk.windows(6).filter(|w| w == b"data: ").count(),
                    _ => break,
                }
            }
            // Dropping the body closes the connection mid-stream.
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    wait_settled(&gw, SUBJECTS as u64).await;
    let (mut sum, mut max) = (0.0f64, 0.0f64);
    for i in 0..SUBJECTS {
        let (p, c) = produced(&mock, &format!("d{i}")).await;
        let billed = charged(&gw, i).await.1;
        let err = (billed as f64 - (p + c) as f64).abs() / (p + c) as f64 * 100.0;
        sum += err;
        max = max.max(err);
    }
    let mean = sum / SUBJECTS as f64;
    figure("disconnect_billing_error_mean_pct", format!("{mean:.3}"));
    figure("disconnect_billing_error_max_pct", format!("{max:.3}"));
    assert!(
        mean < 1.0 && max < 5.0,
        "billing error mean {mean:.3}% max {max:.3}%"
    );
    let m = tollgate_e2e::metrics(&gw).await;
    let disconnects =
        tollgate_e2e::metric(&m, "llm_client_disconnects_total").unwrap_or(0) as usize;
    // A client may get its last events in the same read as its `keep`-th on a loaded machine.
    assert!(
        disconnects >= SUBJECTS * 9 / 10,
        "{disconnects} of {SUBJECTS} clients left mid-stream"
    );
}

async fn a_retry_after_a_dropped_stream_charges_each_upstream_call_once(backend: Backend) {
    let mock = MockUpstream::start();
    let gw = Gateway::start_on(&backend, &default_policy(mock.addr), &[]);
    let faults = [("x-mock-tokens", "30"), ("x-mock-delay-ms", "5")];
    let r = post(
        &gw,
        "k0",
        "retry-1",
        "/v1/chat/completions",
        &chat(true, false),
        &faults,
    )
    .await;
    let mut body = r.bytes_stream();
    let _ = body.next().await;
    drop(body);
    // The client retries the same request (same request id): a second real upstream call.
    let r = post(
        &gw,
        "k0",
        "retry-1",
        "/v1/chat/completions",
        &chat(true, false),
        &faults,
    )
    .await;
    let _ = r.text().await.unwrap();
    wait_settled(&gw, 2).await;
    let stats = get_json(mock.url("/stats/retry-1")).await;
    assert_eq!(stats["attempts"], 2, "two upstream calls");
    let (p, c) = produced(&mock, "retry-1").await;
    let per_call = p + c;
    let billed = charged(&gw, 0).await.1;
    let double = (billed as i64 - 2 * per_call as i64) / per_call as i64;
    figure("retry_double_charges", double);
    assert_eq!(billed, 2 * per_call, "each upstream call charged once");
}

async fn concurrent_mixed_requests_keep_tokens_and_money_exact(backend: Backend) {
    let mock = MockUpstream::start();
    let gw = Gateway::start_on(&backend, &default_policy(mock.addr), &[]);
    let http = client();
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let url = gw.url("/v1/chat/completions");
            let http = http.clone();
            tokio::spawn(async move {
                let r = http
                    .post(url)
                    .bearer_auth("k1")
                    .header("x-request-id", format!("m{i}"))
                    .header("x-mock-tokens", (5 + i % 17).to_string())
                    .json(&chat(i % 2 == 0, i % 4 == 0))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), StatusCode::OK);
                r.bytes().await.unwrap();
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    wait_settled(&gw, 100).await;
    let (mut tokens, mut micros) = (0, 0);
    for i in 0..100 {
        let (p, c) = produced(&mock, &format!("m{i}")).await;
        tokens += p + c;
        micros += money(p, c);
    }
    assert_eq!(charged(&gw, 1).await, (100, tokens, tokens, micros));
}

async fn in_flight_streams_are_limited_and_always_released(backend: Backend) {
    let mock = MockUpstream::start();
    let yaml = llm_policy(
        mock.addr,
        "{ daily: 1000000, monthly: 10000000, concurrent: 2 }",
        100_000_000,
    );
    let gw = Gateway::start_on(&backend, &yaml, &[]);
    let slow = [("x-mock-tokens", "40"), ("x-mock-delay-ms", "20")];
    let a = post(
        &gw,
        "k0",
        "c1",
        "/v1/chat/completions",
        &chat(true, false),
        &slow,
    )
    .await;
    let b = post(
        &gw,
        "k0",
        "c2",
        "/v1/chat/completions",
        &chat(true, false),
        &slow,
    )
    .await;
    let third = post(
        &gw,
        "k0",
        "c3",
        "/v1/chat/completions",
        &chat(true, false),
        &[],
    )
    .await;
    assert_eq!(
        third.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "two in flight already"
    );
    assert!(third.headers().contains_key("retry-after"));
    let _ = (a.text().await, b.text().await);
    // Released on every exit: completed, upstream error, cut, client gone.
    wait_settled(&gw, 2).await;
    let _ = post(
        &gw,
        "k0",
        "c4",
        "/v1/chat/completions",
        &chat(true, false),
        &[("x-mock-status", "500")],
    )
    .await;
    let _ = post(
        &gw,
        "k0",
        "c5",
        "/v1/chat/completions",
        &chat(true, false),
        &[("x-mock-cut-after", "2")],
    )
    .await
    .text()
    .await;
    wait_settled(&gw, 4).await;
    for rid in ["c6", "c7"] {
        let r = post(
            &gw,
            "k0",
            rid,
            "/v1/chat/completions",
            &chat(false, false),
            &[],
        )
        .await;
        assert_eq!(r.status(), StatusCode::OK, "both slots free again");
    }
}

async fn a_reservation_the_budget_cannot_cover_is_refused_before_the_upstream(backend: Backend) {
    let mock = MockUpstream::start();
    // 100 micro-units a day: a reservation of 300 output tokens (180 micros) does not fit.
    let gw = Gateway::start_on(
        &backend,
        &llm_policy(mock.addr, "{ daily: 1000000, monthly: 10000000 }", 100),
        &[],
    );
    let r = post(
        &gw,
        "k0",
        "b1",
        "/v1/chat/completions",
        &chat(true, false),
        &[],
    )
    .await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["quota"], "spend");
    let calls = get_json(mock.url("/_mock/requests")).await;
    assert_eq!(calls["total"], 0, "the upstream was never called");
    // A smaller max_tokens fits.
    let mut small = chat(false, false);
    small["max_tokens"] = json!(20);
    let r = post(
        &gw,
        "k0",
        "b2",
        "/v1/chat/completions",
        &small,
        &[("x-mock-tokens", "20")],
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn budget_used_survives_a_gateway_restart_on_redis() {
    let mock = MockUpstream::start();
    let backend = Backend::shared_redis();
    let yaml = default_policy(mock.addr);
    let mut first = Gateway::start_on(&backend, &yaml, &[]);
    let r = post(
        &first,
        "k0",
        "p1",
        "/v1/chat/completions",
        &chat(false, false),
        &[],
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    wait_settled(&first, 1).await;
    let before = charged(&first, 0).await;
    assert!(before.3 > 0);
    // A graceful stop gives back what the gateway held in leases (a killed one loses it until
    // the window resets).
    first.shut_down();
    let second = Gateway::start_on(&backend, &yaml, &[]);
    assert_eq!(
        charged(&second, 0).await,
        before,
        "counters and money live in Redis"
    );
}

async fn the_cost_guardrail_stops_expensive_routes_near_the_budget(backend: Backend) {
    let mock = MockUpstream::start();
    let cache = MockUpstream::start();
    let yaml = format!(
        "guardrail: {{ quota: spend, threshold: 0.95 }}\n\
         upstreams:\n  up: {{ address: '{}' }}\n  cache: {{ address: '{}' }}\n\
         routes:\n\
         \x20 - {{ name: regenerate, match: {{ path_prefix: /regenerate }}, upstream: up, quota: requests, expensive: true }}\n\
         \x20 - {{ name: summary, match: {{ path_prefix: /summary }}, upstream: up, quota: requests, expensive: true, fallback_upstream: cache }}\n\
         \x20 - {{ name: lookup, match: {{ path_prefix: /lookup }}, upstream: up, quota: requests }}\n\
         tiers:\n  t:\n    requests: {{ daily: 1000 }}\n    spend: {{ daily: 1000 }}\n\
         subjects:\n  - {{ key: k0, id: u0, tier: t }}\n",
        mock.addr, cache.addr
    );
    let gw = Gateway::start_on(&backend, &yaml, &[]);
    let get = |path: &'static str| {
        let url = gw.url(path);
        async move { client().get(url).bearer_auth("k0").send().await.unwrap() }
    };
    let spend = |cost: u64| {
        let url = gw.api_url("/check");
        async move {
            post_json(
                url,
                &json!({ "subject": "u0", "quota": "spend", "cost": cost }),
            )
            .await
        }
    };
    spend(940).await;
    assert_eq!(
        get("/regenerate").await.status(),
        StatusCode::OK,
        "94% spent: still open"
    );
    spend(10).await;
    let refused = get("/regenerate").await;
    assert_eq!(
        refused.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "95% spent: expensive routes stop"
    );
    assert!(refused.headers().contains_key("retry-after"));
    let body: Value = refused.json().await.unwrap();
    assert_eq!(
        (
            body["error"].as_str(),
            body["used"].as_u64(),
            body["limit"].as_u64()
        ),
        (Some("cost_guardrail"), Some(950), Some(1000))
    );
    assert!(body["message"].as_str().unwrap().contains("95%"), "{body}");
    assert_eq!(
        get("/lookup").await.status(),
        StatusCode::OK,
        "cheap routes go on"
    );
    let diverted = get("/summary").await;
    assert_eq!(
        diverted.status(),
        StatusCode::OK,
        "diverted to the fallback upstream"
    );
    assert_eq!(get_json(cache.url("/_mock/requests")).await["total"], 1);
    assert_eq!(
        get_json(mock.url("/_mock/requests")).await["by_path"]["/summary"],
        Value::Null
    );
    let status = get_json(gw.api_url("/status")).await;
    assert_eq!(
        status["guardrail"]["tripped"][0]["subject"], "u0",
        "{status}"
    );
    let m = tollgate_e2e::metrics(&gw).await;
    assert!(
        m.contains("cost_guardrail_total{action=\"refused\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("cost_guardrail_total{action=\"fallback\"} 1"),
        "{m}"
    );
}
