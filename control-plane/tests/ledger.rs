//! The ledger on SQLite and on PostgreSQL: a batch the database refuses is bisected down to the
//! refused events, which become dead letters while the rest is written; failures worth retrying
//! are not dead-lettered; amounts past the BIGINT range are refused, not clamped; and the totals
//! and reconciliation stay exact past `i64::MAX`.

use audit_kafka::{Delivered, Written};
use control_plane::Store;
use control_plane::ledger::Ledger;
use quota::audit::{AuditEvent, EventBody, Settlement};
use serde_json::json;
use sqlx::Row;

const DAY: &str = "2026-11-20";

/// A ledger database: in-memory SQLite, or a fresh PostgreSQL database dropped afterwards.
struct Db {
    url: String,
    pg: Option<(String, String)>,
}

impl Db {
    async fn new(pg: bool) -> Db {
        sqlx::any::install_default_drivers();
        if !pg {
            return Db {
                url: "sqlite::memory:".into(),
                pg: None,
            };
        }
        let admin = std::env::var("TOLLGATE_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let name = format!("tgledger_{}", uuid::Uuid::now_v7().simple());
        let pool = sqlx::AnyPool::connect(&admin).await.expect("postgres");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&pool)
            .await
            .expect("create database");
        let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
        Db {
            url: format!("{base}/{name}"),
            pg: Some((admin.clone(), name)),
        }
    }

    async fn ledger(&self) -> (Ledger, sqlx::AnyPool) {
        let store = Store::connect(&self.url).await.expect("store");
        let pool = store.pool().clone();
        (Ledger::new(pool.clone()).await.expect("ledger"), pool)
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        let Some((admin, name)) = self.pg.take() else {
            return;
        };
        // Dropped inside a runtime: do it on a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                if let Ok(pool) = sqlx::AnyPool::connect(&admin).await {
                    let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                    let _ = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&pool).await;
                }
            });
        })
        .join();
    }
}

fn delivered(offset: i64, subject: &str, body: EventBody) -> Delivered {
    let mut event = AuditEvent::new("test", Some(subject), Some("r"), 0, body);
    event.day = Some(DAY.into());
    Delivered {
        payload: serde_json::to_vec(&event).expect("json"),
        event,
        topic: "tollgate-audit".into(),
        partition: 1,
        offset,
    }
}

fn consumed(offset: i64, subject: &str, amount: u64) -> Delivered {
    delivered(
        offset,
        subject,
        EventBody::QuotaConsumed {
            quota: "lookup".into(),
            amount,
        },
    )
}

async fn strings(pool: &sqlx::AnyPool, sql: &'static str) -> Vec<String> {
    let mut v: Vec<String> = sqlx::query(sql)
        .fetch_all(pool)
        .await
        .expect("query")
        .iter()
        .map(|r| r.try_get::<String, _>(0).expect("text"))
        .collect();
    v.sort();
    v
}

