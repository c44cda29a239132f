//! A link: one authenticated, welcomed connection to one gateway address, over QUIC or over
//! TLS 1.3 on TCP, and the batch exchange on it.
//!
//! Both transports carry the same frames under the same mTLS identity (see `docs/protocol.md`):
//!
//! - **QUIC**: each batch is one bidirectional stream; the end of the stream ends the batch and
//!   the gateway answers with one `ACK`. Batches run concurrently.
//! - **TLS over TCP**, for networks that block UDP: one byte stream; each batch is its `REQUEST`
//!   frames followed by `END`, and the gateway answers each batch with one `ACK`, in order.
//!   Batches are pipelined: a writer task puts them on the wire as they come, a reader task
//!   matches each `ACK` to the oldest batch still waiting. While idle the writer sends an empty
//!   batch (a lone `END`) every [`KEEP_ALIVE`], and a link that hears nothing for
//!   [`IDLE_TIMEOUT`] is dead: TCP alone would take minutes to notice a vanished peer.
//!
//! `transport: auto` tries QUIC first; when QUIC has not answered within [`AUTO_TLS_HEADSTART`]
//! (UDP dropped on the way) TLS over TCP is tried beside it and the first welcomed wins, and when
//! QUIC fails before TLS is reached TLS is tried at once.
//!
//! **Long-haul links.** QUIC runs BBR, not quinn's default CUBIC: CUBIC reads every lost datagram
//! as congestion, and on an 80 ms path losing 2% of datagrams it settled at a few hundred KiB/s;
//! BBR paces by the bandwidth and round trip it measures, so random loss costs little. Whether a
//! link still carries anything is read from [`Link::heard`]: datagrams received on QUIC (the
//! gateway acknowledges every packet within a few milliseconds), bytes read on TLS.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use quinn::crypto::rustls::QuicClientConfig;
use quinn::{Connection, Endpoint, VarInt};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::client::TlsStream;
use tokio_util::sync::CancellationToken;

use teeway_wire::tls::TlsMaterial;
use teeway_wire::{codes, Frame, Hello, Shed, Welcome, PROTOCOL_VERSION};

use crate::error::UplinkError;

/// Keep-alive on an idle link, so links through NATs and load balancers stay open and a dead
/// peer is noticed.
pub const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// A link silent for this long is dead.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// With `transport: auto`, how long QUIC has to answer before TLS over TCP is tried.
pub const AUTO_QUIC_TIMEOUT: Duration = Duration::from_secs(2);
/// With `transport: auto`, how long QUIC is tried alone before TLS over TCP is tried beside it
/// (the first to be welcomed wins; QUIC, when both would be, since it starts first).
pub const AUTO_TLS_HEADSTART: Duration = Duration::from_secs(1);
/// With `transport: auto`, how long the TLS fallback has to connect. Shorter than a lone
/// transport's handshake time so that, while the path is cut, attempts cycle back to QUIC
/// often: a link that returns is found within about this long, not after TCP's backed-off SYNs.
pub const AUTO_TLS_TIMEOUT: Duration = Duration::from_secs(4);
/// QUIC's first round-trip estimate. Lower than the RFC's 333 ms so that a handshake whose first
/// packets met a gateway still restarting is retried within about 300 ms; replaced by the
/// measured RTT after the first exchange, so long-haul links are not misjudged.
const INITIAL_RTT: Duration = Duration::from_millis(100);
/// What the TLS writer hands TCP at once; each piece taken counts as hearing from the gateway.
const WRITE_PIECE: usize = 64 * 1024;
/// Largest reply read on a QUIC stream (a `WELCOME` or an `ACK`).
const MAX_REPLY_BYTES: usize = 64 * 1024;

/// Which transport the uplink uses (`gateway.transport`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// QUIC over UDP only.
    Quic,
    /// TLS 1.3 over TCP only.
    Tls,
    /// QUIC, falling back to TLS over TCP per connection attempt.
    #[default]
    Auto,
}

impl Transport {
    /// The configuration value.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Quic => "quic",
            Transport::Tls => "tls",
            Transport::Auto => "auto",
        }
    }
}

/// The client configurations for both transports, built from one set of TLS material and
/// swapped together by a certificate reload.
#[derive(Clone)]
pub struct ClientConfigs {
    quic: quinn::ClientConfig,
    tls: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for ClientConfigs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfigs").finish_non_exhaustive()
    }
}

