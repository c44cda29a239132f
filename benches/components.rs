//! Component benchmarks: `cargo bench --bench components` prints numbers, asserts nothing.
//!
//! - wire: encoding and decoding `REQUEST` frames with 1 KiB bodies (records/s, GB/s);
//! - uplink: copies pushed straight into the agent's uplink and acknowledged by a gateway over
//!   loopback QUIC with mTLS, for 1 KiB and 64 KiB bodies (records/s, MB/s);
//! - replay: the same path with the gateway replaying every copy to a fast local HTTP server
//!   (replays/s);
//! - archive: the writer alone for 1 KiB requests in every format and compression (records/s,
//!   MB/s), then a capture-only gateway (archive on, no routes) fed by the uplink, to show the
//!   archive keeps up with what one agent can deliver;
//! - offline replay: `teeway replay --max-rate` of a 1 KiB archive against a fast local target
//!   (requests/s, latency).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, Uri, Version};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use teeway::replay::{Pace, ReplayOptions};
use teeway::stack::{self, Pki, RunningGateway};
use teeway_agent::bench_support::Queued;
use teeway_agent::bench_support::{Uplink, UplinkState};
use teeway_agent::metrics::Accounting;
use teeway_archive::config::{ArchiveConfig, Compression, Format};
use teeway_archive::write::{Archive, Outcome};
use teeway_archive::Envelope;
use teeway_gateway::config::{HostPolicy, RouteMatch};
use teeway_runtime::config::UpstreamProtocol;
use teeway_runtime::dns::Resolver;
use teeway_runtime::metrics::{Registry, Snapshot};
use teeway_wire::{Frame, MirroredRequest};

fn record(body_len: usize) -> MirroredRequest {
    let mut headers = HeaderMap::new();
    headers.insert("host", HeaderValue::from_static("api.example.com"));
    headers.insert("user-agent", HeaderValue::from_static("bench/1"));
    headers.insert("accept", HeaderValue::from_static("application/json"));
    headers.insert(
        "x-request-id",
        HeaderValue::from_static("0f8fad5b-d9cb-469f-a165-70867728950e"),
    );
    MirroredRequest {
        meta: teeway_wire::Meta::basic(1, SystemTime::now(), "bench".into()),
        method: Method::POST,
        uri: Uri::from_static("/v1/orders?customer=42"),
        version: Version::HTTP_11,
        headers,
        body: Bytes::from(vec![0x5a; body_len]),
        trailers: None,
        body_truncated: false,
        production: None,
    }
}

/// A 1 KiB JSON-ish body that differs per record and compresses about as well as real API
/// traffic does (a constant body would flatter zstd and gzip).
fn json_body(seed: u64, len: usize) -> Bytes {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = String::with_capacity(len + 64);
    out.push('[');
    while out.len() < len - 1 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.push_str(&format!(
            "{{\"sku\":\"A-{:05}\",\"qty\":{},\"price\":{}.{:02}}},",
            x % 100_000,
            (x >> 20) % 9 + 1,
            (x >> 24) % 500,
            (x >> 40) % 100
        ));
    }
    out.truncate(len - 1);
    out.push(']');
    Bytes::from(out)
}

fn archived_request(n: u64) -> MirroredRequest {
    let mut r = record(0);
    r.meta.id = n;
    r.meta.received_at = SystemTime::UNIX_EPOCH
        + Duration::from_secs(1_790_000_000)
        + Duration::from_micros(n * 250);
    r.body = json_body(n, 1024);
    r
}

