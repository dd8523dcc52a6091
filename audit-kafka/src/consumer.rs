//! The accounting consumer: reads audit events from Kafka in a consumer group and hands them to a
//! [`LedgerWriter`] in batches, committing offsets only after the writer succeeded. It owns the
//! batching, the commit-after-write rule, retries of failed writes and the handling of messages
//! that are not audit events.
//!
//! Guarantees:
//! - **No loss.** A batch's offsets are committed (synchronously) only after `write_batch`
//!   returned `Ok`. A failed write is retried, same batch, with exponential backoff, until it
//!   succeeds or the loop is stopped — never skipped. Stopping leaves the batch uncommitted, so
//!   it is consumed again by whoever owns the partitions next.
//! - **No stall.** An event the ledger can never store (the database refuses the row) must not
//!   hold up every event behind it: the writer sets such events aside as dead letters, kept whole
//!   with their topic, partition and offset (hence [`Delivered`] carries them), and reports them
//!   in [`Written`]; an `Err` from the writer means "try again later" (database down), never
//!   "this row is bad".
//! - **Duplicates are the writer's business.** Redelivery (after a restart, a rebalance, a failed
//!   commit, or a producer retry) is normal: `write_batch` must insert idempotently (by
//!   `event_id`) and report how many rows were new.
//! - **Undecodable messages** (not JSON of an [`AuditEvent`]) can never be inserted: they are
//!   logged with topic/partition/offset, counted, and committed past.
//!
//! While a write keeps failing the loop does not poll Kafka; past `max.poll.interval.ms` (5 min by
//! default) the group reassigns the partitions, the later commit fails, and the batch is simply
//! consumed again — duplicates, not loss.

use quota::audit::AuditEvent;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A message that is not an audit event this consumer understands (a newer gateway's event type
/// during a rolling upgrade, or junk). It is kept, not skipped: once its offset is committed, the
/// ledger is the only place it still exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub payload: Vec<u8>,
    pub error: String,
}

/// An audit event as the topic delivered it: where it was, and its bytes, so an event the ledger
/// refuses can be kept exactly as it came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    pub event: AuditEvent,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub payload: Vec<u8>,
}

/// What a successful [`LedgerWriter::write_batch`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Written {
    /// Events that were new in the ledger.
    pub inserted: u64,
    /// Events the ledger refused and kept as dead letters instead.
    pub dead_lettered: u64,
}

/// Where the consumer puts events: the ledger.
pub trait LedgerWriter: Send + Sync {
    type Error: std::fmt::Display + Send;

    /// Store the batch, idempotently by `event_id` (unreadable messages and dead letters by
    /// topic, partition and offset). Events the database refuses row by row are kept as dead
    /// letters, not returned as an error: `Err` is for failures worth retrying (the database is
    /// unreachable), and `Ok` means everything is durably stored, in the ledger or aside: the
    /// offsets are committed right after.
    fn write_batch(
        &self,
        events: &[Delivered],
        unreadable: &[Unreadable],
    ) -> impl Future<Output = Result<Written, Self::Error>> + Send;
}

/// So a writer can be shared with the rest of the service (and its counters read) while the
/// consumer owns a handle.
impl<T: LedgerWriter> LedgerWriter for Arc<T> {
    type Error = T::Error;

    fn write_batch(
        &self,
        events: &[Delivered],
        unreadable: &[Unreadable],
    ) -> impl Future<Output = Result<Written, Self::Error>> + Send {
        (**self).write_batch(events, unreadable)
    }
}

#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// `group.id`: consumers sharing it split the partitions.
    pub group_id: String,
    pub topic: String,
    /// A batch is written when it has this many messages…
    pub batch_max: usize,
    /// …or this long after its first message arrived.
    pub batch_wait: Duration,
    /// Backoff between retries of a failed write, doubling up to `retry_max`.
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// Further librdkafka properties, applied last.
    pub extra: Vec<(String, String)>,
}

