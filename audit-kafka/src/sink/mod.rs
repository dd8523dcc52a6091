//! [`KafkaSink`]: the [`AuditSink`] that produces audit events to Kafka and never loses one to a
//! broker outage — it owns the producer, the in-memory queue in front of it, the switch between
//! producing directly and spooling to disk, and the replay of the spool once the broker is back.
//!
//! How an event travels:
//! - `emit` never touches the network: it `try_send`s the event into a bounded queue. Only if the
//!   queue is full (or the sink was shut down) does the caller's thread serialise the event and
//!   append it to the disk [`Spool`] itself — a `write(2)` into the page cache, no fsync.
//! - A driver thread (its own single-threaded Tokio runtime, so spool I/O blocks nobody else)
//!   takes events from the queue. In **direct** mode it hands them to librdkafka (idempotent,
//!   `acks=all`, lz4, key = subject or else `event_id`, value = the event's JSON).
//! - Any sign the broker is not taking events — a failed or timed-out delivery, a local enqueue
//!   failure, librdkafka reporting all brokers down, or `emit` having overflowed into the spool —
//!   switches to **spooling** mode: every event, including the ones whose delivery then fails,
//!   is appended to the spool.
//! - While spooling, a metadata probe runs every `probe_interval`; once the topic's partitions
//!   have leaders, the spool is replayed in order in batches, each acknowledged in the spool only
//!   after Kafka confirmed every message of it. New events keep going to the spool behind the
//!   replay, so order is kept; when the spool is drained, direct production resumes. If replay
//!   batches keep failing although the probe succeeds, the producer is replaced (its idempotence
//!   state may be what the broker rejects, e.g. after a broker restart that forgot the producer
//!   id); so is one that hit a fatal error.
//!
//! Delivery is at-least-once: a timed-out delivery may have reached the broker and is spooled and
//! sent again, and a replay batch that fails part-way is resent whole. The consumer deduplicates by
//! `event_id`. Order per subject holds except around such failures.
//!
//! Loss happens only when the spool refuses an event (full, or a disk error) or when an event can
//! never be accepted by Kafka (larger than the broker's message limit); both are counted in
//! `dropped` and logged.

mod driver;

use crate::spool::{Receipt, Spool, SpoolConfig, SpoolError};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use quota::audit::{AuditEvent, AuditSink, SinkCounts};
use rdkafka::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer, PurgeConfig};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

#[derive(Debug, Clone)]
pub struct KafkaSinkConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    pub topic: String,
    /// Where events wait while Kafka is unreachable; `spool.max_bytes` bounds it.
    pub spool: SpoolConfig,
    /// Events buffered in memory between `emit` and the producer.
    pub queue_capacity: usize,
    /// `enable.idempotence`. Turn off only for a broker that does not support it.
    pub idempotence: bool,
    /// `message.timeout.ms`: how long a delivery may take before it counts as failed and the
    /// event is spooled. Short, so a dead broker is noticed quickly.
    pub message_timeout: Duration,
    /// `linger.ms`.
    pub linger: Duration,
    /// While spooling, how often to check whether the broker is back.
    pub probe_interval: Duration,
    /// Further librdkafka properties (TLS, SASL, tuning), applied last so they override.
    pub extra: Vec<(String, String)>,
}

impl KafkaSinkConfig {
    pub const DEFAULT_TOPIC: &str = "tollgate-audit";

    pub fn new(brokers: impl Into<String>, spool_dir: impl Into<std::path::PathBuf>) -> Self {
        Self {
            brokers: brokers.into(),
            topic: Self::DEFAULT_TOPIC.to_string(),
            spool: SpoolConfig::new(spool_dir),
            queue_capacity: 65_536,
            idempotence: true,
            message_timeout: Duration::from_secs(5),
            linger: Duration::from_millis(5),
            probe_interval: Duration::from_secs(1),
            extra: Vec::new(),
        }
    }

    fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("enable.idempotence", self.idempotence.to_string())
            .set("acks", "all")
            .set("compression.type", "lz4")
            .set("linger.ms", self.linger.as_millis().to_string())
            .set("batch.num.messages", "10000")
            .set(
                "message.timeout.ms",
                self.message_timeout.as_millis().to_string(),
            )
            // Bounds the wait of a send attempt inside `message.timeout.ms`.
            .set(
                "request.timeout.ms",
                self.message_timeout
                    .as_millis()
                    .clamp(1, 30_000)
                    .to_string(),
            )
            // Reconnect attempts to a down broker stay cheap but prompt.
            .set("reconnect.backoff.max.ms", "2000");
        for (k, v) in &self.extra {
            c.set(k, v);
        }
        c
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("kafka producer: {0}")]
    Kafka(#[from] KafkaError),
    #[error("audit sink runtime: {0}")]
    Runtime(#[from] std::io::Error),
    #[error("the audit sink has shut down")]
    Stopped,
    #[error(transparent)]
    Security(#[from] crate::security::SecurityError),
}

/// Counters for metrics. `emitted` counts every event handed to `emit`; each ends up
/// `delivered`, `dropped`, in the spool (`spool_pending_records`) or still in memory / in flight.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SinkStats {
    pub emitted: u64,
    /// Confirmed by Kafka (direct and replayed).
    pub delivered: u64,
    /// Of `delivered`, those that came from the spool.
    pub replayed: u64,
    /// Appended to the spool, in total.
    pub spooled: u64,
    /// Lost: refused by a full or failing spool, or never acceptable to Kafka.
    pub dropped: u64,
    /// Failed or timed-out deliveries (each such event was spooled or retried, not lost).
    pub delivery_errors: u64,
    pub spool_pending_records: u64,
    pub spool_pending_bytes: u64,
    /// The sink is currently routing events through the spool.
    pub spooling: bool,
}

#[derive(Default)]
struct Counters {
    emitted: AtomicU64,
    delivered: AtomicU64,
    replayed: AtomicU64,
    spooled: AtomicU64,
    dropped: AtomicU64,
    delivery_errors: AtomicU64,
    spool_pending_records: AtomicU64,
    spool_pending_bytes: AtomicU64,
    spooling: AtomicBool,
}

/// State shared by `emit` callers, the driver and librdkafka's callbacks.
struct Shared {
    counters: Counters,
    spool: Mutex<Spool>,
    /// `emit` wrote to the spool directly: the driver must spool too until it is drained.
    overflowed: AtomicBool,
    flags: Arc<ClientFlags>,
}

/// What librdkafka's error callback tells the driver. Separate from [`Shared`] so the producer
/// (which may outlive the driver briefly, e.g. in a running probe) does not keep the spool open.
#[derive(Default)]
struct ClientFlags {
    /// librdkafka reported all brokers down.
    brokers_down: AtomicBool,
    /// librdkafka raised a fatal error: the producer must be rebuilt.
    fatal: AtomicBool,
}

impl Shared {
    fn lock_spool(&self) -> std::sync::MutexGuard<'_, Spool> {
        // A panic while holding the lock cannot leave the spool inconsistent on disk (frames are
        // written whole or truncated back), so keep using it.
        self.spool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Append events to the spool, counting what was stored and what was refused. `overflow`
    /// marks an append that bypassed the driver; it is flagged under the spool lock so the
    /// driver's "spool drained" decision and the flag cannot disagree.
    fn spool_payloads<B: AsRef<[u8]>>(&self, payloads: &[B], overflow: bool) {
        if payloads.is_empty() {
            return;
        }
        let mut spool = self.lock_spool();
        let out = spool.append_batch(payloads);
        if overflow && out.accepted > 0 {
            self.overflowed.store(true, Ordering::Relaxed);
        }
        self.publish_spool_gauges(&spool);
        drop(spool);
        let c = &self.counters;
        c.spooled.fetch_add(out.accepted as u64, Ordering::Relaxed);
        let refused = (payloads.len() - out.accepted) as u64;
        if refused > 0 {
            let before = c.dropped.fetch_add(refused, Ordering::Relaxed);
            if let Some(e) = out.error
                && should_log(before, refused)
            {
                tracing::error!(error = %e, dropped_total = before + refused, "audit spool refused events: they are lost");
            }
        }
    }

    fn stats(&self) -> SinkStats {
        let c = &self.counters;
        SinkStats {
            emitted: c.emitted.load(Ordering::Relaxed),
            delivered: c.delivered.load(Ordering::Relaxed),
            replayed: c.replayed.load(Ordering::Relaxed),
            spooled: c.spooled.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            delivery_errors: c.delivery_errors.load(Ordering::Relaxed),
            spool_pending_records: c.spool_pending_records.load(Ordering::Relaxed),
            spool_pending_bytes: c.spool_pending_bytes.load(Ordering::Relaxed),
            spooling: c.spooling.load(Ordering::Relaxed),
        }
    }

    fn publish_spool_gauges(&self, spool: &Spool) {
        let s = spool.stats();
        let c = &self.counters;
        c.spool_pending_records
            .store(s.pending_records, Ordering::Relaxed);
        c.spool_pending_bytes
            .store(s.pending_bytes, Ordering::Relaxed);
    }

    fn drop_events(&self, n: u64, why: &str) {
        let before = self.counters.dropped.fetch_add(n, Ordering::Relaxed);
        if should_log(before, n) {
            tracing::error!(
                reason = why,
                dropped_total = before + n,
                "audit events lost"
            );
        }
    }
}

/// Log the first occurrence and then at powers of two, so a long outage does not flood the log.
fn should_log(before: u64, added: u64) -> bool {
    let after = before + added;
    before == 0 || (after.next_power_of_two() != before.next_power_of_two())
}

/// librdkafka client callbacks: errors that change what the driver should do.
struct SinkContext {
    flags: Arc<ClientFlags>,
}

impl ClientContext for SinkContext {
    fn error(&self, error: KafkaError, reason: &str) {
        match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::AllBrokersDown) => {
                if !self.flags.brokers_down.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        reason,
                        "kafka: all brokers down; audit events go to the spool"
                    );
                }
            }
            Some(RDKafkaErrorCode::Fatal) => {
                self.flags.fatal.store(true, Ordering::Relaxed);
                tracing::error!(%error, reason, "kafka producer fatal error; it will be rebuilt");
            }
            _ => tracing::warn!(%error, reason, "kafka client error"),
        }
    }
}

