//! An agent and a gateway assembled in one process, on loopback ports picked by the OS, with
//! certificates made in memory: what `teeway demo` runs, and what the end-to-end tests drive.
//!
//! Everything here goes through the same library entry points (`Agent::run`, `Gateway::run`),
//! real sockets, real TLS and real QUIC as a deployment does; only the configuration is built in
//! code instead of read from YAML.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use teeway_agent::config::{AdminConfig, GatewayConfig as UplinkTarget, MirrorConfig};
use teeway_agent::{Agent, AgentConfig, AgentListeners};
use teeway_gateway::config::{HostPolicy, Rewrite, RouteConfig, TargetConfig};
use teeway_gateway::{Gateway, GatewayConfig, GatewayListeners};
use teeway_runtime::config::{HttpTarget, UpstreamProtocol};
use teeway_wire::pki::{CertificateAuthority, CertifiedKey};
use teeway_wire::tls::TlsMaterial;

/// A CA with one gateway and one agent certificate, all in memory.
pub struct Pki {
    /// The CA.
    pub ca: CertificateAuthority,
    /// The gateway's certificate (covers localhost, 127.0.0.1, ::1).
    pub gateway: CertifiedKey,
    /// The agent's certificate.
    pub agent: CertifiedKey,
}

impl Pki {
    /// Generates a CA, a gateway certificate and an agent certificate named `agent_identity`.
    pub fn generate(agent_identity: &str) -> Result<Self, teeway_wire::TlsError> {
        let ca = CertificateAuthority::generate("teeway in-memory CA")?;
        let gateway = ca.gateway(&[])?;
        let agent = ca.agent(agent_identity)?;
        Ok(Self { ca, gateway, agent })
    }

    /// What the gateway loads.
    pub fn gateway_material(&self) -> TlsMaterial {
        TlsMaterial::from_generated(&self.ca.certified, &self.gateway)
    }

    /// What the agent loads.
    pub fn agent_material(&self) -> TlsMaterial {
        TlsMaterial::from_generated(&self.ca.certified, &self.agent)
    }
}

/// An `http://127.0.0.1:port` target.
pub fn loopback_target(addr: SocketAddr) -> HttpTarget {
    HttpTarget {
        host: addr.ip().to_string(),
        port: addr.port(),
        tls: false,
        url: format!("http://{addr}"),
    }
}

/// A gateway configuration: QUIC on `127.0.0.1:0`, one catch-all route to `shadows`.
pub fn gateway_config(tls: TlsMaterial, shadows: &[SocketAddr]) -> GatewayConfig {
    GatewayConfig {
        listen: ([127, 0, 0, 1], 0).into(),
        transports: Default::default(),
        tls,
        // Built in memory: no files to watch.
        tls_files: Default::default(),
        agents_allow: None,
        routes: vec![RouteConfig {
            name: "routes[0]".into(),
            matcher: None,
            targets: shadows
                .iter()
                .copied()
                .map(|s| TargetConfig::new(loopback_target(s)))
                .collect(),
            // The sample services speak both versions: exercise HTTP/2 end to end.
            protocol: UpstreamProtocol::Auto,
            rewrite: Rewrite {
                marker: Some(http::HeaderName::from_static(
                    teeway_gateway::config::DEFAULT_MARKER_HEADER,
                )),
                keep_http10: false,
                ..Rewrite::host_only(HostPolicy::Keep)
            },
            replay_truncated: false,
            compare: None,
        }],
        tcp_routes: Vec::new(),
        rpc_routes: Vec::new(),
        archive: None,
        admin: Some(([127, 0, 0, 1], 0).into()),
        shutdown_grace: Duration::from_secs(5),
        limits: Default::default(),
    }
}

