//! Admission: the one place where a request's quota decision is taken, counted in the metrics and
//! recorded in the audit log — for plain routes, LLM routes (reservations) and `/check` alike.
//!
//! One rule for all of them: a refusal is recorded once, naming the quota that refused; a request
//! admitted outright is recorded as consumed; a reservation is recorded when it settles (its
//! `ReservationSettled` event), not here, and an admitted probe consumed nothing; a replayed decision was recorded when first taken; a
//! free probe (cost 0) records nothing. A decision taken without the shared store counts in
//! `backend_fallback_total{mode}`. How a refusal is answered stays with the caller.

use crate::state::AppState;
use quota::engine::{Decision, EngineError, Reason};
use quota::policy::{FailureMode, FailurePolicy, Subject};

/// What a request asks of its subject's quotas.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Ask<'a> {
    /// Take `cost` of `quota` now. With `idempotency_key`, a repeat replays the first decision.
    Consume {
        quota: &'a str,
        cost: u64,
        idempotency_key: Option<&'a str>,
    },
    /// Whether `needs` would fit, consuming nothing: a cheap refusal before work is spent.
    Probe { needs: &'a [(&'a str, u64)] },
    /// Hold `costs` for one upstream attempt until it settles or `expires_ns`.
    Reserve {
        costs: &'a [(&'a str, u64)],
        attempt_id: &'a str,
        expires_ns: i64,
    },
}

impl Ask<'_> {
    /// The quota and amount a refusal names: the binding limit's quota when the decision has one.
    fn refused<'d>(&'d self, decision: &'d Decision) -> (&'d str, u64) {
        let costs = match self {
            Ask::Consume { quota, cost, .. } => return (quota, *cost),
            Ask::Reserve { costs, .. } | Ask::Probe { needs: costs } => *costs,
        };
        let (first, first_cost) = costs.first().copied().unwrap_or(("", 0));
        let quota = decision.binding().map_or(first, |l| &*l.quota_type);
        let amount = costs
            .iter()
            .find(|(q, _)| *q == quota)
            .map_or(first_cost, |(_, c)| *c);
        (quota, amount)
    }

    fn costs_anything(&self) -> bool {
        match self {
            Ask::Consume { cost, .. } => *cost > 0,
            Ask::Reserve { costs, .. } | Ask::Probe { needs: costs } => {
                costs.iter().any(|(_, c)| *c > 0)
            }
        }
    }
}

/// The error code of a refusal: the tier lacks the quota, or the quota is spent.
pub(crate) fn refusal_code(decision: &Decision) -> &'static str {
    match decision.reason {
        Reason::NotInTier => "quota_not_in_tier",
        _ => "quota_exceeded",
    }
}

/// Decide `ask` for `subject` at `now_ns`, and count and record the decision.
pub(crate) async fn admit(
    state: &AppState,
    subject: &Subject,
    request_id: Option<&str>,
    ask: Ask<'_>,
    now_ns: i64,
    failure: FailurePolicy,
) -> Result<Decision, EngineError> {
    let engine = &state.engine;
    let decision = match ask {
        Ask::Consume {
            quota,
            cost,
            idempotency_key,
        } => {
            engine
                .decide(subject, quota, cost, idempotency_key, now_ns, failure)
                .await?
        }
        Ask::Probe { needs } => engine.probe(subject, needs, now_ns, failure).await?,
        Ask::Reserve {
            costs,
            attempt_id,
            expires_ns,
        } => {
            engine
                .reserve(subject, costs, attempt_id, expires_ns, now_ns, failure)
                .await?
        }
    };
    if let Some(mode) = decision.degraded {
        state
            .metrics
            .backend_fallbacks
            .with_label_values(&[fallback_label(mode)])
            .inc();
    }
    if decision.replayed || !ask.costs_anything() {
        return Ok(decision);
    }
    if !decision.allowed {
        let (quota, amount) = ask.refused(&decision);
        state.record_decision(
            subject,
            request_id,
            quota,
            amount,
            Some(refusal_code(&decision)),
        );
    } else if let Ask::Consume { quota, cost, .. } = ask {
        state.record_decision(subject, request_id, quota, cost, None);
    }
    Ok(decision)
}

fn fallback_label(mode: FailureMode) -> &'static str {
    match mode {
        FailureMode::FailOpen => "fail_open",
        FailureMode::FailClosed => "fail_closed",
        FailureMode::Local => "local",
    }
}
