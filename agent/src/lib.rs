//! The teeway agent: sits at the production ingress, proxies every request to the primary, and
//! tees a sampled copy to a remote gateway over mTLS QUIC without ever making production wait.
//!
//! # Layout
//!
//! A request's path, in the order it meets the code:
//!
//! - taps, which turn production traffic into copies and know nothing of links:
//!   - `ingress`: accepting production clients: connection cap, header and idle timeouts, the
//!     drain on shutdown; each request goes to the `front`.
//!   - `front`: what answers on `listen`: the proxy, or the sink.
//!   - `downstream`: the clients as the taps see them: who (`Peer`), what
//!     they may send, the body they get back.
//!   - `proxy`: the inline reverse proxy (HTTP/1.1 and HTTP/2) in front of the primary.
//!   - `sink`: takes an ingress's mirror feed (nginx `mirror`, Envoy/Istio mirroring), answers
//!     at once.
//!   - `retry`: sending a request the primary never processed again; finishing copies of bodies
//!     the primary left unread.
//!   - `tcp`: `tcp:` listeners, a byte-stream proxy teeing each sampled connection on its own
//!     QUIC stream.
//!   - [`rpc`]: `rpc:` listeners, a byte-stream proxy that reads each request (a Redis command)
//!     beside it and copies the chosen ones one by one, under a policy of their own.
//! - [`policy`]: mirror rules, consistent sampling, redaction, the body-size policy.
//! - `rpc_policy`: `rpc:` listeners' configuration, rules, sampling and attachment redaction.
//! - `tee`: applying the policy, copying bodies as they stream, handing finished copies to the
//!   uplink's bounded queue without waiting.
//! - `pace`: each rule's share of sampled requests copied, lowered while the gateway sheds them.
//! - the shipper, which owns everything past the queue:
//!   - `uplink`: links to every gateway address, batches, acknowledgements, retries,
//!     reconnecting with backoff, the spool and the archive.
//!   - `link`: one connection over QUIC or TLS over TCP, and the batch exchange on it.
//!   - `spool`: the optional disk spool where copies wait while no gateway is reachable.
//! - [`config`]: `agent.yaml`, validated in full before anything binds.
//! - [`metrics`]: metric names and the accounting that makes every request add up.
//! - [`error`]: the agent's errors.
//!
//! Only what the binary and the tests use is public; the rest is the crate's own.
//!
//! # Reload
//!
//! [`Agent::reload_yaml`] validates a whole new configuration and swaps the mirror policy in one
//! atomic store: a request is decided and redacted under the policy in force when its head
//! arrived. Client connections, the uplink and the primary's connection pool are untouched;
//! settings bound at start are reported as needing a restart.
//!
//! # Shutdown
//!
//! When the `shutdown` token passed to [`Agent::run`] is cancelled, the agent drains: `/readyz`
//! says not ready, and for `drain_time` it goes on accepting and serving while clients are asked
//! to reconnect (see `ingress`). Then it stops accepting and lets open requests and `tcp:`
//! connections finish (up to `shutdown_grace`; TCP connections still open then are cut and their
//! copies counted `shutdown`); then it closes the queue, sends what it holds (up to
//! `shutdown_grace` again) and counts the rest as `shutdown` drops.

use std::io;
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::uri::Authority;
use teeway_wire::tls::TlsMaterial;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use teeway_runtime::admin::{self, AdminState};
use teeway_runtime::connect::{TlsSetup, UpstreamConnector};
use teeway_runtime::dns::Resolver;
use teeway_runtime::metrics::{Registry, Snapshot};
use teeway_runtime::reload::{ConfigState, ReloadResult};

pub mod config;
mod downstream;
pub mod error;
mod front;
mod ingress;
pub(crate) mod link;
pub mod metrics;
mod pace;
pub mod policy;
mod proxy;
mod retry;
pub mod rpc;
mod rpc_policy;
mod sink;
pub(crate) mod spool;
mod tcp;
mod tee;
mod uplink;

pub use config::AgentConfig;
pub use error::{AgentError, UplinkError};
pub use link::Transport;
pub use spool::SpoolConfig;

