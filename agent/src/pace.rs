//! The pace of a mirror rule: making fewer copies of what the gateway sheds.
//!
//! A gateway whose targets cannot take more (a slow shadow's slots all taken, or a target over
//! its `rate_limit`) sheds the copies it cannot replay, and from protocol 6 its `ACK` marks which
//! records of the batch those were. Each of them cost production CPU and the link's bandwidth for
//! nothing. So every mirror rule (and the default, `mirror.percentage`) has a [`Pace`]: the share
//! of its sampled requests the agent copies.
//!
//! - It is 100% until the gateway marks more than [`TOLERANCE_PERCENT`] of the rule's copies in a
//!   judged window (at least [`WINDOW`] long and [`MIN_ACKS`] acknowledgements). Then it is
//!   **cut** to the share the gateway took, but never below an eighth of what it was, nor below
//!   [`FLOOR_PPM`] (so that some copies keep telling whether the targets recovered).
//! - Each cut starts a new epoch: acknowledgements of copies made before it are not judged, as
//!   they say nothing of the new pace (the link may take much longer than a window to answer).
//! - Between cuts the pace **climbs with time**, by [`GROWTH`] per window since the last cut,
//!   whether copies flow or not: a quiet rule, or one at the floor that sends a copy a minute, is
//!   back to 100% about four seconds after its last cut, and the next marks cut it again if the
//!   targets still cannot keep up.
//!
//! The draw follows the request's sampling key when it has one (`mirror.sample_by`): a paced
//! rule copies all of a key's requests or none, as sampling does. A sampled request the pace
//! passes over is counted `teeway_agent_mirror_dropped_total{reason="gateway_shedding"}` (the books
//! still close); a copy's envelope carries its rate times the pace; the pace in force is the
//! gauge `teeway_agent_mirror_pace_ratio{rule}` (updated as copies are admitted or acknowledged).
//! A reload keeps each rule's pace by name. The rule is the unit because the agent knows nothing
//! of the gateway's routes: copies of one rule that go to a fast and to a slow shadow are paced
//! together (give them rules of their own, or turn pacing off with
//! `mirror.follow_shedding: false`).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metrics::Gauge;
use teeway_runtime::logging::Throttle;

/// The pace in parts per million when every sampled request is copied.
pub const FULL: u32 = 1_000_000;
/// Shortest judged window, and the step of the climb.
pub const WINDOW: Duration = Duration::from_millis(100);
/// Fewest acknowledgements a window is judged on: one shed copy of a quiet rule is no signal.
pub const MIN_ACKS: u64 = 16;
/// Copies shed in a window, in percent of those acknowledged, that the pace ignores.
pub const TOLERANCE_PERCENT: u64 = 2;
/// The lowest pace, in parts per million (0.01%).
pub const FLOOR_PPM: u32 = 100;
/// The climb per window since the last cut.
pub const GROWTH: f64 = 1.25;

/// What `admits` reads on every sampled request, on a cache line of its own: the uplink's
/// acknowledgements update the counters beside it in [`Pace`] without slowing the request path.
#[derive(Debug)]
#[repr(align(64))]
struct Hot {
    /// The pace in force (`FULL`: no draw at all).
    ppm: AtomicU32,
    /// The pace the last cut set, and when (milliseconds since `born`, from 1).
    cut_ppm: AtomicU32,
    cut_at: AtomicU64,
    /// Bumped by every cut.
    epoch: AtomicU32,
}

/// The share of one rule's sampled requests the agent copies; see the module docs.
#[derive(Debug)]
pub struct Pace {
    hot: Hot,
    born: Instant,
    /// Milliseconds added to the clock (tests move time on with it).
    skew: AtomicU64,
    /// Current-epoch acknowledgements gathered for the window being judged, and the marked ones.
    acked: AtomicU64,
    shed: AtomicU64,
    /// When the window being gathered started (milliseconds since `born`); held while judging.
    window: Mutex<u64>,
    gauge: Gauge,
    rule: Arc<str>,
    log: Throttle,
    /// A cut was logged and its end not yet.
    announced: AtomicBool,
}

/// A copy's place in its rule's pace: which epoch made it.
#[derive(Debug, Clone)]
pub struct Paced {
    pace: Arc<Pace>,
    epoch: u32,
}

