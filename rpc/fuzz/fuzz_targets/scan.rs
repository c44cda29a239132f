//! Fuzzes the RPC scanners with the bytes a client (or a shadow) could send: the first byte picks
//! the codec, the second the size of the pieces the rest is fed in, as the kernel could cut it.
//!
//! Properties: no scanner panics; the same stream fed whole and fed in pieces gives the same
//! message ends and fails at the same place, so what is copied never depends on how reads were
//! split; every Redis message the scanner delimits can be parsed as a command without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use teeway_rpc::{dubbo, redis, thrift, CodecError};

/// The message ends `feed` finds in `stream` fed `piece` bytes at a time, and whether it failed.
fn ends(
    stream: &[u8],
    piece: usize,
    mut feed: impl FnMut(&[u8]) -> Result<Option<usize>, CodecError>,
) -> (Vec<usize>, bool) {
    let mut found = Vec::new();
    let mut start = 0;
    while start < stream.len() {
        let end = (start + piece).min(stream.len());
        let mut at = start;
        while at < end {
            match feed(&stream[at..end]) {
                Ok(Some(0)) => return (found, true),
                Ok(Some(n)) => {
                    at += n;
                    found.push(at);
                }
                Ok(None) => at = end,
                Err(_) => return (found, true),
            }
        }
        start = end;
    }
    (found, false)
}

fuzz_target!(|data: &[u8]| {
    let [codec, piece, stream @ ..] = data else {
        return;
    };
    let piece = usize::from(*piece).max(1);
    // The message ends of two scanners made by `new`, one fed whole and one in pieces.
    fn both<S>(
        stream: &[u8],
        piece: usize,
        new: impl Fn() -> S,
        feed: impl Fn(&mut S, &[u8]) -> Result<Option<usize>, CodecError>,
        what: &str,
    ) -> Vec<usize> {
        let (mut a, mut b) = (new(), new());
        let whole = ends(stream, stream.len().max(1), |c| feed(&mut a, c));
        let pieces = ends(stream, piece, |c| feed(&mut b, c));
        assert_eq!(whole, pieces, "{what}: chunking changed the message ends");
        whole.0
    }
    match codec % 7 {
        side @ (0 | 1) => {
            let side = if side == 0 {
                redis::Side::Client
            } else {
                redis::Side::Server
            };
            let found = both(
                stream,
                piece,
                || redis::Scanner::new(side),
                redis::Scanner::feed,
                "redis",
            );
            let mut from = 0;
            for end in found {
                if let Some(command) = redis::Command::parse(&stream[from..end], 16) {
                    let _ = command.first_key();
                }
                from = end;
            }
        }
        code @ 2..=5 => {
            let codec = thrift::Codec::from_code(code - 2);
            both(
                stream,
                piece,
                || thrift::Scanner::new(codec),
                thrift::Scanner::feed,
                "thrift",
            );
            let _ = thrift::Codec::detect(stream);
        }
        _ => {
            both(
                stream,
                piece,
                dubbo::Scanner::new,
                dubbo::Scanner::feed,
                "dubbo",
            );
        }
    }
});
