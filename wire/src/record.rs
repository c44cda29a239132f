//! [`MirroredRequest`]: the copy of one production request that travels from agent to gateway.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, Method, Uri, Version};

/// A copy of one production request, as the primary received it.
///
/// Headers are those the agent forwarded to the primary: the client's headers after proxy hygiene
/// (hop-by-hop headers removed, `x-forwarded-for` and `via` added). The body is complete unless
/// [`MirroredRequest::body_truncated`] says otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirroredRequest {
    /// Agent-assigned sequence number, unique per agent process; for correlation in logs and
    /// archives, never for routing.
    pub id: u64,
    /// When the agent received the request head.
    pub received_at: SystemTime,
    /// The agent's `cluster` setting: which production cluster this request came from.
    pub source_cluster: Arc<str>,
    /// HTTP method.
    pub method: Method,
    /// Request target as the client sent it (origin form for HTTP/1, absolute for HTTP/2).
    pub uri: Uri,
    /// HTTP version the client spoke.
    pub version: Version,
    /// Request headers, repeated names kept in order.
    pub headers: HeaderMap,
    /// Request body.
    pub body: Bytes,
    /// Request trailers, when the client sent any (gRPC and chunked HTTP/1.1 can).
    pub trailers: Option<HeaderMap>,
    /// The body was cut at the agent's size limit; the gateway may choose not to replay it.
    pub body_truncated: bool,
}

impl MirroredRequest {
    /// The request's receive time as nanoseconds since the Unix epoch (0 for times before it,
    /// saturating far in the future).
    pub fn received_at_unix_nanos(&self) -> u64 {
        unix_nanos(self.received_at)
    }

    /// The host the client addressed: the URI authority (HTTP/2) or the `Host` header (HTTP/1).
    pub fn host(&self) -> Option<&str> {
        if let Some(authority) = self.uri.authority() {
            return Some(authority.host());
        }
        let host = self.headers.get(http::header::HOST)?.to_str().ok()?;
        Some(strip_port(host))
    }

    /// The path of the request target (`/` when the target has none).
    pub fn path(&self) -> &str {
        self.uri.path()
    }
}

/// `time` as nanoseconds since the Unix epoch, as timestamps travel on the wire: 0 for times
/// before it, saturating far in the future.
pub fn unix_nanos(time: SystemTime) -> u64 {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
}

/// `host[:port]` or `[v6][:port]` without the port and brackets.
fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split_once(']').map_or(rest, |(v6, _)| v6);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// Wire code of an HTTP version in a record.
pub(crate) fn version_code(version: Version) -> u8 {
    match version {
        Version::HTTP_09 => 0,
        Version::HTTP_10 => 1,
        Version::HTTP_2 => 3,
        Version::HTTP_3 => 4,
        // HTTP/1.1, and anything http adds later, travels as 1.1.
        _ => 2,
    }
}

/// HTTP version of a record's wire code.
pub(crate) fn version_from_code(code: u8) -> Option<Version> {
    Some(match code {
        0 => Version::HTTP_09,
        1 => Version::HTTP_10,
        2 => Version::HTTP_11,
        3 => Version::HTTP_2,
        4 => Version::HTTP_3,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_host(host: &str) -> MirroredRequest {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::HOST, host.parse().expect("valid host"));
        MirroredRequest {
            id: 1,
            received_at: UNIX_EPOCH,
            source_cluster: "c".into(),
            method: Method::GET,
            uri: Uri::from_static("/x"),
            version: Version::HTTP_11,
            headers,
            body: Bytes::new(),
            trailers: None,
            body_truncated: false,
        }
    }

    #[test]
    fn host_strips_port_and_brackets() {
        assert_eq!(with_host("api.example.com").host(), Some("api.example.com"));
        assert_eq!(
            with_host("api.example.com:8080").host(),
            Some("api.example.com")
        );
        assert_eq!(with_host("[::1]:8080").host(), Some("::1"));
        assert_eq!(with_host("127.0.0.1:80").host(), Some("127.0.0.1"));
    }

    #[test]
    fn host_prefers_authority() {
        let mut r = with_host("ignored.example");
        r.uri = Uri::from_static("http://api.example.com:81/v1");
        assert_eq!(r.host(), Some("api.example.com"));
    }

    #[test]
    fn version_codes_round_trip() {
        for v in [
            Version::HTTP_09,
            Version::HTTP_10,
            Version::HTTP_11,
            Version::HTTP_2,
            Version::HTTP_3,
        ] {
            assert_eq!(version_from_code(version_code(v)), Some(v));
        }
        assert_eq!(version_from_code(9), None);
    }
}
