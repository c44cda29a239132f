//! The agent's configuration (`agent.yaml`), read and validated in full before any port is bound.
//!
//! The README's configuration reference documents every key; [`AgentConfig::from_yaml`] is the
//! one place that reads them, used by `teeway agent`, `teeway check` and the tests alike.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use teeway_archive::ArchiveConfig;

use crate::downstream;
pub use crate::downstream::ClientLimits;
use crate::link::Transport;
use crate::policy::PolicyConfig;
use crate::spool::{SpoolConfig, MIN_SPOOL_BYTES};
use teeway_runtime::config::{
    self as cfg, ConfigError, HttpTarget, Problems, Section, UpstreamProtocol, UpstreamTlsConfig,
};
use teeway_runtime::units::format_size;
use teeway_wire::tls::{Role, TlsMaterial};

/// Default largest request body copied; larger ones are counted as `body_too_large`.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 1024 * 1024;
/// Default number of copies the queue holds before dropping as `queue_full`.
pub const DEFAULT_QUEUE: usize = 10_000;
/// Default bytes of copies the agent holds (queued and in flight) before dropping as
/// `queue_bytes`: what an operator budgets in memory for mirroring.
pub const DEFAULT_QUEUE_BYTES: u64 = 16 * 1024 * 1024;
/// Upper bound on `mirror.queue`: beyond it the count limit stops meaning anything.
const MAX_QUEUE: u64 = 1_000_000;
/// Default disk budget of `gateway.spool`.
pub const DEFAULT_SPOOL_BYTES: u64 = 1024 * 1024 * 1024;
/// Default time allowed, on SIGTERM, to finish client requests and then send what is queued.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A validated agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Identity carried with every mirrored request.
    pub cluster: String,
    /// Where production HTTP traffic enters; `None` for an agent that only tees TCP (`tcp:`).
    pub listen: Option<SocketAddr>,
    /// TLS on `listen`, terminated by the agent; `None`: plain HTTP (h2c included).
    pub listen_tls: Option<ListenTls>,
    /// The real service; `None` in sink mode.
    pub primary: Option<HttpTarget>,
    /// HTTP version spoken to the primary.
    pub primary_protocol: UpstreamProtocol,
    /// How an `https://` primary is verified (`primary_tls:`); `None` for `http://`.
    pub primary_tls: Option<UpstreamTlsConfig>,
    /// Sink mode: `listen` takes the copies an ingress mirrors, instead of proxying to a primary.
    pub sink: Option<SinkConfig>,
    /// What is copied and how much is held.
    pub mirror: MirrorConfig,
    /// Where copies go over the network, if anywhere.
    pub gateway: Option<GatewayConfig>,
    /// Where copies are written to files, if anywhere. At least one of the two is set.
    pub archive: Option<ArchiveConfig>,
    /// Raw TCP listeners: byte-stream proxies to their primaries, each connection teed whole.
    pub tcp: Vec<TcpListenerConfig>,
    /// `rpc:` listeners, copying RPC requests one by one (Redis).
    pub rpc: Vec<crate::rpc_policy::RpcListenerConfig>,
    /// The admin listener, if any.
    pub admin: Option<AdminConfig>,
    /// Time allowed, after the listener closed, for requests in flight and then for the queue.
    pub shutdown_grace: Duration,
    /// Time the listener goes on accepting and serving after SIGTERM, while `/readyz` says not
    /// ready and clients are asked to reconnect.
    pub drain_time: Duration,
    /// What one client may hold (`limits:`).
    pub limits: ClientLimits,
}

/// `tcp[i]`: a raw TCP listener (Redis, Thrift, Dubbo...) proxied to its primary, with the
/// client-to-server bytes of sampled connections teed to the gateway.
#[derive(Debug, Clone, PartialEq)]
pub struct TcpListenerConfig {
    /// Names the listener in metrics and to the gateway, whose `tcp_routes` route on it.
    pub name: String,
    /// Where clients connect.
    pub listen: SocketAddr,
    /// The real service, `host:port`.
    pub primary: (String, u16),
    /// Share of connections teed, 0 to 100 (decided once per connection).
    pub percentage: f64,
    /// Connections teed at once; more are proxied without a copy, counted `connection_limit`.
    pub max_teed_connections: usize,
    /// Bytes a teed connection's copy may fall behind the client before it is given up
    /// (counted `buffer_full`); the client's connection is never slowed.
    pub buffer_bytes: u64,
}

/// Default `tcp[].max_teed_connections`.
pub const DEFAULT_TCP_MAX_TEED: usize = 512;
/// Default `tcp[].buffer_bytes`.
pub const DEFAULT_TCP_BUFFER_BYTES: u64 = 512 * 1024;
/// Upper bound on `tcp[].max_teed_connections` (each is a QUIC stream to the gateway, which
/// allows 4096 per agent).
const MAX_TCP_MAX_TEED: u64 = 4000;

/// `mirror:`.
#[derive(Debug, Clone)]
pub struct MirrorConfig {
    /// Queue capacity in copies.
    pub queue: usize,
    /// Bytes of copies held, queued or in flight.
    pub queue_bytes: u64,
    /// Percentage, rules, sampling key, redaction, body limit: what a reload can change.
    pub policy: PolicyConfig,
}

impl MirrorConfig {
    /// Everything at `percentage`, default limits and redaction.
    pub fn simple(percentage: f64) -> Self {
        Self {
            queue: DEFAULT_QUEUE,
            queue_bytes: DEFAULT_QUEUE_BYTES,
            policy: PolicyConfig::simple(percentage, DEFAULT_MAX_BODY_BYTES),
        }
    }
}

/// `gateway:`.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Host name or IP of the gateway, resolved with hickory at each connection attempt.
    pub host: String,
    /// Port of the gateway (UDP for QUIC, TCP for TLS; the gateway listens on both).
    pub port: u16,
    /// `quic`, `tls` (TLS 1.3 over TCP) or `auto` (QUIC, falling back to TLS).
    pub transport: Transport,
    /// DNS servers to resolve `host` with instead of the system's; empty: the system's.
    pub nameservers: Vec<SocketAddr>,
    /// Name the gateway's certificate must carry.
    pub server_name: String,
    /// CA bundle, the agent's certificate and key.
    pub tls: TlsMaterial,
    /// The files `tls` was read from (shown by `teeway check`).
    pub tls_files: [PathBuf; 3],
    /// Time a batch waits for its acknowledgement before it is sent again (protocol 3) or
    /// counted as `uplink_error`; a batch is sent again until four times this has passed.
    pub ack_timeout: Duration,
    /// With `transport: auto`, how often a link that fell back to TLS over TCP tries QUIC again.
    pub quic_retry: Duration,
    /// Where copies wait on disk while no gateway is reachable; `None`: they are dropped as
    /// `no_uplink`.
    pub spool: Option<SpoolConfig>,
}

/// Default `gateway.ack_timeout`.
pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(15);

/// Default `gateway.quic_retry`.
pub const DEFAULT_QUIC_RETRY: Duration = Duration::from_secs(10);

