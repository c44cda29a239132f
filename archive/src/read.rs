//! Reading archives: files and directories, any format, any compression, in timestamp order.
//!
//! The format is told from the bytes, not the name: a zstd or gzip stream is unwrapped first
//! (any number of frames or members), then the native magic means a teeway segment, and a
//! leading `1 `, `2 ` or `3 ` means gor. A directory stands for its archive files, by name
//! order (segment names sort by time), including segments a writer has not closed yet
//! (`.partial`): what was flushed to them is as readable as a closed segment.
//!
//! Records are returned in timestamp order within a bounded window ([`DEFAULT_WINDOW`] records),
//! as GoReplay's reader does: capture tools write slightly out of order, and sorting a whole
//! day in memory is not an option. Nothing is skipped silently: every torn tail, corrupt or
//! unparsable record and unreadable file is an [`Issue`], logged and counted in [`ReadStats`].

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, VecDeque};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Cursor, Read};
use std::path::{Path, PathBuf};

use crate::config::{Compression, Format};
use crate::frames::{Frame, Frames, ZSTD_MAGIC};
use crate::gor::{self, Raw, Splitter};
use crate::native::{Next, SegmentReader, MAGIC};
use crate::Envelope;

/// Records held back to restore timestamp order.
pub const DEFAULT_WINDOW: usize = 1024;
/// Issues kept for the report; later ones are counted only.
const MAX_ISSUES_KEPT: usize = 100;
/// Suffix of a segment a writer has not closed.
pub const PARTIAL_SUFFIX: &str = ".partial";

/// A path that cannot be read as an archive at all.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The path does not exist or cannot be listed. (What the system said is the error's
    /// source, which callers print after it.)
    #[error("cannot read {}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// What the system said.
        source: io::Error,
    },
    /// Nothing to read.
    #[error("{0}: no archive files (.twa, .twa.zst, .gor, .gor.gz) found")]
    Empty(PathBuf),
}

/// What went wrong with part of an archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IssueKind {
    /// The file ends inside a record: the writer stopped mid-write. Expected after a crash.
    Torn,
    /// A record whose checksum does not match, or whose fields do not decode.
    Corrupt,
    /// A whole file, or the rest of one, could not be read.
    Unreadable,
}

impl IssueKind {
    /// Label for reports.
    pub fn as_str(self) -> &'static str {
        match self {
            IssueKind::Torn => "torn",
            IssueKind::Corrupt => "corrupt",
            IssueKind::Unreadable => "unreadable",
        }
    }
}

/// One skipped part of an archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// The file.
    pub path: PathBuf,
    /// Offset in the file as stored, where known: in a compressed segment, the offset of the
    /// zstd frame that holds the problem.
    pub offset: Option<u64>,
    /// What kind of problem.
    pub kind: IssueKind,
    /// Details.
    pub detail: String,
}

impl std::fmt::Display for Issue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some(offset) = self.offset {
            write!(f, " at byte {offset}")?;
        }
        write!(f, ": {} ({})", self.kind.as_str(), self.detail)
    }
}

/// Counts kept while reading.
#[derive(Debug, Default, Clone)]
pub struct ReadStats {
    /// Files opened.
    pub files: usize,
    /// Files a writer had not closed (`.partial`).
    pub open_segments: usize,
    /// Records returned.
    pub records: u64,
    /// Torn tails skipped.
    pub torn: u64,
    /// Corrupt or unparsable records skipped.
    pub corrupt: u64,
    /// Files, or rests of files, that could not be read.
    pub unreadable: u64,
    /// Records that arrived before one with a later timestamp and were put back in order.
    pub reordered: u64,
    /// The first issues met, for reports.
    pub issues: Vec<Issue>,
}

impl ReadStats {
    fn note(&mut self, issue: Issue) {
        match issue.kind {
            IssueKind::Torn => {
                self.torn += 1;
                tracing::warn!(%issue, "torn last record skipped (the writer stopped mid-write)");
            }
            IssueKind::Corrupt => {
                self.corrupt += 1;
                tracing::warn!(%issue, "record skipped");
            }
            IssueKind::Unreadable => {
                self.unreadable += 1;
                tracing::warn!(%issue, "archive data skipped");
            }
        }
        if self.issues.len() < MAX_ISSUES_KEPT {
            self.issues.push(issue);
        }
    }

