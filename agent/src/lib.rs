//! The teeway agent: sits at the production ingress, proxies every request to the primary, and
//! tees a sampled copy to a remote gateway over mTLS QUIC without ever making production wait.
//!
//! # Layout
//!
//! - [`config`]: `agent.yaml`, validated in full before anything binds.
//! - [`proxy`]: the inline reverse proxy (HTTP/1.1 and HTTP/2) in front of the primary.
//! - [`tee`]: sampling, copying bodies as they stream, the bounded queue.
//! - [`uplink`]: the QUIC connection to the gateway, batches and acknowledgements.
//! - [`metrics`]: metric names and the accounting that makes every request add up.
//! - [`error`]: the agent's errors.
//!
//! # Shutdown
//!
//! When the `shutdown` token passed to [`Agent::run`] is cancelled, the agent stops accepting
//! clients and lets open requests finish (up to `shutdown_grace`); then it closes the queue,
//! sends what it holds (up to `shutdown_grace` again) and counts the rest as `shutdown` drops.

use std::io;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use http::uri::Authority;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use teeway_runtime::admin::{self, AdminState};
use teeway_runtime::connect::UpstreamConnector;
use teeway_runtime::dns::Resolver;
use teeway_runtime::metrics::{Registry, Snapshot};

pub mod config;
pub mod error;
pub mod metrics;
pub mod proxy;
pub mod tee;
pub mod uplink;

pub use config::AgentConfig;
pub use error::{AgentError, UplinkError};

use crate::metrics::Accounting;
use crate::proxy::Proxy;
use crate::tee::{Sampler, Tee};
use crate::uplink::{Uplink, UplinkState};

/// How long one connection attempt to the primary may take.
const PRIMARY_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The agent's sockets, bound before [`Agent::run`] so callers (tests, the demo) can use port 0
/// and read the real address back.
#[derive(Debug)]
pub struct AgentListeners {
    /// Production traffic.
    pub proxy: TcpListener,
    /// `/metrics`, `/healthz`, `/readyz`.
    pub admin: Option<TcpListener>,
}

impl AgentListeners {
    /// Binds the addresses named in `config`.
    pub async fn bind(config: &AgentConfig) -> io::Result<Self> {
        let proxy = TcpListener::bind(config.listen).await.map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot listen on {} (listen): {e}", config.listen),
            )
        })?;
        let admin = match &config.admin {
            Some(a) => Some(TcpListener::bind(a.listen).await.map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot listen on {} (admin.listen): {e}", a.listen),
                )
            })?),
            None => None,
        };
        Ok(Self { proxy, admin })
    }
}

/// One agent instance.
#[derive(Debug)]
pub struct Agent {
    config: AgentConfig,
    accounting: Arc<Accounting>,
    uplink_state: Arc<UplinkState>,
}

impl Agent {
    /// An agent for `config`; nothing runs until [`Agent::run`].
    pub fn new(config: AgentConfig) -> Self {
        let accounting = Arc::new(Accounting::new(config.mirror.queue_bytes));
        Self {
            config,
            accounting,
            uplink_state: Arc::new(UplinkState::default()),
        }
    }

    /// The agent's metrics as a scraper would read them.
    pub fn metrics(&self) -> Snapshot {
        Snapshot::parse(&self.accounting.registry().render())
    }

    /// Whether the uplink is connected and welcomed by a gateway.
    pub fn is_connected(&self) -> bool {
        self.uplink_state.is_connected()
    }

    /// Resolves when the uplink's connected state equals `up` (for the demo and tests; operators
    /// use `/readyz`).
    pub async fn wait_connected(&self, up: bool) {
        self.uplink_state.wait_for(up).await;
    }

    /// Serves until `shutdown` is cancelled and the drain is over.
    pub async fn run(
        &self,
        listeners: AgentListeners,
        shutdown: CancellationToken,
    ) -> Result<(), AgentError> {
        let config = &self.config;
        let resolver = Resolver::from_system()?;
        // Copies from the tee (request path) to the uplink task.
        let (queue_tx, queue_rx) = mpsc::channel(config.mirror.queue);
        let uplink = Uplink::new(
            config.gateway.clone(),
            &config.cluster,
            resolver.clone(),
            self.accounting.clone(),
            self.uplink_state.clone(),
        )?;
        let tee = Arc::new(Tee::new(
            queue_tx,
            self.accounting.clone(),
            Sampler::new(config.mirror.percentage),
            config.mirror.max_body_bytes,
            &config.cluster,
            self.uplink_state.clone(),
        ));
        let authority = authority(&config.primary.host, config.primary.port)?;
        let connector = UpstreamConnector::new(
            &config.primary.host,
            config.primary.port,
            resolver,
            PRIMARY_CONNECT_TIMEOUT,
        );
        let proxy = Arc::new(Proxy::new(
            tee,
            connector,
            authority,
            config.primary_protocol,
            self.accounting.clone(),
        ));

        let admin_addr = admin::listen_addr(listeners.admin.as_ref());
        let drain = CancellationToken::new();
        let uplink_task = tokio::spawn(uplink.run(queue_rx, drain.clone(), config.shutdown_grace));
        let admin_stop = CancellationToken::new();
        let admin_task = listeners.admin.map(|listener| {
            let state: Arc<dyn AdminState> = Arc::new(AdminView {
                accounting: self.accounting.clone(),
                uplink: self.uplink_state.clone(),
            });
            tokio::spawn(admin::serve(listener, state, admin_stop.clone()))
        });
        tracing::info!(
            listen = %listeners.proxy.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            admin = %admin_addr,
            primary = %config.primary.url,
            gateway = %format_args!("{}:{}", config.gateway.host, config.gateway.port),
            percentage = config.mirror.percentage,
            "agent serving"
        );

        proxy::serve(listeners.proxy, proxy, shutdown, config.shutdown_grace).await;
        drain.cancel();
        if let Err(e) = uplink_task.await {
            tracing::error!(error = %e, "uplink task failed");
        }
        admin_stop.cancel();
        if let Some(task) = admin_task {
            let _ = task.await;
        }
        tracing::info!("agent stopped");
        Ok(())
    }
}

/// Runs an agent for `config` on `listeners` until `shutdown`; see [`Agent::run`].
pub async fn run(
    config: AgentConfig,
    listeners: AgentListeners,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    Agent::new(config).run(listeners, shutdown).await
}

fn authority(host: &str, port: u16) -> Result<Authority, AgentError> {
    let text = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    Authority::from_str(&text).map_err(|_| AgentError::PrimaryAuthority(text))
}

struct AdminView {
    accounting: Arc<Accounting>,
    uplink: Arc<UplinkState>,
}

impl AdminState for AdminView {
    fn registry(&self) -> &Registry {
        self.accounting.registry()
    }

    fn ready(&self) -> bool {
        self.uplink.is_connected()
    }

    fn readiness_detail(&self) -> String {
        if self.uplink.is_connected() {
            "(uplink connected)".into()
        } else {
            "(uplink to the gateway is down)".into()
        }
    }
}
