//! The raw TCP tee, end to end with the real binary, real QUIC and certificates made at test time:
//! an agent with only a `tcp:` listener in front of a primary, a gateway whose `tcp_routes` replay
//! each teed connection on a fresh connection to a shadow.
//!
//! - Redis: Debian's `redis-server` as primary and as shadow, `redis-benchmark` through the
//!   agent; afterwards the shadow holds the same data as the primary (`DEBUG DIGEST`).
//! - Thrift: calls in the framed transport with the binary protocol, built from the published
//!   framing; the client gets every reply from the primary, the shadow receives the same bytes in
//!   the same order, and its replies go nowhere.
//! - A shadow that never reads, and one that is not there, never hold up the primary connection;
//!   every connection is still accounted for.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use teeway_runtime::metrics::Snapshot;

use support::redis::{redis_cli, redis_server, Reap};
use support::{certs_init, field, scrape, settle_async, Proc, LIMIT};

/// A gateway (replaying listener `name` to `shadow`) and a TCP-only agent in front of `primary`.
struct Pair {
    _gateway: Proc,
    agent: Proc,
    gateway_admin: SocketAddr,
    agent_admin: SocketAddr,
    /// Where clients connect: the agent's `tcp:` listener.
    listen: SocketAddr,
}

impl Pair {
    fn start(dir: &Path, name: &str, primary: SocketAddr, shadow: &str, extra: &str) -> Pair {
        Self::start_routed(dir, name, name, primary, shadow, extra)
    }

    /// As [`Pair::start`], the gateway's route naming listener `route` instead.
    fn start_routed(
        dir: &Path,
        name: &str,
        route: &str,
        primary: SocketAddr,
        shadow: &str,
        extra: &str,
    ) -> Pair {
        certs_init(dir);
        std::fs::write(
            dir.join("gateway.yaml"),
            format!(
                "listen: 127.0.0.1:0
tls: {{ ca: certs/dev/ca.pem, cert: certs/dev/gateway.pem, key: certs/dev/gateway.key }}
tcp_routes:
  - listener: {route}
    targets: [{shadow}]
admin: {{ listen: 127.0.0.1:0 }}
"
            ),
        )
        .expect("write");
        let gateway = Proc::spawn(dir, &["gateway", "--config", "gateway.yaml"]);
        let serving = gateway.wait_for_line("gateway serving");
        let gateway_addr = field(&serving, "listen");
        let gateway_admin = field(&serving, "admin").parse().expect("admin");
        std::fs::write(
            dir.join("agent.yaml"),
            format!(
                "cluster: prod-eu-1
tcp:
  - name: {name}
    listen: 127.0.0.1:0
    primary: {primary}
{extra}gateway:
  address: {gateway_addr}
  server_name: localhost
  ca: certs/dev/ca.pem
  cert: certs/dev/agent.pem
  key: certs/dev/agent.key
admin: {{ listen: 127.0.0.1:0 }}
"
            ),
        )
        .expect("write");
        let agent = Proc::spawn(dir, &["agent", "--config", "agent.yaml"]);
        let serving = agent.wait_for_line("agent serving");
        let tcp = field(&serving, "tcp");
        let listen = tcp
            .strip_prefix(&format!("{name}@"))
            .unwrap_or_else(|| panic!("listener {name} in {serving}"))
            .parse()
            .expect("tcp listen addr");
        let agent_admin = field(&serving, "admin").parse().expect("admin");
        // Connections teed before the uplink is up would be counted `no_uplink`.
        agent.wait_for_line("uplink connected");
        Pair {
            _gateway: gateway,
            agent,
            gateway_admin,
            agent_admin,
            listen,
        }
    }

    /// The agent's and the gateway's metrics once every copy is resolved and every replay over.
    ///
    /// The books are part of the wait (see `support::agent_settled`): a scrape reads counters
    /// before gauges, so an outcome resolved between the two reads shows in neither; once quiet,
    /// the next scrape is whole, and a real imbalance never settles and fails the assertions.
    async fn settled(&self, connections: f64) -> (Snapshot, Snapshot) {
        let agent = settle_async(
            || scrape(self.agent_admin),
            |s: &Snapshot| {
                let (seen, accounted) = tcp_books(s);
                seen >= connections
                    && s.sum("teeway_agent_tcp_tee_in_flight") == 0.0
                    && seen == accounted
            },
        )
        .await;
        // Streams the gateway answered: acknowledged whole, or refused.
        let streams = agent.sum("teeway_agent_tcp_teed_total") + dropped(&agent, "rejected");
        let gateway = settle_async(
            || scrape(self.gateway_admin),
            |s: &Snapshot| {
                // Every route here has one target: one result per stream.
                s.get("teeway_gateway_tcp_streams_total") >= streams
                    && s.get("teeway_gateway_tcp_replays_in_flight") == 0.0
                    && s.sum("teeway_gateway_tcp_replays_total")
                        == s.get("teeway_gateway_tcp_streams_total")
            },
        )
        .await;
        (agent, gateway)
    }
}

