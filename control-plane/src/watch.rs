//! The push channel to gateways: `GET /v1/watch?since=REVISION` is a server-sent-event stream that
//! sends the full snapshot when the caller is behind (always on a first connect), then every new
//! revision as it is committed, and a heartbeat carrying the current revision when idle. Snapshots
//! are whole, so a gateway that missed revisions only needs the latest one.

use crate::auth::Viewer;
use crate::error::ApiError;
use crate::state::AppState;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use std::sync::Arc;
use utoipa::IntoParams;

#[derive(Debug, Deserialize, IntoParams)]
pub struct WatchQuery {
    /// The revision the caller already has; omit (or 0) to get the full snapshot.
    pub since: Option<u64>,
}

/// A snapshot event. `published_ms` (a field SSE clients ignore unless they know it) lets a
/// gateway measure how long the revision took to reach it.
pub(crate) fn frame(revision: u64, published_ms: u64, json: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(json.len() + 80);
    out.extend_from_slice(
        format!("event: snapshot\nid: {revision}\npublished_ms: {published_ms}\ndata: ").as_bytes(),
    );
    out.extend_from_slice(json);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// Watch streams one token may hold open (a fleet's gateways often share one token).
const MAX_STREAMS_PER_TOKEN: usize = 1_000;
/// Watch streams this instance holds open in all.
const MAX_STREAMS: usize = 10_000;

/// Carries the interval, so a gateway knows how long a silence means the stream is dead.
fn heartbeat(revision: u64, every: std::time::Duration) -> Bytes {
    Bytes::from(format!(
        "event: heartbeat\ndata: {{\"revision\":{revision},\"every_ms\":{}}}\n\n",
        every.as_millis()
    ))
}

/// Stream snapshots to a gateway.
#[utoipa::path(get, path = "/v1/watch", tag = "gateways", params(WatchQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "text/event-stream: `snapshot` events (data: the snapshot JSON) and `heartbeat` events (data: {\"revision\": N})", content_type = "text/event-stream"),
        (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody)))]
pub async fn watch(
    State(state): State<Arc<AppState>>,
    Viewer(actor): Viewer,
    headers: HeaderMap,
    Query(q): Query<WatchQuery>,
) -> Result<Response, ApiError> {
    // Checked again every heartbeat interval, whatever is sent: a revoked token stops receiving.
    let token = crate::auth::bearer(&headers)
        .unwrap_or_default()
        .to_string();
    let mut closing = state.closing.subscribe();
    let mut rx = state.published.subscribe();
    let every = state.heartbeat;
    // A caller cannot claim a revision that was never published (the gateways page would show
    // it as current).
    let mut sent = q.since.unwrap_or(0).min(rx.borrow().revision);
    let (tx, body_rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::convert::Infallible>>(4);
    tracing::info!(actor = %actor.name, since = sent, "gateway watching");
    let agent = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .chars()
        .take(120)
        .collect::<String>();
    let Some(id) = state.gateways.try_open(
        &actor.name,
        &agent,
        sent,
        MAX_STREAMS_PER_TOKEN,
        MAX_STREAMS,
    ) else {
        return Err(ApiError::TooMany(format!(
            "too many watch streams open (at most {MAX_STREAMS_PER_TOKEN} per token, \
             {MAX_STREAMS} in all)"
        )));
    };
    tokio::spawn(async move {
        let _registered = crate::gateways::Registered {
            registry: &state.gateways,
            id,
        };
        let mut tick = tokio::time::interval(every);
        let mut verified = tokio::time::Instant::now();
        loop {
            // Half the interval: ticks that run a little early still check once per interval.
            if verified.elapsed() >= every / 2 {
                if crate::auth::verify(&state, &token).await.is_err() {
                    tracing::info!("watch stream closed: its token is no longer valid");
                    return;
                }
                verified = tokio::time::Instant::now();
            }
            let current = rx.borrow_and_update().clone();
            let snapshot = current.revision > sent;
            let out = if snapshot {
                sent = current.revision;
                current.frame.clone()
            } else {
                heartbeat(current.revision, every)
            };
            if tx.send(Ok(out)).await.is_err() {
                return; // the gateway left
            }
            state.gateways.seen(id, snapshot.then_some(sent));
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return },
                _ = tick.tick() => {}
                _ = tx.closed() => return,
                _ = closing.changed() => return,
            }
        }
    });
    let stream = futures_util::stream::unfold(body_rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}
