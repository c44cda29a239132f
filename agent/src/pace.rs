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
//! The draw follows the request's sampling key when it has one (`mirror.sample_by`): while the
//! pace holds, a paced rule copies all of a key's requests or none, as sampling does (the gateway
//! may still shed some of a chosen key's copies). A sampled request the pace
//! passes over is counted `teeway_agent_mirror_dropped_total{reason="gateway_shedding"}` (the books
//! still close); a copy's envelope carries its rate times the pace; the pace in force is the
//! gauge `teeway_agent_mirror_pace_ratio{rule}`, updated as the rule's requests and
//! acknowledgements come (an idle rule's gauge keeps its last value).
//! A reload keeps each rule's pace by name. The rule is the unit because the agent knows nothing
//! of the gateway's routes: copies of one rule that go to a fast and to a slow shadow are paced
//! together (give them rules of their own, or turn pacing off with
//! `mirror.follow_shedding: false`).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
#[cfg(not(test))]
use std::time::Instant;

use metrics::Gauge;

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
/// At most one line per this about a rule's pace being cut.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// What `admits` reads on every sampled request, on a cache line of its own: the uplink's
/// acknowledgements update the counters beside it in [`Pace`] without slowing the request path.
#[derive(Debug)]
#[repr(align(64))]
struct Hot {
    /// The pace in force (`FULL`: no draw at all).
    ppm: AtomicU32,
    /// The last cut, in one word so that a climb never reads half of one: the pace it set
    /// (high half) and when (low half, in windows since the pace was made).
    cut: AtomicU64,
    /// Bumped by every cut, after its pace is in force.
    epoch: AtomicU32,
    #[cfg(not(test))]
    born: Instant,
}

/// The share of one rule's sampled requests the agent copies; see the module docs.
#[derive(Debug)]
pub struct Pace {
    hot: Hot,
    /// For the current epoch's window being judged: copies acknowledged, how many the gateway
    /// marked, and the sum of the paces the unmarked ones were made at.
    acked: AtomicU64,
    shed: AtomicU64,
    taken_ppm: AtomicU64,
    /// When the window being gathered started (milliseconds since the pace was made); held
    /// while judging.
    window: Mutex<u64>,
    gauge: Gauge,
    rule: Arc<str>,
    /// When a cut was last logged (milliseconds since the pace was made, plus one; 0: never):
    /// one line a minute at most.
    logged_at: AtomicU64,
    /// A cut was logged and its end not yet.
    announced: AtomicBool,
    /// Milliseconds added to the clock: tests move time on with it, and only with it.
    #[cfg(test)]
    skew: AtomicU64,
}

/// A copy's place in its rule's pace: the epoch and the pace it was made at.
#[derive(Debug, Clone)]
pub struct Paced {
    pace: Arc<Pace>,
    epoch: u32,
    ppm: u32,
}

fn pack(ppm: u32, at: u32) -> u64 {
    u64::from(ppm) << 32 | u64::from(at)
}

fn unpack(cut: u64) -> (u32, u32) {
    ((cut >> 32) as u32, cut as u32)
}

impl Pace {
    /// The pace of the rule `rule`, at 100%, shown in `gauge`.
    pub fn new(rule: Arc<str>, gauge: Gauge) -> Self {
        gauge.set(1.0);
        Self {
            hot: Hot {
                ppm: AtomicU32::new(FULL),
                cut: AtomicU64::new(pack(FULL, 0)),
                epoch: AtomicU32::new(0),
                #[cfg(not(test))]
                born: Instant::now(),
            },
            acked: AtomicU64::new(0),
            shed: AtomicU64::new(0),
            taken_ppm: AtomicU64::new(0),
            window: Mutex::new(0),
            gauge,
            logged_at: AtomicU64::new(0),
            announced: AtomicBool::new(false),
            rule,
            #[cfg(test)]
            skew: AtomicU64::new(0),
        }
    }

    /// Whether the rule is copying every sampled request (no draw needed).
    #[inline]
    pub fn is_full(&self) -> bool {
        self.hot.ppm.load(Ordering::Relaxed) >= FULL
    }

