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

/// Replay batch limits: big enough to keep librdkafka's batching busy, small enough that a
/// failed batch costs little to resend.
const REPLAY_BATCH_RECORDS: usize = 2_000;
const REPLAY_BATCH_BYTES: usize = 2 << 20;
/// Failed replay batches in a row (with the probe succeeding in between) before the producer is
/// replaced by a new one.
const REBUILD_AFTER_REPLAY_FAILURES: u32 = 3;
/// How many queued events the driver takes per wake-up.
const DRAIN_BATCH: usize = 1_024;
/// After a flush deadline, purged deliveries normally resolve at once; this bounds the wait.
const PURGE_GRACE: Duration = Duration::from_secs(2);

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
        let (probe_tx, probe_rx) = mpsc::unbounded_channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("tollgate-audit-kafka-io")
            .build()?;
        let mut driver = Driver {
            tick_every: cfg.spool.fsync_interval.min(cfg.probe_interval),
            cfg,
            shared: shared.clone(),
            producer,
            rx,
            cmd_rx,
            probe_tx,
            probe_rx,
            inflight: FuturesUnordered::new(),
            direct_inflight: 0,
            replay: None,
            mode: Mode::Direct,
            replay_failures: 0,
            next_probe: Instant::now(),
            probing: false,
            draining: false,
            buf: Vec::with_capacity(DRAIN_BATCH),
        };
        if resume_spooling {
            driver.enter_spooling("undelivered events in the spool from a previous run");
            driver.next_probe = Instant::now();
        }
        std::thread::Builder::new()
            .name("tollgate-audit-kafka".into())
            .spawn(move || runtime.block_on(driver.run()))?;
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Direct,
    Spooling,
}

/// What a delivery report belongs to.
enum Tag {
    Direct,
    Replay,
}

type Pending = Pin<Box<dyn Future<Output = (Tag, DeliveryOutcome)> + Send>>;
/// A delivery report, or `Canceled` if the producer vanished before reporting.
type DeliveryOutcome = <rdkafka::producer::DeliveryFuture as Future>::Output;

/// The replay batch being delivered.
struct Replay {
    receipt: Receipt,
    outstanding: usize,
    failed: bool,
}

struct Driver {
    cfg: KafkaSinkConfig,
    shared: Arc<Shared>,
    producer: SinkProducer,
    rx: mpsc::Receiver<AuditEvent>,
    cmd_rx: mpsc::UnboundedReceiver<Command>,
    probe_tx: mpsc::UnboundedSender<bool>,
    probe_rx: mpsc::UnboundedReceiver<bool>,
    inflight: FuturesUnordered<Pending>,
    direct_inflight: usize,
    replay: Option<Replay>,
    mode: Mode,
    /// Replay batches failed in a row since the last success (or producer rebuild).
    replay_failures: u32,
    next_probe: Instant,
    probing: bool,
    /// Flushing or shutting down: no new replay batches or probes.
    draining: bool,
    tick_every: Duration,
    buf: Vec<AuditEvent>,
}

enum Wake {
    Command(Command),
    Tick,
    Probe(bool),
    Delivery(Tag, DeliveryOutcome),
    Events,
    Closed,
}

impl Driver {
    async fn run(mut self) {
        let reply = self.event_loop().await;
        // Release the producer and the spool before answering, so a caller that drops the sink
        // after `shutdown` can reopen the spool directory at once.
        drop(self);
        if let Some((reply, stats)) = reply {
            let _ = reply.send(stats);
        }
    }

    /// Runs until shutdown (returning the reply to send) or until the sink is dropped.
    async fn event_loop(&mut self) -> Option<(oneshot::Sender<SinkStats>, SinkStats)> {
        let mut tick = tokio::time::interval(self.tick_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.check_flags();
            self.advance_spool();
            // Tick before deliveries and events so a busy queue cannot starve fsync and probing.
            let wake = tokio::select! {
                biased;
                Some(c) = self.cmd_rx.recv() => Wake::Command(c),
                _ = tick.tick() => Wake::Tick,
                Some(ok) = self.probe_rx.recv() => Wake::Probe(ok),
                Some((tag, out)) = self.inflight.next(), if !self.inflight.is_empty() => {
                    Wake::Delivery(tag, out)
                }
                n = self.rx.recv_many(&mut self.buf, DRAIN_BATCH) => {
                    if n == 0 { Wake::Closed } else { Wake::Events }
                }
            };
            match wake {
                Wake::Command(Command::Flush { timeout, reply }) => {
                    let stats = self.flush(timeout).await;
                    let _ = reply.send(stats);
                }
                Wake::Command(Command::Shutdown { timeout, reply }) => {
                    let stats = self.flush(timeout).await;
                    self.close();
                    return Some((reply, stats));
                }
                Wake::Tick => self.sync_spool(false),
                Wake::Probe(ok) => {
                    self.probing = false;
                    if ok {
                        self.shared
                            .flags
                            .brokers_down
                            .store(false, Ordering::Relaxed);
                        self.start_replay();
                    } else {
                        self.next_probe = Instant::now() + self.cfg.probe_interval;
                    }
                }
                Wake::Delivery(tag, out) => self.on_delivery(tag, out),
                Wake::Events => {
                    let events = std::mem::take(&mut self.buf);
                    self.handle_events(events);
                }
                Wake::Closed => {
                    // The sink was dropped: spool whatever is not confirmed, without waiting.
                    self.flush(Duration::ZERO).await;
                    self.close();
                    return None;
                }
            }
        }
    }

