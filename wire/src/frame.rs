//! The frame codec: every byte on a teeway stream belongs to a length-prefixed frame.
//!
//! ```text
//! frame   = length:u32be  type:u8  payload[length - 1]
//! ```
//!
//! `length` counts the type byte and the payload, never the prefix itself, and is at most
//! [`MAX_FRAME_LEN`]. Integers are big-endian. `str16` is a `u16` length then UTF-8 bytes;
//! `bytes32` is a `u32` length then raw bytes. `docs/protocol.md` lists every frame's fields.
//!
//! [`RequestFrame`] builds one HTTP request's `ENVELOPE` frame while the request streams: the
//! agent encodes each copy once, at admission, and never again.
//!
//! [`Frame::decode`] is incremental: it returns `Ok(None)` until a whole frame is buffered, then
//! consumes exactly that frame. It checks the announced length before waiting for the payload, so
//! a peer cannot make a reader buffer more than one maximal frame.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, Method, Uri, Version};

use crate::envelope::{
    encoded_len_of_request, get_request_rest, get_version, meta_len, put_meta, put_request_head,
    request_flags, KIND_HTTP_REQUEST,
};
use crate::error::DecodeError;
use crate::fields::uri_bytes;
use crate::fields::{
    get_str16, get_u16, get_u32, get_u64, get_u8, headers_len, put_bytes32, put_headers, put_str16,
    str16_len, take,
};
use crate::record::{version_code, Envelope, Meta, MirroredRequest, Production, RpcCall};
use crate::{MAX_BATCH_RECORDS, MAX_FRAME_LEN};

/// Length of the frame prefix.
pub const PREFIX_LEN: usize = 4;

const TYPE_HELLO: u8 = 0x01;
const TYPE_WELCOME: u8 = 0x02;
const TYPE_REQUEST: u8 = 0x03;
const TYPE_ACK: u8 = 0x04;
const TYPE_END: u8 = 0x05;
const TYPE_TCP_OPEN: u8 = 0x06;
const TYPE_TCP_DATA: u8 = 0x07;
const TYPE_BATCH: u8 = 0x08;
const TYPE_ENVELOPE: u8 = 0x09;
/// `BATCH` flag: the agent sent this batch before and got no acknowledgement.
const BATCH_RETRY: u8 = 0x01;

/// One protocol frame.
///
/// `Request` is far larger than the control frames, and that is on purpose: nearly every frame
/// is a `Request`, and boxing it would cost an allocation per record for nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)]
pub enum Frame {
    /// Agent to gateway, first frame of the first stream: who is speaking.
    Hello(Hello),
    /// Gateway to agent, in answer to `Hello`: the agent is accepted.
    Welcome(Welcome),
    /// Agent to gateway, protocol 1 to 4: one mirrored request. A batch stream holds one or
    /// more. Only the id, time and source cluster of its [`Meta`] travel.
    Request(MirroredRequest),
    /// Agent to gateway, protocol 5: one record of any kind (an HTTP request today). A batch
    /// stream holds one or more.
    Envelope(Envelope),
    /// Gateway to agent, the only frame on the gateway's side of a batch stream: how many of the
    /// batch's records it accepted, and (version 6) which of those it shed.
    Ack {
        /// Records accepted; the agent counts the rest of the batch as rejected.
        accepted: u32,
        /// Accepted records no target could take (version 6; empty before, and never sent to
        /// an agent of an older version): the agent makes fewer such copies.
        shed: Shed,
    },
    /// Agent to gateway, TLS-over-TCP transport only: the batch before it is complete (on QUIC
    /// the end of the stream says so). A batch may be empty: an `END` alone is a keep-alive,
    /// answered with `ACK(0)`.
    End,
    /// Agent to gateway, protocol 2, QUIC only: the first frame of a TCP tee stream, which carries
    /// the client-to-server bytes of one production TCP connection.
    TcpOpen(TcpOpen),
    /// Agent to gateway, after `TcpOpen` on the same stream: the next bytes the client sent, in
    /// order. The end of the stream is the end of the client's side of the connection.
    TcpData(Bytes),
    /// Agent to gateway, protocol 3: the first frame of a batch, naming it so that a batch sent
    /// again (its acknowledgement lost or late) is recognised and not replayed twice.
    Batch(BatchId),
}

/// Which records of a batch the gateway shed (`ACK`, version 6): it accepted them, but every
/// target they were routed to was at its concurrency or rate limit and no archive kept them.
/// Bit `i` stands for the batch's record `i`, counted from 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Shed([u64; MAX_BATCH_RECORDS / 64]);

impl FromIterator<usize> for Shed {
    fn from_iter<I: IntoIterator<Item = usize>>(indexes: I) -> Self {
        let mut shed = Self::default();
        for index in indexes {
            shed.insert(index);
        }
        shed
    }
}

impl Shed {
    /// Most bytes the field's bitmap takes: one bit per record of a full batch.
    const MAX_BYTES: usize = MAX_BATCH_RECORDS / 8;

