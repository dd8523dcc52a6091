//! Reconciliation: the ledger's totals per subject, quota and day against the live daily counters
//! a gateway enforces (in memory or in Redis, read through its API with free probes that consume
//! nothing). Any difference is printed and, for a monitoring system, written as a Prometheus
//! text file (`quota_reconciliation_drift`). It also reports what the ledger could not account
//! for: unreadable messages and dead letters (events the ledger refused).
//!
//! Figures are `i128`: a ledger sum may exceed `i64` (old rows, upstream-reported usage), and a
//! report must never overflow or panic on one.

use crate::ledger::{DeadLetter, Ledger, Total};
use serde::Serialize;
use std::fmt::Write;

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("ledger: {0}")]
    Ledger(#[from] sqlx::Error),
    #[error("gateway {url}: {message}")]
    Gateway { url: String, message: String },
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub subject: String,
    pub quota: String,
    pub day: String,
    pub ledger: i128,
    /// `None` when there is no daily counter of this day to compare with: see `note`.
    pub live: Option<i128>,
    pub drift: i128,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub day: String,
    pub rows: Vec<Row>,
    /// Sum of absolute differences.
    pub drift: i128,
    /// Rows that could not be compared (see their notes).
    pub unchecked: usize,
    /// Messages the accounting consumer kept in `quota_audit_unreadable` (of any day): until
    /// they are accounted for, the ledger may be short by what they did.
    pub unreadable: i64,
    /// Events the ledger refused, kept in `quota_audit_dead_letter` and not acknowledged yet:
    /// the ledger is short by what they did until an operator deals with them.
    pub dead_letters: i64,
    /// The oldest few of them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dead_letter_samples: Vec<DeadLetter>,
    /// Dead letters this run acknowledged (`--ack-dead-letters`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub acknowledged: Vec<DeadLetter>,
}

/// Dead letters shown in a report.
const DEAD_LETTER_SAMPLES: u32 = 5;

/// A JSON integer of any sign and size serde_json holds, widened.
fn int(v: &serde_json::Value) -> Option<i128> {
    v.as_i64()
        .map(i128::from)
        .or_else(|| v.as_u64().map(i128::from))
}

/// What the gateway's daily counter of `subject`/`quota` holds, from a probe that costs nothing;
/// `Err(note)` when there is no counter of that day to compare with.
async fn live_daily(
    http: &reqwest::Client,
    gateway: &str,
    t: &Total,
) -> Result<Result<i128, String>, ReconcileError> {
    let url = format!("{}/check", gateway.trim_end_matches('/'));
    let err = |message: String| ReconcileError::Gateway {
        url: url.clone(),
        message,
    };
    let resp = http
        .post(&url)
        .json(&serde_json::json!({ "subject": t.subject, "quota": t.quota, "cost": 0 }))
        .send()
        .await
        .map_err(|e| err(e.to_string()))?;
    let status = resp.status();
    let v: serde_json::Value = resp.json().await.unwrap_or_default();
    if status == reqwest::StatusCode::NOT_FOUND && v["error"] == "unknown_subject" {
        return Ok(Err("subject no longer in the gateway's policy".into()));
    }
    if !status.is_success() {
        // A gateway that cannot read its counters (its store is down) must not look like zero.
        return Err(err(format!("answered {status}: {v}")));
    }
    if v["day"].as_str() != Some(t.day.as_str()) {
        return Ok(Err(format!(
            "the live counter is of {} (the subject's local today)",
            v["day"].as_str().unwrap_or("?")
        )));
    }
    let daily = v["limits"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|l| l["window"] == "day")
        .and_then(|l| Some(int(&l["limit"])? - int(&l["remaining"])?));
    Ok(daily.ok_or_else(|| "no daily limit on this quota".to_string()))
}

