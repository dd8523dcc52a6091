//! What the console's charts and tables read from the ledger (`quota_audit`): requests, refusals
//! by reason, tokens and spend per time bucket, over the last hour (per minute), day (per hour) or
//! 30 days (per day), for everyone or one subject; the top subjects of today; a subject's recent
//! refusals and its use of each quota in the current day and month.
//!
//! Every query is bounded by a time range read through an index that holds all the columns it
//! needs (see `Ledger::new`), and returns at most one row per bucket, type, quota and reason (or
//! a fixed number of rows), whatever the ledger's size. The 30-day charts read their 29 closed
//! days at most every few minutes (kept in memory) and only today's rows on every view.
//! `occurred_at` is RFC 3339 in UTC with a fixed width, so a prefix of it is a time bucket and
//! comparing strings compares times.

use chrono::{DateTime, Duration, Utc};
use sqlx::{AnyPool, Row};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::Instant;

/// A chart's time range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    /// 60 one-minute buckets.
    Hour,
    /// 24 one-hour buckets.
    Day,
    /// 30 one-day buckets.
    Month,
}

impl Range {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "hour" => Some(Self::Hour),
            "day" => Some(Self::Day),
            "30d" | "month" => Some(Self::Month),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Hour => "hour",
            Self::Day => "day",
            Self::Month => "30d",
        }
    }

    /// Characters of `occurred_at` that name a bucket, the bucket's length and how many.
    fn shape(self) -> (usize, Duration, i64) {
        match self {
            Self::Hour => (16, Duration::minutes(1), 60),
            Self::Day => (13, Duration::hours(1), 24),
            Self::Month => (10, Duration::days(1), 30),
        }
    }

    /// The buckets ending with the one holding `now`, oldest first (their `occurred_at` prefixes).
    pub fn buckets(self, now: DateTime<Utc>) -> Vec<String> {
        let (len, step, n) = self.shape();
        (0..n)
            .rev()
            .map(|i| {
                let t = now - step * i32::try_from(i).unwrap_or(0);
                t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)[..len].to_string()
            })
            .collect()
    }
}

/// One line of a chart: a value per bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub values: Vec<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    pub id: String,
    pub title: String,
    pub unit: String,
    /// The buckets, oldest first.
    pub labels: Vec<String>,
    pub series: Vec<Series>,
}

impl Chart {
    fn new(id: &str, title: &str, unit: &str, labels: &[String]) -> Self {
        Self {
            id: id.into(),
            title: title.into(),
            unit: unit.into(),
            labels: labels.to_vec(),
            series: Vec::new(),
        }
    }

    /// Add `v` to series `name` at bucket `i` (the series is created at its first value).
    fn add(&mut self, name: &str, i: usize, v: f64) {
        let n = self.labels.len();
        let s = match self.series.iter_mut().position(|s| s.name == name) {
            Some(p) => &mut self.series[p],
            None => {
                self.series.push(Series {
                    name: name.into(),
                    values: vec![0.0; n],
                });
                self.series.last_mut().expect("just pushed")
            }
        };
        if let Some(slot) = s.values.get_mut(i) {
            *slot += v;
        }
    }

    /// Make sure series `name` exists (all zero), so an empty chart still says what it shows.
    fn ensure(&mut self, name: &str) {
        self.add(name, 0, 0.0);
    }
}

/// Which quota types count tokens and which count money, from the active policy's LLM routes.
#[derive(Debug, Clone, Default)]
pub struct Kinds {
    pub tokens: HashSet<String>,
    pub spend: HashSet<String>,
}

impl Kinds {
    pub fn of(policy: &quota::policy::Policy) -> Self {
        let mut k = Self::default();
        for r in &policy.routes {
            if let Some(llm) = &r.llm {
                k.tokens.insert(llm.tokens_quota.to_string());
                if let Some(s) = &llm.spend_quota {
                    k.spend.insert(s.to_string());
                }
            }
        }
        k
    }
}

/// A ledger group: bucket, event type, quota, reason, rows, summed delta.
#[derive(Clone)]
struct Group {
    bucket: String,
    kind: String,
    quota: String,
    reason: String,
    rows: i64,
    sum: i128,
}

