//! The disk spool (`gateway.spool`): where copies wait while no gateway is reachable.
//!
//! Off by default. With a spool, a copy that finds no live link is written to disk instead of
//! being dropped as `no_uplink`, and is sent when a link returns, behind live traffic.
//!
//! ```text
//!   uplink, no live link ──append──▶ spool-…0007.twa  spool-…0008.twa  [spool-…0009.twa, open]
//!   uplink, link back    ◀──lease─── oldest sealed segment, sent in batches, deleted once settled
//! ```
//!
//! **Format.** Segments are native archive files (`docs/archive.md`), uncompressed, named
//! `spool-<seq>.twa`, so `teeway archive inspect` and `teeway replay` read a spool directory as
//! they read an archive. Each record carries its checksums: a segment cut short by a crash loses
//! only its torn tail, and a corrupt record is skipped and counted, never sent.
//!
//! **Bounds.** Disk use is bounded by `max_bytes`: when an append takes the spool over it, the
//! oldest segments are deleted and their records counted as `evicted` (a segment being sent is
//! never evicted, so the spool may exceed `max_bytes` by that one segment). Memory is bounded by
//! one segment ([`segment_bytes`] of `max_bytes`) being sent at a time. All file work runs on
//! blocking threads, never on the uplink's task.
//!
//! **Accounting.** A copy written here leaves the agent's request identity as `spooled`
//! ([`crate::metrics`]); from there:
//!
//! ```text
//! teeway_agent_mirror_spooled_total + teeway_agent_spool_recovered_total
//!   = teeway_agent_spool_sent_total + sum(teeway_agent_spool_dropped_total{reason})
//!     + teeway_agent_spool_pending
//! ```
//!
//! `recovered` counts the records found on disk at start (a previous run's spool); `pending` is
//! the records on disk or on their way from it. A segment is deleted only once every record in
//! it is settled (acknowledged, refused, or lost with its link), so a crash while sending resends
//! that segment's records: delivery from the spool is at least once across crashes, exactly
//! once otherwise. At shutdown, records leased but not yet sent are written back.
//!
//! **Durability.** Appends reach the operating system at once (a killed agent loses nothing it
//! counted as spooled); segments are synced to the device when sealed, so a machine crash can
//! lose at most the unsealed tail.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use metrics::{Counter, Gauge};

use teeway_archive::native::{self, Next, SegmentReader};
use teeway_archive::Envelope;
use teeway_runtime::logging::Throttle;
use teeway_runtime::metrics::Registry;
use teeway_wire::frame::PREFIX_LEN;
use teeway_wire::Frame;

/// Records found in the spool directory at start.
pub const SPOOL_RECOVERED_TOTAL: &str = "teeway_agent_spool_recovered_total";
/// Spooled records acknowledged by a gateway.
pub const SPOOL_SENT_TOTAL: &str = "teeway_agent_spool_sent_total";
/// Spooled records given up, by reason.
pub const SPOOL_DROPPED_TOTAL: &str = "teeway_agent_spool_dropped_total";
/// Records in the spool: on disk, or on their way from it.
pub const SPOOL_PENDING: &str = "teeway_agent_spool_pending";
/// Bytes of spool segments on disk.
pub const SPOOL_BYTES: &str = "teeway_agent_spool_bytes";

/// Smallest `max_bytes` accepted: a few segments of [`MIN_SEGMENT_BYTES`].
pub const MIN_SPOOL_BYTES: u64 = 1024 * 1024;
const MIN_SEGMENT_BYTES: u64 = 128 * 1024;
const MAX_SEGMENT_BYTES: u64 = 8 * 1024 * 1024;
const PREFIX: &str = "spool-";
const SUFFIX: &str = ".twa";

/// Size at which a segment is sealed: an eighth of `max_bytes`, between 128 KiB and 8 MiB, so
/// eviction frees space in steps of at most an eighth and a segment being sent bounds memory.
pub fn segment_bytes(max_bytes: u64) -> u64 {
    (max_bytes / 8).clamp(MIN_SEGMENT_BYTES, MAX_SEGMENT_BYTES)
}

/// `gateway.spool`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolConfig {
    /// Directory of the segments; created when missing.
    pub dir: PathBuf,
    /// Disk budget; the oldest segments are evicted over it.
    pub max_bytes: u64,
}

