//! The offline commands run exactly as the README shows them: progress on (no `--quiet`), once
//! with output into pipes (a script, CI) and once under a pseudo-terminal (a person at a shell,
//! where the progress bar draws and the output differs), using `script` from util-linux
//! (Debian's essential `bsdutils`). Archive damage as a user meets it: a flipped byte in a
//! compressed segment, found by `verify` and `inspect`, costing one zstd frame.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, Uri, Version};

use teeway::sample;
use teeway_archive::frames::{Frame, Frames};
use teeway_archive::{native, Envelope, MirroredRequest};

use support::LIMIT;

const BIN: &str = env!("CARGO_BIN_EXE_teeway");

/// `count` requests 2 ms apart, half under `/api/`, written as one plain native segment.
fn write_archive(path: &Path, count: u64, body_len: usize) {
    let mut buf = BytesMut::new();
    native::put_segment_header(&mut buf);
    for id in 0..count {
        native::put_record(&Envelope::HttpRequest(request(id, body_len)), &mut buf);
    }
    std::fs::write(path, &buf).expect("write archive");
}

fn request(id: u64, body_len: usize) -> MirroredRequest {
    let mut headers = HeaderMap::new();
    headers.insert("host", HeaderValue::from_static("api.example.com"));
    let path = if id.is_multiple_of(2) {
        "/api/items"
    } else {
        "/static/x"
    };
    let body: Vec<u8> = (0..body_len).map(|i| (i as u64 ^ id) as u8).collect();
    MirroredRequest {
        meta: teeway_wire::Meta::basic(
            id,
            UNIX_EPOCH + Duration::from_nanos(1_700_000_000_000_000_000 + id * 2_000_000),
            "prod-eu-1".into(),
        ),
        method: if body_len > 0 {
            Method::POST
        } else {
            Method::GET
        },
        uri: format!("{path}?n={id}").parse::<Uri>().expect("uri"),
        version: Version::HTTP_11,
        headers,
        body: Bytes::from(body),
        trailers: None,
        body_truncated: false,
        production: None,
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The command with its output into pipes, as a script runs it.
fn piped(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("teeway runs")
}

fn shell_quote(arg: &str) -> String {
    format!("'{}'", arg.replace('\'', "'\\''"))
}

/// The command on a pseudo-terminal, as a person at a shell runs it: its exit code and what
/// the terminal showed (stdout and stderr together).
fn on_terminal(dir: &Path, args: &[&str]) -> (Option<i32>, String) {
    let mut line = shell_quote(BIN);
    for a in args {
        line.push(' ');
        line.push_str(&shell_quote(a));
    }
    let out = Command::new("script")
        .args(["--quiet", "--return", "--command", &line, "/dev/null"])
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("script (util-linux) runs");
    (out.status.code(), text(&out))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("joins")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_commands_of_the_readme_work_with_progress_on_in_pipes_and_on_a_terminal() {
    let tmp = tempfile::tempdir().expect("tmp");
    let archive = tmp.path().join("archive");
    std::fs::create_dir(&archive).expect("mkdir");
    write_archive(&archive.join("capture.twa"), 12, 64);
    let (shadow, recording) = sample::start_shadow(Duration::ZERO).await.expect("shadow");
    let target = shadow.url();
    // Each README line, and what the shadow must receive from it.
    let forms: Vec<(Vec<&str>, usize)> = vec![
        (vec!["--target", &target, "archive"], 12),
        (
            vec![
                "--target", &target, "--speed", "4", "--loop", "3", "archive",
            ],
            36,
        ),
        (
            vec![
                "--target",
                &target,
                "--rate",
                "500/s",
                "--filter-path",
                "^/api/",
                "archive",
            ],
            6,
        ),
        (
            vec![
                "--target",
                &target,
                "--max-rate",
                "--concurrency",
                "128",
                "--report",
                "json",
                "archive",
            ],
            12,
        ),
    ];
    let mut expected = 0;
    for (form, arrives) in forms {
        let mut args = vec!["replay"];
        args.extend(form.iter().copied());
        let owned: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let dir = tmp.path().to_owned();
        let out = blocking(move || {
            let args: Vec<&str> = owned.iter().map(String::as_str).collect();
            piped(&dir, &args)
        })
        .await;
        let t = text(&out);
        assert_eq!(out.status.code(), Some(0), "{args:?} in pipes: {t}");
        assert!(!t.contains("error"), "{args:?} in pipes: {t}");
        let report = String::from_utf8_lossy(&out.stdout);
        if form.contains(&"json") {
            let json: serde_json::Value = serde_json::from_str(&report).expect("a JSON report");
            assert_eq!(json["sent"], 12, "{report}");
            assert_eq!(json["succeeded"], 12, "{report}");
        } else {
            assert!(
                report.starts_with(&format!("sent {arrives} in ")),
                "{args:?}: {report}"
            );
        }
        expected += arrives;
        assert_eq!(recording.wait_for(expected, LIMIT).await, expected);

        let owned: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let dir = tmp.path().to_owned();
        let (code, shown) = blocking(move || {
            let args: Vec<&str> = owned.iter().map(String::as_str).collect();
            on_terminal(&dir, &args)
        })
        .await;
        assert_eq!(code, Some(0), "{args:?} on a terminal: {shown}");
        assert!(!shown.contains("error"), "{args:?} on a terminal: {shown}");
        assert!(
            shown.contains(&format!("sent {arrives} in")) || shown.contains("\"sent\":12"),
            "{args:?} on a terminal: {shown}"
        );
        expected += arrives;
        assert_eq!(recording.wait_for(expected, LIMIT).await, expected);
    }
    assert_eq!(recording.count(), expected, "nothing sent twice");
}

#[test]
fn archive_commands_of_the_readme_work_in_pipes_on_a_terminal_and_into_a_closed_pipe() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    std::fs::create_dir(dir.join("archive")).expect("mkdir");
    write_archive(&dir.join("archive/capture.twa"), 2_000, 16);

    for args in [
        vec!["archive", "inspect", "archive"],
        vec!["archive", "verify", "archive"],
    ] {
        let out = piped(dir, &args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", text(&out));
        let (code, shown) = on_terminal(dir, &args);
        assert_eq!(code, Some(0), "{args:?} on a terminal: {shown}");
    }
    let out = piped(dir, &["archive", "inspect", "archive"]);
    assert!(
        text(&out).contains("records:    2000 (2000 requests, 0 responses)"),
        "{}",
        text(&out)
    );

    // `inspect X | head`: the reader is gone before teeway writes.
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = Command::new(BIN)
        .args(["archive", "inspect", "archive"])
        .current_dir(dir)
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");

    // Every converted record is counted, HAR's held-back requests included.
    for (to, file) in [
        ("har", "capture.har"),
        ("gor", "capture.gor.gz"),
        ("teeway", "copy.twa.zst"),
    ] {
        let out = piped(dir, &["archive", "convert", "--to", to, "archive", file]);
        assert_eq!(out.status.code(), Some(0), "{to}: {}", text(&out));
        assert!(
            text(&out).starts_with(&format!("wrote 2000 records to {file}")),
            "{to}: {}",
            text(&out)
        );
        let again = piped(dir, &["archive", "verify", file]);
        if to == "har" {
            // HAR is an export: not an archive teeway reads back.
            let doc: serde_json::Value =
                serde_json::from_slice(&std::fs::read(dir.join(file)).expect("har"))
                    .expect("valid JSON");
            assert_eq!(doc["log"]["entries"].as_array().map(Vec::len), Some(2000));
        } else {
            assert_eq!(again.status.code(), Some(0), "{to}: {}", text(&again));
            assert!(
                text(&again).contains("2000 records read, 0 file(s) damaged"),
                "{}",
                text(&again)
            );
        }
    }
}

/// Offsets of the zstd frames of a file, and the records each holds.
fn frames_of(path: &Path) -> Vec<(u64, u64)> {
    let mut frames = Frames::new(std::fs::File::open(path).expect("open")).expect("decoder");
    let mut out = Vec::new();
    let mut first = true;
    loop {
        match frames.next_frame().expect("reads") {
            Frame::Data { offset, bytes } => {
                let cursor = std::io::Cursor::new(bytes);
                let mut records = if first {
                    native::SegmentReader::new(cursor).expect("header")
                } else {
                    native::SegmentReader::records(cursor, 0)
                };
                first = false;
                let mut n = 0;
                while let native::Next::Record(_) = records.next_record() {
                    n += 1;
                }
                out.push((offset, n));
            }
            Frame::End => return out,
            other => panic!("a clean file: {other:?}"),
        }
    }
}

#[test]
fn a_flipped_byte_in_a_compressed_segment_costs_one_frame_and_is_reported_where_it_is() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    write_archive(&dir.join("plain.twa"), 400, 10_000);
    let out = piped(
        dir,
        &[
            "archive",
            "convert",
            "--to",
            "teeway",
            "plain.twa",
            "seg.twa.zst",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let path: PathBuf = dir.join("seg.twa.zst");
    let frames = frames_of(&path);
    assert!(frames.len() >= 3, "several frames: {frames:?}");
    assert_eq!(frames.iter().map(|f| f.1).sum::<u64>(), 400);
    let (damaged_at, lost) = frames[1];
    let mut bytes = std::fs::read(&path).expect("read");
    let inside = (frames[1].0 + (frames[2].0 - frames[1].0) / 2) as usize;
    bytes[inside] ^= 0x01;
    std::fs::write(&path, &bytes).expect("write");

    let out = piped(dir, &["archive", "verify", "seg.twa.zst"]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains(&format!("{} records read", 400 - lost)),
        "only the damaged frame's {lost} records are lost: {t}"
    );
    assert!(
        t.contains(&format!("seg.twa.zst at byte {damaged_at}: unreadable")),
        "the compressed offset of the frame: {t}"
    );
    assert!(!t.contains("torn"), "damage is not a crash-torn tail: {t}");

    let out = piped(dir, &["archive", "inspect", "seg.twa.zst"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "inspect says so too: {}",
        text(&out)
    );
    assert!(
        text(&out).contains(&format!("records:    {}", 400 - lost)),
        "{}",
        text(&out)
    );
}

fn gor_record(id: &str, ns: u64, message: &[u8]) -> Vec<u8> {
    let mut out = format!("1 {id} {ns} -1\n").into_bytes();
    out.extend_from_slice(message);
    out.extend_from_slice(teeway_archive::gor::SEPARATOR);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goreplay_captures_replay_as_recorded_and_the_report_says_what_it_changed() {
    let tmp = tempfile::tempdir().expect("tmp");
    let base = 1_700_000_000_000_000_000u64;
    let mut gor = Vec::new();
    gor.extend(gor_record(
        "a1",
        base,
        b"GET /old HTTP/1.0\r\nHost: api.example.com\r\n\r\n",
    ));
    // A pcap-style capture: the body is cut short of its Content-Length.
    gor.extend(gor_record(
        "a2",
        base + 1_000_000,
        b"POST /cut HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 100\r\n\r\nonly this",
    ));
    // Five seconds later: --max-wait (1 s) shortens this gap.
    gor.extend(gor_record(
        "a3",
        base + 5_001_000_000,
        b"GET /late HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
    ));
    std::fs::write(tmp.path().join("capture.gor"), &gor).expect("write");
    let (shadow, recording) = sample::start_shadow(Duration::ZERO).await.expect("shadow");
    let target = shadow.url();
    let dir = tmp.path().to_owned();
    let run = move |extra: &'static [&'static str]| {
        let dir = dir.clone();
        let target = target.clone();
        async move {
            blocking(move || {
                let mut args = vec!["replay", "--target", &target, "--timeout", "3s"];
                args.extend_from_slice(extra);
                args.push("capture.gor");
                piped(&dir, &args)
            })
            .await
        }
    };

    let out = run(&["--dry-run"]).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(
        t.contains(
            "dry run: 2 request(s) would be sent over 1.00 s at this pace; nothing was sent"
        ),
        "{t}"
    );
    assert!(t.contains("skipped:  truncated_body 1"), "{t}");
    assert_eq!(recording.count(), 0, "a dry run sends nothing");

    let out = run(&["--replay-truncated"]).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(t.starts_with("sent 3 in "), "{t}");
    assert!(
        t.contains("3 answered, 0 failed"),
        "the cut body costs no timeout: {t}"
    );
    assert!(
        t.contains("max-wait: 1 recorded gap(s) shortened, 4.00 s taken out of the schedule"),
        "{t}"
    );
    let got = recording.requests();
    let old = got.iter().find(|r| r.uri.path() == "/old").expect("/old");
    assert_eq!(old.version, Version::HTTP_10, "replayed as 1.0");
    assert_eq!(
        old.headers["connection"], "close",
        "a 1.0 request without keep-alive: the connection is not pooled"
    );
    let cut = got.iter().find(|r| r.uri.path() == "/cut").expect("/cut");
    assert_eq!(&cut.body[..], b"only this");
    assert_eq!(cut.headers["content-length"], "9");

    let out = run(&["--max-rate"]).await;
    let t = text(&out);
    assert!(
        !t.contains("schedule:"),
        "no schedule under --max-rate: {t}"
    );
    assert!(t.contains("skipped:  truncated_body 1"), "{t}");

    // Separators turned into CR LF by a text-mode copy: said, not read as zero records.
    let crlf: Vec<u8> = gor
        .iter()
        .flat_map(|&b| {
            if b == b'\n' {
                vec![b'\r', b'\n']
            } else {
                vec![b]
            }
        })
        .collect();
    std::fs::write(tmp.path().join("crlf.gor"), crlf).expect("write");
    let out = piped(tmp.path(), &["archive", "verify", "crlf.gor"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("its lines end in CR LF"),
        "{}",
        text(&out)
    );
    let out = piped(tmp.path(), &["archive", "inspect", "capture.gor"]);
    assert!(
        text(&out).contains(
            "1 truncated (by the agent's limit, or short of their Content-Length in a capture)"
        ),
        "{}",
        text(&out)
    );
}

/// One exit-code scheme (README "Exit codes"): a command line that asks for the impossible is 2,
/// whoever notices it (clap, or the command), and nothing is done.
#[test]
fn bad_command_lines_exit_2_whoever_finds_them() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    write_archive(&dir.join("a.twa"), 1, 0);
    let init = piped(dir, &["certs", "init", "--dir", "c"]);
    assert!(init.status.success(), "{}", text(&init));
    for args in [
        vec!["certs", "issue", "--dir", "c"],
        vec![
            "certs",
            "issue",
            "--dir",
            "c",
            "--agent-name",
            "x",
            "--days",
            "0",
        ],
        vec!["certs", "issue", "--dir", "c", "--agent-name", "a/b"],
        vec!["replay", "--target", "ftp://x", "a.twa"],
        vec![
            "replay",
            "--target",
            "http://127.0.0.1:9",
            "--loop",
            "0",
            "a.twa",
        ],
        vec![
            "replay",
            "--target",
            "http://127.0.0.1:9",
            "--timeout",
            "0s",
            "a.twa",
        ],
        vec![
            "replay",
            "--target",
            "http://127.0.0.1:9",
            "--ca",
            "c/ca.pem",
            "a.twa",
        ],
        vec![
            "replay",
            "--target",
            "http://127.0.0.1:9",
            "--speed",
            "0",
            "a.twa",
        ],
        vec!["replay", "--no-such-flag"],
    ] {
        let out = piped(dir, &args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
    }
    assert!(!dir.join("c/agent-x.pem").exists(), "nothing was done");
}
