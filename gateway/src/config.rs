//! The gateway's configuration (`gateway.yaml`), read and validated in full before any port is
//! bound. The README's configuration reference documents every key.

pub use crate::budget::Limits;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, HeaderValue};

use teeway_archive::ArchiveConfig;
use teeway_runtime::config::{
    self as cfg, ConfigError, HttpTarget, Problems, Section, UpstreamProtocol, UpstreamTlsConfig,
};
use teeway_runtime::matching::RequestMatch;
use teeway_runtime::yaml::Value;
use teeway_wire::tls::{Role, TlsMaterial};
use teeway_wire::RpcProtocol;

/// Default time one replay (request sent, response read to the end) may take.
pub const DEFAULT_REPLAY_TIMEOUT: Duration = Duration::from_secs(10);
/// Default replays in flight per target; beyond it (and a short, bounded wait for a slot) copies
/// are dropped as `overloaded` so a slow shadow never makes the gateway hoard.
pub const DEFAULT_MAX_CONCURRENCY: usize = 256;
/// Default time allowed, on SIGTERM, for replays in flight to finish.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A validated gateway configuration.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Address agents connect to: UDP for QUIC and, on the same port, TCP for TLS.
    pub listen: SocketAddr,
    /// Which transports are served on `listen`.
    pub transports: Transports,
    /// CA that agents' certificates must chain to, and the gateway's own certificate and key.
    pub tls: TlsMaterial,
    /// The files `tls` was read from (watched: a change reloads them).
    pub tls_files: [PathBuf; 3],
    /// Agent identities (from the certificate SAN) allowed to connect; `None` allows every
    /// certificate the CA signed.
    pub agents_allow: Option<Vec<String>>,
    /// Routes, first match wins. Empty only when `archive` is set (a capture-only gateway).
    pub routes: Vec<RouteConfig>,
    /// Where the agents' TCP tee streams are replayed, by the agent listener's name.
    pub tcp_routes: Vec<TcpRouteConfig>,
    /// Where the agents' RPC copies (agent `rpc:` listeners) are replayed, first match wins.
    pub rpc_routes: Vec<RpcRouteConfig>,
    /// Where received records are archived, if anywhere.
    pub archive: Option<ArchiveConfig>,
    /// The admin listener, if any.
    pub admin: Option<SocketAddr>,
    /// Time allowed to drain on SIGTERM.
    pub shutdown_grace: Duration,
    /// What agents may make the gateway hold (`limits:`).
    pub limits: Limits,
}

/// `transports:`: what the gateway serves on its `listen` port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transports {
    /// QUIC on the UDP port.
    pub quic: bool,
    /// TLS 1.3 over TCP on the TCP port of the same number, for agents whose network blocks UDP.
    pub tls: bool,
}

impl Default for Transports {
    fn default() -> Self {
        Self {
            quic: true,
            tls: true,
        }
    }
}

/// One route.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// `name`, or `routes[i]`.
    pub name: String,
    /// Which records it takes; `None` takes everything.
    pub matcher: Option<RouteMatch>,
    /// Shadow services each matching record is replayed to (fan-out).
    pub targets: Vec<TargetConfig>,
    /// HTTP version spoken to the targets.
    pub protocol: UpstreamProtocol,
    /// What the replayed request looks like.
    pub rewrite: Rewrite,
    /// Whether copies whose body the agent truncated are replayed (default: no, counted as
    /// skipped `truncated`).
    pub replay_truncated: bool,
    /// `compare:`: its targets' answers compared by role (issue 22).
    pub compare: Option<CompareConfig>,
}

/// `routes[].compare`: which of the route's targets plays which role, and how their answers
/// are compared ([`teeway_compare`]).
#[derive(Debug, Clone)]
pub struct CompareConfig {
    /// The new version's target (an index into the route's targets).
    pub candidate: usize,
    /// The last known-good version's answer: a target's, or production's own.
    pub primary: Baseline,
    /// A second instance of the known-good version, whose differences from the primary are
    /// noise; `None`: no noise is learned.
    pub secondary: Option<usize>,
    /// Response headers compared.
    pub headers: Vec<HeaderName>,
    /// JSON fields never compared (and everything inside them).
    pub ignore_fields: Vec<teeway_compare::path::Pattern>,
    /// Values that differ but both match one of these are no difference.
    pub ignore_values: Vec<regex::Regex>,
    /// JSON arrays compared whatever their order.
    pub unordered: Vec<teeway_compare::path::Pattern>,
    /// Endpoint templates tried before identifiers are folded.
    pub endpoints: teeway_compare::endpoint::Templates,
    /// How the candidate's rates are weighed against the noise.
    pub noise: teeway_compare::noise::Thresholds,
    /// Largest response body compared (decoded), and kept per answer meanwhile.
    pub max_body: u64,
    /// Endpoints counted by name; later ones are counted together.
    pub max_endpoints: usize,
    /// Fields counted by name per endpoint.
    pub max_fields: usize,
    /// Samples kept per endpoint and field.
    pub samples: usize,
}

/// Whose answer a compare route takes as the known-good one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Baseline {
    /// One of the route's targets (an index into them).
    Target(usize),
    /// What production answered, carried with the copy (the agent's
    /// `mirror.capture_response`): `primary: production`.
    Production,
}

impl Baseline {
    /// The target it names, if it is one.
    pub fn target(self) -> Option<usize> {
        match self {
            Baseline::Target(i) => Some(i),
            Baseline::Production => None,
        }
    }
}

/// Default `compare.max_body`.
pub const DEFAULT_COMPARE_MAX_BODY: u64 = 1024 * 1024;
/// Default `compare.max_endpoints`.
pub const DEFAULT_COMPARE_MAX_ENDPOINTS: usize = 200;
/// Default `compare.max_fields`.
pub const DEFAULT_COMPARE_MAX_FIELDS: usize = 64;
/// Default `compare.samples`.
pub const DEFAULT_COMPARE_SAMPLES: usize = 3;

/// One `tcp_routes[i]` entry: where the TCP tee streams of one agent listener are replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpRouteConfig {
    /// The agent `tcp:` listener name whose streams it takes.
    pub listener: String,
    /// Agent identities it takes (patterns); empty: every agent.
    pub source_clusters: Vec<String>,
    /// Shadow `host:port` addresses each stream is replayed to, on a fresh connection each.
    pub targets: Vec<(String, u16)>,
    /// Replay connections open at once per target; beyond it streams are refused for that
    /// target as `overloaded`.
    pub max_connections: usize,
}

/// One `rpc_routes[i]` entry: where RPC copies (one request each) are replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcRouteConfig {
    /// `name`, or `rpc_routes[i]`: labels its metrics.
    pub name: String,
    /// The protocol its targets speak; copies of another protocol do not match it.
    pub protocol: RpcProtocol,
    /// `match.listener`: the agent `rpc:` listener (tap) the copy came from; `None`: any.
    pub listener: Option<String>,
    /// `match.source_cluster`: agent identities (patterns); empty: every agent.
    pub source_clusters: Vec<String>,
    /// `match.service`: services taken; empty: any.
    pub services: Vec<String>,
    /// `match.method`: methods taken (Redis commands, in any case); empty: any.
    pub methods: Vec<String>,
    /// Shadow `host:port` addresses each matching copy is replayed to.
    pub targets: Vec<(String, u16)>,
    /// Time for one replay, its reply read whole.
    pub timeout: Duration,
    /// Replays in flight per target (pipelined on its connections); beyond it, or beyond
    /// [`RPC_TARGET_BYTES`] of their messages, copies are `overloaded`.
    pub max_concurrency: usize,
    /// Connections kept open to each target, requests pipelined on them.
    pub connections: usize,
    /// Methods a target counts under their own `method` label; later ones count as `other`.
    pub method_labels: usize,
}

