//! A hyper connector that always dials one configured upstream.
//!
//! The agent forwards requests to its primary and the gateway replays them to each target, but
//! the request URI keeps the client's own authority (so HTTP/2 `:authority` and the pool key stay
//! what the client sent). The connector therefore ignores the URI and dials the configured host,
//! resolving it with [`crate::dns::Resolver`] at each new connection, so DNS changes are followed
//! while pooled connections are reused (hickory caches answers for their TTL). New connections
//! start at successive addresses of the answer, so every replica behind a name gets its share;
//! an address that refuses is skipped for the next.
//!
//! For `https://` upstreams the connector also runs the TLS handshake (tokio-rustls, ring),
//! verifying the upstream's certificate against the configured trust and name; ALPN offers only
//! the HTTP version the client on top will speak ([`UpstreamConnector::for_version`]), so an
//! HTTP/2-only pool never lands on a connection that negotiated HTTP/1.1.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use teeway_wire::tls::UpstreamTls;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::dns::Resolver;

/// TLS to an `https://` upstream: the client configurations and the name to verify.
#[derive(Clone, Debug)]
pub struct TlsSetup {
    /// One client configuration per HTTP version (ALPN).
    pub configs: UpstreamTls,
    /// The name the upstream's certificate must carry, also sent as SNI (unless an IP).
    pub server_name: ServerName<'static>,
}

impl TlsSetup {
    /// `configs` verifying `server_name`; an error when the name is neither a DNS name nor an IP.
    pub fn new(configs: UpstreamTls, server_name: &str) -> io::Result<Self> {
        let server_name = ServerName::try_from(server_name.to_owned()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("`{server_name}` is not a DNS name or IP address"),
            )
        })?;
        Ok(Self {
            configs,
            server_name,
        })
    }
}

/// A connection to an upstream: plain TCP, or TLS over it.
#[derive(Debug)]
pub enum UpstreamStream {
    /// `http://`.
    Plain(TcpStream),
    /// `https://`, handshake done.
    Tls(Box<TlsStream<TcpStream>>),
}

impl UpstreamStream {
    /// Whether the connection is open with nothing to read: what a pooled connection must be
    /// before it carries a request. A peek at the socket, which always asks the kernel (a read
    /// through tokio would trust readiness it may not have heard of yet): a close, or bytes
    /// nobody asked for, make it `false`; over TLS, so do records already taken from the
    /// socket and decrypted but not read, or the server's close_notify.
    pub fn is_quiet(&self) -> bool {
        let tcp = match self {
            UpstreamStream::Plain(tcp) => tcp,
            UpstreamStream::Tls(tls) => {
                let (tcp, session) = tls.get_ref();
                if !session.wants_read() {
                    return false;
                }
                tcp
            }
        };
        let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        matches!(
            socket2::SockRef::from(tcp).peek(&mut probe),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock
        )
    }
}

impl Connection for UpstreamStream {
    fn connected(&self) -> Connected {
        match self {
            UpstreamStream::Plain(tcp) => tcp.connected(),
            UpstreamStream::Tls(tls) => {
                let (tcp, session) = tls.get_ref();
                let connected = tcp.connected();
                if session.alpn_protocol() == Some(b"h2") {
                    connected.negotiated_h2()
                } else {
                    connected
                }
            }
        }
    }
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamStream::Plain(s) => s.is_write_vectored(),
            UpstreamStream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Dials `host:port`, trying each resolved address in turn.
///
/// Cheap to clone (one shared allocation): hyper-util's client clones its connector for every
/// request, pooled connection or not.
#[derive(Clone, Debug)]
pub struct UpstreamConnector {
    shared: Arc<Dialer>,
    /// Offer `h2` (not `http/1.1`) in ALPN.
    http2: bool,
}

/// What every clone of a connector shares.
#[derive(Debug)]
struct Dialer {
    host: Box<str>,
    port: u16,
    resolver: Resolver,
    connect_timeout: Duration,
    /// Which address of the answer the next connection starts with.
    next: AtomicUsize,
    /// `https://` upstreams.
    tls: Option<TlsSetup>,
}

impl UpstreamConnector {
    /// A connector for `host:port`, giving up on one address after `connect_timeout`;
    /// connections run a TLS handshake per `tls` after connecting.
    pub fn new(
        host: &str,
        port: u16,
        resolver: Resolver,
        connect_timeout: Duration,
        tls: Option<TlsSetup>,
    ) -> Self {
        Self {
            shared: Arc::new(Dialer {
                host: host.into(),
                port,
                resolver,
                connect_timeout,
                next: AtomicUsize::new(0),
                tls,
            }),
            http2: false,
        }
    }

    /// Whether connections are TLS (the request URI's scheme is then `https`).
    pub fn is_tls(&self) -> bool {
        self.shared.tls.is_some()
    }

    /// The same connector (sharing its address rotation) for a client that speaks HTTP/2
    /// (`http2`) or HTTP/1.1: with TLS, ALPN offers that version only.
    pub fn for_version(&self, http2: bool) -> Self {
        Self {
            shared: self.shared.clone(),
            http2,
        }
    }

    /// A connection to the upstream, TLS handshake done when it is `https://` (ALPN offering the
    /// version [`UpstreamConnector::for_version`] chose).
    pub async fn connect(&self) -> io::Result<UpstreamStream> {
        let tcp = self.connect_tcp().await?;
        let dialer = &self.shared;
        let Some(tls) = &dialer.tls else {
            return Ok(UpstreamStream::Plain(tcp));
        };
        let config = if self.http2 {
            tls.configs.http2.clone()
        } else {
            tls.configs.http1.clone()
        };
        let handshake = TlsConnector::from(config).connect(tls.server_name.clone(), tcp);
        let stream = tokio::time::timeout(dialer.connect_timeout, handshake)
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "{}:{}: TLS handshake timed out after {:?}",
                        dialer.host, dialer.port, dialer.connect_timeout
                    ),
                )
            })?
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("{}:{}: TLS handshake: {e}", dialer.host, dialer.port),
                )
            })?;
        Ok(UpstreamStream::Tls(Box::new(stream)))
    }

    /// A plain TCP connection to the upstream (no TLS): its name resolved with hickory, each
    /// address tried in turn (starting one further each call) within the connect timeout, Nagle
    /// off. The raw TCP tee connects its primaries and shadows with it.
    pub async fn connect_tcp(&self) -> io::Result<TcpStream> {
        let dialer = &self.shared;
        let addrs = dialer
            .resolver
            .lookup(&dialer.host, dialer.port)
            .await
            .map_err(io::Error::other)?;
        let mut last_error = None;
        let start = dialer.next.fetch_add(1, Ordering::Relaxed) % addrs.len().max(1);
        for addr in addrs.iter().cycle().skip(start).take(addrs.len()).copied() {
            match tokio::time::timeout(dialer.connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => {
                    stream.set_nodelay(true)?;
                    return Ok(stream);
                }
                Ok(Err(e)) => last_error = Some(io::Error::new(e.kind(), format!("{addr}: {e}"))),
                Err(_) => {
                    last_error = Some(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "{addr}: connect timed out after {:?}",
                            dialer.connect_timeout
                        ),
                    ))
                }
            }
        }
        Err(last_error.unwrap_or_else(|| io::Error::other("no address to connect to")))
    }
}

impl tower_service::Service<Uri> for UpstreamConnector {
    type Response = TokioIo<UpstreamStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let connector = self.clone();
        Box::pin(async move { connector.connect().await.map(TokioIo::new) })
    }
}
