//! `teeway check FILE...`: validates agent and gateway configurations with the code the servers
//! run at start-up, lists every problem, and then checks what start-up cannot see but a
//! handshake would refuse: certificates expired or not yet valid (expiring within 30 days: a
//! warning), a client certificate where a server one belongs and the reverse, a leaf given as
//! the CA, a key from another pair; and, when an agent's and a gateway's files are checked
//! together, whether each side's certificate verifies against the other side's CA bundle.

use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

use teeway_agent::AgentConfig;
use teeway_gateway::GatewayConfig;
use teeway_runtime::config::{ConfigError, Problems};
use teeway_wire::certinfo::{self, CertFacts};

/// A certificate expiring sooner than this is a warning.
const EXPIRY_WARNING_DAYS: i64 = 30;

/// Which half a configuration file is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `agent.yaml`: has `primary:`.
    Agent,
    /// `gateway.yaml`: has `routes:`.
    Gateway,
}

/// Tells an agent configuration from a gateway one by its keys (`None` when it cannot, or the
/// text is not YAML).
pub fn detect(text: &str) -> Option<Kind> {
    let doc = teeway_runtime::yaml::parse(text).ok()?;
    let map = doc.as_mapping()?;
    let has = |k: &str| map.contains_key(k);
    match (
        has("primary") || has("mirror") || has("cluster") || has("sink"),
        has("routes") || has("tcp_routes") || has("rpc_routes") || has("tls") || has("agents"),
    ) {
        (true, false) => Some(Kind::Agent),
        (false, true) => Some(Kind::Gateway),
        _ => None,
    }
}

/// A configuration that loaded, for the checks across files.
#[derive(Debug)]
pub enum Loaded {
    /// An agent's.
    Agent(Box<AgentConfig>),
    /// A gateway's.
    Gateway(Box<GatewayConfig>),
}

/// What checking one file found.
#[derive(Debug)]
pub struct Checked {
    /// The file.
    pub path: PathBuf,
    /// The one-line summary, or every problem.
    pub result: Result<String, ConfigError>,
    /// What works now but will not for long (a certificate expiring soon...).
    pub warnings: Vec<String>,
    loaded: Option<Loaded>,
}

/// Checks every file, then the agent and gateway files against each other.
pub fn check_files(paths: &[PathBuf]) -> Vec<Checked> {
    let mut checked: Vec<Checked> = paths.iter().map(|p| check_file(p)).collect();
    cross_check(&mut checked);
    checked
}

/// Validates one file and its TLS files.
pub fn check_file(path: &Path) -> Checked {
    let name = path.display().to_string();
    let mut out = Checked {
        path: path.to_owned(),
        result: Ok(String::new()),
        warnings: Vec::new(),
        loaded: None,
    };
    let text = match teeway_runtime::config::read_file(path) {
        Ok(t) => t,
        Err(e) => {
            out.result = Err(e);
            return out;
        }
    };
    if let Err(e) = teeway_runtime::yaml::parse(&text) {
        out.result = Err(ConfigError::unreadable(
            &name,
            format!("is not valid YAML: {e}"),
            "fix the document at that line and column",
        ));
        return out;
    }
    let mut problems = Problems::default();
    let now = UnixTime::now().as_secs() as i64;
    out.result = match detect(&text) {
        Some(Kind::Agent) => AgentConfig::from_file(path).map(|c| {
            let summary = agent_summary(&c);
            agent_certificates(&c, now, &mut problems, &mut out.warnings);
            out.loaded = Some(Loaded::Agent(Box::new(c)));
            summary
        }),
        Some(Kind::Gateway) => GatewayConfig::from_file(path).map(|c| {
            let summary = gateway_summary(&c);
            gateway_certificates(&c, now, &mut problems, &mut out.warnings);
            out.loaded = Some(Loaded::Gateway(Box::new(c)));
            summary
        }),
        None => Err(ConfigError::unreadable(
            &name,
            "cannot tell whether this is an agent or a gateway configuration",
            "an agent configuration has `primary:` (or `sink:`) and `cluster:`, a gateway configuration has `routes:` and `tls:`",
        )),
    };
    if out.result.is_ok() && !problems.is_empty() {
        out.result = problems.finish(String::new()).map_err(|e| e.in_file(&name));
    }
    out
}

