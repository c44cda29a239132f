//! The production side of `listen`: accepting clients, bounding their connections in number and
//! time, and draining them on shutdown so that a rollout refuses no one.
//!
//! # Limits
//!
//! - A connection must deliver a complete request head within `header_read_timeout` of its
//!   first byte (of accepting it, for the first request); one that does not is closed and the
//!   request counted as refused (`header_timeout`). This is what ends slowloris clients.
//! - A connection with no request in flight is closed after `idle_timeout` (HTTP/2: GOAWAY).
//! - At most `max_connections` client connections are open (one more while room is made for a
//!   newcomer), fewer when the process's file descriptor limit would not allow them (each may
//!   need a second descriptor to the primary). When a newcomer arrives at the cap, the
//!   connection idle the longest (a slowloris head counts as idle: no request
//!   of it is in flight; one that never sent a request goes first) is closed to make room once
//!   it has been idle a second; until then, or with none idle, accepting pauses and new clients
//!   wait in the kernel's backlog.
//! - Accept errors (out of descriptors) back off from 10 ms to 1 s, free an idle connection,
//!   and are logged once a minute with their count.
//!
//! A connection is served by the proxy's own HTTP/1 path ([`crate::proxy::h1`]) while its
//! requests are plain ones, then by hyper (HTTP/2, bodies, upgrades, and the sink); one
//! [`Watchdog`] times and closes either.
//!
//! Requests refused by the HTTP layer (a head larger than `max_header_bytes`, more than
//! `max_header_lines` lines, a target over 65,534 bytes, a malformed head) are answered by hyper
//! (431, 414, 400) and counted here by reason, beside the accounting identity: they never reach
//! the primary, so they are not requests the agent proxied.
//!
//! # Drain
//!
//! When `shutdown` fires, `/readyz` turns 503 at once and the listener keeps accepting and
//! serving for `drain_time`, so clients still routed here are served while the load balancer
//! moves them away. Meanwhile HTTP/2 connections get GOAWAY and HTTP/1 responses carry
//! `Connection: close`, so clients reconnect (elsewhere, once endpoints are updated). Then the
//! listener closes, idle connections close, and requests in flight get up to `shutdown_grace` to
//! finish before their connections are cut.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use metrics::{Counter, Gauge};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use teeway_runtime::logging::Throttle;
use teeway_runtime::metrics::Registry;

use crate::downstream::{
    hyper_cause, ClientLimits, Peer, ProxyBody, HYPER_MAX_HEADERS, MIN_MAX_HEADER_BYTES,
};
use crate::front::Front;
use crate::metrics::{
    ACCEPT_ERRORS_TOTAL, CLIENT_CONNECTIONS, CLIENT_CONNECTIONS_CLOSED_TOTAL,
    REQUESTS_REFUSED_TOTAL,
};
use crate::proxy::h1::{self, Ended};

/// Time a client has to complete the TLS handshake on `listen_tls`.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Descriptors kept for everything but client connections (uplink, files, listeners).
const RESERVED_FDS: u64 = 64;
/// How long a connection must have been idle before the connection cap closes it to make room.
/// A client that reconnects as fast as it is closed would otherwise turn the cap into a loop of
/// accepts and closes on production's core; and a legitimate client whose first bytes are being
/// retransmitted (under a flood the kernel drops handshakes and data) looks idle for a while.
/// Measured under slowloris (tests/bench, scenario 18): with 250 ms, wrk's own connections were
/// sometimes closed before their first request arrived, again and again (0 requests in a run);
/// with 1 s, three runs in three kept 96% of the no-attack throughput.
const EVICT_MIN_IDLE: Duration = Duration::from_secs(1);
/// How long a connection asked to close gracefully (idle HTTP/2, evicted) gets before it is cut.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Why the agent closed a client connection itself.
#[derive(Debug, Clone, Copy)]
enum Closed {
    HeaderTimeout,
    IdleTimeout,
    ConnectionLimit,
    Shutdown,
}

