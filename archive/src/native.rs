//! The native archive format: a segment header, then length-prefixed, checksummed records.
//!
//! ```text
//! segment = magic[8] version:u16be flags:u16be record*
//! magic   = 89 54 57 41 0D 0A 1A 0A          ("\x89TWA\r\n\x1a\n")
//! record  = len:u32be payload_crc:u32be header_crc:u32be payload[len]
//! payload = kind:u8 fields...
//! ```
//!
//! Version 2 writes every record as kind 9, an [`Envelope`] in the bytes of the protocol's
//! `ENVELOPE` frame (whose type is also 9: a frame's body is a record's payload, byte for byte).
//! Readers also take version 1 segments, whose kinds 1 (request) and 2 (response) predate
//! envelopes.
//!
//! `header_crc` is the CRC-32C of the eight bytes before it and `payload_crc` that of the payload.
//! A reader therefore knows, for every record, which of three things happened:
//!
//! - the file ends inside a record: a **torn tail** (the writer stopped mid-write). It is
//!   skipped with a warning; everything before it is intact.
//! - `header_crc` does not match: the length cannot be trusted, so the rest of the segment is
//!   **unreadable**; records before it are intact.
//! - `payload_crc` does not match: that record is **corrupt** and skipped; the length was
//!   verified, so reading resumes at the next record.
//!
//! No record is ever returned unless both checksums match and its fields decode. Kinds a reader
//! does not know are skipped and reported, so a newer writer's records do not stop an older reader.
//! A compressed segment is the same bytes as a series of zstd frames, one per flush.
//! `docs/archive.md` is the normative description.

use std::io::{self, Read};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use http::{StatusCode, Version};

use teeway_wire::fields::{
    get_headers, get_str16, get_u16, get_u64, get_u8, put_bytes32, put_headers, put_str16,
};
use teeway_wire::{DecodeError, MirroredRequest};

use crate::{unix_nanos, Envelope, ResponseOrigin, ResponseRecord};

/// First bytes of every native segment.
pub const MAGIC: [u8; 8] = *b"\x89TWA\r\n\x1a\n";
/// Format version written in the segment header: 2, records are envelopes. Readers take 1 too.
pub const VERSION: u16 = 2;
/// The oldest version readers take.
pub const OLDEST_VERSION: u16 = 1;
/// Size of the segment header.
pub const SEGMENT_HEADER_LEN: usize = 12;
/// Size of a record header.
pub const RECORD_HEADER_LEN: usize = 12;
/// Largest payload a reader accepts; a larger length is treated as a corrupt header.
pub const MAX_RECORD_LEN: u32 = 64 * 1024 * 1024;

/// Record kind (version 1): a [`MirroredRequest`] in the layout of protocol 4's `REQUEST` frame.
pub const KIND_REQUEST: u8 = 1;
/// Record kind (version 1): a [`ResponseRecord`] without envelope metadata.
pub const KIND_RESPONSE: u8 = 2;
/// Record kind (version 2): an [`Envelope`]; the same number as the `ENVELOPE` frame type.
pub const KIND_ENVELOPE: u8 = 9;

const FLAG_BODY_TRUNCATED: u8 = 0x01;

/// Appends the segment header.
pub fn put_segment_header(dst: &mut BytesMut) {
    dst.put_slice(&MAGIC);
    dst.put_u16(VERSION);
    dst.put_u16(0);
}

/// Appends one record, header and checksums included.
pub fn put_record(record: &Envelope, dst: &mut BytesMut) {
    let start = dst.len();
    dst.put_bytes(0, RECORD_HEADER_LEN);
    dst.put_u8(KIND_ENVELOPE);
    teeway_wire::envelope::encode(record, dst);
    seal(dst, start);
}

/// Appends one record whose payload is an encoded `ENVELOPE` frame's body (the frame without
/// its length prefix): what an agent encoded once, at admission, is stored as it is.
pub fn put_frame_body(body: &[u8], dst: &mut BytesMut) {
    let start = dst.len();
    dst.put_bytes(0, RECORD_HEADER_LEN);
    dst.put_slice(body);
    seal(dst, start);
}

/// Fills in the header of the record that starts at `start` and runs to the end of `dst`.
fn seal(dst: &mut BytesMut, start: usize) {
    let payload_len = dst.len() - start - RECORD_HEADER_LEN;
    let payload_crc = crc32c::crc32c(&dst[start + RECORD_HEADER_LEN..]);
    let mut header = [0u8; RECORD_HEADER_LEN];
    header[..4].copy_from_slice(&u32::try_from(payload_len).unwrap_or(u32::MAX).to_be_bytes());
    header[4..8].copy_from_slice(&payload_crc.to_be_bytes());
    let header_crc = crc32c::crc32c(&header[..8]);
    header[8..].copy_from_slice(&header_crc.to_be_bytes());
    dst[start..start + RECORD_HEADER_LEN].copy_from_slice(&header);
}