/// The delta sum as two halves that cannot overflow (see `Ledger::totals`).
const SUM_COLUMNS: &str =
    "CAST(SUM(delta >> 32) AS BIGINT) AS hi, CAST(SUM(delta & 4294967295) AS BIGINT) AS lo";

fn sum(r: &sqlx::any::AnyRow) -> Result<i128, sqlx::Error> {
    let hi: i64 = r.try_get::<Option<i64>, _>("hi")?.unwrap_or(0);
    let lo: i64 = r.try_get::<Option<i64>, _>("lo")?.unwrap_or(0);
    Ok((i128::from(hi) << 32) + i128::from(lo))
}

/// Results of the closed days of 30-day charts (they change only when late events are ingested),
/// by subject, first day and today, with when they were read. Bounded: cleared when full.
type ClosedDays = HashMap<(Option<String>, String, String), (Instant, Vec<Group>)>;
static CLOSED_DAYS: Mutex<Option<ClosedDays>> = Mutex::new(None);
/// How long closed days are served from memory: late events show within this time.
const CLOSED_DAYS_TTL: std::time::Duration = std::time::Duration::from_secs(300);
const CLOSED_DAYS_MAX: usize = 1024;

/// Drop the closed days kept in memory (the next 30-day charts read the ledger again).
pub fn forget_closed_days() {
    let mut guard = CLOSED_DAYS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    *guard = None;
}

async fn groups(
    pool: &AnyPool,
    range: Range,
    now: DateTime<Utc>,
    subject: Option<&str>,
) -> Result<(Vec<String>, Vec<Group>), sqlx::Error> {
    let labels = range.buckets(now);
    let (len, _, _) = range.shape();
    let since = labels.first().cloned().unwrap_or_default();
    let current = labels.last().cloned().unwrap_or_default();
    if range != Range::Month {
        return Ok((labels, query(pool, len, &since, None, subject).await?));
    }
    // 30 days: the 29 closed days from memory when read lately, today always from the ledger.
    let key = (subject.map(str::to_string), since.clone(), current.clone());
    let cached = {
        let guard = CLOSED_DAYS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        guard
            .as_ref()
            .and_then(|m| m.get(&key))
            .filter(|(at, _)| at.elapsed() < CLOSED_DAYS_TTL)
            .map(|(_, g)| g.clone())
    };
    let mut all = match cached {
        Some(g) => g,
        None => {
            let g = query(pool, len, &since, Some(&current), subject).await?;
            let mut guard = CLOSED_DAYS
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let m = guard.get_or_insert_with(HashMap::new);
            if m.len() >= CLOSED_DAYS_MAX {
                m.clear();
            }
            m.insert(key, (Instant::now(), g.clone()));
            g
        }
    };
    all.extend(query(pool, len, &current, None, subject).await?);
    Ok((labels, all))
}

/// Groups of rows from `since` (and before `until`), of everyone or one subject.
async fn query(
    pool: &AnyPool,
    len: usize,
    since: &str,
    until: Option<&str>,
    subject: Option<&str>,
) -> Result<Vec<Group>, sqlx::Error> {
    let mut filter = String::from("occurred_at >= $1");
    let mut n = 1;
    if until.is_some() {
        n += 1;
        filter.push_str(&format!(" AND occurred_at < ${n}"));
    }
    if subject.is_some() {
        n += 1;
        filter = format!("subject = ${n} AND {filter}");
    }
    // Only fixed text goes into the SQL: the bucket width is one of three numbers.
    let sql = format!(
        "SELECT SUBSTR(occurred_at, 1, {len}) AS bucket, type, quota, COALESCE(reason, '') AS reason,
            COUNT(*) AS n, {SUM_COLUMNS}
         FROM quota_audit
         WHERE {filter} AND type IN ('QuotaConsumed', 'QuotaRejected', 'ReservationSettled')
         GROUP BY SUBSTR(occurred_at, 1, {len}), type, quota, COALESCE(reason, '')"
    );
    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(since.to_string());
    if let Some(u) = until {
        q = q.bind(u.to_string());
    }
    if let Some(s) = subject {
        q = q.bind(s.to_string());
    }
    q.fetch_all(pool)
        .await?
        .iter()
        .map(|r| {
            Ok(Group {
                bucket: r.try_get("bucket")?,
                kind: r.try_get("type")?,
                quota: r.try_get("quota")?,
                reason: r.try_get("reason")?,
                rows: r.try_get("n")?,
                sum: sum(r)?,
            })
        })
        .collect()
}

