//! A long-haul link in user space, for the WAN tests and the benchmark's WAN scenarios
//! (`sch_netem` is not available on these kernels): a relay in front of a gateway that delays
//! every UDP datagram and every TCP chunk by a fixed time each way, drops UDP datagrams with a
//! given probability, and can cut the link (both transports) or block UDP alone.
//!
//! The delay is the same for every packet of a direction, so packets keep their order, as on a
//! real path (reordering would be a different fault). Losses come from a seeded generator, so a
//! run is repeatable. TCP is not dropped (a user-space relay cannot lose a segment; the kernels at
//! both ends would only see a longer delay); a cut holds its bytes until the link returns, which
//! is what a TCP sender sees of a cut link.
//!
//! Used by `tests/wan.rs` in-process and by `examples/wan_relay.rs` as a process.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// The link's faults, changed while it runs.
#[derive(Debug)]
pub struct Faults {
    /// One-way delay, microseconds.
    delay_us: AtomicU64,
    /// UDP loss probability, parts per million.
    loss_ppm: AtomicU32,
    /// UDP datagrams are all dropped.
    udp_blocked: AtomicBool,
    /// Nothing passes: UDP is dropped, TCP bytes wait.
    cut: watch::Sender<bool>,
    /// UDP datagrams forwarded and dropped, for reports.
    pub forwarded: AtomicU64,
    pub dropped: AtomicU64,
}

impl Faults {
    pub fn set_delay(&self, one_way: Duration) {
        self.delay_us
            .store(one_way.as_micros() as u64, Ordering::Relaxed);
    }

    /// Drops this fraction of UDP datagrams, in each direction.
    pub fn set_loss(&self, fraction: f64) {
        self.loss_ppm
            .store((fraction * 1e6).round() as u32, Ordering::Relaxed);
    }

    pub fn block_udp(&self, blocked: bool) {
        self.udp_blocked.store(blocked, Ordering::Relaxed);
    }

    pub fn cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }

    fn delay(&self) -> Duration {
        Duration::from_micros(self.delay_us.load(Ordering::Relaxed))
    }

    fn is_cut(&self) -> bool {
        *self.cut.borrow()
    }
}

/// A running relay: `addr` takes UDP and TCP on the same port and forwards to the upstream.
pub struct Wan {
    pub addr: SocketAddr,
    pub faults: Arc<Faults>,
    tasks: tokio::task::JoinSet<()>,
}

impl Wan {
    /// Relays `127.0.0.1:<port>` (UDP and TCP) to `upstream` with `one_way` delay and `loss`.
    pub async fn start(
        upstream: SocketAddr,
        one_way: Duration,
        loss: f64,
    ) -> std::io::Result<Self> {
        // The same port number for both transports, as a gateway has: try a few.
        let (udp, tcp) = bind_pair().await?;
        let addr = udp.local_addr()?;
        let faults = Arc::new(Faults {
            delay_us: AtomicU64::new(0),
            loss_ppm: AtomicU32::new(0),
            udp_blocked: AtomicBool::new(false),
            cut: watch::channel(false).0,
            forwarded: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        });
        faults.set_delay(one_way);
        faults.set_loss(loss);
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(relay_udp(Arc::new(udp), upstream, faults.clone()));
        tasks.spawn(relay_tcp(tcp, upstream, faults.clone()));
        Ok(Self {
            addr,
            faults,
            tasks,
        })
    }

    pub fn stop(mut self) {
        self.tasks.abort_all();
    }
}

/// Socket buffers the relay asks for (the kernel caps them at `net.core.rmem_max`): the
/// defaults (208 KiB) overflow at the rates the benchmark drives, which would add losses of
/// the relay's own making.
const SOCKET_BUFFER: usize = 4 << 20;

/// A loopback UDP socket with large buffers.
fn udp_socket() -> std::io::Result<UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    socket.set_recv_buffer_size(SOCKET_BUFFER)?;
    socket.set_send_buffer_size(SOCKET_BUFFER)?;
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    UdpSocket::from_std(socket.into())
}

