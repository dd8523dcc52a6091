//! Shared counters in Redis (single server or Cluster), changed only by the scripts in `lua/`.
//!
//! Every call has a timeout well under a request's budget, and a circuit breaker stops calling a
//! Redis that keeps failing: while it is open, calls fail at once (a dead Redis costs nothing per
//! request) and one call is let through every `open_for` to probe for recovery.
//!
//! Key layout: `{prefix}:{<subject>}:<quota>:<slot>` for buckets and
//! `{prefix}:{<subject>}:<quota>:day:2026-11-22` (or `month:2026-11`) for calendar windows; the
//! hash tag keeps every key of a subject on one Cluster slot, so one script can touch them all.

use super::{
    ConsumeRequest, Counter, CounterReport, Outcome, ReleaseRequest, RenewRequest, SettleRequest,
    Settled, Storage, StorageError,
};
use crate::limiter::Limit;
use crate::policy::Slot;
use chrono::NaiveDate;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::OnceCell;

const CONSUME: &str = include_str!("../../../lua/consume.lua");
const LEASE_RETURN: &str = include_str!("../../../lua/lease_return.lua");
const SETTLE: &str = include_str!("../../../lua/settle.lua");
const RENEW: &str = include_str!("../../../lua/renew.lua");
/// How long a decision stays replayable by its idempotency key.
const IDEMPOTENCY_TTL_MS: u64 = 24 * 3600 * 1000;
/// Calendar-window keys outlive their window by a day, so yesterday's count can be reconciled.
const WINDOW_GRACE_MS: u64 = 24 * 3600 * 1000;

#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// One `redis://` URL for a single server, several for the nodes of a Cluster.
    pub urls: Vec<String>,
    pub cluster: bool,
    /// Prefix of every key (lets tests and tenants share one Redis).
    pub prefix: String,
    /// Limit on each call, connection included.
    pub timeout: Duration,
    /// Consecutive failures that open the circuit.
    pub breaker_threshold: u32,
    /// How long the circuit stays open before one call probes Redis again.
    pub breaker_open_for: Duration,
}

impl RedisConfig {
    pub fn new(urls: Vec<String>) -> Self {
        Self {
            cluster: urls.len() > 1,
            urls,
            prefix: "tg".into(),
            timeout: Duration::from_millis(50),
            breaker_threshold: 3,
            breaker_open_for: Duration::from_millis(500),
        }
    }
}

enum Conn {
    Single(ConnectionManager),
    /// Boxed: a cluster client is large and there is one per store.
    Cluster(Box<ClusterConn>),
}

struct ClusterConn {
    client: ClusterClient,
    conn: OnceCell<ClusterConnection>,
}

pub struct RedisStore {
    conn: Conn,
    consume: redis::Script,
    lease_return: redis::Script,
    settle: redis::Script,
    renew: redis::Script,
    prefix: String,
    timeout: Duration,
    breaker: Breaker,
    calls: AtomicU64,
    errors: AtomicU64,
}

/// What the gateway shows about its backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendStats {
    pub calls: u64,
    pub errors: u64,
    pub up: bool,
}

