//! `teeway demo`: the whole path on loopback with nothing to set up.
//!
//! It starts a sample primary, the agent, the gateway (QUIC with mTLS, certificates made in
//! memory) and a recording shadow; sends a few hundred varied requests through the agent
//! (methods, query strings, repeated headers, credentials, binary, chunked and HTTP/2 bodies);
//! then checks that every client got the primary's answer, that every mirrored request reached
//! the shadow intact, that no credential left "production", and that the counters add up.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Version};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::sample::{self, Recorded, Recording};
use crate::stack::{self, Pki, RunningAgent, RunningGateway};

/// Requests in flight at once from the demo client.
const CLIENT_CONCURRENCY: usize = 16;
/// How long the demo waits for the uplink and for copies to arrive before calling it a failure.
const SETTLE_LIMIT: Duration = Duration::from_secs(15);

/// Headers the path may add to a mirrored request (documented in the README).
const ADDED_HEADERS: [&str; 5] = [
    "host",
    "x-forwarded-for",
    "via",
    "content-length",
    teeway_gateway::config::DEFAULT_MARKER_HEADER,
];

/// Options of `teeway demo`.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Requests to send.
    pub requests: usize,
    /// Keep everything running afterwards for manual tries.
    pub serve: bool,
}

/// One request of the plan.
#[derive(Debug, Clone)]
pub struct PlannedRequest {
    /// Sequence number, also sent as `x-demo-seq`.
    pub seq: usize,
    /// Method.
    pub method: Method,
    /// Path and query.
    pub target: String,
    /// HTTP version to send with.
    pub version: Version,
    /// Headers sent (in order, names may repeat).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Body.
    pub body: Bytes,
    /// Send the body in several chunks with no content-length (HTTP/1.1 chunked).
    pub chunked: bool,
}

/// A varied, deterministic set of requests.
pub fn plan(n: usize) -> Vec<PlannedRequest> {
    (0..n)
        .map(|seq| {
            let mut headers = vec![
                (
                    HeaderName::from_static("x-demo-seq"),
                    HeaderValue::from(seq),
                ),
                (
                    header::USER_AGENT,
                    HeaderValue::from_static("teeway-demo/1"),
                ),
            ];
            let mut r = PlannedRequest {
                seq,
                method: Method::GET,
                target: format!("/api/items?page={seq}&sort=asc"),
                version: Version::HTTP_11,
                headers: Vec::new(),
                body: Bytes::new(),
                chunked: false,
            };
            match seq % 8 {
                0 => headers.push((header::ACCEPT, HeaderValue::from_static("application/json"))),
                1 => {
                    r.method = Method::POST;
                    r.target = format!("/api/upload?name=blob-{seq}.bin");
                    r.body = binary_body(seq, 512 + seq * 37 % 8192);
                    headers.push((
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/octet-stream"),
                    ));
                }
                2 => {
                    r.method = Method::PUT;
                    r.target = format!("/api/docs/{seq}");
                    r.body = Bytes::from(format!(
                        "line one of doc {seq}\r\nline two\r\n{}",
                        "x".repeat(seq % 300)
                    ));
                    r.chunked = true;
                    headers.push((header::CONTENT_TYPE, HeaderValue::from_static("text/plain")));
                }
                3 => {
                    r.target = "/api/me".into();
                    headers.push((
                        HeaderName::from_static("x-tag"),
                        HeaderValue::from_static("alpha"),
                    ));
                    headers.push((
                        HeaderName::from_static("x-tag"),
                        HeaderValue::from_static("beta"),
                    ));
                    headers.push((
                        header::AUTHORIZATION,
                        HeaderValue::from_static("Bearer demo-secret-token"),
                    ));
                    headers.push((
                        header::COOKIE,
                        HeaderValue::from_static("session=demo-secret-cookie"),
                    ));
                }
                4 => {
                    r.method = Method::DELETE;
                    r.target = format!("/api/items/{seq}");
                }
                5 => {
                    r.method = Method::HEAD;
                    r.target = "/health".into();
                }
                6 => {
                    r.method = Method::POST;
                    r.target = "/pkg.Orders/Create".into();
                    r.version = Version::HTTP_2;
                    r.body = Bytes::from(format!("{{\"order\":{seq},\"items\":[1,2,3]}}"));
                    headers.push((
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    ));
                }
                _ => {
                    r.method = Method::PATCH;
                    r.target = format!("/search?q=a%20b&mark=%E2%9C%93&n={seq}");
                }
            }
            r.headers = headers;
            r
        })
        .collect()
}

