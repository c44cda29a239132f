//! The common HTTP/1.1 request forwarded without hyper: a request with no body, read, checked
//! and sent on by the client connection's own task over a pooled upstream connection, its
//! response's bytes passed back as they come.
//!
//! Most production requests are HTTP/1.1 GETs: a head in, a response out. Through hyper each
//! one is parsed into a header map, rebuilt, handed to the pool's connection task through a
//! channel, encoded again, and its response parsed, handed back and encoded again: three
//! quarters of the agent's own CPU per request (tests/bench, scenario 4). Here the head is
//! parsed in place (httparse), written to the primary with only the proxy's changes (the same
//! as [`Proxy::handle`] makes: hop-by-hop fields out, forwarding fields in), and the response's
//! head is checked, cleaned of hop-by-hop fields and passed on with its body's bytes as the
//! primary framed them (length, chunks and trailers, or the connection's end).
//!
//! Anything else goes to hyper, for the rest of the connection, with the bytes already read
//! ([`Ended::Handoff`]): HTTP/2, HTTP/1.0, a request with a body, `Expect`, an upgrade, absolute-form
//! or unusual targets, a head hyper would refuse (too large, malformed: hyper answers and counts
//! it as it always did). The request is handed over whole, before anything of it was counted or
//! sent, so each request is handled by exactly one of the two.
//!
//! Upstream connections are pooled per request, like hyper's: taken from the proxy's idle set
//! ([`Idle`]) for a request and given back when its response ended cleanly, so the primary sees
//! as many connections as there are requests in flight, not as many as there are clients. A
//! connection is checked for a close or stray bytes each time it is taken (a read that does not
//! wait), idle ones are closed after [`PRIMARY_POOL_IDLE`], and a request whose reused
//! connection closed before any response byte is sent again on a new one if its method is
//! idempotent, as the hyper path does.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri, Version};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;
use tokio::time::Instant;

use teeway_runtime::connect::UpstreamStream;
use teeway_runtime::matching::Fields;
use teeway_runtime::proxy::remove_hop_by_hop;

use super::{Proxy, PRIMARY_POOL_IDLE};
use crate::downstream::{Peer, Tap};
use crate::retry::MAX_ATTEMPTS;
use crate::tee::{Answer, AnswerTap};

/// How often idle upstream connections past [`PRIMARY_POOL_IDLE`], or closed by the primary,
/// are let go while no request comes to do it.
const REAP_EVERY: Duration = Duration::from_secs(5);
/// Longest request target forwarded; hyper answers longer ones 414.
const MAX_TARGET: usize = 65_534;
/// Longest chunk extension or trailer section passed on (hyper's limits too).
const MAX_CHUNK_LINE: usize = 16 * 1024;
/// Most idle upstream connections kept for other client connections.
const IDLE_MAX: usize = 1024;
/// Header lines parsed without a heap allocation; heads with more are parsed again, up to the
/// configured limit.
const STACK_HEADERS: usize = 48;
/// Read buffers start at this size, and are topped up to it before a read.
const READ_SIZE: usize = 8 * 1024;
/// Bytes asked of the primary per read while a response body streams.
const BODY_READ: usize = 32 * 1024;
/// A buffer that grew past this (a large head, a fast body) is let go once empty: an idle
/// connection keeps little.
const KEEP_CAPACITY: usize = 64 * 1024;
/// A response whose head and body are this small is written to the client in one write.
const ONE_WRITE: usize = 16 * 1024;

/// What the connection's owner (the listener) knows and the forwarder tells it.
pub trait Hooks {
    /// A request was read whole and will be forwarded.
    fn request_started(&self);
    /// Its response was written (or failed).
    fn request_ended(&self);
    /// Responses ask the client to reconnect (`Connection: close`).
    fn draining(&self) -> bool;
    /// Asks the connection to close once no request is in flight.
    fn close(&self) -> &CloseSignal;
}

/// A request to close a connection gracefully: at once when it is idle, after its response when
/// a request is in flight.
#[derive(Debug, Default)]
pub struct CloseSignal {
    asked: AtomicBool,
    notify: Notify,
}

impl CloseSignal {
    /// Asks the connection to close.
    pub fn ask(&self) {
        self.asked.store(true, Ordering::Relaxed);
        self.notify.notify_one();
    }

    fn asked(&self) -> bool {
        self.asked.load(Ordering::Relaxed)
    }
}

/// How the forwarder left a connection.
pub enum Ended<IO> {
    /// Closed, or to be closed: the client went away, asked to close, or an error ended it.
    Closed,
    /// A request it does not forward: hyper serves the connection from here, `read` (the bytes
    /// already read from `io`, that request's first) before anything more.
    Handoff {
        /// Read from the client and not yet served.
        read: Bytes,
        /// The connection.
        io: IO,
    },
}

/// Idle upstream connections shared by the client connections, oldest first.
#[derive(Debug, Default)]
pub(super) struct Idle {
    conns: Mutex<VecDeque<Upstream>>,
    /// The task that lets go of expired connections runs (started with the first one kept).
    reaping: AtomicBool,
}

impl Idle {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Upstream>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently used idle connection still open and quiet, if any.
    fn take(&self) -> Option<Upstream> {
        loop {
            let mut up = self.lock().pop_back()?;
            if up.usable() {
                return Some(up);
            }
        }
    }

    /// Keeps `up` for the next request; the oldest go beyond [`IDLE_MAX`].
    fn put(self: &Arc<Self>, mut up: Upstream) {
        up.last_used = Instant::now();
        let over = {
            let mut conns = self.lock();
            conns.push_back(up);
            (conns.len() > IDLE_MAX).then(|| conns.pop_front())
        };
        // Closed outside the lock.
        drop(over);
        if !self.reaping.swap(true, Ordering::Relaxed) {
            tokio::spawn(reap(Arc::downgrade(self)));
        }
    }

    /// Lets go of connections idle past [`PRIMARY_POOL_IDLE`] or closed by the primary (their
    /// sockets would otherwise wait in CLOSE_WAIT for the next request).
    fn expire(&self) {
        let mut all = std::mem::take(&mut *self.lock());
        all.retain_mut(Upstream::usable);
        // Those kept are older than any given back meanwhile.
        let mut conns = self.lock();
        all.extend(conns.drain(..));
        *conns = all;
    }
}

/// Expires `idle`'s connections every [`REAP_EVERY`] while its proxy lives.
async fn reap(idle: std::sync::Weak<Idle>) {
    loop {
        tokio::time::sleep(REAP_EVERY).await;
        let Some(idle) = idle.upgrade() else { return };
        idle.expire();
    }
}

/// A connection to the primary.
#[derive(Debug)]
struct Upstream {
    io: UpstreamStream,
    /// When its last response ended (or it was made).
    last_used: Instant,
    /// It carried a request before: a close found on it may be a keep-alive race.
    reused: bool,
}

impl Upstream {
    /// Whether it may carry a request: not idle past the pool's timeout, and not closed by the
    /// primary, nor sent bytes nobody asked for, since its last response.
    fn usable(&mut self) -> bool {
        self.last_used.elapsed() < PRIMARY_POOL_IDLE && self.io.is_quiet()
    }
}