fn agent_summary(c: &AgentConfig) -> String {
    let gateway = c.gateway.as_ref().map_or("none".to_owned(), |g| {
        let spool = g.spool.as_ref().map_or(String::new(), |s| {
            format!(
                " (spool {}, up to {})",
                s.dir.display(),
                teeway_runtime::units::format_size(s.max_bytes)
            )
        });
        format!(
            "{}{spool}",
            teeway_runtime::config::join_host_port(&g.host, g.port)
        )
    });
    let archive = c
        .archive
        .as_ref()
        .map_or("off".to_owned(), |a| a.dir.display().to_string());
    let http = match (c.listen, &c.primary) {
        (None, _) => "no HTTP listener".to_owned(),
        (Some(listen), Some(p)) => format!("listen {listen}, primary {}", p.url),
        (Some(listen), None) => {
            format!("listen {listen}, primary none (sink: takes an ingress's mirror feed)")
        }
    };
    let tcp = if c.tcp.is_empty() {
        String::new()
    } else {
        let list: Vec<String> = c
            .tcp
            .iter()
            .map(|t| {
                format!(
                    "{} {} -> {} {}%",
                    t.name,
                    t.listen,
                    teeway_runtime::config::join_host_port(&t.primary.0, t.primary.1),
                    t.percentage
                )
            })
            .collect();
        format!(", tcp [{}]", list.join("; "))
    };
    let rpc = if c.rpc.is_empty() {
        String::new()
    } else {
        let list: Vec<String> = c
            .rpc
            .iter()
            .map(|r| {
                let commands = match &r.policy.commands {
                    _ if r.protocol != teeway_wire::RpcProtocol::Redis => "calls".to_owned(),
                    teeway_agent::rpc::Commands::All => "all commands".to_owned(),
                    teeway_agent::rpc::Commands::Writes => "writes".to_owned(),
                    teeway_agent::rpc::Commands::Listed(names) => names.join(","),
                };
                format!(
                    "{} {} {} -> {} {}% of {commands}, {} rule(s)",
                    r.name,
                    r.protocol.name(),
                    r.listen,
                    teeway_runtime::config::join_host_port(&r.primary.0, r.primary.1),
                    r.policy.percentage,
                    r.policy.rules.len()
                )
            })
            .collect();
        format!(", rpc [{}]", list.join("; "))
    };
    let mirroring = if c.listen.is_some() {
        let answers = match &c.mirror.policy.capture_response {
            Some(capture) => format!(
                " with production's answers (up to {}, waiting {:?})",
                teeway_runtime::units::format_size(capture.max_body_bytes as u64),
                capture.wait
            ),
            None => String::new(),
        };
        format!(", mirroring {}%{answers}", c.mirror.policy.percentage)
    } else {
        String::new()
    };
    format!(
        "agent config: cluster {}, {http}{tcp}{rpc}, gateway {gateway}, archive {archive}{mirroring}",
        c.cluster
    )
}

fn gateway_summary(c: &GatewayConfig) -> String {
    let targets: usize = c.routes.iter().map(|r| r.targets.len()).sum();
    let tcp = if c.tcp_routes.is_empty() {
        String::new()
    } else {
        format!(", {} tcp routes", c.tcp_routes.len())
    };
    let rpc = if c.rpc_routes.is_empty() {
        String::new()
    } else {
        let targets: usize = c.rpc_routes.iter().map(|r| r.targets.len()).sum();
        format!(
            ", {} rpc route(s) to {targets} target(s)",
            c.rpc_routes.len()
        )
    };
    let archive = c
        .archive
        .as_ref()
        .map_or("off".to_owned(), |a| a.dir.display().to_string());
    let compare: String = c
        .routes
        .iter()
        .filter_map(|r| {
            let compare = r.compare.as_ref()?;
            let url = |i: usize| r.targets.get(i).map_or("?", |t| t.target.url.as_str());
            let secondary = compare
                .secondary
                .map_or(" (no secondary: no noise learned)".to_owned(), |i| {
                    format!(", noise from {}", url(i))
                });
            Some(format!(
                "; route {} compares {} with {}{secondary}",
                r.name,
                url(compare.candidate),
                match compare.primary {
                    teeway_gateway::config::Baseline::Target(i) => url(i),
                    teeway_gateway::config::Baseline::Production => "production's own answers",
                }
            ))
        })
        .collect();
    format!(
        "gateway config: listen {}, {} route(s), {targets} target(s){tcp}{rpc}, archive {archive}{compare}",
        c.listen,
        c.routes.len()
    )
}