fn binary_body(seed: usize, len: usize) -> Bytes {
    let mut state = seed as u64 ^ 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

type DemoBody = BoxBody<Bytes, std::convert::Infallible>;

/// A client that sends planned requests (HTTP/1.1 or h2c) to one address.
pub struct PlanClient {
    http1: Client<HttpConnector, DemoBody>,
    http2: Client<HttpConnector, DemoBody>,
    base: String,
}

impl PlanClient {
    /// A client for `http://addr`.
    pub fn new(addr: SocketAddr) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Self {
            http1: Client::builder(TokioExecutor::new()).build(connector.clone()),
            http2: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build(connector),
            base: format!("http://{addr}"),
        }
    }

    /// Sends `r`; returns the status and the full response body.
    pub async fn send(&self, r: &PlannedRequest) -> anyhow::Result<(http::StatusCode, Bytes)> {
        let body: DemoBody = if r.chunked {
            let chunks: Vec<Result<http_body::Frame<Bytes>, std::convert::Infallible>> = r
                .body
                .chunks(r.body.len().div_ceil(3).max(1))
                .map(|c| Ok(http_body::Frame::data(Bytes::copy_from_slice(c))))
                .collect();
            StreamBody::new(futures_util::stream::iter(chunks)).boxed()
        } else {
            Full::new(r.body.clone()).boxed()
        };
        let mut req = Request::new(body);
        *req.method_mut() = r.method.clone();
        *req.uri_mut() = format!("{}{}", self.base, r.target).parse()?;
        *req.version_mut() = r.version;
        for (name, value) in &r.headers {
            req.headers_mut().append(name.clone(), value.clone());
        }
        let client = if r.version == Version::HTTP_2 {
            &self.http2
        } else {
            &self.http1
        };
        let resp = client.request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }
}

/// Sends `r` through `client`; `Ok` when the answer is exactly the primary's.
pub async fn send_checked(client: &PlanClient, r: &PlannedRequest) -> Result<(), String> {
    let expected = if r.method == Method::HEAD {
        String::new()
    } else {
        sample::primary_answer(&r.method, &r.target, &r.body)
    };
    match client.send(r).await {
        Ok((status, body)) if status == http::StatusCode::OK && body == expected.as_bytes() => {
            Ok(())
        }
        Ok((status, body)) => Err(format!(
            "request {} {} {}: got {status} {:?}, expected 200 {expected:?}",
            r.seq,
            r.method,
            r.target,
            String::from_utf8_lossy(&body)
        )),
        Err(e) => Err(format!(
            "request {} {} {}: {e:#}",
            r.seq, r.method, r.target
        )),
    }
}

/// Sends the whole plan through `addr`, `CLIENT_CONCURRENCY` at a time; returns, per request,
/// whether the client got exactly the primary's answer.
pub async fn send_plan(addr: SocketAddr, plan: &[PlannedRequest]) -> Vec<Result<(), String>> {
    let client = Arc::new(PlanClient::new(addr));
    let limit = Arc::new(Semaphore::new(CLIENT_CONCURRENCY));
    let mut tasks = JoinSet::new();
    for r in plan.iter().cloned() {
        let client = client.clone();
        let limit = limit.clone();
        tasks.spawn(async move {
            let _permit = limit.acquire_owned().await;
            let outcome = send_checked(&client, &r).await;
            (r.seq, outcome)
        });
    }
    let mut outcomes = vec![Err("not sent".to_owned()); plan.len()];
    while let Some(joined) = tasks.join_next().await {
        if let Ok((seq, outcome)) = joined {
            outcomes[seq] = outcome;
        }
    }
    outcomes
}

/// Compares what the shadow recorded with the plan: method, target, body byte for byte; every
/// header sent arrives with the same values in the same order, credentials excepted (they must
/// not arrive at all); nothing else arrives but the documented additions.
pub fn compare(
    plan: &[PlannedRequest],
    recorded: &[Recorded],
) -> BTreeMap<usize, Result<(), String>> {
    let mut by_seq: BTreeMap<usize, Vec<&Recorded>> = BTreeMap::new();
    for r in recorded {
        if let Some(seq) = r
            .headers
            .get("x-demo-seq")
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse().ok())
        {
            by_seq.entry(seq).or_default().push(r);
        }
    }
    let mut out = BTreeMap::new();
    for p in plan {
        let verdict = match by_seq.get(&p.seq).map(Vec::as_slice) {
            None => continue,
            Some([r]) => compare_one(p, r),
            Some(many) => Err(format!("arrived {} times", many.len())),
        };
        out.insert(p.seq, verdict);
    }
    out
}

