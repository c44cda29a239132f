//! The envelope codec: the bytes of an [`Envelope`], the same in an `ENVELOPE` frame (protocol
//! 5) and in a native archive record (kind 9).
//!
//! ```text
//! envelope = kind:u8  meta_len:u32  meta[meta_len]  part
//! meta     = session:u64  id:u64  received_at:u64  source_cluster:str16  source_identity:str16
//!            tap:str16  sampling_rule:str16  sampling_rate_ppm:u32  [fields of later versions]
//! ```
//!
//! `meta_len` lets a later version append metadata fields that this reader skips; the part runs
//! to the end of the frame (or record), so a reader keeps a kind it does not know as
//! [`Envelope::Other`], bytes and all. `docs/protocol.md` lists the parts of each kind.
//!
//! An agent encodes a request once, at admission, with [`crate::RequestFrame`], from the parts
//! this module lends it.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, Method, StatusCode, Version};

use crate::error::DecodeError;
use crate::fields::{
    get_bytes32, get_headers, get_method, get_str16, get_u16, get_u32, get_u64, get_u8, get_uri,
    headers_len, put_bytes32, put_headers, put_str16, str16_len, take, uri_bytes,
};
use crate::record::{
    empty, unix_nanos, version_code, version_from_code, Envelope, Meta, MirroredRequest,
    Production, ResponseOrigin, ResponseRecord, RpcCall, RpcProtocol, RpcRequest, Sampling,
};

/// Envelope kind: an HTTP request ([`MirroredRequest`]).
pub const KIND_HTTP_REQUEST: u8 = 1;
/// Envelope kind: an HTTP response ([`ResponseRecord`]).
pub const KIND_HTTP_RESPONSE: u8 = 2;
/// Envelope kind: an RPC request ([`RpcRequest`]).
pub const KIND_RPC_REQUEST: u8 = 3;
/// Envelope kind: an HTTP request with production's answer to it ([`MirroredRequest`] whose
/// [`MirroredRequest::production`] is set): kind 1's part, then the answer's.
pub const KIND_HTTP_EXCHANGE: u8 = 6;

/// Part flag, both HTTP kinds: the body was cut at the writer's limit.
const FLAG_BODY_TRUNCATED: u8 = 0x01;
/// Part flag, HTTP request: trailers follow the body (possibly zero of them).
const FLAG_HAS_TRAILERS: u8 = 0x02;

/// Response origin codes (as GoReplay's record types).
const ORIGIN_ORIGINAL: u8 = 2;
const ORIGIN_REPLAYED: u8 = 3;

/// Appends `envelope`'s bytes (no frame prefix or type) to `dst`.
pub fn encode(envelope: &Envelope, dst: &mut BytesMut) {
    match envelope {
        Envelope::HttpRequest(r) => {
            dst.put_u8(match r.production {
                Some(_) => KIND_HTTP_EXCHANGE,
                None => KIND_HTTP_REQUEST,
            });
            put_meta(&r.meta, dst);
            let flags = request_flags(r.body_truncated, r.trailers.is_some());
            let uri = uri_bytes(&r.uri);
            put_request_head(r.version, flags, &r.method, &uri, &r.headers, dst);
            put_bytes32(dst, &r.body);
            if let Some(trailers) = &r.trailers {
                put_headers(dst, trailers);
            }
            if let Some(production) = &r.production {
                put_production(production, dst);
            }
        }
        Envelope::HttpResponse(r) => {
            dst.put_u8(KIND_HTTP_RESPONSE);
            put_meta(&r.meta, dst);
            dst.put_u8(match r.origin {
                ResponseOrigin::Original => ORIGIN_ORIGINAL,
                ResponseOrigin::Replayed => ORIGIN_REPLAYED,
            });
            put_str16(dst, &r.target);
            dst.put_u64(u64::try_from(r.latency.as_nanos()).unwrap_or(u64::MAX));
            dst.put_u16(r.status.as_u16());
            dst.put_u8(version_code(r.version));
            dst.put_u8(if r.body_truncated {
                FLAG_BODY_TRUNCATED
            } else {
                0
            });
            put_headers(dst, &r.headers);
            put_bytes32(dst, &r.body);
        }
        Envelope::RpcRequest(r) => put_rpc_request(&r.meta, r.connection, &r.call, &r.message, dst),
        Envelope::Other { meta, kind, part } => {
            dst.put_u8(*kind);
            put_meta(meta, dst);
            dst.put_slice(part);
        }
    }
}

