//! Which gateways follow this control plane: every watch stream registers here while it is open,
//! with the token it came with, the revision last sent down it (what the gateway enforces once it
//! has applied it) and when it was last written to. The console's Gateways page reads it; the
//! registry is per process (each instance knows the streams it serves).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// One watch stream, as listed.
#[derive(Debug, Clone)]
pub struct GatewayConn {
    pub id: u64,
    /// The token's name (`token:gateways`).
    pub actor: String,
    /// The client's `User-Agent`, when it sent one.
    pub agent: String,
    pub connected_ms: i64,
    /// The revision last sent as a snapshot on this stream.
    pub revision: u64,
    /// The last time anything (snapshot or heartbeat) was written to the stream.
    pub last_seen_ms: i64,
}

#[derive(Default)]
pub struct Registry {
    next: AtomicU64,
    open: Mutex<BTreeMap<u64, GatewayConn>>,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Registry {
    /// A stream opened, unless `actor` holds `per_actor` already or `total` are open; returns
    /// its id (for `seen` and `closed`).
    pub fn try_open(
        &self,
        actor: &str,
        agent: &str,
        revision: u64,
        per_actor: usize,
        total: usize,
    ) -> Option<u64> {
        let mut open = self.lock();
        if open.len() >= total || open.values().filter(|c| c.actor == actor).count() >= per_actor {
            return None;
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let now = now_ms();
        let conn = GatewayConn {
            id,
            actor: actor.to_string(),
            agent: agent.to_string(),
            connected_ms: now,
            revision,
            last_seen_ms: now,
        };
        open.insert(id, conn);
        Some(id)
    }

    /// Something was written to stream `id`; `revision` when it was a snapshot.
    pub fn seen(&self, id: u64, revision: Option<u64>) {
        if let Some(c) = self.lock().get_mut(&id) {
            c.last_seen_ms = now_ms();
            if let Some(r) = revision {
                c.revision = r;
            }
        }
    }

    pub fn closed(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// The open streams, oldest first.
    pub fn list(&self) -> Vec<GatewayConn> {
        self.lock().values().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, GatewayConn>> {
        // A panic while holding it leaves only a listing behind: keep going with it.
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Removes a stream from the registry when its task ends, however it ends.
pub struct Registered<'a> {
    pub registry: &'a Registry,
    pub id: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.registry.closed(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_limited_per_token_and_in_all() {
        let r = Registry::default();
        let a: Vec<u64> = (0..3)
            .filter_map(|_| r.try_open("token:a", "gw", 0, 3, 5))
            .collect();
        assert_eq!(a.len(), 3);
        assert_eq!(r.try_open("token:a", "gw", 0, 3, 5), None, "per token");
        assert!(r.try_open("token:b", "gw", 0, 3, 5).is_some());
        assert!(r.try_open("token:c", "gw", 0, 3, 5).is_some());
        assert_eq!(r.try_open("token:d", "gw", 0, 3, 5), None, "in all");
        r.closed(a[0]);
        assert!(
            r.try_open("token:a", "gw", 0, 3, 5).is_some(),
            "a closed one frees its place"
        );
    }
}
