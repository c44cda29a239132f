//! The inline reverse proxy: production requests in, primary's responses back, a copy on the side.
//!
//! Clients may speak HTTP/1.1 or HTTP/2 (h2c with prior knowledge included); requests go to the
//! primary over pooled connections in the version `primary_protocol` says: HTTP/1.1 by default,
//! h2c, or the client's own version (`auto`, which gRPC needs). Bodies stream both ways, trailers
//! included; the response is the primary's, untouched but for hop-by-hop headers. The request
//! path never waits for the mirror: see [`crate::tee`].
//!
//! An HTTP/1.1 upgrade (WebSocket, or any `Connection: upgrade`) goes to the primary with its
//! `Upgrade` header; when the primary answers `101 Switching Protocols`, the client's connection
//! and the primary's are joined byte for byte until either side closes. Such requests are not
//! mirrored (what follows the upgrade is not HTTP) and are counted as `not_mirrorable`.
//!
//! The common request (HTTP/1.1 without a body, to an HTTP/1.1 primary) does not go through
//! hyper: [`h1`] forwards it from the client connection's own task, with the same changes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{header, HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tracing::Instrument;

use teeway_runtime::config::UpstreamProtocol;
use teeway_runtime::connect::UpstreamConnector;
use teeway_runtime::proxy::remove_hop_by_hop;

use crate::downstream::{
    hyper_cause, ClientLimits, Peer, Primary, ProxyBody, Tap, HYPER_MAX_HEADERS,
    MIN_MAX_HEADER_BYTES,
};
use crate::metrics::{
    Accounting, CLIENT_ABORTS_TOTAL, PRIMARY_ERRORS_TOTAL, REQUESTS_REFUSED_TOTAL,
};
use crate::retry::{may_retry, ReplayBody, MAX_ATTEMPTS, RETRY_BUFFER_BYTES};
use crate::tee::{Admitted, Tee, TeeBody};

pub(crate) mod h1;

/// How long an idle pooled connection to the primary is kept. Shorter than the keep-alive
/// timeouts of common servers (nginx 75 s), so the agent is rarely the one to find a connection
/// the primary closed.
const PRIMARY_POOL_IDLE: Duration = Duration::from_secs(50);

/// A request body on its way to the primary: copied by the tee, replayable for a retry.
type PrimaryBody = ReplayBody<TeeBody<Incoming>>;

type PrimaryClient = Client<UpstreamConnector, PrimaryBody>;