/// Encoded size of `envelope` (no frame prefix or type).
pub fn encoded_len(envelope: &Envelope) -> usize {
    1 + match envelope {
        Envelope::HttpRequest(r) => return encoded_len_of_request(r),
        Envelope::HttpResponse(r) => {
            meta_len(&r.meta)
                + 1
                + str16_len(&r.target)
                + 8
                + 2
                + 1
                + 1
                + headers_len(&r.headers)
                + 4
                + r.body.len()
        }
        Envelope::RpcRequest(r) => return rpc_request_len(&r.meta, &r.call, r.message.len()),
        Envelope::Other { meta, part, .. } => meta_len(meta) + part.len(),
    }
}

/// Appends an RPC request's envelope (kind 3, no frame prefix or type) made of its parts, so that
/// an agent copies a message's bytes once, into the frame it sends.
pub fn put_rpc_request(
    meta: &Meta,
    connection: u64,
    call: &RpcCall,
    message: &[u8],
    dst: &mut BytesMut,
) {
    dst.put_u8(KIND_RPC_REQUEST);
    put_meta(meta, dst);
    dst.put_u8(call.protocol.code());
    dst.put_u8(call.variant);
    dst.put_u64(connection);
    put_str16(dst, &call.service);
    put_str16(dst, &call.method);
    let count = call.attachments.len().min(usize::from(u16::MAX));
    dst.put_u16(count as u16);
    for (name, value) in &call.attachments[..count] {
        put_str16(dst, name);
        put_str16(dst, value);
    }
    put_bytes32(dst, message);
}

/// Encoded size of an RPC request's envelope whose message has `message_len` bytes.
pub fn rpc_request_len(meta: &Meta, call: &RpcCall, message_len: usize) -> usize {
    1 + meta_len(meta)
        + 2
        + 8
        + str16_len(&call.service)
        + str16_len(&call.method)
        + 2
        + call
            .attachments
            .iter()
            .take(usize::from(u16::MAX))
            .map(|(n, v)| str16_len(n) + str16_len(v))
            .sum::<usize>()
        + 4
        + message_len
}

fn get_rpc_request(meta: Meta, src: &mut Bytes) -> Result<RpcRequest, DecodeError> {
    let protocol = RpcProtocol::from_code(get_u8(src, "protocol")?);
    let variant = get_u8(src, "variant")?;
    let connection = get_u64(src, "connection")?;
    let service = get_str16(src, "service")?;
    let method = get_str16(src, "method")?;
    let count = get_u16(src, "attachments")?;
    let mut attachments = Vec::with_capacity(usize::from(count).min(64));
    for _ in 0..count {
        attachments.push((
            get_str16(src, "attachment name")?,
            get_str16(src, "attachment value")?,
        ));
    }
    let message = get_bytes32(src, "message")?;
    Ok(RpcRequest {
        meta,
        connection,
        call: RpcCall {
            protocol,
            variant,
            service,
            method,
            attachments,
        },
        message,
    })
}

pub(crate) fn encoded_len_of_request(r: &MirroredRequest) -> usize {
    1 + meta_len(&r.meta)
        + 2
        + head_len_after_flags(r)
        + request_tail_len(r)
        + r.production.as_deref().map_or(0, production_len)
}

/// Appends production's answer as kind 6's part ends: `latency:u64 status:u16 version:u8
/// flags:u8 headers body:bytes32 [trailers]`, the flags as a request's.
pub(crate) fn put_production(p: &Production, dst: &mut BytesMut) {
    dst.put_u64(u64::try_from(p.latency.as_nanos()).unwrap_or(u64::MAX));
    dst.put_u16(p.status.as_u16());
    dst.put_u8(version_code(p.version));
    dst.put_u8(request_flags(p.body_truncated, p.trailers.is_some()));
    put_headers(dst, &p.headers);
    put_bytes32(dst, &p.body);
    if let Some(trailers) = &p.trailers {
        put_headers(dst, trailers);
    }
}

/// Encoded size of production's answer in a kind 6 part.
pub(crate) fn production_len(p: &Production) -> usize {
    8 + 2
        + 1
        + 1
        + headers_len(&p.headers)
        + 4
        + p.body.len()
        + p.trailers.as_ref().map_or(0, headers_len)
}

fn get_production(src: &mut Bytes) -> Result<Production, DecodeError> {
    let latency = Duration::from_nanos(get_u64(src, "latency")?);
    let status = get_status(src)?;
    let version = get_version(src)?;
    let flags = get_u8(src, "flags")?;
    let headers = get_headers(src)?;
    let body = get_bytes32(src, "body")?;
    let trailers = get_trailers(src, flags)?;
    Ok(Production {
        latency,
        status,
        version,
        headers,
        body,
        trailers,
        body_truncated: flags & FLAG_BODY_TRUNCATED != 0,
    })
}