/// The overview's four charts.
#[derive(Debug, Clone)]
pub struct Overview {
    pub requests: Chart,
    pub refusals: Chart,
    pub tokens: Chart,
    pub spend: Chart,
}

/// Requests (admitted and refused decisions), refusals by reason, tokens and spend (dollars) per
/// bucket of `range`, for everyone or one subject.
pub async fn overview(
    pool: &AnyPool,
    kinds: &Kinds,
    range: Range,
    now: DateTime<Utc>,
    subject: Option<&str>,
) -> Result<Overview, sqlx::Error> {
    let (labels, groups) = groups(pool, range, now, subject).await?;
    let index: BTreeMap<&str, usize> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (l.as_str(), i))
        .collect();
    let mut o = Overview {
        requests: Chart::new("requests", "Requests", "requests", &labels),
        refusals: Chart::new("refusals", "Refusals by reason", "refusals", &labels),
        tokens: Chart::new("tokens", "Tokens", "tokens", &labels),
        spend: Chart::new("spend", "Spend", "USD", &labels),
    };
    o.requests.ensure("admitted");
    o.requests.ensure("refused");
    o.tokens.ensure("tokens");
    o.spend.ensure("spend");
    for g in &groups {
        let Some(&i) = index.get(g.bucket.as_str()) else {
            continue;
        };
        match g.kind.as_str() {
            "QuotaConsumed" => o.requests.add("admitted", i, g.rows as f64),
            "QuotaRejected" => {
                o.requests.add("refused", i, g.rows as f64);
                o.refusals.add(&g.reason, i, g.rows as f64);
            }
            _ => {
                if kinds.tokens.contains(&g.quota) {
                    o.tokens.add("tokens", i, g.sum as f64);
                }
                if kinds.spend.contains(&g.quota) {
                    // Spend quotas count micro-dollars.
                    o.spend.add("spend", i, g.sum as f64 / 1e6);
                }
            }
        }
    }
    if o.refusals.series.is_empty() {
        o.refusals.ensure("none");
    }
    Ok(o)
}

/// A subject's use of each quota type per bucket (consumed amounts and settled actual use).
pub async fn per_quota(
    pool: &AnyPool,
    range: Range,
    now: DateTime<Utc>,
    subject: &str,
) -> Result<Vec<Chart>, sqlx::Error> {
    let (labels, groups) = groups(pool, range, now, Some(subject)).await?;
    let index: BTreeMap<&str, usize> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (l.as_str(), i))
        .collect();
    let mut charts: BTreeMap<String, Chart> = BTreeMap::new();
    for g in groups.iter().filter(|g| g.kind != "QuotaRejected") {
        let Some(&i) = index.get(g.bucket.as_str()) else {
            continue;
        };
        charts
            .entry(g.quota.clone())
            .or_insert_with(|| {
                Chart::new(&format!("quota-{}", g.quota), &g.quota, &g.quota, &labels)
            })
            .add("used", i, g.sum as f64);
    }
    Ok(charts.into_values().collect())
}

/// A subject and a figure (spend in dollars, or refusals).
#[derive(Debug, Clone, PartialEq)]
pub struct Top {
    pub subject: String,
    pub value: f64,
}

