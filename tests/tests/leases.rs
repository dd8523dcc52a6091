//! Local-first admission with leases, on a real Redis: the bounds stated in
//! `quota/src/storage/lease.rs` (never over the limit; under it by at most what other gateways
//! hold, until they return it) and the Redis round trips it saves.

use quota::engine::{Engine, now_ns};
use quota::policy::{EntitlementSource, Policy, Subject, parse_sources};
use quota::storage::{LeaseConfig, LeasedStore, RedisConfig, RedisStore};
use std::sync::Arc;
use std::time::Duration;
use tollgate_e2e::{figure, unique_prefix};

fn redis(prefix: &str) -> RedisStore {
    let url =
        std::env::var("TOLLGATE_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let mut cfg = RedisConfig::new(vec![url]);
    cfg.prefix = prefix.to_string();
    cfg.timeout = Duration::from_secs(2);
    RedisStore::new(&cfg).expect("redis store")
}

fn leased(prefix: &str, ttl: Duration) -> Engine<LeasedStore> {
    Engine::new(LeasedStore::new(
        redis(prefix),
        LeaseConfig {
            ttl,
            ..LeaseConfig::default()
        },
    ))
}

fn policy(limits: &str) -> (Policy, Arc<Subject>) {
    let yaml = format!(
        "upstreams:\n  u: {{ address: '127.0.0.1:1' }}\nroutes:\n  - {{ name: r, match: {{ path_prefix: / }}, upstream: u, quota: q }}\n\
         tiers:\n  t:\n    q: {limits}\nsubjects:\n  - {{ key: k, id: s, tier: t }}\n"
    );
    let p = parse_sources(&[("leases.yaml".into(), yaml)]).expect("policy");
    let s = p.subject_for_key("k").expect("subject");
    (p, s)
}

/// Remaining of the daily quota as Redis holds it (a cost-0 check straight to Redis).
async fn shared_remaining(prefix: &str, subject: &Subject) -> u64 {
    let e = Engine::new(redis(prefix));
    let d = e.check(subject, "q", 0, None, now_ns()).await.unwrap();
    d.limits
        .iter()
        .find(|l| l.window_s == 86_400)
        .unwrap()
        .remaining
}

#[tokio::test]
async fn steady_state_needs_few_redis_round_trips() {
    let prefix = unique_prefix();
    let (_p, s) = policy("{ rates: [ { limit: 1000000, per: second } ], daily: 100000000 }");
    let engine = leased(&prefix, Duration::from_secs(30));
    let n = 5_000u64;
    for _ in 0..n {
        assert!(
            engine
                .check(&s, "q", 1, None, now_ns())
                .await
                .unwrap()
                .allowed
        );
    }
    let calls = engine.store().redis().stats().calls;
    let per_1000 = calls as f64 * 1000.0 / n as f64;
    figure("redis_calls_per_1000_decisions", format!("{per_1000:.1}"));
    assert!(per_1000 <= 10.0, "{calls} Redis calls for {n} decisions");
    assert_eq!(
        engine.store().local_decisions() + calls,
        n,
        "every decision local or one call"
    );
}

#[tokio::test]
async fn leases_never_admit_over_the_limit_and_under_admit_only_what_others_hold() {
    let prefix = unique_prefix();
    let (_p, s) = policy("{ daily: 1000 }");
    let (a, b) = (
        leased(&prefix, Duration::from_secs(60)),
        leased(&prefix, Duration::from_secs(60)),
    );
    // B admits one request and takes a lease of a sixteenth of the rest.
    assert!(b.check(&s, "q", 1, None, now_ns()).await.unwrap().allowed);
    let held_by_b = b.store().held_units();
    assert_eq!(held_by_b, 999 / 16);
    // A admits until refused: everything except what B holds.
    let mut admitted_a = 0;
    while a.check(&s, "q", 1, None, now_ns()).await.unwrap().allowed {
        admitted_a += 1;
        assert!(admitted_a <= 1000, "runaway");
    }
    assert_eq!(
        admitted_a,
        1000 - 1 - held_by_b,
        "under by exactly what B holds"
    );
    // B uses part of its lease locally, then returns the rest; A can use what came back.
    for _ in 0..10 {
        assert!(b.check(&s, "q", 1, None, now_ns()).await.unwrap().allowed);
    }
    b.store().return_leases(now_ns(), true).await.unwrap();
    assert_eq!(shared_remaining(&prefix, &s).await, held_by_b - 10);
    let mut more = 0;
    while a.check(&s, "q", 1, None, now_ns()).await.unwrap().allowed {
        more += 1;
    }
    assert_eq!(
        1 + admitted_a + 10 + more,
        1000,
        "the fleet admitted exactly the limit"
    );
}

#[tokio::test]
async fn unused_leases_go_back_when_they_expire() {
    let prefix = unique_prefix();
    let (_p, s) = policy("{ daily: 1000 }");
    let ttl = Duration::from_millis(100);
    let engine = leased(&prefix, ttl);
    let t0 = now_ns();
    let d = engine.check(&s, "q", 1, None, t0).await.unwrap();
    assert_eq!(
        d.limits[0].remaining, 999,
        "the client sees its own remainder, lease included"
    );
    assert_eq!(shared_remaining(&prefix, &s).await, 999 - 999 / 16);
    engine
        .store()
        .return_leases(t0 + ttl.as_nanos() as i64 - 1, false)
        .await
        .unwrap();
    assert_eq!(
        shared_remaining(&prefix, &s).await,
        999 - 999 / 16,
        "not yet expired"
    );
    engine
        .store()
        .return_leases(t0 + ttl.as_nanos() as i64, false)
        .await
        .unwrap();
    assert_eq!(shared_remaining(&prefix, &s).await, 999);
    assert_eq!(engine.store().held_units(), 0);
}

/// A lease past its expiry is still this gateway's until the returner has given it back: a check
/// meanwhile must not report those units as used by the subject.
#[tokio::test]
async fn an_expired_lease_not_yet_returned_still_counts_as_remaining() {
    let prefix = unique_prefix();
    let (_p, s) = policy("{ daily: 1000 }");
    let ttl = Duration::from_millis(100);
    let engine = leased(&prefix, ttl);
    let t0 = now_ns();
    assert!(engine.check(&s, "q", 1, None, t0).await.unwrap().allowed);
    assert_eq!(shared_remaining(&prefix, &s).await, 999 - 999 / 16);
    let later = t0 + 2 * ttl.as_nanos() as i64;
    let d = engine.check(&s, "q", 0, None, later).await.unwrap();
    assert_eq!(
        d.limits[0].remaining, 999,
        "one request used, whatever the lease's state"
    );
    engine.store().return_leases(later, false).await.unwrap();
    let d = engine.check(&s, "q", 0, None, later).await.unwrap();
    assert_eq!(d.limits[0].remaining, 999, "and after it went back");
    assert_eq!(shared_remaining(&prefix, &s).await, 999);
}

#[tokio::test]
async fn leased_tokens_of_a_rate_go_back_to_the_bucket() {
    let prefix = unique_prefix();
    // 1 per hour refill: the bucket only changes through what is taken and returned.
    let (_p, s) = policy("{ rates: [ { limit: 1, per: hour, burst: 800 } ], daily: 100000 }");
    let engine = leased(&prefix, Duration::from_secs(60));
    assert!(
        engine
            .check(&s, "q", 1, None, now_ns())
            .await
            .unwrap()
            .allowed
    );
    // The same lease from both counters (a request needs both to admit locally).
    let held = 799 / 16;
    assert_eq!(engine.store().held_units(), 2 * held);
    let bucket = |d: quota::engine::Decision| {
        d.limits
            .iter()
            .find(|l| l.window_s == 3600)
            .unwrap()
            .remaining
    };
    let plain = Engine::new(redis(&prefix));
    assert_eq!(
        bucket(plain.check(&s, "q", 0, None, now_ns()).await.unwrap()),
        799 - held
    );
    engine.store().return_leases(now_ns(), true).await.unwrap();
    assert_eq!(
        bucket(plain.check(&s, "q", 0, None, now_ns()).await.unwrap()),
        799
    );
}

#[tokio::test]
async fn scripts_are_reloaded_when_redis_forgets_them() {
    let server = tollgate_e2e::RedisServer::start();
    let mut cfg = RedisConfig::new(vec![server.url()]);
    cfg.timeout = Duration::from_secs(2);
    let engine = Engine::new(RedisStore::new(&cfg).unwrap());
    let (_p, s) = policy("{ daily: 10 }");
    assert!(
        engine
            .check(&s, "q", 1, None, now_ns())
            .await
            .unwrap()
            .allowed
    );
    // A restarted or failed-over Redis has an empty script cache: the next call gets NOSCRIPT.
    let flushed = std::process::Command::new("redis-cli")
        .args(["-p", &server.port.to_string(), "SCRIPT", "FLUSH"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&flushed.stdout).contains("OK"));
    let d = engine.check(&s, "q", 1, None, now_ns()).await.unwrap();
    assert!(d.allowed);
    assert_eq!(d.limits[0].remaining, 8, "both requests counted");
}

/// Reserve `reserve` units of `q` for a new attempt; the attempt's id when admitted.
async fn reserve(
    engine: &Engine<LeasedStore>,
    s: &Subject,
    reserve: u64,
    at: i64,
) -> Option<String> {
    let attempt = format!("a-{}", next_attempt());
    let expires = at + 60_000_000_000;
    let d = engine
        .reserve(
            s,
            &[("q", reserve)],
            &attempt,
            expires,
            at,
            Default::default(),
        )
        .await
        .unwrap();
    d.allowed.then_some(attempt)
}

fn next_attempt() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

async fn settle(
    engine: &Engine<LeasedStore>,
    s: &Subject,
    attempt: &str,
    actual: u64,
    reserved_at: i64,
) -> quota::storage::Settled {
    engine
        .settle(s, &[("q", actual)], attempt, reserved_at, now_ns(), None)
        .await
        .unwrap()
}

#[tokio::test]
async fn reservations_are_taken_and_settled_from_leases() {
    let prefix = unique_prefix();
    let (_p, s) = policy("{ daily: 100000000 }");
    let engine = leased(&prefix, Duration::from_secs(60));
    let n = 1_000u64;
    let mut used = 0;
    for i in 0..n {
        let at = now_ns();
        let attempt = reserve(&engine, &s, 4_000, at).await.expect("admitted");
        let actual = 100 + i % 900;
        used += actual;
        assert_eq!(
            settle(&engine, &s, &attempt, actual, at).await,
            quota::storage::Settled::Charged
        );
    }
    let calls = engine.store().redis().stats().calls;
    let per_1000 = calls as f64 * 1000.0 / n as f64;
    figure(
        "redis_calls_per_1000_llm_calls_with_leases",
        format!("{per_1000:.1}"),
    );
    assert!(
        per_1000 <= 20.0,
        "{calls} Redis calls for {n} reservations and settlements"
    );
    assert!(engine.store().local_settlements() >= n - calls);
    // Once the leases are back, Redis holds exactly what was used.
    engine.store().return_leases(now_ns(), true).await.unwrap();
    assert_eq!(shared_remaining(&prefix, &s).await, 100_000_000 - used);
}

#[tokio::test]
async fn a_settlement_from_a_lease_delivered_twice_charges_once() {
    let prefix = unique_prefix();
    let (_p, s) = policy("{ daily: 1000000 }");
    let engine = leased(&prefix, Duration::from_secs(60));
    // The first reservation goes to Redis and takes a lease; the second comes from the lease.
    let at = now_ns();
    let first = reserve(&engine, &s, 1_000, at).await.unwrap();
    let second = reserve(&engine, &s, 1_000, at).await.unwrap();
    assert_eq!(engine.store().local_decisions(), 1, "second from the lease");
    for attempt in [&first, &second] {
        assert_eq!(
            settle(&engine, &s, attempt, 300, at).await,
            quota::storage::Settled::Charged
        );
        assert_eq!(
            settle(&engine, &s, attempt, 300, at).await,
            quota::storage::Settled::AlreadySettled
        );
    }
    engine.store().return_leases(now_ns(), true).await.unwrap();
    assert_eq!(shared_remaining(&prefix, &s).await, 1_000_000 - 600);
}

#[tokio::test]
async fn an_overrun_the_lease_cannot_cover_is_charged_in_redis() {
    let prefix = unique_prefix();
    let (_p, s) = policy("{ daily: 10000000 }");
    let engine = leased(&prefix, Duration::from_secs(60));
    let at = now_ns();
    let _warm = reserve(&engine, &s, 10, at).await.unwrap();
    let attempt = reserve(&engine, &s, 10, at).await.unwrap();
    assert_eq!(engine.store().local_decisions(), 1);
    let held = engine.store().held_units();
    let calls = engine.store().redis().stats().calls;
    // Used far more than reserved and than the lease holds (a lying max_tokens, say).
    let actual = held + 5_000;
    assert_eq!(
        settle(&engine, &s, &attempt, actual, at).await,
        quota::storage::Settled::Charged
    );
    assert_eq!(engine.store().redis().stats().calls, calls + 1);
    assert_eq!(
        engine.store().held_units(),
        held,
        "the lease was not touched"
    );
    assert_eq!(
        settle(&engine, &s, &attempt, actual, at).await,
        quota::storage::Settled::AlreadySettled
    );
    engine.store().return_leases(now_ns(), true).await.unwrap();
    // The warm-up attempt is still reserved (10), this one charged in full.
    assert_eq!(
        shared_remaining(&prefix, &s).await,
        10_000_000 - 10 - actual
    );
}

#[tokio::test]
async fn a_reservation_from_a_lease_left_unsettled_stops_counting_when_it_expires() {
    let prefix = unique_prefix();
    let (_p, s) = policy("{ daily: 1000000 }");
    let engine = leased(&prefix, Duration::from_secs(60));
    let at = now_ns();
    let first = reserve(&engine, &s, 1_000, at).await.unwrap();
    settle(&engine, &s, &first, 1_000, at).await;
    let expires = at + 1_000_000_000;
    let held = engine
        .reserve(&s, &[("q", 1_000)], "lost", expires, at, Default::default())
        .await
        .unwrap();
    assert!(held.allowed);
    assert_eq!(engine.store().local_decisions(), 1);
    engine
        .store()
        .return_leases(expires - 1, true)
        .await
        .unwrap();
    assert_eq!(
        shared_remaining(&prefix, &s).await,
        1_000_000 - 2_000,
        "still held before its expiry"
    );
    engine.store().return_leases(expires, true).await.unwrap();
    assert_eq!(shared_remaining(&prefix, &s).await, 1_000_000 - 1_000);
}

#[tokio::test]
async fn two_gateways_reserving_from_leases_admit_exactly_the_limit() {
    let prefix = unique_prefix();
    let (_p, s) = policy("{ daily: 100000 }");
    let (a, b) = (
        leased(&prefix, Duration::from_secs(60)),
        leased(&prefix, Duration::from_secs(60)),
    );
    let mut admitted = 0u64;
    // Each call reserves 500 tokens and uses all of them; the gateways take turns until both
    // are refused, then give their leases back, until nothing more is admitted anywhere.
    loop {
        let mut progress = false;
        for g in [&a, &b] {
            loop {
                let at = now_ns();
                let Some(attempt) = reserve(g, &s, 500, at).await else {
                    break;
                };
                settle(g, &s, &attempt, 500, at).await;
                admitted += 1;
                progress = true;
                assert!(admitted * 500 <= 100_000, "over the limit");
            }
        }
        a.store().return_leases(now_ns(), true).await.unwrap();
        b.store().return_leases(now_ns(), true).await.unwrap();
        if !progress {
            break;
        }
    }
    assert_eq!(
        admitted * 500,
        100_000,
        "the fleet admitted exactly the limit"
    );
    assert_eq!(shared_remaining(&prefix, &s).await, 0);
}

/// A `concurrent` limit has no window that ends: slots a gateway took through a lease come back
/// when its calls end, however long they ran, and never leak from the shared count.
#[tokio::test]
async fn concurrent_slots_all_come_back() {
    let prefix = unique_prefix();
    // `concurrent` applies to an LLM route's token quota.
    let yaml = "upstreams:\n  u: { address: '127.0.0.1:1' }\nroutes:\n  - { name: r, match: { path_prefix: / }, upstream: u, quota: calls, llm: { provider: openai, tokens: q } }\n\
         tiers:\n  t:\n    calls: { daily: 1000000 }\n    q: { daily: 100000000, concurrent: 500 }\nsubjects:\n  - { key: k, id: s, tier: t }\n";
    let p = parse_sources(&[("leases.yaml".into(), yaml.into())]).expect("policy");
    let s = p.subject_for_key("k").expect("subject");
    let engine = leased(&prefix, Duration::from_secs(60));
    // Twenty calls one after another, each settled a few seconds after it was reserved.
    let t0 = now_ns() - 70_000_000_000;
    for i in 0..20i64 {
        let at = t0 + i * 3_000_000_000;
        let attempt = reserve(&engine, &s, 1_000, at).await.expect("admitted");
        assert_eq!(
            settle(&engine, &s, &attempt, 500, at).await,
            quota::storage::Settled::Charged
        );
    }
    engine.store().return_leases(now_ns(), true).await.unwrap();
    // Another gateway (straight to Redis) can then hold all 500 calls at once.
    let direct = Engine::new(redis(&prefix));
    let mut held = 0;
    for i in 0..501 {
        let d = direct
            .reserve(
                &s,
                &[("q", 1)],
                &format!("direct-{i}"),
                now_ns() + 60_000_000_000,
                now_ns(),
                Default::default(),
            )
            .await
            .unwrap();
        held += u64::from(d.allowed);
    }
    assert_eq!(held, 500, "every slot is free again, and no more than 500");
}