fn compare_one(p: &PlannedRequest, r: &Recorded) -> Result<(), String> {
    if r.method != p.method {
        return Err(format!("method {} != {}", r.method, p.method));
    }
    let target = r.uri.path_and_query().map_or("/", |pq| pq.as_str());
    if target != p.target {
        return Err(format!("target {target} != {}", p.target));
    }
    if r.body != p.body {
        return Err(format!(
            "body of {} bytes differs from the {} sent",
            r.body.len(),
            p.body.len()
        ));
    }
    let mut sent = HeaderMap::new();
    for (n, v) in &p.headers {
        sent.append(n.clone(), v.clone());
    }
    for name in sent.keys() {
        let want: Vec<&HeaderValue> = sent.get_all(name).iter().collect();
        let got: Vec<&HeaderValue> = r.headers.get_all(name).iter().collect();
        let is_secret = teeway_agent::policy::DEFAULT_REDACTED_HEADERS.contains(name);
        if is_secret && !got.is_empty() {
            return Err(format!("credential header {name} reached the shadow"));
        }
        if !is_secret && got != want {
            return Err(format!("header {name}: {got:?} != {want:?}"));
        }
    }
    if r.headers
        .get(teeway_gateway::config::DEFAULT_MARKER_HEADER)
        .is_none_or(|v| v.is_empty())
    {
        return Err("no marker header: the shadow cannot tell mirrored traffic".into());
    }
    for name in r.headers.keys() {
        if !sent.contains_key(name) && !ADDED_HEADERS.contains(&name.as_str()) {
            return Err(format!("unexpected header {name} at the shadow"));
        }
    }
    Ok(())
}

/// Runs the demo; `Ok(true)` when every mirrored request arrived intact.
pub async fn run(options: DemoOptions) -> anyhow::Result<bool> {
    teeway_wire::tls::install_default_provider();
    let started = Instant::now();
    let pki = Pki::generate("demo-agent")?;
    let primary = sample::start_primary().await?;
    let (shadow, recording) = sample::start_shadow(Duration::ZERO).await?;
    let gateway = RunningGateway::start(stack::gateway_config(
        pki.gateway_material(),
        &[shadow.addr],
    ))
    .await?;
    let agent = RunningAgent::start(stack::agent_config(
        pki.agent_material(),
        primary.addr,
        gateway.addr,
        100.0,
    ))
    .await?;

    println!("teeway demo: production traffic teed over mTLS QUIC to a shadow, all on loopback\n");
    println!(
        "  client ──▶ agent {} ──▶ primary {}",
        agent.addr, primary.addr
    );
    println!(
        "                 └──(QUIC, mTLS)──▶ gateway {} ──▶ shadow {}\n",
        gateway.addr, shadow.addr
    );

    if !agent.wait_connected(SETTLE_LIMIT).await {
        anyhow::bail!("the agent's uplink did not connect to the gateway within {SETTLE_LIMIT:?}");
    }

    let plan = plan(options.requests);
    let client_outcomes = send_plan(agent.addr, &plan).await;
    let client_ok = client_outcomes.iter().filter(|o| o.is_ok()).count();

    let arrived = recording.wait_for(plan.len(), SETTLE_LIMIT).await;
    let verdicts = compare(&plan, &recording.requests());
    let intact = verdicts.values().filter(|v| v.is_ok()).count();
    let missing = plan.len() - verdicts.len();
    wait_for_replays(&gateway, arrived).await;
    wait_for_acks(&agent).await;

    let a = agent.agent.metrics();
    let g = gateway.gateway.metrics();
    let secrets_sent = plan
        .iter()
        .filter(|p| p.headers.iter().any(|(n, _)| n == header::AUTHORIZATION))
        .count();
    let secrets_leaked = recording
        .requests()
        .iter()
        .filter(|r| {
            r.headers.contains_key(header::AUTHORIZATION) || r.headers.contains_key(header::COOKIE)
        })
        .count();

    print_mix(&plan);
    println!(
        "client → agent → primary   {client_ok}/{} answered with exactly the primary's response",
        plan.len()
    );
    println!(
        "agent → gateway → shadow   {intact}/{} arrived intact (method, target, headers, body); {missing} missing",
        plan.len()
    );
    println!("credentials                {secrets_sent} requests carried Authorization and Cookie; {secrets_leaked} reached the shadow with them\n");
    print_agent_counters(&a);
    print_gateway_counters(&g);

    for (seq, outcome) in client_outcomes.iter().enumerate() {
        if let Err(e) = outcome {
            println!("  client problem: {e}");
            if seq > 20 {
                break;
            }
        }
    }
    for (seq, verdict) in verdicts.iter().filter(|(_, v)| v.is_err()).take(20) {
        if let Err(e) = verdict {
            println!("  shadow problem with request {seq}: {e}");
        }
    }

    let ok = client_ok == plan.len() && intact == plan.len() && secrets_leaked == 0;
    println!(
        "\nresult: {} ({:.1?})",
        if ok {
            "OK: every request was served by the primary and arrived intact at the shadow"
        } else {
            "FAILED"
        },
        started.elapsed()
    );

    if options.serve {
        serve_forever(&agent, &gateway, &shadow, &recording).await;
    }
    agent.stop().await?;
    gateway.stop().await?;
    primary.stop().await;
    shadow.stop().await;
    Ok(ok)
}