/// Why spooled records were given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpoolDrop {
    /// Deleted with the oldest segment to keep the spool within `max_bytes`.
    Evicted,
    /// Unreadable on disk (checksum mismatch, torn tail).
    Corrupt,
    /// The gateway refused the batch that carried them.
    Rejected,
    /// The link failed before the gateway acknowledged them.
    UplinkError,
    /// The agent stopped with them on the wire.
    Shutdown,
    /// They could not be written back to disk at shutdown.
    IoError,
}

impl SpoolDrop {
    const ALL: [SpoolDrop; 6] = [
        SpoolDrop::Evicted,
        SpoolDrop::Corrupt,
        SpoolDrop::Rejected,
        SpoolDrop::UplinkError,
        SpoolDrop::Shutdown,
        SpoolDrop::IoError,
    ];

    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            SpoolDrop::Evicted => "evicted",
            SpoolDrop::Corrupt => "corrupt",
            SpoolDrop::Rejected => "rejected",
            SpoolDrop::UplinkError => "uplink_error",
            SpoolDrop::Shutdown => "shutdown",
            SpoolDrop::IoError => "io_error",
        }
    }
}

/// The spool's metric handles, registered before the spool is opened (opening blocks; the
/// registry stays with the caller).
pub struct SpoolMetrics {
    recovered: Counter,
    sent: Counter,
    dropped: [Counter; 6],
    pending: Gauge,
    bytes: Gauge,
}

impl SpoolMetrics {
    /// Registers the spool's metrics.
    pub fn new(registry: &Registry) -> Self {
        Self {
            recovered: registry.counter(
                SPOOL_RECOVERED_TOTAL,
                "Records found in the spool directory at start",
                &[],
            ),
            sent: registry.counter(
                SPOOL_SENT_TOTAL,
                "Spooled records acknowledged by a gateway",
                &[],
            ),
            dropped: SpoolDrop::ALL.map(|r| {
                registry.counter(
                    SPOOL_DROPPED_TOTAL,
                    "Spooled records given up, by reason",
                    &[("reason", r.as_str())],
                )
            }),
            pending: registry.gauge(
                SPOOL_PENDING,
                "Records in the spool, on disk or on their way from it",
                &[],
            ),
            bytes: registry.gauge(SPOOL_BYTES, "Bytes of spool segments on disk", &[]),
        }
    }

    fn drop_records(&self, reason: SpoolDrop, n: u64) {
        if n == 0 {
            return;
        }
        self.dropped[reason as usize].increment(n);
        self.pending.decrement(n as f64);
    }
}

/// A handle on the spool; clones share it.
#[derive(Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

struct Inner {
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    metrics: SpoolMetrics,
    /// Evictions, logged in summary: a long outage evicts a segment per eighth of `max_bytes`.
    evict_log: Throttle,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Sealed segments, oldest first.
    sealed: VecDeque<Segment>,
    /// The segment appends go to.
    open: Option<OpenSegment>,
    next_seq: u64,
    /// Bytes of every segment on disk, the open one included.
    disk_bytes: u64,
}

struct Segment {
    seq: u64,
    bytes: u64,
    /// Readable records it holds.
    records: u64,
    /// Being sent: not evicted, not leased again.
    leased: bool,
}

struct OpenSegment {
    segment: Segment,
    file: File,
}

