//! Component benchmarks: `cargo bench --bench components` prints numbers, asserts nothing.
//!
//! - wire: encoding and decoding `REQUEST` frames with 1 KiB bodies (records/s, GB/s);
//! - uplink: copies pushed straight into the agent's uplink and acknowledged by a gateway over
//!   loopback QUIC with mTLS, for 1 KiB and 64 KiB bodies (records/s, MB/s);
//! - replay: the same path with the gateway replaying every copy to a fast local HTTP server
//!   (replays/s).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, Uri, Version};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use teeway::stack::{self, Pki, RunningGateway};
use teeway_agent::metrics::Accounting;
use teeway_agent::tee::Queued;
use teeway_agent::uplink::{Uplink, UplinkState};
use teeway_gateway::config::RouteMatch;
use teeway_runtime::dns::Resolver;
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
        id: 1,
        received_at: SystemTime::now(),
        source_cluster: "bench".into(),
        method: Method::POST,
        uri: Uri::from_static("/v1/orders?customer=42"),
        version: Version::HTTP_11,
        headers,
        body: Bytes::from(vec![0x5a; body_len]),
        trailers: None,
        body_truncated: false,
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
    let template = record(body_len);
    let started = Instant::now();
    for _ in 0..count {
        let mut ticket = accounting.ticket();
        let r = template.clone();
        while ticket.hold(r.frame_len() as u64).is_err() {
            tokio::task::yield_now().await;
        }
        tx.send(Queued { record: r, ticket })
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
        config.routes[0].matcher = Some(RouteMatch { host: Some("never.invalid".into()), path_prefix: None });
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
    });
}
