//! The accounting ledger, `quota_audit`: one row per event and quota, written by the accounting
//! consumer in one transaction per batch. The primary key (event id, quota) makes a redelivered
//! event a no-op, so at-least-once delivery gives each event exactly one effect.
//!
//! `delta` is what the event did to the subject's counters of `day`: the amount of a
//! `QuotaConsumed`, the actual use of each quota of a `ReservationSettled` (LLM calls are recorded
//! once they are settled; a reservation that expires unsettled left nothing), 0 otherwise.
//!
//! It also owns what the ledger cannot account for, kept whole so nothing is lost:
//! - `quota_audit_unreadable`: messages that are not events this consumer reads;
//! - `quota_audit_dead_letter`: events the ledger refuses. The database refusing a row (a NUL
//!   character in a text field on PostgreSQL, a constraint an operator added) must not stall
//!   every event behind it, so a refused batch is bisected down to the refused events, which are
//!   kept here with the error while the rest is written. Amounts are stored as BIGINT: an amount
//!   above `i64::MAX` (the events carry `u64`) is refused the same way rather than clamped, so
//!   the ledger holds exact figures or none, and the event waits here for an operator.
//!
//! Dead letters stay until acknowledged (`reconcile --ack-dead-letters`); until then
//! reconciliation reports them and fails.

use audit_kafka::{Delivered, LedgerWriter, Unreadable, Written};
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

/// Events the ledger refused: the message as delivered, where it was, and why. Keyed like
/// unreadable messages, so a redelivery keeps the first record (and its acknowledgement).
const DEAD_LETTER_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS quota_audit_dead_letter (
    topic TEXT NOT NULL, kafka_partition INTEGER NOT NULL, kafka_offset BIGINT NOT NULL,
    event_id TEXT NOT NULL, payload TEXT NOT NULL, error TEXT NOT NULL,
    ingested_at_ms BIGINT NOT NULL, acked_at_ms BIGINT,
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

/// An event turned into its rows, ready to insert.
struct Prepared<'a> {
    d: &'a Delivered,
    kind: &'static str,
    lines: Vec<Line<'a>>,
    body: String,
}

/// Ledger totals of one subject, quota and day. `delta` is exact: a sum of BIGINTs can exceed
/// `i64`, so it is an `i128`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Total {
    pub subject: String,
    pub quota: String,
    pub day: String,
    pub delta: i128,
    pub events: i64,
}

/// A dead letter as listed (without its payload, which is in the table).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetter {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub event_id: String,
    pub error: String,
    pub ingested_at: String,
}

/// An amount as the ledger stores it (BIGINT), or why it cannot be.
fn amount(field: &str, v: u64) -> Result<i64, String> {
    i64::try_from(v).map_err(|_| {
        format!(
            "`{field}` {v} is above the ledger's range ({}): kept as a dead letter, not clamped",
            i64::MAX
        )
    })
}

/// What the ledger will not store as given: a subject or quota name outside the rule every entry
/// point applies (`quota::names`), a day or a time that is not one. The topic is not trusted to
/// have been written by a gateway.
fn check_names(e: &AuditEvent) -> Result<(), String> {
    use quota::names::{NameKind, check};
    if let Some(s) = &e.subject {
        check(NameKind::Subject, s).map_err(|err| format!("`subject`: {err}"))?;
    }
    let quotas: Vec<&str> = match &e.body {
        EventBody::QuotaConsumed { quota, .. } | EventBody::QuotaRejected { quota, .. } => {
            vec![quota]
        }
        EventBody::ReservationSettled { settlements, .. } => {
            settlements.iter().map(|s| s.quota.as_str()).collect()
        }
        _ => Vec::new(),
    };
    for q in quotas {
        check(NameKind::QuotaType, q).map_err(|err| format!("`quota`: {err}"))?;
    }
    if let Some(day) = &e.day {
        chrono::NaiveDate::parse_from_str(day, "%Y-%m-%d")
            .map_err(|err| format!("`day` {day:?} is not a date (YYYY-MM-DD): {err}"))?;
    }
    chrono::DateTime::parse_from_rfc3339(&e.occurred_at)
        .map_err(|err| format!("`occurred_at` {:?} is not RFC 3339: {err}", e.occurred_at))?;
    Ok(())
}