/// The uplink's parts, for the component benchmarks (benches/components.rs) only: not an API.
#[doc(hidden)]
pub mod bench_support {
    pub use crate::uplink::{Queued, Uplink, UplinkState};
}

use teeway_archive::{Archive, ArchiveDrop, Outcome};

use crate::front::Front;
use crate::ingress::IngressState;
use crate::link::ClientConfigs;
use crate::metrics::{Accounting, DropReason};
use crate::policy::MirrorPolicy;
use crate::proxy::Proxy;
use crate::rpc::{RpcPolicy, RpcTap};
use crate::sink::Sink;
use crate::spool::{Spool, SpoolMetrics};
use crate::tcp::TcpTee;
use crate::tee::Tee;
use crate::uplink::Queued;
use crate::uplink::{Uplink, UplinkState};

/// How long one connection attempt to the primary may take.
const PRIMARY_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The agent's sockets, bound before [`Agent::run`] so callers (tests, the demo) can use port 0
/// and read the real address back.
#[derive(Debug)]
pub struct AgentListeners {
    /// Production HTTP traffic (`listen`); `None` for an agent that only tees TCP.
    pub proxy: Option<TcpListener>,
    /// The `tcp:` listeners, in configuration order.
    pub tcp: Vec<TcpListener>,
    /// The `rpc:` listeners, in configuration order.
    pub rpc: Vec<TcpListener>,
    /// `/metrics`, `/healthz`, `/readyz`.
    pub admin: Option<TcpListener>,
}

impl AgentListeners {
    /// Binds the addresses named in `config`.
    pub async fn bind(config: &AgentConfig) -> io::Result<Self> {
        let proxy = match config.listen {
            Some(listen) => Some(TcpListener::bind(listen).await.map_err(|e| {
                io::Error::new(e.kind(), format!("cannot listen on {listen} (listen): {e}"))
            })?),
            None => None,
        };
        let mut tcp = Vec::with_capacity(config.tcp.len());
        for (i, t) in config.tcp.iter().enumerate() {
            tcp.push(TcpListener::bind(t.listen).await.map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot listen on {} (tcp[{i}].listen): {e}", t.listen),
                )
            })?);
        }
        let mut rpc = Vec::with_capacity(config.rpc.len());
        for (i, r) in config.rpc.iter().enumerate() {
            rpc.push(TcpListener::bind(r.listen).await.map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot listen on {} (rpc[{i}].listen): {e}", r.listen),
                )
            })?);
        }
        let admin = match &config.admin {
            Some(a) => Some(TcpListener::bind(a.listen).await.map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot listen on {} (admin.listen): {e}", a.listen),
                )
            })?),
            None => None,
        };
        Ok(Self {
            proxy,
            tcp,
            rpc,
            admin,
        })
    }
}

/// One agent instance.
#[derive(Debug)]
pub struct Agent {
    /// The configuration the agent started with (what its sockets and tasks were built from).
    config: AgentConfig,
    accounting: Arc<Accounting>,
    uplink_state: Arc<UplinkState>,
    /// The mirror policy in force, shared with the tee.
    policy: Arc<ArcSwap<MirrorPolicy>>,
    /// Each `rpc:` listener's policy in force, in configuration order.
    rpc_policies: Vec<Arc<ArcSwap<RpcPolicy>>>,
    config_state: Arc<ConfigState>,
    /// Whether the listener is draining (`/readyz` says not ready).
    ingress: Arc<IngressState>,
    /// The uplink's TLS material in force and, once running, the uplink's client configuration:
    /// a reload with new certificates swaps it, and the next connection uses it.
    uplink_tls: Mutex<UplinkTls>,
}

#[derive(Debug, Default)]
struct UplinkTls {
    material: Option<TlsMaterial>,
    client_configs: Option<Arc<ArcSwap<ClientConfigs>>>,
}

/// `teeway_certificate_expiry_timestamp_seconds` for the uplink's certificate and CA bundle.
fn record_expiry(registry: &teeway_runtime::metrics::Registry, tls: &TlsMaterial) {
    registry.certificate_expiry("gateway.cert", &tls.chain[..tls.chain.len().min(1)]);
    registry.certificate_expiry("gateway.ca", &tls.ca);
}

