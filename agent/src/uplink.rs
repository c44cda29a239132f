//! The uplink: links to every gateway the configured name resolves to, fed by the tee's queue.
//!
//! ```text
//!                                                   ┌─ link ─▶ gateway 10.0.0.7 (QUIC)
//! tee ──try_send──▶ queue (bounded) ──▶ uplink task ┼─ link ─▶ gateway 10.0.0.8 (QUIC)
//!                                                   └─ link ─▶ gateway 10.0.0.9 (TLS/TCP)
//!                                    ◀──────────── ACK(n) per batch ────────────
//! ```
//!
//! **Addresses.** The gateway's name is resolved with hickory; every A and AAAA record is a
//! gateway (a headless Service names each replica). The name is resolved again when the answer's
//! TTL runs out and whenever a link fails, so replicas that come and go are followed. Each address
//! has a supervisor task that keeps one [`Link`] to it up: it connects (QUIC, TLS over TCP, or QUIC
//! falling back to TLS, per `gateway.transport`), reports the link when the gateway has answered
//! `HELLO` with `WELCOME`, and after a failure reconnects with capped exponential backoff with
//! jitter (50 ms doubling to 1 s, each delay drawn in its upper half); a gateway that accepts and
//! drops at once keeps the backoff growing, so a flapping gateway never causes a tight loop.
//!
//! **Batches.** The task takes copies off the queue in batches (whatever is waiting, up to
//! [`MAX_BATCH_RECORDS`] records or [`MAX_BATCH_BYTES`]; a batch that would go out short first
//! waits [`BATCH_LINGER`] for more) and sends each on the delivering link
//! with the fewest batches outstanding, so load spreads across gateways and moves off a slow
//! one. A batch is resolved by the gateway's `ACK`: mirrored when acknowledged, `rejected` when
//! the gateway refused it. A batch not acknowledged goes again to the same gateway address, never
//! to another (only that gateway can tell it has it): on the same link, or on the connection that
//! replaces it; after four `gateway.ack_timeout`s it is `uplink_error` (see `send_batch`). At
//! most [`MAX_IN_FLIGHT_BATCHES`] batches are out at once across all links; when they are,
//! copies wait in the queue, and when the queue is full the tee drops them. When a link dies the
//! others take the next batch at once; while no link delivers the queue is emptied as
//! `no_uplink` drops (or into the spool), never hoarded.
//!
//! **Health.** A connection can stay open while nothing crosses it (a cut path, UDP dropped on
//! the way, a frozen gateway): QUIC's idle timeout takes 30 s to say so, and after a cut its
//! retransmission timer has backed off to many seconds. So each supervisor looks at its link
//! every 250 ms: a link with batches out that has heard nothing for [`STALL_AFTER`] is
//! *stalled*. It takes no new batches and does not count as connected (`/readyz`,
//! `uplink_connected`), and the supervisor connects again beside it, with a short handshake time
//! so that attempts follow each other closely while the path is down. Whichever comes first: the
//! old link is heard again (it delivers again, the attempt is dropped), or the new one is welcomed
//! (it takes over; the old one is closed and its batches go again on the new one). With
//! `transport: auto` a link that fell back to TLS tries QUIC every `gateway.quic_retry` and moves
//! back once QUIC is welcomed.
//!
//! **Spool.** With `gateway.spool`, copies that find no live link are written to the disk spool
//! ([`crate::spool`]) instead of being dropped: one writer task appends them in queue order, on a
//! blocking thread, each batch holding one of the [`MAX_IN_FLIGHT_BATCHES`] slots until it is on
//! disk. While a link is up, a reader task leases the oldest
//! segment and offers its records a batch at a time; the uplink sends them only when no live
//! copy is waiting, so a backlog drains behind live traffic, never ahead of it.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use quinn::{Endpoint, VarInt};
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use teeway_runtime::dns::Resolver;
use teeway_runtime::logging::Throttle;
use teeway_wire::tls::TlsMaterial;
use teeway_wire::{codes, Envelope, Frame, Shed, Welcome, MAX_BATCH_BYTES, MAX_BATCH_RECORDS};

use crate::config::GatewayConfig;
use crate::error::UplinkError;
use crate::link::{BatchFailure, ClientConfigs, Dialer, Link, Transport, AUTO_QUIC_TIMEOUT};
use crate::metrics::{Accounting, DropReason, Ticket};
use crate::pace::Pace;
use crate::spool::{Share, Spool, SpoolDrop};

/// Batches on the wire at once, across all links. Enough to keep a long-haul link busy (32
/// batches of up to 256 records per round trip), few enough that unacknowledged copies stay a
/// bounded amount.
pub const MAX_IN_FLIGHT_BATCHES: usize = 32;
/// How long a batch that would go out with fewer than `MAX_BATCH_RECORDS` copies waits for more.
/// A batch costs a stream (or a TLS exchange), an acknowledgement and their packets whatever its
/// size: at 25,000 copies/s on loopback, sending each batch at once made batches of a few copies,
/// and waiting one millisecond cut the agent's CPU per mirrored request by 4 us (of 25) and the
/// gateway's per copy by 5 us (of 17) (tests/bench, scenario 5). Copies are asynchronous: a
/// millisecond more on their way costs production nothing.
pub const BATCH_LINGER: Duration = Duration::from_millis(1);
/// A first copy this large already makes a batch worth its cost: it goes without waiting.
const LINGER_BELOW_BYTES: usize = 64 * 1024;
/// First reconnection delay.
pub const BACKOFF_BASE: Duration = Duration::from_millis(50);
/// Longest reconnection delay: a gateway that comes back is found within about a second.
pub const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// A connection that lived this long was healthy: the next failure starts the backoff afresh.
/// A gateway that accepts and then drops at once keeps the backoff growing instead.
const HEALTHY_AFTER: Duration = Duration::from_secs(5);
/// Time allowed for one handshake: transport, TLS and `HELLO` / `WELCOME`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed at exit for the close to reach the gateway.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Bounds on when the gateway's name is resolved again: never sooner than this after the last
/// lookup (a failing link asks for one), never later than [`RESOLVE_MAX_AGE`] (hickory answers
/// from its cache until the TTL runs out, so asking is cheap).
const RESOLVE_MIN_GAP: Duration = Duration::from_secs(1);
/// See [`RESOLVE_MIN_GAP`].
const RESOLVE_MAX_AGE: Duration = Duration::from_secs(30);
/// Time allowed for one lookup.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// A finished copy on its way to the uplink, with its account: what a tap hands the uplink.
#[derive(Debug)]
pub struct Queued {
    /// The copy: its `ENVELOPE` frame, prefix included, encoded once by the tap.
    pub frame: Bytes,
    /// Its account, resolved by the uplink.
    pub ticket: Ticket,
}

impl Queued {
    /// `frame` with its account.
    pub fn new(frame: Bytes, ticket: Ticket) -> Self {
        Self { frame, ticket }
    }

    /// The frame's size, prefix included.
    pub fn size(&self) -> usize {
        self.frame.len()
    }
}

/// Whether the uplink is connected, shared with the admin listener and with callers that want
/// to wait for it.
#[derive(Debug)]
pub struct UplinkState {
    connected: AtomicBool,
    changes_tx: watch::Sender<bool>,
    /// The live links, for the TCP tee, which opens a stream of its own per teed connection.
    links: ArcSwap<Vec<Link>>,
}

impl Default for UplinkState {
    fn default() -> Self {
        Self {
            connected: AtomicBool::new(false),
            changes_tx: watch::channel(false).0,
            links: ArcSwap::from_pointee(Vec::new()),
        }
    }
}