impl Closed {
    const ALL: [Closed; 4] = [
        Closed::HeaderTimeout,
        Closed::IdleTimeout,
        Closed::ConnectionLimit,
        Closed::Shutdown,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Closed::HeaderTimeout => "header_timeout",
            Closed::IdleTimeout => "idle_timeout",
            Closed::ConnectionLimit => "connection_limit",
            Closed::Shutdown => "shutdown",
        }
    }
}

/// Why a request was refused before it reached the proxy.
#[derive(Debug, Clone, Copy)]
enum Refused {
    HeaderTimeout,
    HeadTooLarge,
    UriTooLong,
    BadRequest,
}

impl Refused {
    const ALL: [Refused; 4] = [
        Refused::HeaderTimeout,
        Refused::HeadTooLarge,
        Refused::UriTooLong,
        Refused::BadRequest,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Refused::HeaderTimeout => "header_timeout",
            Refused::HeadTooLarge => "head_too_large",
            Refused::UriTooLong => "uri_too_long",
            Refused::BadRequest => "bad_request",
        }
    }

    /// What the client was answered, and which setting says so.
    fn detail(self) -> &'static str {
        match self {
            Refused::HeaderTimeout => {
                "closed: the head did not arrive within limits.header_read_timeout"
            }
            Refused::HeadTooLarge => {
                "431: the head is over limits.max_header_lines or limits.max_header_bytes"
            }
            Refused::UriTooLong => "414: the request target is over 65,534 bytes",
            Refused::BadRequest => "400: a malformed request head",
        }
    }

    /// The refusal a connection's error stands for, if it is one.
    fn of(e: &(dyn std::error::Error + 'static)) -> Option<Refused> {
        let h = hyper_cause(e)?;
        if h.is_parse_too_large() {
            // hyper names the two apart only in its message.
            return Some(if h.to_string().contains("URI") {
                Refused::UriTooLong
            } else {
                Refused::HeadTooLarge
            });
        }
        (h.is_parse() && !h.is_parse_version_h2()).then_some(Refused::BadRequest)
    }
}

/// The listener's counters.
struct IngressMetrics {
    connections: Gauge,
    closed: [Counter; 4],
    refused: [Counter; 4],
    accept_errors: Counter,
    refused_log: Throttle,
    accept_log: Throttle,
}

impl IngressMetrics {
    fn new(registry: &Registry) -> Self {
        Self {
            connections: registry.gauge(CLIENT_CONNECTIONS, "Client connections open", &[]),
            closed: Closed::ALL.map(|c| {
                registry.counter(
                    CLIENT_CONNECTIONS_CLOSED_TOTAL,
                    "Client connections the agent closed itself, by reason",
                    &[("reason", c.as_str())],
                )
            }),
            refused: Refused::ALL.map(|r| {
                registry.counter(
                    REQUESTS_REFUSED_TOTAL,
                    "Requests refused before reaching the proxy (never sent to the primary), by reason",
                    &[("reason", r.as_str())],
                )
            }),
            accept_errors: registry.counter(
                ACCEPT_ERRORS_TOTAL,
                "Failed accepts (out of file descriptors and the like)",
                &[],
            ),
            refused_log: Throttle::named("client requests refused before the primary"),
            accept_log: Throttle::named("accept errors (out of file descriptors)"),
        }
    }

    fn closed(&self, why: Closed) {
        self.closed[why as usize].increment(1);
    }

    fn refused(&self, why: Refused, peer: SocketAddr) {
        self.refused[why as usize].increment(1);
        if let Some(count) = self.refused_log.note() {
            tracing::warn!(
                reason = why.as_str(),
                detail = why.detail(),
                %peer,
                count,
                "client requests refused before reaching the primary (one line a minute at most; see {REQUESTS_REFUSED_TOTAL})"
            );
        }
    }
}

/// What the listener's tasks and the admin view share.
#[derive(Debug, Default)]
pub struct IngressState {
    draining: AtomicBool,
}

