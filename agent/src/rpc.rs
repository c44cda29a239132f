//! Per-request RPC mirroring (`rpc:` listeners): a byte proxy to the primary that finds each
//! request in what its clients send, and copies the chosen ones, one by one, to the gateway.
//! Redis commands are read with the RESP scanner and the connection's session (`SELECT`,
//! transactions) followed; Thrift calls with the Thrift scanner, in the transport and protocol
//! the connection's first bytes tell; Dubbo invocations by their header and Hessian2 body, their
//! attachments scrubbed (`redact`) before a copy is made, heartbeats and events never copied.
//!
//! ```text
//! client ──▶ read ──▶ write ─────────────────────────────────────▶ primary
//!                └──▶ scanner: a request ended ─▶ session, policy ─▶ Outlet (queue, uplink)
//! client ◀───────────────────────────────────────────────────────── primary
//! ```
//!
//! **Production's bytes are never touched.** What a client sends is written to the primary as it
//! was read, before anything is decided; the codec ([`teeway_rpc`]) reads beside it. A request
//! is copied once it has passed whole, so what the copy carries is exactly what the primary got.
//! A stream the codec cannot follow (a protocol error) is proxied on untouched: its later
//! requests are neither counted nor copied, the connection is counted in
//! `teeway_agent_rpc_unparsable_total` and logged (one line a minute at most).
//!
//! **Memory is bounded per connection**: a request is kept until it ends only up to
//! `max_message_bytes`; past that its bytes go on to the primary and are dropped here, the codec
//! still following them, and the request counts as `message_too_large` if it would have been
//! copied. Copies are held against `mirror.queue_bytes` like HTTP copies.
//!
//! **Every request is accounted for**, per listener, as for HTTP (see [`crate::metrics`]):
//! `teeway_agent_rpc_requests_total = not_sampled + mirrored + dropped{reason} + in_flight +
//! spooled`.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::{Buf, BytesMut};
use metrics::Counter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use teeway_rpc::dubbo;
use teeway_rpc::redis::{Command, Scanner, Session, Side};
use teeway_rpc::thrift::{self, MessageType};
use teeway_runtime::connect::UpstreamConnector;
use teeway_runtime::dns::Resolver;
use teeway_runtime::logging::Throttle;
use teeway_runtime::metrics::Registry;
use teeway_wire::{Frame, RpcCall, RpcProtocol};

use crate::metrics::DropReason;
use crate::rpc_policy::{self as policy, Call};
use crate::tee::Outlet;

pub use crate::rpc_policy::{
    rpc_block, Commands, KeyPattern, RpcListenerConfig, RpcPolicy, RpcPolicyConfig, RpcRuleConfig,
    DEFAULT_MAX_MESSAGE_BYTES, RPC_PACE_RATIO, RPC_RULE_MATCHED_TOTAL,
};

/// Largest read from a client at once.
const READ_SIZE: usize = 16 * 1024;
/// A connection's buffer beyond this is let go once it is empty.
const KEPT_BUFFER: usize = 64 * 1024;
/// Time allowed to connect to the primary.
const PRIMARY_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Client connections an `rpc:` listener accepted.
pub const RPC_CONNECTIONS_TOTAL: &str = "teeway_agent_rpc_connections_total";
/// Connections whose stream the codec could not follow: proxied on, their later requests
/// neither counted nor copied.
pub const RPC_UNPARSABLE_TOTAL: &str = "teeway_agent_rpc_unparsable_total";
/// Connections closed because the primary could not be reached.
pub const RPC_PRIMARY_ERRORS_TOTAL: &str = "teeway_agent_rpc_primary_errors_total";

/// One `rpc:` listener: its settings, policy, counters and outlet.
pub struct RpcTap {
    name: String,
    protocol: RpcProtocol,
    /// The policy in force; swapped whole by a reload.
    policy: Arc<ArcSwap<RpcPolicy>>,
    out: Outlet,
    primary: UpstreamConnector,
    connections: Counter,
    unparsable: Counter,
    unparsable_log: Throttle,
    primary_errors: Counter,
    primary_error_log: Throttle,
    /// Numbers client connections: copies name theirs, so that the gateway keeps their order.
    next_connection: AtomicU64,
}

