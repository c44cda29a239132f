//! TCP tee streams: the client-to-server bytes of one production TCP connection, replayed on a
//! fresh connection to each target of the listener's `tcp_routes` entry.
//!
//! ```text
//! agent stream:  TCP_OPEN  TCP_DATA…  FIN            ──▶ ACK(1)
//!                    │         │        │
//!                    ▼         ▼        ▼
//! per target:     connect   write    shut down writing, read replies to EOF (dropped)
//! ```
//!
//! The stream is read as fast as it arrives and never waits for a target: each target has its own
//! task and a queue of [`TARGET_QUEUE_CHUNKS`] chunks. A target that falls further behind than that
//! is closed and counted `lagging`; the others go on. Replies are read (so the shadow never blocks
//! on a full socket) and dropped. When no target is left to replay to, the stream is refused with
//! [`codes::REFUSED`] so the agent stops copying that connection.
//!
//! Every stream ends in exactly one bucket per target of its route (or once as `no_route`):
//!
//! ```text
//! teeway_gateway_tcp_streams_total × targets of its route
//!   = sum(teeway_gateway_tcp_replays_total{result}) + teeway_gateway_tcp_replays_in_flight
//! ```

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use quinn::{RecvStream, SendStream, VarInt};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use teeway_runtime::connect::UpstreamConnector;
use teeway_runtime::dns::Resolver;
use teeway_wire::{codes, Frame, TcpOpen};

use crate::config::{identity_matches, TcpRouteConfig};
use crate::dispatch::Dispatcher;
use crate::metrics::TcpResult;

/// Chunks a target may fall behind the stream before it is closed as `lagging`. The agent reads
/// at most 16 KiB at a time, so this bounds a replay connection's queue to about 4 MiB.
pub const TARGET_QUEUE_CHUNKS: usize = 256;
/// Time allowed to connect to a target.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// After the last byte is written, time allowed for the target's replies to end.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest read off the agent's stream at once.
const READ_CHUNK: usize = 64 * 1024;

/// One replay destination of a TCP route, shared by every stream sent to it.
#[derive(Debug)]
pub struct TcpTarget {
    host: String,
    port: u16,
    max_connections: usize,
    slots: Arc<Semaphore>,
    connector: UpstreamConnector,
}

impl TcpTarget {
    fn new(host: String, port: u16, max_connections: usize, resolver: Resolver) -> Self {
        Self {
            connector: UpstreamConnector::new(&host, port, resolver, CONNECT_TIMEOUT, None),
            slots: Arc::new(Semaphore::new(max_connections)),
            host,
            port,
            max_connections,
        }
    }

    fn same_spec(&self, host: &str, port: u16, max_connections: usize) -> bool {
        self.host == host && self.port == port && self.max_connections == max_connections
    }

    async fn connect(&self) -> Result<TcpStream, String> {
        self.connector
            .connect_tcp()
            .await
            .map_err(|e| e.to_string())
    }
}

/// A `tcp_routes` entry ready to take streams.
#[derive(Debug)]
pub struct TcpRoute {
    listener: String,
    source_clusters: Vec<String>,
    targets: Vec<Arc<TcpTarget>>,
}

/// The TCP routing table: first entry naming the stream's listener (and taking its agent) wins.
#[derive(Debug, Default)]
pub struct TcpRouter {
    routes: Vec<TcpRoute>,
}

impl TcpRouter {
    /// Builds the table, taking from `old` every target with the same address and limit (so a
    /// reload keeps the connections under way counted against the same limit).
    pub fn build(routes: &[TcpRouteConfig], resolver: &Resolver, old: Option<&TcpRouter>) -> Self {
        let mut reusable: Vec<Arc<TcpTarget>> = old
            .map(|o| {
                o.routes
                    .iter()
                    .flat_map(|r| r.targets.iter().cloned())
                    .collect()
            })
            .unwrap_or_default();
        let routes = routes
            .iter()
            .map(|r| TcpRoute {
                listener: r.listener.clone(),
                source_clusters: r.source_clusters.clone(),
                targets: r
                    .targets
                    .iter()
                    .map(|(host, port)| {
                        match reusable
                            .iter()
                            .position(|t| t.same_spec(host, *port, r.max_connections))
                        {
                            Some(i) => reusable.swap_remove(i),
                            None => Arc::new(TcpTarget::new(
                                host.clone(),
                                *port,
                                r.max_connections,
                                resolver.clone(),
                            )),
                        }
                    })
                    .collect(),
            })
            .collect();
        Self { routes }
    }

    fn route(&self, listener: &str, identity: &str) -> Option<&TcpRoute> {
        self.routes.iter().find(|r| {
            r.listener == listener
                && (r.source_clusters.is_empty()
                    || r.source_clusters
                        .iter()
                        .any(|p| identity_matches(p, identity)))
        })
    }
}

/// Why a target's replay was cut short by the stream's side; set once, before its token fires.
type Verdict = Arc<OnceLock<TcpResult>>;

/// A target replaying this stream.
struct Replaying {
    queue: mpsc::Sender<Bytes>,
    stop: CancellationToken,
    verdict: Verdict,
}