impl ClientConfigs {
    /// mTLS for both transports; QUIC with keep-alive and idle timeout.
    pub fn new(material: &TlsMaterial) -> Result<Self, UplinkError> {
        let tls = Arc::new(teeway_wire::tls::client_config(material)?);
        let quic = QuicClientConfig::try_from(rustls::ClientConfig::clone(&tls))
            .map_err(|e| UplinkError::Tls(e.to_string()))?;
        let mut quic = quinn::ClientConfig::new(Arc::new(quic));
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(KEEP_ALIVE));
        transport.initial_rtt(INITIAL_RTT);
        transport.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
        transport.max_idle_timeout(Some(
            IDLE_TIMEOUT
                .try_into()
                .map_err(|_| UplinkError::Tls("idle timeout out of range".into()))?,
        ));
        quic.transport_config(Arc::new(transport));
        Ok(Self { quic, tls })
    }
}

/// What a link needs to connect.
pub struct Dialer<'a> {
    /// Client configurations in force.
    pub configs: &'a ClientConfigs,
    /// Name the gateway's certificate must carry.
    pub server_name: &'a str,
    /// The agent's `cluster`, sent in `HELLO`.
    pub source_cluster: &'a str,
    /// Time allowed for one handshake (transport, TLS and `HELLO` / `WELCOME`).
    pub timeout: Duration,
}

/// A batch's acknowledgement: how many of its records the gateway accepted, and which of those
/// it shed (protocol 6).
pub type Acked = (u32, Shed);

/// How a batch ended, short of an acknowledgement.
#[derive(Debug)]
pub enum BatchFailure {
    /// The gateway refused the batch (it stopped or reset the stream, or answered oddly).
    Rejected(String),
    /// The link failed before the acknowledgement came.
    Transport(String),
    /// The gateway had no room for the batch now (`OVERLOADED`): worth sending again.
    Busy(String),
}

/// One welcomed connection to one gateway. Cloning shares the connection.
#[derive(Clone, Debug)]
pub enum Link {
    /// A QUIC connection.
    Quic(Connection),
    /// A TLS-over-TCP connection.
    Tls(TlsLink),
}

impl Link {
    /// Connects to `addr` over `transport` and greets the gateway; `Ok` only once it has
    /// answered `HELLO` with `WELCOME`.
    pub async fn connect(
        addr: SocketAddr,
        transport: Transport,
        dialer: &Dialer<'_>,
        endpoint: impl FnOnce() -> Result<Endpoint, UplinkError>,
    ) -> Result<(Link, Welcome), UplinkError> {
        let quic = |timeout: Duration, endpoint: Endpoint| async move {
            match tokio::time::timeout(timeout, connect_quic(addr, dialer, endpoint)).await {
                Ok(result) => result,
                Err(_) => Err(UplinkError::Timeout {
                    addr,
                    after: timeout,
                }),
            }
        };
        let tls = |timeout: Duration| async move {
            match tokio::time::timeout(timeout, connect_tls(addr, dialer)).await {
                Ok(result) => result,
                Err(_) => Err(UplinkError::Timeout {
                    addr,
                    after: timeout,
                }),
            }
        };
        match transport {
            Transport::Quic => quic(dialer.timeout, endpoint()?).await,
            Transport::Tls => tls(dialer.timeout).await,
            Transport::Auto => {
                let both = |quic: UplinkError, tls: UplinkError| UplinkError::BothTransports {
                    addr,
                    quic: quic.to_string(),
                    tls: tls.to_string(),
                };
                let tls_timeout = AUTO_TLS_TIMEOUT.min(dialer.timeout);
                let quic_attempt = quic(AUTO_QUIC_TIMEOUT, endpoint()?);
                tokio::pin!(quic_attempt);
                // QUIC alone first; TLS joins the race if QUIC has not answered by then.
                match tokio::time::timeout(AUTO_TLS_HEADSTART, &mut quic_attempt).await {
                    Ok(Ok(pair)) => return Ok(pair),
                    // The gateway answered over QUIC and refused us: TCP would hear the same.
                    Ok(Err(e @ UplinkError::Refused { .. })) => return Err(e),
                    Ok(Err(quic_error)) => {
                        tracing::debug!(%addr, error = %quic_error, "QUIC failed; trying TLS over TCP");
                        return tls(tls_timeout).await.map_err(|e| both(quic_error, e));
                    }
                    Err(_) => {}
                }
                let tls_attempt = tls(tls_timeout);
                tokio::pin!(tls_attempt);
                tokio::select! {
                    biased;
                    result = &mut quic_attempt => match result {
                        Ok(pair) => Ok(pair),
                        Err(e @ UplinkError::Refused { .. }) => Err(e),
                        Err(quic_error) => tls_attempt.await.map_err(|e| both(quic_error, e)),
                    },
                    result = &mut tls_attempt => match result {
                        Ok(pair) => {
                            tracing::debug!(%addr, "no answer over QUIC; TLS over TCP answered");
                            Ok(pair)
                        }
                        Err(tls_error) => quic_attempt.await.map_err(|e| both(e, tls_error)),
                    },
                }
            }
        }
    }