impl GatewayConfig {
    /// Whether going from `old` to this needs a restart: any setting of the uplink but its
    /// certificates, which reload live. Every field is named, so a new one must be classified.
    fn needs_restart(&self, old: &GatewayConfig) -> bool {
        let GatewayConfig {
            host,
            port,
            transport,
            nameservers,
            server_name,
            tls: _,
            tls_files: _,
            ack_timeout,
            quic_retry,
            spool,
        } = self;
        *host != old.host
            || *port != old.port
            || *transport != old.transport
            || *nameservers != old.nameservers
            || *server_name != old.server_name
            || *ack_timeout != old.ack_timeout
            || *quic_retry != old.quic_retry
            || *spool != old.spool
    }
}

/// `listen_tls:`: the certificate the agent presents to production clients.
#[derive(Debug, Clone)]
pub struct ListenTls {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// Built from them at load time (ALPN `h2`, `http/1.1`).
    pub config: Arc<rustls::ServerConfig>,
}

/// `sink:`: what is done to the mirror feeds taken on `listen`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkConfig {
    /// Removed from the end of the host of each copy (Envoy and Istio append `-shadow`); empty:
    /// the Host is kept as received.
    pub strip_host_suffix: String,
}

/// The suffix Envoy (and Istio) append to the Host of what they mirror.
pub const DEFAULT_STRIP_HOST_SUFFIX: &str = "-shadow";

/// `admin:`.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Address of `/metrics`, `/healthz`, `/readyz`.
    pub listen: SocketAddr,
}

impl AgentConfig {
    /// Reads and validates `text`; relative file paths are taken from `base_dir`.
    pub fn from_yaml(text: &str, base_dir: &Path) -> Result<Self, ConfigError> {
        let doc = teeway_runtime::yaml::parse(text).map_err(|e| {
            ConfigError::unreadable("agent config", e.to_string(), "fix the YAML syntax")
        })?;
        let mut p = Problems::default();
        let mut root = Section::root(&doc, &mut p);

        // Each block on its own, then the checks that span blocks.
        let cluster = root.required(
            &mut p,
            "cluster",
            "name the production cluster, for example `cluster: prod-eu-1`",
            cfg::nonempty_string,
        );
        let tcp = tcp_block(&mut root, &mut p);
        let rpc = crate::rpc_policy::rpc_block(&mut root, &mut p);
        let front = front_block(&mut root, &mut p, &doc, base_dir);
        let mirror = mirror_block(&mut root, &mut p, base_dir);
        let archive = ArchiveConfig::from_section(&mut root, &mut p, base_dir, false);
        if !rpc.is_empty()
            && archive
                .as_ref()
                .is_some_and(|a| a.format == teeway_archive::config::Format::Gor)
        {
            p.push(
                "archive.format",
                Some(&teeway_runtime::yaml::Value::from("gor")),
                "cannot hold the copies of `rpc:` listeners (GoReplay's format is HTTP only)",
                "use `format: teeway` (the default) to archive RPC copies",
            );
        }
        let (gateway, gateway_given) = uplink_block(&mut root, &mut p, &doc, base_dir);
        let admin_listen = admin_block(&mut root, &mut p);
        let (shutdown_grace, drain_time) = lifecycle_block(&mut root, &mut p);
        let limits = limits_block(&mut root, &mut p);
        root.finish(&mut p);
        validate(
            &Across {
                listen: front.listen,
                admin: admin_listen,
                tcp: &tcp,
                rpc: &rpc,
                gateway: gateway.as_ref(),
                gateway_given,
                max_body_bytes: mirror.policy.max_body_bytes,
            },
            &mut p,
        );

        if front.sink.is_some() && mirror.policy.capture_response.is_some() {
            p.push(
                "mirror.capture_response.enabled",
                Some(&teeway_runtime::yaml::Value::from(true)),
                "cannot be used with `sink:` (a mirror feed carries no production answers)",
                "remove `mirror.capture_response`, or proxy to the primary with `primary:`",
            );
        }
        let front_complete = !front.http
            || (front.listen.is_some() && (front.primary.is_some() || front.sink.is_some()));
        let assembled = match (cluster, front_complete) {
            (Some(cluster), true) => Some(AgentConfig {
                cluster,
                listen: front.listen,
                listen_tls: front.listen_tls,
                primary: front.primary,
                primary_protocol: front.primary_protocol,
                primary_tls: front.primary_tls,
                sink: front.sink,
                mirror,
                gateway,
                archive,
                tcp: tcp.into_iter().map(|(_, t)| t).collect(),
                rpc: rpc.into_iter().map(|(_, r)| r).collect(),
                admin: admin_listen.map(|listen| AdminConfig { listen }),
                shutdown_grace,
                drain_time,
                limits,
            }),
            _ => None,
        };
        p.finish(())?;
        // Every `None` above recorded a problem, so this only guards against a missed case.
        assembled.ok_or_else(|| {
            ConfigError::unreadable(
                "agent config",
                "incomplete configuration",
                "report this as a bug",
            )
        })
    }

    /// The settings that differ from `old` and cannot change while the agent runs.
    pub fn restart_required(&self, old: &AgentConfig) -> Vec<String> {
        // Every field is named, without `..`: a new setting does not compile until it is
        // classified here as live or as needing a restart.
        let AgentConfig {
            cluster,
            listen,
            listen_tls,
            primary,
            primary_protocol,
            primary_tls,
            sink,
            mirror,
            gateway,
            archive,
            tcp,
            rpc,
            admin,
            shutdown_grace,
            drain_time,
            limits,
        } = self;
        let MirrorConfig {
            queue,
            queue_bytes,
            // Live: swapped whole by a reload.
            policy: _,
        } = mirror;
        let mut changed = Vec::new();
        let mut check = |name: &str, same: bool| {
            if !same {
                changed.push(name.to_owned());
            }
        };
        check("cluster", *cluster == old.cluster);
        check("listen", *listen == old.listen);
        // The certificate files reload live; which files, and where clients connect, do not.
        check(
            "listen_tls",
            listen_tls.as_ref().map(|t| (&t.cert, &t.key))
                == old.listen_tls.as_ref().map(|t| (&t.cert, &t.key)),
        );
        check(
            "primary",
            primary.as_ref().map(|p| &p.url) == old.primary.as_ref().map(|p| &p.url),
        );
        check("sink", *sink == old.sink);
        check(
            "primary_protocol",
            *primary_protocol == old.primary_protocol,
        );
        check("primary_tls", *primary_tls == old.primary_tls);
        check("mirror.queue", *queue == old.mirror.queue);
        check("mirror.queue_bytes", *queue_bytes == old.mirror.queue_bytes);
        check(
            "gateway",
            match (gateway, &old.gateway) {
                (Some(new), Some(old)) => !new.needs_restart(old),
                (None, None) => true,
                _ => false,
            },
        );
        check("archive", *archive == old.archive);
        check("tcp", *tcp == old.tcp);
        // Which listeners there are, where, to what: a restart. What they copy: live.
        let bound = |rpc: &[crate::rpc_policy::RpcListenerConfig]| {
            rpc.iter()
                .map(|r| (r.name.clone(), r.protocol, r.listen, r.primary.clone()))
                .collect::<Vec<_>>()
        };
        check("rpc", bound(rpc) == bound(&old.rpc));
        check(
            "admin.listen",
            admin.as_ref().map(|a| a.listen) == old.admin.as_ref().map(|a| a.listen),
        );
        check("shutdown_grace", *shutdown_grace == old.shutdown_grace);
        check("drain_time", *drain_time == old.drain_time);
        check("limits", *limits == old.limits);
        changed
    }