impl IngressState {
    /// Whether the agent is draining (shutting down): `/readyz` then says not ready.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

/// When the listener drains, stops and gives up.
#[derive(Debug, Clone)]
pub struct Shutdown {
    /// Fired on SIGTERM: the drain begins.
    pub drain: CancellationToken,
    /// How long the listener goes on accepting after `drain` fired.
    pub drain_time: Duration,
    /// How long requests in flight get once the listener closed.
    pub grace: Duration,
}

/// One client connection, as the watchdog, the service and the registry see it.
struct Conn {
    born: Instant,
    /// Requests whose response has not ended.
    active: AtomicUsize,
    /// Milliseconds since `born` when `active` last fell to 0.
    idle_since: AtomicU64,
    /// Milliseconds since `born`, plus one, of the first byte read with no request in flight:
    /// a request head on its way. 0: none.
    head_started: AtomicU64,
    /// Requests seen.
    served: AtomicU64,
    /// The connection carries HTTP/2.
    http2: AtomicBool,
    /// Asked to close to make room (the connection cap).
    evict: Notify,
    /// Already asked: the next eviction picks another connection.
    evicting: AtomicBool,
    /// Asks the HTTP/1 forwarder ([`h1`]) to close gracefully.
    close: h1::CloseSignal,
}

impl Conn {
    fn new() -> Self {
        Self {
            born: Instant::now(),
            active: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            head_started: AtomicU64::new(0),
            served: AtomicU64::new(0),
            http2: AtomicBool::new(false),
            evict: Notify::new(),
            evicting: AtomicBool::new(false),
            close: h1::CloseSignal::default(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn at(&self, ms: u64) -> Instant {
        self.born + Duration::from_millis(ms)
    }

    fn request_started(&self, version: Version) {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.head_started.store(0, Ordering::Relaxed);
        self.evicting.store(false, Ordering::Relaxed);
        self.served.fetch_add(1, Ordering::Relaxed);
        if version == Version::HTTP_2 {
            self.http2.store(true, Ordering::Relaxed);
        }
    }

    fn request_ended(&self) {
        self.idle_since.store(self.now_ms(), Ordering::Relaxed);
        self.active.fetch_sub(1, Ordering::Relaxed);
    }

    fn is_idle(&self) -> bool {
        self.active.load(Ordering::Relaxed) == 0
    }

    /// What the watchdog should do now, or when to look again.
    fn check(&self, limits: &ClientLimits) -> Verdict {
        if !self.is_idle() {
            // A request in flight: look again later. Nothing wakes the watchdog when it ends, so
            // a head that starts after it is timed from then at the latest (a keep-alive
            // slowloris gets at most twice the header timeout).
            return Verdict::Later(
                Instant::now() + limits.header_read_timeout.min(limits.idle_timeout),
            );
        }
        let head = self.head_started.load(Ordering::Relaxed);
        let served = self.served.load(Ordering::Relaxed);
        let (deadline, verdict) = if head != 0 {
            (
                self.at(head - 1) + limits.header_read_timeout,
                Verdict::HeaderTimeout,
            )
        } else if served == 0 {
            // A new connection must send its first request within the header timeout.
            (
                self.born + limits.header_read_timeout,
                Verdict::HeaderTimeout,
            )
        } else {
            (
                self.at(self.idle_since.load(Ordering::Relaxed)) + limits.idle_timeout,
                Verdict::Idle,
            )
        };
        if Instant::now() >= deadline {
            verdict
        } else {
            Verdict::Later(deadline)
        }
    }

    /// How long the connection has been idle, and whether it ever sent a request: the eviction
    /// order. `None` while a request is in flight.
    fn idle_rank(&self) -> Option<(bool, u64)> {
        if !self.is_idle() || self.evicting.load(Ordering::Relaxed) {
            return None;
        }
        let served = self.served.load(Ordering::Relaxed) > 0;
        let since = if served {
            self.idle_since.load(Ordering::Relaxed)
        } else {
            0
        };
        Some((served, self.now_ms().saturating_sub(since)))
    }
}

enum Verdict {
    Later(Instant),
    HeaderTimeout,
    Idle,
}

/// The open connections, for the cap and eviction.
#[derive(Default)]
struct Open {
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    next_id: AtomicU64,
    /// Woken when a connection ends.
    freed: Notify,
}

impl Open {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn insert(&self, conn: Arc<Conn>) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, conn);
        id
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
        self.freed.notify_waiters();
    }

    fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether more than `cap` connections are open, not counting those asked to close.
    fn over(&self, cap: usize) -> bool {
        let conns = self.lock();
        conns.len() > cap
            && conns.len()
                - conns
                    .values()
                    .filter(|c| c.evicting.load(Ordering::Relaxed))
                    .count()
                > cap
    }

    /// Asks the connection idle the longest (one that never sent a request first) to close, if
    /// it has been idle at least [`EVICT_MIN_IDLE`].
    fn evict_one(&self) -> Eviction {
        let conns = self.lock();
        let victim = conns
            .values()
            .filter_map(|c| c.idle_rank().map(|(served, idle)| (served, idle, c)))
            .min_by_key(|(served, idle, _)| (*served, u64::MAX - *idle));
        let min_idle = u64::try_from(EVICT_MIN_IDLE.as_millis()).unwrap_or(u64::MAX);
        match victim {
            Some((_, idle, c)) if idle >= min_idle => {
                c.evicting.store(true, Ordering::Relaxed);
                c.evict.notify_one();
                Eviction::Asked
            }
            Some((_, idle, _)) => Eviction::NotYet(Duration::from_millis(min_idle - idle)),
            None => Eviction::NoneIdle,
        }
    }
}

/// What [`Open::evict_one`] did.
enum Eviction {
    /// A connection was asked to close.
    Asked,
    /// The longest idle connection will be old enough after this long.
    NotYet(Duration),
    /// Every connection has a request in flight.
    NoneIdle,
}

/// The cap in force: `max_connections`, lowered to what the descriptor limit allows.
fn effective_cap(max_connections: usize) -> usize {
    match fd_soft_limit() {
        Some(fds) => {
            let by_fds =
                usize::try_from(fds.saturating_sub(RESERVED_FDS) / 2).unwrap_or(usize::MAX);
            let cap = by_fds.max(1);
            if cap < max_connections / 2 {
                tracing::warn!(
                    max_connections,
                    open_files_limit = fds,
                    cap,
                    "client connections capped by the open files limit (ulimit -n; two descriptors a connection), well below limits.max_connections: raise the limit to use the configured cap"
                );
            } else if cap < max_connections {
                tracing::info!(
                    max_connections,
                    open_files_limit = fds,
                    cap,
                    "client connections capped by the open files limit (two descriptors a connection)"
                );
            }
            max_connections.min(by_fds.max(1))
        }
        None => max_connections,
    }
}

/// The soft `RLIMIT_NOFILE`, read from `/proc/self/limits` (Linux); `None` elsewhere.
fn fd_soft_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Whether an accept error means the process is out of descriptors.
fn out_of_descriptors(e: &io::Error) -> bool {
    // EMFILE (24) and ENFILE (23) on Linux.
    matches!(e.raw_os_error(), Some(23 | 24))
}

/// Accepts client connections on `listener` and serves them with `front` until the drain is
/// over; see the module documentation for the limits and the drain.
pub async fn serve(
    listener: TcpListener,
    front: Arc<Front>,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: ClientLimits,
    shutdown: Shutdown,
    state: Arc<IngressState>,
    registry: &Registry,
) {
    let metrics = Arc::new(IngressMetrics::new(registry));
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    let mut http1 = builder.http1();
    http1
        .timer(TokioTimer::new())
        // The watchdog times heads and idle periods apart; hyper's timer would run across both.
        .header_read_timeout(None)
        .preserve_header_case(true)
        .auto_date_header(false)
        .max_buf_size(limits.max_header_bytes.max(MIN_MAX_HEADER_BYTES));
    if limits.max_header_lines != HYPER_MAX_HEADERS {
        http1.max_headers(limits.max_header_lines);
    }
    builder
        .http2()
        .timer(TokioTimer::new())
        .auto_date_header(false)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    // A connection the HTTP/1 forwarder served requests on stays HTTP/1 when hyper takes it.
    let builders = Arc::new(Builders {
        http1_only: builder.clone().http1_only(),
        auto: builder,
    });
    let cap = effective_cap(limits.max_connections);
    let conns = Arc::new(Open::default());
    let tracker = TaskTracker::new();
    // Fired when the drain time is over: the listener closes and idle connections with it.
    let stop = CancellationToken::new();
    // Fired when the grace period is over too: whatever is left is cut.
    let cut = CancellationToken::new();
    let local = listener.local_addr().ok();
    let mut backoff = Duration::from_millis(10);
    let drain_over = {
        let shutdown = shutdown.clone();
        async move {
            shutdown.drain.cancelled().await;
            tokio::time::sleep(shutdown.drain_time).await;
        }
    };
    let mut drain_over = pin!(drain_over);
    let mut drain_seen = false;
    loop {
        if !drain_seen && shutdown.drain.is_cancelled() {
            drain_seen = true;
            state.draining.store(true, Ordering::Relaxed);
            tracing::info!(drain_time = ?shutdown.drain_time, "draining: still serving, /readyz says not ready, clients are asked to reconnect");
        }
        if conns.over(cap) {
            // A newcomer took a place over the cap: make room for it, or wait (new clients wait
            // in the backlog) until a connection ends or the longest idle one may be closed.
            // Nothing is closed while no one is waiting. Connections asked to close count as
            // gone, so the next newcomer is taken at once (the cap is exceeded only by those
            // still closing). The wait is registered before looking, so no end is missed.
            let freed = conns.freed.notified();
            let mut freed = pin!(freed);
            freed.as_mut().enable();
            let wait = match conns.evict_one() {
                Eviction::Asked => continue,
                Eviction::NotYet(wait) => wait,
                // A busy connection that falls idle wakes nothing: look again soon.
                Eviction::NoneIdle => EVICT_MIN_IDLE,
            };
            tokio::select! {
                () = freed => {}
                () = tokio::time::sleep(wait) => {}
                () = shutdown.drain.cancelled(), if !drain_seen => {}
                () = &mut drain_over => break,
            }
            continue;
        }
        let accepted = tokio::select! {
            () = &mut drain_over => break,
            // Noted at the top of the loop.
            () = shutdown.drain.cancelled(), if !drain_seen => continue,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => {
                backoff = Duration::from_millis(10);
                pair
            }
            Err(e) => {
                metrics.accept_errors.increment(1);
                let starved = out_of_descriptors(&e);
                if starved {
                    let _ = conns.evict_one();
                }
                if let Some(count) = metrics.accept_log.note() {
                    tracing::warn!(error = %e, count, open = conns.len(), "accept failed; backing off (one line a minute at most; see {ACCEPT_ERRORS_TOTAL})");
                }
                // Every accept error backs off (ENOBUFS, ENOMEM and the like would spin too).
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let conn = Arc::new(Conn::new());
        let id = conns.insert(conn.clone());
        metrics.connections.increment(1.0);
        let task = Connection {
            conn,
            front: front.clone(),
            peer,
            tls: acceptor.is_some(),
            limits,
            metrics: metrics.clone(),
            state: state.clone(),
            drain: shutdown.drain.clone(),
            stop: stop.clone(),
            cut: cut.clone(),
        };
        let acceptor = acceptor.clone();
        let builders = builders.clone();
        let conns = conns.clone();
        let metrics = metrics.clone();
        tracker.spawn(
            async move {
                // Leaves the registry however the task ends (a panic included).
                let _slot = Slot { conns, id, metrics };
                match acceptor {
                    None => task.run(&builders, stream).await,
                    Some(acceptor) => {
                        let handshake =
                            tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream));
                        let conn = task.conn.clone();
                        let metrics = task.metrics.clone();
                        tokio::select! {
                            done = handshake => match done {
                                Ok(Ok(stream)) => task.run(&builders, stream).await,
                                Ok(Err(e)) => tracing::debug!(error = %e, "client TLS handshake failed"),
                                Err(_) => tracing::debug!("client TLS handshake timed out"),
                            },
                            // At the cap, a handshake under way is as idle as a silent client.
                            () = conn.evict.notified() => metrics.closed(Closed::ConnectionLimit),
                        }
                    }
                }
            }
            .instrument(tracing::debug_span!("client", %peer, local = ?local)),
        );
    }
    drop(listener);
    state.draining.store(true, Ordering::Relaxed);
    stop.cancel();
    tracker.close();
    let open = conns.len();
    if open > 0 {
        tracing::info!(open, grace = ?shutdown.grace, "listener closed; waiting for requests in flight");
    }
    if tokio::time::timeout(shutdown.grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?shutdown.grace, open = conns.len(), "client connections still open after the grace period; closing them");
        cut.cancel();
        tracker.wait().await;
    }
}

/// hyper's servers: HTTP/1 or HTTP/2 as the client speaks, or HTTP/1 only (a connection the
/// HTTP/1 forwarder served requests on, which cannot turn HTTP/2 halfway).
struct Builders {
    auto: auto::Builder<TokioExecutor>,
    http1_only: auto::Builder<TokioExecutor>,
}

/// A connection's place in the registry and the gauge, given back on drop.
struct Slot {
    conns: Arc<Open>,
    id: u64,
    metrics: Arc<IngressMetrics>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.conns.remove(self.id);
        self.metrics.connections.decrement(1.0);
    }
}

