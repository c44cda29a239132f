//! rustls configurations for both ends of the uplink, and the agent identity in a certificate.
//!
//! Both ends use TLS 1.3 only (QUIC requires it), the ring crypto provider passed explicitly (so
//! a second provider compiled in by a dependency can never be picked by accident) and the ALPN id
//! [`crate::ALPN`]. The gateway requires a client certificate signed by its CA; the agent verifies
//! the gateway's certificate against the same CA.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::TlsError;
use crate::pki::CertifiedKey;

/// The crypto provider every teeway TLS configuration uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs ring as the process's default rustls provider, so that no code path can pick another
/// provider a dependency compiled in. Every config here passes [`provider`] explicitly anyway;
/// this covers libraries that ask rustls for its default. Calling it twice is harmless.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Which end of the uplink TLS material is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The client end: presents its certificate, verifies the gateway's.
    Agent,
    /// The server end: requires and verifies agents' certificates.
    Gateway,
}

/// A CA bundle, a certificate chain and its private key: what each end needs.
#[derive(Debug)]
pub struct TlsMaterial {
    /// Certificates of the CA(s) the peer must chain to.
    pub ca: Vec<CertificateDer<'static>>,
    /// This end's certificate chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// This end's private key.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for TlsMaterial {
    fn clone(&self) -> Self {
        Self {
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl TlsMaterial {
    /// Whether both hold the same CA bundle, chain and key (a reload compares them).
    pub fn same_as(&self, other: &Self) -> bool {
        self.ca == other.ca
            && self.chain == other.chain
            && self.key.secret_der() == other.key.secret_der()
    }

    /// Reads the three PEM files.
    pub fn from_files(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        Ok(Self {
            ca: load_certs(ca)?,
            chain: load_certs(cert)?,
            key: load_key(key)?,
        })
    }

    /// Reads the three PEM files and checks that they make a working configuration for `role`
    /// (certificate and key belong together, the CA is usable): what a config file is validated
    /// with, so a bad certificate is reported before anything binds.
    pub fn load_checked(ca: &Path, cert: &Path, key: &Path, role: Role) -> Result<Self, TlsError> {
        let material = Self::from_files(ca, cert, key)?;
        match role {
            Role::Agent => client_config(&material).map(drop)?,
            Role::Gateway => server_config(&material).map(drop)?,
        }
        Ok(material)
    }

    /// Material made in memory from a CA and one of its leaves (demo and tests).
    pub fn from_generated(ca: &CertifiedKey, leaf: &CertifiedKey) -> Self {
        Self {
            ca: vec![ca.cert_der()],
            chain: vec![leaf.cert_der()],
            key: leaf.key_der(),
        }
    }

    fn roots(&self) -> Result<RootCertStore, TlsError> {
        let mut roots = RootCertStore::empty();
        for cert in &self.ca {
            roots.add(cert.clone()).map_err(|source| TlsError::Rustls {
                context: "cannot use the CA certificate",
                source,
            })?;
        }
        Ok(roots)
    }
}

/// Reads every certificate in a PEM file; at least one is required.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            what: "certificate",
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            what: "certificate",
            detail: "no `BEGIN CERTIFICATE` block found".into(),
        });
    }
    Ok(certs)
}

/// Reads the first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Pem {
        path: path.to_owned(),
        what: "private key",
        detail: e.to_string(),
    })
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: PathBuf::from(path),
        source,
    })
}

/// The gateway's configuration: client certificates required and verified against the CA.
pub fn server_config(material: &TlsMaterial) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(material.roots()?), provider.clone())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Rustls {
            context: "cannot enable TLS 1.3",
            source,
        })?
        .with_client_cert_verifier(verifier)
        .with_single_cert(material.chain.clone(), material.key.clone_key())
        .map_err(|source| TlsError::Rustls {
            context: "the gateway certificate and key do not fit together",
            source,
        })?;
    // Newest first: rustls picks the server's first protocol the client offers.
    config.alpn_protocols = vec![
        crate::ALPN.to_vec(),
        crate::ALPN_V5.to_vec(),
        crate::ALPN_V4.to_vec(),
        crate::ALPN_V3.to_vec(),
        crate::ALPN_V2.to_vec(),
        crate::ALPN_V1.to_vec(),
    ];
    Ok(config)
}

/// A public HTTPS listener's configuration (the agent's `listen_tls`): TLS 1.2 and 1.3, no client
/// certificate, ALPN `h2` then `http/1.1`, from a PEM certificate chain and key.
pub fn https_server_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, TlsError> {
    let chain = load_certs(cert)?;
    let key = load_key(key)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rustls {
            context: "cannot enable TLS",
            source,
        })?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|source| TlsError::Rustls {
            context: "the certificate and key do not fit together",
            source,
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The agent's configuration: presents its certificate, trusts only the CA.
pub fn client_config(material: &TlsMaterial) -> Result<rustls::ClientConfig, TlsError> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Rustls {
            context: "cannot enable TLS 1.3",
            source,
        })?
        .with_root_certificates(material.roots()?)
        .with_client_auth_cert(material.chain.clone(), material.key.clone_key())
        .map_err(|source| TlsError::Rustls {
            context: "the agent certificate and key do not fit together",
            source,
        })?;
    // Version 2 too: an agent upgraded before its gateway still mirrors (without naming its
    // batches).
    config.alpn_protocols = vec![
        crate::ALPN.to_vec(),
        crate::ALPN_V5.to_vec(),
        crate::ALPN_V4.to_vec(),
        crate::ALPN_V3.to_vec(),
        crate::ALPN_V2.to_vec(),
    ];
    Ok(config)
}

