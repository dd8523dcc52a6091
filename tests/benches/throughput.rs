//! Benchmark (run with `scripts/bench`): prints, in one run,
//! (a) engine decisions per second on the in-memory store, 1 and 10,000 distinct subjects;
//! (b) per storage backend — memory only, Redis on every request, Redis with leases — decisions/s,
//!     p99 of one decision and Redis round trips per 1,000 decisions (needs a Redis at
//!     `TOLLGATE_REDIS_URL`, default 127.0.0.1:6379);
//! (d) SSE: chunks/s, MB/s and time to first byte of streamed completions, straight to
//!     `mock-upstream` and through the gateway's metered LLM route, and their ratios;
//! (c) requests/s and p50/p99 latency straight to `mock-upstream`, through the gateway on an
//!     unlimited route (the bare proxy) and with quotas on, and their ratios. Baselines are
//!     measured in the same run: these machines are noisy, absolute numbers do not compare;
//! (e) nginx as the baseline (`nginx/mod.rs`): req/s, p50/p99 and SSE time to first byte through
//!     a plain nginx proxy and through the gateway to the same canned nginx upstream, their ratios
//!     (figures `gw_vs_nginx_*`), and the p50 added at one connection.
//!
//! `scripts/bench nginx`, `refusals` or `audit` runs that section alone.

mod nginx;

use quota::engine::Engine;
use quota::policy::{EntitlementSource, parse_sources};
use quota::storage::MemoryStore;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tollgate_e2e::{
    Broker, Gateway, MockUpstream, TempDir, cpu_seconds, metric, metrics, policy, tansu_bin,
};

const DECISIONS: usize = 400_000;
const HTTP_REQUESTS: usize = 20_000;
const CONCURRENCY: usize = 32;

const BACKEND_DECISIONS: usize = 40_000;
const BACKEND_CALLERS: usize = 16;

struct BackendRun {
    rate: f64,
    p99: Duration,
    redis_calls_per_1000: Option<f64>,
}