impl RpcRouteConfig {
    /// A route named `name` taking every copy of `protocol` to `targets`, with the defaults.
    pub fn new(name: &str, protocol: RpcProtocol, targets: Vec<(String, u16)>) -> Self {
        Self {
            name: name.to_owned(),
            protocol,
            listener: None,
            source_clusters: Vec::new(),
            services: Vec::new(),
            methods: Vec::new(),
            targets,
            timeout: DEFAULT_RPC_TIMEOUT,
            max_concurrency: DEFAULT_RPC_MAX_CONCURRENCY,
            connections: DEFAULT_RPC_CONNECTIONS,
            method_labels: DEFAULT_RPC_METHOD_LABELS,
        }
    }
}

/// Default `rpc_routes[].max_concurrency`: pipelined requests are cheap to keep in flight (about
/// 200 bytes each beside their message), and a shadow taking 300,000 pipelined commands a second
/// (bench scenario 28) has as many in flight as it answers in 25 ms; with 8,192 it shed 0.3%.
pub const DEFAULT_RPC_MAX_CONCURRENCY: usize = 32_768;
/// Bytes of messages in flight per RPC target, whatever their count: what bounds their memory.
pub const RPC_TARGET_BYTES: u64 = 32 * 1024 * 1024;
/// Default `rpc_routes[].timeout`.
pub const DEFAULT_RPC_TIMEOUT: Duration = Duration::from_secs(5);
/// Default `rpc_routes[].connections`.
pub const DEFAULT_RPC_CONNECTIONS: usize = 4;
/// Default `rpc_routes[].method_labels`: enough for a service's methods or an application's
/// Redis commands; a client sending random names still makes at most this many series.
pub const DEFAULT_RPC_METHOD_LABELS: usize = 64;

/// Default `tcp_routes[].max_connections`.
pub const DEFAULT_TCP_MAX_CONNECTIONS: usize = 256;
/// Upper bound on `tcp_routes[].max_connections`: each connection holds a buffer.
const MAX_TCP_MAX_CONNECTIONS: u64 = 65_536;

/// One target of a route.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetConfig {
    /// Where.
    pub target: HttpTarget,
    /// How an `https://` target is verified (`tls: { ca, server_name }`); `None` for `http://`.
    pub tls: Option<UpstreamTlsConfig>,
    /// Share of the route's records replayed to it.
    pub percentage: f64,
    /// Time allowed for one replay.
    pub timeout: Duration,
    /// Replays in flight at most; beyond it (and as many records waiting briefly for a slot)
    /// records are dropped as `overloaded`.
    pub max_concurrency: usize,
    /// Replays started per second at most; beyond it records are dropped as `rate_limited`.
    pub rate_limit: Option<RateLimit>,
}

impl TargetConfig {
    /// A target with the defaults: everything, default timeout and concurrency, no rate limit.
    pub fn new(target: HttpTarget) -> Self {
        Self {
            target,
            tls: None,
            percentage: 100.0,
            timeout: DEFAULT_REPLAY_TIMEOUT,
            max_concurrency: DEFAULT_MAX_CONCURRENCY,
            rate_limit: None,
        }
    }
}

/// A token bucket: `per_second` tokens a second, holding at most `burst`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Sustained rate.
    pub per_second: f64,
    /// Largest burst.
    pub burst: u32,
}

/// `match:` of a route. Every condition given must hold.
#[derive(Debug, Clone, Default)]
pub struct RouteMatch {
    /// Agent identities (from the client certificate) the route takes; empty takes any.
    /// Exact names, or a prefix ending in `*` (`prod-*`).
    pub source_clusters: Vec<String>,
    /// Host, path, methods and headers of the request.
    pub request: RequestMatch,
}

/// How a route changes the replayed request.
#[derive(Debug, Clone, PartialEq)]
pub struct Rewrite {
    /// The Host the shadow sees.
    pub host: HostPolicy,
    /// The matched path prefix and what replaces it.
    pub path_prefix: Option<(String, String)>,
    /// Headers set (replacing any value).
    pub set_headers: Vec<(HeaderName, HeaderValue)>,
    /// Headers removed.
    pub remove_headers: Vec<HeaderName>,
    /// Header added with the source cluster as value, so shadows recognise mirrored traffic;
    /// `None` adds nothing.
    pub marker: Option<HeaderName>,
    /// An HTTP/1.0 record goes out as HTTP/1.0. Off for live copies: the agent sent the primary
    /// HTTP/1.1, so the shadow gets that too; on for `teeway replay`, where the record is what a
    /// capture saw on the wire.
    pub keep_http10: bool,
}

impl Rewrite {
    /// Only a Host policy (what `teeway replay --host-header` asks for): no marker, and each
    /// record's HTTP/1.0 kept.
    pub fn host_only(host: HostPolicy) -> Self {
        Self {
            host,
            path_prefix: None,
            set_headers: Vec::new(),
            remove_headers: Vec::new(),
            marker: None,
            keep_http10: true,
        }
    }
}

/// Default name of the header that marks a replayed request.
pub const DEFAULT_MARKER_HEADER: &str = "x-teeway-mirror";

/// The Host a shadow sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPolicy {
    /// The original request's Host (default): shadows see what the primary saw.
    Keep,
    /// The target's own `host:port`, for shadows behind virtual hosting.
    Target,
    /// The original Host with `-shadow` appended to its name, as Envoy and Istio do.
    AppendShadow,
    /// This Host, whatever the original was.
    Literal(String),
}

impl HostPolicy {
    fn parse(value: &Value) -> Result<Self, String> {
        match cfg::string(value)?.as_str() {
            "keep" => Ok(HostPolicy::Keep),
            "target" => Ok(HostPolicy::Target),
            "append-shadow" => Ok(HostPolicy::AppendShadow),
            literal => {
                if literal.is_empty()
                    || literal.contains(['/', ' ', '?', '#', '@'])
                    || literal.parse::<http::uri::Authority>().is_err()
                {
                    return Err("is not a host policy or a host[:port]".into());
                }
                Ok(HostPolicy::Literal(literal.to_owned()))
            }
        }
    }
}

/// Whether `agents.allow` (`None`: every agent) names `identity`.
pub fn allowed(allow: Option<&[String]>, identity: &str) -> bool {
    allow.is_none_or(|allow| allow.iter().any(|p| identity_matches(p, identity)))
}

/// Whether `identity` is named by `pattern`: equal, or `pattern` ends in `*` and `identity`
/// starts with what precedes it.
pub fn identity_matches(pattern: &str, identity: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => identity.starts_with(prefix),
        None => pattern == identity,
    }
}

