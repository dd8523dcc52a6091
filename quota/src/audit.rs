//! Audit events: every decision and settlement (and, from the control plane, every policy and
//! entitlement change) as a self-describing record, and the sink interface they are emitted
//! through. Shared by producers (gateway, control plane) and the accounting consumer.
//!
//! Emitting never waits: `AuditSink::emit` hands the event over and returns; a sink that cannot
//! keep up counts what it had to drop. The JSONL file sink is the embedded default.

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::mpsc;

/// Bumped when a field changes meaning or disappears; new optional fields keep the version.
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// UUIDv7: unique and ordered by creation time.
    pub event_id: String,
    pub schema_version: u32,
    /// RFC 3339, milliseconds, UTC.
    pub occurred_at: String,
    /// The gateway (or control plane) that emitted it.
    pub source: String,
    pub subject: Option<String>,
    /// The subject's tenant; the subject itself until tenants exist.
    pub tenant: Option<String>,
    pub request_id: Option<String>,
    /// The subject's local calendar day (`2026-11-22`) whose daily counters the event changed:
    /// for a settlement, the day of its reservation. Lets the ledger be compared with counters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub day: Option<String>,
    #[serde(flatten)]
    pub body: EventBody,
}

/// One quota's amounts in a settlement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settlement {
    pub quota: String,
    pub reserved: u64,
    pub actual: u64,
    /// `reserved - actual` when positive (negative differences are extra charges: `actual` says it).
    pub refunded: u64,
}

/// The tokens an LLM call used, per kind (see `llm::Usage`): the kinds are disjoint, `output`
/// includes `reasoning`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TokenUsage {
    pub input: u64,
    pub cached_input: u64,
    pub cache_write: u64,
    pub cache_read: u64,
    pub output: u64,
    pub reasoning: u64,
}