impl Spool {
    /// Opens the spool in `config.dir` (created when missing) and takes stock of what a previous
    /// run left there: every readable record counts as `recovered` and pending, every unreadable
    /// one as `recovered` and dropped `corrupt`. Blocking.
    pub fn open(config: &SpoolConfig, metrics: SpoolMetrics) -> io::Result<Self> {
        fs::create_dir_all(&config.dir).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot create gateway.spool.dir {}: {e}",
                    config.dir.display()
                ),
            )
        })?;
        let mut state = State::default();
        let mut found: Vec<(u64, PathBuf)> = Vec::new();
        for entry in fs::read_dir(&config.dir)? {
            let path = entry?.path();
            if let Some(seq) = seq_of(&path) {
                found.push((seq, path));
            }
        }
        found.sort_unstable();
        for (seq, path) in found {
            let bytes = fs::metadata(&path)?.len();
            let scan = read_segment(&path);
            let bad = scan.bad;
            let good = scan.records.len() as u64;
            metrics.recovered.increment(good + bad);
            metrics.pending.increment((good + bad) as f64);
            metrics.drop_records(SpoolDrop::Corrupt, bad);
            if let Some(why) = &scan.problem {
                tracing::warn!(segment = %path.display(), records = good, unreadable = bad, %why, "spool segment partly unreadable; its readable records are kept");
            }
            state.next_seq = state.next_seq.max(seq + 1);
            if good == 0 {
                let _ = fs::remove_file(&path);
                continue;
            }
            state.disk_bytes += bytes;
            state.sealed.push_back(Segment {
                seq,
                bytes,
                records: good,
                leased: false,
            });
        }
        metrics.bytes.set(state.disk_bytes as f64);
        let recovered: u64 = state.sealed.iter().map(|s| s.records).sum();
        if recovered > 0 {
            tracing::info!(dir = %config.dir.display(), records = recovered, segments = state.sealed.len(), "spool holds copies from a previous run; they are sent when a gateway is reachable");
        }
        let spool = Self {
            inner: Arc::new(Inner {
                dir: config.dir.clone(),
                max_bytes: config.max_bytes,
                segment_bytes: segment_bytes(config.max_bytes),
                metrics,
                evict_log: Throttle::named("spool segments evicted over max_bytes"),
                state: Mutex::new(state),
            }),
        };
        Ok(spool)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is plain bookkeeping: a panic elsewhere leaves it usable.
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether any record waits on disk (sealed or not), not counting leased segments.
    pub fn has_records(&self) -> bool {
        let state = self.lock();
        state.sealed.iter().any(|s| !s.leased)
            || state.open.as_ref().is_some_and(|o| o.segment.records > 0)
    }

    /// Writes `records` (`ENVELOPE` frames, as the tee made them) as new spooled records; on error nothing of them is kept. Then evicts
    /// the oldest segments while the spool is over `max_bytes`. Blocking.
    pub fn append(&self, records: Vec<Bytes>) -> io::Result<()> {
        let n = records.len() as u64;
        self.write(records)?;
        self.inner.metrics.pending.increment(n as f64);
        self.evict();
        Ok(())
    }

    /// Writes records leased and not sent back to the spool (at shutdown); they stay pending.
    fn put_back(&self, records: Vec<Bytes>) -> io::Result<()> {
        self.write(records)
    }

    fn write(&self, records: Vec<Bytes>) -> io::Result<()> {
        let n = records.len() as u64;
        if n == 0 {
            return Ok(());
        }
        let mut buf = BytesMut::new();
        for frame in records {
            // A frame's body is a record's payload: stored as it is.
            native::put_frame_body(frame.get(PREFIX_LEN..).unwrap_or_default(), &mut buf);
        }
        let mut state = self.lock();
        if state.open.is_none() {
            let seq = state.next_seq;
            state.next_seq += 1;
            let path = self.path_of(seq);
            let mut file = OpenOptions::new()
                .create_new(true)
                .write(true)
                .open(&path)?;
            let mut header = BytesMut::new();
            native::put_segment_header(&mut header);
            if let Err(e) = file.write_all(&header) {
                let _ = fs::remove_file(&path);
                return Err(e);
            }
            state.disk_bytes += header.len() as u64;
            state.open = Some(OpenSegment {
                segment: Segment {
                    seq,
                    bytes: header.len() as u64,
                    records: 0,
                    leased: false,
                },
                file,
            });
        }
        let Some(open) = state.open.as_mut() else {
            return Err(io::Error::other("no open spool segment"));
        };
        if let Err(e) = open.file.write_all(&buf) {
            // Cut back what part of the batch reached the file, so that the segment holds
            // exactly the records counted in it, then start a fresh one next time.
            let _ = open.file.set_len(open.segment.bytes);
            self.seal(&mut state);
            return Err(e);
        }
        open.segment.bytes += buf.len() as u64;
        open.segment.records += n;
        state.disk_bytes += buf.len() as u64;
        self.inner.metrics.bytes.set(state.disk_bytes as f64);
        if state
            .open
            .as_ref()
            .is_some_and(|o| o.segment.bytes >= self.inner.segment_bytes)
        {
            self.seal(&mut state);
        }
        Ok(())
    }

    /// Closes the open segment (synced to the device) and queues it for sending.
    fn seal(&self, state: &mut State) {
        let Some(open) = state.open.take() else {
            return;
        };
        if let Err(e) = open.file.sync_data() {
            tracing::warn!(error = %e, "cannot sync a spool segment; it is kept as written");
        }
        if open.segment.records == 0 {
            state.disk_bytes -= open.segment.bytes;
            let _ = fs::remove_file(self.path_of(open.segment.seq));
            self.inner.metrics.bytes.set(state.disk_bytes as f64);
            return;
        }
        state.sealed.push_back(open.segment);
    }

    /// Deletes the oldest segments not being sent while the spool is over `max_bytes`.
    fn evict(&self) {
        let mut state = self.lock();
        while state.disk_bytes > self.inner.max_bytes {
            let Some(i) = state.sealed.iter().position(|s| !s.leased) else {
                // Only the open segment (or leased ones) left: seal the open one so that the
                // next pass can evict it; if there is nothing to seal, stop.
                if state.open.is_some() {
                    self.seal(&mut state);
                    continue;
                }
                break;
            };
            let Some(victim) = state.sealed.remove(i) else {
                break;
            };
            if let Err(e) = fs::remove_file(self.path_of(victim.seq)) {
                tracing::warn!(error = %e, segment = victim.seq, "cannot delete an evicted spool segment");
            }
            state.disk_bytes -= victim.bytes;
            self.inner
                .metrics
                .drop_records(SpoolDrop::Evicted, victim.records);
            if let Some(segments) = self.inner.evict_log.note() {
                tracing::warn!(
                    segments,
                    max_bytes = self.inner.max_bytes,
                    "spool full: oldest segments evicted (one line a minute at most; see {SPOOL_DROPPED_TOTAL}{{reason=\"evicted\"}})"
                );
            }
        }
        self.inner.metrics.bytes.set(state.disk_bytes as f64);
    }

    /// Leases the oldest segment for sending (sealing the open one when it is all there is) and
    /// reads its records. `None` when the spool is empty. Blocking.
    pub fn lease_oldest(&self) -> Option<Lease> {
        let (seq, expected) = {
            let mut state = self.lock();
            if !state.sealed.iter().any(|s| !s.leased) {
                self.seal(&mut state);
            }
            let segment = state.sealed.iter_mut().find(|s| !s.leased)?;
            segment.leased = true;
            (segment.seq, segment.records)
        };
        let path = self.path_of(seq);
        let mut scan = read_segment(&path);
        // Records past the count were never counted (a failed write's remains); missing ones
        // went bad on disk since they were written.
        scan.records.truncate(expected as usize);
        let missing = expected - scan.records.len() as u64;
        if missing > 0 {
            tracing::warn!(segment = %path.display(), missing, why = scan.problem.as_deref().unwrap_or("fewer records than written"), "spool records unreadable; counted as corrupt");
            self.inner.metrics.drop_records(SpoolDrop::Corrupt, missing);
        }
        Some(Lease {
            file: Arc::new(LeasedFile {
                spool: self.clone(),
                seq,
            }),
            records: scan.records,
        })
    }

    /// Deletes a leased segment whose records are all settled.
    fn release(&self, seq: u64) {
        let mut state = self.lock();
        if let Some(i) = state.sealed.iter().position(|s| s.seq == seq) {
            if let Some(segment) = state.sealed.remove(i) {
                state.disk_bytes -= segment.bytes;
            }
        }
        self.inner.metrics.bytes.set(state.disk_bytes as f64);
        drop(state);
        if let Err(e) = fs::remove_file(self.path_of(seq)) {
            tracing::warn!(error = %e, segment = seq, "cannot delete a sent spool segment; its records may be sent again after a restart");
        }
    }

    fn path_of(&self, seq: u64) -> PathBuf {
        self.inner.dir.join(format!("{PREFIX}{seq:020}{SUFFIX}"))
    }
}

