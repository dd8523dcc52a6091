//! The cost guardrail: once a subject's spend today reaches the policy's threshold of its budget,
//! routes flagged `expensive` are refused, or sent to their `fallback_upstream` (e.g. a cache).

use quota::engine::Engine;
use quota::policy::{Guardrail, Slot, Subject};
use quota::storage::Storage;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Where a subject stands against the guardrail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    Clear,
    Tripped {
        used: u64,
        limit: u64,
        reset_after_ns: i64,
    },
}

/// Subjects currently tripped, with when they tripped (for `/status`).
#[derive(Default)]
pub struct Tripped(Mutex<HashMap<Arc<str>, i64>>);

impl Tripped {
    pub fn snapshot(&self) -> Vec<(Arc<str>, i64)> {
        let mut v: Vec<_> = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(s, t)| (s.clone(), *t))
            .collect();
        v.sort();
        v
    }

    fn set(&self, subject: &Arc<str>, tripped: bool, now_ns: i64) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if tripped {
            m.entry(subject.clone()).or_insert(now_ns);
        } else {
            m.remove(subject);
        }
    }

    /// Read (without consuming) the subject's spend against its daily budget, and record whether
    /// it is tripped.
    pub async fn standing<S: Storage>(
        &self,
        engine: &Engine<S>,
        now: i64,
        subject: &Subject,
        g: &Guardrail,
    ) -> Standing {
        let d = match engine.check(subject, &g.quota, 0, None, now).await {
            Ok(d) => d,
            Err(e) => {
                // Unknown spend is not a reason to refuse: quotas still apply.
                tracing::warn!(error = %e, "guardrail: spend unknown");
                return Standing::Clear;
            }
        };
        let budget = d
            .limits
            .iter()
            .find(|l| l.slot == Slot::Day)
            .or_else(|| d.limits.iter().min_by_key(|l| l.remaining));
        let result = match budget {
            Some(l) if (l.limit - l.remaining) as f64 >= g.threshold * l.limit as f64 => {
                Standing::Tripped {
                    used: l.limit - l.remaining,
                    limit: l.limit,
                    reset_after_ns: l.reset_after_ns,
                }
            }
            _ => Standing::Clear,
        };
        self.set(&subject.id, matches!(result, Standing::Tripped { .. }), now);
        result
    }
}