impl Agent {
    /// An agent for `config`; nothing runs until [`Agent::run`].
    pub fn new(config: AgentConfig) -> Self {
        Self::with_source(config, "built in", None)
    }

    /// An agent for `config`, read from `source` whose YAML `text` `GET /config` shows.
    pub fn with_source(config: AgentConfig, source: &str, text: Option<&str>) -> Self {
        let accounting = Arc::new(Accounting::new(config.mirror.queue_bytes));
        let policy = config.mirror.policy.build(Some(accounting.registry()));
        let rpc_policies = config
            .rpc
            .iter()
            .map(|r| {
                let policy = r.policy.build(&r.name, Some(accounting.registry()), None);
                Arc::new(ArcSwap::from_pointee(policy))
            })
            .collect();
        let config_state = Arc::new(ConfigState::new(accounting.registry(), source, text));
        accounting
            .registry()
            .gauge_owned(
                metrics::AGENT_INFO,
                "Always 1: the production cluster this agent serves and the teeway version",
                &[
                    ("cluster", config.cluster.clone()),
                    ("version", env!("CARGO_PKG_VERSION").to_owned()),
                ],
            )
            .set(1.0);
        if let Some(g) = &config.gateway {
            record_expiry(accounting.registry(), &g.tls);
        }
        if let Some(listen_tls) = &config.listen_tls {
            // Read again for its dates: the server config keeps no parsed certificate.
            use rustls::pki_types::pem::PemObject;
            if let Ok(chain) = rustls::pki_types::CertificateDer::pem_file_iter(&listen_tls.cert)
                .and_then(|certs| certs.take(1).collect::<Result<Vec<_>, _>>())
            {
                accounting
                    .registry()
                    .certificate_expiry("listen_tls.cert", &chain);
            }
        }
        let uplink_tls = Mutex::new(UplinkTls {
            material: config.gateway.as_ref().map(|g| g.tls.clone()),
            client_configs: None,
        });
        Self {
            config,
            accounting,
            uplink_state: Arc::new(UplinkState::default()),
            policy: Arc::new(ArcSwap::from_pointee(policy)),
            rpc_policies,
            config_state,
            ingress: Arc::new(IngressState::default()),
            uplink_tls,
        }
    }

    /// Validates `text` in full and, when valid, puts its mirror policy in force; returns the
    /// changed settings that need a restart. When invalid, nothing changes.
    pub fn reload_yaml(&self, text: &str, base_dir: &Path) -> ReloadResult {
        let new = AgentConfig::from_yaml(text, base_dir).map_err(|e| e.to_string())?;
        let restart = new.restart_required(&self.config);
        // Validate everything before swapping anything: whole or nothing.
        let mut tls = self.lock_uplink_tls();
        let gateway_moved = restart.iter().any(|r| r == "gateway");
        let new_tls = match (&new.gateway, &tls.material) {
            // Same gateway, other certificates: live (another gateway needs a restart).
            (Some(g), Some(in_force)) if !gateway_moved && !g.tls.same_as(in_force) => {
                let configs = uplink::client_configs(&g.tls).map_err(|e| e.to_string())?;
                Some((g.tls.clone(), configs))
            }
            _ => None,
        };
        let policy = new
            .mirror
            .policy
            .build_after(Some(self.accounting.registry()), Some(&self.policy.load()));
        self.policy.store(Arc::new(policy));
        // The listeners are those the agent started with (others need a restart): each takes
        // its new policy by name.
        for (running, in_force) in self.config.rpc.iter().zip(&self.rpc_policies) {
            if let Some(new) = new.rpc.iter().find(|r| r.name == running.name) {
                let built = new.policy.build(
                    &running.name,
                    Some(self.accounting.registry()),
                    Some(&in_force.load()),
                );
                in_force.store(Arc::new(built));
            }
        }
        if let Some((material, configs)) = new_tls {
            if let Some(handle) = &tls.client_configs {
                handle.store(Arc::new(configs));
            }
            record_expiry(self.accounting.registry(), &material);
            tls.material = Some(material);
            tracing::info!("TLS material reloaded: the next uplink connection uses the new certificate and CA bundle");
        }
        Ok(restart)
    }