/// Forwards requests to the primary and tees copies.
pub struct Proxy {
    tee: Arc<Tee>,
    http1: PrimaryClient,
    /// What [`h1`] dials the primary with, and its idle connections.
    connector_h1: UpstreamConnector,
    idle: Arc<h1::Idle>,
    http2: PrimaryClient,
    primary_authority: Authority,
    /// The primary's authority as a Host value (HTTP/1.0 requests without a Host get it).
    primary_host: HeaderValue,
    /// `https` for a TLS primary (HTTP/2 sends it as `:scheme`).
    primary_scheme: Scheme,
    primary_protocol: UpstreamProtocol,
    /// What the primary's response heads may hold, named when one is over.
    limits: ClientLimits,
    accounting: Arc<Accounting>,
    /// `requests_refused_total{reason="bad_request"}`, shared with the listener's refusals.
    refused_bad_request: metrics::Counter,
    refused_log: teeway_runtime::logging::Throttle,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("primary", &self.primary_authority)
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// A proxy to the primary reached through `connector`; `limits` also bound what the
    /// primary's responses may carry (header lines and bytes), as they bound requests.
    pub fn new(
        tee: Arc<Tee>,
        connector: UpstreamConnector,
        primary_authority: Authority,
        primary_protocol: UpstreamProtocol,
        accounting: Arc<Accounting>,
        limits: &ClientLimits,
    ) -> Self {
        let client = |http2_only: bool| {
            let mut builder = Client::builder(TokioExecutor::new());
            if limits.max_header_lines != HYPER_MAX_HEADERS {
                builder.http1_max_headers(limits.max_header_lines);
            }
            builder
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(PRIMARY_POOL_IDLE)
                .http1_preserve_header_case(true)
                .http1_max_buf_size(limits.max_header_bytes.max(MIN_MAX_HEADER_BYTES))
                .http2_max_header_list_size(
                    u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX),
                )
                .http2_only(http2_only)
                .build(connector.for_version(http2_only))
        };
        let primary_host = HeaderValue::from_str(primary_authority.as_str())
            .unwrap_or_else(|_| HeaderValue::from_static("localhost"));
        Self {
            tee,
            http1: client(false),
            connector_h1: connector.for_version(false),
            idle: Arc::default(),
            http2: client(true),
            primary_scheme: if connector.is_tls() {
                Scheme::HTTPS
            } else {
                Scheme::HTTP
            },
            primary_authority,
            primary_host,
            primary_protocol,
            limits: *limits,
            refused_bad_request: accounting.registry().counter(
                REQUESTS_REFUSED_TOTAL,
                "Requests refused before reaching the proxy (never sent to the primary), by reason",
                &[("reason", "bad_request")],
            ),
            refused_log: teeway_runtime::logging::Throttle::named("requests refused (bad Host)"),
            accounting,
        }
    }

    /// Handles one client request from `peer` (over `listen_tls`, the primary is told with
    /// `x-forwarded-proto: https` unless the request already says).
    ///
    /// What changes on the way to the primary, and nothing else: hop-by-hop headers go, the
    /// forwarding headers are added, `Host` is the authority the client addressed (see
    /// [`request_host`]), `Expect: 100-continue` is answered here and not forwarded, and the
    /// version is the one `primary_protocol` says.
    pub async fn handle(&self, mut req: Request<Incoming>, peer: &Peer) -> Response<ProxyBody> {
        let client = peer.addr;
        if peer.tls {
            req.headers_mut()
                .entry("x-forwarded-proto")
                .or_insert(HeaderValue::from_static("https"));
        }
        if let Some(protocol) = upgrade_to(&req) {
            return self.pass_upgrade(req, protocol, peer).await;
        }
        let (mut parts, body) = req.into_parts();
        let original_uri = parts.uri.clone();
        let version = parts.version;
        let use_http2 = self.primary_protocol.use_http2(version);

        let host = match request_host(&parts, &self.primary_host) {
            Ok(host) => host,
            Err(why) => return self.refuse(why, client),
        };
        let upstream_uri = match self.upstream_uri(&original_uri, &host, use_http2) {
            Ok(uri) => uri,
            Err(why) => return self.refuse(why, client),
        };
        remove_hop_by_hop(&mut parts.headers);
        // hyper answers `100 Continue` when the body is first read, which is once the request
        // head has gone to the primary: a client whose primary cannot be reached uploads
        // nothing. The primary and the copy get the body without the question (Envoy's default).
        let expects_continue = remove_expect(&mut parts.headers);
        parts.headers.insert(header::HOST, host);
        if version == Version::HTTP_2 && !use_http2 {
            join_cookies(&mut parts.headers);
        }
        peer.forwarding.apply(&mut parts.headers, version);

        // The copy never carries userinfo (`http://user:pass@host/`).
        let mut copy = self.tee.admit(
            &parts.method,
            &without_userinfo(&original_uri),
            version,
            &parts.headers,
        );
        // Hears production's answer for the copy (`mirror.capture_response`); let go with no
        // answer to hear, the copy goes alone.
        let answer = copy.as_mut().and_then(Admitted::take_answer);
        let body = ReplayBody::new(
            self.tee.body(body, copy),
            RETRY_BUFFER_BYTES,
            !expects_continue,
        );

        let (client_for_version, out_version) = if use_http2 {
            // HTTP/2 carries the host as `:authority`, from the URI.
            parts.headers.remove(header::HOST);
            (&self.http2, Version::HTTP_2)
        } else {
            (&self.http1, Version::HTTP_11)
        };
        parts.version = out_version;
        parts.uri = upstream_uri;
        let mut aborted = AbortGuard::new(&self.accounting);

        let mut attempt = 1;
        let sent_at = std::time::Instant::now();
        let response = loop {
            let Some(attempt_body) = body.again() else {
                break None;
            };
            let upstream = attempt_request(&parts, attempt_body);
            match client_for_version.request(upstream).await {
                Ok(resp) => break Some(Ok(resp)),
                Err(e) if body.client_failed() => break Some(Err((e, true))),
                Err(e) => {
                    if attempt < MAX_ATTEMPTS && may_retry(&e, &parts.method) && body.replayable() {
                        attempt += 1;
                        self.accounting.primary_retries.increment(1);
                        tracing::debug!(error = %error_chain(&e), attempt, "the primary did not process the request; sending it again");
                        continue;
                    }
                    break Some(Err((e, false)));
                }
            }
        };
        aborted.disarm();
        // Answered or failed for good: the bytes kept for a retry are let go now, not when the
        // body ends (a long upload or stream would hold them).
        body.release();
        match response {
            Some(Ok(resp)) => {
                let latency = sent_at.elapsed();
                self.accounting.primary_answered(resp.status(), latency);
                let (mut parts, body) = resp.into_parts();
                remove_hop_by_hop(&mut parts.headers);
                let tap = answer.map(|a| {
                    Box::new(a.head(parts.status, parts.version, &parts.headers, latency))
                        as Box<dyn Tap>
                });
                Response::from_parts(parts, Either::Left(Primary::new(body, tap)))
            }
            Some(Err((e, true))) => self.client_aborted(&e),
            Some(Err((e, false))) => self.primary_failed(&e),
            // Unreachable: the first attempt always has a body.
            None => bad_gateway(),
        }
    }

    /// Passes an HTTP/1.1 upgrade request to the primary and, on `101`, joins the two upgraded
    /// connections. Counted, never copied.
    async fn pass_upgrade(
        &self,
        mut req: Request<Incoming>,
        protocol: HeaderValue,
        peer: &Peer,
    ) -> Response<ProxyBody> {
        let client = peer.addr;
        let client_side = hyper::upgrade::on(&mut req);
        let (mut parts, body) = req.into_parts();
        let original_uri = parts.uri.clone();
        let host = match request_host(&parts, &self.primary_host) {
            Ok(host) => host,
            Err(why) => return self.refuse(why, client),
        };
        remove_hop_by_hop(&mut parts.headers);
        parts.headers.insert(header::HOST, host);
        peer.forwarding.apply(&mut parts.headers, parts.version);
        self.tee
            .unmirrorable(&parts.method, &original_uri, &parts.headers);
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, protocol);
        parts.version = Version::HTTP_11;
        parts.uri = match self.upstream_uri(&original_uri, &HeaderValue::from_static(""), false) {
            Ok(uri) => uri,
            Err(why) => return self.refuse(why, client),
        };
        let body = ReplayBody::new(self.tee.body(body, None), 0, false);
        let sent_at = std::time::Instant::now();
        // A pooled connection the primary closed before answering is tried again on another,
        // as for any request (an upgrade request carries no body to replay).
        let mut attempt = 1;
        let mut resp = loop {
            let Some(attempt_body) = body.again() else {
                return bad_gateway();
            };
            match self
                .http1
                .request(attempt_request(&parts, attempt_body))
                .await
            {
                Ok(resp) => break resp,
                Err(e)
                    if attempt < MAX_ATTEMPTS
                        && may_retry(&e, &parts.method)
                        && body.replayable() =>
                {
                    attempt += 1;
                    self.accounting.primary_retries.increment(1);
                    tracing::debug!(error = %error_chain(&e), attempt, "the primary did not process the upgrade request; sending it again");
                }
                Err(e) => return self.primary_failed(&e),
            }
        };
        self.accounting
            .primary_answered(resp.status(), sent_at.elapsed());
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            // The primary declined: an ordinary answer.
            let (mut parts, body) = resp.into_parts();
            remove_hop_by_hop(&mut parts.headers);
            return Response::from_parts(parts, Either::Left(Primary::new(body, None)));
        }
        let primary_side = hyper::upgrade::on(&mut resp);
        tokio::spawn(
            async move {
                let (client_io, primary_io) = match tokio::try_join!(client_side, primary_side) {
                    Ok(pair) => pair,
                    Err(e) => {
                        tracing::debug!(error = %e, "upgrade did not complete");
                        return;
                    }
                };
                let mut client_io = TokioIo::new(client_io);
                let mut primary_io = TokioIo::new(primary_io);
                match tokio::io::copy_bidirectional(&mut client_io, &mut primary_io).await {
                    Ok((up, down)) => tracing::debug!(up, down, "upgraded connection closed"),
                    Err(e) => {
                        tracing::debug!(error = %e, "upgraded connection ended with an error")
                    }
                }
            }
            .instrument(tracing::debug_span!("upgraded", %client)),
        );
        // The 101 keeps its Connection and Upgrade headers: they are the handshake.
        let (parts, body) = resp.into_parts();
        Response::from_parts(parts, Either::Left(Primary::new(body, None)))
    }

    /// The client went away mid-body: not the primary's fault. Nobody reads the answer.
    fn client_aborted(&self, e: &hyper_util::client::legacy::Error) -> Response<ProxyBody> {
        self.accounting.client_aborts.increment(1);
        tracing::debug!(error = %error_chain(e), "client went away before its request arrived whole (see {CLIENT_ABORTS_TOTAL})");
        let mut resp = Response::new(Either::Right(Full::new(Bytes::from_static(
            b"teeway: the request body did not arrive whole\n",
        ))));
        *resp.status_mut() = StatusCode::BAD_REQUEST;
        resp
    }

    fn primary_failed(&self, e: &hyper_util::client::legacy::Error) -> Response<ProxyBody> {
        // The primary answered, with a head over the agent's limits: say which, not "unreachable".
        let too_large = hyper_cause(e).is_some_and(hyper::Error::is_parse_too_large);
        self.note_primary_failure(&error_chain(e), too_large);
        if too_large {
            return bad_gateway_because(HEAD_TOO_LARGE);
        }
        bad_gateway()
    }

    /// Counts and logs (in summary) a request the primary failed, answered 502; `too_large`:
    /// its response head was over the limits.
    fn note_primary_failure(&self, error: &dyn std::fmt::Display, too_large: bool) {
        self.accounting.primary_errors.increment(1);
        if let Some(failures) = self.accounting.primary_error_log.note() {
            if too_large {
                tracing::warn!(
                    error = %error,
                    failures,
                    max_header_lines = self.limits.max_header_lines,
                    max_header_bytes = self.limits.max_header_bytes,
                    "primary responses over limits.max_header_lines or limits.max_header_bytes, answered 502 (raise the limit if the primary means it; one line a minute at most; see {PRIMARY_ERRORS_TOTAL})"
                );
            } else {
                tracing::warn!(
                    error = %error,
                    failures,
                    "primary requests failed, answered 502 (one line a minute at most; see {PRIMARY_ERRORS_TOTAL})"
                );
            }
        }
    }

    /// Whether [`h1`] forwards this proxy's plain HTTP/1.1 requests (the primary is asked in
    /// HTTP/1.1 too).
    pub fn forwards_h1(&self) -> bool {
        !self.primary_protocol.use_http2(Version::HTTP_11)
    }

    /// The URI sent upstream. The connector always dials the primary, so the authority only
    /// names the request: HTTP/2 sends the request's host as `:authority`; HTTP/1 sends it as
    /// `Host` and uses the primary's authority to key the pool (the target is origin-form).
    fn upstream_uri(
        &self,
        original: &Uri,
        host: &HeaderValue,
        http2: bool,
    ) -> Result<Uri, &'static str> {
        let authority = if http2 {
            Authority::try_from(host.as_bytes())
                .map_err(|_| "a Host that is no URI authority cannot go to an HTTP/2 primary")?
        } else {
            self.primary_authority.clone()
        };
        let path = original
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.primary_scheme.clone());
        parts.authority = Some(authority);
        parts.path_and_query = Some(path);
        Uri::from_parts(parts).map_err(|_| "the request target cannot be forwarded")
    }

    /// Answers 400 to a request the primary must not get as it is (RFC 9112 §3.2: no Host on
    /// HTTP/1.1, or several), counted with the other refusals.
    fn refuse(&self, why: &'static str, client: SocketAddr) -> Response<ProxyBody> {
        self.refused_bad_request.increment(1);
        if let Some(count) = self.refused_log.note() {
            tracing::warn!(reason = "bad_request", %client, count, detail = why, "client requests refused before reaching the primary (one line a minute at most; see {REQUESTS_REFUSED_TOTAL})");
        }
        let mut resp = Response::new(Either::Right(Full::new(Bytes::from(format!(
            "teeway: bad request: {why}\n"
        )))));
        *resp.status_mut() = StatusCode::BAD_REQUEST;
        resp
    }
}