    /// Whether the rule's sampled request is copied: `Some` with the pace it was admitted at.
    /// `draw` is where the request fell in its sampled share, in parts per million (from its
    /// sampling key, or random). At full pace: two atomic loads.
    #[inline]
    pub fn admits(self: &Arc<Self>, draw: impl FnOnce() -> u32) -> Option<(u32, Paced)> {
        // The epoch first: a copy that sees a cut's epoch sees its pace (stored before it).
        let epoch = self.hot.epoch.load(Ordering::Acquire);
        let mut ppm = self.hot.ppm.load(Ordering::Relaxed);
        if ppm < FULL {
            ppm = self.climbed(ppm);
            if draw() >= ppm {
                return None;
            }
        }
        let paced = Paced {
            pace: self.clone(),
            epoch,
            ppm,
        };
        Some((ppm, paced))
    }

    /// The pace after its climb since the last cut, stored unless a cut (or another climb)
    /// changed the pace since it was `seen`; then the pace in force.
    fn climbed(&self, seen: u32) -> u32 {
        let (cut_ppm, cut_at) = unpack(self.hot.cut.load(Ordering::Acquire));
        let windows = self.windows().saturating_sub(cut_at);
        let climbed = climb(cut_ppm, u64::from(windows));
        if climbed == seen {
            return seen;
        }
        if let Err(now) =
            self.hot
                .ppm
                .compare_exchange(seen, climbed, Ordering::Relaxed, Ordering::Relaxed)
        {
            return now;
        }
        self.gauge.set(f64::from(climbed) / f64::from(FULL));
        if climbed == FULL && self.announced.swap(false, Ordering::Relaxed) {
            tracing::info!(rule = %self.rule, "the gateway takes this rule's copies again: copying every sampled request");
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
        if now.saturating_sub(*started) < WINDOW.as_millis() as u64
            || self.acked.load(Ordering::Relaxed) < MIN_ACKS
        {
            return;
        }
        let acked = self.acked.swap(0, Ordering::Relaxed);
        let shed = self.shed.swap(0, Ordering::Relaxed).min(acked);
        let taken_ppm = self.taken_ppm.swap(0, Ordering::Relaxed);
        *started = now;
        if acked == 0 || shed * 100 <= acked * TOLERANCE_PERCENT {
            return;
        }
        let before = self.hot.ppm.load(Ordering::Relaxed);
        // The share the gateway took, at the paces the judged copies were made at.
        let after = cut(before, taken_ppm / acked);
        self.hot
            .cut
            .store(pack(after, self.windows()), Ordering::Release);
        self.hot.ppm.store(after, Ordering::Relaxed);
        self.hot.epoch.fetch_add(1, Ordering::Release);
        // Acknowledgements of the old epoch counted while this was judged are not the new one's.
        self.acked.store(0, Ordering::Relaxed);
        self.shed.store(0, Ordering::Relaxed);
        self.taken_ppm.store(0, Ordering::Relaxed);
        self.gauge.set(f64::from(after) / f64::from(FULL));
        let last = self.logged_at.load(Ordering::Relaxed);
        if before == FULL && (last == 0 || now + 1 >= last + LOG_EVERY.as_millis() as u64) {
            self.logged_at.store(now + 1, Ordering::Relaxed);
            self.announced.store(true, Ordering::Relaxed);
            tracing::info!(
                rule = %self.rule,
                shed,
                of = acked,
                pace = f64::from(after) / f64::from(FULL),
                "the gateway is shedding this rule's copies (its targets are full): copying fewer sampled requests, the rest counted as dropped{{reason=\"gateway_shedding\"}} (one line a minute at most, and one when it is over)"
            );
        }
    }

    /// Milliseconds since the pace was made.
    #[cfg(not(test))]
    fn millis(&self) -> u64 {
        u64::try_from(self.hot.born.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    #[cfg(test)]
    fn millis(&self) -> u64 {
        self.skew.load(Ordering::Relaxed)
    }

    /// Whole windows since the pace was made (a `u32` of them lasts 13 years).
    fn windows(&self) -> u32 {
        u32::try_from(self.millis() / WINDOW.as_millis() as u64).unwrap_or(u32::MAX)
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
        if self.epoch == self.pace.hot.epoch.load(Ordering::Acquire) {
            self.pace.acked.fetch_add(1, Ordering::Relaxed);
            if shed {
                self.pace.shed.fetch_add(1, Ordering::Relaxed);
            } else {
                self.pace
                    .taken_ppm
                    .fetch_add(u64::from(self.ppm), Ordering::Relaxed);
            }
        }
        self.pace
    }
}

/// The pace after a window in which the gateway took copies worth `taken` (the paces of the
/// copies it took, summed, over all the copies judged: the share it took, in parts per million
/// of all sampled requests), cut from `ppm`: `taken`, but at least an eighth of `ppm` and the
/// floor.
fn cut(ppm: u32, taken: u64) -> u32 {
    let taken = u32::try_from(taken).unwrap_or(FULL).min(ppm);
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
        // 70% taken: 70%; 4% taken: an eighth; nothing taken at the floor: the floor; never up.
        assert_eq!(cut(FULL, 700_000), 700_000);
        assert_eq!(cut(FULL, 40_000), FULL / 8);
        assert_eq!(cut(FLOOR_PPM, 0), FLOOR_PPM);
        assert_eq!(cut(200_000, 300_000), 200_000);
        // From the floor back to full pace within 4.2 s of the last cut.
        assert_eq!(climb(FLOOR_PPM, 0), FLOOR_PPM);
        assert_eq!(climb(FLOOR_PPM, 1), 125);
        assert!(climb(FLOOR_PPM, 41) < FULL);
        assert_eq!(climb(FLOOR_PPM, 42), FULL);
        assert_eq!(climb(FULL / 2, 4), FULL);
    }

    #[test]
    fn windows_are_judged_on_enough_current_copies_at_the_paces_they_were_made_at() {
        let pace = Arc::new(Pace::new("r".into(), Gauge::noop()));
        let made = |n: usize| -> Vec<Paced> {
            (0..n)
                .map(|_| pace.admits(|| 0).expect("admitted").1)
                .collect()
        };
        // Too few acknowledgements: one shed copy of a quiet rule is no signal.
        let first = made(40);
        for p in first[..15].iter().cloned() {
            p.acknowledged(true).settle();
        }
        pace.wait(WINDOW);
        pace.settle();
        assert_eq!(pace.ppm(), FULL);
        // Enough, after a window: 31 of 40 shed, 9 taken at full pace: the share taken.
        for (i, p) in first[15..].iter().cloned().enumerate() {
            p.acknowledged(i % 3 != 0);
        }
        pace.settle();
        assert_eq!(pace.ppm(), FULL * 9 / 40);
        // Copies made before the cut, all shed, are not judged: the next window has none.
        for p in first.into_iter().take(20) {
            p.acknowledged(true);
        }
        pace.wait(WINDOW);
        pace.settle();
        assert_eq!(pace.ppm(), FULL * 9 / 40);
        // Copies made since are: made a window after the cut (1.25x), half of them shed. The
        // cut is to half the pace they were made at, not of what the pace has climbed to since.
        let second = made(32);
        let made_at = pace.ppm();
        assert_eq!(made_at, 281_250);
        pace.wait(WINDOW * 4);
        assert!(pace.admits(|| 0).is_some());
        assert!(pace.ppm() > made_at * 2);
        for (i, p) in second.into_iter().enumerate() {
            p.acknowledged(i % 2 == 0);
        }
        pace.settle();
        assert_eq!(pace.ppm(), made_at / 2);
        // The draw decides below full pace; time alone brings the pace back.
        assert!(pace.admits(|| FULL - 1).is_none());
        assert!(pace.admits(|| 0).is_some());
        pace.wait(WINDOW * 9);
        assert!(pace.admits(|| FULL - 1).is_some(), "it climbed with time");
        assert_eq!(pace.ppm(), FULL);
    }
}