/// Ten events, three of them refused by the database (positions 0, 5 and 9): on PostgreSQL by
/// a NUL in the request id (names are checked before the database), on SQLite (which stores
/// NUL) by a trigger standing for any constraint.
async fn bisection(pg: bool) {
    let db = Db::new(pg).await;
    let (ledger, pool) = db.ledger().await;
    let bad_subject = if pg {
        "nul-in-request-id"
    } else {
        sqlx::query(
            "CREATE TRIGGER refuse BEFORE INSERT ON quota_audit WHEN NEW.subject = 'refused'
             BEGIN SELECT RAISE(ABORT, 'refused by the ledger''s rules'); END",
        )
        .execute(&pool)
        .await
        .expect("trigger");
        "refused"
    };
    let bad = [0, 5, 9];
    let batch: Vec<Delivered> = (0..10)
        .map(|i| {
            let subject = if bad.contains(&i) {
                bad_subject
            } else {
                "acme"
            };
            let mut d = consumed(i, subject, 1);
            if pg && subject == bad_subject {
                d.event.request_id = Some("bad\0request".into());
                d.payload = serde_json::to_vec(&d.event).expect("json");
            }
            d
        })
        .collect();
    let written = ledger.write_batch(&batch, &[]).await.expect("written");
    assert_eq!(
        written,
        Written {
            inserted: 7,
            dead_lettered: 3
        }
    );
    let good: Vec<String> = {
        let mut v: Vec<String> = batch
            .iter()
            .filter(|d| !bad.contains(&d.offset))
            .map(|d| d.event.event_id.clone())
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        strings(&pool, "SELECT event_id FROM quota_audit").await,
        good
    );
    let dead = ledger.dead_letters(10).await.expect("dead letters");
    let mut offsets: Vec<i64> = dead.iter().map(|d| d.offset).collect();
    offsets.sort();
    assert_eq!(offsets, [0, 5, 9]);
    for d in &dead {
        let sent = &batch[d.offset as usize];
        assert_eq!(
            (d.partition, d.event_id.as_str()),
            (1, sent.event.event_id.as_str())
        );
        let want = if pg {
            "0x00"
        } else {
            "refused by the ledger's rules"
        };
        assert!(d.error.contains(want), "{d:?}");
    }
    // The payload is kept as the topic delivered it.
    let payloads = strings(&pool, "SELECT payload FROM quota_audit_dead_letter").await;
    for p in &payloads {
        let e: AuditEvent = serde_json::from_str(p).expect("the payload is the event's JSON");
        assert_eq!(e.subject.as_deref(), Some(bad_subject));
    }
    assert_eq!(ledger.dead_letter_count().await.expect("count"), 3);

    // Redelivered (a consumer restarted before its commit): nothing new, nothing twice.
    let again = ledger.write_batch(&batch, &[]).await.expect("written");
    assert_eq!(
        again,
        Written {
            inserted: 0,
            dead_lettered: 3
        }
    );
    assert_eq!(ledger.dead_letter_count().await.expect("count"), 3);

    // Acknowledged, they no longer count, and a redelivery does not bring them back.
    let acked = ledger.ack_dead_letters().await.expect("ack");
    assert_eq!(acked.len(), 3);
    ledger.write_batch(&batch, &[]).await.expect("written");
    assert_eq!(ledger.dead_letter_count().await.expect("count"), 0);
    assert!(ledger.ack_dead_letters().await.expect("ack").is_empty());
}

#[tokio::test]
async fn a_refused_batch_is_bisected_to_exactly_the_refused_events_sqlite() {
    bisection(false).await;
}

#[tokio::test]
async fn a_refused_batch_is_bisected_to_exactly_the_refused_events_postgres() {
    bisection(true).await;
}

#[tokio::test]
async fn a_database_that_is_away_is_retried_not_dead_lettered() {
    let db = Db::new(true).await;
    let (ledger, pool) = db.ledger().await;
    pool.close().await;
    let batch = [consumed(0, "acme", 1), consumed(1, "bad\0subject", 1)];
    assert!(
        ledger.write_batch(&batch, &[]).await.is_err(),
        "an error for the consumer to retry"
    );
    let (ledger, _pool) = db.ledger().await;
    assert_eq!(ledger.dead_letter_count().await.expect("count"), 0);
    assert_eq!(
        ledger.write_batch(&batch, &[]).await.expect("written"),
        Written {
            inserted: 1,
            dead_lettered: 1
        }
    );
}

#[tokio::test]
async fn amounts_past_the_bigint_range_are_dead_lettered_not_clamped() {
    let db = Db::new(false).await;
    let (ledger, pool) = db.ledger().await;
    let settled = |offset, actual| {
        delivered(
            offset,
            "acme",
            EventBody::ReservationSettled {
                attempt_id: format!("a{offset}"),
                settlements: vec![Settlement {
                    quota: "tokens".into(),
                    reserved: 10,
                    actual,
                    refunded: 0,
                }],
                usage: None,
            },
        )
    };
    let batch = [
        consumed(0, "acme", u64::MAX),
        consumed(1, "acme", i64::MAX as u64),
        settled(2, 1 << 63),
        settled(3, 7),
    ];
    let written = ledger.write_batch(&batch, &[]).await.expect("written");
    assert_eq!(
        written,
        Written {
            inserted: 2,
            dead_lettered: 2
        }
    );
    let dead = ledger.dead_letters(10).await.expect("dead letters");
    let errors: Vec<(i64, &str)> = dead.iter().map(|d| (d.offset, d.error.as_str())).collect();
    assert!(
        errors
            .iter()
            .any(|(o, e)| *o == 0 && e.contains("`amount` 18446744073709551615")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|(o, e)| *o == 2 && e.contains("`actual` 9223372036854775808")),
        "{errors:?}"
    );
    let max: i64 = sqlx::query_scalar("SELECT MAX(delta) FROM quota_audit")
        .fetch_one(&pool)
        .await
        .expect("max");
    assert_eq!(max, i64::MAX, "in range is stored exactly");
}