/// Which kind of certificate a field must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Use {
    Client,
    Server,
}

/// Dates, CA flag and usage of a leaf at `field`.
fn leaf(
    field: &str,
    file: &Path,
    cert: &CertificateDer<'_>,
    usage: Use,
    now: i64,
    problems: &mut Problems,
    warnings: &mut Vec<String>,
) {
    let Some(f) = certinfo::facts(cert) else {
        problems.push(
            field,
            None,
            format!("{}: the certificate does not parse", file.display()),
            "give a PEM X.509 certificate",
        );
        return;
    };
    dates(field, file, &f, now, problems, warnings);
    if f.is_ca {
        problems.push(
            field,
            None,
            format!(
                "{} is a CA certificate ({}), not a leaf",
                file.display(),
                f.subject
            ),
            "give this side's own certificate here; the CA goes in the `ca` field",
        );
    }
    let (allowed, want, other) = match usage {
        Use::Client => (
            f.client_auth,
            "clientAuth",
            "a gateway (server) certificate",
        ),
        Use::Server => (f.server_auth, "serverAuth", "an agent (client) certificate"),
    };
    if allowed == Some(false) {
        let issue = match usage {
            Use::Client => "teeway certs issue --agent-name NAME",
            Use::Server => "teeway certs issue --gateway-name NAME",
        };
        problems.push(
            field,
            None,
            format!(
                "{} is not for {want} (its extendedKeyUsage does not allow it): {other} given here? (certificates swapped?)",
                file.display()
            ),
            format!("give a certificate issued for this side, such as `{issue}` writes"),
        );
    }
}

/// Expired, not yet valid: problems; expiring soon: a warning.
fn dates(
    field: &str,
    file: &Path,
    f: &CertFacts,
    now: i64,
    problems: &mut Problems,
    warnings: &mut Vec<String>,
) {
    let day = |t: i64| {
        teeway_archive::har::iso8601(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(t.max(0) as u64),
        )[..10]
            .to_owned()
    };
    if f.not_after < now {
        problems.push(
            field,
            None,
            format!(
                "{} ({}) expired on {}",
                file.display(),
                f.subject,
                day(f.not_after)
            ),
            "renew it (teeway certs issue, or your PKI)",
        );
    } else if f.not_before > now {
        problems.push(
            field,
            None,
            format!(
                "{} ({}) is not valid before {}",
                file.display(),
                f.subject,
                day(f.not_before)
            ),
            "check this machine's clock, or issue it again",
        );
    } else if f.not_after - now < EXPIRY_WARNING_DAYS * 86_400 {
        warnings.push(format!(
            "{field}: {} ({}) expires on {}, in {} days; renew it",
            file.display(),
            f.subject,
            day(f.not_after),
            // Whole days left, rounded up: "in 0 days" would read as expired.
            (f.not_after - now + 86_399) / 86_400
        ));
    }
}

