//! The QUIC listener: accepts agents by client certificate and reads their streams.
//!
//! An agent whose certificate does not chain to the gateway's CA (or that presents none) fails the
//! handshake; the refusal is logged with the peer address and counted. On an accepted connection
//! every bidirectional stream is read whole (bounded by [`MAX_STREAM_BYTES`](crate::budget::MAX_STREAM_BYTES)) and decoded: a
//! `HELLO` is answered with `WELCOME`; a batch of `REQUEST` frames is dispatched and answered with
//! `ACK`. A stream that breaks the protocol is reset with [`codes::PROTOCOL_ERROR`]: that stream
//! only, never the connection or the process.

use std::sync::Arc;

use bytes::BytesMut;
use quinn::{Connection, Endpoint, RecvStream, SendStream, VarInt};
use rustls::pki_types::CertificateDer;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use teeway_wire::{codes, DecodeError, Envelope, Frame, PROTOCOL_VERSION};

use crate::budget::ConnectionBudget;
use crate::budget::MAX_STREAM_BYTES;
use crate::dispatch::{Dispatcher, Refused};
use crate::tee_stream;

/// At shutdown, how long an answer already written may take to be acknowledged by its agent.
const ANSWER_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Accepts agent connections until `shutdown`.
pub async fn serve(endpoint: Endpoint, dispatcher: Arc<Dispatcher>, shutdown: CancellationToken) {
    let connections = TaskTracker::new();
    loop {
        let incoming = tokio::select! {
            () = shutdown.cancelled() => break,
            incoming = endpoint.accept() => match incoming {
                Some(i) => i,
                None => break,
            },
        };
        let peer = incoming.remote_address();
        let dispatcher = dispatcher.clone();
        let shutdown = shutdown.clone();
        connections.spawn(
            async move {
                let conn = match incoming.await {
                    Ok(c) => c,
                    Err(e) => {
                        dispatcher.refused_handshake(&e.to_string());
                        return;
                    }
                };
                serve_connection(conn, dispatcher, shutdown).await;
            }
            .instrument(tracing::info_span!("agent", %peer)),
        );
    }
    connections.close();
    connections.wait().await;
}

async fn serve_connection(
    conn: Connection,
    dispatcher: Arc<Dispatcher>,
    shutdown: CancellationToken,
) {
    let identity: Arc<str> = agent_identity(&conn)
        .unwrap_or_else(|| "(unnamed)".into())
        .into();
    if !dispatcher.routing.load().allows(&identity) {
        refuse(&conn, &identity, &dispatcher);
        return;
    }
    let share = match dispatcher.connection_budget(&identity) {
        Ok(share) => Arc::new(share),
        Err(why) => {
            conn.close(VarInt::from_u32(codes::OVERLOADED), why.as_bytes());
            return;
        }
    };
    dispatcher.metrics.handshakes_ok.increment(1);
    dispatcher.metrics.agents_connected.increment(1.0);
    let version = negotiated_version(&conn);
    let greeted = Arc::new(std::sync::atomic::AtomicBool::new(false));
    tracing::info!(%identity, protocol_version = version, "agent connected");
    let streams = TaskTracker::new();
    // Batches are dispatched in the order their streams were opened (see `Turn`).
    let mut previous = Turn::first();
    let reason = loop {
        tokio::select! {
            () = shutdown.cancelled() => break "gateway shutting down".to_owned(),
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    // A reload may have taken the agent off agents.allow.
                    if !dispatcher.routing.load().allows(&identity) {
                        refuse(&conn, &identity, &dispatcher);
                        break "no longer in agents.allow".to_owned();
                    }
                    let dispatcher = dispatcher.clone();
                    let identity = identity.clone();
                    let shutdown = shutdown.clone();
                    let share = share.clone();
                    let greeted = greeted.clone();
                    let (turn, next) = previous.next();
                    previous = next;
                    streams.spawn(async move {
                        let peer = Peer { dispatcher: &dispatcher, identity: &identity, version, shutdown: &shutdown, share: &share, greeted: &greeted };
                        serve_stream(send, recv, peer, turn).await
                    });
                }
                Err(e) => break e.to_string(),
            },
        }
    };
    streams.close();
    streams.wait().await;
    if shutdown.is_cancelled() {
        // Said, not implied by dropping the connection: the agent learns why at once.
        conn.close(VarInt::from_u32(codes::SHUTDOWN), b"gateway shutting down");
    }
    dispatcher.metrics.agents_connected.decrement(1.0);
    tracing::info!(%identity, %reason, "agent disconnected");
}

