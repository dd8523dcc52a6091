//! A small HTTP/1.1 load generator on raw TCP, cheap enough to share a core with the canned
//! upstream: a fixed request sent again and again on each kept-alive connection, one at a time.
//!
//! A response counts only when it is complete, well framed and exactly the expected body:
//! `Content-Length` or chunked encoding (decoded here). A response framed by closing the
//! connection (no length, not chunked) is an error, even when its body is right: a client
//! that trusts keep-alive cannot tell where such a response ends. A well-framed response that
//! says `Connection: close` counts, and the next request opens a new connection (counted).

use bytes::Bytes;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One kind of request and the only answer accepted for it.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// The whole request, head and body.
    pub request: Bytes,
    /// The body every response must carry (after chunked decoding), with status 200.
    pub expect: Bytes,
}

/// What a run measured: only responses completed inside the measured window count.
#[derive(Default)]
pub struct Outcome {
    /// Request sent → response complete, for each good response.
    pub latencies: Vec<Duration>,
    /// Request sent → first body byte received, for each good response.
    pub ttfb: Vec<Duration>,
    /// Failures by kind, over the whole run (warm-up included).
    pub errors: BTreeMap<&'static str, u64>,
    /// Connections opened after the first ones (the server closed, or an error did).
    pub reconnects: u64,
}

impl Outcome {
    fn error(&mut self, kind: &'static str) {
        *self.errors.entry(kind).or_default() += 1;
    }

    fn merge(&mut self, other: Outcome) {
        self.latencies.extend(other.latencies);
        self.ttfb.extend(other.ttfb);
        for (k, n) in other.errors {
            *self.errors.entry(k).or_default() += n;
        }
        self.reconnects += other.reconnects;
    }
}

/// Run `connections` connections against `target` until `end`; responses completed before
/// `start` are the warm-up and not measured. Call it on a current-thread runtime: the whole
/// generator stays on one core.
pub async fn run(target: &Target, connections: usize, start: Instant, end: Instant) -> Outcome {
    let tasks: Vec<_> = (0..connections)
        .map(|_| tokio::spawn(connection(target.clone(), start, end)))
        .collect();
    let mut all = Outcome::default();
    for t in tasks {
        all.merge(t.await.expect("load task"));
    }
    all.latencies.sort();
    all.ttfb.sort();
    all
}

const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