    fn lock_uplink_tls(&self) -> std::sync::MutexGuard<'_, UplinkTls> {
        // Plain data behind the lock: a panic elsewhere leaves it usable.
        self.uplink_tls.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What `GET /config` shows, and the reload counters.
    pub fn config_state(&self) -> Arc<ConfigState> {
        self.config_state.clone()
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
        let background = Background::start(&self.accounting);
        let resolver = Resolver::from_system()?;

        // Past the tee, everything is the shipper's: queue, uplink, spool, archive.
        let shipper = self.shipper(&resolver).await?;
        let tap = if config.primary.is_some() {
            "http"
        } else {
            "sink"
        };
        let mut tee = shipper.tee(self, tap);
        if config.primary.is_some() {
            // Only the proxy sees production's answers.
            tee = tee.with_answers();
        }
        let tee = Arc::new(tee);
        let tcp_tees: Vec<Arc<TcpTee>> = config
            .tcp
            .iter()
            .map(|t| {
                Arc::new(TcpTee::new(
                    t.clone(),
                    &config.cluster,
                    resolver.clone(),
                    self.uplink_state.clone(),
                    self.accounting.registry(),
                ))
            })
            .collect();
        let rpc_taps: Vec<Arc<RpcTap>> = config
            .rpc
            .iter()
            .zip(&self.rpc_policies)
            .map(|(r, policy)| {
                let books = self.accounting.rpc_books(&r.name);
                Arc::new(RpcTap::new(
                    r,
                    policy.clone(),
                    shipper.outlet(self, books, &r.name),
                    resolver.clone(),
                    self.accounting.registry(),
                ))
            })
            .collect();
        let front = match (&config.primary, &config.sink) {
            (Some(_), _) => Some(self.proxy(tee, resolver)?),
            (None, Some(sink)) => Some(Front::Sink(Sink::new(tee, &sink.strip_host_suffix))),
            // An agent that only tees TCP or reads RPC.
            (None, None)
                if listeners.proxy.is_none() && !(tcp_tees.is_empty() && rpc_taps.is_empty()) =>
            {
                None
            }
            (None, None) => return Err(AgentError::NoFront),
        };
        let drain = CancellationToken::new();
        let shipping = shipper.start(drain.clone(), config.shutdown_grace)?;
        let admin_addr = admin::listen_addr(listeners.admin.as_ref());
        let admin_stop = CancellationToken::new();
        let admin_task = listeners.admin.map(|listener| {
            let state: Arc<dyn AdminState> = Arc::new(AdminView {
                accounting: self.accounting.clone(),
                uplink: config.gateway.as_ref().map(|_| self.uplink_state.clone()),
                config: self.config_state.clone(),
                ingress: self.ingress.clone(),
            });
            tokio::spawn(admin::serve(listener, state, admin_stop.clone()))
        });
        tracing::info!(
            listen = %listeners.proxy.as_ref().and_then(|l| l.local_addr().ok()).map_or("none".into(), |a| a.to_string()),
            tcp = %if listeners.tcp.is_empty() { "none".to_owned() } else { listeners.tcp.iter().zip(&tcp_tees).map(|(l, t)| format!("{}@{}", t.name(), l.local_addr().map(|a| a.to_string()).unwrap_or_default())).collect::<Vec<_>>().join(",") },
            rpc = %if listeners.rpc.is_empty() { "none".to_owned() } else { listeners.rpc.iter().zip(&rpc_taps).map(|(l, t)| format!("{}@{}", t.name(), l.local_addr().map(|a| a.to_string()).unwrap_or_default())).collect::<Vec<_>>().join(",") },
            admin = %admin_addr,
            primary = %config.primary.as_ref().map_or(if config.sink.is_some() { "none (sink)" } else { "none" }, |p| p.url.as_str()),
            gateway = %config.gateway.as_ref().map_or("none".into(), |g| teeway_runtime::config::join_host_port(&g.host, g.port)),
            archive = %config.archive.as_ref().map_or("off".into(), |a| a.dir.display().to_string()),
            percentage = config.mirror.policy.percentage,
            tls = config.listen_tls.is_some(),
            "agent serving"
        );

        self.serve(
            listeners.proxy,
            front,
            (listeners.tcp, tcp_tees),
            (listeners.rpc, rpc_taps),
            shutdown,
        )
        .await?;

        // Then, in order: the uplink drains and closes its links, the archive flushes, the
        // admin listener stops, the last log summaries are written.
        drain.cancel();
        shipping.finish().await;
        admin_stop.cancel();
        if let Some(task) = admin_task {
            let _ = task.await;
        }
        background.stop().await;
        tracing::info!("agent stopped");
        Ok(())
    }

