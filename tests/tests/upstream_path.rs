//! The one upstream path, end to end: responses framed so a connection carries several of them
//! (streamed ones included), upstreams under a base path, and routes that rewrite the prefix.

use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;
use tollgate_e2e::{Gateway, MockUpstream, get_json};

fn policy(upstream: std::net::SocketAddr, extra_upstream: &str, extra_routes: &str) -> String {
    format!(
        "upstreams:\n  up: {{ address: '{upstream}' }}\n{extra_upstream}\
         routes:\n\
         \x20 - {{ name: chat, match: {{ path_prefix: /v1/chat/completions }}, upstream: up, quota: requests,\n\
         \x20     llm: {{ provider: openai, tokens: tokens }} }}\n\
         {extra_routes}\
         \x20 - {{ name: rest, match: {{ path_prefix: / }}, upstream: up, quota: requests }}\n\
         tiers:\n  t:\n    requests: {{ daily: 1000 }}\n    tokens: {{ daily: 1000000 }}\n\
         subjects:\n  - {{ key: k1, id: u1, tier: t }}\n"
    )
}

/// One HTTP/1.1 response read off a connection: status, headers (lower-case names), body.
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Read exactly one response, framed by `Content-Length` or chunked encoding; a response framed
/// by closing the connection fails the test (the connection could not carry another).
fn read_response(r: &mut BufReader<TcpStream>) -> Response {
    let mut line = String::new();
    r.read_line(&mut line).expect("status line");
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).expect("header line");
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (n, v) = l.split_once(':').expect("header");
        headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let mut resp = Response {
        status,
        headers,
        body: Vec::new(),
    };
    if let Some(len) = resp.header("content-length") {
        let mut body = vec![0; len.parse().expect("length")];
        r.read_exact(&mut body).expect("body");
        resp.body = body;
    } else {
        assert_eq!(
            resp.header("transfer-encoding"),
            Some("chunked"),
            "a response with neither a length nor chunked encoding is framed by close"
        );
        loop {
            line.clear();
            r.read_line(&mut line).expect("chunk size");
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap(), 16)
                .expect("chunk size");
            let mut chunk = vec![0; size + 2];
            r.read_exact(&mut chunk).expect("chunk");
            assert_eq!(&chunk[size..], b"\r\n", "chunk terminator");
            if size == 0 {
                break;
            }
            resp.body.extend_from_slice(&chunk[..size]);
        }
    }
    resp
}

fn send(w: &mut TcpStream, path: &str, body: &Value) {
    let body = body.to_string();
    write!(
        w,
        "POST {path} HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer k1\r\ncontent-type: application/json\r\n\
         x-mock-tokens: 9\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("write request");
}

fn chat(stream: bool) -> Value {
    json!({ "model": "gpt-4o-mini", "stream": stream,
        "messages": [{ "role": "user", "content": "count to nine" }] })
}

/// The SSE events' data lines of a streamed body.
fn events(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body)
        .lines()
        .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
        .collect()
}

#[test]
fn streamed_and_plain_responses_share_one_kept_alive_connection() {
    let mock = MockUpstream::start();
    let gw = Gateway::start(&policy(mock.addr, "", ""));
    let conn = TcpStream::connect(gw.proxy).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut w = conn.try_clone().unwrap();
    let mut r = BufReader::new(conn);
    for round in 0..2 {
        send(&mut w, "/v1/chat/completions", &chat(true));
        let resp = read_response(&mut r);
        assert_eq!(resp.status, 200, "stream {round}");
        assert!(
            resp.header("content-type")
                .is_some_and(|v| v.starts_with("text/event-stream"))
        );
        assert_ne!(resp.header("connection"), Some("close"));
        let data = events(&resp.body);
        assert_eq!(
            data.last().map(String::as_str),
            Some("[DONE]"),
            "stream {round}"
        );
        let text: String = data
            .iter()
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .filter_map(|v| {
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_string)
            })
            .collect();
        assert!(!text.is_empty(), "stream {round} carried content");
    }
    // A plain completion after the streams, on the same connection.
    send(&mut w, "/v1/chat/completions", &chat(false));
    let resp = read_response(&mut r);
    assert_eq!(resp.status, 200);
    let v: Value = serde_json::from_slice(&resp.body).expect("JSON completion");
    assert_eq!(v["usage"]["completion_tokens"], 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_under_a_base_path_is_reached_at_the_standard_paths() {
    let mock = MockUpstream::start();
    let extra_upstream = format!(
        "  mounted: {{ address: '{}', base_path: /anthropic }}\n",
        mock.addr
    );
    let extra_routes = "\x20 - { name: messages, match: { path_prefix: /v1/messages }, upstream: mounted, quota: requests,\n\
                        \x20     llm: { provider: anthropic, tokens: tokens } }\n\
                        \x20 - { name: legacy, match: { path_prefix: /old/api }, upstream: up, quota: requests, rewrite: /v2 }\n\
                        \x20 - { name: stripped, match: { path_prefix: /lookup }, upstream: up, quota: requests, strip_prefix: true }\n";
    let gw = Gateway::start(&policy(mock.addr, &extra_upstream, extra_routes));
    let body = json!({ "model": "claude-3-5-haiku", "stream": true, "max_tokens": 50,
        "messages": [{ "role": "user", "content": "hello" }] });
    let r = tollgate_e2e::post_as(
        &gw,
        "k1",
        "base-1",
        "/v1/messages",
        &body,
        &[("x-mock-tokens", "7")],
    )
    .await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(
        text.contains("message_stop"),
        "a whole Anthropic stream: {text}"
    );
    let stats = get_json(mock.url("/stats/base-1")).await;
    assert_eq!(stats["tokens_sent"], 7, "the mounted endpoint answered");

    // Plain routes: the mock echoes the path it received.
    let client = tollgate_e2e::client();
    for (asked, received) in [
        ("/old/api/items/3?x=1", "/v2/items/3"),
        ("/old/api", "/v2"),
        ("/lookup/de/10115", "/de/10115"),
        ("/lookup", "/"),
    ] {
        let r = client
            .get(gw.url(asked))
            .bearer_auth("k1")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{asked}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["path"], received, "{asked}");
        assert!(
            v["authorization"].is_null(),
            "the client's key is not forwarded"
        );
    }
}

#[test]
fn a_base_path_or_rewrite_that_is_not_a_clean_path_is_refused_at_load() {
    let dir = tollgate_e2e::TempDir::new("bad-base");
    for (extra_upstream, extra_routes, field) in [
        (
            "  b: { address: '127.0.0.1:1', base_path: '/a/../b' }\n",
            "",
            "upstreams.b.base_path",
        ),
        (
            "",
            "\x20 - { name: r, match: { path_prefix: /x }, upstream: up, quota: requests, rewrite: '/y', strip_prefix: true }\n",
            "routes[1].rewrite",
        ),
    ] {
        let file = dir.0.join("p.yaml");
        let addr = "127.0.0.1:1".parse().unwrap();
        std::fs::write(&file, policy(addr, extra_upstream, extra_routes)).unwrap();
        let out = std::process::Command::new(tollgate_e2e::bin("gateway"))
            .args(["check", file.to_str().unwrap()])
            .output()
            .expect("gateway check");
        let err = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{field}: accepted");
        assert!(err.contains(field), "{field} named in: {err}");
    }
}