fn prepare(d: &Delivered) -> Result<Prepared<'_>, String> {
    let e = &d.event;
    check_names(e)?;
    let plain = |quota, delta, reason| Line {
        quota,
        delta,
        reserved: None,
        actual: None,
        refunded: None,
        attempt_id: None,
        reason,
    };
    let (kind, lines) = match &e.body {
        EventBody::QuotaConsumed { quota, amount: a } => (
            "QuotaConsumed",
            vec![plain(quota, amount("amount", *a)?, None)],
        ),
        EventBody::QuotaRejected { quota, reason, .. } => {
            ("QuotaRejected", vec![plain(quota, 0, Some(reason))])
        }
        EventBody::ReservationSettled {
            attempt_id,
            settlements,
            ..
        } => (
            "ReservationSettled",
            settlements
                .iter()
                .map(|s| {
                    Ok(Line {
                        quota: &s.quota,
                        delta: amount("actual", s.actual)?,
                        reserved: Some(amount("reserved", s.reserved)?),
                        actual: Some(amount("actual", s.actual)?),
                        refunded: Some(amount("refunded", s.refunded)?),
                        attempt_id: Some(attempt_id),
                        reason: None,
                    })
                })
                .collect::<Result<_, String>>()?,
        ),
        EventBody::PolicyChanged { .. } => ("PolicyChanged", vec![plain("", 0, None)]),
        EventBody::EntitlementChanged { .. } => ("EntitlementChanged", vec![plain("", 0, None)]),
        EventBody::CredentialChanged { .. } => ("CredentialChanged", vec![plain("", 0, None)]),
    };
    Ok(Prepared {
        d,
        kind,
        lines,
        body: serde_json::to_string(e).unwrap_or_default(),
    })
}

/// Whether the database refused the data itself, so the same rows fail every time: PostgreSQL's
/// data exceptions (22xxx: a NUL in text, a value out of range), integrity constraint violations
/// (23xxx) and "program limit exceeded" (54000: a value too large for an index); SQLite's
/// constraint (incl. a trigger's `RAISE(ABORT)`), too-big and type-mismatch results. Everything
/// else (connection lost, server shutting down 57Pxx, serialization failure 40001, deadlock
/// 40P01, disk full, a missing table) counts as transient and is retried: retrying stalls the
/// ledger visibly, while dead-lettering a good event would hide it.
fn refuses_rows(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Encode(_) => true,
        sqlx::Error::Database(db) => {
            if let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
                let code = pg.code();
                code.starts_with("22") || code.starts_with("23") || code == "54000"
            } else if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                // The code is SQLite's extended result code; its low byte is the primary one.
                let code: i32 = db.code().and_then(|c| c.parse().ok()).unwrap_or(0);
                matches!(code & 0xff, 18..=20) // TOOBIG, CONSTRAINT, MISMATCH
            } else {
                false
            }
        }
        _ => false,
    }
}

/// The error as an operator reads it: the database's message and code.
fn describe(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => match db.code() {
            Some(code) => format!("{} (code {code})", db.message()),
            None => db.message().to_string(),
        },
        other => other.to_string(),
    }
}

/// Text any database stores: PostgreSQL refuses NUL in text, so it is written as the JSON escape
/// it stands for.
fn storable(s: &str) -> String {
    s.replace('\0', "\\u0000")
}

fn dead_letter_row(r: &sqlx::any::AnyRow) -> Result<DeadLetter, sqlx::Error> {
    Ok(DeadLetter {
        topic: r.try_get("topic")?,
        partition: r.try_get("kafka_partition")?,
        offset: r.try_get("kafka_offset")?,
        event_id: r.try_get("event_id")?,
        error: r.try_get("error")?,
        ingested_at: crate::store::rfc3339_ms(r.try_get("ingested_at_ms")?),
    })
}

