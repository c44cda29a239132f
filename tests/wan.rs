//! The uplink over a long-haul link that fails the way WANs fail: cut for seconds, or passing
//! TCP while dropping UDP. An agent and a gateway process talk through a user-space relay
//! (`support::wan`) that delays every packet and can cut the link or block UDP. In each test
//! production keeps being answered, the agent says when its uplink stops delivering (readiness
//! and `uplink_connected` follow acknowledged batches, not an open connection), copies flow again
//! once the link allows, and at the end the agent's and the gateway's books agree exactly and
//! the shadow got each copy once.
//!
//! How fast (copies/s under loss, seconds to recover) is measured by the benchmark's WAN
//! scenarios, not asserted here.

mod support;

use std::time::Duration;

use teeway::sample::{self, Recording, Service};
use teeway::stack::{self, Pki, RunningAgent};
use teeway_agent::metrics as am;
use teeway_agent::Transport;
use teeway_runtime::metrics::Snapshot;

use support::wan::Wan;
use support::{
    admin_get, agent_settled, distinct_paths, get, settle, settle_async, GatewayProcess, KeepAlive,
    LIMIT,
};

/// One-way delay of the test link: long enough that the link has packets in flight.
const ONE_WAY: Duration = Duration::from_millis(20);

struct WanStack {
    gateway: GatewayProcess,
    _dir: tempfile::TempDir,
    agent: RunningAgent,
    recording: Recording,
    wan: Wan,
    client: KeepAlive,
    /// Requests sent so far (each to its own path).
    sent: usize,
    _primary: Service,
    _shadow: Service,
}

impl WanStack {
    async fn start(transport: Transport) -> Self {
        // `RUST_LOG=info cargo test --test wan -- --nocapture` shows both sides' logs.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        teeway_wire::tls::install_default_provider();
        let pki = Pki::generate("prod-eu-1").expect("pki");
        let (shadow, recording) = sample::start_shadow(Duration::ZERO).await.expect("shadow");
        let dir = tempfile::tempdir().expect("tmp");
        let gateway =
            GatewayProcess::spawn_serving(dir.path(), &pki, &shadow.url(), "[quic, tls]", "");
        let wan = Wan::start(gateway.addr, ONE_WAY, 0.0).await.expect("relay");
        let primary = sample::start_primary().await.expect("primary");
        let mut config = stack::agent_config(pki.agent_material(), primary.addr, wan.addr, 100.0);
        if let Some(g) = config.gateway.as_mut() {
            g.transport = transport;
            g.quic_retry = Duration::from_secs(1);
        }
        let agent = RunningAgent::start(config).await.expect("agent");
        assert!(agent.wait_connected(LIMIT).await, "uplink did not connect");
        let client = KeepAlive::open(agent.addr).await;
        Self {
            gateway,
            _dir: dir,
            agent,
            recording,
            wan,
            client,
            sent: 0,
            _primary: primary,
            _shadow: shadow,
        }
    }

    fn agent_metrics(&self) -> Snapshot {
        self.agent.agent.metrics()
    }

    /// One request through the agent; production is answered whatever the link does.
    async fn request(&mut self) {
        let path = format!("/wan/{}", self.sent);
        self.sent += 1;
        assert_eq!(
            self.client.send(get(&path)).await,
            Ok(http::StatusCode::OK),
            "production is answered while the uplink is in trouble"
        );
    }

