//! Calendar windows in a subject's own time zone: which day/month a moment falls in and when that
//! window ends (the next local midnight), correct across DST changes.

use chrono::{DateTime, Datelike, Duration, LocalResult, NaiveDate, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;

/// A calendar period a quota resets on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CalendarPeriod {
    Day,
    Month,
}

/// The window containing a moment: an id that changes when the window does, and when it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Days since 0001-01-01 (daily) or months since year 0 (monthly), in local time.
    pub id: i64,
    /// First instant of the next window, in Unix nanoseconds.
    pub reset_at_ns: i64,
}

/// The window of `period` that contains `now_ns` for a subject living in `tz`.
///
/// Every request asks this for each calendar limit; the answer only changes at a local midnight,
/// so each thread keeps the windows it computed last and reuses one while `now_ns` lies inside it.
pub fn window(period: CalendarPeriod, tz: Tz, now_ns: i64) -> Window {
    let hit = RECENT.with(|c| {
        c.borrow()
            .iter()
            .find(|e| e.period == period && e.tz == tz && e.start_ns <= now_ns)
            .filter(|e| now_ns < e.window.reset_at_ns)
            .map(|e| e.window)
    });
    if let Some(w) = hit {
        return w;
    }
    let (window, start_ns) = compute(period, tz, now_ns);
    RECENT.with(|c| {
        let mut c = c.borrow_mut();
        c.retain(|e| !(e.period == period && e.tz == tz));
        if c.len() >= RECENT_WINDOWS {
            c.remove(0);
        }
        c.push(Recent {
            period,
            tz,
            start_ns,
            window,
        });
    });
    window
}

/// Windows remembered per thread: enough for the time zones a fleet's subjects live in.
const RECENT_WINDOWS: usize = 64;

struct Recent {
    period: CalendarPeriod,
    tz: Tz,
    /// From this instant on (until `window.reset_at_ns`) every moment falls in `window`.
    start_ns: i64,
    window: Window,
}