    /// Reads and validates an agent configuration file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = cfg::read_file(path)?;
        // Relative paths inside the file are taken from the working directory, as the shell takes
        // the path of the file itself.
        Self::from_yaml(&text, Path::new(".")).map_err(|e| e.in_file(&path.display().to_string()))
    }
}

/// The HTTP front: where production traffic enters (`listen`, `listen_tls`) and what answers it
/// (`primary` with its `primary_protocol` and `primary_tls`, or `sink`).
struct Front {
    /// Whether the agent has an HTTP front at all (a TCP-only agent has none).
    http: bool,
    listen: Option<SocketAddr>,
    listen_tls: Option<ListenTls>,
    sink: Option<SinkConfig>,
    primary: Option<HttpTarget>,
    primary_tls: Option<UpstreamTlsConfig>,
    primary_protocol: UpstreamProtocol,
}

fn front_block(
    root: &mut Section<'_>,
    p: &mut Problems,
    doc: &teeway_runtime::yaml::Value,
    base_dir: &Path,
) -> Front {
    // An agent that only tees TCP has no HTTP front: no listen, primary or sink.
    let http = !(root_has(doc, "tcp") || root_has(doc, "rpc"))
        || ["listen", "primary", "sink", "listen_tls"]
            .iter()
            .any(|k| root_has(doc, k));
    let listen_fix =
        "give the address production traffic enters on, for example `listen: 0.0.0.0:8080`";
    let listen = if http {
        root.required(p, "listen", listen_fix, cfg::socket_addr)
    } else {
        None
    };
    let listen_tls = listen_tls_block(root, p, base_dir);
    let sink = sink_block(root, p);
    let primary = if !http {
        None
    } else if sink.is_some() {
        let primary = root.optional(
            p,
            "primary",
            "remove `primary:` (and primary_protocol, primary_tls), or remove `sink:`",
            cfg::http_target,
        );
        if primary.is_some() {
            p.push(
                "primary",
                None,
                "cannot be used with `sink:` (a sink answers the mirror feed itself)",
                "remove `primary:` for a sink, or remove `sink:` to proxy to the primary",
            );
        }
        None
    } else {
        root.required(
            p,
            "primary",
            "give the real service's URL, for example `primary: http://127.0.0.1:9000`, or add `sink: {}` to take an ingress's mirror feed instead",
            cfg::http_target,
        )
    };
    let primary_tls = cfg::tls_block(root, p, "primary_tls", base_dir, primary.as_ref());
    let primary_protocol = root
        .optional(
            p,
            "primary_protocol",
            "use http1 (default), http2 (h2c) or auto (the client's version; for gRPC)",
            cfg::upstream_protocol,
        )
        .unwrap_or(UpstreamProtocol::Http1);
    Front {
        http,
        listen,
        listen_tls,
        sink,
        primary,
        primary_tls,
        primary_protocol,
    }
}

/// `mirror:`: the queue and the policy (what is copied, redacted, and up to what size).
fn mirror_block(root: &mut Section<'_>, p: &mut Problems, base_dir: &Path) -> MirrorConfig {
    let mut m = root.section(p, "mirror");
    let percentage = m
        .optional(
            p,
            "percentage",
            "use a number from 0 to 100, such as 100 or 0.5",
            cfg::percentage,
        )
        .unwrap_or(100.0);
    let max_body_fix = format!(
        "use a size up to {}, such as 1MiB",
        format_size(teeway_wire::MAX_BODY_BYTES)
    );
    let max_body_bytes = m
        .optional(p, "max_body_bytes", &max_body_fix, |v| {
            let n = cfg::size(v)?;
            if n > teeway_wire::MAX_BODY_BYTES {
                return Err(format!(
                    "exceeds the protocol's limit of {}",
                    format_size(teeway_wire::MAX_BODY_BYTES)
                ));
            }
            Ok(n)
        })
        .unwrap_or(DEFAULT_MAX_BODY_BYTES);
    let queue = m
        .optional(
            p,
            "queue",
            "use a whole number from 1 to 1000000, such as 10000",
            |v| match cfg::whole_number(v)? {
                0 => Err("must be at least 1".into()),
                n if n > MAX_QUEUE => Err(format!("must be at most {MAX_QUEUE}")),
                n => Ok(n as usize),
            },
        )
        .unwrap_or(DEFAULT_QUEUE);
    let queue_bytes_path = m.path_of("queue_bytes");
    let queue_bytes = m
        .optional(p, "queue_bytes", "use a size such as 16MiB", cfg::size)
        .unwrap_or(DEFAULT_QUEUE_BYTES);
    if queue_bytes < max_body_bytes {
        p.push(
            queue_bytes_path,
            None,
            format!(
                "{} is smaller than max_body_bytes ({}), so the largest copies could never be held",
                format_size(queue_bytes),
                format_size(max_body_bytes)
            ),
            "raise queue_bytes or lower max_body_bytes",
        );
    }
    let policy = PolicyConfig::read(&mut m, root, p, base_dir, percentage, max_body_bytes);
    if let Some(capture) = &policy.capture_response {
        let both = max_body_bytes.saturating_add(capture.max_body_bytes as u64);
        if queue_bytes < both {
            p.push(
                m.path_of("queue_bytes"),
                None,
                format!(
                    "{} is smaller than max_body_bytes and capture_response.max_body_bytes together ({}), so the largest copies could never be held",
                    format_size(queue_bytes),
                    format_size(both)
                ),
                "raise queue_bytes or lower one of the body limits",
            );
        }
    }
    m.finish(p);
    MirrorConfig {
        queue,
        queue_bytes,
        policy,
    }
}

/// `gateway:`, required unless `archive:` is set; and whether it was given at all (a given but
/// invalid block has recorded its problems).
fn uplink_block(
    root: &mut Section<'_>,
    p: &mut Problems,
    doc: &teeway_runtime::yaml::Value,
    base_dir: &Path,
) -> (Option<GatewayConfig>, bool) {
    let archive_given = root_has(doc, "archive");
    let mut g = root.section(p, "gateway");
    let given = g.is_present();
    if !given && !archive_given {
        p.push(
            "gateway",
            None,
            "is required unless `archive:` is set (copies must go somewhere)",
            "add a `gateway:` block with address, ca, cert and key, or an `archive:` block with a dir",
        );
    }
    let gateway = if given || !archive_given {
        gateway_block(&mut g, p, base_dir)
    } else {
        None
    };
    g.finish(p);
    (gateway, given)
}

/// `admin: { listen }`.
fn admin_block(root: &mut Section<'_>, p: &mut Problems) -> Option<SocketAddr> {
    let mut a = root.section(p, "admin");
    let listen = a.optional(
        p,
        "listen",
        "give an ip:port such as 127.0.0.1:9901",
        cfg::socket_addr,
    );
    a.finish(p);
    listen
}