/// One accepted connection's task.
struct Connection {
    conn: Arc<Conn>,
    front: Arc<Front>,
    peer: SocketAddr,
    /// The client came over `listen_tls`.
    tls: bool,
    limits: ClientLimits,
    metrics: Arc<IngressMetrics>,
    state: Arc<IngressState>,
    drain: CancellationToken,
    stop: CancellationToken,
    cut: CancellationToken,
}

impl Connection {
    async fn run<IO>(self, builders: &Builders, io: IO)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Connection {
            conn,
            front,
            peer,
            tls,
            limits,
            metrics,
            state,
            drain,
            stop,
            cut,
        } = self;
        let client = Arc::new(Peer::new(peer, tls));
        let watchdog = Watchdog {
            conn: &conn,
            limits,
            metrics: &metrics,
            peer,
            drain: &drain,
            stop: &stop,
            cut: &cut,
        };
        let io = Watched {
            io,
            conn: conn.clone(),
            read: Bytes::new(),
        };
        let mut seen = Seen::default();
        // Plain HTTP/1.1 requests are forwarded without hyper until one is not: hyper then
        // serves the rest of the connection.
        let io = match front.h1_proxy() {
            Some(proxy) => {
                let hooks = Hooks {
                    conn: &conn,
                    state: &state,
                };
                let forwarder = h1::serve(proxy, io, &client, &hooks);
                let served = pin!(graceful(forwarder, |_| conn.close.ask()));
                match watchdog.run(served, &mut seen).await {
                    Some(Ended::Handoff { read, mut io }) => {
                        io.read = read;
                        io
                    }
                    Some(Ended::Closed) | None => return,
                }
            }
            None => io,
        };
        let service = {
            let conn = conn.clone();
            service_fn(move |req: Request<Incoming>| {
                let front = front.clone();
                let conn = conn.clone();
                let state = state.clone();
                let client = client.clone();
                async move {
                    let version = req.version();
                    conn.request_started(version);
                    let guard = Active(conn);
                    let mut resp = front.handle(req, &client).await;
                    let upgrading = resp.status() == http::StatusCode::SWITCHING_PROTOCOLS;
                    if version < Version::HTTP_2 && state.is_draining() && !upgrading {
                        // Ask the client to reconnect (elsewhere) after this response.
                        resp.headers_mut()
                            .insert(header::CONNECTION, HeaderValue::from_static("close"));
                    }
                    Ok::<_, Infallible>(resp.map(|body| Tracked { body, guard }))
                }
            })
        };
        let builder = if conn.served.load(Ordering::Relaxed) > 0 {
            &builders.http1_only
        } else {
            &builders.auto
        };
        let served = pin!(graceful(
            builder.serve_connection_with_upgrades(TokioIo::new(io), service),
            |served| served.graceful_shutdown(),
        ));
        if let Some(Err(e)) = watchdog.run(served, &mut seen).await {
            match Refused::of(e.as_ref()) {
                Some(why) => metrics.refused(why, peer),
                None => tracing::debug!(error = %e, "client connection ended with an error"),
            }
        }
    }
}

