//! Applying settlements: one try against the store, the journal when it cannot answer, and the
//! worker that applies the journal in order.

use super::{BillingEnv, Outcome, Placement, SettledEvent};
use crate::audit::EventBody;
use crate::llm::Usage;
use crate::policy::Subject;
use crate::storage::Settled;
use std::sync::Arc;
use std::time::Duration;

/// One settlement to make: what an attempt reserved and what it really used. Owned, so it can
/// wait in the journal and outlive its request.
#[derive(Debug, Clone)]
pub struct Settlement {
    pub(crate) attempt_id: String,
    pub(crate) request_id: String,
    pub(crate) event_id: String,
    pub(crate) subject: Arc<Subject>,
    pub(crate) reserved_at_ns: i64,
    pub(crate) placement: Placement,
    pub(crate) reserved: Vec<(Arc<str>, u64)>,
    pub(crate) actual: Vec<(Arc<str>, u64)>,
    pub(crate) usage: Usage,
    /// A try may have been applied without our hearing (it failed in transit, or the process
    /// stopped before noting it done): then "already settled" means applied by us, event due.
    pub(crate) deferred: bool,
}

impl Settlement {
    /// The `ReservationSettled` event of this settlement.
    pub(crate) fn event(&self) -> SettledEvent {
        let settlements = self
            .actual
            .iter()
            .map(|(q, a)| {
                let r = self
                    .reserved
                    .iter()
                    .find(|(rq, _)| rq == q)
                    .map_or(0, |(_, n)| *n);
                crate::audit::Settlement {
                    quota: q.to_string(),
                    reserved: r,
                    actual: *a,
                    refunded: r.saturating_sub(*a),
                }
            })
            .collect();
        SettledEvent {
            event_id: self.event_id.clone(),
            subject: self.subject.id.clone(),
            time_zone: self.subject.time_zone,
            request_id: self.request_id.clone(),
            reserved_at_ns: self.reserved_at_ns,
            body: EventBody::ReservationSettled {
                attempt_id: self.attempt_id.clone(),
                settlements,
                usage: Some(self.usage.into()),
            },
        }
    }
}

/// The store could not be reached; worth trying again.
pub(crate) struct Unreachable;

/// Try `s` once against the store. Applied: its event is recorded and its outcome counted.
pub(crate) async fn apply<E: BillingEnv>(
    env: &E,
    s: &mut Settlement,
) -> Result<Outcome, Unreachable> {
    let items: Vec<(&str, u64)> = s.actual.iter().map(|(q, n)| (&**q, *n)).collect();
    let result = env
        .engine()
        .settle(
            &s.subject,
            &items,
            &s.attempt_id,
            s.reserved_at_ns,
            env.now_ns(),
            s.placement.local_share(),
        )
        .await;
    let outcome = match result {
        Ok(Settled::Charged) => Outcome::Charged,
        // The earlier try was applied after all: charged once, and its event is still due.
        Ok(Settled::AlreadySettled) if s.deferred => Outcome::Charged,
        Ok(Settled::AlreadySettled) => Outcome::Duplicate,
        Err(e) if e.is_transient() => {
            tracing::warn!(error = %e, attempt = %s.attempt_id, "settlement deferred: store unreachable");
            s.deferred = true;
            return Err(Unreachable);
        }
        Err(e) => {
            tracing::error!(error = %e, attempt = %s.attempt_id, "settlement refused by the store; kept aside");
            env.deferred().set_aside(s, &e.to_string());
            Outcome::Rejected
        }
    };
    if outcome == Outcome::Charged {
        env.emit_settled(s.event());
    }
    env.on_outcome(outcome, s.usage);
    Ok(outcome)
}

/// Settle `s` now if the store answers, else journal it for [`run_deferred`]. Settlements already
/// waiting are not overtaken: while the journal holds any, `s` joins them untried.
pub(crate) async fn deliver<E: BillingEnv>(env: &Arc<E>, mut s: Settlement) -> Outcome {
    if env.deferred().is_empty()
        && let Ok(outcome) = apply(&**env, &mut s).await
    {
        return outcome;
    }
    // Counted before it is queued: the worker may apply it at once.
    env.on_outcome(Outcome::Deferred, s.usage);
    let queued = env.clone();
    // Appending fsyncs: off the async workers.
    let pushed = tokio::task::spawn_blocking(move || {
        let d = queued.deferred();
        d.push(s, |depth| queued.on_journal_depth(depth));
    });
    if let Err(e) = pushed.await {
        tracing::error!(error = %e, "settlement journal writer failed");
    }
    Outcome::Deferred
}

/// First and longest wait between two tries of the journal's head while the store is down.
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// Apply the journal, oldest first, for as long as the process runs: each settlement is retried
/// until the store takes or refuses it (no cap: a settlement is never dropped for being late).
pub async fn run_deferred<E: BillingEnv>(env: Arc<E>) {
    let mut current: Option<Settlement> = None;
    let mut wait = RETRY_FIRST;
    loop {
        let mut s = match current.take() {
            Some(s) => s,
            None => match env.deferred().head() {
                Some(s) => s,
                None => {
                    env.deferred().wait().await;
                    continue;
                }
            },
        };
        match apply(&*env, &mut s).await {
            Ok(_) => {
                let done = env.clone();
                let attempt = s.attempt_id;
                let completed = tokio::task::spawn_blocking(move || {
                    let d = done.deferred();
                    d.complete(&attempt, |depth| done.on_journal_depth(depth));
                });
                if let Err(e) = completed.await {
                    tracing::error!(error = %e, "settlement journal writer failed");
                }
                wait = RETRY_FIRST;
            }
            Err(Unreachable) => {
                current = Some(s);
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(RETRY_MAX);
            }
        }
    }
}
