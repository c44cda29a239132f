//! The records that cross the link and land in archives: one [`Envelope`] type, common
//! [`Meta`]data plus a protocol part per kind. `docs/protocol.md` and `docs/archive.md` describe
//! its bytes; [`crate::envelope`] is their codec.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode, Uri, Version};

/// One record: what an agent's tap saw, or what a target answered. Every kind carries the same
/// [`Meta`]; the rest is the protocol's own.
///
/// Kinds an HTTP agent makes today are requests; the gateway's archive adds responses. RPC
/// requests and answers and TCP stream data are kinds to come (their numbers are reserved in
/// `docs/protocol.md`); a reader that meets a kind it does not know keeps it as
/// [`Envelope::Other`], meta and bytes, so it can count it, route on its meta and archive it
/// unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)]
pub enum Envelope {
    /// A copy of one production HTTP request.
    HttpRequest(MirroredRequest),
    /// An HTTP response to a request of the same [`Meta::key`].
    HttpResponse(ResponseRecord),
    /// A copy of one production RPC request (a Redis command, a Thrift or Dubbo call).
    RpcRequest(RpcRequest),
    /// A kind this reader does not know (written by a newer teeway), kept as it came.
    Other {
        /// Its metadata, which every kind shares.
        meta: Meta,
        /// Its kind code.
        kind: u8,
        /// Its protocol part, undecoded.
        part: Bytes,
    },
}

impl Envelope {
    /// The metadata every kind carries.
    pub fn meta(&self) -> &Meta {
        match self {
            Envelope::HttpRequest(r) => &r.meta,
            Envelope::HttpResponse(r) => &r.meta,
            Envelope::RpcRequest(r) => &r.meta,
            Envelope::Other { meta, .. } => meta,
        }
    }

    /// The metadata, to change (a gateway sets [`Meta::source_identity`] from the certificate).
    pub fn meta_mut(&mut self) -> &mut Meta {
        match self {
            Envelope::HttpRequest(r) => &mut r.meta,
            Envelope::HttpResponse(r) => &mut r.meta,
            Envelope::RpcRequest(r) => &mut r.meta,
            Envelope::Other { meta, .. } => meta,
        }
    }

    /// When the request (or response) was received.
    pub fn received_at(&self) -> SystemTime {
        self.meta().received_at
    }

    /// Nanoseconds since the Unix epoch of [`Envelope::received_at`].
    pub fn unix_nanos(&self) -> u64 {
        unix_nanos(self.received_at())
    }
}

/// What every record says of itself, whatever its protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// The agent process (session) that made the record: random per start, not 0. 0: not known
    /// (records of protocol 4 and older, and archives written before envelopes).
    pub session: u64,
    /// Sequence number, unique in the session; for correlation, never for routing. A response
    /// carries the id of the request it answers.
    pub id: u64,
    /// When the agent received the request head (a response: when its head arrived).
    pub received_at: SystemTime,
    /// The agent's `cluster` setting: which production cluster the traffic came from.
    pub source_cluster: Arc<str>,
    /// The agent's certificate identity. The gateway sets it from the certificate of the
    /// connection the record came on, whatever the agent wrote; empty when not known.
    pub source_identity: Arc<str>,
    /// The agent listener (tap) that saw the traffic: `http` for the proxy, the sink's and TCP
    /// listeners' names for theirs; empty when not known.
    pub tap: Arc<str>,
    /// How the record was chosen.
    pub sampling: Sampling,
    /// Metadata fields of a later version that this one does not know, as they came: written
    /// back unchanged, so that a record passes through an older reader whole.
    pub extra: Bytes,
}

impl Meta {
    /// Metadata with only the essentials known: what older formats carried.
    pub fn basic(id: u64, received_at: SystemTime, source_cluster: Arc<str>) -> Self {
        Self {
            session: 0,
            id,
            received_at,
            source_cluster,
            source_identity: empty(),
            tap: empty(),
            sampling: Sampling::unknown(),
            extra: Bytes::new(),
        }
    }

    /// Ties a response to its request: the same session, cluster and id.
    pub fn key(&self) -> (u64, Arc<str>, u64) {
        (self.session, self.source_cluster.clone(), self.id)
    }
}

/// A copy of one RPC request: what the agent's codec read of it, and its bytes as the client sent
/// them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcRequest {
    /// Who saw it, when, and why it was copied.
    pub meta: Meta,
    /// The client connection it came on, numbered by the agent (unique within its session): a
    /// gateway replays one connection's requests in order, on one connection of its own.
    pub connection: u64,
    /// What it calls.
    pub call: RpcCall,
    /// The request's message, whole, as the client sent it (one RESP command; a Thrift or
    /// Dubbo message, its frame or header included).
    pub message: Bytes,
}

/// What an RPC request calls, as its codec read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcCall {
    /// The protocol the message is in.
    pub protocol: RpcProtocol,
    /// How the protocol is spoken, where it has variants (Thrift: bit 0 framed transport, bit 1
    /// compact protocol); 0 otherwise.
    pub variant: u8,
    /// The service (Dubbo's service path, Thrift's multiplexed service name); empty where the
    /// protocol has none (Redis).
    pub service: String,
    /// The method (a Redis command's name in capitals, a Thrift or Dubbo method).
    pub method: String,
    /// What the request carries besides (Dubbo's attachments; Redis: `db` when not 0).
    pub attachments: Vec<(String, String)>,
}

