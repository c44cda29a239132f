//! The raw TCP tee (`tcp:` listeners): a byte-stream proxy to a primary for protocols that are not
//! HTTP (Redis, Thrift, Dubbo...), copying the client-to-server bytes of sampled connections to
//! the gateway, where they are replayed on a fresh connection.
//!
//! ```text
//! client ──▶ read ──┬──────────────────────────▶ write ──▶ primary
//!                   └─try_send─▶ queue ─▶ copy task ─▶ QUIC stream: TCP_OPEN TCP_DATA… FIN
//! client ◀──────────────────────────────────────────────── primary
//! ```
//!
//! **Production never waits.** The proxy hands each chunk it read to the connection's copy without
//! waiting, on a queue bounded in bytes ([`crate::config::TcpListenerConfig::buffer_bytes`], each
//! chunk counting [`CHUNK_OVERHEAD`] more for its bookkeeping); the copy task does all the
//! waiting (opening the stream, QUIC flow control, the gateway's `ACK`) and sends what piled up
//! meanwhile as one `TCP_DATA` frame of up to [`COALESCE_BYTES`], so a client that writes in
//! small pieces costs a frame per send, not per read. A copy that falls further behind than its
//! buffer is given up (its stream reset with [`codes::ABANDONED`]) and the client's connection
//! goes on untouched.
//!
//! **Ordered and whole.** One QUIC stream per teed connection carries its bytes in order; the end
//! of the client's side finishes the stream, and the gateway's `ACK` says it took it all. The TLS
//! over TCP transport has no streams, so a connection teed while only TLS links are up is counted
//! `no_quic_link`.
//!
//! **Every connection is accounted for**, per listener:
//!
//! ```text
//! teeway_agent_tcp_connections_total = teeway_agent_tcp_not_sampled_total
//!                                    + teeway_agent_tcp_teed_total
//!                                    + sum(teeway_agent_tcp_tee_dropped_total{reason})
//!                                    + teeway_agent_tcp_tee_in_flight
//! ```
//!
//! A sampled connection's [`Outcome`] is resolved once, when its copy ends; one dropped unresolved
//! (a task aborted) counts as `shutdown`.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use metrics::{Counter, Gauge};
use quinn::VarInt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use teeway_runtime::connect::UpstreamConnector;
use teeway_runtime::dns::Resolver;
use teeway_runtime::logging::Throttle;
use teeway_runtime::metrics::Registry;
use teeway_wire::{codes, Frame, TcpOpen};

use crate::config::TcpListenerConfig;
use crate::uplink::{NoQuicLink, UplinkState};

/// Largest read from a client at once: one `TCP_DATA` frame.
pub const READ_SIZE: usize = 16 * 1024;
/// Time allowed to connect to the primary.
const PRIMARY_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// After the client's side ended, time allowed for the gateway's `ACK`.
const ACK_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest reply read on a tee stream (one `ACK`).
const MAX_REPLY_BYTES: usize = 1024;

/// Connections seen by a `tcp:` listener.
pub const CONNECTIONS_TOTAL: &str = "teeway_agent_tcp_connections_total";
/// Connections the listener's `percentage` passed over.
pub const NOT_SAMPLED_TOTAL: &str = "teeway_agent_tcp_not_sampled_total";
/// Connections whose client-to-server bytes the gateway acknowledged whole.
pub const TEED_TOTAL: &str = "teeway_agent_tcp_teed_total";
/// Sampled connections whose copy was given up, by reason.
pub const TEE_DROPPED_TOTAL: &str = "teeway_agent_tcp_tee_dropped_total";
/// Sampled connections whose copy is under way.
pub const TEE_IN_FLIGHT: &str = "teeway_agent_tcp_tee_in_flight";
/// Client-to-server bytes proxied to the primary.
pub const BYTES_TOTAL: &str = "teeway_agent_tcp_bytes_total";
/// Bytes of the connections counted in `teeway_agent_tcp_teed_total`.
pub const TEED_BYTES_TOTAL: &str = "teeway_agent_tcp_teed_bytes_total";
/// Connections closed because the primary could not be reached.
pub const PRIMARY_ERRORS_TOTAL: &str = "teeway_agent_tcp_primary_errors_total";

