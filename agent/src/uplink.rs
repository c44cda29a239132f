//! The uplink: one mTLS QUIC connection to a gateway, fed by the tee's queue.
//!
//! ```text
//! tee ──try_send──▶ queue (bounded) ──▶ uplink task ──batch per bi stream──▶ gateway
//!                                              ◀──────────── ACK(n) ────────────
//! ```
//!
//! The task connects (resolving the gateway's name with hickory each time), greets the gateway on
//! a first stream (`HELLO` / `WELCOME`: only a welcome proves the gateway accepted our
//! certificate, since a QUIC client learns of a refused certificate late), then takes copies off
//! the queue in batches: whatever is waiting, up to [`MAX_BATCH_RECORDS`] records or
//! [`MAX_BATCH_BYTES`]. Each batch travels on its own bidirectional stream and is resolved by the
//! gateway's `ACK`: mirrored when acknowledged, `rejected` when the gateway refused the stream,
//! `uplink_error` when the connection failed first. At most [`MAX_IN_FLIGHT_BATCHES`] are in
//! flight; when they are all out, copies wait in the queue, and when the queue is full the tee
//! drops them. While there is no connection the queue is emptied as `no_uplink` drops, never
//! hoarded. Reconnection backs off exponentially with jitter, capped at [`BACKOFF_MAX`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::BytesMut;
use quinn::crypto::rustls::QuicClientConfig;
use quinn::{Connection, Endpoint, VarInt};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use teeway_runtime::dns::Resolver;
use teeway_wire::tls::TlsMaterial;
use teeway_wire::{
    codes, Frame, Hello, Welcome, MAX_BATCH_BYTES, MAX_BATCH_RECORDS, PROTOCOL_VERSION,
};

use crate::config::GatewayConfig;
use crate::error::UplinkError;
use crate::metrics::{Accounting, DropReason, Ticket};
use crate::tee::Queued;

/// Batches on the wire at once. Enough to keep a long-haul link busy (32 batches of up to 256
/// records per round trip), few enough that unacknowledged copies stay a bounded amount.
pub const MAX_IN_FLIGHT_BATCHES: usize = 32;
/// First reconnection delay.
pub const BACKOFF_BASE: Duration = Duration::from_millis(50);
/// Longest reconnection delay: a gateway that comes back is found within about a second.
pub const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// A connection that lived this long was healthy: the next failure starts the backoff afresh.
/// A gateway that accepts and then drops at once keeps the backoff growing instead.
const HEALTHY_AFTER: Duration = Duration::from_secs(5);
/// Time allowed for the QUIC handshake plus `HELLO` / `WELCOME`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for a batch to be written and acknowledged.
const ACK_TIMEOUT: Duration = Duration::from_secs(15);
/// Keep-alive on the connection, so idle links through NATs and load balancers stay open.
const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// A connection silent for this long is considered dead.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest reply read on a stream (a `WELCOME` or an `ACK`).
const MAX_REPLY_BYTES: usize = 64 * 1024;
/// Time allowed at exit for the close to reach the gateway.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Whether the uplink is connected, shared with the admin listener and with callers that want
/// to wait for it.
#[derive(Debug)]
pub struct UplinkState {
    connected: AtomicBool,
    changes_tx: watch::Sender<bool>,
}

impl Default for UplinkState {
    fn default() -> Self {
        Self {
            connected: AtomicBool::new(false),
            changes_tx: watch::channel(false).0,
        }
    }
}

impl UplinkState {
    /// Whether a gateway has welcomed this agent on the current connection.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Resolves when the uplink's connected state equals `up`.
    pub async fn wait_for(&self, up: bool) {
        let mut rx = self.changes_tx.subscribe();
        // The sender lives as long as `self`, so this cannot fail while we are borrowed.
        let _ = rx.wait_for(|now| *now == up).await;
    }

    pub(crate) fn set(&self, up: bool) {
        self.connected.store(up, Ordering::Relaxed);
        self.changes_tx.send_replace(up);
    }
}

/// The uplink task's configuration and state.
pub struct Uplink {
    gateway: GatewayConfig,
    /// Swapped by a reload that brings new certificates; each new connection loads it.
    client_config: Arc<ArcSwap<quinn::ClientConfig>>,
    resolver: Resolver,
    accounting: Arc<Accounting>,
    state: Arc<UplinkState>,
    source_cluster: String,
    endpoint_v4: Option<Endpoint>,
    endpoint_v6: Option<Endpoint>,
}

