//! Local-first admission: a gateway takes a slice (a lease) of each shared counter from Redis and
//! admits on its own until the slice runs out; only then does it call Redis again.
//!
//! A lease is taken by the same atomic script that admits a request (`lua/consume.lua`): when a
//! request is admitted, up to `fraction` of what remains after it is taken as well, counted in
//! requests like this one: the same multiple `L` of the request's cost from every counter (so an
//! LLM call that reserves 1 request and 4,000 tokens leases `L` requests and `4,000 × L` tokens),
//! with `L` at most `max` and below `min` nothing taken. So the lease shrinks as the shared
//! remainder shrinks, and near the limit every request goes to Redis. Unused units are given back
//! when the lease expires (`ttl`) and on graceful shutdown.
//!
//! **Reservations** (an LLM call's worst case, held until it settles) are taken from leases too,
//! and settled against them: what was reserved and not used goes back into the lease, an overrun
//! is taken from the lease when it holds enough and otherwise charged in Redis under the attempt's
//! id. A steady stream of calls therefore costs Redis one round trip per lease, not two per call.
//! A reservation not settled by its expiry gives its units back, as an expired Redis reservation
//! stops counting. A settlement delivered twice within [`SETTLED_MEMORY`] charges once.
//!
//! **Bounds, across N gateways sharing one counter:**
//! - *Over-admission: none.* Every unit a gateway admits on its own was first taken from the shared
//!   counter by the atomic script, and a return only gives back units taken and not used. The
//!   fleet admits at most the limit, as it would without leases. (A call that uses more than it
//!   reserved is charged the overrun whether or not it fits, with or without leases.)
//! - *Under-admission: at most the units held in unexpired leases* — when the shared counter is
//!   exhausted, a request refused at one gateway could have been served by units another gateway
//!   holds. Each lease is at most `min(max × cost, fraction × remainder when taken)`, so at most
//!   `N × max` requests' worth, for at most `ttl` (then they are returned), unless their holder
//!   uses them first. A gateway that dies without returning its leases loses them (and the
//!   reservations it held) until the window resets (calendar quotas) or refills (rates).
//!
//! Requests with an idempotency key always go to Redis: their record must be shared.

use super::redis::{LeaseAsk, LeaseReturn, RedisStore};
use super::{
    ConsumeRequest, Counter, CounterKey, CounterReport, Outcome, ReleaseRequest, RenewRequest,
    SettleRequest, Settled, Storage, StorageError,
};
use crate::limiter::Limit;
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

const SHARDS: usize = 64;

/// How long a settled attempt is remembered, so that a second delivery charges nothing. Settlements
/// are delivered again only after a failed try (then the attempt is still held, see
/// [`Hold::Overrun`]) or after a restart, when this memory is gone anyway.
pub const SETTLED_MEMORY: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
pub struct LeaseConfig {
    /// Share of the remainder taken as a lease, in (0, 1].
    pub fraction: f64,
    /// Largest lease, in requests like the one that takes it.
    pub max: u64,
    /// Smallest lease worth taking, in requests: small remainders are not split.
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
    /// Units on their way back to Redis: still taken there, so still this gateway's to report.
    returning: u64,
    /// When the lease's calendar window ends (`None` for buckets): units of an ended window no
    /// longer count anywhere.
    window_ends_ns: Option<i64>,
}

/// An attempt reserved from leases.
#[derive(Debug)]
enum Hold {
    /// Each counter (as reserved: its window and limit) and the units taken for it.
    Reserved {
        counters: Vec<Counter>,
        expires_ns: i64,
    },
    /// Settled here except for an overrun the leases could not cover, which Redis has not taken
    /// yet (it was unreachable): a retry charges only that.
    Overrun(Vec<Counter>),
    /// Settled; a repeat charges nothing until `until_ns`.
    Settled { until_ns: i64 },
}

/// The leases and holds of the subjects hashed to one shard: all counters of a request belong to
/// one subject, so one lock covers a request.
#[derive(Default)]
struct Shard {
    leases: HashMap<LeaseKey, Lease>,
    holds: HashMap<Box<str>, Hold>,
}

