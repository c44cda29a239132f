//! What answers on `listen`: the inline proxy to the primary, or the sink of an ingress's mirror
//! feed. The listener ([`crate::ingress`]) hands each request here and knows neither.

use http::{Request, Response};
use hyper::body::Incoming;

use crate::downstream::{Peer, ProxyBody};
use crate::proxy::Proxy;
use crate::sink::Sink;

/// What answers on `listen`: the proxy to the primary, or the sink of an ingress's mirror feed.
#[derive(Debug)]
pub enum Front {
    /// Production traffic, proxied to the primary and teed.
    Proxy(Box<Proxy>),
    /// Copies an ingress mirrors, answered at once and teed.
    Sink(Sink),
}

impl Front {
    /// Handles one request from `peer`.
    pub async fn handle(&self, req: Request<Incoming>, peer: &Peer) -> Response<ProxyBody> {
        match self {
            Front::Proxy(proxy) => proxy.handle(req, peer).await,
            Front::Sink(sink) => sink.handle(req).await,
        }
    }

    /// The proxy, when it forwards plain HTTP/1.1 requests itself ([`crate::proxy::h1`]).
    pub fn h1_proxy(&self) -> Option<&Proxy> {
        match self {
            Front::Proxy(proxy) if proxy.forwards_h1() => Some(proxy),
            _ => None,
        }
    }
}