    fn check_flags(&mut self) {
        if self.mode == Mode::Direct {
            if self.shared.overflowed.swap(false, Ordering::Relaxed) {
                self.enter_spooling("the in-memory queue overflowed into the spool");
            } else if self.shared.flags.brokers_down.load(Ordering::Relaxed) {
                self.enter_spooling("all brokers down");
            } else if self.shared.flags.fatal.load(Ordering::Relaxed) {
                self.enter_spooling("producer fatal error");
            }
        }
        if self.needs_rebuild() && self.inflight.is_empty() {
            match build_producer(&self.cfg, &self.shared.flags) {
                Ok(p) => {
                    self.producer = p;
                    self.shared.flags.fatal.store(false, Ordering::Relaxed);
                    self.replay_failures = 0;
                    tracing::info!("kafka producer rebuilt");
                }
                Err(e) => tracing::error!(error = %e, "kafka producer rebuild failed"),
            }
        }
    }

    /// A fatal error, or replays that keep failing although the broker answers the probe: the
    /// producer's own state (e.g. an idempotent producer id the broker no longer knows, as after
    /// a broker restart that lost it) may be what is stuck, and a new producer starts clean.
    fn needs_rebuild(&self) -> bool {
        self.shared.flags.fatal.load(Ordering::Relaxed)
            || self.replay_failures >= REBUILD_AFTER_REPLAY_FAILURES
    }

    fn enter_spooling(&mut self, why: &str) {
        if self.mode == Mode::Spooling {
            return;
        }
        tracing::warn!(reason = why, "audit events now go to the disk spool");
        self.mode = Mode::Spooling;
        self.shared.counters.spooling.store(true, Ordering::Relaxed);
        self.next_probe = Instant::now() + self.cfg.probe_interval;
    }

    fn enter_direct(&mut self) {
        tracing::info!("audit spool drained; producing to kafka directly again");
        self.mode = Mode::Direct;
        self.shared
            .counters
            .spooling
            .store(false, Ordering::Relaxed);
    }

    /// While spooling: probe the broker when due, and replay when it answered.
    fn advance_spool(&mut self) {
        if self.mode != Mode::Spooling
            || self.draining
            || self.probing
            || self.replay.is_some()
            // Direct deliveries still pending may yet fail into the spool: let them settle first
            // so they are replayed in order with the rest.
            || self.direct_inflight > 0
            || self.needs_rebuild()
            || Instant::now() < self.next_probe
        {
            return;
        }
        self.probing = true;
        let producer = self.producer.clone();
        let topic = self.cfg.topic.clone();
        let timeout = self.cfg.message_timeout.min(Duration::from_secs(3));
        let tx = self.probe_tx.clone();
        tokio::task::spawn_blocking(move || {
            let ok = match producer.client().fetch_metadata(Some(&topic), timeout) {
                Ok(md) => md.topics().iter().any(|t| {
                    t.name() == topic
                        && t.error().is_none()
                        && !t.partitions().is_empty()
                        && t.partitions()
                            .iter()
                            .all(|p| p.error().is_none() && p.leader() >= 0)
                }),
                Err(e) => {
                    tracing::debug!(error = %e, "kafka probe failed");
                    false
                }
            };
            if !ok {
                tracing::debug!(topic, "kafka probe: topic not available yet");
            }
            let _ = tx.send(ok);
        });
    }