/// Why no QUIC connection is at hand for a TCP tee stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoQuicLink {
    /// No gateway link is up.
    NoLink,
    /// Links are up, but all over TLS on TCP, which has no streams to carry a connection's copy.
    TlsOnly,
}

impl UplinkState {
    /// Whether at least one gateway has welcomed this agent on a live link.
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

    /// A live QUIC connection for the TCP tee stream of connection `id`: spread over the live
    /// links by `id` (a stream stays on the link it opened on).
    pub fn quic_link(&self, id: u64) -> Result<quinn::Connection, NoQuicLink> {
        let links = self.links.load();
        if links.is_empty() {
            return Err(NoQuicLink::NoLink);
        }
        let quic: Vec<&quinn::Connection> = links
            .iter()
            .filter_map(|l| match l {
                Link::Quic(c) => Some(c),
                Link::Tls(_) => None,
            })
            .collect();
        if quic.is_empty() {
            return Err(NoQuicLink::TlsOnly);
        }
        let pick = usize::try_from(id % quic.len() as u64).unwrap_or(0);
        Ok(quic[pick].clone())
    }
}

/// The uplink task's configuration and state.
pub struct Uplink {
    shared: Arc<Shared>,
    resolver: Resolver,
    state: Arc<UplinkState>,
    spool: Option<Spool>,
}

/// What the uplink task and its supervisors share.
struct Shared {
    gateway: GatewayConfig,
    /// Swapped by a reload that brings new certificates; each new connection loads it.
    configs: Arc<ArcSwap<ClientConfigs>>,
    accounting: Arc<Accounting>,
    source_cluster: String,
    /// One UDP socket per address family, shared by every QUIC link; made on first use.
    endpoints: Mutex<[Option<Endpoint>; 2]>,
    /// "Cannot reach" warnings, at most one a minute across supervisors...
    unreachable_log: Throttle,
    /// ...unless the cause is new: the causes logged since the last regular line (a few; the
    /// gateway's address is taken out, so several gateways failing alike are one cause).
    causes_logged: Mutex<Vec<String>>,
    /// This agent process's batch session (protocol 3), random and not zero.
    session: u64,
    /// The next batch's sequence number in the session.
    next_seq: AtomicU64,
}

impl std::fmt::Debug for Uplink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = &self.shared.gateway;
        f.debug_struct("Uplink")
            .field(
                "gateway",
                &teeway_runtime::config::join_host_port(&g.host, g.port),
            )
            .finish_non_exhaustive()
    }
}

/// Client configurations for `tls` (see [`ClientConfigs::new`]).
pub fn client_configs(tls: &TlsMaterial) -> Result<ClientConfigs, UplinkError> {
    ClientConfigs::new(tls)
}

/// What supervisors tell the uplink task.
enum Event {
    /// A link to `addr` is up and welcomed (replacing the address's previous link, if any).
    Up {
        addr: SocketAddr,
        link: Link,
        welcome: Welcome,
        /// Sends under way on the link, which its supervisor watches.
        load: Load,
        /// Where the address's link in force is published, for batches to be sent again on.
        slot: watch::Receiver<Option<Current>>,
    },
    /// The link to `addr` has batches out and has heard nothing for [`STALL_AFTER`]: it takes
    /// no new batches until it is heard from again or replaced.
    Stalled { addr: SocketAddr },
    /// The stalled link to `addr` is heard from again.
    Delivering { addr: SocketAddr },
    /// The link to `addr` is gone (or its address left the DNS answer).
    Down { addr: SocketAddr, reason: String },
    /// A lookup finished.
    Resolved(Result<(Vec<SocketAddr>, Instant), String>),
}

/// A live link and its batches.
struct Live {
    addr: SocketAddr,
    link: Link,
    /// The protocol version the gateway chose for this link (3: batches are named).
    version: u16,
    /// The gateway process behind it (0: not said).
    instance: u64,
    /// Sends under way on the link.
    load: Load,
    /// The address's link in force, which a batch whose link failed is sent again on.
    slot: watch::Receiver<Option<Current>>,
    /// Heard nothing for a while with batches out: takes no new batches.
    stalled: bool,
}

/// An address's link in force and the protocol version its gateway chose.
#[derive(Clone)]
struct Current {
    link: Link,
    version: u16,
    /// The gateway process behind the link (`WELCOME`, version 4; 0: not said).
    instance: u64,
    load: Load,
}

/// The sends under way on one link: its load, and whether it waits to hear from its gateway.
/// A batch counts on the link it is being sent on, only while it is (not while it backs off
/// after a refusal, nor on the link it left).
#[derive(Clone, Default)]
struct Load(Arc<LoadInner>);

#[derive(Default)]
struct LoadInner {
    sends: AtomicUsize,
    idle: Notify,
}

impl Load {
    fn get(&self) -> usize {
        self.0.sends.load(Ordering::Relaxed)
    }

    /// Counts one send until the guard is dropped.
    fn enter(&self) -> LoadGuard {
        self.0.sends.fetch_add(1, Ordering::Relaxed);
        LoadGuard(self.clone())
    }

    /// Resolves when no send is under way.
    async fn until_idle(&self) {
        loop {
            let idle = self.0.idle.notified();
            tokio::pin!(idle);
            // Registered before the count is read, so a send ending in between still wakes us.
            idle.as_mut().enable();
            if self.get() == 0 {
                return;
            }
            idle.await;
        }
    }
}

struct LoadGuard(Load);

impl Drop for LoadGuard {
    fn drop(&mut self) {
        if self.0 .0.sends.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.0 .0.idle.notify_waiters();
        }
    }
}

/// The live links that take new batches.
fn delivering(live: &[Live]) -> impl Iterator<Item = &Live> {
    live.iter().filter(|l| !l.stalled)
}

impl Uplink {
    /// Builds the client configurations; fails only on unusable TLS material.
    pub fn new(
        gateway: GatewayConfig,
        source_cluster: &str,
        resolver: Resolver,
        accounting: Arc<Accounting>,
        state: Arc<UplinkState>,
    ) -> Result<Self, UplinkError> {
        let configs = Arc::new(ArcSwap::from_pointee(ClientConfigs::new(&gateway.tls)?));
        Ok(Self {
            shared: Arc::new(Shared {
                gateway,
                configs,
                accounting,
                source_cluster: source_cluster.to_owned(),
                endpoints: Mutex::new([None, None]),
                unreachable_log: Throttle::named("gateway connection attempts failed"),
                causes_logged: Mutex::new(Vec::new()),
                session: fastrand::u64(1..),
                next_seq: AtomicU64::new(1),
            }),
            resolver,
            state,
            spool: None,
        })
    }

    /// This agent process's session (random, not 0), which names its batches.
    pub fn session(&self) -> u64 {
        self.shared.session
    }

    /// Whether copies that find no live link go to a spool.
    pub fn has_spool(&self) -> bool {
        self.spool.is_some()
    }

    /// Writes copies that find no live link to `spool`, and sends its records when a link is up.
    pub fn with_spool(mut self, spool: Spool) -> Self {
        self.spool = Some(spool);
        self
    }

    /// The client configurations new connections use; a reload stores new ones here.
    pub fn client_configs(&self) -> Arc<ArcSwap<ClientConfigs>> {
        self.shared.configs.clone()
    }

