//! The control plane's shared state: the store, the write lock that orders revisions, the latest
//! published snapshot that watch streams send, and the audit sink admin changes go to.

use crate::error::ApiError;
use crate::store::{Store, StoreError};
use bytes::Bytes;
use quota::audit::{AuditEvent, AuditSink, EventBody};
use quota::policy::Snapshot;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Mutex, watch};

/// A snapshot as sent to gateways, serialized once for all of them.
#[derive(Debug, Clone)]
pub struct Published {
    pub revision: u64,
    pub json: Bytes,
}

pub struct AppState {
    pub store: Store,
    /// Held across validate + write + publish, so revisions are handed out in order.
    pub write_lock: Mutex<()>,
    pub published: watch::Sender<Arc<Published>>,
    pub audit: Box<dyn AuditSink>,
    /// Names the control plane in audit events.
    pub source: String,
    /// How often an idle watch stream carries a heartbeat.
    pub heartbeat: Duration,
    /// Set when the process stops: watch streams end so the server can drain.
    pub closing: watch::Sender<bool>,
}

impl AppState {
    pub async fn new(
        store: Store,
        audit: Box<dyn AuditSink>,
        heartbeat: Duration,
    ) -> Result<Arc<Self>, StoreError> {
        let first = publishable(&store.snapshot().await?);
        let (published, _) = watch::channel(Arc::new(first));
        Ok(Arc::new(Self {
            store,
            write_lock: Mutex::new(()),
            published,
            audit,
            source: "control-plane".into(),
            heartbeat,
            closing: watch::channel(false).0,
        }))
    }

    /// After a committed write: publish it. A failure is logged, not returned — the write stands,
    /// and the next publish (any write, or a restart) carries it to the gateways.
    pub async fn publish_committed(&self) {
        if let Err(e) = self.publish().await {
            tracing::error!(error = %e, "a committed change could not be published yet");
        }
    }

    /// Read the committed state and hand it to every watch stream.
    pub async fn publish(&self) -> Result<u64, StoreError> {
        let snap = self.store.snapshot().await?;
        let p = publishable(&snap);
        let revision = p.revision;
        self.published.send_if_modified(|cur| {
            if p.revision > cur.revision {
                *cur = Arc::new(p);
                true
            } else {
                false
            }
        });
        Ok(revision)
    }

    pub fn audit(&self, subject: Option<&str>, body: EventBody) {
        let now = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0);
        self.audit
            .emit(AuditEvent::new(&self.source, subject, None, now, body));
    }
}

fn publishable(s: &Snapshot) -> Published {
    Published {
        revision: s.revision,
        json: Bytes::from(serde_json::to_vec(s).unwrap_or_default()),
    }
}

/// Compile `snap` exactly as a gateway will; refuse it with every error when it does not compile.
/// Subjects without keys are checked too (under a stand-in key): a gateway skips them, but they
/// must still be valid the moment a key is issued.
pub async fn validate(mut snap: Snapshot) -> Result<quota::policy::Policy, ApiError> {
    for s in snap.subjects.iter_mut().filter(|s| s.key_sha256.is_empty()) {
        s.key_sha256.push(crate::auth::sha256_hex(
            format!("stand-in key of {}", s.id).as_bytes(),
        ));
    }
    tokio::task::spawn_blocking(move || snap.compile(&[]))
        .await
        .map_err(|e| ApiError::Internal(format!("validation task: {e}")))?
        .map_err(|errors| ApiError::Invalid {
            detail: format!("refused: {} error(s); nothing was changed", errors.0.len()),
            errors: errors.0.iter().map(ToString::to_string).collect(),
        })
}