    /// Records and bytes that were skipped, as one number of places.
    pub fn skipped(&self) -> u64 {
        self.torn + self.corrupt + self.unreadable
    }
}

/// How deep [`discover`] looks under a directory it is given: enough for one directory per
/// gateway replica (`archive/<pod>/`) and a level of grouping above it.
const MAX_DEPTH: usize = 3;

/// The archive files `paths` stand for: files as given; directories by the archive files in
/// them and in their subdirectories (one per gateway replica, say), in name order. Segment
/// names start with their UTC opening time, so name order interleaves replicas by time.
pub fn discover(paths: &[PathBuf]) -> Result<Vec<PathBuf>, ReadError> {
    let mut files = Vec::new();
    for path in paths {
        let meta = std::fs::metadata(path).map_err(|source| ReadError::Io {
            path: path.clone(),
            source,
        })?;
        if !meta.is_dir() {
            files.push(path.clone());
            continue;
        }
        let mut found = Vec::new();
        collect(path, MAX_DEPTH, &mut found)?;
        if found.is_empty() {
            return Err(ReadError::Empty(path.clone()));
        }
        found.sort_by_key(|p| segment_sort_key(p));
        files.extend(found);
    }
    Ok(files)
}

fn collect(dir: &Path, depth: usize, found: &mut Vec<PathBuf>) -> Result<(), ReadError> {
    let entries = std::fs::read_dir(dir).map_err(|source| ReadError::Io {
        path: dir.to_owned(),
        source,
    })?;
    for path in entries.filter_map(|e| e.ok()).map(|e| e.path()) {
        if path.is_file() && is_archive_name(&path) {
            found.push(path);
        } else if path.is_dir() && depth > 0 {
            collect(&path, depth - 1, found)?;
        }
    }
    Ok(())
}

/// Whether a file name looks like an archive file (any format, compression or `.partial`).
pub fn is_archive_name(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let name = name.strip_suffix(PARTIAL_SUFFIX).unwrap_or(name);
    [".twa", ".twa.zst", ".gor", ".gor.gz", ".log", ".log.gz"]
        .iter()
        .any(|ext| name.ends_with(ext))
}

/// Sort key: the name without `.partial`, so an open segment sorts where it will once closed.
fn segment_sort_key(path: &Path) -> String {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    name.strip_suffix(PARTIAL_SUFFIX).unwrap_or(name).to_owned()
}

/// One open archive file.
pub struct FileReader {
    path: PathBuf,
    format: Format,
    compression: Compression,
    inner: Inner,
}

enum Inner {
    Native(SegmentReader<Box<dyn Read + Send>>),
    /// A zstd-compressed native segment, read frame by frame.
    Framed(Box<Framed>),
    Gor(Splitter<Box<dyn BufRead + Send>>),
    Empty,
}

impl std::fmt::Debug for FileReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileReader")
            .field("path", &self.path)
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

/// What one step of a [`FileReader`] gave.
// Nearly every step is a record; boxing it would cost an allocation per record for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Step {
    /// A record.
    Record(Envelope),
    /// Something skipped; reading goes on.
    Issue(Issue),
    /// The file is done.
    End,
}

