//! The state shared by the proxy, the API listener and the reloader, injected as `Arc<AppState>`.

use crate::metrics::Metrics;
use quota::PolicyHandle;
use quota::audit::{AuditEvent, AuditSink, EventBody};
use quota::billing::{BillingEnv, Deferred, Outcome, SettledEvent};
use quota::engine::Engine;
use quota::llm::Usage;
use quota::storage::AnyStore;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

/// The counter store the gateway runs on: in memory (the embedded default) or Redis.
pub type Store = AnyStore;

pub struct AppState {
    pub policy: PolicyHandle,
    pub engine: Engine<Store>,
    pub metrics: Metrics,
    /// The policy file or directory, watched for changes (`None`: the control plane only).
    pub config_path: Option<PathBuf>,
    /// What the enforced policy is compiled from.
    pub sources: std::sync::Mutex<Sources>,
    /// The link to the control plane, when the gateway follows one.
    pub control_plane: Option<crate::link::Link>,
    pub clock: Clock,
    /// Subjects over the cost guardrail's threshold.
    pub guardrail: crate::guardrail::Tripped,
    /// Where decisions and settlements are recorded (a JSONL file, or nowhere).
    pub audit: Box<dyn AuditSink>,
    /// The Kafka audit sink (also behind `audit`), for its statistics and a flush at shutdown.
    pub kafka: Option<Arc<audit_kafka::KafkaSink>>,
    /// Names this gateway in audit events.
    pub gateway_id: String,
    /// Connections to LLM upstreams (the gateway reads their responses itself; see `llm`),
    /// pooled, with the peers plain routes use.
    pub connector: pingora::connectors::http::Connector,
    /// Upstream addresses and CA bundles, resolved and read ahead of requests.
    pub upstreams: Arc<crate::upstream::Upstreams>,
    /// Bounds the LLM request bodies tokenized at once (on the blocking pool, never on a proxy
    /// worker): a burst of large prompts queues here instead of taking every thread.
    pub tokenizer_slots: tokio::sync::Semaphore,
    /// LLM settlements the counter store could not take yet, journaled on disk until it can.
    pub settlements: Deferred,
}

/// The inputs of the enforced policy: the policy file's texts and the control plane's latest
/// snapshot. The control plane's policy document, when it has one, wins over the file; its
/// subjects take the place of the file's subjects with the same id or key.
#[derive(Default)]
pub struct Sources {
    pub file: Vec<(String, String)>,
    pub snapshot: Option<quota::policy::Snapshot>,
}

impl Sources {
    pub fn compile(&self) -> Result<quota::policy::Policy, quota::policy::PolicyErrors> {
        match &self.snapshot {
            Some(s) => s.compile(&self.file),
            None if self.file.is_empty() => Ok(quota::policy::Policy::empty()),
            None => quota::policy::parse_sources(&self.file),
        }
    }

    /// Where the enforced policy comes from, for /status.
    pub fn describe(&self) -> String {
        match &self.snapshot {
            Some(s) if s.policy.is_some() => format!("control-plane revision {}", s.revision),
            Some(s) => format!("file with control-plane subjects (revision {})", s.revision),
            None if self.file.is_empty() => "none".into(),
            None => "file".into(),
        }
    }
}

/// The gateway's notion of now. Production uses the system clock; `--test-clock` lets an end-to-end
/// test move time (to cross a subject's local midnight) through the API listener.
pub struct Clock {
    /// `None`: the system clock, not adjustable. `Some`: offset added to the system clock.
    offset_ns: Option<AtomicI64>,
}

impl Clock {
    pub fn system() -> Self {
        Self { offset_ns: None }
    }

    pub fn adjustable() -> Self {
        Self {
            offset_ns: Some(AtomicI64::new(0)),
        }
    }

    pub fn now_ns(&self) -> i64 {
        let offset = self
            .offset_ns
            .as_ref()
            .map_or(0, |o| o.load(Ordering::Relaxed));
        quota::engine::now_ns().saturating_add(offset)
    }

    /// Make `now_ns()` return `t_ns` at this instant; false when the clock is not adjustable.
    pub fn set(&self, t_ns: i64) -> bool {
        match &self.offset_ns {
            Some(o) => {
                o.store(t_ns - quota::engine::now_ns(), Ordering::Relaxed);
                true
            }
            None => false,
        }
    }
}

impl AppState {
    /// Count a decision in the metrics and record it in the audit log.
    pub fn record_decision(
        &self,
        subject: &quota::policy::Subject,
        request_id: Option<&str>,
        quota: &str,
        amount: u64,
        refused: Option<&str>,
    ) {
        self.metrics
            .count_decision(&subject.id, &subject.tier.name, quota, amount, refused);
        if !self.audit.enabled() {
            return;
        }
        let body = match refused {
            None => EventBody::QuotaConsumed {
                quota: quota.into(),
                amount,
            },
            Some(reason) => EventBody::QuotaRejected {
                quota: quota.into(),
                amount,
                reason: reason.into(),
            },
        };
        let now = self.clock.now_ns();
        self.emit(subject, request_id, now, body);
    }

    /// Record an event about `subject` that changed its counters of the day around `at_ns`.
    pub fn emit(
        &self,
        subject: &quota::policy::Subject,
        request_id: Option<&str>,
        at_ns: i64,
        body: EventBody,
    ) {
        if !self.audit.enabled() {
            return;
        }
        let now = self.clock.now_ns();
        let event = AuditEvent::new(&self.gateway_id, Some(&subject.id), request_id, now, body)
            .with_day(subject.time_zone, at_ns);
        self.audit.emit(event);
    }

    pub fn audit(&self, subject: Option<&str>, request_id: Option<&str>, body: EventBody) {
        if !self.audit.enabled() {
            return;
        }
        let now = self.clock.now_ns();
        self.audit.emit(AuditEvent::new(
            &self.gateway_id,
            subject,
            request_id,
            now,
            body,
        ));
    }
}

/// What LLM billing needs from the gateway: its engine and clock, its settlement journal, the
/// audit sink and the metrics.
impl BillingEnv for AppState {
    type Store = Store;

    fn engine(&self) -> &Engine<Store> {
        &self.engine
    }

    fn now_ns(&self) -> i64 {
        self.clock.now_ns()
    }

    fn deferred(&self) -> &Deferred {
        &self.settlements
    }

    fn emit_settled(&self, event: SettledEvent) {
        if let EventBody::ReservationSettled { settlements, .. } = &event.body {
            self.metrics.count_settled(
                &event.subject,
                settlements.iter().map(|s| (s.quota.as_str(), s.actual)),
            );
        }
        if !self.audit.enabled() {
            return;
        }
        let now = self.clock.now_ns();
        self.audit.emit(event.into_audit(&self.gateway_id, now));
    }

    fn on_outcome(&self, outcome: Outcome, usage: Usage) {
        let m = &self.metrics;
        m.llm_settlements
            .with_label_values(&[outcome.as_str()])
            .inc();
        if outcome == Outcome::Charged {
            m.llm_tokens
                .with_label_values(&["prompt"])
                .inc_by(usage.input());
            m.llm_tokens
                .with_label_values(&["completion"])
                .inc_by(usage.completion);
        }
    }

    fn on_journal_depth(&self, depth: usize) {
        self.metrics
            .settlement_journal_depth
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
    }
}