/// An authority's `host[:port]`, without userinfo (`user:pass@`), which must never leave
/// production.
fn host_port(authority: &Authority) -> &str {
    authority.as_str().rsplit('@').next().unwrap_or_default()
}

/// `uri` without userinfo in its authority.
fn without_userinfo(uri: &Uri) -> Uri {
    match uri.authority() {
        Some(a) if a.as_str().contains('@') => {
            let mut parts = uri.clone().into_parts();
            parts.authority = Authority::try_from(host_port(a)).ok();
            Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("/"))
        }
        _ => uri.clone(),
    }
}

/// The host a request addressed, which the primary and the copy both get as `Host`:
/// an absolute-form target's authority, which wins over `Host` (RFC 9112 §3.2.2), and HTTP/2's
/// `:authority` likewise (RFC 9113 §8.3.1); else the `Host` header; else (HTTP/1.0, or HTTP/2
/// without either) the primary's own authority, which is what the connection names. An HTTP/1.1
/// request without `Host`, or with several, is an error (RFC 9112 §3.2: answered 400), as nginx
/// answers it.
fn request_host(parts: &Parts, primary: &HeaderValue) -> Result<HeaderValue, &'static str> {
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let (first, second) = (hosts.next(), hosts.next());
    if second.is_some() {
        return Err("several Host fields");
    }
    if let Some(authority) = parts.uri.authority() {
        return HeaderValue::from_str(host_port(authority))
            .map_err(|_| "the target's authority is no Host");
    }
    match (first, parts.version) {
        (Some(host), _) => Ok(host.clone()),
        (None, Version::HTTP_11) => Err("no Host field (HTTP/1.1 requires one)"),
        (None, _) => Ok(primary.clone()),
    }
}

