//! The control plane's shared state: the store, the write lock that orders this process's writes,
//! the latest published snapshot that watch streams send, and the audit sink admin changes go to.
//! On PostgreSQL it also follows the other instances' commits (`LISTEN`, with a catch-up read
//! whenever the listening connection is new), so a gateway following any instance gets every
//! revision.

use crate::error::ApiError;
use crate::store::{Store, StoreError};
use bytes::Bytes;
use quota::audit::{AuditEvent, AuditSink, EventBody};
use quota::policy::Snapshot;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::{Mutex, watch};

/// A snapshot as sent to gateways, serialized once for all of them.
#[derive(Debug, Clone)]
pub struct Published {
    pub revision: u64,
    /// The whole `snapshot` event, built once: every watch stream sends this same buffer.
    pub frame: Bytes,
    /// When this process published it (Unix milliseconds): gateways measure propagation from it.
    pub published_ms: u64,
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
    /// The gateways following this instance (its open watch streams).
    pub gateways: crate::gateways::Registry,
    /// A committed change is not published yet (the store failed when it was read back).
    unpublished: AtomicBool,
}

/// How often a change that could not be published is tried again.
const REPUBLISH_EVERY: Duration = Duration::from_millis(500);
/// On a shared database, every this many ticks the latest revision is read even without news.
const CATCH_UP_EVERY_TICKS: u64 = 4;

/// Publish every revision any instance commits: `LISTEN` on the revision channel; after each
/// (re)connect read the latest state, since notifications sent meanwhile are lost.
async fn follow_database(state: std::sync::Weak<AppState>, url: String) {
    use sqlx::postgres::PgListener;
    loop {
        let listener = match PgListener::connect(&url).await {
            Ok(mut l) => match l.listen(crate::store::REVISION_CHANNEL).await {
                Ok(()) => Some(l),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for other instances' revisions");
                    None
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot connect to listen for other instances' revisions");
                None
            }
        };
        if let Some(mut listener) = listener {
            loop {
                // Catch up first: on a new connection, and after each notification (one read
                // serves every notification that arrived meanwhile).
                let Some(st) = state.upgrade() else { return };
                st.publish_committed().await;
                drop(st);
                match listener.try_recv().await {
                    Ok(Some(_)) => while listener.next_buffered().is_some() {},
                    // The connection was lost; `try_recv` reconnects, then we catch up.
                    Ok(None) => tracing::warn!("revision listener reconnecting"),
                    Err(e) => {
                        tracing::warn!(error = %e, "revision listener failed; reconnecting");
                        break;
                    }
                }
            }
        }
        if state.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

impl AppState {
    pub async fn new(
        store: Store,
        audit: Box<dyn AuditSink>,
        heartbeat: Duration,
    ) -> Result<Arc<Self>, StoreError> {
        let first = publishable(&store.snapshot().await?);
        let (published, _) = watch::channel(Arc::new(first));
        let state = Arc::new(Self {
            store,
            write_lock: Mutex::new(()),
            published,
            audit,
            source: "control-plane".into(),
            heartbeat,
            closing: watch::channel(false).0,
            gateways: crate::gateways::Registry::default(),
            unpublished: AtomicBool::new(false),
        });
        // Retries a failed publish; ends with the state (it holds only a weak reference).
        let weak = Arc::downgrade(&state);
        let shared = state.store.postgres_url().is_some();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(REPUBLISH_EVERY);
            let mut ticks: u64 = 0;
            loop {
                tick.tick().await;
                ticks += 1;
                let Some(state) = weak.upgrade() else { return };
                // Shared database: a periodic look as well, should a notification ever be lost.
                let look = shared && ticks.is_multiple_of(CATCH_UP_EVERY_TICKS);
                if state.unpublished.load(Ordering::Relaxed) || look {
                    state.publish_committed().await;
                }
            }
        });
        if let Some(url) = state.store.postgres_url() {
            tokio::spawn(follow_database(Arc::downgrade(&state), url.to_string()));
        }
        Ok(state)
    }

    /// After a committed write: publish it. A failure is logged, not returned — the write stands —
    /// and retried in the background until the gateways have it: otherwise a revoked key would
    /// keep working, unannounced, until some other change.
    pub async fn publish_committed(&self) {
        match self.publish().await {
            Ok(_) => self.unpublished.store(false, Ordering::Relaxed),
            Err(e) => {
                self.unpublished.store(true, Ordering::Relaxed);
                tracing::error!(error = %e, "a committed change could not be published yet; retrying");
            }
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
    let json = serde_json::to_vec(s).unwrap_or_default();
    let published_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    Published {
        revision: s.revision,
        frame: crate::watch::frame(s.revision, published_ms, &json),
        published_ms,
    }
}

/// Compile `snap` exactly as a gateway will; refuse it with every error when it does not compile.
/// Which subjects a gateway compiles changes without a policy write (a subject's first key is
/// issued, its last revoked, the subject deleted: the policy document's own entry with that id
/// counts again), so two more variants must compile too: every subject with a key (a stand-in
/// for keyless ones), and the document without the control plane's subjects.
pub async fn validate(snap: Snapshot) -> Result<quota::policy::Policy, ApiError> {
    tokio::task::spawn_blocking(move || {
        let exact = snap.compile(&[])?;
        let mut keyed = snap.clone();
        let mut stand_ins = false;
        for s in keyed
            .subjects
            .iter_mut()
            .filter(|s| s.key_sha256.is_empty())
        {
            stand_ins = true;
            s.key_sha256.push(crate::auth::sha256_hex(
                format!("stand-in key of {}", s.id).as_bytes(),
            ));
        }
        if stand_ins {
            keyed.compile(&[])?;
        }
        if !snap.subjects.is_empty() {
            let document = Snapshot {
                subjects: Vec::new(),
                ..snap
            };
            document.compile(&[])?;
        }
        Ok(exact)
    })
    .await
    .map_err(|e| ApiError::Internal(format!("validation task: {e}")))?
    .map_err(|errors: quota::policy::PolicyErrors| ApiError::Invalid {
        detail: format!("refused: {} error(s); nothing was changed", errors.0.len()),
        errors: errors.0.iter().map(ToString::to_string).collect(),
    })
}
