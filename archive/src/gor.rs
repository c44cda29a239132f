//! GoReplay's `.gor` format, written and read byte for byte as GoReplay does.
//!
//! ```text
//! record    = header-line message separator
//! header    = type SP id SP timestamp_ns [SP latency_ns] LF
//! separator = LF "🐵🙈🙉" LF
//! ```
//!
//! `type` is `1` (request), `2` (the original response) or `3` (a replayed response); `id` is an
//! opaque token that a request shares with its responses; `message` is the raw HTTP/1.x message.
//! Older GoReplay versions wrote three header fields; both forms are read. Requests are written
//! with latency `-1`, as GoReplay does.
//!
//! teeway writes ids as 24 hex digits: its request id (16) then a hash of the source cluster and
//! the agent session (8), so that the requests of two agents (whose ids both count from 1) keep
//! their responses apart (GoReplay pairs by the whole token).
//! Reading, a 16-hex-digit prefix becomes the request id again; other tokens are hashed. HTTP/2
//! requests are written in HTTP/1.1 form (the authority becomes `Host`), bodies de-chunked with a
//! `Content-Length`. A body that itself contains the separator cannot be told apart from two
//! records; that is a limit of the format, not of this reader.

use std::io::{self, BufRead};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, StatusCode, Uri, Version};

use crate::{fnv1a64, unix_nanos, Envelope, Meta, MirroredRequest, ResponseOrigin, ResponseRecord};

/// The record separator, newlines included.
pub const SEPARATOR: &[u8] = "\n🐵🙈🙉\n".as_bytes();
/// The separator's middle line, as read by a line reader.
const SEPARATOR_LINE: &[u8] = "🐵🙈🙉\n".as_bytes();
/// Largest record a reader accepts; the rest of a larger one is skipped.
pub const MAX_RECORD_LEN: usize = 64 * 1024 * 1024;
/// Source cluster given to records read from a gor file.
pub const GOR_CLUSTER: &str = "gor";
/// Most headers parsed in one message.
const MAX_HEADERS: usize = 256;

/// The id token of a record: 16 hex digits of its id, 8 of a hash of its source cluster and
/// agent session (the cluster's alone when the session is not known, as before sessions).
pub fn token(meta: &Meta) -> String {
    let mut source = meta.source_cluster.as_bytes().to_vec();
    if meta.session != 0 {
        source.extend_from_slice(&meta.session.to_be_bytes());
    }
    let source = fnv1a64(&source) as u32;
    format!("{:016x}{source:08x}", meta.id)
}

/// The request id a token stands for (see the module docs).
pub fn id_of_token(token: &str) -> u64 {
    token
        .get(..16)
        .filter(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        .unwrap_or_else(|| fnv1a64(token.as_bytes()))
}

/// Appends `record` in gor form, separator included.
pub fn put_record(record: &Envelope, dst: &mut Vec<u8>) {
    match record {
        Envelope::HttpRequest(r) => {
            put_request(r, dst);
            if let Some(production) = &r.production {
                // Production's answer, as GoReplay records it: an original response (type 2).
                dst.extend_from_slice(SEPARATOR);
                put_response(&production.to_record(r), dst);
            }
        }
        Envelope::HttpResponse(r) => put_response(r, dst),
        // gor holds HTTP only; a kind it cannot hold is left out.
        Envelope::RpcRequest(_) | Envelope::Other { .. } => return,
    }
    dst.extend_from_slice(SEPARATOR);
}

fn put_request(r: &MirroredRequest, dst: &mut Vec<u8>) {
    let id = token(&r.meta);
    dst.extend_from_slice(format!("1 {id} {} -1\n", r.received_at_unix_nanos()).as_bytes());
    let target = r.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let version = if r.version == Version::HTTP_10 {
        "HTTP/1.0"
    } else {
        "HTTP/1.1"
    };
    dst.extend_from_slice(format!("{} {target} {version}\r\n", r.method).as_bytes());
    let mut headers = r.headers.clone();
    if !headers.contains_key(header::HOST) {
        if let Some(authority) = r.uri.authority() {
            if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
                headers.insert(header::HOST, v);
            }
        }
    }
    put_head_and_body(&mut headers, &r.body, r.body_truncated, dst);
}