impl GatewayConfig {
    /// Reads and validates `text`; relative file paths are taken from `base_dir`.
    pub fn from_yaml(text: &str, base_dir: &Path) -> Result<Self, ConfigError> {
        let doc = teeway_runtime::yaml::parse(text).map_err(|e| {
            ConfigError::unreadable("gateway config", e.to_string(), "fix the YAML syntax")
        })?;
        let mut p = Problems::default();
        let mut root = Section::root(&doc, &mut p);

        let listen = root.required(
            &mut p,
            "listen",
            "give the address agents connect to, for example `listen: 0.0.0.0:4433` (UDP for QUIC, TCP for TLS)",
            cfg::socket_addr,
        );
        let transports_fix =
            "list one or both of quic and tls, for example `transports: [quic, tls]`";
        let transports = root
            .list(
                &mut p,
                "transports",
                transports_fix,
                |v| match cfg::string(v)?.as_str() {
                    "quic" => Ok(Transports {
                        quic: true,
                        tls: false,
                    }),
                    "tls" => Ok(Transports {
                        quic: false,
                        tls: true,
                    }),
                    other => Err(format!("`{other}` is not a transport")),
                },
            )
            .map(|list| {
                list.iter().fold(
                    Transports {
                        quic: false,
                        tls: false,
                    },
                    |acc, t| Transports {
                        quic: acc.quic || t.quic,
                        tls: acc.tls || t.tls,
                    },
                )
            });
        if transports.is_some_and(|t| !t.quic && !t.tls) {
            p.push("transports", None, "is empty", transports_fix);
        }
        let transports = transports.unwrap_or_default();

        let mut t = root.section(&mut p, "tls");
        if !t.is_present() {
            p.push(
                "tls",
                None,
                "is required",
                "add a `tls:` block with ca, cert and key",
            );
        }
        let read = cfg::readable_file(base_dir);
        let ca = t.required(
            &mut p,
            "ca",
            "give the PEM file of the CA that signs agent certificates",
            &read,
        );
        let cert = t.required(
            &mut p,
            "cert",
            "give the PEM file of the gateway's certificate (see `teeway certs init`)",
            &read,
        );
        let key = t.required(
            &mut p,
            "key",
            "give the PEM file of the gateway's private key",
            &read,
        );
        let tls = match (ca, cert, key) {
            (Some(ca), Some(cert), Some(key)) => {
                TlsMaterial::load_checked(&ca, &cert, &key, Role::Gateway)
                    .map(|material| (material, [ca, cert, key]))
                    .map_err(|e| {
                        p.push(
                            t.path_of("cert"),
                            None,
                            e.to_string(),
                            "give matching PEM files as written by `teeway certs init`",
                        )
                    })
                    .ok()
            }
            _ => None,
        };
        t.finish(&mut p);

        let mut agents = root.section(&mut p, "agents");
        let agents_allow = agents.list(
            &mut p,
            "allow",
            "list agent identities (the DNS name in their certificate), such as [prod-eu-1, prod-us-*]",
            |v| {
                let s = cfg::nonempty_string(v)?;
                if s.trim_end_matches('*').contains('*') {
                    return Err("may hold `*` only at its end".into());
                }
                Ok(s)
            },
        );
        agents.finish(&mut p);

        let archive = ArchiveConfig::from_section(&mut root, &mut p, base_dir, true);
        let archive_given = root_has(&doc, "archive");
        let mut routes = Vec::new();
        let route_sections = root.sections(&mut p, "routes");
        let mut tcp_routes = Vec::new();
        for mut r in root.sections(&mut p, "tcp_routes") {
            if let Some(route) = read_tcp_route(&mut r, &mut p) {
                tcp_routes.push(route);
            }
            r.finish(&mut p);
        }
        let mut rpc_routes = Vec::new();
        let mut rpc_names = Vec::new();
        for (i, mut r) in root.sections(&mut p, "rpc_routes").into_iter().enumerate() {
            if let Some(route) = read_rpc_route(&mut r, &mut p, i, &mut rpc_names) {
                rpc_routes.push(route);
            }
            r.finish(&mut p);
        }
        if route_sections.is_empty()
            && !archive_given
            && !root_has(&doc, "tcp_routes")
            && !root_has(&doc, "rpc_routes")
        {
            p.push(
                "routes",
                None,
                "needs at least one route (or `tcp_routes:` or `rpc_routes:`, or an `archive:` block, for a capture-only gateway)",
                "add `routes:` with `- targets: [http://shadow:8080]` to replay everything to one shadow",
            );
        }
        let mut catch_all_at: Option<String> = None;
        for mut r in route_sections {
            if let Some(route) = read_route(&mut r, &mut p, &mut catch_all_at, base_dir) {
                routes.push(route);
            }
            r.finish(&mut p);
        }

        let mut a = root.section(&mut p, "admin");
        let admin = a.optional(
            &mut p,
            "listen",
            "give an ip:port such as 127.0.0.1:9902",
            cfg::socket_addr,
        );
        a.finish(&mut p);
        if let (Some(listen), Some(admin)) = (listen, admin) {
            // The TLS-over-TCP transport listens on `listen`'s port too.
            if transports.tls && cfg::addresses_clash(listen, admin) {
                p.push(
                    "admin.listen",
                    None,
                    format!("is the address agents connect to (`listen: {listen}`, UDP for QUIC and TCP for TLS)"),
                    "give the admin listener its own port, such as 9902",
                );
            }
        }
        let shutdown_grace = root
            .optional(
                &mut p,
                "shutdown_grace",
                "use a duration such as 10s",
                cfg::duration,
            )
            .unwrap_or(DEFAULT_SHUTDOWN_GRACE);
        let limits = limits_block(&mut root, &mut p);
        root.finish(&mut p);

        p.finish(())?;
        match (listen, tls) {
            (Some(listen), Some((tls, tls_files))) => Ok(GatewayConfig {
                listen,
                transports,
                tls,
                tls_files,
                agents_allow,
                routes,
                tcp_routes,
                rpc_routes,
                archive,
                admin,
                shutdown_grace,
                limits,
            }),
            _ => Err(ConfigError::unreadable(
                "gateway config",
                "incomplete configuration",
                "report this as a bug",
            )),
        }
    }

    /// Reads and validates a gateway configuration file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = cfg::read_file(path)?;
        // Relative paths inside the file are taken from the working directory, as the shell takes
        // the path of the file itself.
        Self::from_yaml(&text, Path::new(".")).map_err(|e| e.in_file(&path.display().to_string()))
    }
}

/// One `tcp_routes[i]` entry; `None` when it cannot be used (the problems are recorded).
fn read_tcp_route(r: &mut Section<'_>, p: &mut Problems) -> Option<TcpRouteConfig> {
    let listener = r.required(
        p,
        "listener",
        "name the agent's `tcp:` listener whose connections this takes, such as `listener: redis`",
        cfg::nonempty_string,
    );
    let source_clusters = r
        .list(
            p,
            "source_cluster",
            "list agent identities, such as [prod-eu-1] or [prod-*]",
            cfg::nonempty_string,
        )
        .unwrap_or_default();
    let targets_fix = "list shadow addresses as host:port, such as [shadow-redis:6379]";
    let targets = r.list(p, "targets", targets_fix, cfg::host_port);
    let targets = match targets {
        Some(t) if !t.is_empty() => Some(t),
        Some(_) => {
            p.push(r.path_of("targets"), None, "is empty", targets_fix);
            None
        }
        None => {
            p.push(r.path_of("targets"), None, "is required", targets_fix);
            None
        }
    };
    let max_connections = r
        .optional(
            p,
            "max_connections",
            "use a whole number from 1 to 65536, such as 256",
            |v| match cfg::whole_number(v)? {
                0 => Err("must be at least 1".into()),
                n if n > MAX_TCP_MAX_CONNECTIONS => {
                    Err(format!("must be at most {MAX_TCP_MAX_CONNECTIONS}"))
                }
                n => Ok(n as usize),
            },
        )
        .unwrap_or(DEFAULT_TCP_MAX_CONNECTIONS);
    Some(TcpRouteConfig {
        listener: listener?,
        source_clusters,
        targets: targets?,
        max_connections,
    })
}

