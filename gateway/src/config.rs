//! The gateway's configuration (`gateway.yaml`), read and validated in full before any port is
//! bound. The README's configuration reference documents every key.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use teeway_archive::ArchiveConfig;
use teeway_runtime::config::{
    self as cfg, ConfigError, HttpTarget, Problems, Section, UpstreamProtocol,
};
use teeway_runtime::yaml::Value;
use teeway_wire::tls::{Role, TlsMaterial};

/// Default time one replay (request sent, response read to the end) may take.
pub const DEFAULT_REPLAY_TIMEOUT: Duration = Duration::from_secs(10);
/// Default replays in flight per target; beyond it copies are dropped as `overloaded` so a slow
/// shadow never makes the gateway hoard.
pub const DEFAULT_MAX_CONCURRENCY: usize = 256;
/// Default time allowed, on SIGTERM, for replays in flight to finish.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A validated gateway configuration.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// UDP address of the QUIC listener.
    pub listen: SocketAddr,
    /// CA that agents' certificates must chain to, and the gateway's own certificate and key.
    pub tls: TlsMaterial,
    /// Routes, first match wins. Empty only when `archive` is set (a capture-only gateway).
    pub routes: Vec<RouteConfig>,
    /// Where received records are archived, if anywhere.
    pub archive: Option<ArchiveConfig>,
    /// The admin listener, if any.
    pub admin: Option<SocketAddr>,
    /// Time allowed to drain on SIGTERM.
    pub shutdown_grace: Duration,
}

/// One route.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// Which records it takes; `None` takes everything.
    pub matcher: Option<RouteMatch>,
    /// Shadow services each matching record is replayed to.
    pub targets: Vec<HttpTarget>,
    /// What the replayed request's Host is.
    pub host_header: HostPolicy,
    /// HTTP version spoken to the targets.
    pub protocol: UpstreamProtocol,
    /// Time allowed for one replay.
    pub timeout: Duration,
    /// Replays in flight per target.
    pub max_concurrency: usize,
}

/// `match:` of a route. Every condition given must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteMatch {
    /// Host, exact (case-insensitive) or `*.suffix`.
    pub host: Option<String>,
    /// Path prefix, starting with `/`.
    pub path_prefix: Option<String>,
}

/// The Host a shadow sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostPolicy {
    /// The original request's Host (default): shadows see what the primary saw.
    Keep,
    /// The target's own `host:port`, for shadows behind virtual hosting.
    Target,
    /// The original Host with `-shadow` appended to its name, as Envoy and Istio do.
    AppendShadow,
}

impl HostPolicy {
    fn parse(value: &Value) -> Result<Self, String> {
        match cfg::string(value)?.as_str() {
            "keep" => Ok(HostPolicy::Keep),
            "target" => Ok(HostPolicy::Target),
            "append-shadow" => Ok(HostPolicy::AppendShadow),
            _ => Err("is not a host policy".into()),
        }
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
            "give the UDP address agents connect to, for example `listen: 0.0.0.0:4433`",
            cfg::socket_addr,
        );

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

