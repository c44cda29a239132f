//! Traffic archives: mirrored requests (and optionally the shadows' responses) kept in files for
//! offline replay.
//!
//! Two formats are written and read:
//!
//! - **teeway** (native, [`native`]): segments of length-prefixed records, each with a checksum,
//!   so a reader can tell a torn tail (the writer died mid-record) from a corrupt record, and
//!   never returns either. Optionally zstd-compressed. `docs/archive.md` is its normative
//!   description.
//! - **gor** ([`gor`]): GoReplay's text format, byte-compatible in both directions, optionally
//!   gzip-compressed.
//!
//! HAR 1.2 ([`har`]) is written, for people to open captured traffic in a browser's devtools.
//!
//! # Layout
//!
//! - [`native`], [`gor`], [`har`]: the formats, sans-IO where they can be.
//! - [`frames`]: zstd files read frame by frame, so damage costs one frame.
//! - [`read`]: finding archive files, detecting format and compression, reading records in
//!   timestamp order with every skipped byte accounted for.
//! - [`write`](mod@write): the archive writer: a bounded queue in front of a dedicated thread that writes,
//!   rotates, compresses and deletes old segments; drops are counted, never waited for.
//! - [`config`]: the `archive:` block shared by `agent.yaml` and `gateway.yaml`.
//! - [`inspect`]: the summary printed by `teeway archive inspect`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use teeway_wire::{Envelope, Meta, MirroredRequest, ResponseOrigin, ResponseRecord};

pub mod config;
pub mod frames;
pub mod gor;
pub mod har;
pub mod inspect;
pub mod native;
pub mod read;
pub mod write;

pub use config::{ArchiveConfig, Compression, Format};
pub use read::{Issue, IssueKind, ReadError, Reader};
pub use write::{Archive, ArchiveDrop, Outcome};

/// Bytes `envelope` holds in memory, roughly: what a queue budget counts.
pub fn size_hint(envelope: &Envelope) -> usize {
    native::RECORD_HEADER_LEN + 1 + teeway_wire::envelope::encoded_len(envelope)
}

/// Nanoseconds since the Unix epoch (0 before it, saturating far after).
pub fn unix_nanos(t: SystemTime) -> u64 {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
}

/// FNV-1a, 64 bits: stable ids for tokens that are not ours.
pub(crate) fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}