impl Pace {
    /// The pace of the rule `rule`, at 100%, shown in `gauge`.
    pub fn new(rule: Arc<str>, gauge: Gauge) -> Self {
        gauge.set(1.0);
        Self {
            hot: Hot {
                ppm: AtomicU32::new(FULL),
                cut_ppm: AtomicU32::new(FULL),
                cut_at: AtomicU64::new(0),
                epoch: AtomicU32::new(0),
            },
            born: Instant::now(),
            skew: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            shed: AtomicU64::new(0),
            window: Mutex::new(0),
            gauge,
            log: Throttle::new(
                format!("gateway shedding rule {rule}"),
                Duration::from_secs(60),
            ),
            announced: AtomicBool::new(false),
            rule,
        }
    }

    /// Whether the rule's sampled request is copied: `Some` with the pace it was admitted at.
    /// `draw` is where the request fell in its sampled share, in parts per million (from its
    /// sampling key, or random). At full pace: one atomic load.
    #[inline]
    pub fn admits(self: &Arc<Self>, draw: impl FnOnce() -> u32) -> Option<(u32, Paced)> {
        let mut ppm = self.hot.ppm.load(Ordering::Relaxed);
        if ppm < FULL {
            ppm = self.climbed();
            if draw() >= ppm {
                return None;
            }
        }
        let paced = Paced {
            pace: self.clone(),
            epoch: self.hot.epoch.load(Ordering::Relaxed),
        };
        Some((ppm, paced))
    }

    /// The pace after its climb since the last cut; stored when it moved.
    fn climbed(&self) -> u32 {
        let cut_ppm = self.hot.cut_ppm.load(Ordering::Relaxed);
        let windows = self
            .millis()
            .saturating_sub(self.hot.cut_at.load(Ordering::Relaxed))
            / WINDOW.as_millis() as u64;
        let climbed = climb(cut_ppm, windows);
        if self.hot.ppm.swap(climbed, Ordering::Relaxed) != climbed {
            self.gauge.set(f64::from(climbed) / f64::from(FULL));
            if climbed == FULL && self.announced.swap(false, Ordering::Relaxed) {
                tracing::info!(rule = %self.rule, "the gateway takes this rule's copies again: copying every sampled request");
            }
        }
        climbed
    }

    /// Closes the window if it has lasted [`WINDOW`] and gathered [`MIN_ACKS`]: cuts the pace if
    /// the gateway marked too many of its copies.
    pub fn settle(&self) {
        let Ok(mut started) = self.window.try_lock() else {
            return; // another batch's acknowledgement is judging it
        };
        let now = self.millis();
        let acked = self.acked.load(Ordering::Relaxed);
        if now.saturating_sub(*started) < WINDOW.as_millis() as u64 || acked < MIN_ACKS {
            return;
        }
        let acked = self.acked.swap(0, Ordering::Relaxed);
        let shed = self.shed.swap(0, Ordering::Relaxed).min(acked);
        *started = now;
        if shed * 100 <= acked * TOLERANCE_PERCENT {
            return;
        }
        let before = self.climbed();
        let after = cut(before, acked, shed);
        self.hot.cut_ppm.store(after, Ordering::Relaxed);
        self.hot.cut_at.store(now, Ordering::Relaxed);
        self.hot.ppm.store(after, Ordering::Relaxed);
        self.hot.epoch.fetch_add(1, Ordering::Relaxed);
        self.gauge.set(f64::from(after) / f64::from(FULL));
        if before == FULL {
            if let Some(times) = self.log.note() {
                self.announced.store(true, Ordering::Relaxed);
                tracing::info!(
                    rule = %self.rule,
                    shed,
                    of = acked,
                    pace = f64::from(after) / f64::from(FULL),
                    times,
                    "the gateway is shedding this rule's copies (its targets are full): copying fewer sampled requests, the rest counted as dropped{{reason=\"gateway_shedding\"}} (one line a minute at most)"
                );
            }
        }
    }

    /// Milliseconds since the pace was made, from 1.
    fn millis(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_millis())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1)
            .saturating_add(self.skew.load(Ordering::Relaxed))
    }

    /// Moves the pace's clock on by `by`.
    #[cfg(test)]
    fn wait(&self, by: Duration) {
        self.skew
            .fetch_add(by.as_millis() as u64, Ordering::Relaxed);
    }

    /// The pace in force, in parts per million.
    #[cfg(test)]
    pub fn ppm(&self) -> u32 {
        self.hot.ppm.load(Ordering::Relaxed)
    }
}