impl std::fmt::Debug for Uplink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uplink")
            .field(
                "gateway",
                &format_args!("{}:{}", self.gateway.host, self.gateway.port),
            )
            .finish_non_exhaustive()
    }
}

/// The QUIC client configuration for `tls`: mTLS, keep-alive, idle timeout.
pub fn quic_client_config(tls: &TlsMaterial) -> Result<quinn::ClientConfig, UplinkError> {
    let tls = teeway_wire::tls::client_config(tls)?;
    let quic = QuicClientConfig::try_from(tls).map_err(|e| UplinkError::Tls(e.to_string()))?;
    let mut client_config = quinn::ClientConfig::new(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(KEEP_ALIVE));
    transport.max_idle_timeout(Some(
        IDLE_TIMEOUT
            .try_into()
            .map_err(|_| UplinkError::Tls("idle timeout out of range".into()))?,
    ));
    client_config.transport_config(Arc::new(transport));
    Ok(client_config)
}

/// What ended a connected session.
enum SessionEnd {
    /// The connection was lost; reconnect.
    Lost,
    /// The queue is closed and empty, and every batch resolved: done.
    Drained,
}

impl Uplink {
    /// Builds the QUIC client configuration; fails only on unusable TLS material.
    pub fn new(
        gateway: GatewayConfig,
        source_cluster: &str,
        resolver: Resolver,
        accounting: Arc<Accounting>,
        state: Arc<UplinkState>,
    ) -> Result<Self, UplinkError> {
        let client_config = Arc::new(ArcSwap::from_pointee(quic_client_config(&gateway.tls)?));
        Ok(Self {
            gateway,
            client_config,
            resolver,
            accounting,
            state,
            source_cluster: source_cluster.to_owned(),
            endpoint_v4: None,
            endpoint_v6: None,
        })
    }

    /// The client configuration new connections use; a reload stores a new one here.
    pub fn client_config(&self) -> Arc<ArcSwap<quinn::ClientConfig>> {
        self.client_config.clone()
    }