    /// Runs until `drain` is cancelled and the queue is sent, or `grace` after `drain` at most.
    /// Whatever is left then is counted as `shutdown` drops.
    pub async fn run(
        self,
        mut queue_rx: mpsc::Receiver<Queued>,
        drain: CancellationToken,
        grace: Duration,
    ) {
        let mut drain = Drain::new(drain, grace);
        let (events_tx, mut events_rx) = mpsc::channel(64);
        let mut supervisors: HashMap<SocketAddr, CancellationToken> = HashMap::new();
        let supervisor_tasks = TaskTracker::new();
        let mut live: Vec<Live> = Vec::new();
        let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT_BATCHES));
        let mut permit: Option<OwnedSemaphorePermit> = None;
        let mut batches = JoinSet::new();
        let mut lookups = Lookups::new(Instant::now());
        let mut rotate = 0usize;
        let mut spooling = Spooling::start(self.spool.clone(), &self.state);
        let spooling_on = self.spool.is_some();
        let end = loop {
            // Reap finished batch tasks so the set does not grow.
            while batches.try_join_next().is_some() {}
            tokio::select! {
                // In this order: live copies before spooled ones.
                biased;
                () = drain.deadline(), if drain.is_started() => break SessionEnd::GraceOver,
                () = drain.started(), if !drain.is_started() => drain.start(&mut queue_rx),
                () = tokio::time::sleep_until(lookups.due()), if lookups.is_scheduled() => {
                    lookups.started(Instant::now());
                    self.spawn_lookup(events_tx.clone());
                }
                Some(event) = events_rx.recv() => match event {
                    Event::Resolved(Ok((addrs, valid_until))) => {
                        lookups.answered(valid_until, Instant::now());
                        self.follow(&addrs, &mut supervisors, &supervisor_tasks, &events_tx);
                    }
                    Event::Resolved(Err(e)) => {
                        if self.shared.unreachable_log.note().is_some() {
                            tracing::warn!(error = %e, host = %self.shared.gateway.host, "cannot resolve the gateway; keeping the addresses known so far");
                        }
                        lookups.failed(Instant::now());
                    }
                    Event::Up { addr, link, welcome, load, slot } => {
                        let transport = link.transport();
                        live.retain(|l| l.addr != addr);
                        live.push(Live { addr, link, version: welcome.protocol_version, instance: welcome.gateway_instance, load, slot, stalled: false });
                        // Published before it is logged: whoever reads the line can use the link.
                        self.links_changed(&live);
                        tracing::info!(
                            gateway = %addr,
                            transport,
                            identity = %welcome.agent_identity,
                            gateway_software = %welcome.software,
                            links = live.len(),
                            "uplink connected"
                        );
                    }
                    Event::Stalled { addr } => self.mark(&mut live, addr, true),
                    Event::Delivering { addr } => self.mark(&mut live, addr, false),
                    Event::Down { addr, reason } => {
                        let before = live.len();
                        live.retain(|l| l.addr != addr);
                        if live.len() != before {
                            tracing::warn!(gateway = %addr, %reason, links = live.len(), "uplink link lost; reconnecting");
                            self.links_changed(&live);
                        }
                        // A gateway gone may mean the name now points elsewhere.
                        lookups.link_lost(Instant::now());
                    }
                },
                p = in_flight.clone().acquire_owned(), if permit.is_none() && (delivering(&live).next().is_some() || spooling_on) => {
                    match p {
                        Ok(p) => permit = Some(p),
                        Err(_) => break SessionEnd::GraceOver,
                    }
                }
                q = queue_rx.recv(), if permit.is_some() || (delivering(&live).next().is_none() && !spooling_on) => {
                    let Some(first) = q else { break SessionEnd::Drained };
                    match (&self.spool, delivering(&live).next().is_none()) {
                        (None, true) => first.ticket.dropped(DropReason::NoUplink),
                        (Some(_), true) => {
                            let Some(permit) = permit.take() else { continue };
                            let (copies, _) = collect(first, &mut queue_rx);
                            if let Err(e) = spooling.writes.try_send((copies, permit)) {
                                let (copies, _) = e.into_inner();
                                copies.into_iter().for_each(|q| q.ticket.dropped(DropReason::SpoolError));
                            }
                        }
                        (_, false) => {
                            rotate = rotate.wrapping_add(1);
                            // A link delivers (the branch's guard): the target is chosen before
                            // the copies are taken, so none is taken without one.
                            let (Some(permit), Some(target)) = (permit.take(), least_loaded(&live, rotate)) else {
                                first.ticket.dropped(DropReason::NoUplink);
                                continue;
                            };
                            // A batch that would go out short waits a moment for more copies
                            // (see BATCH_LINGER). The other arms wait meanwhile, a millisecond.
                            let short = queue_rx.len() + 1 < MAX_BATCH_RECORDS
                                && first.size() < LINGER_BELOW_BYTES;
                            if short && !drain.is_started() {
                                tokio::time::sleep(BATCH_LINGER).await;
                            }
                            let (copies, bytes) = collect(first, &mut queue_rx);
                            let batch = Batch::live(copies, bytes, self.shared.next_seq());
                            batches.spawn(send_batch(self.sender(target, &in_flight), batch, permit));
                        }
                    }
                }
                Some(chunk) = spooling.leased.recv(), if permit.is_some() && delivering(&live).next().is_some() && !drain.is_started() => {
                    rotate = rotate.wrapping_add(1);
                    let (Some(permit), Some(target)) = (permit.take(), least_loaded(&live, rotate)) else {
                        // Unreachable (the branch's guard); the records go back to the spool.
                        let SpoolChunk { frames: records, share, .. } = chunk;
                        let _ = tokio::task::spawn_blocking(move || share.put_back(records)).await;
                        continue;
                    };
                    let batch = Batch::spooled(chunk, self.shared.next_seq());
                    batches.spawn(send_batch(self.sender(target, &in_flight), batch, permit));
                }

            }
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
        // Past the deadline: aborting drops the tickets, which count as `shutdown`.
        batches.shutdown().await;
        spooling.close().await;
        for stop in supervisors.values() {
            stop.cancel();
        }
        supervisor_tasks.close();
        drop(events_tx);
        // Supervisors stop at once; take their last events so none waits on a full channel.
        let stopped = supervisor_tasks.wait();
        tokio::pin!(stopped);
        loop {
            tokio::select! {
                () = &mut stopped => break,
                event = events_rx.recv() => if event.is_none() { break },
            }
        }
        for l in live.drain(..) {
            l.link.close("agent shutting down");
        }
        self.links_changed(&live);
        // Whatever is still queued now will never be sent.
        queue_rx.close();
        while let Ok(q) = queue_rx.try_recv() {
            q.ticket.dropped(DropReason::Shutdown);
        }
        let endpoints = std::mem::take(&mut *self.shared.lock_endpoints());
        for endpoint in endpoints.into_iter().flatten() {
            endpoint.close(VarInt::from_u32(codes::SHUTDOWN), b"agent shutting down");
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, endpoint.wait_idle()).await;
        }
    }

    /// Marks `addr`'s link stalled or delivering again.
    fn mark(&self, live: &mut [Live], addr: SocketAddr, stalled: bool) {
        if let Some(l) = live.iter_mut().find(|l| l.addr == addr) {
            l.stalled = stalled;
        }
        self.links_changed(live);
    }

    /// Publishes the links that take batches: for the TCP tee, readiness and the gauges. A
    /// stalled link counts as down: the uplink is connected when copies are being delivered,
    /// not merely while a connection is open.
    fn links_changed(&self, live: &[Live]) {
        let up: Vec<Link> = delivering(live).map(|l| l.link.clone()).collect();
        let links = up.len();
        let quic = up.iter().filter(|l| matches!(l, Link::Quic(_))).count();
        self.state.links.store(Arc::new(up));
        self.state.set(links > 0);
        let accounting = &self.shared.accounting;
        accounting
            .uplink_connected
            .set(if links > 0 { 1.0 } else { 0.0 });
        accounting.uplink_links_quic.set(quic as f64);
        accounting.uplink_links_tls.set((links - quic) as f64);
    }

    fn spawn_lookup(&self, events_tx: mpsc::Sender<Event>) {
        let resolver = self.resolver.clone();
        let host = self.shared.gateway.host.clone();
        let port = self.shared.gateway.port;
        tokio::spawn(async move {
            let result =
                match tokio::time::timeout(RESOLVE_TIMEOUT, resolver.lookup_until(&host, port))
                    .await
                {
                    Ok(Ok((addrs, until))) => Ok((addrs, Instant::from_std(until))),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("lookup of `{host}` timed out")),
                };
            let _ = events_tx.send(Event::Resolved(result)).await;
        });
    }

    /// Starts a supervisor for each new address and stops those whose address is gone.
    fn follow(
        &self,
        addrs: &[SocketAddr],
        supervisors: &mut HashMap<SocketAddr, CancellationToken>,
        tasks: &TaskTracker,
        events_tx: &mpsc::Sender<Event>,
    ) {
        supervisors.retain(|addr, stop| {
            let keep = addrs.contains(addr);
            if !keep {
                tracing::info!(gateway = %addr, "gateway address left the DNS answer; closing its link");
                stop.cancel();
            }
            keep
        });
        for &addr in addrs {
            if supervisors.contains_key(&addr) {
                continue;
            }
            let stop = CancellationToken::new();
            supervisors.insert(addr, stop.clone());
            tasks.spawn(supervise(
                self.shared.clone(),
                addr,
                events_tx.clone(),
                stop,
            ));
        }
    }
}

