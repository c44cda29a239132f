//! Errors of the protocol crate.
//!
//! [`DecodeError`] is returned on the per-frame hot path, so it carries only copyable context
//! (static field names, numbers) and never allocates.

use std::path::PathBuf;

/// Why bytes read from a peer are not a valid frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The length prefix announces a frame larger than the protocol allows.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// Announced length.
        len: u32,
        /// The protocol limit.
        max: u32,
    },
    /// A frame with a length prefix of zero has no type byte.
    #[error("empty frame")]
    EmptyFrame,
    /// The frame type byte is not one this protocol version knows.
    #[error("unknown frame type {0:#04x}")]
    UnknownFrameType(u8),
    /// The frame ended before the named field was complete.
    #[error("frame ends inside field `{0}`")]
    Truncated(&'static str),
    /// The frame has bytes left over after its last field.
    #[error("{0} bytes left over at the end of the frame")]
    TrailingBytes(usize),
    /// A field's value is outside what the protocol allows.
    #[error("field `{0}` is out of range")]
    OutOfRange(&'static str),
    /// A text field is not UTF-8.
    #[error("field `{0}` is not valid UTF-8")]
    InvalidUtf8(&'static str),
    /// The HTTP method is not a valid token.
    #[error("invalid HTTP method")]
    InvalidMethod,
    /// The request URI does not parse.
    #[error("invalid request URI")]
    InvalidUri,
    /// The HTTP status code is out of range.
    #[error("invalid HTTP status {0}")]
    InvalidStatus(u16),
    /// The HTTP version code is not known.
    #[error("unknown HTTP version code {0}")]
    InvalidVersion(u8),
    /// A header name is not a valid token.
    #[error("invalid header name")]
    InvalidHeaderName,
    /// A header value holds bytes HTTP does not allow.
    #[error("invalid header value")]
    InvalidHeaderValue,
}

/// Why TLS material could not be loaded or a TLS configuration not built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A PEM file holds no item of the expected kind, or a malformed one.
    #[error("{path} holds no usable {what}: {detail}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was expected in it ("certificate", "private key").
        what: &'static str,
        /// What went wrong.
        detail: String,
    },
    /// rustls refused the material (a key that does not match the certificate, a bad CA).
    #[error("{context}: {source}")]
    Rustls {
        /// What was being built.
        context: &'static str,
        /// rustls' error.
        source: rustls::Error,
    },
    /// The client-certificate verifier could not be built from the CA bundle.
    #[error("cannot build the client certificate verifier: {0}")]
    Verifier(String),
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}