impl std::fmt::Debug for RpcTap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcTap")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl RpcTap {
    /// The tap of the listener `config`, deciding under `policy` and copying through `out`.
    pub fn new(
        config: &RpcListenerConfig,
        policy: Arc<ArcSwap<RpcPolicy>>,
        out: Outlet,
        resolver: Resolver,
        registry: &Registry,
    ) -> Self {
        let one = |name, help| registry.counter_owned(name, help, "listener", &config.name);
        Self {
            name: config.name.clone(),
            protocol: config.protocol,
            policy,
            out,
            primary: UpstreamConnector::new(
                &config.primary.0,
                config.primary.1,
                resolver,
                PRIMARY_CONNECT_TIMEOUT,
                None,
            ),
            connections: one(
                RPC_CONNECTIONS_TOTAL,
                "Client connections an rpc listener accepted",
            ),
            unparsable: one(
                RPC_UNPARSABLE_TOTAL,
                "rpc connections whose stream the codec could not follow (proxied on, later requests not counted)",
            ),
            unparsable_log: Throttle::named(format!(
                "rpc listener {}: streams the codec could not follow",
                config.name
            )),
            primary_errors: one(
                RPC_PRIMARY_ERRORS_TOTAL,
                "rpc connections closed because the primary could not be reached",
            ),
            primary_error_log: Throttle::named(format!(
                "rpc primary connections failed on listener {}",
                config.name
            )),
            next_connection: AtomicU64::new(1),
        }
    }

    /// The listener's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// One whole request, as the client sent it, read by `reader`, decided under `policy`.
    fn request(
        &self,
        policy: &RpcPolicy,
        message: &[u8],
        read: &mut ReadAt,
        connection: u64,
        reader: &mut Reader,
    ) {
        match reader {
            Reader::Redis { session, .. } => {
                let Some(command) = Command::parse(message, policy::MAX_ARGS) else {
                    return; // an empty command: servers ignore it, and so does the count
                };
                let copyable = session.follow(&command);
                let db = session.db;
                let copy = Copy {
                    message: Cow::Borrowed(message),
                    connection,
                    variant: 0,
                    attachments: if db == 0 {
                        Vec::new()
                    } else {
                        vec![("db".to_owned(), db.to_string())]
                    },
                };
                let method = || match command.info().name {
                    Some(name) => name.to_owned(),
                    None => String::from_utf8_lossy(command.name()).to_ascii_uppercase(),
                };
                self.copy(policy, &Call::redis(&command), copyable, read, copy, method);
            }
            Reader::Thrift(Some(scanner)) => {
                let head = scanner.head();
                if !matches!(head.kind, MessageType::Call | MessageType::Oneway) {
                    return; // not a request: clients send calls
                }
                let call = Call::thrift(head);
                let copy = Copy {
                    message: Cow::Borrowed(message),
                    connection,
                    variant: scanner.codec().code(),
                    attachments: Vec::new(),
                };
                let method = || String::from_utf8_lossy(call.method).into_owned();
                self.copy(policy, &call, true, read, copy, method);
            }
            Reader::Thrift(None) => {}
            Reader::Dubbo(scanner) => {
                let Some(header) = scanner.header().filter(dubbo::Header::is_invocation) else {
                    return; // heartbeats and other events, and responses, are not requests
                };
                let body = &message[dubbo::HEADER_LEN..];
                let invocation = (header.serialization == dubbo::HESSIAN2)
                    .then(|| dubbo::Invocation::read(body).ok())
                    .flatten();
                let unread = dubbo::Invocation::unknown();
                let invocation = invocation.as_ref().unwrap_or(&unread);
                let call = Call::dubbo(invocation);
                // A copy leaves only with its attachments scrubbed: one whose attachments could
                // not be read is not made.
                let red = &policy.redaction;
                let message = if !invocation.redactable(|n| red.covers(n)) {
                    None
                } else {
                    Some(
                        match invocation.redacted(message, |n| red.covers(n), red.mask.as_deref()) {
                            Some(redacted) => Cow::Owned(redacted),
                            None => Cow::Borrowed(message),
                        },
                    )
                };
                let attachments = match invocation.version.as_str() {
                    "" | "0.0.0" => Vec::new(),
                    version => vec![("version".to_owned(), version.to_owned())],
                };
                let method = || invocation.method.clone();
                match message {
                    Some(message) => {
                        let copy = Copy {
                            message,
                            connection,
                            variant: 0,
                            attachments,
                        };
                        self.copy(policy, &call, true, read, copy, method);
                    }
                    None => self.uncopied(policy, &call, true, DropReason::NotMirrorable),
                }
            }
        }
    }

    /// Counts a request whose copy is not made (over `max_message_bytes`; a Dubbo invocation
    /// whose attachments could not be scrubbed): dropped for `reason` if the policy would have
    /// copied it, else not sampled.
    fn uncopied(&self, policy: &RpcPolicy, call: &Call<'_>, copyable: bool, reason: DropReason) {
        self.out.books.requests.increment(1);
        if policy.wanted(call, copyable) {
            self.out.books.unmade(reason);
        } else {
            self.out.books.not_sampled.increment(1);
        }
    }

    /// Counts `call` and, when the policy takes it, queues its copy.
    fn copy(
        &self,
        policy: &RpcPolicy,
        call: &Call<'_>,
        copyable: bool,
        read: &mut ReadAt,
        copy: Copy<'_>,
        method: impl FnOnce() -> String,
    ) {
        self.out.books.requests.increment(1);
        let chosen = policy.decide(call, copyable, || fastrand::u64(..));
        let Some((ticket, meta)) = self.out.decided_at(chosen, || read.time()) else {
            return;
        };
        let rpc_call = RpcCall {
            protocol: self.protocol,
            variant: copy.variant,
            service: String::from_utf8_lossy(call.service).into_owned(),
            method: method(),
            attachments: copy.attachments,
        };
        let frame = Frame::rpc_request(&meta, copy.connection, &rpc_call, &copy.message);
        let held = frame.len();
        self.out.enqueue(frame, held, ticket);
    }

    /// A request over `max_message_bytes`, of which `start` was read (`whole`: all of it): not
    /// kept; counted as a drop if it would have been copied.
    fn oversized(&self, policy: &RpcPolicy, start: &[u8], whole: bool, reader: &mut Reader) {
        let too_large = DropReason::MessageTooLarge;
        match reader {
            Reader::Redis { session, .. } => {
                let Some(command) = Command::parse(start, policy::MAX_ARGS) else {
                    return;
                };
                let copyable = session.follow(&command);
                self.uncopied(policy, &Call::redis(&command), copyable, too_large);
            }
            Reader::Thrift(Some(scanner)) => {
                let head = if whole {
                    scanner.head()
                } else {
                    scanner.current()
                };
                if matches!(head.kind, MessageType::Call | MessageType::Oneway) {
                    self.uncopied(policy, &Call::thrift(head), true, too_large);
                }
            }
            Reader::Thrift(None) => {}
            Reader::Dubbo(scanner) => {
                let header = if whole {
                    scanner.header()
                } else {
                    scanner.current()
                };
                let Some(header) = header.filter(dubbo::Header::is_invocation) else {
                    return;
                };
                let body = start.get(dubbo::HEADER_LEN..).unwrap_or_default();
                let invocation = (header.serialization == dubbo::HESSIAN2)
                    .then(|| dubbo::Invocation::read(body).ok())
                    .flatten()
                    .unwrap_or_else(dubbo::Invocation::unknown);
                self.uncopied(policy, &Call::dubbo(&invocation), true, too_large);
            }
        }
    }

    fn lost_track(&self, error: &teeway_rpc::CodecError) {
        self.unparsable.increment(1);
        if let Some(streams) = self.unparsable_log.note() {
            tracing::warn!(listener = %self.name, %error, streams, "a client's stream could not be followed: it is proxied on, and its later requests are neither counted nor copied (one line a minute at most)");
        }
    }
}