/// Sampled connections whose copy was given up for `reason`, over every listener.
fn dropped(s: &Snapshot, reason: &str) -> f64 {
    let label = format!("reason=\"{reason}\"");
    s.series("teeway_agent_tcp_tee_dropped_total")
        .iter()
        .filter(|(series, _)| series.contains(&label))
        .map(|(_, v)| v)
        .sum()
}

/// Connections the agent saw, and the sum of its buckets: not sampled + teed + dropped + in
/// flight.
fn tcp_books(s: &Snapshot) -> (f64, f64) {
    let dropped: f64 = [
        "connection_limit",
        "no_uplink",
        "no_quic_link",
        "primary_error",
        "buffer_full",
        "uplink_error",
        "rejected",
        "shutdown",
    ]
    .iter()
    .map(|r| dropped(s, r))
    .sum();
    (
        s.sum("teeway_agent_tcp_connections_total"),
        s.sum("teeway_agent_tcp_not_sampled_total")
            + s.sum("teeway_agent_tcp_teed_total")
            + dropped
            + s.sum("teeway_agent_tcp_tee_in_flight"),
    )
}

/// Every connection the agent saw is in exactly one bucket.
fn assert_tcp_identity(s: &Snapshot) {
    let (seen, accounted) = tcp_books(s);
    assert_eq!(
        seen, accounted,
        "connections seen = not sampled + teed + dropped + in flight"
    );
}

// ---------------------------------------------------------------------------------------------
// Redis

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_benchmark_through_the_agent_leaves_the_shadow_with_the_primary_data() {
    let found = ["redis-server", "redis-benchmark", "redis-cli"].map(support::find_program);
    let [Some(server), Some(benchmark), Some(cli)] = found else {
        support::tool_missing(
            "redis-server, redis-benchmark, redis-cli",
            "Redis as primary and shadow of the TCP tee",
            "apt-get install redis-server redis-tools",
        );
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let (primary, primary_addr) = redis_server(dir.path(), &server, "primary").await;
    let _primary = Reap(primary);
    let (shadow, shadow_addr) = redis_server(dir.path(), &server, "shadow").await;
    let _shadow = Reap(shadow);
    let pair = Pair::start(
        dir.path(),
        "redis",
        primary_addr,
        &shadow_addr.to_string(),
        "",
    );

    // Commands whose end state does not depend on how connections interleave (the primary and
    // the shadow see the same connections in a different interleaving): SET of a fixed value,
    // INCR, SADD and HSET of random members. Pipelined, so chunks carry many commands each.
    let out = Command::new(&benchmark)
        .args(["-h", "127.0.0.1", "-p", &pair.listen.port().to_string()])
        .args([
            "-t",
            "set,incr,sadd,hset",
            "-n",
            "4000",
            "-r",
            "500",
            "-c",
            "8",
            "-P",
            "16",
            "-q",
        ])
        .output()
        .expect("redis-benchmark runs");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "redis-benchmark: {out:?}");
    for test in ["SET", "INCR", "SADD", "HSET"] {
        assert!(
            report.contains(test),
            "{test} ran through the agent: {report}"
        );
    }

    let connections_seen = settle_async(
        || scrape(pair.agent_admin),
        |s: &Snapshot| s.sum("teeway_agent_tcp_connections_total") > 0.0,
    )
    .await
    .sum("teeway_agent_tcp_connections_total");
    let (agent, gateway) = pair.settled(connections_seen).await;
    assert_tcp_identity(&agent);
    let seen = agent.sum("teeway_agent_tcp_connections_total");
    assert_eq!(
        agent.sum("teeway_agent_tcp_teed_total"),
        seen,
        "every connection teed whole: {}",
        pair.agent.unread_lines()
    );
    assert_eq!(
        agent.sum("teeway_agent_tcp_teed_bytes_total"),
        agent.sum("teeway_agent_tcp_bytes_total"),
        "every byte the clients sent was teed"
    );
    assert_eq!(
        gateway.get("teeway_gateway_tcp_replays_total{result=\"completed\"}"),
        seen,
        "every teed connection replayed whole"
    );
    assert_eq!(
        gateway.get("teeway_gateway_tcp_bytes_replayed_total"),
        agent.sum("teeway_agent_tcp_bytes_total"),
        "the shadow was sent exactly the bytes the primary was"
    );

    let keys = redis_cli(&cli, primary_addr, &["DBSIZE"]);
    assert!(
        keys.parse::<u64>().expect("a count") > 100,
        "the benchmark wrote keys: {keys}"
    );
    assert_eq!(redis_cli(&cli, shadow_addr, &["DBSIZE"]), keys);
    assert_eq!(
        redis_cli(&cli, shadow_addr, &["DEBUG", "DIGEST"]),
        redis_cli(&cli, primary_addr, &["DEBUG", "DIGEST"]),
        "the shadow holds the same data as the primary"
    );
}