fn put_response(r: &ResponseRecord, dst: &mut Vec<u8>) {
    let kind = match r.origin {
        ResponseOrigin::Original => 2,
        ResponseOrigin::Replayed => 3,
    };
    let id = token(&r.meta);
    let latency = u64::try_from(r.latency.as_nanos()).unwrap_or(u64::MAX);
    dst.extend_from_slice(
        format!("{kind} {id} {} {latency}\n", unix_nanos(r.meta.received_at)).as_bytes(),
    );
    let version = if r.version == Version::HTTP_10 {
        "HTTP/1.0"
    } else {
        "HTTP/1.1"
    };
    let reason = r.status.canonical_reason().unwrap_or("");
    dst.extend_from_slice(format!("{version} {} {reason}\r\n", r.status.as_u16()).as_bytes());
    let mut headers = r.headers.clone();
    put_head_and_body(&mut headers, &r.body, r.body_truncated, dst);
}

/// Headers (framing made to match the body we hold) then the body. A `truncated` body keeps a
/// longer declared `Content-Length`: the record then looks as a capture that cut the body looks,
/// and readers (ours included) see the cut. A truncated body that was chunked has no declared
/// length to keep: gor cannot say it was cut.
fn put_head_and_body(headers: &mut HeaderMap, body: &[u8], truncated: bool, dst: &mut Vec<u8>) {
    headers.remove(header::TRANSFER_ENCODING);
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let shows_the_cut = truncated && declared.is_some_and(|d| d > body.len());
    if !shows_the_cut && declared != Some(body.len()) && (!body.is_empty() || declared.is_some()) {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    for (name, value) in headers.iter() {
        dst.extend_from_slice(name.as_str().as_bytes());
        dst.extend_from_slice(b": ");
        dst.extend_from_slice(value.as_bytes());
        dst.extend_from_slice(b"\r\n");
    }
    dst.extend_from_slice(b"\r\n");
    dst.extend_from_slice(body);
}

/// One raw record: the bytes between separators.
#[derive(Debug)]
pub enum Raw {
    /// A complete record (separator removed).
    Complete(Vec<u8>),
    /// The input ended without a separator after this many bytes: a torn tail.
    Torn(usize),
    /// A record longer than [`MAX_RECORD_LEN`] was skipped.
    TooLong(usize),
}

/// Splits a gor stream into raw records.
#[derive(Debug)]
pub struct Splitter<R> {
    inner: R,
    done: bool,
}

impl<R: BufRead> Splitter<R> {
    /// A splitter over `inner`.
    pub fn new(inner: R) -> Self {
        Self { inner, done: false }
    }

    /// The next raw record, `Ok(None)` at the end.
    pub fn next_raw(&mut self) -> io::Result<Option<Raw>> {
        if self.done {
            return Ok(None);
        }
        let mut record = Vec::new();
        let mut skipped = 0usize;
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = self.inner.read_until(b'\n', &mut line)?;
            if n == 0 {
                self.done = true;
                let len = record.len() + skipped;
                return Ok(if len == 0 { None } else { Some(Raw::Torn(len)) });
            }
            if line == SEPARATOR_LINE && record.last() == Some(&b'\n') {
                record.pop();
                if skipped > 0 {
                    return Ok(Some(Raw::TooLong(skipped + record.len())));
                }
                return Ok(Some(Raw::Complete(record)));
            }
            if record.len() + line.len() > MAX_RECORD_LEN {
                // Keep the last byte: it tells whether a separator line may follow.
                skipped += record.len();
                record.clear();
                skipped += line.len() - 1;
                record.push(line[line.len() - 1]);
            } else {
                record.extend_from_slice(&line);
            }
        }
    }
}

/// Why a complete gor record was not returned.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// The header line is not `type id timestamp [latency]`.
    #[error("bad gor header line: {0}")]
    Header(String),
    /// The HTTP message does not parse.
    #[error("bad HTTP message: {0}")]
    Http(String),
}