/// The request head read, checked and rewritten for the primary.
struct Head {
    /// Its length in the client's buffer.
    len: usize,
    /// The response has no body (a HEAD request).
    head_only: bool,
    /// It may be sent again when its connection closed before any response (RFC 9110 §9.2.2).
    idempotent: bool,
    /// The client asked to close after the response.
    close: bool,
}

impl Head {
    /// Whether the client connection closes after this request's response: the client asked,
    /// the agent drains, or the connection was asked to close.
    fn closes_after(&self, hooks: &impl Hooks) -> bool {
        self.close || hooks.draining() || hooks.close().asked()
    }
}

/// What reading a request head found.
enum Parsed {
    /// Not all of it yet.
    Partial,
    /// Not for this path: hyper takes the connection.
    Other,
    /// Read, checked, and written for the primary into the request buffer.
    Request(Head),
}

/// How the primary's response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    /// Until the primary closes the connection.
    Close,
}

/// The primary's response head, checked and rewritten for the client.
#[derive(Debug)]
struct ResponseHead {
    len: usize,
    status: u16,
    framing: Framing,
    /// The primary keeps the connection open after it.
    keep_alive: bool,
    /// The client connection closes after it: asked, or the body ends with the connection, or
    /// the primary spoke HTTP/1.0 (whose version the client is told).
    close: bool,
}

/// A response head this proxy will not pass on.
#[derive(Debug, PartialEq, Eq)]
enum BadResponse {
    /// Over `limits.max_header_lines` or `limits.max_header_bytes`.
    TooLarge,
    /// Not HTTP/1, or framed ambiguously (lengths that disagree), or a `101` nobody asked for.
    Malformed,
}

/// Why a request's exchange with the primary ended early.
enum Failure {
    /// The client went away before the primary's response head: a client abort.
    ClientAborted,
    /// The client went away once the response had begun.
    ClientGone,
    /// The primary failed before its response head; `true` when it cannot have taken the
    /// request: nothing of an answer came, and the connection closed, or it had carried a
    /// request before (a keep-alive race).
    BeforeHead(io::Error, bool),
    /// The primary's head is not one to pass on.
    BadHead(BadResponse),
    /// The primary failed mid-response: the client connection is cut, as hyper cuts it.
    MidResponse,
}

/// One client connection's forwarding state.
struct Conn<'a, IO> {
    proxy: &'a Proxy,
    peer: &'a Peer,
    io: IO,
    /// Bytes read from the client, not yet forwarded.
    buf: BytesMut,
    /// The client closed its side (after pipelining what `buf` holds): nothing more to read.
    client_eof: bool,
    /// The request head for the primary (kept until answered: a retry sends it again).
    req: Vec<u8>,
    /// The response head for the client, and small bodies with it.
    resp: Vec<u8>,
    /// Bytes read from the primary.
    ubuf: BytesMut,
    /// Hears production's answer for the request's copy (`mirror.capture_response`), until its
    /// head; then `tap` keeps the answer as it passes.
    answer: Option<Answer>,
    tap: Option<AnswerTap>,
}

