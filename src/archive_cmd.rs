//! `teeway archive inspect` and `teeway archive convert`.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use bytes::BytesMut;

use teeway_archive::har::HarWriter;
use teeway_archive::inspect::Summary;
use teeway_archive::read::{ReadStats, Reader};
use teeway_archive::{frames, gor, native};

/// Bytes of records per chunk (per zstd frame) written by `convert --to teeway`.
const CONVERT_CHUNK: usize = 1 << 20;

/// Output format of `convert`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ConvertTo {
    /// GoReplay `.gor` (gzip when OUT ends in `.gz`).
    Gor,
    /// The native format (zstd when OUT ends in `.zst`).
    Teeway,
    /// HAR 1.2 JSON.
    Har,
}

/// The summary of `paths`.
pub fn inspect(paths: &[PathBuf]) -> anyhow::Result<Summary> {
    Ok(Summary::of(Reader::open(paths)?))
}

/// Converts every record of `inputs` into one file `out`; returns records written and what
/// reading skipped.
pub fn convert(inputs: &[PathBuf], to: ConvertTo, out: &Path) -> anyhow::Result<(u64, ReadStats)> {
    let mut reader = Reader::open(inputs)?;
    if out.exists() {
        anyhow::bail!(
            "{} exists; give a new file name (convert never overwrites)",
            out.display()
        );
    }
    let file = File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let name = out.to_string_lossy();
    let mut written = 0u64;
    match to {
        ConvertTo::Har => {
            let mut har = HarWriter::new(BufWriter::new(file))?;
            for record in reader.by_ref() {
                har.push(record)?;
            }
            let (mut out, entries) = har.finish()?;
            out.flush()?;
            written = entries;
        }
        ConvertTo::Gor => {
            let mut sink: Box<dyn Write> = if name.ends_with(".gz") {
                Box::new(flate2::write::GzEncoder::new(
                    BufWriter::new(file),
                    flate2::Compression::default(),
                ))
            } else {
                Box::new(BufWriter::new(file))
            };
            let mut buf = Vec::new();
            for record in reader.by_ref() {
                buf.clear();
                gor::put_record(&record, &mut buf);
                if buf.is_empty() {
                    // A kind gor cannot hold (an RPC copy): left out, and not counted written.
                    continue;
                }
                sink.write_all(&buf)?;
                written += 1;
            }
            finish(sink)?;
        }
        ConvertTo::Teeway => {
            // As the archive writer does: whole records per chunk, and with `.zst` one zstd
            // frame per chunk, so damage to the file costs one chunk (docs/archive.md).
            let zstd = name.ends_with(".zst");
            let mut sink = BufWriter::new(file);
            let mut put = |chunk: &[u8]| -> anyhow::Result<()> {
                if zstd {
                    sink.write_all(&frames::compress_frame(chunk, 3)?)?;
                } else {
                    sink.write_all(chunk)?;
                }
                Ok(())
            };
            let mut buf = BytesMut::new();
            native::put_segment_header(&mut buf);
            for record in reader.by_ref() {
                native::put_record(&record, &mut buf);
                written += 1;
                if buf.len() > CONVERT_CHUNK {
                    put(&buf)?;
                    buf.clear();
                }
            }
            if !buf.is_empty() {
                put(&buf)?;
            }
            sink.flush()?;
        }
    }
    Ok((written, reader.stats))
}

/// Flushes and drops a sink; compressors write their trailer on drop.
fn finish(mut sink: Box<dyn Write>) -> anyhow::Result<()> {
    sink.flush()?;
    drop(sink);
    Ok(())
}

/// What `verify` found in one file.
#[derive(Debug)]
pub struct FileVerdict {
    /// The file.
    pub path: PathBuf,
    /// Records that read back whole.
    pub records: u64,
    /// What could not be read; empty when the file is whole.
    pub issues: Vec<teeway_archive::Issue>,
}

/// Reads every record of every file `paths` stand for, in file order, and says per file what
/// could not be read. A file that cannot be opened is one issue.
pub fn verify(paths: &[PathBuf]) -> anyhow::Result<Vec<FileVerdict>> {
    use teeway_archive::read::{FileReader, Step};
    use teeway_archive::{Issue, IssueKind};
    let files = teeway_archive::read::discover(paths)?;
    let mut verdicts = Vec::with_capacity(files.len());
    for path in files {
        let mut verdict = FileVerdict {
            path: path.clone(),
            records: 0,
            issues: Vec::new(),
        };
        match FileReader::open(&path) {
            Ok(mut reader) => loop {
                match reader.step() {
                    Step::Record(_) => verdict.records += 1,
                    Step::Issue(issue) => verdict.issues.push(issue),
                    Step::End => break,
                }
            },
            Err(e) => verdict.issues.push(Issue {
                path,
                offset: None,
                kind: if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    IssueKind::Torn
                } else {
                    IssueKind::Unreadable
                },
                detail: e.to_string(),
            }),
        }
        verdicts.push(verdict);
    }
    Ok(verdicts)
}

/// Whether an issue is damage: everything but the torn tail of a `.partial` segment, which a
/// writer may be appending to right now (a crash's torn tail is closed, and named, by the next
/// writer to start in its directory).
pub fn is_damage(issue: &teeway_archive::Issue) -> bool {
    !(issue.kind == teeway_archive::IssueKind::Torn
        && issue
            .path
            .to_string_lossy()
            .ends_with(teeway_archive::read::PARTIAL_SUFFIX))
}

/// The parts of an archive that could not be read, less the torn tails of open segments.
pub fn damage(stats: &ReadStats) -> u64 {
    // Issues beyond the first hundred are counted but not kept: those are all damage.
    let kept_open_tails = stats.issues.iter().filter(|i| !is_damage(i)).count() as u64;
    stats.skipped() - kept_open_tails
}