    /// Marks record `index` shed; indexes past a full batch are ignored.
    pub fn insert(&mut self, index: usize) {
        if let Some(word) = self.0.get_mut(index / 64) {
            *word |= 1 << (index % 64);
        }
    }

    /// Whether record `index` was shed.
    pub fn contains(&self, index: usize) -> bool {
        self.0
            .get(index / 64)
            .is_some_and(|word| word & (1 << (index % 64)) != 0)
    }

    /// Whether no record was shed.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|word| *word == 0)
    }

    /// How many records were shed.
    pub fn len(&self) -> u32 {
        self.0.iter().map(|word| word.count_ones()).sum()
    }

    /// The bitmap's bytes, record 0 in the low bit of the first, without trailing zero bytes.
    fn bytes(&self) -> ([u8; Self::MAX_BYTES], usize) {
        let mut out = [0u8; Self::MAX_BYTES];
        for (i, word) in self.0.iter().enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&word.to_le_bytes());
        }
        let used = out.iter().rposition(|b| *b != 0).map_or(0, |last| last + 1);
        (out, used)
    }

    fn decode(src: &mut Bytes) -> Result<Self, DecodeError> {
        let len = usize::from(get_u8(src, "shed")?);
        if len > Self::MAX_BYTES {
            return Err(DecodeError::OutOfRange("shed"));
        }
        let bitmap = take(src, len, "shed")?;
        let mut shed = Self::default();
        for (i, byte) in bitmap.iter().enumerate() {
            shed.0[i / 8] |= u64::from(*byte) << ((i % 8) * 8);
        }
        Ok(shed)
    }
}

/// Which batch a `BATCH` frame opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BatchId {
    /// Random per agent process (an agent session); with `seq`, unique.
    pub session: u64,
    /// Increases by one per batch of the session, from 1.
    pub seq: u64,
    /// The agent sent this batch before without getting its acknowledgement.
    pub retry: bool,
}

/// The opening of a TCP tee stream: which production connection it copies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpOpen {
    /// Agent-assigned connection number, unique per agent process; for correlation only.
    pub id: u64,
    /// When the agent accepted the connection, nanoseconds since the Unix epoch.
    pub opened_at_unix_nanos: u64,
    /// The agent's `cluster` setting.
    pub source_cluster: String,
    /// The name of the agent's `tcp:` listener that accepted the connection; the gateway routes
    /// on it.
    pub listener: String,
}

/// The agent's greeting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version the agent speaks.
    pub protocol_version: u16,
    /// The agent's `cluster` setting.
    pub source_cluster: String,
    /// The agent's software version, for logs.
    pub software: String,
}

/// The gateway's answer to [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// Protocol version the gateway speaks on this connection.
    pub protocol_version: u16,
    /// The identity the gateway read from the agent's certificate.
    pub agent_identity: String,
    /// The gateway's software version, for logs.
    pub software: String,
    /// The gateway process, random per start and not 0 (version 4); 0: not said (version 3 and
    /// older, where the field is absent). A batch goes again on a new connection only when both
    /// connections' `WELCOME` name the same instance: only that process remembers it.
    pub gateway_instance: u64,
}

