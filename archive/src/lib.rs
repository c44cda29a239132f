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

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, StatusCode, Version};

pub use teeway_wire::MirroredRequest;

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

/// One archived record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A mirrored request.
    Request(MirroredRequest),
    /// A response to an archived request.
    Response(ResponseRecord),
}

impl Record {
    /// When the request (or response) was received.
    pub fn received_at(&self) -> SystemTime {
        match self {
            Record::Request(r) => r.received_at,
            Record::Response(r) => r.received_at,
        }
    }

    /// Nanoseconds since the Unix epoch of [`Record::received_at`].
    pub fn unix_nanos(&self) -> u64 {
        unix_nanos(self.received_at())
    }

    /// Bytes the record holds in memory, roughly: what a queue budget counts.
    pub fn size_hint(&self) -> usize {
        match self {
            Record::Request(r) => r.frame_len(),
            Record::Response(r) => {
                64 + r.target.len()
                    + r.body.len()
                    + r.headers
                        .iter()
                        .map(|(n, v)| n.as_str().len() + v.len() + 8)
                        .sum::<usize>()
            }
        }
    }
}

/// Who produced an archived response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseOrigin {
    /// The production service's answer (GoReplay type 2; teeway never captures these).
    Original,
    /// A shadow's answer to the replayed request (GoReplay type 3).
    Replayed,
}

/// A response, tied to its request by `request_id` and `source_cluster`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseRecord {
    /// The [`MirroredRequest::id`] of the request answered.
    pub request_id: u64,
    /// The request's source cluster.
    pub source_cluster: Arc<str>,
    /// Who answered.
    pub origin: ResponseOrigin,
    /// The shadow's URL (empty when unknown, as in GoReplay files).
    pub target: String,
    /// When the response head arrived.
    pub received_at: SystemTime,
    /// Time from sending the request to the response head.
    pub latency: Duration,
    /// Status code.
    pub status: StatusCode,
    /// HTTP version of the response.
    pub version: Version,
    /// Response headers.
    pub headers: HeaderMap,
    /// Response body, up to the archive's limit.
    pub body: Bytes,
    /// The body was cut at the archive's limit.
    pub body_truncated: bool,
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
