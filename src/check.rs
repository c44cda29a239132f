//! `teeway check FILE...`: validates agent and gateway configurations with the code the servers
//! run at start-up, and lists every problem.

use std::path::Path;

use teeway_agent::AgentConfig;
use teeway_gateway::GatewayConfig;
use teeway_runtime::config::ConfigError;

/// Which half a configuration file is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `agent.yaml`: has `primary:`.
    Agent,
    /// `gateway.yaml`: has `routes:`.
    Gateway,
}

/// Tells an agent configuration from a gateway one by its keys.
pub fn detect(text: &str) -> Option<Kind> {
    let doc = teeway_runtime::yaml::parse(text).ok()?;
    let map = doc.as_mapping()?;
    let has = |k: &str| map.contains_key(k);
    match (
        has("primary") || has("mirror") || has("cluster"),
        has("routes") || has("tcp_routes") || has("tls"),
    ) {
        (true, false) => Some(Kind::Agent),
        (false, true) => Some(Kind::Gateway),
        _ => None,
    }
}

/// Validates one file; `Ok(summary)` or every problem.
pub fn check_file(path: &Path) -> Result<String, ConfigError> {
    let name = path.display().to_string();
    let text = teeway_runtime::config::read_file(path)?;
    match detect(&text) {
        Some(Kind::Agent) => AgentConfig::from_file(path).map(|c| {
            let gateway = c
                .gateway
                .as_ref()
                .map_or("none".to_owned(), |g| {
                    let spool = g.spool.as_ref().map_or(String::new(), |s| {
                        format!(
                            " (spool {}, up to {})",
                            s.dir.display(),
                            teeway_runtime::units::format_size(s.max_bytes)
                        )
                    });
                    format!("{}:{}{spool}", g.host, g.port)
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
                            "{} {} -> {}:{} {}%",
                            t.name, t.listen, t.primary.0, t.primary.1, t.percentage
                        )
                    })
                    .collect();
                format!(", tcp [{}]", list.join("; "))
            };
            format!(
                "agent config: cluster {}, {http}{tcp}, gateway {gateway}, archive {archive}, mirroring {}%",
                c.cluster, c.mirror.policy.percentage
            )
        }),
        Some(Kind::Gateway) => GatewayConfig::from_file(path).map(|c| {
            let targets: usize = c.routes.iter().map(|r| r.targets.len()).sum();
            let tcp = if c.tcp_routes.is_empty() {
                String::new()
            } else {
                format!(", {} tcp routes", c.tcp_routes.len())
            };
            let archive = c
                .archive
                .as_ref()
                .map_or("off".to_owned(), |a| a.dir.display().to_string());
            format!(
                "gateway config: listen {}, {} routes, {targets} targets{tcp}, archive {archive}",
                c.listen,
                c.routes.len()
            )
        }),
        None => Err(ConfigError::unreadable(
            &name,
            "cannot tell whether this is an agent or a gateway configuration",
            "an agent configuration has `primary:`, a gateway configuration has `routes:` and `tls:`",
        )),
    }
}