// ---------------------------------------------------------------------------------------------
// Thrift: framed transport, binary protocol (strict), as the Apache Thrift specification gives:
// frame = i32 length, message = i32 (0x8001_0000 | type), string name, i32 seqid, struct.

const THRIFT_CALL: u32 = 1;
const THRIFT_REPLY: u32 = 2;
const THRIFT_STRING: u8 = 11;
const THRIFT_STOP: u8 = 0;

/// A framed `CALL` of `method` whose argument 1 is the string `arg`.
fn thrift_call(method: &str, seqid: i32, arg: &[u8]) -> Bytes {
    thrift_frame(THRIFT_CALL, method, seqid, arg)
}

fn thrift_frame(kind: u32, method: &str, seqid: i32, field: &[u8]) -> Bytes {
    let mut msg = BytesMut::new();
    msg.put_u32(0x8001_0000 | kind);
    msg.put_i32(i32::try_from(method.len()).expect("short name"));
    msg.put_slice(method.as_bytes());
    msg.put_i32(seqid);
    // Field: type string, id 0 for a reply's success value, 1 for a call's argument.
    msg.put_u8(THRIFT_STRING);
    msg.put_i16(if kind == THRIFT_REPLY { 0 } else { 1 });
    msg.put_i32(i32::try_from(field.len()).expect("short field"));
    msg.put_slice(field);
    msg.put_u8(THRIFT_STOP);
    let mut frame = BytesMut::new();
    frame.put_u32(u32::try_from(msg.len()).expect("short message"));
    frame.put_slice(&msg);
    frame.freeze()
}

/// One decoded message: type, method name, seqid, the string field.
#[derive(Debug, PartialEq, Eq)]
struct ThriftMessage {
    kind: u32,
    method: String,
    seqid: i32,
    field: Vec<u8>,
}

/// Reads one framed message; `None` at a clean end of stream. Panics on malformed input: the
/// peers in this test speak it exactly.
async fn read_thrift(stream: &mut (impl AsyncReadExt + Unpin)) -> Option<(Bytes, ThriftMessage)> {
    let mut len = [0u8; 4];
    match stream.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return None,
        Err(e) => panic!("read: {e}"),
    }
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    stream.read_exact(&mut body).await.expect("whole frame");
    let mut raw = BytesMut::from(&len[..]);
    raw.put_slice(&body);
    let mut b = Bytes::from(body);
    let head = b.get_u32();
    assert_eq!(head & 0xffff_0000, 0x8001_0000, "strict binary protocol");
    let name_len = usize::try_from(b.get_i32()).expect("name length");
    let method = String::from_utf8(b.split_to(name_len).to_vec()).expect("utf-8 name");
    let seqid = b.get_i32();
    assert_eq!(b.get_u8(), THRIFT_STRING);
    let _id = b.get_i16();
    let field_len = usize::try_from(b.get_i32()).expect("field length");
    let field = b.split_to(field_len).to_vec();
    assert_eq!(b.get_u8(), THRIFT_STOP);
    assert!(!b.has_remaining(), "nothing after the struct");
    Some((
        raw.freeze(),
        ThriftMessage {
            kind: head & 0xff,
            method,
            seqid,
            field,
        },
    ))
}

/// The frames a Thrift server received, one list per connection, in arrival order.
type Received = Arc<Mutex<Vec<Vec<Bytes>>>>;

