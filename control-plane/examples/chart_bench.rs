//! Benchmark of the console's chart queries on a ledger of 1,000,000 rows over 30 days (1,000
//! subjects; subject `s0` holds a tenth of the rows): the first run, p50 and p99 of each query
//! over 40 runs, as a table. 30-day charts keep their closed days in memory for a few minutes, so
//! their first run reads the whole range and the others only today.
//!
//! `cargo run --release -p control-plane --example chart_bench [-- DATABASE_URL [ROWS]]`
//! (default: a new SQLite file in the temporary directory, removed afterwards; a `postgres://` URL
//! of an empty database works too). Figures are appended to `TOLLGATE_FIGURES` when set.

use control_plane::ledger::Ledger;
use control_plane::store::Store;
use control_plane::usage::{self, Kinds, Range};
use std::time::{Duration, Instant};

const RUNS: usize = 40;

fn figure(name: &str, value: f64) {
    if let Some(path) = std::env::var_os("TOLLGATE_FIGURES") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{name} {value:.2}");
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let file = std::env::temp_dir().join(format!("tollgate-chart-bench-{}.db", std::process::id()));
    let url = args
        .next()
        .unwrap_or_else(|| format!("sqlite://{}", file.display()));
    let rows: i64 = args.next().map_or(Ok(1_000_000), |r| r.parse())?;
    let postgres = url.starts_with("postgres");
    let store = Store::connect(&url).await?;
    let ledger = Ledger::new(store.pool().clone()).await?;
    // Never mixed into a real ledger.
    anyhow::ensure!(
        ledger.count("QuotaConsumed").await? == 0,
        "{url} already holds a ledger: give the benchmark an empty database"
    );
    let now = chrono::Utc::now();
    let start = now.timestamp() - 30 * 86_400;
    let step = 30.0 * 86_400.0 / rows as f64;
    // Rows made by the database itself: type by i mod 10, subject s0 for a tenth of them.
    let select = |ts: &str, day: &str, series: &str| {
        format!(
            "SELECT 'e' || i, CASE WHEN i % 10 = 1 THEN 'llm_tokens' WHEN i % 10 = 2 THEN 'llm_spend' ELSE 'lookup' END,
                CASE WHEN i % 10 = 0 THEN 'QuotaRejected' WHEN i % 10 IN (1, 2) THEN 'ReservationSettled' ELSE 'QuotaConsumed' END,
                CASE WHEN i % 100 < 10 THEN 's0' ELSE 's' || (i % 1000) END, 'bench', {ts}, {day},
                CASE WHEN i % 10 = 0 THEN 0 WHEN i % 10 = 1 THEN 1500 WHEN i % 10 = 2 THEN 2500 ELSE 1 END,
                CASE WHEN i % 10 = 0 THEN (CASE WHEN i % 20 = 0 THEN 'daily_limit' ELSE 'rate_limit' END) END,
                '{{}}', 0 FROM {series}"
        )
    };
    let t = Instant::now();
    let sql = if postgres {
        let at = format!("to_timestamp({start} + i * {step})");
        format!(
            "INSERT INTO quota_audit (event_id, quota, type, subject, source, occurred_at, day, delta, reason, body, ingested_at_ms) {}",
            select(
                &format!("to_char({at} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"),
                &format!("to_char({at} AT TIME ZONE 'UTC', 'YYYY-MM-DD')"),
                &format!("generate_series(0, {}) AS g(i)", rows - 1),
            )
        )
    } else {
        let at = format!("{start} + CAST(i * {step} AS INTEGER)");
        format!(
            "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < {})
             INSERT INTO quota_audit (event_id, quota, type, subject, source, occurred_at, day, delta, reason, body, ingested_at_ms) {}",
            rows - 1,
            select(
                &format!("strftime('%Y-%m-%dT%H:%M:%fZ', {at}, 'unixepoch')"),
                &format!("strftime('%Y-%m-%d', {at}, 'unixepoch')"),
                "n",
            )
        )
    };
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .execute(store.pool())
        .await?;
    if !postgres {
        sqlx::query("ANALYZE").execute(store.pool()).await?;
    } else {
        sqlx::query("ANALYZE quota_audit")
            .execute(store.pool())
            .await?;
    }
    println!(
        "ledger of {rows} rows over 30 days on {} ({:.1} s to fill)",
        if postgres { "PostgreSQL" } else { "SQLite" },
        t.elapsed().as_secs_f64()
    );
    let kinds = Kinds {
        tokens: ["llm_tokens".to_string()].into(),
        spend: ["llm_spend".to_string()].into(),
    };
    let pool = ledger.pool();
    let today = now.format("%Y-%m-%d").to_string();
    let month = now.format("%Y-%m-01").to_string();
    println!(
        "{:<34} {:>10} {:>10} {:>10} {:>10}",
        "chart query", "first ms", "p50 ms", "p99 ms", "rows"
    );
    macro_rules! bench {
        ($name:expr, $rows:expr, $q:expr) => {{
            // Each query starts cold: no closed days in memory.
            usage::forget_closed_days();
            let mut times = Vec::with_capacity(RUNS);
            for _ in 0..RUNS {
                let t = Instant::now();
                $q.await?;
                times.push(t.elapsed());
            }
            let first = times[0];
            times.sort();
            let ms = |d: Duration| d.as_secs_f64() * 1000.0;
            let p50 = ms(times[RUNS / 2]);
            let p99 = ms(times[(RUNS * 99).div_ceil(100) - 1]);
            println!(
                "{:<34} {:>10.2} {:>10.2} {:>10.2} {:>10}",
                $name,
                ms(first),
                p50,
                p99,
                $rows
            );
            figure(
                &format!("console_chart_p99_ms_{}", $name.replace([' ', ','], "_")),
                p99,
            );
        }};
    }
    let n = |share: f64| format!("~{}", (rows as f64 * share) as i64);
    bench!(
        "overview hour",
        n(1.0 / 720.0),
        usage::overview(pool, &kinds, Range::Hour, now, None)
    );
    bench!(
        "overview day",
        n(1.0 / 30.0),
        usage::overview(pool, &kinds, Range::Day, now, None)
    );
    bench!(
        "overview 30d",
        n(1.0),
        usage::overview(pool, &kinds, Range::Month, now, None)
    );
    bench!(
        "top subjects today",
        n(1.0 / 30.0),
        usage::top_today(pool, &kinds, now, 10)
    );
    bench!(
        "subject s0 overview 30d",
        n(0.1),
        usage::overview(pool, &kinds, Range::Month, now, Some("s0"))
    );
    bench!(
        "subject s0 per quota 30d",
        n(0.1),
        usage::per_quota(pool, Range::Month, now, "s0")
    );
    bench!(
        "subject s1 per quota 30d",
        n(0.001),
        usage::per_quota(pool, Range::Month, now, "s1")
    );
    bench!(
        "subject s0 refusals",
        "50".to_string(),
        usage::recent_refusals(pool, "s0", now, 50)
    );
    bench!(
        "subject s0 month of days",
        n(0.1),
        usage::days(pool, "s0", &month, &today)
    );
    if !postgres {
        drop(ledger);
        store.pool().close().await;
        for ext in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{ext}", file.display()));
        }
    }
    Ok(())
}
