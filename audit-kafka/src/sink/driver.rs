//! The sink's driver: the one task that owns the producer and moves events between the queue,
//! Kafka and the spool — direct production, the switch to spooling, probing, replay in batches,
//! producer rebuilds, flush and shutdown (see the parent module for the flow).

use super::*;

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

/// Start the driver on a thread of its own, with its own single-threaded runtime.
pub(super) fn spawn(
    cfg: KafkaSinkConfig,
    shared: Arc<Shared>,
    producer: SinkProducer,
    rx: mpsc::Receiver<AuditEvent>,
    cmd_rx: mpsc::UnboundedReceiver<Command>,
    resume_spooling: bool,
) -> std::io::Result<()> {
    let (probe_tx, probe_rx) = mpsc::unbounded_channel();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("tollgate-audit-kafka-io")
        .build()?;
    let mut driver = Driver {
        tick_every: cfg.spool.fsync_interval.min(cfg.probe_interval),
        cfg,
        shared,
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
    Ok(())
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