impl RedisStore {
    /// Create the store without connecting (the connection is made on first use, so a gateway
    /// starts even while Redis is down). Must run inside a Tokio runtime, which then drives the
    /// connection for the store's life.
    pub fn new(cfg: &RedisConfig) -> Result<Self, StorageError> {
        let bad =
            |e: redis::RedisError| StorageError::Rejected(format!("redis configuration: {e}"));
        let conn = if cfg.cluster {
            let client = ClusterClient::builder(cfg.urls.clone())
                .connection_timeout(cfg.timeout)
                .response_timeout(cfg.timeout)
                .retries(0)
                .build()
                .map_err(bad)?;
            Conn::Cluster(Box::new(ClusterConn {
                client,
                conn: OnceCell::new(),
            }))
        } else {
            let url = cfg.urls.first().ok_or_else(|| {
                StorageError::Rejected("redis configuration: no URL given".into())
            })?;
            let client = redis::Client::open(url.as_str()).map_err(bad)?;
            let mgr_cfg = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(cfg.timeout))
                .set_response_timeout(Some(cfg.timeout))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_millis(200));
            Conn::Single(ConnectionManager::new_lazy_with_config(client, mgr_cfg).map_err(bad)?)
        };
        Ok(Self {
            conn,
            consume: redis::Script::new(CONSUME),
            lease_return: redis::Script::new(LEASE_RETURN),
            settle: redis::Script::new(SETTLE),
            renew: redis::Script::new(RENEW),
            prefix: cfg.prefix.clone(),
            timeout: cfg.timeout,
            breaker: Breaker::new(cfg.breaker_threshold, cfg.breaker_open_for),
            calls: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        })
    }

    pub fn stats(&self) -> BackendStats {
        BackendStats {
            calls: self.calls.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            up: self.breaker.is_closed(),
        }
    }

    /// The Redis key of a counter at this moment.
    pub fn key(&self, c: &Counter) -> String {
        let mut k =
            String::with_capacity(self.prefix.len() + c.key.subject.len() + c.key.quota.len() + 24);
        let _ = write!(
            k,
            "{}:{{{}}}:{}:{}",
            self.prefix,
            c.key.subject,
            c.key.quota,
            c.key.slot.name()
        );
        if let Limit::Window { window, .. } = c.limit {
            match c.key.slot {
                // One everlasting window: nothing to add.
                Slot::Concurrent => {}
                Slot::Month => {
                    let _ = write!(
                        k,
                        ":{:04}-{:02}",
                        window.div_euclid(12),
                        window.rem_euclid(12) + 1
                    );
                }
                _ => {
                    let day = i32::try_from(window)
                        .ok()
                        .and_then(NaiveDate::from_num_days_from_ce_opt);
                    match day {
                        Some(d) => {
                            let _ = write!(k, ":{d}");
                        }
                        None => {
                            let _ = write!(k, ":{window}");
                        }
                    }
                }
            }
        }
        k
    }

    /// Run `f` on a connection, with the timeout and the circuit breaker.
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, StorageError>
    where
        F: FnOnce(ConnRef) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        if !self.breaker.allow() {
            return Err(StorageError::Unavailable(
                "circuit open after repeated failures".into(),
            ));
        }
        self.calls.fetch_add(1, Ordering::Relaxed);
        let result = tokio::time::timeout(self.timeout, async {
            let conn = match &self.conn {
                Conn::Single(m) => ConnRef::Single(m.clone()),
                Conn::Cluster(cc) => {
                    let c = cc
                        .conn
                        .get_or_try_init(|| cc.client.get_async_connection())
                        .await?;
                    ConnRef::Cluster(c.clone())
                }
            };
            f(conn).await
        })
        .await;
        let err = match result {
            Ok(Ok(v)) => {
                self.breaker.success();
                return Ok(v);
            }
            Ok(Err(e)) if is_transient(&e) => StorageError::Unavailable(e.to_string()),
            Ok(Err(e)) => StorageError::Rejected(e.to_string()),
            Err(_) => StorageError::Timeout(self.timeout.as_millis() as u64),
        };
        self.errors.fetch_add(1, Ordering::Relaxed);
        if err.is_transient() {
            self.breaker.failure();
        }
        Err(err)
    }
}

fn is_transient(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_unrecoverable_error()
        || e.is_cluster_error()
}

/// An owned handle on a connection (both kinds multiplex, so clones are cheap).
enum ConnRef {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for ConnRef {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            ConnRef::Single(c) => c.req_packed_command(cmd),
            ConnRef::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            ConnRef::Single(c) => c.req_packed_commands(cmd, offset, count),
            ConnRef::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            ConnRef::Single(c) => c.get_db(),
            ConnRef::Cluster(c) => c.get_db(),
        }
    }
}

/// How large a lease a consume may take, in requests like it (see `lua/consume.lua`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LeaseAsk {
    /// Share of the remainder after the cost, in parts per million; 0 asks for no lease.
    pub fraction_ppm: u64,
    pub max: u64,
    pub min: u64,
}

/// Unused units of a lease to give back to one counter.
#[derive(Debug, Clone)]
pub struct LeaseReturn {
    pub key: String,
    pub units: u64,
    /// `Some(emission)` for a bucket, `None` for a calendar window.
    pub emission_ns: Option<i64>,
}

impl Storage for RedisStore {
    async fn check_and_consume(&self, req: &ConsumeRequest<'_>) -> Result<Outcome, StorageError> {
        self.consume(req, LeaseAsk::default()).await.map(|(o, _)| o)
    }

    async fn settle(&self, req: &SettleRequest<'_>) -> Result<Settled, StorageError> {
        self.settle_attempt(req).await
    }

    /// The same adjustment as giving back an unused lease (`lua/lease_return.lua`).
    async fn release(&self, req: &ReleaseRequest<'_>) -> Result<(), StorageError> {
        let items: Vec<LeaseReturn> = req
            .counters
            .iter()
            .filter(|c| c.cost > 0)
            .map(|c| LeaseReturn {
                key: self.key(c),
                units: c.cost,
                emission_ns: match c.limit {
                    Limit::Bucket { emission_ns, .. } => Some(emission_ns),
                    Limit::Window { .. } => None,
                },
            })
            .collect();
        self.return_leases(req.now_ns, &items).await
    }