    /// `quic` or `tls`, for logs and metrics.
    pub fn transport(&self) -> &'static str {
        match self {
            Link::Quic(_) => "quic",
            Link::Tls(_) => "tls",
        }
    }

    /// Resolves when the link is gone; returns why.
    pub async fn closed(&self) -> String {
        match self {
            Link::Quic(c) => c.closed().await.to_string(),
            Link::Tls(t) => {
                t.inner.closed.cancelled().await;
                t.reason()
            }
        }
    }

    /// Whether `other` is this same connection.
    pub fn same(&self, other: &Link) -> bool {
        match (self, other) {
            (Link::Quic(a), Link::Quic(b)) => a.stable_id() == b.stable_id(),
            (Link::Tls(a), Link::Tls(b)) => Arc::ptr_eq(&a.inner, &b.inner),
            _ => false,
        }
    }

    /// Whether the link is gone (a batch sent on it again would fail at once).
    pub fn is_closed(&self) -> bool {
        match self {
            Link::Quic(c) => c.close_reason().is_some(),
            Link::Tls(t) => t.inner.closed.is_cancelled(),
        }
    }

    /// A count that moves while the gateway is heard from: datagrams received on QUIC (each
    /// packet the agent sends is acknowledged within the peer's ACK delay); on TLS, reads
    /// (acknowledgements and keep-alive answers) and each 64 KiB that TCP took of a batch (the
    /// socket's buffer drains only as the gateway acknowledges). A link with batches out whose
    /// count stands still carries nothing.
    pub fn heard(&self) -> u64 {
        match self {
            Link::Quic(c) => c.stats().udp_rx.datagrams,
            Link::Tls(t) => t.inner.heard.load(Ordering::Relaxed),
        }
    }

    /// Closes the link on purpose.
    pub fn close(&self, reason: &'static str) {
        match self {
            Link::Quic(c) => c.close(VarInt::from_u32(codes::SHUTDOWN), reason.as_bytes()),
            Link::Tls(t) => t.shut(reason),
        }
    }

    /// Sends one batch (encoded records) and waits for its acknowledgement.
    /// `head` (a `BATCH` frame, or nothing) goes before `frames`; both are handed to the
    /// transport as they are, never copied into one buffer (a batch sent again costs no copy).
    pub async fn send_batch(&self, head: Bytes, frames: Bytes) -> Result<Acked, BatchFailure> {
        match self {
            Link::Quic(c) => exchange_quic(c, head, frames).await,
            Link::Tls(t) => t.exchange(head, frames).await,
        }
    }
}

async fn connect_quic(
    addr: SocketAddr,
    dialer: &Dialer<'_>,
    endpoint: Endpoint,
) -> Result<(Link, Welcome), UplinkError> {
    let conn = endpoint
        .connect_with(dialer.configs.quic.clone(), addr, dialer.server_name)
        .map_err(|e| UplinkError::Connect { addr, source: e })?
        .await
        .map_err(|e| UplinkError::Connection { addr, source: e })?;
    let welcome = greet_quic(&conn, dialer.source_cluster)
        .await
        .inspect_err(|_| {
            conn.close(VarInt::from_u32(codes::PROTOCOL_ERROR), b"handshake failed");
        })?;
    Ok((Link::Quic(conn), welcome))
}