pub struct LeasedStore {
    redis: RedisStore,
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    cfg: LeaseConfig,
    local_decisions: AtomicU64,
    local_settlements: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn lease_key(c: &Counter) -> LeaseKey {
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
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            hasher: RandomState::new(),
            cfg,
            local_decisions: AtomicU64::new(0),
            local_settlements: AtomicU64::new(0),
        }
    }

    pub fn redis(&self) -> &RedisStore {
        &self.redis
    }

    pub fn config(&self) -> LeaseConfig {
        self.cfg
    }

    /// Decisions (and reservations) taken from leases, without calling Redis.
    pub fn local_decisions(&self) -> u64 {
        self.local_decisions.load(Ordering::Relaxed)
    }

    /// Settlements made entirely against leases, without calling Redis.
    pub fn local_settlements(&self) -> u64 {
        self.local_settlements.load(Ordering::Relaxed)
    }

    /// Units currently held in leases (for tests and metrics); reserved units are not included.
    pub fn held_units(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| {
                lock(s)
                    .leases
                    .values()
                    .map(|l| l.units + l.returning)
                    .sum::<u64>()
            })
            .sum()
    }

    fn shard(&self, subject: &str) -> &Mutex<Shard> {
        &self.shards[(self.hasher.hash_one(subject) as usize) % SHARDS]
    }

    fn ttl_ns(&self) -> i64 {
        i64::try_from(self.cfg.ttl.as_nanos()).unwrap_or(i64::MAX)
    }

    fn ask(&self) -> LeaseAsk {
        LeaseAsk {
            fraction_ppm: (self.cfg.fraction.clamp(0.0, 1.0) * 1_000_000.0) as u64,
            max: self.cfg.max,
            min: self.cfg.min.max(1),
        }
    }

    /// Admit (or reserve) from leases alone, if every counter holds enough; with `take` false,
    /// only tell whether they would.
    fn try_local(&self, req: &ConsumeRequest<'_>, take: bool) -> Option<Outcome> {
        let first = req.counters.first()?;
        if req
            .counters
            .iter()
            .any(|c| c.key.subject != first.key.subject)
        {
            return None;
        }
        let mut shard = lock(self.shard(&first.key.subject));
        let keys: Vec<LeaseKey> = req.counters.iter().map(lease_key).collect();
        let enough = keys.iter().zip(req.counters).all(|(k, c)| {
            shard
                .leases
                .get(k)
                .is_some_and(|l| l.units >= c.cost && l.expires_ns > req.now_ns)
        });
        if !enough {
            return None;
        }
        let mut reports = Vec::with_capacity(keys.len());
        for (k, c) in keys.iter().zip(req.counters) {
            let l = shard.leases.get_mut(k)?;
            if take {
                l.units -= c.cost;
            }
            reports.push(report(c.limit, l.shared_remaining + l.units, req.now_ns));
        }
        if !take {
            return Some(Outcome {
                allowed: true,
                counters: reports,
                replayed: false,
            });
        }
        if let Some(r) = req.reservation {
            shard.holds.insert(
                r.attempt_id.into(),
                Hold::Reserved {
                    counters: req.counters.to_vec(),
                    expires_ns: r.expires_ns,
                },
            );
        }
        self.local_decisions.fetch_add(1, Ordering::Relaxed);
        Some(Outcome {
            allowed: true,
            counters: reports,
            replayed: false,
        })
    }

    /// Add a lease of `times` this request's cost to each of its counters.
    fn add_leases(&self, req: &ConsumeRequest<'_>, times: u64, outcome: &mut Outcome) {
        let expires_ns = req.now_ns.saturating_add(self.ttl_ns());
        for (c, r) in req.counters.iter().zip(outcome.counters.iter_mut()) {
            let mut shard = lock(self.shard(&c.key.subject));
            let l = shard
                .leases
                .entry(lease_key(c))
                .or_insert_with(|| self.empty_lease(c));
            l.units += times.saturating_mul(c.cost);
            l.expires_ns = expires_ns;
            l.shared_remaining = r.remaining;
            // What this client may still use includes what this gateway holds for it.
            r.remaining += l.units;
        }
    }

    /// Count what this gateway holds in leases in what each counter reports as remaining: Redis
    /// counts those units as taken, but they are this gateway's clients' to use or go back to
    /// Redis. Expired leases and units being returned count too, until Redis has them back.
    fn add_held(&self, req: &ConsumeRequest<'_>, outcome: &mut Outcome) {
        for (c, r) in req.counters.iter().zip(outcome.counters.iter_mut()) {
            let shard = lock(self.shard(&c.key.subject));
            if let Some(l) = shard.leases.get(&lease_key(c)) {
                let held = l.units.saturating_add(l.returning);
                r.remaining = r.remaining.saturating_add(held).min(r.limit);
            }
        }
    }

    fn empty_lease(&self, c: &Counter) -> Lease {
        Lease {
            units: 0,
            expires_ns: 0,
            redis_key: self.redis.key(c),
            emission_ns: match c.limit {
                Limit::Bucket { emission_ns, .. } => Some(emission_ns),
                Limit::Window { .. } => None,
            },
            shared_remaining: 0,
            returning: 0,
            window_ends_ns: match c.limit {
                Limit::Window { reset_at_ns, .. } => Some(reset_at_ns),
                Limit::Bucket { .. } => None,
            },
        }
    }

    /// Put `units` of counter `c`, taken from Redis earlier, back into this gateway's lease of it
    /// (a new lease when there is none), to be used or returned with it. Units of a window that
    /// has ended are dropped: they no longer count anywhere.
    fn credit(&self, shard: &mut Shard, c: &Counter, units: u64, now_ns: i64) {
        if units == 0 {
            return;
        }
        if let Limit::Window { reset_at_ns, .. } = c.limit
            && reset_at_ns <= now_ns
        {
            return;
        }
        let expires_ns = now_ns.saturating_add(self.ttl_ns());
        let l = shard.leases.entry(lease_key(c)).or_insert_with(|| Lease {
            expires_ns,
            ..self.empty_lease(c)
        });
        l.units = l.units.saturating_add(units);
    }

    /// Settle an attempt held here. `None`: it is not held here (reserved in Redis).
    fn settle_local(&self, req: &SettleRequest<'_>) -> Option<Result<Vec<Counter>, Settled>> {
        let first = req.counters.first()?;
        let mut guard = lock(self.shard(&first.key.subject));
        let shard = &mut *guard;
        let until_ns = req
            .now_ns
            .saturating_add(i64::try_from(SETTLED_MEMORY.as_nanos()).unwrap_or(i64::MAX));
        let hold = shard.holds.get_mut(req.attempt_id)?;
        if matches!(hold, Hold::Settled { .. }) {
            return Some(Err(Settled::AlreadySettled));
        }
        let reserved = match std::mem::replace(hold, Hold::Settled { until_ns }) {
            Hold::Reserved { counters, .. } => counters,
            Hold::Overrun(rest) => return Some(Ok(rest)),
            Hold::Settled { .. } => return Some(Err(Settled::AlreadySettled)),
        };
        let mut overrun = Vec::new();
        for c in req.counters {
            let key = lease_key(c);
            let held = reserved
                .iter()
                .find(|r| lease_key(r) == key)
                .map_or(0, |r| r.cost);
            if c.cost <= held {
                self.credit(shard, c, held - c.cost, req.now_ns);
                continue;
            }
            let extra = c.cost - held;
            match shard.leases.get_mut(&key) {
                Some(l) if l.units >= extra && l.expires_ns > req.now_ns => l.units -= extra,
                _ => overrun.push(Counter {
                    cost: extra,
                    ..c.clone()
                }),
            }
        }
        // Reserved counters the settlement does not name used nothing.
        for r in &reserved {
            let key = lease_key(r);
            if !req.counters.iter().any(|c| lease_key(c) == key) {
                self.credit(shard, r, r.cost, req.now_ns);
            }
        }
        Some(Ok(overrun))
    }

    /// Charge in Redis what the leases could not cover; on failure the attempt stays held with
    /// only that left to charge.
    async fn charge_overrun(
        &self,
        req: &SettleRequest<'_>,
        overrun: Vec<Counter>,
    ) -> Result<Settled, StorageError> {
        if overrun.is_empty() {
            self.local_settlements.fetch_add(1, Ordering::Relaxed);
            return Ok(Settled::Charged);
        }
        let rest = SettleRequest {
            counters: &overrun,
            ..*req
        };
        match self.redis.settle(&rest).await {
            // Already settled in Redis: an earlier try went through unheard.
            Ok(_) => Ok(Settled::Charged),
            Err(e) => {
                let subject = &overrun[0].key.subject;
                lock(self.shard(subject))
                    .holds
                    .insert(req.attempt_id.into(), Hold::Overrun(overrun));
                Err(e)
            }
        }
    }

    /// Give back the unused units of leases expired at `now_ns` (or of every lease with `all`);
    /// reservations past their expiry give their units back first, and settled attempts past
    /// [`SETTLED_MEMORY`] are forgotten.
    pub async fn return_leases(&self, now_ns: i64, all: bool) -> Result<(), StorageError> {
        let mut by_subject: HashMap<Arc<str>, Vec<(LeaseKey, LeaseReturn)>> = HashMap::new();
        for shard in self.shards.iter() {
            let mut guard = lock(shard);
            let shard = &mut *guard;
            let mut lapsed = Vec::new();
            shard.holds.retain(|_, h| match h {
                Hold::Reserved {
                    counters,
                    expires_ns,
                } if *expires_ns <= now_ns => {
                    lapsed.append(counters);
                    false
                }
                Hold::Settled { until_ns } => *until_ns > now_ns,
                _ => true,
            });
            for c in &lapsed {
                self.credit(shard, c, c.cost, now_ns);
            }
            let expired: Vec<LeaseKey> = shard
                .leases
                .iter()
                .filter(|(_, l)| all || l.expires_ns <= now_ns)
                .map(|(k, _)| k.clone())
                .collect();
            for k in expired {
                let Some(l) = shard.leases.get_mut(&k) else {
                    continue;
                };
                if l.window_ends_ns.is_some_and(|end| end <= now_ns) {
                    // That window is over in Redis too: nothing to give back.
                    l.units = 0;
                }
                if l.units > 0 {
                    // Kept in the map as `returning` until Redis has them, so that checks
                    // meanwhile still count them as this gateway's.
                    let units = std::mem::take(&mut l.units);
                    l.returning += units;
                    by_subject
                        .entry(k.counter.subject.clone())
                        .or_default()
                        .push((
                            k,
                            LeaseReturn {
                                key: l.redis_key.clone(),
                                units,
                                emission_ns: l.emission_ns,
                            },
                        ));
                } else if l.returning == 0 {
                    shard.leases.remove(&k);
                }
            }
        }
        let mut result = Ok(());
        for (subject, entries) in by_subject {
            let items: Vec<LeaseReturn> = entries.iter().map(|(_, r)| r.clone()).collect();
            let returned = self.redis.return_leases(now_ns, &items).await;
            if let Err(e) = &returned {
                tracing::warn!(error = %e, counters = items.len(), "could not return unused lease units; retrying later");
            }
            let mut shard = lock(self.shard(&subject));
            for (k, r) in entries {
                let Some(l) = shard.leases.get_mut(&k) else {
                    continue;
                };
                l.returning = l.returning.saturating_sub(r.units);
                match &returned {
                    // Redis was not reached: a window's units are tried again at the next pass
                    // (dropped once it ends); a bucket refills by itself, so its units are let
                    // go. A timeout may come after the script ran: returning the units again
                    // could give them back twice (admitting that many over the limit), so they
                    // are let go too, under-admitting at most them until the window ends.
                    Err(StorageError::Unavailable(_)) if l.window_ends_ns.is_some() => {
                        l.units += r.units
                    }
                    Err(e) if l.window_ends_ns.is_some() => {
                        tracing::warn!(error = %e, units = r.units, "lease units whose return may have been applied are not returned again");
                    }
                    _ => {}
                }
                if l.units == 0 && l.returning == 0 && (all || l.expires_ns <= now_ns) {
                    shard.leases.remove(&k);
                }
            }
            if let Err(e) = returned {
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
    fn covers(&self, req: &ConsumeRequest<'_>) -> Option<Outcome> {
        self.try_local(req, false)
    }

    async fn settle(&self, req: &SettleRequest<'_>) -> Result<Settled, StorageError> {
        match self.settle_local(req) {
            None => self.redis.settle(req).await,
            Some(Err(done)) => Ok(done),
            Some(Ok(overrun)) => self.charge_overrun(req, overrun).await,
        }
    }

    /// Units go back into this gateway's live lease of the counter (returned to Redis with it
    /// later), or straight to Redis when there is none.
    async fn release(&self, req: &ReleaseRequest<'_>) -> Result<(), StorageError> {
        let mut to_redis = Vec::new();
        for c in req.counters {
            let mut shard = lock(self.shard(&c.key.subject));
            match shard.leases.get_mut(&lease_key(c)) {
                Some(l) if l.expires_ns > req.now_ns => l.units = l.units.saturating_add(c.cost),
                _ => to_redis.push(c.clone()),
            }
        }
        if to_redis.is_empty() {
            return Ok(());
        }
        let rest = ReleaseRequest {
            counters: &to_redis,
            now_ns: req.now_ns,
        };
        self.redis.release(&rest).await
    }

    /// A hold taken from leases is renewed here; any other is in Redis.
    async fn renew(&self, req: &RenewRequest<'_>) -> Result<(), StorageError> {
        let Some(first) = req.counters.first() else {
            return Ok(());
        };
        {
            let mut shard = lock(self.shard(&first.key.subject));
            if let Some(hold) = shard.holds.get_mut(req.attempt_id) {
                if let Hold::Reserved { expires_ns, .. } = hold
                    && *expires_ns > req.now_ns
                    && req.expires_ns > *expires_ns
                {
                    *expires_ns = req.expires_ns;
                }
                return Ok(());
            }
        }
        self.redis.renew(req).await
    }

    async fn check_and_consume(&self, req: &ConsumeRequest<'_>) -> Result<Outcome, StorageError> {
        // Idempotent requests need their record in Redis; free probes (cost 0) want the shared
        // truth.
        // A `concurrent` limit (a window that never ends) is not leased: a slot is held for as
        // long as its call runs, which no lease ttl bounds, and a slot lost on the way back
        // would stay taken for good.
        let leasing = req.idempotency_key.is_none()
            && req.counters.iter().any(|c| c.cost > 0)
            && !req.counters.iter().any(|c| c.limit.is_everlasting());
        if leasing && let Some(o) = self.try_local(req, true) {
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
        } else {
            self.add_held(req, &mut outcome);
        }
        Ok(outcome)
    }
}