/// One `rpc_routes[i]` entry (`names`: those of the entries before it, to which it adds its
/// own); `None` when it cannot be used (the problems are recorded).
fn read_rpc_route(
    r: &mut Section<'_>,
    p: &mut Problems,
    i: usize,
    names: &mut Vec<String>,
) -> Option<RpcRouteConfig> {
    let name = r
        .optional(
            p,
            "name",
            "give a short name such as redis-shadow",
            cfg::nonempty_string,
        )
        .unwrap_or_else(|| format!("rpc_routes[{i}]"));
    if names.contains(&name) {
        p.push(
            r.path_of("name"),
            None,
            format!("`{name}` names an earlier rpc route too"),
            "give each rpc route its own name (it labels the route's metrics)",
        );
    }
    names.push(name.clone());
    let protocol = r.required(
        p,
        "protocol",
        "use `protocol: redis`, `thrift` or `dubbo`, what the targets speak",
        |v| {
            RpcProtocol::named(&cfg::string(v)?)
                .ok_or_else(|| "is not a protocol teeway replays per request".into())
        },
    );
    let mut m = r.section(p, "match");
    let listener = m.optional(
        p,
        "listener",
        "name the agent's `rpc:` listener, such as `listener: redis`",
        cfg::nonempty_string,
    );
    let strings = |m: &mut Section<'_>, p: &mut Problems, key, fix| {
        m.list(p, key, fix, cfg::nonempty_string)
            .unwrap_or_default()
    };
    let source_clusters = strings(
        &mut m,
        p,
        "source_cluster",
        "list agent identities, such as [prod-eu-1] or [prod-*]",
    );
    let services = strings(
        &mut m,
        p,
        "service",
        "list services, such as [orders.OrderService]",
    );
    let methods = strings(
        &mut m,
        p,
        "method",
        "list methods or commands, such as [SET, DEL]",
    );
    m.finish(p);
    let targets_fix = "list shadow addresses as host:port, such as [shadow-redis:6379]";
    let targets = match r.list(p, "targets", targets_fix, cfg::host_port) {
        Some(t) if !t.is_empty() => Some(t),
        Some(_) => {
            p.push(r.path_of("targets"), None, "is empty", targets_fix);
            None
        }
        None => {
            p.push(r.path_of("targets"), None, "is required", targets_fix);
            None
        }
    };
    let timeout = r
        .optional(
            p,
            "timeout",
            "use a duration from 1ms to 5m, such as 5s",
            cfg::duration_from_to("1ms", "5m"),
        )
        .unwrap_or(DEFAULT_RPC_TIMEOUT);
    let max_concurrency = r
        .optional(
            p,
            "max_concurrency",
            "use a whole number from 1 to 65536, such as 32768",
            cfg::whole_number_from_to(1, 65_536),
        )
        .map_or(DEFAULT_RPC_MAX_CONCURRENCY, |n| n as usize);
    let connections = r
        .optional(
            p,
            "connections",
            "use a whole number from 1 to 64, such as 4",
            cfg::whole_number_from_to(1, 64),
        )
        .map_or(DEFAULT_RPC_CONNECTIONS, |n| n as usize);
    let method_labels = r
        .optional(
            p,
            "method_labels",
            "use a whole number from 0 to 1024, such as 64 (0 counts every method as `other`)",
            cfg::whole_number_from_to(0, 1024),
        )
        .map_or(DEFAULT_RPC_METHOD_LABELS, |n| n as usize);
    Some(RpcRouteConfig {
        name,
        protocol: protocol?,
        listener,
        source_clusters,
        services,
        methods,
        targets: targets?,
        timeout,
        max_concurrency,
        connections,
        method_labels,
    })
}

/// One `routes[i]` entry; `None` when it cannot be used (the problems are recorded).
fn read_route(
    r: &mut Section<'_>,
    p: &mut Problems,
    catch_all_at: &mut Option<String>,
    base_dir: &Path,
) -> Option<RouteConfig> {
    if let Some(earlier) = catch_all_at.as_ref() {
        p.push(
            r.path_of("match"),
            None,
            format!("this route is never used: {earlier} has no `match` and takes everything"),
            "move the route without `match` to the end of the list",
        );
    }
    let name = r
        .optional(
            p,
            "name",
            "give a short name such as orders",
            cfg::nonempty_string,
        )
        .unwrap_or_else(|| r.path().to_owned());
    let matcher = route_match(r, p, catch_all_at);
    let targets = route_targets(r, p, base_dir);
    let host = r
        .optional(
            p,
            "host_header",
            "use keep, target, append-shadow, or a host[:port] such as orders.test.internal",
            HostPolicy::parse,
        )
        .unwrap_or(HostPolicy::Keep);
    let protocol = r
        .optional(
            p,
            "protocol",
            "use http1 (default), http2 (h2c) or auto (the original request's version; for gRPC)",
            cfg::upstream_protocol,
        )
        .unwrap_or(UpstreamProtocol::Http1);
    let rewrite_prefix = r.optional(
        p,
        "rewrite_path_prefix",
        "give the prefix that replaces match.path_prefix, such as /v2",
        |v| {
            let s = cfg::nonempty_string(v)?;
            if !s.starts_with('/') {
                return Err("must start with /".into());
            }
            Ok(s)
        },
    );
    let path_prefix = match (
        rewrite_prefix,
        matcher.as_ref().and_then(|m| m.request.path_prefix()),
    ) {
        (Some(to), Some(from)) => Some((from.to_owned(), to)),
        (Some(_), None) => {
            p.push(
                r.path_of("rewrite_path_prefix"),
                None,
                "needs match.path_prefix (the part it replaces)",
                "add `path_prefix:` to the route's match, or remove rewrite_path_prefix",
            );
            None
        }
        (None, _) => None,
    };
    let set_headers = set_headers(r, p);
    let remove_headers = r
        .list(
            p,
            "remove_headers",
            "list header names such as [x-debug]",
            header_name,
        )
        .unwrap_or_default();
    let marker = r
        .optional(
            p,
            "mirror_header",
            "give a header name such as x-teeway-mirror, or false for none",
            |v| match v {
                Value::Bool(false) => Ok(None),
                other => header_name(other).map(Some),
            },
        )
        .unwrap_or_else(|| Some(HeaderName::from_static(DEFAULT_MARKER_HEADER)));
    let replay_truncated = r
        .optional(p, "replay_truncated", "use true or false", cfg::boolean)
        .unwrap_or(false);
    let urls: Vec<&str> = targets.iter().map(|t| t.target.url.as_str()).collect();
    let compare = compare_block(r, p, &urls);
    Some(RouteConfig {
        name,
        matcher,
        targets,
        protocol,
        rewrite: Rewrite {
            host,
            path_prefix,
            set_headers,
            remove_headers,
            marker,
            keep_http10: false,
        },
        replay_truncated,
        compare,
    })
}

/// A `compare:` block read alone (`teeway diff` makes one of its options), its roles checked
/// against `urls`, the targets it may name; problems are named under `compare.`.
pub fn compare_config(block: &Value, urls: &[&str]) -> Result<CompareConfig, ConfigError> {
    let mut root = teeway_runtime::yaml::Mapping::new();
    root.insert(Value::from("compare"), block.clone());
    let root = Value::Mapping(root);
    let mut p = Problems::default();
    let mut r = Section::root(&root, &mut p);
    let compare = compare_block(&mut r, &mut p, urls);
    r.finish(&mut p);
    let compare = p.finish(compare)?;
    compare.ok_or_else(|| {
        ConfigError::unreadable("compare", "is not a mapping", "report this as a bug")
    })
}

