//! A gateway process against an agent that holds a valid certificate and misbehaves: it opens
//! every connection its identity may, on each many streams that announce 16 MiB frames and stall
//! part way (the streams the budget admits then reach the stream timeout). The gateway's memory
//! stays within its
//! configured budget (measured as the process's resident memory), the over-budget streams, the
//! slow one and the connection over the limit are refused and counted by reason, and a
//! well-behaved agent with another certificate keeps mirroring with exact accounting meanwhile.

mod support;

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicClientConfig;
use quinn::{Connection, Endpoint};

use teeway::sample;
use teeway::stack::{self, Pki, RunningAgent};
use teeway_runtime::metrics::Snapshot;
use teeway_wire::tls::TlsMaterial;

use support::{admin_get, get, settle_async, GatewayProcess, KeepAlive, LIMIT};

const MIB: u64 = 1024 * 1024;
/// The gateway's budget in this test: the whole, one identity's, one connection's.
const BUFFER: u64 = 64 * MIB;
const PER_IDENTITY: u64 = 32 * MIB;
const PER_CONNECTION: u64 = 20 * MIB;
const CONNECTIONS_PER_IDENTITY: usize = 4;
/// What the gateway's QUIC flow control lets one connection send before it is read.
const QUIC_CONNECTION_WINDOW: u64 = 4 * MIB;

/// Resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

async fn quic_connect(
    material: &TlsMaterial,
    gateway: std::net::SocketAddr,
) -> Option<(Endpoint, Connection)> {
    let tls = teeway_wire::tls::client_config(material).expect("tls");
    let quic = QuicClientConfig::try_from(tls).expect("quic tls");
    let mut endpoint = Endpoint::client(([127, 0, 0, 1], 0).into()).expect("endpoint");
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    let conn = endpoint.connect(gateway, "localhost").ok()?.await.ok()?;
    Some((endpoint, conn))
}