async fn connection(target: Target, start: Instant, end: Instant) -> Outcome {
    let mut out = Outcome::default();
    let mut conn: Option<TcpStream> = None;
    let mut opened = false;
    let mut buf = Vec::with_capacity(16 << 10);
    let mut body = Vec::with_capacity(16 << 10);
    while Instant::now() < end {
        let stream = match conn.as_mut() {
            Some(s) => s,
            None => match TcpStream::connect(target.addr).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    if opened {
                        out.reconnects += 1;
                    }
                    opened = true;
                    conn.insert(s)
                }
                Err(_) => {
                    out.error("connect failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let sent = Instant::now();
        let result = tokio::time::timeout(
            REQUEST_TIMEOUT,
            exchange(stream, &target, &mut buf, &mut body, sent),
        )
        .await
        .unwrap_or(Err("timeout"));
        let done = Instant::now();
        match result {
            Ok(r) => {
                if r.status != 200 {
                    out.error("status not 200");
                } else if body[..] != target.expect[..] {
                    out.error("unexpected body");
                } else if done >= start && done <= end {
                    out.latencies.push(done - sent);
                    if let Some(t) = r.ttfb {
                        out.ttfb.push(t);
                    }
                }
                if r.close {
                    conn = None;
                }
            }
            Err(kind) => {
                out.error(kind);
                conn = None;
            }
        }
    }
    out
}

struct Response {
    status: u16,
    close: bool,
    ttfb: Option<Duration>,
}

#[derive(Clone, Copy, PartialEq)]
enum Framing {
    Length(usize),
    Chunked,
    /// Neither: the body ends when the connection does.
    Close,
}

struct Head {
    len: usize,
    status: u16,
    framing: Framing,
    close: bool,
}

/// Send the request and read one response; its decoded body is left in `body`.
async fn exchange(
    s: &mut TcpStream,
    target: &Target,
    buf: &mut Vec<u8>,
    body: &mut Vec<u8>,
    sent: Instant,
) -> Result<Response, &'static str> {
    buf.clear();
    body.clear();
    s.write_all(&target.request)
        .await
        .map_err(|_| "write failed")?;
    let mut head: Option<Head> = None;
    let mut ttfb = None;
    loop {
        if head.is_none()
            && let Some(end) = find(buf, b"\r\n\r\n")
        {
            head = Some(parse_head(&buf[..end + 4])?);
        }
        if let Some(h) = &head {
            if ttfb.is_none() && buf.len() > h.len {
                ttfb = Some(sent.elapsed());
            }
            let rest = &buf[h.len..];
            let complete = match h.framing {
                Framing::Length(n) if rest.len() >= n => {
                    body.extend_from_slice(&rest[..n]);
                    Some(n)
                }
                Framing::Chunked => dechunk(rest, body)?,
                _ => None,
            };
            if let Some(used) = complete {
                if used != rest.len() {
                    return Err("bytes after the response");
                }
                return Ok(Response {
                    status: h.status,
                    close: h.close,
                    ttfb,
                });
            }
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(16 << 10);
        }
        let n = s.read_buf(buf).await.map_err(|_| "read failed")?;
        if n == 0 {
            return Err(match head {
                Some(h) if h.framing == Framing::Close => "framed by connection close",
                Some(_) => "connection closed mid-body",
                None => "connection closed before a response",
            });
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn parse_head(raw: &[u8]) -> Result<Head, &'static str> {
    let text = std::str::from_utf8(raw).map_err(|_| "malformed response head")?;
    let mut lines = text.split("\r\n");
    let mut status_line = lines.next().unwrap_or("").splitn(3, ' ');
    let version = status_line.next().unwrap_or("");
    let status: u16 = status_line
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or("malformed status line")?;
    let (mut length, mut chunked) = (None, false);
    // HTTP/1.0 closes unless it says keep-alive.
    let mut close = version == "HTTP/1.0";
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':').ok_or("malformed header")?;
        let (name, value) = (name.trim(), value.trim().to_ascii_lowercase());
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse().map_err(|_| "malformed content-length")?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.split(',').any(|v| v.trim() == "chunked");
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                match token {
                    "close" => close = true,
                    "keep-alive" => close = false,
                    _ => {}
                }
            }
        }
    }
    let framing = match (chunked, length) {
        (true, _) => Framing::Chunked,
        (false, Some(n)) => Framing::Length(n),
        (false, None) if status == 204 || status == 304 || status < 200 => Framing::Length(0),
        (false, None) => Framing::Close,
    };
    Ok(Head {
        len: raw.len(),
        status,
        framing,
        close,
    })
}

/// Decode a chunked body at the start of `b` into `body`: how many bytes the complete message
/// used, or None while it is incomplete.
fn dechunk(b: &[u8], body: &mut Vec<u8>) -> Result<Option<usize>, &'static str> {
    body.clear();
    let mut i = 0;
    loop {
        let Some(eol) = find(&b[i..], b"\r\n") else {
            return Ok(None);
        };
        let size = b[i..i + eol].split(|c| *c == b';').next().unwrap_or(b"");
        let size = std::str::from_utf8(size)
            .ok()
            .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
            .ok_or("malformed chunk size")?;
        i += eol + 2;
        if size == 0 {
            // Trailers, then an empty line.
            loop {
                let Some(eol) = find(&b[i..], b"\r\n") else {
                    return Ok(None);
                };
                i += eol + 2;
                if eol == 0 {
                    return Ok(Some(i));
                }
            }
        }
        if b.len() < i + size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&b[i..i + size]);
        if &b[i + size..i + size + 2] != b"\r\n" {
            return Err("malformed chunk");
        }
        i += size + 2;
    }
}

/// The `q` quantile (0..=1) of sorted durations, in milliseconds; None when there are none.
pub fn quantile_ms(sorted: &[Duration], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 * q) as usize).min(sorted.len() - 1);
    Some(sorted[i].as_secs_f64() * 1000.0)
}

/// Check the response parser on known inputs (microseconds; run before every measurement, as
/// the bench has no test harness).
pub fn self_check() {
    let h = parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
    assert!(h.framing == Framing::Chunked && !h.close);
    let h = parse_head(b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\n\r\n").unwrap();
    assert!(h.framing == Framing::Close);
    let h =
        parse_head(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\n").unwrap();
    assert!(h.framing == Framing::Length(3) && h.close);
    let h = parse_head(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n").unwrap();
    assert!(h.close);
    let mut body = Vec::new();
    assert_eq!(
        dechunk(b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n", &mut body),
        Ok(None)
    );
    assert_eq!(
        dechunk(b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n", &mut body),
        Ok(Some(24))
    );
    assert_eq!(body, b"abcde");
    assert!(dechunk(b"3\r\nabcX\r\n", &mut body).is_err());
}