impl Frame {
    /// Appends this frame, prefix included, to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) {
        let start = dst.len();
        dst.put_u32(0); // patched below
        match self {
            Frame::Hello(hello) => {
                dst.put_u8(TYPE_HELLO);
                dst.put_u16(hello.protocol_version);
                put_str16(dst, &hello.source_cluster);
                put_str16(dst, &hello.software);
            }
            Frame::Welcome(welcome) => {
                dst.put_u8(TYPE_WELCOME);
                dst.put_u16(welcome.protocol_version);
                put_str16(dst, &welcome.agent_identity);
                put_str16(dst, &welcome.software);
                if welcome.gateway_instance != 0 {
                    dst.put_u64(welcome.gateway_instance);
                }
            }
            Frame::Request(request) => {
                dst.put_u8(TYPE_REQUEST);
                encode_request(request, dst);
            }
            Frame::Envelope(envelope) => {
                dst.put_u8(TYPE_ENVELOPE);
                crate::envelope::encode(envelope, dst);
            }
            Frame::Ack { accepted, shed } => {
                dst.put_u8(TYPE_ACK);
                dst.put_u32(*accepted);
                if !shed.is_empty() {
                    let (bitmap, used) = shed.bytes();
                    dst.put_u8(used as u8);
                    dst.put_slice(&bitmap[..used]);
                }
            }
            Frame::End => dst.put_u8(TYPE_END),
            Frame::TcpOpen(open) => {
                dst.put_u8(TYPE_TCP_OPEN);
                dst.put_u64(open.id);
                dst.put_u64(open.opened_at_unix_nanos);
                put_str16(dst, &open.source_cluster);
                put_str16(dst, &open.listener);
            }
            Frame::TcpData(data) => {
                dst.put_u8(TYPE_TCP_DATA);
                put_bytes32(dst, data);
            }
            Frame::Batch(id) => {
                dst.put_u8(TYPE_BATCH);
                dst.put_u64(id.session);
                dst.put_u64(id.seq);
                dst.put_u8(if id.retry { BATCH_RETRY } else { 0 });
            }
        }
        let len = dst.len() - start - PREFIX_LEN;
        let len = u32::try_from(len).unwrap_or(u32::MAX);
        dst[start..start + PREFIX_LEN].copy_from_slice(&len.to_be_bytes());
    }

    /// Encoded size of this frame, prefix included.
    pub fn encoded_len(&self) -> usize {
        PREFIX_LEN
            + 1
            + match self {
                Frame::Hello(h) => 2 + str16_len(&h.source_cluster) + str16_len(&h.software),
                Frame::Welcome(w) => {
                    2 + str16_len(&w.agent_identity)
                        + str16_len(&w.software)
                        + if w.gateway_instance != 0 { 8 } else { 0 }
                }
                Frame::Request(r) => request_len(r),
                Frame::Envelope(e) => crate::envelope::encoded_len(e),
                Frame::Ack { shed, .. } if shed.is_empty() => 4,
                Frame::Ack { shed, .. } => 4 + 1 + shed.bytes().1,
                Frame::End => 0,
                Frame::TcpOpen(o) => 8 + 8 + str16_len(&o.source_cluster) + str16_len(&o.listener),
                Frame::TcpData(data) => 4 + data.len(),
                Frame::Batch(_) => 8 + 8 + 1,
            }
    }

    /// Takes one whole frame off the front of `src`.
    ///
    /// `Ok(None)`: more bytes are needed (nothing is consumed). `Err`: the stream is corrupt and
    /// must be reset; what `src` holds afterwards is unspecified.
    pub fn decode(src: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
        if src.len() < PREFIX_LEN {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]);
        if len > MAX_FRAME_LEN {
            return Err(DecodeError::FrameTooLarge {
                len,
                max: MAX_FRAME_LEN,
            });
        }
        if len == 0 {
            return Err(DecodeError::EmptyFrame);
        }
        let total = PREFIX_LEN + len as usize;
        if src.len() < total {
            // No `reserve` for the announced length: an announcement is not memory the peer
            // has earned (a gateway charges what arrives against its budget, not what is said).
            return Ok(None);
        }
        src.advance(PREFIX_LEN);
        let mut payload = src.split_to(len as usize).freeze();
        let frame_type = payload.get_u8();
        let frame = match frame_type {
            TYPE_HELLO => Frame::Hello(Hello {
                protocol_version: get_u16(&mut payload, "protocol_version")?,
                source_cluster: get_str16(&mut payload, "source_cluster")?,
                software: get_str16(&mut payload, "software")?,
            }),
            TYPE_WELCOME => Frame::Welcome(Welcome {
                protocol_version: get_u16(&mut payload, "protocol_version")?,
                agent_identity: get_str16(&mut payload, "agent_identity")?,
                software: get_str16(&mut payload, "software")?,
                // Version 4 appends it; absent before.
                gateway_instance: if payload.has_remaining() {
                    get_u64(&mut payload, "gateway_instance")?
                } else {
                    0
                },
            }),
            TYPE_REQUEST => Frame::Request(decode_request(&mut payload)?),
            TYPE_ENVELOPE => Frame::Envelope(crate::envelope::decode(&mut payload)?),
            TYPE_ACK => Frame::Ack {
                accepted: get_u32(&mut payload, "accepted")?,
                // Version 6 appends it when any record was shed; absent before.
                shed: if payload.has_remaining() {
                    Shed::decode(&mut payload)?
                } else {
                    Shed::default()
                },
            },
            TYPE_END => Frame::End,
            TYPE_TCP_OPEN => Frame::TcpOpen(TcpOpen {
                id: get_u64(&mut payload, "id")?,
                opened_at_unix_nanos: get_u64(&mut payload, "opened_at")?,
                source_cluster: get_str16(&mut payload, "source_cluster")?,
                listener: get_str16(&mut payload, "listener")?,
            }),
            TYPE_TCP_DATA => {
                let len = get_u32(&mut payload, "data")? as usize;
                Frame::TcpData(take(&mut payload, len, "data")?)
            }
            TYPE_BATCH => {
                let session = get_u64(&mut payload, "session")?;
                let seq = get_u64(&mut payload, "seq")?;
                // Readers ignore flag bits they do not know.
                let flags = get_u8(&mut payload, "flags")?;
                Frame::Batch(BatchId {
                    session,
                    seq,
                    retry: flags & BATCH_RETRY != 0,
                })
            }
            other => return Err(DecodeError::UnknownFrameType(other)),
        };
        if payload.has_remaining() {
            return Err(DecodeError::TrailingBytes(payload.remaining()));
        }
        Ok(Some(frame))
    }
}