/// Serves `listener` until `shutdown`; then lets connections finish for up to `grace`, and cuts
/// those still open.
pub async fn serve(
    listener: TcpListener,
    tap: Arc<RpcTap>,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let name = tap.name.clone();
    crate::tcp::accept(listener, &name, shutdown, grace, |client, tasks, cut| {
        let (tap, cut) = (tap.clone(), cut.clone());
        tasks.spawn(async move {
            tokio::select! {
                () = cut.cancelled() => {}
                () = serve_connection(&tap, client) => {}
            }
        });
    })
    .await;
}

async fn serve_connection(tap: &RpcTap, client: TcpStream) {
    tap.connections.increment(1);
    let number = tap.next_connection.fetch_add(1, Ordering::Relaxed);
    let primary = match tokio::time::timeout(PRIMARY_CONNECT_TIMEOUT, tap.primary.connect_tcp())
        .await
    {
        Ok(Ok(primary)) => primary,
        failed => {
            let error = match failed {
                Ok(Err(e)) => e.to_string(),
                _ => "connect timed out".to_owned(),
            };
            tap.primary_errors.increment(1);
            if let Some(failed) = tap.primary_error_log.note() {
                tracing::warn!(listener = %tap.name, %error, failed, "cannot reach the rpc primary; closing the client's connection (one line a minute at most)");
            }
            return;
        }
    };
    let _ = primary.set_nodelay(true);
    proxy(tap, client, primary, number).await;
}

