//! Tests over real TCP: raw HTTP/1.1 against `serve` on 127.0.0.1:0 (chunk
//! framing and timing, cuts, client disconnects) and the binary itself.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mock_upstream::{MockState, serve};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

async fn start() -> (SocketAddr, Arc<MockState>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let state = Arc::new(MockState::new());
    tokio::spawn(serve(listener, Arc::clone(&state)));
    (addr, state)
}

async fn send_request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut request =
        format!("{method} {target} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str(&format!(
        "content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    ));
    stream.write_all(request.as_bytes()).await.expect("write");
    stream
}

struct RawResponse {
    head: String,
    /// Chunked-encoding chunks, with the time each was fully received.
    chunks: Vec<(Vec<u8>, Duration)>,
    /// The terminating zero-size chunk arrived.
    terminated: bool,
}

impl RawResponse {
    fn status(&self) -> u16 {
        self.head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status line")
    }

    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|line| {
            let (k, v) = line.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }

    fn body(&self) -> String {
        let bytes: Vec<u8> = self
            .chunks
            .iter()
            .flat_map(|(c, _)| c.iter().copied())
            .collect();
        String::from_utf8(bytes).expect("utf-8")
    }
}

/// Read until EOF, then split the chunked body, timing each chunk.
async fn read_response(mut stream: TcpStream, started: Instant) -> RawResponse {
    let mut buf = Vec::new();
    let mut reads = Vec::new();
    let mut scratch = [0u8; 4096];
    loop {
        let n = match stream.read(&mut scratch).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        buf.extend_from_slice(&scratch[..n]);
        reads.push((buf.len(), started.elapsed()));
    }
    let arrival = |end: usize| {
        reads
            .iter()
            .find(|(len, _)| *len >= end)
            .map(|(_, t)| *t)
            .expect("chunk was read")
    };
    let head_end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("response head")
        + 4;
    let head = String::from_utf8(buf[..head_end].to_vec()).expect("head");
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let body = buf[head_end..].to_vec();
        let at = arrival(buf.len());
        return RawResponse {
            head,
            chunks: vec![(body, at)],
            terminated: true,
        };
    }
    let mut pos = head_end;
    let mut chunks = Vec::new();
    let mut terminated = false;
    while let Some(line_len) = buf[pos..].windows(2).position(|w| w == b"\r\n") {
        let size_text = std::str::from_utf8(&buf[pos..pos + line_len]).expect("size line");
        let size = usize::from_str_radix(size_text.trim(), 16).expect("hex size");
        let data_start = pos + line_len + 2;
        if size == 0 {
            terminated = true;
            break;
        }
        if buf.len() < data_start + size + 2 {
            break;
        }
        chunks.push((
            buf[data_start..data_start + size].to_vec(),
            arrival(data_start + size),
        ));
        pos = data_start + size + 2;
    }
    RawResponse {
        head,
        chunks,
        terminated,
    }
}

const CHAT: &str =
    r#"{"model":"m","messages":[{"role":"user","content":"hi there"}],"stream":true}"#;

#[tokio::test]
async fn each_event_is_its_own_chunk_and_arrives_with_the_delay() {
    let (addr, _state) = start().await;
    let started = Instant::now();
    let stream = send_request(
        addr,
        "POST",
        "/v1/chat/completions?tokens=3&delay_ms=100",
        &[("x-request-id", "tcp-1")],
        CHAT,
    )
    .await;
    let response = read_response(stream, started).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.header("x-request-id").as_deref(), Some("tcp-1"));
    assert_eq!(
        response.header("content-type").as_deref(),
        Some("text/event-stream")
    );
    assert!(response.terminated);
    // role + 3 tokens + finish + [DONE], each exactly one chunk.
    assert_eq!(response.chunks.len(), 6);
    for (chunk, _) in &response.chunks {
        let text = std::str::from_utf8(chunk).expect("utf-8");
        assert!(
            text.starts_with("data: ") && text.ends_with("\n\n"),
            "{text:?}"
        );
        assert_eq!(text.matches("data: ").count(), 1);
    }
    assert_eq!(response.chunks[5].0, b"data: [DONE]\n\n");
    let times: Vec<Duration> = response.chunks.iter().map(|(_, t)| *t).collect();
    assert!(times[0] >= Duration::from_millis(100), "{times:?}");
    for pair in times.windows(2) {
        // Generous lower bound: a sleep never ends early, reads may batch late.
        assert!(pair[1] >= pair[0], "{times:?}");
    }
    assert!(
        times[5] - times[1] >= Duration::from_millis(350),
        "{times:?}"
    );
}

