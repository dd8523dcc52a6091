//! Audit events through a real Kafka-protocol broker (tansu) into the `quota_audit` ledger:
//! every decision and settlement arrives exactly once, through a broker outage, a consumer killed
//! mid-batch and a gateway restart; reconciliation finds the ledger equal to the live counters.

use serde_json::{Value, json};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tollgate_e2e::*;

/// A fixed day, so a run near midnight still reconciles one day.
const DAY: &str = "2026-11-20";

fn kafka_policy(upstream: SocketAddr) -> String {
    format!(
        "version: kafka-test
upstreams:
  up: {{ address: '{upstream}', read_timeout_ms: 10000 }}
routes:
  - {{ name: lookup, match: {{ path_prefix: /lookup }}, upstream: up, quota: lookup }}
  - name: chat
    match: {{ path_prefix: /v1/chat/completions }}
    upstream: up
    quota: requests
    llm: {{ provider: openai, tokens: tokens, default_max_tokens: 200 }}
tiers:
  plus:
    lookup: {{ daily: 1000000 }}
    requests: {{ daily: 100000 }}
    tokens: {{ daily: 100000000 }}
subjects:
  - {{ key: key-a, id: sub-a, tier: plus }}
  - {{ key: key-b, id: sub-b, tier: plus }}
"
    )
}

fn kafka_args<'a>(broker: &'a str, spool: &'a str) -> Vec<&'a str> {
    vec![
        "--audit-kafka",
        broker,
        "--audit-spool",
        spool,
        // tansu 0.6 (SQLite storage) fails idempotent producers that outlive a broker restart
        // (its idempotence check panics); real Kafka needs no such option.
        "--audit-kafka-option",
        "enable.idempotence=false",
        "--test-clock",
        "--gateway-id",
        "gw-kafka",
    ]
}

async fn set_clock(gw: &Gateway) {
    let r = post_json(
        gw.api_url("/test/clock"),
        &json!({ "now": format!("{DAY}T12:00:00Z") }),
    )
    .await;
    assert!(r["now"].as_str().is_some_and(|n| n.starts_with(DAY)), "{r}");
}

