//! Errors of the gateway.

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// TLS material could not be turned into a QUIC server configuration.
    #[error("cannot build the QUIC server TLS configuration: {0}")]
    Tls(String),
    /// The QUIC endpoint could not be created on the bound socket.
    #[error("cannot start the QUIC endpoint: {0}")]
    Endpoint(std::io::Error),
    /// The DNS resolver could not be set up.
    #[error(transparent)]
    Resolve(#[from] teeway_runtime::dns::ResolveError),
    /// A target URL could not be used.
    #[error("target `{url}` cannot be used: {reason}")]
    Target {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The archive directory could not be prepared.
    #[error("archive: {0}")]
    Archive(std::io::Error),
}
