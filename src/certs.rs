//! `teeway certs init`: a CA, a gateway certificate and an agent certificate as PEM files.
//!
//! For development and small deployments; `certs/README.md` covers real clusters (cert-manager,
//! one CA trusted by both clusters, rotation). Private keys are written with mode 0600, and no
//! existing file is overwritten unless `force` is set.

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
        bail!("--agent-name must not be empty");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let ca = CertificateAuthority::generate("teeway CA")?;
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