/// Writes a record in the version 1 layout (kinds 1 and 2), for tests of old archives.
#[doc(hidden)]
pub fn put_record_v1(record: &Envelope, dst: &mut BytesMut) {
    let start = dst.len();
    dst.put_bytes(0, RECORD_HEADER_LEN);
    match record {
        Envelope::HttpRequest(r) => {
            dst.put_u8(KIND_REQUEST);
            r.encode_fields(dst);
        }
        Envelope::HttpResponse(r) => {
            dst.put_u8(KIND_RESPONSE);
            put_response(r, dst);
        }
        Envelope::RpcRequest(_) | Envelope::Other { .. } => {}
    }
    seal(dst, start);
}

fn put_response(r: &ResponseRecord, dst: &mut BytesMut) {
    dst.put_u64(r.meta.id);
    put_str16(dst, &r.meta.source_cluster);
    dst.put_u8(match r.origin {
        ResponseOrigin::Original => 2,
        ResponseOrigin::Replayed => 3,
    });
    put_str16(dst, &r.target);
    dst.put_u64(unix_nanos(r.meta.received_at));
    dst.put_u64(u64::try_from(r.latency.as_nanos()).unwrap_or(u64::MAX));
    dst.put_u16(r.status.as_u16());
    dst.put_u8(match r.version {
        Version::HTTP_10 => 1,
        Version::HTTP_2 => 3,
        _ => 2,
    });
    dst.put_u8(if r.body_truncated {
        FLAG_BODY_TRUNCATED
    } else {
        0
    });
    put_headers(dst, &r.headers);
    put_bytes32(dst, &r.body);
}

/// Decodes a verified payload.
pub fn decode_payload(payload: Bytes) -> Result<Envelope, PayloadError> {
    let mut src = payload;
    let kind = get_u8(&mut src, "kind").map_err(PayloadError::Fields)?;
    let record = match kind {
        KIND_REQUEST => Envelope::HttpRequest(MirroredRequest::decode_fields(&mut src)?),
        KIND_RESPONSE => Envelope::HttpResponse(decode_response(&mut src)?),
        KIND_ENVELOPE => teeway_wire::envelope::decode(&mut src)?,
        other => return Err(PayloadError::UnknownKind(other)),
    };
    // As in a frame: the fields end exactly where the payload does.
    if !src.is_empty() {
        return Err(DecodeError::TrailingBytes(src.len()).into());
    }
    Ok(record)
}