fn hello(source_cluster: &str) -> BytesMut {
    let mut buf = BytesMut::new();
    Frame::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        source_cluster: source_cluster.to_owned(),
        software: concat!("teeway ", env!("CARGO_PKG_VERSION")).to_owned(),
    })
    .encode(&mut buf);
    buf
}

fn welcome_from(addr: SocketAddr, frame: Option<Frame>) -> Result<Welcome, UplinkError> {
    match frame {
        // Version 2 too: a gateway not yet upgraded (its batches are then not named).
        Some(Frame::Welcome(w)) if (2..=PROTOCOL_VERSION).contains(&w.protocol_version) => Ok(w),
        Some(Frame::Welcome(w)) => Err(UplinkError::Refused {
            addr,
            detail: format!(
                "gateway speaks protocol version {}, this agent {PROTOCOL_VERSION}",
                w.protocol_version
            ),
        }),
        _ => Err(UplinkError::Refused {
            addr,
            detail: "the gateway did not answer HELLO with WELCOME".into(),
        }),
    }
}

/// `HELLO` / `WELCOME` on the first stream. A gateway that refused our certificate closes the
/// connection here, so this is where a refused agent finds out.
async fn greet_quic(conn: &Connection, source_cluster: &str) -> Result<Welcome, UplinkError> {
    let addr = conn.remote_address();
    // The gateway refuses by closing the connection; why is in the close, not in the read error.
    let refused = |detail: String| UplinkError::Refused {
        addr,
        detail: conn.close_reason().map_or(detail, |c| close_reason(&c)),
    };
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| UplinkError::Connection { addr, source: e })?;
    send.write_all(&hello(source_cluster))
        .await
        .map_err(|e| refused(e.to_string()))?;
    let _ = send.finish();
    let reply = recv
        .read_to_end(MAX_REPLY_BYTES)
        .await
        .map_err(|e| refused(e.to_string()))?;
    let frame = Frame::decode(&mut BytesMut::from(&reply[..])).map_err(UplinkError::Protocol)?;
    welcome_from(addr, frame)
}

/// Why a gateway closed the connection, in an operator's words: a refused certificate by its
/// TLS alert (with what to do), a refusal by `agents.allow` by the gateway's own reason.
pub(crate) fn close_reason(close: &quinn::ConnectionError) -> String {
    match close {
        quinn::ConnectionError::ConnectionClosed(c) => {
            let code = u64::from(c.error_code);
            // QUIC carries TLS alerts as CRYPTO_ERROR 0x100 + alert (RFC 9001 §4.8).
            if (0x100..0x200).contains(&code) {
                let alert = code - 0x100;
                return format!(
                    "the gateway refused this agent's certificate (TLS alert {alert}): {}",
                    alert_advice(alert)
                );
            }
            format!("the gateway closed the connection: {c}")
        }
        quinn::ConnectionError::ApplicationClosed(a) => format!(
            "the gateway closed the connection (code {}): {}",
            a.error_code,
            String::from_utf8_lossy(&a.reason)
        ),
        other => other.to_string(),
    }
}

/// A TLS-over-TCP error naming the alert the gateway sent (rustls: `received fatal alert:
/// DecryptError`), with what it means, as the QUIC path says it.
fn with_tls_alert_advice(detail: String) -> String {
    const ALERTS: [(&str, u64); 7] = [
        ("BadCertificate", 42),
        ("UnsupportedCertificate", 43),
        ("CertificateExpired", 45),
        ("CertificateUnknown", 46),
        ("UnknownCA", 48),
        ("DecryptError", 51),
        ("CertificateRequired", 116),
    ];
    let Some((_, name)) = detail.split_once("received fatal alert: ") else {
        return detail;
    };
    let name = name
        .split(|c: char| !c.is_ascii_alphanumeric())
        .next()
        .unwrap_or("");
    match ALERTS.iter().find(|(n, _)| *n == name) {
        Some((_, alert)) => format!(
            "the gateway refused this agent's certificate (TLS alert {alert}): {}",
            alert_advice(*alert)
        ),
        None => detail,
    }
}