/// Why a sampled connection's copy was given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpDropReason {
    /// `max_teed_connections` copies were under way already.
    ConnectionLimit,
    /// No gateway link was up when the connection opened.
    NoUplink,
    /// Links were up, but only over TLS on TCP (no streams).
    NoQuicLink,
    /// The primary could not be reached: the client got no service and there is nothing to copy.
    PrimaryError,
    /// The copy fell more than `buffer_bytes` behind the client.
    BufferFull,
    /// The gateway connection failed before it acknowledged the copy.
    UplinkError,
    /// The gateway refused the stream (no route, no capacity) or acknowledged none of it.
    Rejected,
    /// The agent stopped before the copy was acknowledged.
    Shutdown,
}

impl TcpDropReason {
    const ALL: [TcpDropReason; 8] = [
        TcpDropReason::ConnectionLimit,
        TcpDropReason::NoUplink,
        TcpDropReason::NoQuicLink,
        TcpDropReason::PrimaryError,
        TcpDropReason::BufferFull,
        TcpDropReason::UplinkError,
        TcpDropReason::Rejected,
        TcpDropReason::Shutdown,
    ];

    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            TcpDropReason::ConnectionLimit => "connection_limit",
            TcpDropReason::NoUplink => "no_uplink",
            TcpDropReason::NoQuicLink => "no_quic_link",
            TcpDropReason::PrimaryError => "primary_error",
            TcpDropReason::BufferFull => "buffer_full",
            TcpDropReason::UplinkError => "uplink_error",
            TcpDropReason::Rejected => "rejected",
            TcpDropReason::Shutdown => "shutdown",
        }
    }
}

/// One listener's counters (label `listener`).
struct TcpMetrics {
    connections: Counter,
    not_sampled: Counter,
    teed: Counter,
    dropped: [Counter; 8],
    drop_logs: [Throttle; 8],
    in_flight: Gauge,
    bytes: Counter,
    teed_bytes: Counter,
    primary_errors: Counter,
    primary_error_log: Throttle,
}

impl TcpMetrics {
    fn new(registry: &Registry, listener: &str) -> Self {
        let one = |name, help| registry.counter_owned(name, help, "listener", listener);
        Self {
            connections: one(CONNECTIONS_TOTAL, "Connections seen by a tcp listener"),
            not_sampled: one(
                NOT_SAMPLED_TOTAL,
                "Connections the tcp listener's percentage passed over",
            ),
            teed: one(
                TEED_TOTAL,
                "Connections whose client bytes the gateway acknowledged whole",
            ),
            dropped: TcpDropReason::ALL.map(|r| {
                registry.counter_labels(
                    TEE_DROPPED_TOTAL,
                    "Sampled connections whose copy was given up, by reason",
                    &[
                        ("listener", listener.to_owned()),
                        ("reason", r.as_str().to_owned()),
                    ],
                )
            }),
            drop_logs: TcpDropReason::ALL.map(|r| {
                Throttle::named(format!(
                    "TCP tee copies dropped on listener {listener} ({})",
                    r.as_str()
                ))
            }),
            in_flight: registry.gauge_owned(
                TEE_IN_FLIGHT,
                "Sampled connections whose copy is under way",
                &[("listener", listener.to_owned())],
            ),
            bytes: one(BYTES_TOTAL, "Client-to-server bytes proxied to the primary"),
            teed_bytes: one(TEED_BYTES_TOTAL, "Bytes of the connections counted as teed"),
            primary_errors: one(
                PRIMARY_ERRORS_TOTAL,
                "Connections closed because the primary could not be reached",
            ),
            primary_error_log: Throttle::named(format!(
                "TCP primary connections failed on listener {listener}"
            )),
        }
    }