impl Replaying {
    fn abandon(self, result: TcpResult) {
        let _ = self.verdict.set(result);
        self.stop.cancel();
    }
}

/// Serves one TCP tee stream whose `TCP_OPEN` has been read; `buf` holds what followed it.
pub(crate) async fn serve(
    open: TcpOpen,
    mut buf: BytesMut,
    mut send: SendStream,
    mut recv: RecvStream,
    dispatcher: &Dispatcher,
    identity: &Arc<str>,
    shutdown: &CancellationToken,
) {
    let metrics = &dispatcher.metrics;
    metrics.tcp_streams.increment(1);
    let routing = dispatcher.routing.load();
    let Some(route) = routing.tcp.route(&open.listener, identity) else {
        metrics.tcp_replay(TcpResult::NoRoute);
        refuse(&mut send, &mut recv).await;
        return;
    };
    let mut replaying = Vec::with_capacity(route.targets.len());
    for target in &route.targets {
        let Ok(permit) = target.slots.clone().try_acquire_owned() else {
            metrics.tcp_replay(TcpResult::Overloaded);
            continue;
        };
        let (queue, queue_rx) = mpsc::channel(TARGET_QUEUE_CHUNKS);
        let stop = CancellationToken::new();
        let verdict = Verdict::default();
        metrics.tcp_in_flight.increment(1.0);
        let task = replay(
            target.clone(),
            permit,
            queue_rx,
            stop.clone(),
            verdict.clone(),
            dispatcher.metrics.clone(),
        );
        dispatcher.replays.spawn(task);
        replaying.push(Replaying {
            queue,
            stop,
            verdict,
        });
    }
    drop(routing);
    tracing::debug!(%identity, listener = %open.listener, connection = open.id, targets = replaying.len(), "TCP tee stream opened");

    let end = match next_problem(&mut buf, &mut replaying) {
        Some(problem) => StreamEnd::Protocol(problem),
        None => loop {
            if replaying.is_empty() {
                break StreamEnd::NoTargets;
            }
            let chunk = tokio::select! {
                () = shutdown.cancelled() => break StreamEnd::Shutdown,
                chunk = recv.read_chunk(READ_CHUNK, true) => chunk,
            };
            match chunk {
                Ok(Some(chunk)) => {
                    buf.extend_from_slice(&chunk.bytes);
                    if let Some(problem) = next_problem(&mut buf, &mut replaying) {
                        break StreamEnd::Protocol(problem);
                    }
                }
                Ok(None) if buf.is_empty() => break StreamEnd::Finished,
                Ok(None) => {
                    break StreamEnd::Protocol(format!(
                        "stream ends inside a frame ({} bytes left)",
                        buf.len()
                    ))
                }
                Err(e) => break StreamEnd::Reset(e.to_string()),
            }
        },
    };
    match end {
        StreamEnd::Finished => {
            // Closing the queues lets each target write what is left and close its side.
            drop(replaying);
            answer(&mut send, 1).await;
        }
        StreamEnd::NoTargets => refuse(&mut send, &mut recv).await,
        StreamEnd::Shutdown => {
            abandon_all(replaying, TcpResult::Shutdown);
            let code = VarInt::from_u32(codes::SHUTDOWN);
            let _ = recv.stop(code);
            let _ = send.reset(code);
        }
        StreamEnd::Reset(reason) => {
            tracing::debug!(%identity, connection = open.id, %reason, "TCP tee stream ended early");
            abandon_all(replaying, TcpResult::Incomplete);
        }
        StreamEnd::Protocol(problem) => {
            abandon_all(replaying, TcpResult::Incomplete);
            metrics.streams_rejected_protocol.increment(1);
            dispatcher.note_rejected(identity, &problem);
            let code = VarInt::from_u32(codes::PROTOCOL_ERROR);
            let _ = recv.stop(code);
            let _ = send.reset(code);
        }
    }
}

/// How a TCP tee stream ended, as far as the gateway's side of it goes.
enum StreamEnd {
    /// The agent finished the stream: the client closed its side.
    Finished,
    /// Every target was closed or refused.
    NoTargets,
    /// The gateway is stopping.
    Shutdown,
    /// The agent reset the stream or the connection failed.
    Reset(String),
    /// The stream broke the protocol.
    Protocol(String),
}

/// Decodes every whole frame in `buf`, handing data to the targets; the first frame that is not
/// `TCP_DATA`, or bytes that do not decode, are a protocol problem.
fn next_problem(buf: &mut BytesMut, replaying: &mut Vec<Replaying>) -> Option<String> {
    loop {
        match Frame::decode(buf) {
            Ok(Some(Frame::TcpData(data))) => feed(replaying, &data),
            Ok(Some(_)) => {
                return Some("a TCP tee stream carries only TCP_DATA after TCP_OPEN".to_owned())
            }
            Ok(None) => return None,
            Err(e) => return Some(e.to_string()),
        }
    }
}

