//! Archives end to end: capture through real agent and gateway, replay against a recording
//! server, GoReplay fixtures, pacing, and a writer process killed with SIGKILL.

mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, Method, Uri, Version};
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use teeway::demo::{plan, send_plan};
use teeway::replay::{self, Pace, ReplayOptions};
use teeway::sample;
use teeway::stack::{self, Pki, RunningAgent, RunningGateway};
use teeway_archive::config::{ArchiveConfig, Compression, Format};
use teeway_archive::read::Reader;
use teeway_archive::{gor, native, Envelope, MirroredRequest};
use teeway_gateway::config::HostPolicy;
use teeway_runtime::config::UpstreamProtocol;

use support::{admin_get, field, Proc, LIMIT};

fn options(archives: Vec<PathBuf>, target: String, pace: Pace) -> ReplayOptions {
    ReplayOptions {
        archives,
        target,
        ca: None,
        pace,
        max_wait: Duration::from_secs(1),
        loops: 1,
        concurrency: 1,
        filter_path: None,
        filter_method: None,
        host_header: HostPolicy::Keep,
        protocol: UpstreamProtocol::Http1,
        timeout: Duration::from_secs(10),
        progress: false,
        dry_run: false,
        replay_truncated: false,
    }
}

fn requests_in(dir: &Path) -> Vec<MirroredRequest> {
    Reader::open(&[dir.to_owned()])
        .expect("archive opens")
        .filter_map(|r| match r {
            Envelope::HttpRequest(r) => Some(r),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captured_traffic_replays_byte_identical_in_recorded_order() {
    teeway_wire::tls::install_default_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate("prod-eu").expect("pki");
    let primary = sample::start_primary().await.expect("primary");
    let (shadow, live) = sample::start_shadow(Duration::ZERO).await.expect("shadow");
    let mut gateway_config = stack::gateway_config(pki.gateway_material(), &[shadow.addr]);
    let mut archive = ArchiveConfig::new(dir.path(), Format::Teeway);
    archive.compress = Compression::Zstd;
    archive.record_responses = true;
    gateway_config.archive = Some(archive);
    let gateway = RunningGateway::start(gateway_config)
        .await
        .expect("gateway");
    let agent = RunningAgent::start(stack::agent_config(
        pki.agent_material(),
        primary.addr,
        gateway.addr,
        100.0,
    ))
    .await
    .expect("agent");
    assert!(agent.wait_connected(LIMIT).await);

    let plan = plan(60);
    let outcomes = send_plan(agent.addr, &plan).await;
    assert!(outcomes.iter().all(|o| o.is_ok()), "{outcomes:?}");
    assert_eq!(live.wait_for(plan.len(), LIMIT).await, plan.len());
    agent.stop().await.expect("agent stops");
    gateway
        .stop()
        .await
        .expect("gateway stops, closing the archive");

    let mut reader = Reader::open(&[dir.path().to_owned()]).expect("archive");
    let records: Vec<Envelope> = reader.by_ref().collect();
    assert_eq!(reader.stats.skipped(), 0, "{:?}", reader.stats.issues);
    let archived: Vec<&MirroredRequest> = records
        .iter()
        .filter_map(|r| match r {
            Envelope::HttpRequest(r) => Some(r),
            _ => None,
        })
        .collect();
    let responses = records.len() - archived.len();
    assert_eq!(
        archived.len(),
        plan.len(),
        "every received request archived"
    );
    assert_eq!(responses, plan.len(), "every shadow response archived");
    assert!(archived
        .iter()
        .all(|r| &*r.meta.source_cluster == "demo-prod"));
    // The envelope's metadata, as `inspect` shows it: one agent process, its certificate's
    // identity, the proxy as tap, chosen by mirror.percentage.
    let summary = teeway_archive::inspect::Summary::of(
        Reader::open(&[dir.path().to_owned()]).expect("archive"),
    );
    assert_eq!(summary.sessions.len(), 1);
    assert_eq!(summary.without_metadata, 0);
    assert_eq!(
        summary.agents.get("prod-eu").copied(),
        Some(plan.len() as u64),
        "{summary}"
    );
    assert_eq!(summary.taps.get("http").copied(), Some(plan.len() as u64));
    assert_eq!(
        summary.rules.get("mirror.percentage").copied(),
        Some(plan.len() as u64)
    );
    assert!(summary
        .to_string()
        .contains("sampled by: mirror.percentage"));

    // Replay against a fresh recording server, one at a time so arrival order is send order.
    let (fresh, recording) = sample::start_shadow(Duration::ZERO).await.expect("shadow");
    let mut opts = options(vec![dir.path().to_owned()], fresh.url(), Pace::Max);
    opts.protocol = UpstreamProtocol::Auto;
    let report = replay::run(opts).await.expect("replay");
    assert_eq!(report.sent, plan.len() as u64, "{report}");
    assert_eq!(report.succeeded, plan.len() as u64, "{report}");
    let got = recording.requests();
    assert_eq!(got.len(), archived.len());
    for (i, (want, got)) in archived.iter().zip(&got).enumerate() {
        assert_eq!(got.method, want.method, "request {i}");
        assert_eq!(
            got.uri.path_and_query(),
            want.uri.path_and_query(),
            "request {i}"
        );
        assert_eq!(got.body, want.body, "request {i}");
        let mut want_headers = want.headers.clone();
        teeway_runtime::proxy::remove_hop_by_hop(&mut want_headers);
        let mut got_headers = got.headers.clone();
        if got.version == Version::HTTP_2 {
            // h2 carries the host in :authority, which the server turns into the URI.
            want_headers.remove(http::header::HOST);
            got_headers.remove(http::header::HOST);
            assert_eq!(
                got.uri.authority().map(|a| a.as_str()),
                want.uri
                    .authority()
                    .map(|a| a.as_str())
                    .or(want.headers.get("host").and_then(|h| h.to_str().ok())),
                "request {i}"
            );
        }
        // Framing is re-done on the way out: a body recorded chunked goes out with its length.
        if let Some(len) = got_headers.remove(http::header::CONTENT_LENGTH) {
            assert_eq!(len, want.body.len().to_string().as_str(), "request {i}");
        }
        want_headers.remove(http::header::CONTENT_LENGTH);
        assert_eq!(got_headers, want_headers, "request {i}");
    }
    fresh.stop().await;
    shadow.stop().await;
    primary.stop().await;
}

fn gor_record(kind: u8, id: &str, ts: u64, latency: Option<i64>, message: &[u8]) -> Vec<u8> {
    let mut out = match latency {
        Some(l) => format!("{kind} {id} {ts} {l}\n").into_bytes(),
        None => format!("{kind} {id} {ts}\n").into_bytes(),
    };
    out.extend_from_slice(message);
    out.extend_from_slice(gor::SEPARATOR);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goreplay_fixtures_replay_in_timestamp_order_with_exact_bodies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = 1_700_000_000_000_000_000u64;
    let binary_body: Vec<u8> = b"line one\r\nline two\r\n\r\n\x00\x01\xfe\xff end".to_vec();
    let mut post = format!(
        "POST /upload?kind=bin HTTP/1.1\r\nHost: api.example.com\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        binary_body.len()
    )
    .into_bytes();
    post.extend_from_slice(&binary_body);
    let mut plain = Vec::new();
    // Out of timestamp order, as captures from several capture threads are.
    plain.extend(gor_record(
        1,
        "a1",
        base + 3_000,
        Some(-1),
        b"GET /third HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
    ));
    plain.extend(gor_record(1, "a2", base + 1_000, None, &post));
    plain.extend(gor_record(
        2,
        "a2",
        base + 1_500,
        Some(500),
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    ));
    plain.extend(gor_record(
        1,
        "a3",
        base + 2_000,
        Some(-1),
        b"PUT /chunked HTTP/1.1\r\nHost: api.example.com\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nwiki\r\n5\r\npedia\r\n0\r\n\r\n",
    ));
    let path = dir.path().join("capture.gor.gz");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&plain).expect("gzip");
    std::fs::write(&path, gz.finish().expect("gzip")).expect("write");

    let (shadow, recording) = sample::start_shadow(Duration::ZERO).await.expect("shadow");
    let report = replay::run(options(vec![path.clone()], shadow.url(), Pace::Max))
        .await
        .expect("replay");
    assert_eq!(report.sent, 3, "{report}");
    assert_eq!(report.read.skipped(), 0, "{report}");
    let got = recording.requests();
    let paths: Vec<String> = got.iter().map(|r| r.uri.to_string()).collect();
    assert_eq!(paths, ["/upload?kind=bin", "/chunked", "/third"]);
    assert_eq!(got[0].method, Method::POST);
    assert_eq!(got[0].body, Bytes::from(binary_body));
    assert_eq!(got[0].headers["host"], "api.example.com");
    assert_eq!(got[1].body, Bytes::from_static(b"wikipedia"));
    assert!(got[1].headers.get("transfer-encoding").is_none());

    // Our gor output parses back record for record.
    let ours = dir.path().join("ours.gor");
    let (written, _) = teeway::archive_cmd::convert(
        std::slice::from_ref(&path),
        teeway::archive_cmd::ConvertTo::Gor,
        &ours,
    )
    .expect("convert");
    assert_eq!(written, 4);
    let original: Vec<Envelope> = Reader::open(&[path]).expect("open").collect();
    let back: Vec<Envelope> = Reader::open(&[ours]).expect("open").collect();
    assert_eq!(back.len(), original.len());
    for (a, b) in original.iter().zip(&back) {
        match (a, b) {
            (Envelope::HttpRequest(a), Envelope::HttpRequest(b)) => {
                assert_eq!((&a.method, &a.uri, &a.body), (&b.method, &b.uri, &b.body));
                assert_eq!(a.headers, b.headers);
                assert_eq!(a.meta.received_at, b.meta.received_at);
            }
            (Envelope::HttpResponse(a), Envelope::HttpResponse(b)) => {
                assert_eq!(
                    (a.status, &a.body, a.latency),
                    (b.status, &b.body, b.latency)
                );
            }
            _ => panic!("record kinds differ: {a:?} / {b:?}"),
        }
    }
    shadow.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speed_one_follows_the_recorded_gaps() {
    let dir = tempfile::tempdir().expect("tempdir");
    let offsets_ms = [0u64, 150, 450, 500, 800];
    let mut bytes = bytes::BytesMut::new();
    native::put_segment_header(&mut bytes);
    for (i, ms) in offsets_ms.iter().enumerate() {
        let request = MirroredRequest {
            meta: teeway_wire::Meta::basic(
                i as u64,
                UNIX_EPOCH + Duration::from_secs(1_700_000_000) + Duration::from_millis(*ms),
                "c".into(),
            ),
            method: Method::GET,
            uri: Uri::from_maybe_shared(format!("/{i}")).expect("uri"),
            version: Version::HTTP_11,
            headers: HeaderMap::new(),
            body: Bytes::new(),
            trailers: None,
            body_truncated: false,
            production: None,
        };
        native::put_record(&Envelope::HttpRequest(request), &mut bytes);
    }
    let path = dir.path().join("paced.twa");
    std::fs::write(&path, &bytes).expect("write");
    let (shadow, recording) = sample::start_shadow(Duration::ZERO).await.expect("shadow");
    let report = replay::run(options(vec![path], shadow.url(), Pace::Speed(1.0)))
        .await
        .expect("replay");
    assert_eq!(report.succeeded, 5, "{report}");
    let got = recording.requests();
    let arrived: Vec<Instant> = got.iter().map(|r| r.arrived).collect();
    for i in 1..offsets_ms.len() {
        let want = Duration::from_millis(offsets_ms[i] - offsets_ms[i - 1]);
        let gap = arrived[i].duration_since(arrived[i - 1]);
        // Never early by more than timer slack; late by at most a loaded machine's jitter.
        assert!(
            gap + Duration::from_millis(15) >= want && gap <= want + Duration::from_millis(200),
            "gap {i}: recorded {want:?}, replayed {gap:?}"
        );
    }
    shadow.stop().await;
}

/// The body of the `n`th request of the crash test: its number, and a length that varies.
fn crash_body(n: usize) -> String {
    format!("record-{n:06}-{}", "x".repeat(n % 700))
}

/// The `teeway` binary, as cargo built it for these tests.
fn teeway() -> Command {
    Command::new(env!("CARGO_BIN_EXE_teeway"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_writer_loses_no_flushed_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let archive_dir = dir.path().join("archive");
    let primary = sample::start_primary().await.expect("primary");
    // An agent that archives instead of sending: a real process writing segments.
    let config = format!(
        "cluster: crash\nlisten: 127.0.0.1:0\nprimary: http://{}\nadmin: {{listen: 127.0.0.1:0}}\narchive:\n  dir: {}\n  rotate: {{size: 64KiB}}\n",
        primary.addr,
        archive_dir.display()
    );
    std::fs::write(dir.path().join("agent.yaml"), config).expect("config");
    let agent = Proc::spawn(dir.path(), &["agent", "--config", "agent.yaml"]);
    let serving = agent.wait_for_line("agent serving");
    let listen: SocketAddr = field(&serving, "listen").parse().expect("listen addr");
    let admin: SocketAddr = field(&serving, "admin").parse().expect("admin addr");

    // A client keeps sending distinct requests while the agent writes them.
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let post = move |path: String, body: String| {
        let client = client.clone();
        async move {
            let req = http::Request::post(format!("http://{listen}{path}"))
                .body(Full::new(Bytes::from(body)))
                .expect("request");
            // Answers after the kill are refused; those requests were never archived.
            let _ = client.request(req).await;
        }
    };
    let mut sent = 0usize;
    let mut flushed_before_kill = 0.0;
    let deadline = Instant::now() + LIMIT;
    while Instant::now() < deadline && sent < 5_000 {
        for _ in 0..20 {
            post(format!("/crash/{sent}"), crash_body(sent)).await;
            sent += 1;
        }
        let (_, text) = admin_get(admin, "/metrics").await;
        flushed_before_kill = teeway_runtime::metrics::Snapshot::parse(&text)
            .get(teeway_archive::write::RECORDS_TOTAL);
        if flushed_before_kill >= 400.0 {
            break;
        }
    }
    assert!(
        flushed_before_kill >= 400.0,
        "the agent archived too little: {flushed_before_kill}"
    );
    // Mid-stream: requests keep arriving as the writer dies.
    let late = tokio::spawn(async move {
        for i in 0..300 {
            post(format!("/late/{i}"), format!("late-{i}")).await;
        }
    });
    // Kill while the late requests flow, without waiting for them to be written.
    let _ = admin_get(admin, "/healthz").await;
    drop(agent); // SIGKILL, then reaped
    let _ = late.await;

    let mut reader =
        Reader::open(std::slice::from_ref(&archive_dir)).expect("archive readable after a crash");
    let records: Vec<MirroredRequest> = reader
        .by_ref()
        .filter_map(|r| match r {
            Envelope::HttpRequest(r) => Some(r),
            _ => None,
        })
        .collect();
    assert!(
        records.len() as f64 >= flushed_before_kill,
        "{} records recovered, {flushed_before_kill} were reported flushed before the kill",
        records.len()
    );
    assert_eq!(reader.stats.corrupt, 0, "{:?}", reader.stats.issues);
    assert_eq!(reader.stats.unreadable, 0, "{:?}", reader.stats.issues);
    assert!(reader.stats.torn <= 1, "{:?}", reader.stats.issues);
    for r in &records {
        let path = r.uri.path();
        let body = std::str::from_utf8(&r.body).expect("utf8 body");
        if let Some(n) = path.strip_prefix("/crash/") {
            let n: usize = n.parse().expect("seq");
            assert_eq!(body, crash_body(n));
        } else if let Some(n) = path.strip_prefix("/late/") {
            assert_eq!(body, format!("late-{n}"));
        } else {
            panic!("unexpected record {path}");
        }
    }
    // A later writer recovers the open segment under its final name.
    let names: Vec<String> = std::fs::read_dir(&archive_dir)
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().any(|n| n.ends_with(".partial")), "{names:?}");
    let config = ArchiveConfig::new(&archive_dir, Format::Teeway);
    let (_, task) =
        teeway_archive::Archive::start(&config, &teeway_runtime::metrics::Registry::new())
            .expect("restart");
    task.close().await;
    assert_eq!(requests_in(&archive_dir).len(), records.len());
    primary.stop().await;
}

#[test]
fn inspect_and_convert_to_har_from_the_command_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut bytes = Vec::new();
    bytes.extend(gor_record(
        1,
        "x1",
        1_000,
        Some(-1),
        b"GET /a?q=1 HTTP/1.1\r\nHost: h\r\n\r\n",
    ));
    bytes.extend(gor_record(
        1,
        "x2",
        2_000,
        Some(-1),
        b"POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi",
    ));
    bytes.extend(b"1 x3 3000 -1\nGET /torn HTTP/1.1\r\n");
    let path = dir.path().join("in.gor");
    std::fs::write(&path, bytes).expect("write");

    let out = teeway()
        .args(["archive", "inspect"])
        .arg(&path)
        .output()
        .expect("runs");
    // The torn tail is damage: listed, and the exit code says so.
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("1 part(s) of the archive could not be read")
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("records:    2 (2 requests, 0 responses)"),
        "{text}"
    );
    assert!(text.contains("GET 1, POST 1"), "{text}");
    assert!(text.contains("1 torn tail(s)"), "{text}");

    let har = dir.path().join("out.har");
    let out = teeway()
        .args(["archive", "convert", "--to", "har"])
        .arg(&path)
        .arg(&har)
        .output()
        .expect("runs");
    assert_eq!(
        out.status.code(),
        Some(1),
        "converted, with the torn tail reported: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("wrote 2 records"));
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&har).expect("har")).expect("valid JSON");
    let entries = doc["log"]["entries"].as_array().expect("entries");
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[1]["request"]["postData"]["text"], "hi");

    // The target refuses connections: the replay says so and fails.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = closed.local_addr().expect("addr");
    drop(closed);
    let out = teeway()
        .args([
            "replay",
            "--max-rate",
            "--quiet",
            "--report",
            "json",
            "--target",
        ])
        .arg(format!("http://{addr}"))
        .arg(&path)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json report");
    assert_eq!(report["sent"], 2);
    assert_eq!(report["failed"]["connect"], 2);
}