/// What a TLS alert from the gateway means for this agent's configuration.
pub(crate) fn alert_advice(alert: u64) -> &'static str {
    match alert {
        42 => "bad_certificate: the gateway could not use it; check gateway.cert and gateway.key belong together",
        43 => "unsupported_certificate: it is not a client certificate (extendedKeyUsage clientAuth); issue it with `teeway certs issue --agent-name`",
        45 => "certificate_expired: gateway.cert has expired or is not yet valid; renew it and check the clocks",
        46 => "certificate_unknown: the gateway does not accept it; check it was issued by the gateway's CA",
        48 => "unknown_ca: gateway.cert is not signed by a CA the gateway trusts (its tls.ca); issue it from that CA",
        51 => "decrypt_error: gateway.cert's signature does not verify against the gateway's tls.ca (issued by another CA?); issue it from that CA",
        116 => "certificate_required: gateway.cert was not presented",
        _ => "see the gateway's log for the cause",
    }
}

async fn exchange_quic(
    conn: &Connection,
    head: Bytes,
    frames: Bytes,
) -> Result<Acked, BatchFailure> {
    let transport = |e: &dyn std::fmt::Display| BatchFailure::Transport(e.to_string());
    let (send, mut recv) = conn.open_bi().await.map_err(|e| transport(&e))?;
    let refused = |code: VarInt, how: &str| {
        let detail = format!("stream {how} with code {code}");
        if code.into_inner() == u64::from(codes::OVERLOADED) {
            BatchFailure::Busy(detail)
        } else {
            BatchFailure::Rejected(detail)
        }
    };
    // Given up part way (the acknowledgement timed out while writing), the stream is reset, not
    // finished: a finished stream means "these are all the bytes", and a cut batch must never
    // read as a whole one.
    let mut guard = ResetOnDrop(Some(send));
    let Some(send) = guard.0.as_mut() else {
        return Err(transport(&"stream gone"));
    };
    match send.write_all_chunks(&mut [head, frames]).await {
        Ok(()) => {}
        Err(quinn::WriteError::Stopped(code)) => return Err(refused(code, "stopped")),
        Err(e) => return Err(transport(&e)),
    }
    send.finish().map_err(|e| transport(&e))?;
    guard.0 = None;
    let reply = match recv.read_to_end(MAX_REPLY_BYTES).await {
        Ok(reply) => reply,
        Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code))) => {
            return Err(refused(code, "reset"));
        }
        Err(e) => return Err(transport(&e)),
    };
    match Frame::decode(&mut BytesMut::from(&reply[..])) {
        Ok(Some(Frame::Ack { accepted, shed })) => Ok((accepted, shed)),
        Ok(_) => Err(BatchFailure::Rejected(
            "the gateway's reply was not an ACK".into(),
        )),
        Err(e) => Err(BatchFailure::Rejected(format!("undecodable reply: {e}"))),
    }
}

/// Resets a batch stream dropped before it was finished.
struct ResetOnDrop(Option<quinn::SendStream>);

impl Drop for ResetOnDrop {
    fn drop(&mut self) {
        if let Some(mut send) = self.0.take() {
            let _ = send.reset(VarInt::from_u32(codes::ABANDONED));
        }
    }
}

/// A TLS-over-TCP link: a writer task and a reader task around one TLS stream.
#[derive(Clone, Debug)]
pub struct TlsLink {
    inner: Arc<TlsInner>,
}

#[derive(Debug)]
struct TlsInner {
    /// Batches for the writer, each with where its acknowledgement goes.
    batches_tx: mpsc::Sender<Outgoing>,
    /// Cancelled when either task ends or the link is closed on purpose.
    closed: CancellationToken,
    reason: std::sync::Mutex<Option<String>>,
    /// Reads from the gateway so far (see [`Link::heard`]).
    heard: Arc<AtomicU64>,
}

type AckTx = oneshot::Sender<Acked>;

#[derive(Debug)]
struct Outgoing {
    head: Bytes,
    frames: Bytes,
    ack: AckTx,
}

impl Drop for TlsInner {
    fn drop(&mut self) {
        // The last handle is gone: stop both tasks.
        self.closed.cancel();
    }
}

impl TlsLink {
    async fn exchange(&self, head: Bytes, frames: Bytes) -> Result<Acked, BatchFailure> {
        let (ack, ack_rx) = oneshot::channel();
        let lost = || BatchFailure::Transport(format!("link lost: {}", self.reason()));
        self.inner
            .batches_tx
            .send(Outgoing { head, frames, ack })
            .await
            .map_err(|_| lost())?;
        ack_rx.await.map_err(|_| lost())
    }

