//! Fuzzes the scrubbing of Dubbo attachments, the rewrite that keeps secrets in production:
//! the first byte picks masking or removal, the rest is an invocation's Hessian2 body.
//!
//! Properties: nothing panics; whenever the agent would scrub (the attachments are
//! `redactable`), the rewritten message has a header whose length is its body's, reads as the
//! same call, carries no secret attachment's value (removed, or the mask), and keeps every other
//! attachment as it was, in order.
#![no_main]

use libfuzzer_sys::fuzz_target;
use teeway_rpc::dubbo::{self, Attachment, Invocation};

fn secret(name: &str) -> bool {
    ["token", "password"]
        .iter()
        .any(|s| name.eq_ignore_ascii_case(s))
}

fn kept(attachments: &[Attachment]) -> Vec<(&str, Option<&str>, bool)> {
    attachments
        .iter()
        .filter(|a| !secret(&a.name))
        .map(|a| (a.name.as_str(), a.value.as_deref(), a.null))
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let [how, body @ ..] = data else {
        return;
    };
    let mask = (how & 1 == 1).then_some("***");
    let Ok(len) = u32::try_from(body.len()) else {
        return;
    };
    // A two-way Hessian2 request, id 1.
    let mut message = vec![0xda, 0xbb, 0xc2, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    message.extend_from_slice(&len.to_be_bytes());
    message.extend_from_slice(body);
    let Ok(call) = Invocation::read(body) else {
        return;
    };
    if !call.redactable(secret) {
        return;
    }
    let Some(out) = call.redacted(&message, secret, mask) else {
        assert!(
            !call.attachments.iter().any(|a| secret(&a.name)),
            "a secret attachment was left in place"
        );
        return;
    };
    let header: [u8; dubbo::HEADER_LEN] =
        out[..dubbo::HEADER_LEN].try_into().expect("a whole header");
    let header = dubbo::Header::parse(&header).expect("the header still parses");
    assert_eq!(header.body_len as usize, out.len() - dubbo::HEADER_LEN);
    let again = Invocation::read(&out[dubbo::HEADER_LEN..]).expect("the rewrite reads");
    assert_eq!(
        (&again.service, &again.method, &again.version),
        (&call.service, &call.method, &call.version)
    );
    assert!(again.attachments_read(), "its attachments read again");
    for a in again.attachments.iter().filter(|a| secret(&a.name)) {
        assert_eq!(
            (mask, a.value.as_deref()),
            (Some("***"), Some("***")),
            "a secret left the rewrite: {a:?}"
        );
    }
    assert_eq!(kept(&again.attachments), kept(&call.attachments));
});
