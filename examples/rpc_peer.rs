//! A Thrift or Dubbo peer for the benchmark's RPC scenarios, quick enough not to be what is
//! measured (the Python peers of `tests/interop` would be): a server that answers every call,
//! and a closed-loop load generator, the counterparts of `redis-server` and `redis-benchmark`.
//!
//! ```text
//! cargo run --release --example rpc_peer -- serve thrift|dubbo <port> [count file]
//! cargo run --release --example rpc_peer -- load thrift|dubbo <port> <connections> <in flight> <calls>
//! ```
//!
//! - Thrift: framed transport, strict binary protocol; the call is `put(key, value)` with a
//!   16-byte key and a 32-byte value (about a Redis `SET`'s size), the reply a void result.
//! - Dubbo: the invocation is `DemoService.sayHello("world")` as dubbo-ssl-python sent it, captured
//!   in `tests/interop/dubbo/sample_request.bin` (252 bytes); the reply is the provider's, captured
//!   beside it.
//!
//! `serve` answers until killed, one thread, and writes how many calls it answered to the count
//! file every 100 ms. `load` keeps `<in flight>` calls outstanding on each of `<connections>`
//! connections (written together, then read back: one round trip), one thread, until `<calls>`
//! are answered, and prints one JSON line: `requests`, `errors`, `rps`, `p50_ms`, `p99_ms` (of
//! round trips).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const DUBBO_REQUEST: &[u8] = include_bytes!("../tests/interop/dubbo/sample_request.bin");
const DUBBO_RESPONSE: &[u8] = include_bytes!("../tests/interop/dubbo/sample_response.bin");
/// Dubbo's header: magic, flags, status, request id, body length.
const DUBBO_HEADER: usize = 16;
/// A message announced longer than this closes the connection (this peer buffers it whole).
const MAX_MESSAGE: usize = 16 << 20;

#[derive(Clone, Copy, PartialEq)]
enum Protocol {
    Thrift,
    Dubbo,
}

impl Protocol {
    fn named(name: &str) -> anyhow::Result<Self> {
        match name {
            "thrift" => Ok(Protocol::Thrift),
            "dubbo" => Ok(Protocol::Dubbo),
            _ => bail!("protocol `{name}`: give thrift or dubbo"),
        }
    }

    /// The length of the whole message at the start of `buf`, once its head is there.
    fn message_len(self, buf: &[u8]) -> Option<usize> {
        match self {
            Protocol::Thrift => {
                let len = u32::from_be_bytes(buf.get(..4)?.try_into().ok()?);
                Some(4 + len as usize)
            }
            Protocol::Dubbo => {
                let len = u32::from_be_bytes(buf.get(12..16)?.try_into().ok()?);
                Some(DUBBO_HEADER + len as usize)
            }
        }
    }

    /// Call number `id`, appended to `out`.
    fn put_call(self, id: u64, out: &mut Vec<u8>) {
        match self {
            Protocol::Thrift => {
                let key = format!("key:{:012}", id % 1_000_000_000_000);
                let mut m = Vec::with_capacity(96);
                m.extend_from_slice(&[0x80, 0x01, 0x00, 0x01]); // strict binary, CALL
                put_string(&mut m, b"put");
                m.extend_from_slice(&(id as i32 & i32::MAX).to_be_bytes());
                m.extend_from_slice(&[11, 0, 1]); // field 1: string
                put_string(&mut m, key.as_bytes());
                m.extend_from_slice(&[11, 0, 2]); // field 2: string
                put_string(&mut m, &[b'v'; 32]);
                m.push(0); // stop
                out.extend_from_slice(&(m.len() as u32).to_be_bytes());
                out.extend_from_slice(&m);
            }
            Protocol::Dubbo => {
                let start = out.len();
                out.extend_from_slice(DUBBO_REQUEST);
                out[start + 4..start + 12].copy_from_slice(&id.to_be_bytes());
            }
        }
    }

    /// The answer to `call` (a whole message), appended to `out`; `None` when it is not a call
    /// this peer knows how to answer (a Dubbo event is left unanswered).
    fn put_answer(self, call: &[u8], out: &mut Vec<u8>) -> Option<()> {
        match self {
            Protocol::Thrift => {
                let m = &call[4..];
                if m.get(..4)? != [0x80, 0x01, 0x00, 0x01] {
                    return None;
                }
                let name_len = u32::from_be_bytes(m.get(4..8)?.try_into().ok()?) as usize;
                let name = m.get(8..8 + name_len)?;
                let seqid = m.get(8 + name_len..12 + name_len)?;
                let len = 4 + 4 + name_len + 4 + 1;
                out.extend_from_slice(&(len as u32).to_be_bytes());
                out.extend_from_slice(&[0x80, 0x01, 0x00, 0x02]); // REPLY
                put_string(out, name);
                out.extend_from_slice(seqid);
                out.push(0); // a void result: an empty struct
                Some(())
            }
            Protocol::Dubbo => {
                let flags = *call.get(2)?;
                if flags & 0x80 == 0 || flags & 0x20 != 0 || flags & 0x40 == 0 {
                    return None; // a response, an event, or a one-way call
                }
                let id = call.get(4..12)?;
                let start = out.len();
                out.extend_from_slice(DUBBO_RESPONSE);
                out[start + 4..start + 12].copy_from_slice(id);
                Some(())
            }
        }
    }
}