fn decode_response(src: &mut Bytes) -> Result<ResponseRecord, DecodeError> {
    let request_id = get_u64(src, "request_id")?;
    let source_cluster: Arc<str> = get_str16(src, "source_cluster")?.into();
    let origin = match get_u8(src, "origin")? {
        2 => ResponseOrigin::Original,
        _ => ResponseOrigin::Replayed,
    };
    let target = get_str16(src, "target")?;
    let received_at = UNIX_EPOCH + Duration::from_nanos(get_u64(src, "received_at")?);
    let latency = Duration::from_nanos(get_u64(src, "latency")?);
    let status = StatusCode::from_u16(get_u16(src, "status")?)
        .map_err(|_| DecodeError::Truncated("status"))?;
    let version = match get_u8(src, "version")? {
        1 => Version::HTTP_10,
        3 => Version::HTTP_2,
        _ => Version::HTTP_11,
    };
    let flags = get_u8(src, "flags")?;
    let headers = get_headers(src)?;
    let body = teeway_wire::fields::get_bytes32(src, "body")?;
    Ok(ResponseRecord {
        meta: teeway_wire::Meta::basic(request_id, received_at, source_cluster),
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

/// Why a payload with a valid checksum was not returned.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    /// A kind this reader does not know (written by a newer teeway).
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
    /// The fields do not decode.
    #[error("record fields do not decode: {0}")]
    Fields(#[from] DecodeError),
}

/// What reading the next record produced.
// Nearly every step is a record; boxing it would cost an allocation per record for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Next {
    /// A verified record.
    Record(Envelope),
    /// The segment ended cleanly.
    End,
    /// The record at `offset` was skipped; reading goes on after it.
    Skipped {
        /// Offset of the record in the uncompressed segment.
        offset: u64,
        /// Why.
        why: String,
    },
    /// Reading stopped at `offset`: a torn tail (`torn`), or a header that cannot be trusted.
    Stopped {
        /// Offset where the unreadable part starts.
        offset: u64,
        /// The writer stopped mid-record (as opposed to corrupt bytes).
        torn: bool,
        /// Why.
        why: String,
    },
}

/// Reads records from one uncompressed segment stream.
#[derive(Debug)]
pub struct SegmentReader<R> {
    inner: R,
    offset: u64,
    done: bool,
}

impl<R: Read> SegmentReader<R> {
    /// Reads and checks the segment header.
    pub fn new(mut inner: R) -> io::Result<Self> {
        let mut header = [0u8; SEGMENT_HEADER_LEN];
        inner.read_exact(&mut header)?;
        if header[..8] != MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a teeway archive segment (bad magic)",
            ));
        }
        let version = u16::from_be_bytes([header[8], header[9]]);
        if !(OLDEST_VERSION..=VERSION).contains(&version) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("archive format version {version} is not supported (this teeway reads {OLDEST_VERSION} to {VERSION}); it was written by a newer teeway"),
            ));
        }
        Ok(Self {
            inner,
            offset: SEGMENT_HEADER_LEN as u64,
            done: false,
        })
    }

    /// A reader of records that start at `offset` of a segment whose header was read
    /// elsewhere: a compressed segment's later frames.
    pub fn records(inner: R, offset: u64) -> Self {
        Self {
            inner,
            offset,
            done: false,
        }
    }

    /// Bytes of the segment read so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The next record, skip or stop. After `End` or `Stopped`, always `End`.
    pub fn next_record(&mut self) -> Next {
        if self.done {
            return Next::End;
        }
        let offset = self.offset;
        let mut header = [0u8; RECORD_HEADER_LEN];
        match read_full(&mut self.inner, &mut header) {
            Ok(0) => {
                self.done = true;
                return Next::End;
            }
            Ok(n) if n < RECORD_HEADER_LEN => {
                return self.stop(
                    offset,
                    true,
                    format!("file ends {n} bytes into a record header"),
                )
            }
            Ok(_) => {}
            Err(e) => return self.stop(offset, true, format!("read failed: {e}")),
        }
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
        let payload_crc = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
        let header_crc = u32::from_be_bytes([header[8], header[9], header[10], header[11]]);
        if crc32c::crc32c(&header[..8]) != header_crc {
            return self.stop(offset, false, "record header checksum mismatch".into());
        }
        if len > MAX_RECORD_LEN {
            return self.stop(offset, false, format!("record length {len} over the limit"));
        }
        let mut payload = vec![0u8; len as usize];
        match read_full(&mut self.inner, &mut payload) {
            Ok(n) if n < payload.len() => {
                return self.stop(
                    offset,
                    true,
                    format!("file ends {n} of {len} bytes into a record"),
                )
            }
            Ok(_) => {}
            Err(e) => return self.stop(offset, true, format!("read failed: {e}")),
        }
        self.offset += (RECORD_HEADER_LEN + payload.len()) as u64;
        if crc32c::crc32c(&payload) != payload_crc {
            return Next::Skipped {
                offset,
                why: "record checksum mismatch (corrupt record)".into(),
            };
        }
        match decode_payload(Bytes::from(payload)) {
            Ok(record) => Next::Record(record),
            Err(e) => Next::Skipped {
                offset,
                why: e.to_string(),
            },
        }
    }

    fn stop(&mut self, offset: u64, torn: bool, why: String) -> Next {
        self.done = true;
        Next::Stopped { offset, torn, why }
    }
}