#[tokio::test]
async fn cut_drops_the_connection_without_terminating_chunk() {
    let (addr, state) = start().await;
    let stream = send_request(
        addr,
        "POST",
        "/v1/messages",
        &[
            ("x-request-id", "tcp-cut"),
            ("x-mock-cut-after", "2"),
            ("x-mock-tokens", "9"),
        ],
        CHAT,
    )
    .await;
    let response = read_response(stream, Instant::now()).await;
    assert_eq!(response.status(), 200);
    assert!(!response.terminated, "a cut body must not end cleanly");
    let body = response.body();
    assert_eq!(body.matches("event: content_block_delta").count(), 2);
    assert!(!body.contains("message_stop") && !body.contains("message_delta"));

    // Stats over HTTP, as a test of the gateway would read them.
    let stats = read_response(
        send_request(addr, "GET", "/stats/tcp-cut", &[], "").await,
        Instant::now(),
    )
    .await;
    assert_eq!(stats.status(), 200);
    let record: Value = serde_json::from_str(&stats.body()).expect("stats JSON");
    assert_eq!(record["cut"], true);
    assert_eq!(record["completed"], false);
    assert_eq!(record["tokens_sent"], 2);
    assert_eq!(record["completion_tokens_planned"], 9);
    assert_eq!(record["endpoint"], "/v1/messages");
    assert_eq!(
        record,
        serde_json::to_value(state.record("tcp-cut").expect("record")).expect("json")
    );

    // Non-stream: the head arrives, then the body is cut before its first byte.
    let body = r#"{"messages":[{"role":"user","content":"hi"}]}"#;
    let stream = send_request(addr, "POST", "/v1/chat/completions?cut_after=0", &[], body).await;
    let response = read_response(stream, Instant::now()).await;
    assert_eq!(response.status(), 200);
    assert!(!response.terminated);
    assert!(response.chunks.is_empty());
}

#[tokio::test]
async fn client_going_away_is_recorded() {
    let (addr, state) = start().await;
    let mut stream = send_request(
        addr,
        "POST",
        "/v1/chat/completions?tokens=500&delay_ms=5",
        &[("x-request-id", "tcp-gone")],
        CHAT,
    )
    .await;
    // Read until a couple of content chunks went through, then hang up.
    let mut seen = Vec::new();
    let mut scratch = [0u8; 1024];
    while String::from_utf8_lossy(&seen)
        .matches("\"content\":\" ")
        .count()
        < 2
    {
        let n = stream.read(&mut scratch).await.expect("read");
        assert!(n > 0, "stream ended early");
        seen.extend_from_slice(&scratch[..n]);
    }
    drop(stream);

    let deadline = Instant::now() + Duration::from_secs(10);
    let record = loop {
        let record = state.record("tcp-gone").expect("record");
        if record.client_disconnected || Instant::now() > deadline {
            break record;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(record.client_disconnected, "{record:?}");
    assert!(!record.completed && !record.cut);
    assert!(
        record.tokens_sent >= 2 && record.tokens_sent < 500,
        "{record:?}"
    );
}

#[tokio::test]
async fn binary_prints_its_address_and_serves() {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_mock-upstream"))
        .args(["--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn mock-upstream");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        BufReader::new(stdout).read_line(&mut line),
    )
    .await
    .expect("address line in time")
    .expect("read line");
    let addr: SocketAddr = line
        .strip_prefix("listening on ")
        .and_then(|s| s.strip_suffix('\n'))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    assert_eq!(addr.ip().to_string(), "127.0.0.1");
    assert_ne!(addr.port(), 0);

    let health = read_response(
        send_request(addr, "GET", "/healthz", &[], "").await,
        Instant::now(),
    )
    .await;
    assert_eq!(health.status(), 200);
    assert_eq!(health.body(), "ok");
    let lookup = read_response(
        send_request(addr, "GET", "/lookup", &[], "").await,
        Instant::now(),
    )
    .await;
    let json: Value = serde_json::from_str(&lookup.body()).expect("JSON");
    assert_eq!(json["path"], "/lookup");
    let counts = read_response(
        send_request(addr, "GET", "/_mock/requests", &[], "").await,
        Instant::now(),
    )
    .await;
    let json: Value = serde_json::from_str(&counts.body()).expect("JSON");
    assert_eq!(json["total"], 1);

    child.kill().await.expect("kill");
}
