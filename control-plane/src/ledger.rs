//! The accounting ledger, `quota_audit`: one row per event and quota, written by the accounting
//! consumer in one transaction per batch. The primary key (event id, quota) makes a redelivered
//! event a no-op, so at-least-once delivery gives each event exactly one effect.
//!
//! `delta` is what the event did to the subject's counters of `day`: the amount of a
//! `QuotaConsumed`, the actual use of each quota of a `ReservationSettled` (LLM calls are recorded
//! once they are settled; a reservation that expires unsettled left nothing), 0 otherwise.

use audit_kafka::{LedgerWriter, Unreadable};
use quota::audit::{AuditEvent, EventBody};
use serde::Serialize;
use sqlx::{AnyPool, Row};

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS quota_audit (
    event_id TEXT NOT NULL, quota TEXT NOT NULL, type TEXT NOT NULL,
    subject TEXT, tenant TEXT, source TEXT NOT NULL, request_id TEXT,
    occurred_at TEXT NOT NULL, day TEXT, delta BIGINT NOT NULL,
    reserved BIGINT, actual BIGINT, refunded BIGINT, attempt_id TEXT, reason TEXT,
    body TEXT NOT NULL, ingested_at_ms BIGINT NOT NULL,
    PRIMARY KEY (event_id, quota))";

/// Messages the consumer could not read as events (a newer schema during a rolling upgrade, or
/// junk), kept whole so an upgraded consumer or an operator can still account for them.
const UNREADABLE_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS quota_audit_unreadable (
    topic TEXT NOT NULL, kafka_partition INTEGER NOT NULL, kafka_offset BIGINT NOT NULL,
    payload TEXT NOT NULL, error TEXT NOT NULL, ingested_at_ms BIGINT NOT NULL,
    PRIMARY KEY (topic, kafka_partition, kafka_offset))";

#[derive(Clone)]
pub struct Ledger {
    pool: AnyPool,
}

/// One ledger row, before it is written.
struct Line<'a> {
    quota: &'a str,
    delta: i64,
    reserved: Option<i64>,
    actual: Option<i64>,
    refunded: Option<i64>,
    attempt_id: Option<&'a str>,
    reason: Option<&'a str>,
}

/// Ledger totals of one subject, quota and day.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Total {
    pub subject: String,
    pub quota: String,
    pub day: String,
    pub delta: i64,
    pub events: i64,
}