/// Writes `count` 1 KiB requests through the archive writer with at most `in_flight` waiting:
/// the writer's own throughput, with no record dropped. Returns the elapsed time, the request
/// bytes written (frame size, before compression) and the bytes on disk.
async fn archive_write(
    dir: &std::path::Path,
    format: Format,
    compress: Compression,
    count: u64,
) -> (Duration, f64, u64) {
    let mut config = ArchiveConfig::new(dir, format);
    config.compress = compress;
    let registry = Registry::new();
    let (archive, task) = Archive::start(&config, &registry).expect("archive");
    let in_flight = Arc::new(tokio::sync::Semaphore::new(config.queue / 2));
    let records: Vec<MirroredRequest> = (0..1024).map(archived_request).collect();
    let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut request_bytes = 0u64;
    let started = Instant::now();
    for n in 0..count {
        let permit = in_flight
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore open");
        let mut r = records[(n % 1024) as usize].clone();
        r.meta.id = n;
        request_bytes += r.frame_len() as u64;
        let written = written.clone();
        archive.try_submit(
            Envelope::HttpRequest(r),
            Some(Box::new(move |outcome| {
                if outcome == Outcome::Written {
                    written.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                drop(permit);
            })),
        );
    }
    task.close().await;
    let elapsed = started.elapsed();
    let m = Snapshot::parse(&registry.render());
    assert_eq!(
        written.load(std::sync::atomic::Ordering::Relaxed),
        count,
        "every record written"
    );
    assert_eq!(m.sum(teeway_archive::write::RECORDS_TOTAL) as u64, count);
    let on_disk = std::fs::read_dir(dir)
        .expect("archive dir")
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    (elapsed, request_bytes as f64, on_disk)
}

async fn archive_benches(pki: &Pki) {
    let count = 200_000;
    for (format, compress) in [
        (Format::Teeway, Compression::None),
        (Format::Teeway, Compression::Zstd),
        (Format::Gor, Compression::None),
        (Format::Gor, Compression::Gzip),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (t, bytes, on_disk) = archive_write(dir.path(), format, compress, count).await;
        println!(
            "archive write {:>6}{:<4} 1 KiB requests: {:>8.0} records/s  {:>6.1} MB/s  ({:.1} MB on disk)",
            format.as_str(),
            compress.suffix(),
            count as f64 / t.as_secs_f64(),
            bytes / t.as_secs_f64() / 1e6,
            on_disk as f64 / 1e6
        );
    }

    // A capture-only gateway: every copy the uplink delivers goes to the archive.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = stack::gateway_config(pki.gateway_material(), &[]);
    config.routes.clear();
    let mut archive = ArchiveConfig::new(dir.path(), Format::Teeway);
    archive.compress = Compression::Zstd;
    config.archive = Some(archive);
    let gateway = RunningGateway::start(config).await.expect("gateway");
    let count = 100_000;
    let t = uplink_run(pki, gateway.addr, 1024, count).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let (written, dropped) = loop {
        let m = gateway.gateway.metrics();
        let written = m.sum(teeway_archive::write::RECORDS_TOTAL);
        let dropped = m.sum(teeway_archive::write::DROPPED_TOTAL);
        if (written + dropped) as usize >= count || Instant::now() > deadline {
            break (written, dropped);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!(
        "gateway capture-only (.twa.zst), 1 KiB: {:>8.0} records/s delivered; {written} archived, {dropped} dropped",
        count as f64 / t.as_secs_f64()
    );
    gateway.stop().await.expect("stop");
}

/// `teeway replay --max-rate` of an archive of 1 KiB requests against a fast local target.
async fn offline_replay() {
    let dir = tempfile::tempdir().expect("tempdir");
    let count = 100_000;
    let registry = Registry::new();
    let (archive, task) =
        Archive::start(&ArchiveConfig::new(dir.path(), Format::Teeway), &registry)
            .expect("archive");
    let in_flight = Arc::new(tokio::sync::Semaphore::new(4096));
    for n in 0..count {
        let permit = in_flight
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore open");
        archive.try_submit(
            Envelope::HttpRequest(archived_request(n)),
            Some(Box::new(move |_| drop(permit))),
        );
    }
    task.close().await;
    let target = fast_target().await;
    for (protocol, concurrency) in [(UpstreamProtocol::Http1, 64), (UpstreamProtocol::Http2, 64)] {
        let report = teeway::replay::run(ReplayOptions {
            archives: vec![dir.path().to_path_buf()],
            target: format!("http://{target}"),
            ca: None,
            pace: Pace::Max,
            max_wait: Duration::from_secs(1),
            loops: 1,
            concurrency,
            filter_path: None,
            filter_method: None,
            host_header: HostPolicy::Target,
            protocol,
            timeout: Duration::from_secs(10),
            progress: false,
            dry_run: false,
            replay_truncated: false,
        })
        .await
        .expect("replay");
        assert_eq!(report.sent, count, "every archived request sent");
        println!(
            "replay --max-rate {:?} c={concurrency}, 1 KiB: {:>8.0} requests/s  p50 {} us  p99 {} us  ({} failed)",
            protocol,
            report.sent as f64 / report.elapsed.as_secs_f64(),
            report.latency.value_at_quantile(0.5),
            report.latency.value_at_quantile(0.99),
            report.failed.values().sum::<u64>()
        );
    }
}

fn wire() {
    let frame = Frame::Request(record(1024));
    let n = 200_000;
    let mut buf = BytesMut::with_capacity(frame.encoded_len() * 1024);
    let started = Instant::now();
    let mut bytes = 0usize;
    for _ in 0..n {
        buf.clear();
        frame.encode(&mut buf);
        bytes += buf.len();
    }
    let enc = started.elapsed();
    let mut stream = BytesMut::new();
    for _ in 0..n {
        frame.encode(&mut stream);
    }
    let started = Instant::now();
    let mut decoded = 0;
    while let Ok(Some(_)) = Frame::decode(&mut stream) {
        decoded += 1;
    }
    let dec = started.elapsed();
    assert_eq!(decoded, n);
    println!(
        "wire encode  1 KiB records: {:>10.0} records/s  {:>6.2} GB/s",
        n as f64 / enc.as_secs_f64(),
        bytes as f64 / enc.as_secs_f64() / 1e9
    );
    println!(
        "wire decode  1 KiB records: {:>10.0} records/s  {:>6.2} GB/s",
        n as f64 / dec.as_secs_f64(),
        bytes as f64 / dec.as_secs_f64() / 1e9
    );
}

/// Pushes `count` copies with `body_len` bodies through a real uplink to `gateway`; returns the
/// time until every one was acknowledged.
async fn uplink_run(
    pki: &Pki,
    gateway: std::net::SocketAddr,
    body_len: usize,
    count: usize,
) -> Duration {
    let config = stack::agent_config(pki.agent_material(), gateway, gateway, 100.0);
    let accounting = Arc::new(Accounting::new(256 << 20));
    let state = Arc::new(UplinkState::default());
    let uplink = Uplink::new(
        config
            .gateway
            .clone()
            .expect("the stack config has a gateway"),
        "bench",
        Resolver::from_system().expect("resolver"),
        accounting.clone(),
        state.clone(),
    )
    .expect("uplink");
    let (tx, rx) = mpsc::channel(4096);
    let drain = CancellationToken::new();
    let task = tokio::spawn(uplink.run(rx, drain.clone(), Duration::from_secs(30)));
    state.wait_for(true).await;
    // The tee encodes each copy once, at admission; the uplink is measured from there on.
    let mut template = bytes::BytesMut::new();
    teeway_wire::Frame::Envelope(Envelope::HttpRequest(record(body_len))).encode(&mut template);
    let template = template.freeze();
    let started = Instant::now();
    for _ in 0..count {
        let mut ticket = accounting.ticket();
        let r = template.clone();
        while ticket.hold(r.len() as u64).is_err() {
            tokio::task::yield_now().await;
        }
        tx.send(Queued::new(r, ticket))
            .await
            .expect("uplink running");
    }
    drain.cancel();
    task.await.expect("uplink task");
    let elapsed = started.elapsed();
    let mirrored = teeway_runtime::metrics::Snapshot::parse(&accounting.registry().render())
        .get(teeway_agent::metrics::MIRRORED_TOTAL);
    assert_eq!(mirrored as usize, count, "every copy acknowledged");
    elapsed
}

async fn fast_target() -> std::net::SocketAddr {
    let (shadow, _recording) = teeway::sample::start_shadow(Duration::ZERO)
        .await
        .expect("target");
    let addr = shadow.addr;
    std::mem::forget(shadow); // lives for the whole benchmark process
    addr
}

fn main() {
    teeway_wire::tls::install_default_provider();
    wire();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let pki = Pki::generate("bench-agent").expect("pki");
        // A gateway whose only route matches nothing: the uplink is measured, not the replay.
        let mut config = stack::gateway_config(pki.gateway_material(), &[fast_target().await]);
        config.routes[0].matcher = Some(RouteMatch {
            source_clusters: vec!["never-an-agent".into()],
            ..RouteMatch::default()
        });
        let gateway = RunningGateway::start(config).await.expect("gateway");
        for (body, count) in [(1024usize, 100_000usize), (64 * 1024, 10_000)] {
            let t = uplink_run(&pki, gateway.addr, body, count).await;
            let bytes = (record(body).frame_len() * count) as f64;
            println!(
                "uplink {:>2} KiB bodies over QUIC: {:>8.0} records/s  {:>7.1} MB/s",
                body / 1024,
                count as f64 / t.as_secs_f64(),
                bytes / t.as_secs_f64() / 1e6
            );
        }
        gateway.stop().await.expect("stop");

        let target = fast_target().await;
        let gateway = RunningGateway::start(stack::gateway_config(pki.gateway_material(), &[target]))
            .await
            .expect("gateway");
        let count = 50_000;
        let started = Instant::now();
        uplink_run(&pki, gateway.addr, 1024, count).await;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let m = gateway.gateway.metrics();
            let done = m.sum(teeway_gateway::metrics::REPLAYED_TOTAL) + m.sum(teeway_gateway::metrics::REPLAY_FAILED_TOTAL);
            if done as usize >= count || Instant::now() > deadline {
                let failed = m.sum(teeway_gateway::metrics::REPLAY_FAILED_TOTAL);
                let replayed = m.sum(teeway_gateway::metrics::REPLAYED_TOTAL);
                println!(
                    "gateway replay, 1 KiB bodies:  {:>8.0} replays/s completed; {} of {count} shed as overloaded or failed (copies arrive faster than one target takes them)",
                    replayed / started.elapsed().as_secs_f64(),
                    failed
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        gateway.stop().await.expect("stop");

        archive_benches(&pki).await;
        offline_replay().await;
    });
}
