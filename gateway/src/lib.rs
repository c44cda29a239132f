//! The teeway gateway: runs in the test cluster, accepts agents by client certificate over QUIC
//! (or TLS over TCP on the same port number), routes each mirrored request to shadow services, replays it, and drops the response.
//!
//! # Layout
//!
//! A copy's path, in the order it meets the code:
//!
//! - `listener`: the receivers. `listener::quic` (the default) and `listener::tls` (TLS over
//!   TCP, for agents whose network blocks UDP) accept agents by certificate, read batches, and
//!   answer them.
//! - `dispatch`: what both listeners hand batches to: the books, the memory budget (`budget`),
//!   exactly-once delivery (`dedupe`), the archive, and routing each record.
//! - `router`: first-match routing on source cluster, host, path, methods and headers.
//! - `observe`: observers, which see each copy once every target of its route has answered,
//!   failed or been skipped (one exchange, every outcome): the response archive now, comparing
//!   versions next.
//! - [`replay`]: the HTTP replayer: per-target pooled clients, concurrency limits, the replay
//!   itself (also used by `teeway replay`).
//! - `tee_stream`: TCP tee streams (`tcp_routes`), replayed on a fresh connection per target.
//! - [`config`]: `gateway.yaml`, validated in full before anything binds.
//! - [`metrics`]: metric names and the accounting of every record.
//! - [`error`]: the gateway's errors.
//!
//! Only what the binary and the tests use is public; the rest is the crate's own.
//!
//! # Reload
//!
//! [`Gateway::reload_yaml`] validates a whole new configuration, builds its routing table
//! (reusing every target whose settings did not change, with its pooled connections, slots and
//! tokens) and swaps it in one atomic store. Replays under way finish on the table they started
//! with; agent connections stay up, except those whose identity `agents.allow` no longer names,
//! which are closed at their next batch.
//!
//! # Shutdown
//!
//! When the `shutdown` token passed to [`Gateway::run`] is cancelled, the gateway stops accepting
//! agents and streams. A batch still arriving is reset (`OVERLOADED`: nothing of it was
//! dispatched, its agent sends it again); an answer already written gets a second to be
//! delivered; then each connection is closed with [`teeway_wire::codes::SHUTDOWN`]. Replays under
//! way finish (up to `shutdown_grace`), and the gateway waits (a second at most) for the closes
//! to be delivered.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use quinn::crypto::rustls::QuicServerConfig;
use quinn::{Endpoint, EndpointConfig, TokioRuntime, VarInt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use teeway_archive::Archive;
use teeway_runtime::admin::{self, AdminState};
use teeway_runtime::dns::Resolver;
use teeway_runtime::metrics::{Registry, Snapshot};
use teeway_runtime::reload::{ConfigState, ReloadResult};
use teeway_wire::codes;

mod budget;
pub mod compare;
pub mod config;
mod dedupe;
mod dispatch;
pub mod error;
mod listener;
pub mod metrics;
mod observe;
pub mod replay;
mod router;
pub mod rpc;
mod tee_stream;

pub use config::GatewayConfig;
pub use error::GatewayError;

use crate::config::Transports;
use crate::dispatch::Dispatcher;
use crate::metrics::GatewayMetrics;
use crate::replay::{Target, TargetSpec};
use crate::router::{Route, Router};

/// A connection silent for this long is closed (agents send keep-alives well within it).
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Time allowed at exit for connection closes to reach the agents.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// The gateway's sockets, bound before [`Gateway::run`] so callers can use port 0.
#[derive(Debug)]
pub struct GatewayListeners {
    /// QUIC (UDP), unless `transports` leaves it out.
    pub quic: Option<std::net::UdpSocket>,
    /// TLS over TCP, on the same port number, unless `transports` leaves it out.
    pub tcp: Option<std::net::TcpListener>,
    /// `/metrics`, `/healthz`, `/readyz`.
    pub admin: Option<TcpListener>,
}

/// Attempts at finding a port free for both UDP and TCP when `listen` asks for port 0.
const PORT_PAIR_ATTEMPTS: usize = 16;

impl GatewayListeners {
    /// Binds the addresses named in `config`. With both transports, the TCP port is the UDP
    /// port's number, so agents need one port; with port 0, a number free for both is found.
    pub async fn bind(config: &GatewayConfig) -> io::Result<Self> {
        let (quic, tcp) = bind_transport_pair(config.listen, config.transports)?;
        let admin = match config.admin {
            Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot listen on {addr} (admin.listen): {e}"),
                )
            })?),
            None => None,
        };
        Ok(Self { quic, tcp, admin })
    }

    /// The address agents connect to (the port both transports share).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match (&self.quic, &self.tcp) {
            (Some(udp), _) => udp.local_addr(),
            (None, Some(tcp)) => tcp.local_addr(),
            (None, None) => Err(io::Error::other("no transport is bound")),
        }
    }
}