/// The spool's two tasks around the uplink's loop: one writer that keeps copies in order, and
/// one reader that offers leased records back, a batch at a time, while a link delivers.
struct Spooling {
    /// Copies for the writer. Each holds an in-flight slot, so the channel (as large as the
    /// slots) always has room.
    writes: mpsc::Sender<(Vec<Queued>, OwnedSemaphorePermit)>,
    /// Records the reader leased, one batch at a time.
    leased: mpsc::Receiver<SpoolChunk>,
    writer: Option<tokio::task::JoinHandle<()>>,
    reader: Option<tokio::task::JoinHandle<()>>,
    stop_reading: CancellationToken,
}

impl Spooling {
    /// Starts the writer and the reader of `spool` (with none, nothing runs and the channels
    /// stay empty).
    fn start(spool: Option<Spool>, state: &Arc<UplinkState>) -> Self {
        let (leased_tx, leased) = mpsc::channel::<SpoolChunk>(1);
        let written = Arc::new(Notify::new());
        let (writes, writes_rx) = mpsc::channel(MAX_IN_FLIGHT_BATCHES);
        let stop_reading = CancellationToken::new();
        let writer = spool
            .clone()
            .map(|spool| tokio::spawn(write_spool(spool, writes_rx, written.clone())));
        let reader = spool.map(|spool| {
            tokio::spawn(read_spool(
                spool,
                state.clone(),
                leased_tx,
                written,
                stop_reading.clone(),
            ))
        });
        Self {
            writes,
            leased,
            writer,
            reader,
            stop_reading,
        }
    }

    /// At shutdown: copies handed to the writer are written (local disk, at most a slot's worth
    /// each), and leased records not yet sent go back to the spool for the next run.
    async fn close(self) {
        let Spooling {
            writes,
            mut leased,
            writer,
            reader,
            stop_reading,
        } = self;
        drop(writes);
        if let Some(writer) = writer {
            let _ = writer.await;
        }
        stop_reading.cancel();
        leased.close();
        while let Ok(chunk) = leased.try_recv() {
            let SpoolChunk {
                frames: records,
                share,
                ..
            } = chunk;
            let _ = tokio::task::spawn_blocking(move || share.put_back(records)).await;
        }
        if let Some(reader) = reader {
            let _ = reader.await;
        }
    }
}

/// The delivering link with the fewest batches under way; ties go round-robin from `rotate`.
fn least_loaded(live: &[Live], rotate: usize) -> Option<&Live> {
    let n = live.len();
    (0..n)
        .map(|i| &live[(rotate + i) % n])
        .filter(|l| !l.stalled)
        .min_by_key(|l| l.load.get())
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400)
}

/// When the gateway's name is looked up next: at once at start; then when the answer's TTL runs
/// out, but no sooner than [`RESOLVE_MIN_GAP`] and no later than [`RESOLVE_MAX_AGE`]; a second
/// after a failed lookup; and soon after a link is lost (the name may point elsewhere now), never
/// sooner than a gap after the last lookup. None is scheduled while one is under way, unless a
/// link is lost meanwhile.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Lookups {
    /// The next lookup; `None` while one is under way.
    next: Option<Instant>,
    /// When the last one started.
    last: Option<Instant>,
}

impl Lookups {
    fn new(now: Instant) -> Self {
        Self {
            next: Some(now),
            last: None,
        }
    }

    /// When the next lookup is due (far off while one is under way).
    fn due(&self) -> Instant {
        self.next.unwrap_or_else(far_future)
    }

    /// Whether a lookup is scheduled.
    fn is_scheduled(&self) -> bool {
        self.next.is_some()
    }

    fn started(&mut self, now: Instant) {
        self.next = None;
        self.last = Some(now);
    }

    fn answered(&mut self, valid_until: Instant, now: Instant) {
        self.next = Some(valid_until.clamp(now + RESOLVE_MIN_GAP, now + RESOLVE_MAX_AGE));
    }

    fn failed(&mut self, now: Instant) {
        self.next = Some(now + RESOLVE_MIN_GAP);
    }

    fn link_lost(&mut self, now: Instant) {
        let soonest = self.last.map_or(now, |t| t + RESOLVE_MIN_GAP);
        self.next = Some(self.next.map_or(soonest, |t| t.min(soonest)));
    }
}

/// What ended the uplink's loop.
enum SessionEnd {
    /// The queue is closed and empty: wait for the batches under way, within the grace period.
    Drained,
    /// The grace period is over.
    GraceOver,
}

impl Shared {
    fn lock_endpoints(&self) -> std::sync::MutexGuard<'_, [Option<Endpoint>; 2]> {
        // Plain data behind the lock: a panic elsewhere leaves it usable.
        self.endpoints.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The shared QUIC endpoint for `addr`'s family, bound on first use.
    fn endpoint_for(&self, addr: SocketAddr) -> Result<Endpoint, UplinkError> {
        let mut endpoints = self.lock_endpoints();
        let slot = &mut endpoints[usize::from(addr.is_ipv6())];
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

    async fn connect(
        &self,
        addr: SocketAddr,
        transport: Transport,
        timeout: Duration,
    ) -> Result<(Link, Welcome), UplinkError> {
        let configs = self.configs.load_full();
        let dialer = Dialer {
            configs: &configs,
            server_name: &self.gateway.server_name,
            source_cluster: &self.source_cluster,
            timeout,
        };
        Link::connect(addr, transport, &dialer, || self.endpoint_for(addr)).await
    }
}

/// Time between two looks at a link's health.
const HEALTH_TICK: Duration = Duration::from_millis(250);
/// A link with batches out that has heard nothing from its gateway for this long is stalled:
/// on QUIC the gateway acknowledges each packet within milliseconds, so this is many round trips
/// of silence, not a slow gateway.
pub const STALL_AFTER: Duration = Duration::from_millis(1500);
/// Time allowed for a connection made beside a stalled link: short, so that while the path is
/// cut attempts follow each other closely and the path's return is found within about a second.
const REPLACE_TIMEOUT: Duration = Duration::from_secs(3);

/// What a connection attempt is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attempt {
    /// No link, or the link in force stalled: `gateway.transport` as configured.
    Link,
    /// The link in force fell back to TLS over TCP: QUIC alone, to move back once UDP passes.
    QuicAgain,
}

