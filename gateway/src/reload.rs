//! Hot reload: watch the policy file (or directory) and, on a change, build the whole new policy and
//! swap it in with one store. A policy that fails to load leaves the enforced one in place; the
//! error is logged, counted and shown in `/status`. The control-plane follower (`cp`) rebuilds
//! through the same `rebuild`, so file edits and pushed snapshots combine the same way.

use crate::state::{AppState, Sources};
use notify::{RecursiveMode, Watcher};
use quota::policy::{PolicyErrors, read_sources};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Editors write a file in several steps; wait this long after the first event before reading.
const SETTLE: Duration = Duration::from_millis(150);

/// Apply `change` to the policy's sources and enforce the result, or keep everything as it was
/// when it does not compile. Blocking (it compiles): call it from a blocking thread. Returns
/// whether the enforced policy changed.
pub fn rebuild(
    state: &AppState,
    actor: &str,
    change: impl FnOnce(&mut Sources),
) -> Result<bool, PolicyErrors> {
    let mut sources = state.sources.lock().unwrap_or_else(|e| e.into_inner());
    let mut next = Sources {
        file: sources.file.clone(),
        snapshot: sources.snapshot.clone(),
    };
    change(&mut next);
    let m = &state.metrics;
    let policy = match next.compile() {
        Ok(p) => p,
        Err(errors) => {
            tracing::error!(errors = %errors, "policy rejected; the previous policy stays in force");
            state.policy.record_error(errors.to_string());
            m.policy_reloads.with_label_values(&["error"]).inc();
            return Err(errors);
        }
    };
    *sources = next;
    let before = state.policy.load_full();
    if policy.hash == before.hash {
        return Ok(false);
    }
    tracing::info!(version = %policy.version, hash = %policy.hash, source = %sources.describe(), "policy loaded");
    for up in policy.upstreams() {
        if let Some(var) = &up.unresolved {
            tracing::error!(upstream = %up.name, variable = %var, "an upstream header needs an environment variable this gateway lacks: its requests are refused (503) until the gateway is restarted with it");
        }
    }
    let label =
        |p: &quota::policy::Policy| format!("{}@{}", p.version, &p.hash[..12.min(p.hash.len())]);
    let body = quota::audit::EventBody::PolicyChanged {
        actor: actor.to_string(),
        before_version: Some(label(&before)),
        after_version: label(&policy),
    };
    state.audit(None, None, body);
    state.policy.replace(policy);
    // The new policy's upstreams resolved before its requests need them.
    let (upstreams, enforced) = (state.upstreams.clone(), state.policy.load_full());
    tokio::spawn(async move { upstreams.prepare(&enforced).await });
    m.policy_reloads.with_label_values(&["success"]).inc();
    Ok(true)
}

/// Reload the policy file now. Returns whether a new policy was stored.
pub async fn reload(state: &Arc<AppState>) -> bool {
    let Some(path) = state.config_path.clone() else {
        return false;
    };
    let st = state.clone();
    let done = tokio::task::spawn_blocking(move || {
        let texts = match read_sources(&path) {
            Ok(t) => t,
            Err(errors) => {
                tracing::error!(errors = %errors, "policy rejected; the previous policy stays in force");
                st.policy.record_error(errors.to_string());
                st.metrics.policy_reloads.with_label_values(&["error"]).inc();
                return false;
            }
        };
        let actor = format!("file:{}", path.display());
        rebuild(&st, &actor, |s| s.file = texts).unwrap_or(false)
    })
    .await;
    done.unwrap_or_else(|e| {
        tracing::error!(error = %e, "policy reload task failed");
        false
    })
}

/// Watch the policy source until the process ends.
pub async fn watch(state: Arc<AppState>) -> Result<(), notify::Error> {
    let Some(path) = state.config_path.clone() else {
        return Ok(());
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let is_dir = path.is_dir();
    // The files the policy reads: itself (or its directory's files) and the price books they
    // include (`models_file`), which may live elsewhere. Books named later are watched from the
    // next start.
    let files: Vec<std::path::PathBuf> = read_sources(&path)
        .map(|s| s.into_iter().map(|(n, _)| n.into()).collect())
        .unwrap_or_default();
    let names: Vec<std::ffi::OsString> = files
        .iter()
        .chain(std::iter::once(&path))
        .filter_map(|f| f.file_name().map(|n| n.to_os_string()))
        .collect();
    // Only the policy's own files count: other files in the directory (logs, the snapshot) change
    // all the time.
    let relevant = move |p: &std::path::Path| {
        (is_dir && p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
            || p.file_name().is_some_and(|n| names.iter().any(|m| m == n))
    };
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(e) = event
            && !e.kind.is_access()
            && e.paths.iter().any(|p| relevant(p))
        {
            let _ = tx.send(());
        }
    })?;
    // Watch the directories that hold the files: editors replace files by renaming, which a watch
    // on the file itself would lose.
    let parent = |p: &std::path::Path| -> std::path::PathBuf {
        p.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| ".".into(), |p| p.to_path_buf())
    };
    let mut dirs = vec![if is_dir { path.clone() } else { parent(&path) }];
    for f in &files {
        let d = parent(f);
        if !dirs.contains(&d) {
            dirs.push(d);
        }
    }
    for d in &dirs {
        watcher.watch(d, RecursiveMode::NonRecursive)?;
    }
    while rx.recv().await.is_some() {
        tokio::time::sleep(SETTLE).await;
        while rx.try_recv().is_ok() {}
        reload(&state).await;
    }
    Ok(())
}