impl FileReader {
    /// Opens `path`, unwrapping compression and telling the format from the bytes.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        let (prefix, rest) = peek(Box::new(file), 4)?;
        if prefix == ZSTD_MAGIC {
            if let Some(framed) = Framed::open(path)? {
                return Ok(Self {
                    path: path.to_owned(),
                    format: Format::Teeway,
                    compression: Compression::Zstd,
                    inner: Inner::Framed(Box::new(framed)),
                });
            }
        }
        let (compression, stream): (Compression, Box<dyn Read + Send>) =
            if prefix.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
                let raw = Box::new(Cursor::new(prefix).chain(rest));
                (Compression::Zstd, Box::new(zstd::Decoder::new(raw)?))
            } else if prefix.starts_with(&[0x1f, 0x8b]) {
                let raw = Cursor::new(prefix).chain(rest);
                (
                    Compression::Gzip,
                    Box::new(flate2::read::MultiGzDecoder::new(raw)),
                )
            } else {
                (Compression::None, Box::new(Cursor::new(prefix).chain(rest)))
            };
        let (head, rest) = peek(stream, MAGIC.len())?;
        let stream: Box<dyn Read + Send> = Box::new(Cursor::new(head.clone()).chain(rest));
        let (format, inner) = if head.is_empty() {
            (Format::Teeway, Inner::Empty)
        } else if head == MAGIC {
            (Format::Teeway, Inner::Native(SegmentReader::new(stream)?))
        } else if head.len() >= 2 && matches!(head[0], b'1'..=b'3') && head[1] == b' ' {
            let (start, rest) = peek(stream, 4096)?;
            let crlf = header_line_ends_in_crlf(&start);
            let buffered: Box<dyn BufRead + Send> =
                Box::new(BufReader::new(Cursor::new(start).chain(rest)));
            if crlf {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "not a gor file as GoReplay writes it: its lines end in CR LF (a text-mode \
                     transfer or an editor changed them), and GoReplay's header lines and record \
                     separators end in LF alone; copy the original file in binary mode",
                ));
            }
            (Format::Gor, Inner::Gor(Splitter::new(buffered)))
        } else if MAGIC.starts_with(&head) {
            // A native segment cut inside its own header.
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "segment ends inside its header",
            ));
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a teeway or gor archive",
            ));
        };
        Ok(Self {
            path: path.to_owned(),
            format,
            compression,
            inner,
        })
    }

    /// The format found.
    pub fn format(&self) -> Format {
        self.format
    }

    /// The compression found.
    pub fn compression(&self) -> Compression {
        self.compression
    }

    /// The next record, issue or the end.
    pub fn step(&mut self) -> Step {
        match &mut self.inner {
            Inner::Empty => Step::End,
            Inner::Framed(framed) => framed.step(&self.path),
            Inner::Native(reader) => match reader.next_record() {
                Next::Record(r) => Step::Record(r),
                Next::End => Step::End,
                Next::Skipped { offset, why } => Step::Issue(Issue {
                    path: self.path.clone(),
                    offset: Some(offset),
                    kind: IssueKind::Corrupt,
                    detail: why,
                }),
                Next::Stopped { offset, torn, why } => Step::Issue(Issue {
                    path: self.path.clone(),
                    offset: Some(offset),
                    kind: if torn {
                        IssueKind::Torn
                    } else {
                        IssueKind::Unreadable
                    },
                    detail: why,
                }),
            },
            Inner::Gor(splitter) => {
                let issue = |kind, detail| {
                    Step::Issue(Issue {
                        path: self.path.clone(),
                        offset: None,
                        kind,
                        detail,
                    })
                };
                match splitter.next_raw() {
                    Ok(None) => Step::End,
                    Ok(Some(Raw::Complete(bytes))) => match gor::parse_record(&bytes) {
                        Ok(record) => Step::Record(record),
                        Err(e) => issue(IssueKind::Corrupt, e.to_string()),
                    },
                    Ok(Some(Raw::Torn(len))) => issue(
                        IssueKind::Torn,
                        format!("{len} bytes after the last separator"),
                    ),
                    Ok(Some(Raw::TooLong(len))) => issue(
                        IssueKind::Corrupt,
                        format!(
                            "record of {len} bytes is over the {} limit",
                            gor::MAX_RECORD_LEN
                        ),
                    ),
                    Err(e) => {
                        self.inner = Inner::Empty;
                        issue(IssueKind::Torn, format!("read failed: {e}"))
                    }
                }
            }
        }
    }
}

/// A zstd-compressed native segment, read frame by frame: a frame that does not decode is
/// reported at its offset in the file and reading goes on at the next frame, which starts at a
/// record boundary (the writer compresses whole records per frame).
struct Framed {
    frames: Frames<File>,
    /// The records being read, and the offset of the frame they come from: one frame decoded
    /// in memory, or (a frame larger than `MAX_FRAME`) the rest of the file as a stream.
    current: Option<(u64, SegmentReader<Box<dyn Read + Send>>)>,
    /// An issue met while opening, returned first.
    pending: Option<(u64, IssueKind, String)>,
    /// Reading the file failed: nothing more comes from it.
    failed: bool,
}