/// `shutdown_grace` and `drain_time`.
fn lifecycle_block(root: &mut Section<'_>, p: &mut Problems) -> (Duration, Duration) {
    let shutdown_grace = root
        .optional(
            p,
            "shutdown_grace",
            "use a duration such as 10s",
            cfg::duration,
        )
        .unwrap_or(DEFAULT_SHUTDOWN_GRACE);
    let drain_time = root
        .optional(
            p,
            "drain_time",
            "use a duration such as 5s (0s stops accepting at once)",
            |v| match cfg::duration(v)? {
                d if d > Duration::from_secs(3600) => Err("must be at most 1h".to_owned()),
                d => Ok(d),
            },
        )
        .unwrap_or(downstream::DEFAULT_DRAIN_TIME);
    (shutdown_grace, drain_time)
}

/// What the checks across blocks look at, whether or not the rest of the file is valid.
struct Across<'a> {
    listen: Option<SocketAddr>,
    admin: Option<SocketAddr>,
    tcp: &'a [(String, TcpListenerConfig)],
    rpc: &'a [(String, crate::rpc_policy::RpcListenerConfig)],
    gateway: Option<&'a GatewayConfig>,
    /// `gateway:` was written, even if invalid (its problems are already recorded).
    gateway_given: bool,
    max_body_bytes: u64,
}

/// The checks that span blocks: listeners that would clash, a spool too small for the largest
/// copy, TCP listeners without a QUIC uplink.
fn validate(a: &Across<'_>, p: &mut Problems) {
    if let Some(spool) = a.gateway.and_then(|g| g.spool.as_ref()) {
        if spool.max_bytes < a.max_body_bytes {
            p.push(
                "gateway.spool.max_bytes",
                None,
                format!(
                    "{} is smaller than mirror.max_body_bytes ({}), so the largest copies could never be spooled",
                    format_size(spool.max_bytes),
                    format_size(a.max_body_bytes)
                ),
                "raise gateway.spool.max_bytes or lower mirror.max_body_bytes",
            );
        }
    }
    if let (Some(listen), Some(admin)) = (a.listen, a.admin) {
        if cfg::addresses_clash(listen, admin) {
            p.push(
                "admin.listen",
                None,
                format!("cannot be bound beside listen ({listen}): same port, same or overlapping address"),
                "give the admin listener its own port",
            );
        }
    }
    let listeners: Vec<(&str, SocketAddr)> = a
        .tcp
        .iter()
        .map(|(path, t)| (path.as_str(), t.listen))
        .chain(a.rpc.iter().map(|(path, r)| (path.as_str(), r.listen)))
        .collect();
    for (i, (path, listen)) in listeners.iter().enumerate() {
        let taken = [("listen", a.listen), ("admin.listen", a.admin)]
            .into_iter()
            .filter_map(|(name, addr)| addr.map(|addr| (name.to_owned(), addr)))
            .chain(
                listeners[..i]
                    .iter()
                    .map(|(other, o)| (format!("{other}.listen"), *o)),
            );
        for (name, addr) in taken {
            if cfg::addresses_clash(addr, *listen) {
                p.push(
                    format!("{path}.listen"),
                    None,
                    format!("is the same address as {name} ({addr})"),
                    "give each listener its own port",
                );
            }
        }
    }
    if !a.tcp.is_empty() {
        match a.gateway {
            None if a.gateway_given => {}
            None => p.push(
                "tcp",
                None,
                "needs `gateway:` (TCP connections are teed to a gateway over QUIC; archives hold HTTP only)",
                "add a `gateway:` block, or remove `tcp:`",
            ),
            Some(g) if g.transport == Transport::Tls => p.push(
                "gateway.transport",
                None,
                "is `tls`, but TCP connections are teed on QUIC streams",
                "use `transport: quic` or `auto` (with auto, connections teed while only TLS links are up are counted `no_quic_link`)",
            ),
            Some(_) => {}
        }
    }
}

/// The `limits:` block: what one client may hold. Every key is optional.
fn limits_block(root: &mut Section<'_>, p: &mut Problems) -> ClientLimits {
    let defaults = ClientLimits::default();
    let mut l = root.section(p, "limits");
    let positive = |v: &teeway_runtime::yaml::Value| match cfg::duration(v)? {
        d if d.is_zero() => Err("must be more than 0s".to_owned()),
        d if d > Duration::from_secs(24 * 3600) => Err("must be at most 24h".to_owned()),
        d => Ok(d),
    };
    let header_read_timeout = l
        .optional(
            p,
            "header_read_timeout",
            "use a duration such as 30s (nginx's client_header_timeout is 60s)",
            positive,
        )
        .unwrap_or(defaults.header_read_timeout);
    let idle_timeout = l
        .optional(
            p,
            "idle_timeout",
            "use a duration such as 75s (nginx's keepalive_timeout)",
            positive,
        )
        .unwrap_or(defaults.idle_timeout);
    let count = |min: u64, max: u64| {
        move |v: &teeway_runtime::yaml::Value| match cfg::whole_number(v)? {
            n if n < min => Err(format!("must be at least {min}")),
            n if n > max => Err(format!("must be at most {max}")),
            n => usize::try_from(n).map_err(|e| e.to_string()),
        }
    };
    let max_connections = l
        .optional(
            p,
            "max_connections",
            "use a whole number such as 10000 (the open files limit may lower it)",
            count(1, 10_000_000),
        )
        .unwrap_or(defaults.max_connections);
    let max_header_lines = l
        .optional(
            p,
            "max_header_lines",
            "use a whole number from 100 to 100000, such as 256 (the default)",
            count(100, 100_000),
        )
        .unwrap_or(defaults.max_header_lines);
    let max_header_bytes = l
        .optional(
            p,
            "max_header_bytes",
            "use a size from 8KiB to 16MiB, such as 128KiB",
            |v| match cfg::size(v)? {
                n if n < downstream::MIN_MAX_HEADER_BYTES as u64 => {
                    Err("must be at least 8KiB".to_owned())
                }
                n if n > 16 * 1024 * 1024 => Err("must be at most 16MiB".to_owned()),
                n => usize::try_from(n).map_err(|e| e.to_string()),
            },
        )
        .unwrap_or(defaults.max_header_bytes);
    l.finish(p);
    ClientLimits {
        header_read_timeout,
        idle_timeout,
        max_connections,
        max_header_lines,
        max_header_bytes,
    }
}