impl Paced {
    /// The gateway acknowledged the copy; `shed`: it marked it. Copies made before the pace's
    /// last cut are not judged. Returns the pace, to be settled once the batch is counted.
    pub fn acknowledged(self, shed: bool) -> Arc<Pace> {
        if self.epoch == self.pace.hot.epoch.load(Ordering::Relaxed) {
            self.pace.acked.fetch_add(1, Ordering::Relaxed);
            if shed {
                self.pace.shed.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.pace
    }
}

/// The pace after a window in which `shed` of `acked` copies made at `ppm` were marked: the share
/// the gateway took, but at most an eighth of `ppm`, and not below the floor.
fn cut(ppm: u32, acked: u64, shed: u64) -> u32 {
    let taken = u64::from(ppm) * (acked - shed.min(acked)) / acked.max(1);
    let taken = u32::try_from(taken).unwrap_or(FULL);
    taken.max(ppm / 8).max(FLOOR_PPM)
}

/// A pace cut to `ppm`, `windows` windows later.
fn climb(ppm: u32, windows: u64) -> u32 {
    let windows = i32::try_from(windows.min(64)).unwrap_or(64);
    let climbed = f64::from(ppm.max(FLOOR_PPM)) * GROWTH.powi(windows);
    if climbed >= f64::from(FULL) {
        FULL
    } else {
        climbed as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_takes_the_share_taken_at_most_an_eighth_and_time_climbs_back() {
        // 30% shed: 70% kept; 96% shed: an eighth; all shed from the floor: the floor.
        assert_eq!(cut(FULL, 1000, 300), 700_000);
        assert_eq!(cut(FULL, 1000, 960), FULL / 8);
        assert_eq!(cut(FLOOR_PPM, 100, 100), FLOOR_PPM);
        // From the floor back to full pace within 4.2 s of the last cut.
        assert_eq!(climb(FLOOR_PPM, 0), FLOOR_PPM);
        assert_eq!(climb(FLOOR_PPM, 1), 125);
        assert!(climb(FLOOR_PPM, 41) < FULL);
        assert_eq!(climb(FLOOR_PPM, 42), FULL);
        assert_eq!(climb(FULL / 2, 4), FULL);
    }

    #[test]
    fn windows_are_judged_on_enough_current_copies_and_a_cut_ignores_older_ones() {
        let pace = Arc::new(Pace::new("r".into(), Gauge::noop()));
        let made = |n: usize| -> Vec<Paced> {
            (0..n)
                .map(|_| pace.admits(|| 0).expect("admitted").1)
                .collect()
        };
        // Too few acknowledgements: one shed copy of a quiet rule is no signal.
        let before = made(40);
        for p in before.iter().take(MIN_ACKS as usize - 1).cloned() {
            p.acknowledged(true).settle();
        }
        pace.wait(WINDOW);
        pace.settle();
        assert_eq!(pace.ppm(), FULL);
        // Enough, after a window: 31 of 40 shed, the share taken.
        for (i, p) in before
            .iter()
            .skip(MIN_ACKS as usize - 1)
            .cloned()
            .enumerate()
        {
            p.acknowledged(i % 3 != 0);
        }
        pace.settle();
        assert_eq!(pace.ppm(), FULL * 9 / 40);
        let cut_to = pace.ppm();
        // Copies made before the cut, all shed, are not judged again.
        for p in made(0).into_iter().chain(before.into_iter().take(20)) {
            p.acknowledged(true);
        }
        pace.wait(WINDOW);
        pace.settle();
        assert!(pace.ppm() >= cut_to, "{} < {cut_to}", pace.ppm());
        // The draw decides below full pace; time alone brings the pace back.
        assert!(pace.admits(|| FULL - 1).is_none());
        assert!(pace.admits(|| 0).is_some());
        pace.wait(WINDOW * 6);
        assert!(pace.admits(|| FULL - 1).is_some(), "it climbed with time");
        assert_eq!(pace.ppm(), FULL);
    }
}
