//! Every way a reservation ends, without HTTP: on the in-memory store, and on a store that fails
//! the way Redis does (unreachable for a while, or an answer lost after the change was made).
//! Each test checks what a user would: the counters afterwards and the events recorded.

use super::*;
use crate::audit::Settlement as Line;
use crate::engine::Engine;
use crate::llm::sse::StreamMeter;
use crate::llm::{Provider, Usage};
use crate::policy::{EntitlementSource, Policy, Subject, parse_sources};
use crate::storage::{
    ConsumeRequest, MemoryStore, Outcome as StoreOutcome, ReleaseRequest, RenewRequest,
    SettleRequest, Settled, Storage, StorageError,
};
use bytes::Bytes;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const S: i64 = 1_000_000_000;
/// 23:30 UTC: already the 23rd in Paris, the subject's time zone.
const NOW: i64 = 1_795_390_200 * S; // 2026-11-22T23:30:00Z
const PROMPT: u64 = 12;
const MAX_OUT: u64 = 300;

fn policy() -> Policy {
    let yaml = "upstreams:\n  u: { address: '127.0.0.1:1' }\n\
        models:\n  default: { input_per_million: 0.15, output_per_million: 0.60 }\n\
        routes:\n  - { name: chat, match: { path_prefix: /v1/chat/completions }, upstream: u, quota: requests,\n\
        \x20     llm: { provider: openai, tokens: tokens, spend: spend } }\n\
        tiers:\n  t:\n    requests: { daily: 1000 }\n    tokens: { daily: 100000, monthly: 1000000 }\n    spend: { daily: 1000000 }\n\
        subjects:\n  - { key: k, id: alice, tier: t, time_zone: Europe/Paris }\n";
    parse_sources(&[("test.yaml".into(), yaml.into())]).expect("test policy is valid")
}

fn money(usage: Usage) -> u64 {
    (usage.prompt * 150_000 + usage.completion * 600_000).div_ceil(1_000_000)
}

/// A store that fails the way a shared one does. Clones share everything (one Redis, two
/// processes).
#[derive(Clone, Default)]
struct Flaky(Arc<FlakyState>);

#[derive(Default)]
struct FlakyState {
    inner: MemoryStore,
    /// Every call fails as unreachable.
    down: AtomicBool,
    /// Settlements applied but answered with a timeout (the answer lost in transit).
    lose_answers: AtomicU32,
    /// Settlements refused for good.
    reject: AtomicBool,
    settle_calls: AtomicU32,
}

impl Flaky {
    fn set_down(&self, down: bool) {
        self.0.down.store(down, Ordering::SeqCst);
    }

    fn unreachable(&self) -> Result<(), StorageError> {
        if self.0.down.load(Ordering::SeqCst) {
            return Err(StorageError::Unavailable("connection refused".into()));
        }
        Ok(())
    }
}

impl Storage for Flaky {
    async fn check_and_consume(
        &self,
        req: &ConsumeRequest<'_>,
    ) -> Result<StoreOutcome, StorageError> {
        self.unreachable()?;
        self.0.inner.check_and_consume(req).await
    }

    async fn settle(&self, req: &SettleRequest<'_>) -> Result<Settled, StorageError> {
        self.0.settle_calls.fetch_add(1, Ordering::SeqCst);
        self.unreachable()?;
        if self.0.reject.load(Ordering::SeqCst) {
            return Err(StorageError::Rejected("ERR script error".into()));
        }
        let settled = self.0.inner.settle(req).await?;
        let lost = self
            .0
            .lose_answers
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if lost.is_ok() {
            return Err(StorageError::Timeout(50));
        }
        Ok(settled)
    }

    async fn release(&self, req: &ReleaseRequest<'_>) -> Result<(), StorageError> {
        self.unreachable()?;
        self.0.inner.release(req).await
    }

    async fn renew(&self, req: &RenewRequest<'_>) -> Result<(), StorageError> {
        self.unreachable()?;
        self.0.inner.renew(req).await
    }
}