/// A route's `compare:` block, its roles checked against the URLs of the route's targets.
fn compare_block(r: &mut Section<'_>, p: &mut Problems, urls: &[&str]) -> Option<CompareConfig> {
    let mut c = r.section(p, "compare");
    if !c.is_present() {
        return None;
    }
    let fix = format!(
        "name one of the route's targets by its URL: {}",
        urls.join(", ")
    );
    let primary_fix = format!("{fix}, or production (what production answered, which agents with mirror.capture_response send)");
    let role = |c: &mut Section<'_>, p: &mut Problems, key: &'static str, required: bool| {
        let fix = if key == "primary" { &primary_fix } else { &fix };
        let url = if required {
            c.required(p, key, fix, cfg::nonempty_string)
        } else {
            c.optional(p, key, fix, cfg::nonempty_string)
        }?;
        let url = url.trim_end_matches('/');
        let at = urls.iter().position(|u| *u == url);
        if at.is_none() && !urls.is_empty() {
            p.push(
                c.path_of(key),
                Some(&Value::from(url)),
                "is not one of the route's targets",
                fix,
            );
        }
        at
    };
    let candidate = role(&mut c, p, "candidate", true);
    // Production's own answer, which agents with `mirror.capture_response` send.
    let production = c
        .get("primary")
        .is_some_and(|v| v.as_str().is_some_and(|s| s.trim() == "production"));
    let primary = if production {
        Some(Baseline::Production)
    } else {
        role(&mut c, p, "primary", true).map(Baseline::Target)
    };
    let secondary = role(&mut c, p, "secondary", false);
    let roles = [
        ("candidate", candidate),
        ("primary", primary.and_then(Baseline::target)),
        ("secondary", secondary),
    ];
    for (i, (role, at)) in roles.iter().enumerate() {
        let Some(at) = at else { continue };
        if let Some((earlier, _)) = roles[..i].iter().find(|(_, a)| *a == Some(*at)) {
            p.push(
                c.path_of(role),
                Some(&Value::from(urls[*at])),
                format!("is the {earlier}'s target too"),
                "give candidate, primary and secondary a target each (the secondary is a second instance of the primary's version)",
            );
        }
    }
    let headers = c
        .list(
            p,
            "headers",
            "list response header names such as [content-type, cache-control]",
            header_name,
        )
        .unwrap_or_else(|| vec![http::header::CONTENT_TYPE]);
    let pattern = |v: &Value| teeway_compare::path::Pattern::parse(&cfg::nonempty_string(v)?);
    let mut ignore = c.section(p, "ignore");
    let ignore_fields = ignore
        .list(
            p,
            "fields",
            "list JSON fields such as [/meta/request_id, /items/*/updated_at]",
            pattern,
        )
        .unwrap_or_default();
    let ignore_values = ignore
        .list(
            p,
            "values",
            "list regular expressions such as ['^\\d{4}-\\d\\d-\\d\\dT'] (values that both match are no difference)",
            |v| {
                regex::Regex::new(&cfg::nonempty_string(v)?).map_err(|e| {
                    let why = e.to_string();
                    let last = why.lines().last().unwrap_or_default().trim_start_matches("error: ");
                    format!("is not a regular expression ({last})")
                })
            },
        )
        .unwrap_or_default();
    ignore.finish(p);
    let unordered = c
        .list(
            p,
            "unordered",
            "list JSON arrays compared in any order, such as [/tags]",
            pattern,
        )
        .unwrap_or_default();
    let endpoints = c
        .list(
            p,
            "endpoints",
            "list templates such as [\"GET /users/{id}\", /orders/{order}]",
            cfg::nonempty_string,
        )
        .unwrap_or_default();
    // Each template on its own, so that every bad one is named.
    let good: Vec<&String> = endpoints
        .iter()
        .enumerate()
        .filter(
            |(i, t)| match teeway_compare::endpoint::Templates::parse(&[t]) {
                Ok(_) => true,
                Err(e) => {
                    p.push(
                        format!("{}[{i}]", c.path_of("endpoints")),
                        None,
                        e.to_string(),
                        "give templates such as GET /users/{id}",
                    );
                    false
                }
            },
        )
        .map(|(_, t)| t)
        .collect();
    let endpoints = teeway_compare::endpoint::Templates::parse(&good).unwrap_or_default();
    let mut n = c.section(p, "noise");
    let defaults = teeway_compare::noise::Thresholds::default();
    let share = |v: &Value| cfg::percentage(v).map(|x| x / 100.0);
    let relative = n
        .optional(p, "relative", "give a percentage such as 20%", |v| {
            cfg::number(v).and_then(|x| {
                if x < 0.0 {
                    Err("must be 0 or more".into())
                } else {
                    Ok(x / 100.0)
                }
            })
        })
        .unwrap_or(defaults.relative);
    let absolute = n
        .optional(p, "absolute", "give a percentage such as 1%", share)
        .unwrap_or(defaults.absolute);
    n.finish(p);
    let max_body = c
        .optional(
            p,
            "max_body",
            "give a size from 1KiB to 16MiB, such as 1MiB",
            |v| {
                let n = cfg::size(v)?;
                if (1024..=16 * 1024 * 1024).contains(&n) {
                    Ok(n)
                } else {
                    Err("must be from 1KiB to 16MiB".into())
                }
            },
        )
        .unwrap_or(DEFAULT_COMPARE_MAX_BODY);
    let count = |c: &mut Section<'_>,
                 p: &mut Problems,
                 key: &'static str,
                 (min, max): (u64, u64),
                 default: usize| {
        c.optional(
            p,
            key,
            &format!("use a whole number from {min} to {max}"),
            cfg::whole_number_from_to(min, max),
        )
        .map_or(default, |n| n as usize)
    };
    let max_endpoints = count(
        &mut c,
        p,
        "max_endpoints",
        (1, 10_000),
        DEFAULT_COMPARE_MAX_ENDPOINTS,
    );
    let max_fields = count(
        &mut c,
        p,
        "max_fields",
        (1, 1_000),
        DEFAULT_COMPARE_MAX_FIELDS,
    );
    // 0: none kept (samples show request and answer bodies on the admin port).
    let samples = count(&mut c, p, "samples", (0, 20), DEFAULT_COMPARE_SAMPLES);
    c.finish(p);
    Some(CompareConfig {
        candidate: candidate?,
        primary: primary?,
        secondary,
        headers,
        ignore_fields,
        ignore_values,
        unordered,
        endpoints,
        noise: teeway_compare::noise::Thresholds { relative, absolute },
        max_body,
        max_endpoints,
        max_fields,
        samples,
    })
}

/// A route's `match:`; `None` (and noted in `catch_all_at`) when it has none and takes all.
fn route_match(
    r: &mut Section<'_>,
    p: &mut Problems,
    catch_all_at: &mut Option<String>,
) -> Option<RouteMatch> {
    let mut m = r.section(p, "match");
    let matcher = if m.is_present() {
        let source_clusters = m
            .list(
                p,
                "source_cluster",
                "list agent identities, such as [prod-eu-1] or [prod-*]",
                cfg::nonempty_string,
            )
            .unwrap_or_default();
        let request = RequestMatch::read(&mut m, p);
        Some(RouteMatch {
            source_clusters,
            request,
        })
    } else {
        *catch_all_at = Some(r.path().to_owned());
        None
    };
    m.finish(p);

    matcher
}

/// A route's `targets:`, each with the route-wide `timeout` and `max_concurrency` unless it says
/// otherwise.
fn route_targets(r: &mut Section<'_>, p: &mut Problems, base_dir: &Path) -> Vec<TargetConfig> {
    // Route-wide defaults for its targets.
    let timeout = r
        .optional(
            p,
            "timeout",
            "use a duration above zero such as 10s",
            cfg::positive_duration,
        )
        .unwrap_or(DEFAULT_REPLAY_TIMEOUT);
    let max_concurrency = r
        .optional(
            p,
            "max_concurrency",
            "use a whole number from 1 to 65536",
            max_concurrency,
        )
        .unwrap_or(DEFAULT_MAX_CONCURRENCY);
    let targets_path = r.path_of("targets");
    let mut targets = Vec::new();
    let items: &[Value] = match r.get("targets") {
        Some(Value::Sequence(items)) => items,
        Some(other) => {
            p.push(
                &targets_path,
                Some(other),
                "must be a list",
                "write `targets: [http://shadow:8080]`",
            );
            &[]
        }
        None => &[],
    };
    for (i, item) in items.iter().enumerate() {
        let path = format!("{targets_path}[{i}]");
        if let Some(t) = read_target(item, &path, p, timeout, max_concurrency, base_dir) {
            targets.push(t);
        }
    }
    if items.is_empty() {
        p.push(
            targets_path,
            None,
            "needs at least one target",
            "add `targets: [http://shadow:8080]`",
        );
    }
    targets
}

/// A route's `set_headers: { name: value }`.
fn set_headers(r: &mut Section<'_>, p: &mut Problems) -> Vec<(HeaderName, HeaderValue)> {
    let set_headers_path = r.path_of("set_headers");
    let mut set_headers = Vec::new();
    match r.get("set_headers") {
        None => {}
        Some(Value::Mapping(map)) => {
            for (k, v) in map {
                let name = k
                    .as_str()
                    .and_then(|k| HeaderName::from_bytes(k.as_bytes()).ok());
                let value = cfg::string(v)
                    .ok()
                    .and_then(|v| HeaderValue::from_str(&v).ok());
                match (name, value) {
                    (Some(n), Some(v)) => set_headers.push((n, v)),
                    _ => p.push(
                        &set_headers_path,
                        Some(k),
                        "holds an invalid header name or value",
                        "write `set_headers: { x-env: test }`",
                    ),
                }
            }
        }
        Some(other) => p.push(
            &set_headers_path,
            Some(other),
            "must be a mapping of header name to value",
            "write `set_headers: { x-env: test }`",
        ),
    }
    set_headers
}