impl Ledger {
    /// Use `pool` (SQLite or PostgreSQL) and create the tables if needed.
    pub async fn new(pool: AnyPool) -> Result<Self, sqlx::Error> {
        sqlx::query(SCHEMA).execute(&pool).await?;
        sqlx::query(UNREADABLE_SCHEMA).execute(&pool).await?;
        sqlx::query(DEAD_LETTER_SCHEMA).execute(&pool).await?;
        sqlx::query(
            "CREATE INDEX IF NOT EXISTS quota_audit_day ON quota_audit (day, subject, quota)",
        )
        .execute(&pool)
        .await?;
        // The console's charts: a time range of all subjects, or of one subject. Each index holds
        // every column those queries read, so a chart reads the index alone.
        sqlx::query(
            "CREATE INDEX IF NOT EXISTS quota_audit_time
             ON quota_audit (occurred_at, type, quota, reason, subject, delta)",
        )
        .execute(&pool)
        .await?;
        sqlx::query(
            "CREATE INDEX IF NOT EXISTS quota_audit_subject_time
             ON quota_audit (subject, occurred_at, type, quota, reason, delta, day)",
        )
        .execute(&pool)
        .await?;
        Ok(Self { pool })
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Write a batch: its events into `quota_audit` (events already there are skipped), events
    /// the ledger refuses into `quota_audit_dead_letter`, unreadable messages into
    /// `quota_audit_unreadable`. The events go in one transaction; when the database refuses it
    /// for its data, each half is tried on its own, down to the single events it refuses, so k
    /// bad events in a batch of n cost about k·log2(n) extra transactions and the good ones are
    /// all written. An error is returned only for failures worth retrying the whole batch
    /// (everything written is idempotent).
    pub async fn write_batch(
        &self,
        events: &[Delivered],
        unreadable: &[Unreadable],
    ) -> Result<Written, sqlx::Error> {
        let now = chrono::Utc::now().timestamp_millis();
        let mut dead: Vec<(&Delivered, String)> = Vec::new();
        let mut ready = Vec::with_capacity(events.len());
        for d in events {
            match prepare(d) {
                Ok(p) => ready.push(p),
                Err(why) => dead.push((d, why)),
            }
        }
        let mut inserted = 0;
        // Depth first, first half first: a stack of the parts still to write.
        let mut parts = vec![&ready[..]];
        while let Some(part) = parts.pop() {
            if part.is_empty() {
                continue;
            }
            match self.insert(part, now).await {
                Ok(n) => inserted += n,
                Err(e) if refuses_rows(&e) => match part {
                    [one] => dead.push((one.d, describe(&e))),
                    _ => {
                        let (a, b) = part.split_at(part.len() / 2);
                        parts.push(b);
                        parts.push(a);
                    }
                },
                Err(e) => return Err(e),
            }
        }
        if !dead.is_empty() || !unreadable.is_empty() {
            self.keep(unreadable, &dead, now).await?;
        }
        for (d, why) in &dead {
            tracing::warn!(
                topic = %d.topic,
                partition = d.partition,
                offset = d.offset,
                event_id = %storable(&d.event.event_id),
                error = %why,
                "the ledger refused an event; kept in quota_audit_dead_letter"
            );
        }
        Ok(Written {
            inserted,
            dead_lettered: dead.len() as u64,
        })
    }

    /// Insert `part` in one transaction; returns the number of events that were new.
    async fn insert(&self, part: &[Prepared<'_>], now: i64) -> Result<u64, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let mut inserted = 0;
        for p in part {
            let e = &p.d.event;
            let mut new_rows = 0;
            for l in &p.lines {
                let r = sqlx::query(
                    "INSERT INTO quota_audit (event_id, quota, type, subject, tenant, source,
                        request_id, occurred_at, day, delta, reserved, actual, refunded,
                        attempt_id, reason, body, ingested_at_ms)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)
                     ON CONFLICT (event_id, quota) DO NOTHING",
                )
                .bind(&e.event_id)
                .bind(l.quota)
                .bind(p.kind)
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
                .bind(&p.body)
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

    /// Keep unreadable messages and dead letters, in one transaction. Every text is made
    /// storable first, so the database has nothing to refuse here.
    async fn keep(
        &self,
        unreadable: &[Unreadable],
        dead: &[(&Delivered, String)],
        now: i64,
    ) -> Result<(), sqlx::Error> {
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
            .bind(storable(&u.error))
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        for (d, why) in dead {
            // The payload decoded as JSON, so it is UTF-8 and a NUL in it is already escaped;
            // `storable` only guards the impossible.
            let payload = String::from_utf8_lossy(&d.payload);
            sqlx::query(
                "INSERT INTO quota_audit_dead_letter
                    (topic, kafka_partition, kafka_offset, event_id, payload, error, ingested_at_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (topic, kafka_partition, kafka_offset) DO NOTHING",
            )
            .bind(&d.topic)
            .bind(d.partition)
            .bind(d.offset)
            .bind(storable(&d.event.event_id))
            .bind(storable(&payload))
            .bind(storable(why))
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await
    }

    /// How many messages are kept in `quota_audit_unreadable`.
    pub async fn unreadable_count(&self) -> Result<i64, sqlx::Error> {
        sqlx::query("SELECT COUNT(*) AS n FROM quota_audit_unreadable")
            .fetch_one(&self.pool)
            .await?
            .try_get("n")
    }

    /// How many dead letters are not acknowledged yet.
    pub async fn dead_letter_count(&self) -> Result<i64, sqlx::Error> {
        sqlx::query("SELECT COUNT(*) AS n FROM quota_audit_dead_letter WHERE acked_at_ms IS NULL")
            .fetch_one(&self.pool)
            .await?
            .try_get("n")
    }

    /// The oldest `limit` dead letters not acknowledged yet.
    pub async fn dead_letters(&self, limit: u32) -> Result<Vec<DeadLetter>, sqlx::Error> {
        sqlx::query(
            "SELECT topic, kafka_partition, kafka_offset, event_id, error, ingested_at_ms
             FROM quota_audit_dead_letter WHERE acked_at_ms IS NULL
             ORDER BY ingested_at_ms, topic, kafka_partition, kafka_offset LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(dead_letter_row)
        .collect()
    }

    /// Acknowledge every dead letter not acknowledged yet (an operator has dealt with them);
    /// returns exactly those, so one that arrives meanwhile is never acknowledged unseen. The
    /// rows stay, as a record.
    pub async fn ack_dead_letters(&self) -> Result<Vec<DeadLetter>, sqlx::Error> {
        let mut acked = sqlx::query(
            "UPDATE quota_audit_dead_letter SET acked_at_ms = $1 WHERE acked_at_ms IS NULL
             RETURNING topic, kafka_partition, kafka_offset, event_id, error, ingested_at_ms",
        )
        .bind(chrono::Utc::now().timestamp_millis())
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(dead_letter_row)
        .collect::<Result<Vec<_>, _>>()?;
        acked.sort_by(|a, b| {
            (&a.ingested_at, &a.topic, a.partition, a.offset).cmp(&(
                &b.ingested_at,
                &b.topic,
                b.partition,
                b.offset,
            ))
        });
        Ok(acked)
    }

    /// Totals per subject and quota for `day` (the subjects' local day).
    ///
    /// A plain `SUM(delta)` of BIGINTs overflows past `i64::MAX` (an error on SQLite, and on
    /// PostgreSQL once the NUMERIC sum is read back as BIGINT). So each delta is summed in two
    /// halves that cannot overflow — the high 32 bits (arithmetic shift, so negatives work) and
    /// the low 32 bits — and put together here as an `i128`: exact for any group of fewer than
    /// 2^31 rows, on both databases with the same SQL.
    pub async fn totals(&self, day: &str) -> Result<Vec<Total>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT subject, quota, day,
                CAST(SUM(delta >> 32) AS BIGINT) AS delta_hi,
                CAST(SUM(delta & 4294967295) AS BIGINT) AS delta_lo,
                COUNT(*) AS events FROM quota_audit
             WHERE day = $1 AND subject IS NOT NULL AND quota <> ''
             GROUP BY subject, quota, day ORDER BY subject, quota",
        )
        .bind(day)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let hi: i64 = r.try_get("delta_hi")?;
                let lo: i64 = r.try_get("delta_lo")?;
                Ok(Total {
                    subject: r.try_get("subject")?,
                    quota: r.try_get("quota")?,
                    day: r.try_get("day")?,
                    delta: (i128::from(hi) << 32) + i128::from(lo),
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
        events: &[Delivered],
        unreadable: &[Unreadable],
    ) -> impl Future<Output = Result<Written, sqlx::Error>> + Send {
        Ledger::write_batch(self, events, unreadable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_put_together_give_the_exact_sum() {
        // What `totals` does in SQL, done here over values whose plain sum overflows i64.
        let deltas = [i64::MAX, i64::MAX, 1, -5, i64::MIN + 1, 4_294_967_296];
        let hi: i64 = deltas.iter().map(|d| d >> 32).sum();
        let lo: i64 = deltas.iter().map(|d| d & 4_294_967_295).sum();
        let exact: i128 = deltas.iter().map(|&d| i128::from(d)).sum();
        assert_eq!((i128::from(hi) << 32) + i128::from(lo), exact);
    }

    #[test]
    fn amounts_above_the_bigint_range_are_refused_not_clamped() {
        assert_eq!(amount("amount", i64::MAX as u64), Ok(i64::MAX));
        let e = amount("amount", u64::MAX).unwrap_err();
        assert!(e.contains("18446744073709551615"), "{e}");
    }

    #[test]
    fn nul_is_escaped_for_storage() {
        assert_eq!(storable("a\0b"), "a\\u0000b");
        assert_eq!(storable("plain"), "plain");
    }
}
