//! Name resolution with hickory-resolver.
//!
//! One [`Resolver`] per process, cloned freely (it is a handle). IP literals never reach DNS.
//! `/etc/hosts` is honoured and answers are cached by TTL inside hickory. Without a usable
//! `/etc/resolv.conf` the resolver still answers from `/etc/hosts` and literals, and says so.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;

/// Why a name could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The DNS lookup failed.
    #[error("cannot resolve `{host}`: {reason}")]
    Lookup {
        /// The name.
        host: String,
        /// hickory's explanation.
        reason: String,
    },
    /// The resolver itself could not be set up.
    #[error("cannot set up the DNS resolver: {0}")]
    Setup(String),
    /// The name exists but has no address.
    #[error("`{host}` has no addresses")]
    NoAddresses {
        /// The name.
        host: String,
    },
}

/// A cloneable DNS resolver handle.
#[derive(Clone)]
pub struct Resolver {
    inner: TokioResolver,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver").finish_non_exhaustive()
    }
}

impl Resolver {
    /// A resolver configured from the system (`/etc/resolv.conf`, `/etc/hosts`).
    pub fn from_system() -> Result<Self, ResolveError> {
        let built = TokioResolver::builder_tokio().and_then(|b| b.build());
        let inner = match built {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "no usable system DNS configuration; resolving from /etc/hosts and IP literals only");
                let config = ResolverConfig::from_parts(None, vec![], vec![]);
                TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
                    .build()
                    .map_err(|e| ResolveError::Setup(e.to_string()))?
            }
        };
        Ok(Self { inner })
    }

    /// A resolver that asks only `nameservers` (UDP, then TCP for truncated answers), for
    /// names that live in a DNS other than the system's (a service registry's, say). `/etc/hosts`
    /// is still honoured.
    pub fn with_nameservers(nameservers: &[SocketAddr]) -> Result<Self, ResolveError> {
        let servers = nameservers
            .iter()
            .map(|addr| {
                let mut server = NameServerConfig::udp_and_tcp(addr.ip());
                for connection in &mut server.connections {
                    connection.port = addr.port();
                }
                server
            })
            .collect();
        let config = ResolverConfig::from_parts(None, vec![], servers);
        let inner = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
            .build()
            .map_err(|e| ResolveError::Setup(e.to_string()))?;
        Ok(Self { inner })
    }

    /// Every address of `host` with `port` (an IP literal is returned as is, without a lookup).
    pub async fn lookup(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, ResolveError> {
        Ok(self.lookup_until(host, port).await?.0)
    }

    /// Every address of `host` with `port`, and until when the answer is valid (its TTL; an IP
    /// literal is valid for a day).
    pub async fn lookup_until(
        &self,
        host: &str,
        port: u16,
    ) -> Result<(Vec<SocketAddr>, Instant), ResolveError> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Ok((
                vec![SocketAddr::new(ip, port)],
                Instant::now() + Duration::from_secs(86_400),
            ));
        }
        let answer = self
            .inner
            .lookup_ip(host)
            .await
            .map_err(|e| ResolveError::Lookup {
                host: host.to_owned(),
                reason: e.to_string(),
            })?;
        let addrs: Vec<SocketAddr> = answer.iter().map(|ip| SocketAddr::new(ip, port)).collect();
        if addrs.is_empty() {
            return Err(ResolveError::NoAddresses {
                host: host.to_owned(),
            });
        }
        Ok((addrs, answer.valid_until()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn literals_and_localhost_resolve_without_dns() {
        let r = Resolver::from_system().expect("resolver");
        assert_eq!(
            r.lookup("127.0.0.1", 80).await.expect("v4"),
            vec!["127.0.0.1:80".parse().expect("addr")]
        );
        assert_eq!(
            r.lookup("[::1]", 81).await.expect("v6"),
            vec!["[::1]:81".parse().expect("addr")]
        );
        let local = r.lookup("localhost", 82).await.expect("localhost");
        assert!(
            local.iter().all(|a| a.ip().is_loopback() && a.port() == 82),
            "{local:?}"
        );
    }
}
