//! The decision path: resolve a subject's limits for a quota type from the enforced policy snapshot,
//! then check-and-consume them in the storage backend. Also owns the snapshot handle (`ArcSwap`):
//! readers never lock; a reload builds a whole new `Policy` and stores it in one step.

use crate::limiter::Limit;
use crate::policy::{FailureMode, FailurePolicy, LimitSpec, Policy, QuotaLimits, Slot, Subject};
use crate::storage::{
    ConsumeRequest, Counter, CounterKey, MemoryStore, Outcome, RenewRequest, Reservation,
    SettleRequest, Settled, Storage, StorageError,
};
use arc_swap::ArcSwap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// The enforced policy plus what the last load attempt said.
pub struct PolicyHandle {
    current: ArcSwap<Policy>,
    status: Mutex<LoadStatus>,
}

#[derive(Debug, Clone)]
pub struct LoadStatus {
    pub loaded_at: SystemTime,
    /// The last failed load, when it happened after the last successful one.
    pub last_error: Option<(String, SystemTime)>,
}

impl PolicyHandle {
    pub fn new(policy: Policy) -> Self {
        Self {
            current: ArcSwap::from_pointee(policy),
            status: Mutex::new(LoadStatus {
                loaded_at: SystemTime::now(),
                last_error: None,
            }),
        }
    }

    /// The enforced policy; cheap, lock-free.
    pub fn load(&self) -> arc_swap::Guard<Arc<Policy>> {
        self.current.load()
    }

    /// The enforced policy as an owned `Arc`, for holding across awaits.
    pub fn load_full(&self) -> Arc<Policy> {
        self.current.load_full()
    }

    pub fn replace(&self, policy: Policy) {
        self.current.store(Arc::new(policy));
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        s.loaded_at = SystemTime::now();
        s.last_error = None;
    }

    /// Record a rejected policy; the enforced one stays. Keeps the time of the first failure of a
    /// run of failures, so `/status` says since when the file has been broken.
    pub fn record_error(&self, error: String) {
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        let since = s
            .last_error
            .as_ref()
            .map_or_else(SystemTime::now, |(_, t)| *t);
        s.last_error = Some((error, since));
    }

    pub fn status(&self) -> LoadStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Why a request was allowed or refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    WithinLimits,
    Unlimited,
    QuotaExceeded,
    /// The subject's tier does not include this quota type.
    NotInTier,
}

/// One limit's state after a decision, ready for headers and bodies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitState {
    /// The quota type this limit belongs to.
    pub quota_type: Arc<str>,
    pub slot: Slot,
    /// Nominal quota units per window, for `RateLimit-Policy`.
    pub quota: u64,
    pub window_s: i64,
    /// Capacity: burst of a rate, limit of a calendar quota.
    pub limit: u64,
    pub remaining: u64,
    pub reset_after_ns: i64,
    pub retry_after_ns: i64,
    pub allowed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub reason: Reason,
    pub limits: Vec<LimitState>,
    /// A repeat of an earlier request id: this is the first decision, nothing was consumed.
    pub replayed: bool,
    pub now_ns: i64,
    /// Decided by this gateway alone because the shared store was unreachable (`fail_open` or
    /// `local`).
    pub degraded: Option<FailureMode>,
    /// The `RateLimit-Policy` value of the limits decided (built at policy load).
    pub policy_header: Option<Arc<str>>,
}

impl Decision {
    /// The limit that matters most to the client: the one refusing (longest wait) when refused,
    /// else the one with the least remaining.
    pub fn binding(&self) -> Option<&LimitState> {
        if self.allowed {
            self.limits.iter().min_by_key(|l| l.remaining)
        } else {
            self.limits
                .iter()
                .filter(|l| !l.allowed)
                .max_by_key(|l| l.retry_after_ns)
        }
    }

