//! The pace of a mirror rule: making fewer copies of what the gateway sheds.
//!
//! A gateway whose targets cannot take more (a slow shadow's slots all taken, or a target over
//! its `rate_limit`) sheds the copies it cannot replay, and from protocol 6 its `ACK` says which
//! records of the batch those were. Each of them cost production CPU and the link's bandwidth
//! for nothing. So every mirror rule (and the default, `mirror.percentage`) has a [`Pace`]: the
//! share of its sampled requests the agent copies. It is 100% until the gateway sheds more than
//! [`TOLERANCE_PERCENT`] of the rule's copies in a [`WINDOW`]; then it becomes the share the
//! gateway took (so the agent sends about what the targets can replay), and the window after a
//! cut is not judged (its acknowledgements are of copies made at the old pace). A window with
//! (almost) nothing shed raises it by a quarter plus [`RAMP_PPM`], back to 100% within about
//! two seconds of the targets' recovery; it never goes below [`FLOOR_PPM`], so the agent keeps
//! learning whether they have.
//!
//! A sampled request the pace passes over is counted
//! `teeway_agent_mirror_dropped_total{reason="gateway_shedding"}`, so the books still close, and
//! the pace in force is the gauge `teeway_agent_mirror_pace_ratio{rule}`. The rule is the unit
//! because the agent knows nothing of the gateway's routes: copies of one rule that go to a fast
//! and to a slow shadow are paced together (give them rules of their own, or turn pacing off
//! with `mirror.follow_shedding: false`). A copy that any target replays or an archive keeps is
//! never shed.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use metrics::Gauge;

/// The pace in parts per million when every sampled request is copied.
const FULL: u32 = 1_000_000;
/// How long the acknowledgements that set the next pace are gathered.
pub const WINDOW: Duration = Duration::from_millis(100);
/// Copies shed in a window, in percent of those acknowledged, that the pace ignores.
pub const TOLERANCE_PERCENT: u64 = 2;
/// The lowest pace, in parts per million: enough copies to see the targets recover.
pub const FLOOR_PPM: u32 = 1_000;
/// What a window without shedding adds to the pace besides a quarter, in parts per million.
pub const RAMP_PPM: u32 = 1_000;

/// The share of one rule's sampled requests the agent copies; see the module docs.
#[derive(Debug)]
pub struct Pace {
    ppm: AtomicU32,
    /// Acknowledged copies of the rule in the current window, and how many of them were shed.
    acked: AtomicU64,
    shed: AtomicU64,
    window: Mutex<Window>,
    gauge: Gauge,
}

#[derive(Debug)]
struct Window {
    started: Instant,
    /// The pace was just cut: this window's acknowledgements are of copies made before.
    skip: bool,
}

impl Pace {
    /// A rule's pace, at 100%, shown in `gauge`.
    pub fn new(gauge: Gauge) -> Self {
        gauge.set(1.0);
        Self {
            ppm: AtomicU32::new(FULL),
            acked: AtomicU64::new(0),
            shed: AtomicU64::new(0),
            window: Mutex::new(Window {
                started: Instant::now(),
                skip: false,
            }),
            gauge,
        }
    }

    /// Whether the rule's next sampled request is copied: always at full pace (one atomic load),
    /// else a draw.
    #[inline]
    pub fn admits(&self) -> bool {
        let ppm = self.ppm.load(Ordering::Relaxed);
        ppm >= FULL || fastrand::u32(..FULL) < ppm
    }

    /// One of the rule's copies was acknowledged; `shed`: the gateway could not take it.
    pub fn acknowledged(&self, shed: bool) {
        self.acked.fetch_add(1, Ordering::Relaxed);
        if shed {
            self.shed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Closes the window if it has lasted [`WINDOW`]: sets the pace from what it saw.
    pub fn settle(&self, now: Instant) {
        let Ok(mut window) = self.window.try_lock() else {
            return; // another batch's acknowledgement is settling it
        };
        if now.saturating_duration_since(window.started) < WINDOW {
            return;
        }
        let acked = self.acked.swap(0, Ordering::Relaxed);
        let shed = self.shed.swap(0, Ordering::Relaxed);
        window.started = now;
        if std::mem::take(&mut window.skip) || acked == 0 {
            return;
        }
        let before = self.ppm.load(Ordering::Relaxed);
        let after = next_ppm(before, acked, shed);
        window.skip = after < before;
        if after != before {
            self.ppm.store(after, Ordering::Relaxed);
            self.gauge.set(f64::from(after) / f64::from(FULL));
        }
    }

    /// The pace in force, in parts per million.
    #[cfg(test)]
    pub fn ppm(&self) -> u32 {
        self.ppm.load(Ordering::Relaxed)
    }
}

/// The next pace after a window in which `shed` of `acked` copies made at `ppm` were shed.
fn next_ppm(ppm: u32, acked: u64, shed: u64) -> u32 {
    let shed = shed.min(acked);
    if shed * 100 > acked * TOLERANCE_PERCENT {
        // The gateway took `acked - shed` of them: copy that share of what was copied.
        let taken = u64::from(ppm) * (acked - shed) / acked;
        u32::try_from(taken).unwrap_or(FULL).max(FLOOR_PPM)
    } else {
        ppm.saturating_add(ppm / 4 + RAMP_PPM).min(FULL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pace_becomes_what_the_gateway_took_and_climbs_back_when_it_sheds_nothing() {
        // 96% shed at full pace: copy 4%.
        assert_eq!(next_ppm(FULL, 1000, 960), 40_000);
        // Shedding within the tolerance is not a signal; without shedding the pace climbs.
        assert_eq!(next_ppm(FULL, 1000, 20), FULL);
        assert_eq!(next_ppm(40_000, 1000, 0), 51_000);
        // Everything shed: the floor, from which the pace can still learn.
        assert_eq!(next_ppm(FULL, 10, 10), FLOOR_PPM);
        assert_eq!(next_ppm(FLOOR_PPM, 10, 0), 2_250);
        // From the floor to full pace, a window at a time.
        let mut ppm = FLOOR_PPM;
        let mut windows = 0;
        while ppm < FULL {
            ppm = next_ppm(ppm, 100, 0);
            windows += 1;
        }
        assert!(
            windows <= 25,
            "{windows} windows from the floor back to full pace"
        );
    }

    #[test]
    fn a_window_is_judged_once_it_has_lasted_and_the_one_after_a_cut_is_not() {
        let pace = Pace::new(Gauge::noop());
        let start = Instant::now();
        for i in 0..100 {
            pace.acknowledged(i % 2 == 0);
        }
        pace.settle(start);
        assert_eq!(pace.ppm(), FULL, "the window has not lasted yet");
        pace.settle(start + WINDOW);
        assert_eq!(pace.ppm(), FULL / 2, "half shed: half the pace");
        for _ in 0..100 {
            pace.acknowledged(true);
        }
        pace.settle(start + WINDOW * 2);
        assert_eq!(
            pace.ppm(),
            FULL / 2,
            "copies made at the old pace do not cut it again"
        );
        for i in 0..100 {
            pace.acknowledged(i % 4 == 0);
        }
        pace.settle(start + WINDOW * 3);
        assert_eq!(pace.ppm(), FULL * 3 / 8);
        let admitted = (0..10_000).filter(|_| pace.admits()).count();
        assert!(
            (3_000..4_500).contains(&admitted),
            "{admitted} of 10,000 admitted at 37.5%"
        );
    }
}