    /// Sends a request every 50 ms (copies are what make a link show whether it delivers)
    /// until the agent's metrics satisfy `done`, within [`LIMIT`]; whether they did.
    async fn traffic_until(&mut self, done: impl Fn(&Snapshot) -> bool) -> bool {
        let deadline = std::time::Instant::now() + LIMIT;
        while std::time::Instant::now() < deadline {
            if done(&self.agent_metrics()) {
                return true;
            }
            self.request().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    async fn readyz(&self) -> http::StatusCode {
        admin_get(self.agent.admin.expect("agent admin"), "/readyz")
            .await
            .0
    }

    /// The books once everything is resolved: the agent's identity holds, the gateway received
    /// exactly what the agent counts mirrored, and the shadow got each of those once.
    async fn assert_books_agree(self) {
        let a = settle(|| self.agent_metrics(), agent_settled).await;
        assert_eq!(a.get(am::REQUESTS_TOTAL), self.sent as f64);
        let mirrored = a.get(am::MIRRORED_TOTAL);
        assert!(mirrored > 0.0, "copies were delivered: {a:?}");
        let admin = self.gateway.admin;
        let g = settle_async(
            || async move { Snapshot::parse(&admin_get(admin, "/metrics").await.1) },
            |g: &Snapshot| g.get("teeway_gateway_received_total") >= mirrored,
        )
        .await;
        assert_eq!(
            g.get("teeway_gateway_received_total"),
            mirrored,
            "the gateway received exactly what the agent counts mirrored: agent {a:?} gateway {g:?}"
        );
        let n = mirrored as usize;
        assert_eq!(self.recording.wait_for(n, LIMIT).await, n);
        assert_eq!(
            distinct_paths(&self.recording),
            n,
            "each mirrored copy reached the shadow"
        );
        assert_eq!(self.recording.count(), n, "and only once");
        self.agent.stop().await.expect("agent stops");
        assert!(self.gateway.proc.terminate_and_wait().success());
        self.wan.stop();
    }
}

fn links(s: &Snapshot, transport: &str) -> f64 {
    s.get(&format!(
        "{}{{transport=\"{transport}\"}}",
        am::UPLINK_LINKS
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_link_is_reported_stalled_and_delivers_again_when_it_returns() {
    let mut s = WanStack::start(Transport::Quic).await;
    for _ in 0..10 {
        s.request().await;
    }
    assert!(
        s.traffic_until(|m| m.get(am::MIRRORED_TOTAL) >= 10.0).await,
        "copies flow before the cut"
    );

    s.wan.faults.cut(true);
    // Copies sent into the cut leave batches unanswered: the link is judged stalled, and the
    // uplink stops calling itself connected although the QUIC connection is still open.
    assert!(
        s.traffic_until(|m| m.get(am::UPLINK_CONNECTED) == 0.0)
            .await,
        "a link that delivers nothing is not 'connected': {:?}",
        s.agent_metrics()
    );
    let m = s.agent_metrics();
    assert!(m.get(am::UPLINK_STALLS_TOTAL) >= 1.0, "{m:?}");
    assert_eq!(s.readyz().await, http::StatusCode::SERVICE_UNAVAILABLE);

    s.wan.faults.cut(false);
    let delivered = s.agent_metrics().get(am::MIRRORED_TOTAL);
    assert!(
        s.traffic_until(
            |m| m.get(am::UPLINK_CONNECTED) == 1.0 && m.get(am::MIRRORED_TOTAL) > delivered
        )
        .await,
        "copies flow again once the link returns: {:?}",
        s.agent_metrics()
    );
    assert_eq!(s.readyz().await, http::StatusCode::OK);
    for _ in 0..10 {
        s.request().await;
    }
    s.assert_books_agree().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_udp_moves_copies_to_tls_and_quic_takes_them_back_when_it_passes_again() {
    let mut s = WanStack::start(Transport::Auto).await;
    assert!(
        s.traffic_until(|m| links(m, "quic") == 1.0 && m.get(am::MIRRORED_TOTAL) >= 5.0)
            .await,
        "QUIC carries copies first: {:?}",
        s.agent_metrics()
    );

    s.wan.faults.block_udp(true);
    assert!(
        s.traffic_until(|m| links(m, "tls") == 1.0).await,
        "with UDP blocked the link moves to TLS over TCP: {:?}",
        s.agent_metrics()
    );
    let on_tls = s.agent_metrics().get(am::MIRRORED_TOTAL);
    assert!(
        s.traffic_until(|m| m.get(am::MIRRORED_TOTAL) >= on_tls + 5.0)
            .await,
        "TLS carries copies: {:?}",
        s.agent_metrics()
    );
    assert_eq!(links(&s.agent_metrics(), "quic"), 0.0);

    s.wan.faults.block_udp(false);
    assert!(
        s.traffic_until(|m| links(m, "quic") == 1.0 && links(m, "tls") == 0.0)
            .await,
        "QUIC is tried again (gateway.quic_retry) and takes over once UDP passes: {:?}",
        s.agent_metrics()
    );
    let on_quic = s.agent_metrics().get(am::MIRRORED_TOTAL);
    assert!(
        s.traffic_until(|m| m.get(am::MIRRORED_TOTAL) >= on_quic + 5.0)
            .await,
        "QUIC carries copies again"
    );
    s.assert_books_agree().await;
}