    /// The shipper's parts, before it runs: the queue, the archive (with its writer), the spool
    /// (read back from disk first, so the counts start right) and the uplink.
    async fn shipper(&self, resolver: &Resolver) -> Result<Shipper, AgentError> {
        let config = &self.config;
        let (queue_tx, queue_rx) = mpsc::channel(config.mirror.queue);
        let (archive, archive_task) = match &config.archive {
            Some(a) => {
                let (archive, task) =
                    Archive::start(a, self.accounting.registry()).map_err(AgentError::Archive)?;
                (Some(archive), Some(task))
            }
            None => (None, None),
        };
        let spool = match config.gateway.as_ref().and_then(|g| g.spool.clone()) {
            Some(spool) => {
                // Reading what a previous run left takes about a second per GiB.
                let metrics = SpoolMetrics::new(self.accounting.registry());
                let opened = tokio::task::spawn_blocking(move || Spool::open(&spool, metrics))
                    .await
                    .map_err(|e| AgentError::Spool(io::Error::other(e)))?;
                Some(opened.map_err(AgentError::Spool)?)
            }
            None => None,
        };
        let uplink = match &config.gateway {
            Some(gateway) => {
                let mut tls = self.lock_uplink_tls();
                let mut gateway = gateway.clone();
                if let Some(material) = &tls.material {
                    // Certificates reloaded before the run started.
                    gateway.tls = material.clone();
                }
                let gateway_resolver = if gateway.nameservers.is_empty() {
                    resolver.clone()
                } else {
                    Resolver::with_nameservers(&gateway.nameservers)?
                };
                let mut uplink = Uplink::new(
                    gateway,
                    &config.cluster,
                    gateway_resolver,
                    self.accounting.clone(),
                    self.uplink_state.clone(),
                )?;
                tls.client_configs = Some(uplink.client_configs());
                if let Some(spool) = spool {
                    uplink = uplink.with_spool(spool);
                }
                Some(uplink)
            }
            None => None,
        };
        Ok(Shipper {
            queue_tx,
            queue_rx,
            // The uplink names its batches with the session; the copies carry the same one.
            session: uplink
                .as_ref()
                .map_or_else(|| fastrand::u64(1..), Uplink::session),
            uplink,
            archive,
            archive_task,
        })
    }

    /// The inline proxy to the primary, copying through `tee`.
    fn proxy(&self, tee: Arc<Tee>, resolver: Resolver) -> Result<Front, AgentError> {
        let config = &self.config;
        let Some(primary) = &config.primary else {
            return Err(AgentError::NoFront);
        };
        let tls = match &config.primary_tls {
            Some(tls) => Some(
                TlsSetup::new(tls.configs.clone(), &tls.server_name)
                    .map_err(AgentError::PrimaryServerName)?,
            ),
            None => None,
        };
        let connector = UpstreamConnector::new(
            &primary.host,
            primary.port,
            resolver,
            PRIMARY_CONNECT_TIMEOUT,
            tls,
        );
        Ok(Front::Proxy(Box::new(Proxy::new(
            tee,
            connector,
            authority(&primary.host, primary.port)?,
            config.primary_protocol,
            self.accounting.clone(),
            &config.limits,
        ))))
    }