/// `BACKEND_DECISIONS` decisions on one subject from `BACKEND_CALLERS` concurrent callers.
async fn backend_run<S: quota::storage::Storage>(
    engine: Arc<Engine<S>>,
    calls: impl Fn(&S) -> Option<u64>,
) -> BackendRun {
    let p = engine_policy(1);
    let subject = p.subject_for_key("k0").unwrap();
    let before = calls(engine.store());
    let started = Instant::now();
    let handles: Vec<_> = (0..BACKEND_CALLERS)
        .map(|_| {
            let (engine, subject) = (engine.clone(), subject.clone());
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(BACKEND_DECISIONS / BACKEND_CALLERS);
                for _ in 0..BACKEND_DECISIONS / BACKEND_CALLERS {
                    let t = Instant::now();
                    let d = engine
                        .check(&subject, "lookup", 1, None, quota::engine::now_ns())
                        .await
                        .unwrap();
                    assert!(d.allowed);
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.unwrap());
    }
    let elapsed = started.elapsed();
    all.sort();
    let after = calls(engine.store());
    BackendRun {
        rate: all.len() as f64 / elapsed.as_secs_f64(),
        p99: all[all.len() * 99 / 100],
        redis_calls_per_1000: before
            .zip(after)
            .map(|(b, a)| (a - b) as f64 * 1000.0 / all.len() as f64),
    }
}

fn backends() {
    use quota::storage::{LeaseConfig, LeasedStore, RedisConfig, RedisStore};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let redis = || {
        let url =
            std::env::var("TOLLGATE_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let mut cfg = RedisConfig::new(vec![url]);
        cfg.prefix = tollgate_e2e::unique_prefix();
        cfg.timeout = Duration::from_secs(1);
        RedisStore::new(&cfg).unwrap()
    };
    let memory = rt.block_on(backend_run(
        Arc::new(Engine::new(MemoryStore::new())),
        |_| None,
    ));
    let every = rt.block_on(async {
        backend_run(Arc::new(Engine::new(redis())), |s: &RedisStore| {
            Some(s.stats().calls)
        })
        .await
    });
    let leased = rt.block_on(async {
        let store = LeasedStore::new(redis(), LeaseConfig::default());
        backend_run(Arc::new(Engine::new(store)), |s: &LeasedStore| {
            Some(s.redis().stats().calls)
        })
        .await
    });
    println!(
        "\n## Storage backends ({BACKEND_DECISIONS} decisions, 1 subject, {BACKEND_CALLERS} concurrent callers; limit far above the rate)\n"
    );
    println!("| backend | decisions/s | p99 µs | Redis round trips / 1,000 decisions |");
    println!("|---|---:|---:|---:|");
    for (name, r) in [
        ("memory only", &memory),
        ("Redis on every request", &every),
        ("Redis with leases", &leased),
    ] {
        let trips = r
            .redis_calls_per_1000
            .map_or("-".to_string(), |c| format!("{c:.1}"));
        println!(
            "| {name} | {:.0} | {:.0} | {trips} |",
            r.rate,
            r.p99.as_secs_f64() * 1e6
        );
    }
    println!(
        "| **leases / every request** | {:.1}x | {:.3}x | |",
        leased.rate / every.rate,
        leased.p99.as_secs_f64() / every.p99.as_secs_f64()
    );
}

fn engine_policy(subjects: usize) -> quota::Policy {
    let mut y = String::from(
        "upstreams:\n  u: { address: '127.0.0.1:1' }\nroutes:\n  - { name: r, match: { path_prefix: / }, upstream: u, quota: lookup }\n\
         tiers:\n  t:\n    lookup:\n      rates: [ { limit: 1000000000, per: second } ]\n      daily: 1000000000000\nsubjects:\n",
    );
    for i in 0..subjects {
        y.push_str(&format!(
            "  - {{ key: k{i}, id: s{i}, tier: t, time_zone: Europe/Berlin }}\n"
        ));
    }
    parse_sources(&[("bench.yaml".into(), y)]).expect("bench policy")
}

/// Decisions/s with `tasks` concurrent callers on a multi-thread runtime.
fn engine_rate(subjects: usize, tasks: usize) -> f64 {
    let p = engine_policy(subjects);
    let subs: Arc<Vec<_>> = Arc::new(
        (0..subjects)
            .map(|i| p.subject_for_key(&format!("k{i}")).unwrap())
            .collect(),
    );
    let engine = Arc::new(Engine::new(MemoryStore::new()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(tasks)
        .build()
        .unwrap();
    let started = Instant::now();
    rt.block_on(async {
        let per_task = DECISIONS / tasks;
        let handles: Vec<_> = (0..tasks)
            .map(|t| {
                let (engine, subs) = (engine.clone(), subs.clone());
                tokio::spawn(async move {
                    let now = quota::engine::now_ns();
                    for i in 0..per_task {
                        let s = &subs[(i * 7919 + t) % subs.len()];
                        let d = engine
                            .check(s, "lookup", 1, None, now + i as i64)
                            .await
                            .unwrap();
                        assert!(d.allowed);
                    }
                })
            })
            .collect();
        for h in handles {
            h.await.unwrap();
        }
    });
    DECISIONS as f64 / started.elapsed().as_secs_f64()
}

struct Load {
    rps: f64,
    p50: Duration,
    p99: Duration,
}

async fn load(url: String, key: Option<&'static str>) -> Load {
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(CONCURRENCY)
        .build()
        .unwrap();
    // Warm up connections.
    for _ in 0..CONCURRENCY {
        let mut r = client.get(&url);
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        r.send().await.unwrap().bytes().await.unwrap();
    }
    let started = Instant::now();
    let handles: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(HTTP_REQUESTS / CONCURRENCY);
                for _ in 0..HTTP_REQUESTS / CONCURRENCY {
                    let t = Instant::now();
                    let mut r = client.get(&url);
                    if let Some(k) = key {
                        r = r.bearer_auth(k);
                    }
                    let resp = r.send().await.unwrap();
                    let status = resp.status();
                    let body = resp.bytes().await.unwrap();
                    assert!(
                        status.is_success(),
                        "status {status}: {}",
                        String::from_utf8_lossy(&body)
                    );
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::with_capacity(HTTP_REQUESTS);
    for h in handles {
        all.extend(h.await.unwrap());
    }
    let elapsed = started.elapsed();
    all.sort();
    Load {
        rps: all.len() as f64 / elapsed.as_secs_f64(),
        p50: all[all.len() / 2],
        p99: all[all.len() * 99 / 100],
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

const STREAMS: usize = 200;
const STREAM_TOKENS: usize = 500;
const STREAM_CONCURRENCY: usize = 16;

struct SseRun {
    chunks_per_s: f64,
    mb_per_s: f64,
    ttfb_p50: Duration,
    ttfb_p99: Duration,
}

async fn sse_load(url: String, key: Option<&'static str>) -> SseRun {
    use futures_util::StreamExt;
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let body = serde_json::json!({
        "model": "gpt-4o-mini", "stream": true, "max_tokens": STREAM_TOKENS,
        "messages": [{ "role": "user", "content": "stream please" }],
    });
    let started = Instant::now();
    let handles: Vec<_> = (0..STREAM_CONCURRENCY)
        .map(|_| {
            let (client, url, body) = (client.clone(), url.clone(), body.clone());
            tokio::spawn(async move {
                let (mut chunks, mut bytes, mut ttfb) = (0u64, 0u64, Vec::new());
                for _ in 0..STREAMS / STREAM_CONCURRENCY {
                    let t = Instant::now();
                    let mut r = client
                        .post(&url)
                        .header("x-mock-tokens", STREAM_TOKENS.to_string())
                        .json(&body);
                    if let Some(k) = key {
                        r = r.bearer_auth(k);
                    }
                    let resp = r.send().await.unwrap();
                    assert!(resp.status().is_success(), "status {}", resp.status());
                    let mut stream = resp.bytes_stream();
                    let mut first = true;
                    while let Some(c) = stream.next().await {
                        let c = c.unwrap();
                        if first {
                            ttfb.push(t.elapsed());
                            first = false;
                        }
                        chunks += c.windows(6).filter(|w| w == b"data: ").count() as u64;
                        bytes += c.len() as u64;
                    }
                }
                (chunks, bytes, ttfb)
            })
        })
        .collect();
    let (mut chunks, mut bytes, mut ttfb) = (0, 0, Vec::new());
    for h in handles {
        let (c, b, t) = h.await.unwrap();
        chunks += c;
        bytes += b;
        ttfb.extend(t);
    }
    let secs = started.elapsed().as_secs_f64();
    ttfb.sort();
    SseRun {
        chunks_per_s: chunks as f64 / secs,
        mb_per_s: bytes as f64 / secs / 1e6,
        ttfb_p50: ttfb[ttfb.len() / 2],
        ttfb_p99: ttfb[ttfb.len() * 99 / 100],
    }
}

fn sse(mock: &MockUpstream) {
    let yaml = format!(
        "upstreams:\n  up: {{ address: '{}' }}\nmodels:\n  default: {{ input_per_million: 1, output_per_million: 4 }}\n\
         routes:\n  - {{ name: chat, match: {{ path_prefix: /v1/chat/completions }}, upstream: up, quota: requests,\n\
         \x20     llm: {{ provider: openai, tokens: tokens, spend: spend }} }}\n\
         tiers:\n  t:\n    requests: {{ daily: 1000000000 }}\n    tokens: {{ daily: 1000000000000 }}\n    spend: {{ daily: 1000000000000 }}\n\
         subjects:\n  - {{ key: k, id: s, tier: t }}\n",
        mock.addr
    );
    let gw = Gateway::start(&yaml);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let direct = rt.block_on(sse_load(mock.url("/v1/chat/completions"), None));
    let proxied = rt.block_on(sse_load(gw.url("/v1/chat/completions"), Some("k")));
    println!(
        "\n## SSE ({STREAMS} streamed completions of {STREAM_TOKENS} tokens, {STREAM_CONCURRENCY} at a time, metered and billed)\n"
    );
    println!("| path | chunks/s | MB/s | TTFB p50 ms | TTFB p99 ms |");
    println!("|---|---:|---:|---:|---:|");
    for (name, r) in [
        ("direct to mock-upstream", &direct),
        ("through gateway (LLM route)", &proxied),
    ] {
        println!(
            "| {name} | {:.0} | {:.1} | {:.3} | {:.3} |",
            r.chunks_per_s,
            r.mb_per_s,
            ms(r.ttfb_p50),
            ms(r.ttfb_p99)
        );
    }
    println!(
        "| **gateway / direct** | {:.2}x | {:.2}x | +{:.3} ms | +{:.3} ms |",
        proxied.chunks_per_s / direct.chunks_per_s,
        proxied.mb_per_s / direct.mb_per_s,
        ms(proxied.ttfb_p50) - ms(direct.ttfb_p50),
        ms(proxied.ttfb_p99) - ms(direct.ttfb_p99)
    );
}

/// Another subject's latency while an exhausted key sends large LLM bodies: refusals must cost
/// the gateway nothing (answered before the body is read, no tokenizing).
fn refused_bodies(rt: &tokio::runtime::Runtime, mock: &MockUpstream) {
    const SENDERS: usize = 16;
    const BODY: usize = 4 << 20;
    let yaml = format!(
        "upstreams:\n  up: {{ address: '{}', read_timeout_ms: 10000 }}\n\
         routes:\n\
         \x20 - {{ name: chat, match: {{ path_prefix: /v1/chat/completions }}, upstream: up, quota: llm_requests,\n\
         \x20     llm: {{ provider: openai, tokens: llm_tokens }} }}\n\
         \x20 - {{ name: lookup, match: {{ path_prefix: /lookup }}, upstream: up, quota: lookup }}\n\
         tiers:\n  t:\n    llm_requests: {{ unlimited: true }}\n    llm_tokens: {{ daily: 1000 }}\n    lookup: {{ unlimited: true }}\n\
         subjects:\n  - {{ key: key-exhausted, id: exhausted, tier: t }}\n  - {{ key: key-other, id: other, tier: t }}\n",
        mock.addr
    );
    let gw = Gateway::start(&yaml);
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    rt.block_on(async {
        client
            .post(gw.api_url("/check"))
            .body(r#"{"subject":"exhausted","quota":"llm_tokens","cost":1000}"#)
            .send()
            .await
            .unwrap();
    });
    let quiet = rt.block_on(load(gw.url("/lookup/1"), Some("key-other")));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let body = bytes_body(BODY);
    let senders: Vec<_> = (0..SENDERS)
        .map(|_| {
            let (stop, sent, body, url) = (
                stop.clone(),
                sent.clone(),
                body.clone(),
                gw.url("/v1/chat/completions"),
            );
            let client = client.clone();
            rt.spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // Refused before the body is read: the gateway may close while it is sent.
                    let _ = client
                        .post(&url)
                        .bearer_auth("key-exhausted")
                        .body(body.clone())
                        .send()
                        .await;
                    sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            })
        })
        .collect();
    let loaded = rt.block_on(load(gw.url("/lookup/1"), Some("key-other")));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    rt.block_on(async {
        for s in senders {
            let _ = s.await;
        }
    });
    println!(
        "\n## Refusals under load ({SENDERS} clients sending 4 MiB LLM bodies from an exhausted key; another subject's GET /lookup)\n"
    );
    println!("| other subject | req/s | p50 ms | p99 ms |");
    println!("|---|---:|---:|---:|");
    for (name, l) in [("quiet", &quiet), ("with refused 4 MiB bodies", &loaded)] {
        println!(
            "| {name} | {:.0} | {:.3} | {:.3} |",
            l.rps,
            ms(l.p50),
            ms(l.p99)
        );
    }
    println!(
        "| **loaded / quiet** | {:.2}x | {:.2}x | {:.2}x |",
        loaded.rps / quiet.rps,
        ms(loaded.p50) / ms(quiet.p50),
        ms(loaded.p99) / ms(quiet.p99)
    );
    println!(
        "\n({} refused bodies sent meanwhile)",
        sent.load(std::sync::atomic::Ordering::Relaxed)
    );
}

/// A JSON chat body of about `n` bytes.
fn bytes_body(n: usize) -> bytes::Bytes {
    let filler = "lorem ipsum ".repeat(n / 12);
    bytes::Bytes::from(format!(
        r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"{filler}"}}]}}"#
    ))
}

fn main() {
    // `scripts/bench nginx` runs the nginx comparison alone.
    if std::env::args().any(|a| a == "nginx") {
        nginx::run();
        return;
    }
    // `scripts/bench refusals` runs the refusal section alone.
    if std::env::args().any(|a| a == "refusals") {
        let mock = MockUpstream::start();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        refused_bodies(&rt, &mock);
        return;
    }
    // `scripts/bench audit` runs the audit sink section alone (cargo passes --bench too).
    if std::env::args().any(|a| a == "audit") {
        let mock = MockUpstream::start();
        let tiers = "  pro:\n    lookup:\n      rates: [ { limit: 100000000, per: second } ]\n      daily: 100000000000";
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let p = policy(
            mock.addr,
            &[("lookup", "/lookup", "lookup", 1)],
            tiers,
            &["pro"],
        );
        audit_sinks(&rt, &p);
        return;
    }
    println!("## Engine (in-memory store, {DECISIONS} decisions)\n");
    println!("| subjects | callers | decisions/s |");
    println!("|---:|---:|---:|");
    for (subjects, tasks) in [(1, 1), (10_000, 1), (10_000, 2)] {
        println!(
            "| {subjects} | {tasks} | {:.0} |",
            engine_rate(subjects, tasks)
        );
    }

    backends();

    let mock = MockUpstream::start();
    sse(&mock);
    let tiers = "  pro:\n    lookup:\n      rates: [ { limit: 100000000, per: second } ]\n      daily: 100000000000\n    bare: { unlimited: true }";
    let routes = [
        ("lookup", "/lookup", "lookup", 1),
        ("bare", "/bare", "bare", 1),
    ];
    let gw = Gateway::start(&policy(mock.addr, &routes, tiers, &["pro"]));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let direct = rt.block_on(load(mock.url("/lookup/1"), None));
    // The bare proxy: the same gateway, key and route lookup, but an unlimited quota (no counters).
    let bare = rt.block_on(load(gw.url("/bare/1"), Some("key-pro")));
    let proxied = rt.block_on(load(gw.url("/lookup/1"), Some("key-pro")));
    println!(
        "\n## HTTP ({HTTP_REQUESTS} GET /lookup, {CONCURRENCY} connections, loopback, same run)\n"
    );
    println!("| path | req/s | p50 ms | p99 ms |");
    println!("|---|---:|---:|---:|");
    let rows = [
        ("direct to mock-upstream", &direct),
        ("through gateway, unlimited route (bare proxy)", &bare),
        ("through gateway, quotas on (rate + daily)", &proxied),
    ];
    for (name, l) in rows {
        println!(
            "| {name} | {:.0} | {:.3} | {:.3} |",
            l.rps,
            ms(l.p50),
            ms(l.p99)
        );
    }
    for (name, base) in [("direct", &direct), ("bare proxy", &bare)] {
        println!(
            "| **quotas on / {name}** | {:.2}x | {:.2}x | {:.2}x |",
            proxied.rps / base.rps,
            ms(proxied.p50) / ms(base.p50),
            ms(proxied.p99) / ms(base.p99)
        );
    }
    drop(gw);
    nginx::run();
    refused_bodies(&rt, &mock);
    audit_sinks(&rt, &policy(mock.addr, &routes, tiers, &["pro"]));
}

/// Gateway throughput with each audit sink against none, measured in turns in one run, and how
/// many events Kafka confirmed per second meanwhile.
fn audit_sinks(rt: &tokio::runtime::Runtime, policy: &str) {
    let tansu = tansu_bin();
    if std::process::Command::new(&tansu)
        .arg("--help")
        .output()
        .is_err()
    {
        println!("\n(audit sink benchmark skipped: no tansu broker; scripts/setup installs it)");
        return;
    }
    let broker = Broker::start();
    let dir = TempDir::new("bench-audit");
    let spool = dir.0.join("spool").to_string_lossy().to_string();
    let log = dir.0.join("audit.jsonl").to_string_lossy().to_string();
    let brokers = broker.brokers();
    let off = Gateway::start(policy);
    let jsonl = Gateway::start_with(policy, &["--audit-log", &log]);
    let kafka = Gateway::start_with(
        policy,
        &["--audit-kafka", &brokers, "--audit-spool", &spool],
    );
    let mut runs: [Vec<Load>; 3] = Default::default();
    let mut cpu = [0.0f64; 3];
    let mut broker_cpu = 0.0;
    // Alternate, so drift in machine load hits every variant alike.
    for _ in 0..2 {
        for (i, gw) in [&off, &jsonl, &kafka].into_iter().enumerate() {
            let (g0, b0) = (cpu_seconds(gw.pid()), broker.pid().map_or(0.0, cpu_seconds));
            runs[i].push(rt.block_on(load(gw.url("/lookup/1"), Some("key-pro"))));
            cpu[i] += cpu_seconds(gw.pid()) - g0;
            if i == 2 {
                broker_cpu += broker.pid().map_or(0.0, cpu_seconds) - b0;
            }
        }
    }
    let km = rt.block_on(metrics(&kafka));
    let delivered = metric(&km, "audit_kafka_delivered_total").unwrap_or(0);
    let emitted = metric(&km, "audit_events_total").unwrap_or(0);
    let best = |r: &Vec<Load>| r.iter().map(|l| l.rps).fold(0.0, f64::max);
    println!(
        "\n## Audit sinks ({HTTP_REQUESTS} GET /lookup x2 per sink, {CONCURRENCY} connections, one event per request)\n"
    );
    println!("| sink | req/s (= events/s) | vs no audit | gateway CPU µs / request |");
    println!("|---|---:|---:|---:|");
    let n = (2 * HTTP_REQUESTS) as f64;
    for (i, (name, r)) in [
        ("none", &runs[0]),
        ("JSONL file", &runs[1]),
        ("Kafka (tansu on loopback)", &runs[2]),
    ]
    .into_iter()
    .enumerate()
    {
        println!(
            "| {name} | {:.0} | {:.2}x | {:.1} |",
            best(r),
            best(r) / best(&runs[0]),
            cpu[i] / n * 1e6
        );
    }
    println!(
        "\nThe broker, on the same two cores, used {:.1} µs of CPU per event meanwhile.",
        broker_cpu / n * 1e6
    );
    println!(
        "\nKafka confirmed {delivered} of {emitted} events by the end of the run ({} in the spool).",
        metric(&km, "audit_spool_pending_records").unwrap_or(0)
    );
}
