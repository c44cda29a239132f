//! `teeway archive inspect` and `teeway archive convert`.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use bytes::BytesMut;

use teeway_archive::har::HarWriter;
use teeway_archive::inspect::Summary;
use teeway_archive::read::{ReadStats, Reader};
use teeway_archive::{gor, native};

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
            written = har.entries;
            har.finish()?.flush()?;
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
                sink.write_all(&buf)?;
                written += 1;
            }
            finish(sink)?;
        }
        ConvertTo::Teeway => {
            let mut sink: Box<dyn Write> = if name.ends_with(".zst") {
                Box::new(zstd::Encoder::new(BufWriter::new(file), 3)?.auto_finish())
            } else {
                Box::new(BufWriter::new(file))
            };
            let mut buf = BytesMut::new();
            native::put_segment_header(&mut buf);
            for record in reader.by_ref() {
                native::put_record(&record, &mut buf);
                written += 1;
                if buf.len() > 1 << 20 {
                    sink.write_all(&buf)?;
                    buf.clear();
                }
            }
            sink.write_all(&buf)?;
            finish(sink)?;
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
