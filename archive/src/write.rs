//! The archive writer: a bounded queue in front of one dedicated thread that owns the files.
//!
//! [`Archive::try_submit`] never blocks and never awaits: it refuses a record when the queue
//! holds `queue` records or `queue_bytes` bytes, and the refusal is counted in
//! `teeway_archive_dropped_total{reason}`. A slow disk therefore drops records; it never slows
//! the replay path or the agent's request path. Each record ends exactly once, as written or as
//! dropped with a reason, and an optional callback hears which (the agent's accounting uses it).
//!
//! The thread writes whatever has queued up as one batch, so a record is handed to the operating
//! system (and survives the process being killed) within one batch of being queued. A segment is
//! written as `NAME.partial`, and on close it is fsynced and renamed to `NAME`; a `.partial` left
//! by a crash is renamed at the next start. Readers read `.partial` files too. With compression,
//! each batch is one zstd frame or one gzip member, so a torn last batch costs only that batch.
//! When `max_total` is set, closed segments are deleted oldest first to stay under it.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use metrics::{Counter, Gauge};

use teeway_runtime::metrics::Registry;
use teeway_wire::frame::PREFIX_LEN;

use crate::config::{ArchiveConfig, Compression, Format};
use crate::read::PARTIAL_SUFFIX;
use crate::{gor, native, Envelope};

/// Records written.
pub const RECORDS_TOTAL: &str = "teeway_archive_records_total";
/// Bytes written to disk (after compression).
pub const BYTES_TOTAL: &str = "teeway_archive_bytes_total";
/// Records not written, by reason.
pub const DROPPED_TOTAL: &str = "teeway_archive_dropped_total";
/// Segments closed.
pub const SEGMENTS_TOTAL: &str = "teeway_archive_segments_total";
/// Segments deleted to stay under `max_total`.
pub const SEGMENTS_DELETED_TOTAL: &str = "teeway_archive_segments_deleted_total";
/// Bytes of records waiting for the disk.
pub const QUEUED_BYTES: &str = "teeway_archive_queued_bytes";

/// Most records written as one batch.
const MAX_BATCH_RECORDS: usize = 1024;
/// Most bytes written as one batch (before compression).
const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// How often the writer thread looks at the clock when idle (age rotation, shutdown).
const TICK: Duration = Duration::from_millis(100);
/// zstd level: fast, and several times smaller than plain HTTP text.
const ZSTD_LEVEL: i32 = 3;
/// Minimum time between two logs of the same write failure.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// After a write error (a full disk, say), records are dropped without touching the disk for
/// this long: retrying every batch would create and abandon files at request rate.
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(1);

/// Why a record was not written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveDrop {
    /// The queue held `queue` records.
    QueueFull,
    /// The queue held `queue_bytes` bytes.
    QueueBytes,
    /// Writing failed (disk full, permissions...).
    Io,
    /// The archive was closing.
    Shutdown,
    /// The archive's format cannot hold it (`gor`: anything but HTTP).
    NotInFormat,
}

impl ArchiveDrop {
    /// Every reason, in label order.
    pub const ALL: [ArchiveDrop; 5] = [
        ArchiveDrop::QueueFull,
        ArchiveDrop::QueueBytes,
        ArchiveDrop::Io,
        ArchiveDrop::Shutdown,
        ArchiveDrop::NotInFormat,
    ];

    /// The `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            ArchiveDrop::QueueFull => "queue_full",
            ArchiveDrop::QueueBytes => "queue_bytes",
            ArchiveDrop::Io => "io_error",
            ArchiveDrop::Shutdown => "shutdown",
            ArchiveDrop::NotInFormat => "not_in_format",
        }
    }
}

/// How one submitted record ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Handed to the operating system in a segment file.
    Written,
    /// Not written.
    Dropped(ArchiveDrop),
}

/// Called exactly once with a record's outcome.
pub type Done = Box<dyn FnOnce(Outcome) + Send>;

struct Metrics {
    records: Counter,
    bytes: Counter,
    dropped: [Counter; 5],
    segments: Counter,
    deleted: Counter,
    queued_bytes: Gauge,
}

