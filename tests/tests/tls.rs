//! The proxy listener over TLS (`--tls-cert`, `--tls-key`): HTTP/2 by ALPN with streamed LLM
//! responses multiplexed on one connection, HTTP/1.1 for clients that offer only it, a replaced
//! certificate served to new connections without a restart, and a bad certificate refused at
//! start with the file named.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{StatusCode, Version};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};
use tollgate_e2e::tls::{Certs, TlsClient, body_bytes};
use tollgate_e2e::{Gateway, MockUpstream, TempDir, bin, eventually, get_json};

const OUTPUT_TOKENS: u64 = 7;

fn policy(upstream: SocketAddr) -> String {
    format!(
        "upstreams:\n  up: {{ address: '{upstream}', read_timeout_ms: 10000 }}\n\
         models:\n  default: {{ input_per_million: 0.15, output_per_million: 0.60 }}\n\
         routes:\n\
         \x20 - {{ name: chat, match: {{ path_prefix: /v1/chat/completions }}, upstream: up, quota: requests,\n\
         \x20     llm: {{ provider: openai, tokens: tokens, spend: spend }} }}\n\
         \x20 - {{ name: lookup, match: {{ path_prefix: /lookup }}, upstream: up, quota: requests }}\n\
         \x20 - {{ name: raw, match: {{ path_prefix: /raw }}, upstream: up, quota: requests, strip_prefix: true }}\n\
         tiers:\n  t:\n    requests: {{ daily: 1000 }}\n    tokens: {{ daily: 1000000 }}\n    spend: {{ daily: 100000000 }}\n\
         subjects:\n  - {{ key: k0, id: u0, tier: t }}\n"
    )
}

fn start(certs: &Certs) -> (MockUpstream, Gateway) {
    let mock = MockUpstream::start();
    let args = certs.args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let gw = Gateway::start_with(&policy(mock.addr), &args);
    (mock, gw)
}

/// The LLM route, metered and billed by the gateway.
const LLM: &str = "/v1/chat/completions";
/// The same upstream endpoint through a plain route: relayed by pingora's proxy, not metered.
const RAW: &str = "/raw/v1/chat/completions";

fn chat(client: &TlsClient, path: &str, rid: &str) -> hyper::Request<Full<Bytes>> {
    let body = json!({
        "model": "gpt-4o-mini", "stream": true, "max_tokens": 100,
        "stream_options": { "include_usage": true },
        "messages": [{ "role": "user", "content": "tell me about the rate limits" }],
    });
    client
        .request("POST", path)
        .header("authorization", "Bearer k0")
        .header("content-type", "application/json")
        .header("x-request-id", rid)
        .header("x-mock-tokens", OUTPUT_TOKENS.to_string())
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request")
}

/// Send a streamed chat completion to `path` on `client`'s connection and parse the whole stream:
/// every event is a JSON chunk until the last, `[DONE]`; the chunk before it carries the usage.
async fn stream_chat(mut client: TlsClient, path: &str, rid: &str) -> Value {
    let r = client.send(chat(&client, path, rid)).await;
    assert_eq!(r.status(), StatusCode::OK, "{rid}");
    assert_eq!(r.version(), client.version, "{rid}");
    let body = body_bytes(r).await;
    let text = std::str::from_utf8(&body).expect("utf-8 stream");
    let events: Vec<&str> = text
        .split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("{rid}: not a data event: {e:?}"))
        })
        .collect();
    assert!(
        text.ends_with("\n\n"),
        "{rid}: the stream ends with a whole event"
    );
    let (last, chunks) = events.split_last().expect("events");
    assert_eq!(*last, "[DONE]", "{rid}");
    let chunks: Vec<Value> = chunks
        .iter()
        .map(|c| serde_json::from_str(c).unwrap_or_else(|e| panic!("{rid}: {e}: {c}")))
        .collect();
    assert!(
        chunks.len() > OUTPUT_TOKENS as usize,
        "{rid}: content and usage chunks"
    );
    let usage = chunks.last().expect("usage chunk")["usage"].clone();
    assert_eq!(usage["completion_tokens"], OUTPUT_TOKENS, "{rid}: {usage}");
    usage
}