        let archive = ArchiveConfig::from_section(&mut root, &mut p, base_dir, true);
        let archive_given = root_has(&doc, "archive");
        let mut routes = Vec::new();
        let route_sections = root.sections(&mut p, "routes");
        if route_sections.is_empty() && !archive_given {
            p.push(
                "routes",
                None,
                "needs at least one route (or an `archive:` block, for a capture-only gateway)",
                "add `routes:` with `- targets: [http://shadow:8080]` to replay everything to one shadow",
            );
        }
        let mut catch_all_at: Option<String> = None;
        for mut r in route_sections {
            if let Some(earlier) = &catch_all_at {
                p.push(
                    r.path_of("match"),
                    None,
                    format!(
                        "this route is never used: {earlier} has no `match` and takes everything"
                    ),
                    "move the route without `match` to the end of the list",
                );
            }
            let mut m = r.section(&mut p, "match");
            let matcher = if m.is_present() {
                let host = m.optional(
                    &mut p,
                    "host",
                    "give a host name such as api.example.com or *.example.com",
                    |v| {
                        let h = cfg::nonempty_string(v)?.to_ascii_lowercase();
                        let bare = h.strip_prefix("*.").unwrap_or(&h);
                        if bare.contains(['/', ':', ' ']) {
                            return Err("must be a host name without port or path".into());
                        }
                        Ok(h)
                    },
                );
                let path_prefix =
                    m.optional(&mut p, "path_prefix", "start it with /, such as /v1", |v| {
                        let s = cfg::nonempty_string(v)?;
                        if !s.starts_with('/') {
                            return Err("must start with /".into());
                        }
                        Ok(s)
                    });
                Some(RouteMatch { host, path_prefix })
            } else {
                catch_all_at = Some(r.path().to_owned());
                None
            };
            m.finish(&mut p);
            let targets_path = r.path_of("targets");
            let targets = r
                .list(
                    &mut p,
                    "targets",
                    "give http://host:port URLs of shadow services",
                    cfg::http_target,
                )
                .unwrap_or_default();
            if targets.is_empty() {
                p.push(
                    targets_path,
                    None,
                    "needs at least one target",
                    "add `targets: [http://shadow:8080]`",
                );
            }
            let host_header = r
                .optional(
                    &mut p,
                    "host_header",
                    "use keep, target or append-shadow",
                    HostPolicy::parse,
                )
                .unwrap_or(HostPolicy::Keep);
            let protocol = r
                .optional(
                    &mut p,
                    "protocol",
                    "use http1 (default), http2 (h2c) or auto (the original request's version; for gRPC)",
                    cfg::upstream_protocol,
                )
                .unwrap_or(UpstreamProtocol::Http1);
            let timeout = r
                .optional(
                    &mut p,
                    "timeout",
                    "use a duration such as 10s",
                    cfg::duration,
                )
                .unwrap_or(DEFAULT_REPLAY_TIMEOUT);
            let max_concurrency = r
                .optional(
                    &mut p,
                    "max_concurrency",
                    "use a whole number from 1 to 65536",
                    |v| match cfg::whole_number(v)? {
                        0 => Err("must be at least 1".into()),
                        n if n > 65_536 => Err("must be at most 65536".into()),
                        n => Ok(n as usize),
                    },
                )
                .unwrap_or(DEFAULT_MAX_CONCURRENCY);
            r.finish(&mut p);
            routes.push(RouteConfig {
                matcher,
                targets,
                host_header,
                protocol,
                timeout,
                max_concurrency,
            });
        }

        let mut a = root.section(&mut p, "admin");
        let admin = a.optional(
            &mut p,
            "listen",
            "give an ip:port such as 127.0.0.1:9902",
            cfg::socket_addr,
        );
        a.finish(&mut p);
        let shutdown_grace = root
            .optional(
                &mut p,
                "shutdown_grace",
                "use a duration such as 10s",
                cfg::duration,
            )
            .unwrap_or(DEFAULT_SHUTDOWN_GRACE);
        root.finish(&mut p);

        p.finish(())?;
        match (listen, tls) {
            (Some(listen), Some(tls)) => Ok(GatewayConfig {
                listen,
                tls,
                routes,
                archive,
                admin,
                shutdown_grace,
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
routes:
  - match: { host: API.example.com, path_prefix: /v1 }
    targets: [http://127.0.0.1:9100, http://127.0.0.1:9101]
    host_header: append-shadow
    timeout: 2s
  - targets: [http://127.0.0.1:9200]
",
            &dir,
        )
        .expect("valid");
        assert_eq!(c.routes.len(), 2);
        let m = c.routes[0].matcher.as_ref().expect("match");
        assert_eq!(m.host.as_deref(), Some("api.example.com"));
        assert_eq!(c.routes[0].targets.len(), 2);
        assert_eq!(c.routes[0].host_header, HostPolicy::AppendShadow);
        assert_eq!(c.routes[0].timeout, Duration::from_secs(2));
        assert!(c.routes[1].matcher.is_none());
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
    host_header: rewrite
",
            &dir,
        )
        .expect_err("invalid");
        let text = err.to_string();
        for needle in [
            "routes[1].match: this route is never used: routes[0] has no `match`",
            "routes[1].match.path_prefix: must start with /",
            "routes[1].targets: needs at least one target",
            "routes[1].host_header: is not a host policy (found `rewrite`)",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        std::fs::remove_dir_all(dir).ok();
    }
}
