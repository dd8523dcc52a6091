//! Where counters live. One async trait, `Storage`, takes from several counters at once, all or
//! nothing; its error says whether the failure is transient, which drives the policy's failure
//! mode. Backends: `memory` (the embedded default), `redis` (shared by a fleet of gateways) and
//! `lease` (Redis with local-first admission); `AnyStore` picks one at run time.

pub mod lease;
pub mod memory;
pub mod redis;

pub use lease::{LeaseConfig, LeasedStore};
pub use memory::MemoryStore;
pub use redis::{RedisConfig, RedisStore};

/// `url` without its password (`redis://:***@host`, `postgres://user:***@host/db`), for logs and
/// messages: a URL may carry a credential, a log line must not.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => match url[s + 3..at].split_once(':') {
            Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
            None => url.to_string(),
        },
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_are_taken_out_of_urls() {
        for (url, want) in [
            (
                "redis://:s3cret@127.0.0.1:6379",
                "redis://:***@127.0.0.1:6379",
            ),
            ("postgres://app:pw@db/x", "postgres://app:***@db/x"),
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
            ("rediss://user@host", "rediss://user@host"),
        ] {
            assert_eq!(super::redact_url(url), want);
        }
    }
}

use crate::limiter::Limit;
use crate::policy::Slot;
use std::future::Future;
use std::sync::Arc;

/// Identifies one counter: a subject's quota type at one slot (second, day, ...). Cloning is cheap.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CounterKey {
    pub subject: Arc<str>,
    pub quota: Arc<str>,
    pub slot: Slot,
}

/// A counter, the limit it is checked against for this request, and what the request costs it.
#[derive(Debug, Clone)]
pub struct Counter {
    pub key: CounterKey,
    pub limit: Limit,
    pub cost: u64,
}

/// Take each counter's cost from every counter, or from none.
#[derive(Debug, Clone, Copy)]
pub struct ConsumeRequest<'a> {
    pub counters: &'a [Counter],
    pub now_ns: i64,
    /// When set, a repeat of the same key returns the first outcome and consumes nothing more;
    /// a repeat that asks for something else (`fingerprint`) is refused
    /// (`StorageError::IdempotencyConflict`), so one key cannot buy a free pass for another request.
    pub idempotency_key: Option<&'a str>,
    /// What the request asks for (quota types and costs), compared on a repeat of its key.
    pub fingerprint: &'a str,
    /// When set, the costs are held for this attempt until it settles (`Storage::settle`) or the
    /// reservation expires; an expired reservation no longer counts against calendar quotas.
    pub reservation: Option<Reservation<'a>>,
}

#[derive(Debug, Clone, Copy)]
pub struct Reservation<'a> {
    /// One upstream attempt: each attempt is reserved and settled once.
    pub attempt_id: &'a str,
    pub expires_ns: i64,
}

/// Replace an attempt's reservation with what it really used (each counter's `cost` is the
/// actual amount, which may be more or less than reserved). Idempotent per attempt.
#[derive(Debug, Clone, Copy)]
pub struct SettleRequest<'a> {
    /// Built at the reservation's time, so they name the windows reserved in.
    pub counters: &'a [Counter],
    pub attempt_id: &'a str,
    pub now_ns: i64,
}

/// Keep an attempt's reservation held until `expires_ns`: a call still in flight (a long stream, a
/// slow answer) renews it, so it does not stop counting while it runs. A reservation already
/// settled or expired is left as it is.
#[derive(Debug, Clone, Copy)]
pub struct RenewRequest<'a> {
    /// Built at the reservation's time, so they name the windows reserved in.
    pub counters: &'a [Counter],
    pub attempt_id: &'a str,
    pub expires_ns: i64,
    pub now_ns: i64,
}

/// Units given back: a request admitted (its `cost` consumed) that never reached its upstream.
/// The counters are built at the decision's time, so they name the windows consumed in.
#[derive(Debug, Clone, Copy)]
pub struct ReleaseRequest<'a> {
    pub counters: &'a [Counter],
    pub now_ns: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// The reservation (if still held) was replaced by the actual amounts.
    Charged,
    /// This attempt was settled before: nothing changed.
    AlreadySettled,
}