/// Longest a whole batch waits for the batches opened before it on its connection (see
/// [`Turn`]): far longer than a lost packet takes to be sent again, far shorter than an agent's
/// `ack_timeout` (15 s by default).
const ORDER_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// A stream's place in its connection's order of dispatch. Batches travel on streams of their
/// own and can arrive whole in another order than they were sent (a large one overtaken by a
/// small one): a batch that carries RPC copies is dispatched only once the streams opened before
/// it on the connection were dispatched or ended, so that an RPC client's requests are replayed
/// in its order. Other batches are dispatched as they arrive (bench scenarios 10 and 21 lost 3
/// to 8% of their HTTP copies to the bursts that holding every batch back made). A stream that ends without dispatching passes
/// its turn on when it comes; no stream waits more than [`ORDER_WAIT`] for its turn.
struct Turn {
    /// Resolves when the previous stream is done (its sender sent or dropped).
    mine: Option<tokio::sync::oneshot::Receiver<()>>,
    /// Tells the next stream it is its turn.
    next: Option<tokio::sync::oneshot::Sender<()>>,
}

/// The receiving end the next stream's turn waits on.
struct NextTurn(tokio::sync::oneshot::Receiver<()>);

impl Turn {
    /// The first stream's: nothing before it.
    fn first() -> NextTurn {
        let (tx, rx) = tokio::sync::oneshot::channel();
        drop(tx);
        NextTurn(rx)
    }

    /// Waits until the streams before this one are done.
    async fn wait(&mut self) {
        if let Some(mine) = self.mine.take() {
            let _ = mine.await;
        }
    }

    /// This stream is done: the next may dispatch.
    fn done(&mut self) {
        self.next.take();
    }
}

impl NextTurn {
    /// The turn of a new stream, after the one this came from; and what the stream after it
    /// waits on.
    fn next(self) -> (Turn, NextTurn) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (
            Turn {
                mine: Some(self.0),
                next: Some(tx),
            },
            NextTurn(rx),
        )
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        // Ended before its turn came (refused, a TCP tee stream, cut): the turn is passed on
        // when it comes, not before, so no later batch overtakes an earlier one.
        if let (Some(mine), Some(next)) = (self.mine.take(), self.next.take()) {
            tokio::spawn(async move {
                let _ = mine.await;
                drop(next);
            });
        }
    }
}

/// Closes the connection of an agent that `agents.allow` does not name, saying why.
fn refuse(conn: &Connection, identity: &str, dispatcher: &Dispatcher) {
    dispatcher.unauthorized(identity);
    conn.close(
        VarInt::from_u32(codes::NOT_AUTHORIZED),
        format!("agent identity {identity:?} is not in agents.allow").as_bytes(),
    );
}

/// The protocol version the connection's ALPN id chose: 1 for `teeway/1`, else this version.
fn negotiated_version(conn: &Connection) -> u16 {
    let alpn = conn
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol);
    alpn.as_deref()
        .and_then(teeway_wire::version_of_alpn)
        .unwrap_or(PROTOCOL_VERSION)
}

/// Who sent a stream, and what it may say.
#[derive(Clone, Copy)]
struct Peer<'a> {
    dispatcher: &'a Dispatcher,
    identity: &'a Arc<str>,
    /// Protocol version of the connection: TCP tee streams need 2.
    version: u16,
    shutdown: &'a CancellationToken,
    /// The connection's share of the memory budget.
    share: &'a ConnectionBudget,
    /// Whether the connection has said HELLO (once is the protocol).
    greeted: &'a std::sync::atomic::AtomicBool,
}

