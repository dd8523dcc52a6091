//! The durable disk spool: an append-only queue of opaque records (audit events as JSON) kept in a
//! directory of segment files, read back in append order and deleted only after the caller
//! acknowledges delivery. It is what makes the Kafka path lossless while the broker is away.
//!
//! Layout of the directory:
//! - `NNNNNNNNNNNNNNNNNNNN.seg` — segments, named by a 20-digit sequence number; records are
//!   appended to the highest one (the active segment) until it reaches `segment_bytes`.
//! - `cursor` — the acknowledged read position (segment, offset) with a CRC; replaced atomically
//!   (write + rename) on every acknowledgement.
//! - `LOCK` — held with an exclusive file lock while a [`Spool`] is open, so two processes never
//!   share a directory.
//!
//! Each record is framed as `len: u32 LE | crc32(payload): u32 LE | payload`. A frame that is
//! cut short or fails its CRC at the tail of the active segment (a crash mid-write) is truncated
//! away on open; one inside a sealed segment (bit rot) makes the rest of that segment unreadable:
//! it is logged, counted in [`SpoolStats::corrupt_skips`] and skipped.
//!
//! **Durability policy.** [`Spool::append`] / [`Spool::append_batch`] hand the frames to the OS
//! (`write(2)`) before returning, so a crash of the process loses nothing. `fsync` is the owner's
//! call: [`Spool::sync_if_due`] syncs the active segment when it is dirty and `fsync_interval`
//! (100 ms by default) has passed — the Kafka sink calls it on a timer, so a power loss loses at
//! most about that interval. A segment is always synced when it is sealed (roll) and the active one
//! on [`Spool::close`] / drop. The cursor file is not fsynced: losing it after a power cut only
//! causes redelivery (the consumer deduplicates by `event_id`), never loss.
//!
//! **Bound.** The segment files together never exceed `max_bytes` (1 GiB by default): a record
//! that would cross it is refused with [`SpoolError::Full`] and the caller counts it as dropped.
//! Space comes back when the reader's acknowledged position leaves a segment, which is then
//! deleted.
//!
//! **Delivery.** Reading ([`Spool::read_batch`]) advances an in-memory position only; the
//! persisted cursor moves in [`Spool::ack`]. Records read but not acknowledged before a restart
//! (or before [`Spool::rewind`]) are read again: at-least-once.

mod disk;

use disk::*;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest payload accepted; also the sanity bound when reading a length from disk, so a
/// corrupted length never makes us allocate gigabytes.
pub const MAX_RECORD: usize = 16 * 1024 * 1024;
const LOCK_FILE: &str = "LOCK";

#[derive(Debug, Clone)]
pub struct SpoolConfig {
    pub dir: PathBuf,
    /// Upper bound on the total size of the segment files.
    pub max_bytes: u64,
    /// A segment is sealed and a new one started once it reaches this size.
    pub segment_bytes: u64,
    /// How long appended data may stay un-fsynced (see [`Spool::sync_if_due`]).
    pub fsync_interval: Duration,
}

impl SpoolConfig {
    pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;
    pub const DEFAULT_SEGMENT_BYTES: u64 = 16 << 20;
    pub const DEFAULT_FSYNC_INTERVAL: Duration = Duration::from_millis(100);

    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            max_bytes: Self::DEFAULT_MAX_BYTES,
            segment_bytes: Self::DEFAULT_SEGMENT_BYTES,
            fsync_interval: Self::DEFAULT_FSYNC_INTERVAL,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("spool {path} is in use by another process")]
    Locked { path: PathBuf },
    #[error("spool full: {used} of {max} bytes used, record needs {needed}")]
    Full { used: u64, max: u64, needed: u64 },
    #[error("record of {len} bytes is empty or larger than {MAX_RECORD}")]
    BadRecordSize { len: usize },
}

impl SpoolError {
    fn io(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
        move |source| SpoolError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// A place in the spool: a segment and a byte offset into it (always a frame boundary).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Position {
    pub segment: u64,
    pub offset: u64,
}

/// What [`Spool::ack`] needs to acknowledge a [`ReadBatch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt {
    pub end: Position,
    pub records: u64,
}

/// Records read in append order, and the receipt that acknowledges them.
#[derive(Debug, Default)]
pub struct ReadBatch {
    pub records: Vec<Vec<u8>>,
    pub end: Position,
}

impl ReadBatch {
    pub fn receipt(&self) -> Receipt {
        Receipt {
            end: self.end,
            records: self.records.len() as u64,
        }
    }
}