    fn handle_events(&mut self, mut events: Vec<AuditEvent>) {
        let mut payloads = Vec::with_capacity(events.len());
        let mut keys = Vec::with_capacity(events.len());
        for e in events.drain(..) {
            match serde_json::to_vec(&e) {
                Ok(json) => {
                    keys.push(e.subject.unwrap_or(e.event_id));
                    payloads.push(json);
                }
                Err(err) => {
                    tracing::error!(error = %err, "audit event does not serialise");
                    self.shared.drop_events(1, "unserialisable");
                }
            }
        }
        self.buf = events; // keep the allocation
        if self.mode == Mode::Spooling {
            self.shared.spool_payloads(&payloads, false);
            return;
        }
        for (i, (key, payload)) in keys.iter().zip(&payloads).enumerate() {
            let record = FutureRecord::to(&self.cfg.topic)
                .key(key.as_bytes())
                .payload(payload.as_slice());
            match self.producer.send_result(record) {
                Ok(fut) => {
                    self.direct_inflight += 1;
                    self.inflight
                        .push(Box::pin(async move { (Tag::Direct, fut.await) }));
                }
                Err((e, _)) if is_permanent(&e) => {
                    tracing::error!(error = %e, "kafka will never accept this audit event");
                    self.shared.drop_events(1, "rejected by kafka");
                }
                Err((e, _)) => {
                    self.count_delivery_error(&e);
                    self.enter_spooling("the producer refused an event");
                    self.shared.spool_payloads(&payloads[i..], false);
                    return;
                }
            }
        }
    }

    fn on_delivery(&mut self, tag: Tag, out: DeliveryOutcome) {
        let c = &self.shared.counters;
        match tag {
            Tag::Direct => {
                self.direct_inflight -= 1;
                match out {
                    Ok(Ok(_)) => {
                        c.delivered.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Err((e, _))) if is_permanent(&e) => {
                        tracing::error!(error = %e, "kafka will never accept this audit event");
                        self.shared.drop_events(1, "rejected by kafka");
                    }
                    Ok(Err((e, msg))) => {
                        self.count_delivery_error(&e);
                        self.enter_spooling("a delivery failed");
                        match msg.payload() {
                            Some(p) => self.shared.spool_payloads(&[p], false),
                            None => self
                                .shared
                                .drop_events(1, "delivery report without payload"),
                        }
                    }
                    Err(_) => self.shared.drop_events(1, "delivery report lost"),
                }
            }
            Tag::Replay => {
                let Some(replay) = self.replay.as_mut() else {
                    return;
                };
                replay.outstanding -= 1;
                match out {
                    Ok(Ok(_)) => {
                        c.delivered.fetch_add(1, Ordering::Relaxed);
                        c.replayed.fetch_add(1, Ordering::Relaxed);
                    }
                    // Acknowledged like a delivery, or it would block the spool forever.
                    Ok(Err((e, _))) if is_permanent(&e) => {
                        tracing::error!(error = %e, "kafka will never accept this spooled audit event");
                        self.shared.drop_events(1, "rejected by kafka");
                    }
                    Ok(Err((e, _))) => {
                        replay.failed = true;
                        self.count_delivery_error(&e);
                    }
                    Err(_) => replay.failed = true,
                }
                if self.replay.as_ref().is_some_and(|r| r.outstanding == 0) {
                    self.finish_replay();
                }
            }
        }
    }

    fn count_delivery_error(&self, e: &KafkaError) {
        let before = self
            .shared
            .counters
            .delivery_errors
            .fetch_add(1, Ordering::Relaxed);
        if should_log(before, 1) {
            tracing::warn!(error = %e, delivery_errors = before + 1, "kafka delivery failed; spooling");
        }
    }

    /// Send the next batch from the spool.
    fn start_replay(&mut self) {
        if self.replay.is_some() || self.draining {
            return;
        }
        let mut spool = self.shared.lock_spool();
        let batch = match spool.read_batch(REPLAY_BATCH_RECORDS, REPLAY_BATCH_BYTES) {
            Ok(b) => b,
            Err(e) => {
                spool.rewind();
                drop(spool);
                tracing::error!(error = %e, "audit spool read failed");
                self.next_probe = Instant::now() + self.cfg.probe_interval;
                return;
            }
        };
        if batch.records.is_empty() {
            if batch.end > spool.acked() {
                // Only corrupt data was read: given up, so acknowledged, or it is read forever.
                let acked = spool.ack(batch.receipt());
                self.shared.publish_spool_gauges(&spool);
                drop(spool);
                match acked {
                    Ok(()) => self.start_replay(),
                    Err(e) => tracing::error!(error = %e, "audit spool acknowledgement failed"),
                }
            } else if spool.is_drained() {
                // Anything `emit` overflowed is in the spool and was just replayed.
                self.shared.overflowed.store(false, Ordering::Relaxed);
                drop(spool);
                self.enter_direct();
            } else {
                // Read but unacknowledged data without a batch in flight: read it again.
                spool.rewind();
            }
            return;
        }
        drop(spool);
        let mut replay = Replay {
            receipt: batch.receipt(),
            outstanding: 0,
            failed: false,
        };
        for payload in &batch.records {
            // The key is not stored: it is derived from the event again. A record that does not
            // parse (cannot happen for records this sink wrote) is still delivered, unkeyed, so
            // the consumer sees and counts it.
            let key = serde_json::from_slice::<KeyFields>(payload)
                .ok()
                .map(|k| k.subject.unwrap_or(k.event_id));
            let mut record = FutureRecord::<str, [u8]>::to(&self.cfg.topic).payload(payload);
            if let Some(k) = &key {
                record = record.key(k.as_str());
            }
            match self.producer.send_result(record) {
                Ok(fut) => {
                    replay.outstanding += 1;
                    self.inflight
                        .push(Box::pin(async move { (Tag::Replay, fut.await) }));
                }
                // As in direct mode (an event over the broker's size limit, say): dropped and
                // counted, or the spool would never get past it.
                Err((e, _)) if is_permanent(&e) => {
                    tracing::error!(error = %e, "kafka will never accept this spooled audit event");
                    self.shared.drop_events(1, "rejected by kafka");
                }
                Err((e, _)) => {
                    self.count_delivery_error(&e);
                    replay.failed = true;
                    break;
                }
            }
        }
        self.replay = Some(replay);
        if self.replay.as_ref().is_some_and(|r| r.outstanding == 0) {
            self.finish_replay();
        }
    }

