//! Identifiers minted on the request path (request ids, attempt ids, event ids): UUIDv7, whose
//! random part comes from a per-thread generator seeded once from the OS, so minting one costs
//! no system call (`Uuid::now_v7` asks the kernel for randomness every time). These ids must be
//! unique, not secret: nothing grants access by knowing one.

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};
use uuid::Uuid;

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State {
        rng: fastrand::Rng::with_seed(seed()),
        last_ms: 0,
        last: 0,
    });
}

struct State {
    rng: fastrand::Rng,
    last_ms: u64,
    /// The 74 bits after the timestamp (`rand_a` and `rand_b`) of the last id.
    last: u128,
}

/// One OS-random seed per thread: distinct threads and processes never share a sequence.
fn seed() -> u64 {
    let b = Uuid::new_v4().into_bytes();
    u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[8]])
}

const RANDOM_BITS: u32 = 74;

/// A UUIDv7 for now: 48 bits of Unix milliseconds, then 74 bits that start random in each
/// millisecond and count up within it, so the ids one thread mints sort in the order it minted
/// them (as events are written).
pub fn uuid_v7() -> Uuid {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        let (ms, bits) = if now_ms > s.last_ms {
            // The top bit left clear: room to count up within the millisecond.
            (
                now_ms,
                u128::from(s.rng.u64(..)) << 9 & ((1 << (RANDOM_BITS - 1)) - 1),
            )
        } else if s.last + 1 < 1 << RANDOM_BITS {
            (s.last_ms, s.last + 1)
        } else {
            (s.last_ms + 1, 0)
        };
        s.last_ms = ms;
        s.last = bits;
        let rand_a = (bits >> 62) & 0xfff;
        let rand_b = bits & ((1 << 62) - 1);
        let v = (u128::from(ms & 0xffff_ffff_ffff) << 80)
            | (0x7 << 76)
            | (rand_a << 64)
            | (0b10 << 62)
            | rand_b;
        Uuid::from_u128(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn ids_are_version_7_distinct_and_carry_the_time() {
        let before = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let ids: Vec<Uuid> = (0..10_000).map(|_| uuid_v7()).collect();
        assert!(ids.iter().all(|u| u.get_version_num() == 7));
        assert_eq!(ids.iter().collect::<HashSet<_>>().len(), ids.len());
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(
            sorted, ids,
            "one thread's ids sort in the order they were minted"
        );
        assert!(
            ids.iter()
                .all(|u| u.get_variant() == uuid::Variant::RFC4122)
        );
        let (secs, nanos) = ids[0]
            .get_timestamp()
            .expect("v7 has a timestamp")
            .to_unix();
        let ms = secs * 1000 + u64::from(nanos) / 1_000_000;
        assert!(ms >= before && ms < before + 60_000, "{ms} vs {before}");
    }

    #[test]
    fn threads_do_not_repeat_each_other() {
        let a = std::thread::spawn(|| (0..1000).map(|_| uuid_v7()).collect::<Vec<_>>());
        let b = std::thread::spawn(|| (0..1000).map(|_| uuid_v7()).collect::<Vec<_>>());
        let mut all: HashSet<Uuid> = a.join().unwrap().into_iter().collect();
        all.extend(b.join().unwrap());
        assert_eq!(all.len(), 2000);
    }
}
