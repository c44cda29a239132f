//! Errors of the agent.

use std::net::SocketAddr;
use std::time::Duration;

/// Why the agent could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The uplink could not be set up.
    #[error(transparent)]
    Uplink(#[from] UplinkError),
    /// The DNS resolver could not be set up.
    #[error(transparent)]
    Resolve(#[from] teeway_runtime::dns::ResolveError),
    /// The primary's address could not be used as a URI authority.
    #[error("primary address `{0}` cannot be used as a URI authority")]
    PrimaryAuthority(String),
    /// Neither a primary nor a sink is configured (the config loader refuses this).
    #[error("nothing to serve on listen: set `primary:` or `sink:`")]
    NoFront,
    /// `primary_tls.server_name` is not a name a certificate can carry (checked at load too).
    #[error("primary_tls.server_name: {0}")]
    PrimaryServerName(std::io::Error),
    /// The archive directory could not be prepared.
    #[error("archive: {0}")]
    Archive(std::io::Error),
    /// The spool directory could not be opened.
    #[error("spool: {0}")]
    Spool(std::io::Error),
    /// Neither a gateway nor an archive is configured (the config check prevents this).
    #[error("copies have nowhere to go: set `gateway:` or `archive:`")]
    NoDestination,
}

/// Why a connection to the gateway failed. The uplink logs it and tries again.
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    /// TLS material could not be turned into a QUIC client configuration.
    #[error("cannot build the uplink TLS configuration: {0}")]
    Tls(String),
    /// The gateway's name did not resolve.
    #[error(transparent)]
    Resolve(#[from] teeway_runtime::dns::ResolveError),
    /// The gateway's name resolved to nothing usable.
    #[error("the gateway's name resolved to no address")]
    NoAddress,
    /// No local UDP socket could be bound.
    #[error("cannot open a local UDP socket for QUIC: {0}")]
    Endpoint(std::io::Error),
    /// quinn refused to start the connection (bad server name and the like).
    #[error("cannot connect to gateway {addr}: {source}")]
    Connect {
        /// The gateway address.
        addr: SocketAddr,
        /// quinn's reason.
        source: quinn::ConnectError,
    },
    /// The QUIC or TLS handshake failed, or the connection was closed.
    #[error("connection to gateway {addr} failed: {source}")]
    Connection {
        /// The gateway address.
        addr: SocketAddr,
        /// quinn's reason.
        source: quinn::ConnectionError,
    },
    /// The gateway did not welcome the agent (certificate refused, not authorised, wrong version).
    #[error("gateway {addr} refused the agent: {detail}")]
    Refused {
        /// The gateway address.
        addr: SocketAddr,
        /// What happened.
        detail: String,
    },
    /// The handshake did not finish in time.
    #[error("gateway {addr} did not complete the handshake within {after:?}")]
    Timeout {
        /// The gateway address.
        addr: SocketAddr,
        /// The limit.
        after: Duration,
    },
    /// The TCP connection or its TLS handshake failed (TLS-over-TCP transport).
    #[error("TLS over TCP to gateway {addr} failed: {detail}")]
    Tcp {
        /// The gateway address.
        addr: SocketAddr,
        /// What happened.
        detail: String,
    },
    /// `transport: auto` tried both transports and neither worked.
    #[error("gateway {addr} unreachable over QUIC ({quic}) and over TLS/TCP ({tls})")]
    BothTransports {
        /// The gateway address.
        addr: SocketAddr,
        /// Why QUIC failed.
        quic: String,
        /// Why TLS over TCP failed.
        tls: String,
    },
    /// The gateway sent bytes that are not a valid frame.
    #[error("gateway sent an invalid frame: {0}")]
    Protocol(teeway_wire::DecodeError),
}

impl From<teeway_wire::TlsError> for UplinkError {
    fn from(e: teeway_wire::TlsError) -> Self {
        UplinkError::Tls(e.to_string())
    }
}