    fn dropped(&self, listener: &str, reason: TcpDropReason) {
        self.dropped[reason as usize].increment(1);
        if let Some(dropped) = self.drop_logs[reason as usize].note() {
            tracing::warn!(
                %listener,
                reason = reason.as_str(),
                dropped,
                "TCP connection copies given up (one line a minute at most per reason; see {TEE_DROPPED_TOTAL})"
            );
        }
    }
}

/// One `tcp:` listener: its settings, limits and counters.
pub struct TcpTee {
    config: TcpListenerConfig,
    cluster: String,
    /// Connects to `primary` (plain TCP).
    primary: UpstreamConnector,
    uplink: Arc<UplinkState>,
    /// One permit per copy under way (`max_teed_connections`).
    slots: Arc<Semaphore>,
    /// Bytes a copy may hold (`buffer_bytes`).
    buffer_bytes: u64,
    metrics: TcpMetrics,
    next_id: AtomicU64,
}

impl std::fmt::Debug for TcpTee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpTee")
            .field("name", &self.config.name)
            .finish_non_exhaustive()
    }
}

impl TcpTee {
    /// A listener's tee; its metrics are registered in `registry` at once.
    pub fn new(
        config: TcpListenerConfig,
        cluster: &str,
        resolver: Resolver,
        uplink: Arc<UplinkState>,
        registry: &Registry,
    ) -> Self {
        Self {
            buffer_bytes: config.buffer_bytes,
            metrics: TcpMetrics::new(registry, &config.name),
            slots: Arc::new(Semaphore::new(config.max_teed_connections)),
            cluster: cluster.to_owned(),
            primary: UpstreamConnector::new(
                &config.primary.0,
                config.primary.1,
                resolver,
                PRIMARY_CONNECT_TIMEOUT,
                None,
            ),
            uplink,
            // Connection numbers start at a random point so that agents sharing a certificate
            // (replicas of one Deployment) seldom reuse one in the gateway's logs.
            next_id: AtomicU64::new(fastrand::u64(..) >> 16),
            config,
        }
    }

    /// The listener's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    fn sampled(&self) -> bool {
        let pct = self.config.percentage;
        pct >= 100.0 || (pct > 0.0 && fastrand::f64() * 100.0 < pct)
    }

    /// Decides whether connection `id` is teed and, if so, starts its copy task.
    fn start_copy(self: &Arc<Self>, id: u64, tasks: &TaskTracker) -> Option<CopyFeed> {
        if !self.sampled() {
            self.metrics.not_sampled.increment(1);
            return None;
        }
        let outcome = Outcome::new(self.clone());
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            outcome.dropped(TcpDropReason::ConnectionLimit);
            return None;
        };
        let conn = match self.uplink.quic_link(id) {
            Ok(conn) => conn,
            Err(NoQuicLink::NoLink) => {
                outcome.dropped(TcpDropReason::NoUplink);
                return None;
            }
            Err(NoQuicLink::TlsOnly) => {
                outcome.dropped(TcpDropReason::NoQuicLink);
                return None;
            }
        };
        let open = TcpOpen {
            id,
            opened_at_unix_nanos: teeway_wire::record::unix_nanos(SystemTime::now()),
            source_cluster: self.cluster.clone(),
            listener: self.config.name.clone(),
        };
        let (queue, queue_rx) = mpsc::unbounded_channel();
        let abandon = Abandon::default();
        let backlog = Arc::new(Backlog::new(self.buffer_bytes));
        tasks.spawn(run_copy(
            conn,
            open,
            Feed {
                queue: queue_rx,
                backlog: backlog.clone(),
            },
            abandon.clone(),
            outcome,
            permit,
        ));
        Some(CopyFeed {
            queue,
            backlog,
            abandon,
        })
    }

    async fn connect_primary(&self) -> io::Result<TcpStream> {
        self.primary.connect_tcp().await
    }
}

