//! Response bodies made comparable: decoded (`gzip`, `deflate`, `br`), then read as what they
//! are: JSON (by `Content-Type`, or by their first byte when the type says nothing), text, gRPC
//! messages with their `grpc-status`, or bytes.
//!
//! Decoding is bounded: a body that decodes to more than the limit is not compared (a small
//! compressed body can hold gigabytes).

use std::io::Read;

use http::header::{CONTENT_ENCODING, CONTENT_TYPE};
use http::HeaderMap;
use serde_json::Value;

/// A body as compared.
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    /// No bytes.
    Empty,
    /// A JSON document.
    Json(Value),
    /// Text (UTF-8).
    Text(String),
    /// gRPC: the call's status (trailers, or headers for a trailers-only answer) and its
    /// messages, each as its bytes.
    Grpc {
        /// `grpc-status`, if sent.
        status: Option<String>,
        /// The length-prefixed messages.
        messages: Vec<Vec<u8>>,
    },
    /// Anything else.
    Binary(Vec<u8>),
}

impl Body {
    /// What kind of body it is, as reports name it.
    pub fn kind(&self) -> &'static str {
        match self {
            Body::Empty => "empty",
            Body::Json(_) => "json",
            Body::Text(_) => "text",
            Body::Grpc { .. } => "grpc",
            Body::Binary(_) => "binary",
        }
    }
}

/// Why a body could not be made comparable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// A `Content-Encoding` this comparison does not decode.
    #[error("content-encoding {0} is not decoded")]
    Encoding(String),
    /// It decodes to more than the limit.
    #[error("decodes to more than {0} bytes")]
    TooLarge(usize),
    /// Its encoding is broken.
    #[error("its {0} encoding is broken")]
    Corrupt(String),
}

impl BodyError {
    /// The `reason` label of a comparison skipped for it.
    pub fn reason(&self) -> &'static str {
        match self {
            BodyError::Encoding(_) => "encoding",
            BodyError::TooLarge(_) => "too_large",
            BodyError::Corrupt(_) => "corrupt",
        }
    }
}

/// `bytes`, sent with `headers` (and `trailers`), decoded to at most `limit` bytes and read.
pub fn read(
    headers: &HeaderMap,
    trailers: Option<&HeaderMap>,
    bytes: &[u8],
    limit: usize,
) -> Result<Body, BodyError> {
    let decoded = decode(headers, bytes, limit)?;
    let content_type = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    if content_type.starts_with("application/grpc") {
        let status = trailers
            .and_then(|t| t.get("grpc-status"))
            .or_else(|| headers.get("grpc-status"))
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        return Ok(Body::Grpc {
            status,
            messages: grpc_messages(&decoded),
        });
    }
    if decoded.is_empty() {
        return Ok(Body::Empty);
    }
    let says_json = content_type.contains("json");
    let looks_json = content_type.is_empty()
        && decoded
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            .is_some_and(|b| matches!(b, b'{' | b'['));
    // A document of more values than MAX_JSON_VALUES is compared as text: parsed, it would take
    // many times its size (tens of bytes a value).
    if (says_json || looks_json) && json_values(&decoded) <= MAX_JSON_VALUES {
        if let Ok(value) = serde_json::from_slice(&decoded) {
            return Ok(Body::Json(value));
        }
    }
    let textual = content_type.starts_with("text/")
        || [
            "json",
            "xml",
            "javascript",
            "x-www-form-urlencoded",
            "yaml",
            "csv",
        ]
        .iter()
        .any(|t| content_type.contains(t))
        || (content_type.is_empty() && !decoded.contains(&0));
    match String::from_utf8(decoded) {
        Ok(text) if textual => Ok(Body::Text(text)),
        Ok(text) => Ok(Body::Binary(text.into_bytes())),
        Err(e) => Ok(Body::Binary(e.into_bytes())),
    }
}

/// Most values a JSON body may hold to be compared field by field.
pub const MAX_JSON_VALUES: usize = 200_000;

/// About how many values a JSON text holds (separators and openings, strings' contents
/// included): an upper bound good enough to refuse a huge document before parsing it.
fn json_values(text: &[u8]) -> usize {
    text.iter()
        .filter(|b| matches!(b, b',' | b'[' | b'{' | b':'))
        .count()
        + 1
}

/// What undoing a body's `Content-Encoding`s came to ([`undo`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Undone {
    /// Every encoding undone.
    Whole,
    /// An encoding not decoded here: the body is as sent.
    Unknown(String),
    /// It decodes to more than the limit: cut there.
    Cut(usize),
    /// An encoding could not be undone: the body is as sent, or, when `partial`, the start that
    /// decoded (a body cut before it was encoded whole, say).
    Broken {
        /// The encoding.
        coding: String,
        /// What the decoder said.
        error: String,
        /// Whether the start that decoded is kept.
        partial: bool,
    },
}

