//! The teeway gateway: runs in the test cluster, accepts agents by client certificate over QUIC,
//! routes each mirrored request to shadow services, replays it, and drops the response.
//!
//! # Layout
//!
//! - [`config`]: `gateway.yaml`, validated in full before anything binds.
//! - [`listener`]: the QUIC listener, agent identities, stream decoding and dispatch.
//! - [`router`]: first-match routing on host and path.
//! - [`replay`]: per-target pooled clients, concurrency limits, the replay itself.
//! - [`metrics`]: metric names and the accounting of every record.
//! - [`error`]: the gateway's errors.
//!
//! # Shutdown
//!
//! When the `shutdown` token passed to [`Gateway::run`] is cancelled, the gateway stops accepting
//! agents and streams, lets replays under way finish (up to `shutdown_grace`), then closes every
//! connection with [`teeway_wire::codes::SHUTDOWN`] and waits for the close to be delivered.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicServerConfig;
use quinn::{Endpoint, EndpointConfig, TokioRuntime, VarInt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use teeway_archive::Archive;
use teeway_runtime::admin::{self, AdminState};
use teeway_runtime::dns::Resolver;
use teeway_runtime::metrics::{Registry, Snapshot};
use teeway_wire::codes;

pub mod config;
pub mod error;
pub mod listener;
pub mod metrics;
pub mod replay;
pub mod router;

pub use config::GatewayConfig;
pub use error::GatewayError;

use crate::listener::Dispatcher;
use crate::metrics::GatewayMetrics;
use crate::replay::Target;
use crate::router::{Route, Router};

/// Concurrent streams one agent may open: its batches in flight plus the greeting, with room.
const MAX_STREAMS_PER_AGENT: u32 = 64;
/// A connection silent for this long is closed (agents send keep-alives well within it).
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Time allowed at exit for connection closes to reach the agents.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// The gateway's sockets, bound before [`Gateway::run`] so callers can use port 0.
#[derive(Debug)]
pub struct GatewayListeners {
    /// QUIC (UDP).
    pub quic: std::net::UdpSocket,
    /// `/metrics`, `/healthz`, `/readyz`.
    pub admin: Option<TcpListener>,
}

impl GatewayListeners {
    /// Binds the addresses named in `config`.
    pub async fn bind(config: &GatewayConfig) -> io::Result<Self> {
        let quic = std::net::UdpSocket::bind(config.listen).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot listen on udp {} (listen): {e}", config.listen),
            )
        })?;
        let admin = match config.admin {
            Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot listen on {addr} (admin.listen): {e}"),
                )
            })?),
            None => None,
        };
        Ok(Self { quic, admin })
    }
}

/// One gateway instance.
#[derive(Debug)]
pub struct Gateway {
    config: GatewayConfig,
    metrics: Arc<GatewayMetrics>,
}

impl Gateway {
    /// A gateway for `config`; nothing runs until [`Gateway::run`].
    pub fn new(config: GatewayConfig) -> Self {
        Self {
            config,
            metrics: Arc::new(GatewayMetrics::new()),
        }
    }

    /// The gateway's metrics as a scraper would read them.
    pub fn metrics(&self) -> Snapshot {
        Snapshot::parse(&self.metrics.registry().render())
    }

    /// Serves until `shutdown` is cancelled and the drain is over.
    pub async fn run(
        &self,
        listeners: GatewayListeners,
        shutdown: CancellationToken,
    ) -> Result<(), GatewayError> {
        let config = &self.config;
        let resolver = Resolver::from_system()?;
        let mut routes = Vec::with_capacity(config.routes.len());
        for route in &config.routes {
            let mut targets = Vec::with_capacity(route.targets.len());
            for t in &route.targets {
                let target = Target::new(
                    t,
                    resolver.clone(),
                    route.host_header,
                    route.protocol,
                    route.timeout,
                    route.max_concurrency,
                )
                .map_err(|e| GatewayError::Target {
                    url: t.url.clone(),
                    reason: e.to_string(),
                })?;
                targets.push(Arc::new(target));
            }
            routes.push(Route {
                matcher: route.matcher.clone(),
                targets,
            });
        }
        let (archive, archive_task) = match &config.archive {
            Some(a) => {
                let (archive, task) =
                    Archive::start(a, self.metrics.registry()).map_err(GatewayError::Archive)?;
                (Some(archive), Some(task))
            }
            None => (None, None),
        };
        let dispatcher = Arc::new(Dispatcher {
            router: Router::new(routes),
            metrics: self.metrics.clone(),
            replays: TaskTracker::new(),
            archive,
        });

        let admin_addr = admin::listen_addr(listeners.admin.as_ref());
        let endpoint = self.endpoint(listeners.quic)?;
        let admin_stop = CancellationToken::new();
        let admin_task = listeners.admin.map(|listener| {
            let state: Arc<dyn AdminState> = Arc::new(AdminView {
                metrics: self.metrics.clone(),
            });
            tokio::spawn(admin::serve(listener, state, admin_stop.clone()))
        });
        tracing::info!(
            listen = %endpoint.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            admin = %admin_addr,
            routes = config.routes.len(),
            archive = %config.archive.as_ref().map_or("off".into(), |a| a.dir.display().to_string()),
            "gateway serving"
        );

        listener::serve(endpoint.clone(), dispatcher.clone(), shutdown).await;
        dispatcher.replays.close();
        if tokio::time::timeout(config.shutdown_grace, dispatcher.replays.wait())
            .await
            .is_err()
        {
            tracing::warn!(grace = ?config.shutdown_grace, "replays still under way after the grace period; abandoning them");
        }
        if let Some(task) = archive_task {
            task.close().await;
        }
        endpoint.close(VarInt::from_u32(codes::SHUTDOWN), b"gateway shutting down");
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, endpoint.wait_idle()).await;
        admin_stop.cancel();
        if let Some(task) = admin_task {
            let _ = task.await;
        }
        tracing::info!("gateway stopped");
        Ok(())
    }

    fn endpoint(&self, socket: std::net::UdpSocket) -> Result<Endpoint, GatewayError> {
        let tls = teeway_wire::tls::server_config(&self.config.tls)
            .map_err(|e| GatewayError::Tls(e.to_string()))?;
        let quic = QuicServerConfig::try_from(tls).map_err(|e| GatewayError::Tls(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
        let mut transport = quinn::TransportConfig::default();
        transport.max_concurrent_bidi_streams(VarInt::from_u32(MAX_STREAMS_PER_AGENT));
        transport.max_concurrent_uni_streams(VarInt::from_u32(0));
        transport.max_idle_timeout(Some(
            IDLE_TIMEOUT
                .try_into()
                .map_err(|_| GatewayError::Tls("idle timeout out of range".into()))?,
        ));
        server.transport_config(Arc::new(transport));
        Endpoint::new(
            EndpointConfig::default(),
            Some(server),
            socket,
            Arc::new(TokioRuntime),
        )
        .map_err(GatewayError::Endpoint)
    }
}

/// Runs a gateway for `config` on `listeners` until `shutdown`; see [`Gateway::run`].
pub async fn run(
    config: GatewayConfig,
    listeners: GatewayListeners,
    shutdown: CancellationToken,
) -> Result<(), GatewayError> {
    Gateway::new(config).run(listeners, shutdown).await
}

struct AdminView {
    metrics: Arc<GatewayMetrics>,
}

impl AdminState for AdminView {
    fn registry(&self) -> &Registry {
        self.metrics.registry()
    }

    fn ready(&self) -> bool {
        true
    }
}
