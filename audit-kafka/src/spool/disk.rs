//! The spool's files on disk: segment naming and creation, the record framing
//! (`len | crc32 | payload`) and its scan, and the cursor file. [`super::Spool`] decides when
//! each is used.

use super::{MAX_RECORD, Position, SpoolError};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Seek};
use std::path::{Path, PathBuf};

/// Frame header: payload length and payload CRC32, both little-endian u32.
pub(super) const HEADER: u64 = 8;
pub(super) const SEGMENT_EXT: &str = "seg";
pub(super) const CURSOR_FILE: &str = "cursor";
pub(super) const CURSOR_TMP: &str = "cursor.tmp";

/// Move a position sitting at the end of a sealed segment to the start of the next one, so that
/// the sealed segment can be deleted once acknowledged.
pub(super) fn normalize(segments: &BTreeMap<u64, u64>, pos: &mut Position) {
    while let Some(&len) = segments.get(&pos.segment) {
        if pos.offset < len {
            return;
        }
        let Some((&next, _)) = segments.range(pos.segment + 1..).next() else {
            return;
        };
        *pos = Position {
            segment: next,
            offset: 0,
        };
    }
}

pub(super) fn parse_segment_name(name: &std::ffi::OsStr) -> Option<u64> {
    let name = name.to_str()?;
    let stem = name.strip_suffix(SEGMENT_EXT)?.strip_suffix('.')?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

pub(super) fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}.{SEGMENT_EXT}"))
}

pub(super) fn create_segment(dir: &Path, seq: u64) -> Result<(), SpoolError> {
    let path = segment_path(dir, seq);
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(SpoolError::io(&path))?;
    // Make the new directory entry durable, or a power cut could lose the whole segment.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(SpoolError::io(dir))
}

pub(super) fn open_append(dir: &Path, seq: u64) -> Result<File, SpoolError> {
    let path = segment_path(dir, seq);
    OpenOptions::new()
        .append(true)
        .open(&path)
        .map_err(SpoolError::io(&path))
}

pub(super) fn remove_segment(dir: &Path, seq: u64) {
    let path = segment_path(dir, seq);
    if let Err(e) = std::fs::remove_file(&path)
        && e.kind() != io::ErrorKind::NotFound
    {
        // Harmless for correctness (it is before the cursor and gets removed on next open), but
        // the space stays used.
        tracing::warn!(segment = %path.display(), error = %e, "audit spool: could not delete a delivered segment");
    }
}

pub(super) struct Scan {
    /// End of the last valid frame.
    pub(super) end: u64,
    /// Valid frames seen.
    pub(super) records: u64,
}

/// Walk the frames of `file` from `from` to `len`; with `verify` the payloads are read and
/// checked against their CRC, otherwise only the headers are (cheap enough for 1 GiB at start-up).
pub(super) fn scan(file: &File, from: u64, len: u64, verify: bool) -> io::Result<Scan> {
    let mut r = BufReader::with_capacity(256 * 1024, file);
    r.seek(io::SeekFrom::Start(from))?;
    let mut at = from;
    let mut records = 0;
    let mut payload = Vec::new();
    while at + HEADER <= len {
        let mut h = [0u8; HEADER as usize];
        r.read_exact(&mut h)?;
        let n = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as u64;
        let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        if n == 0 || n > MAX_RECORD as u64 || at + HEADER + n > len {
            break;
        }
        if verify {
            payload.resize(n as usize, 0);
            r.read_exact(&mut payload)?;
            if crc32fast::hash(&payload) != crc {
                break;
            }
        } else {
            r.seek_relative(n as i64)?;
        }
        records += 1;
        at += HEADER + n;
    }
    Ok(Scan { end: at, records })
}

pub(super) fn count_records(dir: &Path, seq: u64, from: u64, len: u64) -> Result<u64, SpoolError> {
    let path = segment_path(dir, seq);
    let f = File::open(&path).map_err(SpoolError::io(&path))?;
    Ok(scan(&f, from, len, false)
        .map_err(SpoolError::io(&path))?
        .records)
}

/// The cursor file: segment u64 LE | offset u64 LE | crc32 of the 16 bytes before it.
pub(super) fn read_cursor(path: &Path) -> Option<Position> {
    let bytes = std::fs::read(path).ok()?;
    if bytes.len() != 20 {
        tracing::warn!(path = %path.display(), "audit spool: ignoring a malformed cursor");
        return None;
    }
    let crc = u32::from_le_bytes(bytes[16..20].try_into().ok()?);
    if crc32fast::hash(&bytes[..16]) != crc {
        tracing::warn!(path = %path.display(), "audit spool: ignoring a cursor with a bad CRC");
        return None;
    }
    Some(Position {
        segment: u64::from_le_bytes(bytes[0..8].try_into().ok()?),
        offset: u64::from_le_bytes(bytes[8..16].try_into().ok()?),
    })
}

pub(super) fn write_cursor(dir: &Path, pos: Position) -> Result<(), SpoolError> {
    let mut bytes = Vec::with_capacity(20);
    bytes.extend_from_slice(&pos.segment.to_le_bytes());
    bytes.extend_from_slice(&pos.offset.to_le_bytes());
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    let tmp = dir.join(CURSOR_TMP);
    std::fs::write(&tmp, &bytes).map_err(SpoolError::io(&tmp))?;
    // rename is atomic: a crash leaves the old or the new cursor, never a mix.
    std::fs::rename(&tmp, dir.join(CURSOR_FILE)).map_err(SpoolError::io(dir))
}