/// One counter's state after the decision, in the order of `ConsumeRequest::counters`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterReport {
    pub allowed: bool,
    pub limit: u64,
    pub remaining: u64,
    pub reset_after_ns: i64,
    pub retry_after_ns: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub allowed: bool,
    pub counters: Vec<CounterReport>,
    /// True when this is the stored outcome of an earlier request with the same idempotency key.
    pub replayed: bool,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StorageError {
    #[error("counter store unavailable: {0}")]
    Unavailable(String),
    #[error("counter store did not answer within {0} ms")]
    Timeout(u64),
    #[error("counter store rejected the operation: {0}")]
    Rejected(String),
    #[error("the idempotency key was first used for a different request")]
    IdempotencyConflict,
}

impl StorageError {
    /// Transient errors may succeed on retry and trigger the policy's failure mode; the others are
    /// bugs or misconfiguration.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StorageError::Unavailable(_) | StorageError::Timeout(_)
        )
    }
}

pub trait Storage: Send + Sync + 'static {
    fn check_and_consume(
        &self,
        req: &ConsumeRequest<'_>,
    ) -> impl Future<Output = Result<Outcome, StorageError>> + Send;

    fn settle(
        &self,
        req: &SettleRequest<'_>,
    ) -> impl Future<Output = Result<Settled, StorageError>> + Send;

    /// Whether `req`'s costs would fit, told by this store alone without a round trip (leases in
    /// hand that cover them), consuming nothing: the counters as far as it knows. `None`: it
    /// cannot tell without asking.
    fn covers(&self, _req: &ConsumeRequest<'_>) -> Option<Outcome> {
        None
    }

    /// Give back each counter's `cost` (never below empty: a window that has moved on or a bucket
    /// already full keeps its state).
    fn release(
        &self,
        req: &ReleaseRequest<'_>,
    ) -> impl Future<Output = Result<(), StorageError>> + Send;

    /// Move a live reservation's expiry (`RenewRequest`).
    fn renew(
        &self,
        req: &RenewRequest<'_>,
    ) -> impl Future<Output = Result<(), StorageError>> + Send;
}

/// The backend chosen by configuration.
pub enum AnyStore {
    Memory(MemoryStore),
    /// Boxed: much larger than the memory store, and there is one per gateway.
    Redis(Box<RedisStore>),
    /// Redis with local-first admission from leases.
    Leased(Box<LeasedStore>),
}

impl AnyStore {
    /// The Redis store underneath, if any.
    pub fn redis(&self) -> Option<&RedisStore> {
        match self {
            AnyStore::Memory(_) => None,
            AnyStore::Redis(r) => Some(r),
            AnyStore::Leased(l) => Some(l.redis()),
        }
    }
}

impl Storage for AnyStore {
    async fn check_and_consume(&self, req: &ConsumeRequest<'_>) -> Result<Outcome, StorageError> {
        match self {
            AnyStore::Memory(s) => s.check_and_consume(req).await,
            AnyStore::Redis(s) => s.check_and_consume(req).await,
            AnyStore::Leased(s) => s.check_and_consume(req).await,
        }
    }

    async fn settle(&self, req: &SettleRequest<'_>) -> Result<Settled, StorageError> {
        match self {
            AnyStore::Memory(s) => s.settle(req).await,
            AnyStore::Redis(s) => s.settle(req).await,
            AnyStore::Leased(s) => s.settle(req).await,
        }
    }

    fn covers(&self, req: &ConsumeRequest<'_>) -> Option<Outcome> {
        match self {
            AnyStore::Leased(s) => s.covers(req),
            _ => None,
        }
    }

    async fn release(&self, req: &ReleaseRequest<'_>) -> Result<(), StorageError> {
        match self {
            AnyStore::Memory(s) => s.release(req).await,
            AnyStore::Redis(s) => s.release(req).await,
            AnyStore::Leased(s) => s.release(req).await,
        }
    }

    async fn renew(&self, req: &RenewRequest<'_>) -> Result<(), StorageError> {
        match self {
            AnyStore::Memory(s) => s.renew(req).await,
            AnyStore::Redis(s) => s.renew(req).await,
            AnyStore::Leased(s) => s.renew(req).await,
        }
    }
}
