//! Billing what the provider bills, end to end: chat, the Responses API and embeddings (OpenAI),
//! messages with cache writes and reads (Anthropic), cached and reasoning tokens, each kind at its
//! own price from a price book the policy includes (`models_file`). Every charge is recomputed
//! from what mock-upstream says it reported (`/stats/{request id}`) with the provider's rules and
//! the documented rounding (each kind × its price per million, summed, divided once, rounded up).

use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;
use tollgate_e2e::{
    Gateway, MockUpstream, TempDir, client, eventually, figure, get_json, metric, metrics,
    post_json,
};

const SUBJECTS: usize = 10;

/// Micro-units per million tokens, as the price book below writes them.
struct Prices {
    input: u64,
    cached: u64,
    cache_write: u64,
    cache_read: u64,
    output: u64,
    embedding: u64,
}

const GPT: Prices = Prices {
    input: 2_500_000,
    cached: 1_250_000,
    cache_write: 2_500_000,
    cache_read: 1_250_000,
    output: 10_000_000,
    embedding: 2_500_000,
};
const CLAUDE: Prices = Prices {
    input: 3_000_000,
    cached: 3_000_000,
    cache_write: 3_750_000,
    cache_read: 300_000,
    output: 15_000_000,
    embedding: 3_000_000,
};
const EMBED: Prices = Prices {
    input: 1_000_000,
    cached: 1_000_000,
    cache_write: 1_000_000,
    cache_read: 1_000_000,
    output: 0,
    embedding: 20_000,
};

const PRICE_BOOK: &str = "version: prices-1\n\
models:\n\
\x20 gpt-4o: { input_per_million: 2.5, cached_input_per_million: 1.25, output_per_million: 10 }\n\
\x20 claude-sonnet-4: { input_per_million: 3, cache_write_per_million: 3.75, cache_read_per_million: 0.30, output_per_million: 15 }\n\
\x20 text-embedding-3-small: { input_per_million: 1, output_per_million: 0, embedding_per_million: 0.02 }\n";

/// A policy whose prices live in `book` (an absolute path; relative paths are resolved against
/// the policy file's directory).
fn policy(upstream: std::net::SocketAddr, book: &Path) -> String {
    let mut y = format!(
        "models_file: '{}'\n\
         upstreams:\n  up: {{ address: '{upstream}', read_timeout_ms: 10000 }}\n\
         routes:\n\
         \x20 - {{ name: openai, match: {{ path_prefix: /v1 }}, upstream: up, quota: requests,\n\
         \x20     llm: {{ provider: openai, tokens: tokens, spend: spend, default_max_tokens: 500 }} }}\n\
         \x20 - {{ name: anthropic, match: {{ path_prefix: /v1/messages }}, upstream: up, quota: requests,\n\
         \x20     llm: {{ provider: anthropic, tokens: tokens, spend: spend }} }}\n\
         tiers:\n  t:\n    requests: {{ daily: 100000 }}\n    tokens: {{ daily: 100000000 }}\n    spend: {{ daily: 100000000000 }}\n\
         subjects:\n",
        book.display()
    );
    for i in 0..SUBJECTS {
        y.push_str(&format!("  - {{ key: k{i}, id: u{i}, tier: t }}\n"));
    }
    y
}

