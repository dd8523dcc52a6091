//! Reconciliation: the ledger's totals per subject, quota and day against the live daily counters
//! a gateway enforces (in memory or in Redis, read through its API with free probes that consume
//! nothing). Any difference is printed and, for a monitoring system, written as a Prometheus
//! text file (`quota_reconciliation_drift`).

use crate::ledger::{Ledger, Total};
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
    pub ledger: i64,
    /// `None` when the quota has no daily counter to compare with (rates or monthly only).
    pub live: Option<i64>,
    pub drift: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub day: String,
    pub rows: Vec<Row>,
    /// Sum of absolute differences.
    pub drift: i64,
}

/// What the gateway's daily counter of `subject`/`quota` holds, from a probe that costs nothing.
async fn live_daily(
    http: &reqwest::Client,
    gateway: &str,
    t: &Total,
) -> Result<Option<i64>, ReconcileError> {
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
    if resp.status() == reqwest::StatusCode::NOT_FOUND {
        // The subject is gone from the policy: its counters can no longer be read.
        return Ok(None);
    }
    let v: serde_json::Value = resp.json().await.map_err(|e| err(e.to_string()))?;
    let day = v["limits"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|l| l["window"] == "day");
    Ok(day.and_then(|l| {
        let limit = l["limit"].as_i64()?;
        let remaining = l["remaining"].as_i64()?;
        Some(limit - remaining)
    }))
}

pub async fn reconcile(
    ledger: &Ledger,
    gateway: &str,
    day: &str,
) -> Result<Report, ReconcileError> {
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .map_err(|e| ReconcileError::Gateway {
            url: gateway.to_string(),
            message: e.to_string(),
        })?;
    let mut rows = Vec::new();
    for t in ledger.totals(day).await? {
        let live = live_daily(&http, gateway, &t).await?;
        rows.push(Row {
            drift: live.map_or(0, |l| l - t.delta),
            subject: t.subject,
            quota: t.quota,
            day: t.day,
            ledger: t.delta,
            live,
        });
    }
    let drift = rows.iter().map(|r| r.drift.abs()).sum();
    Ok(Report {
        day: day.to_string(),
        rows,
        drift,
    })
}

impl Report {
    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<24} {:<16} {:<10} {:>12} {:>12} {:>8}\n",
            "subject", "quota", "day", "ledger", "live", "drift"
        );
        for r in &self.rows {
            let live = r.live.map_or_else(|| "-".to_string(), |l| l.to_string());
            let _ = writeln!(
                out,
                "{:<24} {:<16} {:<10} {:>12} {:>12} {:>8}",
                r.subject, r.quota, r.day, r.ledger, live, r.drift
            );
        }
        let _ = writeln!(
            out,
            "{} counters, total drift {}",
            self.rows.len(),
            self.drift
        );
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
        out
    }
}