/// Serves `io` (a client connection on the proxy's `listen`) for as long as its requests are
/// ones this path forwards, then hands it to hyper; see the module documentation.
pub async fn serve<IO, H>(proxy: &Proxy, io: IO, peer: &Peer, hooks: &H) -> Ended<IO>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    H: Hooks,
{
    let mut conn = Conn {
        proxy,
        peer,
        io,
        buf: BytesMut::with_capacity(READ_SIZE),
        client_eof: false,
        req: Vec::with_capacity(1024),
        resp: Vec::with_capacity(1024),
        ubuf: BytesMut::new(),
        answer: None,
        tap: None,
    };
    match conn.run(hooks).await {
        Some(()) => Ended::Closed,
        None => Ended::Handoff {
            read: conn.buf.freeze(),
            io: conn.io,
        },
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Conn<'_, IO> {
    /// `Some` when the connection is done, `None` to hand it to hyper.
    async fn run<H: Hooks>(&mut self, hooks: &H) -> Option<()> {
        loop {
            let head = loop {
                match self.parse_request() {
                    Parsed::Request(head) => break head,
                    // Asked to close: the next request is not begun by anyone (hyper, told to
                    // close before it read a request, would not answer it either).
                    Parsed::Other if hooks.close().asked() => return self.close().await,
                    Parsed::Other => return None,
                    Parsed::Partial => {}
                }
                if self.buf.len() >= self.proxy.limits.max_header_bytes {
                    // Over the limit: hyper answers 431 and counts it.
                    return None;
                }
                if self.buf.is_empty() && hooks.close().asked() {
                    return self.close().await;
                }
                if self.client_eof {
                    // A head cut short: hyper ends it as it would have.
                    return if self.buf.is_empty() {
                        self.close().await
                    } else {
                        None
                    };
                }
                match self.read_client(hooks).await {
                    Ok(0) if self.buf.is_empty() => return self.close().await,
                    Ok(0) => return None,
                    Ok(_) => {}
                    Err(_) => return Some(()),
                }
            };
            hooks.request_started();
            self.buf.advance(head.len);
            let close = self.forward(&head, hooks).await;
            // Whatever became of the answer, the copy is let go (alone, if it had none).
            self.answer = None;
            self.tap = None;
            hooks.request_ended();
            self.trim();
            match close {
                // Asked to close (idle timeout, eviction, drain): after this response, as hyper.
                Ok(false) if !head.close && !hooks.close().asked() => {}
                Ok(_) => return self.close().await,
                Err(()) => return Some(()),
            }
        }
    }

    /// Closes the client connection cleanly (TLS: close_notify), as hyper's graceful close does.
    async fn close(&mut self) -> Option<()> {
        let _ = self.io.shutdown().await;
        Some(())
    }

    /// Lets go of buffers that grew large, once empty.
    fn trim(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > KEEP_CAPACITY {
            self.buf = BytesMut::new();
        }
        if self.ubuf.is_empty() && self.ubuf.capacity() > KEEP_CAPACITY {
            self.ubuf = BytesMut::new();
        }
        for v in [&mut self.req, &mut self.resp] {
            if v.capacity() > KEEP_CAPACITY {
                *v = Vec::new();
            }
        }
    }

    /// Reads more of the client's next request. `Ok(0)`: closed, or asked to close while
    /// waiting for a head that has not begun.
    async fn read_client<H: Hooks>(&mut self, hooks: &H) -> io::Result<usize> {
        self.buf.reserve(READ_SIZE);
        let waiting_for_head = self.buf.is_empty();
        let close = hooks.close();
        loop {
            tokio::select! {
                biased;
                read = self.io.read_buf(&mut self.buf) => return read,
                () = close.notify.notified(), if waiting_for_head => {
                    if close.asked() {
                        return Ok(0);
                    }
                }
            }
        }
    }

    /// Whether to read the client while its request is at the primary: its next requests
    /// (pipelined, up to a head's worth), or its going away.
    fn watch_client(&self) -> bool {
        !self.client_eof && self.buf.len() < self.proxy.limits.max_header_bytes
    }

    /// What a read of the client while a request is in flight found: `Err` when the client went
    /// away with nothing more to answer (a close with pipelined requests left is a half-close:
    /// they are answered, as hyper answers them).
    fn client_read(&mut self, read: io::Result<usize>) -> Result<(), ()> {
        match read {
            Ok(0) if !self.buf.is_empty() => {
                self.client_eof = true;
                Ok(())
            }
            Ok(0) | Err(_) => Err(()),
            Ok(_) => Ok(()),
        }
    }

    /// Reads the request head at the start of the buffer and, if this path forwards it, writes
    /// the primary's head and admits its copy. Nothing is counted for a request handed to hyper.
    fn parse_request(&mut self) -> Parsed {
        let (proxy, peer) = (self.proxy, self.peer);
        let max_lines = proxy.limits.max_header_lines;
        let (buf, out, answer) = (&self.buf, &mut self.req, &mut self.answer);
        let mut prepared =
            |req: &httparse::Request<'_, '_>, len| prepare(proxy, peer, buf, req, len, out, answer);
        let mut slots = [httparse::EMPTY_HEADER; STACK_HEADERS];
        let mut req = httparse::Request::new(&mut slots);
        match req.parse(buf) {
            Ok(httparse::Status::Complete(len)) => prepared(&req, len),
            Ok(httparse::Status::Partial) => Parsed::Partial,
            Err(httparse::Error::TooManyHeaders) if max_lines > STACK_HEADERS => {
                let mut slots = vec![httparse::EMPTY_HEADER; max_lines];
                let mut req = httparse::Request::new(&mut slots);
                match req.parse(buf) {
                    Ok(httparse::Status::Complete(len)) => prepared(&req, len),
                    Ok(httparse::Status::Partial) => Parsed::Partial,
                    Err(_) => Parsed::Other,
                }
            }
            Err(_) => Parsed::Other,
        }
    }

    /// Forwards the request whose head is in `req`, retrying on a new connection when a reused
    /// one closed before any response byte. `Ok`: whether the client connection must close
    /// after the response; `Err`: it is cut now.
    async fn forward<H: Hooks>(&mut self, head: &Head, hooks: &H) -> Result<bool, ()> {
        let mut attempt = 1;
        loop {
            let failure = match self.exchange(head, hooks).await {
                Ok(close) => return Ok(close),
                Err(failure) => failure,
            };
            self.ubuf.clear();
            let close_after = head.closes_after(hooks);
            match failure {
                Failure::ClientAborted | Failure::ClientGone | Failure::MidResponse => {
                    return Err(())
                }
                Failure::BeforeHead(e, reused) => {
                    if reused && head.idempotent && attempt < MAX_ATTEMPTS {
                        attempt += 1;
                        self.proxy.accounting.primary_retries.increment(1);
                        tracing::debug!(error = %e, attempt, "the primary closed a kept-alive connection before answering; sending the request again");
                        continue;
                    }
                    self.proxy.note_primary_failure(&e, false);
                    return self.answer_502(head, close_after, super::UNREACHABLE).await;
                }
                Failure::BadHead(BadResponse::TooLarge) => {
                    self.proxy
                        .note_primary_failure(&"the response head is over the limits", true);
                    return self
                        .answer_502(head, close_after, super::HEAD_TOO_LARGE)
                        .await;
                }
                Failure::BadHead(BadResponse::Malformed) => {
                    self.proxy
                        .note_primary_failure(&"the response head is malformed", false);
                    return self.answer_502(head, close_after, super::UNREACHABLE).await;
                }
            }
        }
    }

    /// An upstream connection for a request: an idle one, or a new one.
    async fn upstream(&self) -> io::Result<Upstream> {
        if let Some(up) = self.proxy.idle.take() {
            return Ok(up);
        }
        let io = self.proxy.connector_h1.connect().await?;
        Ok(Upstream {
            io,
            last_used: Instant::now(),
            reused: false,
        })
    }

    /// One attempt: the head to the primary, its response back to the client. `Ok`: whether the
    /// client connection closes after it.
    async fn exchange<H: Hooks>(&mut self, head: &Head, hooks: &H) -> Result<bool, Failure> {
        let proxy = self.proxy;
        let limits = proxy.limits;
        // A request dropped before the primary answered or failed (its client went away, or
        // the connection was cut) is a client abort, as through hyper.
        let mut abort = super::AbortGuard::new(&proxy.accounting);
        let primary_failed = |abort: &mut super::AbortGuard<'_>, failure| {
            abort.disarm();
            failure
        };
        let mut up = match self.upstream().await {
            Ok(up) => up,
            Err(e) => return Err(primary_failed(&mut abort, Failure::BeforeHead(e, false))),
        };
        let reused = up.reused;
        up.reused = true;
        let sent = async {
            up.io.write_all(&self.req).await?;
            up.io.flush().await
        };
        if let Err(e) = sent.await {
            return Err(primary_failed(&mut abort, Failure::BeforeHead(e, reused)));
        }
        let sent_at = std::time::Instant::now();
        // Any byte of an answer (an interim 1xx included) means the primary took the request.
        let mut heard = false;
        self.ubuf.clear();
        let response = loop {
            match parse_response(
                &self.ubuf,
                head.head_only,
                limits.max_header_lines,
                // Decided as the head is written: a drain or a close asked meanwhile counts.
                head.closes_after(hooks),
                &mut self.resp,
            ) {
                Ok(Some(r)) if (100..200).contains(&r.status) => {
                    // Informational (103 Early Hints and the like): hyper's client passes them
                    // over too.
                    self.ubuf.advance(r.len);
                    continue;
                }
                Ok(Some(r)) => break r,
                Ok(None) => {}
                Err(bad) => return Err(primary_failed(&mut abort, Failure::BadHead(bad))),
            }
            if self.ubuf.len() >= limits.max_header_bytes.max(super::MIN_MAX_HEADER_BYTES) {
                return Err(primary_failed(
                    &mut abort,
                    Failure::BadHead(BadResponse::TooLarge),
                ));
            }
            self.ubuf.reserve(READ_SIZE);
            let watch_client = self.watch_client();
            tokio::select! {
                biased;
                read = up.io.read_buf(&mut self.ubuf) => match read {
                    Ok(0) => {
                        let e = io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the primary closed the connection before its response",
                        );
                        // A close before any answer: the primary did not take the request (on a
                        // new connection too, as hyper's client judges it).
                        return Err(primary_failed(&mut abort, Failure::BeforeHead(e, !heard)));
                    }
                    Err(e) => {
                        return Err(primary_failed(&mut abort, Failure::BeforeHead(e, reused && !heard)));
                    }
                    Ok(_) => heard = true,
                },
                read = self.io.read_buf(&mut self.buf), if watch_client => {
                    if self.client_read(read).is_err() {
                        return Err(Failure::ClientAborted);
                    }
                }
            }
        };
        abort.disarm();
        let status = http::StatusCode::from_u16(response.status)
            .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
        let latency = sent_at.elapsed();
        proxy.accounting.primary_answered(status, latency);
        self.ubuf.advance(response.len);
        if let Some(answer) = self.answer.take() {
            self.tap = Some(answer_head(answer, status, &self.resp, latency));
        }
        let clean = self.pass_body(&mut up, response.framing).await;
        if let Some(tap) = self.tap.take() {
            // Ended where its framing said (a body to the connection's end included), or cut
            // short: the tap, dropped, knows.
            if clean.is_ok() {
                tap.finish();
            }
        }
        let clean = clean?;
        self.io.flush().await.map_err(|_| Failure::ClientGone)?;
        if response.keep_alive && clean {
            proxy.idle.put(up);
        }
        Ok(response.close)
    }

    /// Writes the response head (in `resp`) and passes the body as the primary framed it.
    /// `Ok(true)`: the body ended where its framing said, nothing after it (the upstream
    /// connection may carry another request).
    async fn pass_body(&mut self, up: &mut Upstream, framing: Framing) -> Result<bool, Failure> {
        match framing {
            Framing::None => {
                self.send_resp().await?;
                Ok(self.ubuf.is_empty())
            }
            Framing::Length(mut left) => {
                let now = self
                    .ubuf
                    .len()
                    .min(usize::try_from(left).unwrap_or(usize::MAX));
                if self.resp.len() + now <= ONE_WRITE {
                    self.resp.extend_from_slice(&self.ubuf[..now]);
                    tap_data(&mut self.tap, &self.ubuf[..now]);
                    self.ubuf.advance(now);
                    left -= now as u64;
                }
                self.send_resp().await?;
                while left > 0 {
                    if self.ubuf.is_empty() {
                        self.io.flush().await.map_err(|_| Failure::ClientGone)?;
                        if !self.read_body(up).await? {
                            return Err(Failure::MidResponse);
                        }
                    }
                    let n = self
                        .ubuf
                        .len()
                        .min(usize::try_from(left).unwrap_or(usize::MAX));
                    self.io
                        .write_all(&self.ubuf[..n])
                        .await
                        .map_err(|_| Failure::ClientGone)?;
                    tap_data(&mut self.tap, &self.ubuf[..n]);
                    self.ubuf.advance(n);
                    left -= n as u64;
                }
                Ok(self.ubuf.is_empty())
            }
            Framing::Chunked => {
                let mut chunks = Chunks::default();
                loop {
                    let tap = &mut self.tap;
                    let end = chunks
                        .advance_with(&self.ubuf, |data| tap_data(tap, data))
                        .map_err(|()| Failure::MidResponse)?;
                    let n = end.unwrap_or(self.ubuf.len());
                    if self.resp.len() + n <= ONE_WRITE {
                        self.resp.extend_from_slice(&self.ubuf[..n]);
                    } else {
                        self.send_resp().await?;
                        self.io
                            .write_all(&self.ubuf[..n])
                            .await
                            .map_err(|_| Failure::ClientGone)?;
                    }
                    self.ubuf.advance(n);
                    // What came is passed on before waiting for more (a stream of events must
                    // not wait for the next one).
                    self.send_resp().await?;
                    if end.is_some() {
                        return Ok(self.ubuf.is_empty());
                    }
                    self.io.flush().await.map_err(|_| Failure::ClientGone)?;
                    if !self.read_body(up).await? {
                        return Err(Failure::MidResponse);
                    }
                }
            }
            Framing::Close => {
                self.send_resp().await?;
                loop {
                    self.io
                        .write_all(&self.ubuf)
                        .await
                        .map_err(|_| Failure::ClientGone)?;
                    tap_data(&mut self.tap, &self.ubuf);
                    self.ubuf.clear();
                    self.io.flush().await.map_err(|_| Failure::ClientGone)?;
                    // The primary's close ends this body; a failure cuts it short, and the
                    // client's connection with it (a clean end would pass a truncated body
                    // off as whole).
                    if !self.read_body(up).await? {
                        return Ok(false);
                    }
                }
            }
        }
    }

    /// Writes what `resp` holds to the client, if anything.
    async fn send_resp(&mut self) -> Result<(), Failure> {
        if !self.resp.is_empty() {
            self.io
                .write_all(&self.resp)
                .await
                .map_err(|_| Failure::ClientGone)?;
            self.resp.clear();
        }
        Ok(())
    }

    /// More of the response body, watching the client meanwhile: a client gone stops the
    /// response (and the primary's connection), as hyper stops it. `Ok(false)`: the primary
    /// closed the connection; failing (a reset, TLS without close_notify) is `MidResponse`.
    async fn read_body(&mut self, up: &mut Upstream) -> Result<bool, Failure> {
        self.ubuf.reserve(BODY_READ);
        loop {
            let watch_client = self.watch_client();
            let tap = &mut self.tap;
            let waiting = tap.is_some();
            let expired = std::future::poll_fn(|cx| match tap.as_mut() {
                Some(tap) => tap.poll_expired(cx),
                None => std::task::Poll::Pending,
            });
            tokio::select! {
                biased;
                read = up.io.read_buf(&mut self.ubuf) => return match read {
                    Ok(0) => Ok(false),
                    Err(_) => Err(Failure::MidResponse),
                    Ok(_) => Ok(true),
                },
                read = self.io.read_buf(&mut self.buf), if watch_client => {
                    if self.client_read(read).is_err() {
                        return Err(Failure::ClientGone);
                    }
                }
                // The answer did not end within `capture_response.wait`: its copy went alone.
                () = expired, if waiting => self.tap = None,
            }
        }
    }

    /// Answers 502 itself (a `HEAD` gets the head alone). `Ok`: whether the client connection
    /// closes after it.
    async fn answer_502(&mut self, head: &Head, close: bool, body: &str) -> Result<bool, ()> {
        self.resp.clear();
        self.resp.extend_from_slice(
            b"HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: ",
        );
        self.resp
            .extend_from_slice(body.len().to_string().as_bytes());
        if close {
            self.resp.extend_from_slice(b"\r\nconnection: close");
        }
        self.resp.extend_from_slice(b"\r\n\r\n");
        if !head.head_only {
            self.resp.extend_from_slice(body.as_bytes());
        }
        let sent = self.send_resp().await;
        let flushed = self.io.flush().await;
        match (sent, flushed) {
            (Ok(()), Ok(())) => Ok(close),
            _ => Err(()),
        }
    }
}

