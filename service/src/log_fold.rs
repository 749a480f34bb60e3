//! Folding of repeated log lines: a failure that repeats (a Kafka broker down, polled every 50 ms)
//! is logged once, then at growing intervals with how many were folded in, instead of on every
//! occurrence.
//!
//! A worker whose Kafka was unreachable wrote 3,460 lines in 77 s this way (librdkafka's
//! `AllBrokersDown` and the consumer's poll error, about every 50 ms); folded, the same minute is
//! a handful of lines. Each kind of failure (a `key`: librdkafka's facility or error code, the
//! call that failed) has its own interval: the first occurrence is logged at once, the next after
//! [`LogFold::first`], then after twice that, up to [`LogFold::max`]. A kind that has been quiet
//! for `2 × max` starts over, so a new outage is logged at once again.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Decides which occurrences of repeated log lines are written.
#[derive(Debug)]
pub struct LogFold {
    first: Duration,
    max: Duration,
    kinds: Mutex<HashMap<String, Kind>>,
}

#[derive(Debug)]
struct Kind {
    /// When the last line of this kind was written.
    logged_at: Instant,
    /// When it last occurred (written or not).
    seen_at: Instant,
    /// Wait after `logged_at` before the next line.
    interval: Duration,
    /// Occurrences not written since `logged_at`.
    folded: u64,
}

impl Default for LogFold {
    /// First repeat after 1 s, doubling up to 60 s.
    fn default() -> Self {
        Self::new(Duration::from_secs(1), Duration::from_secs(60))
    }
}

impl LogFold {
    /// Repeats written after `first`, then twice as long each time, up to `max`.
    pub fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max: max.max(first),
            kinds: Mutex::new(HashMap::new()),
        }
    }

    /// Call on each occurrence of `key` at `now`: `Some(folded)` when a line should be written,
    /// with the number of occurrences not written since the previous line; `None` to skip it.
    pub fn admit_at(&self, key: &str, now: Instant) -> Option<u64> {
        let mut kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        let quiet = self.max * 2;
        match kinds.get_mut(key) {
            Some(k) if now.saturating_duration_since(k.seen_at) < quiet => {
                k.seen_at = now;
                if now.saturating_duration_since(k.logged_at) >= k.interval {
                    let folded = k.folded;
                    k.logged_at = now;
                    k.folded = 0;
                    k.interval = (k.interval * 2).min(self.max);
                    Some(folded)
                } else {
                    k.folded += 1;
                    None
                }
            }
            _ => {
                kinds.insert(
                    key.to_string(),
                    Kind {
                        logged_at: now,
                        seen_at: now,
                        interval: self.first,
                        folded: 0,
                    },
                );
                Some(0)
            }
        }
    }

    /// [`admit_at`](Self::admit_at) now.
    pub fn admit(&self, key: &str) -> Option<u64> {
        self.admit_at(key, Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn a_failure_every_50ms_for_77s_is_a_handful_of_lines() {
        let fold = LogFold::default();
        let t0 = Instant::now();
        let mut written = Vec::new();
        let mut total_folded = 0;
        // 77 s of a poll error every 50 ms: what a worker without Kafka did
        for i in 0..1540u32 {
            let now = t0 + Duration::from_millis(50) * i;
            if let Some(folded) = fold.admit_at("AllBrokersDown", now) {
                written.push(now - t0);
                total_folded += folded;
            }
        }
        // at 0, 1, 3, 7, 15, 31 and 63 s
        assert_eq!(
            written,
            [0.0, 1.0, 3.0, 7.0, 15.0, 31.0, 63.0].map(secs).to_vec()
        );
        // every occurrence is either written or counted in the next written line
        assert_eq!(total_folded + written.len() as u64, 1 + 1260);
    }

    #[test]
    fn kinds_are_folded_separately_and_a_quiet_kind_starts_over() {
        let fold = LogFold::new(secs(1.0), secs(4.0));
        let t0 = Instant::now();
        assert_eq!(fold.admit_at("a", t0), Some(0));
        assert_eq!(fold.admit_at("b", t0), Some(0), "another kind is written");
        assert_eq!(fold.admit_at("a", t0 + secs(0.5)), None);
        assert_eq!(fold.admit_at("a", t0 + secs(1.0)), Some(1));
        // the interval is capped at max (4 s): 1, 2, 4, 4, ...
        assert_eq!(fold.admit_at("a", t0 + secs(3.0)), Some(0));
        assert_eq!(fold.admit_at("a", t0 + secs(7.0)), Some(0));
        assert_eq!(fold.admit_at("a", t0 + secs(10.0)), None);
        assert_eq!(fold.admit_at("a", t0 + secs(11.0)), Some(1));
        // quiet for 2 × max: a new outage is written at once, with a fresh interval
        assert_eq!(fold.admit_at("a", t0 + secs(20.0)), Some(0));
        assert_eq!(fold.admit_at("a", t0 + secs(20.5)), None);
        assert_eq!(fold.admit_at("a", t0 + secs(21.0)), Some(1));
    }
}