/// GET a plain (not LLM) route on `client`'s connection.
async fn lookup(client: &mut TlsClient) {
    let request = client
        .request("GET", "/lookup")
        .header("authorization", "Bearer k0")
        .body(Full::default())
        .expect("request");
    let r = client.send(request).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.version(), client.version);
    let echo: Value = serde_json::from_slice(&body_bytes(r).await).expect("JSON");
    assert_eq!(echo["path"], "/lookup");
}

/// Two streamed chat completions to `path` multiplexed on one HTTP/2 connection, then a third after
/// them and a plain request: each stream parsed to its end and matched with the mock's record.
async fn streams_share_one_http2_connection(path: &str, tag: &str) {
    let certs = Certs::new();
    let (mock, gw) = start(&certs);
    let mut client = TlsClient::connect(gw.proxy, &certs.ca_pem, &["h2", "http/1.1"]).await;
    assert_eq!(client.version, Version::HTTP_2, "ALPN chose h2");

    let rids = ["a", "b", "c"].map(|n| format!("tls-{tag}-{n}"));
    // Both at once: two streams on the one connection this client holds.
    let (a, b) = tokio::join!(
        stream_chat(client.h2_handle().expect("h2"), path, &rids[0]),
        stream_chat(client.h2_handle().expect("h2"), path, &rids[1]),
    );
    // And after they ended, the connection is still there for more.
    let c = stream_chat(client.h2_handle().expect("h2"), path, &rids[2]).await;
    for (rid, usage) in rids.iter().zip([a, b, c]) {
        let s = get_json(mock.url(&format!("/stats/{rid}"))).await;
        assert_eq!(s["completed"], true, "{rid}: {s}");
        assert_eq!(s["tokens_sent"], usage["completion_tokens"], "{rid}");
        assert_eq!(s["prompt_tokens"], usage["prompt_tokens"], "{rid}");
    }
    lookup(&mut client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relayed_streams_share_one_http2_connection() {
    streams_share_one_http2_connection(RAW, "h2-raw").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llm_streams_share_one_http2_connection() {
    streams_share_one_http2_connection(LLM, "h2-llm").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_clients_are_served_over_tls() {
    let certs = Certs::new();
    let (_mock, gw) = start(&certs);
    let mut client = TlsClient::connect(gw.proxy, &certs.ca_pem, &["http/1.1"]).await;
    assert_eq!(client.version, Version::HTTP_11);
    lookup(&mut client).await;
    // Streamed responses on the same connection, relayed and then metered, each read to its end.
    let r = client.send(chat(&client, RAW, "tls-h1-raw")).await;
    assert_eq!(r.status(), StatusCode::OK);
    body_bytes(r).await;
    stream_chat(client, LLM, "tls-h1").await;

    // A client without ALPN gets HTTP/1.1 too.
    let client = TlsClient::connect(gw.proxy, &certs.ca_pem, &[]).await;
    assert_eq!(client.version, Version::HTTP_11);
    stream_chat(client, LLM, "tls-no-alpn").await;
}

/// The certificate new connections get, once it is no longer `old`: the watcher reloads shortly
/// after the files change, so poll new connections until one shows it.
async fn served_after(gw: &Gateway, certs: &Certs, old: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let served = TlsClient::connect(gw.proxy, &certs.ca_pem, &["h2"])
            .await
            .cert_sha256;
        if served != old {
            return served;
        }
        assert!(
            Instant::now() < deadline,
            "a new connection gets the new certificate"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_certificate_is_served_without_a_restart() {
    let certs = Certs::new();
    let (_mock, gw) = start(&certs);
    let mut first = TlsClient::connect(gw.proxy, &certs.ca_pem, &["h2"]).await;
    let old = first.cert_sha256.clone();

    certs.rotate();
    let new = served_after(&gw, &certs, &old).await;
    // The connection made before goes on with the certificate it was made with.
    lookup(&mut first).await;
    let mut client = TlsClient::connect(gw.proxy, &certs.ca_pem, &["h2"]).await;
    lookup(&mut client).await;

    // A broken replacement is refused, logged, and the last good certificate stays.
    let rejections = || {
        std::fs::read_to_string(&gw.log)
            .unwrap_or_default()
            .matches("new TLS certificate rejected")
            .count()
    };
    let before = rejections();
    certs.replace(
        b"-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n",
        b"",
    );
    // (With TOLLGATE_TEST_LOGS the logs go to the terminal, not to the file.)
    if std::env::var_os("TOLLGATE_TEST_LOGS").is_none() {
        assert!(
            eventually(Duration::from_secs(10), || async { rejections() > before }).await,
            "the rejection is logged"
        );
    }
    let mut client = TlsClient::connect(gw.proxy, &certs.ca_pem, &["h2"]).await;
    assert_eq!(
        client.cert_sha256, new,
        "the last good certificate is served"
    );
    lookup(&mut client).await;

    // And the next good one is picked up again.
    certs.rotate();
    let newer = served_after(&gw, &certs, &new).await;
    assert_ne!(newer, old);
}

#[test]
fn a_bad_certificate_stops_the_start_naming_the_file() {
    let certs = Certs::new();
    let dir = TempDir::new("tls-bad");
    let policy_file = dir.0.join("policy.yaml");
    std::fs::write(&policy_file, policy("127.0.0.1:9".parse().expect("addr"))).expect("policy");
    let run = |cert: &std::path::Path, key: &std::path::Path| {
        let out = Command::new(bin("gateway"))
            .args([
                "run",
                "--listen",
                "127.0.0.1:0",
                "--api-listen",
                "127.0.0.1:0",
            ])
            .arg("--config")
            .arg(&policy_file)
            .arg("--tls-cert")
            .arg(cert)
            .arg("--tls-key")
            .arg(key)
            .output()
            .expect("run gateway");
        assert!(!out.status.success(), "the gateway refuses to start");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };

    let missing = dir.0.join("missing.pem");
    let e = run(&missing, &certs.key);
    assert!(e.contains("--tls-cert") && e.contains("missing.pem"), "{e}");

    let garbage = dir.0.join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").expect("write");
    let e = run(&garbage, &certs.key);
    assert!(e.contains("--tls-cert") && e.contains("garbage.pem"), "{e}");
    let e = run(&certs.cert, &garbage);
    assert!(e.contains("--tls-key") && e.contains("garbage.pem"), "{e}");

    // A key that is not the certificate's.
    let other = Certs::new();
    let e = run(&certs.cert, &other.key);
    assert!(e.contains("is not the key of the certificate"), "{e}");
}

/// The gateway as a client: an HTTPS upstream that offers HTTP/2 is spoken to in HTTP/2 by both
/// kinds of route, its certificate checked against the policy's `ca_file`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstreams_that_offer_http2_are_reached_over_it() {
    let mock = tollgate_e2e::tls::MockUpstreamTls::start();
    let dir = TempDir::new("upstream-ca");
    let ca = dir.0.join("ca.pem");
    std::fs::write(&ca, &mock.certs.ca_pem).unwrap();
    let yaml = format!(
        "upstreams:\n  up: {{ address: '{}', tls: true, sni: localhost, ca_file: '{}' }}\n\
         routes:\n\
         \x20 - {{ name: chat, match: {{ path_prefix: /v1/chat/completions }}, upstream: up, quota: requests,\n\
         \x20     llm: {{ provider: openai, tokens: tokens }} }}\n\
         \x20 - {{ name: lookup, match: {{ path_prefix: /lookup }}, upstream: up, quota: requests }}\n\
         tiers:\n  t:\n    requests: {{ daily: 1000 }}\n    tokens: {{ daily: 1000000 }}\n\
         subjects:\n  - {{ key: k0, id: u0, tier: t }}\n",
        mock.addr,
        ca.display()
    );
    let gw = Gateway::start(&yaml);
    let body = json!({ "model": "gpt-4o-mini", "stream": true,
        "messages": [{ "role": "user", "content": "hello" }] });
    let r = tollgate_e2e::post_as(
        &gw,
        "k0",
        "h2-up-1",
        "/v1/chat/completions",
        &body,
        &[("x-mock-tokens", "5")],
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.text().await.unwrap().ends_with("data: [DONE]\n\n"));
    let r = tollgate_e2e::client()
        .get(gw.url("/lookup/de/10115"))
        .bearer_auth("k0")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let counts = mock.get_json("/_mock/requests").await;
    assert_eq!(
        counts["by_version"]["HTTP/2"], 2,
        "both routes reached the upstream over HTTP/2: {counts}"
    );
}