/// Queues `data` for every target; a target whose queue is full has fallen behind and is closed.
fn feed(replaying: &mut Vec<Replaying>, data: &Bytes) {
    if data.is_empty() {
        return;
    }
    let mut i = 0;
    while i < replaying.len() {
        match replaying[i].queue.try_send(data.clone()) {
            Ok(()) => i += 1,
            Err(mpsc::error::TrySendError::Full(_)) => {
                replaying.swap_remove(i).abandon(TcpResult::Lagging);
            }
            // The target's task ended on its own (connection failed) and counted itself.
            Err(mpsc::error::TrySendError::Closed(_)) => {
                replaying.swap_remove(i);
            }
        }
    }
}

fn abandon_all(replaying: Vec<Replaying>, result: TcpResult) {
    for r in replaying {
        r.abandon(result);
    }
}

/// Answers a stream taken whole: `ACK(accepted)`, then waits for it to be delivered.
async fn answer(send: &mut SendStream, accepted: u32) {
    let mut out = BytesMut::new();
    Frame::Ack {
        accepted,
        shed: teeway_wire::Shed::default(),
    }
    .encode(&mut out);
    if send.write_all(&out).await.is_ok() {
        let _ = send.finish();
        let _ = send.stopped().await;
    }
}

/// Refuses a stream: the agent is told to stop sending, and `ACK(0)` says nothing was taken.
async fn refuse(send: &mut SendStream, recv: &mut RecvStream) {
    let _ = recv.stop(VarInt::from_u32(codes::REFUSED));
    answer(send, 0).await;
}

/// What happened first on a replay connection.
enum First {
    /// Every queued byte was written and writing shut down (or that failed).
    Written(std::io::Result<()>),
    /// The shadow's side ended first.
    ShadowClosed(String),
}

/// Replays the queued bytes to `target` on a fresh connection, reading its replies and dropping
/// them; counts the outcome once.
async fn replay(
    target: Arc<TcpTarget>,
    permit: OwnedSemaphorePermit,
    mut queue: mpsc::Receiver<Bytes>,
    stop: CancellationToken,
    verdict: Verdict,
    metrics: Arc<crate::metrics::GatewayMetrics>,
) {
    let work = async {
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, target.connect()).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return (TcpResult::Connect, Some(e)),
            Err(_) => return (TcpResult::Connect, Some("connect timed out".to_owned())),
        };
        let peer: Option<SocketAddr> = stream.peer_addr().ok();
        let (mut rd, mut wr) = stream.into_split();
        // Replies are read all along, so a shadow that answers as it goes never blocks on us.
        let mut replies = tokio::spawn(async move {
            let mut sink = tokio::io::sink();
            tokio::io::copy(&mut rd, &mut sink).await
        });
        let written = async {
            while let Some(data) = queue.recv().await {
                wr.write_all(&data).await?;
                metrics.tcp_bytes.increment(data.len() as u64);
            }
            // The queue also closes when the stream gives this target up: never close a replay
            // with a gap in it as if the client had.
            if stop.is_cancelled() {
                return Err(std::io::Error::other("replay abandoned"));
            }
            wr.shutdown().await
        };
        let first = tokio::select! {
            result = written => First::Written(result),
            ended = &mut replies => First::ShadowClosed(match ended {
                Ok(Ok(_)) => "the shadow closed the connection before the client did".to_owned(),
                Ok(Err(e)) => e.to_string(),
                Err(e) => e.to_string(),
            }),
        };
        if stop.is_cancelled() {
            return (
                verdict.get().copied().unwrap_or(TcpResult::Incomplete),
                None,
            );
        }
        match first {
            First::Written(Ok(())) => {}
            First::Written(Err(e)) => {
                replies.abort();
                return (TcpResult::Io, Some(format!("{peer:?}: {e}")));
            }
            First::ShadowClosed(detail) => {
                // A protocol's own goodbye (Redis `QUIT`) closes the server first; the replay is
                // whole if the client sent nothing more before closing too.
                let mut more = false;
                while let Some(data) = queue.recv().await {
                    more |= !data.is_empty();
                }
                if stop.is_cancelled() {
                    return (
                        verdict.get().copied().unwrap_or(TcpResult::Incomplete),
                        None,
                    );
                }
                return if more {
                    (TcpResult::Io, Some(detail))
                } else {
                    (TcpResult::Completed, None)
                };
            }
        }
        // Everything is written and our side is closed: let the replies end, within a bound.
        if tokio::time::timeout(DRAIN_TIMEOUT, &mut replies)
            .await
            .is_err()
        {
            replies.abort();
        }
        (TcpResult::Completed, None)
    };
    let (result, detail) = tokio::select! {
        biased;
        () = stop.cancelled() => (verdict.get().copied().unwrap_or(TcpResult::Incomplete), None),
        outcome = work => outcome,
    };
    drop(permit);
    // Counted before it leaves `in_flight`: a scrape reads counters before gauges, so this order
    // keeps the window in which it shows in neither as short as it can be.
    metrics.tcp_replay(result);
    metrics.tcp_in_flight.decrement(1.0);
    if let Some(detail) = detail {
        tracing::debug!(target = %teeway_runtime::config::join_host_port(&target.host, target.port), result = result.as_str(), %detail, "TCP replay ended");
    }
}
