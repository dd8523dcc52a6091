//! End-to-end on Redis: several gateways sharing one set of limits, Redis dying under load in each
//! failure mode, and Redis Cluster.

use reqwest::StatusCode;
use serde_json::Value;
use std::time::{Duration, Instant};
use tollgate_e2e::{
    Backend, Gateway, MockUpstream, RedisCluster, RedisServer, client, eventually, figure,
    get_json, policy, post_json, unique_prefix,
};

const LOOKUP: &[(&str, &str, &str, u64)] = &[("lookup", "/lookup", "lookup", 1)];

fn lookup_policy(upstream: std::net::SocketAddr, limits: &str, extra: &str) -> String {
    let tiers = format!("  free:\n    lookup: {limits}");
    format!("{extra}\n{}", policy(upstream, LOOKUP, &tiers, &["free"]))
}

/// Send `n` lookups spread round-robin over `gateways`, `concurrency` at a time; count statuses.
async fn spread(gateways: &[&Gateway], n: usize, concurrency: usize) -> (usize, usize) {
    let c = client();
    let urls: Vec<String> = gateways.iter().map(|g| g.url("/lookup")).collect();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (c, urls, next) = (c.clone(), urls.clone(), next.clone());
            tokio::spawn(async move {
                let (mut ok, mut refused) = (0, 0);
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= n {
                        return (ok, refused);
                    }
                    let r = c
                        .get(&urls[i % urls.len()])
                        .bearer_auth("key-free")
                        .send()
                        .await
                        .unwrap();
                    match r.status() {
                        StatusCode::OK => ok += 1,
                        StatusCode::TOO_MANY_REQUESTS => refused += 1,
                        s => panic!("unexpected status {s}"),
                    }
                }
            })
        })
        .collect();
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        let (o, r) = t.await.unwrap();
        ok += o;
        refused += r;
    }
    (ok, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateways_sharing_redis_admit_exactly_the_limit() {
    let mock = MockUpstream::start();
    let backend = Backend::shared_redis();
    let yaml = lookup_policy(mock.addr, "{ daily: 500 }", "");
    let gws: Vec<Gateway> = (0..3)
        .map(|_| Gateway::start_on(&backend, &yaml, &[]))
        .collect();
    let refs: Vec<&Gateway> = gws.iter().collect();
    let (ok, refused) = spread(&refs, 2000, 24).await;
    figure("fleet_admitted_over_limit", ok as i64 - 500);
    assert_eq!((ok, refused), (500, 1500));
    // Most of those were admitted locally, from leases.
    let mut local = 0;
    for g in &gws {
        let m = tollgate_e2e::metrics(g).await;
        local += tollgate_e2e::metric(&m, "quota_local_decisions_total").unwrap_or(0);
    }
    assert!(local > 0, "leases were used");

    // 100 at once across the fleet, on a fresh set of counters.
    let backend = Backend::shared_redis();
    let yaml = lookup_policy(mock.addr, "{ daily: 37 }", "");
    let gws: Vec<Gateway> = (0..3)
        .map(|_| Gateway::start_on(&backend, &yaml, &[]))
        .collect();
    let refs: Vec<&Gateway> = gws.iter().collect();
    assert_eq!(spread(&refs, 100, 100).await, (37, 63));
}

struct Outage {
    statuses: Vec<StatusCode>,
    max_latency: Duration,
    retry_after_on_503: bool,
}

/// Kill Redis, send `n` lookups 4 at a time, and record what the clients got.
async fn during_outage(gw: &Gateway, redis: &mut RedisServer, n: usize) -> Outage {
    redis.kill();
    let c = client();
    let mut out = Outage {
        statuses: Vec::new(),
        max_latency: Duration::ZERO,
        retry_after_on_503: true,
    };
    for _ in 0..n / 4 {
        let batch: Vec<_> = (0..4)
            .map(|_| {
                let (c, url) = (c.clone(), gw.url("/lookup"));
                tokio::spawn(async move {
                    let t = Instant::now();
                    let r = c
                        .get(url)
                        .bearer_auth("key-free")
                        .send()
                        .await
                        .expect("answered");
                    (
                        r.status(),
                        r.headers().contains_key("retry-after"),
                        t.elapsed(),
                    )
                })
            })
            .collect();
        for b in batch {
            let (status, retry_after, latency) = b.await.unwrap();
            out.statuses.push(status);
            out.max_latency = out.max_latency.max(latency);
            if status == StatusCode::SERVICE_UNAVAILABLE {
                out.retry_after_on_503 &= retry_after;
            }
        }
    }
    out
}

async fn count(statuses: &[StatusCode], s: StatusCode) -> usize {
    statuses.iter().filter(|x| **x == s).count()
}

/// Redis comes back: the gateway notices without restart and enforces the shared limit again.
async fn enforcement_resumes(gw: &Gateway, limit: usize) {
    let recovered = eventually(Duration::from_secs(10), || async {
        let body = serde_json::json!({ "subject": "user-free", "quota": "lookup", "cost": 0 });
        let r: Value = post_json(gw.api_url("/check"), &body).await;
        r["degraded"].is_null() && r["allowed"] == true
    })
    .await;
    assert!(recovered, "decisions come from Redis again");
    // The restarted Redis is empty: exactly `limit` more are admitted, then refused.
    let refs = [gw];
    assert_eq!(spread(&refs, limit + 5, 1).await, (limit, 5));
    let status: Value = get_json(gw.api_url("/status")).await;
    assert_eq!(status["backend"]["state"], "up");
}

async fn start_with_private_redis(mode: &str) -> (MockUpstream, RedisServer, Gateway) {
    let mock = MockUpstream::start();
    let redis = RedisServer::start();
    let backend = Backend::Redis {
        urls: vec![redis.url()],
        prefix: unique_prefix(),
    };
    let yaml = lookup_policy(
        mock.addr,
        "{ daily: 30 }",
        &format!("failure_mode: {mode}\nlocal_share: 0.5"),
    );
    let gw = Gateway::start_on(&backend, &yaml, &[]);
    let refs = [&gw];
    assert_eq!(
        spread(&refs, 5, 1).await,
        (5, 0),
        "Redis up: shared counting"
    );
    (mock, redis, gw)
}

#[tokio::test]
async fn redis_down_fail_closed_answers_503_then_recovers() {
    let (_mock, mut redis, gw) = start_with_private_redis("fail_closed").await;
    let out = during_outage(&gw, &mut redis, 40).await;
    assert_eq!(
        count(&out.statuses, StatusCode::SERVICE_UNAVAILABLE).await,
        40
    );
    assert!(out.retry_after_on_503, "every 503 carries Retry-After");
    assert!(
        out.max_latency < Duration::from_secs(1),
        "answered within the timeout: {:?}",
        out.max_latency
    );
    figure(
        "redis_down_max_latency_ms_fail_closed",
        out.max_latency.as_millis(),
    );
    let m = tollgate_e2e::metrics(&gw).await;
    assert!(m.contains("backend_state 0"), "{m}");
    redis.restart();
    enforcement_resumes(&gw, 30).await;
}

#[tokio::test]
async fn redis_down_fail_open_admits_then_recovers() {
    let (_mock, mut redis, gw) = start_with_private_redis("fail_open").await;
    let out = during_outage(&gw, &mut redis, 40).await;
    assert_eq!(
        count(&out.statuses, StatusCode::OK).await,
        40,
        "admitted although 30/day: fail open"
    );
    assert!(
        out.max_latency < Duration::from_secs(1),
        "answered within the timeout: {:?}",
        out.max_latency
    );
    let m = tollgate_e2e::metrics(&gw).await;
    assert!(
        m.contains("backend_fallback_total{mode=\"fail_open\"} 40"),
        "{m}"
    );
    redis.restart();
    enforcement_resumes(&gw, 30).await;
}

#[tokio::test]
async fn redis_down_local_enforces_this_gateways_share_then_recovers() {
    let (_mock, mut redis, gw) = start_with_private_redis("local").await;
    let out = during_outage(&gw, &mut redis, 40).await;
    // local_share 0.5 of 30 a day: this gateway alone admits 15.
    assert_eq!(count(&out.statuses, StatusCode::OK).await, 15);
    assert_eq!(
        count(&out.statuses, StatusCode::TOO_MANY_REQUESTS).await,
        25
    );
    assert!(
        out.max_latency < Duration::from_secs(1),
        "answered within the timeout: {:?}",
        out.max_latency
    );
    let m = tollgate_e2e::metrics(&gw).await;
    assert!(
        tollgate_e2e::metric(&m, "backend_errors_total").unwrap_or(0) > 0,
        "failed Redis calls are counted: {m}"
    );
    redis.restart();
    enforcement_resumes(&gw, 30).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_takes_all_counters_of_a_request_or_none() {
    let cluster = RedisCluster::start(3);
    let mock = MockUpstream::start();
    let backend = Backend::Redis {
        urls: cluster.urls(),
        prefix: unique_prefix(),
    };
    // A burst of 50 and 40 a day: the daily quota refuses first; refused requests must not take
    // from the bucket.
    let limits = "\n      rates: [ { limit: 1, per: hour, burst: 50 } ]\n      daily: 40";
    let tiers = format!("  free:\n    lookup: {limits}\n  pro:\n    lookup: {limits}");
    let yaml = policy(mock.addr, LOOKUP, &tiers, &["free", "pro"]);
    let gws: Vec<Gateway> = (0..2)
        .map(|_| Gateway::start_on(&backend, &yaml, &[]))
        .collect();
    let refs: Vec<&Gateway> = gws.iter().collect();
    assert_eq!(spread(&refs, 100, 100).await, (40, 60));
    // The bucket was charged only for the 40 admitted: 10 tokens left.
    let check =
        |subject: &str| serde_json::json!({ "subject": subject, "quota": "lookup", "cost": 0 });
    let r: Value = post_json(gws[0].api_url("/check"), &check("user-free")).await;
    let hour = r["limits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["window"] == "hour")
        .unwrap()
        .clone();
    assert_eq!(hour["remaining"], 10, "{r}");
    // Another subject (another hash slot, likely another node) counts on its own.
    let r: Value = post_json(gws[1].api_url("/check"), &check("user-pro")).await;
    assert_eq!(r["remaining"], 40, "{r}");
}

#[tokio::test]
async fn leases_are_returned_on_graceful_shutdown() {
    let mock = MockUpstream::start();
    let backend = Backend::shared_redis();
    let yaml = lookup_policy(mock.addr, "{ daily: 1000 }", "");
    let leaving = Gateway::start_on(&backend, &yaml, &["--lease-ttl-ms", "600000"]);
    let staying = Gateway::start_on(&backend, &yaml, &[]);
    assert_eq!(spread(&[&leaving], 1, 1).await, (1, 0));
    let shared = || async {
        let body = serde_json::json!({ "subject": "user-free", "quota": "lookup", "cost": 0 });
        post_json(staying.api_url("/check"), &body).await["remaining"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(
        shared().await,
        999 - 999 / 16,
        "the leaving gateway holds a lease"
    );
    leaving.terminate();
    assert!(
        eventually(Duration::from_secs(5), || async { shared().await == 999 }).await,
        "its unused units are back for the fleet"
    );
}

/// A fast rate refills at its own pace on every backend: 35,000,000 a minute is one unit every
/// 1,714 ns, which the Redis scripts once ran at one a microsecond (71% over the rate).
#[tokio::test]
async fn a_fast_rate_refills_at_its_declared_pace() {
    let mock = MockUpstream::start();
    for backend in [Backend::Memory, Backend::shared_redis()] {
        let yaml = lookup_policy(
            mock.addr,
            "{ rates: [{ limit: 35000000, per: minute }] }",
            "",
        );
        let gw = Gateway::start_on(&backend, &yaml, &["--test-clock", "--no-leases"]);
        let check = |cost: u64| {
            let url = gw.api_url("/check");
            async move {
                let v = post_json(
                    url,
                    &serde_json::json!({ "subject": "user-free", "quota": "lookup", "cost": cost }),
                )
                .await;
                v["allowed"].as_bool().expect("allowed")
            }
        };
        gw.set_clock("2026-12-01T10:00:00Z").await;
        assert!(check(35_000_000).await, "the whole burst");
        // One second later 583,333 units have come back, not 1,000,000.
        gw.set_clock("2026-12-01T10:00:01Z").await;
        assert!(
            !check(700_000).await,
            "{backend:?}: more than a second's refill"
        );
        assert!(check(580_000).await, "{backend:?}: a second's refill");
    }
}