    async fn renew(&self, req: &RenewRequest<'_>) -> Result<(), StorageError> {
        if req.counters.is_empty() {
            return Ok(());
        }
        let mut inv = self.renew.prepare_invoke();
        for c in req.counters {
            inv.key(format!("{}:r", self.key(c)));
        }
        inv.arg(req.now_ns / 1000)
            .arg(req.attempt_id)
            .arg(req.expires_ns / 1000);
        let _renewed: i64 = self
            .call(|mut conn| async move { inv.invoke_async(&mut conn).await })
            .await?;
        Ok(())
    }
}

/// A bucket's emission interval in microseconds (the scripts' unit), to the nanosecond: whole
/// microseconds would refill a 35M-per-minute bucket (1,714 ns) every 1 µs, 71% over its rate.
fn emission_us(emission_ns: i64) -> String {
    // Never zero: the scripts divide by it.
    let emission_ns = emission_ns.max(1);
    format!("{}.{:03}", emission_ns / 1000, emission_ns % 1000)
}

/// Four script arguments per counter: kind, two limit parameters, cost (see `lua/consume.lua`).
fn push_counter_args(inv: &mut redis::ScriptInvocation<'_>, counters: &[Counter]) {
    for c in counters {
        match c.limit {
            Limit::Bucket { emission_ns, burst } => {
                inv.arg("b")
                    .arg(emission_us(emission_ns))
                    .arg(burst)
                    .arg(c.cost);
            }
            Limit::Window {
                limit, reset_at_ns, ..
            } => {
                inv.arg("w").arg(limit).arg(reset_at_ns / 1000).arg(c.cost);
            }
        }
    }
}

impl RedisStore {
    /// Check and consume like `Storage::check_and_consume`, also taking a lease of up to `ask`
    /// more requests like this one when admitted. Returns the lease granted, in requests: each
    /// counter's lease is that many times its cost (0 for none).
    pub async fn consume(
        &self,
        req: &ConsumeRequest<'_>,
        ask: LeaseAsk,
    ) -> Result<(Outcome, u64), StorageError> {
        let Some(first) = req.counters.first() else {
            let none = Outcome {
                allowed: true,
                counters: Vec::new(),
                replayed: false,
            };
            return Ok((none, 0));
        };
        let mut inv = self.consume.prepare_invoke();
        let idem_key = format!(
            "{}:{{{}}}:idem:{}",
            self.prefix,
            first.key.subject,
            req.idempotency_key.unwrap_or("-")
        );
        inv.key(idem_key);
        for c in req.counters {
            // Keys go in pairs: the counter, then its reservations.
            let k = self.key(c);
            let r = format!("{k}:r");
            inv.key(k).key(r);
        }
        inv.arg(req.now_ns / 1000)
            .arg(if req.idempotency_key.is_some() {
                // Never empty for an idempotent request: empty means "not idempotent".
                format!("={}", req.fingerprint)
            } else {
                String::new()
            })
            .arg(IDEMPOTENCY_TTL_MS)
            .arg(WINDOW_GRACE_MS)
            .arg(ask.fraction_ppm)
            .arg(ask.max)
            .arg(ask.min)
            .arg(req.reservation.map_or("", |r| r.attempt_id))
            .arg(req.reservation.map_or(0, |r| r.expires_ns / 1000));
        push_counter_args(&mut inv, req.counters);
        let reply: Vec<i64> = self
            .call(|mut conn| async move { inv.invoke_async(&mut conn).await })
            .await?;
        parse_reply(&reply, req.counters.len())
    }

    /// Replace an attempt's reservation with its actual amounts (`Storage::settle`).
    async fn settle_attempt(&self, req: &SettleRequest<'_>) -> Result<Settled, StorageError> {
        let Some(first) = req.counters.first() else {
            return Ok(Settled::Charged);
        };
        let mut inv = self.settle.prepare_invoke();
        inv.key(format!(
            "{}:{{{}}}:settled:{}",
            self.prefix, first.key.subject, req.attempt_id
        ));
        for c in req.counters {
            let k = self.key(c);
            let r = format!("{k}:r");
            inv.key(k).key(r);
        }
        inv.arg(req.now_ns / 1000)
            .arg(req.attempt_id)
            .arg(IDEMPOTENCY_TTL_MS)
            .arg(WINDOW_GRACE_MS);
        push_counter_args(&mut inv, req.counters);
        let charged: i64 = self
            .call(|mut conn| async move { inv.invoke_async(&mut conn).await })
            .await?;
        Ok(if charged == 1 {
            Settled::Charged
        } else {
            Settled::AlreadySettled
        })
    }

