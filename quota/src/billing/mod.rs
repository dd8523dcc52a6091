//! Billing of LLM calls: the reservation an upstream attempt holds, and its settlement.
//!
//! Before an LLM upstream is called, the gateway reserves the attempt's worst case (the route's
//! request cost, prompt plus output ceiling in tokens, their price) and holds it as a [`Ticket`].
//! However the call ends — completed, upstream error, client gone, drain limit hit — the ticket is
//! settled once with what was really produced ([`Tariff::amounts`]): the route's request counts
//! only when the upstream answered, tokens as used, money at the model's price. The store replaces
//! the reservation with those amounts, idempotently per attempt id, and the settlement is recorded
//! as one `ReservationSettled` audit event. A ticket dropped unsettled settles on drop.
//!
//! A settlement the store cannot take now is never dropped: it is appended to a local journal
//! ([`Deferred`], fsynced) and applied by [`run_deferred`] in journal order once the store answers,
//! also after a restart (the journal is read back when it is opened). Its event is recorded when
//! it is applied, once.
//!
//! The caller provides only the environment ([`BillingEnv`]): the engine, the clock, where events
//! and outcomes go. Nothing here speaks HTTP.

mod journal;
mod settle;
mod ticket;

#[cfg(test)]
mod tests;

pub use journal::{Deferred, JournalError};
pub use settle::run_deferred;
pub use ticket::{Reserved, Ticket};

use crate::audit::{AuditEvent, EventBody};
use crate::engine::{Decision, Engine};
use crate::llm::price::Price;
use crate::llm::{TokenKinds, Usage};
use crate::policy::{FailureMode, FailurePolicy, LlmRoute, Route};
use crate::storage::Storage;
use chrono_tz::Tz;
use std::sync::Arc;

/// What billing needs from its host: the engine and clock, the durable queue of settlements, and
/// where events and outcomes go. Implemented by the gateway's state, and by tests.
pub trait BillingEnv: Send + Sync + 'static {
    type Store: Storage;

    fn engine(&self) -> &Engine<Self::Store>;

    /// Now, as Unix nanoseconds.
    fn now_ns(&self) -> i64;

    /// Settlements waiting for the store (one queue per process).
    fn deferred(&self) -> &Deferred;

    /// Record a settlement's audit event. Must not block.
    fn emit_settled(&self, event: SettledEvent);

    /// Count what became of a settlement (metrics); `usage` is what it charged.
    fn on_outcome(&self, outcome: Outcome, usage: Usage);

    /// The number of settlements waiting in the journal changed.
    fn on_journal_depth(&self, _depth: usize) {}
}

/// What became of one delivery of a settlement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Applied by the store; its event was recorded.
    Charged,
    /// The store had settled this attempt before: nothing changed, no event.
    Duplicate,
    /// The store was unreachable: journaled, to be applied when it is back.
    Deferred,
    /// The store refused it for good (a bug or misconfiguration): kept aside, not applied.
    Rejected,
}

impl Outcome {
    /// A metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Charged => "charged",
            Outcome::Duplicate => "duplicate",
            Outcome::Deferred => "deferred",
            Outcome::Rejected => "error",
        }
    }
}

/// Where a reservation was made, so that it is settled where and as it was made.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Placement {
    /// The shared store.
    Shared,
    /// This gateway's own counters with this share of each limit (the shared store was down).
    Local { share: f64 },
}

impl Placement {
    /// Where `decision`, taken under `failure`, reserved.
    pub fn of(decision: &Decision, failure: FailurePolicy) -> Placement {
        match decision.degraded {
            None => Placement::Shared,
            Some(FailureMode::Local) => Placement::Local {
                share: failure.local_share,
            },
            Some(_) => Placement::Local { share: 1.0 },
        }
    }

    /// As `Engine::settle` takes it.
    pub(crate) fn local_share(self) -> Option<f64> {
        match self {
            Placement::Shared => None,
            Placement::Local { share } => Some(share),
        }
    }
}

/// How a call's usage becomes amounts, per quota type, on an LLM route.
#[derive(Debug, Clone, PartialEq)]
pub struct Tariff {
    /// The route's quota and what one served request costs it.
    pub route_quota: Arc<str>,
    pub route_cost: u64,
    pub tokens_quota: Arc<str>,
    /// The token kinds the token quota counts.
    pub tokens_count: TokenKinds,
    /// The money quota and the model's price, when the route has a budget.
    pub spend: Option<(Arc<str>, Price)>,
}

impl Tariff {
    /// The tariff of `route` for a model priced `price`.
    pub fn new(route: &Route, llm: &LlmRoute, price: Option<Price>) -> Tariff {
        Tariff {
            route_quota: route.quota.clone(),
            route_cost: route.cost,
            tokens_quota: llm.tokens_quota.clone(),
            tokens_count: llm.tokens_count,
            spend: llm.spend_quota.clone().zip(price),
        }
    }

    /// What a call that used `usage` costs. `answered`: the upstream served it (a failed call is
    /// not a request served, but what it read of the prompt is still tokens).
    pub fn amounts(&self, usage: Usage, answered: bool) -> Vec<(Arc<str>, u64)> {
        let mut v = vec![
            (
                self.route_quota.clone(),
                if answered { self.route_cost } else { 0 },
            ),
            (self.tokens_quota.clone(), usage.counted(self.tokens_count)),
        ];
        if let Some((q, p)) = &self.spend {
            v.push((q.clone(), p.cost(&usage)));
        }
        v
    }
}

/// A settlement's audit event, ready to be stamped by its emitter.
#[derive(Debug, Clone, PartialEq)]
pub struct SettledEvent {
    /// Fixed when the settlement is made: an event recorded again after a crash carries the same
    /// id, and the ledger keeps one row per id.
    pub event_id: String,
    pub subject: Arc<str>,
    pub time_zone: Tz,
    pub request_id: String,
    pub reserved_at_ns: i64,
    /// A `ReservationSettled` body.
    pub body: EventBody,
}

impl SettledEvent {
    /// The audit event as `source` emits it at `now_ns`; its day is the reservation's.
    pub fn into_audit(self, source: &str, now_ns: i64) -> AuditEvent {
        let mut e = AuditEvent::new(
            source,
            Some(&self.subject),
            Some(&self.request_id),
            now_ns,
            self.body,
        )
        .with_day(self.time_zone, self.reserved_at_ns);
        e.event_id = self.event_id;
        e
    }
}