impl Frame {
    /// The bytes that precede `len` bytes of data in a `TCP_DATA` frame: write them, then the data
    /// itself, and the data is never copied into a frame buffer. `len` must leave the frame within
    /// [`MAX_FRAME_LEN`].
    pub fn tcp_data_header(len: usize) -> [u8; PREFIX_LEN + 1 + 4] {
        let data = u32::try_from(len).unwrap_or(u32::MAX);
        let frame = data.saturating_add(1 + 4);
        let mut out = [0u8; PREFIX_LEN + 1 + 4];
        out[..4].copy_from_slice(&frame.to_be_bytes());
        out[4] = TYPE_TCP_DATA;
        out[5..].copy_from_slice(&data.to_be_bytes());
        out
    }

    /// The `ENVELOPE` frame of an RPC request made of its parts: the same bytes as
    /// `Frame::Envelope(Envelope::RpcRequest(..)).encode`, with `message` copied once, into a
    /// buffer of exactly the frame's size.
    pub fn rpc_request(meta: &Meta, connection: u64, call: &RpcCall, message: &[u8]) -> Bytes {
        let len = 1 + crate::envelope::rpc_request_len(meta, call, message.len());
        let mut dst = BytesMut::with_capacity(PREFIX_LEN + len);
        dst.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
        dst.put_u8(TYPE_ENVELOPE);
        crate::envelope::put_rpc_request(meta, connection, call, message, &mut dst);
        dst.freeze()
    }
}

impl MirroredRequest {
    /// Appends the record's fields in the layout of a `REQUEST` frame's payload (protocol 4 and
    /// older; native archive records of kind 1) to `dst`.
    pub fn encode_fields(&self, dst: &mut BytesMut) {
        encode_request(self, dst);
    }

    /// Reads a record's fields, as written by [`MirroredRequest::encode_fields`], from `src`.
    pub fn decode_fields(src: &mut Bytes) -> Result<Self, DecodeError> {
        decode_request(src)
    }
}

fn encode_request(r: &MirroredRequest, dst: &mut BytesMut) {
    dst.put_u64(r.meta.id);
    dst.put_u64(r.received_at_unix_nanos());
    dst.put_u8(version_code(r.version));
    // The same flags as an envelope's request part.
    dst.put_u8(request_flags(r.body_truncated, r.trailers.is_some()));
    put_str16(dst, &r.meta.source_cluster);
    put_str16(dst, r.method.as_str());
    put_bytes32(dst, uri_bytes(&r.uri).as_bytes());
    put_headers(dst, &r.headers);
    put_bytes32(dst, &r.body);
    if let Some(trailers) = &r.trailers {
        put_headers(dst, trailers);
    }
}

fn request_len(r: &MirroredRequest) -> usize {
    8 + 8
        + 1
        + 1
        + str16_len(&r.meta.source_cluster)
        + str16_len(r.method.as_str())
        + 4
        + uri_bytes(&r.uri).len()
        + headers_len(&r.headers)
        + 4
        + r.body.len()
        + r.trailers.as_ref().map_or(0, headers_len)
}

fn decode_request(src: &mut Bytes) -> Result<MirroredRequest, DecodeError> {
    let id = get_u64(src, "id")?;
    let nanos = get_u64(src, "received_at")?;
    let version = get_version(src)?;
    let flags = get_u8(src, "flags")?;
    let source_cluster: Arc<str> = get_str16(src, "source_cluster")?.into();
    let meta = Meta::basic(id, UNIX_EPOCH + Duration::from_nanos(nanos), source_cluster);
    get_request_rest(meta, version, flags, src)
}

impl MirroredRequest {
    /// Size of this record's `ENVELOPE` frame, prefix included: what it costs in a batch and in
    /// a queue's budget.
    pub fn frame_len(&self) -> usize {
        PREFIX_LEN + 1 + encoded_len_of_request(self)
    }
}

/// An HTTP request's `ENVELOPE` frame, built while the request streams: the head when it is
/// admitted, the body chunk by chunk, the trailers and flags at the end. The finished frame is
/// the one allocation a copy makes, and it holds nothing of the connection's buffers.
#[derive(Debug)]
pub struct RequestFrame {
    buf: BytesMut,
    /// Where the part's flags byte is.
    flags_at: usize,
    /// Where the body's length is; the body follows it.
    body_at: usize,
}

impl RequestFrame {
    /// Starts the frame with `meta` and the request head; room is made for `body_hint` body
    /// bytes (the announced length, capped at the limit), so that a body that comes as announced
    /// is copied once and never moved.
    pub fn new(
        meta: &Meta,
        method: &Method,
        uri: &Uri,
        version: Version,
        headers: &HeaderMap,
        body_hint: usize,
    ) -> Self {
        let uri_text = uri_bytes(uri);
        let head = PREFIX_LEN
            + 1
            + 1
            + meta_len(meta)
            + 2
            + str16_len(method.as_str())
            + 4
            + uri_text.len()
            + headers_len(headers)
            + 4;
        let mut buf = BytesMut::with_capacity(head + body_hint);
        buf.put_u32(0); // the frame's length, patched by `finish`
        buf.put_u8(TYPE_ENVELOPE);
        buf.put_u8(KIND_HTTP_REQUEST);
        put_meta(meta, &mut buf);
        let flags_at = buf.len() + 1;
        // Flags are known once the body has ended.
        put_request_head(version, 0, method, &uri_text, headers, &mut buf);
        let body_at = buf.len();
        buf.put_u32(0); // the body's length, patched by `finish`
        Self {
            buf,
            flags_at,
            body_at,
        }
    }