/// Joins the client and the primary, reading requests out of what the client sends. Ends when
/// the primary's side is done (after the client's, normally), or at the first error.
async fn proxy(tap: &RpcTap, client: TcpStream, primary: TcpStream, number: u64) {
    let (mut client_rd, client_wr) = client.into_split();
    let (primary_rd, mut primary_wr) = primary.into_split();
    let upstream = async {
        let mut reader = Requests::new(number, tap.protocol);
        let mut buf = BytesMut::new();
        loop {
            buf.reserve(READ_SIZE);
            let read = buf.len();
            match (&mut client_rd)
                .take(READ_SIZE as u64)
                .read_buf(&mut buf)
                .await
            {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            // Production first: the primary gets the bytes before anything is decided.
            if primary_wr.write_all(&buf[read..]).await.is_err() {
                break;
            }
            reader.read(tap, &mut buf, read);
        }
        let _ = primary_wr.shutdown().await;
    };
    crate::tcp::answer_beside(upstream, primary_rd, client_wr).await;
}

/// When the bytes of one read arrived, looked up once for the copies made of them.
struct ReadAt(Option<SystemTime>);

impl ReadAt {
    fn time(&mut self) -> SystemTime {
        *self.0.get_or_insert_with(SystemTime::now)
    }
}

/// What a request's copy carries besides its policy's decision.
struct Copy<'a> {
    /// The message as the copy carries it (a Dubbo one with its attachments scrubbed).
    message: Cow<'a, [u8]>,
    connection: u64,
    variant: u8,
    attachments: Vec<(String, String)>,
}

/// What reads a connection's requests: the protocol's scanner, and the state it follows.
enum Reader {
    Redis {
        scanner: Scanner,
        session: Session,
    },
    /// `None` until the stream's first bytes tell its transport and protocol.
    Thrift(Option<thrift::Scanner>),
    Dubbo(dubbo::Scanner),
}

impl Reader {
    fn new(protocol: RpcProtocol) -> Self {
        match protocol {
            RpcProtocol::Thrift => Reader::Thrift(None),
            RpcProtocol::Dubbo => Reader::Dubbo(dubbo::Scanner::new()),
            _ => Reader::Redis {
                scanner: Scanner::new(Side::Client),
                session: Session::default(),
            },
        }
    }

    fn feed(&mut self, chunk: &[u8]) -> Result<Option<usize>, teeway_rpc::CodecError> {
        match self {
            Reader::Redis { scanner, .. } => scanner.feed(chunk),
            Reader::Thrift(Some(scanner)) => scanner.feed(chunk),
            Reader::Thrift(None) => Ok(None),
            Reader::Dubbo(scanner) => scanner.feed(chunk),
        }
    }
}

/// A connection's requests as they are read: the codec's place, the connection's state, and
/// whether the request under way is too large to keep.
struct Requests {
    /// The connection's number, which its copies carry.
    number: u64,
    reader: Reader,
    /// The request under way passed `max_message_bytes`: its bytes are not kept.
    skipping: bool,
    /// The codec lost the stream: nothing more is read.
    lost: bool,
}

impl Requests {
    fn new(number: u64, protocol: RpcProtocol) -> Self {
        Self {
            number,
            reader: Reader::new(protocol),
            skipping: false,
            lost: false,
        }
    }

    /// Reads what `buf` got from `new` on (before it: the start of the request under way, kept);
    /// hands each whole request to `tap`, and leaves in `buf` only what the next needs.
    fn read(&mut self, tap: &RpcTap, buf: &mut BytesMut, new: usize) {
        if self.lost {
            buf.clear();
            return;
        }
        // One load of the policy for all the requests of a read.
        let policy = tap.policy.load();
        let max = usize::try_from(policy.max_message_bytes).unwrap_or(usize::MAX);
        let mut start = 0;
        let mut at = new;
        if let Reader::Thrift(scanner @ None) = &mut self.reader {
            // Nothing was read yet: the transport and protocol are told by the first bytes.
            match thrift::Codec::detect(buf) {
                Ok(Some(codec)) => *scanner = Some(thrift::Scanner::new(codec)),
                Ok(None) => return,
                Err(error) => {
                    tap.lost_track(&error);
                    self.lost = true;
                    buf.clear();
                    return;
                }
            }
            at = 0;
        }
        let mut read = ReadAt(None);
        while at < buf.len() {
            match self.reader.feed(&buf[at..]) {
                Ok(Some(n)) => {
                    let end = at + n;
                    if self.skipping {
                        self.skipping = false;
                    } else if end - start > max {
                        tap.oversized(&policy, &buf[start..end], true, &mut self.reader);
                    } else {
                        let message = &buf[start..end];
                        tap.request(&policy, message, &mut read, self.number, &mut self.reader);
                    }
                    start = end;
                    at = end;
                }
                Ok(None) => at = buf.len(),
                Err(error) => {
                    tap.lost_track(&error);
                    self.lost = true;
                    buf.clear();
                    return;
                }
            }
        }
        buf.advance(start);
        // A large request passed: its room is let go, not kept for the connection's life.
        if buf.is_empty() && buf.capacity() > KEPT_BUFFER {
            *buf = BytesMut::new();
        }
        if self.skipping {
            buf.clear();
        } else if buf.len() > max {
            // Counted now, from its start (its name and keys come first); the rest only passes.
            tap.oversized(&policy, buf, false, &mut self.reader);
            self.skipping = true;
            buf.clear();
        }
    }
}
