//! Prometheus metrics of one gateway, in a registry owned by the gateway (no global registry).
//!
//! Label values come from the compiled policy (quota types, tiers, subject ids, all checked by
//! `quota::names` at load) or from fixed sets in the code, never from the request itself; they are
//! checked once more here, and the per-subject series are capped (see [`SUBJECT_SERIES_MAX`]), so
//! a policy with a million subjects cannot grow the scrape without bound.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};
use quota::names::NameKind;
use quota::storage::AnyStore;
use std::collections::HashSet;
use std::sync::RwLock;

/// Distinct subjects with a series of their own in `quota_subject_units_total`; later ones are
/// counted under `subject="other"`. Enough for a "top subjects" panel of a busy fleet.
pub const SUBJECT_SERIES_MAX: usize = 100;

pub struct Metrics {
    registry: Registry,
    pub quota_consumed: IntCounterVec,
    pub quota_rejected: IntCounterVec,
    pub requests: IntCounterVec,
    pub request_duration: Histogram,
    pub upstream_errors: IntCounterVec,
    pub policy_reloads: IntCounterVec,
    pub backend_fallbacks: IntCounterVec,
    backend_errors: IntCounter,
    backend_state: IntGauge,
    redis_calls: IntCounter,
    local_decisions: IntCounter,
    local_settlements: IntCounter,
    lease_units: IntGauge,
    pub llm_tokens: IntCounterVec,
    pub llm_settlements: IntCounterVec,
    pub llm_disconnects: IntCounter,
    /// LLM settlements waiting in the journal for the counter store.
    pub settlement_journal_depth: IntGauge,
    /// Units given back because the admitted request never reached its upstream, by quota type.
    pub quota_released: IntCounterVec,
    /// Streams ended by the gateway, by reason (reservation, quota, oversized_event).
    pub llm_stream_cuts: IntCounterVec,
    /// Prompts counted by bytes because the tokenizer failed on them.
    pub tokenizer_fallbacks: IntCounter,
    pub guardrail_actions: IntCounterVec,
    audit_events: IntCounter,
    audit_dropped: IntCounter,
    /// Control-plane snapshots received, by result (applied, stale, rejected), and resyncs.
    pub snapshot_refresh: IntCounterVec,
    /// Seconds from a snapshot's arrival to its enforcement (decode, compile, swap).
    pub snapshot_refresh_seconds: Histogram,
    /// Revisions the enforced snapshot is behind the control plane's latest.
    pub snapshot_drift: IntGauge,
    /// 1 while the control-plane watch stream is connected.
    pub control_plane_connected: IntGauge,
    /// The Kafka audit sink's counters, copied at each scrape.
    kafka: [IntGauge; 6],
    /// Decisions that cost something, by quota type, subject tier and result (allowed, refused).
    quota_decisions: IntCounterVec,
    /// Refusals by quota type, reason (quota_exceeded, quota_not_in_tier) and subject tier.
    quota_refusals: IntCounterVec,
    /// Units LLM settlements charged, by quota type (tokens, spend…).
    llm_settled_units: IntCounterVec,
    /// Units charged per subject and quota type (decisions and settlements), capped subjects.
    subject_units: IntCounterVec,
    subjects_seen: RwLock<HashSet<String>>,
    /// The control-plane revision this gateway enforces (`applied`) and the newest announced
    /// (`latest`); only while following a control plane.
    pub control_plane_revision: IntGaugeVec,
    /// When the enforced control-plane snapshot was applied (Unix seconds).
    pub control_plane_applied_at: Gauge,
    /// From the control plane publishing a revision to this gateway enforcing it, for revisions
    /// pushed on a live stream.
    pub control_plane_propagation: Histogram,
}