    fn finish_replay(&mut self) {
        let Some(replay) = self.replay.take() else {
            return;
        };
        let mut spool = self.shared.lock_spool();
        if replay.failed {
            spool.rewind();
            drop(spool);
            if !self.draining {
                // Failures caused by a flush's purge say nothing about the producer.
                self.replay_failures += 1;
            }
            self.next_probe = Instant::now() + self.cfg.probe_interval;
            return;
        }
        self.replay_failures = 0;
        if let Err(e) = spool.ack(replay.receipt) {
            // Delivered but not recorded: they will be sent again (duplicates, not loss).
            tracing::error!(error = %e, "audit spool acknowledgement failed");
            spool.rewind();
        }
        self.shared.publish_spool_gauges(&spool);
        drop(spool);
        // The broker just took a whole batch: go on without another probe.
        self.start_replay();
    }

    fn sync_spool(&self, force: bool) {
        let job = self.shared.lock_spool().take_sync(force);
        // fsync outside the lock, so `emit` overflowing into the spool is not held up by the disk.
        if let Some(job) = job
            && let Err(e) = job.run()
        {
            tracing::error!(error = %e, "audit spool fsync failed");
            self.shared.lock_spool().mark_unsynced();
        }
    }

    /// Take everything queued, wait up to `timeout` for outstanding deliveries, then purge the
    /// producer so the rest fail into the spool, and fsync the spool.
    async fn flush(&mut self, timeout: Duration) -> SinkStats {
        self.draining = true;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut events = std::mem::take(&mut self.buf);
        while let Ok(e) = self.rx.try_recv() {
            events.push(e);
        }
        self.handle_events(events);
        self.await_deliveries(deadline).await;
        if !self.inflight.is_empty() {
            self.producer
                .purge(PurgeConfig::default().queue().inflight());
            self.await_deliveries(tokio::time::Instant::now() + PURGE_GRACE)
                .await;
            if !self.inflight.is_empty() {
                // librdkafka did not report them even after the purge: direct events' payloads are
                // lost with the futures, unless they were delivered (replayed ones are still in
                // the spool).
                if self.direct_inflight > 0 {
                    self.shared.drop_events(
                        self.direct_inflight as u64,
                        "no delivery report after purge",
                    );
                }
                self.inflight = FuturesUnordered::new();
                self.direct_inflight = 0;
                if self.replay.take().is_some() {
                    self.shared.lock_spool().rewind();
                }
            }
        }
        self.sync_spool(true);
        self.draining = false;
        let s = self.shared.lock_spool();
        self.shared.publish_spool_gauges(&s);
        drop(s);
        self.shared.stats()
    }

    async fn await_deliveries(&mut self, deadline: tokio::time::Instant) {
        while !self.inflight.is_empty() {
            match tokio::time::timeout_at(deadline, self.inflight.next()).await {
                Ok(Some((tag, out))) => self.on_delivery(tag, out),
                Ok(None) | Err(_) => return,
            }
        }
    }

    fn close(&mut self) {
        // Anything emitted from now on goes straight to the spool from `emit`.
        self.rx.close();
        while let Ok(e) = self.rx.try_recv() {
            self.buf.push(e);
        }
        let rest = std::mem::take(&mut self.buf);
        self.mode = Mode::Spooling;
        self.handle_events(rest);
        self.sync_spool(true);
        tracing::info!("audit kafka sink stopped");
    }
}

/// The fields of a spooled event needed to rebuild its message key.
#[derive(serde::Deserialize)]
struct KeyFields {
    event_id: String,
    subject: Option<String>,
}

/// Errors no retry can fix: the event is dropped rather than blocking the spool forever.
fn is_permanent(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::InvalidRecord
        )
    )
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