    /// Runs until `drain` is cancelled and the queue is sent, or `grace` after `drain` at most.
    /// Whatever is left then is counted as `shutdown` drops.
    pub async fn run(
        mut self,
        mut queue_rx: mpsc::Receiver<Queued>,
        drain: CancellationToken,
        grace: Duration,
    ) {
        let mut drain = Drain::new(drain, grace);
        let mut failures: u32 = 0;
        loop {
            // Disconnected: connect, emptying the queue as `no_uplink` meanwhile.
            let connected = {
                let connect = self.connect();
                tokio::pin!(connect);
                loop {
                    tokio::select! {
                        result = &mut connect => break Some(result),
                        q = queue_rx.recv() => match q {
                            Some(q) => q.ticket.dropped(DropReason::NoUplink),
                            None => break None,
                        },
                        () = drain.started(), if !drain.is_started() => drain.start(&mut queue_rx),
                        () = drain.deadline(), if drain.is_started() => break None,
                    }
                }
            };
            let (conn, welcome) = match connected {
                None => break,
                Some(Ok(pair)) => pair,
                Some(Err(e)) => {
                    self.accounting.connects_failed.increment(1);
                    let delay = backoff(failures);
                    failures = failures.saturating_add(1);
                    if failures == 1 || failures.is_multiple_of(20) {
                        tracing::warn!(error = %e, attempts = failures, retry_in = ?delay, "cannot reach the gateway; copies are dropped as no_uplink until it answers");
                    } else {
                        tracing::debug!(error = %e, retry_in = ?delay, "gateway connection attempt failed");
                    }
                    if !self.wait_backoff(delay, &mut queue_rx, &mut drain).await {
                        break;
                    }
                    continue;
                }
            };
            self.accounting.connects_ok.increment(1);
            // Ready first, then say so: whoever reads the log line may probe /readyz at once.
            self.set_connected(true);
            tracing::info!(
                gateway = %conn.remote_address(),
                identity = %welcome.agent_identity,
                gateway_software = %welcome.software,
                "uplink connected"
            );
            let since = Instant::now();
            let end = self.session(&conn, &mut queue_rx, &mut drain).await;
            self.set_connected(false);
            match end {
                SessionEnd::Drained => {
                    conn.close(VarInt::from_u32(codes::SHUTDOWN), b"agent shutting down");
                    break;
                }
                SessionEnd::Lost => {
                    let reason = conn
                        .close_reason()
                        .map(|r| r.to_string())
                        .unwrap_or_default();
                    tracing::warn!(%reason, "uplink lost; reconnecting");
                    if since.elapsed() >= HEALTHY_AFTER {
                        failures = 0;
                    }
                    if !self
                        .wait_backoff(backoff(failures), &mut queue_rx, &mut drain)
                        .await
                    {
                        break;
                    }
                    failures = failures.saturating_add(1);
                }
            }
        }
        // Whatever is still queued now will never be sent.
        queue_rx.close();
        while let Ok(q) = queue_rx.try_recv() {
            q.ticket.dropped(DropReason::Shutdown);
        }
        for endpoint in [self.endpoint_v4.take(), self.endpoint_v6.take()]
            .into_iter()
            .flatten()
        {
            endpoint.close(VarInt::from_u32(codes::SHUTDOWN), b"agent shutting down");
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, endpoint.wait_idle()).await;
        }
    }

    fn set_connected(&self, up: bool) {
        self.state.set(up);
        self.accounting
            .uplink_connected
            .set(if up { 1.0 } else { 0.0 });
    }

    /// Sleeps `delay`, emptying the queue as `no_uplink`; `false` when it is time to stop.
    async fn wait_backoff(
        &self,
        delay: Duration,
        queue_rx: &mut mpsc::Receiver<Queued>,
        drain: &mut Drain,
    ) -> bool {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut sleep => return true,
                q = queue_rx.recv() => match q {
                    Some(q) => q.ticket.dropped(DropReason::NoUplink),
                    None => return false,
                },
                () = drain.started(), if !drain.is_started() => drain.start(queue_rx),
                () = drain.deadline(), if drain.is_started() => return false,
            }
        }
    }

    /// Sends batches over `conn` until it is lost or the queue is closed and drained.
    async fn session(
        &self,
        conn: &Connection,
        queue_rx: &mut mpsc::Receiver<Queued>,
        drain: &mut Drain,
    ) -> SessionEnd {
        let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT_BATCHES));
        let mut batches = JoinSet::new();
        let end = loop {
            // Reap finished batch tasks so the set does not grow.
            while batches.try_join_next().is_some() {}
            let permit = tokio::select! {
                permit = in_flight.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => break SessionEnd::Lost,
                },
                _ = conn.closed() => break SessionEnd::Lost,
                () = drain.started(), if !drain.is_started() => { drain.start(queue_rx); continue; }
                () = drain.deadline(), if drain.is_started() => break SessionEnd::Drained,
            };
            let first = tokio::select! {
                q = queue_rx.recv() => q,
                _ = conn.closed() => break SessionEnd::Lost,
                () = drain.started(), if !drain.is_started() => { drain.start(queue_rx); continue; }
                () = drain.deadline(), if drain.is_started() => break SessionEnd::Drained,
            };
            let Some(first) = first else {
                break SessionEnd::Drained;
            };
            let batch = Batch::collect(first, queue_rx);
            batches.spawn(send_batch(conn.clone(), batch, permit));
        };
        if let SessionEnd::Drained = end {
            // Let the batches on the wire be acknowledged, within the grace period.
            let waited = tokio::time::timeout_at(drain.deadline_instant(), async {
                while batches.join_next().await.is_some() {}
            })
            .await;
            if waited.is_err() {
                tracing::warn!(batches = batches.len(), "grace period over with batches unacknowledged; counting them as shutdown drops");
            }
        }
        match end {
            // The connection is gone: every batch fails at once and counts `uplink_error`.
            SessionEnd::Lost => while batches.join_next().await.is_some() {},
            // Past the deadline: aborting drops the tickets, which count as `shutdown`.
            SessionEnd::Drained => batches.shutdown().await,
        }
        end
    }

    async fn connect(&mut self) -> Result<(Connection, Welcome), UplinkError> {
        let addrs = self
            .resolver
            .lookup(&self.gateway.host, self.gateway.port)
            .await?;
        let mut last_error = None;
        for addr in addrs {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.connect_one(addr)).await {
                Ok(Ok(pair)) => return Ok(pair),
                Ok(Err(e)) => last_error = Some(e),
                Err(_) => {
                    last_error = Some(UplinkError::Timeout {
                        addr,
                        after: HANDSHAKE_TIMEOUT,
                    })
                }
            }
        }
        Err(last_error.unwrap_or(UplinkError::NoAddress))
    }

    async fn connect_one(
        &mut self,
        addr: SocketAddr,
    ) -> Result<(Connection, Welcome), UplinkError> {
        let endpoint = self.endpoint_for(addr)?;
        let conn = endpoint
            .connect_with(
                quinn::ClientConfig::clone(&self.client_config.load()),
                addr,
                &self.gateway.server_name,
            )
            .map_err(|e| UplinkError::Connect { addr, source: e })?
            .await
            .map_err(|e| UplinkError::Connection { addr, source: e })?;
        let welcome = self.greet(&conn).await.inspect_err(|_| {
            conn.close(VarInt::from_u32(codes::PROTOCOL_ERROR), b"handshake failed");
        })?;
        Ok((conn, welcome))
    }

    /// `HELLO` / `WELCOME` on the first stream. A gateway that refused our certificate closes
    /// the connection here, so this is where a refused agent finds out.
    async fn greet(&self, conn: &Connection) -> Result<Welcome, UplinkError> {
        let addr = conn.remote_address();
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| UplinkError::Connection { addr, source: e })?;
        let mut buf = BytesMut::new();
        Frame::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            source_cluster: self.source_cluster.clone(),
            software: concat!("teeway ", env!("CARGO_PKG_VERSION")).to_owned(),
        })
        .encode(&mut buf);
        send.write_all(&buf)
            .await
            .map_err(|e| UplinkError::Refused {
                addr,
                detail: e.to_string(),
            })?;
        let _ = send.finish();
        let reply = recv
            .read_to_end(MAX_REPLY_BYTES)
            .await
            .map_err(|e| UplinkError::Refused {
                addr,
                detail: e.to_string(),
            })?;
        match Frame::decode(&mut BytesMut::from(&reply[..])) {
            Ok(Some(Frame::Welcome(w))) if w.protocol_version == PROTOCOL_VERSION => Ok(w),
            Ok(Some(Frame::Welcome(w))) => Err(UplinkError::Refused {
                addr,
                detail: format!(
                    "gateway speaks protocol version {}, this agent {PROTOCOL_VERSION}",
                    w.protocol_version
                ),
            }),
            Ok(_) => Err(UplinkError::Refused {
                addr,
                detail: "the gateway did not answer HELLO with WELCOME".into(),
            }),
            Err(e) => Err(UplinkError::Protocol(e)),
        }
    }

    fn endpoint_for(&mut self, addr: SocketAddr) -> Result<Endpoint, UplinkError> {
        let slot = if addr.is_ipv4() {
            &mut self.endpoint_v4
        } else {
            &mut self.endpoint_v6
        };
        if let Some(endpoint) = slot {
            return Ok(endpoint.clone());
        }
        let bind: SocketAddr = if addr.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let endpoint = Endpoint::client(bind).map_err(UplinkError::Endpoint)?;
        *slot = Some(endpoint.clone());
        Ok(endpoint)
    }
}

