//! Shared server state: per-request LLM records (what was planned, what was
//! actually written into the body), request counters by path, and the HTTP
//! handlers that expose them (`/stats`, `/_mock/...`).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

/// Records kept at most; the oldest are evicted first so a long load test
/// cannot grow the mock without bound.
const MAX_RECORDS: usize = 200_000;
/// Distinct paths counted individually; beyond that they share one bucket
/// (random path segments under load would otherwise grow the map forever).
const MAX_PATHS: usize = 10_000;
const OTHER_PATHS: &str = "<other>";

/// What happened to one LLM request (the latest attempt under its id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRecord {
    pub request_id: String,
    pub endpoint: String,
    /// `None` until the body was parsed (e.g. malformed JSON).
    pub model: Option<String>,
    pub stream: bool,
    /// HTTP status answered (200 for streams, even when later cut).
    pub status: u16,
    pub prompt_tokens: u64,
    pub completion_tokens_planned: u64,
    /// Output tokens yielded into the response body so far.
    pub tokens_sent: u64,
    /// SSE events yielded so far (every event, including `ping` and `[DONE]`); 0 for non-stream.
    pub chunks_sent: u64,
    /// The whole response (including final usage / `[DONE]`) was yielded.
    pub completed: bool,
    /// The body was aborted on purpose by the `cut_after` fault.
    pub cut: bool,
    /// The response was dropped before completion (the client went away).
    pub client_disconnected: bool,
    /// How many requests arrived with this id (retries reuse the id).
    pub attempts: u64,
    /// Token kinds reported in the usage besides input and output (0 when none). OpenAI:
    /// `cached_tokens` is part of `prompt_tokens`, `reasoning_tokens` comes on top of
    /// `tokens_sent` in the reported output. Anthropic: cache writes and reads are not part of
    /// `prompt_tokens` (its `input_tokens`).
    #[serde(default)]
    pub cached_tokens: u64,
    #[serde(default)]
    pub cache_write_tokens: u64,
    #[serde(default)]
    pub cache_read_tokens: u64,
    #[serde(default)]
    pub reasoning_tokens: u64,
}

/// Body of `GET /_mock/requests`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestCounts {
    pub total: u64,
    pub by_path: BTreeMap<String, u64>,
    /// Requests by HTTP version (`HTTP/1.1`, `HTTP/2`).
    #[serde(default)]
    pub by_version: BTreeMap<String, u64>,
    /// Client connections (distinct peer addresses) that carried these requests: how a test sees
    /// whether a proxy reuses its upstream connections. Stops growing past `MAX_PATHS` peers.
    #[serde(default)]
    pub connections: u64,
}

#[derive(Default)]
struct Inner {
    records: HashMap<String, RequestRecord>,
    /// Insertion order of `records` keys, for eviction and listing.
    order: VecDeque<String>,
    counts: RequestCounts,
    peers: HashSet<SocketAddr>,
}

/// All mutable state of one mock server. The mutex is std and is never held
/// across an `.await`.
#[derive(Default)]
pub struct MockState {
    next_id: AtomicU64,
    inner: Mutex<Inner>,
}

impl MockState {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere must not take the whole mock down with it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh request id for requests that did not bring one.
    pub fn next_request_id(&self) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        format!("mock-{n}")
    }

    /// Count a request to `path` in HTTP `version` from `peer` (`None`: not over a socket).
    pub fn count_request(&self, path: &str, version: &str, peer: Option<SocketAddr>) {
        let mut inner = self.lock();
        if let Some(peer) = peer
            && inner.peers.len() < MAX_PATHS
            && inner.peers.insert(peer)
        {
            inner.counts.connections += 1;
        }
        let counts = &mut inner.counts;
        counts.total += 1;
        *counts.by_version.entry(version.to_owned()).or_insert(0) += 1;
        if let Some(n) = counts.by_path.get_mut(path) {
            *n += 1;
        } else if counts.by_path.len() < MAX_PATHS {
            counts.by_path.insert(path.to_owned(), 1);
        } else {
            *counts.by_path.entry(OTHER_PATHS.to_owned()).or_insert(0) += 1;
        }
    }

    pub fn request_counts(&self) -> RequestCounts {
        self.lock().counts.clone()
    }

    pub fn record(&self, request_id: &str) -> Option<RequestRecord> {
        self.lock().records.get(request_id).cloned()
    }

    /// All records, oldest first.
    pub fn records(&self) -> Vec<RequestRecord> {
        let inner = self.lock();
        inner
            .order
            .iter()
            .filter_map(|id| inner.records.get(id).cloned())
            .collect()
    }

    /// Forget all records and counters (request ids keep counting up).
    pub fn reset(&self) {
        *self.lock() = Inner::default();
    }

    /// Start a new attempt under `request_id`; returns its attempt number.
    fn begin(&self, request_id: &str, endpoint: &str) -> u64 {
        let mut inner = self.lock();
        let attempts = match inner.records.get(request_id) {
            Some(previous) => previous.attempts + 1,
            None => {
                inner.order.push_back(request_id.to_owned());
                if inner.order.len() > MAX_RECORDS
                    && let Some(oldest) = inner.order.pop_front()
                {
                    inner.records.remove(&oldest);
                }
                1
            }
        };
        inner.records.insert(
            request_id.to_owned(),
            RequestRecord {
                request_id: request_id.to_owned(),
                endpoint: endpoint.to_owned(),
                model: None,
                stream: false,
                status: 200,
                prompt_tokens: 0,
                completion_tokens_planned: 0,
                tokens_sent: 0,
                chunks_sent: 0,
                completed: false,
                cut: false,
                client_disconnected: false,
                attempts,
                cached_tokens: 0,
                cache_write_tokens: 0,
                cache_read_tokens: 0,
                reasoning_tokens: 0,
            },
        );
        attempts
    }
}