impl Metrics {
    fn new(registry: &Registry) -> Self {
        let dropped = ArchiveDrop::ALL.map(|reason| {
            registry.counter(
                DROPPED_TOTAL,
                "Records the archive did not write, by reason.",
                &[("reason", reason.as_str())],
            )
        });
        Self {
            records: registry.counter(RECORDS_TOTAL, "Records written to the archive.", &[]),
            bytes: registry.counter(
                BYTES_TOTAL,
                "Bytes written to archive files, after compression.",
                &[],
            ),
            dropped,
            segments: registry.counter(SEGMENTS_TOTAL, "Archive segments closed.", &[]),
            deleted: registry.counter(
                SEGMENTS_DELETED_TOTAL,
                "Archive segments deleted to stay under max_total.",
                &[],
            ),
            queued_bytes: registry.gauge(
                QUEUED_BYTES,
                "Bytes of records waiting for the archive's disk.",
                &[],
            ),
        }
    }
}

struct Shared {
    metrics: Metrics,
    held: AtomicU64,
    held_limit: u64,
    closing: AtomicBool,
}

/// A record as submitted: decoded, or as the `ENVELOPE` frame an agent encoded at admission.
// A queue entry either way: boxing the decoded one would cost an allocation per record.
#[allow(clippy::large_enum_variant)]
enum Submitted {
    Record(Envelope),
    Frame(bytes::Bytes),
}

impl Submitted {
    /// Whether it is an HTTP request or response (envelope kinds 1, 2 and 6: a request with
    /// production's answer, which gor holds as a request and its original response).
    fn is_http(&self) -> bool {
        use teeway_wire::envelope::{KIND_HTTP_EXCHANGE, KIND_HTTP_REQUEST, KIND_HTTP_RESPONSE};
        match self {
            Submitted::Record(r) => {
                matches!(r, Envelope::HttpRequest(_) | Envelope::HttpResponse(_))
            }
            // Prefix, frame type, then the envelope's kind.
            Submitted::Frame(f) => matches!(
                f.get(PREFIX_LEN + 1).copied(),
                Some(KIND_HTTP_REQUEST | KIND_HTTP_RESPONSE | KIND_HTTP_EXCHANGE)
            ),
        }
    }
}

/// A queued record; ends exactly once, even when dropped unwritten.
struct Entry {
    record: Submitted,
    size: u64,
    done: Option<Done>,
    shared: Arc<Shared>,
}

impl Entry {
    fn finish(mut self, outcome: Outcome) {
        self.end(outcome);
    }

    fn end(&mut self, outcome: Outcome) {
        let Some(done) = self.done.take() else {
            return;
        };
        let m = &self.shared.metrics;
        match outcome {
            Outcome::Written => m.records.increment(1),
            Outcome::Dropped(reason) => m.dropped[reason as usize].increment(1),
        }
        self.shared.held.fetch_sub(self.size, Ordering::AcqRel);
        m.queued_bytes.decrement(self.size as f64);
        done(outcome);
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.end(Outcome::Dropped(ArchiveDrop::Shutdown));
    }
}

/// A handle to submit records; cheap to clone.
#[derive(Clone)]
pub struct Archive {
    tx: SyncSender<Entry>,
    shared: Arc<Shared>,
    config: Arc<ArchiveConfig>,
}

impl std::fmt::Debug for Archive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Archive")
            .field("dir", &self.config.dir)
            .finish_non_exhaustive()
    }
}

