//! The teeway protocol, shared by the agent and the gateway. Sans-IO: nothing here opens a socket.
//!
//! An agent tees copies of production requests to a gateway over one QUIC connection with mutual
//! TLS. The ALPN protocol id [`ALPN`] (`teeway/6`) names the protocol version; every stream on the
//! connection is a sequence of length-prefixed [`Frame`]s. `docs/protocol.md` is the normative
//! description of the bytes; this crate is its reference implementation.
//!
//! # Compatibility rules
//!
//! - The ALPN id carries the major version. A change that an old peer would misread (a new field in
//!   the middle of a frame, a new meaning for an old one) takes a new ALPN id; a gateway may offer
//!   several ids at once, so gateways upgrade before agents.
//! - Within one version, readers ignore flag bits they do not know, and writers never set them.
//! - Unknown frame types are a protocol error: they reset the stream that carried them, never the
//!   connection or the process.
//!
//! # Layout
//!
//! - [`frame`]: the frame codec (`encode` into a `BytesMut`, `decode` out of one), and
//!   [`RequestFrame`], which encodes a request's copy once, while it streams.
//! - [`fields`]: the primitive field codec frames and the native archive share.
//! - [`record`]: [`Envelope`], the one record type that crosses the link and lands in archives:
//!   [`Meta`]data every kind shares, plus a protocol part ([`MirroredRequest`], the copy of one
//!   production HTTP request; [`ResponseRecord`], an answer).
//! - [`envelope`]: the envelope codec, shared by the `ENVELOPE` frame and native archive records.
//! - [`tls`]: rustls configurations for both ends (TLS 1.3, ALPN, client certificates) and the
//!   agent identity read from a peer certificate.
//! - [`pki`]: certificate generation for `teeway certs init`, the demo and the tests.
//! - [`certinfo`]: what a certificate says and whether TLS files work together (`teeway check`).
//! - [`error`]: the errors of this crate.

pub mod certinfo;
pub mod envelope;
pub mod error;
pub mod fields;
pub mod frame;
pub mod pki;
pub mod record;
pub mod tls;

pub use error::{DecodeError, TlsError};
pub use frame::RequestFrame;
pub use frame::{BatchId, Frame, Hello, Shed, TcpOpen, Welcome};
pub use record::{
    Envelope, Meta, MirroredRequest, Production, ResponseOrigin, ResponseRecord, RpcCall,
    RpcProtocol, RpcRequest, Sampling,
};

/// The ALPN protocol id of this protocol version, first in both ends' lists. Version 6 says in
/// `ACK` which records the gateway shed (so agents make fewer copies nobody can take); version 5
/// carries records as envelopes (`ENVELOPE`: metadata every kind shares, then the protocol's part);
/// version 4 added the gateway's instance to `WELCOME` (an agent sends a batch again on a new connection only to
/// the same gateway process); version 3 the `BATCH` frame (batches named, so one sent again is
/// delivered once); version 2 the TCP tee streams (`TCP_OPEN`, `TCP_DATA`).
pub const ALPN: &[u8] = b"teeway/6";

/// The ALPN id of version 5 (`ACK` without `shed`): accepted and offered by both ends, so that
/// either may be upgraded first.
pub const ALPN_V5: &[u8] = b"teeway/5";

/// The ALPN id of version 4 (records as `REQUEST` frames): accepted and offered by both ends, so
/// that either may be upgraded first.
pub const ALPN_V4: &[u8] = b"teeway/4";

/// The ALPN id of version 3 (no gateway instance in `WELCOME`): accepted and offered by both
/// ends, so that either may be upgraded first.
pub const ALPN_V3: &[u8] = b"teeway/3";

/// The ALPN id of version 2 (batches not named): gateways accept it so that older agents keep
/// working, and agents offer it so that they work with a gateway not yet upgraded.
pub const ALPN_V2: &[u8] = b"teeway/2";

/// The ALPN id of version 1 (no TCP tee), still accepted by gateways so that agents released
/// before version 2 keep working while gateways are upgraded first.
pub const ALPN_V1: &[u8] = b"teeway/1";

/// The protocol version number carried in the `HELLO` and `WELCOME` frames.
pub const PROTOCOL_VERSION: u16 = 6;

/// The version an ALPN id names (`None`: not teeway).
pub fn version_of_alpn(alpn: &[u8]) -> Option<u16> {
    match alpn {
        ALPN => Some(6),
        ALPN_V5 => Some(5),
        ALPN_V4 => Some(4),
        ALPN_V3 => Some(3),
        ALPN_V2 => Some(2),
        ALPN_V1 => Some(1),
        _ => None,
    }
}

/// Largest frame a peer may send, length prefix excluded.
///
/// Bodies are capped far below this by the agent (see [`MAX_BODY_BYTES`]); the rest is headroom
/// for headers. A reader refuses anything larger before allocating for it.
pub const MAX_FRAME_LEN: u32 = 16 * 1024 * 1024;

/// Largest request body the agent may be configured to mirror.
///
/// Half of [`MAX_FRAME_LEN`], so that a record with a full body and a full set of headers always
/// fits in one frame.
pub const MAX_BODY_BYTES: u64 = 8 * 1024 * 1024;

/// Largest number of records one stream (one batch) may carry.
pub const MAX_BATCH_RECORDS: usize = 256;

/// Largest number of payload bytes one stream (one batch) may carry, frame prefixes included.
///
/// A single record larger than this travels alone in its own batch.
pub const MAX_BATCH_BYTES: usize = 1024 * 1024;

/// QUIC application error codes used when a stream or connection is closed on purpose.
pub mod codes {
    /// Normal close: the peer is shutting down.
    pub const SHUTDOWN: u32 = 0;
    /// A frame could not be decoded, or arrived where the protocol does not allow it.
    pub const PROTOCOL_ERROR: u32 = 1;
    /// The peer's certificate identity is not allowed to connect.
    pub const NOT_AUTHORIZED: u32 = 2;
    /// The receiver is out of capacity for this stream.
    pub const OVERLOADED: u32 = 3;
    /// A TCP tee stream the gateway will not replay (no route, or none of its targets can take
    /// it); the agent stops copying that connection.
    pub const REFUSED: u32 = 4;
    /// A TCP tee stream the agent gave up (the connection's copy fell behind, or the agent is
    /// stopping): the gateway closes its replay connections without finishing them.
    pub const ABANDONED: u32 = 5;
}