/// The `gateway:` block; `None` with the problems recorded when it is incomplete.
fn gateway_block(g: &mut Section<'_>, p: &mut Problems, base_dir: &Path) -> Option<GatewayConfig> {
    let address = g.required(
        p,
        "address",
        "give the gateway's host:port, for example `address: gateway.test.example:4433`",
        cfg::host_port,
    );
    let server_name = g.optional(
        p,
        "server_name",
        "give the DNS name in the gateway's certificate",
        cfg::nonempty_string,
    );
    let read = cfg::readable_file(base_dir);
    let ca = g.required(
        p,
        "ca",
        "give the PEM file of the CA that signed the gateway's certificate",
        &read,
    );
    let cert = g.required(
        p,
        "cert",
        "give the PEM file of this agent's certificate (see `teeway certs init`)",
        &read,
    );
    let key = g.required(
        p,
        "key",
        "give the PEM file of this agent's private key",
        &read,
    );
    let tls = match (&ca, &cert, &key) {
        (Some(ca), Some(cert), Some(key)) => TlsMaterial::load_checked(ca, cert, key, Role::Agent)
            .map_err(|e| {
                p.push(
                    g.path_of("cert"),
                    None,
                    e.to_string(),
                    "give matching PEM files as written by `teeway certs init`",
                )
            })
            .ok(),
        _ => None,
    };
    let transport = g
        .optional(
            p,
            "transport",
            "use quic, tls (TLS 1.3 over TCP, for networks that block UDP) or auto (QUIC, falling back to TLS)",
            |v| match cfg::string(v)?.as_str() {
                "quic" => Ok(Transport::Quic),
                "tls" => Ok(Transport::Tls),
                "auto" => Ok(Transport::Auto),
                other => Err(format!("`{other}` is not a transport")),
            },
        )
        .unwrap_or_default();
    let nameservers = g
        .list(
            p,
            "nameservers",
            "give DNS servers as ip:port, for example `nameservers: [10.0.0.10:53]`",
            cfg::socket_addr,
        )
        .unwrap_or_default();
    let ack_timeout = g
        .optional(
            p,
            "ack_timeout",
            "use a duration from 1s to 10m, such as 15s",
            cfg::duration_from_to("1s", "10m"),
        )
        .unwrap_or(DEFAULT_ACK_TIMEOUT);
    let quic_retry = g
        .optional(
            p,
            "quic_retry",
            "use a duration from 1s to 1h, such as 10s",
            cfg::duration_from_to("1s", "1h"),
        )
        .unwrap_or(DEFAULT_QUIC_RETRY);
    let spool = spool_block(g, p, base_dir);
    let (host, port) = address?;
    Some(GatewayConfig {
        server_name: server_name.unwrap_or_else(|| host.clone()),
        host,
        port,
        transport,
        nameservers,
        tls: tls?,
        tls_files: [ca?, cert?, key?],
        spool,
        ack_timeout,
        quic_retry,
    })
}

fn root_has(doc: &teeway_runtime::yaml::Value, key: &str) -> bool {
    doc.get(key).is_some_and(|v| !v.is_null())
}

/// `tcp:`, the raw TCP listeners; entries with problems are left out (the problems recorded).
/// Each entry comes with its path (`tcp[i]`), for problems found later.
fn tcp_block(root: &mut Section<'_>, p: &mut Problems) -> Vec<(String, TcpListenerConfig)> {
    let mut out = Vec::new();
    let mut names: Vec<String> = Vec::new();
    for mut t in root.sections(p, "tcp") {
        let name = t.required(
            p,
            "name",
            "name the listener (letters, digits, `-`, `_`, `.`), such as `name: redis`; the gateway's tcp_routes use it",
            cfg::listener_name,
        );
        if let Some(name) = &name {
            if names.contains(name) {
                p.push(
                    t.path_of("name"),
                    None,
                    format!("`{name}` names an earlier tcp listener too"),
                    "give each tcp listener its own name",
                );
            }
            names.push(name.clone());
        }
        let listen = t.required(
            p,
            "listen",
            "give the address clients connect to, such as `listen: 0.0.0.0:6380`",
            cfg::socket_addr,
        );
        let primary = t.required(
            p,
            "primary",
            "give the real service as host:port, such as `primary: redis-primary:6379`",
            cfg::host_port,
        );
        let percentage = t
            .optional(
                p,
                "percentage",
                "use a number from 0 to 100 (the share of connections teed)",
                cfg::percentage,
            )
            .unwrap_or(100.0);
        let max_teed_connections = t
            .optional(
                p,
                "max_teed_connections",
                "use a whole number from 1 to 4000, such as 512",
                |v| match cfg::whole_number(v)? {
                    0 => Err("must be at least 1".into()),
                    n if n > MAX_TCP_MAX_TEED => Err(format!("must be at most {MAX_TCP_MAX_TEED}")),
                    n => Ok(n as usize),
                },
            )
            .unwrap_or(DEFAULT_TCP_MAX_TEED);
        let buffer_bytes = t
            .optional(
                p,
                "buffer_bytes",
                "use a size from 16KiB to 64MiB, such as 512KiB",
                |v| match cfg::size(v)? {
                    n if n < 16 * 1024 => Err("must be at least 16KiB".into()),
                    n if n > 64 * 1024 * 1024 => Err("must be at most 64MiB".into()),
                    n => Ok(n),
                },
            )
            .unwrap_or(DEFAULT_TCP_BUFFER_BYTES);
        let path = t.path().to_owned();
        t.finish(p);
        if let (Some(name), Some(listen), Some(primary)) = (name, listen, primary) {
            out.push((
                path,
                TcpListenerConfig {
                    name,
                    listen,
                    primary,
                    percentage,
                    max_teed_connections,
                    buffer_bytes,
                },
            ));
        }
    }
    out
}

/// `listen_tls`; `None` when absent or invalid (the problems recorded).
fn listen_tls_block(
    root: &mut Section<'_>,
    p: &mut Problems,
    base_dir: &Path,
) -> Option<ListenTls> {
    let mut t = root.section(p, "listen_tls");
    if !t.is_present() {
        t.finish(p);
        return None;
    }
    let read = cfg::readable_file(base_dir);
    let cert = t.required(
        p,
        "cert",
        "give the PEM file of the certificate chain production clients are shown",
        &read,
    );
    let key = t.required(
        p,
        "key",
        "give the PEM file of that certificate's private key",
        &read,
    );
    let cert_path = t.path_of("cert");
    t.finish(p);
    let (cert, key) = (cert?, key?);
    match teeway_wire::tls::https_server_config(&cert, &key) {
        Ok(config) => Some(ListenTls {
            cert,
            key,
            config: Arc::new(config),
        }),
        Err(e) => {
            p.push(
                cert_path,
                None,
                e.to_string(),
                "give a PEM certificate chain and the private key that belongs to it",
            );
            None
        }
    }
}

/// `sink:`; `None` when absent. `sink: {}` (or `sink: true`) takes the defaults.
fn sink_block(root: &mut Section<'_>, p: &mut Problems) -> Option<SinkConfig> {
    match root.get("sink") {
        None
        | Some(teeway_runtime::yaml::Value::Null)
        | Some(teeway_runtime::yaml::Value::Bool(false)) => return None,
        Some(teeway_runtime::yaml::Value::Bool(true)) => {
            return Some(SinkConfig {
                strip_host_suffix: DEFAULT_STRIP_HOST_SUFFIX.into(),
            })
        }
        Some(_) => {}
    }
    let mut s = root.section(p, "sink");
    let strip_host_suffix = s
        .optional(
            p,
            "strip_host_suffix",
            "give the text your ingress appends to the Host of mirrored requests (Envoy and Istio: -shadow), or \"\" to keep Hosts as received",
            |v| {
                let suffix = cfg::string(v)?;
                if suffix.contains(':') || suffix.chars().any(char::is_whitespace) {
                    return Err("may not hold `:` or spaces".into());
                }
                Ok(suffix)
            },
        )
        .unwrap_or_else(|| DEFAULT_STRIP_HOST_SUFFIX.into());
    s.finish(p);
    Some(SinkConfig { strip_host_suffix })
}

