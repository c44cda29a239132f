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

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{header, HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use teeway_runtime::config::UpstreamProtocol;
use teeway_runtime::connect::UpstreamConnector;
use teeway_runtime::proxy::{add_forwarding, remove_hop_by_hop};

use crate::metrics::{Accounting, PRIMARY_ERRORS_TOTAL};
use crate::sink::Sink;
use crate::tee::{Tee, TeeBody};

/// How long an idle pooled connection to the primary is kept.
const PRIMARY_POOL_IDLE: Duration = Duration::from_secs(90);

/// The body of a response to the client: the primary's, or one the agent wrote itself.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

type PrimaryClient = Client<UpstreamConnector, TeeBody<Incoming>>;

/// Forwards requests to the primary and tees copies.
pub struct Proxy {
    tee: Arc<Tee>,
    http1: PrimaryClient,
    http2: PrimaryClient,
    primary_authority: Authority,
    /// `https` for a TLS primary (HTTP/2 sends it as `:scheme`).
    primary_scheme: Scheme,
    primary_protocol: UpstreamProtocol,
    accounting: Arc<Accounting>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("primary", &self.primary_authority)
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// A proxy to the primary reached through `connector`.
    pub fn new(
        tee: Arc<Tee>,
        connector: UpstreamConnector,
        primary_authority: Authority,
        primary_protocol: UpstreamProtocol,
        accounting: Arc<Accounting>,
    ) -> Self {
        let client = |http2_only: bool| {
            Client::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(PRIMARY_POOL_IDLE)
                .http2_only(http2_only)
                .build(connector.for_version(http2_only))
        };
        Self {
            tee,
            http1: client(false),
            http2: client(true),
            primary_scheme: if connector.is_tls() {
                Scheme::HTTPS
            } else {
                Scheme::HTTP
            },
            primary_authority,
            primary_protocol,
            accounting,
        }
    }

    /// Handles one client request.
    /// `tls`: the client connected over `listen_tls` (the primary is told with
    /// `x-forwarded-proto: https` unless the request already says).
    pub async fn handle(
        &self,
        mut req: Request<Incoming>,
        client: SocketAddr,
        tls: bool,
    ) -> Response<ProxyBody> {
        if tls {
            req.headers_mut()
                .entry("x-forwarded-proto")
                .or_insert(HeaderValue::from_static("https"));
        }
        if let Some(protocol) = upgrade_to(&req) {
            return self.pass_upgrade(req, protocol, client).await;
        }
        let received_at = SystemTime::now();
        let (mut parts, body) = req.into_parts();
        let original_uri = parts.uri.clone();
        let version = parts.version;

        remove_hop_by_hop(&mut parts.headers);
        add_forwarding(&mut parts.headers, client.ip(), version);

        let copy = self.tee.admit(
            &parts.method,
            &original_uri,
            version,
            &parts.headers,
            received_at,
        );
        let body = self.tee.body(body, copy);

        let (client_for_version, out_version) = if self.primary_protocol.use_http2(version) {
            (&self.http2, Version::HTTP_2)
        } else {
            (&self.http1, Version::HTTP_11)
        };
        parts.version = out_version;
        parts.uri = self.upstream_uri(&original_uri, out_version);
        let upstream = Request::from_parts(parts, body);

        match client_for_version.request(upstream).await {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                remove_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, Either::Left(body))
            }
            Err(e) => self.primary_failed(&e),
        }
    }

    /// Passes an HTTP/1.1 upgrade request to the primary and, on `101`, joins the two upgraded
    /// connections. Counted, never copied.
    async fn pass_upgrade(
        &self,
        mut req: Request<Incoming>,
        protocol: HeaderValue,
        client: SocketAddr,
    ) -> Response<ProxyBody> {
        let client_side = hyper::upgrade::on(&mut req);
        let (mut parts, body) = req.into_parts();
        let original_uri = parts.uri.clone();
        remove_hop_by_hop(&mut parts.headers);
        add_forwarding(&mut parts.headers, client.ip(), parts.version);
        self.tee
            .unmirrorable(&parts.method, &original_uri, &parts.headers);
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, protocol);
        parts.version = Version::HTTP_11;
        parts.uri = self.upstream_uri(&original_uri, Version::HTTP_11);
        let upstream = Request::from_parts(parts, self.tee.body(body, None));
        let mut resp = match self.http1.request(upstream).await {
            Ok(resp) => resp,
            Err(e) => return self.primary_failed(&e),
        };
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            // The primary declined: an ordinary answer.
            let (mut parts, body) = resp.into_parts();
            remove_hop_by_hop(&mut parts.headers);
            return Response::from_parts(parts, Either::Left(body));
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
        Response::from_parts(parts, Either::Left(body))
    }

    fn primary_failed(&self, e: &hyper_util::client::legacy::Error) -> Response<ProxyBody> {
        self.accounting.primary_errors.increment(1);
        if let Some(failures) = self.accounting.primary_error_log.note() {
            tracing::warn!(
                error = %error_chain(e),
                failures,
                "primary requests failed, answered 502 (one line a minute at most; see {PRIMARY_ERRORS_TOTAL})"
            );
        }
        bad_gateway()
    }

    /// The URI sent upstream. The connector always dials the primary, so the authority only
    /// names the request: HTTP/2 keeps the client's `:authority`; HTTP/1 keeps its `Host` header
    /// (hyper leaves an existing one alone) and uses the primary's authority to key the pool.
    fn upstream_uri(&self, original: &Uri, version: Version) -> Uri {
        let authority = match (version, original.authority()) {
            (Version::HTTP_2, Some(a)) => a.clone(),
            _ => self.primary_authority.clone(),
        };
        let path = original
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.primary_scheme.clone());
        parts.authority = Some(authority);
        parts.path_and_query = Some(path);
        Uri::from_parts(parts).unwrap_or_else(|_| original.clone())
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

