//! The state shared by the proxy, the API listener and the reloader, injected as `Arc<AppState>`.

use crate::metrics::Metrics;
use quota::PolicyHandle;
use quota::audit::{AuditEvent, AuditSink, EventBody};
use quota::engine::Engine;
use quota::storage::AnyStore;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};

/// The counter store the gateway runs on: in memory (the embedded default) or Redis.
pub type Store = AnyStore;

pub struct AppState {
    pub policy: PolicyHandle,
    pub engine: Engine<Store>,
    pub metrics: Metrics,
    /// The policy file or directory, watched for changes.
    pub config_path: PathBuf,
    pub clock: Clock,
    /// Subjects over the cost guardrail's threshold.
    pub guardrail: crate::guardrail::Tripped,
    /// Where decisions and settlements are recorded (a JSONL file, or nowhere).
    pub audit: Box<dyn AuditSink>,
    /// Names this gateway in audit events.
    pub gateway_id: String,
    /// Client for LLM upstreams (the gateway reads their streams itself; see `llm`).
    pub http: reqwest::Client,
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
        subject: &str,
        request_id: Option<&str>,
        quota: &str,
        amount: u64,
        refused: Option<&str>,
    ) {
        let body = match refused {
            None => {
                self.metrics
                    .quota_consumed
                    .with_label_values(&[quota])
                    .inc_by(amount);
                EventBody::QuotaConsumed {
                    quota: quota.into(),
                    amount,
                }
            }
            Some(reason) => {
                self.metrics
                    .quota_rejected
                    .with_label_values(&[quota])
                    .inc();
                EventBody::QuotaRejected {
                    quota: quota.into(),
                    amount,
                    reason: reason.into(),
                }
            }
        };
        self.audit(Some(subject), request_id, body);
    }

    pub fn audit(&self, subject: Option<&str>, request_id: Option<&str>, body: EventBody) {
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