/// Reads a status code (100 to 999).
fn get_status(src: &mut Bytes) -> Result<StatusCode, DecodeError> {
    let status = get_u16(src, "status")?;
    StatusCode::from_u16(status).map_err(|_| DecodeError::InvalidStatus(status))
}

/// Reads the trailers a part's `flags` say follow its body.
fn get_trailers(src: &mut Bytes, flags: u8) -> Result<Option<HeaderMap>, DecodeError> {
    if flags & FLAG_HAS_TRAILERS == 0 {
        return Ok(None);
    }
    get_headers(src).map(Some)
}

/// Reads an HTTP version code.
pub(crate) fn get_version(src: &mut Bytes) -> Result<Version, DecodeError> {
    let code = get_u8(src, "version")?;
    version_from_code(code).ok_or(DecodeError::InvalidVersion(code))
}

/// Reads one envelope that fills `src` exactly.
pub fn decode(src: &mut Bytes) -> Result<Envelope, DecodeError> {
    let kind = get_u8(src, "kind")?;
    let meta = get_meta(src)?;
    Ok(match kind {
        KIND_HTTP_REQUEST => Envelope::HttpRequest(get_request(meta, src)?),
        KIND_HTTP_EXCHANGE => {
            let mut request = get_request(meta, src)?;
            request.production = Some(Box::new(get_production(src)?));
            Envelope::HttpRequest(request)
        }
        KIND_HTTP_RESPONSE => Envelope::HttpResponse(get_response(meta, src)?),
        KIND_RPC_REQUEST => Envelope::RpcRequest(get_rpc_request(meta, src)?),
        kind => Envelope::Other {
            meta,
            kind,
            part: src.split_off(0),
        },
    })
}

pub(crate) fn request_flags(truncated: bool, trailers: bool) -> u8 {
    let mut flags = 0;
    if truncated {
        flags |= FLAG_BODY_TRUNCATED;
    }
    if trailers {
        flags |= FLAG_HAS_TRAILERS;
    }
    flags
}

/// The request part from the method on, up to the body.
fn head_len_after_flags(r: &MirroredRequest) -> usize {
    str16_len(r.method.as_str()) + 4 + uri_bytes(&r.uri).len() + headers_len(&r.headers)
}

/// The body and trailers of a request part.
fn request_tail_len(r: &MirroredRequest) -> usize {
    4 + r.body.len() + r.trailers.as_ref().map_or(0, headers_len)
}

pub(crate) fn meta_len(meta: &Meta) -> usize {
    4 + meta_fields_len(meta)
}

fn meta_fields_len(meta: &Meta) -> usize {
    8 + 8
        + 8
        + str16_len(&meta.source_cluster)
        + str16_len(&meta.source_identity)
        + str16_len(&meta.tap)
        + str16_len(&meta.sampling.rule)
        + 4
        + meta.extra.len()
}

pub(crate) fn put_meta(meta: &Meta, dst: &mut BytesMut) {
    dst.put_u32(u32::try_from(meta_fields_len(meta)).unwrap_or(u32::MAX));
    dst.put_u64(meta.session);
    dst.put_u64(meta.id);
    dst.put_u64(unix_nanos(meta.received_at));
    put_str16(dst, &meta.source_cluster);
    put_str16(dst, &meta.source_identity);
    put_str16(dst, &meta.tap);
    put_str16(dst, &meta.sampling.rule);
    dst.put_u32(meta.sampling.rate_ppm);
    dst.put_slice(&meta.extra);
}

fn get_meta(src: &mut Bytes) -> Result<Meta, DecodeError> {
    let len = get_u32(src, "meta_len")? as usize;
    let mut meta = take(src, len, "meta")?;
    let m = &mut meta;
    let decoded = Meta {
        session: get_u64(m, "session")?,
        id: get_u64(m, "id")?,
        received_at: UNIX_EPOCH + Duration::from_nanos(get_u64(m, "received_at")?),
        source_cluster: get_shared_str(m, "source_cluster")?,
        source_identity: get_shared_str(m, "source_identity")?,
        tap: get_shared_str(m, "tap")?,
        sampling: Sampling {
            rule: get_shared_str(m, "sampling_rule")?,
            rate_ppm: get_u32(m, "sampling_rate_ppm")?,
        },
        // Fields a later version appended: this reader does not know them, and keeps them, in
        // a buffer of their own (a slice would keep the whole received batch alive).
        extra: if meta.is_empty() {
            Bytes::new()
        } else {
            Bytes::copy_from_slice(&meta)
        },
    };
    Ok(decoded)
}