/// Opens `streams` streams on `conn`, each announcing a 16 MiB REQUEST frame and sending
/// `each` bytes of it, then nothing more. Returns how many streams the gateway still kept open
/// after every one was written or refused (it must reset each: over budget, or at the stream
/// timeout).
async fn stall_streams(conn: &Connection, streams: usize, each: usize) -> usize {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..streams {
        let conn = conn.clone();
        tasks.spawn(async move {
            let Ok((mut send, mut recv)) = conn.open_bi().await else {
                return false;
            };
            let mut head = (16 * MIB as u32).to_be_bytes().to_vec();
            head.push(0x03); // REQUEST
            let body = vec![0x5a; each];
            let written = async {
                send.write_all(&head).await?;
                send.write_all(&body).await
            };
            // A write the gateway's flow control holds back is as good as stalled.
            if let Ok(Err(_)) = tokio::time::timeout(Duration::from_secs(5), written).await {
                return false;
            }
            // Kept: the stream is neither reset nor answered within the test's limit.
            tokio::time::timeout(LIMIT, recv.read_to_end(1024))
                .await
                .is_err()
        });
    }
    let mut kept = 0;
    while let Some(r) = tasks.join_next().await {
        kept += usize::from(r.expect("task"));
    }
    kept
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certified_agent_cannot_take_the_gateways_memory_nor_starve_another() {
    teeway_wire::tls::install_default_provider();
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let pki = Pki::generate("prod-eu-1").expect("pki");
    let (shadow, recording) = sample::start_shadow(Duration::ZERO).await.expect("shadow");
    let gateway = GatewayProcess::spawn(dir, &pki, &shadow.url(), &format!("limits:\n  buffer_bytes: {BUFFER}\n  identity_buffer_bytes: {PER_IDENTITY}\n  connection_buffer_bytes: {PER_CONNECTION}\n  connections_per_identity: {CONNECTIONS_PER_IDENTITY}\n  stream_timeout: 3s\n"));
    let (addr, admin, pid) = (gateway.addr, gateway.admin, gateway.pid());

    // The well-behaved agent, in this process.
    let primary = sample::start_primary().await.expect("primary");
    let agent = RunningAgent::start(stack::agent_config(
        pki.agent_material(),
        primary.addr,
        addr,
        100.0,
    ))
    .await
    .expect("agent");
    assert!(agent.wait_connected(LIMIT).await);
    let baseline = rss(pid);

    // The hostile agent: a certificate from the same CA, another identity.
    let hostile = pki.ca.agent("hostile").expect("cert");
    let material = TlsMaterial {
        ca: vec![pki.ca.certified.cert_der()],
        chain: vec![hostile.cert_der()],
        key: hostile.key_der(),
    };
    let mut connections = Vec::new();
    for _ in 0..CONNECTIONS_PER_IDENTITY {
        connections.push(
            quic_connect(&material, addr)
                .await
                .expect("hostile connects"),
        );
    }
    // 4 connections x 48 streams x 2 MiB: 384 MiB offered, all of it stalled.
    let attack: Vec<_> = connections
        .iter()
        .map(|(_, conn)| {
            let conn = conn.clone();
            tokio::spawn(async move { stall_streams(&conn, 48, 2 * MIB as usize).await })
        })
        .collect();
    // And one over the connection limit.
    let extra = quic_connect(&material, addr).await;
    let refused_extra = match &extra {
        None => true,
        Some((_, conn)) => stall_streams(conn, 1, 16).await == 0 && conn.close_reason().is_some(),
    };
    assert!(
        refused_extra,
        "a fifth connection of the identity is refused"
    );

    // Meanwhile the real agent mirrors.
    let n = 200;
    let mut client = KeepAlive::open(agent.addr).await;
    let mut peak = 0;
    for i in 0..n {
        assert_eq!(
            client.send(get(&format!("/ok/{i}"))).await,
            Ok(http::StatusCode::OK)
        );
        if i % 20 == 0 {
            peak = peak.max(rss(pid));
        }
    }
    assert_eq!(recording.wait_for(n, LIMIT).await, n, "every copy replayed");
    let mut kept = 0;
    for task in attack {
        kept += task.await.expect("attack");
        peak = peak.max(rss(pid));
    }
    let g = settle_async(
        || async { Snapshot::parse(&admin_get(admin, "/metrics").await.1) },
        |m: &Snapshot| m.get("teeway_gateway_streams_rejected_total{reason=\"timeout\"}") >= 1.0,
    )
    .await;
    let a = agent.agent.metrics();

    // Memory: what the budget allows, and not what was offered: the identity's budget, plus
    // what QUIC flow control lets each connection have in flight before the gateway reads it
    // (4 MiB a connection), plus allocator slack.
    let grown = peak.saturating_sub(baseline);
    let allowed =
        PER_IDENTITY + CONNECTIONS_PER_IDENTITY as u64 * QUIC_CONNECTION_WINDOW + 40 * MIB;
    assert!(
        grown < allowed,
        "RSS grew by {} MiB (budget for the identity {} MiB, allowed {} MiB); baseline {} MiB",
        grown / MIB,
        PER_IDENTITY / MIB,
        allowed / MIB,
        baseline / MIB
    );
    assert!(g.get("teeway_gateway_buffered_bytes") <= PER_IDENTITY as f64);
    // Refusals, each with its reason.
    let rejected = |reason: &str| {
        g.get(&format!(
            "teeway_gateway_streams_rejected_total{{reason=\"{reason}\"}}"
        ))
    };
    assert!(rejected("over_budget") >= 1.0, "{g:?}");
    assert!(
        rejected("timeout") >= 1.0,
        "the stalled streams end at the stream timeout"
    );
    assert_eq!(rejected("protocol"), 0.0);
    assert!(
        g.get("teeway_gateway_handshakes_total{result=\"connection_limit\"}") >= 1.0,
        "{g:?}"
    );
    assert_eq!(kept, 0, "every stalled stream was reset, none kept");
    assert_eq!(
        rejected("over_budget") + rejected("timeout"),
        (4 * 48) as f64,
        "each stalled stream refused once, with its reason"
    );
    // The real agent's books and the gateway's agree, exactly.
    assert_eq!(a.get(teeway_agent::metrics::REQUESTS_TOTAL), n as f64);
    assert_eq!(
        a.get(teeway_agent::metrics::MIRRORED_TOTAL),
        n as f64,
        "{a:?}"
    );
    assert_eq!(g.get("teeway_gateway_received_total"), n as f64);

    drop(connections);
    drop(extra);
    agent.stop().await.expect("agent stops");
    assert!(gateway.proc.terminate_and_wait().success());
}
