//! The primitive field codec shared by the protocol's frames and the native archive format:
//! big-endian integers, `u16`-prefixed strings, `u32`-prefixed byte strings and header lists.
//! Every reader names the field it was reading when the input ran out or was invalid.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};

use crate::error::DecodeError;

/// Writes a `str16`: `u16` length, then UTF-8 bytes.
pub fn put_str16(dst: &mut BytesMut, s: &str) {
    // Longer strings are cut at a character boundary: they are names and versions, never data.
    let mut end = s.len().min(u16::MAX as usize);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    dst.put_u16(end as u16);
    dst.put_slice(&s.as_bytes()[..end]);
}

/// Encoded size of a `str16`.
pub fn str16_len(s: &str) -> usize {
    // The same cut as `put_str16`: at a character boundary.
    let mut end = s.len().min(u16::MAX as usize);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    2 + end
}

/// Writes a `bytes32`: `u32` length, then raw bytes.
pub fn put_bytes32(dst: &mut BytesMut, b: &[u8]) {
    dst.put_u32(u32::try_from(b.len()).unwrap_or(u32::MAX));
    dst.put_slice(b);
}

/// Writes a header list: `u32` count, then `str16` name and `bytes32` value per header.
pub fn put_headers(dst: &mut BytesMut, headers: &HeaderMap) {
    dst.put_u32(u32::try_from(headers.len()).unwrap_or(u32::MAX));
    for (name, value) in headers {
        put_str16(dst, name.as_str());
        put_bytes32(dst, value.as_bytes());
    }
}

/// Encoded size of a header list.
pub fn headers_len(headers: &HeaderMap) -> usize {
    4 + headers
        .iter()
        .map(|(n, v)| str16_len(n.as_str()) + 4 + v.len())
        .sum::<usize>()
}

/// Reads a header list, refusing counts the input cannot hold before allocating.
pub fn get_headers(src: &mut Bytes) -> Result<HeaderMap, DecodeError> {
    let count = get_u32(src, "header_count")? as usize;
    // Each header takes at least 6 bytes; refuse counts the frame cannot hold before reserving.
    if count > src.remaining() / 6 {
        return Err(DecodeError::Truncated("headers"));
    }
    let mut headers = HeaderMap::with_capacity(count);
    for _ in 0..count {
        let name_len = get_u16(src, "header_name")? as usize;
        let name = take(src, name_len, "header_name")?;
        let name = HeaderName::from_bytes(&name).map_err(|_| DecodeError::InvalidHeaderName)?;
        let value_len = get_u32(src, "header_value")? as usize;
        let value = take(src, value_len, "header_value")?;
        let value =
            HeaderValue::from_maybe_shared(value).map_err(|_| DecodeError::InvalidHeaderValue)?;
        headers.append(name, value);
    }
    Ok(headers)
}

/// Takes exactly `len` bytes.
pub fn take(src: &mut Bytes, len: usize, field: &'static str) -> Result<Bytes, DecodeError> {
    if src.remaining() < len {
        return Err(DecodeError::Truncated(field));
    }
    Ok(src.split_to(len))
}

/// Reads a `bytes32`.
pub fn get_bytes32(src: &mut Bytes, field: &'static str) -> Result<Bytes, DecodeError> {
    let len = get_u32(src, field)? as usize;
    take(src, len, field)
}

/// Reads a `str16`.
pub fn get_str16(src: &mut Bytes, field: &'static str) -> Result<String, DecodeError> {
    let len = get_u16(src, field)? as usize;
    let bytes = take(src, len, field)?;
    String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::InvalidUtf8(field))
}

/// Reads a `u8`.
pub fn get_u8(src: &mut Bytes, field: &'static str) -> Result<u8, DecodeError> {
    src.try_get_u8().map_err(|_| DecodeError::Truncated(field))
}

/// Reads a big-endian `u16`.
pub fn get_u16(src: &mut Bytes, field: &'static str) -> Result<u16, DecodeError> {
    src.try_get_u16().map_err(|_| DecodeError::Truncated(field))
}

/// Reads a big-endian `u32`.
pub fn get_u32(src: &mut Bytes, field: &'static str) -> Result<u32, DecodeError> {
    src.try_get_u32().map_err(|_| DecodeError::Truncated(field))
}

/// Reads a big-endian `u64`.
pub fn get_u64(src: &mut Bytes, field: &'static str) -> Result<u64, DecodeError> {
    src.try_get_u64().map_err(|_| DecodeError::Truncated(field))
}

/// Reads an HTTP method (`str16`).
pub fn get_method(src: &mut Bytes) -> Result<Method, DecodeError> {
    let len = get_u16(src, "method")? as usize;
    let method = take(src, len, "method")?;
    Method::from_bytes(&method).map_err(|_| DecodeError::InvalidMethod)
}

/// Reads a request target (`bytes32`).
pub fn get_uri(src: &mut Bytes) -> Result<Uri, DecodeError> {
    let len = get_u32(src, "uri")? as usize;
    let uri = take(src, len, "uri")?;
    Uri::from_maybe_shared(uri).map_err(|_| DecodeError::InvalidUri)
}

/// The URI as sent: `*`-form and origin-form stay as they are, absolute form keeps its authority.
pub fn uri_bytes(uri: &Uri) -> std::borrow::Cow<'_, str> {
    match (uri.scheme(), uri.authority()) {
        (None, None) => {
            std::borrow::Cow::Borrowed(uri.path_and_query().map_or("/", |pq| pq.as_str()))
        }
        _ => std::borrow::Cow::Owned(uri.to_string()),
    }
}