/// A full disk under the archive: records are dropped and counted, what was written stays
/// readable, and the writer does not open (and leave) a new segment per failed write. Needs a
/// small tmpfs, so root; elsewhere it says SKIPPED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_drops_and_counts_without_littering_segments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mount = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
        .arg(dir.path())
        .output();
    match mount {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            return support::tool_missing(
                "a tmpfs mount",
                &String::from_utf8_lossy(&out.stderr),
                "run as root",
            )
        }
        Err(e) => return support::tool_missing("mount", &e.to_string(), "run as root"),
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(dir.path().to_owned());

    let mut config = ArchiveConfig::new(dir.path(), Format::Teeway);
    config.rotate_size = 64 * 1024;
    config.queue_bytes = 64 << 20;
    let registry = teeway_runtime::metrics::Registry::new();
    let (archive, task) = teeway_archive::Archive::start(&config, &registry).expect("start");
    // 2 MiB of records into 256 KiB, in bursts over about 2 s, so that many batches meet the
    // full disk and the writer tries the disk again after its one-second retry window.
    for round in 0..20u64 {
        for i in 0..100u64 {
            let mut r = gor::parse_record(&gor_record(
                1,
                &format!("{round}-{i}"),
                round * 1_000 + i,
                Some(-1),
                b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n",
            ))
            .expect("record");
            if let Envelope::HttpRequest(req) = &mut r {
                req.body = Bytes::from(vec![b'x'; 1024]);
            }
            archive.try_submit(r, None);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    task.close().await;
    let metrics = teeway_runtime::metrics::Snapshot::parse(&registry.render());
    let written = metrics.get("teeway_archive_records_total");
    let io_errors = metrics.get("teeway_archive_dropped_total{reason=\"io_error\"}");
    assert!(io_errors > 0.0, "the disk filled up: {}", registry.render());
    assert_eq!(written + io_errors, 2000.0, "every record counted once");
    let files: Vec<(String, u64)> = std::fs::read_dir(dir.path())
        .expect("dir")
        .map(|e| {
            let e = e.expect("entry");
            let len = e.metadata().map(|m| m.len()).unwrap_or(0);
            (e.file_name().to_string_lossy().into_owned(), len)
        })
        .collect();
    assert!(files.len() <= 6, "no segment churn: {files:?}");
    assert!(
        files.iter().all(|(_, len)| *len > 0),
        "no empty segment: {files:?}"
    );
    assert_eq!(requests_in(dir.path()).len() as f64, written);
}
