//! The SSE body driver shared by all LLM flavours: yields one frame per event,
//! sleeps the per-event delay, cuts the body on request and keeps the stats
//! record up to date as frames are yielded.

use std::io;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use bytes::Bytes;
use serde::Serialize;

use crate::stats::StatsGuard;
use crate::tokens;

/// The events of one response: fixed events before and after, and one
/// content event per output token, rendered lazily so a long answer does not
/// sit in memory.
pub(crate) struct Script<F> {
    pub pre: Vec<Bytes>,
    pub tokens: u64,
    pub render: F,
    pub post: Vec<Bytes>,
}

/// `data: <json>\n\n`
pub(crate) fn data(value: &impl Serialize) -> Bytes {
    Bytes::from(format!("data: {}\n\n", to_json(value)))
}

/// `event: <name>\ndata: <json>\n\n`
pub(crate) fn event(name: &str, value: &impl Serialize) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {}\n\n", to_json(value)))
}

pub(crate) fn to_json(value: &impl Serialize) -> String {
    // Our own plain structs always serialize; still, never panic.
    serde_json::to_string(value).unwrap_or_else(|e| {
        tracing::error!("serializing a response failed: {e}");
        "{}".to_owned()
    })
}

struct Cursor<F> {
    script: Script<F>,
    pos: u64,
    total: u64,
    /// Position at which the body is aborted instead of yielding an event.
    cut_at: Option<u64>,
    delay: Option<Duration>,
    guard: StatsGuard,
    finished: bool,
}

impl<F: Fn(&str) -> Bytes> Script<F> {
    /// The event at `pos`, and whether it carries an output token.
    fn frame(&self, pos: u64) -> Option<(Bytes, bool)> {
        let pre = self.pre.len() as u64;
        if pos < pre {
            return self.pre.get(pos as usize).map(|b| (b.clone(), false));
        }
        let i = pos - pre;
        if i < self.tokens {
            return Some(((self.render)(tokens::token(i)), true));
        }
        let j = usize::try_from(i - self.tokens).ok()?;
        self.post.get(j).map(|b| (b.clone(), false))
    }
}

/// A body that plays `script`. With `cut_after = Some(n)`, the body is
/// aborted (an `Err` frame: the connection is cut, no terminating chunk) once
/// `min(n, tokens)` content events were sent, so a set cut always happens.
pub(crate) fn body<F>(
    script: Script<F>,
    delay: Option<Duration>,
    cut_after: Option<u64>,
    guard: StatsGuard,
) -> Body
where
    F: Fn(&str) -> Bytes + Send + 'static,
{
    let pre = script.pre.len() as u64;
    let total = pre + script.tokens + script.post.len() as u64;
    let cut_at = cut_after.map(|n| pre + n.min(script.tokens));
    let cursor = Cursor {
        script,
        pos: 0,
        total,
        cut_at,
        delay,
        guard,
        finished: false,
    };
    let stream = futures_util::stream::unfold(cursor, |mut c| async move {
        if c.finished {
            return None;
        }
        if c.cut_at == Some(c.pos) {
            // hyper drops its write buffer unflushed when a body errors, so
            // without this the client would not even see the head and the
            // frames "sent" before the cut. Pending once makes it flush.
            tokio::task::yield_now().await;
            c.finished = true;
            c.guard.cut();
            let err = io::Error::new(io::ErrorKind::ConnectionAborted, "mock fault: cut_after");
            return Some((Err(err), c));
        }
        let Some((frame, is_token)) = c.script.frame(c.pos) else {
            // Only reachable for an empty script; nothing left to send.
            c.finished = true;
            c.guard.finish(200, true);
            return None;
        };
        if let Some(delay) = c.delay {
            tokio::time::sleep(delay).await;
        }
        c.pos += 1;
        c.guard.sent(1, u64::from(is_token));
        if c.pos == c.total {
            // Mark completion with the last frame: the client may hang up
            // right after it, before the stream is polled for its end.
            c.finished = true;
            c.guard.finish(200, true);
        }
        Some((Ok::<Bytes, io::Error>(frame), c))
    });
    Body::from_stream(stream)
}

/// `script` rendered into one body: a sized response (`Content-Length`), every event at once.
pub(crate) fn whole<F>(script: Script<F>, mut guard: StatsGuard) -> Body
where
    F: Fn(&str) -> Bytes,
{
    let mut out = Vec::new();
    let (mut events, mut tokens) = (0, 0);
    while let Some((frame, is_token)) = script.frame(events) {
        out.extend_from_slice(&frame);
        events += 1;
        tokens += u64::from(is_token);
    }
    guard.sent(events, tokens);
    guard.finish(200, true);
    Body::from(out)
}

/// A 200 `text/event-stream` response around `body`.
pub(crate) fn response(body: Body) -> Response {
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}