/// One request of the workload.
struct Req {
    rid: String,
    path: &'static str,
    body: Value,
    headers: Vec<(&'static str, String)>,
    /// Read this many body chunks, then hang up (`None`: read it all).
    cut_after: Option<usize>,
    prices: &'static Prices,
    embeddings: bool,
}

/// The mixed workload: request `i` of 200.
fn request(i: usize) -> Req {
    let tokens = (5 + (i * 7) % 40).to_string();
    let stream = i.is_multiple_of(2);
    // Some streams are left by their client after a few chunks (the gateway drains them).
    let cut_after = (stream && i.is_multiple_of(5)).then_some(2 + i % 3);
    let prompt = "tell me about the rate limits of the gateway and how it bills the tokens";
    let mut headers = vec![
        ("x-mock-tokens", tokens),
        ("x-mock-delay-ms", "2".to_string()),
    ];
    let (path, body, prices, embeddings) = match i % 6 {
        0 | 1 => {
            headers.push(("x-mock-cached-tokens", ((i * 3) % 20).to_string()));
            headers.push(("x-mock-reasoning-tokens", ((i * 5) % 13).to_string()));
            let mut b = json!({ "model": "gpt-4o-2024-08-06", "stream": stream, "max_tokens": 300,
                "messages": [{ "role": "user", "content": prompt }] });
            if i.is_multiple_of(4) {
                b["stream_options"] = json!({ "include_usage": true });
            }
            ("/v1/chat/completions", b, &GPT, false)
        }
        2 | 3 => {
            headers.push(("x-mock-cached-tokens", ((i * 11) % 16).to_string()));
            headers.push(("x-mock-reasoning-tokens", ((i * 3) % 9).to_string()));
            let input = if i % 4 == 2 {
                json!(prompt)
            } else {
                json!([{ "role": "user", "content": [{ "type": "input_text", "text": prompt }] }])
            };
            let b = json!({ "model": "gpt-4o", "stream": stream, "max_output_tokens": 300,
                "instructions": "answer briefly", "input": input });
            ("/v1/responses", b, &GPT, false)
        }
        4 => {
            let input = match i % 3 {
                0 => json!(prompt),
                1 => json!([prompt, "and one more"]),
                _ => json!([[1, 2, 3, 4], [5, 6]]),
            };
            let b = json!({ "model": "text-embedding-3-small", "input": input });
            ("/v1/embeddings", b, &EMBED, true)
        }
        _ => {
            headers.push(("x-mock-cache-write", ((i * 13) % 50).to_string()));
            headers.push(("x-mock-cache-read", ((i * 17) % 90).to_string()));
            let b = json!({ "model": "claude-sonnet-4-20250514", "stream": stream, "max_tokens": 300,
                "system": "be brief", "messages": [{ "role": "user", "content": prompt }] });
            ("/v1/messages", b, &CLAUDE, false)
        }
    };
    Req {
        rid: format!("p{i}"),
        path,
        body,
        headers,
        cut_after: if embeddings { None } else { cut_after },
        prices,
        embeddings,
    }
}

/// What the upstream reported for `rid`, priced by the provider's rules: OpenAI's prompt tokens
/// include the cached ones and its output includes reasoning; Anthropic's input excludes cache
/// writes and reads; embeddings are input at the embedding price. One rounding, up.
async fn expected_micros(mock: &MockUpstream, rid: &str, p: &Prices, embeddings: bool) -> u64 {
    let s = get_json(mock.url(&format!("/stats/{rid}"))).await;
    let n = |f: &str| s[f].as_u64().unwrap_or_else(|| panic!("{rid}: {f} in {s}"));
    let (prompt, cached) = (n("prompt_tokens"), n("cached_tokens"));
    let output = n("tokens_sent") + n("reasoning_tokens");
    let sum: u128 = if embeddings {
        prompt as u128 * p.embedding as u128
    } else {
        [
            (prompt - cached, p.input),
            (cached, p.cached),
            (n("cache_write_tokens"), p.cache_write),
            (n("cache_read_tokens"), p.cache_read),
            (output, p.output),
        ]
        .iter()
        .map(|(t, price)| *t as u128 * *price as u128)
        .sum()
    };
    sum.div_ceil(1_000_000) as u64
}

async fn send(gw: &Gateway, http: &reqwest::Client, key: String, r: &Req) {
    let mut b = http
        .post(gw.url(r.path))
        .bearer_auth(&key)
        .header("x-request-id", &r.rid)
        .json(&r.body);
    for (h, v) in &r.headers {
        b = b.header(*h, v);
    }
    let resp = b.send().await.expect("request");
    assert_eq!(resp.status(), StatusCode::OK, "{}", r.rid);
    match r.cut_after {
        None => {
            resp.bytes().await.expect("body");
        }
        Some(n) => {
            let mut body = resp.bytes_stream();
            for _ in 0..n {
                if body.next().await.is_none() {
                    break;
                }
            }
            // Dropped here: the client hangs up mid-stream.
        }
    }
}

/// The `ReservationSettled` events of the audit log, by request id.
fn settled(audit: &Path) -> HashMap<String, Value> {
    std::fs::read_to_string(audit)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["type"] == "ReservationSettled")
        .map(|e| (e["request_id"].as_str().unwrap_or_default().to_string(), e))
        .collect()
}

