//! The uplink's transports and its spreading across gateways, through the library entry points:
//! TLS over TCP carries the same copies as QUIC, `auto` falls back to it when no UDP answers,
//! and a name with several addresses is spread over, failed over and followed as DNS changes.

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use teeway::demo::{compare, plan, send_plan};
use teeway::stack::{self, RunningGateway};
use teeway_agent::metrics as am;
use teeway_agent::Transport;
use teeway_gateway::config::Transports;
use teeway_gateway::metrics as gm;

use support::{agent_settled, assert_agent_identity, settle, settle_async, Stack, LIMIT};

/// Sends `n` varied requests through the agent and checks every copy arrived intact and was
/// acknowledged, with nothing dropped.
async fn mirror_intact(stack: &Stack, n: usize) {
    let plan = plan(n);
    let outcomes = send_plan(stack.agent.addr, &plan).await;
    assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
    assert_eq!(stack.recording.wait_for(n, LIMIT).await, n);
    let verdicts = compare(&plan, &stack.recording.requests());
    assert!(verdicts.values().all(Result::is_ok), "{verdicts:?}");
    let a = settle(|| stack.agent_metrics(), agent_settled).await;
    assert_eq!(a.get(am::MIRRORED_TOTAL), n as f64, "{a:?}");
    assert_eq!(a.sum(am::MIRROR_DROPPED_TOTAL), 0.0, "{a:?}");
    assert_agent_identity(&a);
    assert_eq!(stack.gateway_metrics().get(gm::RECEIVED_TOTAL), n as f64);
}

/// A gateway that serves TLS over TCP and no QUIC.
fn tcp_only(g: &mut teeway_gateway::GatewayConfig) {
    g.transports = Transports {
        quic: false,
        tls: true,
    };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_over_tcp_carries_the_same_copies_as_quic() {
    let stack = Stack::start_configured(100.0, tcp_only, |a| {
        if let Some(g) = a.gateway.as_mut() {
            g.transport = Transport::Tls;
        }
    })
    .await;
    mirror_intact(&stack, 120).await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_falls_back_to_tls_when_no_udp_answers() {
    // The gateway serves TCP only: the agent's QUIC packets meet a closed UDP port, as they
    // would meet a firewall that drops UDP. Connecting at all proves the fallback.
    let stack = Stack::start_configured(100.0, tcp_only, |a| {
        if let Some(g) = a.gateway.as_mut() {
            assert_eq!(g.transport, Transport::Auto, "auto is the default");
        }
    })
    .await;
    mirror_intact(&stack, 40).await;
    stack.stop().await;
}

/// A DNS server on loopback answering A queries for any name with the addresses it holds (the
/// test changes them), with a one-second TTL; AAAA and other queries get an empty answer.
struct Dns {
    addr: SocketAddr,
    answers: Arc<Mutex<Vec<Ipv4Addr>>>,
    queries: Arc<std::sync::atomic::AtomicUsize>,
}

impl Dns {
    async fn start(answers: Vec<Ipv4Addr>) -> Dns {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("dns");
        let addr = socket.local_addr().expect("addr");
        let answers = Arc::new(Mutex::new(answers));
        let queries = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (held, count) = (answers.clone(), queries.clone());
        tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
                let ips = held.lock().expect("answers").clone();
                if let Some(reply) = dns_answer(&buf[..n], &ips) {
                    count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let _ = socket.send_to(&reply, peer).await;
                }
            }
        });
        Dns {
            addr,
            answers,
            queries,
        }
    }

    fn set(&self, ips: Vec<Ipv4Addr>) {
        *self.answers.lock().expect("answers") = ips;
    }
}

/// The answer to one DNS query (RFC 1035 §4.1), `None` for anything that is not one.
fn dns_answer(query: &[u8], ips: &[Ipv4Addr]) -> Option<Vec<u8>> {
    if query.len() < 12 || query[2] & 0x80 != 0 {
        return None;
    }
    // The question: labels up to the root, then type and class.
    let mut end = 12;
    while *query.get(end)? != 0 {
        end += 1 + usize::from(query[end]);
    }
    let qtype = u16::from_be_bytes([*query.get(end + 1)?, *query.get(end + 2)?]);
    end += 5;
    let question = query.get(12..end)?;
    let ips: &[Ipv4Addr] = if qtype == 1 { ips } else { &[] };
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(&query[..2]); // id
    out.extend_from_slice(&[0x81 | (query[2] & 0x01), 0x80]); // response, RD copied, RA
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&(ips.len() as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(question);
    for ip in ips {
        out.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]); // name pointer, A, IN
        out.extend_from_slice(&1u32.to_be_bytes()); // TTL
        out.extend_from_slice(&4u16.to_be_bytes());
        out.extend_from_slice(&ip.octets());
    }
    Some(out)
}