/// Checks a complete request head and, if this path forwards it, writes the primary's head into
/// `out` and decides (and counts) its copy, as [`Proxy::handle`] does.
fn prepare(
    proxy: &Proxy,
    peer: &Peer,
    buf: &[u8],
    req: &httparse::Request<'_, '_>,
    len: usize,
    out: &mut Vec<u8>,
    answer: &mut Option<Answer>,
) -> Parsed {
    let limits = &proxy.limits;
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return Parsed::Other;
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parsed::Other;
    };
    if req.headers.len() > limits.max_header_lines
        || len > limits.max_header_bytes
        || method == Method::CONNECT
        || target.len() > MAX_TARGET
        || !plain_target(target.as_bytes())
    {
        return Parsed::Other;
    }
    let Some(close) = write_request(out, method.as_str(), target, req.headers, peer) else {
        return Parsed::Other;
    };
    // Made only for a request that is copied: the copy's target and values share one copy of
    // the head.
    let copy_head = || {
        let head = Bytes::copy_from_slice(&buf[..len]);
        let part = |s: &[u8]| {
            let at = (s.as_ptr() as usize).wrapping_sub(buf.as_ptr() as usize);
            match at.checked_add(s.len()) {
                Some(end) if end <= head.len() => head.slice(at..end),
                _ => Bytes::copy_from_slice(s),
            }
        };
        // Every plain target is a URI.
        let uri = Uri::from_maybe_shared(part(target.as_bytes())).ok()?;
        Some((uri, copy_headers(peer, req.headers, part)))
    };
    let tee = &proxy.tee;
    if let Some(mut copy) = tee.admit_parsed(&method, target, &ClientFields(req.headers), copy_head)
    {
        *answer = copy.take_answer();
        tee.complete(copy);
    }
    Parsed::Request(Head {
        len,
        head_only: method == Method::HEAD,
        idempotent: method.is_idempotent(),
        close,
    })
}