/// `n` lookups, `concurrency` at a time, alternating subjects, each with its own request id
/// `{tag}-{i}`. Returns how many were admitted.
async fn lookups(gw: &Gateway, tag: &str, n: usize, concurrency: usize) -> usize {
    let next = Arc::new(AtomicU64::new(0));
    let ok = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (next, ok) = (next.clone(), ok.clone());
        let url = gw.url("/lookup");
        let tag = tag.to_string();
        tasks.push(tokio::spawn(async move {
            let c = client();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= n {
                    return;
                }
                let key = if i.is_multiple_of(2) {
                    "key-a"
                } else {
                    "key-b"
                };
                let r = c
                    .get(&url)
                    .bearer_auth(key)
                    .header("x-request-id", format!("{tag}-{i}"))
                    .send()
                    .await;
                if r.is_ok_and(|r| r.status() == 200) {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("load task");
    }
    ok.load(Ordering::Relaxed) as usize
}

async fn chats(gw: &Gateway, n: usize) {
    for i in 0..n {
        let r = client()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth("key-a")
            .header("x-request-id", format!("chat-{i}"))
            .json(&json!({
                "model": "gpt-4o-mini",
                "stream": true,
                "max_tokens": 100,
                "messages": [{ "role": "user", "content": "count the tokens" }],
            }))
            .send()
            .await
            .expect("chat");
        assert_eq!(r.status(), 200);
        r.bytes().await.expect("stream read to the end");
    }
}

async fn ledger_has(ledger: &LedgerDb, sql: &'static str, want: i64, within: Duration) -> bool {
    eventually(within, || async { ledger.scalar(sql).await == want }).await
}

const DECISIONS: &str = "SELECT COUNT(DISTINCT event_id) FROM quota_audit WHERE type IN ('QuotaConsumed', 'QuotaRejected')";
const ROWS_VS_EVENTS: &str =
    "SELECT COUNT(*) - COUNT(DISTINCT event_id || '/' || quota) FROM quota_audit";

/// The request ids of every admitted request in the ledger.
async fn consumed_ids(ledger: &LedgerDb) -> HashSet<String> {
    ledger
        .strings("SELECT request_id FROM quota_audit WHERE type = 'QuotaConsumed'")
        .await
        .into_iter()
        .collect()
}

fn reconcile(db: &Db, gw: &Gateway) -> (i32, Value) {
    reconcile_with(db, gw, &[])
}

fn reconcile_with(db: &Db, gw: &Gateway, extra: &[&str]) -> (i32, Value) {
    let out = std::process::Command::new(bin("control-plane"))
        .args([
            "reconcile",
            "--database",
            &db.url(),
            "--gateway",
            &gw.api_url(""),
        ])
        .args(["--day", DAY, "--json"])
        .args(extra)
        .output()
        .expect("reconcile");
    // A failed run prints no JSON: keep its message, so an assertion on the report shows why.
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        json!({ "stdout": String::from_utf8_lossy(&out.stdout),
                "stderr": String::from_utf8_lossy(&out.stderr) })
    });
    (out.status.code().unwrap_or(-1), report)
}

/// A broker, a ledger database and a gateway sending its audit events to the broker, with its
/// clock on `DAY`.
struct Setup {
    _mock: MockUpstream,
    broker: Broker,
    db: Db,
    _spool: TempDir,
    gw: Gateway,
}

impl Setup {
    async fn start() -> Setup {
        Self::start_on(Db::sqlite()).await
    }

    async fn start_on(db: Db) -> Setup {
        let mock = MockUpstream::start();
        let broker = Broker::start();
        let spool = TempDir::new("spool");
        let brokers = broker.brokers();
        let spool_dir = spool.0.to_string_lossy().to_string();
        let gw = Gateway::start_with(&kafka_policy(mock.addr), &kafka_args(&brokers, &spool_dir));
        set_clock(&gw).await;
        Setup {
            _mock: mock,
            broker,
            db,
            _spool: spool,
            gw,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_requests_reach_the_sqlite_ledger_once_and_reconcile_to_zero() {
    ten_thousand(Db::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_requests_reach_the_postgres_ledger_once_and_reconcile_to_zero() {
    ten_thousand(Db::postgres()).await;
}

async fn ten_thousand(db: Db) {
    let Setup {
        _mock,
        broker,
        db,
        _spool,
        gw,
    } = Setup::start_on(db).await;
    let mut consumer = Accounting::start(&broker, &db, 500);
    let ledger = LedgerDb::open(&db).await;

    assert_eq!(lookups(&gw, "bulk", 10_000, 32).await, 10_000);
    chats(&gw, 20).await;
    assert!(
        ledger_has(&ledger, DECISIONS, 10_000, Duration::from_secs(60)).await,
        "10,000 decision events in the ledger, found {}",
        ledger.scalar(DECISIONS).await
    );
    let settled =
        "SELECT COUNT(DISTINCT event_id) FROM quota_audit WHERE type = 'ReservationSettled'";
    assert!(ledger_has(&ledger, settled, 20, Duration::from_secs(30)).await);
    // Each settlement row carries reserved, actual and refunded of one quota.
    let bad = ledger
        .scalar(
            "SELECT COUNT(*) FROM quota_audit WHERE type = 'ReservationSettled'
             AND (actual IS NULL OR reserved IS NULL OR refunded <> CASE WHEN reserved > actual THEN reserved - actual ELSE 0 END)",
        )
        .await;
    assert_eq!(bad, 0);
    assert_eq!(ledger.scalar(ROWS_VS_EVENTS).await, 0);
    let consumed = ledger
        .scalar("SELECT CAST(SUM(delta) AS BIGINT) FROM quota_audit WHERE quota = 'lookup'")
        .await;
    assert_eq!(consumed, 10_000);

    let (code, report) = reconcile(&db, &gw);
    assert_eq!(report["drift"], 0, "{report}");
    assert_eq!(code, 0);
    let rows = report["rows"].as_array().expect("rows");
    assert!(
        rows.iter()
            .any(|r| r["quota"] == "tokens" && r["ledger"].as_i64() > Some(0)),
        "settled tokens are reconciled too: {report}"
    );
    // With the consumer stopped, five more lookups are counted but not in the ledger: the drift
    // is reported, with a non-zero exit and a metric.
    consumer.kill();
    assert_eq!(lookups(&gw, "unledgered", 5, 1).await, 5);
    let metrics_file = TempDir::new("drift");
    let prom = metrics_file.0.join("drift.prom");
    let out = std::process::Command::new(bin("control-plane"))
        .args([
            "reconcile",
            "--database",
            &db.url(),
            "--gateway",
            &gw.api_url(""),
        ])
        .args([
            "--day",
            DAY,
            "--metrics-file",
            prom.to_str().expect("utf-8"),
        ])
        .output()
        .expect("reconcile");
    assert_eq!(out.status.code(), Some(3));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("total drift 5"), "{table}");
    let prom = std::fs::read_to_string(&prom).expect("metrics file");
    assert!(
        prom.contains("quota_reconciliation_drift_total 5"),
        "{prom}"
    );
}

/// Put `event` (JSON) on partition `partition` of the audit topic, as any producer could.
async fn produce_raw(broker: &Broker, partition: i32, event: &Value) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker.brokers())
        .create()
        .expect("producer");
    let payload = serde_json::to_vec(event).expect("json");
    producer
        .send(
            FutureRecord::<(), _>::to("tollgate-audit")
                .partition(partition)
                .payload(&payload),
            Duration::from_secs(10),
        )
        .await
        .expect("produced");
}

fn raw_event(id: &str, subject: &str, amount: u64) -> Value {
    json!({
        "event_id": id, "schema_version": 1, "occurred_at": format!("{DAY}T12:00:00.000Z"),
        "source": "raw-producer", "subject": subject, "tenant": subject, "request_id": id,
        "day": DAY, "type": "QuotaConsumed", "quota": "lookup", "amount": amount,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_postgres_refuses_are_dead_lettered_and_the_ledger_moves_on() {
    let Setup {
        _mock,
        broker,
        db,
        _spool,
        gw,
    } = Setup::start_on(Db::postgres()).await;
    let consumer = Accounting::start(&broker, &db, 50);
    let ledger = LedgerDb::open(&db).await;
    assert_eq!(lookups(&gw, "before", 10, 2).await, 10);
    assert!(ledger_has(&ledger, DECISIONS, 10, Duration::from_secs(30)).await);

    // A NUL in a subject (outside the naming rule, and PostgreSQL refuses NUL in text) on every
    // partition, so whatever partition the gateway's next events go to, they queue behind one;
    // and an amount past the BIGINT range.
    for p in 0..3 {
        produce_raw(
            &broker,
            p,
            &raw_event(&format!("nul-{p}"), "bad\0subject", 1),
        )
        .await;
    }
    produce_raw(&broker, 1, &raw_event("huge", "sub-a", u64::MAX)).await;
    assert_eq!(lookups(&gw, "after", 10, 2).await, 10);

    assert!(
        ledger_has(&ledger, DECISIONS, 20, Duration::from_secs(60)).await,
        "the events behind the refused ones reach the ledger ({} of 20)",
        ledger.scalar(DECISIONS).await
    );
    let dead = "SELECT COUNT(*) FROM quota_audit_dead_letter";
    assert!(ledger_has(&ledger, dead, 4, Duration::from_secs(10)).await);
    let errors = ledger
        .strings("SELECT event_id || ': ' || error FROM quota_audit_dead_letter ORDER BY event_id")
        .await;
    assert_eq!(errors.len(), 4, "{errors:?}");
    assert!(
        errors[0].starts_with("huge: `amount` 18446744073709551615"),
        "{errors:?}"
    );
    for e in &errors[1..] {
        assert!(
            e.starts_with("nul-") && e.contains("`subject`"),
            "{errors:?}"
        );
    }
    assert_eq!(
        ledger
            .strings("SELECT payload FROM quota_audit_dead_letter WHERE event_id = 'nul-0'")
            .await,
        [raw_event("nul-0", "bad\0subject", 1).to_string()],
        "kept as delivered"
    );
    assert_eq!(
        consumer
            .counter("accounting_events_dead_lettered_total")
            .await,
        4
    );

    // Reconciliation agrees with the counters but fails, naming the dead letters…
    let (code, report) = reconcile(&db, &gw);
    assert_eq!(code, 3, "{report}");
    assert_eq!(
        (&report["drift"], &report["dead_letters"]),
        (&json!(0), &json!(4)),
        "{report}"
    );
    let named: HashSet<&str> = report["dead_letter_samples"]
        .as_array()
        .expect("samples")
        .iter()
        .filter_map(|d| d["event_id"].as_str())
        .collect();
    assert_eq!(
        named,
        HashSet::from(["nul-0", "nul-1", "nul-2", "huge"]),
        "{report}"
    );
    // …until an operator acknowledges them.
    let (code, report) = reconcile_with(&db, &gw, &["--ack-dead-letters"]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(
        report["acknowledged"].as_array().map(Vec::len),
        Some(4),
        "{report}"
    );
    assert_eq!(reconcile(&db, &gw).0, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_outage_spools_then_drains_and_the_ledger_holds_every_event_once() {
    let Setup {
        _mock,
        mut broker,
        db,
        _spool,
        gw,
    } = Setup::start().await;
    let _consumer = Accounting::start(&broker, &db, 200);
    let ledger = LedgerDb::open(&db).await;

    // Steady load in the background for the whole run, counting answers per phase.
    let stop = Arc::new(AtomicBool::new(false));
    let phase = Arc::new(AtomicU64::new(0)); // 0 before, 1 broker down, 2 after
    let counts: Arc<[AtomicU64; 3]> = Arc::new(Default::default());
    let errors = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for w in 0..8u32 {
        let (stop, phase, counts, errors) =
            (stop.clone(), phase.clone(), counts.clone(), errors.clone());
        let url = gw.url("/lookup");
        load.push(tokio::spawn(async move {
            let c = client();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let r = c
                    .get(&url)
                    .bearer_auth(if w.is_multiple_of(2) {
                        "key-a"
                    } else {
                        "key-b"
                    })
                    .header("x-request-id", format!("outage-{w}-{i}"))
                    .send()
                    .await;
                i += 1;
                let p = phase.load(Ordering::Relaxed) as usize;
                match r {
                    Ok(r) if r.status() == 200 => counts[p].fetch_add(1, Ordering::Relaxed),
                    _ => errors.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before_s = t0.elapsed().as_secs_f64();

    broker.kill();
    phase.store(1, Ordering::Relaxed);
    let t1 = Instant::now();
    assert!(
        eventually(Duration::from_secs(9), || async {
            metric(&metrics(&gw).await, "audit_spool_pending_records").unwrap_or(0) > 0
        })
        .await,
        "events go to the spool while the broker is down"
    );
    // The outage lasts 10 s whatever the checks above took.
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(t1.elapsed())).await;
    let outage_s = t1.elapsed().as_secs_f64();
    let spooled_peak = metric(&metrics(&gw).await, "audit_spool_pending_records").unwrap_or(0);

    broker.restart();
    phase.store(2, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.expect("load task");
    }
    assert_eq!(
        errors.load(Ordering::Relaxed),
        0,
        "every request answered 200"
    );
    let rate = |p: usize, s: f64| counts[p].load(Ordering::Relaxed) as f64 / s;
    let ratio = rate(1, outage_s) / rate(0, before_s);
    figure("audit_outage_rps_ratio", format!("{ratio:.2}"));
    assert!(
        ratio > 0.5,
        "the gateway kept its pace while the broker was down: {ratio:.2}"
    );

    // The spool drains and the ledger ends with every event exactly once.
    assert!(
        eventually(Duration::from_secs(60), || async {
            metric(&metrics(&gw).await, "audit_spool_pending_records") == Some(0)
        })
        .await,
        "the spool drained"
    );
    let m = metrics(&gw).await;
    let emitted = metric(&m, "audit_events_total").expect("audit_events_total") as i64;
    let admitted: u64 = counts.iter().map(|c| c.load(Ordering::Relaxed)).sum();
    assert_eq!(emitted as u64, admitted, "one event per decision");
    let landed = ledger_has(&ledger, DECISIONS, emitted, Duration::from_secs(60)).await;
    let in_ledger = ledger.scalar(DECISIONS).await;
    let duplicated = ledger.scalar(ROWS_VS_EVENTS).await;
    figure("audit_events_total", emitted);
    figure("audit_events_lost", emitted - in_ledger);
    figure("audit_events_duplicated", duplicated);
    figure("audit_outage_spool_peak_records", spooled_peak);
    assert!(landed, "{in_ledger} of {emitted} events in the ledger");
    assert_eq!(duplicated, 0);
    let ids = ledger
        .strings("SELECT request_id FROM quota_audit WHERE type = 'QuotaConsumed'")
        .await;
    assert_eq!(
        consumed_ids(&ledger).await.len(),
        ids.len(),
        "no request twice"
    );
    let (code, report) = reconcile(&db, &gw);
    assert_eq!((code, &report["drift"]), (0, &json!(0)), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_consumer_killed_mid_batch_leaves_no_gap_and_no_duplicate() {
    let Setup {
        _mock,
        broker,
        db,
        _spool,
        gw,
    } = Setup::start().await;
    let ledger = LedgerDb::open(&db).await;

    // Events wait in the topic; then a consumer with small batches is killed part way.
    assert_eq!(lookups(&gw, "kill", 4_000, 16).await, 4_000);
    let mut consumer = Accounting::start(&broker, &db, 50);
    assert!(
        eventually(Duration::from_secs(30), || async {
            ledger.scalar(DECISIONS).await >= 500
        })
        .await
    );
    consumer.kill();
    let at_kill = ledger.scalar(DECISIONS).await;
    assert!(at_kill < 4_000, "killed part way ({at_kill})");
    let consumer = Accounting::start(&broker, &db, 50);
    assert!(
        ledger_has(&ledger, DECISIONS, 4_000, Duration::from_secs(60)).await,
        "{} of 4000",
        ledger.scalar(DECISIONS).await
    );
    let ids = consumed_ids(&ledger).await;
    let missing = (0..4_000)
        .filter(|i| !ids.contains(&format!("kill-{i}")))
        .count();
    assert_eq!(missing, 0, "no gap");
    assert_eq!(ledger.scalar(ROWS_VS_EVENTS).await, 0, "no duplicate");
    // Redelivered events (consumed before the kill, not committed) were recognised, not re-added.
    println!(
        "redelivered after the kill: {}",
        consumer.counter("accounting_events_duplicate_total").await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_spool_outlives_a_gateway_restart() {
    let mock = MockUpstream::start();
    let db = Db::sqlite();
    let spool = TempDir::new("spool");
    let spool_dir = spool.0.to_string_lossy().to_string();
    // No broker yet: everything the first gateway records must wait in its spool.
    let mut broker = Broker::start();
    let brokers = broker.brokers();
    broker.kill();
    let policy = kafka_policy(mock.addr);
    let mut gw = Gateway::start_with(&policy, &kafka_args(&brokers, &spool_dir));
    set_clock(&gw).await;
    assert_eq!(lookups(&gw, "before-restart", 300, 8).await, 300);
    gw.shut_down();
    drop(gw);

    broker.restart();
    let _consumer = Accounting::start(&broker, &db, 100);
    let gw = Gateway::start_with(&policy, &kafka_args(&brokers, &spool_dir));
    let ledger = LedgerDb::open(&db).await;
    assert!(
        ledger_has(&ledger, DECISIONS, 300, Duration::from_secs(60)).await,
        "events recorded before the restart are delivered after it ({} of 300)",
        ledger.scalar(DECISIONS).await
    );
    let ids = consumed_ids(&ledger).await;
    assert!((0..300).all(|i| ids.contains(&format!("before-restart-{i}"))));
    drop(gw);
}
