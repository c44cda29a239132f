//! The agent's clients, as every tap that answers them sees them: who a request came from
//! ([`Peer`]), what one client may send ([`ClientLimits`]), and the body it gets back
//! ([`ProxyBody`]), which a [`Tap`] may watch on its way. A leaf: the listener, the proxy and the
//! sink depend on it, it on none of them.

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use teeway_runtime::proxy::Forwarding;

/// The body of a response to the client: the primary's, or one the agent wrote itself.
pub type ProxyBody = Either<Primary, Full<Bytes>>;

/// Watches the primary's answer as it passes to the client (the tee keeps it for a copy:
/// `mirror.capture_response`). It only looks: every frame reaches the client as it came, and
/// the client never waits for it. Dropped before [`Tap::end`], it knows the answer was cut short.
pub trait Tap: Send {
    /// A frame on its way to the client; `false`: the tap has what it keeps, and is let go.
    fn frame(&mut self, frame: &Frame<Bytes>) -> bool;
    /// The answer ended where its framing said.
    fn end(self: Box<Self>);
    /// Polled while the answer waits for the primary: `Ready` once the tap gives up waiting
    /// (it has dealt with its copy), and it is let go.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()>;
}

pin_project_lite::pin_project! {
    /// The primary's response body on its way to the client, watched by a [`Tap`] or not.
    pub struct Primary {
        #[pin]
        inner: Incoming,
        tap: Option<Box<dyn Tap>>,
    }
}

impl Primary {
    /// `inner`, watched by `tap` when there is one.
    pub fn new(inner: Incoming, tap: Option<Box<dyn Tap>>) -> Self {
        let mut body = Self { inner, tap };
        if body.inner.is_end_stream() {
            // No body (a 204, a HEAD's answer): hyper may never poll it.
            if let Some(tap) = body.tap.take() {
                tap.end();
            }
        }
        body
    }
}

impl Body for Primary {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        let Some(tap) = this.tap.as_mut() else {
            return polled;
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if !tap.frame(frame) {
                    *this.tap = None;
                } else if this.inner.is_end_stream() {
                    // The last frame: hyper polls no further.
                    if let Some(tap) = this.tap.take() {
                        tap.end();
                    }
                }
            }
            Poll::Ready(None) => {
                if let Some(tap) = this.tap.take() {
                    tap.end();
                }
            }
            // Cut short: the tap, dropped, knows.
            Poll::Ready(Some(Err(_))) => *this.tap = None,
            Poll::Pending => {
                if tap.poll_expired(cx).is_ready() {
                    *this.tap = None;
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The client connection a request came on: fixed for the connection's life.
#[derive(Debug)]
pub struct Peer {
    /// The client's address.
    pub addr: SocketAddr,
    /// The client connected over `listen_tls`.
    pub tls: bool,
    /// What the proxy adds for this client (`x-forwarded-for`, `via`), made once.
    pub forwarding: Forwarding,
}

impl Peer {
    /// A client at `addr` (`tls`: over `listen_tls`).
    pub fn new(addr: SocketAddr, tls: bool) -> Self {
        Self {
            addr,
            tls,
            forwarding: Forwarding::new(addr.ip()),
        }
    }
}

/// Default `limits.header_read_timeout` (nginx's `client_header_timeout` is 60 s).
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `limits.idle_timeout` (nginx's `keepalive_timeout` is 75 s).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(75);
/// Default `limits.max_connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default `limits.max_header_lines`. nginx has no count, only 32 KiB of header buffers, and
/// takes a request of 150 lines that Envoy (100) and HAProxy (101) refuse: the agent must not
/// refuse what production took before it. Every request pays for the limit, not for its own
/// lines: hyper sets aside and fills a slot per allowed line for each head it parses (the
/// client's and the primary's), which cost 9 us of CPU per request at 4096, a third of the
/// agent's (tests/bench, scenario 4), and under 0.5 us at 256. At exactly
/// [`HYPER_MAX_HEADERS`] hyper uses stack slots it never fills, at no cost.
pub const DEFAULT_MAX_HEADER_LINES: usize = 256;
/// The header count hyper parses without being told (its `DEFAULT_MAX_HEADERS`): a limit of
/// exactly this is left to hyper's default path, which costs nothing per request.
pub const HYPER_MAX_HEADERS: usize = 100;
/// Default `limits.max_header_bytes` (nginx: 1 KiB + 4 x 8 KiB of header buffers).
pub const DEFAULT_MAX_HEADER_BYTES: usize = 128 * 1024;
/// Default `drain_time`: how long clients are asked to reconnect elsewhere before the listener
/// closes (Istio's `terminationDrainDuration` is 5 s).
pub const DEFAULT_DRAIN_TIME: Duration = Duration::from_secs(5);
/// Smallest `limits.max_header_bytes` (hyper's smallest read buffer).
pub const MIN_MAX_HEADER_BYTES: usize = 8192;

/// `limits:`: what one client may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientLimits {
    /// Time from a request head's first byte to its end.
    pub header_read_timeout: Duration,
    /// Time a connection with no request in flight is kept.
    pub idle_timeout: Duration,
    /// Client connections open at once.
    pub max_connections: usize,
    /// Header lines in one HTTP/1 request head.
    pub max_header_lines: usize,
    /// Bytes of one request head (HTTP/1 request line and headers; HTTP/2 header list).
    pub max_header_bytes: usize,
}

impl Default for ClientLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_header_lines: DEFAULT_MAX_HEADER_LINES,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
        }
    }
}

/// The first hyper error among `e` and its sources: what tells a refused client head (too large,
/// malformed) or a primary answer over the limits apart from other failures.
pub fn hyper_cause<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a hyper::Error> {
    std::iter::successors(Some(e), |e| e.source()).find_map(|e| e.downcast_ref::<hyper::Error>())
}