/// HTTP/2 clients may split `cookie` into several fields; toward HTTP/1.1 they must be joined
/// into one with `"; "` (RFC 9113 §8.2.3).
fn join_cookies(headers: &mut http::HeaderMap) {
    let mut values = headers.get_all(header::COOKIE).iter();
    let (Some(first), Some(_)) = (values.next(), values.next()) else {
        return;
    };
    let mut joined = first.as_bytes().to_vec();
    for v in headers.get_all(header::COOKIE).iter().skip(1) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(v.as_bytes());
    }
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, value);
    }
}

/// Removes `Expect: 100-continue`; whether it was there.
fn remove_expect(headers: &mut http::HeaderMap) -> bool {
    let continues = headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if continues {
        headers.remove(header::EXPECT);
    }
    continues
}

/// One attempt's request: the head as prepared (extensions included: hyper keeps the client's
/// header-name case in one) and a body that starts from the first byte.
fn attempt_request(parts: &Parts, body: PrimaryBody) -> Request<PrimaryBody> {
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    *req.extensions_mut() = parts.extensions.clone();
    req
}

/// Counts a request whose client went away before the primary answered (its future dropped).
struct AbortGuard<'a> {
    accounting: &'a Accounting,
    armed: bool,
}

impl<'a> AbortGuard<'a> {
    fn new(accounting: &'a Accounting) -> Self {
        Self {
            accounting,
            armed: true,
        }
    }

    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for AbortGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.accounting.client_aborts.increment(1);
        }
    }
}

/// The protocol an HTTP/1.x request asks to upgrade to (`Connection: upgrade` and `Upgrade`).
fn upgrade_to<B>(req: &Request<B>) -> Option<HeaderValue> {
    if req.version() >= Version::HTTP_2 {
        return None;
    }
    let asks = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    asks.then(|| req.headers().get(header::UPGRADE).cloned())
        .flatten()
}

/// The 502 body when the primary could not be reached or failed before answering.
const UNREACHABLE: &str = "teeway: the primary service could not be reached\n";
/// The 502 body when the primary's response head is over the limits.
const HEAD_TOO_LARGE: &str = "teeway: the primary's response head is over limits.max_header_lines or limits.max_header_bytes\n";

fn bad_gateway() -> Response<ProxyBody> {
    bad_gateway_because(UNREACHABLE)
}

fn bad_gateway_because(why: &'static str) -> Response<ProxyBody> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from_static(why.as_bytes()))));
    *resp.status_mut() = StatusCode::BAD_GATEWAY;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// An error and its sources, joined: hyper's top-level messages alone are too vague to act on.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