/// Outcome of [`Spool::append_batch`]: the first `accepted` records are stored; the rest were
/// refused for the reason in `error` (the spool is full, or the disk failed).
#[derive(Debug)]
pub struct Appended {
    pub accepted: usize,
    pub error: Option<SpoolError>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpoolStats {
    /// Records appended and not yet acknowledged (exact unless corruption was skipped).
    pub pending_records: u64,
    /// Bytes from the acknowledged position to the end of the spool.
    pub pending_bytes: u64,
    /// Size of all segment files (what `max_bytes` bounds).
    pub disk_bytes: u64,
    pub segments: u64,
    /// Corrupt frames found inside sealed segments (the rest of each such segment was skipped).
    pub corrupt_skips: u64,
}

/// A handle that fsyncs the active segment without holding the spool (see [`Spool::take_sync`]).
pub struct SyncJob(Arc<File>);

impl SyncJob {
    pub fn run(self) -> io::Result<()> {
        self.0.sync_data()
    }
}

pub struct Spool {
    cfg: SpoolConfig,
    /// Segment sequence number → length in bytes. The last entry is the active segment.
    segments: BTreeMap<u64, u64>,
    active: Arc<File>,
    disk_bytes: u64,
    read: Position,
    /// Open file of the segment being read, cached across `read_batch` calls.
    read_file: Option<(u64, File)>,
    acked: Position,
    pending_records: u64,
    dirty: bool,
    last_sync: Instant,
    corrupt_skips: u64,
    /// Corrupt frames found (where) and how far reading skipped past each: a re-read after a
    /// rewind skips exactly as far again, never over records appended since.
    skips: BTreeMap<Position, u64>,
    _lock: File,
}

impl Spool {
    /// Open the spool in `cfg.dir` (creating it), truncate a torn tail, and resume reading from
    /// the persisted cursor.
    pub fn open(cfg: SpoolConfig) -> Result<Self, SpoolError> {
        let dir = cfg.dir.clone();
        std::fs::create_dir_all(&dir).map_err(SpoolError::io(&dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(SpoolError::io(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(SpoolError::Locked { path: dir });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(SpoolError::io(&lock_path)(e)),
        }
        let _ = std::fs::remove_file(dir.join(CURSOR_TMP));

        let mut segments = BTreeMap::new();
        for entry in std::fs::read_dir(&dir).map_err(SpoolError::io(&dir))? {
            let entry = entry.map_err(SpoolError::io(&dir))?;
            let Some(seq) = parse_segment_name(&entry.file_name()) else {
                continue;
            };
            let len = entry
                .metadata()
                .map_err(SpoolError::io(&entry.path()))?
                .len();
            segments.insert(seq, len);
        }
        let cursor = read_cursor(&dir.join(CURSOR_FILE));

        if segments.is_empty() {
            let seq = cursor.map_or(0, |c| c.segment);
            create_segment(&dir, seq)?;
            segments.insert(seq, 0);
        }
        let (&last, &last_len) = segments.last_key_value().expect("inserted above");
        let first = *segments.first_key_value().expect("inserted above").0;

        // The active segment may end in a torn frame (crash or power loss mid-write): cut it off.
        let last_path = segment_path(&dir, last);
        let valid = {
            let f = File::open(&last_path).map_err(SpoolError::io(&last_path))?;
            scan(&f, 0, last_len, true).map_err(SpoolError::io(&last_path))?
        };
        if valid.end < last_len {
            tracing::warn!(
                segment = %last_path.display(),
                kept = valid.end,
                dropped_bytes = last_len - valid.end,
                "audit spool: truncating a torn tail"
            );
            let f = OpenOptions::new()
                .write(true)
                .open(&last_path)
                .map_err(SpoolError::io(&last_path))?;
            f.set_len(valid.end).map_err(SpoolError::io(&last_path))?;
            f.sync_all().map_err(SpoolError::io(&last_path))?;
            segments.insert(last, valid.end);
        }

        // Where reading resumes. A missing or unusable cursor means "from the start": at worst
        // duplicates.
        let mut acked = match cursor {
            None => Position {
                segment: first,
                offset: 0,
            },
            Some(c) if c.segment < first => Position {
                segment: first,
                offset: 0,
            },
            // A segment newer than the cursor's vanished (power loss right after a roll):
            // everything that still exists was acknowledged.
            Some(c) if c.segment > last => Position {
                segment: last,
                offset: segments[&last],
            },
            Some(c) => match segments.get(&c.segment) {
                Some(&len) => Position {
                    segment: c.segment,
                    // Past the end only if the tail it acknowledged was lost in a power cut.
                    offset: c.offset.min(len),
                },
                None => Position {
                    segment: *segments.range(c.segment..).next().expect("c <= last").0,
                    offset: 0,
                },
            },
        };
        // Segments before the cursor were delivered; a crash between cursor write and delete
        // can leave them behind.
        let stale: Vec<u64> = segments.range(..acked.segment).map(|(&s, _)| s).collect();
        for seq in stale {
            remove_segment(&dir, seq);
            segments.remove(&seq);
        }

        // Count what is left to deliver: headers only for sealed segments, the active one was
        // just fully verified.
        let mut pending_records = 0;
        for (&seq, &len) in &segments {
            let from = if seq == acked.segment {
                acked.offset
            } else {
                0
            };
            pending_records += count_records(&dir, seq, from, len)?;
        }

        let active = open_append(&dir, last)?;
        let disk_bytes = segments.values().sum();
        normalize(&segments, &mut acked);
        // A cursor that had to be corrected (it pointed past data a power cut took) is written
        // back now: left as it was, the next restart would apply it to the records appended since.
        if let Some(c) = cursor {
            let mut c = c;
            normalize(&segments, &mut c);
            if c != acked {
                write_cursor(&dir, acked)?;
            }
        }
        let spool = Self {
            cfg,
            segments,
            active: Arc::new(active),
            disk_bytes,
            read: acked,
            read_file: None,
            acked,
            pending_records,
            dirty: false,
            last_sync: Instant::now(),
            corrupt_skips: 0,
            skips: BTreeMap::new(),
            _lock: lock,
        };
        if pending_records > 0 {
            tracing::info!(
                dir = %spool.cfg.dir.display(),
                pending_records,
                pending_bytes = spool.pending_bytes(),
                "audit spool: resuming with undelivered records"
            );
        }
        Ok(spool)
    }

    pub fn config(&self) -> &SpoolConfig {
        &self.cfg
    }

    /// Append one record (see [`Spool::append_batch`]).
    pub fn append(&mut self, record: &[u8]) -> Result<(), SpoolError> {
        match self.append_batch(&[record]).error {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

    /// Append records in order, written to the OS before returning. Stops at the first record
    /// that does not fit under `max_bytes` or when the disk fails; see [`Appended`].
    pub fn append_batch<B: AsRef<[u8]>>(&mut self, records: &[B]) -> Appended {
        let mut accepted = 0;
        let mut buf = Vec::new();
        let mut buffered = 0;
        while accepted + buffered < records.len() {
            let rec = records[accepted + buffered].as_ref();
            if rec.is_empty() || rec.len() > MAX_RECORD {
                // Refused individually would break the "prefix accepted" contract; the sink never
                // produces such records, so stop here.
                let error = self
                    .write_buffered(&mut buf, &mut accepted, &mut buffered)
                    .err();
                return Appended {
                    accepted,
                    error: Some(error.unwrap_or(SpoolError::BadRecordSize { len: rec.len() })),
                };
            }
            let frame = HEADER + rec.len() as u64;
            let used = self.disk_bytes + buf.len() as u64;
            if used + frame > self.cfg.max_bytes {
                let error = self
                    .write_buffered(&mut buf, &mut accepted, &mut buffered)
                    .err();
                return Appended {
                    accepted,
                    error: Some(error.unwrap_or(SpoolError::Full {
                        used,
                        max: self.cfg.max_bytes,
                        needed: frame,
                    })),
                };
            }
            let active_len = self.active_len() + buf.len() as u64;
            if active_len > 0 && active_len + frame > self.cfg.segment_bytes {
                if let Err(e) = self.write_buffered(&mut buf, &mut accepted, &mut buffered) {
                    return Appended {
                        accepted,
                        error: Some(e),
                    };
                }
                if let Err(e) = self.roll() {
                    return Appended {
                        accepted,
                        error: Some(e),
                    };
                }
            }
            buf.extend_from_slice(&(rec.len() as u32).to_le_bytes());
            buf.extend_from_slice(&crc32fast::hash(rec).to_le_bytes());
            buf.extend_from_slice(rec);
            buffered += 1;
        }
        let error = self
            .write_buffered(&mut buf, &mut accepted, &mut buffered)
            .err();
        Appended { accepted, error }
    }

    /// Write the frames in `buf` to the active segment in one call. On failure the segment is cut
    /// back to its previous length so no partial frame is left behind.
    fn write_buffered(
        &mut self,
        buf: &mut Vec<u8>,
        accepted: &mut usize,
        buffered: &mut usize,
    ) -> Result<(), SpoolError> {
        if buf.is_empty() {
            return Ok(());
        }
        let seq = self.active_seq();
        let before = self.active_len();
        let result = (&*self.active).write_all(buf);
        if let Err(e) = result {
            let _ = self.active.set_len(before);
            buf.clear();
            *buffered = 0;
            return Err(SpoolError::io(&segment_path(&self.cfg.dir, seq))(e));
        }
        let n = buf.len() as u64;
        *self.segments.get_mut(&seq).expect("active segment") += n;
        self.disk_bytes += n;
        self.pending_records += *buffered as u64;
        self.dirty = true;
        *accepted += *buffered;
        *buffered = 0;
        buf.clear();
        Ok(())
    }

    /// Seal the active segment (fsynced, so sealed segments never need a sync again) and start
    /// the next one.
    fn roll(&mut self) -> Result<(), SpoolError> {
        let seq = self.active_seq();
        self.active
            .sync_data()
            .map_err(SpoolError::io(&segment_path(&self.cfg.dir, seq)))?;
        let next = seq + 1;
        create_segment(&self.cfg.dir, next)?;
        self.active = Arc::new(open_append(&self.cfg.dir, next)?);
        self.segments.insert(next, 0);
        self.dirty = false;
        self.last_sync = Instant::now();
        Ok(())
    }

    /// Read up to `max_records` records (and about `max_bytes`; always at least one if any is
    /// pending) from the read position on, advancing it. Nothing is acknowledged.
    /// On an error the read position is where it was before the call, so nothing is skipped.
    pub fn read_batch(
        &mut self,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<ReadBatch, SpoolError> {
        let start = self.read;
        let result = self.read_batch_from(max_records, max_bytes);
        if result.is_err() {
            self.read = start;
            self.read_file = None;
        }
        result
    }

    fn read_batch_from(
        &mut self,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<ReadBatch, SpoolError> {
        let mut batch = ReadBatch {
            records: Vec::new(),
            end: self.read,
        };
        let mut bytes = 0usize;
        while batch.records.len() < max_records && (bytes < max_bytes || batch.records.is_empty()) {
            normalize(&self.segments, &mut self.read);
            let seq = self.read.segment;
            let Some(&seg_len) = self.segments.get(&seq) else {
                break;
            };
            if self.read.offset >= seg_len {
                break; // at the end of the active segment
            }
            let path = segment_path(&self.cfg.dir, seq);
            if self.read_file.as_ref().is_none_or(|(s, _)| *s != seq) {
                let f = File::open(&path).map_err(SpoolError::io(&path))?;
                self.read_file = Some((seq, f));
            }
            let (_, file) = self.read_file.as_ref().expect("opened above");
            // One read for as many frames as fit in the remaining budget.
            let want = (seg_len - self.read.offset)
                .min((max_bytes.saturating_sub(bytes)).max(HEADER as usize) as u64)
                as usize;
            let mut chunk = vec![0u8; want];
            file.read_exact_at(&mut chunk, self.read.offset)
                .map_err(SpoolError::io(&path))?;
            let mut at = 0usize;
            let mut progressed = false;
            let mut corrupt = false;
            while batch.records.len() < max_records && at + HEADER as usize <= chunk.len() {
                let len = u32::from_le_bytes(chunk[at..at + 4].try_into().expect("4 bytes"));
                let crc = u32::from_le_bytes(chunk[at + 4..at + 8].try_into().expect("4 bytes"));
                let len = len as usize;
                let frame_end = self.read.offset + (at + HEADER as usize + len) as u64;
                if len == 0 || len > MAX_RECORD || frame_end > seg_len {
                    corrupt = true;
                    break;
                }
                let payload = if at + HEADER as usize + len <= chunk.len() {
                    chunk[at + HEADER as usize..at + HEADER as usize + len].to_vec()
                } else if batch.records.is_empty() && at == 0 {
                    // A record larger than the byte budget: read it on its own.
                    let mut p = vec![0u8; len];
                    file.read_exact_at(&mut p, self.read.offset + HEADER)
                        .map_err(SpoolError::io(&path))?;
                    p
                } else {
                    break;
                };
                if crc32fast::hash(&payload) != crc {
                    corrupt = true;
                    break;
                }
                at += HEADER as usize + len;
                bytes += len;
                batch.records.push(payload);
                progressed = true;
            }
            if corrupt {
                self.skip_corrupt(seq, self.read.offset + at as u64, seg_len);
            } else if !progressed {
                break;
            } else {
                self.read.offset += at as u64;
            }
        }
        normalize(&self.segments, &mut self.read);
        batch.end = self.read;
        Ok(batch)
    }

    /// A frame inside the spool is unreadable: nothing after it in this segment can be framed
    /// again, so the rest of the segment is given up.
    /// In the active segment "the rest" is what it held when the corruption was first found:
    /// records appended after that are framed anew and stay readable.
    fn skip_corrupt(&mut self, seq: u64, at: u64, seg_len: u64) {
        let here = Position {
            segment: seq,
            offset: at,
        };
        let end = *self.skips.entry(here).or_insert_with(|| {
            self.corrupt_skips += 1;
            tracing::error!(
                segment = %segment_path(&self.cfg.dir, seq).display(),
                offset = at,
                skipped_bytes = seg_len - at,
                "audit spool: corrupt record, skipping the rest of the segment"
            );
            seg_len
        });
        self.read = Position {
            segment: seq,
            offset: end,
        };
        // The count of records in the skipped range is unknown; let the acknowledgement clamp.
    }

    /// Acknowledge everything up to `receipt.end`: persist the cursor, then delete segments the
    /// cursor has left. Acknowledging an older position than the current one is a no-op.
    pub fn ack(&mut self, receipt: Receipt) -> Result<(), SpoolError> {
        let mut end = receipt.end;
        normalize(&self.segments, &mut end);
        if end <= self.acked {
            return Ok(());
        }
        write_cursor(&self.cfg.dir, end)?;
        self.acked = end;
        self.skips = self.skips.split_off(&end);
        if self.read < end {
            self.read = end;
        }
        self.pending_records = self.pending_records.saturating_sub(receipt.records);
        let done: Vec<u64> = self
            .segments
            .range(..end.segment)
            .map(|(&s, _)| s)
            .collect();
        for seq in done {
            if let Some((s, _)) = &self.read_file
                && *s == seq
            {
                self.read_file = None;
            }
            remove_segment(&self.cfg.dir, seq);
            if let Some(len) = self.segments.remove(&seq) {
                self.disk_bytes -= len;
            }
        }
        if self.pending_bytes() == 0 {
            // Exact again, whatever corruption was skipped.
            self.pending_records = 0;
        }
        Ok(())
    }

    /// Forget unacknowledged reads: the next `read_batch` starts again at the cursor.
    pub fn rewind(&mut self) {
        self.read = self.acked;
    }

    /// Where the persisted cursor stands. A [`ReadBatch`] with no records whose `end` is past it
    /// skipped corrupt data, and is acknowledged like any other.
    pub fn acked(&self) -> Position {
        self.acked
    }

    /// An fsync from [`Spool::take_sync`] failed: the data is still to be synced.
    pub fn mark_unsynced(&mut self) {
        self.dirty = true;
    }

    /// Nothing is left to read (some of it may still await acknowledgement).
    pub fn read_caught_up(&self) -> bool {
        self.bytes_after(self.read) == 0
    }

    /// Everything appended has been acknowledged.
    pub fn is_drained(&self) -> bool {
        self.pending_bytes() == 0
    }

    pub fn pending_bytes(&self) -> u64 {
        self.bytes_after(self.acked)
    }

    fn bytes_after(&self, pos: Position) -> u64 {
        let total: u64 = self.segments.range(pos.segment..).map(|(_, l)| l).sum();
        total.saturating_sub(pos.offset)
    }

    pub fn stats(&self) -> SpoolStats {
        SpoolStats {
            pending_records: self.pending_records,
            pending_bytes: self.pending_bytes(),
            disk_bytes: self.disk_bytes,
            segments: self.segments.len() as u64,
            corrupt_skips: self.corrupt_skips,
        }
    }

    /// If the active segment has un-fsynced data and `fsync_interval` has passed (or `force`),
    /// mark it synced and return a job that performs the fsync, to be run after releasing any
    /// lock around the spool so appenders are not held up by the disk.
    pub fn take_sync(&mut self, force: bool) -> Option<SyncJob> {
        if !self.dirty || !(force || self.last_sync.elapsed() >= self.cfg.fsync_interval) {
            return None;
        }
        self.dirty = false;
        self.last_sync = Instant::now();
        Some(SyncJob(self.active.clone()))
    }

    /// fsync the active segment if it is dirty and the interval has passed. Returns whether it
    /// synced.
    pub fn sync_if_due(&mut self) -> Result<bool, SpoolError> {
        self.run_sync(false)
    }

    /// fsync the active segment now if it is dirty.
    pub fn sync(&mut self) -> Result<(), SpoolError> {
        self.run_sync(true).map(|_| ())
    }

    fn run_sync(&mut self, force: bool) -> Result<bool, SpoolError> {
        match self.take_sync(force) {
            None => Ok(false),
            Some(job) => {
                let path = segment_path(&self.cfg.dir, self.active_seq());
                if let Err(e) = job.run() {
                    self.dirty = true;
                    return Err(SpoolError::io(&path)(e));
                }
                Ok(true)
            }
        }
    }

    /// Sync and release the directory.
    pub fn close(mut self) -> Result<(), SpoolError> {
        self.sync()
    }

    fn active_seq(&self) -> u64 {
        *self.segments.last_key_value().expect("never empty").0
    }

    fn active_len(&self) -> u64 {
        *self.segments.last_key_value().expect("never empty").1
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        if self.dirty {
            let _ = self.active.sync_data();
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fresh directory under the system temp dir, removed on drop.
    pub(crate) struct TempDir(pub PathBuf);

    impl TempDir {
        pub(crate) fn new(tag: &str) -> Self {
            use std::sync::atomic::{AtomicU64, Ordering};
            static N: AtomicU64 = AtomicU64::new(0);
            let p = std::env::temp_dir().join(format!(
                "audit-kafka-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&p);
            Self(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn cfg(dir: &TempDir) -> SpoolConfig {
        SpoolConfig::new(&dir.0)
    }

    fn rec(i: usize) -> Vec<u8> {
        format!("record-{i:05}").into_bytes()
    }

    fn read_all(spool: &mut Spool) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            let b = spool.read_batch(7, 1 << 20).unwrap();
            if b.records.is_empty() {
                return out;
            }
            out.extend(b.records);
        }
    }

    fn segment_files(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == SEGMENT_EXT))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn records_read_back_in_append_order_across_segments() {
        let dir = TempDir::new("order");
        let mut c = cfg(&dir);
        c.segment_bytes = 100; // a few records per segment
        let mut spool = Spool::open(c).unwrap();
        let recs: Vec<Vec<u8>> = (0..50).map(rec).collect();
        assert_eq!(spool.append_batch(&recs[..20]).accepted, 20);
        for r in &recs[20..] {
            spool.append(r).unwrap();
        }
        assert!(segment_files(&dir.0).len() > 5);
        assert_eq!(spool.stats().pending_records, 50);
        assert_eq!(read_all(&mut spool), recs);
        assert!(spool.read_caught_up());
        assert!(!spool.is_drained(), "read but not acknowledged");
    }

    #[test]
    fn reopening_resumes_from_the_acknowledged_cursor() {
        let dir = TempDir::new("restart");
        let recs: Vec<Vec<u8>> = (0..30).map(rec).collect();
        {
            let mut c = cfg(&dir);
            c.segment_bytes = 120;
            let mut spool = Spool::open(c).unwrap();
            assert_eq!(spool.append_batch(&recs).accepted, 30);
            let first = spool.read_batch(10, 1 << 20).unwrap();
            assert_eq!(first.records, recs[..10]);
            spool.ack(first.receipt()).unwrap();
            // Read but never acknowledged: must come back after the restart.
            let second = spool.read_batch(10, 1 << 20).unwrap();
            assert_eq!(second.records, recs[10..20]);
        }
        let mut c = cfg(&dir);
        c.segment_bytes = 120;
        let mut spool = Spool::open(c).unwrap();
        assert_eq!(spool.stats().pending_records, 20);
        assert_eq!(read_all(&mut spool), recs[10..]);
        // Appends after the restart come after the old records.
        spool.append(b"after").unwrap();
        assert_eq!(read_all(&mut spool), vec![b"after".to_vec()]);
    }

    #[test]
    fn rewind_rereads_unacknowledged_records() {
        let dir = TempDir::new("rewind");
        let mut spool = Spool::open(cfg(&dir)).unwrap();
        let recs: Vec<Vec<u8>> = (0..5).map(rec).collect();
        spool.append_batch(&recs);
        let b = spool.read_batch(3, 1 << 20).unwrap();
        assert_eq!(b.records, recs[..3]);
        spool.rewind();
        assert_eq!(read_all(&mut spool), recs);
    }

    #[test]
    fn a_torn_tail_is_truncated_on_open() {
        let dir = TempDir::new("torn");
        let recs: Vec<Vec<u8>> = (0..10).map(rec).collect();
        {
            let mut spool = Spool::open(cfg(&dir)).unwrap();
            spool.append_batch(&recs);
        }
        let seg = segment_files(&dir.0).pop().unwrap();
        let good_len = std::fs::metadata(&seg).unwrap().len();
        // A frame cut short by a crash: header promises 100 bytes, 3 arrived.
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&100u32.to_le_bytes()).unwrap();
        f.write_all(&0u32.to_le_bytes()).unwrap();
        f.write_all(b"abc").unwrap();
        drop(f);
        let mut spool = Spool::open(cfg(&dir)).unwrap();
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), good_len);
        spool.append(b"next").unwrap();
        let mut want = recs.clone();
        want.push(b"next".to_vec());
        assert_eq!(read_all(&mut spool), want);
    }

    #[test]
    fn a_bad_crc_or_garbage_at_the_tail_is_truncated() {
        let dir = TempDir::new("crc");
        {
            let mut spool = Spool::open(cfg(&dir)).unwrap();
            spool.append(b"one").unwrap();
            spool.append(b"two").unwrap();
        }
        let seg = segment_files(&dir.0).pop().unwrap();
        let mut bytes = std::fs::read(&seg).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff; // flip a bit in "two"
        bytes.extend_from_slice(&[0u8; 64]); // zeroed blocks after a power cut
        std::fs::write(&seg, &bytes).unwrap();
        let mut spool = Spool::open(cfg(&dir)).unwrap();
        assert_eq!(read_all(&mut spool), vec![b"one".to_vec()]);
        assert_eq!(spool.stats().pending_records, 1);
    }

    #[test]
    fn corruption_inside_a_sealed_segment_skips_it_without_panicking() {
        let dir = TempDir::new("rot");
        let mut c = cfg(&dir);
        c.segment_bytes = 60;
        let recs: Vec<Vec<u8>> = (0..12).map(rec).collect();
        {
            let mut spool = Spool::open(c.clone()).unwrap();
            spool.append_batch(&recs);
        }
        let first = segment_files(&dir.0).remove(0);
        let mut bytes = std::fs::read(&first).unwrap();
        bytes[0..4].copy_from_slice(&u32::MAX.to_le_bytes()); // absurd length
        std::fs::write(&first, &bytes).unwrap();
        let mut spool = Spool::open(c).unwrap();
        let got = read_all(&mut spool);
        assert!(!got.is_empty() && got.len() < recs.len());
        assert_eq!(got.last(), recs.last());
        assert_eq!(spool.stats().corrupt_skips, 1);
    }

    #[test]
    fn a_failed_read_gives_back_what_it_had_read() {
        let dir = TempDir::new("readerr");
        let mut c = cfg(&dir);
        c.segment_bytes = 60; // three records per segment
        let recs: Vec<Vec<u8>> = (0..9).map(rec).collect();
        let mut spool = Spool::open(c).unwrap();
        spool.append_batch(&recs);
        assert_eq!(spool.read_batch(1, 1 << 20).unwrap().records, recs[..1]);
        // The next segment cannot be opened (out of file descriptors, a disk error...).
        let second = segment_files(&dir.0)[1].clone();
        let hidden = second.with_extension("hidden");
        std::fs::rename(&second, &hidden).unwrap();
        assert!(spool.read_batch(100, 1 << 20).is_err());
        std::fs::rename(&hidden, &second).unwrap();
        assert_eq!(read_all(&mut spool), recs[1..], "nothing was skipped");
    }

    #[test]
    fn a_corrupt_record_in_the_active_segment_never_hides_later_ones() {
        let dir = TempDir::new("activerot");
        let mut spool = Spool::open(cfg(&dir)).unwrap();
        spool.append(b"one").unwrap();
        spool.append(b"two").unwrap();
        // Bit rot in "two" while the spool is open.
        let seg = segment_files(&dir.0).pop().unwrap();
        let f = OpenOptions::new().write(true).open(&seg).unwrap();
        f.write_all_at(b"X", HEADER * 2 + 3 + 2).unwrap();
        let b = spool.read_batch(10, 1 << 20).unwrap();
        assert_eq!(b.records, vec![b"one".to_vec()]);
        // Delivery failed: read again, with a record appended meanwhile.
        spool.rewind();
        spool.append(b"three").unwrap();
        assert_eq!(
            read_all(&mut spool),
            vec![b"one".to_vec(), b"three".to_vec()]
        );
        assert_eq!(
            spool.stats().corrupt_skips,
            1,
            "one corruption, found twice"
        );
        // A batch that only skipped corrupt data is acknowledgeable: it ends past the cursor.
        spool.rewind();
        let b = spool.read_batch(1, 1 << 20).unwrap();
        spool.ack(b.receipt()).unwrap();
        let skipped = spool.read_batch(10, 1 << 20).unwrap();
        assert_eq!(skipped.records, vec![b"three".to_vec()]);
    }

    #[test]
    fn a_cursor_past_data_lost_in_a_power_cut_is_corrected_on_disk() {
        let dir = TempDir::new("cursorfix");
        let recs: Vec<Vec<u8>> = (0..6).map(rec).collect();
        {
            let mut spool = Spool::open(cfg(&dir)).unwrap();
            spool.append_batch(&recs);
            let b = spool.read_batch(6, 1 << 20).unwrap();
            spool.ack(b.receipt()).unwrap();
        }
        // The cursor reached the disk, the last records' bytes did not.
        let seg = segment_files(&dir.0).pop().unwrap();
        let len = std::fs::metadata(&seg).unwrap().len();
        let f = OpenOptions::new().write(true).open(&seg).unwrap();
        f.set_len(len / 2).unwrap();
        drop(f);
        {
            let mut spool = Spool::open(cfg(&dir)).unwrap();
            spool.append(b"after the cut").unwrap();
        }
        // A second restart before any acknowledgement still finds the new record.
        let mut spool = Spool::open(cfg(&dir)).unwrap();
        assert_eq!(read_all(&mut spool), vec![b"after the cut".to_vec()]);
        assert_eq!(spool.stats().corrupt_skips, 0);
    }

    #[test]
    fn the_size_bound_refuses_records_until_space_is_acknowledged() {
        let dir = TempDir::new("bound");
        let mut c = cfg(&dir);
        c.max_bytes = 200;
        c.segment_bytes = 100;
        let mut spool = Spool::open(c).unwrap();
        let recs: Vec<Vec<u8>> = (0..20).map(rec).collect(); // 8 + 12 bytes each
        let out = spool.append_batch(&recs);
        assert_eq!(out.accepted, 10);
        assert!(matches!(out.error, Some(SpoolError::Full { .. })));
        assert!(matches!(spool.append(b"x"), Err(SpoolError::Full { .. })));
        assert!(spool.stats().disk_bytes <= 200);
        // Acknowledging a whole sealed segment frees its space.
        let b = spool.read_batch(5, 1 << 20).unwrap();
        spool.ack(b.receipt()).unwrap();
        assert_eq!(spool.append_batch(&recs[10..]).accepted, 5);
        assert!(spool.stats().disk_bytes <= 200);
    }

    #[test]
    fn acknowledged_segments_are_deleted() {
        let dir = TempDir::new("delete");
        let mut c = cfg(&dir);
        c.segment_bytes = 100;
        let mut spool = Spool::open(c.clone()).unwrap();
        let recs: Vec<Vec<u8>> = (0..40).map(rec).collect();
        spool.append_batch(&recs);
        let before = segment_files(&dir.0).len();
        assert!(before >= 8);
        let b = spool.read_batch(12, 1 << 20).unwrap();
        spool.ack(b.receipt()).unwrap();
        let mid = segment_files(&dir.0).len();
        assert!(mid < before, "{mid} < {before}");
        let b = spool.read_batch(1000, 1 << 20).unwrap();
        assert_eq!(b.records.len(), 28);
        spool.ack(b.receipt()).unwrap();
        assert!(spool.is_drained());
        assert_eq!(spool.stats().pending_records, 0);
        assert_eq!(
            segment_files(&dir.0).len(),
            1,
            "only the active segment stays"
        );
        drop(spool);
        let mut spool = Spool::open(c).unwrap();
        assert!(spool.is_drained());
        assert!(read_all(&mut spool).is_empty());
    }

    #[test]
    fn a_second_open_of_the_same_directory_is_refused() {
        let dir = TempDir::new("lock");
        let _a = Spool::open(cfg(&dir)).unwrap();
        assert!(matches!(
            Spool::open(cfg(&dir)),
            Err(SpoolError::Locked { .. })
        ));
    }

    #[test]
    fn a_corrupt_cursor_means_redelivery_not_loss() {
        let dir = TempDir::new("cursor");
        {
            let mut spool = Spool::open(cfg(&dir)).unwrap();
            spool.append_batch(&[b"a", b"b"]);
            let b = spool.read_batch(1, 1 << 20).unwrap();
            spool.ack(b.receipt()).unwrap();
        }
        std::fs::write(dir.0.join(CURSOR_FILE), b"garbage").unwrap();
        let mut spool = Spool::open(cfg(&dir)).unwrap();
        assert_eq!(read_all(&mut spool), vec![b"a".to_vec(), b"b".to_vec()]);
    }

    #[test]
    fn sync_runs_only_when_dirty_and_due() {
        let dir = TempDir::new("sync");
        let mut c = cfg(&dir);
        c.fsync_interval = Duration::from_secs(3600);
        let mut spool = Spool::open(c).unwrap();
        assert!(!spool.sync_if_due().unwrap(), "clean");
        spool.append(b"x").unwrap();
        assert!(!spool.sync_if_due().unwrap(), "not due");
        assert!(spool.take_sync(true).is_some());
        assert!(spool.take_sync(true).is_none(), "clean again");
    }
}