/// Waits until the agent has resolved every copy: a shadow can see a copy before the agent has
/// read the gateway's acknowledgement of it. Polled, bounded in time.
async fn wait_for_acks(agent: &RunningAgent) {
    let deadline = Instant::now() + SETTLE_LIMIT;
    while Instant::now() < deadline
        && agent
            .agent
            .metrics()
            .get(teeway_agent::metrics::MIRROR_IN_FLIGHT)
            > 0.0
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the gateway has finished the replays whose requests reached the shadow.
/// Counters have no change event, so this polls, bounded in time.
async fn wait_for_replays(gateway: &RunningGateway, arrived: usize) {
    let deadline = Instant::now() + SETTLE_LIMIT;
    while Instant::now() < deadline {
        let g = gateway.gateway.metrics();
        let done = g.sum(teeway_gateway::metrics::REPLAYED_TOTAL)
            + g.sum(teeway_gateway::metrics::REPLAY_FAILED_TOTAL);
        if done >= arrived as f64 && g.get(teeway_gateway::metrics::REPLAY_IN_FLIGHT) == 0.0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn print_mix(plan: &[PlannedRequest]) {
    let mut methods: BTreeMap<&str, usize> = BTreeMap::new();
    let mut h2 = 0;
    let mut bytes = 0;
    for p in plan {
        *methods.entry(p.method.as_str()).or_default() += 1;
        h2 += usize::from(p.version == Version::HTTP_2);
        bytes += p.body.len();
    }
    let methods: Vec<String> = methods.iter().map(|(m, n)| format!("{m} {n}")).collect();
    println!(
        "sent {} requests: {}; HTTP/1.1 {} and HTTP/2 {}; {} body bytes (binary, chunked, JSON)\n",
        plan.len(),
        methods.join(", "),
        plan.len() - h2,
        h2,
        bytes
    );
}

fn print_agent_counters(a: &teeway_runtime::metrics::Snapshot) {
    use teeway_agent::metrics as m;
    let dropped: Vec<String> = a
        .series(m::MIRROR_DROPPED_TOTAL)
        .into_iter()
        .filter(|(_, v)| *v > 0.0)
        .map(|(s, v)| format!("{s} {v}"))
        .collect();
    println!(
        "agent    requests {} = not sampled {} + mirrored {} + dropped {} + in flight {}{}",
        a.get(m::REQUESTS_TOTAL),
        a.get(m::NOT_SAMPLED_TOTAL),
        a.get(m::MIRRORED_TOTAL),
        a.sum(m::MIRROR_DROPPED_TOTAL),
        a.get(m::MIRROR_IN_FLIGHT),
        if dropped.is_empty() {
            String::new()
        } else {
            format!(" ({})", dropped.join(", "))
        }
    );
}

fn print_gateway_counters(g: &teeway_runtime::metrics::Snapshot) {
    use teeway_gateway::metrics as m;
    let classes: Vec<String> = ["1xx", "2xx", "3xx", "4xx", "5xx"]
        .into_iter()
        .map(|class| {
            (
                class,
                g.sum_where(m::REPLAYED_TOTAL, &[("status_class", class)]),
            )
        })
        .filter(|(_, n)| *n > 0.0)
        .map(|(class, n)| format!("{class} {n}"))
        .collect();
    println!(
        "gateway  received {}, replayed {} ({}), failed {}",
        g.get(m::RECEIVED_TOTAL),
        g.sum(m::REPLAYED_TOTAL),
        classes.join(", "),
        g.sum(m::REPLAY_FAILED_TOTAL)
    );
}

async fn serve_forever(
    agent: &RunningAgent,
    gateway: &RunningGateway,
    shadow: &sample::Service,
    recording: &Recording,
) {
    println!("\nstill running; press Ctrl-C to stop.");
    println!("  agent          http://{}", agent.addr);
    if let Some(admin) = agent.admin {
        println!("  agent admin    http://{admin}/metrics  /readyz");
    }
    if let Some(admin) = gateway.admin {
        println!("  gateway admin  http://{admin}/metrics");
    }
    println!("  shadow         {}", shadow.url());
    println!(
        "\ntry:  curl -si -X POST --data 'hello shadow' 'http://{}/try?from=curl'",
        agent.addr
    );
    let before = recording.count();
    let _ = tokio::signal::ctrl_c().await;
    println!(
        "\nthe shadow received {} more requests while serving; stopping.",
        recording.count() - before
    );
}
