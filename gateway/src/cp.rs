//! Following the control plane: a long-lived watch stream (server-sent events) that delivers the
//! full snapshot on connect and each new revision after it. A snapshot newer than the enforced one
//! is compiled and swapped in, then written to disk so a restart while the control plane is away
//! starts from it. Several URLs name instances sharing one database: when the followed one fails
//! the next is tried at once, with capped exponential backoff only after a full round. A stream
//! silent for three heartbeats is treated as dead. Independently, the revision is checked at a
//! fixed interval (`GET /v1/revision`): a gateway behind for longer than a threshold, however
//! quiet its stream, reconnects and so gets the latest snapshot. The snapshot file is readable by
//! its owner only; the token is never logged.

use crate::link::Link;
use crate::reload::rebuild;
use crate::state::AppState;
use futures_util::StreamExt;
use quota::policy::Snapshot;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// The wait after the control plane refused this gateway's token (401/403): only an operator
/// fixes that, so asking every few seconds would only fill both logs.
const REFUSED_BACKOFF: Duration = Duration::from_secs(30);
/// Until the first heartbeat says how often they come: three of the default 5 s missed.
const SILENCE: Duration = Duration::from_secs(15);
/// Largest event accepted (a snapshot of a few hundred thousand subjects fits): a peer that never
/// ends an event cannot grow the buffer without bound.
const MAX_EVENT: usize = 256 << 20;

#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("cannot reach the control plane: {0}")]
    Http(#[from] reqwest::Error),
    #[error("the control plane answered {0}")]
    Status(reqwest::StatusCode),
    #[error("the watch stream ended")]
    Closed,
    #[error("no heartbeat for {0:?}")]
    Silent(Duration),
    #[error("an event larger than {MAX_EVENT} bytes")]
    TooLarge,
    #[error("behind the control plane's revision for too long: resyncing")]
    Resync,
}

/// Read the snapshot a previous run wrote; `None` (with a warning) when it is missing or damaged.
pub fn read_disk_snapshot(path: &Path) -> Option<Snapshot> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the control-plane snapshot");
            return None;
        }
    };
    match serde_json::from_slice(&bytes) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring a damaged control-plane snapshot");
            None
        }
    }
}