/// A `str16` as a shared string; the empty one without an allocation.
fn get_shared_str(src: &mut Bytes, field: &'static str) -> Result<Arc<str>, DecodeError> {
    let len = get_u16(src, field)? as usize;
    let bytes = take(src, len, field)?;
    let s = std::str::from_utf8(&bytes).map_err(|_| DecodeError::InvalidUtf8(field))?;
    // Straight from the received bytes into the shared string: one allocation, not two.
    Ok(if s.is_empty() { empty() } else { Arc::from(s) })
}

pub(crate) fn put_request_head(
    version: Version,
    flags: u8,
    method: &Method,
    uri: &str,
    headers: &HeaderMap,
    dst: &mut BytesMut,
) {
    dst.put_u8(version_code(version));
    dst.put_u8(flags);
    put_str16(dst, method.as_str());
    put_bytes32(dst, uri.as_bytes());
    put_headers(dst, headers);
}

fn get_request(meta: Meta, src: &mut Bytes) -> Result<MirroredRequest, DecodeError> {
    let version = get_version(src)?;
    let flags = get_u8(src, "flags")?;
    get_request_rest(meta, version, flags, src)
}

/// An HTTP request's fields from the method on: the same in an envelope and in protocol 4's
/// `REQUEST`, whose metadata came before.
pub(crate) fn get_request_rest(
    meta: Meta,
    version: Version,
    flags: u8,
    src: &mut Bytes,
) -> Result<MirroredRequest, DecodeError> {
    let method = get_method(src)?;
    let uri = get_uri(src)?;
    let headers = get_headers(src)?;
    let body = get_bytes32(src, "body")?;
    let trailers = get_trailers(src, flags)?;
    Ok(MirroredRequest {
        meta,
        method,
        uri,
        version,
        headers,
        body,
        trailers,
        body_truncated: flags & FLAG_BODY_TRUNCATED != 0,
        production: None,
    })
}

