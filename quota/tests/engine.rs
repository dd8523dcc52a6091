//! Engine behaviour every storage backend must show. Each test body runs once per backend through
//! `for_each_backend!`: the in-memory store, Redis (`TOLLGATE_REDIS_URL`, default
//! `redis://127.0.0.1:6379`; every test uses its own key prefix) and Redis with leases.

use quota::engine::{Engine, Reason};
use quota::policy::FailurePolicy;
use quota::policy::{EntitlementSource, Policy, parse_sources};
use quota::storage::Settled;
use quota::storage::{MemoryStore, Storage};
use std::sync::Arc;

macro_rules! for_each_backend {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(quota::storage::MemoryStore::new()).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::redis_store()).await;
                }
            )*
        }
        mod redis_leased {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let store = quota::storage::LeasedStore::new(super::redis_store(), Default::default());
                    super::$name(store).await;
                }
            )*
        }
    };
}

fn redis_store() -> quota::storage::RedisStore {
    let url =
        std::env::var("TOLLGATE_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let mut cfg = quota::storage::RedisConfig::new(vec![url]);
    cfg.prefix = format!("tgtest-{}", uuid_like());
    // Generous: debug builds on a loaded machine; the timeout itself is tested elsewhere.
    cfg.timeout = std::time::Duration::from_secs(2);
    quota::storage::RedisStore::new(&cfg).expect("redis store")
}

/// A prefix unique to this test: process id, time and a counter.
fn uuid_like() -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    format!(
        "{}-{}-{}",
        std::process::id(),
        quota::engine::now_ns(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

for_each_backend!(
    admits_exactly_the_limit_then_refuses_until_reset,
    concurrent_requests_admit_exactly_the_limit,
    several_counters_are_all_or_nothing,
    repeated_request_id_returns_first_decision_and_charges_once,
    daily_quota_resets_at_the_subjects_local_midnight,
    counters_survive_a_limit_change,
    quota_type_outside_the_tier_is_refused,
    settling_replaces_the_reservation_with_the_actual_amount,
    a_settlement_delivered_twice_charges_once_and_a_retry_is_a_new_charge,
    an_expired_reservation_stops_counting,
    a_renewed_reservation_holds_and_a_lapsed_one_stays_lapsed,
    reserving_several_quotas_is_all_or_nothing,
    a_rate_bucket_refunds_what_was_not_used,
    concurrent_reservations_and_settlements_are_exact,
    a_stream_settled_after_midnight_leaves_the_new_day_alone,
);

const S: i64 = 1_000_000_000;

fn policy(tiers: &str, tz: &str) -> Policy {
    let yaml = format!(
        "upstreams:\n  u: {{ address: '127.0.0.1:1' }}\nroutes:\n  - {{ name: r, match: {{ path_prefix: / }}, upstream: u, quota: lookup }}\n\
         tiers:\n{tiers}\nsubjects:\n  - {{ key: k, id: alice, tier: t, time_zone: {tz} }}\n"
    );
    parse_sources(&[("test.yaml".into(), yaml)]).expect("test policy is valid")
}

fn at(rfc3339: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .unwrap()
        .timestamp_nanos_opt()
        .unwrap()
}

async fn admits_exactly_the_limit_then_refuses_until_reset<S: Storage>(store: S) {
    let p = policy("  t:\n    lookup: { daily: 5 }", "UTC");
    let alice = p.subject_for_key("k").unwrap();
    let engine = Engine::new(store);
    let now = at("2026-11-22T18:00:00Z");
    for i in 0..5 {
        let d = engine.check(&alice, "lookup", 1, None, now).await.unwrap();
        assert!(d.allowed, "request {i}");
        assert_eq!(d.limits[0].remaining, 4 - i);
    }
    let d = engine.check(&alice, "lookup", 1, None, now).await.unwrap();
    assert!(!d.allowed);
    assert_eq!(d.reason, Reason::QuotaExceeded);
    assert_eq!(d.limits[0].remaining, 0);
    assert_eq!(d.retry_after_ns(), 6 * 3600 * S, "until midnight UTC");
}

async fn concurrent_requests_admit_exactly_the_limit<S: Storage>(store: S) {
    let p = policy(
        "  t:\n    lookup:\n      rates: [ { limit: 1, per: hour, burst: 1000 } ]\n      daily: 37",
        "UTC",
    );
    let alice = p.subject_for_key("k").unwrap();
    let engine = Arc::new(Engine::new(store));
    let now = at("2026-11-22T12:00:00Z");
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let (engine, alice) = (engine.clone(), alice.clone());
            tokio::spawn(async move {
                engine
                    .check(&alice, "lookup", 1, None, now)
                    .await
                    .unwrap()
                    .allowed
            })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        admitted += usize::from(t.await.unwrap());
    }
    assert_eq!(admitted, 37);
}

async fn several_counters_are_all_or_nothing<S: Storage>(store: S) {
    let p = policy(
        "  t:\n    lookup:\n      rates: [ { limit: 1, per: hour, burst: 10 } ]\n      daily: 3",
        "UTC",
    );
    let alice = p.subject_for_key("k").unwrap();
    let engine = Engine::new(store);
    let now = at("2026-11-22T12:00:00Z");
    assert!(
        engine
            .check(&alice, "lookup", 2, None, now)
            .await
            .unwrap()
            .allowed
    );
    // The daily quota has 1 left: a cost of 2 is refused and must not take from the bucket either.
    let refused = engine.check(&alice, "lookup", 2, None, now).await.unwrap();
    assert!(!refused.allowed);
    assert_eq!(
        refused.limits[0].remaining, 8,
        "bucket untouched by the refused request"
    );
    let ok = engine.check(&alice, "lookup", 1, None, now).await.unwrap();
    assert!(ok.allowed);
    assert_eq!(ok.limits[0].remaining, 7);
    assert_eq!(ok.limits[1].remaining, 0);
}

async fn repeated_request_id_returns_first_decision_and_charges_once<S: Storage>(store: S) {
    let p = policy(
        "  t:\n    lookup: { daily: 10 }\n    export: { daily: 10 }",
        "UTC",
    );
    let alice = p.subject_for_key("k").unwrap();
    let engine = Engine::new(store);
    let now = at("2026-11-22T12:00:00Z");
    let first = engine
        .check(&alice, "lookup", 3, Some("req-1"), now)
        .await
        .unwrap();
    let again = engine
        .check(&alice, "lookup", 3, Some("req-1"), now + S)
        .await
        .unwrap();
    assert!(first.allowed && !first.replayed);
    assert!(again.replayed);
    assert_eq!(again.limits, first.limits);
    let next = engine
        .check(&alice, "lookup", 1, Some("req-2"), now)
        .await
        .unwrap();
    assert_eq!(next.limits[0].remaining, 6, "10 - 3 (once) - 1");
    // The same id for another request (a bigger cost, another quota) is no free pass.
    for (quota, cost) in [("lookup", 9), ("export", 1)] {
        let reused = engine
            .check(&alice, quota, cost, Some("req-1"), now + S)
            .await;
        assert!(
            matches!(
                reused,
                Err(quota::EngineError::Storage(
                    quota::storage::StorageError::IdempotencyConflict
                ))
            ),
            "{quota} {cost}: {reused:?}"
        );
    }
    let after = engine.check(&alice, "lookup", 0, None, now).await.unwrap();
    assert_eq!(after.limits[0].remaining, 6, "nothing charged by the reuse");
}

async fn daily_quota_resets_at_the_subjects_local_midnight<S: Storage>(store: S) {
    // New York is UTC-5 in November: local midnight is 05:00 UTC.
    let p = policy("  t:\n    lookup: { daily: 2 }", "America/New_York");
    let alice = p.subject_for_key("k").unwrap();
    let engine = Engine::new(store);
    let before = at("2026-11-22T04:59:59Z");
    for _ in 0..2 {
        assert!(
            engine
                .check(&alice, "lookup", 1, None, before)
                .await
                .unwrap()
                .allowed
        );
    }
    let refused = engine
        .check(&alice, "lookup", 1, None, before)
        .await
        .unwrap();
    assert!(!refused.allowed);
    assert_eq!(refused.retry_after_ns(), S, "one second to local midnight");
    // Midnight UTC is not midnight for this subject: still refused.
    let utc_midnight = engine
        .check(&alice, "lookup", 1, None, at("2026-11-22T00:30:00Z"))
        .await;
    assert!(!utc_midnight.unwrap().allowed);
    let after = engine
        .check(&alice, "lookup", 1, None, at("2026-11-22T05:00:00Z"))
        .await
        .unwrap();
    assert!(after.allowed);
    assert_eq!(after.limits[0].remaining, 1);
}

async fn counters_survive_a_limit_change<S: Storage>(store: S) {
    let engine = Engine::new(store);
    let now = at("2026-11-22T12:00:00Z");
    let old = policy("  t:\n    lookup: { daily: 5 }", "UTC");
    let alice = old.subject_for_key("k").unwrap();
    for _ in 0..3 {
        assert!(
            engine
                .check(&alice, "lookup", 1, None, now)
                .await
                .unwrap()
                .allowed
        );
    }
    let new = policy("  t:\n    lookup: { daily: 4 }", "UTC");
    let alice = new.subject_for_key("k").unwrap();
    let d = engine.check(&alice, "lookup", 1, None, now).await.unwrap();
    assert!(d.allowed);
    assert_eq!(
        d.limits[0].remaining, 0,
        "3 used before the change count against the new limit"
    );
    assert!(
        !engine
            .check(&alice, "lookup", 1, None, now)
            .await
            .unwrap()
            .allowed
    );
}

async fn quota_type_outside_the_tier_is_refused<S: Storage>(store: S) {
    let p = policy(
        "  t:\n    lookup: { daily: 5 }\n    chat: { unlimited: true }",
        "UTC",
    );
    let alice = p.subject_for_key("k").unwrap();
    let engine = Engine::new(store);
    let d = engine.check(&alice, "export", 1, None, 0).await.unwrap();
    assert_eq!((d.allowed, d.reason), (false, Reason::NotInTier));
    let d = engine
        .check(&alice, "chat", 1_000_000, None, 0)
        .await
        .unwrap();
    assert_eq!((d.allowed, d.reason), (true, Reason::Unlimited));
}

#[test]
fn memory_store_sweep_drops_only_idle_state() {
    let store = MemoryStore::new();
    let p = policy(
        "  t:\n    lookup:\n      rates: [ { limit: 1, per: second } ]",
        "UTC",
    );
    let alice = p.subject_for_key("k").unwrap();
    let engine = Engine::new(store);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(engine.check(&alice, "lookup", 1, None, 0))
        .unwrap();
    engine.store().sweep(0);
    assert_eq!(engine.store().len(), 1, "bucket still refilling");
    engine.store().sweep(2 * S);
    assert!(engine.store().is_empty());
}

fn remaining(d: &quota::engine::Decision, quota: &str) -> u64 {
    d.limits
        .iter()
        .filter(|l| &*l.quota_type == quota)
        .map(|l| l.remaining)
        .min()
        .expect("a limit of that quota")
}

const TOKENS: &str =
    "  t:\n    lookup: { daily: 1 }\n    tokens: { daily: 1000 }\n    micros: { daily: 500 }";

async fn settling_replaces_the_reservation_with_the_actual_amount<S: Storage>(store: S) {
    let p = policy(TOKENS, "UTC");
    let s = p.subject_for_key("k").unwrap();
    let e = Engine::new(store);
    let now = at("2026-11-22T12:00:00Z");
    let exp = now + 60 * S;
    let d = e
        .reserve(
            &s,
            &[("tokens", 300)],
            "a1",
            exp,
            now,
            FailurePolicy::default(),
        )
        .await
        .unwrap();
    assert!(d.allowed);
    assert_eq!(remaining(&d, "tokens"), 700);
    let probe = e.check(&s, "tokens", 0, None, now).await.unwrap();
    assert_eq!(
        remaining(&probe, "tokens"),
        700,
        "the reservation counts while held"
    );
    assert_eq!(
        e.settle(&s, &[("tokens", 120)], "a1", now, now, None)
            .await
            .unwrap(),
        Settled::Charged
    );
    let probe = e.check(&s, "tokens", 0, None, now).await.unwrap();
    assert_eq!(
        remaining(&probe, "tokens"),
        880,
        "refunded down to the actual 120"
    );
    // More than reserved: the extra is charged too.
    e.reserve(
        &s,
        &[("tokens", 100)],
        "a2",
        exp,
        now,
        FailurePolicy::default(),
    )
    .await
    .unwrap();
    e.settle(&s, &[("tokens", 150)], "a2", now, now, None)
        .await
        .unwrap();
    let probe = e.check(&s, "tokens", 0, None, now).await.unwrap();
    assert_eq!(remaining(&probe, "tokens"), 730);
}

async fn a_settlement_delivered_twice_charges_once_and_a_retry_is_a_new_charge<S: Storage>(
    store: S,
) {
    let p = policy(TOKENS, "UTC");
    let s = p.subject_for_key("k").unwrap();
    let e = Engine::new(store);
    let now = at("2026-11-22T12:00:00Z");
    let exp = now + 60 * S;
    e.reserve(
        &s,
        &[("tokens", 300)],
        "req-1.attempt-1",
        exp,
        now,
        FailurePolicy::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        e.settle(&s, &[("tokens", 50)], "req-1.attempt-1", now, now, None)
            .await
            .unwrap(),
        Settled::Charged
    );
    assert_eq!(
        e.settle(&s, &[("tokens", 50)], "req-1.attempt-1", now, now, None)
            .await
            .unwrap(),
        Settled::AlreadySettled
    );
    // The client retried: a second real upstream call, charged as such.
    e.reserve(
        &s,
        &[("tokens", 300)],
        "req-1.attempt-2",
        exp,
        now,
        FailurePolicy::default(),
    )
    .await
    .unwrap();
    e.settle(&s, &[("tokens", 70)], "req-1.attempt-2", now, now, None)
        .await
        .unwrap();
    let probe = e.check(&s, "tokens", 0, None, now).await.unwrap();
    assert_eq!(remaining(&probe, "tokens"), 1000 - 50 - 70);
}

async fn an_expired_reservation_stops_counting<S: Storage>(store: S) {
    let p = policy(TOKENS, "UTC");
    let s = p.subject_for_key("k").unwrap();
    let e = Engine::new(store);
    let now = at("2026-11-22T12:00:00Z");
    // A gateway reserved 900 and died: nobody settles.
    e.reserve(
        &s,
        &[("tokens", 900)],
        "lost",
        now + S,
        now,
        FailurePolicy::default(),
    )
    .await
    .unwrap();
    assert!(!e.check(&s, "tokens", 200, None, now).await.unwrap().allowed);
    let later = e.check(&s, "tokens", 200, None, now + 2 * S).await.unwrap();
    assert!(later.allowed, "released when it expired");
    assert_eq!(remaining(&later, "tokens"), 800);
}

async fn a_renewed_reservation_holds_and_a_lapsed_one_stays_lapsed<S: Storage>(store: S) {
    let p = policy(TOKENS, "UTC");
    let s = p.subject_for_key("k").unwrap();
    let e = Engine::new(store);
    let now = at("2026-11-22T12:00:00Z");
    let fp = FailurePolicy::default();
    let held = [("tokens", 900)];
    // A call still running renews its hold before it lapses.
    e.reserve(&s, &held, "long", now + S, now, fp)
        .await
        .unwrap();
    e.renew(&s, &held, "long", now, now + 3 * S, now + S / 2, false)
        .await
        .unwrap();
    let left = async |at| {
        let probe = e.check(&s, "tokens", 0, None, at).await.unwrap();
        remaining(&probe, "tokens")
    };
    assert_eq!(
        left(now + 2 * S).await,
        100,
        "still held past its first expiry"
    );
    assert_eq!(
        left(now + 4 * S).await,
        1000,
        "lapsed at its renewed expiry"
    );
    // A hold that lapsed (its gateway stopped renewing) is not brought back.
    let t = now + 5 * S;
    e.reserve(&s, &held, "lost", t + S, t, fp).await.unwrap();
    e.renew(&s, &held, "lost", t, t + 10 * S, t + 2 * S, false)
        .await
        .unwrap();
    assert_eq!(left(t + 3 * S).await, 1000, "a lapsed hold stays lapsed");
    // Nor is a settled one.
    let t = now + 20 * S;
    e.reserve(&s, &held, "done", t + S, t, fp).await.unwrap();
    e.settle(&s, &[("tokens", 0)], "done", t, t, None)
        .await
        .unwrap();
    e.renew(&s, &held, "done", t, t + 10 * S, t, false)
        .await
        .unwrap();
    assert_eq!(left(t).await, 1000, "a settled hold is gone for good");
}

async fn reserving_several_quotas_is_all_or_nothing<S: Storage>(store: S) {
    let p = policy(TOKENS, "UTC");
    let s = p.subject_for_key("k").unwrap();
    let e = Engine::new(store);
    let now = at("2026-11-22T12:00:00Z");
    let exp = now + 60 * S;
    let refused = e.reserve(
        &s,
        &[("tokens", 300), ("micros", 600)],
        "a1",
        exp,
        now,
        FailurePolicy::default(),
    );
    let refused = refused.await.unwrap();
    assert!(!refused.allowed, "the money budget cannot cover it");
    let probe = e.check(&s, "tokens", 0, None, now).await.unwrap();
    assert_eq!(remaining(&probe, "tokens"), 1000, "no tokens taken either");
    let ok = e.reserve(
        &s,
        &[("tokens", 300), ("micros", 400)],
        "a2",
        exp,
        now,
        FailurePolicy::default(),
    );
    let ok = ok.await.unwrap();
    assert!(ok.allowed);
    assert_eq!(
        (remaining(&ok, "tokens"), remaining(&ok, "micros")),
        (700, 100)
    );
}

async fn a_rate_bucket_refunds_what_was_not_used<S: Storage>(store: S) {
    let p = policy(
        "  t:\n    lookup: { daily: 1 }\n    tokens:\n      rates: [ { limit: 1, per: hour, burst: 1000 } ]",
        "UTC",
    );
    let s = p.subject_for_key("k").unwrap();
    let e = Engine::new(store);
    let now = at("2026-11-22T12:00:00Z");
    e.reserve(
        &s,
        &[("tokens", 500)],
        "a1",
        now + 60 * S,
        now,
        FailurePolicy::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        remaining(
            &e.check(&s, "tokens", 0, None, now).await.unwrap(),
            "tokens"
        ),
        500
    );
    e.settle(&s, &[("tokens", 100)], "a1", now, now, None)
        .await
        .unwrap();
    assert_eq!(
        remaining(
            &e.check(&s, "tokens", 0, None, now).await.unwrap(),
            "tokens"
        ),
        900
    );
}

async fn concurrent_reservations_and_settlements_are_exact<S: Storage>(store: S) {
    let p = policy(
        "  t:\n    lookup: { daily: 1 }\n    tokens: { daily: 100000 }\n    micros: { daily: 100000 }",
        "UTC",
    );
    let s = p.subject_for_key("k").unwrap();
    let e = Arc::new(Engine::new(store));
    let now = at("2026-11-22T12:00:00Z");
    let tasks: Vec<_> = (0..100u64)
        .map(|i| {
            let (e, s) = (e.clone(), s.clone());
            tokio::spawn(async move {
                let id = format!("attempt-{i}");
                let d = e.reserve(
                    &s,
                    &[("tokens", 500), ("micros", 300)],
                    &id,
                    now + 60 * S,
                    now,
                    FailurePolicy::default(),
                );
                assert!(d.await.unwrap().allowed);
                // Every attempt used i tokens costing 2i micros; some settlements arrive twice.
                e.settle(&s, &[("tokens", i), ("micros", 2 * i)], &id, now, now, None)
                    .await
                    .unwrap();
                if i % 3 == 0 {
                    e.settle(&s, &[("tokens", i), ("micros", 2 * i)], &id, now, now, None)
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let used: u64 = (0..100).sum();
    let probe = e.check(&s, "tokens", 0, None, now).await.unwrap();
    assert_eq!(remaining(&probe, "tokens"), 100_000 - used);
    let probe = e.check(&s, "micros", 0, None, now).await.unwrap();
    assert_eq!(remaining(&probe, "micros"), 100_000 - 2 * used);
}

async fn a_stream_settled_after_midnight_leaves_the_new_day_alone<S: Storage>(store: S) {
    let p = policy(TOKENS, "UTC");
    let s = p.subject_for_key("k").unwrap();
    let e = Engine::new(store);
    let before = at("2026-11-22T23:59:50Z");
    let after = at("2026-11-23T00:00:30Z");
    e.reserve(
        &s,
        &[("tokens", 300)],
        "late",
        after + 60 * S,
        before,
        FailurePolicy::default(),
    )
    .await
    .unwrap();
    // The new day starts; other requests use 400 of it while the stream still runs.
    assert!(
        e.check(&s, "tokens", 400, Some("today-1"), after)
            .await
            .unwrap()
            .allowed
    );
    e.settle(&s, &[("tokens", 120)], "late", before, after, None)
        .await
        .unwrap();
    let today = e.check(&s, "tokens", 0, None, after).await.unwrap();
    assert_eq!(remaining(&today, "tokens"), 600, "today keeps its 400");
}

/// A shared store that is always unreachable.
struct Down;

impl Storage for Down {
    async fn check_and_consume(
        &self,
        _: &quota::storage::ConsumeRequest<'_>,
    ) -> Result<quota::storage::Outcome, quota::storage::StorageError> {
        Err(quota::storage::StorageError::Unavailable("down".into()))
    }

    async fn settle(
        &self,
        _: &quota::storage::SettleRequest<'_>,
    ) -> Result<Settled, quota::storage::StorageError> {
        Err(quota::storage::StorageError::Unavailable("down".into()))
    }

    async fn release(
        &self,
        _: &quota::storage::ReleaseRequest<'_>,
    ) -> Result<(), quota::storage::StorageError> {
        Err(quota::storage::StorageError::Unavailable("down".into()))
    }
    async fn renew(
        &self,
        _: &quota::storage::RenewRequest<'_>,
    ) -> Result<(), quota::storage::StorageError> {
        Err(quota::storage::StorageError::Unavailable("down".into()))
    }
}

#[tokio::test]
async fn local_mode_reserves_and_settles_against_this_gateways_share() {
    let p = policy(
        "  t:\n    lookup: { daily: 1 }\n    tokens:\n      rates: [ { limit: 1, per: hour, burst: 1000 } ]",
        "UTC",
    );
    let s = p.subject_for_key("k").unwrap();
    let e = Engine::new(Down);
    let now = at("2026-11-22T12:00:00Z");
    let local = FailurePolicy {
        mode: quota::policy::FailureMode::Local,
        local_share: 0.5,
    };
    let d = e
        .reserve(&s, &[("tokens", 400)], "a1", now + 60 * S, now, local)
        .await
        .unwrap();
    assert!(d.allowed && d.degraded.is_some());
    assert_eq!(
        remaining(&d, "tokens"),
        100,
        "half of the burst of 1000 is this gateway's"
    );
    assert!(
        e.settle(&s, &[("tokens", 100)], "a1", now, now, None)
            .await
            .is_err(),
        "the shared store is down"
    );
    e.settle(&s, &[("tokens", 100)], "a1", now, now, Some(0.5))
        .await
        .unwrap();
    let again = e
        .reserve(&s, &[("tokens", 0)], "probe", now + 60 * S, now, local)
        .await
        .unwrap();
    assert_eq!(
        remaining(&again, "tokens"),
        400,
        "the 300 unused tokens came back to the local bucket"
    );
}

#[tokio::test]
async fn decisions_carry_the_tiers_ratelimit_policy_built_at_load() {
    let p = policy(
        "  t:\n    lookup: { rates: [{ limit: 5, per: minute }], daily: 100 }\n    tokens: { daily: 1000 }\n    free: { unlimited: true }",
        "UTC",
    );
    let alice = p.subject_for_key("k").unwrap();
    let engine = Engine::new(MemoryStore::new());
    let now = at("2026-11-22T18:00:00Z");
    let d = engine.check(&alice, "lookup", 1, None, now).await.unwrap();
    let lookup = "\"lookup-minute\";q=5;w=60, \"lookup-day\";q=100;w=86400";
    assert_eq!(d.policy_header.as_deref(), Some(lookup));
    // Several quotas: their items in the order asked; unlimited ones add none.
    let d = engine
        .reserve(
            &alice,
            &[("lookup", 1), ("tokens", 10), ("free", 1)],
            "a1",
            now + 60 * S,
            now,
            FailurePolicy::default(),
        )
        .await
        .unwrap();
    assert!(d.allowed);
    assert_eq!(
        d.policy_header.as_deref().unwrap(),
        format!("{lookup}, \"tokens-day\";q=1000;w=86400")
    );
    let d = engine.check(&alice, "free", 1, None, now).await.unwrap();
    assert_eq!(d.policy_header, None);
}