fn put_string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["serve", protocol, port, rest @ ..] if rest.len() <= 1 => {
            let protocol = Protocol::named(protocol)?;
            let port: u16 = port.parse().context("port")?;
            runtime.block_on(serve(protocol, port, rest.first().map(|s| s.to_string())))
        }
        ["load", protocol, port, connections, in_flight, calls] => {
            let protocol = Protocol::named(protocol)?;
            let addr = SocketAddr::from(([127, 0, 0, 1], port.parse().context("port")?));
            runtime.block_on(load(
                protocol,
                addr,
                connections.parse().context("connections")?,
                in_flight.parse().context("in flight")?,
                calls.parse().context("calls")?,
            ))
        }
        _ => bail!(
            "usage: rpc_peer serve thrift|dubbo <port> [count file]\n       rpc_peer load thrift|dubbo <port> <connections> <in flight> <calls>"
        ),
    }
}

async fn serve(protocol: Protocol, port: u16, count_file: Option<String>) -> anyhow::Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    let answered = Arc::new(AtomicU64::new(0));
    if let Some(path) = count_file {
        let answered = answered.clone();
        tokio::spawn(async move {
            let mut last = u64::MAX;
            loop {
                let now = answered.load(Ordering::Relaxed);
                if now != last {
                    // Whole or not at all for a reader: written aside, then renamed.
                    let aside = format!("{path}.new");
                    if std::fs::write(&aside, format!("{now}\n")).is_ok() {
                        let _ = std::fs::rename(&aside, &path);
                    }
                    last = now;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }
    loop {
        let (stream, _) = listener.accept().await?;
        let answered = answered.clone();
        tokio::spawn(async move {
            let _ = answer(protocol, stream, &answered).await;
        });
    }
}

/// Answers every call on one connection until it closes.
async fn answer(
    protocol: Protocol,
    mut stream: TcpStream,
    answered: &AtomicU64,
) -> anyhow::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut out = Vec::with_capacity(64 * 1024);
    loop {
        let mut at = 0;
        while let Some(len) = protocol.message_len(&buf[at..]) {
            if len > MAX_MESSAGE {
                bail!("a message of {len} bytes");
            }
            if buf.len() - at < len {
                break;
            }
            if protocol.put_answer(&buf[at..at + len], &mut out).is_some() {
                answered.fetch_add(1, Ordering::Relaxed);
            }
            at += len;
        }
        buf.drain(..at);
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
        }
        if stream.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
    }
}

async fn load(
    protocol: Protocol,
    addr: SocketAddr,
    connections: usize,
    in_flight: u64,
    calls: u64,
) -> anyhow::Result<()> {
    if connections == 0 || in_flight == 0 || calls == 0 {
        bail!("connections, in flight and calls must be above zero");
    }
    let claimed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let stream = TcpStream::connect(addr).await.context("connect")?;
        stream.set_nodelay(true)?;
        let claimed = claimed.clone();
        let rounds = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        tasks.push(tokio::spawn(drive(
            protocol, stream, in_flight, calls, claimed, rounds,
        )));
    }
    let mut rounds = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut answered, mut errors) = (0u64, 0u64);
    for task in tasks {
        let (histogram, ok, failed) = task.await?;
        rounds.add(histogram)?;
        answered += ok;
        errors += failed;
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "{{\"requests\": {}, \"errors\": {errors}, \"rps\": {:.1}, \"p50_ms\": {:.3}, \"p99_ms\": {:.3}, \"p999_ms\": {:.3}}}",
        answered + errors,
        answered as f64 / elapsed,
        rounds.value_at_quantile(0.5) as f64 / 1000.0,
        rounds.value_at_quantile(0.99) as f64 / 1000.0,
        rounds.value_at_quantile(0.999) as f64 / 1000.0,
    );
    if errors > 0 {
        bail!("{errors} call(s) unanswered");
    }
    Ok(())
}

/// One connection's rounds: `in_flight` calls written, then their answers read, until `calls`
/// are claimed across connections. Round-trip times, calls answered, calls that got no answer.
async fn drive(
    protocol: Protocol,
    mut stream: TcpStream,
    in_flight: u64,
    calls: u64,
    claimed: Arc<AtomicU64>,
    mut rounds: hdrhistogram::Histogram<u64>,
) -> (hdrhistogram::Histogram<u64>, u64, u64) {
    let (mut answered, mut failed) = (0u64, 0u64);
    let mut out = Vec::new();
    let mut buf = Vec::with_capacity(64 * 1024);
    loop {
        let first = claimed.fetch_add(in_flight, Ordering::Relaxed);
        if first >= calls {
            break;
        }
        let n = in_flight.min(calls - first);
        out.clear();
        for id in first..first + n {
            protocol.put_call(id, &mut out);
        }
        let sent = Instant::now();
        if stream.write_all(&out).await.is_err() {
            failed += n;
            break;
        }
        let mut got = 0;
        while got < n {
            let mut at = 0;
            while let Some(len) = protocol.message_len(&buf[at..]) {
                if buf.len() - at < len || got == n {
                    break;
                }
                at += len;
                got += 1;
            }
            buf.drain(..at);
            if got == n {
                break;
            }
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        answered += got;
        if got < n {
            failed += n - got;
            break;
        }
        let micros = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
        rounds.saturating_record(micros.max(1));
    }
    (rounds, answered, failed)
}