/// What the HTTP/1 forwarder tells the connection's registry entry.
struct Hooks<'a> {
    conn: &'a Conn,
    state: &'a IngressState,
}

impl h1::Hooks for Hooks<'_> {
    fn request_started(&self) {
        self.conn.request_started(Version::HTTP_11);
    }

    fn request_ended(&self) {
        self.conn.request_ended();
    }

    fn draining(&self) -> bool {
        self.state.is_draining()
    }

    fn close(&self) -> &h1::CloseSignal {
        &self.conn.close
    }
}

pin_project_lite::pin_project! {
    /// A connection's server (hyper's, or the HTTP/1 forwarder) and how to ask it to close
    /// gracefully: what the watchdog drives.
    struct Graceful<F, G> {
        #[pin]
        served: F,
        shutdown: G,
    }
}

fn graceful<F: Future, G: FnMut(Pin<&mut F>)>(served: F, shutdown: G) -> Graceful<F, G> {
    Graceful { served, shutdown }
}

impl<F: Future, G: FnMut(Pin<&mut F>)> Future for Graceful<F, G> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.project().served.poll(cx)
    }
}

impl<F: Future, G: FnMut(Pin<&mut F>)> Graceful<F, G> {
    fn graceful_shutdown(self: Pin<&mut Self>) {
        let this = self.project();
        (this.shutdown)(this.served);
    }
}