/// Parses one complete raw record.
pub fn parse_record(raw: &[u8]) -> Result<Envelope, ParseError> {
    let newline = raw
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| ParseError::Header("no header line".into()))?;
    let header =
        std::str::from_utf8(&raw[..newline]).map_err(|_| ParseError::Header("not UTF-8".into()))?;
    let message = &raw[newline + 1..];
    let fields: Vec<&str> = header.split(' ').collect();
    if !(3..=4).contains(&fields.len()) {
        return Err(ParseError::Header(header.to_owned()));
    }
    let timestamp: u64 = fields[2]
        .parse()
        .map_err(|_| ParseError::Header(header.to_owned()))?;
    let latency: i64 = match fields.get(3) {
        Some(l) => l
            .parse()
            .map_err(|_| ParseError::Header(header.to_owned()))?,
        None => -1,
    };
    let id = id_of_token(fields[1]);
    let at = UNIX_EPOCH + Duration::from_nanos(timestamp);
    match fields[0] {
        "1" => parse_request(message, id, at).map(Envelope::HttpRequest),
        "2" | "3" => {
            let origin = if fields[0] == "2" {
                ResponseOrigin::Original
            } else {
                ResponseOrigin::Replayed
            };
            let latency = Duration::from_nanos(u64::try_from(latency).unwrap_or(0));
            parse_response(message, id, at, origin, latency).map(Envelope::HttpResponse)
        }
        other => Err(ParseError::Header(format!("unknown type {other:?}"))),
    }
}

fn parse_request(
    message: &[u8],
    id: u64,
    at: std::time::SystemTime,
) -> Result<MirroredRequest, ParseError> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    let head_len = match req.parse(message) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err(ParseError::Http("head is incomplete".into())),
        Err(e) => return Err(ParseError::Http(e.to_string())),
    };
    let method = Method::from_bytes(req.method.unwrap_or("").as_bytes())
        .map_err(|_| ParseError::Http("bad method".into()))?;
    let uri: Uri = req
        .path
        .unwrap_or("/")
        .parse()
        .map_err(|_| ParseError::Http("bad request target".into()))?;
    let version = if req.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let mut headers = to_header_map(req.headers)?;
    let body = body_of(&mut headers, &message[head_len..])?;
    // Captures (pcap, GoReplay's raw socket) often cut a body short: sent as it is, the server
    // would wait for the rest. Such a record is marked truncated, like a copy the agent cut;
    // its Content-Length stays as captured (so the cut survives a conversion) and a replay
    // announces the length it sends.
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let body_truncated = announced.is_some_and(|n| n > body.len() as u64);
    Ok(MirroredRequest {
        meta: Meta::basic(id, at, Arc::from(GOR_CLUSTER)),
        method,
        uri,
        version,
        headers,
        body,
        trailers: None,
        body_truncated,
        production: None,
    })
}

fn parse_response(
    message: &[u8],
    id: u64,
    at: std::time::SystemTime,
    origin: ResponseOrigin,
    latency: Duration,
) -> Result<ResponseRecord, ParseError> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut slots);
    let head_len = match resp.parse(message) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err(ParseError::Http("head is incomplete".into())),
        Err(e) => return Err(ParseError::Http(e.to_string())),
    };
    let status = StatusCode::from_u16(resp.code.unwrap_or(0))
        .map_err(|_| ParseError::Http("bad status".into()))?;
    let version = if resp.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let mut headers = to_header_map(resp.headers)?;
    let body = body_of(&mut headers, &message[head_len..])?;
    Ok(ResponseRecord {
        meta: Meta::basic(id, at, Arc::from(GOR_CLUSTER)),
        origin,
        target: String::new(),
        latency,
        status,
        version,
        headers,
        body,
        body_truncated: false,
    })
}

fn to_header_map(parsed: &[httparse::Header<'_>]) -> Result<HeaderMap, ParseError> {
    let mut headers = HeaderMap::with_capacity(parsed.len());
    for h in parsed {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| ParseError::Http(format!("bad header name {:?}", h.name)))?;
        let value = HeaderValue::from_bytes(h.value)
            .map_err(|_| ParseError::Http(format!("bad value for header {}", h.name)))?;
        headers.append(name, value);
    }
    Ok(headers)
}

