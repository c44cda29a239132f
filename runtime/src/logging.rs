//! Log lines that summarise instead of repeat.
//!
//! Under load an event can happen thousands of times a second (a copy dropped because the queue is
//! full, a shadow that refuses connections, a primary that is down). Logging each one would flood
//! the log pipeline of the very cluster teeway promised not to disturb, so such events go through
//! a [`Throttle`]: the first one is logged at once, then at most one line per interval carries the
//! number of events since the previous line. The exact totals are always in the metrics; the log
//! says *that* something is happening and how fast.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How often a throttled event is logged at most, unless a caller chooses otherwise.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(60);

/// Counts events and says when one log line is due. Lock-free: safe on a request path.
#[derive(Debug)]
pub struct Throttle {
    interval_ms: u64,
    origin: Instant,
    /// Milliseconds since `origin` at the last line, plus one (0: nothing logged yet).
    last: AtomicU64,
    /// Events since the last line.
    pending: AtomicU64,
}

impl Throttle {
    /// At most one line per `interval`.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval_ms: u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
            origin: Instant::now(),
            last: AtomicU64::new(0),
            pending: AtomicU64::new(0),
        }
    }

    /// Counts one event. Returns the number of events to report (this one included) when a line
    /// is due, `None` otherwise. Exactly one of several concurrent callers gets the line.
    pub fn note(&self) -> Option<u64> {
        self.pending.fetch_add(1, Ordering::Relaxed);
        let now = u64::try_from(self.origin.elapsed().as_millis())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1);
        let last = self.last.load(Ordering::Relaxed);
        if last != 0 && now < last.saturating_add(self.interval_ms) {
            return None;
        }
        self.last
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .ok()
            .map(|_| self.pending.swap(0, Ordering::Relaxed))
    }
}

impl Default for Throttle {
    fn default() -> Self {
        Self::new(SUMMARY_INTERVAL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_event_is_reported_then_counts_accumulate_until_the_interval_passes() {
        let t = Throttle::new(Duration::from_millis(50));
        assert_eq!(t.note(), Some(1), "the first event is logged at once");
        let mut quiet = 0;
        // Well inside the interval: nothing is due (bounded loop; the clock is only read).
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(20) && quiet < 1000 {
            assert_eq!(t.note(), None);
            quiet += 1;
        }
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(
            t.note(),
            Some(quiet + 1),
            "the next line carries every event since"
        );
    }

    #[test]
    fn concurrent_callers_never_lose_or_double_count() {
        let t = std::sync::Arc::new(Throttle::new(Duration::ZERO));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let t = t.clone();
                std::thread::spawn(move || (0..10_000).filter_map(|_| t.note()).sum::<u64>())
            })
            .collect();
        let reported: u64 = threads.into_iter().map(|h| h.join().expect("thread")).sum();
        let left = t.pending.load(Ordering::Relaxed);
        assert_eq!(reported + left, 40_000);
    }
}