type SinkProducer = FutureProducer<SinkContext>;

fn build_producer(
    cfg: &KafkaSinkConfig,
    flags: &Arc<ClientFlags>,
) -> Result<SinkProducer, KafkaError> {
    cfg.client_config().create_with_context(SinkContext {
        flags: flags.clone(),
    })
}

enum Command {
    Flush {
        timeout: Duration,
        reply: oneshot::Sender<SinkStats>,
    },
    Shutdown {
        timeout: Duration,
        reply: oneshot::Sender<SinkStats>,
    },
}

/// Sends audit events to Kafka, spooling to disk whenever Kafka cannot take them. See the module
/// documentation for the flow; dropping it flushes with no grace period (everything not yet
/// confirmed is spooled) on the driver thread — call [`KafkaSink::shutdown`] to wait for that.
pub struct KafkaSink {
    tx: mpsc::Sender<AuditEvent>,
    cmd: mpsc::UnboundedSender<Command>,
    shared: Arc<Shared>,
}

impl KafkaSink {
    /// Open the spool, create the producer and start the driver thread. Works from any thread;
    /// no Tokio runtime is required (the driver brings its own).
    pub fn new(cfg: KafkaSinkConfig) -> Result<Self, SinkError> {
        crate::security::check(&cfg.extra)?;
        let spool = Spool::open(cfg.spool.clone())?;
        let resume_spooling = !spool.is_drained();
        let shared = Arc::new(Shared {
            counters: Counters::default(),
            spool: Mutex::new(spool),
            overflowed: AtomicBool::new(false),
            flags: Arc::default(),
        });
        shared.publish_spool_gauges(&shared.lock_spool());
        let producer = build_producer(&cfg, &shared.flags)?;
        let (tx, rx) = mpsc::channel(cfg.queue_capacity.max(1));
        let (cmd, cmd_rx) = mpsc::unbounded_channel();
        driver::spawn(cfg, shared.clone(), producer, rx, cmd_rx, resume_spooling)?;
        Ok(Self { tx, cmd, shared })
    }