fn max_concurrency(v: &Value) -> Result<usize, String> {
    match cfg::whole_number(v)? {
        0 => Err("must be at least 1".into()),
        n if n > 65_536 => Err("must be at most 65536".into()),
        n => Ok(n as usize),
    }
}

fn header_name(v: &Value) -> Result<HeaderName, String> {
    let s = cfg::nonempty_string(v)?;
    HeaderName::from_bytes(s.to_ascii_lowercase().as_bytes())
        .map_err(|_| "is not a valid header name".into())
}

/// `100/s`, `6000/m`, or a bare number per second.
fn rate(v: &Value) -> Result<f64, String> {
    let s = cfg::string(v)?;
    let (n, per) = match s.split_once('/') {
        Some((n, unit)) => (
            n.trim(),
            match unit.trim() {
                "s" => 1.0,
                "m" => 60.0,
                _ => return Err("has a unit other than /s or /m".into()),
            },
        ),
        None => (s.trim(), 1.0),
    };
    let n: f64 = n
        .parse()
        .map_err(|_| "is not a rate such as 100/s".to_owned())?;
    if !(n > 0.0 && n.is_finite()) {
        return Err("must be more than zero".into());
    }
    Ok(n / per)
}

/// One target: a URL, or a mapping with `url` and its own settings.
fn read_target(
    item: &Value,
    path: &str,
    p: &mut Problems,
    timeout: Duration,
    max_conc: usize,
    base_dir: &Path,
) -> Option<TargetConfig> {
    let url_fix = "give an http:// or https://host:port URL of a shadow service";
    if !item.is_mapping() {
        return match cfg::http_target(item) {
            Ok(t) => {
                // An https URL alone trusts the system's CAs and its own host name.
                let tls = if t.tls {
                    Some(cfg::upstream_tls_config(p, path, &t, None, None)?)
                } else {
                    None
                };
                Some(TargetConfig {
                    tls,
                    timeout,
                    max_concurrency: max_conc,
                    ..TargetConfig::new(t)
                })
            }
            Err(message) => {
                p.push(path, Some(item), message, url_fix);
                None
            }
        };
    }
    let mut t = Section::nested(path.to_owned(), item, p);
    let target = t.required(p, "url", url_fix, cfg::http_target);
    let tls = cfg::tls_block(&mut t, p, "tls", base_dir, target.as_ref());
    let percentage = t
        .optional(
            p,
            "percentage",
            "use a number from 0 to 100",
            cfg::percentage,
        )
        .unwrap_or(100.0);
    let timeout = t
        .optional(
            p,
            "timeout",
            "use a duration above zero such as 10s",
            cfg::positive_duration,
        )
        .unwrap_or(timeout);
    let max_concurrency = t
        .optional(
            p,
            "max_concurrency",
            "use a whole number from 1 to 65536",
            max_concurrency,
        )
        .unwrap_or(max_conc);
    let rate_limit = match t.get("rate_limit") {
        None => None,
        Some(Value::Mapping(_)) => {
            let mut rl = t.section(p, "rate_limit");
            let per_second = rl.required(p, "rate", "give a rate such as 100/s", rate);
            let burst = rl.optional(p, "burst", "use a whole number such as 50", |v| {
                match cfg::whole_number(v)? {
                    0 => Err("must be at least 1".to_owned()),
                    n => u32::try_from(n).map_err(|_| "is too large".to_owned()),
                }
            });
            rl.finish(p);
            per_second.map(|per_second| RateLimit {
                per_second,
                burst: burst.unwrap_or_else(|| default_burst(per_second)),
            })
        }
        Some(_) => t
            .optional(p, "rate_limit", "give a rate such as 100/s", rate)
            .map(|per_second| RateLimit {
                per_second,
                burst: default_burst(per_second),
            }),
    };
    t.finish(p);
    Some(TargetConfig {
        target: target?,
        tls,
        percentage,
        timeout,
        max_concurrency,
        rate_limit,
    })
}

/// The `limits:` block: what agents may make the gateway hold. Every key is optional.
fn limits_block(root: &mut Section<'_>, p: &mut Problems) -> crate::budget::Limits {
    use crate::budget::Limits;
    let d = Limits::default();
    let mut l = root.section(p, "limits");
    let size_in = |low: u64, high: u64| {
        move |v: &Value| -> Result<u64, String> {
            let n = cfg::size(v)?;
            if (low..=high).contains(&n) {
                Ok(n)
            } else {
                Err(format!(
                    "must be from {} to {}",
                    teeway_runtime::units::format_size(low),
                    teeway_runtime::units::format_size(high)
                ))
            }
        }
    };
    // One connection must be able to hold one largest stream.
    let stream = crate::budget::MAX_STREAM_BYTES as u64;
    let buffer_bytes = l
        .optional(
            p,
            "buffer_bytes",
            "give a size such as 128MiB (at least connection_buffer_bytes)",
            size_in(stream, 1 << 40),
        )
        .unwrap_or(d.buffer_bytes);
    let identity_buffer_bytes = l
        .optional(
            p,
            "identity_buffer_bytes",
            "give a size such as 64MiB (at least connection_buffer_bytes)",
            size_in(stream, 1 << 40),
        )
        .unwrap_or(d.identity_buffer_bytes.min(buffer_bytes));
    let connection_buffer_bytes = l
        .optional(
            p,
            "connection_buffer_bytes",
            "give a size such as 32MiB",
            size_in(stream, 1 << 40),
        )
        .unwrap_or(d.connection_buffer_bytes);
    let streams_per_connection = l
        .optional(
            p,
            "streams_per_connection",
            "use a whole number from 16 to 65536",
            |v| cfg::whole_number_from_to(16, 65_536)(v).map(|n| n as u32),
        )
        .unwrap_or(d.streams_per_connection);
    let connections_per_identity = l
        .optional(
            p,
            "connections_per_identity",
            "use a whole number from 1 to 100000",
            |v| cfg::whole_number_from_to(1, 100_000)(v).map(|n| n as usize),
        )
        .unwrap_or(d.connections_per_identity);
    let stream_timeout = l
        .optional(
            p,
            "stream_timeout",
            "use a duration from 1s to 10m, such as 30s",
            cfg::duration_from_to("1s", "10m"),
        )
        .unwrap_or(d.stream_timeout);
    let path = l.path_of("buffer_bytes");
    l.finish(p);
    if buffer_bytes < identity_buffer_bytes || identity_buffer_bytes < connection_buffer_bytes {
        p.push(
            path,
            None,
            format!(
                "must be at least limits.identity_buffer_bytes ({}), itself at least limits.connection_buffer_bytes ({})",
                teeway_runtime::units::format_size(identity_buffer_bytes),
                teeway_runtime::units::format_size(connection_buffer_bytes)
            ),
            "give the gateway at least one identity's worth, and an identity one connection's",
        );
    }
    Limits {
        buffer_bytes,
        identity_buffer_bytes,
        connection_buffer_bytes,
        streams_per_connection,
        connections_per_identity,
        stream_timeout,
    }
}

/// One second's worth of tokens, at least one.
fn default_burst(per_second: f64) -> u32 {
    per_second.ceil().clamp(1.0, f64::from(u32::MAX)) as u32
}

