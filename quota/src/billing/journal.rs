//! The settlement journal: settlements the store could not take, in a local append-only file, so
//! that neither an outage nor a restart loses them.
//!
//! One JSON object per line. `{"op":"defer",…}` is appended and fsynced before a deferral returns;
//! it carries everything the settlement needs, the subject's limits included, so it applies to
//! the same counters after a restart or a policy change. `{"op":"done","attempt_id":…}` follows
//! once the store took it; it is not fsynced: lost in a power cut, the settlement is applied again
//! (the store answers "already settled") and its event recorded again with the same event id. When
//! nothing is left pending the file is truncated.
//!
//! Opening reads the file back: every `defer` without its `done` is pending again, in file order.
//! A line that cannot be read (torn by a crash mid-write, damaged) is skipped with a warning and
//! copied to `<journal>.rejected`, as are settlements the store refuses for good. The file is
//! locked while open: two processes never share a journal.

use super::Placement;
use super::settle::Settlement;
use crate::calendar::CalendarPeriod;
use crate::llm::Usage;
use crate::policy::{LimitSpec, QuotaLimits, RatePeriod, Subject, Tier};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("settlement journal {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "settlement journal {path} is in use by another process; give each gateway its own journal"
    )]
    Locked { path: PathBuf },
}

/// Settlements waiting for the store, oldest first, journaled on disk (or only in memory).
pub struct Deferred {
    inner: Mutex<Inner>,
    /// The queue's length, readable without the lock (checked on every settlement).
    len: AtomicUsize,
    wake: Notify,
    path: Option<PathBuf>,
}

struct Inner {
    /// The journal, open for appending and locked; `None`: in memory only.
    file: Option<File>,
    queue: VecDeque<Settlement>,
}

impl Deferred {
    /// A queue without a journal: what it holds is lost with the process.
    pub fn in_memory() -> Deferred {
        Deferred {
            inner: Mutex::new(Inner {
                file: None,
                queue: VecDeque::new(),
            }),
            len: AtomicUsize::new(0),
            wake: Notify::new(),
            path: None,
        }
    }

    /// Open (or create) the journal at `path` and take back what it holds pending.
    pub fn open(path: &Path) -> Result<Deferred, JournalError> {
        let err = |source| JournalError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let existed = path.exists();
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(err)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(JournalError::Locked {
                    path: path.to_path_buf(),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(err(e)),
        }
        if !existed {
            sync_dir(path).map_err(err)?;
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(err)?;
        let (queue, unreadable) = replay(&bytes);
        for (n, line, why) in &unreadable {
            tracing::warn!(journal = %path.display(), line = n, error = %why, "unreadable settlement journal line skipped; kept aside");
            let kept = serde_json::json!({
                "why": format!("unreadable line {n}: {why}"),
                "line": String::from_utf8_lossy(line),
            });
            keep_aside(path, &kept);
        }
        if queue.is_empty() {
            file.set_len(0).map_err(err)?;
            file.sync_all().map_err(err)?;
        } else {
            tracing::info!(journal = %path.display(), pending = queue.len(), "settlements from the journal will be applied when the store answers");
            // A torn last line: start the next record on a line of its own.
            if bytes.last().is_some_and(|b| *b != b'\n') {
                file.write_all(b"\n").map_err(err)?;
            }
        }
        Ok(Deferred {
            len: AtomicUsize::new(queue.len()),
            inner: Mutex::new(Inner {
                file: Some(file),
                queue,
            }),
            wake: Notify::new(),
            path: Some(path.to_path_buf()),
        })
    }

    /// Where the journal is, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Settlements waiting.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding it left the queue as it was: still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Journal `s` (fsynced) and queue it; `on_depth` hears the new depth (under the lock, so
    /// depths are reported in the order they happen). Blocks on the disk.
    pub(crate) fn push(&self, s: Settlement, on_depth: impl FnOnce(usize)) {
        let mut inner = self.lock();
        if let (Some(file), Some(path)) = (&mut inner.file, &self.path) {
            let line = Line::Defer(Box::new(Record::of(&s)));
            if let Err(e) = append(file, &line, true) {
                // Still retried from memory while this process lives.
                tracing::error!(journal = %path.display(), error = %e, attempt = %s.attempt_id, "settlement not journaled");
            }
        }
        inner.queue.push_back(s);
        let depth = inner.queue.len();
        on_depth(depth);
        self.len.store(depth, Ordering::Release);
        drop(inner);
        self.wake.notify_one();
    }

    /// The oldest waiting settlement.
    pub(crate) fn head(&self) -> Option<Settlement> {
        self.lock().queue.front().cloned()
    }

    /// `attempt` (the head) is applied or kept aside: forget it. `on_depth` as for `push`; the
    /// queue reads empty only once the journal and the depth say so too.
    pub(crate) fn complete(&self, attempt: &str, on_depth: impl FnOnce(usize)) {
        let mut inner = self.lock();
        if let Some(i) = inner.queue.iter().position(|s| s.attempt_id == attempt) {
            inner.queue.remove(i);
        }
        let depth = inner.queue.len();
        if let (Some(file), Some(path)) = (&mut inner.file, &self.path) {
            let written = if depth == 0 {
                file.set_len(0).and_then(|()| file.sync_all())
            } else {
                let line = Line::Done {
                    attempt_id: attempt.to_string(),
                };
                append(file, &line, false)
            };
            if let Err(e) = written {
                tracing::warn!(journal = %path.display(), error = %e, "settlement journal not updated; the settlement may be applied again");
            }
        }
        on_depth(depth);
        self.len.store(depth, Ordering::Release);
    }

    /// Until something is queued (returns at once if something was queued since the last wait).
    pub(crate) async fn wait(&self) {
        self.wake.notified().await;
    }

    /// Keep `s`, which the store refused for good, where an operator finds it.
    pub(crate) fn set_aside(&self, s: &Settlement, why: &str) {
        let kept = serde_json::json!({ "why": why, "settlement": Record::of(s) });
        match &self.path {
            Some(path) => keep_aside(path, &kept),
            None => tracing::error!(settlement = %kept, "settlement refused by the store"),
        }
    }
}

/// Append `value` as one line to `<journal>.rejected`.
fn keep_aside(journal: &Path, value: &serde_json::Value) {
    let mut name = journal.as_os_str().to_owned();
    name.push(".rejected");
    let path = PathBuf::from(name);
    let written = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| {
            let mut line = value.to_string().into_bytes();
            line.push(b'\n');
            f.write_all(&line)?;
            f.sync_data()
        });
    if let Err(e) = written {
        tracing::error!(path = %path.display(), error = %e, kept = %value, "cannot keep a settlement aside");
    }
}

fn append(file: &mut File, line: &Line, sync: bool) -> io::Result<()> {
    let mut bytes = serde_json::to_vec(line).map_err(io::Error::other)?;
    bytes.push(b'\n');
    // One write: a crash leaves a whole line or a torn last one, never a line cut in the middle
    // of the file.
    file.write_all(&bytes)?;
    if sync {
        file.sync_data()?;
    }
    Ok(())
}

/// Make a new file's directory entry durable.
fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(d) => d,
        None => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

type Unreadable<'a> = (usize, &'a [u8], String);