/// An RPC protocol, as an envelope names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RpcProtocol {
    /// Redis: RESP2 or RESP3 commands (code 1).
    Redis,
    /// Thrift: a call (code 2), in the transport and protocol [`RpcCall::variant`] says.
    Thrift,
    /// Dubbo 2: an invocation, its 16-byte header first (code 3).
    Dubbo,
    /// A code this reader does not know.
    Other(u8),
}

impl RpcProtocol {
    /// The protocol's code in an envelope.
    pub fn code(self) -> u8 {
        match self {
            RpcProtocol::Redis => 1,
            RpcProtocol::Thrift => 2,
            RpcProtocol::Dubbo => 3,
            RpcProtocol::Other(code) => code,
        }
    }

    /// The protocol of `code`.
    pub fn from_code(code: u8) -> Self {
        match code {
            1 => RpcProtocol::Redis,
            2 => RpcProtocol::Thrift,
            3 => RpcProtocol::Dubbo,
            code => RpcProtocol::Other(code),
        }
    }

    /// The protocol configuration names `name` (`redis`, `thrift`, `dubbo`).
    pub fn named(name: &str) -> Option<Self> {
        [RpcProtocol::Redis, RpcProtocol::Thrift, RpcProtocol::Dubbo]
            .into_iter()
            .find(|p| p.name() == name)
    }

    /// Its name in configuration and logs.
    pub fn name(self) -> &'static str {
        match self {
            RpcProtocol::Redis => "redis",
            RpcProtocol::Thrift => "thrift",
            RpcProtocol::Dubbo => "dubbo",
            RpcProtocol::Other(_) => "unknown",
        }
    }
}

/// The sampling decision that chose a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sampling {
    /// The name of the agent's mirror rule that matched; empty: `mirror.percentage`, or not
    /// known.
    pub rule: Arc<str>,
    /// The share of matching requests copied, in parts per million (1,000,000: every one); 0
    /// when not known. A reader can scale what it counts by it.
    pub rate_ppm: u32,
}

impl Sampling {
    /// Nothing known of the decision.
    pub fn unknown() -> Self {
        Self {
            rule: empty(),
            rate_ppm: 0,
        }
    }
}

/// The empty string, shared: records of older formats and taps that say nothing cost no
/// allocation for the fields they lack.
pub fn empty() -> Arc<str> {
    static EMPTY: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from(""));
    EMPTY.clone()
}

/// A copy of one production request, as the primary received it.
///
/// Headers are those the agent forwarded to the primary: the client's headers after proxy hygiene
/// (hop-by-hop headers removed, `x-forwarded-for` and `via` added). The body is complete unless
/// [`MirroredRequest::body_truncated`] says otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirroredRequest {
    /// What every record carries: session, id, time, source, sampling.
    pub meta: Meta,
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
    /// What production answered, when the agent captured it (`mirror.capture_response`): the
    /// baseline a gateway can compare the shadows' answers with. Carried by envelopes of kind 6.
    pub production: Option<Box<Production>>,
}

/// The production service's answer to a copied request, as the agent passed it to the client
/// (hop-by-hop fields removed) and redacted (`Set-Cookie` and the names the agent's
/// configuration adds never leave production).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Production {
    /// Time from sending the request to the primary to its response head.
    pub latency: Duration,
    /// Status code.
    pub status: StatusCode,
    /// HTTP version the primary answered in.
    pub version: Version,
    /// Response headers.
    pub headers: HeaderMap,
    /// Response body, up to the agent's limit.
    pub body: Bytes,
    /// Response trailers, when the primary sent any (gRPC does).
    pub trailers: Option<HeaderMap>,
    /// The body was cut at the agent's limit (`capture_response.max_body_bytes`).
    pub body_truncated: bool,
}

impl Production {
    /// The answer as a response record of origin [`ResponseOrigin::Original`] (GoReplay's type
    /// 2), tied to `request`: what archives and offline tools read.
    pub fn to_record(&self, request: &MirroredRequest) -> ResponseRecord {
        let mut meta = request.meta.clone();
        meta.received_at += self.latency;
        ResponseRecord {
            meta,
            origin: ResponseOrigin::Original,
            target: String::new(),
            latency: self.latency,
            status: self.status,
            version: self.version,
            headers: self.headers.clone(),
            body: self.body.clone(),
            body_truncated: self.body_truncated,
        }
    }
}

impl MirroredRequest {
    /// The request's receive time as nanoseconds since the Unix epoch (0 for times before it,
    /// saturating far in the future).
    pub fn received_at_unix_nanos(&self) -> u64 {
        unix_nanos(self.meta.received_at)
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

/// Who produced a response record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseOrigin {
    /// The production service's answer (GoReplay type 2).
    Original,
    /// A shadow's answer to the replayed request (GoReplay type 3).
    Replayed,
}

/// An HTTP response, tied to its request by [`Meta::key`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseRecord {
    /// The request's metadata, except `received_at`: when this response's head arrived.
    pub meta: Meta,
    /// Who answered.
    pub origin: ResponseOrigin,
    /// The shadow's URL (empty when unknown, as in GoReplay files).
    pub target: String,
    /// Time from sending the request to the response head.
    pub latency: Duration,
    /// Status code.
    pub status: StatusCode,
    /// HTTP version of the response.
    pub version: Version,
    /// Response headers.
    pub headers: HeaderMap,
    /// Response body, up to the writer's limit.
    pub body: Bytes,
    /// The body was cut at the writer's limit.
    pub body_truncated: bool,
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
            meta: Meta::basic(1, UNIX_EPOCH, "c".into()),
            method: Method::GET,
            uri: Uri::from_static("/x"),
            version: Version::HTTP_11,
            headers,
            body: Bytes::new(),
            trailers: None,
            body_truncated: false,
            production: None,
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