/// `gateway.spool`; `None` when absent or invalid (the problems recorded).
fn spool_block(g: &mut Section<'_>, p: &mut Problems, base_dir: &Path) -> Option<SpoolConfig> {
    let mut s = g.section(p, "spool");
    if !s.is_present() {
        s.finish(p);
        return None;
    }
    let dir = s.required(
        p,
        "dir",
        "give a directory for the spool's segments, for example `dir: /var/spool/teeway`",
        |v| {
            let dir = base_dir.join(cfg::nonempty_string(v)?);
            if dir.exists() && !dir.is_dir() {
                return Err("exists and is not a directory".into());
            }
            Ok(dir)
        },
    );
    let max_bytes_fix = format!(
        "use a size of at least {}, such as 1GiB",
        format_size(MIN_SPOOL_BYTES)
    );
    let max_bytes = s
        .optional(p, "max_bytes", &max_bytes_fix, |v| {
            let n = cfg::size(v)?;
            if n < MIN_SPOOL_BYTES {
                return Err(format!("must be at least {}", format_size(MIN_SPOOL_BYTES)));
            }
            Ok(n)
        })
        .unwrap_or(DEFAULT_SPOOL_BYTES);
    s.finish(p);
    Some(SpoolConfig {
        dir: dir?,
        max_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_across_blocks_name_each_clash_and_a_tcp_tee_without_uplink() {
        let addr = |s: &str| s.parse::<SocketAddr>().expect("addr");
        let tcp = |name: &str, listen: &str| {
            (
                format!("tcp[{name}]"),
                TcpListenerConfig {
                    name: name.into(),
                    listen: addr(listen),
                    primary: ("127.0.0.1".into(), 6379),
                    percentage: 100.0,
                    max_teed_connections: DEFAULT_TCP_MAX_TEED,
                    buffer_bytes: DEFAULT_TCP_BUFFER_BYTES,
                },
            )
        };
        let listeners = [tcp("a", "0.0.0.0:8080"), tcp("b", "127.0.0.1:7000")];
        let mut p = Problems::default();
        validate(
            &Across {
                listen: Some(addr("127.0.0.1:8080")),
                admin: Some(addr("0.0.0.0:8080")),
                tcp: &listeners,
                rpc: &[],
                gateway: None,
                gateway_given: false,
                max_body_bytes: 1024,
            },
            &mut p,
        );
        let paths: Vec<String> = p
            .finish(())
            .expect_err("clashes")
            .problems
            .into_iter()
            .map(|problem| problem.path)
            .collect();
        assert_eq!(
            paths,
            ["admin.listen", "tcp[a].listen", "tcp[a].listen", "tcp"],
            "admin beside listen through a wildcard, tcp[a] on both, and no gateway for tcp"
        );

        let mut p = Problems::default();
        validate(
            &Across {
                listen: Some(addr("127.0.0.1:8080")),
                admin: Some(addr("127.0.0.1:9901")),
                tcp: &listeners[1..],
                rpc: &[],
                gateway: None,
                gateway_given: true,
                max_body_bytes: 1024,
            },
            &mut p,
        );
        assert!(
            p.is_empty(),
            "distinct ports; an invalid gateway block already said why: {p:?}"
        );
    }

    fn write_certs(dir: &Path) {
        let ca = teeway_wire::pki::CertificateAuthority::generate("ca").expect("ca");
        let agent = ca.agent("agent").expect("agent");
        std::fs::write(dir.join("ca.pem"), &ca.certified.cert_pem).expect("write");
        std::fs::write(dir.join("agent.pem"), &agent.cert_pem).expect("write");
        std::fs::write(dir.join("agent.key"), &agent.key_pem).expect("write");
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("teeway-agent-cfg-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        dir
    }

    const VALID: &str = "
cluster: prod-eu-1
listen: 127.0.0.1:8080
primary: http://127.0.0.1:9000
mirror:
  percentage: 0.5
  max_body_bytes: 64KiB
  queue: 100
gateway:
  address: localhost:4433
  ca: ca.pem
  cert: agent.pem
  key: agent.key
admin:
  listen: 127.0.0.1:9901
";

    #[test]
    fn valid_config_reads_with_defaults() {
        let dir = temp_dir("valid");
        write_certs(&dir);
        let c = AgentConfig::from_yaml(VALID, &dir).expect("valid");
        assert_eq!(c.cluster, "prod-eu-1");
        assert_eq!(c.mirror.policy.percentage, 0.5);
        assert_eq!(c.mirror.policy.max_body_bytes, 64 * 1024);
        assert_eq!(c.mirror.queue_bytes, DEFAULT_QUEUE_BYTES);
        assert_eq!(
            c.gateway.as_ref().expect("gateway").server_name,
            "localhost"
        );
        assert_eq!(c.shutdown_grace, DEFAULT_SHUTDOWN_GRACE);
        assert_eq!(c.drain_time, downstream::DEFAULT_DRAIN_TIME);
        assert_eq!(c.limits, ClientLimits::default());
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn limits_are_read_and_their_problems_named() {
        let dir = temp_dir("limits");
        write_certs(&dir);
        let good = format!(
            "{VALID}drain_time: 0s\nlimits:\n  header_read_timeout: 10s\n  max_connections: 100\n  max_header_bytes: 64KiB\n"
        );
        let c = AgentConfig::from_yaml(&good, &dir).expect("valid");
        assert_eq!(c.drain_time, Duration::ZERO);
        assert_eq!(c.limits.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.limits.max_connections, 100);
        assert_eq!(c.limits.max_header_bytes, 64 * 1024);
        assert_eq!(c.limits.idle_timeout, downstream::DEFAULT_IDLE_TIMEOUT);
        let bad = format!(
            "{VALID}limits:\n  header_read_timeout: 0s\n  max_header_lines: 5\n  max_header_bytes: 1KiB\n  idle: 3s\n"
        );
        let text = AgentConfig::from_yaml(&bad, &dir)
            .expect_err("invalid")
            .to_string();
        for needle in [
            "limits.header_read_timeout: must be more than 0s (found `0s`)",
            "limits.max_header_lines: must be at least 100 (found `5`)",
            "limits.max_header_bytes: must be at least 8KiB",
            "limits.idle: unknown key",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn every_problem_is_listed() {
        let dir = temp_dir("bad");
        let text = "
cluster: prod
listen: 127.0.0.1
primary: http://x
primary_tls: { server_name: x }
mirror:
  percentage: 101
  max_body_bytes: 64MiB
gateway:
  address: gw:4433
  ca: missing-ca.pem
  cert: missing.pem
  key: missing.key
colour: blue
";
        let err = AgentConfig::from_yaml(text, &dir).expect_err("invalid");
        let text = err.to_string();
        for needle in [
            "listen: is not an `ip:port`",
            "primary_tls: is set but the URL `http://x` is not https",
            "mirror.percentage: must be between 0 and 100 (found `101`)",
            "mirror.max_body_bytes: exceeds the protocol's limit",
            "gateway.ca: cannot be read",
            "gateway.cert: cannot be read",
            "gateway.key: cannot be read",
            "colour: unknown key",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        assert_eq!(err.problems.len(), 8, "{text}");
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn an_https_primary_reads_its_trust() {
        let dir = temp_dir("https");
        write_certs(&dir);
        let with = |primary: &str| {
            VALID.replace(
                "primary: http://127.0.0.1:9000\n",
                &format!("primary: {primary}\n"),
            )
        };
        let c = AgentConfig::from_yaml(
            &with("https://127.0.0.1:9443\nprimary_tls: { ca: ca.pem }"),
            &dir,
        )
        .expect("valid");
        assert!(c.primary.as_ref().expect("primary").tls);
        let tls = c.primary_tls.as_ref().expect("primary_tls");
        assert_eq!(tls.server_name, "127.0.0.1");
        assert_eq!(
            tls.trust,
            teeway_wire::tls::UpstreamTrust::Bundle(dir.join("ca.pem"))
        );
        let c = AgentConfig::from_yaml(&with("https://[::1]"), &dir).expect("valid");
        let primary = c.primary.expect("primary");
        assert_eq!(primary.port, 443);
        assert_eq!(primary.url, "https://[::1]");

        let err = AgentConfig::from_yaml(
            &with("https://api.internal\nprimary_tls: { ca: missing.pem, server_name: \"a b\" }"),
            &dir,
        )
        .expect_err("invalid");
        let text = err.to_string();
        assert!(text.contains("primary_tls.ca: cannot be read"), "{text}");
        assert!(
            text.contains("primary_tls.server_name: is not a DNS name or IP address"),
            "{text}"
        );
        assert_eq!(err.problems.len(), 2, "{text}");
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn tcp_listeners_read_with_defaults_and_need_no_http_front() {
        let dir = temp_dir("tcp");
        write_certs(&dir);
        let http = "listen: 127.0.0.1:8080\nprimary: http://127.0.0.1:9000\n";
        let tcp_only = format!(
            "{}tcp:\n  - name: redis\n    listen: 127.0.0.1:6380\n    primary: redis-primary:6379\n  - name: orders.thrift\n    listen: 127.0.0.1:9090\n    primary: 10.0.0.5:9090\n    percentage: 10\n    max_teed_connections: 8\n    buffer_bytes: 64KiB\n",
            VALID.replace(http, "")
        );
        let c = AgentConfig::from_yaml(&tcp_only, &dir).expect("valid");
        assert_eq!(c.listen, None);
        assert!(c.primary.is_none() && c.sink.is_none());
        assert_eq!(
            c.tcp[0],
            TcpListenerConfig {
                name: "redis".into(),
                listen: "127.0.0.1:6380".parse().expect("addr"),
                primary: ("redis-primary".into(), 6379),
                percentage: 100.0,
                max_teed_connections: DEFAULT_TCP_MAX_TEED,
                buffer_bytes: DEFAULT_TCP_BUFFER_BYTES,
            }
        );
        assert_eq!(c.tcp[1].percentage, 10.0);
        assert_eq!(c.tcp[1].max_teed_connections, 8);
        assert_eq!(c.tcp[1].buffer_bytes, 64 * 1024);
        // With an HTTP front as well.
        let both = format!(
            "{VALID}tcp: [{{ name: redis, listen: 127.0.0.1:6380, primary: 127.0.0.1:6379 }}]\n"
        );
        let c = AgentConfig::from_yaml(&both, &dir).expect("valid");
        assert_eq!(c.listen, Some("127.0.0.1:8080".parse().expect("addr")));
        assert_eq!(c.tcp.len(), 1);
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn tcp_listener_problems_are_named() {
        let dir = temp_dir("tcp-bad");
        write_certs(&dir);
        let text = format!(
            "{}tcp:\n  - name: redis\n    listen: 127.0.0.1:6380\n    primary: nowhere\n    percentage: 120\n    buffer_bytes: 1KiB\n    max_teed_connections: 0\n  - name: \"a b\"\n    listen: 127.0.0.1:9\n    primary: h:1\n    extra: 1\n  - name: redis\n    listen: 127.0.0.1:8080\n    primary: h:1\n",
            VALID.replace("  key: agent.key\n", "  key: agent.key\n  transport: tls\n")
        );
        let err = AgentConfig::from_yaml(&text, &dir).expect_err("invalid");
        let text = err.to_string();
        for needle in [
            "tcp[0].primary: is not a `host:port` address (found `nowhere`)",
            "tcp[0].percentage:",
            "tcp[0].buffer_bytes: must be at least 16KiB",
            "tcp[0].max_teed_connections: must be at least 1",
            "tcp[2].listen: is the same address as listen (127.0.0.1:8080)",
            "tcp[1].name: must be at most 64 letters",
            "tcp[1].extra: unknown key",
            "tcp[2].name: `redis` names an earlier tcp listener too",
            "gateway.transport: is `tls`, but TCP connections are teed on QUIC streams",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        // Only an archive: nowhere to tee TCP to.
        let archive_only = format!(
            "cluster: c\narchive: {{ dir: {} }}\ntcp: [{{ name: r, listen: 127.0.0.1:6380, primary: h:1 }}]\n",
            dir.display()
        );
        let err = AgentConfig::from_yaml(&archive_only, &dir).expect_err("no gateway");
        assert!(err.to_string().contains("tcp: needs `gateway:`"), "{err}");
        // RPC copies archived where GoReplay's format cannot hold them: refused, not lost.
        let rpc_gor = format!(
            "cluster: c\narchive: {{ dir: {}, format: gor }}\nrpc: [{{ name: r, protocol: redis, listen: 127.0.0.1:6380, primary: h:1 }}]\n",
            dir.display()
        );
        let err = AgentConfig::from_yaml(&rpc_gor, &dir).expect_err("gor cannot hold rpc copies");
        assert!(
            err.to_string().contains(
                "archive.format: cannot hold the copies of `rpc:` listeners (GoReplay's format is HTTP only) (found `gor`)"
            ),
            "{err}"
        );
        AgentConfig::from_yaml(&rpc_gor.replace(", format: gor", ""), &dir)
            .expect("the default format holds them");
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn sink_mode_replaces_the_primary() {
        let dir = temp_dir("sink");
        write_certs(&dir);
        let without_primary = VALID.replace("primary: http://127.0.0.1:9000\n", "");
        let c =
            AgentConfig::from_yaml(&format!("{without_primary}sink: {{}}\n"), &dir).expect("valid");
        assert!(c.primary.is_none());
        assert_eq!(
            c.sink,
            Some(SinkConfig {
                strip_host_suffix: "-shadow".into()
            })
        );
        let c = AgentConfig::from_yaml(
            &format!("{without_primary}sink: {{ strip_host_suffix: \"\" }}\n"),
            &dir,
        )
        .expect("valid");
        assert_eq!(c.sink.expect("sink").strip_host_suffix, "");

        let err = AgentConfig::from_yaml(&format!("{VALID}sink: {{}}\n"), &dir).expect_err("both");
        let text = err.to_string();
        assert!(
            text.contains("primary: cannot be used with `sink:`"),
            "{text}"
        );
        let err = AgentConfig::from_yaml(
            &format!("{without_primary}sink: {{ strip_host_suffix: \"a b\", extra: 1 }}\n"),
            &dir,
        )
        .expect_err("bad sink");
        let text = err.to_string();
        assert!(
            text.contains("sink.strip_host_suffix: may not hold"),
            "{text}"
        );
        assert!(text.contains("sink.extra: unknown key"), "{text}");
        let err = AgentConfig::from_yaml(&without_primary, &dir).expect_err("neither");
        assert!(err.to_string().contains("or add `sink: {}`"), "{err}");
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn capture_response_is_read_and_its_problems_are_named() {
        let dir = temp_dir("capture");
        write_certs(&dir);
        let c = AgentConfig::from_yaml(VALID, &dir).expect("valid");
        assert!(c.mirror.policy.capture_response.is_none(), "off by default");
        let on = VALID.replace(
            "  queue: 100\n",
            "  queue: 100\n  capture_response:\n    enabled: true\n    redact_headers: [x-session]\n",
        );
        let c = AgentConfig::from_yaml(&on, &dir).expect("valid");
        let capture = c.mirror.policy.capture_response.expect("on");
        assert_eq!(
            *capture,
            crate::policy::CaptureResponse {
                max_body_bytes: 1024 * 1024,
                wait: std::time::Duration::from_secs(30),
                redact_headers: vec![http::HeaderName::from_static("x-session")],
            }
        );
        let off = VALID.replace(
            "  queue: 100\n",
            "  queue: 100\n  capture_response: { enabled: false, wait: 1s }\n",
        );
        let c = AgentConfig::from_yaml(&off, &dir).expect("valid");
        assert!(c.mirror.policy.capture_response.is_none());

        let bad = VALID.replace(
            "  queue: 100\n",
            "  queue: 100\n  queue_bytes: 2MiB\n  capture_response: { enabled: true, max_body_bytes: 8MiB, wait: 1ms, redact_headers: [\"a b\"], more: 1 }\n",
        );
        let text = AgentConfig::from_yaml(&bad, &dir)
            .expect_err("bad")
            .to_string();
        for want in [
            "mirror.capture_response.max_body_bytes: must be at most 4MiB",
            "mirror.capture_response.wait: must be from 100ms to 10m",
            "mirror.capture_response.redact_headers[0]: is not a header name",
            "mirror.capture_response.more: unknown key",
        ] {
            assert!(text.contains(want), "{want} in {text}");
        }
        let tiny = VALID.replace(
            "  queue: 100\n",
            "  queue: 100\n  capture_response: { enabled: true, max_body_bytes: 10 }\n",
        );
        let text = AgentConfig::from_yaml(&tiny, &dir)
            .expect_err("tiny")
            .to_string();
        assert!(
            text.contains("mirror.capture_response.max_body_bytes: must be at least 1KiB"),
            "{text}"
        );
        let tight = VALID.replace(
            "  queue: 100\n",
            "  queue: 100\n  queue_bytes: 1MiB\n  capture_response: { enabled: true }\n",
        );
        let text = AgentConfig::from_yaml(&tight, &dir)
            .expect_err("queue_bytes")
            .to_string();
        assert!(
            text.contains("mirror.queue_bytes: 1MiB is smaller than max_body_bytes and capture_response.max_body_bytes together (1088KiB)"),
            "{text}"
        );
        let without_primary = on.replace("primary: http://127.0.0.1:9000\n", "");
        let text = AgentConfig::from_yaml(&format!("{without_primary}sink: {{}}\n"), &dir)
            .expect_err("sink")
            .to_string();
        assert!(
            text.contains("mirror.capture_response.enabled: cannot be used with `sink:`"),
            "{text}"
        );
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn spool_is_read_and_its_problems_are_named() {
        let dir = temp_dir("spool");
        write_certs(&dir);
        let with = |spool: &str| {
            VALID.replace("  key: agent.key\n", &format!("  key: agent.key\n{spool}"))
        };
        let c = AgentConfig::from_yaml(&with("  spool: { dir: spool }\n"), &dir).expect("valid");
        let spool = c.gateway.and_then(|g| g.spool).expect("spool");
        assert_eq!(spool.dir, dir.join("spool"));
        assert_eq!(spool.max_bytes, DEFAULT_SPOOL_BYTES);

        std::fs::write(dir.join("a-file"), "").expect("write");
        let err =
            AgentConfig::from_yaml(&with("  spool: { dir: a-file, max_bytes: 10KiB }\n"), &dir)
                .expect_err("invalid");
        let text = err.to_string();
        assert!(
            text.contains("gateway.spool.dir: exists and is not a directory"),
            "{text}"
        );
        assert!(
            text.contains("gateway.spool.max_bytes: must be at least 1MiB (found `10KiB`)"),
            "{text}"
        );
        let err = AgentConfig::from_yaml(&with("  spool: { max_bytes: 1MiB }\n"), &dir)
            .expect_err("invalid");
        assert!(
            err.to_string().contains("gateway.spool.dir: is required"),
            "{err}"
        );
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn listen_tls_is_loaded_and_a_mismatched_key_is_named() {
        let dir = temp_dir("listen-tls");
        write_certs(&dir);
        let ca = teeway_wire::pki::CertificateAuthority::generate("ingress").expect("ca");
        let a = ca.gateway(&[]).expect("leaf");
        let b = ca.gateway(&[]).expect("leaf");
        std::fs::write(dir.join("tls.pem"), &a.cert_pem).expect("write");
        std::fs::write(dir.join("tls.key"), &a.key_pem).expect("write");
        std::fs::write(dir.join("other.key"), &b.key_pem).expect("write");
        let with = |tls: &str| format!("{VALID}listen_tls: {tls}\n");
        let c =
            AgentConfig::from_yaml(&with("{ cert: tls.pem, key: tls.key }"), &dir).expect("valid");
        let tls = c.listen_tls.expect("listen_tls");
        assert_eq!(
            tls.config.alpn_protocols,
            [b"h2".to_vec(), b"http/1.1".to_vec()]
        );

        let err = AgentConfig::from_yaml(&with("{ cert: tls.pem, key: other.key }"), &dir)
            .expect_err("mismatched");
        let text = err.to_string();
        assert!(
            text.contains("listen_tls.cert: the certificate and key do not fit together"),
            "{text}"
        );
        let err =
            AgentConfig::from_yaml(&with("{ cert: missing.pem }"), &dir).expect_err("missing");
        let text = err.to_string();
        assert!(text.contains("listen_tls.cert: cannot be read"), "{text}");
        assert!(text.contains("listen_tls.key: is required"), "{text}");
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn missing_sections_are_named() {
        let err = AgentConfig::from_yaml("cluster: c\n", Path::new(".")).expect_err("invalid");
        let text = err.to_string();
        assert!(text.contains("listen: is required"), "{text}");
        assert!(text.contains("primary: is required"), "{text}");
        assert!(text.contains("gateway: is required"), "{text}");
    }
}