/// `name` when it is a valid `kind` name (it always is, coming from a compiled policy), else a
/// fixed marker: a label never carries a byte the names rule forbids.
fn label(kind: NameKind, name: &str) -> &str {
    if quota::names::check(kind, name).is_ok() {
        name
    } else {
        "invalid"
    }
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let quota_consumed = IntCounterVec::new(
            Opts::new(
                "quota_consumed_total",
                "Quota units consumed by admitted requests",
            ),
            &["type"],
        )?;
        let quota_rejected = IntCounterVec::new(
            Opts::new(
                "quota_reject_total",
                "Requests refused because a quota was exhausted",
            ),
            &["type"],
        )?;
        let requests = IntCounterVec::new(
            Opts::new(
                "gateway_requests_total",
                "Requests answered, by route and status",
            ),
            &["route", "status"],
        )?;
        let request_duration = Histogram::with_opts(
            HistogramOpts::new(
                "gateway_request_duration_seconds",
                "Time from request to the end of the response",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ]),
        )?;
        let upstream_errors = IntCounterVec::new(
            Opts::new(
                "upstream_errors_total",
                "Failed upstream connections or exchanges",
            ),
            &["upstream"],
        )?;
        let policy_reloads = IntCounterVec::new(
            Opts::new("policy_reload_total", "Policy reload attempts by result"),
            &["result"],
        )?;
        registry.register(Box::new(quota_consumed.clone()))?;
        registry.register(Box::new(quota_rejected.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(request_duration.clone()))?;
        registry.register(Box::new(upstream_errors.clone()))?;
        registry.register(Box::new(policy_reloads.clone()))?;
        let backend_fallbacks = IntCounterVec::new(
            Opts::new(
                "backend_fallback_total",
                "Decisions taken locally because the shared store was unreachable, by failure mode",
            ),
            &["mode"],
        )?;
        let backend_errors =
            IntCounter::new("backend_errors_total", "Failed calls to the shared store")?;
        let backend_state =
            IntGauge::new("backend_state", "Shared store reachable (1) or not (0)")?;
        let redis_calls = IntCounter::new("redis_calls_total", "Calls made to Redis")?;
        registry.register(Box::new(backend_fallbacks.clone()))?;
        registry.register(Box::new(backend_errors.clone()))?;
        registry.register(Box::new(backend_state.clone()))?;
        registry.register(Box::new(redis_calls.clone()))?;
        let local_decisions = IntCounter::new(
            "quota_local_decisions_total",
            "Decisions and reservations admitted from local leases, without a Redis call",
        )?;
        let local_settlements = IntCounter::new(
            "quota_local_settlements_total",
            "LLM reservations settled against local leases, without a Redis call",
        )?;
        registry.register(Box::new(local_settlements.clone()))?;
        let lease_units = IntGauge::new("lease_units_held", "Quota units held in local leases")?;
        registry.register(Box::new(local_decisions.clone()))?;
        let llm_tokens = IntCounterVec::new(
            Opts::new(
                "llm_tokens_total",
                "LLM tokens billed, by kind (prompt, completion)",
            ),
            &["kind"],
        )?;
        let llm_settlements = IntCounterVec::new(
            Opts::new(
                "llm_settlements_total",
                "Settlements of LLM reservations: charged, duplicate (already settled), deferred \
                 (journaled while the store is unreachable; charged later), error (kept aside)",
            ),
            &["result"],
        )?;
        let llm_disconnects = IntCounter::new(
            "llm_client_disconnects_total",
            "Streams whose client left early; the gateway read on for the usage",
        )?;
        registry.register(Box::new(llm_tokens.clone()))?;
        registry.register(Box::new(llm_settlements.clone()))?;
        registry.register(Box::new(llm_disconnects.clone()))?;
        let settlement_journal_depth = IntGauge::new(
            "llm_settlement_journal_depth",
            "LLM settlements waiting in the journal until the counter store takes them",
        )?;
        registry.register(Box::new(settlement_journal_depth.clone()))?;
        let llm_stream_cuts = IntCounterVec::new(
            Opts::new(
                "llm_stream_cuts_total",
                "Streams the gateway ended at their output ceiling, by reason",
            ),
            &["reason"],
        )?;
        let tokenizer_fallbacks = IntCounter::new(
            "llm_tokenizer_fallbacks_total",
            "Prompts estimated from their size because tokenizing them failed",
        )?;
        registry.register(Box::new(llm_stream_cuts.clone()))?;
        let quota_released = IntCounterVec::new(
            Opts::new(
                "quota_released_total",
                "Units given back because the admitted request never reached its upstream",
            ),
            &["type"],
        )?;
        registry.register(Box::new(quota_released.clone()))?;
        registry.register(Box::new(tokenizer_fallbacks.clone()))?;
        let guardrail_actions = IntCounterVec::new(
            Opts::new(
                "cost_guardrail_total",
                "Expensive requests stopped by the cost guardrail: refused or sent to the fallback",
            ),
            &["action"],
        )?;
        registry.register(Box::new(guardrail_actions.clone()))?;
        let audit_events =
            IntCounter::new("audit_events_total", "Audit events handed to the sink")?;
        let audit_dropped = IntCounter::new(
            "audit_events_dropped_total",
            "Audit events the sink could not take (queue full)",
        )?;
        registry.register(Box::new(audit_events.clone()))?;
        registry.register(Box::new(audit_dropped.clone()))?;
        registry.register(Box::new(lease_units.clone()))?;
        let snapshot_refresh = IntCounterVec::new(
            Opts::new(
                "subscription_snapshot_refresh",
                "Control-plane snapshots received, by result: applied, stale (not newer), rejected; resync: reconnections forced by the periodic revision check",
            ),
            &["result"],
        )?;
        let snapshot_drift = IntGauge::new(
            "quota_snapshot_drift",
            "Revisions the enforced policy is behind the control plane's latest known revision",
        )?;
        let control_plane_connected = IntGauge::new(
            "control_plane_connected",
            "1 while the watch stream to the control plane is up",
        )?;
        let snapshot_refresh_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "subscription_snapshot_refresh_seconds",
                "Seconds from a control-plane snapshot's arrival to its enforcement",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
        )?;
        registry.register(Box::new(snapshot_refresh.clone()))?;
        registry.register(Box::new(snapshot_refresh_seconds.clone()))?;
        registry.register(Box::new(snapshot_drift.clone()))?;
        registry.register(Box::new(control_plane_connected.clone()))?;
        let kafka = [
            (
                "audit_kafka_delivered_total",
                "Audit events Kafka confirmed (directly or from the spool)",
            ),
            (
                "audit_kafka_spooled_total",
                "Audit events written to the disk spool",
            ),
            (
                "audit_kafka_delivery_errors_total",
                "Failed Kafka deliveries (those events were spooled)",
            ),
            (
                "audit_spool_pending_records",
                "Audit events in the spool, not yet confirmed by Kafka",
            ),
            (
                "audit_spool_pending_bytes",
                "Bytes in the spool, not yet confirmed by Kafka",
            ),
            (
                "audit_kafka_spooling",
                "1 while events go to the spool instead of Kafka",
            ),
        ]
        .map(|(name, help)| IntGauge::new(name, help));
        let [a, b, c, d, e, f] = kafka;
        let kafka = [a?, b?, c?, d?, e?, f?];
        for g in &kafka {
            registry.register(Box::new(g.clone()))?;
        }
        let quota_decisions = IntCounterVec::new(
            Opts::new(
                "quota_decisions_total",
                "Decisions that cost something, by quota type, subject tier and result",
            ),
            &["type", "tier", "result"],
        )?;
        let quota_refusals = IntCounterVec::new(
            Opts::new(
                "quota_refusals_total",
                "Requests refused by a quota, by quota type, reason and subject tier",
            ),
            &["type", "reason", "tier"],
        )?;
        let llm_settled_units = IntCounterVec::new(
            Opts::new(
                "llm_settled_units_total",
                "Units charged by LLM settlements (tokens, spend…), by quota type",
            ),
            &["type"],
        )?;
        let subject_units = IntCounterVec::new(
            Opts::new(
                "quota_subject_units_total",
                "Units charged per subject and quota type; subjects past the first 100 count as \
                 `other`",
            ),
            &["subject", "type"],
        )?;
        let control_plane_revision = IntGaugeVec::new(
            Opts::new(
                "control_plane_revision",
                "Control-plane revision enforced (applied) and newest announced (latest)",
            ),
            &["kind"],
        )?;
        let control_plane_applied_at = Gauge::new(
            "control_plane_applied_timestamp_seconds",
            "When the enforced control-plane snapshot was applied, Unix seconds",
        )?;
        let control_plane_propagation = Histogram::with_opts(
            HistogramOpts::new(
                "control_plane_propagation_seconds",
                "From the control plane publishing a revision to this gateway enforcing it",
            )
            .buckets(vec![
                0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
        )?;
        registry.register(Box::new(quota_decisions.clone()))?;
        registry.register(Box::new(quota_refusals.clone()))?;
        registry.register(Box::new(llm_settled_units.clone()))?;
        registry.register(Box::new(subject_units.clone()))?;
        registry.register(Box::new(control_plane_revision.clone()))?;
        registry.register(Box::new(control_plane_applied_at.clone()))?;
        registry.register(Box::new(control_plane_propagation.clone()))?;
        for r in ["applied", "stale", "rejected", "resync"] {
            snapshot_refresh.with_label_values(&[r]);
        }
        backend_state.set(1);
        // Show both results from the start, so a dashboard sees 0 rather than no series.
        policy_reloads.with_label_values(&["success"]);
        policy_reloads.with_label_values(&["error"]);
        for a in ["refused", "fallback"] {
            guardrail_actions.with_label_values(&[a]);
        }
        for r in ["charged", "duplicate", "deferred", "error"] {
            llm_settlements.with_label_values(&[r]);
        }
        for r in ["reservation", "quota", "oversized_event"] {
            llm_stream_cuts.with_label_values(&[r]);
        }
        for m in ["fail_open", "fail_closed", "local"] {
            backend_fallbacks.with_label_values(&[m]);
        }
        Ok(Self {
            registry,
            quota_consumed,
            quota_rejected,
            requests,
            request_duration,
            upstream_errors,
            policy_reloads,
            backend_fallbacks,
            backend_errors,
            backend_state,
            redis_calls,
            local_decisions,
            local_settlements,
            lease_units,
            llm_tokens,
            llm_settlements,
            llm_disconnects,
            settlement_journal_depth,
            llm_stream_cuts,
            tokenizer_fallbacks,
            quota_released,
            guardrail_actions,
            audit_events,
            audit_dropped,
            snapshot_refresh,
            snapshot_refresh_seconds,
            snapshot_drift,
            control_plane_connected,
            kafka,
            quota_decisions,
            quota_refusals,
            llm_settled_units,
            subject_units,
            subjects_seen: RwLock::default(),
            control_plane_revision,
            control_plane_applied_at,
            control_plane_propagation,
        })
    }

    /// Count a decision that cost something: `refused` is the refusal's reason code.
    pub fn count_decision(
        &self,
        subject: &str,
        tier: &str,
        quota: &str,
        amount: u64,
        refused: Option<&str>,
    ) {
        let quota = label(NameKind::QuotaType, quota);
        let tier = label(NameKind::Tier, tier);
        match refused {
            None => {
                self.quota_consumed
                    .with_label_values(&[quota])
                    .inc_by(amount);
                self.quota_decisions
                    .with_label_values(&[quota, tier, "allowed"])
                    .inc();
                self.count_subject_units(subject, quota, amount);
            }
            Some(reason) => {
                // The reason is one of the engine's fixed codes; anything else is folded.
                let reason = match reason {
                    "quota_exceeded" | "quota_not_in_tier" => reason,
                    _ => "other",
                };
                self.quota_rejected.with_label_values(&[quota]).inc();
                self.quota_decisions
                    .with_label_values(&[quota, tier, "refused"])
                    .inc();
                self.quota_refusals
                    .with_label_values(&[quota, reason, tier])
                    .inc();
            }
        }
    }

    /// Count what an LLM settlement charged: `(quota type, units)` pairs.
    pub fn count_settled<'a>(
        &self,
        subject: &str,
        charged: impl IntoIterator<Item = (&'a str, u64)>,
    ) {
        for (quota, units) in charged {
            let quota = label(NameKind::QuotaType, quota);
            self.llm_settled_units
                .with_label_values(&[quota])
                .inc_by(units);
            self.count_subject_units(subject, quota, units);
        }
    }

    fn count_subject_units(&self, subject: &str, quota: &str, units: u64) {
        if units == 0 {
            return;
        }
        let subject = self.subject_label(label(NameKind::Subject, subject));
        self.subject_units
            .with_label_values(&[subject, quota])
            .inc_by(units);
    }

    /// `subject` while fewer than [`SUBJECT_SERIES_MAX`] subjects have a series, else `other`.
    fn subject_label<'a>(&self, subject: &'a str) -> &'a str {
        let seen = self.subjects_seen.read().unwrap_or_else(|e| e.into_inner());
        if seen.contains(subject) {
            return subject;
        }
        let full = seen.len() >= SUBJECT_SERIES_MAX;
        drop(seen);
        if full {
            return "other";
        }
        let mut seen = self
            .subjects_seen
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if seen.len() >= SUBJECT_SERIES_MAX && !seen.contains(subject) {
            return "other";
        }
        seen.insert(subject.to_string());
        subject
    }

    /// Bring the Kafka sink's metrics up to date.
    pub fn sync_kafka(&self, s: &audit_kafka::SinkStats) {
        let values = [
            s.delivered,
            s.spooled,
            s.delivery_errors,
            s.spool_pending_records,
            s.spool_pending_bytes,
            u64::from(s.spooling),
        ];
        for (g, v) in self.kafka.iter().zip(values) {
            g.set(i64::try_from(v).unwrap_or(i64::MAX));
        }
    }

    /// Bring the audit metrics up to date with the sink's own counters.
    pub fn sync_audit(&self, counts: quota::audit::SinkCounts) {
        self.audit_events
            .inc_by(counts.emitted.saturating_sub(self.audit_events.get()));
        self.audit_dropped
            .inc_by(counts.dropped.saturating_sub(self.audit_dropped.get()));
    }

    /// Bring the backend metrics up to date with the store's own counters.
    pub fn sync_backend(&self, store: &AnyStore) {
        if let AnyStore::Leased(l) = store {
            self.local_decisions.inc_by(
                l.local_decisions()
                    .saturating_sub(self.local_decisions.get()),
            );
            self.local_settlements.inc_by(
                l.local_settlements()
                    .saturating_sub(self.local_settlements.get()),
            );
            self.lease_units
                .set(i64::try_from(l.held_units()).unwrap_or(i64::MAX));
        }
        let Some(redis) = store.redis() else {
            return;
        };
        let stats = redis.stats();
        self.backend_state.set(i64::from(stats.up));
        self.backend_errors
            .inc_by(stats.errors.saturating_sub(self.backend_errors.get()));
        self.redis_calls
            .inc_by(stats.calls.saturating_sub(self.redis_calls.get()));
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The per-subject series stop growing at the cap: later subjects add up under `other`, and
    /// subjects already seen keep their own series.
    #[test]
    fn subject_series_are_capped() {
        let m = Metrics::new().expect("metrics");
        for i in 0..SUBJECT_SERIES_MAX + 5 {
            m.count_decision(&format!("s{i}"), "free", "lookup", 2, None);
        }
        m.count_decision("s0", "free", "lookup", 1, None);
        let text = m.render();
        let series = text
            .lines()
            .filter(|l| l.starts_with("quota_subject_units_total{"))
            .count();
        assert_eq!(series, SUBJECT_SERIES_MAX + 1, "{text}");
        assert!(text.contains("quota_subject_units_total{subject=\"other\",type=\"lookup\"} 10"));
        assert!(text.contains("quota_subject_units_total{subject=\"s0\",type=\"lookup\"} 3"));
    }

    /// Names that break the names rule never reach a label; reasons outside the fixed set fold.
    #[test]
    fn labels_are_checked() {
        let m = Metrics::new().expect("metrics");
        m.count_decision("bad\nsubject", "t{x}", "lookup", 1, Some("weird"));
        m.count_decision("bad\nsubject", "free", "lookup", 1, None);
        let text = m.render();
        assert!(
            text.contains(
                "quota_refusals_total{reason=\"other\",tier=\"invalid\",type=\"lookup\"} 1"
            )
        );
        assert!(text.contains("quota_subject_units_total{subject=\"invalid\",type=\"lookup\"} 1"));
        assert!(!text.contains("bad"), "{text}");
    }
}