/// What a connection's watchdog has acted on, carried from the HTTP/1 forwarder to hyper when
/// one hands the connection to the other.
#[derive(Debug, Default)]
struct Seen {
    /// Asked to close gracefully, and cut if still open at this time.
    closing: Option<Instant>,
    drain: bool,
    stop: bool,
}

/// Times a connection's heads and idle periods, and closes it on eviction, drain and shutdown.
struct Watchdog<'a> {
    conn: &'a Conn,
    limits: ClientLimits,
    metrics: &'a IngressMetrics,
    peer: SocketAddr,
    drain: &'a CancellationToken,
    stop: &'a CancellationToken,
    cut: &'a CancellationToken,
}

impl Watchdog<'_> {
    /// Drives `served` to its end (`Some`), or until the connection is to be dropped (`None`).
    /// `seen` carries what was already acted on from one server of the connection to the next.
    async fn run<F: Future, G: FnMut(Pin<&mut F>)>(
        &self,
        mut served: Pin<&mut Graceful<F, G>>,
        seen: &mut Seen,
    ) -> Option<F::Output> {
        let Watchdog {
            conn,
            limits,
            metrics,
            peer,
            drain,
            stop,
            cut,
        } = self;
        let Seen {
            closing,
            drain: drain_seen,
            stop: stop_seen,
        } = seen;
        loop {
            let wake = match conn.check(limits) {
                Verdict::Later(at) => closing
                    .as_ref()
                    .copied()
                    .filter(|c| *c > Instant::now())
                    .map_or(at, |c| c.min(at)),
                Verdict::HeaderTimeout => {
                    metrics.closed(Closed::HeaderTimeout);
                    if conn.head_started.load(Ordering::Relaxed) != 0 {
                        metrics.refused(Refused::HeaderTimeout, *peer);
                    }
                    return None;
                }
                Verdict::Idle if closing.is_none() => {
                    metrics.closed(Closed::IdleTimeout);
                    served.as_mut().graceful_shutdown();
                    let at = Instant::now() + CLOSE_GRACE;
                    *closing = Some(at);
                    at
                }
                Verdict::Idle => closing.unwrap_or_else(Instant::now),
            };
            // Asked to close while idle and still open after the grace: cut it, unless a request
            // slipped in meanwhile (it finishes first; the watchdog looks again later).
            if closing.is_some_and(|c| Instant::now() >= c) && conn.is_idle() {
                return None;
            }
            tokio::select! {
                result = served.as_mut() => return Some(result),
                () = tokio::time::sleep_until(wake) => {}
                () = conn.evict.notified() => {
                    if !conn.is_idle() {
                        // A request started since: it stays, and may be picked again.
                        conn.evicting.store(false, Ordering::Relaxed);
                    } else {
                        metrics.closed(Closed::ConnectionLimit);
                        if conn.served.load(Ordering::Relaxed) == 0 || conn.head_started.load(Ordering::Relaxed) != 0 {
                            return None;
                        }
                        served.as_mut().graceful_shutdown();
                        closing.get_or_insert(Instant::now() + CLOSE_GRACE);
                    }
                }
                () = drain.cancelled(), if !*drain_seen => {
                    *drain_seen = true;
                    // HTTP/2 gets GOAWAY now; an HTTP/1 request in flight gets `Connection:
                    // close`; an idle HTTP/1 connection is left for its next response to close.
                    if conn.http2.load(Ordering::Relaxed) || !conn.is_idle() {
                        served.as_mut().graceful_shutdown();
                    }
                }
                () = stop.cancelled(), if !*stop_seen => {
                    *stop_seen = true;
                    if conn.served.load(Ordering::Relaxed) == 0 && conn.is_idle() {
                        metrics.closed(Closed::Shutdown);
                        return None;
                    }
                    served.as_mut().graceful_shutdown();
                }
                () = cut.cancelled() => {
                    metrics.closed(Closed::Shutdown);
                    return None;
                }
            }
        }
    }
}