fn n(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn lines(e: &AuditEvent) -> (&'static str, Vec<Line<'_>>) {
    let plain = |quota, delta, reason| Line {
        quota,
        delta,
        reserved: None,
        actual: None,
        refunded: None,
        attempt_id: None,
        reason,
    };
    match &e.body {
        EventBody::QuotaConsumed { quota, amount } => {
            ("QuotaConsumed", vec![plain(quota, n(*amount), None)])
        }
        EventBody::QuotaRejected { quota, reason, .. } => {
            ("QuotaRejected", vec![plain(quota, 0, Some(reason))])
        }
        EventBody::ReservationSettled {
            attempt_id,
            settlements,
        } => (
            "ReservationSettled",
            settlements
                .iter()
                .map(|s| Line {
                    quota: &s.quota,
                    delta: n(s.actual),
                    reserved: Some(n(s.reserved)),
                    actual: Some(n(s.actual)),
                    refunded: Some(n(s.refunded)),
                    attempt_id: Some(attempt_id),
                    reason: None,
                })
                .collect(),
        ),
        EventBody::PolicyChanged { .. } => ("PolicyChanged", vec![plain("", 0, None)]),
        EventBody::EntitlementChanged { .. } => ("EntitlementChanged", vec![plain("", 0, None)]),
    }
}

impl Ledger {
    /// Use `pool` (SQLite or PostgreSQL) and create the table if needed.
    pub async fn new(pool: AnyPool) -> Result<Self, sqlx::Error> {
        sqlx::query(SCHEMA).execute(&pool).await?;
        sqlx::query(UNREADABLE_SCHEMA).execute(&pool).await?;
        sqlx::query(
            "CREATE INDEX IF NOT EXISTS quota_audit_day ON quota_audit (day, subject, quota)",
        )
        .execute(&pool)
        .await?;
        Ok(Self { pool })
    }

    /// Insert a batch in one transaction; events already in the ledger are skipped. Returns the
    /// number of events that were new.
    pub async fn write_batch(
        &self,
        events: &[AuditEvent],
        unreadable: &[Unreadable],
    ) -> Result<u64, sqlx::Error> {
        let now = chrono::Utc::now().timestamp_millis();
        let mut tx = self.pool.begin().await?;
        for u in unreadable {
            sqlx::query(
                "INSERT INTO quota_audit_unreadable
                    (topic, kafka_partition, kafka_offset, payload, error, ingested_at_ms)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (topic, kafka_partition, kafka_offset) DO NOTHING",
            )
            .bind(&u.topic)
            .bind(u.partition)
            .bind(u.offset)
            // Text, for both databases; an event is JSON (UTF-8), junk is kept as near as it goes.
            .bind(String::from_utf8_lossy(&u.payload).replace('\0', "\u{fffd}"))
            .bind(&u.error)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        let mut inserted = 0;
        for e in events {
            let body = serde_json::to_string(e).unwrap_or_default();
            let (kind, rows) = lines(e);
            let mut new_rows = 0;
            for l in rows {
                let r = sqlx::query(
                    "INSERT INTO quota_audit (event_id, quota, type, subject, tenant, source,
                        request_id, occurred_at, day, delta, reserved, actual, refunded,
                        attempt_id, reason, body, ingested_at_ms)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)
                     ON CONFLICT (event_id, quota) DO NOTHING",
                )
                .bind(&e.event_id)
                .bind(l.quota)
                .bind(kind)
                .bind(e.subject.as_deref())
                .bind(e.tenant.as_deref())
                .bind(&e.source)
                .bind(e.request_id.as_deref())
                .bind(&e.occurred_at)
                .bind(e.day.as_deref())
                .bind(l.delta)
                .bind(l.reserved)
                .bind(l.actual)
                .bind(l.refunded)
                .bind(l.attempt_id)
                .bind(l.reason)
                .bind(&body)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                new_rows += r.rows_affected();
            }
            inserted += u64::from(new_rows > 0);
        }
        tx.commit().await?;
        Ok(inserted)
    }

    /// How many messages are kept in `quota_audit_unreadable`.
    pub async fn unreadable_count(&self) -> Result<i64, sqlx::Error> {
        sqlx::query("SELECT COUNT(*) AS n FROM quota_audit_unreadable")
            .fetch_one(&self.pool)
            .await?
            .try_get("n")
    }

    /// Totals per subject and quota for `day` (the subjects' local day).
    pub async fn totals(&self, day: &str) -> Result<Vec<Total>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT subject, quota, day, CAST(SUM(delta) AS BIGINT) AS delta, COUNT(*) AS events FROM quota_audit
             WHERE day = $1 AND subject IS NOT NULL AND quota <> ''
             GROUP BY subject, quota, day ORDER BY subject, quota",
        )
        .bind(day)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Total {
                    subject: r.try_get("subject")?,
                    quota: r.try_get("quota")?,
                    day: r.try_get("day")?,
                    delta: r.try_get("delta")?,
                    events: r.try_get("events")?,
                })
            })
            .collect()
    }

    /// Rows of each event type (for checks and the reconciliation report).
    pub async fn count(&self, kind: &str) -> Result<i64, sqlx::Error> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM quota_audit WHERE type = $1")
            .bind(kind)
            .fetch_one(&self.pool)
            .await?;
        row.try_get("n")
    }
}

impl LedgerWriter for Ledger {
    type Error = sqlx::Error;

    fn write_batch(
        &self,
        events: &[AuditEvent],
        unreadable: &[Unreadable],
    ) -> impl Future<Output = Result<u64, sqlx::Error>> + Send {
        Ledger::write_batch(self, events, unreadable)
    }
}