/// The writer thread; [`ArchiveTask::close`] stops it.
pub struct ArchiveTask {
    shared: Arc<Shared>,
    finished: tokio::sync::oneshot::Receiver<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Archive {
    /// Creates the directory, recovers segments a crash left open, and starts the writer thread.
    pub fn start(config: &ArchiveConfig, registry: &Registry) -> io::Result<(Self, ArchiveTask)> {
        let files = SegmentFiles::open(config)?;
        let shared = Arc::new(Shared {
            metrics: Metrics::new(registry),
            held: AtomicU64::new(0),
            held_limit: config.queue_bytes,
            closing: AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::sync_channel(config.queue);
        let (finished_tx, finished) = tokio::sync::oneshot::channel();
        let writer = Writer {
            rx,
            files,
            shared: shared.clone(),
            last_error_log: None,
        };
        let thread = std::thread::Builder::new()
            .name("teeway-archive".into())
            .spawn(move || {
                writer.run();
                let _ = finished_tx.send(());
            })?;
        tracing::info!(
            dir = %config.dir.display(),
            format = config.format.as_str(),
            compress = config.compress.suffix(),
            "archive writing"
        );
        Ok((
            Self {
                tx,
                shared: shared.clone(),
                config: Arc::new(config.clone()),
            },
            ArchiveTask {
                shared,
                finished,
                thread: Some(thread),
            },
        ))
    }

    /// The configuration in force.
    pub fn config(&self) -> &ArchiveConfig {
        &self.config
    }

    /// Queues `record` without waiting. `done`, when given, hears the outcome exactly once:
    /// at once when refused, later when written or dropped.
    pub fn try_submit(&self, record: Envelope, done: Option<Done>) {
        let size = crate::size_hint(&record) as u64;
        self.submit(Submitted::Record(record), size, done);
    }

    /// Queues a record given as an encoded `ENVELOPE` frame, length prefix included, as an
    /// agent's tee makes it: the native format stores its bytes as they are (a frame's body is a
    /// record's payload); gor decodes it first, on the writer's thread. As
    /// [`Archive::try_submit`] otherwise.
    pub fn try_submit_frame(&self, frame: bytes::Bytes, done: Option<Done>) {
        let size = (native::RECORD_HEADER_LEN + frame.len()) as u64;
        self.submit(Submitted::Frame(frame), size, done);
    }

    fn submit(&self, record: Submitted, size: u64, done: Option<Done>) {
        let mut entry = Entry {
            record,
            size: 0,
            done: Some(done.unwrap_or_else(|| Box::new(|_| {}))),
            shared: self.shared.clone(),
        };
        if self.shared.closing.load(Ordering::Acquire) {
            entry.finish(Outcome::Dropped(ArchiveDrop::Shutdown));
            return;
        }
        let held = self.shared.held.fetch_add(size, Ordering::AcqRel);
        entry.size = size;
        self.shared.metrics.queued_bytes.increment(size as f64);
        if held + size > self.shared.held_limit && held > 0 {
            entry.finish(Outcome::Dropped(ArchiveDrop::QueueBytes));
            return;
        }
        match self.tx.try_send(entry) {
            Ok(()) => {}
            Err(TrySendError::Full(entry)) => {
                entry.finish(Outcome::Dropped(ArchiveDrop::QueueFull))
            }
            Err(TrySendError::Disconnected(entry)) => {
                entry.finish(Outcome::Dropped(ArchiveDrop::Shutdown))
            }
        }
    }
}

impl std::fmt::Debug for ArchiveTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArchiveTask").finish_non_exhaustive()
    }
}

impl ArchiveTask {
    /// Writes what is queued, closes the open segment and stops the thread. Records submitted
    /// from now on are dropped as `shutdown`.
    pub async fn close(mut self) {
        self.shared.closing.store(true, Ordering::Release);
        let _ = (&mut self.finished).await;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Writer {
    rx: mpsc::Receiver<Entry>,
    files: SegmentFiles,
    shared: Arc<Shared>,
    last_error_log: Option<Instant>,
}

impl Writer {
    fn run(mut self) {
        let mut batch = Vec::new();
        loop {
            match self.rx.recv_timeout(TICK) {
                Ok(entry) => {
                    batch.push(entry);
                    self.fill(&mut batch);
                    self.write(&mut batch);
                }
                Err(RecvTimeoutError::Timeout) => {
                    if self.shared.closing.load(Ordering::Acquire) {
                        break;
                    }
                    if let Err(e) = self.files.rotate_if_due(&self.shared.metrics) {
                        self.log_error("closing a segment", &e);
                    }
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        // Closing: write whatever is already queued, then the segment. The disk is tried again
        // now, whatever the retry window says: this is the last chance for these records.
        self.files.failing = None;
        loop {
            self.fill(&mut batch);
            if batch.is_empty() {
                break;
            }
            self.write(&mut batch);
        }
        if let Err(e) = self.files.close_segment(&self.shared.metrics) {
            self.log_error("closing the last segment", &e);
        }
        tracing::info!(dir = %self.files.dir.display(), "archive closed");
    }

    fn fill(&mut self, batch: &mut Vec<Entry>) {
        let mut bytes: u64 = batch.iter().map(|e| e.size).sum();
        while batch.len() < MAX_BATCH_RECORDS && bytes < MAX_BATCH_BYTES as u64 {
            match self.rx.try_recv() {
                Ok(entry) => {
                    bytes += entry.size;
                    batch.push(entry);
                }
                Err(_) => break,
            }
        }
    }

    fn write(&mut self, batch: &mut Vec<Entry>) {
        if self.files.format == Format::Gor {
            // Counted, not lost in silence: what gor cannot hold (an RPC copy) never reaches
            // the writer, so it is not counted as written.
            let (kept, unheld): (Vec<Entry>, Vec<Entry>) =
                batch.drain(..).partition(|e| e.record.is_http());
            for entry in unheld {
                entry.finish(Outcome::Dropped(ArchiveDrop::NotInFormat));
            }
            *batch = kept;
            if batch.is_empty() {
                return;
            }
        }
        let records: Vec<&Submitted> = batch.iter().map(|e| &e.record).collect();
        let written = match self.files.append(&records, &self.shared.metrics) {
            Ok(()) => batch.len(),
            Err((written, e)) => {
                self.log_error("writing records", &e);
                written
            }
        };
        for (i, entry) in batch.drain(..).enumerate() {
            entry.finish(if i < written {
                Outcome::Written
            } else {
                Outcome::Dropped(ArchiveDrop::Io)
            });
        }
    }

    fn log_error(&mut self, what: &str, e: &io::Error) {
        let due = self
            .last_error_log
            .is_none_or(|t| t.elapsed() >= ERROR_LOG_INTERVAL);
        if due {
            self.last_error_log = Some(Instant::now());
            tracing::error!(dir = %self.files.dir.display(), error = %e, "archive failed {what}; records are dropped and counted as io_error");
        }
    }
}

/// The segment files of one archive directory.
struct SegmentFiles {
    dir: PathBuf,
    format: Format,
    compress: Compression,
    rotate_size: u64,
    rotate_age: Duration,
    max_total: Option<u64>,
    next_seq: u64,
    open: Option<OpenSegment>,
    /// Closed segments, oldest first, with their sizes.
    closed: VecDeque<(PathBuf, u64)>,
    /// The last write error and when the disk may be tried again.
    failing: Option<(Instant, io::ErrorKind, String)>,
}

struct OpenSegment {
    file: File,
    partial: PathBuf,
    path: PathBuf,
    opened: Instant,
    /// Bytes before compression.
    raw_bytes: u64,
    /// Bytes in the file.
    disk_bytes: u64,
}

impl SegmentFiles {
    fn open(config: &ArchiveConfig) -> io::Result<Self> {
        fs::create_dir_all(&config.dir).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot create archive.dir {}: {e}", config.dir.display()),
            )
        })?;
        let mut ours = Vec::new();
        let mut max_seq = 0;
        for entry in fs::read_dir(&config.dir)? {
            let path = entry?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let Some(seq) = segment_seq(name) else {
                continue;
            };
            max_seq = max_seq.max(seq);
            if let Some(closed_name) = name.strip_suffix(PARTIAL_SUFFIX) {
                // Left open by a crash: what was flushed is readable, so close it as it is.
                let closed = path.with_file_name(closed_name);
                fs::rename(&path, &closed)?;
                tracing::warn!(segment = %closed.display(), "recovered a segment left open by an earlier run");
                ours.push(closed);
            } else {
                ours.push(path);
            }
        }
        ours.sort();
        let closed = ours
            .into_iter()
            .map(|p| {
                let len = fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
                (p, len)
            })
            .collect();
        Ok(Self {
            dir: config.dir.clone(),
            format: config.format,
            compress: config.compress,
            rotate_size: config.rotate_size,
            rotate_age: config.rotate_age,
            max_total: config.max_total,
            next_seq: max_seq + 1,
            open: None,
            closed,
            failing: None,
        })
    }

    /// Writes `records`, starting new segments as they fill up. On failure, says how many
    /// records were written before it.
    fn append(
        &mut self,
        records: &[&Submitted],
        metrics: &Metrics,
    ) -> Result<(), (usize, io::Error)> {
        if let Some((until, kind, text)) = &self.failing {
            if Instant::now() < *until {
                return Err((0, io::Error::new(*kind, text.clone())));
            }
            self.failing = None;
        }
        let result = self.append_now(records, metrics);
        if let Err((_, e)) = &result {
            self.failing = Some((Instant::now() + RETRY_AFTER_ERROR, e.kind(), e.to_string()));
        }
        result
    }

    fn append_now(
        &mut self,
        records: &[&Submitted],
        metrics: &Metrics,
    ) -> Result<(), (usize, io::Error)> {
        let mut done = 0;
        while done < records.len() {
            self.rotate_if_due(metrics).map_err(|e| (done, e))?;
            let room = self
                .rotate_size
                .saturating_sub(self.open.as_ref().map_or(0, |s| s.raw_bytes))
                .max(1);
            let mut raw = BytesMut::new();
            // A segment kept open after a failed first write still needs its header.
            let new_segment = self.open.as_ref().is_none_or(|s| s.disk_bytes == 0);
            if new_segment && self.format == Format::Teeway {
                native::put_segment_header(&mut raw);
            }
            let mut text = Vec::new();
            let mut taken = 0;
            for record in &records[done..] {
                match (self.format, record) {
                    (Format::Teeway, Submitted::Record(r)) => native::put_record(r, &mut raw),
                    (Format::Teeway, Submitted::Frame(f)) => {
                        native::put_frame_body(f.get(PREFIX_LEN..).unwrap_or_default(), &mut raw)
                    }
                    (Format::Gor, Submitted::Record(r)) => gor::put_record(r, &mut text),
                    (Format::Gor, Submitted::Frame(f)) => {
                        // Our own encoding (prefix, type, envelope): it decodes.
                        let mut envelope = f.slice((PREFIX_LEN + 1).min(f.len())..);
                        if let Ok(r) = teeway_wire::envelope::decode(&mut envelope) {
                            gor::put_record(&r, &mut text);
                        }
                    }
                }
                taken += 1;
                if (raw.len() + text.len()) as u64 >= room {
                    break;
                }
            }
            raw.extend_from_slice(&text);
            self.write_chunk(&raw, metrics).map_err(|e| (done, e))?;
            done += taken;
        }
        Ok(())
    }

    /// Writes one chunk (one compressed frame or member) to the open segment, opening one if
    /// needed.
    fn write_chunk(&mut self, raw: &[u8], metrics: &Metrics) -> io::Result<()> {
        let bytes = match self.compress {
            Compression::None => raw.to_vec(),
            Compression::Zstd => crate::frames::compress_frame(raw, ZSTD_LEVEL)?,
            Compression::Gzip => {
                let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                gz.write_all(raw)?;
                gz.finish()?
            }
        };
        if self.open.is_none() {
            self.open = Some(self.create()?);
        }
        let segment = self
            .open
            .as_mut()
            .ok_or_else(|| io::Error::other("no segment"))?;
        if let Err(e) = segment.file.write_all(&bytes) {
            // Take back what part of the chunk got in and keep the segment: closing it and
            // opening another at each failure would litter a full disk with files.
            let kept = segment.disk_bytes;
            let undone = segment
                .file
                .set_len(kept)
                .and_then(|()| segment.file.seek(io::SeekFrom::Start(kept)).map(drop));
            if undone.is_err() {
                // The segment's end is unknown: close it as it is (a reader reports the cut
                // chunk as a torn tail) and start the next batch in a new one.
                let _ = self.close_segment(metrics);
            }
            return Err(e);
        }
        segment.raw_bytes += raw.len() as u64;
        segment.disk_bytes += bytes.len() as u64;
        metrics.bytes.increment(bytes.len() as u64);
        Ok(())
    }

    fn create(&mut self) -> io::Result<OpenSegment> {
        let name = format!(
            "teeway-{}-{:06}.{}{}",
            utc_stamp(SystemTime::now()),
            self.next_seq,
            self.format.extension(),
            self.compress.suffix()
        );
        self.next_seq += 1;
        let path = self.dir.join(&name);
        let partial = self.dir.join(format!("{name}{PARTIAL_SUFFIX}"));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&partial)?;
        Ok(OpenSegment {
            file,
            partial,
            path,
            opened: Instant::now(),
            raw_bytes: 0,
            disk_bytes: 0,
        })
    }

    fn rotate_if_due(&mut self, metrics: &Metrics) -> io::Result<()> {
        let due = self.open.as_ref().is_some_and(|s| {
            s.raw_bytes >= self.rotate_size || s.opened.elapsed() >= self.rotate_age
        });
        if due {
            self.close_segment(metrics)?;
        }
        Ok(())
    }

    fn close_segment(&mut self, metrics: &Metrics) -> io::Result<()> {
        let Some(segment) = self.open.take() else {
            return Ok(());
        };
        if segment.disk_bytes == 0 {
            // Nothing got in (every write failed): no empty segment is left behind.
            drop(segment.file);
            return match fs::remove_file(&segment.partial) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            };
        }
        segment.file.sync_all()?;
        drop(segment.file);
        fs::rename(&segment.partial, &segment.path)?;
        metrics.segments.increment(1);
        tracing::debug!(segment = %segment.path.display(), bytes = segment.disk_bytes, "segment closed");
        self.closed.push_back((segment.path, segment.disk_bytes));
        self.enforce_max_total(metrics);
        Ok(())
    }