/// A Thrift server answering each call with a reply naming `who`; records every frame it got.
async fn thrift_server(who: &'static str) -> (SocketAddr, Received) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Received::default();
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let record = record.clone();
            let conn = {
                let mut all = record.lock().expect("lock");
                all.push(Vec::new());
                all.len() - 1
            };
            tokio::spawn(async move {
                while let Some((raw, call)) = read_thrift(&mut stream).await {
                    record.lock().expect("lock")[conn].push(raw);
                    let reply =
                        thrift_frame(THRIFT_REPLY, &call.method, call.seqid, who.as_bytes());
                    if stream.write_all(&reply).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// Sends `calls` calls on one connection, half of them pipelined, and checks each reply.
async fn thrift_client(agent: SocketAddr, client: usize, calls: i32) -> Vec<Bytes> {
    let mut stream = TcpStream::connect(agent).await.expect("connect");
    let mut sent = Vec::new();
    let mut seqid = 0;
    while seqid < calls {
        // Two calls in one write, then a lone one: frames split and joined across reads.
        let burst = if seqid % 3 == 0 { 2 } else { 1 };
        let mut out = BytesMut::new();
        for _ in 0..burst {
            let arg = format!("client-{client}-order-{seqid}-")
                .repeat(usize::try_from(seqid % 50).unwrap_or(0) + 1);
            let call = thrift_call("placeOrder", seqid, arg.as_bytes());
            out.put_slice(&call);
            sent.push(call);
            seqid += 1;
        }
        stream.write_all(&out).await.expect("write");
        for expected in seqid - burst..seqid {
            let (_, reply) = read_thrift(&mut stream).await.expect("a reply");
            assert_eq!(
                reply,
                ThriftMessage {
                    kind: THRIFT_REPLY,
                    method: "placeOrder".into(),
                    seqid: expected,
                    field: b"primary".to_vec(),
                },
                "the client is answered by the primary, in order"
            );
        }
    }
    stream.shutdown().await.expect("half-close");
    assert!(read_thrift(&mut stream).await.is_none(), "nothing more");
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thrift_framed_calls_reach_the_shadow_byte_identical_and_its_replies_go_nowhere() {
    let (primary, primary_seen) = thrift_server("primary").await;
    let (shadow, shadow_seen) = thrift_server("shadow").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let pair = Pair::start(
        dir.path(),
        "orders-thrift",
        primary,
        &shadow.to_string(),
        "",
    );

    let mut clients = tokio::task::JoinSet::new();
    for client in 0..4 {
        clients.spawn(thrift_client(pair.listen, client, 60));
    }
    let mut sent: Vec<Vec<Bytes>> = Vec::new();
    while let Some(calls) = clients.join_next().await {
        sent.push(calls.expect("client"));
    }
    let (agent, gateway) = pair.settled(4.0).await;
    assert_tcp_identity(&agent);
    assert_eq!(
        agent.sum("teeway_agent_tcp_teed_total"),
        4.0,
        "{:?} {:?}",
        agent.series("teeway_agent_tcp_tee_dropped_total"),
        gateway.series("teeway_gateway_tcp_replays_total")
    );
    assert_eq!(
        gateway.get("teeway_gateway_tcp_replays_total{result=\"completed\"}"),
        4.0
    );
    // One shadow connection per client connection, holding exactly its calls, in order.
    let mut shadow_conns = shadow_seen.lock().expect("lock").clone();
    let mut primary_conns = primary_seen.lock().expect("lock").clone();
    let mut sent = sent;
    for conns in [&mut shadow_conns, &mut primary_conns, &mut sent] {
        conns.sort();
    }
    assert_eq!(primary_conns.len(), 4);
    assert_eq!(
        shadow_conns.len(),
        4,
        "a fresh shadow connection per client connection"
    );
    for ((shadow, primary), sent) in shadow_conns.iter().zip(&primary_conns).zip(&sent) {
        assert_eq!(primary.len(), 60);
        assert!(
            shadow == sent,
            "the shadow got one connection's 60 calls byte for byte, in order ({} calls)",
            shadow.len()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// A shadow that never reads, and one that is gone.

/// A primary that reads everything and answers with the number of bytes it read, then closes.
async fn counting_primary() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut sink = tokio::io::sink();
                let n = tokio::io::copy(&mut stream, &mut sink).await.unwrap_or(0);
                let _ = stream.write_all(format!("{n}\n").as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

/// Sends `len` bytes and reads the primary's count back.
async fn send_and_count(agent: SocketAddr, len: usize) -> String {
    let mut stream = TcpStream::connect(agent).await.expect("connect");
    let block = vec![0x5au8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(block.len());
        stream.write_all(&block[..n]).await.expect("write");
        left -= n;
    }
    stream.shutdown().await.expect("half-close");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.expect("read");
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_that_never_reads_does_not_hold_up_the_primary() {
    let primary = counting_primary().await;
    // Accepts and then never reads: its receive buffer fills, then the gateway's, then the copy's.
    let stalled = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let stalled_addr = stalled.local_addr().expect("addr");
    let dir = tempfile::tempdir().expect("tempdir");
    let pair = Pair::start(
        dir.path(),
        "bulk",
        primary,
        &stalled_addr.to_string(),
        "    buffer_bytes: 64KiB\n",
    );
    const LEN: usize = 48 * 1024 * 1024;
    // The client's whole exchange completes with the shadow stalled; were production waiting on
    // the copy, this would never return (the shadow reads nothing, ever).
    let answer = tokio::time::timeout(LIMIT, send_and_count(pair.listen, LEN))
        .await
        .expect("the primary connection completes while the shadow stalls");
    assert_eq!(answer.trim(), LEN.to_string());

    let (agent, gateway) = pair.settled(1.0).await;
    assert_tcp_identity(&agent);
    assert_eq!(agent.sum("teeway_agent_tcp_bytes_total"), LEN as f64);
    assert_eq!(
        agent.sum("teeway_agent_tcp_teed_total"),
        0.0,
        "the copy could not be whole"
    );
    let given_up = dropped(&agent, "buffer_full") + dropped(&agent, "rejected");
    assert_eq!(
        given_up,
        1.0,
        "the copy was given up and counted: {:?} {:?}",
        agent.series("teeway_agent_tcp_tee_dropped_total"),
        gateway.series("teeway_gateway_tcp_replays_total")
    );
    // Whether the stream reached the gateway before it was given up depends on timing; what
    // reached it was never replayed as if whole.
    assert_eq!(
        gateway.get("teeway_gateway_tcp_replays_total{result=\"completed\"}"),
        0.0,
        "a copy with a gap is never replayed as whole: {:?}",
        gateway.series("teeway_gateway_tcp_replays_total")
    );
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_shadow_is_counted_and_the_primary_is_served() {
    let primary = counting_primary().await;
    let (_held, dead) = support::refusing_addr();
    let dir = tempfile::tempdir().expect("tempdir");
    let pair = Pair::start(dir.path(), "bulk", primary, &dead.to_string(), "");
    for _ in 0..3 {
        assert_eq!(send_and_count(pair.listen, 100_000).await.trim(), "100000");
    }
    let (agent, gateway) = pair.settled(3.0).await;
    assert_tcp_identity(&agent);
    assert_eq!(
        gateway.get("teeway_gateway_tcp_replays_total{result=\"connect\"}"),
        3.0,
        "each replay found no shadow"
    );
    // The gateway refuses a stream it has no target left for; the agent counts it.
    assert_eq!(
        dropped(&agent, "rejected") + agent.sum("teeway_agent_tcp_teed_total"),
        3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_without_a_route_is_refused_and_counted_on_both_sides() {
    let primary = counting_primary().await;
    let (shadow, shadow_seen) = thrift_server("shadow").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let pair = Pair::start_routed(
        dir.path(),
        "bulk",
        "other",
        primary,
        &shadow.to_string(),
        "",
    );
    for _ in 0..3 {
        assert_eq!(send_and_count(pair.listen, 1000).await.trim(), "1000");
    }
    let (agent, gateway) = pair.settled(3.0).await;
    assert_tcp_identity(&agent);
    assert_eq!(dropped(&agent, "rejected"), 3.0);
    assert_eq!(
        gateway.get("teeway_gateway_tcp_replays_total{result=\"no_route\"}"),
        3.0
    );
    assert!(shadow_seen.lock().expect("lock").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_at_zero_percent_tees_nothing() {
    let primary = counting_primary().await;
    let (shadow, shadow_seen) = thrift_server("shadow").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let pair = Pair::start(
        dir.path(),
        "bulk",
        primary,
        &shadow.to_string(),
        "    percentage: 0\n",
    );
    for _ in 0..5 {
        assert_eq!(send_and_count(pair.listen, 1000).await.trim(), "1000");
    }
    let (agent, gateway) = pair.settled(5.0).await;
    assert_tcp_identity(&agent);
    assert_eq!(agent.sum("teeway_agent_tcp_not_sampled_total"), 5.0);
    assert_eq!(agent.sum("teeway_agent_tcp_bytes_total"), 5000.0);
    assert_eq!(gateway.get("teeway_gateway_tcp_streams_total"), 0.0);
    assert!(shadow_seen.lock().expect("lock").is_empty());
}
