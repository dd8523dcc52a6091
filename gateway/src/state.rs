//! The state shared by the proxy, the API listener and the reloader, injected as `Arc<AppState>`.

use crate::metrics::Metrics;
use quota::PolicyHandle;
use quota::engine::Engine;
use quota::storage::MemoryStore;
use std::path::PathBuf;

/// The counter store the gateway runs on. The in-memory store is the embedded default.
pub type Store = MemoryStore;

pub struct AppState {
    pub policy: PolicyHandle,
    pub engine: Engine<Store>,
    pub metrics: Metrics,
    /// The policy file or directory, watched for changes.
    pub config_path: PathBuf,
}