impl GatewayConfig {
    /// The settings that differ from `old` and cannot change while the gateway runs.
    pub fn restart_required(&self, old: &GatewayConfig) -> Vec<String> {
        // Every field is named, without `..`: a new setting does not compile until it is
        // classified here as live or as needing a restart.
        let GatewayConfig {
            listen,
            transports,
            // Live: certificates reload, agents.allow and routes swap whole.
            tls: _,
            tls_files: _,
            agents_allow: _,
            routes: _,
            tcp_routes: _,
            rpc_routes: _,
            archive,
            admin,
            shutdown_grace,
            limits,
        } = self;
        let mut changed = Vec::new();
        let mut check = |name: &str, same: bool| {
            if !same {
                changed.push(name.to_owned());
            }
        };
        check("listen", *listen == old.listen);
        check("transports", *transports == old.transports);
        check("archive", *archive == old.archive);
        check("limits", *limits == old.limits);
        check("admin.listen", *admin == old.admin);
        check("shutdown_grace", *shutdown_grace == old.shutdown_grace);
        changed
    }

    /// Whether an agent with `identity` may connect.
    pub fn allows(&self, identity: &str) -> bool {
        allowed(self.agents_allow.as_deref(), identity)
    }
}

/// Whether the document's root has `key` (set, even if invalid).
fn root_has(doc: &Value, key: &str) -> bool {
    doc.get(key).is_some_and(|v| !v.is_null())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn dir_with_certs(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("teeway-gw-cfg-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let ca = teeway_wire::pki::CertificateAuthority::generate("ca").expect("ca");
        let gw = ca.gateway(&[]).expect("gw");
        std::fs::write(dir.join("ca.pem"), &ca.certified.cert_pem).expect("write");
        std::fs::write(dir.join("gateway.pem"), &gw.cert_pem).expect("write");
        std::fs::write(dir.join("gateway.key"), &gw.key_pem).expect("write");
        dir
    }

    #[test]
    fn valid_config_with_routes() {
        let dir = dir_with_certs("valid");
        let c = GatewayConfig::from_yaml(
            "listen: 127.0.0.1:4433
tls: { ca: ca.pem, cert: gateway.pem, key: gateway.key }
agents: { allow: [prod-eu-1, prod-us-*] }
routes:
  - name: orders
    match: { source_cluster: [prod-eu-*], host: API.example.com, path_prefix: /v1, headers: { x-canary: true } }
    targets:
      - http://127.0.0.1:9100
      - url: http://127.0.0.1:9101
        percentage: 10
        timeout: 1s
        max_concurrency: 8
        rate_limit: 50/s
      - url: http://127.0.0.1:9102
        rate_limit: { rate: 600/m, burst: 5 }
    host_header: orders.test.internal:8080
    rewrite_path_prefix: /v2
    set_headers: { x-env: test }
    remove_headers: [x-debug]
    mirror_header: x-mirrored-from
    timeout: 2s
  - targets: [http://127.0.0.1:9200]
    mirror_header: false
    host_header: append-shadow
",
            &dir,
        )
        .expect("valid");
        assert_eq!(c.routes.len(), 2);
        let r = &c.routes[0];
        assert_eq!(r.name, "orders");
        let m = r.matcher.as_ref().expect("match");
        assert_eq!(m.source_clusters, ["prod-eu-*"]);
        assert_eq!(m.request.path_prefix(), Some("/v1"));
        assert_eq!(r.targets.len(), 3);
        assert_eq!(
            r.targets[0].timeout,
            Duration::from_secs(2),
            "route default"
        );
        assert_eq!(r.targets[0].percentage, 100.0);
        assert_eq!(r.targets[1].percentage, 10.0);
        assert_eq!(r.targets[1].timeout, Duration::from_secs(1));
        assert_eq!(r.targets[1].max_concurrency, 8);
        assert_eq!(
            r.targets[1].rate_limit,
            Some(RateLimit {
                per_second: 50.0,
                burst: 50
            })
        );
        assert_eq!(
            r.targets[2].rate_limit,
            Some(RateLimit {
                per_second: 10.0,
                burst: 5
            })
        );
        assert_eq!(
            r.rewrite.host,
            HostPolicy::Literal("orders.test.internal:8080".into())
        );
        assert_eq!(r.rewrite.path_prefix, Some(("/v1".into(), "/v2".into())));
        assert_eq!(r.rewrite.set_headers.len(), 1);
        assert_eq!(
            r.rewrite.remove_headers,
            [HeaderName::from_static("x-debug")]
        );
        assert_eq!(
            r.rewrite.marker,
            Some(HeaderName::from_static("x-mirrored-from"))
        );
        assert!(c.routes[1].matcher.is_none());
        assert_eq!(c.routes[1].rewrite.marker, None);
        assert_eq!(c.routes[1].rewrite.host, HostPolicy::AppendShadow);
        assert!(c.allows("prod-eu-1") && c.allows("prod-us-7"));
        assert!(!c.allows("prod-eu-2") && !c.allows("staging"));
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn marker_header_is_on_by_default() {
        let dir = dir_with_certs("marker");
        let c = GatewayConfig::from_yaml(
            "listen: 127.0.0.1:4433
tls: { ca: ca.pem, cert: gateway.pem, key: gateway.key }
routes: [{ targets: [http://127.0.0.1:9200] }]
",
            &dir,
        )
        .expect("valid");
        assert_eq!(
            c.routes[0].rewrite.marker,
            Some(HeaderName::from_static(DEFAULT_MARKER_HEADER))
        );
        assert!(c.allows("anyone"));
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn tcp_routes_read_alone_and_their_problems_are_named() {
        let dir = dir_with_certs("tcp");
        let c = GatewayConfig::from_yaml(
            "listen: 127.0.0.1:4433
tls: { ca: ca.pem, cert: gateway.pem, key: gateway.key }
tcp_routes:
  - listener: redis
    source_cluster: [prod-*]
    targets: [shadow-redis:6379, \"[::1]:6380\"]
    max_connections: 16
",
            &dir,
        )
        .expect("valid without http routes");
        assert!(c.routes.is_empty());
        assert_eq!(
            c.tcp_routes,
            vec![TcpRouteConfig {
                listener: "redis".into(),
                source_clusters: vec!["prod-*".into()],
                targets: vec![("shadow-redis".into(), 6379), ("::1".into(), 6380)],
                max_connections: 16,
            }]
        );
        let err = GatewayConfig::from_yaml(
            "listen: 127.0.0.1:4433
tls: { ca: ca.pem, cert: gateway.pem, key: gateway.key }
tcp_routes:
  - targets: [http://shadow:6379]
    max_connections: 0
  - listener: redis
    targets: []
",
            &dir,
        )
        .expect_err("invalid");
        let text = err.to_string();
        for needle in [
            "tcp_routes[0].listener: is required",
            "tcp_routes[0].targets[0]: is not a `host:port` address",
            "tcp_routes[0].max_connections: must be at least 1",
            "tcp_routes[1].targets: is empty",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn compare_names_targets_by_role_and_its_problems() {
        let dir = dir_with_certs("compare");
        let c = GatewayConfig::from_yaml(
            "listen: 127.0.0.1:4433
tls: { ca: ca.pem, cert: gateway.pem, key: gateway.key }
routes:
  - targets: [http://v2:8080, http://v1:8080/, http://v1b:8080]
    compare:
      candidate: http://v2:8080/
      primary: http://v1:8080
      secondary: http://v1b:8080
      ignore: { fields: [/meta/trace], values: ['^\\d{4}-'] }
      noise: { relative: 50%, absolute: 2% }
",
            &dir,
        )
        .expect("valid");
        let compare = c.routes[0].compare.as_ref().expect("compare");
        assert_eq!(
            (compare.candidate, compare.primary, compare.secondary),
            (0, Baseline::Target(1), Some(2))
        );
        assert_eq!(compare.headers, [http::header::CONTENT_TYPE]);
        assert_eq!(compare.noise.relative, 0.5);
        assert_eq!(compare.noise.absolute, 0.02);
        assert_eq!(compare.max_body, DEFAULT_COMPARE_MAX_BODY);
        let err = GatewayConfig::from_yaml(
            "listen: 127.0.0.1:4433
tls: { ca: ca.pem, cert: gateway.pem, key: gateway.key }
routes:
  - targets: [http://a:1, http://b:1]
    compare:
      candidate: http://a:1
      primary: http://a:1
      secondary: http://c:1
      ignore: { fields: [meta], values: ['(('] }
      endpoints: [\"users/{id}\"]
      max_body: 10
",
            &dir,
        )
        .expect_err("invalid");
        let text = err.to_string();
        for needle in [
            "routes[0].compare.secondary: is not one of the route's targets (found `http://c:1`); name one of the route's targets by its URL: http://a:1, http://b:1",
            "routes[0].compare.primary: is the candidate's target too (found `http://a:1`)",
            "routes[0].compare.ignore.fields[0]: `meta` is not a field path",
            "routes[0].compare.ignore.values[0]: is not a regular expression (unclosed group)",
            "routes[0].compare.endpoints[0]: `users/{id}` is not a template",
            "routes[0].compare.max_body: must be from 1KiB to 16MiB",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        let missing = GatewayConfig::from_yaml(
            "listen: 127.0.0.1:4433
tls: { ca: ca.pem, cert: gateway.pem, key: gateway.key }
routes:
  - targets: [http://a:1]
    compare: { candidate: http://a:1 }
",
            &dir,
        )
        .expect_err("no primary");
        assert!(
            missing
                .to_string()
                .contains("routes[0].compare.primary: is required"),
            "{missing}"
        );
        let c = GatewayConfig::from_yaml(
            "listen: 127.0.0.1:4433
tls: { ca: ca.pem, cert: gateway.pem, key: gateway.key }
routes:
  - targets: [http://v2:1, http://v1:1]
    compare: { candidate: http://v2:1, primary: production, secondary: http://v1:1 }
",
            &dir,
        )
        .expect("production as the primary");
        let compare = c.routes[0].compare.as_ref().expect("compare");
        assert_eq!(
            (compare.candidate, compare.primary, compare.secondary),
            (0, Baseline::Production, Some(1))
        );
        let wrong = GatewayConfig::from_yaml(
            "listen: 127.0.0.1:4433
tls: { ca: ca.pem, cert: gateway.pem, key: gateway.key }
routes:
  - targets: [http://v2:1]
    compare: { candidate: http://v2:1, primary: http://v0:1 }
",
            &dir,
        )
        .expect_err("unknown primary");
        assert!(
            wrong
                .to_string()
                .contains("name one of the route's targets by its URL: http://v2:1, or production"),
            "{wrong}"
        );
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn rpc_routes_read_alone_and_their_problems_are_named() {
        let dir = dir_with_certs("rpc");
        let c = GatewayConfig::from_yaml(
            "listen: 127.0.0.1:4433
tls: { ca: ca.pem, cert: gateway.pem, key: gateway.key }
rpc_routes:
  - protocol: redis
    match: { listener: redis, source_cluster: [prod-*], method: [set, del] }
    targets: [shadow-redis:6379]
    timeout: 250ms
",
            &dir,
        )
        .expect("valid without http routes");
        assert_eq!(
            c.rpc_routes,
            vec![RpcRouteConfig {
                name: "rpc_routes[0]".into(),
                protocol: RpcProtocol::Redis,
                listener: Some("redis".into()),
                source_clusters: vec!["prod-*".into()],
                services: vec![],
                methods: vec!["set".into(), "del".into()],
                targets: vec![("shadow-redis".into(), 6379)],
                timeout: Duration::from_millis(250),
                max_concurrency: DEFAULT_RPC_MAX_CONCURRENCY,
                connections: DEFAULT_RPC_CONNECTIONS,
                method_labels: DEFAULT_RPC_METHOD_LABELS,
            }]
        );
        let err = GatewayConfig::from_yaml(
            "listen: 127.0.0.1:4433
tls: { ca: ca.pem, cert: gateway.pem, key: gateway.key }
rpc_routes:
  - name: a
    protocol: memcached
    targets: [shadow:6379]
    connections: 0
    method_labels: 5000
  - name: a
    protocol: redis
    match: { methods: [GET] }
    targets: []
",
            &dir,
        )
        .expect_err("invalid");
        let text = err.to_string();
        for needle in [
            "rpc_routes[0].protocol: is not a protocol teeway replays per request (found `memcached`)",
            "rpc_routes[0].connections: must be from 1 to 64",
            "rpc_routes[0].method_labels: must be from 0 to 1024",
            "rpc_routes[1].name: `a` names an earlier rpc route too",
            "rpc_routes[1].match.methods: unknown key; did you mean `method`?",
            "rpc_routes[1].targets: is empty",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn route_problems_are_named() {
        let dir = dir_with_certs("bad");
        let err = GatewayConfig::from_yaml(
            "listen: 127.0.0.1:4433
tls: { ca: ca.pem, cert: gateway.pem, key: gateway.key }
routes:
  - targets: [http://127.0.0.1:9200]
  - match: { path_prefix: v1 }
    targets: []
    host_header: \"not a host\"
  - match: { path: /x }
    rewrite_path_prefix: /y
    targets: [{ url: http://127.0.0.1:1, percentage: 120, rate_limit: 0/s }, ftp://x]
agents: { allow: [\"a*b\"] }
",
            &dir,
        )
        .expect_err("invalid");
        let text = err.to_string();
        for needle in [
            "routes[1].match: this route is never used: routes[0] has no `match`",
            "routes[1].match.path_prefix: must start with /",
            "routes[1].targets: needs at least one target",
            "routes[1].host_header: is not a host policy or a host[:port] (found `not a host`)",
            "routes[2].rewrite_path_prefix: needs match.path_prefix",
            "routes[2].targets[0].percentage: must be between 0 and 100",
            "routes[2].targets[0].rate_limit: must be more than zero",
            "routes[2].targets[1]:",
            "agents.allow[0]: may hold `*` only at its end",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn https_targets_read_their_trust_and_name_their_problems() {
        let dir = dir_with_certs("https");
        let c = GatewayConfig::from_yaml(
            "listen: 127.0.0.1:4433
tls: { ca: ca.pem, cert: gateway.pem, key: gateway.key }
routes:
  - targets:
      - url: https://127.0.0.1:9443
        tls: { ca: ca.pem, server_name: shadow.internal }
      - url: https://shadow.test:8443
        tls: { ca: ca.pem }
",
            &dir,
        )
        .expect("valid");
        let targets = &c.routes[0].targets;
        assert_eq!(targets[0].target.port, 9443);
        assert!(targets[0].target.tls);
        let tls = targets[0].tls.as_ref().expect("tls");
        assert_eq!(tls.server_name, "shadow.internal");
        assert_eq!(
            tls.trust,
            teeway_wire::tls::UpstreamTrust::Bundle(dir.join("ca.pem"))
        );
        let tls = targets[1].tls.as_ref().expect("tls");
        assert_eq!(tls.server_name, "shadow.test", "defaults to the URL's host");

        std::fs::write(dir.join("not-a-ca.pem"), "nothing here").expect("write");
        let err = GatewayConfig::from_yaml(
            "listen: 127.0.0.1:4433
tls: { ca: ca.pem, cert: gateway.pem, key: gateway.key }
routes:
  - targets:
      - { url: http://127.0.0.1:9000, tls: { ca: ca.pem } }
      - { url: https://127.0.0.1:9443, tls: { ca: missing.pem } }
      - { url: https://127.0.0.1:9443, tls: { ca: not-a-ca.pem } }
      - { url: https://127.0.0.1:9443, tls: { server_name: \"not a name\" } }
",
            &dir,
        )
        .expect_err("invalid");
        let text = err.to_string();
        for needle in [
            "routes[0].targets[0].tls: is set but the URL `http://127.0.0.1:9000` is not https",
            "routes[0].targets[1].tls.ca: cannot be read",
            "routes[0].targets[2].tls.ca:",
            "no usable certificate",
            "routes[0].targets[3].tls.server_name: is not a DNS name or IP address",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        assert_eq!(err.problems.len(), 4, "{text}");
        std::fs::remove_dir_all(dir).ok();
    }
}