async fn bind_pair() -> std::io::Result<(UdpSocket, TcpListener)> {
    let mut last = None;
    for _ in 0..20 {
        let udp = udp_socket()?;
        match TcpListener::bind(udp.local_addr()?).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no port free for UDP and TCP")))
}

/// A small seeded generator (xorshift64*): repeatable losses without a dependency.
struct Dice(u64);

impl Dice {
    fn roll_ppm(&mut self) -> u32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32) as u32 % 1_000_000
    }
}

/// Where a direction of UDP takes datagrams: each with the address it goes to.
type Datagrams = mpsc::UnboundedSender<(Vec<u8>, SocketAddr)>;

/// One direction of UDP: datagrams wait out the delay in arrival order, then go out on `socket`
/// to `to`.
fn udp_direction(socket: Arc<UdpSocket>, faults: Arc<Faults>, seed: u64) -> Datagrams {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>, SocketAddr)>();
    tokio::spawn(async move {
        while let Some((due, datagram, to)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            let _ = socket.send_to(&datagram, to).await;
        }
    });
    let (in_tx, mut in_rx) = mpsc::unbounded_channel::<(Vec<u8>, SocketAddr)>();
    tokio::spawn(async move {
        let mut dice = Dice(seed | 1);
        while let Some((datagram, to)) = in_rx.recv().await {
            let loss = faults.loss_ppm.load(Ordering::Relaxed);
            let lost = faults.is_cut()
                || faults.udp_blocked.load(Ordering::Relaxed)
                || (loss > 0 && dice.roll_ppm() < loss);
            if lost {
                faults.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            faults.forwarded.fetch_add(1, Ordering::Relaxed);
            if tx
                .send((Instant::now() + faults.delay(), datagram, to))
                .is_err()
            {
                return;
            }
        }
    });
    in_tx
}

async fn relay_udp(front: Arc<UdpSocket>, upstream: SocketAddr, faults: Arc<Faults>) {
    let outward = udp_direction(front.clone(), faults.clone(), 0x9E37_79B9_7F4A_7C15);
    // One socket towards the upstream per client address, so replies find their client.
    let mut backs: HashMap<SocketAddr, Datagrams> = HashMap::new();
    let mut seed = 0xD1B5_4A32_D192_ED03u64;
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((n, client)) = front.recv_from(&mut buf).await else {
            return;
        };
        let inward = {
            if let Some(tx) = backs.get(&client) {
                tx.clone()
            } else {
                let Ok(back) = udp_socket() else {
                    continue;
                };
                let back = Arc::new(back);
                seed = seed.wrapping_add(0x9E37_79B9);
                let tx = udp_direction(back.clone(), faults.clone(), seed);
                let outward = outward.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65_536];
                    while let Ok((n, _)) = back.recv_from(&mut buf).await {
                        if outward.send((buf[..n].to_vec(), client)).is_err() {
                            return;
                        }
                    }
                });
                backs.insert(client, tx.clone());
                tx
            }
        };
        let _ = inward.send((buf[..n].to_vec(), upstream));
    }
}

async fn relay_tcp(listener: TcpListener, upstream: SocketAddr, faults: Arc<Faults>) {
    while let Ok((client, _)) = listener.accept().await {
        let faults = faults.clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::join!(
                tcp_direction(cr, sw, faults.clone()),
                tcp_direction(sr, cw, faults)
            );
        });
    }
}

/// One direction of a TCP connection: chunks wait out the delay, and while the link is cut.
async fn tcp_direction(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    faults: Arc<Faults>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer_faults = faults.clone();
    let writer = tokio::spawn(async move {
        let mut cut = writer_faults.cut.subscribe();
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if cut.wait_for(|c| !*c).await.is_err() {
                return;
            }
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 65_536];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx
                    .send((Instant::now() + faults.delay(), buf[..n].to_vec()))
                    .is_err()
                {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}
