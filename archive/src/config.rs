//! The `archive:` block, the same in `agent.yaml` and `gateway.yaml`.
//!
//! ```yaml
//! archive:
//!   dir: /var/lib/teeway/archive   # required; created if missing
//!   format: teeway                  # teeway (native) | gor
//!   compress: zstd                  # none | zstd (teeway) | gzip (gor)
//!   rotate: { size: 64MiB, age: 10m }
//!   max_total: 10GiB                # oldest closed segments are deleted past this
//!   record_responses: false         # gateway only: also keep the shadows' responses
//!   queue: 10000                    # records waiting for the disk
//!   queue_bytes: 64MiB              # bytes waiting for the disk
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use teeway_runtime::config::{self as cfg, Problems, Section};
use teeway_runtime::yaml::Value;

/// Default segment size at which a new segment starts.
pub const DEFAULT_ROTATE_SIZE: u64 = 64 * 1024 * 1024;
/// Default segment age at which a new segment starts.
pub const DEFAULT_ROTATE_AGE: Duration = Duration::from_secs(600);
/// Default records waiting for the disk.
pub const DEFAULT_QUEUE: usize = 10_000;
/// Default bytes waiting for the disk.
pub const DEFAULT_QUEUE_BYTES: u64 = 64 * 1024 * 1024;
/// Default largest response body kept when `record_responses` is on.
pub const DEFAULT_MAX_RESPONSE_BODY: u64 = 64 * 1024;

/// Archive file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The native segment format (`docs/archive.md`).
    Teeway,
    /// GoReplay's `.gor` text format.
    Gor,
}

impl Format {
    /// The name used in configs and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Teeway => "teeway",
            Format::Gor => "gor",
        }
    }

    /// File name extension of an uncompressed segment.
    pub fn extension(self) -> &'static str {
        match self {
            Format::Teeway => "twa",
            Format::Gor => "gor",
        }
    }
}

/// Segment compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Plain files.
    None,
    /// zstd, one frame per flush (native format).
    Zstd,
    /// gzip, one member per flush (gor format).
    Gzip,
}

impl Compression {
    /// File name suffix added by this compression.
    pub fn suffix(self) -> &'static str {
        match self {
            Compression::None => "",
            Compression::Zstd => ".zst",
            Compression::Gzip => ".gz",
        }
    }
}

/// A validated `archive:` block.
#[derive(Debug, Clone, PartialEq)]
pub struct ArchiveConfig {
    /// Directory of the segments.
    pub dir: PathBuf,
    /// File format.
    pub format: Format,
    /// Compression.
    pub compress: Compression,
    /// A segment is closed once it holds this many bytes (before compression).
    pub rotate_size: u64,
    /// A segment is closed once it is this old.
    pub rotate_age: Duration,
    /// Closed segments are deleted, oldest first, while the directory holds more than this.
    pub max_total: Option<u64>,
    /// Keep the shadows' responses too (gateway only).
    pub record_responses: bool,
    /// Largest response body kept.
    pub max_response_body: u64,
    /// Records waiting for the disk.
    pub queue: usize,
    /// Bytes waiting for the disk.
    pub queue_bytes: u64,
}

impl ArchiveConfig {
    /// A config with defaults, writing to `dir`.
    pub fn new(dir: impl Into<PathBuf>, format: Format) -> Self {
        Self {
            dir: dir.into(),
            format,
            compress: Compression::None,
            rotate_size: DEFAULT_ROTATE_SIZE,
            rotate_age: DEFAULT_ROTATE_AGE,
            max_total: None,
            record_responses: false,
            max_response_body: DEFAULT_MAX_RESPONSE_BODY,
            queue: DEFAULT_QUEUE,
            queue_bytes: DEFAULT_QUEUE_BYTES,
        }
    }