fn get_response(meta: Meta, src: &mut Bytes) -> Result<ResponseRecord, DecodeError> {
    let origin = match get_u8(src, "origin")? {
        ORIGIN_ORIGINAL => ResponseOrigin::Original,
        _ => ResponseOrigin::Replayed,
    };
    let target = get_str16(src, "target")?;
    let latency = Duration::from_nanos(get_u64(src, "latency")?);
    let status = get_status(src)?;
    let version = get_version(src)?;
    let flags = get_u8(src, "flags")?;
    let headers = get_headers(src)?;
    let body = get_bytes32(src, "body")?;
    Ok(ResponseRecord {
        meta,
        origin,
        target,
        latency,
        status,
        version,
        headers,
        body,
        body_truncated: flags & FLAG_BODY_TRUNCATED != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderValue, Uri};

    fn meta() -> Meta {
        Meta {
            session: 7,
            id: 42,
            received_at: UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789),
            source_cluster: "prod-eu-1".into(),
            source_identity: "agent-a".into(),
            tap: "http".into(),
            sampling: Sampling {
                rule: "checkout".into(),
                rate_ppm: 250_000,
            },
            extra: Bytes::new(),
        }
    }

    fn request() -> MirroredRequest {
        let mut headers = HeaderMap::new();
        headers.append("host", HeaderValue::from_static("api.example.com"));
        headers.append("x-repeat", HeaderValue::from_static("one"));
        headers.append("x-repeat", HeaderValue::from_static("two"));
        MirroredRequest {
            meta: meta(),
            method: Method::POST,
            uri: Uri::from_static("/v1/items?x=1"),
            version: Version::HTTP_11,
            headers,
            body: Bytes::from_static(b"\x00body\xff"),
            trailers: None,
            body_truncated: false,
            production: None,
        }
    }

    fn round_trip(envelope: &Envelope) -> Envelope {
        let mut buf = BytesMut::new();
        encode(envelope, &mut buf);
        assert_eq!(buf.len(), encoded_len(envelope), "encoded_len is exact");
        let mut bytes = buf.freeze();
        let decoded = decode(&mut bytes).expect("decodes");
        assert!(bytes.is_empty());
        decoded
    }

    #[test]
    fn every_kind_round_trips() {
        let mut with_trailers = request();
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        with_trailers.trailers = Some(trailers);
        with_trailers.body_truncated = true;
        let response = ResponseRecord {
            meta: meta(),
            origin: ResponseOrigin::Replayed,
            target: "http://shadow:8080".into(),
            latency: Duration::from_micros(1500),
            status: StatusCode::CREATED,
            version: Version::HTTP_2,
            headers: HeaderMap::new(),
            body: Bytes::from_static(b"{}"),
            body_truncated: true,
        };
        for envelope in [
            Envelope::HttpRequest(request()),
            Envelope::HttpRequest(with_trailers),
            Envelope::HttpResponse(response),
            Envelope::RpcRequest(RpcRequest {
                meta: meta(),
                connection: 7,
                call: RpcCall {
                    protocol: RpcProtocol::Redis,
                    variant: 0,
                    service: String::new(),
                    method: "SET".into(),
                    attachments: vec![("db".into(), "3".into())],
                },
                message: Bytes::from_static(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n"),
            }),
            Envelope::Other {
                meta: meta(),
                kind: 200,
                part: Bytes::from_static(b"a kind from the future"),
            },
        ] {
            assert_eq!(round_trip(&envelope), envelope);
        }
    }

    #[test]
    fn an_rpc_frame_made_of_parts_is_the_envelope_frame() {
        let request = RpcRequest {
            meta: meta(),
            connection: u64::MAX - 1,
            call: RpcCall {
                protocol: RpcProtocol::Thrift,
                variant: 3,
                service: String::new(),
                method: "INCR".into(),
                attachments: vec![],
            },
            message: Bytes::from_static(b"*2\r\n$4\r\nINCR\r\n$1\r\nn\r\n"),
        };
        let frame = crate::Frame::Envelope(Envelope::RpcRequest(request.clone()));
        let mut want = BytesMut::new();
        frame.encode(&mut want);
        let made = crate::Frame::rpc_request(
            &request.meta,
            request.connection,
            &request.call,
            &request.message,
        );
        assert_eq!(made, want.freeze());
        assert_eq!(made.len(), frame.encoded_len());
    }

    #[test]
    fn a_name_cut_at_its_limit_keeps_the_frame_length_right() {
        // 70,000 bytes of two-byte characters: cut at 65,534, a character boundary.
        let call = RpcCall {
            protocol: RpcProtocol::Redis,
            variant: 0,
            service: String::new(),
            method: "é".repeat(35_000),
            attachments: vec![],
        };
        let frame = crate::Frame::rpc_request(&meta(), 1, &call, b"x");
        let mut buf = BytesMut::from(&frame[..]);
        let Ok(Some(crate::Frame::Envelope(Envelope::RpcRequest(r)))) =
            crate::Frame::decode(&mut buf)
        else {
            panic!("the frame decodes whole");
        };
        assert!(buf.is_empty());
        assert_eq!(r.call.method.len(), 65_534);
        assert_eq!(&r.message[..], b"x");
    }

    #[test]
    fn later_meta_fields_are_kept_and_written_back() {
        let mut buf = BytesMut::new();
        encode(&Envelope::HttpRequest(request()), &mut buf);
        // A later version appends 8 bytes of metadata: the length grows, the reader skips them.
        let meta_at = 1;
        let len = u32::from_be_bytes(buf[meta_at..meta_at + 4].try_into().expect("4 bytes"));
        let end = meta_at + 4 + len as usize;
        let mut later = BytesMut::new();
        later.extend_from_slice(&buf[..meta_at]);
        later.put_u32(len + 8);
        later.extend_from_slice(&buf[meta_at + 4..end]);
        later.put_u64(0xfeed);
        later.extend_from_slice(&buf[end..]);
        let later = later.freeze();
        let decoded = decode(&mut later.clone()).expect("decodes");
        let mut want = request();
        want.meta.extra = Bytes::copy_from_slice(&0xfeed_u64.to_be_bytes());
        assert_eq!(decoded, Envelope::HttpRequest(want));
        let mut again = BytesMut::new();
        encode(&decoded, &mut again);
        assert_eq!(&again[..], &later[..], "passed on byte for byte");
    }

    #[test]
    fn meta_shorter_than_its_fields_is_refused() {
        let mut buf = BytesMut::new();
        encode(&Envelope::HttpRequest(request()), &mut buf);
        buf[4] = buf[4].wrapping_sub(1); // meta_len one short
        assert_eq!(
            decode(&mut buf.freeze()),
            Err(DecodeError::Truncated("sampling_rate_ppm"))
        );
    }

    #[test]
    fn empty_strings_share_one_allocation() {
        let mut m = meta();
        m.tap = "".into();
        m.source_identity = empty();
        let mut r = request();
        r.meta = m;
        let a = round_trip(&Envelope::HttpRequest(r.clone()));
        let b = round_trip(&Envelope::HttpRequest(r));
        assert!(Arc::ptr_eq(&a.meta().tap, &b.meta().tap));
    }
}