type Connecting =
    Pin<Box<dyn Future<Output = (Attempt, Result<(Link, Welcome), UplinkError>)> + Send + 'static>>;

/// `attempt` after `delay`.
fn connect_after(
    shared: &Arc<Shared>,
    addr: SocketAddr,
    delay: Duration,
    attempt: Attempt,
    timeout: Duration,
) -> Connecting {
    let shared = shared.clone();
    Box::pin(async move {
        tokio::time::sleep(delay).await;
        let transport = match attempt {
            Attempt::Link => shared.gateway.transport,
            Attempt::QuicAgain => Transport::Quic,
        };
        (attempt, shared.connect(addr, transport, timeout).await)
    })
}

/// The link a supervisor keeps, and what it knows of its health.
struct Watched {
    link: Link,
    load: Load,
    since: Instant,
    health: Health,
}

impl Watched {
    fn new(link: Link, load: Load) -> Self {
        let now = Instant::now();
        Self {
            health: Health::new(link.heard(), now),
            link,
            load,
            since: now,
        }
    }

    /// Looks at the link's health at `now`; see [`Health::observe`].
    fn look(&mut self, now: Instant) -> Option<bool> {
        let heard = self.link.heard();
        let busy = self.load.get() > 0;
        self.health.observe(heard, busy, now)
    }

    fn stalled(&self) -> bool {
        self.health.stalled
    }
}

/// Whether a link delivers, judged from a count that moves while its gateway is heard from.
#[derive(Debug)]
struct Health {
    /// The count at the last look, and when it last moved (or the link was idle).
    heard: u64,
    heard_at: Instant,
    stalled: bool,
}

impl Health {
    fn new(heard: u64, now: Instant) -> Self {
        Self {
            heard,
            heard_at: now,
            stalled: false,
        }
    }

    /// Takes the count `heard` at `now`, with batches out or not (`busy`); returns the new
    /// state when it changed (`true`: stalled). Silence counts only while batches are out: an
    /// idle link has nothing to hear. A stalled link delivers again only once it is heard.
    fn observe(&mut self, heard: u64, busy: bool, now: Instant) -> Option<bool> {
        if heard != self.heard {
            self.heard = heard;
            self.heard_at = now;
            if self.stalled {
                self.stalled = false;
                return Some(false);
            }
        } else if !busy && !self.stalled {
            self.heard_at = now;
        } else if !self.stalled && now.duration_since(self.heard_at) >= STALL_AFTER {
            self.stalled = true;
            return Some(true);
        }
        None
    }
}