/// The drain that starts with shutdown: the queue is closed to new copies, what it holds is sent,
/// and a deadline bounds the whole.
struct Drain {
    token: CancellationToken,
    grace: Duration,
    deadline: Option<Instant>,
}

impl Drain {
    fn new(token: CancellationToken, grace: Duration) -> Self {
        Self {
            token,
            grace,
            deadline: None,
        }
    }

    fn is_started(&self) -> bool {
        self.deadline.is_some()
    }

    async fn started(&self) {
        self.token.cancelled().await;
    }

    fn start(&mut self, queue_rx: &mut mpsc::Receiver<Queued>) {
        queue_rx.close();
        self.deadline = Some(Instant::now() + self.grace);
    }

    fn deadline_instant(&self) -> Instant {
        self.deadline.unwrap_or_else(|| Instant::now() + self.grace)
    }

    async fn deadline(&self) {
        tokio::time::sleep_until(self.deadline_instant()).await;
    }
}

/// Copies sent together on one stream.
struct Batch {
    frames: BytesMut,
    tickets: Vec<Ticket>,
}

impl Batch {
    /// `first` and whatever else is already waiting, within the batch limits.
    fn collect(first: Queued, queue_rx: &mut mpsc::Receiver<Queued>) -> Self {
        let mut batch = Batch {
            frames: BytesMut::new(),
            tickets: Vec::new(),
        };
        batch.push(first);
        while batch.tickets.len() < MAX_BATCH_RECORDS && batch.frames.len() < MAX_BATCH_BYTES {
            match queue_rx.try_recv() {
                Ok(q) => batch.push(q),
                Err(_) => break,
            }
        }
        batch
    }