/// An agent configuration: listening on `127.0.0.1:0`, forwarding to `primary`, mirroring
/// `percentage` percent to the gateway at `gateway`.
pub fn agent_config(
    tls: TlsMaterial,
    primary: SocketAddr,
    gateway: SocketAddr,
    percentage: f64,
) -> AgentConfig {
    AgentConfig {
        cluster: "demo-prod".into(),
        listen: Some(([127, 0, 0, 1], 0).into()),
        listen_tls: None,
        primary: Some(loopback_target(primary)),
        primary_protocol: UpstreamProtocol::Auto,
        primary_tls: None,
        sink: None,
        mirror: MirrorConfig::simple(percentage),
        rpc: Vec::new(),
        gateway: Some(UplinkTarget {
            host: gateway.ip().to_string(),
            port: gateway.port(),
            server_name: "localhost".into(),
            transport: Default::default(),
            nameservers: Vec::new(),
            tls,
            tls_files: Default::default(),
            spool: None,
            ack_timeout: teeway_agent::config::DEFAULT_ACK_TIMEOUT,
            quic_retry: teeway_agent::config::DEFAULT_QUIC_RETRY,
        }),
        archive: None,
        tcp: Vec::new(),
        admin: Some(AdminConfig {
            listen: ([127, 0, 0, 1], 0).into(),
        }),
        shutdown_grace: Duration::from_secs(5),
        // Nothing routes to a loopback demo: stop accepting at once.
        drain_time: Duration::ZERO,
        limits: Default::default(),
    }
}

/// A gateway running in this process.
pub struct RunningGateway {
    /// The instance (for its metrics).
    pub gateway: Arc<Gateway>,
    /// Its QUIC (UDP) address.
    pub addr: SocketAddr,
    /// Its admin address.
    pub admin: Option<SocketAddr>,
    stop: CancellationToken,
    task: JoinHandle<Result<(), teeway_gateway::GatewayError>>,
}

impl RunningGateway {
    /// Binds and starts a gateway.
    pub async fn start(config: GatewayConfig) -> anyhow::Result<Self> {
        let listeners = GatewayListeners::bind(&config).await?;
        let addr = listeners.local_addr()?;
        let admin = listeners
            .admin
            .as_ref()
            .map(|l| l.local_addr())
            .transpose()?;
        let gateway = Arc::new(Gateway::new(config));
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let gateway = gateway.clone();
            let stop = stop.clone();
            async move { gateway.run(listeners, stop).await }
        });
        Ok(Self {
            gateway,
            addr,
            admin,
            stop,
            task,
        })
    }

    /// Shuts the gateway down gracefully and waits for it.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.task.await??;
        Ok(())
    }
}

/// An agent running in this process.
pub struct RunningAgent {
    /// The instance (for its metrics and uplink state).
    pub agent: Arc<Agent>,
    /// Where clients connect.
    pub addr: SocketAddr,
    /// Its admin address.
    pub admin: Option<SocketAddr>,
    stop: CancellationToken,
    task: JoinHandle<Result<(), teeway_agent::AgentError>>,
}

impl RunningAgent {
    /// Binds and starts an agent.
    pub async fn start(config: AgentConfig) -> anyhow::Result<Self> {
        let listeners = AgentListeners::bind(&config).await?;
        let addr = listeners
            .proxy
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("the agent has no HTTP listener"))?
            .local_addr()?;
        let admin = listeners
            .admin
            .as_ref()
            .map(|l| l.local_addr())
            .transpose()?;
        let agent = Arc::new(Agent::new(config));
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let agent = agent.clone();
            let stop = stop.clone();
            async move { agent.run(listeners, stop).await }
        });
        Ok(Self {
            agent,
            addr,
            admin,
            stop,
            task,
        })
    }

    /// Waits until the uplink is connected, at most `limit`; `false` if it did not connect.
    pub async fn wait_connected(&self, limit: Duration) -> bool {
        tokio::time::timeout(limit, self.agent.wait_connected(true))
            .await
            .is_ok()
    }

    /// Starts the graceful shutdown (as SIGTERM does) without waiting for it: the drain begins.
    pub fn begin_shutdown(&self) {
        self.stop.cancel();
    }

    /// Shuts the agent down gracefully (drain included) and waits for it.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.task.await??;
        Ok(())
    }
}