/// A sampled connection's accounting: resolved once, `shutdown` if dropped unresolved.
struct Outcome {
    tee: Arc<TcpTee>,
    bytes: u64,
    resolved: bool,
}

impl Outcome {
    fn new(tee: Arc<TcpTee>) -> Self {
        tee.metrics.in_flight.increment(1.0);
        Self {
            tee,
            bytes: 0,
            resolved: false,
        }
    }

    // Counted before it leaves `in_flight`: a scrape reads counters before gauges, so this order
    // keeps the window in which it shows in neither as short as it can be.
    fn teed(mut self) {
        self.resolved = true;
        self.tee.metrics.teed.increment(1);
        self.tee.metrics.teed_bytes.increment(self.bytes);
        self.tee.metrics.in_flight.decrement(1.0);
    }

    fn dropped(mut self, reason: TcpDropReason) {
        self.resolve_dropped(reason);
    }

    fn resolve_dropped(&mut self, reason: TcpDropReason) {
        self.resolved = true;
        self.tee.metrics.dropped(&self.tee.config.name, reason);
        self.tee.metrics.in_flight.decrement(1.0);
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        if !self.resolved {
            self.resolve_dropped(TcpDropReason::Shutdown);
        }
    }
}

/// Tells a copy task to give up, and why (set before the token fires).
#[derive(Clone, Default)]
struct Abandon {
    token: CancellationToken,
    reason: Arc<OnceLock<TcpDropReason>>,
}

impl Abandon {
    fn now(&self, reason: TcpDropReason) {
        let _ = self.reason.set(reason);
        self.token.cancel();
    }

    fn reason(&self) -> TcpDropReason {
        self.reason
            .get()
            .copied()
            .unwrap_or(TcpDropReason::Shutdown)
    }
}

/// What a copy may hold beside a chunk's bytes, counted against `buffer_bytes` with them (its
/// place in the queue and its `Bytes` handle): a client writing a byte at a time cannot make a
/// copy hold much more than `buffer_bytes`.
pub const CHUNK_OVERHEAD: u64 = 64;

/// Most client bytes a copy sends as one `TCP_DATA` frame when they piled up while it waited.
pub const COALESCE_BYTES: usize = 64 * 1024;

/// The bytes a copy holds and has not handed to QUIC yet, against its `buffer_bytes`.
#[derive(Debug)]
struct Backlog {
    held: AtomicU64,
    limit: u64,
}

impl Backlog {
    fn new(limit: u64) -> Self {
        Self {
            held: AtomicU64::new(0),
            limit,
        }
    }

    /// What a chunk of `len` bytes holds.
    fn cost(len: usize) -> u64 {
        len as u64 + CHUNK_OVERHEAD
    }

    /// Takes room for `cost`; `false` (and nothing taken) when it would pass the limit.
    fn take(&self, cost: u64) -> bool {
        let before = self.held.fetch_add(cost, Ordering::Relaxed);
        if before + cost > self.limit {
            self.held.fetch_sub(cost, Ordering::Relaxed);
            return false;
        }
        true
    }

    fn give_back(&self, cost: u64) {
        self.held.fetch_sub(cost, Ordering::Relaxed);
    }
}

/// The proxy's end of a connection's copy.
struct CopyFeed {
    queue: mpsc::UnboundedSender<Bytes>,
    backlog: Arc<Backlog>,
    abandon: Abandon,
}

/// The copy task's end.
struct Feed {
    queue: mpsc::UnboundedReceiver<Bytes>,
    backlog: Arc<Backlog>,
}