/// Keeps one link to `addr` up until `stop`, reporting each link that comes up, stalls, is heard
/// again and goes down. A stalled link gets a new connection made beside it; when that one is
/// welcomed it takes over and the old one is closed, so its batches are sent again on the new
/// one. With `transport: auto`, a link that fell back to TLS tries QUIC every
/// `gateway.quic_retry`, and moves back once QUIC is welcomed (the TLS link is closed when its
/// batches are answered).
async fn supervise(
    shared: Arc<Shared>,
    addr: SocketAddr,
    events_tx: mpsc::Sender<Event>,
    stop: CancellationToken,
) {
    // Where batches find this address's link in force, when theirs failed.
    let slot = watch::channel(None::<Current>).0;
    let mut watched: Option<Watched> = None;
    let mut failures: u32 = 0;
    let mut connecting: Option<(Attempt, Connecting)> = Some((
        Attempt::Link,
        connect_after(
            &shared,
            addr,
            Duration::ZERO,
            Attempt::Link,
            HANDSHAKE_TIMEOUT,
        ),
    ));
    let quic_retry = shared.gateway.quic_retry;
    let mut next_quic_try = Instant::now() + quic_retry;
    let mut tick = tokio::time::interval(HEALTH_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let attempt_done = async {
            match connecting.as_mut() {
                Some((_, attempt)) => attempt.await,
                None => std::future::pending().await,
            }
        };
        let link_closed = async {
            match watched.as_ref() {
                Some(w) => w.link.closed().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = stop.cancelled() => break,
            (attempt, result) = attempt_done => {
                connecting = None;
                match result {
                    Ok((link, welcome)) => {
                        shared.accounting.connects_ok.increment(1);
                        if let Some(old) = watched.take() {
                            retire(old, attempt, shared.gateway.ack_timeout * 4);
                        }
                        let load = Load::default();
                        slot.send_replace(Some(Current {
                            link: link.clone(),
                            version: welcome.protocol_version,
                            instance: welcome.gateway_instance,
                            load: load.clone(),
                        }));
                        let up = Event::Up {
                            addr,
                            link: link.clone(),
                            welcome,
                            load: load.clone(),
                            slot: slot.subscribe(),
                        };
                        if events_tx.send(up).await.is_err() {
                            link.close("agent shutting down");
                            return;
                        }
                        watched = Some(Watched::new(link, load));
                        next_quic_try = Instant::now() + quic_retry;
                    }
                    Err(e) if attempt == Attempt::QuicAgain => {
                        tracing::debug!(gateway = %addr, error = %e, "QUIC still does not get through; staying on TLS over TCP");
                    }
                    Err(e) => {
                        shared.accounting.connects_failed.increment(1);
                        log_failed_attempt(&shared, addr, &e);
                        if watched.as_ref().is_none_or(Watched::stalled) {
                            let timeout = if watched.is_some() { REPLACE_TIMEOUT } else { HANDSHAKE_TIMEOUT };
                            connecting = Some((Attempt::Link, connect_after(&shared, addr, backoff(failures), Attempt::Link, timeout)));
                            failures = failures.saturating_add(1);
                        }
                    }
                }
            }
            reason = link_closed => {
                let Some(w) = watched.take() else { continue };
                if events_tx.send(Event::Down { addr, reason }).await.is_err() {
                    return;
                }
                if w.since.elapsed() >= HEALTHY_AFTER {
                    failures = 0;
                }
                if !matches!(connecting, Some((Attempt::Link, _))) {
                    connecting = Some((Attempt::Link, connect_after(&shared, addr, backoff(failures), Attempt::Link, HANDSHAKE_TIMEOUT)));
                    failures = failures.saturating_add(1);
                }
            }
            _ = tick.tick() => {
                let Some(w) = watched.as_mut() else { continue };
                let now = Instant::now();
                match w.look(now) {
                    Some(true) => {
                        shared.accounting.uplink_stalls.increment(1);
                        tracing::warn!(gateway = %addr, transport = w.link.transport(), silent_for = ?STALL_AFTER, "uplink link stalled: batches out and nothing heard from the gateway; connecting again beside it");
                        if events_tx.send(Event::Stalled { addr }).await.is_err() {
                            return;
                        }
                        if !matches!(connecting, Some((Attempt::Link, _))) {
                            connecting = Some((Attempt::Link, connect_after(&shared, addr, Duration::ZERO, Attempt::Link, REPLACE_TIMEOUT)));
                        }
                    }
                    Some(false) => {
                        tracing::info!(gateway = %addr, transport = w.link.transport(), "stalled uplink link heard from again");
                        if events_tx.send(Event::Delivering { addr }).await.is_err() {
                            return;
                        }
                        // The link is back: no replacement needed.
                        if matches!(connecting, Some((Attempt::Link, _))) {
                            connecting = None;
                        }
                    }
                    None => {}
                }
                let on_fallback = shared.gateway.transport == Transport::Auto
                    && matches!(w.link, Link::Tls(_))
                    && !w.stalled();
                if on_fallback && connecting.is_none() && now >= next_quic_try {
                    next_quic_try = now + quic_retry;
                    connecting = Some((Attempt::QuicAgain, connect_after(&shared, addr, Duration::ZERO, Attempt::QuicAgain, AUTO_QUIC_TIMEOUT)));
                }
            }
        }
    }
    // Stopped: the uplink closes the link once its batches are done.
    if watched.is_some() {
        let _ = events_tx
            .send(Event::Down {
                addr,
                reason: "stopped".into(),
            })
            .await;
    }
}

/// Takes `old` out of service after a new link to its address was welcomed. A stalled link is
/// closed at once (its batches then go again on the new link); a healthy TLS link that QUIC
/// replaces is closed once its batches are answered, within `patience`.
fn retire(old: Watched, attempt: Attempt, patience: Duration) {
    if old.stalled() || attempt == Attempt::Link {
        old.link.close("replaced by a new connection");
        return;
    }
    tokio::spawn(async move {
        let _ = tokio::time::timeout(patience, old.load.until_idle()).await;
        old.link.close("moved back to QUIC");
    });
}

/// Logs a failed connection attempt: one line a minute at most, and at once for a new cause.
fn log_failed_attempt(shared: &Shared, addr: SocketAddr, e: &UplinkError) {
    let due = {
        let cause = cause_of(e, addr);
        let mut logged = shared
            .causes_logged
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match shared.unreachable_log.note() {
            Some(attempts) => {
                logged.clear();
                logged.push(cause);
                Some(attempts)
            }
            None if !logged.contains(&cause) && logged.len() < MAX_CAUSES_LOGGED => {
                logged.push(cause);
                Some(shared.unreachable_log.note_now())
            }
            None => None,
        }
    };
    if let Some(attempts) = due {
        tracing::warn!(gateway = %addr, error = %e, attempts, "cannot reach a gateway; retrying with backoff (one line a minute at most, and at once for a new cause)");
    } else {
        tracing::debug!(gateway = %addr, error = %e, "gateway connection attempt failed");
    }
}

/// Causes of failed connection attempts logged at once between two regular lines.
const MAX_CAUSES_LOGGED: usize = 4;

/// What went wrong in a connection attempt, without the address it was made to (so gateways
/// failing alike make one cause), and where `auto` tried both transports, the first one's
/// failure only (the gateway's reason is what matters, not each transport's wording).
fn cause_of(e: &UplinkError, addr: SocketAddr) -> String {
    let text = e.to_string().replace(&addr.to_string(), "");
    match text.split_once(" and over TLS/TCP") {
        Some((first, _)) => first.to_owned(),
        None => text,
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

impl Shared {
    fn next_seq(&self) -> u64 {
        self.next_seq.fetch_add(1, Ordering::Relaxed)
    }
}

impl Uplink {
    /// What a batch task needs to send on `target`.
    fn sender(&self, target: &Live, in_flight: &Arc<Semaphore>) -> Sender {
        Sender {
            link: target.link.clone(),
            version: target.version,
            instance: target.instance,
            load: target.load.clone(),
            slot: target.slot.clone(),
            in_flight: in_flight.clone(),
            session: self.shared.session,
            ack_timeout: self.shared.gateway.ack_timeout,
            sent: self.shared.accounting.uplink_bytes.clone(),
        }
    }
}

/// A batch task's link and what it answers to.
struct Sender {
    link: Link,
    version: u16,
    /// The gateway process the batch was first sent to (0: not said).
    instance: u64,
    /// Sends under way on `link`.
    load: Load,
    /// The address's link in force: where the batch goes again if its link fails.
    slot: watch::Receiver<Option<Current>>,
    /// The slots of batches in flight, taken again by a batch that waited for a new link.
    in_flight: Arc<Semaphore>,
    session: u64,
    ack_timeout: Duration,
    sent: metrics::Counter,
}

/// `first` and whatever else is already waiting, within the batch limits, and their frames'
/// size (the batch's buffer is sized from it).
fn collect(first: Queued, queue_rx: &mut mpsc::Receiver<Queued>) -> (Vec<Queued>, usize) {
    let mut bytes = first.size();
    let mut copies = vec![first];
    while copies.len() < MAX_BATCH_RECORDS && bytes < MAX_BATCH_BYTES {
        match queue_rx.try_recv() {
            Ok(q) => {
                bytes += q.size();
                copies.push(q);
            }
            Err(_) => break,
        }
    }
    (copies, bytes)
}

/// Copies sent together on one stream, and their accounts.
struct Batch {
    frames: bytes::Bytes,
    /// The same records as `REQUEST` frames, for a gateway of protocol 4 or older: made once,
    /// when first needed.
    requests: Option<bytes::Bytes>,
    accounts: Accounts,
    /// Its number in the agent's session (protocol 3 names it on the wire).
    seq: u64,
    /// It went out before without an acknowledgement (the `BATCH` frame says so).
    sent_before: bool,
}

/// Who answers for a batch's records: the tickets of live copies, or one share of a spool lease.
enum Accounts {
    Live(Vec<Ticket>),
    Spooled(Share),
}

impl Batch {
    /// `bytes`: the copies' frames' size, from [`collect`]. Sized once: growing a buffer of up
    /// to 1 MiB by doubling copied it about twice over.
    fn live(copies: Vec<Queued>, bytes: usize, seq: u64) -> Self {
        let mut frames = BytesMut::with_capacity(bytes);
        let tickets = copies
            .into_iter()
            .map(|q| {
                frames.extend_from_slice(&q.frame);
                q.ticket
            })
            .collect();
        Self {
            frames: frames.freeze(),
            requests: None,
            accounts: Accounts::Live(tickets),
            seq,
            sent_before: false,
        }
    }

    fn spooled(chunk: SpoolChunk, seq: u64) -> Self {
        let mut frames = BytesMut::with_capacity(chunk.bytes);
        for frame in chunk.frames {
            frames.extend_from_slice(&frame);
        }
        Self {
            frames: frames.freeze(),
            requests: None,
            accounts: Accounts::Spooled(chunk.share),
            seq,
            sent_before: false,
        }
    }
}

impl Accounts {
    fn len(&self) -> usize {
        match self {
            Accounts::Live(tickets) => tickets.len(),
            Accounts::Spooled(share) => share.len() as usize,
        }
    }

    /// The gateway acknowledged the first `accepted` records (of which it shed `shed`) and
    /// refused the rest.
    fn acknowledged(self, accepted: u32, shed: &Shed) {
        match self {
            Accounts::Live(tickets) => {
                // Each pace told is settled once its run of copies ends (a batch's copies
                // mostly share one); settling more often than that is harmless.
                let mut told: Option<Arc<Pace>> = None;
                for (i, ticket) in tickets.into_iter().enumerate() {
                    if i >= accepted as usize {
                        ticket.dropped(DropReason::Rejected);
                        continue;
                    }
                    let Some(pace) = ticket.acknowledged(shed.contains(i)) else {
                        continue;
                    };
                    if let Some(before) = told.replace(pace) {
                        if told.as_ref().is_some_and(|p| !Arc::ptr_eq(p, &before)) {
                            before.settle();
                        }
                    }
                }
                if let Some(pace) = told {
                    pace.settle();
                }
            }
            Accounts::Spooled(share) => share.acknowledged(u64::from(accepted)),
        }
    }

    /// The batch failed: refused whole (`rejected`), or lost with its link.
    fn failed(self, rejected: bool) {
        match self {
            Accounts::Live(tickets) => {
                let reason = if rejected {
                    DropReason::Rejected
                } else {
                    DropReason::UplinkError
                };
                tickets.into_iter().for_each(|t| t.dropped(reason));
            }
            Accounts::Spooled(share) => share.dropped(if rejected {
                SpoolDrop::Rejected
            } else {
                SpoolDrop::UplinkError
            }),
        }
    }
}

/// Sends `batch` on `sender`'s link and resolves its accounts by the answer. When the gateway
/// names batches (protocol 3: it replays one once however often it arrives), a batch whose
/// acknowledgement does not come (late, lost) or that the gateway had no room for is sent again
/// **to the same gateway address** (only that gateway can tell it has it): on the same link while
/// it is up, else on the connection that replaces it (a stalled link replaced, a connection
/// lost and made again, QUIC back after TLS). Refusals back off. This goes on until four
/// acknowledgement timeouts have passed since the batch was first sent; then it counts as
/// `uplink_error` (`rejected` after refusals). The batch keeps its slot while it is on a link,
/// so retries stay within the bound on batches in flight; it gives the slot up while it waits
/// for a new connection, so that copies can go to the spool meanwhile, and takes one again
/// before it is sent on it.
async fn send_batch(mut sender: Sender, mut batch: Batch, permit: OwnedSemaphorePermit) {
    let mut permit = Some(permit);
    let first_sent = Instant::now();
    let ack_timeout = sender.ack_timeout;
    let deadline = first_sent + ack_timeout * 4;
    let mut busy_backoff = Duration::from_millis(100);
    loop {
        // The batch's name goes before its frames, in a buffer of its own: the frames are
        // handed over as they are, on every attempt.
        let head = if sender.version >= 3 {
            let mut head = BytesMut::with_capacity(32);
            Frame::Batch(teeway_wire::BatchId {
                session: sender.session,
                seq: batch.seq,
                retry: batch.sent_before,
            })
            .encode(&mut head);
            head.freeze()
        } else {
            bytes::Bytes::new()
        };
        // Copies are `ENVELOPE` frames; a gateway of version 4 or older reads `REQUEST`s.
        let frames = if sender.version >= 5 {
            batch.frames.clone()
        } else if let Some(requests) = &batch.requests {
            requests.clone()
        } else {
            match as_requests(&batch.frames, batch.accounts.len()) {
                Some(requests) => batch.requests.insert(requests).clone(),
                None => {
                    // Never the case for the copies taps make today; were it, the ACK's count
                    // would no longer line up with the batch's accounts.
                    tracing::warn!(records = batch.accounts.len(), "a batch holds records a gateway of protocol 4 cannot take; counted as rejected");
                    batch.accounts.failed(true);
                    return;
                }
            }
        };
        let bytes = (head.len() + frames.len()) as u64;
        let sending = sender.load.enter();
        let outcome =
            match tokio::time::timeout(ack_timeout, sender.link.send_batch(head, frames)).await {
                Ok(result) => result,
                Err(_) => Err(BatchFailure::Transport(format!(
                    "no acknowledgement within {ack_timeout:?}"
                ))),
            };
        drop(sending);
        let may_retry = sender.version >= 3 && Instant::now() < deadline;
        match outcome {
            Ok((accepted, shed)) => {
                sender.sent.increment(bytes);
                batch.accounts.acknowledged(accepted, &shed);
                return;
            }
            // Refused while reading (no room): not dispatched; try again a little later. (On
            // a link that is closing meanwhile it goes again on the next, as below.)
            Err(BatchFailure::Busy(detail)) if may_retry && !sender.link.is_closed() => {
                tracing::debug!(%detail, seq = batch.seq, "gateway had no room for a batch; sending it again");
                let jitter =
                    Duration::from_millis(fastrand::u64(0..=busy_backoff.as_millis() as u64));
                tokio::time::sleep(busy_backoff / 2 + jitter / 2).await;
                busy_backoff = (busy_backoff * 2).min(ack_timeout);
            }
            // The gateway may have it: the same gateway gets it again, marked so.
            Err(BatchFailure::Transport(detail) | BatchFailure::Busy(detail)) if may_retry => {
                tracing::debug!(%detail, seq = batch.seq, "batch not acknowledged; sending it again");
                batch.sent_before = true;
                if sender.link.is_closed() {
                    drop(permit.take());
                }
                let next = async {
                    let current = next_link(&mut sender.slot, deadline).await?;
                    if permit.is_none() {
                        let slot = sender.in_flight.clone().acquire_owned();
                        permit = tokio::time::timeout_at(deadline, slot).await.ok()?.ok();
                    }
                    permit.as_ref().map(|_| current)
                };
                match next.await {
                    Some(current)
                        if current.version >= 3
                            && same_gateway(
                                sender.instance,
                                current.link.same(&sender.link),
                                current.instance,
                            ) =>
                    {
                        sender.link = current.link;
                        sender.version = current.version;
                        sender.load = current.load;
                    }
                    _ => {
                        tracing::debug!(
                            records = batch.accounts.len(),
                            "no connection to the gateway process that may have the batch, in time"
                        );
                        batch.accounts.failed(false);
                        return;
                    }
                }
            }
            Err(BatchFailure::Rejected(detail)) | Err(BatchFailure::Busy(detail)) => {
                tracing::debug!(%detail, records = batch.accounts.len(), "gateway rejected a batch");
                batch.accounts.failed(true);
                return;
            }
            Err(BatchFailure::Transport(detail)) => {
                tracing::debug!(%detail, records = batch.accounts.len(), "batch lost with the connection");
                batch.accounts.failed(false);
                return;
            }
        }
    }
}

/// Whether a batch first sent to gateway process `sent_to` may go again on a connection to
/// `now`: the same connection, or one whose `WELCOME` names the same process. An address is not
/// a process: behind a load balancer a new connection may reach another replica, which would
/// replay the batch a second time, so there the batch ends as `uplink_error` instead.
fn same_gateway(sent_to: u64, same_connection: bool, now: u64) -> bool {
    same_connection || (sent_to != 0 && sent_to == now)
}

/// The address's link in force once it is usable (not closed), or `None` if none is by
/// `deadline` or the address is no longer followed.
async fn next_link(
    slot: &mut watch::Receiver<Option<Current>>,
    deadline: Instant,
) -> Option<Current> {
    let usable = |c: &Option<Current>| c.as_ref().is_some_and(|c| !c.link.is_closed());
    match tokio::time::timeout_at(deadline, slot.wait_for(usable)).await {
        Ok(Ok(current)) => current.clone(),
        _ => None,
    }
}

/// Leased spool records offered to the uplink as one batch.
struct SpoolChunk {
    frames: Vec<Bytes>,
    /// Their frames' size.
    bytes: usize,
    share: Share,
}

/// Writes copies that found no live link to the spool, one batch after another so the spool
/// keeps queue order. Each write and its tickets' resolution happen together on a blocking
/// thread: a copy is counted `spooled` exactly when it is on disk.
async fn write_spool(
    spool: Spool,
    mut writes: mpsc::Receiver<(Vec<Queued>, OwnedSemaphorePermit)>,
    written: Arc<Notify>,
) {
    let failures = Throttle::named("spool writes failed (spool_error)");
    while let Some((copies, permit)) = writes.recv().await {
        let spool = spool.clone();
        let failures = failures.clone();
        let write = tokio::task::spawn_blocking(move || {
            let (frames, tickets): (Vec<_>, Vec<_>) =
                copies.into_iter().map(|q| (q.frame, q.ticket)).unzip();
            match spool.append(frames) {
                Ok(()) => tickets.into_iter().for_each(Ticket::spooled),
                Err(e) => {
                    if let Some(failed) = failures.note() {
                        tracing::warn!(error = %e, failed, "cannot write copies to the spool; counted as spool_error drops (one line a minute at most)");
                    }
                    tickets
                        .into_iter()
                        .for_each(|t| t.dropped(DropReason::SpoolError));
                }
            }
        });
        // A panic in the write drops its tickets, which then count as `shutdown`.
        let _ = write.await;
        drop(permit);
        written.notify_one();
    }
}

/// While a link is up, leases the spool's oldest segment and offers its records to the uplink a
/// batch at a time; waits for new writes when the spool is empty. At `stop`, what it holds goes
/// back to the spool.
async fn read_spool(
    spool: Spool,
    state: Arc<UplinkState>,
    tx: mpsc::Sender<SpoolChunk>,
    written: Arc<Notify>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = state.wait_for(true) => {}
        }
        let s = spool.clone();
        let Ok(lease) = tokio::task::spawn_blocking(move || s.lease_oldest()).await else {
            return;
        };
        let Some(mut lease) = lease else {
            tokio::select! {
                () = stop.cancelled() => return,
                () = written.notified() => continue,
            }
        };
        let frames = std::mem::take(&mut lease.records);
        tracing::info!(records = frames.len(), "sending spooled copies");
        let mut records = VecDeque::from(frames);
        while !records.is_empty() {
            let mut chunk = Vec::new();
            let mut bytes = 0;
            while let Some(r) = records.front() {
                let len = r.len();
                if chunk.len() >= MAX_BATCH_RECORDS
                    || (!chunk.is_empty() && bytes + len > MAX_BATCH_BYTES)
                {
                    break;
                }
                bytes += len;
                chunk.extend(records.pop_front());
            }
            // Reserving is cancel-safe: at `stop` the chunk is still ours to put back.
            let slot = tokio::select! {
                slot = tx.reserve() => slot.ok(),
                () = stop.cancelled() => None,
            };
            let Some(slot) = slot else {
                chunk.extend(records);
                let _ = tokio::task::spawn_blocking(move || lease.put_back(chunk)).await;
                return;
            };
            let share = lease.share(chunk.len());
            slot.send(SpoolChunk {
                frames: chunk,
                bytes,
                share,
            });
        }
    }
}

/// `frames` (`records` `ENVELOPE` frames) as `REQUEST` frames, for a gateway of protocol 4 or
/// older, which knows no other: `None` unless every one is an HTTP request (the gateway's ACK
/// counts records in order, so none may be left out). Every copy the taps make today is one,
/// which `REQUEST` holds less the metadata version 5 added; the slow path of a mixed-version
/// rollout only.
fn as_requests(frames: &Bytes, records: usize) -> Option<Bytes> {
    let mut src = BytesMut::from(&frames[..]);
    let mut out = BytesMut::with_capacity(frames.len());
    let mut done = 0;
    while !src.is_empty() {
        match Frame::decode(&mut src) {
            Ok(Some(Frame::Envelope(Envelope::HttpRequest(r)))) => {
                Frame::Request(r).encode(&mut out);
                done += 1;
            }
            _ => return None,
        }
    }
    (done == records).then(|| out.freeze())
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
    fn a_batch_for_an_old_gateway_is_all_of_its_records_as_requests_or_nothing() {
        let request = |id: u64| teeway_wire::MirroredRequest {
            meta: teeway_wire::Meta::basic(id, std::time::UNIX_EPOCH, "c".into()),
            method: http::Method::GET,
            uri: http::Uri::from_static("/x"),
            version: http::Version::HTTP_11,
            headers: http::HeaderMap::new(),
            body: Bytes::from_static(b"b"),
            trailers: None,
            body_truncated: false,
            production: None,
        };
        let mut frames = BytesMut::new();
        for id in [1, 2] {
            Frame::Envelope(Envelope::HttpRequest(request(id))).encode(&mut frames);
        }
        let frames = frames.freeze();
        let mut converted = BytesMut::from(&as_requests(&frames, 2).expect("converted")[..]);
        for id in [1, 2] {
            assert_eq!(
                Frame::decode(&mut converted),
                Ok(Some(Frame::Request(request(id))))
            );
        }
        assert!(converted.is_empty());
        assert_eq!(as_requests(&frames, 3), None, "a count that does not match");
        let mut mixed = BytesMut::from(&frames[..]);
        Frame::Envelope(Envelope::Other {
            meta: teeway_wire::Meta::basic(3, std::time::UNIX_EPOCH, "c".into()),
            kind: 200,
            part: Bytes::new(),
        })
        .encode(&mut mixed);
        assert_eq!(
            as_requests(&mixed.freeze(), 3),
            None,
            "a kind REQUEST cannot hold"
        );
    }

    #[test]
    fn lookups_follow_the_ttl_within_bounds_and_come_early_when_a_link_is_lost() {
        let t0 = Instant::now();
        let mut l = Lookups::new(t0);
        assert_eq!(l.due(), t0, "at once at start");
        l.started(t0);
        assert!(!l.is_scheduled(), "none scheduled while one is under way");
        // A TTL of 5 minutes is looked at again after RESOLVE_MAX_AGE; one of 10 ms after a gap.
        l.answered(t0 + Duration::from_secs(300), t0);
        assert_eq!(l.due(), t0 + RESOLVE_MAX_AGE);
        l.answered(t0 + Duration::from_millis(10), t0);
        assert_eq!(l.due(), t0 + RESOLVE_MIN_GAP);
        l.answered(t0 + Duration::from_secs(7), t0);
        assert_eq!(l.due(), t0 + Duration::from_secs(7));
        // A link lost soon after the lookup: the next comes a gap after the last, not at once.
        l.link_lost(t0 + Duration::from_millis(100));
        assert_eq!(l.due(), t0 + RESOLVE_MIN_GAP);
        // Later, with a lookup due in a while: the earlier of the two (here already past).
        let later = t0 + Duration::from_secs(5);
        l.started(t0);
        l.answered(t0 + Duration::from_secs(20), t0);
        l.link_lost(later);
        assert_eq!(l.due(), t0 + RESOLVE_MIN_GAP, "the earlier of the two");
        l.started(later);
        l.failed(later);
        assert_eq!(l.due(), later + RESOLVE_MIN_GAP);
    }

    #[test]
    fn a_link_stalls_only_when_batches_are_out_and_nothing_is_heard() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut h = Health::new(7, t0);
        // Idle and silent for a long time: nothing was asked of it.
        assert_eq!(h.observe(7, false, at(60_000)), None);
        // Busy and heard from: fine.
        assert_eq!(h.observe(8, true, at(61_000)), None);
        // Busy and silent, but not for long enough.
        assert_eq!(h.observe(8, true, at(62_000)), None);
        // Busy and silent for STALL_AFTER: stalled, said once.
        let stall = 61_000 + STALL_AFTER.as_millis() as u64;
        assert_eq!(h.observe(8, true, at(stall)), Some(true));
        assert_eq!(h.observe(8, true, at(stall + 250)), None);
        // Its batches given up, still silent: still stalled (only hearing clears it).
        assert_eq!(h.observe(8, false, at(stall + 500)), None);
        assert!(h.stalled);
        // Heard again: delivering.
        assert_eq!(h.observe(9, false, at(stall + 750)), Some(false));
        assert!(!h.stalled);
    }

    #[test]
    fn a_batch_goes_again_only_to_the_gateway_process_that_may_have_it() {
        assert!(
            same_gateway(0, true, 0),
            "the same connection, whatever the version"
        );
        assert!(
            same_gateway(7, false, 7),
            "a new connection to the same process"
        );
        assert!(
            !same_gateway(7, false, 9),
            "another replica behind the same address"
        );
        assert!(
            !same_gateway(0, false, 0),
            "a gateway of version 3 cannot say"
        );
        assert!(!same_gateway(7, false, 0));
    }

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
