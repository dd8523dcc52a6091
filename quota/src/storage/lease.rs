//! Local-first admission: a gateway takes a slice (a lease) of each shared counter from Redis and
//! admits on its own until the slice runs out; only then does it call Redis again.
//!
//! A lease is taken by the same atomic script that admits a request (`lua/consume.lua`): when a
//! request is admitted, up to `fraction` of what remains after it is taken as well, the same number
//! of units from every counter of the request (capped by `max`; below `min` nothing is taken). So
//! the lease shrinks as the shared remainder shrinks, and near the limit every request goes to
//! Redis. Unused units are given back when the lease expires (`ttl`) and on graceful shutdown.
//!
//! **Bounds, across N gateways sharing one counter:**
//! - *Over-admission: none.* Every unit a gateway admits on its own was first taken from the shared
//!   counter by the atomic script, and a return only gives back units taken and not used. The
//!   fleet admits at most the limit, as it would without leases.
//! - *Under-admission: at most the units held in unexpired leases* — when the shared counter is
//!   exhausted, a request refused at one gateway could have been served by units another gateway
//!   holds. Each lease is at most `min(max, fraction × remainder when taken)`, so at most
//!   `N × max` units, for at most `ttl` (then they are returned), unless their holder uses them
//!   first. A gateway that dies without returning its leases loses them until the window resets
//!   (calendar quotas) or refills (rates).
//!
//! Requests with an idempotency key always go to Redis: their record must be shared.

use super::redis::{LeaseAsk, LeaseReturn, RedisStore};
use super::{ConsumeRequest, CounterKey, CounterReport, Outcome, Storage, StorageError};
use crate::limiter::Limit;
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

const SHARDS: usize = 64;

#[derive(Debug, Clone, Copy)]
pub struct LeaseConfig {
    /// Share of the remainder taken as a lease, in (0, 1].
    pub fraction: f64,
    /// Largest lease, in units.
    pub max: u64,
    /// Smallest lease worth taking: small remainders are not split.
    pub min: u64,
    /// Unused units are returned after this long.
    pub ttl: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            fraction: 1.0 / 16.0,
            max: 1000,
            min: 8,
            ttl: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct LeaseKey {
    counter: CounterKey,
    /// The calendar window the lease was taken in (0 for buckets).
    window: i64,
}

#[derive(Debug)]
struct Lease {
    units: u64,
    expires_ns: i64,
    redis_key: String,
    emission_ns: Option<i64>,
    /// The shared counter's remainder when the lease was last topped up.
    shared_remaining: u64,
}

pub struct LeasedStore {
    redis: RedisStore,
    shards: Box<[Mutex<HashMap<LeaseKey, Lease>>]>,
    hasher: RandomState,
    cfg: LeaseConfig,
    local_decisions: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn lease_key(c: &super::Counter) -> LeaseKey {
    LeaseKey {
        counter: c.key.clone(),
        window: match c.limit {
            Limit::Window { window, .. } => window,
            Limit::Bucket { .. } => 0,
        },
    }
}

impl LeasedStore {
    pub fn new(redis: RedisStore, cfg: LeaseConfig) -> Self {
        Self {
            redis,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            cfg,
            local_decisions: AtomicU64::new(0),
        }
    }

    pub fn redis(&self) -> &RedisStore {
        &self.redis
    }

    pub fn config(&self) -> LeaseConfig {
        self.cfg
    }

    /// Decisions taken from leases, without calling Redis.
    pub fn local_decisions(&self) -> u64 {
        self.local_decisions.load(Ordering::Relaxed)
    }

    /// Units currently held in leases (for tests and metrics).
    pub fn held_units(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| lock(s).values().map(|l| l.units).sum::<u64>())
            .sum()
    }

    fn shard(&self, subject: &str) -> &Mutex<HashMap<LeaseKey, Lease>> {
        &self.shards[(self.hasher.hash_one(subject) as usize) % SHARDS]
    }

    fn ask(&self) -> LeaseAsk {
        LeaseAsk {
            fraction_ppm: (self.cfg.fraction.clamp(0.0, 1.0) * 1_000_000.0) as u64,
            max: self.cfg.max,
            min: self.cfg.min.max(1),
        }
    }

    /// Admit from leases alone, if every counter holds enough; all counters of a request belong
    /// to one subject, so one shard lock covers them.
    fn try_local(&self, req: &ConsumeRequest<'_>) -> Option<Outcome> {
        let first = req.counters.first()?;
        if req
            .counters
            .iter()
            .any(|c| c.key.subject != first.key.subject)
        {
            return None;
        }
        let mut leases = lock(self.shard(&first.key.subject));
        let keys: Vec<LeaseKey> = req.counters.iter().map(lease_key).collect();
        let enough = keys.iter().zip(req.counters).all(|(k, c)| {
            leases
                .get(k)
                .is_some_and(|l| l.units >= c.cost && l.expires_ns > req.now_ns)
        });
        if !enough {
            return None;
        }
        let mut reports = Vec::with_capacity(keys.len());
        for (k, c) in keys.iter().zip(req.counters) {
            let l = leases.get_mut(k)?;
            l.units -= c.cost;
            reports.push(report(c.limit, l.shared_remaining + l.units, req.now_ns));
        }
        self.local_decisions.fetch_add(1, Ordering::Relaxed);
        Some(Outcome {
            allowed: true,
            counters: reports,
            replayed: false,
        })
    }

