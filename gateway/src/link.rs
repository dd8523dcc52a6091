//! What a gateway knows of its control plane: the instances it may follow, its token, the
//! revisions enforced and announced, and whether a stream is up. Shared through `AppState`
//! (admission asks whether the control plane is reachable); `cp` drives it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::Notify;

pub struct ControlPlaneConfig {
    /// One or more instances sharing one database; the gateway fails over between them.
    pub urls: Vec<String>,
    /// How often the revision is checked against the control plane, stream or no stream.
    pub check_every: std::time::Duration,
    /// Resync when behind the control plane for this long.
    pub resync_after: std::time::Duration,
    pub token: String,
    /// The last snapshot applied, kept to start from while the control plane is unreachable.
    pub snapshot: PathBuf,
}

pub struct Link {
    /// Base URLs, without a trailing slash: instances of one control plane.
    pub urls: Vec<String>,
    /// The instance followed now (an index into `urls`).
    pub(crate) current: AtomicUsize,
    pub(crate) token: String,
    pub(crate) check_every: Duration,
    pub(crate) resync_after: Duration,
    /// Set by the periodic check: the stream reconnects.
    pub(crate) resync: Notify,
    pub snapshot_path: PathBuf,
    pub(crate) connected: AtomicBool,
    /// The revision enforced now.
    pub(crate) applied: AtomicU64,
    /// The newest revision the control plane has announced.
    pub(crate) latest: AtomicU64,
    /// While the control plane announces an older revision than the one enforced (its database
    /// was restored?), the revision it announced when first seen so (at least 1); 0 otherwise.
    /// Keys it issued since are unknown here; a snapshot newer than this is a change made on the
    /// restored control plane.
    pub(crate) behind_at: AtomicU64,
    /// The client of the control plane's API (never used for proxied traffic).
    pub(crate) http: reqwest::Client,
}

impl Link {
    pub fn new(cfg: &ControlPlaneConfig) -> Self {
        Self {
            urls: cfg
                .urls
                .iter()
                .map(|u| u.trim().trim_end_matches('/').to_string())
                .filter(|u| !u.is_empty())
                .collect(),
            current: AtomicUsize::new(0),
            token: cfg.token.clone(),
            check_every: cfg.check_every,
            resync_after: cfg.resync_after,
            resync: Notify::new(),
            snapshot_path: cfg.snapshot.clone(),
            connected: AtomicBool::new(false),
            applied: AtomicU64::new(0),
            latest: AtomicU64::new(0),
            behind_at: AtomicU64::new(0),
            http: reqwest::Client::builder()
                .no_proxy()
                .connect_timeout(std::time::Duration::from_secs(5))
                .build()
                .unwrap_or_default(),
        }
    }

    /// True unless a stream is up and this gateway enforces the latest revision it announced:
    /// otherwise keys this gateway does not know may exist at the control plane.
    pub fn unreachable(&self) -> bool {
        !self.connected.load(Ordering::Relaxed)
    }

    /// The instance followed now.
    pub fn url(&self) -> &str {
        let i = self.current.load(Ordering::Relaxed);
        self.urls.get(i).map_or("", String::as_str)
    }

    /// Follow the next instance; true when that starts a new round through all of them.
    pub(crate) fn next_url(&self) -> bool {
        let n = self.urls.len().max(1);
        let next = (self.current.load(Ordering::Relaxed) + 1) % n;
        self.current.store(next, Ordering::Relaxed);
        next == 0
    }

    pub fn applied(&self) -> u64 {
        self.applied.load(Ordering::Relaxed)
    }

    pub fn latest(&self) -> u64 {
        self.latest.load(Ordering::Relaxed)
    }

    /// Whether the control plane announces an older revision than the one enforced.
    pub fn behind(&self) -> bool {
        self.behind_at.load(Ordering::Relaxed) != 0
    }

    /// Record a snapshot enforced at start (from disk).
    pub fn set_applied(&self, revision: u64) {
        self.applied.store(revision, Ordering::Relaxed);
        self.latest.fetch_max(revision, Ordering::Relaxed);
    }
}