/// The body: de-chunked when the message was chunked (the framing header then goes), else the
/// bytes after the head. GoReplay records what crossed the wire, so a body may be cut short.
fn body_of(headers: &mut HeaderMap, rest: &[u8]) -> Result<Bytes, ParseError> {
    let chunked = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .any(|v| v.as_bytes().eq_ignore_ascii_case(b"chunked"));
    if !chunked {
        return Ok(Bytes::copy_from_slice(rest));
    }
    let mut body = Vec::with_capacity(rest.len());
    let mut at = 0;
    loop {
        let line_end = find_crlf(&rest[at..])
            .ok_or_else(|| ParseError::Http("chunk size line is incomplete".into()))?;
        let size_text = std::str::from_utf8(&rest[at..at + line_end])
            .map_err(|_| ParseError::Http("chunk size is not text".into()))?;
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| ParseError::Http(format!("bad chunk size {size_text:?}")))?;
        at += line_end + 2;
        if size == 0 {
            break;
        }
        let end = at
            .checked_add(size)
            .filter(|&e| e <= rest.len())
            .ok_or_else(|| ParseError::Http("chunk runs past the message".into()))?;
        body.extend_from_slice(&rest[at..end]);
        at = end + 2;
        if at > rest.len() {
            return Err(ParseError::Http("chunk is not followed by CRLF".into()));
        }
    }
    headers.remove(header::TRANSFER_ENCODING);
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    Ok(Bytes::from(body))
}

