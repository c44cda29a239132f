//! Certificate generation: a CA, a gateway server certificate and agent client certificates.
//!
//! Used by `teeway certs init`, by `teeway demo` (everything in memory) and by the tests, which
//! make their own certificates at run time: no private key is ever committed.
//!
//! An agent's identity is the first DNS name in its certificate's subject alternative names
//! (also its common name); the gateway reads it back with [`crate::tls::peer_identity`].

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::error::TlsError;

/// A certificate with its private key, as PEM text and as DER.
pub struct CertifiedKey {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key (PKCS#8), PEM.
    pub key_pem: String,
    der: Vec<u8>,
    key_der: Vec<u8>,
}

impl CertifiedKey {
    /// The certificate, DER.
    pub fn cert_der(&self) -> CertificateDer<'static> {
        CertificateDer::from(self.der.clone())
    }

    /// The private key, DER.
    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

impl std::fmt::Debug for CertifiedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("CertifiedKey").finish_non_exhaustive()
    }
}

/// Default validity of a CA made by [`CertificateAuthority::generate`]: ten years.
pub const DEFAULT_CA_DAYS: u32 = 3650;
/// Default validity of the gateway and agent certificates it signs: one year, renewed well
/// before (cert-manager's default `renewBefore` is a third of the lifetime).
pub const DEFAULT_LEAF_DAYS: u32 = 365;
/// Certificates start this far in the past, so a peer whose clock is a little behind takes them.
const CLOCK_SKEW: time::Duration = time::Duration::minutes(5);

/// A certificate authority able to sign gateway and agent certificates.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    /// The CA's own certificate and key.
    pub certified: CertifiedKey,
    /// Validity of the certificates it signs, in days.
    leaf_days: u32,
}

impl CertificateAuthority {
    /// Makes a new self-signed CA whose subject is `common_name`.
    pub fn generate(common_name: &str) -> Result<Self, TlsError> {
        Self::generate_for(common_name, DEFAULT_CA_DAYS)
    }

    /// Makes a new self-signed CA valid for `days` days from now.
    pub fn generate_for(common_name: &str, days: u32) -> Result<Self, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        (params.not_before, params.not_after) = validity(days);
        params.distinguished_name = name(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key)?;
        let certified = CertifiedKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
            key_der: key.serialize_der(),
        };
        Ok(Self {
            issuer: Issuer::new(params, key),
            certified,
            leaf_days: DEFAULT_LEAF_DAYS,
        })
    }

    /// The same CA, signing certificates valid for `days` days.
    pub fn with_leaf_days(mut self, days: u32) -> Self {
        self.leaf_days = days;
        self
    }

    /// Loads an existing CA from its PEM certificate and key, to sign more certificates with it.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let key = KeyPair::from_pem(key_pem)?;
        let key_der = key.serialize_der();
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|_| rcgen::Error::CouldNotParseCertificate)?
            .to_vec();
        Ok(Self {
            issuer,
            certified: CertifiedKey {
                cert_pem: cert_pem.to_owned(),
                key_pem: key_pem.to_owned(),
                der,
                key_der,
            },
            leaf_days: DEFAULT_LEAF_DAYS,
        })
    }

    /// Signs a gateway (server) certificate. It always covers `localhost` and `127.0.0.1` and
    /// `::1`, plus `names` (DNS names or IP addresses).
    pub fn gateway(&self, names: &[String]) -> Result<CertifiedKey, TlsError> {
        let mut sans = vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ];
        for n in names {
            if !sans.contains(n) {
                sans.push(n.clone());
            }
        }
        let common_name = names.first().map_or("localhost", String::as_str);
        self.leaf(sans, common_name, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// Signs an agent (client) certificate whose identity is `identity`.
    pub fn agent(&self, identity: &str) -> Result<CertifiedKey, TlsError> {
        self.leaf(
            vec![identity.to_owned()],
            identity,
            ExtendedKeyUsagePurpose::ClientAuth,
        )
    }

    /// Signs an agent certificate that expired in 2021: for checking that peers refuse one.
    pub fn expired_agent(&self, identity: &str) -> Result<CertifiedKey, TlsError> {
        self.leaf_valid(
            vec![identity.to_owned()],
            identity,
            ExtendedKeyUsagePurpose::ClientAuth,
            true,
        )
    }

    fn leaf(
        &self,
        sans: Vec<String>,
        common_name: &str,
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<CertifiedKey, TlsError> {
        self.leaf_valid(sans, common_name, usage, false)
    }

    fn leaf_valid(
        &self,
        sans: Vec<String>,
        common_name: &str,
        usage: ExtendedKeyUsagePurpose,
        expired: bool,
    ) -> Result<CertifiedKey, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(sans)?;
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        } else {
            (params.not_before, params.not_after) = validity(self.leaf_days);
        }
        params.distinguished_name = name(common_name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CertifiedKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
            key_der: key.serialize_der(),
        })
    }
}

/// From a few minutes ago (clock skew) to `days` days from now.
fn validity(days: u32) -> (time::OffsetDateTime, time::OffsetDateTime) {
    let now = time::OffsetDateTime::now_utc();
    (
        now - CLOCK_SKEW,
        now + time::Duration::days(i64::from(days)),
    )
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "teeway");
    dn.push(DnType::CommonName, common_name);
    dn
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_identity_is_readable_back() {
        let ca = CertificateAuthority::generate("test CA").expect("ca");
        let agent = ca.agent("prod-eu-1").expect("agent");
        assert_eq!(
            crate::tls::peer_identity(&agent.cert_der()).as_deref(),
            Some("prod-eu-1")
        );
    }

    #[test]
    fn ca_reloads_from_pem_and_signs() {
        let ca = CertificateAuthority::generate("test CA").expect("ca");
        let again = CertificateAuthority::from_pem(&ca.certified.cert_pem, &ca.certified.key_pem)
            .expect("reload");
        let gw = again.gateway(&["gw.test".into()]).expect("gateway");
        assert!(gw.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(!format!("{gw:?}").contains("PRIVATE"), "debug hides keys");
    }
}