/// Compare the ledger's totals of `day` with the gateway's counters. With `ack_dead_letters`,
/// first acknowledge the dead letters an operator has dealt with (all not acknowledged yet).
/// `gateway_token`: the gateway API's bearer token, when it has one.
pub async fn reconcile(
    ledger: &Ledger,
    gateway: &str,
    gateway_token: Option<&str>,
    day: &str,
    ack_dead_letters: bool,
) -> Result<Report, ReconcileError> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(t) = gateway_token {
        let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {}", t.trim()))
            .map_err(|_| ReconcileError::Gateway {
                url: gateway.to_string(),
                message: "the gateway token is not a valid header value".into(),
            })?;
        v.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, v);
    }
    let http = reqwest::Client::builder()
        .no_proxy()
        .default_headers(headers)
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .map_err(|e| ReconcileError::Gateway {
            url: gateway.to_string(),
            message: e.to_string(),
        })?;
    let acknowledged = if ack_dead_letters {
        ledger.ack_dead_letters().await?
    } else {
        Vec::new()
    };
    let mut rows = Vec::new();
    for t in ledger.totals(day).await? {
        let live = live_daily(&http, gateway, &t).await?;
        rows.push(Row {
            drift: live.as_ref().map_or(0, |l| l.saturating_sub(t.delta)),
            subject: t.subject,
            quota: t.quota,
            day: t.day,
            ledger: t.delta,
            live: live.as_ref().ok().copied(),
            note: live.err(),
        });
    }
    let drift = rows
        .iter()
        .fold(0i128, |sum, r| sum.saturating_add(r.drift.saturating_abs()));
    let unchecked = rows.iter().filter(|r| r.live.is_none()).count();
    Ok(Report {
        day: day.to_string(),
        rows,
        drift,
        unchecked,
        unreadable: ledger.unreadable_count().await?,
        dead_letters: ledger.dead_letter_count().await?,
        dead_letter_samples: ledger.dead_letters(DEAD_LETTER_SAMPLES).await?,
        acknowledged,
    })
}

impl Report {
    /// Whether the ledger and the counters agree and the ledger holds everything it was sent.
    pub fn clean(&self) -> bool {
        self.drift == 0 && self.unreadable == 0 && self.dead_letters == 0
    }

    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<24} {:<16} {:<10} {:>12} {:>12} {:>8}\n",
            "subject", "quota", "day", "ledger", "live", "drift"
        );
        for r in &self.rows {
            let live = r.live.map_or_else(|| "-".to_string(), |l| l.to_string());
            let _ = writeln!(
                out,
                "{:<24} {:<16} {:<10} {:>12} {:>12} {:>8}  {}",
                r.subject,
                r.quota,
                r.day,
                r.ledger,
                live,
                r.drift,
                r.note.as_deref().unwrap_or("")
            );
        }
        let _ = writeln!(
            out,
            "{} counters, {} not comparable, total drift {}",
            self.rows.len(),
            self.unchecked,
            self.drift
        );
        if self.unreadable > 0 {
            let _ = writeln!(
                out,
                "{} messages the accounting consumer could not read are kept in quota_audit_unreadable",
                self.unreadable
            );
        }
        let letter = |out: &mut String, d: &DeadLetter| {
            let _ = writeln!(
                out,
                "  {}/{}/{} event {} ({}): {}",
                d.topic, d.partition, d.offset, d.event_id, d.ingested_at, d.error
            );
        };
        if self.dead_letters > 0 {
            let _ = writeln!(
                out,
                "{} events the ledger refused are kept in quota_audit_dead_letter \
                 (topic/partition/offset; acknowledge with --ack-dead-letters once dealt with):",
                self.dead_letters
            );
            for d in &self.dead_letter_samples {
                letter(&mut out, d);
            }
            if self.dead_letters > self.dead_letter_samples.len() as i64 {
                let _ = writeln!(out, "  …");
            }
        }
        if !self.acknowledged.is_empty() {
            let _ = writeln!(
                out,
                "acknowledged {} dead letters:",
                self.acknowledged.len()
            );
            for d in &self.acknowledged {
                letter(&mut out, d);
            }
        }
        out
    }

    /// Prometheus text format, for the node exporter's textfile collector.
    pub fn prometheus(&self) -> String {
        let mut out = String::from(
            "# HELP quota_reconciliation_drift Live daily counter minus the ledger's total\n\
             # TYPE quota_reconciliation_drift gauge\n",
        );
        let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
        for r in &self.rows {
            let _ = writeln!(
                out,
                "quota_reconciliation_drift{{subject=\"{}\",quota=\"{}\",day=\"{}\"}} {}",
                esc(&r.subject),
                esc(&r.quota),
                esc(&r.day),
                r.drift
            );
        }
        let _ = writeln!(
            out,
            "# HELP quota_reconciliation_drift_total Sum of absolute drifts\n\
             # TYPE quota_reconciliation_drift_total gauge\nquota_reconciliation_drift_total {}",
            self.drift
        );
        let _ = writeln!(
            out,
            "# HELP quota_audit_unreadable_messages Messages kept in quota_audit_unreadable\n\
             # TYPE quota_audit_unreadable_messages gauge\nquota_audit_unreadable_messages {}",
            self.unreadable
        );
        let _ = writeln!(
            out,
            "# HELP quota_audit_dead_letters Events the ledger refused, not acknowledged yet\n\
             # TYPE quota_audit_dead_letters gauge\nquota_audit_dead_letters {}",
            self.dead_letters
        );
        out
    }
}