    /// Body bytes appended so far.
    pub fn body_len(&self) -> usize {
        self.buf.len() - self.body_at - 4
    }

    /// Appends body bytes. When the buffer must grow, it doubles, but never past room for
    /// `expected` body bytes (what the caller will keep at most: the announced length, or the
    /// limit) unless a chunk needs more: a body that comes as announced ends in a buffer of its
    /// size, and no buffer grows past what the limit lets a copy hold.
    pub fn push_body(&mut self, chunk: &[u8], expected: usize) {
        let needed = self.buf.len() + chunk.len();
        if needed > self.buf.capacity() {
            let most = self.body_at + 4 + expected;
            let grown = (self.buf.capacity() * 2).min(most).max(needed);
            let mut bigger = BytesMut::with_capacity(grown);
            bigger.extend_from_slice(&self.buf);
            self.buf = bigger;
        }
        self.buf.extend_from_slice(chunk);
    }

    /// Memory the frame holds now (its buffer's capacity).
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Ends the body, appends `trailers` if there are any, and returns the whole frame, prefix
    /// included, with the memory it holds.
    pub fn finish(mut self, trailers: Option<&HeaderMap>, truncated: bool) -> (Bytes, usize) {
        let body_len = u32::try_from(self.body_len()).unwrap_or(u32::MAX);
        self.buf[self.body_at..self.body_at + 4].copy_from_slice(&body_len.to_be_bytes());
        if let Some(trailers) = trailers {
            put_headers(&mut self.buf, trailers);
        }
        self.buf[self.flags_at] = request_flags(truncated, trailers.is_some());
        let len = u32::try_from(self.buf.len() - PREFIX_LEN).unwrap_or(u32::MAX);
        self.buf[..PREFIX_LEN].copy_from_slice(&len.to_be_bytes());
        let held = self.buf.capacity();
        (self.buf.freeze(), held)
    }
}