    /// Reads the `archive` key of `parent`: `None` when absent (or invalid, with the problems
    /// recorded). `responses_allowed` is false for the agent, which sees no shadow responses.
    pub fn from_section(
        parent: &mut Section<'_>,
        problems: &mut Problems,
        base_dir: &Path,
        responses_allowed: bool,
    ) -> Option<Self> {
        let mut a = parent.section(problems, "archive");
        if !a.is_present() {
            a.finish(problems);
            return None;
        }
        let before = problems.len();
        let dir = a.required(
            problems,
            "dir",
            "give the directory segments are written to, for example `dir: /var/lib/teeway/archive`",
            |v| cfg::nonempty_string(v).map(|s| base_dir.join(s)),
        );
        let format = a
            .optional(
                problems,
                "format",
                "use `teeway` or `gor`",
                |v| match cfg::string(v)?.as_str() {
                    "teeway" => Ok(Format::Teeway),
                    "gor" => Ok(Format::Gor),
                    _ => Err("is not an archive format".into()),
                },
            )
            .unwrap_or(Format::Teeway);
        let compress_path = a.path_of("compress");
        let compress = a.optional(
            problems,
            "compress",
            "use `none`, `zstd` (format teeway) or `gzip` (format gor)",
            |v| match cfg::string(v)?.as_str() {
                "none" => Ok(Compression::None),
                "zstd" => Ok(Compression::Zstd),
                "gzip" => Ok(Compression::Gzip),
                _ => Err("is not a compression".into()),
            },
        );
        let compress = compress.unwrap_or(Compression::None);
        match (format, compress) {
            (Format::Teeway, Compression::Gzip) => problems.push(
                compress_path,
                Some(&Value::from("gzip")),
                "gzip is for the gor format",
                "use `compress: zstd` with `format: teeway`",
            ),
            (Format::Gor, Compression::Zstd) => problems.push(
                compress_path,
                Some(&Value::from("zstd")),
                "zstd is for the teeway format (GoReplay reads gzip only)",
                "use `compress: gzip` with `format: gor`",
            ),
            _ => {}
        }
        let mut r = a.section(problems, "rotate");
        let rotate_size = r
            .optional(
                problems,
                "size",
                "give a size such as 64MiB",
                nonzero(cfg::size),
            )
            .unwrap_or(DEFAULT_ROTATE_SIZE);
        let rotate_age = r
            .optional(problems, "age", "give a duration such as 10m", |v| {
                let d = cfg::duration(v)?;
                if d.is_zero() {
                    return Err("must be more than zero".into());
                }
                Ok(d)
            })
            .unwrap_or(DEFAULT_ROTATE_AGE);
        r.finish(problems);
        let max_total = a.optional(
            problems,
            "max_total",
            "give a size such as 10GiB, or leave it out to keep everything",
            nonzero(cfg::size),
        );
        if let Some(total) = max_total {
            if total < rotate_size {
                problems.push(
                    a.path_of("max_total"),
                    None,
                    format!("is smaller than one segment (rotate.size = {rotate_size} bytes)"),
                    "raise max_total or lower rotate.size",
                );
            }
        }
        let record_responses = a
            .optional(problems, "record_responses", "use true or false", |v| {
                v.as_bool()
                    .ok_or_else(|| "must be true or false".to_owned())
            })
            .unwrap_or(false);
        if record_responses && !responses_allowed {
            problems.push(
                a.path_of("record_responses"),
                Some(&Value::Bool(true)),
                "the agent sees no shadow responses",
                "remove it here; set it in the gateway's archive block",
            );
        }
        let max_response_body = a
            .optional(
                problems,
                "max_response_body",
                "give a size such as 64KiB",
                cfg::size,
            )
            .unwrap_or(DEFAULT_MAX_RESPONSE_BODY);
        let queue = a
            .optional(
                problems,
                "queue",
                "give a number of records such as 10000",
                |v| {
                    let n = cfg::whole_number(v)?;
                    usize::try_from(n)
                        .ok()
                        .filter(|&n| n > 0)
                        .ok_or_else(|| "must be at least 1".to_owned())
                },
            )
            .unwrap_or(DEFAULT_QUEUE);
        let queue_bytes = a
            .optional(
                problems,
                "queue_bytes",
                "give a size such as 64MiB",
                nonzero(cfg::size),
            )
            .unwrap_or(DEFAULT_QUEUE_BYTES);
        a.finish(problems);
        if problems.len() != before {
            return None;
        }
        Some(Self {
            dir: dir?,
            format,
            compress,
            rotate_size,
            rotate_age,
            max_total,
            record_responses,
            max_response_body,
            queue,
            queue_bytes,
        })
    }
}

fn nonzero(parse: fn(&Value) -> Result<u64, String>) -> impl Fn(&Value) -> Result<u64, String> {
    move |v| match parse(v)? {
        0 => Err("must be more than zero".into()),
        n => Ok(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str, responses_allowed: bool) -> Result<Option<ArchiveConfig>, String> {
        let doc = teeway_runtime::yaml::parse(yaml).expect("yaml");
        let mut p = Problems::default();
        let mut root = Section::root(&doc, &mut p);
        let c =
            ArchiveConfig::from_section(&mut root, &mut p, Path::new("/base"), responses_allowed);
        root.finish(&mut p);
        p.finish(c).map_err(|e| e.to_string())
    }

    #[test]
    fn absent_block_is_none_and_defaults_apply() {
        assert_eq!(parse("{}", true), Ok(None));
        let c = parse("archive: {dir: arc}", true)
            .expect("valid")
            .expect("present");
        assert_eq!(c, ArchiveConfig::new("/base/arc", Format::Teeway));
    }

    #[test]
    fn full_block_parses() {
        let c = parse(
            "archive:\n  dir: /a\n  format: gor\n  compress: gzip\n  rotate: {size: 1MiB, age: 30s}\n  max_total: 10MiB\n  record_responses: true\n  queue: 5\n  queue_bytes: 2MiB\n",
            true,
        )
        .expect("valid")
        .expect("present");
        assert_eq!(c.format, Format::Gor);
        assert_eq!(c.compress, Compression::Gzip);
        assert_eq!(c.rotate_size, 1024 * 1024);
        assert_eq!(c.rotate_age, Duration::from_secs(30));
        assert_eq!(c.max_total, Some(10 * 1024 * 1024));
        assert!(c.record_responses);
        assert_eq!(c.queue, 5);
    }

    #[test]
    fn mismatches_are_named_with_their_fix() {
        let e = parse("archive: {dir: /a, compress: gzip}", true).expect_err("invalid");
        assert!(
            e.contains("archive.compress") && e.contains("compress: zstd"),
            "{e}"
        );
        let e =
            parse("archive: {dir: /a, format: gor, compress: zstd}", true).expect_err("invalid");
        assert!(e.contains("GoReplay reads gzip only"), "{e}");
        let e = parse("archive: {dir: /a, record_responses: true}", false).expect_err("invalid");
        assert!(e.contains("archive.record_responses"), "{e}");
        let e = parse(
            "archive: {dir: /a, rotate: {size: 2MiB}, max_total: 1MiB}",
            true,
        )
        .expect_err("invalid");
        assert!(e.contains("archive.max_total"), "{e}");
        let e = parse("archive: {format: teeway}", true).expect_err("invalid");
        assert!(
            e.contains("archive.dir") && e.contains("is required"),
            "{e}"
        );
        let e = parse("archive: {dir: /a, rotation: {}}", true).expect_err("invalid");
        assert!(e.contains("archive.rotation: unknown key"), "{e}");
    }
}