/// The settlements `bytes` holds pending, in order, and the lines that could not be read (line
/// number, content, why).
fn replay(bytes: &[u8]) -> (VecDeque<Settlement>, Vec<Unreadable<'_>>) {
    let mut queue: VecDeque<Settlement> = VecDeque::new();
    let mut unreadable = Vec::new();
    for (i, line) in bytes.split(|b| *b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let parsed = serde_json::from_slice::<Line>(line)
            .map_err(|e| e.to_string())
            .and_then(|l| match l {
                Line::Defer(r) => r.settlement().map(Some),
                Line::Done { attempt_id } => {
                    if let Some(i) = queue.iter().position(|s| s.attempt_id == attempt_id) {
                        queue.remove(i);
                    }
                    Ok(None)
                }
            });
        match parsed {
            Ok(Some(s)) => queue.push_back(s),
            Ok(None) => {}
            Err(why) => unreadable.push((i + 1, line, why)),
        }
    }
    (queue, unreadable)
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Line {
    Defer(Box<Record>),
    Done { attempt_id: String },
}

/// A settlement as the journal keeps it.
#[derive(Serialize, Deserialize)]
struct Record {
    attempt_id: String,
    request_id: String,
    event_id: String,
    subject: String,
    time_zone: String,
    tier: String,
    /// The subject's limits of each quota billed, as when it reserved (`null`: unlimited).
    limits: Vec<(String, Option<Vec<LimitRecord>>)>,
    reserved_at_ns: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    local_share: Option<f64>,
    reserved: Vec<(String, u64)>,
    actual: Vec<(String, u64)>,
    prompt_tokens: u64,
    completion_tokens: u64,
    // Kinds added later: absent in records written before them.
    #[serde(default)]
    cached_input_tokens: u64,
    #[serde(default)]
    cache_write_tokens: u64,
    #[serde(default)]
    cache_read_tokens: u64,
    #[serde(default)]
    reasoning_tokens: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum LimitRecord {
    Rate { limit: u64, per: Per, burst: u64 },
    Calendar { limit: u64, period: Per },
    Concurrent { limit: u64 },
}

#[derive(Serialize, Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum Per {
    Second,
    Minute,
    Hour,
    Day,
    Month,
}

fn named(v: &[(Arc<str>, u64)]) -> Vec<(String, u64)> {
    v.iter().map(|(q, n)| (q.to_string(), *n)).collect()
}

fn shared(v: Vec<(String, u64)>) -> Vec<(Arc<str>, u64)> {
    v.into_iter().map(|(q, n)| (Arc::from(q), n)).collect()
}

impl Record {
    fn of(s: &Settlement) -> Record {
        let quotas = &s.subject.tier.quotas;
        let limits = s
            .actual
            .iter()
            .filter_map(|(q, _)| {
                let specs = match quotas.get(q)? {
                    QuotaLimits::Unlimited => None,
                    QuotaLimits::Limited(specs) => {
                        Some(specs.iter().map(LimitRecord::of).collect())
                    }
                };
                Some((q.to_string(), specs))
            })
            .collect();
        Record {
            attempt_id: s.attempt_id.clone(),
            request_id: s.request_id.clone(),
            event_id: s.event_id.clone(),
            subject: s.subject.id.to_string(),
            time_zone: s.subject.time_zone.name().to_string(),
            tier: s.subject.tier.name.to_string(),
            limits,
            reserved_at_ns: s.reserved_at_ns,
            local_share: s.placement.local_share(),
            reserved: named(&s.reserved),
            actual: named(&s.actual),
            prompt_tokens: s.usage.prompt,
            completion_tokens: s.usage.completion,
            cached_input_tokens: s.usage.cached_input,
            cache_write_tokens: s.usage.cache_write,
            cache_read_tokens: s.usage.cache_read,
            reasoning_tokens: s.usage.reasoning,
        }
    }

    /// The settlement again; it may have been applied before the process stopped.
    fn settlement(self) -> Result<Settlement, String> {
        let time_zone = self
            .time_zone
            .parse()
            .map_err(|_| format!("unknown time zone `{}`", self.time_zone))?;
        let mut quotas = HashMap::new();
        for (q, limits) in self.limits {
            let limits = match limits {
                None => QuotaLimits::Unlimited,
                Some(l) => QuotaLimits::Limited(
                    l.into_iter()
                        .map(LimitRecord::spec)
                        .collect::<Result<_, _>>()?,
                ),
            };
            quotas.insert(Arc::from(q), limits);
        }
        let placement = match self.local_share {
            Some(share) if share > 0.0 && share <= 1.0 => Placement::Local { share },
            Some(share) => return Err(format!("local share {share} is not in (0, 1]")),
            None => Placement::Shared,
        };
        Ok(Settlement {
            attempt_id: self.attempt_id,
            request_id: self.request_id,
            event_id: self.event_id,
            subject: Arc::new(Subject {
                id: Arc::from(self.subject),
                tier: Arc::new(Tier::new(Arc::from(self.tier), quotas)),
                time_zone,
                enabled: true,
            }),
            reserved_at_ns: self.reserved_at_ns,
            placement,
            reserved: shared(self.reserved),
            actual: shared(self.actual),
            usage: Usage {
                prompt: self.prompt_tokens,
                completion: self.completion_tokens,
                cached_input: self.cached_input_tokens,
                cache_write: self.cache_write_tokens,
                cache_read: self.cache_read_tokens,
                reasoning: self.reasoning_tokens,
            },
            deferred: true,
        })
    }
}

impl LimitRecord {
    fn of(spec: &LimitSpec) -> LimitRecord {
        match *spec {
            LimitSpec::Rate {
                limit,
                period,
                burst,
            } => LimitRecord::Rate {
                limit,
                per: match period {
                    RatePeriod::Second => Per::Second,
                    RatePeriod::Minute => Per::Minute,
                    RatePeriod::Hour => Per::Hour,
                },
                burst,
            },
            LimitSpec::Calendar { limit, period } => LimitRecord::Calendar {
                limit,
                period: match period {
                    CalendarPeriod::Day => Per::Day,
                    CalendarPeriod::Month => Per::Month,
                },
            },
            LimitSpec::Concurrent { limit } => LimitRecord::Concurrent { limit },
        }
    }

    fn spec(self) -> Result<LimitSpec, String> {
        Ok(match self {
            LimitRecord::Rate { limit, per, burst } => LimitSpec::Rate {
                limit,
                period: match per {
                    Per::Second => RatePeriod::Second,
                    Per::Minute => RatePeriod::Minute,
                    Per::Hour => RatePeriod::Hour,
                    Per::Day | Per::Month => return Err("a rate per day or month".into()),
                },
                burst,
            },
            LimitRecord::Calendar { limit, period } => LimitSpec::Calendar {
                limit,
                period: match period {
                    Per::Day => CalendarPeriod::Day,
                    Per::Month => CalendarPeriod::Month,
                    _ => return Err("a calendar period shorter than a day".into()),
                },
            },
            LimitRecord::Concurrent { limit } => LimitSpec::Concurrent { limit },
        })
    }
}