    fn push(&mut self, q: Queued) {
        Frame::Request(q.record).encode(&mut self.frames);
        self.tickets.push(q.ticket);
    }
}

/// How a batch ended, short of an acknowledgement.
enum BatchFailure {
    /// The gateway refused the stream (it stopped or reset it with an error code).
    Rejected(String),
    /// The connection failed, or the ack did not come in time.
    Transport(String),
}

async fn send_batch(conn: Connection, batch: Batch, _permit: OwnedSemaphorePermit) {
    let Batch { frames, tickets } = batch;
    let outcome = match tokio::time::timeout(ACK_TIMEOUT, exchange(&conn, &frames)).await {
        Ok(result) => result,
        Err(_) => Err(BatchFailure::Transport(format!(
            "no acknowledgement within {ACK_TIMEOUT:?}"
        ))),
    };
    match outcome {
        Ok(accepted) => {
            let accepted = accepted as usize;
            for (i, ticket) in tickets.into_iter().enumerate() {
                if i < accepted {
                    ticket.mirrored();
                } else {
                    ticket.dropped(DropReason::Rejected);
                }
            }
        }
        Err(BatchFailure::Rejected(detail)) => {
            tracing::debug!(%detail, records = tickets.len(), "gateway rejected a batch");
            tickets
                .into_iter()
                .for_each(|t| t.dropped(DropReason::Rejected));
        }
        Err(BatchFailure::Transport(detail)) => {
            tracing::debug!(%detail, records = tickets.len(), "batch lost with the connection");
            tickets
                .into_iter()
                .for_each(|t| t.dropped(DropReason::UplinkError));
        }
    }
}

async fn exchange(conn: &Connection, frames: &[u8]) -> Result<u32, BatchFailure> {
    let transport = |e: &dyn std::fmt::Display| BatchFailure::Transport(e.to_string());
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| transport(&e))?;
    match send.write_all(frames).await {
        Ok(()) => {}
        Err(quinn::WriteError::Stopped(code)) => {
            return Err(BatchFailure::Rejected(format!(
                "stream stopped with code {code}"
            )))
        }
        Err(e) => return Err(transport(&e)),
    }
    send.finish().map_err(|e| transport(&e))?;
    let reply = match recv.read_to_end(MAX_REPLY_BYTES).await {
        Ok(reply) => reply,
        Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code))) => {
            return Err(BatchFailure::Rejected(format!(
                "stream reset with code {code}"
            )));
        }
        Err(e) => return Err(transport(&e)),
    };
    match Frame::decode(&mut BytesMut::from(&reply[..])) {
        Ok(Some(Frame::Ack { accepted })) => Ok(accepted),
        Ok(_) => Err(BatchFailure::Rejected(
            "the gateway's reply was not an ACK".into(),
        )),
        Err(e) => Err(BatchFailure::Rejected(format!("undecodable reply: {e}"))),
    }
}

/// Full-jitter exponential backoff: a random delay in `[d/2, d]` with `d = min(max, base·2^n)`.
fn backoff(failures: u32) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(1u32 << failures.min(16));
    let cap = exp.min(BACKOFF_MAX);
    let half = cap / 2;
    half + half.mul_f64(fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped_with_jitter() {
        for n in 0..40 {
            let d = backoff(n);
            let expected_cap = BACKOFF_BASE
                .saturating_mul(1u32 << n.min(16))
                .min(BACKOFF_MAX);
            assert!(d >= expected_cap / 2 && d <= expected_cap, "n={n} d={d:?}");
        }
        assert!(
            backoff(30) >= BACKOFF_MAX / 2,
            "a flapping gateway never causes a tight loop"
        );
    }
}
