//! Fuzzes the native segment reader with arbitrary file contents.
//!
//! Properties: reading never panics and always ends; every record it returns re-encodes to a
//! record that reads back equal (a returned record passed both checksums, so it is exactly what a
//! writer wrote).
#![no_main]

use libfuzzer_sys::fuzz_target;
use teeway_archive::native::{self, Next, SegmentReader};

fuzz_target!(|data: &[u8]| {
    let Ok(mut reader) = SegmentReader::new(data) else {
        return;
    };
    let mut steps = 0usize;
    loop {
        steps += 1;
        assert!(steps <= data.len() + 1, "reader does not advance");
        match reader.next_record() {
            Next::End => break,
            Next::Record(record) => {
                let mut again = bytes::BytesMut::new();
                native::put_segment_header(&mut again);
                native::put_record(&record, &mut again);
                let mut reread = SegmentReader::new(&again[..]).expect("header");
                match reread.next_record() {
                    Next::Record(back) => assert_eq!(back, record),
                    other => panic!("re-encoded record does not read back: {other:?}"),
                }
            }
            Next::Skipped { .. } | Next::Stopped { .. } => {}
        }
    }
});