    fn reason(&self) -> String {
        self.inner
            .reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_else(|| "closed".to_owned())
    }

    fn shut(&self, reason: &str) {
        set_reason(&self.inner.reason, reason);
        self.inner.closed.cancel();
    }
}

fn set_reason(slot: &std::sync::Mutex<Option<String>>, reason: &str) {
    let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
    if slot.is_none() {
        *slot = Some(reason.to_owned());
    }
}

async fn connect_tls(
    addr: SocketAddr,
    dialer: &Dialer<'_>,
) -> Result<(Link, Welcome), UplinkError> {
    let io = |e: std::io::Error| UplinkError::Tcp {
        addr,
        detail: e.to_string(),
    };
    let tcp = TcpStream::connect(addr).await.map_err(io)?;
    tcp.set_nodelay(true).map_err(io)?;
    let name = ServerName::try_from(dialer.server_name.to_owned())
        .map_err(|e| UplinkError::Tls(format!("server_name {:?}: {e}", dialer.server_name)))?;
    let mut stream = tokio_rustls::TlsConnector::from(dialer.configs.tls.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| UplinkError::Tcp {
            addr,
            detail: format!("TLS handshake: {e}"),
        })?;
    let refused = |detail: String| UplinkError::Refused {
        addr,
        detail: with_tls_alert_advice(detail),
    };
    stream
        .write_all(&hello(dialer.source_cluster))
        .await
        .map_err(|e| refused(e.to_string()))?;
    stream.flush().await.map_err(|e| refused(e.to_string()))?;
    // With TLS 1.3 the server judges our certificate after our handshake is done: a refusal
    // arrives here, as an alert or a closed stream.
    let mut buf = BytesMut::with_capacity(1024);
    let frame = loop {
        if let Some(frame) = Frame::decode(&mut buf).map_err(UplinkError::Protocol)? {
            break Some(frame);
        }
        match stream.read_buf(&mut buf).await {
            Ok(0) => break None,
            Ok(_) => {}
            Err(e) => return Err(refused(e.to_string())),
        }
    };
    let welcome = match frame {
        None => {
            return Err(refused(
                "the gateway closed the connection without WELCOME (certificate refused or \
                 identity not in agents.allow: see the gateway's log)"
                    .into(),
            ))
        }
        frame => welcome_from(addr, frame)?,
    };
    let (read, write) = tokio::io::split(stream);
    let (batches_tx, batches_rx) = mpsc::channel(8);
    let (pending_tx, pending_rx) = mpsc::unbounded_channel();
    let closed = CancellationToken::new();
    let heard = Arc::new(AtomicU64::new(0));
    let inner = Arc::new(TlsInner {
        batches_tx,
        closed: closed.clone(),
        reason: std::sync::Mutex::new(None),
        heard: heard.clone(),
    });
    let link = TlsLink {
        inner: inner.clone(),
    };
    // The tasks hold a weak handle: when every link handle is gone, they stop.
    let weak = Arc::downgrade(&inner);
    drop(inner);
    let report = move |why: String| {
        if let Some(inner) = weak.upgrade() {
            set_reason(&inner.reason, &why);
        }
    };
    let report_w = report.clone();
    let heard_w = heard.clone();
    let closed_w = closed.clone();
    tokio::spawn(async move {
        let why = tls_writer(write, batches_rx, pending_tx, &closed_w, &heard_w).await;
        report_w(why);
        closed_w.cancel();
    });
    let closed_r = closed.clone();
    tokio::spawn(async move {
        let why = tls_reader(read, buf, pending_rx, &closed_r, &heard).await;
        report(why);
        closed_r.cancel();
    });
    Ok((Link::Tls(link), welcome))
}