/// Which certificates an `https://` upstream (a primary or a gateway target) must chain to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamTrust {
    /// The operating system's CA store (`/etc/ssl/certs` and the like, via rustls-native-certs).
    System,
    /// Only the CA certificates in this PEM bundle (a cluster-internal CA, say).
    Bundle(PathBuf),
}

/// Client configurations for TLS to one upstream, one per HTTP version so that ALPN offers what
/// the connection will speak: `http1` offers `http/1.1`, `http2` offers `h2`. TLS 1.2 and 1.3,
/// no client certificate.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    /// For connections that speak HTTP/1.1.
    pub http1: Arc<rustls::ClientConfig>,
    /// For connections that speak HTTP/2.
    pub http2: Arc<rustls::ClientConfig>,
}

/// Builds [`UpstreamTls`] trusting `trust`. A bundle must hold at least one usable CA; the system
/// store must hold at least one certificate rustls accepts (the error says to name a bundle).
pub fn upstream_tls(trust: &UpstreamTrust) -> Result<UpstreamTls, TlsError> {
    let mut roots = RootCertStore::empty();
    match trust {
        UpstreamTrust::Bundle(path) => {
            for cert in load_certs(path)? {
                roots.add(cert).map_err(|source| TlsError::Rustls {
                    context: "a CA certificate in the bundle is not usable",
                    source,
                })?;
            }
        }
        UpstreamTrust::System => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _ignored) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let detail = match found.errors.first() {
                    Some(e) => format!("none usable ({e}); name a CA bundle with `ca:`"),
                    None => {
                        "none found; install ca-certificates or name a CA bundle with `ca:`".into()
                    }
                };
                return Err(TlsError::Pem {
                    path: PathBuf::from("the system CA store"),
                    what: "CA certificate",
                    detail,
                });
            }
        }
    }
    let roots = Arc::new(roots);
    let build = |alpn: &[u8]| -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|source| TlsError::Rustls {
                context: "cannot enable TLS",
                source,
            })?
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(Arc::new(config))
    };
    Ok(UpstreamTls {
        http1: build(b"http/1.1")?,
        http2: build(b"h2")?,
    })
}

/// When a certificate stops being valid (`notAfter`), in seconds since the Unix epoch; `None`
/// when it does not parse.
pub fn not_after(cert: &CertificateDer<'_>) -> Option<i64> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(parsed.validity().not_after.timestamp())
}

/// The agent identity in a certificate: its first DNS subject alternative name, else its common
/// name. `None` when the certificate does not parse or names nothing.
pub fn peer_identity(cert: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::extensions::GeneralName;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(dns) = name {
                return Some((*dns).to_owned());
            }
        }
    }
    let common_name = parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned);
    common_name
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::CertificateAuthority;

    #[test]
    fn configs_build_from_generated_material_and_offer_alpn() {
        let ca = CertificateAuthority::generate("ca").expect("ca");
        let gw = ca.gateway(&[]).expect("gateway");
        let agent = ca.agent("agent").expect("agent");
        let server =
            server_config(&TlsMaterial::from_generated(&ca.certified, &gw)).expect("server");
        let client =
            client_config(&TlsMaterial::from_generated(&ca.certified, &agent)).expect("client");
        assert_eq!(
            server.alpn_protocols,
            vec![
                b"teeway/6".to_vec(),
                b"teeway/5".to_vec(),
                b"teeway/4".to_vec(),
                b"teeway/3".to_vec(),
                b"teeway/2".to_vec(),
                b"teeway/1".to_vec()
            ]
        );
        assert_eq!(
            client.alpn_protocols,
            vec![
                b"teeway/6".to_vec(),
                b"teeway/5".to_vec(),
                b"teeway/4".to_vec(),
                b"teeway/3".to_vec(),
                b"teeway/2".to_vec()
            ],
            "an agent also speaks version 2 to a gateway not yet upgraded"
        );
    }

    #[test]
    fn mismatched_key_is_refused() {
        let ca = CertificateAuthority::generate("ca").expect("ca");
        let gw = ca.gateway(&[]).expect("gateway");
        let other = ca.gateway(&[]).expect("other");
        let material = TlsMaterial {
            ca: vec![ca.certified.cert_der()],
            chain: vec![gw.cert_der()],
            key: other.key_der(),
        };
        let err = server_config(&material).expect_err("key does not match");
        assert!(err.to_string().contains("do not fit together"), "{err}");
    }

    #[test]
    fn files_load_and_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("teeway-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let ca = CertificateAuthority::generate("ca").expect("ca");
        let agent = ca.agent("a").expect("agent");
        std::fs::write(dir.join("ca.pem"), &ca.certified.cert_pem).expect("write");
        std::fs::write(dir.join("a.pem"), &agent.cert_pem).expect("write");
        std::fs::write(dir.join("a.key"), &agent.key_pem).expect("write");
        std::fs::write(dir.join("empty.pem"), "nothing here").expect("write");
        let m =
            TlsMaterial::from_files(&dir.join("ca.pem"), &dir.join("a.pem"), &dir.join("a.key"))
                .expect("loads");
        assert_eq!(m.chain.len(), 1);
        let err = load_certs(&dir.join("empty.pem")).expect_err("no cert");
        assert!(err.to_string().contains("empty.pem"), "{err}");
        let err = load_key(&dir.join("missing.key")).expect_err("missing");
        assert!(err.to_string().contains("missing.key"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
