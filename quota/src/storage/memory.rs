//! In-memory counters: the embedded default, exact under concurrency within one process.
//!
//! Counters are sharded by subject behind plain mutexes, held only for the few arithmetic steps of a
//! decision (never across an await). A request locks every shard it touches in index order, so
//! multi-counter decisions are atomic without deadlock.

use super::{
    ConsumeRequest, Counter, CounterKey, CounterReport, Outcome, ReleaseRequest, RenewRequest,
    SettleRequest, Settled, Storage, StorageError,
};
use crate::limiter::{Limit, State};
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::sync::{Mutex, MutexGuard};

const SHARDS: usize = 64;
/// How long a decision stays replayable by its idempotency key (a client's retry may come late).
const IDEMPOTENCY_TTL_NS: i64 = 24 * 3600 * 1_000_000_000;
/// How long a settled attempt is remembered at least (at most twice that). Counters in memory do
/// not outlive the process, so a second delivery can only be this process retrying an answer it
/// did not see, at once: minutes are ample, and memory stays bounded by the settlement rate
/// instead of growing with a day of traffic.
const SETTLED_TTL_NS: i64 = 5 * 60 * 1_000_000_000;

/// One counter: its limiter state and the reservations held on it.
#[derive(Debug, Clone)]
struct Entry {
    state: State,
    held: Vec<Held>,
}

#[derive(Debug, Clone)]
struct Held {
    attempt: Box<str>,
    amount: u64,
    /// The calendar window reserved in (0 for buckets).
    window: i64,
    expires_ns: i64,
}

type Shard = HashMap<CounterKey, Entry>;

/// Attempts settled recently, in two generations: a generation older than `SETTLED_TTL_NS` is
/// dropped whole when the next one starts, so forgetting costs no scan.
#[derive(Default)]
struct Recent {
    current: HashSet<Box<str>>,
    previous: HashSet<Box<str>>,
    since_ns: i64,
}

impl Recent {
    fn contains(&self, attempt: &str) -> bool {
        self.current.contains(attempt) || self.previous.contains(attempt)
    }

    /// Remember `attempt`; returns a retired generation for the caller to drop outside the lock.
    fn insert(&mut self, attempt: &str, now_ns: i64) -> Option<HashSet<Box<str>>> {
        let retired = self.rotate(now_ns);
        self.current.insert(attempt.into());
        retired
    }

    fn rotate(&mut self, now_ns: i64) -> Option<HashSet<Box<str>>> {
        if now_ns.saturating_sub(self.since_ns) < SETTLED_TTL_NS {
            return None;
        }
        self.since_ns = now_ns;
        let current = std::mem::take(&mut self.current);
        Some(std::mem::replace(&mut self.previous, current))
    }
}

/// Under an idempotency key: the first decision, its expiry and what it asked for.
type FirstDecision = (Outcome, i64, Box<str>);