/// Puts batches on the wire, each closed by `END`, and an empty batch every [`KEEP_ALIVE`]
/// while idle. Each batch's acknowledgement slot goes to the reader before its bytes go out.
async fn tls_writer(
    mut write: WriteHalf<TlsStream<TcpStream>>,
    mut batches_rx: mpsc::Receiver<Outgoing>,
    pending_tx: mpsc::UnboundedSender<Option<AckTx>>,
    closed: &CancellationToken,
    heard: &AtomicU64,
) -> String {
    let mut end = BytesMut::new();
    Frame::End.encode(&mut end);
    let end = end.freeze();
    loop {
        let next = tokio::select! {
            () = closed.cancelled() => {
                let _ = write.shutdown().await;
                return "closed".into();
            }
            next = tokio::time::timeout(KEEP_ALIVE, batches_rx.recv()) => next,
        };
        let (head, frames, ack) = match next {
            Ok(Some(out)) => (out.head, out.frames, Some(out.ack)),
            Ok(None) => return "closed".into(),
            Err(_) => (Bytes::new(), Bytes::new(), None),
        };
        if pending_tx.send(ack).is_err() {
            return "reader stopped".into();
        }
        // In pieces, each counted as heard: TCP taking bytes means the gateway acknowledges
        // them, so a slow upload is progress, not a stalled link.
        let written = async {
            write.write_all(&head).await?;
            for piece in frames.chunks(WRITE_PIECE) {
                write.write_all(piece).await?;
                heard.fetch_add(1, Ordering::Relaxed);
            }
            write.write_all(&end).await?;
            write.flush().await
        };
        let result = tokio::select! {
            () = closed.cancelled() => return "closed".into(),
            r = tokio::time::timeout(IDLE_TIMEOUT, written) => r,
        };
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return format!("write failed: {e}"),
            Err(_) => return format!("nothing could be written for {IDLE_TIMEOUT:?}"),
        }
    }
}

/// Reads `ACK`s and resolves the oldest waiting batch with each.
async fn tls_reader(
    mut read: ReadHalf<TlsStream<TcpStream>>,
    mut buf: BytesMut,
    mut pending_rx: mpsc::UnboundedReceiver<Option<AckTx>>,
    closed: &CancellationToken,
    heard: &AtomicU64,
) -> String {
    let mut waiting: VecDeque<Option<AckTx>> = VecDeque::new();
    loop {
        loop {
            match Frame::decode(&mut buf) {
                Ok(Some(Frame::Ack { accepted, shed })) => {
                    while let Ok(p) = pending_rx.try_recv() {
                        waiting.push_back(p);
                    }
                    match waiting.pop_front() {
                        Some(Some(ack)) => {
                            let _ = ack.send((accepted, shed));
                        }
                        Some(None) => {} // a keep-alive
                        None => return "the gateway acknowledged a batch never sent".into(),
                    }
                }
                Ok(Some(other)) => return format!("unexpected frame from the gateway: {other:?}"),
                Ok(None) => break,
                Err(e) => return format!("invalid frame from the gateway: {e}"),
            }
        }
        let read = tokio::select! {
            () = closed.cancelled() => return "closed".into(),
            r = tokio::time::timeout(IDLE_TIMEOUT, read.read_buf(&mut buf)) => r,
        };
        match read {
            Ok(Ok(0)) => return "the gateway closed the connection".into(),
            Ok(Ok(_)) => {
                heard.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(e)) => return format!("read failed: {e}"),
            Err(_) => return format!("nothing heard from the gateway for {IDLE_TIMEOUT:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gateway_of_version_2_to_4_is_spoken_to_and_older_or_newer_are_not() {
        let addr: SocketAddr = "127.0.0.1:4433".parse().expect("addr");
        let welcome = |v: u16| {
            Some(Frame::Welcome(Welcome {
                protocol_version: v,
                agent_identity: "prod".into(),
                software: "teeway".into(),
                gateway_instance: 0,
            }))
        };
        assert!(
            welcome_from(addr, welcome(2)).is_ok(),
            "a gateway not yet upgraded"
        );
        assert!(welcome_from(addr, welcome(PROTOCOL_VERSION)).is_ok());
        assert!(welcome_from(addr, welcome(1)).is_err());
        assert!(welcome_from(addr, welcome(PROTOCOL_VERSION + 1)).is_err());
        assert!(welcome_from(addr, None).is_err());
    }

    #[test]
    fn tls_alerts_get_the_advice_quic_alerts_get() {
        let text = with_tls_alert_advice("TLS handshake: received fatal alert: UnknownCA".into());
        assert!(text.contains("TLS alert 48"), "{text}");
        assert!(text.contains("unknown_ca"), "{text}");
        let other = "connection refused".to_owned();
        assert_eq!(with_tls_alert_advice(other.clone()), other);
    }
}