fn bad_gateway() -> Response<ProxyBody> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from_static(
        b"teeway: the primary service could not be reached\n",
    ))));
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

/// What answers on `listen`: the proxy to the primary, or the sink of an ingress's mirror feed.
#[derive(Debug)]
pub enum Front {
    /// Production traffic, proxied to the primary and teed.
    Proxy(Box<Proxy>),
    /// Copies an ingress mirrors, answered at once and teed.
    Sink(Sink),
}

impl Front {
    /// Handles one request from `client` (`tls`: it came over `listen_tls`).
    pub async fn handle(
        &self,
        req: Request<Incoming>,
        client: SocketAddr,
        tls: bool,
    ) -> Response<ProxyBody> {
        match self {
            Front::Proxy(proxy) => proxy.handle(req, client, tls).await,
            Front::Sink(sink) => sink.handle(req).await,
        }
    }
}

/// Time a client has to complete the TLS handshake on `listen_tls`.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts client connections until `shutdown`, then lets open connections finish their
/// requests for up to `grace`. With `tls`, each connection's TLS is terminated first (ALPN picks
/// HTTP/2 or HTTP/1.1); a failed handshake closes that connection only.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Front>,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let graceful = GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    let local = listener.local_addr().ok();
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        let tls = acceptor.is_some();
        let service = service_fn(move |req| {
            let proxy = proxy.clone();
            async move { Ok::<_, Infallible>(proxy.handle(req, peer, tls).await) }
        });
        let span = tracing::debug_span!("client", %peer, local = ?local);
        // One task per connection: with TLS it runs the handshake first, so a slow client holds
        // up no one; the connection joins the graceful shutdown once it speaks HTTP.
        let acceptor = acceptor.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(
            async move {
                let served = match acceptor {
                    None => {
                        let conn =
                            builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                        watcher.watch(conn).await
                    }
                    Some(acceptor) => {
                        let stream = match tokio::time::timeout(
                            TLS_HANDSHAKE_TIMEOUT,
                            acceptor.accept(stream),
                        )
                        .await
                        {
                            Ok(Ok(stream)) => stream,
                            Ok(Err(e)) => {
                                tracing::debug!(error = %e, "client TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!("client TLS handshake timed out");
                                return;
                            }
                        };
                        let conn =
                            builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                        watcher.watch(conn).await
                    }
                };
                if let Err(e) = served {
                    tracing::debug!(error = %e, "client connection ended with an error");
                }
            }
            .instrument(span),
        );
    }
    drop(listener);
    let open = graceful.count();
    if open > 0 {
        tracing::info!(open, ?grace, "waiting for client connections to finish");
    }
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            ?grace,
            "client connections still open after the grace period; closing them"
        );
    }
}
