//! The Kafka audit path of Tollgate: [`KafkaSink`] sends audit events to a Kafka topic without ever
//! blocking the caller, falling back to a durable disk [`Spool`] while the broker is unreachable,
//! and [`AccountingConsumer`] reads them back into the ledger with at-least-once,
//! commit-after-write semantics.

pub mod consumer;
pub mod security;
pub mod sink;
pub mod spool;

pub use consumer::{
    AccountingConsumer, ConsumerConfig, ConsumerError, ConsumerStats, ConsumerStatsHandle,
    Delivered, LedgerWriter, Unreadable, Written,
};
pub use security::SecurityError;
pub use sink::{KafkaSink, KafkaSinkConfig, SinkError, SinkStats};
pub use spool::{Spool, SpoolConfig, SpoolError, SpoolStats};

#[cfg(test)]
mod testutil;