impl Feed {
    /// The next bytes to send: a chunk, or (when more piled up) as many chunks as are queued,
    /// up to [`COALESCE_BYTES`], joined. `None` when the proxy is done with the copy.
    async fn next(&mut self) -> Option<Bytes> {
        let first = self.queue.recv().await?;
        let mut cost = Backlog::cost(first.len());
        let mut joined: Option<BytesMut> = None;
        while joined.as_ref().map_or(first.len(), BytesMut::len) < COALESCE_BYTES {
            let Ok(more) = self.queue.try_recv() else {
                break;
            };
            cost += Backlog::cost(more.len());
            joined
                .get_or_insert_with(|| {
                    let mut b = BytesMut::with_capacity(COALESCE_BYTES.max(first.len()));
                    b.extend_from_slice(&first);
                    b
                })
                .extend_from_slice(&more);
        }
        // Handed over: from here QUIC's flow control bounds what waits.
        self.backlog.give_back(cost);
        Some(joined.map_or(first, BytesMut::freeze))
    }
}

/// Offers `chunk` to the copy without waiting; a copy too far behind is given up.
fn offer(copy: &mut Option<CopyFeed>, chunk: &Bytes) {
    let Some(c) = copy else { return };
    if !c.backlog.take(Backlog::cost(chunk.len())) {
        c.abandon.now(TcpDropReason::BufferFull);
        *copy = None;
        return;
    }
    // Closed: the copy task ended on its own (refused, link lost) and resolved itself.
    if c.queue.send(chunk.clone()).is_err() {
        *copy = None;
    }
}

/// Serves `listener` until `shutdown`; then lets connections finish for up to `grace`, and cuts
/// those still open (their copies count as `shutdown`).
pub async fn serve(
    listener: TcpListener,
    tee: Arc<TcpTee>,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let name = tee.name().to_owned();
    accept(listener, &name, shutdown, grace, |client, tasks, cut| {
        tasks.spawn(serve_connection(
            tee.clone(),
            client,
            tasks.clone(),
            cut.clone(),
        ));
    })
    .await;
}

