//! Exactly-once delivery of copies across the link (protocol 3): a gateway that stops
//! answering (a process frozen with SIGSTOP, as a long GC pause or a congested link looks to the
//! agent) makes the agent's acknowledgements late; the agent sends those batches again, the
//! gateway recognises them, and once it answers, the agent's books and the gateway's agree
//! exactly and the shadow got each request once.

mod support;

use std::time::Duration;

use teeway::sample;
use teeway::stack::{self, Pki, RunningAgent};
use teeway_runtime::metrics::Snapshot;

use support::{
    admin_get, agent_settled, distinct_paths, get, settle, settle_async, GatewayProcess, KeepAlive,
    LIMIT,
};

fn signal(pid: u32, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_acknowledgements_are_sent_again_and_delivered_once() {
    teeway_wire::tls::install_default_provider();
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let pki = Pki::generate("prod-eu-1").expect("pki");
    let (shadow, recording) = sample::start_shadow(Duration::ZERO).await.expect("shadow");
    let gateway = GatewayProcess::spawn(dir, &pki, &shadow.url(), "");
    let (addr, admin, pid) = (gateway.addr, gateway.admin, gateway.pid());

    let primary = sample::start_primary().await.expect("primary");
    let mut config = stack::agent_config(pki.agent_material(), primary.addr, addr, 100.0);
    if let Some(g) = config.gateway.as_mut() {
        // Short, so the test is: a batch is sent again after 2 s, for up to 8 s.
        g.ack_timeout = Duration::from_secs(2);
    }
    let agent = RunningAgent::start(config).await.expect("agent");
    assert!(agent.wait_connected(LIMIT).await);

    // The gateway freezes; production traffic goes on (it never waits for the mirror).
    signal(pid, "-STOP");
    let n = 30;
    let mut client = KeepAlive::open(agent.addr).await;
    for i in 0..n {
        assert_eq!(
            client.send(get(&format!("/late/{i}"))).await,
            Ok(http::StatusCode::OK)
        );
    }
    // The fault lasts long enough for every batch to time out and go out again (2 s), and
    // ends well within the agent's retry window (8 s). (A fault's length, not a wait for an
    // event: what follows waits on the books.)
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    signal(pid, "-CONT");

    let a = settle(|| agent.agent.metrics(), agent_settled).await;
    let g = settle_async(
        || async { Snapshot::parse(&admin_get(admin, "/metrics").await.1) },
        |m: &Snapshot| m.get("teeway_gateway_received_total") >= n as f64,
    )
    .await;
    assert_eq!(a.get(teeway_agent::metrics::REQUESTS_TOTAL), n as f64);
    assert_eq!(
        a.get(teeway_agent::metrics::MIRRORED_TOTAL),
        n as f64,
        "late ACKs are mirrored, not drops: {a:?}"
    );
    assert_eq!(a.sum(teeway_agent::metrics::MIRROR_DROPPED_TOTAL), 0.0);
    assert_eq!(
        g.get("teeway_gateway_received_total"),
        n as f64,
        "the two sides' books agree exactly: {g:?}"
    );
    assert!(
        g.get("teeway_gateway_duplicates_total") >= 1.0,
        "batches were sent again and recognised: {g:?}"
    );
    assert_eq!(recording.wait_for(n, LIMIT).await, n);
    assert_eq!(
        distinct_paths(&recording),
        n,
        "each request reached the shadow"
    );
    assert_eq!(recording.count(), n, "and only once");

    agent.stop().await.expect("agent stops");
    assert!(gateway.proc.terminate_and_wait().success());
}
