//! The TLS-over-TCP listener, for agents whose network blocks UDP.
//!
//! Same mTLS, same identities, same frames as QUIC (see `docs/protocol.md`); only the framing of
//! batches differs: one TCP connection carries the agent's `HELLO`, then batches, each closed by
//! an `END` frame, and the gateway answers `WELCOME`, then one `ACK` per batch, in order. A batch
//! is dispatched exactly as a QUIC batch stream is. An empty batch (a lone `END`) is the agent's
//! keep-alive, answered with `ACK(0)`; a connection silent for 30 s is closed.
//!
//! On this transport the connection is the unit of refusal: a batch that breaks the protocol or
//! outgrows [`MAX_STREAM_BYTES`](crate::budget::MAX_STREAM_BYTES) closes that agent's connection (counted like a refused QUIC
//! stream), never the listener or anyone else's connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use teeway_wire::{DecodeError, Envelope, Frame};

use crate::budget::MAX_STREAM_BYTES;
use crate::budget::{ConnectionBudget, Held};
use crate::dispatch::{Dispatcher, Refused};

/// Time allowed for the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection silent for this long is closed (agents send a keep-alive every 5 s).
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Time allowed for an answer to be written.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts agent connections on `listener` until `shutdown`, with the TLS server configuration
/// in force in `tls` (a certificate reload swaps it; connections made keep theirs).
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ArcSwap<rustls::ServerConfig>>,
    dispatcher: Arc<Dispatcher>,
    shutdown: CancellationToken,
) {
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Out of descriptors and the like: pause rather than spin.
                tracing::warn!(error = %e, "cannot accept a TCP connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.load_full());
        let dispatcher = dispatcher.clone();
        let shutdown = shutdown.clone();
        connections.spawn(
            async move {
                let _ = tcp.set_nodelay(true);
                let stream =
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => {
                            dispatcher.refused_handshake(&e.to_string());
                            return;
                        }
                        Err(_) => {
                            dispatcher.refused_handshake("handshake not completed in time");
                            return;
                        }
                    };
                serve_connection(stream, peer, &dispatcher, &shutdown).await;
            }
            .instrument(tracing::info_span!("agent", %peer, transport = "tls")),
        );
    }
    connections.close();
    connections.wait().await;
}

/// Why a connection ended.
enum End {
    /// Closed by the agent, or idle.
    Gone(String),
    /// Refused: broke the protocol, too large, over the memory budget, too slow.
    Refused(Refused),
}

impl From<Refused> for End {
    fn from(why: Refused) -> Self {
        End::Refused(why)
    }
}

async fn serve_connection(
    mut stream: TlsStream<TcpStream>,
    peer: SocketAddr,
    dispatcher: &Dispatcher,
    shutdown: &CancellationToken,
) {
    let identity: Arc<str> = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(teeway_wire::tls::peer_identity)
        .unwrap_or_else(|| "(unnamed)".into())
        .into();
    if !dispatcher.routing.load().allows(&identity) {
        dispatcher.unauthorized(&identity);
        let _ = stream.shutdown().await;
        return;
    }
    let Ok(share) = dispatcher.connection_budget(&identity) else {
        let _ = stream.shutdown().await;
        return;
    };
    dispatcher.metrics.handshakes_ok.increment(1);
    dispatcher.metrics.agents_connected.increment(1.0);
    tracing::info!(%identity, %peer, "agent connected over TLS/TCP");
    let end = tokio::select! {
        () = shutdown.cancelled() => End::Gone("gateway shutting down".into()),
        end = exchange(&mut stream, dispatcher, &identity, &share) => end,
    };
    let _ = tokio::time::timeout(WRITE_TIMEOUT, stream.shutdown()).await;
    dispatcher.metrics.agents_connected.decrement(1.0);
    let reason = match end {
        End::Gone(reason) => reason,
        End::Refused(why) => {
            let reason = format!("{why:?}");
            dispatcher.refuse_stream(&identity, why);
            reason
        }
    };
    tracing::info!(%identity, %reason, "agent disconnected");
}