/// The UDP receive buffer the gateway asks for. Agents send in bursts (a batch is many
/// datagrams at once, and a long-haul path delivers a window's worth together); with Linux's
/// default of 208 KiB a gateway busy for a moment dropped a third of the datagrams of an
/// agent sending 15 MB/s, and every drop is a retransmission and a congestion signal.
const UDP_RECEIVE_BUFFER: usize = 8 << 20;

/// Asks for [`UDP_RECEIVE_BUFFER`]; the kernel caps the request at `net.core.rmem_max`, which
/// is said once at startup when it is the smaller (raising it is the operator's call).
fn widen_receive_buffer(socket: &std::net::UdpSocket) {
    let socket = socket2::SockRef::from(socket);
    let _ = socket.set_recv_buffer_size(UDP_RECEIVE_BUFFER);
    // Linux reports twice what it grants (the doubling covers its bookkeeping).
    match socket.recv_buffer_size() {
        Ok(granted) if granted / 2 < UDP_RECEIVE_BUFFER => tracing::info!(
            granted_bytes = granted / 2,
            wanted_bytes = UDP_RECEIVE_BUFFER,
            "UDP receive buffer capped by the kernel; for agents sending tens of MB/s raise it with `sysctl -w net.core.rmem_max=8388608`"
        ),
        Ok(_) => {}
        Err(e) => tracing::debug!(error = %e, "cannot read the UDP receive buffer size"),
    }
}

type TransportSockets = (Option<std::net::UdpSocket>, Option<std::net::TcpListener>);

