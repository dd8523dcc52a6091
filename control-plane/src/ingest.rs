//! Ingesting the gateways' JSONL audit logs into the ledger: on one machine without Kafka
//! (`gateway --audit-log FILE`) the accounting history the console charts comes from the files.
//! Each line is an audit event; it goes through the same `Ledger::write_batch` as the Kafka
//! consumer's, so a line read twice changes nothing (the ledger's key is the event id), lines that
//! are not events are kept in `quota_audit_unreadable` and refused events become dead letters.
//! A line is only read once it is complete (ends with a newline): a file being written is read up
//! to its last whole line, and the next call goes on from there. A line longer than a whole read
//! (64 MiB) is kept as unreadable (its first bytes) and skipped, so the lines after it still
//! reach the ledger.

use crate::ledger::Ledger;
use audit_kafka::{Delivered, Unreadable, Written};
use quota::audit::AuditEvent;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("ledger: {0}")]
    Ledger(#[from] sqlx::Error),
}

/// Lines per ledger transaction.
const BATCH: usize = 500;
/// Bytes read per call at most (a huge file is read over several calls).
const CHUNK: u64 = 64 << 20;
/// What is kept of a line too long to read.
const HEAD: usize = 4096;

/// What one read of a file found.
enum Found {
    /// Bytes from `start`; the lines are those ending in a newline.
    Bytes(Vec<u8>, u64),
    /// A line from `start` to `end` (after its newline) longer than a read: its first bytes.
    TooLong { head: Vec<u8>, start: u64, end: u64 },
}

/// Read from `offset` up to `chunk` bytes; when they hold no newline, look on for the end of
/// that overlong line (not found yet: nothing to read this time).
fn read_from(path: &Path, offset: u64, chunk: u64) -> std::io::Result<Found> {
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    // A file that shrank was replaced (rotated): start it from the top.
    let start = if len < offset { 0 } else { offset };
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    (&mut f).take(chunk).read_to_end(&mut buf)?;
    if (buf.len() as u64) < chunk || buf.contains(&b'\n') {
        return Ok(Found::Bytes(buf, start));
    }
    buf.truncate(HEAD);
    let mut at = start + chunk;
    let mut block = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut block)?;
        if n == 0 {
            return Ok(Found::Bytes(Vec::new(), start));
        }
        if let Some(p) = block[..n].iter().position(|&b| b == b'\n') {
            let end = at + p as u64 + 1;
            return Ok(Found::TooLong {
                head: buf,
                start,
                end,
            });
        }
        at += n as u64;
    }
}

/// What one call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ingested {
    /// Lines read (events and unreadable lines).
    pub lines: u64,
    pub written: Written,
    pub unreadable: u64,
    /// Where the next call starts: the byte after the last whole line read.
    pub offset: u64,
}

/// Read the whole lines of `path` from byte `offset` into the ledger.
pub async fn ingest_file(
    ledger: &Ledger,
    path: &Path,
    offset: u64,
) -> Result<Ingested, IngestError> {
    ingest_chunked(ledger, path, offset, CHUNK).await
}