/// A `tcp:` or `rpc:` listener's accept loop: each client (`TCP_NODELAY` set) is handed to
/// `serve`, with the tasks it may spawn on and the token that cuts them. Ends at `shutdown`; then
/// lets connections finish for up to `grace`, and cuts those still open.
pub(crate) async fn accept(
    listener: TcpListener,
    name: &str,
    shutdown: CancellationToken,
    grace: Duration,
    mut serve: impl FnMut(TcpStream, &TaskTracker, &CancellationToken),
) {
    let tasks = TaskTracker::new();
    let cut = CancellationToken::new();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((client, _)) => {
                let _ = client.set_nodelay(true);
                serve(client, &tasks, &cut);
            }
            Err(e) => {
                // Out of file descriptors and the like: wait a little rather than spin.
                tracing::warn!(listener = %name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    drop(listener);
    tasks.close();
    if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
        tracing::warn!(listener = %name, "connections still open after the grace period; closing them");
        cut.cancel();
        tasks.wait().await;
    }
}

async fn serve_connection(
    tee: Arc<TcpTee>,
    client: TcpStream,
    tasks: TaskTracker,
    cut: CancellationToken,
) {
    tee.metrics.connections.increment(1);
    let id = tee.next_id.fetch_add(1, Ordering::Relaxed);
    let copy = tee.start_copy(id, &tasks);
    let primary = tokio::select! {
        () = cut.cancelled() => return,
        primary = tokio::time::timeout(PRIMARY_CONNECT_TIMEOUT, tee.connect_primary()) => primary,
    };
    let primary = match primary {
        Ok(Ok(primary)) => primary,
        failed => {
            let error = match failed {
                Ok(Err(e)) => e.to_string(),
                _ => "connect timed out".to_owned(),
            };
            tee.metrics.primary_errors.increment(1);
            if let Some(failed) = tee.metrics.primary_error_log.note() {
                tracing::warn!(listener = %tee.name(), %error, failed, "cannot reach the TCP primary; closing the client's connection (one line a minute at most)");
            }
            if let Some(copy) = copy {
                copy.abandon.now(TcpDropReason::PrimaryError);
            }
            return;
        }
    };
    let _ = primary.set_nodelay(true);
    let abandon = copy.as_ref().map(|c| c.abandon.clone());
    tokio::select! {
        () = cut.cancelled() => {
            if let Some(abandon) = abandon {
                abandon.now(TcpDropReason::Shutdown);
            }
        }
        () = proxy(&tee, client, primary, copy) => {}
    }
}

/// Joins the client and the primary, offering what the client sends to `copy`. Ends when the
/// primary's side is done (after the client's, normally), or at the first error.
async fn proxy(tee: &TcpTee, client: TcpStream, primary: TcpStream, mut copy: Option<CopyFeed>) {
    let (mut client_rd, client_wr) = client.into_split();
    let (primary_rd, mut primary_wr) = primary.into_split();
    let upstream = async {
        let mut buf = BytesMut::new();
        loop {
            buf.reserve(READ_SIZE);
            let n = match (&mut client_rd)
                .take(READ_SIZE as u64)
                .read_buf(&mut buf)
                .await
            {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let chunk = buf.split().freeze();
            tee.metrics.bytes.increment(n as u64);
            offer(&mut copy, &chunk);
            if primary_wr.write_all(&chunk).await.is_err() {
                break;
            }
        }
        // The client's side is over: the copy is whole (finishing its stream), and the primary
        // is told with a half-close, as the client told us.
        drop(copy);
        let _ = primary_wr.shutdown().await;
    };
    answer_beside(upstream, primary_rd, client_wr).await;
}

/// Runs `upstream` (the client's side of a proxied connection) beside the copy of the primary's
/// answers to the client. Ends when the primary's side is done: after the client's, normally; the
/// primary first ends the connection (the client has its answer).
pub(crate) async fn answer_beside(
    upstream: impl std::future::Future<Output = ()>,
    mut primary_rd: tokio::net::tcp::OwnedReadHalf,
    mut client_wr: tokio::net::tcp::OwnedWriteHalf,
) {
    let downstream = async {
        let _ = tokio::io::copy(&mut primary_rd, &mut client_wr).await;
        let _ = client_wr.shutdown().await;
    };
    tokio::pin!(upstream, downstream);
    tokio::select! {
        () = &mut upstream => downstream.await,
        () = &mut downstream => {}
    }
}

/// What ended a copy's sending.
enum Sent {
    /// The client's side ended and the stream is finished.
    Finished,
    /// The proxy gave the copy up.
    Abandoned,
    /// Sending failed.
    Failed(TcpDropReason),
}

/// Sends one connection's copy on its own stream and resolves its outcome.
async fn run_copy(
    conn: quinn::Connection,
    open: TcpOpen,
    mut feed: Feed,
    abandon: Abandon,
    mut outcome: Outcome,
    permit: OwnedSemaphorePermit,
) {
    let _permit = permit;
    let streams = tokio::select! {
        () = abandon.token.cancelled() => return outcome.dropped(abandon.reason()),
        streams = conn.open_bi() => streams,
    };
    let Ok((mut send, mut recv)) = streams else {
        return outcome.dropped(TcpDropReason::UplinkError);
    };
    let mut head = BytesMut::new();
    Frame::TcpOpen(open).encode(&mut head);
    let bytes = &mut outcome.bytes;
    let sending = async {
        send.write_all(&head).await.map_err(write_failure)?;
        while let Some(chunk) = feed.next().await {
            send.write_all(&Frame::tcp_data_header(chunk.len()))
                .await
                .map_err(write_failure)?;
            *bytes += chunk.len() as u64;
            send.write_chunk(chunk).await.map_err(write_failure)?;
        }
        // The queue also closes when the proxy gives the copy up: never finish a copy with a
        // gap in it, the gateway would replay it as whole.
        if abandon.token.is_cancelled() {
            return Err(abandon.reason());
        }
        send.finish().map_err(|_| TcpDropReason::UplinkError)
    };
    let sent = tokio::select! {
        biased;
        () = abandon.token.cancelled() => Sent::Abandoned,
        result = sending => match result {
            Ok(()) => Sent::Finished,
            Err(reason) => Sent::Failed(reason),
        },
    };
    match sent {
        Sent::Finished => {}
        Sent::Abandoned => {
            let _ = send.reset(VarInt::from_u32(codes::ABANDONED));
            return outcome.dropped(abandon.reason());
        }
        Sent::Failed(reason) => {
            let _ = send.reset(VarInt::from_u32(codes::ABANDONED));
            return outcome.dropped(reason);
        }
    }
    let reply = tokio::select! {
        () = abandon.token.cancelled() => return outcome.dropped(abandon.reason()),
        reply = tokio::time::timeout(ACK_TIMEOUT, recv.read_to_end(MAX_REPLY_BYTES)) => reply,
    };
    let reason = match reply {
        Ok(Ok(reply)) => match Frame::decode(&mut BytesMut::from(&reply[..])) {
            Ok(Some(Frame::Ack { accepted, .. })) if accepted > 0 => return outcome.teed(),
            _ => TcpDropReason::Rejected,
        },
        Ok(Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(_)))) => TcpDropReason::Rejected,
        Ok(Err(_)) | Err(_) => TcpDropReason::UplinkError,
    };
    outcome.dropped(reason);
}