/// Reads until `buf` is full or the input ends; returns how much was read.
pub(crate) fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::read::tests::{sample_request, sample_response};

    fn segment(records: &[Envelope]) -> Vec<u8> {
        let mut buf = BytesMut::new();
        put_segment_header(&mut buf);
        for r in records {
            put_record(r, &mut buf);
        }
        buf.to_vec()
    }

    fn read_all(bytes: &[u8]) -> (Vec<Envelope>, Vec<Next>) {
        let mut reader = SegmentReader::new(bytes).expect("header");
        let (mut records, mut other) = (Vec::new(), Vec::new());
        loop {
            match reader.next_record() {
                Next::Record(r) => records.push(r),
                Next::End => break,
                n => other.push(n),
            }
        }
        (records, other)
    }

    #[test]
    fn records_round_trip() {
        let records = vec![
            Envelope::HttpRequest(sample_request(1, b"hello\r\n\x00\xff")),
            Envelope::HttpResponse(sample_response(1)),
            Envelope::HttpRequest(sample_request(2, b"")),
        ];
        let (back, other) = read_all(&segment(&records));
        assert_eq!(back, records);
        assert!(other.is_empty(), "{other:?}");
    }

    #[test]
    fn every_truncation_is_a_torn_tail_after_intact_records() {
        let records: Vec<Envelope> = (0..3)
            .map(|i| Envelope::HttpRequest(sample_request(i, b"body")))
            .collect();
        let full = segment(&records);
        let mut ends = vec![SEGMENT_HEADER_LEN];
        let mut b = BytesMut::new();
        put_segment_header(&mut b);
        for r in &records {
            put_record(r, &mut b);
            ends.push(b.len());
        }
        for cut in SEGMENT_HEADER_LEN..full.len() {
            let (back, other) = read_all(&full[..cut]);
            let complete = ends.iter().filter(|&&e| e <= cut).count() - 1;
            assert_eq!(back, records[..complete], "cut at {cut}");
            if ends.contains(&cut) {
                assert!(other.is_empty(), "cut at a record boundary: {other:?}");
            } else {
                assert!(
                    matches!(other.as_slice(), [Next::Stopped { torn: true, .. }]),
                    "cut at {cut}: {other:?}"
                );
            }
        }
    }

    #[test]
    fn corrupt_payload_is_skipped_and_reading_resumes() {
        let records: Vec<Envelope> = (0..3)
            .map(|i| Envelope::HttpRequest(sample_request(i, b"body-bytes")))
            .collect();
        let mut bytes = segment(&records);
        // Flip a byte inside the second record's payload.
        let first_len = segment(&records[..1]).len();
        bytes[first_len + RECORD_HEADER_LEN + 5] ^= 0x40;
        let (back, other) = read_all(&bytes);
        assert_eq!(back, vec![records[0].clone(), records[2].clone()]);
        assert!(
            matches!(other.as_slice(), [Next::Skipped { .. }]),
            "{other:?}"
        );
    }

    #[test]
    fn corrupt_header_stops_without_returning_garbage() {
        let records: Vec<Envelope> = (0..3)
            .map(|i| Envelope::HttpRequest(sample_request(i, b"x")))
            .collect();
        let mut bytes = segment(&records);
        let first_len = segment(&records[..1]).len();
        bytes[first_len + 1] ^= 0x01; // the second record's length
        let (back, other) = read_all(&bytes);
        assert_eq!(back, records[..1]);
        assert!(
            matches!(other.as_slice(), [Next::Stopped { torn: false, .. }]),
            "{other:?}"
        );
    }

    #[test]
    fn unknown_kind_is_skipped() {
        let mut buf = BytesMut::new();
        put_segment_header(&mut buf);
        let payload = [200u8, 1, 2, 3];
        let crc = crc32c::crc32c(&payload);
        let mut header = [0u8; 8];
        header[..4].copy_from_slice(&4u32.to_be_bytes());
        header[4..].copy_from_slice(&crc.to_be_bytes());
        buf.put_slice(&header);
        buf.put_u32(crc32c::crc32c(&header));
        buf.put_slice(&payload);
        put_record(&Envelope::HttpRequest(sample_request(7, b"")), &mut buf);
        let (back, other) = read_all(&buf);
        assert_eq!(back.len(), 1);
        assert!(
            matches!(&other[..], [Next::Skipped { why, .. }] if why.contains("unknown record kind 200"))
        );
    }

    #[test]
    fn bad_magic_and_version_are_errors() {
        assert!(SegmentReader::new(&b"GET / HTTP/1.1\r\n"[..]).is_err());
        let mut v3 = segment(&[]);
        v3[9] = 3;
        let err = SegmentReader::new(&v3[..]).expect_err("version 3");
        assert!(
            err.to_string().contains("version 3") && err.to_string().contains("newer teeway"),
            "{err}"
        );
    }

    #[test]
    fn version_1_segments_are_still_read() {
        let request = sample_request(3, b"body");
        let response = crate::read::tests::sample_response(3);
        let mut buf = BytesMut::new();
        buf.put_slice(&MAGIC);
        buf.put_u16(1);
        buf.put_u16(0);
        put_record_v1(&Envelope::HttpRequest(request.clone()), &mut buf);
        put_record_v1(&Envelope::HttpResponse(response.clone()), &mut buf);
        let (back, other) = read_all(&buf);
        assert!(other.is_empty(), "{other:?}");
        assert_eq!(
            back,
            [
                Envelope::HttpRequest(request),
                Envelope::HttpResponse(response)
            ]
        );
    }

    #[test]
    fn an_encoded_frame_is_stored_as_it_is() {
        let mut request = sample_request(4, b"payload");
        request.meta.session = 77;
        request.meta.tap = "http".into();
        let envelope = Envelope::HttpRequest(request);
        let mut frame = BytesMut::new();
        teeway_wire::Frame::Envelope(envelope.clone()).encode(&mut frame);
        let mut stored = BytesMut::new();
        put_segment_header(&mut stored);
        put_frame_body(&frame[teeway_wire::frame::PREFIX_LEN..], &mut stored);
        assert_eq!(
            &stored[..],
            &segment(std::slice::from_ref(&envelope))[..],
            "the same bytes as the record written from the decoded envelope"
        );
        let (back, _) = read_all(&stored);
        assert_eq!(back, [envelope]);
    }
}