fn spend_of(event: &Value) -> u64 {
    event["settlements"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["quota"] == "spend"))
        .and_then(|s| s["actual"].as_u64())
        .unwrap_or_else(|| panic!("no spend in {event}"))
}

async fn wait_events(audit: &Path, n: usize) {
    assert!(
        eventually(Duration::from_secs(30), || async {
            settled(audit).len() >= n
        })
        .await,
        "{n} settlements in the audit log, got {}",
        settled(audit).len()
    );
}

/// Money charged to subject `u{i}` today, from `/check`.
async fn spent(gw: &Gateway, i: usize) -> u64 {
    let r = post_json(
        gw.api_url("/check"),
        &json!({ "subject": format!("u{i}"), "quota": "spend", "cost": 0 }),
    )
    .await;
    let day = r["limits"]
        .as_array()
        .and_then(|l| l.iter().find(|l| l["window"] == "day"))
        .unwrap_or_else(|| panic!("a daily limit in {r}"));
    100_000_000_000 - day["remaining"].as_u64().expect("remaining")
}

struct Setup {
    mock: MockUpstream,
    gw: Gateway,
    audit: std::path::PathBuf,
    book: std::path::PathBuf,
    _dir: TempDir,
}

fn setup() -> Setup {
    let mock = MockUpstream::start();
    let dir = TempDir::new("pricing");
    let book = dir.0.join("prices.yaml");
    std::fs::write(&book, PRICE_BOOK).expect("write price book");
    let audit = dir.0.join("audit.jsonl");
    let audit_arg = audit.display().to_string();
    let gw = Gateway::start_with(&policy(mock.addr, &book), &["--audit-log", &audit_arg]);
    Setup {
        mock,
        gw,
        audit,
        book,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_workload_is_billed_to_the_micro_unit() {
    let s = setup();
    let http = client();
    let reqs: Vec<Req> = (0..200).map(request).collect();
    for batch in reqs.chunks(20) {
        let tasks: Vec<_> = batch
            .iter()
            .enumerate()
            .map(|(j, r)| {
                let key = format!("k{}", j % SUBJECTS);
                send(&s.gw, &http, key, r)
            })
            .collect();
        futures_util::future::join_all(tasks).await;
    }
    wait_events(&s.audit, reqs.len()).await;
    let events = settled(&s.audit);
    let mut error = 0u64;
    let mut total = 0u64;
    let mut worst = (0u64, String::new());
    for r in &reqs {
        let want = expected_micros(&s.mock, &r.rid, r.prices, r.embeddings).await;
        let got = spend_of(&events[&r.rid]);
        let diff = got.abs_diff(want);
        if diff > worst.0 {
            worst = (
                diff,
                format!("{}: billed {got}, provider cost {want}", r.rid),
            );
        }
        error += diff;
        total += want;
    }
    figure("price_book_error_micros", error);
    assert_eq!(error, 0, "worst: {}", worst.1);
    // The counters hold exactly what the events say.
    let mut charged = 0;
    for i in 0..SUBJECTS {
        charged += spent(&s.gw, i).await;
    }
    assert_eq!(charged, total, "money on the subjects' counters");
    let m = metrics(&s.gw).await;
    let disconnects = metric(&m, "llm_client_disconnects_total").unwrap_or(0);
    assert!(disconnects > 0, "some clients left mid-stream");
    // The events explain the charge per token kind.
    let e = &events["p5"];
    let stats = get_json(s.mock.url("/stats/p5")).await;
    assert_eq!(e["usage"]["input"], stats["prompt_tokens"]);
    assert_eq!(e["usage"]["cache_write"], stats["cache_write_tokens"]);
    assert_eq!(e["usage"]["cache_read"], stats["cache_read_tokens"]);
    let e = &events["p6"];
    let stats = get_json(s.mock.url("/stats/p6")).await;
    assert_eq!(e["usage"]["cached_input"], stats["cached_tokens"]);
    assert_eq!(e["usage"]["reasoning"], stats["reasoning_tokens"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_responses_stream_cut_by_the_client_is_billed_from_response_completed() {
    let s = setup();
    let body = json!({ "model": "gpt-4o", "stream": true, "max_output_tokens": 400,
        "input": "write a long answer about quotas" });
    let r = client()
        .post(s.gw.url("/v1/responses"))
        .bearer_auth("k0")
        .header("x-request-id", "rc1")
        .header("x-mock-tokens", "120")
        .header("x-mock-delay-ms", "5")
        .header("x-mock-cached-tokens", "3")
        .header("x-mock-reasoning-tokens", "40")
        .json(&body)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::OK);
    let mut stream = r.bytes_stream();
    let mut seen = String::new();
    while !seen.contains("response.output_text.delta") {
        let chunk = stream.next().await.expect("a chunk").expect("bytes");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    drop(stream);
    wait_events(&s.audit, 1).await;
    let stats = get_json(s.mock.url("/stats/rc1")).await;
    assert_eq!(
        stats["completed"], true,
        "the gateway read the stream to its end"
    );
    assert_eq!(stats["tokens_sent"], 120);
    let e = &settled(&s.audit)["rc1"];
    let reasoning = 40;
    assert_eq!(
        e["usage"]["output"],
        120 + reasoning,
        "the output of response.completed, reasoning included"
    );
    assert_eq!(e["usage"]["cached_input"], 3);
    assert_eq!(
        spend_of(e),
        expected_micros(&s.mock, "rc1", &GPT, false).await
    );
    let m = metrics(&s.gw).await;
    assert_eq!(metric(&m, "llm_client_disconnects_total"), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_price_book_change_is_enforced_without_touching_the_policy() {
    let s = setup();
    let embed = |rid: &'static str| {
        let gw = &s.gw;
        async move {
            let r = tollgate_e2e::post_as(
                gw,
                "k1",
                rid,
                "/v1/embeddings",
                &json!({ "model": "text-embedding-3-small", "input": [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]] }),
                &[],
            )
            .await;
            assert_eq!(r.status(), StatusCode::OK);
            r.bytes().await.expect("body");
        }
    };
    embed("e1").await;
    wait_events(&s.audit, 1).await;
    // 10 tokens at 0.02 per million: 0.0002 micros, rounded up to 1.
    assert_eq!(spend_of(&settled(&s.audit)["e1"]), 1);
    let before = get_json(s.gw.api_url("/status")).await;
    let tmp = s.book.with_extension("tmp");
    std::fs::write(
        &tmp,
        PRICE_BOOK.replace("embedding_per_million: 0.02", "embedding_per_million: 300"),
    )
    .expect("write");
    std::fs::rename(&tmp, &s.book).expect("replace the price book");
    assert!(
        eventually(Duration::from_secs(10), || async {
            get_json(s.gw.api_url("/status")).await["policy"] != before["policy"]
        })
        .await,
        "the new price book is enforced: {}",
        get_json(s.gw.api_url("/status")).await
    );
    embed("e2").await;
    wait_events(&s.audit, 2).await;
    assert_eq!(
        spend_of(&settled(&s.audit)["e2"]),
        3_000,
        "10 tokens at 300 per million: 3,000 micros"
    );
}

/// The official `openai` package, unchanged, through the gateway: a streamed Responses call and
/// an embeddings call, both billed as the upstream reported them. Needs `TOLLGATE_PYTHON` (a
/// Python with `openai`; `scripts/test` sets it up); skipped with a note without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_streams_responses_and_embeds_through_the_gateway() {
    let Ok(python) = std::env::var("TOLLGATE_PYTHON") else {
        eprintln!("skipped: TOLLGATE_PYTHON is not set (a Python with the openai package)");
        return;
    };
    let s = setup();
    let base = format!("http://{}", s.gw.proxy);
    let v = tollgate_e2e::sdk_report(&python, "responses_embeddings.py", &[&base, "k2"]).await;
    assert_eq!(v["responses"]["deltas"], 25, "{v}");
    assert_eq!(v["responses"]["last"], "response.completed", "{v}");
    assert_eq!(v["responses"]["output_tokens"], 25 + 7, "{v}");
    assert_eq!(v["embeddings"]["vectors"], 2, "{v}");
    assert_eq!(v["embeddings"]["dimensions"], 8, "{v}");
    wait_events(&s.audit, 2).await;
    let events = settled(&s.audit);
    assert_eq!(
        spend_of(&events["py-responses"]),
        expected_micros(&s.mock, "py-responses", &GPT, false).await
    );
    assert_eq!(
        spend_of(&events["py-embeddings"]),
        expected_micros(&s.mock, "py-embeddings", &EMBED, true).await
    );
}