/// `HELLO` / `WELCOME`, then batches until the connection ends.
async fn exchange(
    stream: &mut TlsStream<TcpStream>,
    dispatcher: &Dispatcher,
    identity: &Arc<str>,
    share: &ConnectionBudget,
) -> End {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    // What the read buffer holds, and what the batch being read holds, from the budget.
    let mut buffered = share.hold();
    let mut out = BytesMut::new();
    match next_frame(stream, &mut buf, &mut buffered, None).await {
        Ok(Frame::Hello(hello)) => {
            tracing::info!(
                %identity,
                source_cluster = %hello.source_cluster,
                agent_software = %hello.software,
                "agent greeted"
            );
        }
        Ok(other) => {
            return Refused::Protocol(format!("first frame is not HELLO: {}", name(&other))).into()
        }
        Err(end) => return end,
    }
    // The version the connection's ALPN id chose (agents of older versions are still served).
    // Every agent offers its versions; a client that agreed on none is not one.
    let Some(version) = stream
        .get_ref()
        .1
        .alpn_protocol()
        .and_then(teeway_wire::version_of_alpn)
    else {
        return Refused::Protocol(
            "no teeway protocol version agreed in the TLS handshake (agents offer ALPN teeway/6 to teeway/2)".into(),
        )
        .into();
    };
    Frame::Welcome(dispatcher.welcome(version, identity)).encode(&mut out);
    if let Err(end) = write(stream, &mut out).await {
        return end;
    }
    let mut batch: Vec<Envelope> = Vec::new();
    // Protocol 3: the name of the batch being read (`BATCH` before its first record).
    let mut batch_id = None;
    let mut held = share.hold();
    // A batch arrives whole within the stream timeout, from its first frame.
    let mut deadline = None;
    loop {
        let frame = match next_frame(stream, &mut buf, &mut buffered, deadline).await {
            Ok(frame) => frame,
            Err(end) => return end,
        };
        let frame = match super::record(frame, version) {
            Ok(record) => {
                let len = teeway_wire::envelope::encoded_len(&record);
                if held.bytes() as usize + len > MAX_STREAM_BYTES {
                    return Refused::TooLarge.into();
                }
                if !held.grow(len) {
                    return Refused::OverBudget.into();
                }
                deadline.get_or_insert_with(|| {
                    (
                        tokio::time::Instant::now() + share.stream_timeout(),
                        share.stream_timeout(),
                    )
                });
                batch.push(record);
                continue;
            }
            Err(other) => other,
        };
        match frame {
            Frame::End => {
                // A reload may have taken the agent off agents.allow.
                if !dispatcher.routing.load().allows(identity) {
                    dispatcher.unauthorized(identity);
                    return End::Gone("no longer in agents.allow".into());
                }
                let ack = dispatcher.take_batch(
                    version,
                    batch_id.take(),
                    std::mem::take(&mut batch),
                    identity,
                );
                held = share.hold();
                deadline = None;
                ack.encode(&mut out);
                if let Err(end) = write(stream, &mut out).await {
                    return end;
                }
            }
            Frame::Batch(id) if version >= 3 && batch.is_empty() && batch_id.is_none() => {
                batch_id = Some(id);
                deadline.get_or_insert_with(|| {
                    (
                        tokio::time::Instant::now() + share.stream_timeout(),
                        share.stream_timeout(),
                    )
                });
            }
            other => {
                return Refused::Protocol(format!(
                    "{} in a batch (a batch is records closed by END: REQUEST frames, ENVELOPE from protocol 5)",
                    name(&other)
                ))
                .into()
            }
        }
    }
}

fn name(frame: &Frame) -> &'static str {
    match frame {
        Frame::Hello(_) => "HELLO",
        Frame::Welcome(_) => "WELCOME",
        Frame::Request(_) => "REQUEST",
        Frame::Envelope(_) => "ENVELOPE",
        Frame::Ack { .. } => "ACK",
        Frame::End => "END",
        Frame::TcpOpen(_) => "TCP_OPEN (TCP tee streams need QUIC)",
        Frame::TcpData(_) => "TCP_DATA (TCP tee streams need QUIC)",
        Frame::Batch(_) => "BATCH (protocol 3: once, before a batch's records)",
    }
}

/// The next whole frame, reading as needed within the idle timeout (and the batch's
/// `deadline`, when one is under way). What `buf` holds is held in `buffered`.
async fn next_frame(
    stream: &mut TlsStream<TcpStream>,
    buf: &mut BytesMut,
    buffered: &mut Held,
    deadline: Option<(tokio::time::Instant, std::time::Duration)>,
) -> Result<Frame, End> {
    loop {
        let before = buf.len();
        match Frame::decode(buf) {
            Ok(Some(frame)) => {
                buffered.shrink(before - buf.len());
                return Ok(frame);
            }
            Ok(None) => {}
            Err(DecodeError::FrameTooLarge { .. }) => return Err(Refused::TooLarge.into()),
            Err(e) => return Err(Refused::Protocol(e.to_string()).into()),
        }
        let idle = tokio::time::Instant::now() + IDLE_TIMEOUT;
        let until = deadline.map_or(idle, |(d, _)| d.min(idle));
        let read = tokio::time::timeout_at(until, stream.read_buf(buf)).await;
        match read {
            Ok(Ok(0)) if buf.is_empty() => return Err(End::Gone("closed by the agent".into())),
            Ok(Ok(0)) => {
                return Err(Refused::Protocol(format!(
                    "connection ends inside a frame ({} bytes left)",
                    buf.len()
                ))
                .into())
            }
            Ok(Ok(n)) => {
                if !buffered.grow(n) {
                    return Err(Refused::OverBudget.into());
                }
            }
            Ok(Err(e)) => return Err(End::Gone(e.to_string())),
            Err(_) => {
                return Err(match deadline {
                    Some((d, after)) if d <= idle => Refused::Timeout(after).into(),
                    _ => End::Gone(format!("silent for {IDLE_TIMEOUT:?}")),
                })
            }
        }
    }
}

async fn write(stream: &mut TlsStream<TcpStream>, out: &mut BytesMut) -> Result<(), End> {
    let written = async {
        stream.write_all(out).await?;
        stream.flush().await
    };
    let result = tokio::time::timeout(WRITE_TIMEOUT, written).await;
    out.clear();
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(End::Gone(e.to_string())),
        Err(_) => Err(End::Gone(
            "the agent is not reading its acknowledgements".into(),
        )),
    }
}