    pub fn retry_after_ns(&self) -> i64 {
        self.binding().map_or(0, |l| l.retry_after_ns)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl EngineError {
    /// Worth retrying: the store may answer later.
    pub fn is_transient(&self) -> bool {
        match self {
            EngineError::Storage(e) => e.is_transient(),
        }
    }
}

pub struct Engine<S> {
    store: S,
    /// Counters of this gateway alone, used while the shared store is unreachable.
    fallback: MemoryStore,
}

impl<S: Storage> Engine<S> {
    pub fn new(store: S) -> Self {
        Self {
            store,
            fallback: MemoryStore::new(),
        }
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn fallback(&self) -> &MemoryStore {
        &self.fallback
    }

    /// `decide` with the default failure policy (`fail_closed`).
    pub async fn check(
        &self,
        subject: &Subject,
        quota: &str,
        cost: u64,
        request_id: Option<&str>,
        now_ns: i64,
    ) -> Result<Decision, EngineError> {
        self.decide(
            subject,
            quota,
            cost,
            request_id,
            now_ns,
            FailurePolicy::default(),
        )
        .await
    }

    /// Check and consume `cost` units of `quota` for `subject` at `now_ns`. With a `request_id`, a
    /// repeat returns the first decision and consumes nothing. When the store is unreachable,
    /// `failure` says what to do: refuse (`fail_closed`: the error is returned), admit and count
    /// locally (`fail_open`), or enforce `local_share` of every limit locally (`local`).
    pub async fn decide(
        &self,
        subject: &Subject,
        quota: &str,
        cost: u64,
        request_id: Option<&str>,
        now_ns: i64,
        failure: FailurePolicy,
    ) -> Result<Decision, EngineError> {
        let idempotency_key = request_id.map(|r| format!("{}\u{1f}{r}", subject.id));
        // Only an idempotent decision needs to remember what it asked for.
        let fingerprint = request_id.map(|_| format!("{quota}:{cost}"));
        self.consume(
            subject,
            &[(quota, cost)],
            idempotency_key.as_deref().zip(fingerprint.as_deref()),
            now_ns,
            failure,
        )
        .await
    }

    async fn consume(
        &self,
        subject: &Subject,
        costs: &[(&str, u64)],
        idempotency: Option<(&str, &str)>,
        now_ns: i64,
        failure: FailurePolicy,
    ) -> Result<Decision, EngineError> {
        let plan = match Plan::new(subject, costs, now_ns, Phase::Consume) {
            Ok(p) => p,
            Err(d) => return Ok(d),
        };
        let req = ConsumeRequest {
            counters: &plan.counters,
            now_ns,
            idempotency_key: idempotency.map(|(k, _)| k),
            fingerprint: idempotency.map_or("", |(_, f)| f),
            reservation: None,
        };
        self.run(&plan, req, failure).await
    }

    /// Give back `cost` units of `quota` consumed by a decision at `decided_at_ns` whose request
    /// never reached its upstream (connect failure). `local`: the decision was taken on this
    /// gateway's own counters (the shared store was down), so they are given back there.
    pub async fn release(
        &self,
        subject: &Subject,
        quota: &str,
        cost: u64,
        decided_at_ns: i64,
        now_ns: i64,
        local: bool,
    ) -> Result<(), EngineError> {
        let Ok(plan) = Plan::new(subject, &[(quota, cost)], decided_at_ns, Phase::Consume) else {
            return Ok(());
        };
        let req = crate::storage::ReleaseRequest {
            counters: &plan.counters,
            now_ns,
        };
        if local {
            return Ok(self.fallback.release(&req).await?);
        }
        Ok(self.store.release(&req).await?)
    }

    /// Whether `needs` (quota type, units) would fit now, consuming nothing: for refusing a
    /// request before any work is spent on it. Refused: the limits that cannot cover their need
    /// are marked refusing, with the time to their reset as the wait.
    pub async fn probe(
        &self,
        subject: &Subject,
        needs: &[(&str, u64)],
        now_ns: i64,
        failure: FailurePolicy,
    ) -> Result<Decision, EngineError> {
        // Leases in hand that cover every need answer without a round trip.
        if let Ok(plan) = Plan::new(subject, needs, now_ns, Phase::Consume) {
            let req = ConsumeRequest {
                counters: &plan.counters,
                now_ns,
                idempotency_key: None,
                fingerprint: "",
                reservation: None,
            };
            if let Some(outcome) = self.store.covers(&req) {
                return Ok(decision(&plan, outcome, now_ns, None));
            }
        }
        let free: Vec<(&str, u64)> = needs.iter().map(|(q, _)| (*q, 0)).collect();
        let mut d = self.consume(subject, &free, None, now_ns, failure).await?;
        if !d.allowed {
            return Ok(d);
        }
        for l in &mut d.limits {
            let need = needs
                .iter()
                .find(|(q, _)| *q == &*l.quota_type)
                .map_or(0, |(_, n)| *n);
            if l.remaining < need {
                d.allowed = false;
                d.reason = Reason::QuotaExceeded;
                l.allowed = false;
                l.retry_after_ns = l.retry_after_ns.max(l.reset_after_ns).max(1);
            }
        }
        Ok(d)
    }

    /// Reserve several quotas at once (e.g. tokens and money) for one upstream attempt: all or
    /// nothing. The reservation holds until `settle` with the same `attempt_id`, or until
    /// `expires_ns` (then it stops counting, so a gateway that dies before settling leaks nothing).
    pub async fn reserve(
        &self,
        subject: &Subject,
        costs: &[(&str, u64)],
        attempt_id: &str,
        expires_ns: i64,
        now_ns: i64,
        failure: FailurePolicy,
    ) -> Result<Decision, EngineError> {
        let plan = match Plan::new(subject, costs, now_ns, Phase::Reserve) {
            Ok(p) => p,
            Err(d) => return Ok(d),
        };
        let req = ConsumeRequest {
            counters: &plan.counters,
            now_ns,
            idempotency_key: None,
            fingerprint: "",
            reservation: Some(Reservation {
                attempt_id,
                expires_ns,
            }),
        };
        self.run(&plan, req, failure).await
    }

    /// Settle an attempt reserved at `reserved_at_ns`: its reservation is replaced by the
    /// `actual` amounts (refund or extra charge). Idempotent per attempt: a settlement delivered
    /// twice charges once, so a failed one can simply be retried. `local`: the reservation was
    /// made locally (the shared store was down) with this share of each limit (`local_share`, or 1
    /// for `fail_open`), and is settled where and as it was made.
    pub async fn settle(
        &self,
        subject: &Subject,
        actual: &[(&str, u64)],
        attempt_id: &str,
        reserved_at_ns: i64,
        now_ns: i64,
        local: Option<f64>,
    ) -> Result<Settled, EngineError> {
        let Ok(plan) = Plan::new(subject, actual, reserved_at_ns, Phase::Settle) else {
            return Ok(Settled::Charged);
        };
        let req = SettleRequest {
            counters: &plan.counters,
            attempt_id,
            now_ns,
        };
        if let Some(share) = local {
            let counters: Vec<Counter> = plan
                .counters
                .iter()
                .map(|c| Counter {
                    limit: scaled(c.limit, share),
                    ..c.clone()
                })
                .collect();
            let req = SettleRequest {
                counters: &counters,
                ..req
            };
            return Ok(self.fallback.settle(&req).await?);
        }
        Ok(self.store.settle(&req).await?)
    }

    /// Keep an attempt's reservation (of `reserved`, made at `reserved_at_ns`) held until
    /// `expires_ns`, while its call is still running: a reservation only expires when its
    /// gateway stopped renewing it (it died). `local`: made in this gateway's fallback store.
    #[allow(clippy::too_many_arguments)]
    pub async fn renew(
        &self,
        subject: &Subject,
        reserved: &[(&str, u64)],
        attempt_id: &str,
        reserved_at_ns: i64,
        expires_ns: i64,
        now_ns: i64,
        local: bool,
    ) -> Result<(), EngineError> {
        let Ok(plan) = Plan::new(subject, reserved, reserved_at_ns, Phase::Settle) else {
            return Ok(());
        };
        let req = RenewRequest {
            counters: &plan.counters,
            attempt_id,
            expires_ns,
            now_ns,
        };
        if local {
            return Ok(self.fallback.renew(&req).await?);
        }
        Ok(self.store.renew(&req).await?)
    }

    async fn run(
        &self,
        plan: &Plan,
        req: ConsumeRequest<'_>,
        failure: FailurePolicy,
    ) -> Result<Decision, EngineError> {
        let (outcome, degraded) = match self.store.check_and_consume(&req).await {
            Ok(o) => (o, None),
            Err(e) if e.is_transient() && failure.mode != FailureMode::FailClosed => {
                tracing::debug!(error = %e, mode = ?failure.mode, "shared store unreachable; deciding locally");
                let share = if failure.mode == FailureMode::Local {
                    failure.local_share
                } else {
                    1.0
                };
                let local: Vec<Counter> = plan
                    .counters
                    .iter()
                    .map(|c| Counter {
                        limit: scaled(c.limit, share),
                        ..c.clone()
                    })
                    .collect();
                let mut o = self
                    .fallback
                    .check_and_consume(&ConsumeRequest {
                        counters: &local,
                        ..req
                    })
                    .await?;
                if failure.mode == FailureMode::FailOpen {
                    o.allowed = true;
                }
                (o, Some(failure.mode))
            }
            Err(e) => return Err(e.into()),
        };
        Ok(decision(plan, outcome, req.now_ns, degraded))
    }
}

/// The decision `outcome` means for `plan`.
fn decision(plan: &Plan, outcome: Outcome, now_ns: i64, degraded: Option<FailureMode>) -> Decision {
    let limits = plan
        .specs
        .iter()
        .zip(&outcome.counters)
        .map(|((name, spec), r)| limit_state(name, spec, r))
        .collect();
    Decision {
        allowed: outcome.allowed,
        reason: if plan.counters.is_empty() {
            Reason::Unlimited
        } else if outcome.allowed {
            Reason::WithinLimits
        } else {
            Reason::QuotaExceeded
        },
        limits,
        replayed: outcome.replayed,
        now_ns,
        degraded,
        policy_header: match plan.headers.as_slice() {
            [] => None,
            [one] => Some(one.clone()),
            many => Some(many.join(", ").into()),
        },
    }
}

/// What a plan is for: in-flight limits (`concurrent`) are held by a reservation and released by
/// its settlement, so they cost 1 when reserving and nothing otherwise.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Consume,
    Reserve,
    Settle,
}

/// The counters one request touches, with the specs they come from.
struct Plan {
    counters: Vec<Counter>,
    specs: Vec<(Arc<str>, LimitSpec)>,
    /// The tier's `RateLimit-Policy` value of each limited quota type of the plan.
    headers: Vec<Arc<str>>,
}

impl Plan {
    /// The counters for `costs` (quota type, cost) of `subject` at `now_ns`; a decision instead
    /// when a quota type is outside the tier (refused) or every one is unlimited (admitted).
    fn new(
        subject: &Subject,
        costs: &[(&str, u64)],
        now_ns: i64,
        phase: Phase,
    ) -> Result<Plan, Decision> {
        let mut plan = Plan {
            counters: Vec::new(),
            specs: Vec::new(),
            headers: Vec::new(),
        };
        for &(quota, cost) in costs {
            let specs = match subject.tier.quotas.get_key_value(quota) {
                None => return Err(Decision::without_counters(false, Reason::NotInTier, now_ns)),
                Some((_, QuotaLimits::Unlimited)) => continue,
                Some((name, QuotaLimits::Limited(specs))) => {
                    if let Some(h) = subject.tier.policy_headers.get(quota) {
                        plan.headers.push(h.clone());
                    }
                    specs.iter().map(move |s| (name, s))
                }
            };
            for (name, spec) in specs {
                plan.counters.push(Counter {
                    key: CounterKey {
                        subject: subject.id.clone(),
                        quota: name.clone(),
                        slot: spec.slot(),
                    },
                    limit: spec.limit_at(subject.time_zone, now_ns),
                    cost: match spec {
                        LimitSpec::Concurrent { .. } => u64::from(phase == Phase::Reserve),
                        _ => cost,
                    },
                });
                plan.specs.push((name.clone(), *spec));
            }
        }
        if plan.counters.is_empty() {
            return Err(Decision::without_counters(true, Reason::Unlimited, now_ns));
        }
        Ok(plan)
    }
}

/// A limit reduced to `share` of itself: what one gateway of a fleet may admit alone.
fn scaled(limit: Limit, share: f64) -> Limit {
    let part = |v: u64| ((v as f64 * share).ceil() as u64).max(1);
    match limit {
        Limit::Bucket { emission_ns, burst } => Limit::Bucket {
            emission_ns: (emission_ns as f64 / share).round() as i64,
            burst: part(burst),
        },
        Limit::Window {
            limit,
            window,
            reset_at_ns,
        } => Limit::Window {
            limit: part(limit),
            window,
            reset_at_ns,
        },
    }
}

fn limit_state(name: &Arc<str>, spec: &LimitSpec, r: &crate::storage::CounterReport) -> LimitState {
    let (quota, window_s) = spec.quota_and_window_s();
    LimitState {
        quota_type: name.clone(),
        slot: spec.slot(),
        quota,
        window_s,
        limit: r.limit,
        remaining: r.remaining,
        reset_after_ns: r.reset_after_ns,
        retry_after_ns: r.retry_after_ns,
        allowed: r.allowed,
    }
}

impl Decision {
    fn without_counters(allowed: bool, reason: Reason, now_ns: i64) -> Self {
        Decision {
            allowed,
            reason,
            limits: Vec::new(),
            replayed: false,
            now_ns,
            degraded: None,
            policy_header: None,
        }
    }
}

/// Now, as Unix nanoseconds.
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}