/// The body with its `Content-Encoding`s undone (gzip, several members too; deflate, as zlib or
/// raw, as servers send both; br; the last applied undone first), at most `limit` bytes, and
/// how far that went. The one decoder of bodies: comparisons and HAR conversion use it.
pub fn undo(headers: &HeaderMap, body: &[u8], limit: usize) -> (Vec<u8>, Undone) {
    let codings: Vec<String> = headers
        .get_all(CONTENT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|c| c.trim().to_ascii_lowercase())
        .filter(|c| !c.is_empty() && c != "identity")
        .collect();
    let mut data = body.to_vec();
    let take = limit as u64 + 1;
    for coding in codings.iter().rev() {
        let mut out = Vec::new();
        let done = match coding.as_str() {
            "gzip" | "x-gzip" => flate2::read::MultiGzDecoder::new(&data[..])
                .take(take)
                .read_to_end(&mut out),
            "deflate" => flate2::read::ZlibDecoder::new(&data[..])
                .take(take)
                .read_to_end(&mut out)
                .or_else(|_| {
                    out.clear();
                    flate2::read::DeflateDecoder::new(&data[..])
                        .take(take)
                        .read_to_end(&mut out)
                }),
            "br" => brotli_decompressor::Decompressor::new(&data[..], 4096)
                .take(take)
                .read_to_end(&mut out),
            other => return (body.to_vec(), Undone::Unknown(other.to_owned())),
        };
        if out.len() > limit {
            out.truncate(limit);
            return (out, Undone::Cut(limit));
        }
        if let Err(e) = done {
            let partial = !out.is_empty();
            let undone = Undone::Broken {
                coding: coding.clone(),
                error: e.to_string(),
                partial,
            };
            return (if partial { out } else { body.to_vec() }, undone);
        }
        data = out;
    }
    (data, Undone::Whole)
}

/// The body with its `Content-Encoding`s undone whole, at most `limit` bytes of it.
pub fn decode(headers: &HeaderMap, bytes: &[u8], limit: usize) -> Result<Vec<u8>, BodyError> {
    if bytes.len() > limit {
        return Err(BodyError::TooLarge(limit));
    }
    match undo(headers, bytes, limit) {
        (body, Undone::Whole) => Ok(body),
        (_, Undone::Unknown(coding)) => Err(BodyError::Encoding(coding)),
        (_, Undone::Cut(limit)) => Err(BodyError::TooLarge(limit)),
        (_, Undone::Broken { coding, .. }) => Err(BodyError::Corrupt(coding)),
    }
}

/// gRPC's length-prefixed messages (flag byte, 4-byte length); a cut last one is kept as it is.
fn grpc_messages(mut bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut messages = Vec::new();
    while bytes.len() >= 5 {
        let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
        let end = (5 + len).min(bytes.len());
        messages.push(bytes[5..end].to_vec());
        bytes = &bytes[end..];
    }
    if !bytes.is_empty() {
        messages.push(bytes.to_vec());
    }
    messages
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, http::HeaderValue::from_static(v));
        }
        h
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(bytes).expect("gzip");
        gz.finish().expect("gzip")
    }

    #[test]
    fn bodies_are_decoded_then_read_as_what_they_are() {
        let json = headers(&[("content-type", "application/json; charset=utf-8")]);
        assert_eq!(
            read(&json, None, br#"{"a": 1}"#, 1024),
            Ok(Body::Json(serde_json::json!({"a": 1})))
        );
        let gz = headers(&[
            ("content-type", "application/problem+json"),
            ("content-encoding", "gzip"),
        ]);
        assert_eq!(
            read(&gz, None, &gzip(br#"[1,2]"#), 1024),
            Ok(Body::Json(serde_json::json!([1, 2])))
        );
        let untyped = HeaderMap::new();
        assert_eq!(
            read(&untyped, None, b" {\"x\":true}", 1024),
            Ok(Body::Json(serde_json::json!({"x": true})))
        );
        assert_eq!(
            read(&untyped, None, b"hello\nworld", 1024),
            Ok(Body::Text("hello\nworld".into()))
        );
        assert_eq!(read(&untyped, None, b"", 1024), Ok(Body::Empty));
        let png = headers(&[("content-type", "image/png")]);
        assert_eq!(
            read(&png, None, b"\x89PNG", 1024),
            Ok(Body::Binary(b"\x89PNG".to_vec()))
        );
        let bad_json = headers(&[("content-type", "application/json")]);
        assert_eq!(
            read(&bad_json, None, b"{oops", 1024),
            Ok(Body::Text("{oops".into())),
            "JSON that does not parse is compared as text"
        );
    }

    #[test]
    fn a_json_body_of_too_many_values_is_compared_as_text() {
        let h = headers(&[("content-type", "application/json")]);
        let huge = format!("[{}0]", "0,".repeat(MAX_JSON_VALUES));
        assert!(matches!(
            read(&h, None, huge.as_bytes(), 1 << 24),
            Ok(Body::Text(_))
        ));
        let fine = format!("[{}0]", "0,".repeat(1000));
        assert!(matches!(
            read(&h, None, fine.as_bytes(), 1 << 24),
            Ok(Body::Json(_))
        ));
    }

    #[test]
    fn grpc_answers_are_their_status_and_messages() {
        let h = headers(&[("content-type", "application/grpc+proto")]);
        let trailers = headers(&[("grpc-status", "5")]);
        let mut body = vec![0, 0, 0, 0, 2, b'h', b'i'];
        body.extend([0, 0, 0, 0, 1, b'!']);
        assert_eq!(
            read(&h, Some(&trailers), &body, 1024),
            Ok(Body::Grpc {
                status: Some("5".into()),
                messages: vec![b"hi".to_vec(), b"!".to_vec()],
            })
        );
    }

    #[test]
    fn decoding_is_bounded_and_refusals_say_why() {
        let gz = headers(&[("content-encoding", "gzip")]);
        let bomb = gzip(&vec![b'a'; 100_000]);
        assert!(bomb.len() < 1_000);
        assert_eq!(
            read(&gz, None, &bomb, 10_000),
            Err(BodyError::TooLarge(10_000))
        );
        assert_eq!(
            read(&gz, None, b"not gzip", 10_000).map_err(|e| e.reason()),
            Err("corrupt")
        );
        let zstd = headers(&[("content-encoding", "zstd")]);
        assert_eq!(
            read(&zstd, None, b"x", 10).map_err(|e| e.reason()),
            Err("encoding")
        );
    }
}
