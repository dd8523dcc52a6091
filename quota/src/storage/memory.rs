//! In-memory counters: the embedded default, exact under concurrency within one process.
//!
//! Counters are sharded by subject behind plain mutexes, held only for the few arithmetic steps of a
//! decision (never across an await). A request locks every shard it touches in index order, so
//! multi-counter decisions are atomic without deadlock.

use super::{ConsumeRequest, CounterKey, CounterReport, Outcome, Storage, StorageError};
use crate::limiter::State;
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Mutex, MutexGuard};

const SHARDS: usize = 64;
/// How long a decision stays replayable by its idempotency key.
const IDEMPOTENCY_TTL_NS: i64 = 24 * 3600 * 1_000_000_000;

pub struct MemoryStore {
    shards: Box<[Mutex<HashMap<CounterKey, State>>]>,
    decisions: Mutex<HashMap<String, (Outcome, i64)>>,
    hasher: RandomState,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            decisions: Mutex::new(HashMap::new()),
            hasher: RandomState::new(),
        }
    }

    fn shard_of(&self, subject: &str) -> usize {
        (self.hasher.hash_one(subject) as usize) % SHARDS
    }

    /// Drop state that no longer matters: full buckets and idempotency records past their TTL.
    /// Windows are kept (they reset themselves when their id changes). Call it periodically.
    pub fn sweep(&self, now_ns: i64) {
        for shard in self.shards.iter() {
            lock(shard).retain(|_, s| match s {
                State::Bucket { tat_ns } => *tat_ns > now_ns,
                State::Window { .. } => true,
            });
        }
        lock(&self.decisions).retain(|_, (_, exp)| *exp > now_ns);
    }

    /// Number of stored counters (for tests and metrics).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn decide(&self, req: &ConsumeRequest<'_>) -> Outcome {
        let mut idx: Vec<usize> = req
            .counters
            .iter()
            .map(|c| self.shard_of(&c.key.subject))
            .collect();
        idx.sort_unstable();
        idx.dedup();
        let mut guards: Vec<(usize, MutexGuard<'_, HashMap<CounterKey, State>>)> =
            idx.iter().map(|&i| (i, lock(&self.shards[i]))).collect();
        let guard_for = |subject: &str| -> usize {
            let s = self.shard_of(subject);
            guards.iter().position(|(i, _)| *i == s).unwrap_or(0)
        };
        let slots: Vec<usize> = req
            .counters
            .iter()
            .map(|c| guard_for(&c.key.subject))
            .collect();
        let verdicts: Vec<_> = req
            .counters
            .iter()
            .zip(&slots)
            .map(|(c, &g)| {
                let state = guards[g].1.get(&c.key).copied();
                (state, c.limit.evaluate(state, req.cost, req.now_ns))
            })
            .collect();
        let allowed = verdicts.iter().all(|(_, v)| v.allowed);
        let mut reports = Vec::with_capacity(verdicts.len());
        for ((c, &g), (state, v)) in req.counters.iter().zip(&slots).zip(verdicts) {
            if allowed {
                guards[g].1.insert(c.key.clone(), v.next);
            }
            // When the request is refused, counters that would have allowed it report what they
            // hold now, not what they would have held after consuming.
            let shown = if allowed || !v.allowed {
                v
            } else {
                c.limit.evaluate(state, 0, req.now_ns)
            };
            reports.push(CounterReport {
                allowed: v.allowed,
                limit: shown.limit,
                remaining: shown.remaining,
                reset_after_ns: shown.reset_after_ns,
                retry_after_ns: v.retry_after_ns,
            });
        }
        Outcome {
            allowed,
            counters: reports,
            replayed: false,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere while holding the lock leaves consistent integers behind; keep serving.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Storage for MemoryStore {
    async fn check_and_consume(&self, req: &ConsumeRequest<'_>) -> Result<Outcome, StorageError> {
        let Some(key) = req.idempotency_key else {
            return Ok(self.decide(req));
        };
        // Held across the decision so two concurrent repeats cannot both consume.
        let mut decisions = lock(&self.decisions);
        if let Some((first, exp)) = decisions.get(key)
            && *exp > req.now_ns
        {
            return Ok(Outcome {
                replayed: true,
                ..first.clone()
            });
        }
        let outcome = self.decide(req);
        decisions.insert(
            key.to_string(),
            (outcome.clone(), req.now_ns + IDEMPOTENCY_TTL_NS),
        );
        Ok(outcome)
    }
}