fn bind_transport_pair(listen: SocketAddr, transports: Transports) -> io::Result<TransportSockets> {
    let udp = |addr: SocketAddr| {
        let socket = std::net::UdpSocket::bind(addr).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot listen on udp {addr} (listen): {e}"),
            )
        })?;
        widen_receive_buffer(&socket);
        Ok::<_, io::Error>(socket)
    };
    let tcp = |addr: SocketAddr| {
        let listener = std::net::TcpListener::bind(addr).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot listen on tcp {addr} (listen): {e}"),
            )
        })?;
        listener.set_nonblocking(true)?;
        Ok::<_, io::Error>(listener)
    };
    match (transports.quic, transports.tls) {
        (true, false) => Ok((Some(udp(listen)?), None)),
        (false, true) => Ok((None, Some(tcp(listen)?))),
        _ => {
            let mut attempt = 0;
            loop {
                let quic = udp(listen)?;
                let port = quic.local_addr()?.port();
                match tcp(SocketAddr::new(listen.ip(), port)) {
                    Ok(tcp) => return Ok((Some(quic), Some(tcp))),
                    // Port 0 gave a UDP port whose TCP twin is taken: try another.
                    Err(e)
                        if listen.port() == 0
                            && e.kind() == io::ErrorKind::AddrInUse
                            && attempt < PORT_PAIR_ATTEMPTS =>
                    {
                        attempt += 1;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
    }
}

/// The parts of the configuration that a reload swaps: routes and the agents allowed.
#[derive(Debug, Default)]
pub struct Routing {
    /// The routing table.
    pub router: Router,
    /// Where TCP tee streams go.
    pub tcp: tee_stream::TcpRouter,
    /// Where RPC copies go.
    pub rpc: rpc::RpcRouter,
    /// `agents.allow`; `None` allows every agent the CA signed.
    pub allow: Option<Vec<String>>,
}

impl Routing {
    /// Builds the table of `config`, taking from `old` every target whose spec is unchanged.
    fn build(
        config: &GatewayConfig,
        resolver: &Resolver,
        old: Option<&Routing>,
        metrics: &Arc<GatewayMetrics>,
    ) -> Result<Self, GatewayError> {
        let mut reusable: Vec<Arc<Target>> = old
            .map(|o| o.router.targets().cloned().collect())
            .unwrap_or_default();
        let mut routes = Vec::with_capacity(config.routes.len());
        for route in &config.routes {
            let mut targets = Vec::with_capacity(route.targets.len());
            for t in &route.targets {
                let spec = TargetSpec {
                    target: t.clone(),
                    protocol: route.protocol,
                    rewrite: route.rewrite.clone(),
                };
                let target = match reusable.iter().position(|o| *o.spec() == spec) {
                    Some(i) => reusable.swap_remove(i),
                    None => Arc::new(Target::new(spec, resolver.clone()).map_err(|e| {
                        GatewayError::Target {
                            url: t.target.url.clone(),
                            reason: e.to_string(),
                        }
                    })?),
                };
                let handles = Arc::new(metrics.for_target(&route.name, &target.url));
                targets.push((target, handles));
            }
            let compare = route.compare.as_ref().map(|c| {
                let urls: Vec<String> = targets.iter().map(|(t, _)| t.url.clone()).collect();
                let previous = old.and_then(|o| o.router.compare_of(&route.name));
                compare::RouteCompare::build(&route.name, c, &urls, previous, metrics)
            });
            routes.push(Route {
                name: route.name.clone(),
                matcher: route.matcher.clone(),
                targets,
                replay_truncated: route.replay_truncated,
                compare,
            });
        }
        Ok(Self {
            router: Router::new(routes),
            tcp: tee_stream::TcpRouter::build(&config.tcp_routes, resolver, old.map(|o| &o.tcp)),
            rpc: rpc::RpcRouter::build(&config.rpc_routes, resolver, old.map(|o| &o.rpc), metrics),
            allow: config.agents_allow.clone(),
        })
    }

    /// Whether the agent `identity` may send.
    pub fn allows(&self, identity: &str) -> bool {
        self.allow
            .as_ref()
            .is_none_or(|allow| allow.iter().any(|p| config::identity_matches(p, identity)))
    }
}

/// `teeway_certificate_expiry_timestamp_seconds` for the gateway's certificate and CA bundle.
fn record_expiry(
    registry: &teeway_runtime::metrics::Registry,
    tls: &teeway_wire::tls::TlsMaterial,
) {
    registry.certificate_expiry("tls.cert", &tls.chain[..tls.chain.len().min(1)]);
    registry.certificate_expiry("tls.ca", &tls.ca);
}

/// One gateway instance.
#[derive(Debug)]
pub struct Gateway {
    /// The configuration the gateway started with (what its sockets were bound from).
    config: GatewayConfig,
    metrics: Arc<GatewayMetrics>,
    routing: Arc<ArcSwap<Routing>>,
    resolver: OnceLock<Resolver>,
    config_state: Arc<ConfigState>,
    /// The QUIC endpoint once running, and the TLS material it serves: a reload that brings new
    /// certificates gives the endpoint a new server configuration (new handshakes use it;
    /// connections already made keep theirs).
    tls: Mutex<TlsInForce>,
}

#[derive(Debug)]
struct TlsInForce {
    material: teeway_wire::tls::TlsMaterial,
    endpoint: Option<Endpoint>,
    /// Once running with TLS over TCP: the listener's configuration, which each new
    /// connection loads.
    tcp: Option<Arc<ArcSwap<rustls::ServerConfig>>>,
}

impl Gateway {
    /// A gateway for `config`; nothing runs until [`Gateway::run`].
    pub fn new(config: GatewayConfig) -> Self {
        Self::with_source(config, "built in", None)
    }

    /// A gateway for `config`, read from `source` whose YAML `text` `GET /config` shows.
    pub fn with_source(config: GatewayConfig, source: &str, text: Option<&str>) -> Self {
        let metrics = Arc::new(GatewayMetrics::new());
        record_expiry(metrics.registry(), &config.tls);
        let config_state = Arc::new(ConfigState::new(metrics.registry(), source, text));
        let tls = Mutex::new(TlsInForce {
            material: config.tls.clone(),
            endpoint: None,
            tcp: None,
        });
        Self {
            config,
            metrics,
            routing: Arc::new(ArcSwap::from_pointee(Routing::default())),
            resolver: OnceLock::new(),
            config_state,
            tls,
        }
    }

    /// The gateway's metrics as a scraper would read them.
    pub fn metrics(&self) -> Snapshot {
        Snapshot::parse(&self.metrics.registry().render())
    }

    /// What `GET /config` shows, and the reload counters.
    pub fn config_state(&self) -> Arc<ConfigState> {
        self.config_state.clone()
    }

    /// Validates `text` in full and, when valid, puts its routes and `agents.allow` in force;
    /// returns the changed settings that need a restart. When invalid, nothing changes.
    pub fn reload_yaml(&self, text: &str, base_dir: &Path) -> ReloadResult {
        let new = GatewayConfig::from_yaml(text, base_dir).map_err(|e| e.to_string())?;
        if new.routes.is_empty()
            && new.tcp_routes.is_empty()
            && new.rpc_routes.is_empty()
            && self.config.archive.is_none()
        {
            return Err(
                "routes: needs at least one route, tcp route or rpc route (this gateway has no archive)"
                    .into(),
            );
        }
        let resolver = match self.resolver.get() {
            Some(r) => r.clone(),
            None => Resolver::from_system().map_err(|e| e.to_string())?,
        };
        let old = self.routing.load_full();
        let routing = Routing::build(&new, &resolver, Some(&old), &self.metrics)
            .map_err(|e| e.to_string())?;
        // Everything is validated before anything is swapped: whole or nothing.
        let mut tls = self.lock_tls();
        let new_tls = if tls.material.same_as(&new.tls) {
            None
        } else {
            Some((
                quic_server_config(&new.tls, &self.config.limits).map_err(|e| e.to_string())?,
                teeway_wire::tls::server_config(&new.tls).map_err(|e| e.to_string())?,
            ))
        };
        self.routing.store(Arc::new(routing));
        if let Some((server_config, tcp_config)) = new_tls {
            if let Some(endpoint) = &tls.endpoint {
                endpoint.set_server_config(Some(server_config));
            }
            if let Some(tcp) = &tls.tcp {
                tcp.store(Arc::new(tcp_config));
            }
            tls.material = new.tls.clone();
            record_expiry(self.metrics.registry(), &new.tls);
            tracing::info!(
                "TLS material reloaded: new agent handshakes use the new certificate and CA bundle"
            );
        }
        Ok(new.restart_required(&self.config))
    }

    /// Serves until `shutdown` is cancelled and the drain is over.
    pub async fn run(
        &self,
        listeners: GatewayListeners,
        shutdown: CancellationToken,
    ) -> Result<(), GatewayError> {
        // Throttled log summaries are written out on a timer and once more at the end, so a
        // burst that stopped is still reported with its total.
        let summaries_stop = CancellationToken::new();
        let summaries = tokio::spawn(teeway_runtime::logging::flush_until(summaries_stop.clone()));
        // Histogram samples are folded on a timer, scraped or not (see `upkeep_until`).
        let upkeep_owner = self.metrics.clone();
        tokio::spawn(teeway_runtime::metrics::upkeep_until(
            move || upkeep_owner.registry().run_upkeep(),
            summaries_stop.clone(),
        ));
        let config = &self.config;
        let resolver = match self.resolver.get() {
            Some(r) => r.clone(),
            None => {
                let r = Resolver::from_system()?;
                let _ = self.resolver.set(r.clone());
                r
            }
        };
        let current = self.routing.load_full();
        self.routing.store(Arc::new(Routing::build(
            config,
            &resolver,
            Some(&current),
            &self.metrics,
        )?));
        let (archive, archive_task) = match &config.archive {
            Some(a) => {
                let (archive, task) =
                    Archive::start(a, self.metrics.registry()).map_err(GatewayError::Archive)?;
                (Some(archive), Some(task))
            }
            None => (None, None),
        };
        let dispatcher = Arc::new(Dispatcher {
            routing: self.routing.clone(),
            metrics: self.metrics.clone(),
            replays: TaskTracker::new(),
            observers: observe::Observers::new(match &archive {
                Some(a) if a.config().record_responses => {
                    vec![Arc::new(observe::ArchiveResponses::new(a.clone()))]
                }
                _ => Vec::new(),
            }),
            archive,
            budget: budget::Budget::new(config.limits, self.metrics.buffered.clone()),
            dedupe: Default::default(),
            instance: fastrand::u64(1..),
        });

        let admin_addr = admin::listen_addr(listeners.admin.as_ref());
        let listen = listeners
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let endpoint = match listeners.quic {
            Some(socket) => Some(self.endpoint(socket)?),
            None => None,
        };
        let tcp = match listeners.tcp {
            Some(listener) => Some((
                TcpListener::from_std(listener).map_err(GatewayError::Endpoint)?,
                self.tcp_config()?,
            )),
            None => None,
        };
        let admin_stop = CancellationToken::new();
        let admin_task = listeners.admin.map(|listener| {
            let state: Arc<dyn AdminState> = Arc::new(AdminView {
                metrics: self.metrics.clone(),
                config: self.config_state.clone(),
                routing: self.routing.clone(),
            });
            tokio::spawn(admin::serve(listener, state, admin_stop.clone()))
        });
        tracing::info!(
            %listen,
            quic = endpoint.is_some(),
            tls = tcp.is_some(),
            admin = %admin_addr,
            routes = config.routes.len(),
            archive = %config.archive.as_ref().map_or("off".into(), |a| a.dir.display().to_string()),
            "gateway serving"
        );

        let quic_task = endpoint.clone().map(|endpoint| {
            tokio::spawn(listener::quic::serve(
                endpoint,
                dispatcher.clone(),
                shutdown.clone(),
            ))
        });
        let tcp_task = tcp.map(|(listener, tls)| {
            tokio::spawn(listener::tls::serve(
                listener,
                tls,
                dispatcher.clone(),
                shutdown.clone(),
            ))
        });
        for task in [quic_task, tcp_task].into_iter().flatten() {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "listener task failed");
            }
        }
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
        if let Some(endpoint) = endpoint {
            endpoint.close(VarInt::from_u32(codes::SHUTDOWN), b"gateway shutting down");
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, endpoint.wait_idle()).await;
        }
        // Stopped: a later reload has no endpoint to reconfigure, and the socket is released.
        {
            let mut tls = self.lock_tls();
            tls.endpoint = None;
            tls.tcp = None;
        }
        admin_stop.cancel();
        if let Some(task) = admin_task {
            let _ = task.await;
        }
        summaries_stop.cancel();
        let _ = summaries.await;
        tracing::info!("gateway stopped");
        Ok(())
    }

    fn endpoint(&self, socket: std::net::UdpSocket) -> Result<Endpoint, GatewayError> {
        let mut tls = self.lock_tls();
        let (reset_key, cid_key) = restart_stable_keys(&tls.material);
        let mut endpoint_config = EndpointConfig::new(reset_key);
        endpoint_config.cid_generator(move || {
            Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
        });
        let endpoint = Endpoint::new(
            endpoint_config,
            Some(quic_server_config(&tls.material, &self.config.limits)?),
            socket,
            Arc::new(TokioRuntime),
        )
        .map_err(GatewayError::Endpoint)?;
        tls.endpoint = Some(endpoint.clone());
        Ok(endpoint)
    }

    fn tcp_config(&self) -> Result<Arc<ArcSwap<rustls::ServerConfig>>, GatewayError> {
        let mut tls = self.lock_tls();
        let config = teeway_wire::tls::server_config(&tls.material)
            .map_err(|e| GatewayError::Tls(e.to_string()))?;
        let handle = Arc::new(ArcSwap::from_pointee(config));
        tls.tcp = Some(handle.clone());
        Ok(handle)
    }

    fn lock_tls(&self) -> std::sync::MutexGuard<'_, TlsInForce> {
        // Plain data behind the lock: a panic elsewhere leaves it usable.
        self.tls.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The keys QUIC stateless resets are made with and connection IDs are checked with, derived
/// from the gateway's private key so that they survive a restart. A gateway that comes back
/// after a crash then recognises the connection IDs of the agents' old connections as its own
/// (quinn drops packets whose ID it cannot validate, silently) and answers them with a reset the
/// agents can verify: they reconnect at once instead of waiting out the idle timeout. Replicas
/// sharing a certificate share the keys, which is what a reset needs when a load balancer hands a
/// packet to another replica.
fn restart_stable_keys(
    material: &teeway_wire::tls::TlsMaterial,
) -> (Arc<dyn quinn::crypto::HmacKey>, u64) {
    let derive = |label: &[u8]| {
        let mut input = label.to_vec();
        input.extend_from_slice(material.key.secret_der());
        ring::digest::digest(&ring::digest::SHA256, &input)
    };
    let reset = derive(b"teeway/1 stateless reset key");
    let cid = derive(b"teeway/1 connection id key");
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&cid.as_ref()[..8]);
    (
        Arc::new(ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            reset.as_ref(),
        )),
        u64::from_le_bytes(cid_key),
    )
}

