//! Interoperability with an independent QUIC stack: an agent written on aioquic (PyPI) from
//! `docs/protocol.md` alone (`tests/interop/aioquic_agent.py`), speaking version 3 (so this is also
//! the test that a gateway of version 4 keeps serving agents of version 3), talks to a gateway. It
//! is welcomed
//! under the identity in its certificate, its named batches are acknowledged and replayed, the
//! same batch sent again as a retry is acknowledged and not replayed twice, and a frame announced
//! over the limit is refused on its stream with `PROTOCOL_ERROR`.

mod support;

use std::process::Command;
use std::time::Duration;

use teeway::sample;
use teeway::stack::{self, RunningGateway};
use teeway_wire::tls::TlsMaterial;

use support::{certs_init, distinct_paths, settle, tool_missing, LIMIT};

const BATCHES: usize = 3;
const RECORDS: usize = 5;

fn aioquic_available() -> bool {
    Command::new("python3")
        .args(["-c", "import aioquic"])
        .status()
        .is_ok_and(|s| s.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aioquic_agent_written_from_the_spec_is_served_and_held_to_the_rules() {
    if !aioquic_available() {
        tool_missing(
            "python3 module aioquic",
            "an independent QUIC stack",
            "pip install aioquic",
        );
        return;
    }
    teeway_wire::tls::install_default_provider();
    let tmp = tempfile::tempdir().expect("tmp");
    certs_init(tmp.path());
    let certs = tmp.path().join("certs/dev");
    let material = TlsMaterial::from_files(
        &certs.join("ca.pem"),
        &certs.join("gateway.pem"),
        &certs.join("gateway.key"),
    )
    .expect("gateway material");
    let (shadow, recording) = sample::start_shadow(Duration::ZERO).await.expect("shadow");
    let gateway = RunningGateway::start(stack::gateway_config(material, &[shadow.addr]))
        .await
        .expect("gateway");

    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/interop/aioquic_agent.py"
    );
    let (batches, records) = (BATCHES.to_string(), RECORDS.to_string());
    let args = [
        script.to_owned(),
        gateway.addr.ip().to_string(),
        gateway.addr.port().to_string(),
        certs.join("ca.pem").display().to_string(),
        certs.join("agent.pem").display().to_string(),
        certs.join("agent.key").display().to_string(),
        batches,
        records,
    ];
    // Bounded by coreutils' timeout; run off the runtime, which serves the gateway meanwhile.
    let out = tokio::task::spawn_blocking(move || {
        Command::new("timeout")
            .arg("60")
            .arg("python3")
            .args(&args)
            .output()
    })
    .await
    .expect("join")
    .expect("python3 runs");
    assert!(
        out.status.success(),
        "aioquic agent failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("one JSON line from the aioquic agent");

    assert_eq!(report["welcome"]["version"], 3, "{report}");
    assert_eq!(
        report["welcome"]["extra_bytes"], 0,
        "a version 3 agent gets a version 3 WELCOME (no gateway instance): {report}"
    );
    assert_eq!(
        report["welcome"]["identity"], "prod-eu-1",
        "the identity read from the certificate: {report}"
    );
    assert_eq!(
        report["acks"],
        serde_json::json!(vec![RECORDS; BATCHES]),
        "each batch acknowledged in full: {report}"
    );
    assert_eq!(
        report["retry_ack"], RECORDS,
        "a retry of a batch already received is acknowledged in full: {report}"
    );
    assert_eq!(report["oversized"]["kind"], "reset", "{report}");
    assert_eq!(
        report["oversized"]["code"],
        teeway_wire::codes::PROTOCOL_ERROR,
        "a frame announced over 16 MiB is refused on its stream: {report}"
    );

    let n = BATCHES * RECORDS;
    let g = settle(
        || gateway.gateway.metrics(),
        |g| g.get("teeway_gateway_received_total") >= n as f64,
    )
    .await;
    assert_eq!(g.get("teeway_gateway_received_total"), n as f64, "{g:?}");
    assert_eq!(
        g.get("teeway_gateway_duplicates_total"),
        RECORDS as f64,
        "{g:?}"
    );
    assert_eq!(
        g.get("teeway_gateway_streams_rejected_total{reason=\"too_large\"}"),
        1.0,
        "{g:?}"
    );
    assert_eq!(recording.wait_for(n, LIMIT).await, n);
    assert_eq!(distinct_paths(&recording), n, "every record replayed");
    assert_eq!(recording.count(), n, "and the retried batch not again");
    let bodies: usize = recording.requests().iter().map(|r| r.body.len()).sum();
    assert_eq!(
        bodies,
        BATCHES * (0..RECORDS).map(|i| i * 100).sum::<usize>()
    );
    gateway.stop().await.expect("gateway stops");
}
