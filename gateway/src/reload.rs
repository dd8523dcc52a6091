//! Hot reload: watch the policy file (or directory) and, on a change, build the whole new policy and
//! swap it in with one store. A policy that fails to load leaves the enforced one in place; the
//! error is logged, counted and shown in `/status`.

use crate::state::AppState;
use notify::{RecursiveMode, Watcher};
use quota::policy::load_path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Editors write a file in several steps; wait this long after the first event before reading.
const SETTLE: Duration = Duration::from_millis(150);

/// Reload the policy now. Returns whether a new policy was stored.
pub async fn reload(state: &Arc<AppState>) -> bool {
    let path = state.config_path.clone();
    let loaded = tokio::task::spawn_blocking(move || load_path(&path)).await;
    let m = &state.metrics;
    match loaded {
        Ok(Ok(policy)) => {
            if policy.hash == state.policy.load().hash {
                return false;
            }
            tracing::info!(version = %policy.version, hash = %policy.hash, "policy reloaded");
            let before = state.policy.load();
            let body = quota::audit::EventBody::PolicyChanged {
                actor: format!("file:{}", state.config_path.display()),
                before_version: Some(format!(
                    "{}@{}",
                    before.version,
                    &before.hash[..12.min(before.hash.len())]
                )),
                after_version: format!(
                    "{}@{}",
                    policy.version,
                    &policy.hash[..12.min(policy.hash.len())]
                ),
            };
            state.audit(None, None, body);
            state.policy.replace(policy);
            m.policy_reloads.with_label_values(&["success"]).inc();
            true
        }
        Ok(Err(errors)) => {
            tracing::error!(errors = %errors, "policy rejected; the previous policy stays in force");
            state.policy.record_error(errors.to_string());
            m.policy_reloads.with_label_values(&["error"]).inc();
            false
        }
        Err(e) => {
            tracing::error!(error = %e, "policy reload task failed");
            false
        }
    }
}

/// Watch the policy source until the process ends.
pub async fn watch(state: Arc<AppState>) -> Result<(), notify::Error> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| !e.kind.is_access()) {
            let _ = tx.send(());
        }
    })?;
    let path = &state.config_path;
    // Watch the directory that holds the file: editors replace files by renaming, which a watch on
    // the file itself would lose.
    let dir = if path.is_dir() {
        path.clone()
    } else {
        path.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| ".".into(), |p| p.to_path_buf())
    };
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    while rx.recv().await.is_some() {
        tokio::time::sleep(SETTLE).await;
        while rx.try_recv().is_ok() {}
        reload(&state).await;
    }
    Ok(())
}
