//! Every codec, fed hostile bytes: the same stream in any chunking gives the same message ends
//! (or the same first error), and nothing panics, however the bytes are cut. The codecs read
//! production traffic, so they must not depend on how the kernel split it, nor fall over on it.

use proptest::prelude::*;

use teeway_rpc::{dubbo, redis, thrift, CodecError};

/// Feeds `stream` in the pieces `cuts` makes, through `feed`; returns each message's end, and
/// the first error (after which a stream is not fed any more).
fn run(
    stream: &[u8],
    cuts: &[usize],
    mut feed: impl FnMut(&[u8]) -> Result<Option<usize>, CodecError>,
) -> (Vec<usize>, bool) {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
    points.push(0);
    points.push(stream.len());
    points.sort_unstable();
    points.dedup();
    let mut ends = Vec::new();
    for pair in points.windows(2) {
        let mut at = pair[0];
        let piece_end = pair[1];
        while at < piece_end {
            match feed(&stream[at..piece_end]) {
                Ok(Some(n)) => {
                    at += n;
                    ends.push(at);
                    if n == 0 {
                        // An empty message cannot end on no bytes: guard against a spin.
                        return (ends, true);
                    }
                }
                Ok(None) => at = piece_end,
                Err(_) => return (ends, true),
            }
        }
    }
    (ends, false)
}

/// Bytes that look like each protocol often enough to go deep into it.
fn resp() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![
            Just(b"*2\r\n".to_vec()),
            Just(b"$3\r\nSET\r\n".to_vec()),
            Just(b"$1\r\nk\r\n".to_vec()),
            Just(b"%1\r\n".to_vec()),
            Just(b"|1\r\n".to_vec()),
            Just(b"+OK\r\n".to_vec()),
            Just(b"-ERR x\r\n".to_vec()),
            Just(b"PING\r\n".to_vec()),
            prop::collection::vec(any::<u8>(), 0..6),
        ],
        0..24,
    )
    .prop_map(|parts| parts.concat())
}

fn any_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..256)
}

fn cuts() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(any::<usize>(), 0..12)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn redis_is_chunking_invariant(stream in resp(), cuts in cuts()) {
        for side in [redis::Side::Client, redis::Side::Server] {
            let mut whole = redis::Scanner::new(side);
            let mut pieces = redis::Scanner::new(side);
            let a = run(&stream, &[], |c| whole.feed(c));
            let b = run(&stream, &cuts, |c| pieces.feed(c));
            prop_assert_eq!(a, b);
        }
        let _ = redis::Command::parse(&stream, 16).map(|c| c.first_key());
    }

    #[test]
    fn thrift_is_chunking_invariant(stream in any_bytes(), cuts in cuts(), code in 0u8..4) {
        let codec = thrift::Codec::from_code(code);
        let mut whole = thrift::Scanner::new(codec);
        let mut pieces = thrift::Scanner::new(codec);
        let a = run(&stream, &[], |c| whole.feed(c));
        let b = run(&stream, &cuts, |c| pieces.feed(c));
        prop_assert_eq!(a, b);
        let _ = thrift::Codec::detect(&stream);
    }

    #[test]
    fn dubbo_is_chunking_invariant(body in any_bytes(), cuts in cuts(), flags in any::<u8>()) {
        // A valid header in front, so that bodies are reached.
        let mut stream = vec![0xda, 0xbb, flags, 20, 0, 0, 0, 0, 0, 0, 0, 1];
        stream.extend((body.len() as u32).to_be_bytes());
        stream.extend(&body);
        let mut whole = dubbo::Scanner::new();
        let mut pieces = dubbo::Scanner::new();
        let a = run(&stream, &[], |c| whole.feed(c));
        let b = run(&stream, &cuts, |c| pieces.feed(c));
        prop_assert_eq!(a, b);
        if let Ok(inv) = dubbo::Invocation::read(&body) {
            let _ = inv.redactable(|_| true);
            let _ = inv.redacted(&stream, |n| n.len() % 2 == 0, Some("x"));
        }
    }
}