/// A head's fields as the client sent them, which the mirror policy decides on (a policy that
/// reads fields the proxy changes decides on [`copy_headers`]' instead).
struct ClientFields<'h, 'b>(&'h [httparse::Header<'b>]);

impl Fields for ClientFields<'_, '_> {
    fn first(&self, name: &HeaderName) -> Option<&[u8]> {
        let name = name.as_str();
        self.0
            .iter()
            .find(|f| f.name.eq_ignore_ascii_case(name))
            .map(|f| f.value)
    }

    fn any_value(&self, name: &HeaderName, mut pred: impl FnMut(&[u8]) -> bool) -> bool {
        let name = name.as_str();
        self.0
            .iter()
            .any(|f| f.name.eq_ignore_ascii_case(name) && pred(f.value))
    }
}

/// The head as the copy sees it: what [`Proxy::handle`] makes of the client's fields.
/// `part` gives a field value's bytes.
fn copy_headers(
    peer: &Peer,
    fields: &[httparse::Header<'_>],
    part: impl Fn(&[u8]) -> Bytes,
) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(fields.len() + 2);
    for f in fields {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(f.name.as_bytes()),
            HeaderValue::from_maybe_shared(part(f.value)),
        ) {
            headers.append(name, value);
        }
    }
    if peer.tls {
        headers
            .entry("x-forwarded-proto")
            .or_insert(HeaderValue::from_static("https"));
    }
    remove_hop_by_hop(&mut headers);
    peer.forwarding.apply(&mut headers, Version::HTTP_11);
    headers
}