    /// Serves production until `shutdown` and its drain are over: the HTTP front on `proxy`,
    /// each `tcp:` listener with its tee. Returns once their connections are done (or cut after
    /// `shutdown_grace`), TCP copies included.
    async fn serve(
        &self,
        proxy: Option<TcpListener>,
        front: Option<Front>,
        (tcp, tcp_tees): (Vec<TcpListener>, Vec<Arc<TcpTee>>),
        (rpc, rpc_taps): (Vec<TcpListener>, Vec<Arc<RpcTap>>),
        shutdown: CancellationToken,
    ) -> Result<(), AgentError> {
        let config = &self.config;
        // `tcp:` listeners go on accepting through the drain time too.
        let stop_accepting = CancellationToken::new();
        {
            let (shutdown, stop, drain_time) =
                (shutdown.clone(), stop_accepting.clone(), config.drain_time);
            tokio::spawn(async move {
                shutdown.cancelled().await;
                tokio::time::sleep(drain_time).await;
                stop.cancel();
            });
        }
        let mut tcp_tasks: Vec<_> = tcp
            .into_iter()
            .zip(tcp_tees)
            .map(|(listener, tee)| {
                tokio::spawn(tcp::serve(
                    listener,
                    tee,
                    stop_accepting.clone(),
                    config.shutdown_grace,
                ))
            })
            .collect();
        tcp_tasks.extend(rpc.into_iter().zip(rpc_taps).map(|(listener, tap)| {
            tokio::spawn(rpc::serve(
                listener,
                tap,
                stop_accepting.clone(),
                config.shutdown_grace,
            ))
        }));
        match (proxy, front) {
            (Some(listener), Some(front)) => {
                ingress::serve(
                    listener,
                    Arc::new(front),
                    config.listen_tls.as_ref().map(|t| t.config.clone()),
                    config.limits,
                    ingress::Shutdown {
                        drain: shutdown.clone(),
                        drain_time: config.drain_time,
                        grace: config.shutdown_grace,
                    },
                    self.ingress.clone(),
                    self.accounting.registry(),
                )
                .await;
            }
            (Some(_), None) => return Err(AgentError::NoFront),
            (None, _) => stop_accepting.cancelled().await,
        }
        // TCP copies finish (or are cut) before the uplink drains and closes its links.
        for task in tcp_tasks {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "tcp listener task failed");
            }
        }
        Ok(())
    }
}

/// The shipper before it runs: everything past the tee's queue. A tap hands copies to the queue
/// and knows nothing of what is behind it.
struct Shipper {
    queue_tx: mpsc::Sender<Queued>,
    queue_rx: mpsc::Receiver<Queued>,
    /// This agent process's session, random per start: in every copy's envelope.
    session: u64,
    uplink: Option<Uplink>,
    archive: Option<Archive>,
    archive_task: Option<teeway_archive::write::ArchiveTask>,
}

impl Shipper {
    /// The tee feeding this shipper's queue, for the tap named `tap`.
    fn tee(&self, agent: &Agent, tap: &str) -> Tee {
        Tee::new(
            self.outlet(agent, agent.accounting.books.clone(), tap),
            agent.policy.clone(),
        )
    }

    /// An outlet to this shipper's queue for the tap named `tap`, counting in `books`.
    fn outlet(&self, agent: &Agent, books: Arc<metrics::Books>, tap: &str) -> tee::Outlet {
        tee::Outlet::new(
            self.queue_tx.clone(),
            books,
            tee::Origin {
                cluster: agent.config.cluster.as_str().into(),
                tap: tap.into(),
                session: self.session,
            },
            // With a spool, copies are made while no gateway is reachable: they go to disk.
            self.uplink
                .as_ref()
                .filter(|u| !u.has_spool())
                .map(|_| agent.uplink_state.clone()),
            self.archive.clone().filter(|_| self.uplink.is_some()),
        )
    }

    /// Starts taking copies off the queue: the uplink, or the archive alone when there is no
    /// gateway. `drain` ends it (what it holds gets `shutdown_grace`).
    fn start(
        self,
        drain: CancellationToken,
        shutdown_grace: Duration,
    ) -> Result<Shipping, AgentError> {
        let Shipper {
            queue_tx,
            queue_rx,
            session: _,
            uplink,
            archive,
            archive_task,
        } = self;
        // The taps hold their own senders; the queue closes when the last of them is gone.
        drop(queue_tx);
        let consumer = match (uplink, archive) {
            (Some(uplink), _) => tokio::spawn(uplink.run(queue_rx, drain, shutdown_grace)),
            (None, Some(archive)) => tokio::spawn(archive_sink(queue_rx, archive, drain)),
            (None, None) => return Err(AgentError::NoDestination),
        };
        Ok(Shipping {
            consumer,
            archive_task,
        })
    }
}