/// The environment a gateway gives billing, recording what billing does.
struct Env<St> {
    engine: Engine<St>,
    deferred: Deferred,
    events: Mutex<Vec<SettledEvent>>,
    outcomes: Mutex<Vec<Outcome>>,
    depth: AtomicUsize,
}

impl<St: Storage> Env<St> {
    fn new(store: St, deferred: Deferred) -> Arc<Self> {
        Arc::new(Env {
            engine: Engine::new(store),
            deferred,
            events: Mutex::new(Vec::new()),
            outcomes: Mutex::new(Vec::new()),
            depth: AtomicUsize::new(0),
        })
    }

    fn events(&self) -> Vec<SettledEvent> {
        self.events.lock().unwrap().clone()
    }

    fn outcomes(&self) -> Vec<Outcome> {
        self.outcomes.lock().unwrap().clone()
    }

    /// The attempt and per-quota lines of every event, in order.
    fn settled(&self) -> Vec<(String, Vec<Line>)> {
        self.events()
            .into_iter()
            .map(|e| match e.body {
                EventBody::ReservationSettled {
                    attempt_id,
                    settlements,
                    ..
                } => (attempt_id, settlements),
                other => panic!("not a settlement: {other:?}"),
            })
            .collect()
    }
}

impl<St: Storage> BillingEnv for Env<St> {
    type Store = St;

    fn engine(&self) -> &Engine<St> {
        &self.engine
    }

    fn now_ns(&self) -> i64 {
        NOW + S
    }

    fn deferred(&self) -> &Deferred {
        &self.deferred
    }

    fn emit_settled(&self, event: SettledEvent) {
        self.events.lock().unwrap().push(event);
    }

    fn on_outcome(&self, outcome: Outcome, _: Usage) {
        self.outcomes.lock().unwrap().push(outcome);
    }

    fn on_journal_depth(&self, depth: usize) {
        self.depth.store(depth, Ordering::SeqCst);
    }
}

/// Reserve for attempt `attempt` of `alice` as the gateway does (prompt + output ceiling, the
/// request, the money) and hold it as a ticket.
async fn reserve<St: Storage>(env: &Arc<Env<St>>, p: &Policy, attempt: &str) -> Ticket<Env<St>> {
    let subject: Arc<Subject> = p.subject_for_key("k").unwrap();
    let route = p.route("POST", None, "/v1/chat/completions").unwrap();
    let llm = route.llm.as_ref().unwrap();
    let price = p.price("gpt-4o-mini").unwrap();
    let tariff = Tariff::new(route, llm, Some(price));
    let amounts: Vec<(Arc<str>, u64)> = vec![
        ("requests".into(), 1),
        ("tokens".into(), PROMPT + MAX_OUT),
        ("spend".into(), price.cost_micros(PROMPT, MAX_OUT)),
    ];
    let costs: Vec<(&str, u64)> = amounts.iter().map(|(q, n)| (&**q, *n)).collect();
    let d = env
        .engine
        .reserve(&subject, &costs, attempt, NOW + 600 * S, NOW, p.failure)
        .await
        .unwrap();
    assert!(d.allowed);
    Ticket::new(
        env.clone(),
        Reserved {
            subject,
            attempt_id: attempt.into(),
            request_id: format!("req-{attempt}"),
            reserved_at_ns: NOW,
            prompt_estimate: PROMPT,
            amounts,
            placement: Placement::of(&d, p.failure),
            tariff,
            ttl: std::time::Duration::ZERO,
        },
    )
}

/// What alice has used today of each quota, held reservations included: (requests, tokens,
/// money).
async fn used<St: Storage>(env: &Env<St>, p: &Policy) -> (u64, u64, u64) {
    let alice = p.subject_for_key("k").unwrap();
    let mut out = [0; 3];
    for (i, (q, limit)) in [
        ("requests", 1000),
        ("tokens", 100_000),
        ("spend", 1_000_000),
    ]
    .into_iter()
    .enumerate()
    {
        let d = env.engine.check(&alice, q, 0, None, NOW + S).await.unwrap();
        let day = d.limits.iter().find(|l| l.window_s == 86_400).unwrap();
        out[i] = limit - day.remaining;
    }
    (out[0], out[1], out[2])
}