/// A gateway on `ip`:`port` (port 0: any), routing to `shadow`, with the stack's certificates.
async fn gateway_on(stack: &Stack, ip: Ipv4Addr, port: u16) -> RunningGateway {
    let mut config = stack::gateway_config(stack.pki.gateway_material(), &[stack.shadow.addr]);
    config.listen = SocketAddr::from((ip, port));
    RunningGateway::start(config).await.expect("gateway")
}

fn received(g: &RunningGateway) -> f64 {
    g.gateway.metrics().get(gm::RECEIVED_TOTAL)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_gateways_behind_one_name_share_fail_over_and_follow_dns() {
    // Three gateways on three loopback addresses and one port, named by one DNS name.
    let (a_ip, b_ip, c_ip) = (
        Ipv4Addr::new(127, 0, 0, 2),
        Ipv4Addr::new(127, 0, 0, 3),
        Ipv4Addr::new(127, 0, 0, 4),
    );
    let dns = Dns::start(vec![a_ip, b_ip]).await;
    let mut stack = Stack::start(100.0).await;
    // The stack's own gateway is not named by the DNS; it stays idle.
    let a = gateway_on(&stack, a_ip, 0).await;
    let port = a.addr.port();
    let b = gateway_on(&stack, b_ip, port).await;
    let agent_config = {
        let mut config = stack::agent_config(
            stack.pki.agent_material(),
            stack.primary.addr,
            a.addr,
            100.0,
        );
        let g = config.gateway.as_mut().expect("gateway");
        g.host = "gateways.teeway.test".into();
        g.nameservers = vec![dns.addr];
        config
    };
    let old_agent = std::mem::replace(
        &mut stack.agent,
        stack::RunningAgent::start(agent_config)
            .await
            .expect("agent"),
    );
    old_agent.stop().await.expect("old agent stops");
    let links = |n: f64| {
        let agent = stack.agent.agent.clone();
        async move {
            settle(|| agent.metrics(), |s| s.sum(am::UPLINK_LINKS) == n)
                .await
                .sum(am::UPLINK_LINKS)
        }
    };
    assert_eq!(links(2.0).await, 2.0, "one link per address");

    // Spread: both gateways take a share.
    let outcomes = send_plan(stack.agent.addr, &plan(200)).await;
    assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
    let m = settle(
        || stack.agent_metrics(),
        |s| s.get(am::MIRRORED_TOTAL) == 200.0,
    )
    .await;
    assert_eq!(m.get(am::MIRRORED_TOTAL), 200.0, "{m:?}");
    let (ra, rb) = (received(&a), received(&b));
    assert_eq!(ra + rb, 200.0);
    assert!(ra > 0.0 && rb > 0.0, "spread across both: a={ra} b={rb}");

    // Fail over: with b gone, a takes everything at once and nothing is lost.
    b.stop().await.expect("b stops");
    assert_eq!(links(1.0).await, 1.0);
    let outcomes = send_plan(stack.agent.addr, &plan(100)).await;
    assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
    let m = settle(
        || stack.agent_metrics(),
        |s| s.get(am::MIRRORED_TOTAL) == 300.0,
    )
    .await;
    assert_eq!(m.get(am::MIRRORED_TOTAL), 300.0, "{m:?}");
    assert_eq!(m.sum(am::MIRROR_DROPPED_TOTAL), 0.0, "{m:?}");
    assert_eq!(received(&a), ra + 100.0);

    // Follow DNS: a new replica appears under the name; once the TTL runs out the agent links
    // to it without being told.
    let c = gateway_on(&stack, c_ip, port).await;
    let queries_before = dns.queries.load(std::sync::atomic::Ordering::Relaxed);
    dns.set(vec![a_ip, c_ip]);
    assert_eq!(links(2.0).await, 2.0, "the new address is linked");
    assert!(dns.queries.load(std::sync::atomic::Ordering::Relaxed) > queries_before);
    let before_c = received(&c);
    let outcomes = send_plan(stack.agent.addr, &plan(200)).await;
    assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
    let m = settle(
        || stack.agent_metrics(),
        |s| s.get(am::MIRRORED_TOTAL) == 500.0,
    )
    .await;
    assert_eq!(m.get(am::MIRRORED_TOTAL), 500.0, "{m:?}");
    assert!(received(&c) > before_c, "the new replica takes a share");
    assert_agent_identity(&m);

    // And an address that leaves the answer is let go.
    dns.set(vec![c_ip]);
    assert_eq!(links(1.0).await, 1.0, "the departed address is unlinked");
    let agents_on_a = settle_async(
        || async { a.gateway.metrics().get(gm::AGENTS_CONNECTED) },
        |n| *n == 0.0,
    )
    .await;
    assert_eq!(agents_on_a, 0.0, "the agent closed its link to a");
    a.stop().await.expect("a stops");
    c.stop().await.expect("c stops");
    stack.stop().await;
}
