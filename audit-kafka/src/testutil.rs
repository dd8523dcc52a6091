//! Helpers shared by the unit tests: events, a reader for what landed in a topic, polling waits.

use quota::audit::{AuditEvent, EventBody};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use std::time::Duration;

pub(crate) use crate::spool::tests::TempDir;

pub(crate) fn event(subject: Option<&str>, n: u64) -> AuditEvent {
    AuditEvent::new(
        "test",
        subject,
        None,
        0,
        EventBody::QuotaConsumed {
            quota: "q".into(),
            amount: n,
        },
    )
}

pub(crate) fn amount(e: &AuditEvent) -> u64 {
    match &e.body {
        EventBody::QuotaConsumed { amount, .. } => *amount,
        other => panic!("unexpected body {other:?}"),
    }
}

/// Read messages from `topic` (from the beginning, fresh group) until `want` arrived or
/// `timeout` passed: (key, decoded event).
pub(crate) async fn read_topic(
    brokers: &str,
    topic: &str,
    want: usize,
    timeout: Duration,
) -> Vec<(Option<String>, AuditEvent)> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("reader-{}", uuid_like()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while out.len() < want {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(m)) => {
                let key = m.key().map(|k| String::from_utf8(k.to_vec()).unwrap());
                let e: AuditEvent = serde_json::from_slice(m.payload().unwrap()).unwrap();
                out.push((key, e));
            }
            Ok(Err(e)) => eprintln!("reader: {e}"),
            Err(_) => break,
        }
    }
    out
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Poll `cond` every 20 ms until it holds; false on timeout.
pub(crate) async fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A loopback port nothing listens on.
pub(crate) fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}