/// The rest of a zstd file from `offset` (a frame boundary), decompressed as a stream.
fn stream_from(path: &Path, offset: u64) -> io::Result<Box<dyn Read + Send>> {
    use std::io::Seek;
    let mut file = File::open(path)?;
    file.seek(io::SeekFrom::Start(offset))?;
    Ok(Box::new(zstd::Decoder::new(file)?))
}

impl Framed {
    /// `None` when the file decodes to something else than a native segment (a
    /// zstd-compressed gor file): it is read as a stream. Only the first bytes are decoded to
    /// tell.
    fn open(path: &Path) -> io::Result<Option<Self>> {
        let named_native = path
            .to_string_lossy()
            .trim_end_matches(PARTIAL_SUFFIX)
            .ends_with(".twa.zst");
        let mut head = [0u8; MAGIC.len()];
        let probed = zstd::Decoder::new(File::open(path)?)
            .and_then(|mut d| crate::native::read_full(&mut d, &mut head));
        match probed {
            Ok(n) if n == MAGIC.len() && head == MAGIC => {}
            Ok(n) if n > 0 && n < MAGIC.len() && MAGIC.starts_with(&head[..n]) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "segment ends inside its header",
                ));
            }
            // A damaged first frame of a native segment: its later frames hold whole records.
            _ if named_native => {}
            _ => return Ok(None),
        }
        let mut frames = Frames::new(File::open(path)?)?;
        let (current, pending) = loop {
            match frames.next_frame()? {
                Frame::Data { bytes, .. } if bytes.is_empty() => continue,
                Frame::Data { offset, bytes } => {
                    let first: Box<dyn Read + Send> = Box::new(Cursor::new(bytes));
                    break (Some((offset, SegmentReader::new(first)?)), None);
                }
                Frame::TooLarge { offset } => {
                    break (
                        Some((offset, SegmentReader::new(stream_from(path, offset)?)?)),
                        None,
                    );
                }
                Frame::End => break (None, None),
                // The segment header is lost with the first frame; the name says what the
                // file is, and the later frames still hold whole records.
                Frame::Damaged {
                    offset,
                    skipped,
                    why,
                } => {
                    let detail = format!("{why}; {skipped} bytes skipped to the next zstd frame");
                    break (None, Some((offset, IssueKind::Unreadable, detail)));
                }
                Frame::Torn { offset, len } => {
                    let detail = format!("the file ends {len} bytes into a zstd frame");
                    break (None, Some((offset, IssueKind::Torn, detail)));
                }
            }
        };
        Ok(Some(Self {
            frames,
            current,
            pending,
            failed: false,
        }))
    }

    fn step(&mut self, path: &Path) -> Step {
        let issue = |offset: u64, kind, detail: String| {
            Step::Issue(Issue {
                path: path.to_owned(),
                offset: Some(offset),
                kind,
                detail,
            })
        };
        if let Some((offset, kind, detail)) = self.pending.take() {
            return issue(offset, kind, detail);
        }
        if self.failed {
            return Step::End;
        }
        loop {
            if let Some((frame, records)) = &mut self.current {
                let frame = *frame;
                match records.next_record() {
                    Next::Record(r) => return Step::Record(r),
                    Next::Skipped { offset, why } => {
                        return issue(
                            frame,
                            IssueKind::Corrupt,
                            format!("{why}; record {offset} bytes into the zstd frame's data"),
                        )
                    }
                    Next::Stopped { offset, why, .. } => {
                        // A frame holds whole records: a record cut inside one is damage.
                        self.current = None;
                        return issue(
                            frame,
                            IssueKind::Unreadable,
                            format!(
                                "{why}; the rest of the zstd frame from byte {offset} of its data is skipped"
                            ),
                        );
                    }
                    Next::End => self.current = None,
                }
            }
            match self.frames.next_frame() {
                Ok(Frame::Data { offset, bytes }) => {
                    let records: Box<dyn Read + Send> = Box::new(Cursor::new(bytes));
                    self.current = Some((offset, SegmentReader::records(records, 0)));
                }
                Ok(Frame::TooLarge { offset }) => match stream_from(path, offset) {
                    Ok(rest) => self.current = Some((offset, SegmentReader::records(rest, 0))),
                    Err(e) => {
                        self.failed = true;
                        return issue(offset, IssueKind::Unreadable, format!("read failed: {e}"));
                    }
                },
                Ok(Frame::Damaged {
                    offset,
                    skipped,
                    why,
                }) => {
                    return issue(
                        offset,
                        IssueKind::Unreadable,
                        format!("{why}; {skipped} bytes skipped to the next zstd frame"),
                    )
                }
                Ok(Frame::Torn { offset, len }) => {
                    return issue(
                        offset,
                        IssueKind::Torn,
                        format!("the file ends {len} bytes into a zstd frame"),
                    )
                }
                Ok(Frame::End) => return Step::End,
                Err(e) => {
                    self.failed = true;
                    return Step::Issue(Issue {
                        path: path.to_owned(),
                        offset: None,
                        kind: IssueKind::Unreadable,
                        detail: format!("read failed: {e}"),
                    });
                }
            }
        }
    }
}