/// Unread bytes quinn holds for one stream (QUIC flow control): a batch's first MiB.
const QUIC_STREAM_WINDOW: u32 = 1 << 20;
/// Unread bytes quinn holds for one connection, across its streams.
const QUIC_CONNECTION_WINDOW: u32 = 4 << 20;

/// The QUIC server configuration for `material`: mTLS, stream limits, idle timeout.
fn quic_server_config(
    material: &teeway_wire::tls::TlsMaterial,
    limits: &budget::Limits,
) -> Result<quinn::ServerConfig, GatewayError> {
    let tls =
        teeway_wire::tls::server_config(material).map_err(|e| GatewayError::Tls(e.to_string()))?;
    let quic = QuicServerConfig::try_from(tls).map_err(|e| GatewayError::Tls(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    transport.max_concurrent_bidi_streams(VarInt::from_u32(limits.streams_per_connection));

    transport.max_concurrent_uni_streams(VarInt::from_u32(0));
    // What quinn holds of a connection's data before the gateway reads it: bounded per stream
    // and per connection, so that an agent cannot park memory outside the budget by opening
    // streams faster than they are read. 4 MiB a round trip is 50 MB/s at 80 ms.
    transport.stream_receive_window(VarInt::from_u32(QUIC_STREAM_WINDOW));
    transport.receive_window(VarInt::from_u32(QUIC_CONNECTION_WINDOW));
    transport.max_idle_timeout(Some(
        IDLE_TIMEOUT
            .try_into()
            .map_err(|_| GatewayError::Tls("idle timeout out of range".into()))?,
    ));
    server.transport_config(Arc::new(transport));
    Ok(server)
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
    config: Arc<ConfigState>,
    routing: Arc<ArcSwap<Routing>>,
}

impl AdminState for AdminView {
    fn registry(&self) -> &Registry {
        self.metrics.registry()
    }

    fn ready(&self) -> bool {
        true
    }

    fn config(&self) -> Option<String> {
        Some(self.config.render())
    }

    /// `/compare/ui`: the findings as a web page; `/compare`: every compare route's findings
    /// (JSON); `/compare/samples?route=&endpoint=&field=`: the samples kept for one field.
    fn page(&self, path: &str, query: Option<&str>) -> Option<admin::Page> {
        use http::StatusCode;
        let routing = self.routing.load();
        let json = |status, value: serde_json::Value| admin::Page::json(status, value.to_string());
        match path {
            "/compare/ui" | "/compare/ui/" => Some(admin::Page {
                status: StatusCode::OK,
                content_type: "text/html; charset=utf-8",
                body: compare::PAGE.to_owned(),
            }),
            "/compare" => {
                let routes: Vec<serde_json::Value> =
                    routing.router.compares().map(|c| c.summary()).collect();
                Some(json(
                    StatusCode::OK,
                    serde_json::json!({ "routes": routes }),
                ))
            }
            "/compare/samples" => {
                let want = |name| admin::query_value(query, name);
                let (Some(route), Some(endpoint), Some(field)) =
                    (want("route"), want("endpoint"), want("field"))
                else {
                    return Some(json(
                        StatusCode::BAD_REQUEST,
                        serde_json::json!({ "error": "give route, endpoint and field" }),
                    ));
                };
                let Some(c) = routing.router.compare_of(&route) else {
                    return Some(json(
                        StatusCode::NOT_FOUND,
                        serde_json::json!({ "error": format!("no compare route {route}") }),
                    ));
                };
                let samples = c.samples(&endpoint, &field);
                Some(json(
                    StatusCode::OK,
                    serde_json::json!({ "samples": samples }),
                ))
            }
            _ => None,
        }
    }
}
