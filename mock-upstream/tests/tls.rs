//! The mock over TLS: a client that offers h2 gets HTTP/2 (streams included), one that offers
//! only http/1.1 gets HTTP/1.1, both told so by `x-mock-http-version` and the request counts; the
//! binary takes `--tls-cert/--tls-key` and refuses a bad certificate naming the file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mock_upstream::tls::{TestCa, connect, serve_tls};
use mock_upstream::{HTTP_VERSION_HEADER, MockState, RequestCounts};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;

/// A certificate and key from a fresh CA, written to a directory removed on drop.
struct Certs {
    ca_pem: Vec<u8>,
    dir: PathBuf,
}

impl Certs {
    fn new(tag: &str) -> Certs {
        let dir = std::env::temp_dir().join(format!("mock-tls-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("cert dir");
        let ca = TestCa::new().expect("CA");
        let (cert, key) = ca.issue().expect("certificate");
        std::fs::write(dir.join("cert.pem"), cert).expect("write cert");
        std::fs::write(dir.join("key.pem"), key).expect("write key");
        Certs {
            ca_pem: ca.cert_pem().expect("CA PEM"),
            dir,
        }
    }

    fn cert(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }

    fn key(&self) -> PathBuf {
        self.dir.join("key.pem")
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn start(certs: &Certs) -> (SocketAddr, Arc<MockState>) {
    let acceptor = mock_upstream::tls::acceptor(&certs.cert(), &certs.key()).expect("acceptor");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let state = Arc::new(MockState::new());
    tokio::spawn(serve_tls(listener, acceptor, Arc::clone(&state)));
    (addr, state)
}

fn version_header<B>(r: &Response<B>) -> &str {
    r.headers()
        .get(HTTP_VERSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

fn chat_request(stream: bool) -> Request<Full<Bytes>> {
    let body = serde_json::json!({
        "model": "gpt-4o-mini", "stream": stream, "max_tokens": 50,
        "stream_options": { "include_usage": true },
        "messages": [{ "role": "user", "content": "hello" }],
    });
    Request::post("https://localhost/v1/chat/completions")
        .header("content-type", "application/json")
        .header("x-mock-tokens", "7")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request")
}

#[tokio::test]
async fn an_h2_client_gets_http2_and_streams_on_one_connection() {
    let certs = Certs::new("h2");
    let (addr, state) = start(&certs).await;
    let tls = connect(addr, &certs.ca_pem, &["h2", "http/1.1"])
        .await
        .expect("TLS connection");
    assert_eq!(tls.ssl().selected_alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);

    for _ in 0..2 {
        let r = send
            .send_request(chat_request(true))
            .await
            .expect("streamed chat");
        assert_eq!(r.version(), Version::HTTP_2);
        assert_eq!(version_header(&r), "HTTP/2");
        let body = r.into_body().collect().await.expect("stream").to_bytes();
        let text = String::from_utf8(body.to_vec()).expect("utf-8");
        assert!(text.contains("\"usage\":"), "{text}");
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    }
    let r = send
        .send_request(
            Request::get("https://localhost/lookup")
                .body(Full::new(Bytes::new()))
                .expect("request"),
        )
        .await
        .expect("lookup");
    assert_eq!(version_header(&r), "HTTP/2");

    let counts: RequestCounts = state.request_counts();
    assert_eq!(counts.by_version.get("HTTP/2"), Some(&3));
    assert_eq!(counts.connections, 1, "three requests, one connection");
}

#[tokio::test]
async fn an_http1_client_gets_http1_over_tls() {
    let certs = Certs::new("h1");
    let (addr, state) = start(&certs).await;
    let tls = connect(addr, &certs.ca_pem, &["http/1.1"])
        .await
        .expect("TLS connection");
    assert_eq!(tls.ssl().selected_alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("h1 handshake");
    tokio::spawn(conn);
    let r = send
        .send_request(
            Request::get("/lookup")
                .header("host", "localhost")
                .body(Empty::<Bytes>::new())
                .expect("request"),
        )
        .await
        .expect("lookup");
    assert_eq!(r.version(), Version::HTTP_11);
    assert_eq!(version_header(&r), "HTTP/1.1");
    assert_eq!(state.request_counts().by_version.get("HTTP/1.1"), Some(&1));
}

#[tokio::test]
async fn the_binary_serves_tls_and_refuses_a_bad_certificate() {
    let certs = Certs::new("bin");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_mock-upstream"))
        .args(["--listen", "127.0.0.1:0", "--tls-cert"])
        .arg(certs.cert())
        .arg("--tls-key")
        .arg(certs.key())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn mock-upstream");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .await
        .expect("address line");
    let addr: SocketAddr = line
        .trim()
        .strip_prefix("listening on ")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    let tls = connect(addr, &certs.ca_pem, &["h2"]).await.expect("TLS");
    assert_eq!(tls.ssl().selected_alpn_protocol(), Some(&b"h2"[..]));
    child.kill().await.expect("kill");

    std::fs::write(certs.cert(), "garbage").expect("overwrite cert");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_mock-upstream"))
        .args(["--listen", "127.0.0.1:0", "--tls-cert"])
        .arg(certs.cert())
        .arg("--tls-key")
        .arg(certs.key())
        .output()
        .await
        .expect("run mock-upstream");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cert.pem"), "names the file: {stderr}");
}