    pub fn stats(&self) -> SinkStats {
        self.shared.stats()
    }

    /// Deliver what is in memory, waiting at most `timeout` for Kafka; whatever is not confirmed
    /// by then is spooled, and the spool is fsynced. Events emitted before the call are afterwards
    /// delivered or durably spooled. Production continues.
    pub async fn flush(&self, timeout: Duration) -> Result<SinkStats, SinkError> {
        let (reply, rx) = oneshot::channel();
        self.cmd
            .send(Command::Flush { timeout, reply })
            .map_err(|_| SinkError::Stopped)?;
        rx.await.map_err(|_| SinkError::Stopped)
    }

    /// [`KafkaSink::flush`], then stop the driver and release the producer. Later `emit`s go
    /// straight to the spool (for the next process to deliver).
    pub async fn shutdown(&self, timeout: Duration) -> Result<SinkStats, SinkError> {
        let (reply, rx) = oneshot::channel();
        self.cmd
            .send(Command::Shutdown { timeout, reply })
            .map_err(|_| SinkError::Stopped)?;
        rx.await.map_err(|_| SinkError::Stopped)
    }
}

impl AuditSink for KafkaSink {
    fn emit(&self, event: AuditEvent) {
        self.shared.counters.emitted.fetch_add(1, Ordering::Relaxed);
        let event = match self.tx.try_send(event) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(e) | mpsc::error::TrySendError::Closed(e)) => e,
        };
        // The driver is behind (or gone): keep the event on disk rather than lose it.
        match serde_json::to_vec(&event) {
            Ok(json) => self.shared.spool_payloads(&[json], true),
            Err(e) => {
                tracing::error!(error = %e, "audit event does not serialise");
                self.shared.drop_events(1, "unserialisable");
            }
        }
    }

    fn counts(&self) -> SinkCounts {
        let s = self.stats();
        SinkCounts {
            emitted: s.emitted,
            dropped: s.dropped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{TempDir, amount, closed_port, event, read_topic, wait_until};
    use rdkafka::mocking::MockCluster;
    use std::collections::{HashMap, HashSet};

    const TOPIC: &str = KafkaSinkConfig::DEFAULT_TOPIC;

    fn config(brokers: &str, dir: &TempDir) -> KafkaSinkConfig {
        let mut cfg = KafkaSinkConfig::new(brokers, &dir.0);
        cfg.message_timeout = Duration::from_millis(1500);
        cfg.probe_interval = Duration::from_millis(200);
        cfg
    }

    #[tokio::test]
    async fn events_reach_the_topic_keyed_by_subject_in_order_per_subject() {
        let mock = MockCluster::new(1).unwrap();
        mock.create_topic(TOPIC, 3, 1).unwrap();
        let dir = TempDir::new("sink-direct");
        let sink = KafkaSink::new(config(&mock.bootstrap_servers(), &dir)).unwrap();
        let subjects = [Some("alice"), Some("bob"), None];
        let mut sent = Vec::new();
        for i in 0..90u64 {
            let e = event(subjects[(i % 3) as usize], i);
            sent.push(e.clone());
            sink.emit(e);
        }
        let stats = sink.flush(Duration::from_secs(10)).await.unwrap();
        assert_eq!(stats.delivered, 90, "{stats:?}");
        assert_eq!((stats.spooled, stats.dropped), (0, 0), "{stats:?}");
        assert_eq!(sink.counts().emitted, 90);

        let got = read_topic(
            &mock.bootstrap_servers(),
            TOPIC,
            90,
            Duration::from_secs(20),
        )
        .await;
        assert_eq!(got.len(), 90);
        let mut per_key: HashMap<String, Vec<u64>> = HashMap::new();
        for (key, e) in &got {
            let want_key = e.subject.clone().unwrap_or_else(|| e.event_id.clone());
            assert_eq!(key.as_deref(), Some(want_key.as_str()));
            per_key.entry(want_key).or_default().push(amount(e));
        }
        for subject in ["alice", "bob"] {
            let seq = &per_key[subject];
            assert_eq!(seq.len(), 30);
            assert!(seq.windows(2).all(|w| w[0] < w[1]), "{subject}: {seq:?}");
        }
        let ids: HashSet<_> = got.iter().map(|(_, e)| e.event_id.clone()).collect();
        assert_eq!(ids, sent.iter().map(|e| e.event_id.clone()).collect());
        sink.shutdown(Duration::from_secs(5)).await.unwrap();
    }

    #[tokio::test]
    async fn a_broker_outage_spools_and_the_spool_is_replayed_when_it_returns() {
        let mock = MockCluster::new(1).unwrap();
        mock.create_topic(TOPIC, 3, 1).unwrap();
        let dir = TempDir::new("sink-outage");
        let sink = KafkaSink::new(config(&mock.bootstrap_servers(), &dir)).unwrap();
        let mut ids = HashSet::new();
        let mut emit = |n: u64| {
            let e = event(Some(["a", "b", "c", "d"][(n % 4) as usize]), n);
            ids.insert(e.event_id.clone());
            sink.emit(e);
        };
        for n in 0..10 {
            emit(n);
        }
        assert!(wait_until(Duration::from_secs(10), || sink.stats().delivered == 10).await);

        mock.broker_down(-1).unwrap();
        for n in 10..60 {
            emit(n);
        }
        assert!(
            wait_until(Duration::from_secs(15), || sink.stats().spooled >= 50).await,
            "{:?}",
            sink.stats()
        );
        let s = sink.stats();
        assert!(s.spooling && s.dropped == 0 && s.delivered == 10, "{s:?}");
        assert!(s.spool_pending_records >= 50, "{s:?}");

        mock.broker_up(-1).unwrap();
        for n in 60..70 {
            emit(n); // arrive while the spool drains: spooled behind it
        }
        assert!(
            wait_until(Duration::from_secs(30), || {
                let s = sink.stats();
                !s.spooling && s.spool_pending_records == 0 && s.delivered >= 70
            })
            .await,
            "{:?}",
            sink.stats()
        );
        for n in 70..80 {
            emit(n); // direct again
        }
        let s = sink.flush(Duration::from_secs(10)).await.unwrap();
        assert_eq!(s.dropped, 0, "{s:?}");
        assert!(s.replayed >= 50, "{s:?}");
        let got = read_topic(
            &mock.bootstrap_servers(),
            TOPIC,
            80,
            Duration::from_secs(20),
        )
        .await;
        let got_ids: HashSet<_> = got.into_iter().map(|(_, e)| e.event_id).collect();
        assert!(
            ids.is_subset(&got_ids),
            "missing {:?}",
            ids.difference(&got_ids)
        );
        sink.shutdown(Duration::from_secs(5)).await.unwrap();
    }

    #[tokio::test]
    async fn an_unreachable_broker_loses_nothing_across_a_restart() {
        let dir = TempDir::new("sink-unreachable");
        let brokers = format!("127.0.0.1:{}", closed_port());
        let sink = KafkaSink::new(config(&brokers, &dir)).unwrap();
        let mut ids = Vec::new();
        for n in 0..100 {
            let e = event(Some("alice"), n);
            ids.push(e.event_id.clone());
            sink.emit(e);
        }
        assert!(
            wait_until(Duration::from_secs(15), || sink.stats().spooled == 100).await,
            "{:?}",
            sink.stats()
        );
        let s = sink.shutdown(Duration::from_secs(1)).await.unwrap();
        assert_eq!(
            (s.delivered, s.dropped, s.spool_pending_records),
            (0, 0, 100)
        );
        // Emitting after shutdown still lands in the spool.
        let late = event(Some("alice"), 100);
        ids.push(late.event_id.clone());
        sink.emit(late);
        drop(sink);

        // "Restart": the spool holds every event, in emit order.
        let mut spool = Spool::open(SpoolConfig::new(&dir.0)).unwrap();
        let batch = spool.read_batch(1000, 1 << 24).unwrap();
        let read: Vec<String> = batch
            .records
            .iter()
            .map(|r| serde_json::from_slice::<AuditEvent>(r).unwrap().event_id)
            .collect();
        assert_eq!(read, ids);
    }

    #[tokio::test]
    async fn a_restarted_sink_replays_the_previous_spool() {
        let mock = MockCluster::new(1).unwrap();
        mock.create_topic(TOPIC, 3, 1).unwrap();
        let dir = TempDir::new("sink-resume");
        let mut ids = HashSet::new();
        {
            let mut spool = Spool::open(SpoolConfig::new(&dir.0)).unwrap();
            for n in 0..20 {
                let e = event(Some("bob"), n);
                ids.insert(e.event_id.clone());
                spool.append(&serde_json::to_vec(&e).unwrap()).unwrap();
            }
        }
        let sink = KafkaSink::new(config(&mock.bootstrap_servers(), &dir)).unwrap();
        assert_eq!(sink.stats().spool_pending_records, 20);
        assert!(
            wait_until(Duration::from_secs(20), || {
                let s = sink.stats();
                s.replayed == 20 && !s.spooling && s.spool_pending_records == 0
            })
            .await,
            "{:?}",
            sink.stats()
        );
        let got = read_topic(
            &mock.bootstrap_servers(),
            TOPIC,
            20,
            Duration::from_secs(20),
        )
        .await;
        let amounts: Vec<u64> = got.iter().map(|(_, e)| amount(e)).collect();
        assert_eq!(
            amounts,
            (0..20).collect::<Vec<_>>(),
            "one key: one partition, in order"
        );
        sink.shutdown(Duration::from_secs(5)).await.unwrap();
    }

    #[tokio::test]
    async fn a_full_queue_overflows_into_the_spool_without_loss() {
        let mock = MockCluster::new(1).unwrap();
        mock.create_topic(TOPIC, 3, 1).unwrap();
        let dir = TempDir::new("sink-overflow");
        let mut cfg = config(&mock.bootstrap_servers(), &dir);
        cfg.queue_capacity = 1;
        let sink = KafkaSink::new(cfg).unwrap();
        let mut ids = HashSet::new();
        for n in 0..500 {
            let e = event(Some(["x", "y"][(n % 2) as usize]), n);
            ids.insert(e.event_id.clone());
            sink.emit(e);
        }
        assert!(sink.stats().spooled > 0, "{:?}", sink.stats());
        assert!(
            wait_until(Duration::from_secs(30), || {
                let s = sink.stats();
                s.delivered >= 500 && s.spool_pending_records == 0 && !s.spooling
            })
            .await,
            "{:?}",
            sink.stats()
        );
        assert_eq!(sink.stats().dropped, 0);
        let got = read_topic(
            &mock.bootstrap_servers(),
            TOPIC,
            500,
            Duration::from_secs(20),
        )
        .await;
        let got_ids: HashSet<_> = got.into_iter().map(|(_, e)| e.event_id).collect();
        assert_eq!(got_ids, ids);
        sink.shutdown(Duration::from_secs(5)).await.unwrap();
    }

    #[tokio::test]
    async fn a_full_spool_counts_drops() {
        let dir = TempDir::new("sink-full");
        let brokers = format!("127.0.0.1:{}", closed_port());
        let mut cfg = config(&brokers, &dir);
        cfg.spool.max_bytes = 4096;
        let sink = KafkaSink::new(cfg).unwrap();
        for n in 0..100 {
            sink.emit(event(Some("alice"), n));
        }
        let s = sink.shutdown(Duration::from_secs(3)).await.unwrap();
        assert!(s.dropped > 0 && s.spooled > 0, "{s:?}");
        assert_eq!(s.spooled + s.dropped, 100, "{s:?}");
        assert_eq!(sink.counts().dropped, s.dropped);
    }
}
