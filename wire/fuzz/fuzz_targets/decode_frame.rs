//! Fuzzes the frame decoder with the bytes a peer could send on a stream.
//!
//! Properties: decoding never panics, and every frame it accepts survives a round trip
//! (encode, then decode again, gives the same frame), so a record is never altered in transit by
//! the codec. Byte identity is not expected: readers ignore unknown flag bits and normalise
//! header-name case, both on purpose.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use teeway_wire::Frame;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = Frame::decode(&mut buf) {
        let mut again = BytesMut::new();
        frame.encode(&mut again);
        let reread = Frame::decode(&mut again).expect("re-encoded frame decodes");
        assert_eq!(reread.as_ref(), Some(&frame), "round trip changed the frame");
        assert!(again.is_empty());
    }
});