/// A gateway answering every probe with a daily counter of `DAY` at `used` of `u64::MAX`.
async fn stub_gateway(used: u64) -> String {
    let app = axum::Router::new().route(
        "/check",
        axum::routing::post(move || async move {
            axum::Json(json!({
                "day": DAY,
                "limits": [{ "window": "day", "limit": u64::MAX, "remaining": u64::MAX - used }],
            }))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

async fn sums_past_i64(pg: bool) {
    let db = Db::new(pg).await;
    let (ledger, _pool) = db.ledger().await;
    // Old rows from before `/check` capped costs: each in range, their sum far past it.
    let batch: Vec<Delivered> = (0..3)
        .map(|i| consumed(i, "whale", i64::MAX as u64))
        .chain([consumed(3, "minnow", 5)])
        .collect();
    ledger.write_batch(&batch, &[]).await.expect("written");
    let whale = 3 * i128::from(i64::MAX);
    let totals = ledger.totals(DAY).await.expect("totals");
    let got: Vec<(&str, i128, i64)> = totals
        .iter()
        .map(|t| (t.subject.as_str(), t.delta, t.events))
        .collect();
    assert_eq!(got, [("minnow", 5, 1), ("whale", whale, 3)]);

    let gateway = stub_gateway(u64::MAX).await;
    let report = control_plane::reconcile::reconcile(&ledger, &gateway, None, DAY, false)
        .await
        .expect("report");
    let row = report
        .rows
        .iter()
        .find(|r| r.subject == "whale")
        .expect("whale");
    assert_eq!(row.ledger, whale);
    assert_eq!(row.live, Some(i128::from(u64::MAX)));
    assert_eq!(row.drift, i128::from(u64::MAX) - whale);
    assert!(!report.clean());
    let json = serde_json::to_string(&report).expect("json");
    assert!(json.contains(&format!("\"ledger\":{whale}")), "{json}");
    assert!(report.table().contains(&whale.to_string()));
    assert!(
        report
            .prometheus()
            .contains(&(whale - i128::from(u64::MAX)).to_string())
    );
}

#[tokio::test]
async fn totals_and_reconciliation_stay_exact_past_i64_max_sqlite() {
    sums_past_i64(false).await;
}

#[tokio::test]
async fn totals_and_reconciliation_stay_exact_past_i64_max_postgres() {
    sums_past_i64(true).await;
}

/// Names and dates from the topic are checked before they reach the ledger: a subject or quota
/// outside the naming rule, a day or time that is not one, is a dead letter with its reason.
#[tokio::test]
async fn names_and_dates_from_the_topic_are_checked() {
    let db = Db::new(false).await;
    let (ledger, pool) = db.ledger().await;
    let mut batch = vec![
        consumed(0, "acme", 1),
        consumed(1, "acme\u{1b}[2J", 1),
        delivered(
            2,
            "acme",
            EventBody::QuotaConsumed {
                quota: String::new(),
                amount: 5,
            },
        ),
        consumed(3, "acme", 1),
        consumed(4, "acme", 1),
    ];
    batch[3].event.day = Some("junk".into());
    batch[4].event.occurred_at = "9999-99-99".into();
    let written = ledger.write_batch(&batch, &[]).await.expect("written");
    assert_eq!(
        written,
        Written {
            inserted: 1,
            dead_lettered: 4
        }
    );
    assert_eq!(
        strings(&pool, "SELECT subject FROM quota_audit").await,
        ["acme"]
    );
    let dead = ledger.dead_letters(10).await.expect("dead letters");
    let mut why: Vec<(i64, String)> = dead.iter().map(|d| (d.offset, d.error.clone())).collect();
    why.sort();
    for ((offset, error), field) in
        why.iter()
            .zip(["`subject`", "`quota`", "`day`", "`occurred_at`"])
    {
        assert!(error.contains(field), "offset {offset}: {error}");
    }
}
