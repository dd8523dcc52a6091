//! The limiter algorithms as pure functions over a counter's state, shared by every storage backend
//! (the Redis scripts implement the same arithmetic): a GCRA token bucket and a calendar window.
//!
//! Time is Unix nanoseconds (`i64`) passed in by the caller, so tests can inject any clock.

/// What a counter enforces. Built per request from the policy; holds no state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// Token bucket (GCRA): `burst` tokens, one token refilled every `emission_ns`.
    Bucket { emission_ns: i64, burst: u64 },
    /// Calendar window: `limit` units per window; the window id changes at reset.
    Window {
        limit: u64,
        window: i64,
        reset_at_ns: i64,
    },
}

/// The stored state of one counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Theoretical arrival time of the next request (GCRA).
    Bucket { tat_ns: i64 },
    /// Units used in window `window`.
    Window { window: i64, used: u64 },
}

/// One counter's answer to a request of a given cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    /// The counter's capacity: the burst of a bucket or the limit of a window.
    pub limit: u64,
    /// What remains after this request (or now, when refused).
    pub remaining: u64,
    /// Nanoseconds from `now` until the counter is full again (bucket) or resets (window).
    pub reset_after_ns: i64,
    /// When refused, nanoseconds until this cost could be admitted; 0 when allowed.
    pub retry_after_ns: i64,
    /// The state to store if every counter of the request allows it.
    pub next: State,
}

/// The window id of a `concurrent` limit: one window that never ends, whose units come back
/// only when released (calendar window ids count days or months from year 1, never 0).
pub const EVERLASTING_WINDOW: i64 = 0;

impl Limit {
    /// A `concurrent` limit ([`EVERLASTING_WINDOW`]): nothing frees its units but their release.
    pub fn is_everlasting(&self) -> bool {
        matches!(
            self,
            Limit::Window {
                window: EVERLASTING_WINDOW,
                ..
            }
        )
    }

    /// The state of a counter never used before.
    pub fn initial_state(&self, now_ns: i64) -> State {
        match *self {
            Limit::Bucket { .. } => State::Bucket { tat_ns: now_ns },
            Limit::Window { window, .. } => State::Window { window, used: 0 },
        }
    }

    /// Decide `cost` against this limit given the stored `state` (None = never used).
    pub fn evaluate(&self, state: Option<State>, cost: u64, now_ns: i64) -> Verdict {
        match *self {
            Limit::Bucket { emission_ns, burst } => {
                let stored = match state {
                    Some(State::Bucket { tat_ns }) => tat_ns,
                    _ => now_ns,
                };
                bucket(emission_ns.max(1), burst, stored, cost, now_ns)
            }
            Limit::Window {
                limit,
                window,
                reset_at_ns,
            } => {
                let used = match state {
                    Some(State::Window { window: w, used }) if w == window => used,
                    _ => 0,
                };
                let reset_after_ns = (reset_at_ns - now_ns).max(0);
                let allowed = used.saturating_add(cost) <= limit;
                let used_after = if allowed { used + cost } else { used };
                Verdict {
                    allowed,
                    limit,
                    remaining: limit.saturating_sub(used_after),
                    reset_after_ns,
                    retry_after_ns: if allowed { 0 } else { reset_after_ns },
                    next: State::Window {
                        window,
                        used: used_after,
                    },
                }
            }
        }
    }
}

fn bucket(t: i64, burst: u64, stored_tat: i64, cost: u64, now: i64) -> Verdict {
    let capacity = t.saturating_mul(i64::try_from(burst).unwrap_or(i64::MAX));
    let tat = stored_tat.max(now);
    let new_tat = tat.saturating_add(t.saturating_mul(i64::try_from(cost).unwrap_or(i64::MAX)));
    let allow_at = new_tat.saturating_sub(capacity);
    let allowed = allow_at <= now;
    let tat_after = if allowed { new_tat } else { tat };
    // Whole tokens left: the unused part of the capacity, in emission intervals.
    let remaining = (capacity - (tat_after - now)).max(0) / t;
    Verdict {
        allowed,
        limit: burst,
        remaining: u64::try_from(remaining).unwrap_or(0),
        reset_after_ns: tat_after - now,
        retry_after_ns: if allowed { 0 } else { allow_at - now },
        next: State::Bucket { tat_ns: tat_after },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000_000;

    #[test]
    fn bucket_admits_burst_then_refills_at_the_rate() {
        // 10 per second, burst 5.
        let limit = Limit::Bucket {
            emission_ns: S / 10,
            burst: 5,
        };
        let mut state = None;
        for i in 0..5 {
            let v = limit.evaluate(state, 1, 0);
            assert!(v.allowed, "request {i}");
            assert_eq!(v.remaining, 4 - i);
            state = Some(v.next);
        }
        let refused = limit.evaluate(state, 1, 0);
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after_ns, S / 10);
        let later = limit.evaluate(state, 1, S / 10);
        assert!(later.allowed);
        assert_eq!(later.remaining, 0);
    }

    #[test]
    fn bucket_cost_above_one_takes_several_tokens() {
        let limit = Limit::Bucket {
            emission_ns: S,
            burst: 10,
        };
        let v = limit.evaluate(None, 7, 0);
        assert!(v.allowed);
        assert_eq!(v.remaining, 3);
        let refused = limit.evaluate(Some(v.next), 4, 0);
        assert!(!refused.allowed);
        assert_eq!(refused.remaining, 3);
        assert_eq!(refused.retry_after_ns, S);
    }

    #[test]
    fn window_counts_until_the_limit_and_resets_with_a_new_window() {
        let day1 = Limit::Window {
            limit: 3,
            window: 1,
            reset_at_ns: 100,
        };
        let v = day1.evaluate(None, 3, 0);
        assert!(v.allowed && v.remaining == 0);
        let refused = day1.evaluate(Some(v.next), 1, 40);
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after_ns, 60);
        let day2 = Limit::Window {
            limit: 3,
            window: 2,
            reset_at_ns: 200,
        };
        assert!(day2.evaluate(Some(v.next), 1, 100).allowed);
    }
}