/// The sequence number in a spool segment's file name.
fn seq_of(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    name.strip_prefix(PREFIX)?
        .strip_suffix(SUFFIX)?
        .parse()
        .ok()
}

struct Scan {
    records: Vec<Bytes>,
    /// Records known to be unreadable.
    bad: u64,
    problem: Option<String>,
}

fn read_segment(path: &Path) -> Scan {
    let mut scan = Scan {
        records: Vec::new(),
        bad: 0,
        problem: None,
    };
    let reader = File::open(path).and_then(|f| SegmentReader::new(BufReader::new(f)));
    let mut reader = match reader {
        Ok(r) => r,
        Err(e) => {
            scan.problem = Some(e.to_string());
            return scan;
        }
    };
    loop {
        match reader.next_record() {
            Next::Record(Envelope::HttpResponse(_) | Envelope::Other { .. }) => {
                scan.bad += 1;
                scan.problem =
                    Some("a record of a kind this agent does not send in a spool segment".into());
            }
            // A copy, spooled by this version (as it was encoded) or an older one (as a
            // request record): sent as an `ENVELOPE` frame. (Read back after a restart, it is
            // decoded and encoded again: the rare path.)
            Next::Record(envelope) => {
                let mut frame = BytesMut::new();
                Frame::Envelope(envelope).encode(&mut frame);
                scan.records.push(frame.freeze());
            }
            Next::End => break,
            Next::Skipped { why, .. } => {
                scan.bad += 1;
                scan.problem = Some(why);
            }
            Next::Stopped { why, .. } => {
                // How many records the unreadable rest held cannot be known; it held one at least.
                scan.bad += 1;
                scan.problem = Some(why);
                break;
            }
        }
    }
    scan
}