/// The lines of an event for `usage` when the upstream `answered`.
fn lines(usage: Usage, answered: bool) -> Vec<Line> {
    let reserved_money = money(Usage::plain(PROMPT, MAX_OUT));
    let line = |quota: &str, reserved: u64, actual: u64| Line {
        quota: quota.into(),
        reserved,
        actual,
        refunded: reserved.saturating_sub(actual),
    };
    vec![
        line("requests", 1, u64::from(answered)),
        line("tokens", PROMPT + MAX_OUT, usage.total()),
        line("spend", reserved_money, money(usage)),
    ]
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

/// A journal path in a directory removed on drop.
struct TempJournal(PathBuf);

impl TempJournal {
    fn new(tag: &str) -> TempJournal {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tollgate-billing-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        TempJournal(dir.join("settlements.journal"))
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.0).unwrap_or_default()
    }

    fn rejected(&self) -> String {
        std::fs::read_to_string(self.0.with_extension("journal.rejected")).unwrap_or_default()
    }
}

impl Drop for TempJournal {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The stream a mock OpenAI upstream sends: three words, then usage (11 prompt, 3 completion).
fn openai_stream() -> Vec<Bytes> {
    let mut events: Vec<String> = [" the", " of", " and"]
        .iter()
        .map(|w| {
            format!(
                "data: {{\"id\":\"x\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{w}\"}},\"finish_reason\":null}}],\"usage\":null}}\n\n"
            )
        })
        .collect();
    events.push("data: {\"id\":\"x\",\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":3,\"total_tokens\":14}}\n\n".into());
    events.push("data: [DONE]\n\n".into());
    events.into_iter().map(Bytes::from).collect()
}

/// The client left after `delivered` events; the upstream is read on, up to `drain_bytes`, as the
/// gateway's drain does. The usage it bills.
fn drained(delivered: usize, drain_bytes: u64) -> Usage {
    let mut meter = StreamMeter::new(Provider::OpenAi, "gpt-4o-mini", false);
    let mut out = Vec::new();
    let mut events = openai_stream().into_iter();
    for chunk in events.by_ref().take(delivered) {
        meter.feed(chunk, &mut out);
    }
    for chunk in events {
        if meter.finished() || meter.bytes() >= drain_bytes {
            break;
        }
        meter.feed(chunk, &mut out);
    }
    meter.usage(PROMPT)
}

#[tokio::test]
async fn a_completed_call_is_charged_its_usage_with_one_event() {
    let p = policy();
    let env = Env::new(MemoryStore::new(), Deferred::in_memory());
    let ticket = reserve(&env, &p, "a1").await;
    assert_eq!(
        used(&env, &p).await,
        (1, PROMPT + MAX_OUT, money(Usage::plain(PROMPT, MAX_OUT))),
        "the worst case is held while the call runs"
    );
    let usage = Usage::plain(12, 30);
    assert_eq!(ticket.settle(usage, true).await, Outcome::Charged);
    assert_eq!(used(&env, &p).await, (1, 42, money(usage)));
    assert_eq!(env.settled(), vec![("a1".into(), lines(usage, true))]);
    let event = env.events().remove(0);
    let audit = event.into_audit("gw-1", NOW + S);
    assert_eq!(audit.subject.as_deref(), Some("alice"));
    assert_eq!(audit.request_id.as_deref(), Some("req-a1"));
    assert_eq!(
        audit.day.as_deref(),
        Some("2026-11-23"),
        "the reservation's day in the subject's time zone"
    );
    assert_eq!(env.outcomes(), vec![Outcome::Charged]);
}

#[tokio::test]
async fn an_upstream_error_releases_the_whole_reservation() {
    let p = policy();
    let env = Env::new(MemoryStore::new(), Deferred::in_memory());
    let ticket = reserve(&env, &p, "a1").await;
    // Nothing produced: the gateway settles no usage, not answered.
    assert_eq!(
        ticket.settle(Usage::default(), false).await,
        Outcome::Charged
    );
    assert_eq!(used(&env, &p).await, (0, 0, 0), "all of it given back");
    assert_eq!(
        env.settled(),
        vec![("a1".into(), lines(Usage::default(), false))]
    );
}

#[tokio::test]
async fn a_client_gone_is_billed_the_usage_the_drain_read() {
    let p = policy();
    let env = Env::new(MemoryStore::new(), Deferred::in_memory());
    let ticket = reserve(&env, &p, "a1").await;
    // Gone after the first word; the upstream is read to its end and reports its usage.
    let usage = drained(1, 1 << 20);
    assert_eq!(usage, Usage::plain(11, 3));
    assert_eq!(ticket.settle(usage, true).await, Outcome::Charged);
    assert_eq!(used(&env, &p).await, (1, 14, money(usage)));
    assert_eq!(env.settled(), vec![("a1".into(), lines(usage, true))]);
}

#[tokio::test]
async fn a_drain_stopped_at_its_limit_bills_the_text_it_counted() {
    let p = policy();
    let env = Env::new(MemoryStore::new(), Deferred::in_memory());
    let ticket = reserve(&env, &p, "a1").await;
    // Gone after one word; the drain stops at its byte limit before the usage arrives: the prompt
    // estimate and the words received are billed.
    let usage = drained(1, 150);
    assert_eq!(usage.prompt, PROMPT, "no reported usage: the estimate");
    assert!(
        (1..=2).contains(&usage.completion),
        "the words read are counted: {usage:?}"
    );
    assert_eq!(ticket.settle(usage, true).await, Outcome::Charged);
    assert_eq!(
        used(&env, &p).await,
        (1, PROMPT + usage.completion, money(usage))
    );
    assert_eq!(env.settled(), vec![("a1".into(), lines(usage, true))]);
}

#[tokio::test]
async fn a_settlement_delivered_twice_charges_once_with_one_event() {
    let p = policy();
    let env = Env::new(MemoryStore::new(), Deferred::in_memory());
    let usage = Usage::plain(12, 30);
    let first = reserve(&env, &p, "a1").await;
    // The same attempt delivered again (a retried message): a second ticket for it.
    let again = Ticket::new(
        env.clone(),
        Reserved {
            subject: first.subject.clone(),
            attempt_id: "a1".into(),
            request_id: "req-a1".into(),
            reserved_at_ns: NOW,
            prompt_estimate: PROMPT,
            amounts: Vec::new(),
            placement: Placement::Shared,
            tariff: Tariff::new(
                p.route("POST", None, "/v1/chat/completions").unwrap(),
                p.routes[0].llm.as_ref().unwrap(),
                p.price("gpt-4o-mini"),
            ),
            ttl: std::time::Duration::ZERO,
        },
    );
    assert_eq!(first.settle(usage, true).await, Outcome::Charged);
    assert_eq!(again.settle(usage, true).await, Outcome::Duplicate);
    assert_eq!(used(&env, &p).await, (1, 42, money(usage)), "charged once");
    assert_eq!(env.settled().len(), 1, "one event");
    assert_eq!(env.outcomes(), vec![Outcome::Charged, Outcome::Duplicate]);
}

#[tokio::test]
async fn an_answer_lost_in_transit_is_charged_once_with_one_event() {
    let p = policy();
    let store = Flaky::default();
    let env = Env::new(store.clone(), Deferred::in_memory());
    tokio::spawn(run_deferred(env.clone()));
    let usage = Usage::plain(12, 30);
    let ticket = reserve(&env, &p, "a1").await;
    // Applied, but the answer times out: the retry finds it settled, and still records it.
    store.0.lose_answers.store(1, Ordering::SeqCst);
    assert_eq!(ticket.settle(usage, true).await, Outcome::Deferred);
    until("the retry", || env.deferred.is_empty()).await;
    assert_eq!(used(&env, &p).await, (1, 42, money(usage)), "charged once");
    assert_eq!(env.settled(), vec![("a1".into(), lines(usage, true))]);
    assert_eq!(env.outcomes(), vec![Outcome::Deferred, Outcome::Charged]);
    assert_eq!(store.0.settle_calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_store_down_defers_to_the_journal_and_applies_in_order_when_back() {
    let p = policy();
    let journal = TempJournal::new("down");
    let store = Flaky::default();
    let env = Env::new(store.clone(), Deferred::open(&journal.0).unwrap());
    let usages = [(1, 30), (2, 5), (3, 0)]
        .map(|(i, completion)| (format!("a{i}"), Usage::plain(12, completion)));
    let mut tickets = Vec::new();
    for (attempt, _) in &usages {
        tickets.push(reserve(&env, &p, attempt).await);
    }
    store.set_down(true);
    for (ticket, (_, usage)) in tickets.into_iter().zip(&usages) {
        assert_eq!(ticket.settle(*usage, true).await, Outcome::Deferred);
    }
    assert_eq!(env.depth.load(Ordering::SeqCst), 3);
    assert_eq!(journal.text().lines().count(), 3, "one fsynced line each");
    assert!(env.events().is_empty(), "no event before it is applied");
    // Down for longer than any retry budget: nothing is given up.
    tokio::spawn(run_deferred(env.clone()));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(env.deferred.len(), 3);
    store.set_down(false);
    until("the journal applied", || env.deferred.is_empty()).await;
    let total: u64 = usages.iter().map(|(_, u)| u.total()).sum();
    let micros: u64 = usages.iter().map(|(_, u)| money(*u)).sum();
    assert_eq!(used(&env, &p).await, (3, total, micros));
    let expected: Vec<_> = usages
        .iter()
        .map(|(a, u)| (a.clone(), lines(*u, true)))
        .collect();
    assert_eq!(env.settled(), expected, "each once, in order");
    assert_eq!(env.depth.load(Ordering::SeqCst), 0);
    assert_eq!(journal.text(), "", "emptied once everything is applied");
}

#[tokio::test]
async fn settlements_waiting_in_the_journal_are_not_overtaken() {
    let p = policy();
    let store = Flaky::default();
    let env = Env::new(store.clone(), Deferred::in_memory());
    let (t1, t2) = (reserve(&env, &p, "a1").await, reserve(&env, &p, "a2").await);
    store.set_down(true);
    assert_eq!(t1.settle(Usage::default(), true).await, Outcome::Deferred);
    store.set_down(false);
    // The store is back but a1 still waits: a2 queues behind it.
    assert_eq!(t2.settle(Usage::default(), true).await, Outcome::Deferred);
    tokio::spawn(run_deferred(env.clone()));
    until("both applied", || env.deferred.is_empty()).await;
    let order: Vec<String> = env.settled().into_iter().map(|(a, _)| a).collect();
    assert_eq!(order, ["a1", "a2"]);
}

#[tokio::test]
async fn the_journal_is_applied_after_a_restart() {
    let p = policy();
    let journal = TempJournal::new("restart");
    let store = Flaky::default();
    let usage = Usage::plain(12, 30);
    let events_before = {
        let env = Env::new(store.clone(), Deferred::open(&journal.0).unwrap());
        let (t1, t2) = (reserve(&env, &p, "a1").await, reserve(&env, &p, "a2").await);
        // a1 reaches the store but its answer is lost; then the store goes away.
        store.0.lose_answers.store(1, Ordering::SeqCst);
        assert_eq!(t1.settle(usage, true).await, Outcome::Deferred);
        store.set_down(true);
        assert_eq!(t2.settle(usage, true).await, Outcome::Deferred);
        env.events()
        // The process stops here: no worker ever ran.
    };
    assert!(events_before.is_empty());
    // A new process on the same journal and the same (shared) store, now back.
    store.set_down(false);
    let env = Env::new(store.clone(), Deferred::open(&journal.0).unwrap());
    assert_eq!(env.deferred.len(), 2, "both pending again");
    tokio::spawn(run_deferred(env.clone()));
    until("the journal applied", || env.deferred.is_empty()).await;
    assert_eq!(
        used(&env, &p).await,
        (2, 2 * usage.total(), 2 * money(usage)),
        "each charged once, a1 included"
    );
    let settled: Vec<String> = env.settled().into_iter().map(|(a, _)| a).collect();
    assert_eq!(settled, ["a1", "a2"], "one event each, a1's too");
    assert_eq!(env.settled()[0].1, lines(usage, true));
    assert_eq!(journal.text(), "");
}

#[tokio::test]
async fn an_unreadable_journal_line_is_kept_aside_and_the_rest_applied() {
    let p = policy();
    let journal = TempJournal::new("corrupt");
    let store = Flaky::default();
    {
        let env = Env::new(store.clone(), Deferred::open(&journal.0).unwrap());
        let ticket = reserve(&env, &p, "a1").await;
        store.set_down(true);
        ticket.settle(Usage::default(), true).await;
    }
    // Damage: a garbage line, then a record torn by a crash mid-write.
    let mut text = journal.text();
    text.push_str("\u{0}\u{1}not json\n{\"op\":\"defer\",\"attempt_id\":\"a9\",\"req");
    std::fs::write(&journal.0, text).unwrap();
    store.set_down(false);
    let env = Env::new(store.clone(), Deferred::open(&journal.0).unwrap());
    assert_eq!(env.deferred.len(), 1, "the good record survives");
    let rejected = journal.rejected();
    assert_eq!(rejected.lines().count(), 2, "{rejected}");
    assert!(rejected.contains("not json") && rejected.contains("a9"));
    // What is appended after the torn tail reads back.
    let ticket = reserve(&env, &p, "a2").await;
    store.set_down(true);
    ticket.settle(Usage::default(), true).await;
    drop(env);
    let env = Env::new(store.clone(), Deferred::open(&journal.0).unwrap());
    assert_eq!(env.deferred.len(), 2);
    store.set_down(false);
    tokio::spawn(run_deferred(env.clone()));
    until("the journal applied", || env.deferred.is_empty()).await;
    let settled: Vec<String> = env.settled().into_iter().map(|(a, _)| a).collect();
    assert_eq!(settled, ["a1", "a2"]);
}

#[tokio::test]
async fn a_settlement_the_store_refuses_is_kept_aside_without_an_event() {
    let p = policy();
    let journal = TempJournal::new("refused");
    let store = Flaky::default();
    let env = Env::new(store.clone(), Deferred::open(&journal.0).unwrap());
    let ticket = reserve(&env, &p, "a1").await;
    store.0.reject.store(true, Ordering::SeqCst);
    assert_eq!(
        ticket.settle(Usage::default(), true).await,
        Outcome::Rejected
    );
    assert!(env.events().is_empty());
    assert!(env.deferred.is_empty(), "not retried forever");
    let kept = journal.rejected();
    assert!(
        kept.contains("script error") && kept.contains("\"a1\""),
        "{kept}"
    );
}

#[tokio::test]
async fn a_ticket_dropped_unsettled_settles_the_prompt() {
    let p = policy();
    let env = Env::new(MemoryStore::new(), Deferred::in_memory());
    drop(reserve(&env, &p, "a1").await);
    until("the settlement on drop", || !env.outcomes().is_empty()).await;
    let prompt = Usage::plain(PROMPT, 0);
    assert_eq!(
        used(&env, &p).await,
        (0, PROMPT, money(prompt)),
        "not a request served; the prompt may have been read"
    );
    assert_eq!(env.settled(), vec![("a1".into(), lines(prompt, false))]);
}

#[tokio::test]
async fn a_ticket_dropped_outside_a_runtime_is_journaled() {
    let p = policy();
    let journal = TempJournal::new("no-runtime");
    let env = Env::new(MemoryStore::new(), Deferred::open(&journal.0).unwrap());
    let ticket = reserve(&env, &p, "a1").await;
    std::thread::spawn(move || drop(ticket)).join().unwrap();
    assert_eq!(env.deferred.len(), 1);
    tokio::spawn(run_deferred(env.clone()));
    until("the journal applied", || env.deferred.is_empty()).await;
    assert_eq!(env.settled().len(), 1);
}

#[test]
fn two_processes_never_share_a_journal() {
    let journal = TempJournal::new("lock");
    let first = Deferred::open(&journal.0).unwrap();
    assert!(matches!(
        Deferred::open(&journal.0),
        Err(JournalError::Locked { .. })
    ));
    drop(first);
    assert!(Deferred::open(&journal.0).is_ok(), "free once closed");
}
