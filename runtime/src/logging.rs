//! Log lines that summarise instead of repeat.
//!
//! Under load an event can happen thousands of times a second (a copy dropped because the queue is
//! full, a shadow that refuses connections, a primary that is down). Logging each one would flood
//! the log pipeline of the very cluster teeway promised not to disturb, so such events go through
//! a [`Throttle`]: the first one is logged at once, then at most one line per interval carries the
//! number of events since the previous line. The exact totals are always in the metrics; the log
//! says *that* something is happening and how fast.
//!
//! Events counted after the last line are not left unsaid when the events stop: [`flush`] writes
//! one summary line per throttle that holds some (`what`, how many, over how long), and the
//! agent and the gateway call it every [`SUMMARY_INTERVAL`] and once more when they stop.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// How often a throttled event is logged at most, unless a caller chooses otherwise.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(60);

/// Counts events and says when one log line is due. Lock-free: safe on a request path.
#[derive(Debug, Clone)]
pub struct Throttle {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// What is counted, for summary lines: "mirror copies dropped (queue_full)".
    what: String,
    interval_ms: u64,
    origin: Instant,
    /// Milliseconds since `origin` at the last line, plus one (0: nothing logged yet).
    last: AtomicU64,
    /// Events since the last line.
    pending: AtomicU64,
}

/// Every throttle alive, for [`flush`]. Only creation and flushing take the lock.
static LIVE: Mutex<Vec<Weak<Inner>>> = Mutex::new(Vec::new());

impl Throttle {
    /// At most one line per `interval`; `what` names the events in summary lines.
    pub fn new(what: impl Into<String>, interval: Duration) -> Self {
        let inner = Arc::new(Inner {
            what: what.into(),
            interval_ms: u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
            origin: Instant::now(),
            last: AtomicU64::new(0),
            pending: AtomicU64::new(0),
        });
        let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
        live.retain(|w| w.strong_count() > 0);
        live.push(Arc::downgrade(&inner));
        Self { inner }
    }

    /// At most one line per [`SUMMARY_INTERVAL`].
    pub fn named(what: impl Into<String>) -> Self {
        Self::new(what, SUMMARY_INTERVAL)
    }

    /// Counts one event. Returns the number of events to report (this one included) when a line
    /// is due, `None` otherwise. Exactly one of several concurrent callers gets the line.
    pub fn note(&self) -> Option<u64> {
        let t = &self.inner;
        t.pending.fetch_add(1, Ordering::Relaxed);
        let now = t.now();
        let last = t.last.load(Ordering::Relaxed);
        if last != 0 && now < last.saturating_add(t.interval_ms) {
            return None;
        }
        t.last
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .ok()
            .map(|_| t.pending.swap(0, Ordering::Relaxed))
    }
}

impl Throttle {
    /// Counts one event and starts a new line now, whether due or not (the caller has a reason
    /// to log at once, such as a new cause): the events since the last line, this one included.
    pub fn note_now(&self) -> u64 {
        let t = &self.inner;
        t.pending.fetch_add(1, Ordering::Relaxed);
        t.last.store(t.now(), Ordering::Relaxed);
        t.pending.swap(0, Ordering::Relaxed)
    }
}

impl Inner {
    fn now(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1)
    }

    /// The events not yet reported, taken, when a line is due (`all`: whether due or not).
    fn take(&self, all: bool) -> Option<(u64, u64)> {
        let now = self.now();
        let last = self.last.load(Ordering::Relaxed);
        if !all && last != 0 && now < last.saturating_add(self.interval_ms) {
            return None;
        }
        if self.pending.load(Ordering::Relaxed) == 0 {
            return None;
        }
        self.last
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .ok()?;
        let since_ms = if last == 0 { now } else { now - last };
        Some((self.pending.swap(0, Ordering::Relaxed), since_ms))
    }
}

/// Writes one summary line per throttle holding events not yet reported: only those whose
/// interval has passed, or every one when `all` (at shutdown). Returns the lines written.
pub fn flush(all: bool) -> usize {
    let live: Vec<Arc<Inner>> = {
        let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
        live.retain(|w| w.strong_count() > 0);
        live.iter().filter_map(Weak::upgrade).collect()
    };
    let mut lines = 0;
    for t in live {
        if let Some((events, since_ms)) = t.take(all) {
            lines += 1;
            tracing::warn!(
                summary = %t.what,
                events,
                over_s = since_ms / 1000,
                "{}: {events} more since the last line (totals in the metrics)",
                t.what
            );
        }
    }
    lines
}

/// Flushes due summaries every `SUMMARY_INTERVAL / 4` until `stop`, then all of them.
pub async fn flush_until(stop: tokio_util::sync::CancellationToken) {
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(SUMMARY_INTERVAL / 4) => {
                flush(false);
            }
        }
    }
    flush(true);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_event_is_reported_then_counts_accumulate_until_the_interval_passes() {
        let t = Throttle::new("test events", Duration::from_millis(50));
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
    fn events_after_the_last_line_are_flushed_not_lost() {
        let t = Throttle::new("flushed events", Duration::from_secs(3600));
        assert_eq!(t.note(), Some(1));
        for _ in 0..10_056 {
            assert_eq!(t.note(), None);
        }
        assert_eq!(t.inner.take(false), None, "not due within the interval");
        let (events, _) = t.inner.take(true).expect("flushed at shutdown");
        assert_eq!(events, 10_056, "every event after the first line");
        assert_eq!(t.inner.take(true), None, "and only once");
    }

    #[test]
    fn concurrent_callers_never_lose_or_double_count() {
        let t = Throttle::new("concurrent", Duration::ZERO);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let t = t.clone();
                std::thread::spawn(move || (0..10_000).filter_map(|_| t.note()).sum::<u64>())
            })
            .collect();
        let reported: u64 = threads.into_iter().map(|h| h.join().expect("thread")).sum();
        let left = t.inner.pending.load(Ordering::Relaxed);
        assert_eq!(reported + left, 40_000);
    }
}