/// The `ENVELOPE` frame of a request with production's answer (kind 6), made of `request`, the
/// request's finished frame of kind 1 ([`RequestFrame::finish`]), and the answer: the request's
/// bytes copied once into a frame of exactly the size of both. `None` when `request` is not a
/// finished request frame.
pub fn with_production(request: &[u8], production: &Production) -> Option<Bytes> {
    let (prefix, rest) = request.split_first_chunk::<PREFIX_LEN>()?;
    if usize::try_from(u32::from_be_bytes(*prefix)).ok()? != rest.len()
        || rest.first() != Some(&TYPE_ENVELOPE)
        || rest.get(1) != Some(&KIND_HTTP_REQUEST)
    {
        return None;
    }
    let len = rest.len() + crate::envelope::production_len(production);
    let mut buf = BytesMut::with_capacity(PREFIX_LEN + len);
    buf.put_u32(u32::try_from(len).ok()?);
    buf.put_u8(TYPE_ENVELOPE);
    buf.put_u8(crate::envelope::KIND_HTTP_EXCHANGE);
    buf.put_slice(&rest[2..]);
    crate::envelope::put_production(production, &mut buf);
    Some(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderName, HeaderValue};
    use proptest::prelude::*;

    fn sample_request() -> MirroredRequest {
        let mut headers = HeaderMap::new();
        headers.append("host", HeaderValue::from_static("api.example.com"));
        headers.append("x-repeat", HeaderValue::from_static("one"));
        headers.append("x-repeat", HeaderValue::from_static("two"));
        headers.append(
            "x-binary",
            HeaderValue::from_bytes(b"\xfe\xff opaque").expect("obs-text is allowed"),
        );
        MirroredRequest {
            meta: Meta::basic(
                42,
                UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789),
                "prod-eu-1".into(),
            ),
            method: Method::POST,
            uri: Uri::from_static("/v1/items?x=1&y=%20"),
            version: Version::HTTP_11,
            headers,
            body: Bytes::from_static(b"\x00\x01binary\r\n\xff"),
            trailers: None,
            body_truncated: false,
            production: None,
        }
    }

    fn ack(accepted: u32) -> Frame {
        Frame::Ack {
            accepted,
            shed: Shed::default(),
        }
    }

    #[test]
    fn shed_bitmap_names_records_by_index() {
        let shed: Shed = [0, 9, 255, 256].into_iter().collect();
        assert!(shed.contains(0) && shed.contains(9) && shed.contains(255));
        assert!(
            !shed.contains(1) && !shed.contains(256),
            "past a full batch nothing is shed"
        );
        assert_eq!(shed.len(), 3);
        // Record 9 is the second byte's bit 1; the bitmap ends with its last non-zero byte.
        let mut buf = BytesMut::new();
        Frame::Ack {
            accepted: 10,
            shed: [9].into_iter().collect(),
        }
        .encode(&mut buf);
        assert_eq!(&buf[..], &[0, 0, 0, 8, TYPE_ACK, 0, 0, 0, 10, 2, 0, 0b10]);
        // A version 5 ACK (nothing shed) is exactly what version 5 sent.
        let mut buf = BytesMut::new();
        ack(10).encode(&mut buf);
        assert_eq!(&buf[..], &[0, 0, 0, 5, TYPE_ACK, 0, 0, 0, 10]);
    }

    fn round_trip(frame: &Frame) -> Frame {
        let mut buf = BytesMut::new();
        frame.encode(&mut buf);
        assert_eq!(buf.len(), frame.encoded_len(), "encoded_len is exact");
        let decoded = Frame::decode(&mut buf).expect("decodes").expect("complete");
        assert!(buf.is_empty(), "exactly one frame consumed");
        decoded
    }

    #[test]
    fn built_frame_is_the_encoded_frame() {
        for (trailers, truncated) in [(false, false), (true, true)] {
            let mut r = sample_request();
            r.meta.session = 7;
            r.meta.tap = "http".into();
            r.meta.sampling = crate::Sampling {
                rule: "checkout".into(),
                rate_ppm: 250_000,
            };
            if trailers {
                let mut t = HeaderMap::new();
                t.insert("x-checksum", HeaderValue::from_static("abc"));
                r.trailers = Some(t);
            }
            r.body_truncated = truncated;
            let mut built = RequestFrame::new(&r.meta, &r.method, &r.uri, r.version, &r.headers, 2);
            for chunk in r.body.chunks(3) {
                built.push_body(chunk, r.body.len());
            }
            let (frame, _held) = built.finish(r.trailers.as_ref(), truncated);
            let mut want = BytesMut::new();
            Frame::Envelope(Envelope::HttpRequest(r.clone())).encode(&mut want);
            assert_eq!(&frame[..], &want[..], "trailers {trailers}");
        }
        // A body that comes as announced fills the frame's one allocation exactly.
        let r = sample_request();
        let mut built = RequestFrame::new(
            &r.meta,
            &r.method,
            &r.uri,
            r.version,
            &r.headers,
            r.body.len(),
        );
        built.push_body(&r.body, r.body.len());
        let (frame, held) = built.finish(None, false);
        assert_eq!(
            held,
            frame.len(),
            "nothing set aside in vain, nothing grown"
        );
        // Without room set aside, growing stops at what is expected: a body that comes as
        // announced, in chunks, still ends in a buffer of its size.
        let mut built = RequestFrame::new(&r.meta, &r.method, &r.uri, r.version, &r.headers, 0);
        for chunk in r.body.chunks(2) {
            built.push_body(chunk, r.body.len());
        }
        let (grown, held) = built.finish(None, false);
        assert_eq!(&grown[..], &frame[..]);
        assert_eq!(held, grown.len(), "grew to the expected size, not past it");
    }

    #[test]
    fn batch_names_round_trip_and_unknown_flags_are_ignored() {
        let id = BatchId {
            session: 0xdead_beef,
            seq: 7,
            retry: true,
        };
        assert_eq!(round_trip(&Frame::Batch(id)), Frame::Batch(id));
        let mut buf = BytesMut::new();
        Frame::Batch(BatchId { retry: false, ..id }).encode(&mut buf);
        assert_eq!(buf.len(), Frame::Batch(id).encoded_len());
        let last = buf.len() - 1;
        buf[last] = 0xfe; // a flag bit from the future, and no retry bit
        assert_eq!(
            Frame::decode(&mut buf).expect("decodes"),
            Some(Frame::Batch(BatchId { retry: false, ..id }))
        );
    }

    #[test]
    fn request_round_trips_with_repeated_headers_and_binary_body() {
        let frame = Frame::Request(sample_request());
        assert_eq!(round_trip(&frame), frame);
    }

    #[test]
    fn control_frames_round_trip() {
        for frame in [
            Frame::Hello(Hello {
                protocol_version: 1,
                source_cluster: "prod".into(),
                software: "teeway 0.1.0".into(),
            }),
            Frame::Welcome(Welcome {
                protocol_version: 3,
                agent_identity: "agent".into(),
                software: "teeway 0.1.0".into(),
                gateway_instance: 0,
            }),
            Frame::Welcome(Welcome {
                protocol_version: 4,
                agent_identity: "agent".into(),
                software: "teeway 0.1.0".into(),
                gateway_instance: 0x1234_5678_9abc_def0,
            }),
            Frame::Ack {
                accepted: 7,
                shed: Shed::default(),
            },
            Frame::Ack {
                accepted: 256,
                shed: [0, 9, 63, 64, 255].into_iter().collect(),
            },
            Frame::End,
        ] {
            assert_eq!(round_trip(&frame), frame);
        }
    }

    #[test]
    fn h2_request_keeps_absolute_uri_and_trailers() {
        let mut r = sample_request();
        r.version = Version::HTTP_2;
        r.uri = Uri::from_static("http://api.example.com/pkg.Service/Call");
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        r.trailers = Some(trailers);
        r.body_truncated = true;
        let frame = Frame::Request(r);
        assert_eq!(round_trip(&frame), frame);
    }

    #[test]
    fn partial_input_waits_without_consuming() {
        let mut full = BytesMut::new();
        Frame::Request(sample_request()).encode(&mut full);
        for cut in 0..full.len() {
            let mut part = BytesMut::from(&full[..cut]);
            assert_eq!(Frame::decode(&mut part), Ok(None), "cut at {cut}");
            assert_eq!(part.len(), cut, "nothing consumed at cut {cut}");
        }
    }

    #[test]
    fn two_frames_back_to_back() {
        let mut buf = BytesMut::new();
        ack(1).encode(&mut buf);
        ack(2).encode(&mut buf);
        assert_eq!(Frame::decode(&mut buf), Ok(Some(ack(1))));
        assert_eq!(Frame::decode(&mut buf), Ok(Some(ack(2))));
        assert_eq!(Frame::decode(&mut buf), Ok(None));
    }

    #[test]
    fn oversized_length_is_refused_before_buffering() {
        let mut buf = BytesMut::from(&(MAX_FRAME_LEN + 1).to_be_bytes()[..]);
        assert_eq!(
            Frame::decode(&mut buf),
            Err(DecodeError::FrameTooLarge {
                len: MAX_FRAME_LEN + 1,
                max: MAX_FRAME_LEN
            })
        );
    }

    #[test]
    fn malformed_frames_are_errors() {
        let cases: &[(&[u8], DecodeError)] = &[
            (&[0, 0, 0, 0], DecodeError::EmptyFrame),
            (&[0, 0, 0, 1, 0x7f], DecodeError::UnknownFrameType(0x7f)),
            (
                &[0, 0, 0, 3, TYPE_ACK, 0, 0],
                DecodeError::Truncated("accepted"),
            ),
            (
                &[0, 0, 0, 8, TYPE_ACK, 0, 0, 0, 1, 1, 9, 9],
                DecodeError::TrailingBytes(1),
            ),
            (
                &[0, 0, 0, 7, TYPE_ACK, 0, 0, 0, 1, 2, 9],
                DecodeError::Truncated("shed"),
            ),
            (
                &[0, 0, 0, 6, TYPE_ACK, 0, 0, 0, 1, 33],
                DecodeError::OutOfRange("shed"),
            ),
        ];
        for (bytes, want) in cases {
            let mut buf = BytesMut::from(*bytes);
            assert_eq!(Frame::decode(&mut buf), Err(*want), "input {bytes:?}");
        }
    }

    #[test]
    fn bad_method_and_header_name_are_refused() {
        let mut r = sample_request();
        r.method = Method::from_bytes(b"GET").expect("valid");
        let mut buf = BytesMut::new();
        Frame::Request(r).encode(&mut buf);
        // The method field sits after prefix(4) type(1) id(8) time(8) version(1) flags(1)
        // cluster(2 + 9) and its own length (2).
        let method_at = 4 + 1 + 8 + 8 + 1 + 1 + 2 + 9 + 2;
        assert_eq!(&buf[method_at..method_at + 3], b"GET");
        buf[method_at] = b' ';
        assert_eq!(Frame::decode(&mut buf), Err(DecodeError::InvalidMethod));
    }

    fn arb_header_name() -> impl Strategy<Value = HeaderName> {
        "[a-z][a-z0-9-]{0,20}".prop_map(|s| HeaderName::from_bytes(s.as_bytes()).expect("token"))
    }

    fn arb_header_value() -> impl Strategy<Value = HeaderValue> {
        proptest::collection::vec(prop_oneof![0x20u8..0x7f, 0x80u8..=0xff, Just(b'\t')], 0..40)
            .prop_map(|v| HeaderValue::from_bytes(&v).expect("visible bytes"))
    }

    fn arb_headers() -> impl Strategy<Value = HeaderMap> {
        proptest::collection::vec((arb_header_name(), arb_header_value()), 0..12).prop_map(
            |pairs| {
                let mut map = HeaderMap::new();
                for (n, v) in pairs {
                    map.append(n, v);
                }
                map
            },
        )
    }

    prop_compose! {
        fn arb_request()(
            id in any::<u64>(),
            nanos in any::<u64>(),
            cluster in "[a-zA-Z0-9._-]{0,30}",
            method in prop_oneof![Just(Method::GET), Just(Method::POST), Just(Method::PUT),
                Just(Method::DELETE), Just(Method::from_bytes(b"PURGE").expect("token"))],
            path in "(/[a-zA-Z0-9._~%-]{0,12}){1,4}",
            query in proptest::option::of("[a-zA-Z0-9=&%]{0,30}"),
            version in prop_oneof![Just(http::Version::HTTP_10), Just(http::Version::HTTP_11),
                Just(http::Version::HTTP_2)],
            headers in arb_headers(),
            body in proptest::collection::vec(any::<u8>(), 0..2048),
            trailers in proptest::option::of(arb_headers()),
            body_truncated in any::<bool>(),
        ) -> MirroredRequest {
            let target = match query {
                Some(q) => format!("{path}?{q}"),
                None => path,
            };
            MirroredRequest {
                meta: Meta::basic(id, UNIX_EPOCH + Duration::from_nanos(nanos), cluster.into()),
                method,
                uri: target.parse().expect("generated URIs are valid"),
                version,
                headers,
                body: Bytes::from(body),
                trailers,
                body_truncated,
                production: None,
            }
        }
    }

    prop_compose! {
        fn arb_production()(
            latency in any::<u64>(),
            status in 100u16..1000,
            version in prop_oneof![Just(http::Version::HTTP_11), Just(http::Version::HTTP_2)],
            headers in arb_headers(),
            body in proptest::collection::vec(any::<u8>(), 0..1024),
            trailers in proptest::option::of(arb_headers()),
            body_truncated in any::<bool>(),
        ) -> Production {
            Production {
                latency: Duration::from_nanos(latency),
                status: http::StatusCode::from_u16(status).expect("100 to 999"),
                version,
                headers,
                body: Bytes::from(body),
                trailers,
                body_truncated,
            }
        }
    }

    #[test]
    fn tcp_tee_frames_round_trip_with_binary_data() {
        let open = Frame::TcpOpen(TcpOpen {
            id: u64::MAX - 1,
            opened_at_unix_nanos: 1_700_000_000_000_000_001,
            source_cluster: "prod-eu-1".into(),
            listener: "redis".into(),
        });
        assert_eq!(round_trip(&open), open);
        let data = Frame::TcpData(Bytes::from_static(b"*1\r\n$4\r\nPING\r\n\x00\xff"));
        assert_eq!(round_trip(&data), data);
        assert_eq!(
            round_trip(&Frame::TcpData(Bytes::new())),
            Frame::TcpData(Bytes::new())
        );
    }

    #[test]
    fn tcp_data_header_is_the_encoded_frame_minus_its_data() {
        let data = Bytes::from_static(b"PING\r\n");
        let mut framed = BytesMut::new();
        Frame::TcpData(data.clone()).encode(&mut framed);
        let mut split = Frame::tcp_data_header(data.len()).to_vec();
        split.extend_from_slice(&data);
        assert_eq!(&framed[..], &split[..]);
    }

    #[test]
    fn tcp_data_announcing_more_than_its_frame_is_refused() {
        let mut buf = BytesMut::new();
        Frame::TcpData(Bytes::from_static(b"abcd")).encode(&mut buf);
        // Claim 5 bytes of data where the frame holds 4.
        buf[8] = 5;
        assert!(matches!(
            Frame::decode(&mut buf),
            Err(DecodeError::Truncated("data"))
        ));
    }

    proptest! {
        #[test]
        fn any_tcp_data_round_trips(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let frame = Frame::TcpData(Bytes::from(data));
            prop_assert_eq!(round_trip(&frame), frame);
        }

        #[test]
        fn any_envelope_round_trips_and_any_cut_of_it_waits(
            request in arb_request(),
            session in any::<u64>(),
            tap in "[a-z]{0,8}",
            rule in "[a-z0-9\\[\\]]{0,12}",
            rate_ppm in any::<u32>(),
            production in proptest::option::of(arb_production()),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut request = request;
            request.meta.session = session;
            request.meta.tap = tap.into();
            request.meta.sampling = crate::Sampling { rule: rule.into(), rate_ppm };
            let alone = Frame::Envelope(Envelope::HttpRequest(request.clone()));
            request.production = production.map(Box::new);
            let frame = Frame::Envelope(Envelope::HttpRequest(request.clone()));
            prop_assert_eq!(round_trip(&frame), frame.clone());
            let mut full = BytesMut::new();
            frame.encode(&mut full);
            if let Some(production) = &request.production {
                // The agent's way to the same bytes: the request's frame, then the answer.
                let mut first = BytesMut::new();
                alone.encode(&mut first);
                prop_assert_eq!(with_production(&first, production), Some(full.clone().freeze()));
                prop_assert_eq!(with_production(&full, production), None);
            }
            let cut = cut.index(full.len());
            let mut part = BytesMut::from(&full[..cut]);
            prop_assert_eq!(Frame::decode(&mut part), Ok(None));
        }

        #[test]
        fn any_request_round_trips(request in arb_request()) {
            let frame = Frame::Request(request);
            prop_assert_eq!(round_trip(&frame), frame);
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_accepted_frames_round_trip(
            bytes in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            // The fuzz target's property, on every `cargo test`.
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(frame)) = Frame::decode(&mut buf) {
                prop_assert_eq!(round_trip(&frame), frame);
            }
        }

        #[test]
        fn any_truncation_of_a_valid_frame_waits(request in arb_request(), cut in any::<prop::sample::Index>()) {
            let mut full = BytesMut::new();
            Frame::Request(request).encode(&mut full);
            let cut = cut.index(full.len());
            let mut part = BytesMut::from(&full[..cut]);
            prop_assert_eq!(Frame::decode(&mut part), Ok(None));
        }
    }
}