/// Each certificate of a CA bundle must be a CA, and in date.
fn bundle(
    field: &str,
    file: &Path,
    ca: &[CertificateDer<'_>],
    now: i64,
    problems: &mut Problems,
    warnings: &mut Vec<String>,
) {
    for cert in ca {
        let Some(f) = certinfo::facts(cert) else {
            continue;
        };
        dates(field, file, &f, now, problems, warnings);
        if !f.is_ca {
            problems.push(
                field,
                None,
                format!(
                    "{} holds a leaf certificate ({}), not a CA: peers' certificates cannot chain to it",
                    file.display(),
                    f.subject
                ),
                "give the CA certificate that signed the peer's (ca.pem from `teeway certs init`)",
            );
        }
    }
}

fn key_belongs(
    field: &str,
    file: &Path,
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
    problems: &mut Problems,
) {
    if let Err(why) = certinfo::keys_match(chain, key) {
        problems.push(
            field,
            None,
            format!("{}: {why}", file.display()),
            "give the key written with this certificate",
        );
    }
}

fn agent_certificates(c: &AgentConfig, now: i64, p: &mut Problems, w: &mut Vec<String>) {
    if let Some(g) = &c.gateway {
        // Loading checked that the key belongs to the certificate.
        let [ca, cert, _] = &g.tls_files;
        if let Some(leaf_cert) = g.tls.chain.first() {
            leaf("gateway.cert", cert, leaf_cert, Use::Client, now, p, w);
        }
        bundle("gateway.ca", ca, &g.tls.ca, now, p, w);
    }
    if let Some(t) = &c.listen_tls {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&t.cert)
            .map(|certs| certs.filter_map(Result::ok).collect())
            .unwrap_or_default();
        if let Some(first) = chain.first() {
            leaf("listen_tls.cert", &t.cert, first, Use::Server, now, p, w);
        }
        if let Ok(key) = PrivateKeyDer::from_pem_file(&t.key) {
            key_belongs("listen_tls.key", &t.key, &chain, &key, p);
        }
    }
}

fn gateway_certificates(c: &GatewayConfig, now: i64, p: &mut Problems, w: &mut Vec<String>) {
    // Loading checked that the key belongs to the certificate.
    let [ca, cert, _] = &c.tls_files;
    if let Some(leaf_cert) = c.tls.chain.first() {
        leaf("tls.cert", cert, leaf_cert, Use::Server, now, p, w);
    }
    bundle("tls.ca", ca, &c.tls.ca, now, p, w);
}

/// With agent and gateway files checked together: the handshake each side will do.
fn cross_check(checked: &mut [Checked]) {
    let gateways: Vec<(PathBuf, GatewayConfig)> = checked
        .iter()
        .filter_map(|c| match &c.loaded {
            Some(Loaded::Gateway(g)) if c.result.is_ok() => Some((c.path.clone(), (**g).clone())),
            _ => None,
        })
        .collect();
    // With one gateway file the agents' files are checked against it; with several, which agent
    // talks to which cannot be told from the files (and a false alarm helps no one).
    if gateways.len() != 1 {
        return;
    }
    let now = UnixTime::now();
    for c in checked.iter_mut() {
        let Some(Loaded::Agent(agent)) = &c.loaded else {
            continue;
        };
        if c.result.is_err() {
            continue;
        }
        let Some(g) = &agent.gateway else { continue };
        let mut p = Problems::default();
        for (gateway_file, gateway) in &gateways {
            let gateway_file = gateway_file.display();
            if let Err(why) = certinfo::verify_as_client(&g.tls.chain, &gateway.tls.ca, now) {
                p.push(
                    "gateway.cert",
                    None,
                    format!("the gateway of {gateway_file} would refuse it (its tls.ca): {why}"),
                    "issue the agent's certificate from the CA the gateway trusts, or add that CA to the gateway's tls.ca",
                );
            }
            if let Err(why) =
                certinfo::verify_as_server(&gateway.tls.chain, &g.tls.ca, &g.server_name, now)
            {
                p.push(
                    "gateway.ca",
                    None,
                    format!("would not accept the certificate of {gateway_file} (its tls.cert): {why}"),
                    "give the CA that signed the gateway's certificate, and a gateway.server_name it carries",
                );
            }
            if let (Some(allow), Some(identity)) = (
                &gateway.agents_allow,
                g.tls
                    .chain
                    .first()
                    .and_then(teeway_wire::tls::peer_identity),
            ) {
                if !allow
                    .iter()
                    .any(|pattern| teeway_gateway::config::identity_matches(pattern, &identity))
                {
                    p.push(
                        "gateway.cert",
                        None,
                        format!("its identity `{identity}` is not in the agents.allow of {gateway_file}"),
                        "add it (or a pattern such as prod-*) to agents.allow",
                    );
                }
            }
        }
        if !p.is_empty() {
            c.result = p
                .finish(String::new())
                .map_err(|e| e.in_file(&c.path.display().to_string()));
        }
    }
}
