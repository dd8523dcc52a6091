//! The reservation ticket of one upstream attempt: settled exactly once, by its holder or on drop.

use super::settle::{Settlement, deliver};
use super::{BillingEnv, Outcome, Placement, Tariff};
use crate::llm::Usage;
use crate::policy::Subject;
use std::sync::Arc;
use std::time::Duration;

/// What an attempt reserved, to make a [`Ticket`] of.
#[derive(Debug, Clone)]
pub struct Reserved {
    pub subject: Arc<Subject>,
    /// One upstream attempt: reserved and settled once.
    pub attempt_id: String,
    pub request_id: String,
    pub reserved_at_ns: i64,
    /// The prompt's tokens as counted before the call: what a ticket dropped unsettled charges
    /// (the upstream may have read the prompt).
    pub prompt_estimate: u64,
    /// Per quota type, for the settlement's audit record.
    pub amounts: Vec<(Arc<str>, u64)>,
    pub placement: Placement,
    pub tariff: Tariff,
    /// How long the reservation holds unrenewed; the ticket renews it every half of this while
    /// the call runs, so only a gateway that died lets it lapse. Zero: never renewed.
    pub ttl: Duration,
}

/// A held reservation. [`Ticket::settle`] consumes it; dropped unsettled, it settles the prompt
/// estimate in the background (an exit path that did not settle, such as an early error).
pub struct Ticket<E: BillingEnv> {
    env: Arc<E>,
    /// Who is billed (read while the call runs, e.g. to check an overrun against the quota).
    pub subject: Arc<Subject>,
    attempt_id: String,
    request_id: String,
    reserved_at_ns: i64,
    prompt_estimate: u64,
    reserved: Vec<(Arc<str>, u64)>,
    placement: Placement,
    tariff: Tariff,
    settled: bool,
    /// The task renewing the reservation while the ticket is held.
    renewal: Option<tokio::task::AbortHandle>,
}

impl<E: BillingEnv> Ticket<E> {
    pub fn new(env: Arc<E>, r: Reserved) -> Self {
        let renewal = renew_while_held(&env, &r);
        Ticket {
            renewal,
            env,
            subject: r.subject,
            attempt_id: r.attempt_id,
            request_id: r.request_id,
            reserved_at_ns: r.reserved_at_ns,
            prompt_estimate: r.prompt_estimate,
            reserved: r.amounts,
            placement: r.placement,
            tariff: r.tariff,
            settled: false,
        }
    }

    pub fn attempt_id(&self) -> &str {
        &self.attempt_id
    }

    /// Replace the reservation with `usage`. `answered`: the upstream served the request. Returns
    /// once the settlement is applied or safe in the journal.
    pub async fn settle(mut self, usage: Usage, answered: bool) -> Outcome {
        let s = self.settlement(usage, answered);
        deliver(&self.env, s).await
    }

    /// The settlement of this ticket with `usage`; the ticket counts as settled from here on.
    fn settlement(&mut self, usage: Usage, answered: bool) -> Settlement {
        self.settled = true;
        if let Some(r) = self.renewal.take() {
            r.abort();
        }
        Settlement {
            attempt_id: std::mem::take(&mut self.attempt_id),
            request_id: std::mem::take(&mut self.request_id),
            event_id: crate::ids::uuid_v7().to_string(),
            subject: self.subject.clone(),
            reserved_at_ns: self.reserved_at_ns,
            placement: self.placement,
            reserved: std::mem::take(&mut self.reserved),
            actual: self.tariff.amounts(usage, answered),
            usage,
            deferred: false,
        }
    }
}

/// Renew `r`'s reservation every half of its `ttl` until aborted (the ticket is settled or
/// dropped). `None` without a runtime to run on, or with no `ttl`.
fn renew_while_held<E: BillingEnv>(env: &Arc<E>, r: &Reserved) -> Option<tokio::task::AbortHandle> {
    let ttl = r.ttl;
    if ttl.is_zero() {
        return None;
    }
    let rt = tokio::runtime::Handle::try_current().ok()?;
    let env = env.clone();
    let subject = r.subject.clone();
    let attempt = r.attempt_id.clone();
    let amounts = r.amounts.clone();
    let (reserved_at, local) = (r.reserved_at_ns, r.placement.local_share().is_some());
    let ttl_ns = i64::try_from(ttl.as_nanos()).unwrap_or(i64::MAX);
    let task = rt.spawn(async move {
        let costs: Vec<(&str, u64)> = amounts.iter().map(|(q, n)| (&**q, *n)).collect();
        loop {
            tokio::time::sleep(ttl / 2).await;
            let now = env.now_ns();
            let renewed = env
                .engine()
                .renew(
                    &subject,
                    &costs,
                    &attempt,
                    reserved_at,
                    now.saturating_add(ttl_ns),
                    now,
                    local,
                )
                .await;
            // Missed once, the next try comes before the hold lapses (it had half its ttl left).
            if let Err(e) = renewed {
                tracing::warn!(%attempt, error = %e, "renewing a reservation failed");
            }
        }
    });
    Some(task.abort_handle())
}

impl<E: BillingEnv> Drop for Ticket<E> {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let usage = Usage::plain(self.prompt_estimate, 0);
        let s = self.settlement(usage, false);
        tracing::debug!(attempt = %s.attempt_id, "ticket dropped unsettled; settling the prompt");
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let env = self.env.clone();
                rt.spawn(async move { deliver(&env, s).await });
            }
            // No runtime to settle on: the journal keeps it for the worker.
            Err(_) => {
                self.env.on_outcome(Outcome::Deferred, usage);
                let env = &self.env;
                env.deferred().push(s, |depth| env.on_journal_depth(depth));
            }
        }
    }
}