/// A segment's records, leased for sending.
pub struct Lease {
    file: Arc<LeasedFile>,
    /// Its readable records, oldest first.
    pub records: Vec<Bytes>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("segment", &self.file.seq)
            .field("records", &self.records.len())
            .finish()
    }
}

impl Lease {
    /// The account of `n` of the lease's records, sent together.
    pub fn share(&self, n: usize) -> Share {
        Share {
            file: Some(self.file.clone()),
            n: n as u64,
        }
    }

    /// Writes records taken from the lease and never sent back to the spool, where they stay
    /// pending (shutdown came first). Blocking.
    pub fn put_back(&self, records: Vec<Bytes>) {
        let n = records.len() as u64;
        if let Err(e) = self.file.spool.put_back(records) {
            tracing::warn!(error = %e, records = n, "cannot write leased records back to the spool; counted as io_error");
            self.file
                .spool
                .inner
                .metrics
                .drop_records(SpoolDrop::IoError, n);
        }
    }
}

/// The segment file behind a lease: deleted when the last share of it is settled.
struct LeasedFile {
    spool: Spool,
    seq: u64,
}

impl Drop for LeasedFile {
    fn drop(&mut self) {
        let spool = self.spool.clone();
        let seq = self.seq;
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn_blocking(move || spool.release(seq));
            }
            Err(_) => spool.release(seq),
        }
    }
}

/// The account of spooled records sent together in one batch. Settled exactly once; dropped
/// unsettled (an aborted batch), its records count as `shutdown`.
pub struct Share {
    file: Option<Arc<LeasedFile>>,
    n: u64,
}

impl Share {
    /// How many records it accounts for.
    pub fn len(&self) -> u64 {
        self.n
    }

    /// Whether it accounts for none.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The gateway acknowledged the first `accepted` records and refused the rest.
    pub fn acknowledged(mut self, accepted: u64) {
        if let Some(file) = self.file.take() {
            let m = &file.spool.inner.metrics;
            let sent = accepted.min(self.n);
            m.sent.increment(sent);
            m.pending.decrement(sent as f64);
            m.drop_records(SpoolDrop::Rejected, self.n - sent);
        }
    }

    /// The records were given up.
    pub fn dropped(mut self, reason: SpoolDrop) {
        if let Some(file) = self.file.take() {
            file.spool.inner.metrics.drop_records(reason, self.n);
        }
    }