/// Replace the file atomically: a crash leaves the old snapshot or the new one, never half. Mode
/// 0600: it names every subject and its key hashes.
fn write_disk_snapshot(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    // A leftover from a crash may have other permissions: start afresh.
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Follow the control plane until the process ends.
pub async fn follow(state: Arc<AppState>) {
    let Some(link) = state.control_plane.as_ref() else {
        return;
    };
    publish_revisions(&state, link);
    tokio::spawn(check_revision(state.clone()));
    let mut backoff = BACKOFF_MIN;
    loop {
        let mut connected = false;
        let result = stream_once(&state, link, &mut connected).await;
        link.connected.store(false, Ordering::Relaxed);
        state.metrics.control_plane_connected.set(0);
        if connected {
            backoff = BACKOFF_MIN;
        }
        let url = link.url().to_string();
        // Another instance next (when there are several); the backoff grows once per round.
        let new_round = link.next_url();
        match &result {
            Err(StreamError::Resync) => {
                tracing::warn!(url = %url, next = %link.url(), "resyncing with the control plane");
                continue;
            }
            Err(e) => {
                tracing::warn!(url = %url, next = %link.url(), error = %e, retry_in_ms = backoff.as_millis() as u64, "control-plane stream down")
            }
            Ok(()) => {}
        }
        // Jitter, so a fleet does not reconnect in lockstep after an outage.
        let jitter = Duration::from_millis(u64::from(quota::ids::uuid_v7().as_bytes()[15]) % 50);
        if let Err(StreamError::Status(s)) = &result
            && matches!(s.as_u16(), 401 | 403)
        {
            tracing::error!(url = %url, status = s.as_u16(), "the control plane refused this gateway's token; check --control-plane-token");
            tokio::time::sleep(REFUSED_BACKOFF + jitter).await;
        } else if new_round || connected {
            tokio::time::sleep(backoff + jitter).await;
            if new_round {
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        } else {
            tokio::time::sleep(jitter).await;
        }
    }
}

/// Ask the followed instance for its revision at a fixed interval; when this gateway has been
/// behind it for longer than the threshold, force a resync. Failures to ask are left to the
/// stream, which notices an unreachable control plane by itself.
async fn check_revision(state: Arc<AppState>) {
    let Some(link) = state.control_plane.as_ref() else {
        return;
    };
    #[derive(serde::Deserialize)]
    struct Rev {
        revision: u64,
    }
    let mut tick = tokio::time::interval(link.check_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut behind_since: Option<tokio::time::Instant> = None;
    loop {
        tick.tick().await;
        let asked = link
            .http
            .get(format!("{}/v1/revision", link.url()))
            .bearer_auth(&link.token)
            .timeout(link.check_every)
            .send()
            .await;
        let theirs = match asked {
            Ok(r) if r.status().is_success() => match r.json::<Rev>().await {
                Ok(rev) => rev.revision,
                Err(_) => continue,
            },
            // The stream reports a refused token; asking again soon changes nothing.
            Ok(r) if matches!(r.status().as_u16(), 401 | 403) => {
                tokio::time::sleep(REFUSED_BACKOFF).await;
                continue;
            }
            _ => continue,
        };
        link.latest.fetch_max(theirs, Ordering::Relaxed);
        let drift = link.latest().saturating_sub(link.applied());
        state.metrics.snapshot_drift.set(drift as i64);
        publish_revisions(&state, link);
        if theirs <= link.applied() {
            behind_since = None;
            continue;
        }
        let since = *behind_since.get_or_insert_with(tokio::time::Instant::now);
        if since.elapsed() >= link.resync_after {
            tracing::warn!(
                theirs,
                ours = link.applied(),
                behind_ms = since.elapsed().as_millis() as u64,
                "behind the control plane for too long; resyncing"
            );
            state
                .metrics
                .snapshot_refresh
                .with_label_values(&["resync"])
                .inc();
            link.resync.notify_one();
            behind_since = None;
        }
    }
}

async fn stream_once(
    state: &Arc<AppState>,
    link: &Link,
    connected: &mut bool,
) -> Result<(), StreamError> {
    let url = format!("{}/v1/watch?since={}", link.url(), link.applied());
    let resp = link
        .http
        .get(&url)
        .bearer_auth(&link.token)
        .header("accept", "text/event-stream")
        .send()
        .await?;
    if !resp.status().is_success() {
        return Err(StreamError::Status(resp.status()));
    }
    *connected = true;
    state.metrics.control_plane_connected.set(1);
    tracing::info!(url = %link.url(), since = link.applied(), "following the control plane");
    let mut body = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut scanned: usize = 0;
    let mut silence = SILENCE;
    // The first snapshot of a stream is catch-up (published before this gateway asked); later
    // ones are pushed live, and their delay is the propagation time.
    let mut live = false;
    loop {
        let next = tokio::select! {
            next = tokio::time::timeout(silence, body.next()) => next,
            _ = link.resync.notified() => return Err(StreamError::Resync),
        };
        let chunk = match next {
            Err(_) => return Err(StreamError::Silent(silence)),
            Ok(None) => return Err(StreamError::Closed),
            Ok(Some(chunk)) => chunk?,
        };
        if buf.len() + chunk.len() > MAX_EVENT {
            return Err(StreamError::TooLarge);
        }
        buf.extend_from_slice(&chunk);
        // Events end with a blank line; a snapshot may span many chunks.
        while let Some(end) = buf[scanned.saturating_sub(1)..]
            .windows(2)
            .position(|w| w == b"\n\n")
            .map(|p| p + scanned.saturating_sub(1))
        {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            scanned = 0;
            if let Some(every) = handle_event(state, link, &event, &mut live).await {
                silence = (every * 3).max(Duration::from_secs(1));
            }
            // Current only once the announced revision is enforced (a snapshot still in flight,
            // or one this gateway refused, leaves it behind).
            let current = link.latest() <= link.applied() && !link.behind();
            link.connected.store(current, Ordering::Relaxed);
        }
        scanned = buf.len();
    }
}

/// Handle one event; returns the heartbeat interval when the event announced it. `live` is set
/// once the stream has delivered its first snapshot.
async fn handle_event(
    state: &Arc<AppState>,
    link: &Link,
    event: &[u8],
    live: &mut bool,
) -> Option<Duration> {
    let mut kind = "message";
    let mut data = Vec::new();
    let mut published_ms = None;
    for line in event.split(|&b| b == b'\n') {
        if let Some(v) = line.strip_prefix(b"published_ms:") {
            published_ms = std::str::from_utf8(v)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok());
            continue;
        }
        if let Some(v) = line.strip_prefix(b"event:") {
            kind = match v.trim_ascii() {
                b"snapshot" => "snapshot",
                b"heartbeat" => "heartbeat",
                _ => "other",
            };
        } else if let Some(v) = line.strip_prefix(b"data:") {
            if !data.is_empty() {
                data.push(b'\n');
            }
            data.extend_from_slice(v.strip_prefix(b" ").unwrap_or(v));
        }
    }
    let mut every = None;
    match kind {
        "heartbeat" => {
            #[derive(serde::Deserialize)]
            struct Beat {
                revision: u64,
                every_ms: Option<u64>,
            }
            if let Ok(b) = serde_json::from_slice::<Beat>(&data) {
                let behind = b.revision < link.applied();
                if behind
                    && link
                        .behind_at
                        .compare_exchange(
                            0,
                            b.revision.max(1),
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                        )
                        .is_ok()
                {
                    tracing::warn!(
                        theirs = b.revision,
                        ours = link.applied(),
                        "the control plane is at an older revision than this gateway enforces (was its database restored?); keeping ours"
                    );
                }
                if !behind {
                    link.behind_at.store(0, Ordering::Relaxed);
                }
                link.latest.fetch_max(b.revision, Ordering::Relaxed);
                every = b.every_ms.map(Duration::from_millis);
            }
        }
        "snapshot" => {
            let applied = apply_snapshot(state, link, data).await;
            if let (true, true, Some(published)) = (applied, *live, published_ms) {
                let delay_ms = unix_ms().saturating_sub(published);
                state
                    .metrics
                    .control_plane_propagation
                    .observe(delay_ms as f64 / 1000.0);
            }
            *live = true;
        }
        _ => {}
    }
    let drift = link.latest().saturating_sub(link.applied());
    state.metrics.snapshot_drift.set(drift as i64);
    publish_revisions(state, link);
    every
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The revisions enforced and announced, as gauges (present only on a gateway that follows a
/// control plane, so an alert on them never fires for one that does not).
fn publish_revisions(state: &AppState, link: &Link) {
    let m = &state.metrics.control_plane_revision;
    m.with_label_values(&["applied"])
        .set(i64::try_from(link.applied()).unwrap_or(i64::MAX));
    m.with_label_values(&["latest"])
        .set(i64::try_from(link.latest()).unwrap_or(i64::MAX));
}

/// Apply a snapshot event; true when it became the enforced policy.
async fn apply_snapshot(state: &Arc<AppState>, link: &Link, data: Vec<u8>) -> bool {
    let m = &state.metrics;
    let arrived = std::time::Instant::now();
    let snap: Snapshot = match serde_json::from_slice(&data) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "undecodable snapshot from the control plane; ignored");
            m.snapshot_refresh.with_label_values(&["rejected"]).inc();
            return false;
        }
    };
    link.latest.fetch_max(snap.revision, Ordering::Relaxed);
    // A control plane seen behind this gateway (its database restored) that then makes a change
    // (a key revoked, a tier changed) is obeyed: its revision numbers restarted lower, so that
    // change would otherwise wait until they pass this gateway's, revocations included.
    let behind_at = link.behind_at.load(Ordering::Relaxed);
    let after_restore =
        behind_at != 0 && snap.revision > behind_at && snap.revision <= link.applied();
    // Otherwise never go back: a reconnect to a lagging replica must not undo a newer revision.
    if snap.revision <= link.applied() && !after_restore {
        m.snapshot_refresh.with_label_values(&["stale"]).inc();
        return false;
    }
    let revision = snap.revision;
    let st = state.clone();
    let actor = format!("control-plane:{}", link.url());
    let applied = tokio::task::spawn_blocking(move || {
        rebuild(&st, &actor, |s| s.snapshot = Some(snap)).is_ok()
    })
    .await
    .unwrap_or(false);
    if !applied {
        m.snapshot_refresh.with_label_values(&["rejected"]).inc();
        return false;
    }
    link.applied.store(revision, Ordering::Relaxed);
    if after_restore {
        tracing::warn!(
            revision,
            "a change made on the restored control plane: its state replaces the newer one this gateway enforced"
        );
        link.latest.store(revision, Ordering::Relaxed);
        link.behind_at.store(0, Ordering::Relaxed);
    }
    m.snapshot_refresh.with_label_values(&["applied"]).inc();
    m.control_plane_applied_at.set(unix_ms() as f64 / 1000.0);
    m.snapshot_refresh_seconds
        .observe(arrived.elapsed().as_secs_f64());
    tracing::info!(revision, "control-plane snapshot applied");
    let path = link.snapshot_path.clone();
    let written = tokio::task::spawn_blocking(move || write_disk_snapshot(&path, &data)).await;
    if let Ok(Err(e)) | Err(e) = written.map_err(std::io::Error::other) {
        tracing::warn!(path = %link.snapshot_path.display(), error = %e, "cannot save the snapshot to disk");
    }
    true
}