impl From<crate::llm::Usage> for TokenUsage {
    fn from(u: crate::llm::Usage) -> Self {
        TokenUsage {
            input: u.prompt,
            cached_input: u.cached_input,
            cache_write: u.cache_write,
            cache_read: u.cache_read,
            output: u.completion,
            reasoning: u.reasoning,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum EventBody {
    QuotaConsumed {
        quota: String,
        amount: u64,
    },
    QuotaRejected {
        quota: String,
        amount: u64,
        reason: String,
    },
    ReservationSettled {
        attempt_id: String,
        settlements: Vec<Settlement>,
        /// The tokens per kind the amounts were computed from (absent in events written before
        /// it was added).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        usage: Option<TokenUsage>,
    },
    PolicyChanged {
        actor: String,
        before_version: Option<String>,
        after_version: String,
    },
    EntitlementChanged {
        actor: String,
        before_tier: Option<String>,
        after_tier: String,
    },
    /// An API key or admin token issued, revoked or rotated (never the secret itself).
    CredentialChanged {
        actor: String,
        /// `api_key` or `token`.
        credential: String,
        id: String,
        /// `issued`, `revoked` or `rotated`.
        action: String,
    },
}

impl AuditEvent {
    pub fn new(
        source: &str,
        subject: Option<&str>,
        request_id: Option<&str>,
        now_ns: i64,
        body: EventBody,
    ) -> Self {
        let at = chrono::DateTime::<chrono::Utc>::from_timestamp_nanos(now_ns);
        Self {
            event_id: crate::ids::uuid_v7().to_string(),
            schema_version: SCHEMA_VERSION,
            occurred_at: at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            source: source.to_string(),
            subject: subject.map(str::to_string),
            tenant: subject.map(str::to_string),
            request_id: request_id.map(str::to_string),
            day: None,
            body,
        }
    }

    /// Set the local day of `tz` at `at_ns` (see `day`).
    pub fn with_day(mut self, tz: chrono_tz::Tz, at_ns: i64) -> Self {
        let at = chrono::DateTime::<chrono::Utc>::from_timestamp_nanos(at_ns).with_timezone(&tz);
        self.day = Some(at.format("%Y-%m-%d").to_string());
        self
    }
}

/// Where audit events go. `emit` must not block the request path.
pub trait AuditSink: Send + Sync {
    fn emit(&self, event: AuditEvent);
    /// Whether events are kept at all: when not, callers skip building them (ids, timestamps).
    fn enabled(&self) -> bool {
        true
    }
    /// Events accepted and events dropped because the sink could not keep up.
    fn counts(&self) -> SinkCounts;
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SinkCounts {
    pub emitted: u64,
    pub dropped: u64,
}

/// A shared sink: one handle emits, another (kept by its owner) flushes it at shutdown.
impl<S: AuditSink + ?Sized> AuditSink for Arc<S> {
    fn emit(&self, event: AuditEvent) {
        (**self).emit(event);
    }

    fn enabled(&self) -> bool {
        (**self).enabled()
    }

    fn counts(&self) -> SinkCounts {
        (**self).counts()
    }
}

/// A sink that discards everything (auditing off).
pub struct NoSink;

impl AuditSink for NoSink {
    fn emit(&self, _: AuditEvent) {}
    fn enabled(&self) -> bool {
        false
    }
    fn counts(&self) -> SinkCounts {
        SinkCounts::default()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("audit log {path}: {source}")]
pub struct SinkError {
    path: PathBuf,
    source: std::io::Error,
}

/// Appends one JSON object per line to a file, from a background task: the request path only
/// queues. Lines are flushed to the OS after every batch; `fsync` runs at most every
/// `FSYNC_EVERY` and on shutdown — a crash of the machine (not of the process) can lose the
/// last interval, which the Kafka path with its spool does not.
pub struct JsonlSink {
    tx: mpsc::Sender<AuditEvent>,
    emitted: AtomicU64,
    dropped: Arc<AtomicU64>,
}

const QUEUE: usize = 65_536;
const FSYNC_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

impl JsonlSink {
    /// Open (create or append) `path` and start the writer on the current Tokio runtime.
    pub fn open(path: &Path) -> Result<Self, SinkError> {
        let err = |source| SinkError {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(err)?;
        let (tx, mut rx) = mpsc::channel::<AuditEvent>(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let path = path.to_path_buf();
        tokio::task::spawn_blocking(move || {
            let mut out = std::io::BufWriter::new(file);
            let mut last_sync = std::time::Instant::now();
            while let Some(first) = rx.blocking_recv() {
                let mut batch = vec![first];
                while let Ok(e) = rx.try_recv() {
                    batch.push(e);
                }
                for e in &batch {
                    if serde_json::to_writer(&mut out, e).is_err() || out.write_all(b"\n").is_err()
                    {
                        tracing::error!(path = %path.display(), "audit log write failed");
                    }
                }
                if let Err(e) = out.flush() {
                    tracing::error!(path = %path.display(), error = %e, "audit log flush failed");
                }
                if last_sync.elapsed() >= FSYNC_EVERY {
                    let _ = out.get_ref().sync_data();
                    last_sync = std::time::Instant::now();
                }
            }
            let _ = out.flush();
            let _ = out.get_ref().sync_all();
        });
        Ok(Self {
            tx,
            emitted: AtomicU64::new(0),
            dropped,
        })
    }
}

impl AuditSink for JsonlSink {
    fn emit(&self, event: AuditEvent) {
        match self.tx.try_send(event) {
            Ok(()) => {
                self.emitted.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn counts(&self) -> SinkCounts {
        SinkCounts {
            emitted: self.emitted.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_serialize_flat_with_a_type_tag_and_read_back() {
        let e = AuditEvent::new(
            "gw-1",
            Some("alice"),
            Some("r1"),
            1_795_000_000_123_000_000,
            EventBody::QuotaConsumed {
                quota: "lookup".into(),
                amount: 3,
            },
        );
        let line = serde_json::to_string(&e).unwrap();
        assert!(line.contains("\"type\":\"QuotaConsumed\""), "{line}");
        assert!(line.contains("\"occurred_at\":\"2026-11-18T"), "{line}");
        assert_eq!(serde_json::from_str::<AuditEvent>(&line).unwrap(), e);
    }

    #[tokio::test]
    async fn jsonl_sink_appends_one_line_per_event_in_order() {
        let path =
            std::env::temp_dir().join(format!("tollgate-audit-{}.jsonl", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let sink = JsonlSink::open(&path).unwrap();
        let ids: Vec<String> = (0..100)
            .map(|i| {
                let e = AuditEvent::new(
                    "gw",
                    Some("s"),
                    None,
                    0,
                    EventBody::QuotaConsumed {
                        quota: "q".into(),
                        amount: i,
                    },
                );
                let id = e.event_id.clone();
                sink.emit(e);
                id
            })
            .collect();
        drop(sink);
        let mut lines = Vec::new();
        for _ in 0..200 {
            lines = std::fs::read_to_string(&path)
                .unwrap_or_default()
                .lines()
                .map(str::to_string)
                .collect();
            if lines.len() == 100 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let read: Vec<String> = lines
            .iter()
            .map(|l| serde_json::from_str::<AuditEvent>(l).unwrap().event_id)
            .collect();
        assert_eq!(read, ids);
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(sorted, ids, "UUIDv7 ids sort in creation order");
        std::fs::remove_file(&path).unwrap();
    }
}