impl ConsumerConfig {
    pub fn new(
        brokers: impl Into<String>,
        group_id: impl Into<String>,
        topic: impl Into<String>,
    ) -> Self {
        Self {
            brokers: brokers.into(),
            group_id: group_id.into(),
            topic: topic.into(),
            batch_max: 500,
            batch_wait: Duration::from_millis(200),
            retry_initial: Duration::from_millis(200),
            retry_max: Duration::from_secs(30),
            extra: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("kafka consumer: {0}")]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Security(#[from] crate::security::SecurityError),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConsumerStats {
    /// Messages received (decodable or not).
    pub consumed: u64,
    /// Rows the writer reported as new.
    pub inserted: u64,
    /// Decoded events written that were already in the ledger (`written - inserted - dead`).
    pub duplicates: u64,
    pub undecodable: u64,
    /// Events the ledger refused and kept as dead letters.
    pub dead_lettered: u64,
    /// Batches written and committed.
    pub batches: u64,
    pub write_errors: u64,
    /// Commits that failed after a successful write (the batch will be consumed again).
    pub commit_errors: u64,
}

#[derive(Default)]
struct Counters {
    consumed: AtomicU64,
    inserted: AtomicU64,
    duplicates: AtomicU64,
    undecodable: AtomicU64,
    dead_lettered: AtomicU64,
    batches: AtomicU64,
    write_errors: AtomicU64,
    commit_errors: AtomicU64,
}

/// Reads the consumer's counters from elsewhere (e.g. a metrics endpoint) while it runs.
#[derive(Clone)]
pub struct ConsumerStatsHandle(Arc<Counters>);

impl ConsumerStatsHandle {
    pub fn get(&self) -> ConsumerStats {
        let c = &self.0;
        ConsumerStats {
            consumed: c.consumed.load(Ordering::Relaxed),
            inserted: c.inserted.load(Ordering::Relaxed),
            duplicates: c.duplicates.load(Ordering::Relaxed),
            undecodable: c.undecodable.load(Ordering::Relaxed),
            dead_lettered: c.dead_lettered.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            write_errors: c.write_errors.load(Ordering::Relaxed),
            commit_errors: c.commit_errors.load(Ordering::Relaxed),
        }
    }
}

/// Commit retries after a successful write; past them the batch is left to redelivery.
const COMMIT_ATTEMPTS: u32 = 3;
/// Pause after a consumer error, doubling while errors repeat within one batch.
const ERROR_PAUSE_MIN: Duration = Duration::from_millis(100);
const ERROR_PAUSE_MAX: Duration = Duration::from_secs(5);

pub struct AccountingConsumer<W> {
    consumer: Arc<StreamConsumer>,
    writer: W,
    cfg: ConsumerConfig,
    counters: Arc<Counters>,
}

/// One batch: its decoded events and, per partition, the offset to commit after it.
#[derive(Default)]
struct Batch {
    events: Vec<Delivered>,
    unreadable: Vec<Unreadable>,
    next_offsets: HashMap<(String, i32), i64>,
    messages: usize,
}

impl<W: LedgerWriter> AccountingConsumer<W> {
    /// Create the consumer and subscribe to the topic. Must be called inside a Tokio runtime
    /// (the stream consumer's wake-ups use it).
    pub fn new(cfg: ConsumerConfig, writer: W) -> Result<Self, ConsumerError> {
        crate::security::check(&cfg.extra)?;
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &cfg.brokers)
            .set("group.id", &cfg.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest");
        for (k, v) in &cfg.extra {
            c.set(k, v);
        }
        let consumer: StreamConsumer = c.create()?;
        consumer.subscribe(&[&cfg.topic])?;
        Ok(Self {
            consumer: Arc::new(consumer),
            writer,
            cfg,
            counters: Arc::default(),
        })
    }

    pub fn stats(&self) -> ConsumerStats {
        self.stats_handle().get()
    }

    pub fn stats_handle(&self) -> ConsumerStatsHandle {
        ConsumerStatsHandle(self.counters.clone())
    }

    /// Consume, write and commit until `stop` completes (`Ok`) or the client hits a fatal error.
    /// A batch being collected when `stop` fires is abandoned uncommitted; a write in progress
    /// is allowed to finish and be committed (bound it in the writer if it can hang).
    pub async fn run(&self, stop: impl Future<Output = ()>) -> Result<(), ConsumerError> {
        let mut stop = pin!(stop);
        loop {
            let Some(batch) = self.collect(&mut stop).await? else {
                return Ok(());
            };
            let empty = batch.events.is_empty() && batch.unreadable.is_empty();
            if !empty && !self.write(&batch, &mut stop).await {
                return Ok(());
            }
            self.commit(&batch).await;
        }
    }

    /// Gather up to `batch_max` messages, waiting at most `batch_wait` after the first. `None`
    /// when stopped; an error only when the client is dead (a fatal librdkafka error).
    async fn collect(
        &self,
        stop: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Result<Option<Batch>, ConsumerError> {
        let mut batch = Batch::default();
        let mut deadline = None;
        let mut error_pause = ERROR_PAUSE_MIN;
        while batch.messages < self.cfg.batch_max.max(1) {
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            let msg = tokio::select! {
                biased;
                _ = stop.as_mut() => return Ok(None),
                _ = sleep => break,
                m = self.consumer.recv() => m,
            };
            match msg {
                Ok(m) => {
                    self.counters.consumed.fetch_add(1, Ordering::Relaxed);
                    batch.messages += 1;
                    let key = (m.topic().to_string(), m.partition());
                    let next = batch.next_offsets.entry(key).or_insert(0);
                    *next = (*next).max(m.offset() + 1);
                    match m.payload().map(serde_json::from_slice::<AuditEvent>) {
                        Some(Ok(event)) => batch.events.push(Delivered {
                            event,
                            topic: m.topic().to_string(),
                            partition: m.partition(),
                            offset: m.offset(),
                            payload: m.payload().unwrap_or_default().to_vec(),
                        }),
                        Some(Err(e)) => batch.unreadable.push(self.undecodable(&m, &e.to_string())),
                        None => batch.unreadable.push(self.undecodable(&m, "empty payload")),
                    }
                    deadline
                        .get_or_insert_with(|| tokio::time::Instant::now() + self.cfg.batch_wait);
                }
                Err(e) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) => {
                    tracing::error!(error = %e, "kafka consumer fatal error");
                    return Err(e.into());
                }
                // Transient client errors (broker transport, rebalance): librdkafka recovers by
                // itself and nothing was consumed. Pause so a persistent one does not spin.
                Err(e) => {
                    tracing::warn!(error = %e, pause_ms = error_pause.as_millis() as u64, "kafka consumer error");
                    tokio::select! {
                        biased;
                        _ = stop.as_mut() => return Ok(None),
                        _ = tokio::time::sleep(error_pause) => {}
                    }
                    error_pause = (error_pause * 2).min(ERROR_PAUSE_MAX);
                }
            }
        }
        Ok(Some(batch))
    }

    fn undecodable(&self, m: &impl Message, why: &str) -> Unreadable {
        self.counters.undecodable.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            topic = m.topic(),
            partition = m.partition(),
            offset = m.offset(),
            error = why,
            "a message that is not an audit event this consumer reads; kept as unreadable"
        );
        Unreadable {
            topic: m.topic().to_string(),
            partition: m.partition(),
            offset: m.offset(),
            payload: m.payload().unwrap_or_default().to_vec(),
            error: why.to_string(),
        }
    }

    /// Write until it succeeds; `false` when stopped first.
    async fn write(
        &self,
        batch: &Batch,
        stop: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> bool {
        let events = &batch.events;
        let mut backoff = self.cfg.retry_initial;
        loop {
            match self.writer.write_batch(events, &batch.unreadable).await {
                Ok(w) => {
                    let c = &self.counters;
                    c.inserted.fetch_add(w.inserted, Ordering::Relaxed);
                    c.duplicates.fetch_add(
                        (events.len() as u64).saturating_sub(w.inserted + w.dead_lettered),
                        Ordering::Relaxed,
                    );
                    if w.dead_lettered > 0 {
                        let total = c
                            .dead_lettered
                            .fetch_add(w.dead_lettered, Ordering::Relaxed)
                            + w.dead_lettered;
                        tracing::warn!(
                            dead_lettered = w.dead_lettered,
                            dead_lettered_total = total,
                            events = events.len(),
                            "the ledger refused events; kept as dead letters, consuming on"
                        );
                    }
                    return true;
                }
                Err(e) => {
                    let n = self.counters.write_errors.fetch_add(1, Ordering::Relaxed) + 1;
                    tracing::warn!(
                        error = %e,
                        events = events.len(),
                        retry_in_ms = backoff.as_millis() as u64,
                        write_errors = n,
                        "ledger write failed; retrying the same batch"
                    );
                    tokio::select! {
                        biased;
                        _ = stop.as_mut() => return false,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(self.cfg.retry_max);
                }
            }
        }
    }

    async fn commit(&self, batch: &Batch) {
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), next) in &batch.next_offsets {
            if let Err(e) = tpl.add_partition_offset(topic, *partition, Offset::Offset(*next)) {
                tracing::error!(error = %e, "building the offset commit failed");
                return;
            }
        }
        if tpl.count() == 0 {
            return;
        }
        let tpl = Arc::new(tpl);
        for attempt in 1..=COMMIT_ATTEMPTS {
            let consumer = self.consumer.clone();
            let list = tpl.clone();
            // A sync commit blocks until the broker answers: keep it off the async workers.
            let result =
                tokio::task::spawn_blocking(move || consumer.commit(&list, CommitMode::Sync)).await;
            match result {
                Ok(Ok(())) => {
                    self.counters.batches.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, attempt, "offset commit failed");
                }
                Err(e) => tracing::error!(error = %e, "offset commit task failed"),
            }
            tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
        }
        // Written but not committed: the batch is consumed again later and deduplicated.
        self.counters.commit_errors.fetch_add(1, Ordering::Relaxed);
        self.counters.batches.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{event, wait_until};
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use std::collections::HashSet;
    use std::sync::Mutex;
    use std::sync::atomic::AtomicBool;

    const TOPIC: &str = "audit-test";
    const GROUP: &str = "ledger";

    /// A ledger in memory: idempotent by event_id, failing while `failing` is set, refusing
    /// (as dead letters) events of the subject `refused`.
    #[derive(Default)]
    struct MemLedger {
        rows: Mutex<Vec<AuditEvent>>,
        unreadable: Mutex<Vec<Unreadable>>,
        dead: Mutex<Vec<Delivered>>,
        failing: AtomicBool,
    }

    impl LedgerWriter for MemLedger {
        type Error = String;

        async fn write_batch(
            &self,
            events: &[Delivered],
            unreadable: &[Unreadable],
        ) -> Result<Written, String> {
            if self.failing.load(Ordering::Relaxed) {
                return Err("database unavailable".into());
            }
            let mut kept = self.unreadable.lock().unwrap();
            for u in unreadable {
                if !kept.contains(u) {
                    kept.push(u.clone());
                }
            }
            let mut rows = self.rows.lock().unwrap();
            let mut dead = self.dead.lock().unwrap();
            let mut w = Written::default();
            for d in events {
                if d.event.subject.as_deref() == Some("refused") {
                    if !dead.contains(d) {
                        dead.push(d.clone());
                    }
                    w.dead_lettered += 1;
                } else if !rows.iter().any(|r| r.event_id == d.event.event_id) {
                    rows.push(d.event.clone());
                    w.inserted += 1;
                }
            }
            Ok(w)
        }
    }

    impl MemLedger {
        fn ids(&self) -> HashSet<String> {
            self.rows
                .lock()
                .unwrap()
                .iter()
                .map(|e| e.event_id.clone())
                .collect()
        }
    }

    /// Produce `n` events plus one message that is not an event; returns the event ids.
    async fn seed(brokers: &str, n: u64) -> HashSet<String> {
        seed_subjects(brokers, n, &["a", "b", "c"]).await
    }

    /// Produce `n` events of `subjects` in turn, plus one message that is not an event; returns
    /// the event ids.
    async fn seed_subjects(brokers: &str, n: u64, subjects: &[&str]) -> HashSet<String> {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()
            .unwrap();
        let mut ids = HashSet::new();
        for i in 0..n {
            let e = event(Some(subjects[i as usize % subjects.len()]), i);
            ids.insert(e.event_id.clone());
            let json = serde_json::to_vec(&e).unwrap();
            producer
                .send(
                    FutureRecord::to(TOPIC)
                        .key(e.subject.as_deref().unwrap())
                        .payload(&json),
                    Duration::from_secs(5),
                )
                .await
                .unwrap();
        }
        producer
            .send(
                FutureRecord::to(TOPIC).key("junk").payload("not json"),
                Duration::from_secs(5),
            )
            .await
            .unwrap();
        ids
    }

    /// Sum of the group's committed offsets over the topic's 3 partitions (unset counts 0).
    fn committed_total(brokers: &str) -> i64 {
        let c: rdkafka::consumer::BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", GROUP)
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..3 {
            tpl.add_partition(TOPIC, p);
        }
        let got = c.committed_offsets(tpl, Duration::from_secs(5)).unwrap();
        got.elements()
            .iter()
            .map(|e| match e.offset() {
                Offset::Offset(o) => o,
                _ => 0,
            })
            .sum()
    }

    fn cfg(brokers: &str) -> ConsumerConfig {
        let mut c = ConsumerConfig::new(brokers, GROUP, TOPIC);
        c.batch_max = 8;
        c.batch_wait = Duration::from_millis(50);
        c.retry_initial = Duration::from_millis(20);
        c.retry_max = Duration::from_millis(100);
        // The mock coordinator holds a rejoin until a departed member's session expires, even
        // after a clean LeaveGroup: keep that short.
        c.extra = vec![("session.timeout.ms".into(), "6000".into())];
        c
    }

    #[tokio::test]
    async fn offsets_are_committed_after_the_write_and_junk_is_kept_as_unreadable() {
        let mock = MockCluster::new(1).unwrap();
        mock.create_topic(TOPIC, 3, 1).unwrap();
        let brokers = mock.bootstrap_servers();
        let ids = seed(&brokers, 30).await;
        let ledger = Arc::new(MemLedger::default());
        let consumer = AccountingConsumer::new(cfg(&brokers), ledger.clone()).unwrap();
        let stats = consumer.stats_handle();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let run = consumer.run(async {
            let _ = stop_rx.await;
        });
        let check = async {
            let done = wait_until(Duration::from_secs(30), || {
                let s = stats.get();
                s.consumed == 31 && s.inserted == 30 && s.undecodable == 1
            })
            .await;
            // The last batch is committed right after its write: give it a moment.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let _ = stop_tx.send(());
            done
        };
        let (res, done) = tokio::join!(run, check);
        res.unwrap();
        assert!(done, "{:?}", stats.get());
        assert_eq!(ledger.ids(), ids);
        let s = stats.get();
        assert_eq!(
            (s.duplicates, s.write_errors, s.commit_errors),
            (0, 0, 0),
            "{s:?}"
        );
        assert!(s.batches >= 4, "{s:?}");
        assert_eq!(committed_total(&brokers), 31, "past the junk message too");
        let kept = ledger.unreadable.lock().unwrap().clone();
        assert_eq!(kept.len(), 1, "the junk is in the ledger, not dropped");
        assert_eq!(kept[0].payload, b"not json");
    }

    #[tokio::test]
    async fn a_failing_writer_gets_the_same_batch_again_and_nothing_is_committed_meanwhile() {
        let mock = MockCluster::new(1).unwrap();
        mock.create_topic(TOPIC, 3, 1).unwrap();
        let brokers = mock.bootstrap_servers();
        let ids = seed(&brokers, 20).await;
        let ledger = Arc::new(MemLedger::default());
        ledger.failing.store(true, Ordering::Relaxed);
        let consumer = AccountingConsumer::new(cfg(&brokers), ledger.clone()).unwrap();
        let stats = consumer.stats_handle();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let run = consumer.run(async {
            let _ = stop_rx.await;
        });
        let check = async {
            let failed =
                wait_until(Duration::from_secs(30), || stats.get().write_errors >= 5).await;
            let committed_while_failing = committed_total(&brokers);
            ledger.failing.store(false, Ordering::Relaxed);
            let done = wait_until(Duration::from_secs(30), || stats.get().inserted == 20).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let _ = stop_tx.send(());
            (failed, committed_while_failing, done)
        };
        let (res, (failed, committed_while_failing, done)) = tokio::join!(run, check);
        res.unwrap();
        assert!(failed && done, "{:?}", stats.get());
        assert_eq!(committed_while_failing, 0);
        assert_eq!(ledger.ids(), ids, "no event skipped");
        assert_eq!(committed_total(&brokers), 21);
    }

    #[tokio::test]
    async fn stopping_during_failures_leaves_the_events_for_the_next_consumer() {
        let mock = MockCluster::new(1).unwrap();
        mock.create_topic(TOPIC, 3, 1).unwrap();
        let brokers = mock.bootstrap_servers();
        let ids = seed(&brokers, 15).await;

        let broken = Arc::new(MemLedger::default());
        broken.failing.store(true, Ordering::Relaxed);
        {
            let consumer = AccountingConsumer::new(cfg(&brokers), broken.clone()).unwrap();
            let stats = consumer.stats_handle();
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let run = consumer.run(async {
                let _ = stop_rx.await;
            });
            let check = async {
                let failed =
                    wait_until(Duration::from_secs(30), || stats.get().write_errors >= 3).await;
                let _ = stop_tx.send(());
                failed
            };
            let (res, failed) = tokio::join!(run, check);
            res.unwrap();
            assert!(failed);
        }
        assert_eq!(committed_total(&brokers), 0);

        let ledger = Arc::new(MemLedger::default());
        let consumer = AccountingConsumer::new(cfg(&brokers), ledger.clone()).unwrap();
        let stats = consumer.stats_handle();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let run = consumer.run(async {
            let _ = stop_rx.await;
        });
        let check = async {
            let done = wait_until(Duration::from_secs(30), || stats.get().inserted == 15).await;
            let _ = stop_tx.send(());
            done
        };
        let (res, done) = tokio::join!(run, check);
        res.unwrap();
        assert!(done, "{:?}", stats.get());
        assert_eq!(ledger.ids(), ids);
    }

    #[tokio::test]
    async fn events_the_ledger_refuses_are_counted_as_dead_letters_and_committed_past() {
        let mock = MockCluster::new(1).unwrap();
        mock.create_topic(TOPIC, 3, 1).unwrap();
        let brokers = mock.bootstrap_servers();
        let ids = seed_subjects(&brokers, 24, &["a", "refused", "b", "c"]).await;
        let ledger = Arc::new(MemLedger::default());
        let consumer = AccountingConsumer::new(cfg(&brokers), ledger.clone()).unwrap();
        let stats = consumer.stats_handle();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let run = consumer.run(async {
            let _ = stop_rx.await;
        });
        let check = async {
            let done = wait_until(Duration::from_secs(30), || {
                let s = stats.get();
                s.consumed == 25 && s.inserted == 18 && s.dead_lettered == 6
            })
            .await;
            let committed =
                wait_until(Duration::from_secs(10), || committed_total(&brokers) == 25).await;
            let _ = stop_tx.send(());
            done && committed
        };
        let (res, done) = tokio::join!(run, check);
        res.unwrap();
        assert!(done, "{:?}", stats.get());
        let s = stats.get();
        assert_eq!((s.duplicates, s.write_errors), (0, 0), "{s:?}");
        let dead = ledger.dead.lock().unwrap().clone();
        assert_eq!(dead.len(), 6);
        for d in &dead {
            assert!(ids.contains(&d.event.event_id));
            let raw: AuditEvent = serde_json::from_slice(&d.payload).unwrap();
            assert_eq!(raw, d.event, "the payload is the message as delivered");
        }
    }
}