async fn ingest_chunked(
    ledger: &Ledger,
    path: &Path,
    offset: u64,
    chunk: u64,
) -> Result<Ingested, IngestError> {
    let io = |source| IngestError::Io {
        path: path.display().to_string(),
        source,
    };
    let owned = path.to_path_buf();
    let found = tokio::task::spawn_blocking(move || read_from(&owned, offset, chunk))
        .await
        .map_err(|e| io(std::io::Error::other(e)))?
        .map_err(io)?;
    let topic = format!("file:{}", path.display());
    let (bytes, start) = match found {
        Found::Bytes(bytes, start) => (bytes, start),
        Found::TooLong { head, start, end } => {
            let mut out = Ingested {
                offset: end,
                lines: 1,
                ..Ingested::default()
            };
            tracing::warn!(path = %path.display(), offset = start, bytes = end - start, "audit log line too long to read; kept as unreadable and skipped");
            let mut unreadable = vec![Unreadable {
                topic,
                partition: 0,
                offset: i64::try_from(start).unwrap_or(i64::MAX),
                payload: head,
                error: format!(
                    "a line of {} bytes, longer than {chunk} bytes: only its first bytes are kept",
                    end - start
                ),
            }];
            write(ledger, &mut Vec::new(), &mut unreadable, &mut out).await?;
            return Ok(out);
        }
    };
    let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
    let mut out = Ingested {
        offset: start + whole as u64,
        ..Ingested::default()
    };
    let mut events = Vec::new();
    let mut unreadable = Vec::new();
    let mut at = start;
    for line in bytes[..whole].split_inclusive(|&b| b == b'\n') {
        let line_offset = at;
        at += line.len() as u64;
        let text = line.strip_suffix(b"\n").unwrap_or(line);
        if text.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        out.lines += 1;
        let offset = i64::try_from(line_offset).unwrap_or(i64::MAX);
        match serde_json::from_slice::<AuditEvent>(text) {
            Ok(event) => events.push(Delivered {
                event,
                topic: topic.clone(),
                partition: 0,
                offset,
                payload: text.to_vec(),
            }),
            Err(e) => unreadable.push(Unreadable {
                topic: topic.clone(),
                partition: 0,
                offset,
                payload: text.to_vec(),
                error: e.to_string(),
            }),
        }
        if events.len() + unreadable.len() >= BATCH {
            write(ledger, &mut events, &mut unreadable, &mut out).await?;
        }
    }
    write(ledger, &mut events, &mut unreadable, &mut out).await?;
    Ok(out)
}

async fn write(
    ledger: &Ledger,
    events: &mut Vec<Delivered>,
    unreadable: &mut Vec<Unreadable>,
    out: &mut Ingested,
) -> Result<(), IngestError> {
    if events.is_empty() && unreadable.is_empty() {
        return Ok(());
    }
    let w = ledger.write_batch(events, unreadable).await?;
    out.written.inserted += w.inserted;
    out.written.dead_lettered += w.dead_lettered;
    out.unreadable += unreadable.len() as u64;
    events.clear();
    unreadable.clear();
    Ok(())
}

/// Follow `paths` for as long as the process runs: new whole lines are ingested every `every`.
/// A missing file is waited for; errors are logged and retried.
pub async fn follow(ledger: Ledger, paths: Vec<std::path::PathBuf>, every: std::time::Duration) {
    let mut offsets = vec![0u64; paths.len()];
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        for (path, offset) in paths.iter().zip(offsets.iter_mut()) {
            if !path.exists() {
                continue;
            }
            match ingest_file(&ledger, path, *offset).await {
                Ok(done) => {
                    if done.lines > 0 {
                        tracing::debug!(path = %path.display(), lines = done.lines, inserted = done.written.inserted, "audit log ingested");
                    }
                    *offset = done.offset;
                }
                Err(e) => tracing::warn!(error = %e, "ingesting an audit log failed; retrying"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A line longer than a read is kept (its head) as unreadable and the lines after it are
    /// ingested; a half-written overlong line waits.
    #[tokio::test]
    async fn an_overlong_line_is_skipped_and_the_rest_ingested() {
        let store = crate::store::Store::connect("sqlite::memory:")
            .await
            .expect("store");
        let ledger = Ledger::new(store.pool().clone()).await.expect("ledger");
        let dir = std::env::temp_dir().join(format!("tollgate-ingest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("audit.jsonl");
        let long = "x".repeat(5000);
        std::fs::write(&path, &long).expect("write");
        let chunk = 1024;
        let first = ingest_chunked(&ledger, &path, 0, chunk)
            .await
            .expect("ingest");
        assert_eq!(
            (first.offset, first.lines),
            (0, 0),
            "an unfinished line waits"
        );
        std::fs::write(&path, format!("{long}\nnot json\n")).expect("write");
        let mut offset = 0;
        let mut total = Ingested::default();
        for _ in 0..10 {
            let done = ingest_chunked(&ledger, &path, offset, chunk)
                .await
                .expect("ingest");
            total.lines += done.lines;
            total.unreadable += done.unreadable;
            if done.offset == offset {
                break;
            }
            offset = done.offset;
        }
        assert_eq!(offset, 5000 + 1 + 9, "read to the end");
        assert_eq!((total.lines, total.unreadable), (2, 2));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