    /// Give back unused lease units. All `items` must belong to one subject (one hash slot).
    pub async fn return_leases(
        &self,
        now_ns: i64,
        items: &[LeaseReturn],
    ) -> Result<(), StorageError> {
        if items.is_empty() {
            return Ok(());
        }
        let mut inv = self.lease_return.prepare_invoke();
        inv.arg(now_ns / 1000);
        for it in items {
            inv.key(&it.key);
            match it.emission_ns {
                Some(e) => inv.arg("b").arg(it.units).arg(emission_us(e)),
                None => inv.arg("w").arg(it.units).arg(0),
            };
        }
        let _: i64 = self
            .call(|mut conn| async move { inv.invoke_async(&mut conn).await })
            .await?;
        Ok(())
    }
}

fn parse_reply(reply: &[i64], n: usize) -> Result<(Outcome, u64), StorageError> {
    if reply == [-1] {
        return Err(StorageError::IdempotencyConflict);
    }
    if reply.len() != 3 + 5 * n {
        return Err(StorageError::Rejected(format!(
            "consume script answered {} values for {n} counters",
            reply.len()
        )));
    }
    let counters = reply[3..]
        .chunks_exact(5)
        .map(|r| CounterReport {
            allowed: r[0] == 1,
            limit: u64::try_from(r[1]).unwrap_or(0),
            remaining: u64::try_from(r[2]).unwrap_or(0),
            reset_after_ns: r[3].saturating_mul(1000),
            retry_after_ns: r[4].saturating_mul(1000),
        })
        .collect();
    let outcome = Outcome {
        allowed: reply[0] == 1,
        counters,
        replayed: reply[1] == 1,
    };
    Ok((outcome, u64::try_from(reply[2]).unwrap_or(0)))
}

/// Closed (calls go through) until `threshold` consecutive transient failures; then open for
/// `open_for`, after which a single call probes: success closes it, failure re-opens it.
struct Breaker {
    failures: AtomicU32,
    /// Milliseconds since `epoch` until which the circuit is open; 0 = closed.
    open_until_ms: AtomicI64,
    epoch: Instant,
    threshold: u32,
    open_for_ms: i64,
}

impl Breaker {
    fn new(threshold: u32, open_for: Duration) -> Self {
        Self {
            failures: AtomicU32::new(0),
            open_until_ms: AtomicI64::new(0),
            epoch: Instant::now(),
            threshold: threshold.max(1),
            open_for_ms: i64::try_from(open_for.as_millis())
                .unwrap_or(i64::MAX)
                .max(1),
        }
    }

    fn now_ms(&self) -> i64 {
        // +1 so that "now" is never 0, the closed marker.
        i64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(i64::MAX) + 1
    }

    fn is_closed(&self) -> bool {
        self.open_until_ms.load(Ordering::Relaxed) == 0
    }

    fn allow(&self) -> bool {
        let until = self.open_until_ms.load(Ordering::Relaxed);
        if until == 0 {
            return true;
        }
        let now = self.now_ms();
        // Past the open period: exactly one caller wins the right to probe.
        now >= until
            && self
                .open_until_ms
                .compare_exchange(
                    until,
                    now + self.open_for_ms,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    fn success(&self) {
        self.failures.store(0, Ordering::Relaxed);
        if self.open_until_ms.swap(0, Ordering::AcqRel) != 0 {
            tracing::info!("redis reachable again; circuit closed");
        }
    }

    fn failure(&self) {
        let f = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if f >= self.threshold {
            let until = self.now_ms() + self.open_for_ms;
            if self.open_until_ms.swap(until, Ordering::AcqRel) == 0 {
                tracing::warn!(failures = f, "redis unreachable; circuit open");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_opens_after_threshold_and_lets_one_probe_through() {
        let b = Breaker::new(2, Duration::from_millis(30));
        b.failure();
        assert!(b.allow(), "one failure is below the threshold");
        b.failure();
        assert!(!b.is_closed());
        assert!(!b.allow(), "open: calls fail at once");
        std::thread::sleep(Duration::from_millis(35));
        assert!(b.allow(), "the first call after the open period probes");
        assert!(!b.allow(), "only one probe");
        b.success();
        assert!(b.is_closed() && b.allow());
    }
}
