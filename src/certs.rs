//! `teeway certs init`: a CA, a gateway certificate and an agent certificate as PEM files;
//! `teeway certs issue`: another agent or gateway certificate from that CA, the CA untouched.
//!
//! For development and small deployments; `certs/README.md` covers real clusters (cert-manager,
//! one CA trusted by both clusters, rotation). Private keys are written with mode 0600, and no
//! existing file is overwritten unless `force` is set (`init --force` replaces the CA too, and
//! says so). Leaves are valid for `--days` (365 by default), the CA for ten years.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use teeway_wire::pki::CertificateAuthority;

/// What `certs init` writes.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Folder to write into (created if missing).
    pub dir: PathBuf,
    /// Extra names (DNS or IP) for the gateway certificate, beside localhost and 127.0.0.1.
    pub gateway_names: Vec<String>,
    /// The agent's identity.
    pub agent_name: String,
    /// Overwrite existing files.
    pub force: bool,
    /// Validity of the gateway and agent certificates, in days.
    pub days: u32,
}

/// The files `certs init` writes, in order.
pub const FILES: [&str; 6] = [
    "ca.pem",
    "ca.key",
    "gateway.pem",
    "gateway.key",
    "agent.pem",
    "agent.key",
];

/// Writes the six files; returns their paths.
pub fn init(options: &InitOptions) -> anyhow::Result<Vec<PathBuf>> {
    let dir = &options.dir;
    let paths: Vec<PathBuf> = FILES.iter().map(|f| dir.join(f)).collect();
    if !options.force {
        let existing: Vec<String> = paths
            .iter()
            .filter(|p| p.exists())
            .map(|p| p.display().to_string())
            .collect();
        if !existing.is_empty() {
            bail!(
                "refusing to overwrite {}; pass --force to replace them (agents and gateways using the old CA will stop trusting each other)",
                existing.join(", ")
            );
        }
    }
    if options.agent_name.trim().is_empty() {
        return Err(crate::usage("--agent-name must not be empty"));
    }
    check_days(options.days)?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    if options.force && paths[0].exists() {
        eprintln!(
            "warning: --force replaces the CA in {}: certificates issued from the old one no longer verify (to add a certificate from the existing CA, use `teeway certs issue`)",
            dir.display()
        );
    }
    let ca = CertificateAuthority::generate("teeway CA")?.with_leaf_days(options.days);
    let gateway = ca.gateway(&options.gateway_names)?;
    let agent = ca.agent(&options.agent_name)?;
    let contents = [
        &ca.certified.cert_pem,
        &ca.certified.key_pem,
        &gateway.cert_pem,
        &gateway.key_pem,
        &agent.cert_pem,
        &agent.key_pem,
    ];
    for (path, text) in paths.iter().zip(contents) {
        let is_key = path.extension().is_some_and(|e| e == "key");
        write_file(path, text, if is_key { 0o600 } else { 0o644 })?;
    }
    Ok(paths)
}

/// What `certs issue` makes.
#[derive(Debug, Clone)]
pub struct IssueOptions {
    /// The folder holding `ca.pem` and `ca.key`; the new files are written there too.
    pub dir: PathBuf,
    /// An agent certificate with this identity (`agent-NAME.pem`, `agent-NAME.key`)...
    pub agent_name: Option<String>,
    /// ...or a gateway certificate for these names (`gateway-FIRST.pem`, `.key`).
    pub gateway_names: Vec<String>,
    /// Validity, in days.
    pub days: u32,
    /// Overwrite existing files of the same name (never the CA).
    pub force: bool,
}

/// Signs one more certificate with the CA in `dir`, leaving the CA as it is; returns the paths
/// written (certificate, key).
pub fn issue(options: &IssueOptions) -> anyhow::Result<Vec<PathBuf>> {
    check_days(options.days)?;
    let dir = &options.dir;
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name)).with_context(|| {
            format!(
                "cannot read {} (issue signs with the CA that `teeway certs init` wrote there)",
                dir.join(name).display()
            )
        })
    };
    let ca = CertificateAuthority::from_pem(&read("ca.pem")?, &read("ca.key")?)
        .context("ca.pem and ca.key do not make a CA")?
        .with_leaf_days(options.days);
    let (stem, certified) = match (&options.agent_name, options.gateway_names.first()) {
        (Some(agent), None) => {
            if !valid_file_stem(agent) {
                return Err(crate::usage(format!(
                    "--agent-name {agent:?}: use letters, digits, `-`, `_`, `.` and `:` only"
                )));
            }
            (format!("agent-{agent}"), ca.agent(agent)?)
        }
        (None, Some(first)) => {
            if !valid_file_stem(first) {
                return Err(crate::usage(format!(
                    "--gateway-name {first:?}: the first name must be a DNS name or IP address"
                )));
            }
            (
                format!("gateway-{first}"),
                ca.gateway(&options.gateway_names)?,
            )
        }
        _ => {
            return Err(crate::usage(
                "give either --agent-name NAME or --gateway-name NAME (repeatable)",
            ))
        }
    };
    let paths = vec![
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}.key")),
    ];
    if !options.force {
        if let Some(existing) = paths.iter().find(|p| p.exists()) {
            bail!(
                "refusing to overwrite {}; pass --force to replace it",
                existing.display()
            );
        }
    }
    write_file(&paths[0], &certified.cert_pem, 0o644)?;
    write_file(&paths[1], &certified.key_pem, 0o600)?;
    Ok(paths)
}

fn valid_file_stem(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
}

fn check_days(days: u32) -> anyhow::Result<()> {
    if !(1..=3650).contains(&days) {
        return Err(crate::usage(format!(
            "--days {days}: give 1 to 3650 (leaf certificates are meant to be renewed)"
        )));
    }
    Ok(())
}

fn write_file(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    // `mode` applies only to new files; an overwritten key gets its mode fixed too.
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
    file.write_all(text.as_bytes())?;
    Ok(())
}