thread_local! {
    static RECENT: std::cell::RefCell<Vec<Recent>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The window containing `now_ns`, and an instant from which on every moment until its end lies
/// in it.
fn compute(period: CalendarPeriod, tz: Tz, now_ns: i64) -> (Window, i64) {
    let now = DateTime::<Utc>::from_timestamp_nanos(now_ns);
    let local = now.with_timezone(&tz).date_naive();
    let (id, first, next_start) = match period {
        CalendarPeriod::Day => (
            i64::from(local.num_days_from_ce()),
            local,
            local.succ_opt().unwrap_or(local),
        ),
        CalendarPeriod::Month => {
            let (y, m) = (local.year(), local.month());
            let next = if m == 12 {
                NaiveDate::from_ymd_opt(y + 1, 1, 1)
            } else {
                NaiveDate::from_ymd_opt(y, m + 1, 1)
            };
            (
                i64::from(y) * 12 + i64::from(m0(m)),
                local.with_day(1).unwrap_or(local),
                next.unwrap_or(local),
            )
        }
    };
    let window = Window {
        id,
        reset_at_ns: local_midnight_ns(tz, next_start),
    };
    // A midnight repeated by a DST change: only after its last occurrence is the date certain.
    // Never later than now, so the entry serves the moment it was computed for.
    let start_ns = local_midnight_latest_ns(tz, first).min(now_ns);
    (window, start_ns)
}

fn m0(month: u32) -> u32 {
    month - 1
}

/// The first real instant of `date` in `tz`. Midnight can be skipped by a DST jump (some zones move
/// their clocks at 00:00), in which case the day starts at the first local time that exists.
fn local_midnight_ns(tz: Tz, date: NaiveDate) -> i64 {
    let mut t: NaiveDateTime = date.and_hms_opt(0, 0, 0).unwrap_or_default();
    // DST gaps are at most a few hours; step in 15-minute increments, bounded.
    for _ in 0..16 {
        match tz.from_local_datetime(&t) {
            LocalResult::Single(dt) => return ns(dt.with_timezone(&Utc)),
            LocalResult::Ambiguous(first, _) => return ns(first.with_timezone(&Utc)),
            LocalResult::None => t += Duration::minutes(15),
        }
    }
    ns(Utc.from_utc_datetime(&t))
}

/// Like `local_midnight_ns`, but the last occurrence when midnight happens twice.
fn local_midnight_latest_ns(tz: Tz, date: NaiveDate) -> i64 {
    let t: NaiveDateTime = date.and_hms_opt(0, 0, 0).unwrap_or_default();
    match tz.from_local_datetime(&t) {
        LocalResult::Ambiguous(_, last) => ns(last.with_timezone(&Utc)),
        _ => local_midnight_ns(tz, date),
    }
}

fn ns(dt: DateTime<Utc>) -> i64 {
    dt.timestamp_nanos_opt().unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s)
            .unwrap()
            .timestamp_nanos_opt()
            .unwrap()
    }

    #[test]
    fn day_resets_at_local_midnight() {
        let tz: Tz = "America/New_York".parse().unwrap();
        // 23:30 in New York on 2026-11-21 is 04:30 UTC on the 22nd.
        let w = window(CalendarPeriod::Day, tz, at("2026-11-22T04:30:00Z"));
        assert_eq!(w.reset_at_ns, at("2026-11-22T05:00:00Z"));
        let next = window(CalendarPeriod::Day, tz, at("2026-11-22T05:00:00Z"));
        assert_eq!(next.id, w.id + 1);
    }

    #[test]
    fn dst_spring_forward_day_is_23_hours() {
        let tz: Tz = "Europe/Berlin".parse().unwrap();
        // 2026-03-29: clocks jump from 02:00 to 03:00 in Berlin.
        let w = window(CalendarPeriod::Day, tz, at("2026-03-29T12:00:00+02:00"));
        let start = at("2026-03-29T00:00:00+01:00");
        assert_eq!(w.reset_at_ns - start, 23 * 3600 * 1_000_000_000);
    }

    #[test]
    fn dst_fall_back_day_is_25_hours() {
        let tz: Tz = "Europe/Berlin".parse().unwrap();
        let w = window(CalendarPeriod::Day, tz, at("2026-10-25T12:00:00+01:00"));
        let start = at("2026-10-25T00:00:00+02:00");
        assert_eq!(w.reset_at_ns - start, 25 * 3600 * 1_000_000_000);
    }

    #[test]
    fn midnight_skipped_by_dst_starts_at_first_existing_time() {
        // America/Santiago springs forward at 24:00 -> 01:00 (2026-09-06).
        let tz: Tz = "America/Santiago".parse().unwrap();
        let w = window(CalendarPeriod::Day, tz, at("2026-09-05T12:00:00-04:00"));
        assert_eq!(w.reset_at_ns, at("2026-09-06T01:00:00-03:00"));
    }

    #[test]
    fn month_resets_on_the_first_local_midnight() {
        let tz: Tz = "Asia/Tokyo".parse().unwrap();
        let w = window(CalendarPeriod::Month, tz, at("2026-11-30T14:59:59Z"));
        assert_eq!(w.reset_at_ns, at("2026-11-30T15:00:00Z"));
        let dec = window(CalendarPeriod::Month, tz, at("2026-11-30T15:00:00Z"));
        assert_eq!(dec.id, w.id + 1);
        let dec_end = window(CalendarPeriod::Month, tz, at("2026-12-15T00:00:00Z"));
        assert_eq!(dec_end.reset_at_ns, at("2026-12-31T15:00:00Z"));
    }

    #[test]
    fn remembered_windows_answer_as_a_fresh_computation_would() {
        // Beirut repeats midnight when DST ends (00:00 -> 23:00), Santiago skips it, Berlin
        // changes at 02:00/03:00; times go forward and back (a test clock may move either way).
        for zone in ["Asia/Beirut", "America/Santiago", "Europe/Berlin", "UTC"] {
            let tz: Tz = zone.parse().unwrap();
            for (from, to) in [
                ("2026-10-23T00:00:00Z", "2026-10-27T00:00:00Z"),
                ("2026-09-04T00:00:00Z", "2026-09-08T00:00:00Z"),
                ("2026-03-27T00:00:00Z", "2026-04-02T00:00:00Z"),
            ] {
                let (a, b) = (at(from), at(to));
                let step: i64 = 7 * 60 * 1_000_000_000;
                let times: Vec<i64> = (a..b).step_by(step as usize).collect();
                for &now in times.iter().chain(times.iter().rev()) {
                    for period in [CalendarPeriod::Day, CalendarPeriod::Month] {
                        assert_eq!(
                            window(period, tz, now),
                            compute(period, tz, now).0,
                            "{zone} {period:?} at {now}"
                        );
                    }
                }
            }
        }
    }
}