/// The identity in the agent's certificate (see [`teeway_wire::tls::peer_identity`]).
fn agent_identity(conn: &Connection) -> Option<String> {
    let chain = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    chain.first().and_then(teeway_wire::tls::peer_identity)
}

async fn serve_stream(mut send: SendStream, mut recv: RecvStream, peer: Peer<'_>, mut turn: Turn) {
    let Peer {
        dispatcher,
        identity,
        version,
        shutdown,
        share,
        greeted,
    } = peer;
    // Read until the first frame is known: a TCP tee stream is served as it arrives, any other
    // stream is read whole first, within the stream timeout and the memory budget.
    let mut buf = BytesMut::new();
    let mut held = share.hold();
    let mut frames = Vec::new();
    let mut problem = None;
    let deadline = tokio::time::Instant::now() + share.stream_timeout();
    loop {
        let read = tokio::time::timeout_at(deadline, recv.read_chunk(64 * 1024, true));
        let read = tokio::select! {
            // A batch still arriving at shutdown is not waited for (its agent may be gone, and
            // the stream would hold the exit for the stream timeout): nothing of it was
            // dispatched, and "no room" tells the agent to send it again.
            () = shutdown.cancelled() => {
                tracing::debug!(%identity, "batch still arriving at shutdown; abandoned for the agent to send again");
                reject(&mut send, &mut recv, codes::OVERLOADED);
                return;
            }
            read = read => read,
        };
        let chunk = match read {
            Ok(chunk) => chunk,
            Err(_) => {
                dispatcher.refuse_stream(identity, Refused::Timeout(share.stream_timeout()));
                reject(&mut send, &mut recv, codes::OVERLOADED);
                return;
            }
        };
        match chunk {
            Ok(Some(chunk)) => {
                if held.bytes() as usize + chunk.bytes.len() > MAX_STREAM_BYTES {
                    dispatcher.refuse_stream(identity, Refused::TooLarge);
                    reject(&mut send, &mut recv, codes::PROTOCOL_ERROR);
                    return;
                }
                // The bytes that arrived are charged: what is resident (a buffer's spare capacity
                // is not touched, so not resident), and never what a frame prefix announces.
                if !held.grow(chunk.bytes.len()) {
                    dispatcher.refuse_stream(identity, Refused::OverBudget);
                    reject(&mut send, &mut recv, codes::OVERLOADED);
                    return;
                }
                buf.extend_from_slice(&chunk.bytes);
                if frames.is_empty() && problem.is_none() {
                    match Frame::decode(&mut buf) {
                        Ok(Some(Frame::TcpOpen(open))) if version >= 2 => {
                            // A TCP tee stream lives as long as its connection: not in order.
                            drop(turn);
                            let buf = std::mem::take(&mut buf);
                            // The tee stream's own queues bound what it holds from here.
                            drop(held);
                            tee_stream::serve(
                                open, buf, send, recv, dispatcher, identity, shutdown,
                            )
                            .await;
                            return;
                        }
                        Ok(Some(frame)) => frames.push(frame),
                        Ok(None) => {}
                        Err(DecodeError::FrameTooLarge { len, max }) => {
                            // Announced, not sent: refused before anything more is read.
                            dispatcher.refuse_stream(identity, Refused::TooLarge);
                            tracing::debug!(%identity, len, max, "frame announced over the limit");
                            reject(&mut send, &mut recv, codes::PROTOCOL_ERROR);
                            return;
                        }
                        Err(e) => problem = Some(e.to_string()),
                    }
                }
            }
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(error = %e, "stream ended before it was complete");
                return;
            }
        }
    }
    let problem = problem.or_else(|| loop {
        match Frame::decode(&mut buf) {
            Ok(Some(frame)) => frames.push(frame),
            Ok(None) if buf.is_empty() => break None,
            Ok(None) => {
                break Some(format!(
                    "stream ends inside a frame ({} bytes left)",
                    buf.len()
                ))
            }
            Err(e) => break Some(e.to_string()),
        }
    });
    // Everything is read and decoded: the budget is given back before dispatch and the answer.
    drop(held);
    drop(buf);
    // Only batches that carry RPC copies keep their order: HTTP copies have none to keep, and
    // holding them back makes bursts (and, on a lossy link, head-of-line waits).
    let ordered = frames
        .iter()
        .any(|f| matches!(f, Frame::Envelope(Envelope::RpcRequest(_))));
    if ordered {
        tokio::select! {
        // A stream stuck short of its end (a link losing packets on it alone) holds the ones
        // after it no longer than this: past it they go out of order, not late.
        _ = tokio::time::timeout(ORDER_WAIT, turn.wait()) => {}
            // At shutdown nothing more is dispatched: the agent sends it again.
            () = shutdown.cancelled() => {
                reject(&mut send, &mut recv, codes::OVERLOADED);
                return;
            }
        }
    }
    let reply = match (problem, frames.first()) {
        (Some(problem), _) => Err(problem),
        (None, None) => Err("empty stream".to_owned()),
        (None, Some(Frame::Hello(_)))
            if frames.len() == 1 && greeted.swap(true, std::sync::atomic::Ordering::Relaxed) =>
        {
            Err("a second HELLO (an agent greets once per connection)".to_owned())
        }
        (None, Some(Frame::Hello(hello))) if frames.len() == 1 => {
            tracing::info!(
                %identity,
                source_cluster = %hello.source_cluster,
                agent_software = %hello.software,
                "agent greeted"
            );
            Ok(Frame::Welcome(dispatcher.welcome(version, identity)))
        }
        (None, Some(first))
            if super::is_record(first, version)
                && frames.iter().all(|f| super::is_record(f, version)) =>
        {
            let records = records(frames, version);
            Ok(dispatcher.take_batch(version, None, records, identity))
        }
        // Protocol 3: a named batch.
        (None, Some(Frame::Batch(id)))
            if version >= 3
                && frames.len() > 1
                && frames[1..].iter().all(|f| super::is_record(f, version)) =>
        {
            let id = *id;
            let records = records(frames, version);
            Ok(dispatcher.take_batch(version, Some(id), records, identity))
        }
        (None, Some(_)) => {
            Err("frames out of place (an agent sends one HELLO, or records: REQUEST frames, after a BATCH from protocol 3, ENVELOPE frames instead from protocol 5)".to_owned())
        }
    };
    if ordered {
        turn.done();
    } else {
        // Passed on when its turn comes, so no later RPC batch overtakes an earlier one.
        drop(turn);
    }
    match reply {
        Ok(frame) => {
            let mut out = BytesMut::new();
            frame.encode(&mut out);
            if let Err(e) = send.write_all(&out).await {
                tracing::debug!(error = %e, "could not answer the agent");
                return;
            }
            let _ = send.finish();
            // Wait until the answer is delivered before the stream is dropped (dropping the
            // connection discards what is unsent, and a dispatched batch whose ACK is lost is
            // one the agent sends again); at shutdown for [`ANSWER_GRACE`] at most, so that an
            // agent that vanished does not hold the exit until its connection times out.
            let grace = async {
                shutdown.cancelled().await;
                tokio::time::sleep(ANSWER_GRACE).await;
            };
            tokio::select! {
                _ = send.stopped() => {}
                () = grace => {}
            }
        }
        Err(problem) => {
            dispatcher.refuse_stream(identity, Refused::Protocol(problem));
            reject(&mut send, &mut recv, codes::PROTOCOL_ERROR);
        }
    }
}

/// The records of a batch's frames (the caller checked they are records, a `BATCH` aside).
fn records(frames: Vec<Frame>, version: u16) -> Vec<Envelope> {
    frames
        .into_iter()
        .filter_map(|f| super::record(f, version).ok())
        .collect()
}

fn reject(send: &mut SendStream, recv: &mut RecvStream, code: u32) {
    let code = VarInt::from_u32(code);
    let _ = recv.stop(code);
    let _ = send.reset(code);
}
