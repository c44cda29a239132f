//! What a certificate says, and whether a set of TLS files will work together: dates, the CA
//! flag, the extended key usages, whether a key belongs to a certificate, and whether a
//! certificate verifies against a CA bundle the way the peer will verify it.
//!
//! `teeway check` uses these to name, before anything starts, the mistakes that otherwise show
//! only as a refused handshake at run time: an expired or swapped certificate, a leaf given as
//! the CA, a key from another pair, an agent certificate from another CA than the gateway trusts.

use std::sync::Arc;

use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

/// What one certificate says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFacts {
    /// Its subject, as text.
    pub subject: String,
    /// Valid from, seconds since the epoch.
    pub not_before: i64,
    /// Valid until, seconds since the epoch.
    pub not_after: i64,
    /// `basicConstraints` says it is a CA.
    pub is_ca: bool,
    /// `extendedKeyUsage` allows client authentication (`None`: no such extension, any use).
    pub client_auth: Option<bool>,
    /// `extendedKeyUsage` allows server authentication (`None`: no such extension, any use).
    pub server_auth: Option<bool>,
}

/// The facts of a DER certificate; `None` when it does not parse.
pub fn facts(cert: &CertificateDer<'_>) -> Option<CertFacts> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let is_ca = parsed
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|bc| bc.value.ca);
    let eku = parsed.extended_key_usage().ok().flatten();
    Some(CertFacts {
        subject: parsed.subject().to_string(),
        not_before: parsed.validity().not_before.timestamp(),
        not_after: parsed.validity().not_after.timestamp(),
        is_ca,
        client_auth: eku.as_ref().map(|e| e.value.client_auth || e.value.any),
        server_auth: eku.as_ref().map(|e| e.value.server_auth || e.value.any),
    })
}

/// Whether `key` is the private key of the leaf of `chain`.
pub fn keys_match(
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
) -> Result<(), String> {
    let signing = rustls::crypto::ring::sign::any_supported_type(key)
        .map_err(|e| format!("the key cannot be used: {e}"))?;
    rustls::sign::CertifiedKey::new(chain.to_vec(), signing)
        .keys_match()
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => {
                "the key does not belong to the certificate (they come from different pairs)"
                    .to_owned()
            }
            other => other.to_string(),
        })
}

fn roots(ca: &[CertificateDer<'static>]) -> Result<Arc<RootCertStore>, String> {
    let mut store = RootCertStore::empty();
    let (added, _) = store.add_parsable_certificates(ca.iter().cloned());
    if added == 0 {
        return Err("the CA bundle holds no usable certificate".into());
    }
    Ok(Arc::new(store))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Verifies `chain` as the gateway will verify an agent's certificate against its bundle `ca`
/// (chain, dates, clientAuth), at `now`.
pub fn verify_as_client(
    chain: &[CertificateDer<'static>],
    ca: &[CertificateDer<'static>],
    now: UnixTime,
) -> Result<(), String> {
    let (leaf, rest) = chain.split_first().ok_or("no certificate")?;
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider())
        .build()
        .map_err(|e| e.to_string())?;
    verifier
        .verify_client_cert(leaf, rest, now)
        .map(drop)
        .map_err(|e| describe(&e))
}

/// Verifies `chain` as an agent will verify the gateway's certificate against its bundle `ca`
/// and the name `server_name`, at `now`.
pub fn verify_as_server(
    chain: &[CertificateDer<'static>],
    ca: &[CertificateDer<'static>],
    server_name: &str,
    now: UnixTime,
) -> Result<(), String> {
    let (leaf, rest) = chain.split_first().ok_or("no certificate")?;
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|_| format!("`{server_name}` is not a DNS name or IP address"))?;
    let verifier = WebPkiServerVerifier::builder_with_provider(roots(ca)?, provider())
        .build()
        .map_err(|e| e.to_string())?;
    verifier
        .verify_server_cert(leaf, rest, &name, &[], now)
        .map(drop)
        .map_err(|e| describe(&e))
}

/// A verification failure in an operator's words.
fn describe(e: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer | C::BadSignature => {
                "it is not signed by a CA in the bundle (issued by another CA?)".into()
            }
            C::Expired | C::ExpiredContext { .. } => "it has expired".into(),
            C::NotValidYet | C::NotValidYetContext { .. } => "it is not valid yet".into(),
            C::InvalidPurpose | C::InvalidPurposeContext { .. } => {
                "its extendedKeyUsage does not allow this use (client and server certificates swapped?)".into()
            }
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                "it does not carry the name the agent expects (gateway.server_name)".into()
            }
            other => format!("{other:?}"),
        },
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::CertificateAuthority;

    fn now() -> UnixTime {
        UnixTime::now()
    }

    #[test]
    fn facts_tell_cas_leaves_and_usages_apart() {
        let ca = CertificateAuthority::generate("facts CA").expect("ca");
        let agent = ca.agent("prod-eu-1").expect("agent");
        let gateway = ca.gateway(&[]).expect("gateway");
        let c = facts(&ca.certified.cert_der()).expect("parses");
        assert!(c.is_ca);
        let a = facts(&agent.cert_der()).expect("parses");
        assert!(!a.is_ca);
        assert_eq!((a.client_auth, a.server_auth), (Some(true), Some(false)));
        let g = facts(&gateway.cert_der()).expect("parses");
        assert_eq!((g.client_auth, g.server_auth), (Some(false), Some(true)));
    }

    #[test]
    fn verification_names_other_cas_swaps_and_mismatched_keys() {
        crate::tls::install_default_provider();
        let ca = CertificateAuthority::generate("one").expect("ca");
        let other = CertificateAuthority::generate("two").expect("ca");
        let agent = ca.agent("prod-eu-1").expect("agent");
        let gateway = ca.gateway(&["gw.test".into()]).expect("gateway");
        let bundle = [ca.certified.cert_der()];
        let other_bundle = [other.certified.cert_der()];
        assert_eq!(
            verify_as_client(&[agent.cert_der()], &bundle, now()),
            Ok(())
        );
        let e = verify_as_client(&[agent.cert_der()], &other_bundle, now()).expect_err("other CA");
        assert!(e.contains("another CA"), "{e}");
        let e = verify_as_client(&[gateway.cert_der()], &bundle, now()).expect_err("swapped");
        assert!(e.contains("swapped"), "{e}");
        assert_eq!(
            verify_as_server(&[gateway.cert_der()], &bundle, "gw.test", now()),
            Ok(())
        );
        let e = verify_as_server(&[gateway.cert_der()], &bundle, "elsewhere.test", now())
            .expect_err("name");
        assert!(e.contains("server_name"), "{e}");
        assert_eq!(keys_match(&[agent.cert_der()], &agent.key_der()), Ok(()));
        let e = keys_match(&[agent.cert_der()], &gateway.key_der()).expect_err("other pair");
        assert!(e.contains("different pairs"), "{e}");
        let expired = ca.expired_agent("old").expect("expired");
        let e = verify_as_client(&[expired.cert_der()], &bundle, now()).expect_err("expired");
        assert!(e.contains("expired"), "{e}");
    }
}
