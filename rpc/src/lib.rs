//! teeway's RPC codecs, sans-IO: each finds the boundaries of the messages a byte stream carries
//! and reads what mirroring decides on (a command, a key, a service and method), never changing
//! a byte. The agent runs them beside its byte proxy ([`redis::Scanner`] on what clients send),
//! the gateway on what shadows answer.
//!
//! A codec is fed the stream in whatever pieces it arrives in and remembers where it is, so a
//! message larger than anything kept is still delimited (and skipped) without being held.

pub mod dubbo;
pub mod redis;
pub mod thrift;

/// What a stream broke: the codec cannot tell where its messages end any more.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// A byte that cannot start or continue a message here.
    #[error("unexpected byte {byte:#04x} {at}")]
    Unexpected {
        /// The byte.
        byte: u8,
        /// Where it was.
        at: &'static str,
    },
    /// A length or count that is not a number, or is out of range.
    #[error("bad {what}")]
    BadNumber {
        /// Which number.
        what: &'static str,
    },
    /// A line longer than the protocol allows.
    #[error("{what} longer than {limit} bytes")]
    LineTooLong {
        /// Which line.
        what: &'static str,
        /// The limit.
        limit: usize,
    },
    /// Values nested deeper than the codec follows.
    #[error("values nested deeper than {0}")]
    TooDeep(usize),
}