/// Owns the record of one attempt while its response is produced. If it is
/// dropped before `finish`/`cut` (handler future or body stream dropped
/// because the client went away), the record says `client_disconnected`.
pub(crate) struct StatsGuard {
    state: Arc<MockState>,
    request_id: String,
    attempt: u64,
    done: bool,
}

impl StatsGuard {
    pub(crate) fn begin(state: &Arc<MockState>, request_id: &str, endpoint: &str) -> Self {
        let attempt = state.begin(request_id, endpoint);
        Self {
            state: Arc::clone(state),
            request_id: request_id.to_owned(),
            attempt,
            done: false,
        }
    }

    /// Apply `f` to this attempt's record, unless a newer attempt (retry with
    /// the same id) or a reset replaced it.
    fn update(&self, f: impl FnOnce(&mut RequestRecord)) {
        let mut inner = self.state.lock();
        if let Some(record) = inner.records.get_mut(&self.request_id)
            && record.attempts == self.attempt
        {
            f(record);
        }
    }

    pub(crate) fn plan(&self, model: &str, stream: bool, prompt_tokens: u64, planned: u64) {
        self.update(|r| {
            r.model = Some(model.to_owned());
            r.stream = stream;
            r.prompt_tokens = prompt_tokens;
            r.completion_tokens_planned = planned;
        });
    }

    /// The token kinds the usage reports besides input and output.
    pub(crate) fn kinds(&self, cached: u64, cache_write: u64, cache_read: u64, reasoning: u64) {
        self.update(|r| {
            r.cached_tokens = cached;
            r.cache_write_tokens = cache_write;
            r.cache_read_tokens = cache_read;
            r.reasoning_tokens = reasoning;
        });
    }

    pub(crate) fn sent(&self, chunks: u64, tokens: u64) {
        self.update(|r| {
            r.chunks_sent += chunks;
            r.tokens_sent += tokens;
        });
    }

    /// The response was fully produced (`completed`) or answered with an error.
    pub(crate) fn finish(&mut self, status: u16, completed: bool) {
        self.done = true;
        self.update(|r| {
            r.status = status;
            r.completed = completed;
        });
    }

    /// The body was aborted by the `cut_after` fault.
    pub(crate) fn cut(&mut self) {
        self.done = true;
        self.update(|r| r.cut = true);
    }
}

impl Drop for StatsGuard {
    fn drop(&mut self) {
        if !self.done {
            self.update(|r| r.client_disconnected = true);
        }
    }
}

#[derive(Serialize)]
struct NotFound {
    error: &'static str,
}

/// `GET /stats/{request_id}`
pub(crate) async fn get_record(
    State(state): State<Arc<MockState>>,
    Path(request_id): Path<String>,
) -> Response {
    match state.record(&request_id) {
        Some(record) => Json(record).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(NotFound {
                error: "unknown request id",
            }),
        )
            .into_response(),
    }
}

/// `GET /stats`: every record, oldest first.
pub(crate) async fn list_records(State(state): State<Arc<MockState>>) -> Json<Vec<RequestRecord>> {
    Json(state.records())
}

/// `GET /_mock/requests`
pub(crate) async fn request_counts(State(state): State<Arc<MockState>>) -> Json<RequestCounts> {
    Json(state.request_counts())
}

#[derive(Serialize)]
struct ResetDone {
    ok: bool,
}

/// `POST /_mock/reset`
pub(crate) async fn reset(State(state): State<Arc<MockState>>) -> Response {
    state.reset();
    Json(ResetDone { ok: true }).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_keeps_latest_attempt_and_old_guard_cannot_touch_it() {
        let state = Arc::new(MockState::new());
        let first = StatsGuard::begin(&state, "r1", "/v1/messages");
        first.sent(1, 1);
        let mut second = StatsGuard::begin(&state, "r1", "/v1/messages");
        // The stale first attempt goes away late: it must not mark the retry.
        drop(first);
        second.sent(3, 2);
        second.finish(200, true);
        let record = state.record("r1").expect("record");
        assert_eq!(record.attempts, 2);
        assert_eq!(record.tokens_sent, 2);
        assert_eq!(record.chunks_sent, 3);
        assert!(record.completed);
        assert!(!record.client_disconnected);
    }

    #[test]
    fn dropped_guard_marks_disconnect() {
        let state = Arc::new(MockState::new());
        drop(StatsGuard::begin(&state, "r2", "/v1/chat/completions"));
        let record = state.record("r2").expect("record");
        assert!(record.client_disconnected);
        assert!(!record.completed);
    }

    #[test]
    fn paths_are_counted() {
        let state = MockState::new();
        let a: SocketAddr = "127.0.0.1:1000".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:1001".parse().unwrap();
        state.count_request("/lookup", "HTTP/2", Some(a));
        state.count_request("/lookup", "HTTP/2", Some(a));
        state.count_request("/exports/a", "HTTP/1.1", Some(b));
        state.count_request("/exports/a", "HTTP/1.1", None);
        let counts = state.request_counts();
        assert_eq!(counts.total, 4);
        assert_eq!(counts.by_path.get("/lookup"), Some(&2));
        assert_eq!(counts.by_path.get("/exports/a"), Some(&2));
        assert_eq!(counts.by_version.get("HTTP/2"), Some(&2));
        assert_eq!(counts.by_version.get("HTTP/1.1"), Some(&2));
        assert_eq!(counts.connections, 2);
        state.reset();
        assert_eq!(state.request_counts().total, 0);
    }
}