fn find_crlf(bytes: &[u8]) -> Option<usize> {
    bytes.windows(2).position(|w| w == b"\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::read::tests::{sample_request, sample_response};

    fn split_all(bytes: &[u8]) -> Vec<Raw> {
        let mut s = Splitter::new(bytes);
        let mut out = Vec::new();
        while let Some(raw) = s.next_raw().expect("read") {
            out.push(raw);
        }
        out
    }

    #[test]
    fn a_cut_body_stays_cut_through_a_round_trip() {
        let raw = b"1 c1 5 -1\nPOST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\nonly this";
        let record = parse_record(raw).expect("parses");
        let Envelope::HttpRequest(r) = &record else {
            panic!("a request")
        };
        assert!(r.body_truncated);
        assert_eq!(r.headers["content-length"], "100", "as captured");
        let mut out = Vec::new();
        put_record(&record, &mut out);
        let back = parse_record(&out[..out.len() - SEPARATOR.len()]).expect("parses");
        assert_eq!(back, record, "written back as cut, read back as cut");
    }

    #[test]
    fn written_request_is_byte_exact() {
        let mut r = sample_request(0x2a, b"a=1");
        r.headers = HeaderMap::new();
        r.headers
            .insert(header::HOST, HeaderValue::from_static("api.example.com"));
        r.uri = Uri::from_static("/v1/items?q=1");
        let mut out = Vec::new();
        put_record(&Envelope::HttpRequest(r.clone()), &mut out);
        let expected = format!(
            "1 {} {} -1\nPOST /v1/items?q=1 HTTP/1.1\r\nhost: api.example.com\r\ncontent-length: 3\r\n\r\na=1\n🐵🙈🙉\n",
            token(&r.meta),
            r.received_at_unix_nanos()
        );
        assert_eq!(String::from_utf8(out).expect("utf8"), expected);
        assert!(token(&r.meta).starts_with("000000000000002a"));
        assert_eq!(id_of_token(&token(&r.meta)), 0x2a);
        let mut other_agent = r.meta.clone();
        other_agent.session = 7;
        assert_ne!(
            token(&other_agent),
            token(&r.meta),
            "two agents' requests of the same id keep apart"
        );
    }

    #[test]
    fn requests_and_responses_round_trip() {
        let mut req = sample_request(5, b"line1\r\nline2\r\n\x00\x01\xfe\xff");
        req.meta.source_cluster = GOR_CLUSTER.into();
        let mut resp = sample_response(5);
        resp.meta.source_cluster = GOR_CLUSTER.into();
        resp.target = String::new();
        resp.version = Version::HTTP_11;
        let mut out = Vec::new();
        put_record(&Envelope::HttpRequest(req.clone()), &mut out);
        put_record(&Envelope::HttpResponse(resp.clone()), &mut out);
        let raws = split_all(&out);
        assert_eq!(raws.len(), 2);
        let back: Vec<Envelope> = raws
            .iter()
            .map(|r| match r {
                Raw::Complete(b) => parse_record(b).expect("parses"),
                other => panic!("{other:?}"),
            })
            .collect();
        let Envelope::HttpRequest(got) = &back[0] else {
            panic!("request expected")
        };
        assert_eq!(got.method, req.method);
        assert_eq!(got.uri, req.uri);
        assert_eq!(got.body, req.body);
        assert_eq!(got.meta.received_at, req.meta.received_at);
        assert_eq!(got.meta.id, req.meta.id);
        for (name, value) in &req.headers {
            assert!(
                got.headers.get_all(name).iter().any(|v| v == value),
                "{name}"
            );
        }
        let Envelope::HttpResponse(got) = &back[1] else {
            panic!("response expected")
        };
        assert_eq!(got.status, resp.status);
        assert_eq!(got.latency, resp.latency);
        assert_eq!(got.body, resp.body);
        assert_eq!(got.meta.id, 5);
    }

    #[test]
    fn productions_answer_is_written_as_the_original_response() {
        let mut req = sample_request(6, b"{}");
        req.meta.source_cluster = GOR_CLUSTER.into();
        req.production = Some(Box::new(teeway_wire::Production {
            latency: Duration::from_millis(4),
            status: http::StatusCode::ACCEPTED,
            version: Version::HTTP_11,
            headers: HeaderMap::new(),
            body: Bytes::from_static(b"{\"price\":10}"),
            trailers: None,
            body_truncated: false,
        }));
        let mut out = Vec::new();
        put_record(&Envelope::HttpRequest(req), &mut out);
        let raws = split_all(&out);
        assert_eq!(raws.len(), 2, "the request, then production's answer");
        let Raw::Complete(answer) = &raws[1] else {
            panic!("{:?}", raws[1])
        };
        assert!(answer.starts_with(b"2 "), "GoReplay's original response");
        let Envelope::HttpResponse(got) = parse_record(answer).expect("parses") else {
            panic!("a response")
        };
        assert_eq!(got.origin, ResponseOrigin::Original);
        assert_eq!(got.status, http::StatusCode::ACCEPTED);
        assert_eq!(got.latency, Duration::from_millis(4));
        assert_eq!(&got.body[..], b"{\"price\":10}");
        assert_eq!(got.meta.id, 6);
    }

    #[test]
    fn http2_request_is_written_as_http11_with_host() {
        let mut r = sample_request(1, b"");
        r.version = Version::HTTP_2;
        r.uri = Uri::from_static("http://grpc.example:50051/pkg.Svc/Call");
        r.headers = HeaderMap::new();
        let mut out = Vec::new();
        put_record(&Envelope::HttpRequest(r), &mut out);
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.contains("POST /pkg.Svc/Call HTTP/1.1\r\nhost: grpc.example:50051\r\n"),
            "{text}"
        );
    }

    #[test]
    fn three_field_headers_and_chunked_bodies_parse() {
        let raw = b"1 abc 1700000000000000000\nPOST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;ext=1\r\n\r\n\r\n0\r\n\r\n";
        let Envelope::HttpRequest(r) = parse_record(raw).expect("parses") else {
            panic!("request expected")
        };
        assert_eq!(&r.body[..], b"abc\r\n");
        assert!(r.headers.get(header::TRANSFER_ENCODING).is_none());
        assert_eq!(r.headers[header::CONTENT_LENGTH], "5");
        assert_eq!(r.meta.id, fnv1a64(b"abc"));
        assert_eq!(
            r.meta.received_at,
            UNIX_EPOCH + Duration::from_nanos(1_700_000_000_000_000_000)
        );
    }

    #[test]
    fn torn_tail_and_bad_records_are_reported() {
        let mut bytes = b"1 a 1 -1\nGET / HTTP/1.1\r\n\r\n".to_vec();
        bytes.extend_from_slice(SEPARATOR);
        bytes.extend_from_slice(b"9 a 1 -1\nGET / HTTP/1.1\r\n\r\n");
        bytes.extend_from_slice(SEPARATOR);
        bytes.extend_from_slice(b"1 b 2 -1\nGET /torn HT");
        let raws = split_all(&bytes);
        assert!(matches!(&raws[0], Raw::Complete(b) if parse_record(b).is_ok()));
        assert!(matches!(&raws[1], Raw::Complete(b) if parse_record(b).is_err()));
        assert!(matches!(raws[2], Raw::Torn(21)));
        assert!(parse_record(b"1 a\nGET / HTTP/1.1\r\n\r\n").is_err());
        assert!(parse_record(b"1 a x -1\nGET / HTTP/1.1\r\n\r\n").is_err());
        assert!(parse_record(b"1 a 1 -1\nNOT HTTP\r\n\r\n").is_err());
    }
}