/// Whether the first line of a gor file (`1 id timestamp ...`) ends in CR LF: HTTP messages
/// inside records use CR LF, but GoReplay's own lines never do.
fn header_line_ends_in_crlf(start: &[u8]) -> bool {
    start
        .iter()
        .position(|&b| b == b'\n')
        .is_some_and(|i| i > 0 && start[i - 1] == b'\r')
}

/// Reads up to `n` bytes, returning them and the rest of the stream.
fn peek(mut stream: Box<dyn Read + Send>, n: usize) -> io::Result<(Vec<u8>, Box<dyn Read + Send>)> {
    let mut prefix = Vec::with_capacity(n);
    (&mut stream).take(n as u64).read_to_end(&mut prefix)?;
    Ok((prefix, stream))
}

/// Reads every record of a list of files, in timestamp order within a window.
pub struct Reader {
    files: VecDeque<PathBuf>,
    current: Option<FileReader>,
    window: usize,
    held: BinaryHeap<Reverse<Held>>,
    seq: u64,
    latest_emitted: u64,
    /// What was read and skipped so far.
    pub stats: ReadStats,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("files", &self.files)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

struct Held {
    at: u64,
    seq: u64,
    record: Envelope,
}

impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Held {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

impl Reader {
    /// A reader of `paths` (files or directories) with the default window.
    pub fn open(paths: &[PathBuf]) -> Result<Self, ReadError> {
        Ok(Self::with_files(discover(paths)?, DEFAULT_WINDOW))
    }

    /// A reader of exactly `files`, reordering within `window` records (0: file order).
    pub fn with_files(files: Vec<PathBuf>, window: usize) -> Self {
        Self {
            files: files.into(),
            current: None,
            window,
            held: BinaryHeap::new(),
            seq: 0,
            latest_emitted: 0,
            stats: ReadStats::default(),
        }
    }

    /// The next record from the files, in file order, skipping (and noting) what is unreadable.
    fn pull(&mut self) -> Option<Envelope> {
        loop {
            if self.current.is_none() {
                let path = self.files.pop_front()?;
                match FileReader::open(&path) {
                    Ok(reader) => {
                        self.stats.files += 1;
                        if path.to_string_lossy().ends_with(PARTIAL_SUFFIX) {
                            self.stats.open_segments += 1;
                        }
                        self.current = Some(reader);
                    }
                    Err(e) => {
                        let kind = if e.kind() == io::ErrorKind::UnexpectedEof {
                            IssueKind::Torn
                        } else {
                            IssueKind::Unreadable
                        };
                        self.stats.note(Issue {
                            path,
                            offset: None,
                            kind,
                            detail: e.to_string(),
                        });
                        continue;
                    }
                }
            }
            let reader = self.current.as_mut()?;
            match reader.step() {
                Step::Record(r) => return Some(r),
                Step::Issue(issue) => self.stats.note(issue),
                Step::End => self.current = None,
            }
        }
    }
}

impl Iterator for Reader {
    type Item = Envelope;

    fn next(&mut self) -> Option<Envelope> {
        while self.held.len() < self.window.max(1) {
            match self.pull() {
                Some(record) => {
                    self.seq += 1;
                    self.held.push(Reverse(Held {
                        at: record.unix_nanos(),
                        seq: self.seq,
                        record,
                    }));
                }
                None => break,
            }
            if self.window == 0 {
                break;
            }
        }
        let Reverse(held) = self.held.pop()?;
        if held.at < self.latest_emitted {
            // Later than the window can repair: returned as it comes, counted.
            self.stats.reordered += 1;
        }
        self.latest_emitted = self.latest_emitted.max(held.at);
        self.stats.records += 1;
        Some(held.record)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{ResponseOrigin, ResponseRecord};
    use bytes::Bytes;
    use http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, Version};
    use std::io::Write;
    use std::time::{Duration, UNIX_EPOCH};
    use teeway_wire::MirroredRequest;

    pub(crate) fn sample_request(id: u64, body: &[u8]) -> MirroredRequest {
        let mut headers = HeaderMap::new();
        headers.append("host", HeaderValue::from_static("api.example.com"));
        headers.append("x-repeat", HeaderValue::from_static("one"));
        headers.append("x-repeat", HeaderValue::from_static("two"));
        MirroredRequest {
            meta: teeway_wire::Meta::basic(
                id,
                UNIX_EPOCH + Duration::from_nanos(1_700_000_000_000_000_000 + id * 1000),
                "prod-eu".into(),
            ),
            method: Method::POST,
            uri: Uri::from_static("/v1/items?id=7&x=%20"),
            version: Version::HTTP_11,
            headers,
            body: Bytes::copy_from_slice(body),
            trailers: None,
            body_truncated: false,
            production: None,
        }
    }

    pub(crate) fn sample_response(id: u64) -> ResponseRecord {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("text/plain"));
        ResponseRecord {
            meta: teeway_wire::Meta::basic(
                id,
                UNIX_EPOCH + Duration::from_nanos(1_700_000_000_000_500_000 + id * 1000),
                "prod-eu".into(),
            ),
            origin: ResponseOrigin::Replayed,
            target: "http://127.0.0.1:9000".into(),
            latency: Duration::from_micros(1500),
            status: StatusCode::CREATED,
            version: Version::HTTP_2,
            headers,
            body: Bytes::from_static(b"ok\r\n"),
            body_truncated: false,
        }
    }

    fn gor_record(kind: u8, id: &str, ts: u64, four_fields: bool, message: &[u8]) -> Vec<u8> {
        let mut out = if four_fields {
            format!("{kind} {id} {ts} -1\n").into_bytes()
        } else {
            format!("{kind} {id} {ts}\n").into_bytes()
        };
        out.extend_from_slice(message);
        out.extend_from_slice(gor::SEPARATOR);
        out
    }

    #[test]
    fn gor_out_of_order_is_sorted_within_the_window_and_gzip_is_unwrapped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut bytes = Vec::new();
        for (i, ts) in [30u64, 10, 20, 50, 40].iter().enumerate() {
            let message = format!("GET /{i} HTTP/1.1\r\nHost: h\r\n\r\n");
            bytes.extend(gor_record(
                1,
                &format!("id{i}"),
                *ts,
                i % 2 == 0,
                message.as_bytes(),
            ));
        }
        let path = dir.path().join("capture.gor.gz");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&bytes[..bytes.len() / 2]).expect("gzip");
        let mut file = gz.finish().expect("gzip");
        // A second gzip member, as GoReplay's rotating writer and ours produce.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&bytes[bytes.len() / 2..]).expect("gzip");
        file.extend(gz.finish().expect("gzip"));
        std::fs::write(&path, file).expect("write");
        let mut reader = Reader::open(&[dir.path().to_owned()]).expect("open");
        let paths: Vec<String> = reader
            .by_ref()
            .map(|r| match r {
                Envelope::HttpRequest(r) => r.uri.to_string(),
                _ => "response".into(),
            })
            .collect();
        assert_eq!(paths, ["/1", "/2", "/0", "/4", "/3"]);
        assert_eq!(reader.stats.skipped(), 0, "{:?}", reader.stats.issues);
        let mut narrow = Reader::with_files(vec![path], 0);
        let first: Vec<u64> = narrow.by_ref().map(|r| r.unix_nanos()).collect();
        assert_eq!(first, [30, 10, 20, 50, 40]);
        assert_eq!(narrow.stats.reordered, 3);
    }

    #[test]
    fn zstd_files_other_tools_made_are_read_as_streams() {
        // A gor capture compressed with the zstd CLI, and a native segment compressed whole
        // (one frame, as an older `convert` wrote): both read, neither decoded whole first.
        let dir = tempfile::tempdir().expect("tempdir");
        let mut gor = Vec::new();
        for i in 0..3u64 {
            let message = format!("GET /{i} HTTP/1.1\r\nHost: h\r\n\r\n");
            gor.extend(gor_record(
                1,
                &format!("z{i}"),
                10 + i,
                true,
                message.as_bytes(),
            ));
        }
        let gor_path = dir.path().join("capture.gor.zst");
        std::fs::write(&gor_path, zstd::encode_all(&gor[..], 3).expect("zstd")).expect("write");
        let mut native = bytes::BytesMut::new();
        crate::native::put_segment_header(&mut native);
        for i in 0..3 {
            crate::native::put_record(&Envelope::HttpRequest(sample_request(i, b"x")), &mut native);
        }
        let native_path = dir.path().join("whole.twa.zst");
        std::fs::write(
            &native_path,
            zstd::encode_all(&native[..], 3).expect("zstd"),
        )
        .expect("write");
        for path in [gor_path, native_path] {
            let mut reader = Reader::with_files(vec![path.clone()], 0);
            assert_eq!(reader.by_ref().count(), 3, "{path:?}");
            assert_eq!(reader.stats.skipped(), 0, "{:?}", reader.stats.issues);
        }
    }

    #[test]
    fn directories_are_searched_per_replica_and_merged_in_name_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = dir.path().join("gateway-a");
        let b = dir.path().join("gateway-b");
        let deep = dir.path().join("1").join("2").join("3").join("4");
        for d in [&a, &b, &deep] {
            std::fs::create_dir_all(d).expect("mkdir");
        }
        for (d, name) in [
            (&a, "teeway-20261121T000002Z-000000.twa"),
            (&b, "teeway-20261121T000001Z-000000.twa"),
            (&a, "teeway-20261121T000003Z-000001.twa.partial"),
            (&a, "notes.txt"),
            (&deep, "teeway-20261121T000000Z-000000.twa"),
        ] {
            std::fs::write(d.join(name), b"").expect("write");
        }
        let found = discover(&[dir.path().to_owned()]).expect("discover");
        let names: Vec<_> = found
            .iter()
            .map(|p| {
                p.strip_prefix(dir.path())
                    .expect("under")
                    .display()
                    .to_string()
            })
            .collect();
        assert_eq!(
            names,
            [
                "gateway-b/teeway-20261121T000001Z-000000.twa",
                "gateway-a/teeway-20261121T000002Z-000000.twa",
                "gateway-a/teeway-20261121T000003Z-000001.twa.partial",
            ],
            "replicas interleaved by time; too deep and non-archive files left out"
        );
    }

    #[test]
    fn unreadable_files_are_issues_not_silence() {
        let dir = tempfile::tempdir().expect("tempdir");
        let junk = dir.path().join("a.gor");
        std::fs::write(&junk, b"<html>not an archive</html>").expect("write");
        let cut = dir.path().join("b.twa");
        std::fs::write(&cut, &MAGIC[..5]).expect("write");
        let mut reader = Reader::open(&[dir.path().to_owned()]).expect("open");
        assert_eq!(reader.by_ref().count(), 0);
        assert_eq!(reader.stats.unreadable, 1);
        assert_eq!(reader.stats.torn, 1);
        assert!(matches!(
            Reader::open(&[dir.path().join("missing")]),
            Err(ReadError::Io { .. })
        ));
        let empty = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            Reader::open(&[empty.path().to_owned()]),
            Err(ReadError::Empty(_))
        ));
    }
}