/// A write that failed: refused by the gateway (it stopped reading), or the link is gone.
fn write_failure(e: quinn::WriteError) -> TcpDropReason {
    match e {
        quinn::WriteError::Stopped(_) => TcpDropReason::Rejected,
        _ => TcpDropReason::UplinkError,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(limit: u64) -> (Option<CopyFeed>, Feed) {
        let (queue, rx) = mpsc::unbounded_channel();
        let backlog = Arc::new(Backlog::new(limit));
        let copy = CopyFeed {
            queue,
            backlog: backlog.clone(),
            abandon: Abandon::default(),
        };
        (Some(copy), Feed { queue: rx, backlog })
    }

    #[tokio::test]
    async fn a_copy_falls_behind_by_buffer_bytes_however_small_the_reads() {
        // 100-byte reads: given up once they and their bookkeeping pass 64 KiB, not after the
        // few reads a queue of 16 KiB slots held.
        let (mut copy, _feed) = feed(64 * 1024);
        let abandon = copy.as_ref().map(|c| c.abandon.clone()).expect("copy");
        let chunk = Bytes::from(vec![b'x'; 100]);
        let mut kept = 0;
        loop {
            offer(&mut copy, &chunk);
            if copy.is_none() {
                break;
            }
            kept += 1;
            assert!(kept < 10_000, "never given up");
        }
        assert_eq!(kept, 64 * 1024 / (100 + CHUNK_OVERHEAD as usize));
        assert_eq!(abandon.reason(), TcpDropReason::BufferFull);
    }

    #[tokio::test]
    async fn what_piled_up_goes_as_one_frame_and_gives_its_room_back() {
        let (mut copy, mut feed) = feed(1 << 20);
        for i in 0..10u8 {
            offer(&mut copy, &Bytes::from(vec![i; 10]));
        }
        let sent = feed.next().await.expect("bytes");
        assert_eq!(sent.len(), 100);
        assert_eq!((&sent[..10], &sent[90..]), (&[0; 10][..], &[9; 10][..]));
        assert_eq!(feed.backlog.held.load(Ordering::Relaxed), 0);
        // A chunk alone goes as it is.
        offer(&mut copy, &Bytes::from_static(b"one"));
        assert_eq!(feed.next().await, Some(Bytes::from_static(b"one")));
        // Joining stops once a frame reaches COALESCE_BYTES.
        let big = Bytes::from(vec![1; 40 * 1024]);
        for _ in 0..3 {
            offer(&mut copy, &big);
        }
        assert_eq!(feed.next().await.map(|b| b.len()), Some(80 * 1024));
        assert_eq!(feed.next().await.map(|b| b.len()), Some(40 * 1024));
        drop(copy);
        assert_eq!(feed.next().await, None);
    }
}
