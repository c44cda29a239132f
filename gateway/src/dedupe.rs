//! Which batches were received already, so that a batch an agent sends again (its ACK was lost
//! or late) is acknowledged and not replayed twice.
//!
//! Agents of protocol 3 open each batch with a `BATCH` frame naming it: a random session per
//! agent process and a sequence number per batch. The gateway keeps, per (agent identity,
//! session), which of the last [`WINDOW`] sequence numbers it has received, as a bitmap (8 KiB a
//! session), for at most [`MAX_SESSIONS`] sessions (the least recently seen is forgotten first).
//! A batch older than the window, or of a session forgotten, or arriving at a gateway that
//! restarted (the memory dies with the process), cannot be told from a new one: it is replayed,
//! and when the agent marked it as sent before, counted as `retried` (a possible duplicate).
//! `docs/protocol.md` states the guarantee.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Sequence numbers remembered per session: at 1,000 batches a second, a minute's worth.
pub const WINDOW: u64 = 65_536;
/// Sessions remembered at once.
pub const MAX_SESSIONS: usize = 4_096;

/// What the gateway makes of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not received before: dispatch it.
    New,
    /// Received already: acknowledge it, dispatch nothing.
    Duplicate,
    /// Older than what is remembered: dispatched (it may be a duplicate).
    Unknown,
}

struct Window {
    highest: u64,
    bits: Box<[u64]>,
    /// When the session was last seen, on the memory's own clock (a count of marks).
    last_seen: u64,
}

impl Window {
    fn new(seq: u64, now: u64) -> Self {
        let mut w = Self {
            highest: seq,
            bits: vec![0u64; (WINDOW / 64) as usize].into_boxed_slice(),
            last_seen: now,
        };
        w.set(seq);
        w
    }

    fn index(seq: u64) -> (usize, u64) {
        let slot = seq % WINDOW;
        ((slot / 64) as usize, 1u64 << (slot % 64))
    }

    fn set(&mut self, seq: u64) {
        let (word, bit) = Self::index(seq);
        self.bits[word] |= bit;
    }

    fn is_set(&self, seq: u64) -> bool {
        let (word, bit) = Self::index(seq);
        self.bits[word] & bit != 0
    }

    fn mark(&mut self, seq: u64, now: u64) -> Verdict {
        self.last_seen = now;
        if seq > self.highest {
            // Forget the slots the window moves past (all of them in one fill when it jumps).
            let moved = seq - self.highest;
            if moved >= WINDOW {
                self.bits.fill(0);
            } else {
                for s in (seq - moved + 1)..=seq {
                    let (word, bit) = Self::index(s);
                    self.bits[word] &= !bit;
                }
            }
            self.highest = seq;
            self.set(seq);
            return Verdict::New;
        }
        if self.highest - seq >= WINDOW {
            return Verdict::Unknown;
        }
        if self.is_set(seq) {
            return Verdict::Duplicate;
        }
        self.set(seq);
        Verdict::New
    }
}

/// The gateway's memory of batches received.
#[derive(Default)]
pub struct Dedupe {
    sessions: Mutex<Sessions>,
}

#[derive(Default)]
struct Sessions {
    windows: HashMap<(Arc<str>, u64), Window>,
    clock: u64,
}

impl std::fmt::Debug for Dedupe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dedupe").finish_non_exhaustive()
    }
}

impl Dedupe {
    /// Records batch `seq` of `session` from `identity` as received; what it was.
    pub fn mark(&self, identity: &Arc<str>, session: u64, seq: u64) -> Verdict {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        sessions.clock += 1;
        let now = sessions.clock;
        if let Some(window) = sessions.windows.get_mut(&(identity.clone(), session)) {
            return window.mark(seq, now);
        }
        if sessions.windows.len() >= MAX_SESSIONS {
            let oldest = sessions
                .windows
                .iter()
                .min_by_key(|(_, w)| w.last_seen)
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                sessions.windows.remove(&oldest);
            }
        }
        sessions
            .windows
            .insert((identity.clone(), session), Window::new(seq, now));
        Verdict::New
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_new_once_and_then_a_duplicate_within_the_window() {
        let d = Dedupe::default();
        let id: Arc<str> = "prod".into();
        assert_eq!(d.mark(&id, 7, 1), Verdict::New);
        assert_eq!(d.mark(&id, 7, 3), Verdict::New);
        assert_eq!(d.mark(&id, 7, 2), Verdict::New, "out of order is still new");
        assert_eq!(d.mark(&id, 7, 3), Verdict::Duplicate);
        assert_eq!(d.mark(&id, 8, 3), Verdict::New, "another session");
        let other: Arc<str> = "other".into();
        assert_eq!(d.mark(&other, 7, 3), Verdict::New, "another identity");
        // The window moves on: what it left behind cannot be told.
        assert_eq!(d.mark(&id, 7, 3 + WINDOW), Verdict::New);
        assert_eq!(d.mark(&id, 7, 3), Verdict::Unknown);
        assert_eq!(
            d.mark(&id, 7, 4 + WINDOW / 2),
            Verdict::New,
            "a slot cleared as it moved"
        );
        assert_eq!(d.mark(&id, 7, 3 + WINDOW), Verdict::Duplicate);
    }

    #[test]
    fn sessions_are_bounded_and_the_least_recently_seen_forgotten() {
        let d = Dedupe::default();
        let id: Arc<str> = "prod".into();
        for session in 0..MAX_SESSIONS as u64 {
            d.mark(&id, session, 1);
        }
        assert_eq!(d.mark(&id, 1, 1), Verdict::Duplicate);
        d.mark(&id, MAX_SESSIONS as u64, 1);
        let sessions = d.sessions.lock().expect("lock").windows.len();
        assert_eq!(sessions, MAX_SESSIONS);
        assert_eq!(
            d.mark(&id, 0, 1),
            Verdict::New,
            "session 0 was the oldest: forgotten"
        );
    }
}