/// Marks a request as in flight until its response body is dropped (sent, or abandoned).
struct Active(Arc<Conn>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.request_ended();
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted as in flight.
    struct Tracked {
        #[pin]
        body: ProxyBody,
        guard: Active,
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = <ProxyBody as Body>::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A client socket that notes when a request head starts arriving, and gives the bytes the
/// HTTP/1 forwarder read but did not serve to hyper first.
struct Watched<IO> {
    io: IO,
    conn: Arc<Conn>,
    /// Read already (and noted then), to be read again.
    read: Bytes,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Watched<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read[..n]);
            bytes::Buf::advance(&mut self.read, n);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        // HTTP/2 connections read frames between requests (PING, WINDOW_UPDATE, SETTINGS): only
        // an HTTP/1 connection's bytes there are a request head on its way.
        if buf.filled().len() > before
            && self.conn.is_idle()
            && !self.conn.http2.load(Ordering::Relaxed)
            && self.conn.head_started.load(Ordering::Relaxed) == 0
        {
            let now = self.conn.now_ms().saturating_add(1);
            self.conn.head_started.store(now, Ordering::Relaxed);
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_descriptor_limit_is_read() {
        // Linux CI: /proc is there and the limit is a number.
        if std::path::Path::new("/proc/self/limits").exists() {
            assert!(fd_soft_limit().is_some_and(|n| n > 0));
        }
    }

    #[tokio::test]
    async fn a_silent_new_connection_times_out_as_a_header_timeout() {
        tokio::time::pause();
        let conn = Conn::new();
        let limits = ClientLimits {
            header_read_timeout: Duration::from_secs(30),
            ..ClientLimits::default()
        };
        assert!(matches!(conn.check(&limits), Verdict::Later(_)));
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(matches!(conn.check(&limits), Verdict::HeaderTimeout));
    }

    #[tokio::test]
    async fn a_served_connection_idles_out_and_is_evicted_first_by_age() {
        tokio::time::pause();
        let limits = ClientLimits {
            idle_timeout: Duration::from_secs(60),
            ..ClientLimits::default()
        };
        let conn = Conn::new();
        conn.request_started(Version::HTTP_11);
        assert!(
            conn.idle_rank().is_none(),
            "busy connections are never evicted"
        );
        tokio::time::advance(Duration::from_secs(100)).await;
        assert!(
            matches!(conn.check(&limits), Verdict::Later(_)),
            "busy: not idle"
        );
        conn.request_ended();
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(matches!(conn.check(&limits), Verdict::Later(_)));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(matches!(conn.check(&limits), Verdict::Idle));
        let fresh = Conn::new();
        assert!(
            fresh.idle_rank() < conn.idle_rank(),
            "a connection that never sent a request goes first"
        );
    }
}