pub struct MemoryStore {
    shards: Box<[Mutex<Shard>]>,
    decisions: Mutex<HashMap<String, FirstDecision>>,
    settled: Mutex<Recent>,
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
            settled: Mutex::new(Recent::default()),
            hasher: RandomState::new(),
        }
    }

    fn shard_of(&self, subject: &str) -> usize {
        (self.hasher.hash_one(subject) as usize) % SHARDS
    }

    /// Drop state that no longer matters: full buckets without reservations, expired
    /// reservations, idempotency records past their TTL. Windows are kept (they reset themselves
    /// when their id changes). Call it periodically.
    pub fn sweep(&self, now_ns: i64) {
        for shard in self.shards.iter() {
            lock(shard).retain(|_, e| {
                e.held.retain(|h| h.expires_ns > now_ns);
                match e.state {
                    State::Bucket { tat_ns } => tat_ns > now_ns || !e.held.is_empty(),
                    State::Window { .. } => true,
                }
            });
        }
        lock(&self.decisions).retain(|_, (_, exp, _)| *exp > now_ns);
        let retired = lock(&self.settled).rotate(now_ns);
        drop(retired);
    }

    /// Number of stored counters (for tests and metrics).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Lock every shard the counters live in, in index order; returns the guards and, per
    /// counter, the index of its guard.
    fn lock_all(&self, counters: &[Counter]) -> (Vec<MutexGuard<'_, Shard>>, Vec<usize>) {
        let mut idx: Vec<usize> = counters
            .iter()
            .map(|c| self.shard_of(&c.key.subject))
            .collect();
        let per_counter = idx.clone();
        idx.sort_unstable();
        idx.dedup();
        let guards = idx.iter().map(|&i| lock(&self.shards[i])).collect();
        let slots = per_counter
            .iter()
            .map(|s| idx.iter().position(|i| i == s).unwrap_or(0))
            .collect();
        (guards, slots)
    }

    fn decide(&self, req: &ConsumeRequest<'_>) -> Outcome {
        let now = req.now_ns;
        let (mut guards, slots) = self.lock_all(req.counters);
        let verdicts: Vec<_> = req
            .counters
            .iter()
            .zip(&slots)
            .map(|(c, &g)| {
                let entry = guards[g].get(&c.key);
                let state = entry.map(|e| effective(e, c.limit, now));
                (state, c.limit.evaluate(state, c.cost, now))
            })
            .collect();
        let allowed = verdicts.iter().all(|(_, v)| v.allowed);
        let mut reports = Vec::with_capacity(verdicts.len());
        for ((c, &g), (state, v)) in req.counters.iter().zip(&slots).zip(verdicts) {
            if allowed {
                let entry = guards[g].entry(c.key.clone()).or_insert_with(|| Entry {
                    state: c.limit.initial_state(now),
                    held: Vec::new(),
                });
                entry.held.retain(|h| h.expires_ns > now);
                match (v.next, req.reservation) {
                    // Reserved units of a window are held apart, so they can expire.
                    (State::Window { window, .. }, Some(r)) => {
                        let own = own_used(entry, window);
                        entry.state = State::Window { window, used: own };
                        entry
                            .held
                            .push(held(r.attempt_id, c.cost, window, r.expires_ns));
                    }
                    (State::Window { window, .. }, None) => {
                        let own = own_used(entry, window);
                        entry.state = State::Window {
                            window,
                            used: own + c.cost,
                        };
                    }
                    // A bucket takes the tokens now; the record is kept to refund at settlement.
                    (next @ State::Bucket { .. }, r) => {
                        entry.state = next;
                        if let Some(r) = r {
                            entry.held.push(held(r.attempt_id, c.cost, 0, r.expires_ns));
                        }
                    }
                }
            }
            // When refused, counters that would have allowed it report what they hold now.
            let shown = if allowed || !v.allowed {
                v
            } else {
                c.limit.evaluate(state, 0, now)
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

fn held(attempt: &str, amount: u64, window: i64, expires_ns: i64) -> Held {
    Held {
        attempt: attempt.into(),
        amount,
        window,
        expires_ns,
    }
}

/// Units used in `window` outside reservations (0 when the stored window is an older one).
fn own_used(e: &Entry, window: i64) -> u64 {
    match e.state {
        State::Window { window: w, used } if w == window => used,
        _ => 0,
    }
}

/// The state a limit sees: for a window, its own count plus the live reservations in it.
fn effective(e: &Entry, limit: Limit, now: i64) -> State {
    match limit {
        Limit::Window { window, .. } => {
            let live: u64 = e
                .held
                .iter()
                .filter(|h| h.window == window && h.expires_ns > now)
                .map(|h| h.amount)
                .sum();
            State::Window {
                window,
                used: own_used(e, window) + live,
            }
        }
        Limit::Bucket { .. } => e.state,
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
        if let Some((first, exp, asked)) = decisions.get(key)
            && *exp > req.now_ns
        {
            if **asked != *req.fingerprint {
                return Err(StorageError::IdempotencyConflict);
            }
            return Ok(Outcome {
                replayed: true,
                ..first.clone()
            });
        }
        let outcome = self.decide(req);
        decisions.insert(
            key.to_string(),
            (
                outcome.clone(),
                req.now_ns + IDEMPOTENCY_TTL_NS,
                req.fingerprint.into(),
            ),
        );
        Ok(outcome)
    }

    async fn release(&self, req: &ReleaseRequest<'_>) -> Result<(), StorageError> {
        let now = req.now_ns;
        let (mut guards, slots) = self.lock_all(req.counters);
        for (c, &g) in req.counters.iter().zip(&slots) {
            let Some(entry) = guards[g].get_mut(&c.key) else {
                continue;
            };
            entry.state = match (c.limit, entry.state) {
                (Limit::Window { window, .. }, State::Window { window: w, used })
                    if w == window =>
                {
                    State::Window {
                        window,
                        used: used.saturating_sub(c.cost),
                    }
                }
                (Limit::Bucket { emission_ns, .. }, State::Bucket { tat_ns }) => {
                    let back = (c.cost as i128).saturating_mul(emission_ns as i128);
                    let tat = (tat_ns as i128 - back).clamp(now as i128, i64::MAX as i128);
                    State::Bucket { tat_ns: tat as i64 }
                }
                (_, s) => s,
            };
        }
        Ok(())
    }

    /// As `lua/renew.lua`: only a live hold is moved, never one settled or expired.
    async fn renew(&self, req: &RenewRequest<'_>) -> Result<(), StorageError> {
        let (mut guards, slots) = self.lock_all(req.counters);
        for (c, &g) in req.counters.iter().zip(&slots) {
            let Some(entry) = guards[g].get_mut(&c.key) else {
                continue;
            };
            for h in entry.held.iter_mut() {
                if &*h.attempt == req.attempt_id
                    && h.expires_ns > req.now_ns
                    && req.expires_ns > h.expires_ns
                {
                    h.expires_ns = req.expires_ns;
                }
            }
        }
        Ok(())
    }

    async fn settle(&self, req: &SettleRequest<'_>) -> Result<Settled, StorageError> {
        let now = req.now_ns;
        // Held across the settlement: a duplicate delivered concurrently waits, then sees it.
        let mut settled = lock(&self.settled);
        if settled.contains(req.attempt_id) {
            return Ok(Settled::AlreadySettled);
        }
        let (mut guards, slots) = self.lock_all(req.counters);
        for (c, &g) in req.counters.iter().zip(&slots) {
            let entry = guards[g].entry(c.key.clone()).or_insert_with(|| Entry {
                state: c.limit.initial_state(now),
                held: Vec::new(),
            });
            let reserved = match entry
                .held
                .iter()
                .position(|h| &*h.attempt == req.attempt_id)
            {
                // An expired hold refunds nothing (as in settle.lua).
                Some(i) => {
                    let h = entry.held.swap_remove(i);
                    if h.expires_ns > now { h.amount } else { 0 }
                }
                None => 0,
            };
            entry.state = match (c.limit, entry.state) {
                // The window moved on since the reservation (a stream across midnight): the
                // closed window is over, and today's count must not be replaced by it.
                (Limit::Window { window, .. }, State::Window { window: w, .. }) if w != window => {
                    entry.state
                }
                (Limit::Window { window, .. }, _) => State::Window {
                    window,
                    used: own_used(entry, window) + c.cost,
                },
                (Limit::Bucket { emission_ns, .. }, State::Bucket { tat_ns }) => {
                    let delta = (c.cost as i128 - reserved as i128) * emission_ns as i128;
                    let tat =
                        (tat_ns.max(now) as i128 + delta).clamp(now as i128, i64::MAX as i128);
                    State::Bucket { tat_ns: tat as i64 }
                }
                (Limit::Bucket { .. }, s) => s,
            };
        }
        let retired = settled.insert(req.attempt_id, now);
        // Every lock released before a retired generation (possibly millions of ids) is freed.
        drop(guards);
        drop(settled);
        drop(retired);
        Ok(Settled::Charged)
    }
}

#[cfg(test)]
mod tests {
    use super::{Recent, SETTLED_TTL_NS};

    #[test]
    fn a_settled_attempt_is_remembered_for_the_ttl_then_forgotten() {
        let mut r = Recent::default();
        let t0 = 1_000 * SETTLED_TTL_NS;
        drop(r.insert("a", t0));
        assert!(r.contains("a"));
        drop(r.insert("b", t0 + SETTLED_TTL_NS - 1));
        assert!(r.contains("a"), "remembered for the whole TTL");
        drop(r.insert("c", t0 + SETTLED_TTL_NS));
        assert!(r.contains("a") && r.contains("b") && r.contains("c"));
        drop(r.insert("d", t0 + 2 * SETTLED_TTL_NS));
        assert!(!r.contains("a"), "forgotten after two generations");
        assert!(r.contains("c") && r.contains("d"));
    }

    #[test]
    fn remembered_attempts_stay_bounded_by_the_rate_not_the_run() {
        let mut r = Recent::default();
        // One settlement a second for ten TTLs: at most two TTLs' worth are held.
        let per_ttl = (SETTLED_TTL_NS / 1_000_000_000) as usize;
        for i in 0..10 * per_ttl {
            drop(r.insert(&i.to_string(), i as i64 * 1_000_000_000));
        }
        let held = r.current.len() + r.previous.len();
        assert!(held <= 2 * per_ttl, "{held} held");
    }
}
