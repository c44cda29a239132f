//! A hyper connector that always dials one configured upstream.
//!
//! The agent forwards requests to its primary and the gateway replays them to each target, but
//! the request URI keeps the client's own authority (so HTTP/2 `:authority` and the pool key stay
//! what the client sent). The connector therefore ignores the URI and dials the configured host,
//! resolving it with [`crate::dns::Resolver`] at each new connection, so DNS changes are followed
//! while pooled connections are reused (hickory caches answers for their TTL). New connections
//! start at successive addresses of the answer, so every replica behind a name gets its share;
//! an address that refuses is skipped for the next.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::dns::Resolver;

/// Dials `host:port`, trying each resolved address in turn.
#[derive(Clone, Debug)]
pub struct UpstreamConnector {
    host: Arc<str>,
    port: u16,
    resolver: Resolver,
    connect_timeout: Duration,
    /// Which address of the answer the next connection starts with.
    next: Arc<AtomicUsize>,
}

impl UpstreamConnector {
    /// A connector for `host:port`, giving up on one address after `connect_timeout`.
    pub fn new(host: &str, port: u16, resolver: Resolver, connect_timeout: Duration) -> Self {
        Self {
            host: host.into(),
            port,
            resolver,
            connect_timeout,
            next: Arc::new(AtomicUsize::new(0)),
        }
    }

    async fn connect(self) -> io::Result<TokioIo<TcpStream>> {
        let addrs = self
            .resolver
            .lookup(&self.host, self.port)
            .await
            .map_err(io::Error::other)?;
        let mut last_error = None;
        let start = self.next.fetch_add(1, Ordering::Relaxed) % addrs.len().max(1);
        for addr in addrs.iter().cycle().skip(start).take(addrs.len()).copied() {
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => {
                    stream.set_nodelay(true)?;
                    return Ok(TokioIo::new(stream));
                }
                Ok(Err(e)) => last_error = Some(io::Error::new(e.kind(), format!("{addr}: {e}"))),
                Err(_) => {
                    last_error = Some(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("{addr}: connect timed out after {:?}", self.connect_timeout),
                    ))
                }
            }
        }
        Err(last_error.unwrap_or_else(|| io::Error::other("no address to connect to")))
    }
}

impl tower_service::Service<Uri> for UpstreamConnector {
    type Response = TokioIo<TcpStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        Box::pin(self.clone().connect())
    }
}