/// Today's (UTC) top `n` subjects by spend and by refusals.
pub async fn top_today(
    pool: &AnyPool,
    kinds: &Kinds,
    now: DateTime<Utc>,
    n: usize,
) -> Result<(Vec<Top>, Vec<Top>), sqlx::Error> {
    let since = now.format("%Y-%m-%d").to_string();
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT subject, quota, {SUM_COLUMNS} FROM quota_audit
         WHERE occurred_at >= $1 AND type = 'ReservationSettled' AND subject IS NOT NULL
         GROUP BY subject, quota"
    )))
    .bind(&since)
    .fetch_all(pool)
    .await?;
    let mut spend: BTreeMap<String, f64> = BTreeMap::new();
    for r in &rows {
        let quota: String = r.try_get("quota")?;
        if kinds.spend.contains(&quota) {
            *spend.entry(r.try_get("subject")?).or_default() += sum(r)? as f64 / 1e6;
        }
    }
    let mut by_spend: Vec<Top> = spend
        .into_iter()
        .map(|(subject, value)| Top { subject, value })
        .collect();
    by_spend.sort_by(|a, b| b.value.total_cmp(&a.value).then(a.subject.cmp(&b.subject)));
    by_spend.truncate(n);
    let refused = sqlx::query(
        "SELECT subject, COUNT(*) AS n FROM quota_audit
         WHERE occurred_at >= $1 AND type = 'QuotaRejected' AND subject IS NOT NULL
         GROUP BY subject ORDER BY COUNT(*) DESC, subject LIMIT $2",
    )
    .bind(&since)
    .bind(i64::try_from(n).unwrap_or(10))
    .fetch_all(pool)
    .await?
    .iter()
    .map(|r| {
        Ok(Top {
            subject: r.try_get("subject")?,
            value: r.try_get::<i64, _>("n")? as f64,
        })
    })
    .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok((by_spend, refused))
}

/// A refusal as listed.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub at: String,
    pub quota: String,
    pub reason: String,
    pub request_id: String,
}

/// A subject's latest `n` refusals of the last 30 days, newest first.
pub async fn recent_refusals(
    pool: &AnyPool,
    subject: &str,
    now: DateTime<Utc>,
    n: u32,
) -> Result<Vec<Refusal>, sqlx::Error> {
    let since = (now - Duration::days(30)).to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    sqlx::query(
        "SELECT occurred_at, quota, COALESCE(reason, '') AS reason, COALESCE(request_id, '') AS request_id
         FROM quota_audit WHERE subject = $1 AND occurred_at >= $2 AND type = 'QuotaRejected'
         ORDER BY occurred_at DESC LIMIT $3",
    )
    .bind(subject)
    .bind(since)
    .bind(i64::from(n))
    .fetch_all(pool)
    .await?
    .iter()
    .map(|r| {
        Ok(Refusal {
            at: r.try_get("occurred_at")?,
            quota: r.try_get("quota")?,
            reason: r.try_get("reason")?,
            request_id: r.try_get("request_id")?,
        })
    })
    .collect()
}

/// A subject's use of each quota on its local days `from..=to` (`YYYY-MM-DD`), per day. Read by
/// time first (the subject's index), from a day before `from` in UTC, so any time zone's day is
/// covered.
pub async fn days(
    pool: &AnyPool,
    subject: &str,
    from: &str,
    to: &str,
) -> Result<BTreeMap<(String, String), i128>, sqlx::Error> {
    let since = chrono::NaiveDate::parse_from_str(from, "%Y-%m-%d")
        .map(|d| (d - Duration::days(1)).format("%Y-%m-%d").to_string())
        .unwrap_or_else(|_| from.to_string());
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT quota, day, {SUM_COLUMNS} FROM quota_audit
         WHERE subject = $1 AND occurred_at >= $2 AND day >= $3 AND day <= $4 AND quota <> ''
         GROUP BY quota, day"
    )))
    .bind(subject)
    .bind(since)
    .bind(from)
    .bind(to)
    .fetch_all(pool)
    .await?;
    let mut out = BTreeMap::new();
    for r in &rows {
        out.insert((r.try_get("quota")?, r.try_get("day")?), sum(r)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_end_with_the_current_one() {
        let now = DateTime::parse_from_rfc3339("2026-12-04T07:30:15Z")
            .unwrap()
            .with_timezone(&Utc);
        let h = Range::Hour.buckets(now);
        assert_eq!(h.len(), 60);
        assert_eq!(h.last().unwrap(), "2026-12-04T07:30");
        assert_eq!(h.first().unwrap(), "2026-12-04T06:31");
        let d = Range::Day.buckets(now);
        assert_eq!(
            (d.first().unwrap().as_str(), d.last().unwrap().as_str()),
            ("2026-12-03T08", "2026-12-04T07")
        );
        let m = Range::Month.buckets(now);
        assert_eq!(
            (m.first().unwrap().as_str(), m.last().unwrap().as_str()),
            ("2026-11-05", "2026-12-04")
        );
    }
}