    fn add_leases(&self, req: &ConsumeRequest<'_>, units: u64, outcome: &mut Outcome) {
        for (c, r) in req.counters.iter().zip(outcome.counters.iter_mut()) {
            let mut leases = lock(self.shard(&c.key.subject));
            let l = leases.entry(lease_key(c)).or_insert_with(|| Lease {
                units: 0,
                expires_ns: 0,
                redis_key: self.redis.key(c),
                emission_ns: match c.limit {
                    Limit::Bucket { emission_ns, .. } => Some(emission_ns),
                    Limit::Window { .. } => None,
                },
                shared_remaining: 0,
            });
            l.units += units;
            l.expires_ns = req.now_ns.saturating_add(self.cfg.ttl.as_nanos() as i64);
            l.shared_remaining = r.remaining;
            // What this client may still use includes what this gateway holds for it.
            r.remaining += l.units;
        }
    }

    /// Give back the unused units of leases expired at `now_ns` (or of every lease with `all`).
    pub async fn return_leases(&self, now_ns: i64, all: bool) -> Result<(), StorageError> {
        let mut by_subject: HashMap<std::sync::Arc<str>, Vec<LeaseReturn>> = HashMap::new();
        for shard in self.shards.iter() {
            let mut leases = lock(shard);
            let expired: Vec<LeaseKey> = leases
                .iter()
                .filter(|(_, l)| all || l.expires_ns <= now_ns)
                .map(|(k, _)| k.clone())
                .collect();
            for k in expired {
                if let Some(l) = leases.remove(&k)
                    && l.units > 0
                {
                    by_subject
                        .entry(k.counter.subject.clone())
                        .or_default()
                        .push(LeaseReturn {
                            key: l.redis_key,
                            units: l.units,
                            emission_ns: l.emission_ns,
                        });
                }
            }
        }
        let mut result = Ok(());
        for items in by_subject.values() {
            if let Err(e) = self.redis.return_leases(now_ns, items).await {
                // The units stay taken until the window resets or the bucket refills.
                tracing::warn!(error = %e, counters = items.len(), "could not return unused lease units");
                result = Err(e);
            }
        }
        result
    }
}

/// A report for a counter admitted locally: `remaining` as far as this gateway knows.
fn report(limit: Limit, remaining: u64, now_ns: i64) -> CounterReport {
    let (cap, reset_after_ns) = match limit {
        Limit::Window {
            limit, reset_at_ns, ..
        } => (limit, (reset_at_ns - now_ns).max(0)),
        Limit::Bucket { emission_ns, burst } => (
            burst,
            emission_ns.saturating_mul(i64::try_from(burst.saturating_sub(remaining)).unwrap_or(0)),
        ),
    };
    CounterReport {
        allowed: true,
        limit: cap,
        remaining: remaining.min(cap),
        reset_after_ns,
        retry_after_ns: 0,
    }
}

impl Storage for LeasedStore {
    async fn settle(&self, req: &super::SettleRequest<'_>) -> Result<super::Settled, StorageError> {
        self.redis.settle(req).await
    }

    /// Units go back into this gateway's live lease of the counter (returned to Redis with it
    /// later), or straight to Redis when there is none.
    async fn release(&self, req: &super::ReleaseRequest<'_>) -> Result<(), StorageError> {
        let mut to_redis = Vec::new();
        for c in req.counters {
            let mut leases = lock(self.shard(&c.key.subject));
            match leases.get_mut(&lease_key(c)) {
                Some(l) if l.expires_ns > req.now_ns => l.units = l.units.saturating_add(c.cost),
                _ => to_redis.push(c.clone()),
            }
        }
        if to_redis.is_empty() {
            return Ok(());
        }
        let rest = super::ReleaseRequest {
            counters: &to_redis,
            now_ns: req.now_ns,
        };
        self.redis.release(&rest).await
    }

    async fn check_and_consume(&self, req: &ConsumeRequest<'_>) -> Result<Outcome, StorageError> {
        // Reservations and idempotent requests need their records in Redis; free probes (cost 0)
        // want the shared truth.
        let leasing = req.idempotency_key.is_none()
            && req.reservation.is_none()
            && req.counters.iter().all(|c| c.cost > 0);
        if leasing && let Some(o) = self.try_local(req) {
            return Ok(o);
        }
        let ask = if leasing {
            self.ask()
        } else {
            LeaseAsk::default()
        };
        let (mut outcome, lease) = self.redis.consume(req, ask).await?;
        if outcome.allowed && lease > 0 {
            self.add_leases(req, lease, &mut outcome);
        }
        Ok(outcome)
    }
}
