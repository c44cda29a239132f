//! Fuzzes the gor splitter and record parser with arbitrary file contents.
//!
//! Properties: splitting and parsing never panic and always end; every parsed request written
//! back in gor form parses again to the same method, target and body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use teeway_archive::gor::{self, Raw, Splitter};
use teeway_archive::Envelope;

fuzz_target!(|data: &[u8]| {
    let mut splitter = Splitter::new(data);
    while let Ok(Some(raw)) = splitter.next_raw() {
        let Raw::Complete(bytes) = raw else { continue };
        let Ok(record) = gor::parse_record(&bytes) else {
            continue;
        };
        let mut again = Vec::new();
        gor::put_record(&record, &mut again);
        let body = &again[..again.len() - gor::SEPARATOR.len()];
        if let (Envelope::HttpRequest(a), Ok(Envelope::HttpRequest(b))) = (&record, gor::parse_record(body)) {
            assert_eq!((&a.method, &a.uri, &a.body), (&b.method, &b.uri, &b.body));
        }
    }
});