/// Writes the head the primary gets: the request line as it came (version 1.1), the client's
/// fields in their order and case but for hop-by-hop ones, then the forwarding fields
/// (`x-forwarded-proto` over TLS unless sent, `x-forwarded-for` and `via`, each folded into the
/// client's own line when it sent one). Checks the fields on the way, in the same pass: `None`
/// when the request is not one this path forwards (a body, `Expect`, an upgrade, a `Connection`
/// naming other fields, `TE` other than `trailers`, no `Host` or several); else whether the
/// client asked to close after the response.
fn write_request(
    out: &mut Vec<u8>,
    method: &str,
    target: &str,
    fields: &[httparse::Header<'_>],
    peer: &Peer,
) -> Option<bool> {
    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let client = peer.forwarding.client().as_bytes();
    let (mut forwarded_for, mut via, mut proto) = (false, false, false);
    let (mut close, mut hosts) = (false, 0);
    for f in fields {
        let name = f.name.as_bytes();
        let value = f.value;
        if name.eq_ignore_ascii_case(b"host") {
            hosts += 1;
        } else if name.eq_ignore_ascii_case(b"content-length") {
            if value.is_empty() || !value.iter().all(|b| *b == b'0') {
                return None;
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding")
            || name.eq_ignore_ascii_case(b"expect")
            || name.eq_ignore_ascii_case(b"upgrade")
        {
            return None;
        } else if name.eq_ignore_ascii_case(b"te") {
            if !value.trim_ascii().eq_ignore_ascii_case(b"trailers") {
                return None;
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in value.split(|b| *b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if !token.eq_ignore_ascii_case(b"keep-alive") && !token.is_empty() {
                    return None;
                }
            }
            continue;
        } else if name.eq_ignore_ascii_case(b"keep-alive")
            || name.eq_ignore_ascii_case(b"proxy-connection")
        {
            continue;
        } else if name.eq_ignore_ascii_case(b"x-forwarded-for") {
            if !forwarded_for {
                forwarded_for = true;
                write_folded(out, f.name, fields, client);
            }
            continue;
        } else if name.eq_ignore_ascii_case(b"via") {
            if !via {
                via = true;
                write_folded(out, f.name, fields, VIA);
            }
            continue;
        }
        proto |= name.eq_ignore_ascii_case(b"x-forwarded-proto");
        write_field(out, name, value);
    }
    if hosts != 1 {
        return None;
    }
    if peer.tls && !proto {
        write_field(out, b"x-forwarded-proto", b"https");
    }
    if !forwarded_for {
        write_field(out, b"x-forwarded-for", client);
    }
    if !via {
        write_field(out, b"via", VIA);
    }
    out.extend_from_slice(b"\r\n");
    Some(close)
}

/// What `via` says of this hop for an HTTP/1.1 request.
const VIA: &[u8] = b"1.1 teeway";

fn write_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// One line named `name` (as the client spelled its first) holding every value of the fields
/// so named, in order, then `item`.
fn write_folded(out: &mut Vec<u8>, name: &str, fields: &[httparse::Header<'_>], item: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    for f in fields.iter().filter(|f| f.name.eq_ignore_ascii_case(name)) {
        out.extend_from_slice(f.value);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(item);
    out.extend_from_slice(b"\r\n");
}

/// Whether a request target is origin-form made of the characters every URI parser takes
/// (RFC 3986 unreserved, sub-delims, `:@/?%`): anything else is left to hyper's judgement.
fn plain_target(target: &[u8]) -> bool {
    target.first() == Some(&b'/')
        && target.iter().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'-' | b'.'
                        | b'_'
                        | b'~'
                        | b'!'
                        | b'$'
                        | b'&'
                        | b'\''
                        | b'('
                        | b')'
                        | b'*'
                        | b'+'
                        | b','
                        | b';'
                        | b'='
                        | b':'
                        | b'@'
                        | b'/'
                        | b'?'
                        | b'%'
                )
        })
}

/// Reads the primary's response head at the start of `buf` and writes the client's into `out`:
/// status line as HTTP/1.1, the primary's fields in their order and case but for hop-by-hop
/// ones (and `Content-Length` beside `Transfer-Encoding`, which wins: RFC 9112 §6.3), and
/// `connection: close` when the client connection closes after it. `Ok(None)`: not all of it yet.
fn parse_response(
    buf: &[u8],
    head_only: bool,
    max_lines: usize,
    close_client: bool,
    out: &mut Vec<u8>,
) -> Result<Option<ResponseHead>, BadResponse> {
    let mut slots = [httparse::EMPTY_HEADER; STACK_HEADERS];
    let mut resp = httparse::Response::new(&mut slots);
    match resp.parse(buf) {
        Ok(httparse::Status::Complete(len)) => {
            response_head(&resp, len, head_only, max_lines, close_client, out).map(Some)
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) if max_lines > STACK_HEADERS => {
            let mut slots = vec![httparse::EMPTY_HEADER; max_lines];
            let mut resp = httparse::Response::new(&mut slots);
            match resp.parse(buf) {
                Ok(httparse::Status::Complete(len)) => {
                    response_head(&resp, len, head_only, max_lines, close_client, out).map(Some)
                }
                Ok(httparse::Status::Partial) => Ok(None),
                Err(httparse::Error::TooManyHeaders) => Err(BadResponse::TooLarge),
                Err(_) => Err(BadResponse::Malformed),
            }
        }
        Err(httparse::Error::TooManyHeaders) => Err(BadResponse::TooLarge),
        Err(_) => Err(BadResponse::Malformed),
    }
}

fn response_head(
    resp: &httparse::Response<'_, '_>,
    len: usize,
    head_only: bool,
    max_lines: usize,
    close_client: bool,
    out: &mut Vec<u8>,
) -> Result<ResponseHead, BadResponse> {
    let (Some(version), Some(status)) = (resp.version, resp.code) else {
        return Err(BadResponse::Malformed);
    };
    if resp.headers.len() > max_lines {
        return Err(BadResponse::TooLarge);
    }
    if status == 101 || status < 100 {
        return Err(BadResponse::Malformed);
    }
    // hyper's client reads no body for these whatever the framing fields say, and so checks
    // none of them.
    let no_body = head_only || status < 200 || status == 204 || status == 304;
    // What `Connection` says and names, and how the body is framed.
    let mut keep_alive = version == 1;
    let mut named: Vec<&[u8]> = Vec::new();
    let mut chunked = None;
    let mut length: Option<u64> = None;
    for f in resp.headers.iter() {
        let name = f.name.as_bytes();
        if name.eq_ignore_ascii_case(b"connection") {
            for token in f.value.split(|b| *b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive |= version == 0;
                } else if !token.is_empty()
                    && !token.eq_ignore_ascii_case(b"content-length")
                    && !token.eq_ignore_ascii_case(b"transfer-encoding")
                {
                    // Named fields are hop-by-hop; the framing fields never are: the body is
                    // passed on as they frame it.
                    named.push(token);
                }
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") && !no_body {
            if version == 0 {
                // Chunked framing in HTTP/1.0 is faulty (RFC 9112 §6.1); hyper refuses it.
                return Err(BadResponse::Malformed);
            }
            // The last coding decides: chunked, or the body runs to the connection's end.
            let last = f.value.rsplit(|b| *b == b',').next().unwrap_or_default();
            chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case(b"content-length") && !no_body {
            // A list of one value repeated (`2, 2`) is that value (RFC 9110 §8.6).
            for item in f.value.split(|b| *b == b',') {
                let n = std::str::from_utf8(item.trim_ascii())
                    .ok()
                    .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|t| t.parse::<u64>().ok())
                    .ok_or(BadResponse::Malformed)?;
                if length.is_some_and(|l| l != n) {
                    return Err(BadResponse::Malformed);
                }
                length = Some(n);
            }
        }
    }
    let framing = if no_body {
        Framing::None
    } else {
        match (chunked, length) {
            (Some(true), _) => Framing::Chunked,
            (Some(false), _) => Framing::Close,
            (None, Some(0)) => Framing::None,
            (None, Some(n)) => Framing::Length(n),
            (None, None) => Framing::Close,
        }
    };
    out.clear();
    // The status line's version is the lower of the client's (1.1) and the primary's, as
    // hyper writes it; an HTTP/1.0 answer is the connection's last.
    let close = close_client || framing == Framing::Close || version == 0;
    out.extend_from_slice(if version == 0 {
        b"HTTP/1.0 "
    } else {
        b"HTTP/1.1 "
    });
    out.extend_from_slice(status.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(resp.reason.unwrap_or_default().as_bytes());
    out.extend_from_slice(b"\r\n");
    for f in resp.headers.iter() {
        let name = f.name.as_bytes();
        let hop = name.eq_ignore_ascii_case(b"connection")
            || name.eq_ignore_ascii_case(b"keep-alive")
            || name.eq_ignore_ascii_case(b"proxy-connection")
            || name.eq_ignore_ascii_case(b"upgrade")
            || (name.eq_ignore_ascii_case(b"te")
                && !f.value.trim_ascii().eq_ignore_ascii_case(b"trailers"))
            || (name.eq_ignore_ascii_case(b"content-length") && chunked.is_some())
            || named.iter().any(|n| n.eq_ignore_ascii_case(name));
        if !hop {
            write_field(out, name, f.value);
        }
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(ResponseHead {
        len,
        status,
        framing,
        keep_alive,
        close,
    })
}

/// Where a chunked body ends (RFC 9112 §7.1), found as its bytes pass: sizes, data, the last
/// chunk and the trailer section. As strict as hyper, whose client reading would end the body
/// where this does: size lines end in CRLF only, whitespace only before an extension,
/// extensions (over the body) and the trailer section at most [`MAX_CHUNK_LINE`] bytes each;
/// trailer lines may end in a bare LF.
#[derive(Debug, Default)]
struct Chunks {
    state: ChunkState,
    /// Bytes of extensions so far, over the whole body (hyper counts them so).
    extensions: usize,
    /// Bytes of the trailer section so far.
    trailers: usize,
}

#[derive(Debug, Default, Clone, Copy)]
enum ChunkState {
    /// The first digit of a chunk size.
    #[default]
    SizeStart,
    /// More digits.
    Size(u64),
    /// Whitespace after the digits: an extension or the line's end follows.
    SizeWs(u64),
    /// In an extension.
    Ext(u64),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    /// In the trailer section; `true` at the start of a line.
    Trailer(bool),
    TrailerLf(bool),
}

impl Chunks {
    /// Follows `bytes`; `Some(n)`: the body ends after the first `n` of them.
    #[cfg(test)]
    fn advance(&mut self, bytes: &[u8]) -> Result<Option<usize>, ()> {
        self.advance_with(bytes, |_| {})
    }

    /// [`Chunks::advance`], handing `data` the chunks' data as it passes (in pieces).
    fn advance_with(
        &mut self,
        bytes: &[u8],
        mut data: impl FnMut(&[u8]),
    ) -> Result<Option<usize>, ()> {
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            self.state = match self.state {
                ChunkState::SizeStart => ChunkState::Size(u64::from(hex(b).ok_or(())?)),
                ChunkState::Size(size) => match (b, hex(b)) {
                    (_, Some(d)) => ChunkState::Size(
                        size.checked_mul(16)
                            .and_then(|s| s.checked_add(u64::from(d)))
                            .ok_or(())?,
                    ),
                    (b' ' | b'\t', _) => ChunkState::SizeWs(size),
                    (b';', _) => ChunkState::Ext(size),
                    (b'\r', _) => ChunkState::SizeLf(size),
                    _ => return Err(()),
                },
                ChunkState::SizeWs(size) => match b {
                    b' ' | b'\t' => ChunkState::SizeWs(size),
                    b';' => ChunkState::Ext(size),
                    b'\r' => ChunkState::SizeLf(size),
                    _ => return Err(()),
                },
                ChunkState::Ext(size) => match b {
                    b'\r' => ChunkState::SizeLf(size),
                    b'\n' => return Err(()),
                    _ => {
                        self.extensions += 1;
                        if self.extensions > MAX_CHUNK_LINE {
                            return Err(());
                        }
                        ChunkState::Ext(size)
                    }
                },
                ChunkState::SizeLf(size) => match (b, size) {
                    (b'\n', 0) => ChunkState::Trailer(true),
                    (b'\n', size) => ChunkState::Data(size),
                    _ => return Err(()),
                },
                ChunkState::Data(left) => {
                    let take = (bytes.len() - i).min(usize::try_from(left).unwrap_or(usize::MAX));
                    data(&bytes[i..i + take]);
                    i += take;
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        ChunkState::DataCr
                    } else {
                        ChunkState::Data(left)
                    };
                    continue;
                }
                ChunkState::DataCr if b == b'\r' => ChunkState::DataLf,
                ChunkState::DataLf if b == b'\n' => ChunkState::SizeStart,
                ChunkState::DataCr | ChunkState::DataLf => return Err(()),
                ChunkState::Trailer(start) => {
                    self.trailers += 1;
                    if self.trailers > MAX_CHUNK_LINE {
                        return Err(());
                    }
                    match (b, start) {
                        (b'\r', _) => ChunkState::TrailerLf(start),
                        // Trailer lines may end in a bare LF, as httparse (and so hyper)
                        // reads them.
                        (b'\n', true) => return Ok(Some(i + 1)),
                        (b'\n', false) => ChunkState::Trailer(true),
                        (_, _) => ChunkState::Trailer(false),
                    }
                }
                ChunkState::TrailerLf(start) => match (b, start) {
                    (b'\n', true) => return Ok(Some(i + 1)),
                    (b'\n', false) => ChunkState::Trailer(true),
                    _ => return Err(()),
                },
            };
            i += 1;
        }
        Ok(None)
    }
}

/// Hands body bytes to the answer's tap, letting it go once it keeps no more.
fn tap_data(tap: &mut Option<AnswerTap>, bytes: &[u8]) {
    if let Some(t) = tap.as_mut() {
        if !t.data(bytes) {
            *tap = None;
        }
    }
}

/// The tap of an answer whose head, as the client gets it, is `head` (the status line and
/// fields this path wrote).
fn answer_head(
    answer: Answer,
    status: http::StatusCode,
    head: &[u8],
    latency: Duration,
) -> AnswerTap {
    let mut slots = vec![httparse::EMPTY_HEADER; head.split(|b| *b == b'\n').count()];
    let mut parsed = httparse::Response::new(&mut slots);
    let mut headers = HeaderMap::new();
    let mut version = Version::HTTP_11;
    if parsed.parse(head).is_ok() {
        if parsed.version == Some(0) {
            version = Version::HTTP_10;
        }
        for f in parsed.headers.iter() {
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(f.name.as_bytes()),
                HeaderValue::from_bytes(f.value),
            ) {
                headers.append(name, value);
            }
        }
    }
    // As the hyper path keeps them: the framing and the connection's fields are the hop's.
    remove_hop_by_hop(&mut headers);
    answer.head(status, version, &headers, latency)
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).and_then(|d| u8::try_from(d).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ends(body: &[u8]) -> Result<Option<usize>, ()> {
        Chunks::default().advance(body)
    }

    #[test]
    fn a_chunked_body_ends_after_its_trailers() {
        let body = b"5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\nx-trailer: 1\r\n\r\nGET / HTTP/1.1";
        let end = body.len() - b"GET / HTTP/1.1".len();
        assert_eq!(ends(body), Ok(Some(end)));
        // Byte by byte, the same end is found.
        let mut chunks = Chunks::default();
        let mut found = None;
        for (i, b) in body.iter().enumerate() {
            if let Some(n) = chunks.advance(std::slice::from_ref(b)).expect("valid") {
                found = Some(i + n);
                break;
            }
        }
        assert_eq!(found, Some(end));
        assert_eq!(ends(b"0\r\n\r\n"), Ok(Some(5)));
        assert_eq!(ends(b"A\r\n0123456789\r\n"), Ok(None));
    }

    #[test]
    fn a_malformed_chunked_body_is_an_error() {
        assert_eq!(ends(b"z\r\n"), Err(()));
        assert_eq!(ends(b"2\r\nabc\r\n"), Err(()));
        assert_eq!(ends(b"fffffffffffffffff\r\n"), Err(()));
        // Where a lenient reader and a strict client would disagree on the end: refused.
        assert_eq!(
            ends(b"3;x\nabc\r\n0\r\n\r\n"),
            Err(()),
            "bare LF in an extension"
        );
        assert_eq!(
            ends(b"5 5\r\nhello\r\n"),
            Err(()),
            "a space inside the size"
        );
        assert_eq!(
            ends(b"0\r\nx: 1\n\n"),
            Ok(Some(9)),
            "trailer lines may end in a bare LF, as hyper reads them"
        );
        assert_eq!(ends(b"5 ;a=b\r\nhello\r\n0\r\n\r\n"), Ok(Some(20)));
        let long = format!("1;{}\r\n", "e".repeat(MAX_CHUNK_LINE + 1));
        assert_eq!(
            ends(long.as_bytes()),
            Err(()),
            "an extension over the limit"
        );
    }

    fn response(
        head: &str,
        head_only: bool,
    ) -> (Result<Option<ResponseHead>, BadResponse>, String) {
        let mut out = Vec::new();
        let r = parse_response(head.as_bytes(), head_only, 100, false, &mut out);
        (r, String::from_utf8(out).expect("ascii"))
    }

    #[test]
    fn response_heads_lose_hop_by_hop_fields_and_keep_their_framing() {
        let (r, out) = response(
            "HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\nX-Kept: yes\r\n\r\n",
            false,
        );
        let r = r.expect("valid").expect("complete");
        assert_eq!(r.framing, Framing::Chunked);
        assert!(r.keep_alive);
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Kept: yes\r\n\r\n"
        );
        let (r, out) = response("HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\n", false);
        let r = r.expect("valid").expect("complete");
        assert_eq!(
            (r.framing, r.keep_alive, r.close),
            (Framing::Length(3), false, true)
        );
        assert_eq!(
            out,
            "HTTP/1.0 200 OK\r\nContent-Length: 3\r\nconnection: close\r\n\r\n"
        );
        let (r, out) = response("HTTP/1.1 200 OK\r\nServer: x\r\n\r\n", false);
        assert_eq!(r.expect("valid").expect("complete").framing, Framing::Close);
        assert!(out.ends_with("connection: close\r\n\r\n"), "{out}");
        let (r, _) = response("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", true);
        assert_eq!(r.expect("valid").expect("complete").framing, Framing::None);
        let (r, _) = response(
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            false,
        );
        assert_eq!(r.err(), Some(BadResponse::Malformed));
        // `Connection` never takes the framing fields away.
        let (r, out) = response(
            "HTTP/1.1 200 OK\r\nConnection: Content-Length, Transfer-Encoding\r\nContent-Length: 5\r\n\r\n",
            false,
        );
        assert_eq!(
            r.expect("valid").expect("complete").framing,
            Framing::Length(5)
        );
        assert_eq!(out, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n");
        // No body: the framing fields are not read, as hyper does not read them.
        let (r, _) = response(
            "HTTP/1.1 304 Not Modified\r\nContent-Length: x\r\n\r\n",
            false,
        );
        assert_eq!(r.expect("valid").expect("complete").framing, Framing::None);
        let (r, _) = response(
            "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
        );
        assert_eq!(r.err(), Some(BadResponse::Malformed));
        let (r, _) = response("HTTP/1.1 200 OK\r\nContent-Len", false);
        assert!(matches!(r, Ok(None)));
    }

    /// The head as a map, from the bytes `write_request` wrote (names lower-cased).
    fn written(peer: &Peer, fields: &[httparse::Header<'_>]) -> (String, HeaderMap) {
        let mut out = Vec::new();
        assert!(write_request(&mut out, "GET", "/x?y=1", fields, peer).is_some());
        let mut slots = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut slots);
        assert!(matches!(req.parse(&out), Ok(httparse::Status::Complete(n)) if n == out.len()));
        assert_eq!(
            (req.method, req.path, req.version),
            (Some("GET"), Some("/x?y=1"), Some(1))
        );
        let mut map = HeaderMap::new();
        for f in req.headers.iter() {
            map.append(
                HeaderName::from_bytes(f.name.as_bytes()).expect("name"),
                HeaderValue::from_bytes(f.value).expect("value"),
            );
        }
        (String::from_utf8(out).expect("ascii"), map)
    }

    #[test]
    fn the_primary_gets_the_head_the_hyper_path_makes() {
        let h = |name: &'static str, value: &'static [u8]| httparse::Header { name, value };
        let cases: [&[httparse::Header<'_>]; 4] = [
            &[h("Host", b"api.example.com"), h("Accept", b"*/*")],
            &[
                h("Host", b"a"),
                h("X-Forwarded-For", b"203.0.113.9"),
                h("Via", b"1.1 edge"),
                h("x-forwarded-for", b"198.51.100.1"),
                h("Connection", b"keep-alive"),
                h("Keep-Alive", b"timeout=5"),
                h("Proxy-Connection", b"keep-alive"),
                h("TE", b"trailers"),
            ],
            &[h("Host", b"a"), h("X-Forwarded-Proto", b"http")],
            &[h("Host", b"a"), h("Content-Length", b"0")],
        ];
        for tls in [false, true] {
            let peer = Peer::new("192.0.2.7:4000".parse().expect("addr"), tls);
            for fields in cases {
                let (text, sent) = written(&peer, fields);
                assert_eq!(
                    sent,
                    copy_headers(&peer, fields, Bytes::copy_from_slice),
                    "tls {tls}: the same fields as the hyper path's, in:\n{text}"
                );
            }
        }
        // Case and order as the client sent them, the forwarding fields folded in place.
        let peer = Peer::new("192.0.2.7:4000".parse().expect("addr"), false);
        let (text, _) = written(&peer, cases[1]);
        assert_eq!(
            text,
            "GET /x?y=1 HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 203.0.113.9, 198.51.100.1, 192.0.2.7\r\nVia: 1.1 edge, 1.1 teeway\r\nTE: trailers\r\n\r\n"
        );
    }

    #[test]
    fn the_policy_decides_on_the_clients_fields_as_on_the_copys() {
        let h = |name: &'static str, value: &'static [u8]| httparse::Header { name, value };
        let heads: [&[httparse::Header<'_>]; 6] = [
            &[h("Host", b"api.example.com"), h("Accept", b"*/*")],
            &[h("HOST", b"API.example.com:8080"), h("X-Canary", b"yes")],
            &[
                h("Host", b"[::1]:80"),
                h("x-canary", b"no"),
                h("X-Canary", b"yes"),
            ],
            &[h("Host", b"a"), h("X-Debug", b"1"), h("X-User", b"u1")],
            &[
                h("Host", b"a"),
                h("X-User", b"u2"),
                h("Connection", b"close"),
            ],
            &[h("Host", b"a"), h("X-Canary", b"\xffyes")],
        ];
        let policies = [
            "mirror: { percentage: 0, rules: [ { match: { host: api.example.com, path_prefix: /x }, percentage: 100 } ] }",
            "mirror: { percentage: 0, rules: [ { name: canary, match: { headers: { x-canary: \"^yes$\" } }, percentage: 100 } ] }",
            "mirror: { percentage: 0, rules: [ { match: { host: api.example.com }, percentage: 100 }, { match: { headers: { x-debug: false } }, percentage: 50 } ] }",
            "mirror: { percentage: 50, sample_by: \"header:x-user\" }",
            "mirror: { percentage: 50, sample_by: \"query:y\", rules: [ { match: { path: /x }, percentage: 30 } ] }",
        ];
        let uri: Uri = "/x?y=1".parse().expect("uri");
        for yaml in policies {
            let policy = crate::policy::test_policy(yaml).expect("policy");
            assert!(!policy.reads_proxied_fields(), "{yaml}");
            for tls in [false, true] {
                let peer = Peer::new("192.0.2.7:4000".parse().expect("addr"), tls);
                for fields in heads {
                    for draw in [0, u64::MAX / 3, u64::MAX / 2 + 1, u64::MAX - 1] {
                        let outcome = |c: Option<crate::policy::Chosen<'_>>| {
                            c.map(|c| (c.rule.cloned(), c.fraction.ppm()))
                        };
                        let on_client = outcome(policy.decide_on(
                            &Method::GET,
                            crate::policy::Target::origin_form("/x?y=1"),
                            &ClientFields(fields),
                            || draw,
                        ));
                        let copy = copy_headers(&peer, fields, Bytes::copy_from_slice);
                        let on_copy = outcome(policy.decide(&Method::GET, &uri, &copy, || draw));
                        assert_eq!(on_client, on_copy, "{yaml}\n{fields:?}, draw {draw}");
                    }
                }
            }
        }
        // A policy reading what the proxy changes decides on the copy's fields.
        for yaml in [
            "mirror: { rules: [ { match: { headers: { x-forwarded-for: \"^10\\\\.\" } }, percentage: 100 } ] }",
            "mirror: { percentage: 5, sample_by: \"header:Via\" }",
        ] {
            let policy = crate::policy::test_policy(yaml).expect("policy");
            assert!(policy.reads_proxied_fields(), "{yaml}");
        }
    }

    #[test]
    fn only_plain_requests_take_this_path() {
        let h = |name: &'static str, value: &'static [u8]| httparse::Header { name, value };
        let peer = Peer::new("192.0.2.7:4000".parse().expect("addr"), false);
        let read = |fields: &[httparse::Header<'_>]| {
            write_request(&mut Vec::new(), "GET", "/", fields, &peer)
        };
        let host = h("Host", b"a");
        assert!(read(&[host]).is_some());
        assert!(read(&[]).is_none(), "no Host");
        assert!(read(&[host, host]).is_none(), "two Hosts");
        assert!(read(&[host, h("Content-Length", b"0")]).is_some());
        assert!(read(&[host, h("Content-Length", b"1")]).is_none());
        assert!(read(&[host, h("Transfer-Encoding", b"chunked")]).is_none());
        assert!(read(&[host, h("Expect", b"100-continue")]).is_none());
        assert!(read(&[host, h("Connection", b"Upgrade")]).is_none());
        assert!(read(&[host, h("Connection", b"x-private")]).is_none());
        assert!(read(&[host, h("Connection", b"close")]).is_some_and(|close| close));
        assert!(plain_target(b"/a/b?c=d&e=%20"));
        assert!(!plain_target(b"http://x/"));
        assert!(!plain_target(b"*"));
        assert!(!plain_target(b"/a b"));
        assert!(!plain_target(b"/{x}"));
    }
}