    /// Writes `records` (the ones this share accounts for, never sent) back to the spool, where
    /// they stay pending (shutdown came first). Blocking.
    pub fn put_back(mut self, records: Vec<Bytes>) {
        if let Some(file) = self.file.take() {
            if let Err(e) = file.spool.put_back(records) {
                tracing::warn!(error = %e, records = self.n, "cannot write leased records back to the spool; counted as io_error");
                file.spool
                    .inner
                    .metrics
                    .drop_records(SpoolDrop::IoError, self.n);
            }
        }
    }
}

impl std::fmt::Debug for Share {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Share").field("records", &self.n).finish()
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        if let Some(file) = self.file.take() {
            file.spool
                .inner
                .metrics
                .drop_records(SpoolDrop::Shutdown, self.n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use teeway_runtime::metrics::Snapshot;

    fn copy(id: u64, body: usize) -> teeway_wire::MirroredRequest {
        teeway_wire::MirroredRequest {
            meta: teeway_wire::Meta::basic(
                id,
                std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(id),
                "prod".into(),
            ),
            method: http::Method::POST,
            uri: format!("/items/{id}").parse().expect("uri"),
            version: http::Version::HTTP_11,
            headers: http::HeaderMap::new(),
            body: vec![b'x'; body].into(),
            trailers: None,
            body_truncated: false,
            production: None,
        }
    }

    /// A copy's `ENVELOPE` frame, as the tee makes it.
    fn request(id: u64, body: usize) -> Bytes {
        let mut frame = BytesMut::new();
        Frame::Envelope(Envelope::HttpRequest(copy(id, body))).encode(&mut frame);
        frame.freeze()
    }

    fn id_of(frame: &Bytes) -> u64 {
        match Frame::decode(&mut BytesMut::from(&frame[..])) {
            Ok(Some(Frame::Envelope(e))) => e.meta().id,
            other => panic!("not an envelope frame: {other:?}"),
        }
    }

    struct Fixture {
        dir: tempfile::TempDir,
        registry: Registry,
    }

    impl Fixture {
        fn new() -> Self {
            Self {
                dir: tempfile::tempdir().expect("tempdir"),
                registry: Registry::new(),
            }
        }

        fn open(&self, max_bytes: u64) -> Spool {
            let config = SpoolConfig {
                dir: self.dir.path().to_owned(),
                max_bytes,
            };
            Spool::open(&config, SpoolMetrics::new(&self.registry)).expect("open")
        }

        fn metrics(&self) -> Snapshot {
            Snapshot::parse(&self.registry.render())
        }

        /// `appended + recovered = sent + dropped + pending`, with `appended` known to the test.
        fn assert_identity(&self, appended: u64) {
            let m = self.metrics();
            assert_eq!(
                appended as f64 + m.get(SPOOL_RECOVERED_TOTAL),
                m.get(SPOOL_SENT_TOTAL) + m.sum(SPOOL_DROPPED_TOTAL) + m.get(SPOOL_PENDING),
                "spool identity"
            );
        }

        fn dropped(&self, reason: &str) -> f64 {
            self.metrics()
                .get(&format!("{SPOOL_DROPPED_TOTAL}{{reason=\"{reason}\"}}"))
        }
    }

    #[test]
    fn records_come_back_in_order_and_the_segment_goes_once_settled() {
        let f = Fixture::new();
        let spool = f.open(64 * 1024 * 1024);
        spool
            .append((0..10).map(|i| request(i, 100)).collect())
            .expect("append");
        spool
            .append((10..20).map(|i| request(i, 100)).collect())
            .expect("append");
        assert!(spool.has_records());
        assert_eq!(f.metrics().get(SPOOL_PENDING), 20.0);
        let lease = spool.lease_oldest().expect("lease");
        let ids: Vec<u64> = lease.records.iter().map(id_of).collect();
        assert_eq!(ids, (0..20).collect::<Vec<_>>());
        assert_eq!(lease.records[3], request(3, 100), "byte for byte");
        assert!(!spool.has_records());
        let a = lease.share(15);
        let b = lease.share(5);
        drop(lease);
        a.acknowledged(15);
        assert_eq!(
            fs::read_dir(f.dir.path()).expect("dir").count(),
            1,
            "kept until every share is settled"
        );
        b.acknowledged(3);
        assert_eq!(
            fs::read_dir(f.dir.path()).expect("dir").count(),
            0,
            "deleted once settled"
        );
        assert_eq!(f.metrics().get(SPOOL_SENT_TOTAL), 18.0);
        assert_eq!(f.dropped("rejected"), 2.0);
        assert_eq!(f.metrics().get(SPOOL_PENDING), 0.0);
        assert_eq!(f.metrics().get(SPOOL_BYTES), 0.0);
        f.assert_identity(20);
        assert!(spool.lease_oldest().is_none());
    }

    #[test]
    fn over_max_bytes_the_oldest_records_are_evicted_and_counted() {
        let f = Fixture::new();
        let max = MIN_SPOOL_BYTES;
        let spool = f.open(max);
        // 4 KiB records: 1 MiB / 128 KiB segments, so 32 records per segment.
        let total = 1000u64;
        for chunk in 0..total / 10 {
            spool
                .append(
                    (chunk * 10..chunk * 10 + 10)
                        .map(|i| request(i, 4096))
                        .collect(),
                )
                .expect("append");
            assert!(
                f.metrics().get(SPOOL_BYTES) <= max as f64,
                "disk use within max_bytes"
            );
        }
        let evicted = f.dropped("evicted");
        assert!(evicted > 0.0, "something was evicted");
        f.assert_identity(total);
        // What is left is the newest records, oldest of them first.
        let mut ids = Vec::new();
        while let Some(lease) = spool.lease_oldest() {
            ids.extend(lease.records.iter().map(id_of));
            let share = lease.share(lease.records.len());
            share.acknowledged(u64::MAX);
        }
        assert_eq!(ids.len() as f64, total as f64 - evicted);
        assert_eq!(ids.last(), Some(&(total - 1)));
        assert!(
            ids.windows(2).all(|w| w[1] == w[0] + 1),
            "contiguous, oldest evicted"
        );
        f.assert_identity(total);
    }

    #[test]
    fn a_restart_recovers_the_records_and_counts_a_torn_tail() {
        let f = Fixture::new();
        {
            let spool = f.open(64 * 1024 * 1024);
            spool
                .append((0..5).map(|i| request(i, 10)).collect())
                .expect("append");
        }
        // A crash mid-write: half a record after the five.
        let path = fs::read_dir(f.dir.path())
            .expect("dir")
            .next()
            .expect("a segment")
            .expect("entry")
            .path();
        let mut torn = BytesMut::new();
        native::put_record(&Envelope::HttpRequest(copy(5, 10)), &mut torn);
        let mut file = OpenOptions::new().append(true).open(&path).expect("open");
        file.write_all(&torn[..torn.len() / 2]).expect("write");
        drop(file);

        let registry = Registry::new();
        let config = SpoolConfig {
            dir: f.dir.path().to_owned(),
            max_bytes: 64 * 1024 * 1024,
        };
        let spool = Spool::open(&config, SpoolMetrics::new(&registry)).expect("reopen");
        let m = Snapshot::parse(&registry.render());
        assert_eq!(m.get(SPOOL_RECOVERED_TOTAL), 6.0);
        assert_eq!(
            m.get(&format!("{SPOOL_DROPPED_TOTAL}{{reason=\"corrupt\"}}")),
            1.0
        );
        assert_eq!(m.get(SPOOL_PENDING), 5.0);
        let lease = spool.lease_oldest().expect("lease");
        assert_eq!(lease.records.len(), 5);
        // Shutdown before sending: the records are written back, still pending.
        let share = lease.share(5);
        share.put_back(lease.records.clone());
        drop(lease);
        let m = Snapshot::parse(&registry.render());
        assert_eq!(m.get(SPOOL_PENDING), 5.0);
        let again = spool.lease_oldest().expect("the records are back");
        assert_eq!(again.records.len(), 5);
    }

    #[test]
    fn an_unsettled_share_counts_as_shutdown() {
        let f = Fixture::new();
        let spool = f.open(64 * 1024 * 1024);
        spool
            .append(vec![request(1, 1), request(2, 1)])
            .expect("append");
        let lease = spool.lease_oldest().expect("lease");
        let share = lease.share(2);
        drop(lease);
        drop(share);
        assert_eq!(f.dropped("shutdown"), 2.0);
        f.assert_identity(2);
    }
}