    fn enforce_max_total(&mut self, metrics: &Metrics) {
        let Some(max) = self.max_total else { return };
        let mut total: u64 = self.closed.iter().map(|(_, len)| len).sum();
        while total > max {
            let Some((oldest, len)) = self.closed.pop_front() else {
                break;
            };
            match fs::remove_file(&oldest) {
                Ok(()) => {
                    metrics.deleted.increment(1);
                    tracing::info!(segment = %oldest.display(), bytes = len, max_total = max, "deleted the oldest segment to stay under max_total");
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::error!(segment = %oldest.display(), error = %e, "cannot delete an old segment");
                }
            }
            total -= len;
        }
    }
}

/// The sequence number in one of our segment names (`teeway-<stamp>-<seq>.<ext>`).
fn segment_seq(name: &str) -> Option<u64> {
    let rest = name.strip_prefix("teeway-")?;
    let (_, rest) = rest.split_once('-')?;
    let (seq, ext) = rest.split_once('.')?;
    let ext = ext.strip_suffix(PARTIAL_SUFFIX).unwrap_or(ext);
    if !["twa", "twa.zst", "gor", "gor.gz"].contains(&ext) {
        return None;
    }
    seq.parse().ok()
}

/// `YYYYMMDDTHHMMSSZ` in UTC.
pub fn utc_stamp(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (H. Hinnant's algorithm).
pub(crate) fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Whether `path` is a segment this writer names (used by tests and tools).
pub fn is_segment(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .and_then(segment_seq)
        .is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::read::tests::sample_request;
    use crate::read::Reader;
    use std::sync::Mutex;

    fn outcomes() -> (Arc<Mutex<Vec<Outcome>>>, impl Fn() -> Option<Done>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let make = move || -> Option<Done> {
            let s = s.clone();
            Some(Box::new(move |o| s.lock().expect("lock").push(o)))
        };
        (seen, make)
    }

    fn read_back(dir: &Path) -> (Vec<Envelope>, crate::read::ReadStats) {
        let mut reader = Reader::open(&[dir.to_owned()]).expect("open");
        let records: Vec<Envelope> = reader.by_ref().collect();
        (records, reader.stats)
    }

    #[tokio::test]
    async fn a_gor_archive_counts_the_rpc_copies_it_cannot_hold() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = ArchiveConfig::new(dir.path(), Format::Gor);
        let registry = Registry::new();
        let (archive, task) = Archive::start(&config, &registry).expect("start");
        let (seen, done) = outcomes();
        let rpc = teeway_wire::RpcRequest {
            meta: teeway_wire::Meta::basic(7, SystemTime::now(), "prod".into()),
            connection: 1,
            call: teeway_wire::RpcCall {
                protocol: teeway_wire::RpcProtocol::Redis,
                variant: 0,
                service: String::new(),
                method: "SET".into(),
                attachments: vec![],
            },
            message: bytes::Bytes::from_static(b"*1\r\n$4\r\nPING\r\n"),
        };
        archive.try_submit(Envelope::HttpRequest(sample_request(1, b"x")), done());
        archive.try_submit(Envelope::RpcRequest(rpc.clone()), done());
        let frame =
            teeway_wire::Frame::rpc_request(&rpc.meta, rpc.connection, &rpc.call, &rpc.message);
        archive.try_submit_frame(frame, done());
        // A request with production's answer, as a capturing agent's frame: gor holds both.
        let mut alone = bytes::BytesMut::new();
        teeway_wire::Frame::Envelope(Envelope::HttpRequest(sample_request(2, b"y")))
            .encode(&mut alone);
        let answer = teeway_wire::Production {
            latency: std::time::Duration::from_millis(1),
            status: http::StatusCode::OK,
            version: http::Version::HTTP_11,
            headers: http::HeaderMap::new(),
            body: bytes::Bytes::from_static(b"ok"),
            trailers: None,
            body_truncated: false,
        };
        let joined = teeway_wire::frame::with_production(&alone, &answer).expect("a request");
        archive.try_submit_frame(joined, done());
        task.close().await;
        let mut seen = seen.lock().expect("lock").clone();
        seen.sort_by_key(|o| format!("{o:?}"));
        assert_eq!(
            seen,
            [
                Outcome::Dropped(ArchiveDrop::NotInFormat),
                Outcome::Dropped(ArchiveDrop::NotInFormat),
                Outcome::Written,
                Outcome::Written,
            ]
        );
        let (back, _) = read_back(dir.path());
        assert_eq!(
            back.len(),
            3,
            "the HTTP requests, and production's answer to one"
        );
        assert!(matches!(&back[2], Envelope::HttpResponse(r) if &r.body[..] == b"ok"));
        let text = registry.render();
        assert!(
            text.contains(&format!("{DROPPED_TOTAL}{{reason=\"not_in_format\"}} 2")),
            "{text}"
        );
        assert!(text.contains(&format!("{RECORDS_TOTAL} 2")), "{text}");
    }

    #[tokio::test]
    async fn every_format_and_compression_reads_back_in_order() {
        for (format, compress) in [
            (Format::Teeway, Compression::None),
            (Format::Teeway, Compression::Zstd),
            (Format::Gor, Compression::None),
            (Format::Gor, Compression::Gzip),
        ] {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut config = ArchiveConfig::new(dir.path(), format);
            config.compress = compress;
            config.rotate_size = 2048;
            let registry = Registry::new();
            let (archive, task) = Archive::start(&config, &registry).expect("start");
            let (seen, done) = outcomes();
            let sent: Vec<Envelope> = (0..50)
                .map(|i| Envelope::HttpRequest(sample_request(i, &[b'x'; 100])))
                .collect();
            for r in &sent {
                archive.try_submit(r.clone(), done());
            }
            task.close().await;
            assert!(seen
                .lock()
                .expect("lock")
                .iter()
                .all(|o| *o == Outcome::Written));
            let (back, stats) = read_back(dir.path());
            assert_eq!(back.len(), sent.len(), "{format:?} {compress:?}");
            assert_eq!(stats.skipped(), 0, "{:?}", stats.issues);
            assert!(stats.files > 1, "rotation by size made several segments");
            let ids: Vec<u64> = back
                .iter()
                .map(|r| match r {
                    Envelope::HttpRequest(r) => r.meta.id,
                    _ => u64::MAX,
                })
                .collect();
            assert_eq!(ids, (0..50).collect::<Vec<_>>());
            if format == Format::Teeway {
                assert_eq!(back, sent);
            }
            let names: Vec<String> = fs::read_dir(dir.path())
                .expect("dir")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect();
            let suffix = format!(".{}{}", format.extension(), compress.suffix());
            assert!(names.iter().all(|n| n.ends_with(&suffix)), "{names:?}");
        }
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_and_max_total_deletes_oldest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = ArchiveConfig::new(dir.path(), Format::Teeway);
        config.queue_bytes = 1;
        let registry = Registry::new();
        let (archive, task) = Archive::start(&config, &registry).expect("start");
        let (seen, done) = outcomes();
        // One record always fits an empty queue; while it is held, the next is over the budget.
        for i in 0..200 {
            archive.try_submit(Envelope::HttpRequest(sample_request(i, &[0; 1000])), done());
        }
        task.close().await;
        archive.try_submit(Envelope::HttpRequest(sample_request(999, b"")), done());
        let seen = seen.lock().expect("lock").clone();
        assert_eq!(seen.len(), 201, "every record has exactly one outcome");
        let written = seen.iter().filter(|o| **o == Outcome::Written).count();
        let over = seen
            .iter()
            .filter(|o| **o == Outcome::Dropped(ArchiveDrop::QueueBytes))
            .count();
        assert_eq!(seen.last(), Some(&Outcome::Dropped(ArchiveDrop::Shutdown)));
        assert_eq!(written + over + 1, 201);
        assert!(over > 0 && written > 0);
        let snapshot = teeway_runtime::metrics::Snapshot::parse(&registry.render());
        assert_eq!(snapshot.get(RECORDS_TOTAL), written as f64);
        assert_eq!(
            snapshot.get(&format!("{DROPPED_TOTAL}{{reason=\"queue_bytes\"}}")),
            over as f64
        );
        assert_eq!(read_back(dir.path()).0.len(), written);

        // max_total: many small segments, only the newest kept.
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = ArchiveConfig::new(dir.path(), Format::Teeway);
        config.rotate_size = 1;
        config.max_total = Some(3000);
        let registry = Registry::new();
        let (archive, task) = Archive::start(&config, &registry).expect("start");
        for i in 0..20 {
            let (tx, rx) = mpsc::channel();
            let done: Done = Box::new(move |o| {
                let _ = tx.send(o);
            });
            archive.try_submit(
                Envelope::HttpRequest(sample_request(i, &[0; 900])),
                Some(done),
            );
            // Each record is written before the next is sent, so each lands in its own segment.
            let outcome = rx.recv_timeout(Duration::from_secs(10)).expect("outcome");
            assert_eq!(outcome, Outcome::Written);
        }
        task.close().await;
        let snapshot = teeway_runtime::metrics::Snapshot::parse(&registry.render());
        let deleted = snapshot.get(SEGMENTS_DELETED_TOTAL);
        assert!(deleted >= 15.0, "deleted {deleted}");
        let total: u64 = fs::read_dir(dir.path())
            .expect("dir")
            .map(|e| e.expect("entry").metadata().expect("meta").len())
            .sum();
        assert!(total <= 3000, "{total}");
        let (back, _) = read_back(dir.path());
        let last = back.last().and_then(|r| match r {
            Envelope::HttpRequest(r) => Some(r.meta.id),
            _ => None,
        });
        assert_eq!(last, Some(19), "the newest records are kept");
    }

    #[tokio::test]
    async fn a_partial_segment_is_recovered_at_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut bytes = BytesMut::new();
        native::put_segment_header(&mut bytes);
        native::put_record(&Envelope::HttpRequest(sample_request(1, b"a")), &mut bytes);
        let partial = dir
            .path()
            .join("teeway-20260101T000000Z-000007.twa.partial");
        fs::write(&partial, &bytes[..bytes.len() - 3]).expect("write");
        let config = ArchiveConfig::new(dir.path(), Format::Teeway);
        let (archive, task) = Archive::start(&config, &Registry::new()).expect("start");
        assert!(!partial.exists());
        archive.try_submit(Envelope::HttpRequest(sample_request(2, b"b")), None);
        task.close().await;
        let mut names: Vec<String> = fs::read_dir(dir.path())
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names[0], "teeway-20260101T000000Z-000007.twa");
        assert!(names[1].ends_with("-000008.twa"), "{names:?}");
        let (back, stats) = read_back(dir.path());
        assert_eq!(back.len(), 1, "the torn record is not returned");
        assert_eq!(stats.torn, 1);
    }

    #[test]
    fn stamps_and_names() {
        assert_eq!(utc_stamp(UNIX_EPOCH), "19700101T000000Z");
        assert_eq!(
            utc_stamp(UNIX_EPOCH + Duration::from_secs(1_795_000_000)),
            "20261118T110640Z"
        );
        assert_eq!(
            segment_seq("teeway-20260101T000000Z-000042.twa.zst"),
            Some(42)
        );
        assert_eq!(
            segment_seq("teeway-20260101T000000Z-000042.gor.partial"),
            Some(42)
        );
        assert_eq!(segment_seq("notes.txt"), None);
        assert!(!is_segment(Path::new("capture.gor")));
    }
}