/// The shipper running.
struct Shipping {
    consumer: tokio::task::JoinHandle<()>,
    archive_task: Option<teeway_archive::write::ArchiveTask>,
}

impl Shipping {
    /// Waits for the uplink (or archive sink) to finish draining, then for the archive writer.
    async fn finish(self) {
        if let Err(e) = self.consumer.await {
            tracing::error!(error = %e, "uplink task failed");
        }
        if let Some(task) = self.archive_task {
            task.close().await;
        }
    }
}

/// Tasks beside the agent's work: throttled log summaries written out on a timer (and once more
/// at the end, so a burst that stopped is still reported with its total), and histogram samples
/// folded on a timer, scraped or not.
struct Background {
    stop: CancellationToken,
    summaries: tokio::task::JoinHandle<()>,
}

impl Background {
    fn start(accounting: &Arc<Accounting>) -> Self {
        let stop = CancellationToken::new();
        let summaries = tokio::spawn(teeway_runtime::logging::flush_until(stop.clone()));
        let owner = accounting.clone();
        tokio::spawn(teeway_runtime::metrics::upkeep_until(
            move || owner.registry().run_upkeep(),
            stop.clone(),
        ));
        Self { stop, summaries }
    }

    async fn stop(self) {
        self.stop.cancel();
        let _ = self.summaries.await;
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
    let text = teeway_runtime::config::join_host_port(host, port);
    Authority::from_str(&text).map_err(|_| AgentError::PrimaryAuthority(text))
}

/// Hands queued copies to the archive (an agent with no gateway); each ticket is resolved by
/// the archive's outcome: `mirrored` once written, or dropped with the archive's reason.
async fn archive_sink(
    mut queue_rx: mpsc::Receiver<Queued>,
    archive: Archive,
    drain: CancellationToken,
) {
    loop {
        tokio::select! {
            queued = queue_rx.recv() => match queued {
                Some(q) => archive_one(&archive, q),
                None => return,
            },
            () = drain.cancelled() => break,
        }
    }
    // Client requests are over: take what is left, then let the archive close write it.
    queue_rx.close();
    while let Some(q) = queue_rx.recv().await {
        archive_one(&archive, q);
    }
}

fn archive_one(archive: &Archive, Queued { frame, ticket }: Queued) {
    let done = move |outcome| match outcome {
        Outcome::Written => ticket.mirrored(),
        Outcome::Dropped(reason) => ticket.dropped(match reason {
            ArchiveDrop::QueueFull => DropReason::QueueFull,
            ArchiveDrop::QueueBytes => DropReason::QueueBytes,
            ArchiveDrop::Io => DropReason::ArchiveError,
            ArchiveDrop::Shutdown => DropReason::Shutdown,
            // Refused by configuration checks (rpc listeners with a gor archive).
            ArchiveDrop::NotInFormat => DropReason::ArchiveError,
        }),
    };
    archive.try_submit_frame(frame, Some(Box::new(done)));
}

struct AdminView {
    accounting: Arc<Accounting>,
    /// `None` when the agent only archives: it is then ready whenever it serves.
    uplink: Option<Arc<UplinkState>>,
    config: Arc<ConfigState>,
    ingress: Arc<IngressState>,
}

impl AdminState for AdminView {
    fn registry(&self) -> &Registry {
        self.accounting.registry()
    }

    fn ready(&self) -> bool {
        !self.ingress.is_draining() && self.uplink.as_ref().is_none_or(|u| u.is_connected())
    }

    fn config(&self) -> Option<String> {
        Some(self.config.render())
    }

    fn readiness_detail(&self) -> String {
        if self.ingress.is_draining() {
            return "(draining: shutting down)".into();
        }
        match &self.uplink {
            None => "(archiving; no gateway configured)".into(),
            Some(u) if u.is_connected() => "(uplink connected)".into(),
            Some(_) => "(uplink to the gateway is down)".into(),
        }
    }
}
