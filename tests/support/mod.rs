//! Shared helpers for the end-to-end tests: a whole stack on loopback, admin scrapes over HTTP,
//! and a bounded wait for counters (which have no change event).

#![allow(dead_code)] // each test binary uses its own subset

pub mod nginx;
pub mod recorder;
pub mod redis;
pub mod wan;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

use teeway::sample::{self, Recording, Service};
use teeway::stack::{self, Pki, RunningAgent, RunningGateway};
use teeway_runtime::metrics::Snapshot;

/// Upper bound on any wait in these tests: generous for a loaded CI machine, never reached when
/// things work.
pub const LIMIT: Duration = Duration::from_secs(20);

/// Primary, shadow, gateway and agent, started in that order.
pub struct Stack {
    pub pki: Pki,
    pub primary: Service,
    pub shadow: Service,
    pub recording: Recording,
    pub gateway: Option<RunningGateway>,
    pub agent: RunningAgent,
}

impl Stack {
    pub async fn start(percentage: f64) -> Stack {
        Self::start_with(percentage, |_| {}).await
    }

    /// As [`Stack::start`], with a chance to adjust the agent's configuration first.
    pub async fn start_with(
        percentage: f64,
        adjust: impl FnOnce(&mut teeway_agent::AgentConfig),
    ) -> Stack {
        Self::start_configured(percentage, |_| {}, adjust).await
    }

    /// As [`Stack::start`], with a chance to adjust the gateway's and the agent's configurations.
    pub async fn start_configured(
        percentage: f64,
        adjust_gateway: impl FnOnce(&mut teeway_gateway::GatewayConfig),
        adjust: impl FnOnce(&mut teeway_agent::AgentConfig),
    ) -> Stack {
        teeway_wire::tls::install_default_provider();
        let pki = Pki::generate("test-agent").expect("pki");
        let primary = sample::start_primary().await.expect("primary");
        let (shadow, recording) = sample::start_shadow(Duration::ZERO).await.expect("shadow");
        let mut gateway_config = stack::gateway_config(pki.gateway_material(), &[shadow.addr]);
        adjust_gateway(&mut gateway_config);
        let gateway = RunningGateway::start(gateway_config)
            .await
            .expect("gateway");
        let mut config =
            stack::agent_config(pki.agent_material(), primary.addr, gateway.addr, percentage);
        adjust(&mut config);
        let agent = RunningAgent::start(config).await.expect("agent");
        assert!(agent.wait_connected(LIMIT).await, "uplink did not connect");
        Stack {
            pki,
            primary,
            shadow,
            recording,
            gateway: Some(gateway),
            agent,
        }
    }

    pub fn agent_metrics(&self) -> Snapshot {
        self.agent.agent.metrics()
    }

    pub fn gateway_metrics(&self) -> Snapshot {
        self.gateway
            .as_ref()
            .expect("gateway running")
            .gateway
            .metrics()
    }

    pub async fn stop(mut self) {
        self.agent.stop().await.expect("agent stops cleanly");
        if let Some(g) = self.gateway.take() {
            g.stop().await.expect("gateway stops cleanly");
        }
    }
}

/// GET `path` from an admin listener.
pub async fn admin_get(addr: SocketAddr, path: &str) -> (http::StatusCode, String) {
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let resp = client
        .get(format!("http://{addr}{path}").parse().expect("uri"))
        .await
        .expect("admin answers");
    let status = resp.status();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Polls `read` until `done` holds for its value, at most [`LIMIT`]; returns the last value.
/// Only for counters, which have no change event to wait on.
pub async fn settle<T>(mut read: impl FnMut() -> T, done: impl Fn(&T) -> bool) -> T {
    let deadline = Instant::now() + LIMIT;
    loop {
        let value = read();
        if done(&value) || Instant::now() >= deadline {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The agent's accounting identity: requests = not_sampled + mirrored + dropped + in_flight.
pub fn assert_agent_identity(s: &Snapshot) {
    let (lhs, rhs) = agent_books(s);
    assert_eq!(lhs, rhs, "accounting identity broken: {s:?}");
}

/// Both sides of the agent's identity: requests, and the sum of the buckets they end in.
fn agent_books(s: &Snapshot) -> (f64, f64) {
    use teeway_agent::metrics as m;
    (
        s.get(m::REQUESTS_TOTAL),
        s.get(m::NOT_SAMPLED_TOTAL)
            + s.get(m::MIRRORED_TOTAL)
            + s.sum(m::MIRROR_DROPPED_TOTAL)
            + s.get(m::MIRROR_IN_FLIGHT)
            + s.get(m::MIRROR_SPOOLED_TOTAL),
    )
}

/// One HTTP/1.1 connection to `addr`, kept alive for every request sent on it: if the agent
/// dropped the connection, the next request would fail.
pub struct KeepAlive {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl KeepAlive {
    pub async fn open(addr: SocketAddr) -> Self {
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        Self { sender }
    }

    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> Result<StatusCode, String> {
        self.exchange(req).await.map(|(status, _)| status)
    }

    /// Sends `req`; the answer's status and whole body.
    pub async fn exchange(
        &mut self,
        req: Request<Full<Bytes>>,
    ) -> Result<(StatusCode, Bytes), String> {
        self.sender.ready().await.map_err(|e| e.to_string())?;
        let resp = self
            .sender
            .send_request(req)
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, body))
    }
}

/// How many different paths the shadow received: tests that send each request to a path of its
/// own compare this with the count received to tell "each once" from "some twice".
pub fn distinct_paths(recording: &Recording) -> usize {
    recording
        .requests()
        .iter()
        .map(|r| r.uri.path().to_owned())
        .collect::<std::collections::BTreeSet<_>>()
        .len()
}

/// The value of `metric{reason="<reason>"}` in a scrape.
pub fn by_reason(s: &Snapshot, metric: &str, reason: &str) -> f64 {
    s.get(&format!("{metric}{{reason=\"{reason}\"}}"))
}

/// The host a recorded request was sent to: `Host`, or the HTTP/2 `:authority`.
pub fn host_of(r: &teeway::sample::Recorded) -> String {
    r.headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| r.uri.authority().map(|a| a.to_string()))
        .unwrap_or_default()
}

pub fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", "api.example.com")
        .body(Full::new(Bytes::new()))
        .expect("request")
}

/// A POST of `body` to `path`.
pub fn post(path: &str, body: Bytes) -> Request<Full<Bytes>> {
    Request::post(path)
        .header("host", "api.example.com")
        .body(Full::new(body))
        .expect("request")
}

/// Whether the agent is quiet and its books balance: nothing in flight and the identity exact.
///
/// Waiting for `in_flight == 0` alone is not enough: a scrape reads every counter before any
/// gauge, so a copy resolved between the two reads shows in neither `mirrored` nor `in_flight`.
/// Once the agent is quiet, the next scrape is whole; a real imbalance never settles and fails
/// the assertion that follows.
pub fn agent_settled(s: &Snapshot) -> bool {
    let (lhs, rhs) = agent_books(s);
    s.get(teeway_agent::metrics::MIRROR_IN_FLIGHT) == 0.0 && lhs == rhs
}

/// Whether the gateway is quiet and every (record, target) pair is in a final bucket, for a
/// gateway whose records all go to `targets` targets (see [`agent_settled`] for why the sum is
/// part of the wait).
pub fn gateway_settled(s: &Snapshot, targets: f64) -> bool {
    use teeway_gateway::metrics as m;
    s.get(m::REPLAY_IN_FLIGHT) == 0.0
        && s.get(m::RECEIVED_TOTAL) * targets
            == s.sum(m::REPLAYED_TOTAL)
                + s.sum(m::REPLAY_FAILED_TOTAL)
                + s.sum(m::REPLAY_SKIPPED_TOTAL)
}

/// A child process whose stderr is read line by line on a thread.
pub struct Proc {
    pub child: Child,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    pub fn spawn(dir: &Path, args: &[&str]) -> Proc {
        Self::spawn_program(dir, env!("CARGO_BIN_EXE_teeway"), args)
    }

    /// Runs `program` (a wrapper such as `ip netns exec NAME teeway ...`) the same way.
    pub fn spawn_program(dir: &Path, program: &str, args: &[&str]) -> Proc {
        let mut child = Command::new(program)
            .args(args)
            .current_dir(dir)
            .env(
                "RUST_LOG",
                std::env::var("TEST_RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc { child, lines }
    }

    /// Waits for a log line containing `needle`.
    pub fn wait_for_line(&self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + LIMIT;
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            let Ok(line) = self.lines.recv_timeout(left) else {
                break;
            };
            if line.contains(needle) {
                return line;
            }
        }
        panic!("no log line containing {needle:?}");
    }

    /// Every log line up to and including the first containing `needle`.
    pub fn lines_until(&self, needle: &str) -> Vec<String> {
        let deadline = std::time::Instant::now() + LIMIT;
        let mut lines = Vec::new();
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            let Ok(line) = self.lines.recv_timeout(left) else {
                break;
            };
            let done = line.contains(needle);
            lines.push(line);
            if done {
                return lines;
            }
        }
        panic!("no log line containing {needle:?} among {lines:?}");
    }

    /// The log lines not yet read, for a failure message.
    pub fn unread_lines(&self) -> String {
        let mut out = String::new();
        while let Ok(line) = self.lines.try_recv() {
            out.push_str(&line);
            out.push('\n');
        }
        out
    }

    pub fn terminate_and_wait(mut self) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        let deadline = std::time::Instant::now() + LIMIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A gateway process (the real binary) over QUIC, trusting `pki`'s CA, replaying every copy to
/// `shadow_url`; `extra` is appended to its `gateway.yaml` (a `limits:` block, say). Its files go
/// in `dir`.
pub struct GatewayProcess {
    pub proc: Proc,
    /// Where agents connect.
    pub addr: SocketAddr,
    /// Its admin listener.
    pub admin: SocketAddr,
}

impl GatewayProcess {
    pub fn spawn(dir: &Path, pki: &Pki, shadow_url: &str, extra: &str) -> GatewayProcess {
        Self::spawn_serving(dir, pki, shadow_url, "[quic]", extra)
    }

    /// As [`GatewayProcess::spawn`], serving `transports` (`[quic, tls]`: both).
    pub fn spawn_serving(
        dir: &Path,
        pki: &Pki,
        shadow_url: &str,
        transports: &str,
        extra: &str,
    ) -> GatewayProcess {
        for (name, text) in [
            ("ca.pem", &pki.ca.certified.cert_pem),
            ("gateway.pem", &pki.gateway.cert_pem),
            ("gateway.key", &pki.gateway.key_pem),
        ] {
            std::fs::write(dir.join(name), text).expect("write");
        }
        std::fs::write(
            dir.join("gateway.yaml"),
            format!(
                "listen: 127.0.0.1:0\ntransports: {transports}\ntls: {{ ca: ca.pem, cert: gateway.pem, key: gateway.key }}\nroutes:\n  - targets: [{shadow_url}]\nadmin: {{ listen: 127.0.0.1:0 }}\n{extra}"
            ),
        )
        .expect("write");
        let proc = Proc::spawn(dir, &["gateway", "--config", "gateway.yaml"]);
        let serving = proc.wait_for_line("gateway serving");
        GatewayProcess {
            addr: field(&serving, "listen").parse().expect("listen"),
            admin: field(&serving, "admin").parse().expect("admin"),
            proc,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.proc.child.id()
    }
}

/// The value of `name=` in a log line.
pub fn field(line: &str, name: &str) -> String {
    let key = format!("{name}=");
    line.split(&key)
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no {name} in: {line}"))
        .to_owned()
}

/// The `/config` version and last rejection of a process's admin listener.
pub async fn config_version(admin: SocketAddr) -> (u64, String) {
    let (status, body) = admin_get(admin, "/config").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    (
        v["version"].as_u64().expect("version"),
        v["last_rejected"].as_str().unwrap_or_default().to_owned(),
    )
}

/// Sends SIGHUP (reload) to a process.
pub fn hangup(p: &Proc) {
    let status = std::process::Command::new("kill")
        .args(["-HUP", &p.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

/// Polls an async read until `done` holds, within [`LIMIT`].
pub async fn settle_async<T, F, Fut>(mut read: F, done: impl Fn(&T) -> bool) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        let value = read().await;
        if done(&value) || std::time::Instant::now() > deadline {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Replaces `path` with `text` in one step (a temporary file renamed over it), as editors and
/// Kubernetes volumes do. A plain write truncates first: a reload triggered in between would read
/// an empty file and count a rejection the test did not make.
pub fn replace_file(path: &Path, text: impl AsRef<[u8]>) {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// Runs `teeway certs init` in `dir` (files in `certs/dev`, agent identity `prod-eu-1`).
pub fn certs_init(dir: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_teeway"))
        .args([
            "certs",
            "init",
            "--dir",
            "certs/dev",
            "--agent-name",
            "prod-eu-1",
        ])
        .current_dir(dir)
        .output()
        .expect("teeway runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Client load through an agent: `workers` loops sending varied requests, each answer checked
/// against the primary's, until [`Load::finish`].
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    tasks: tokio::task::JoinSet<(u64, Vec<String>)>,
    sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// What a [`Load`] saw.
#[derive(Debug)]
pub struct LoadReport {
    /// Requests answered exactly as the primary answers.
    pub ok: u64,
    /// Everything else, described.
    pub errors: Vec<String>,
}

impl Load {
    pub fn start(agent: SocketAddr, workers: usize) -> Load {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let client = Arc::new(teeway::demo::PlanClient::new(agent));
        let plan = Arc::new(teeway::demo::plan(64));
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..workers {
            let (stop, sent, client, plan) =
                (stop.clone(), sent.clone(), client.clone(), plan.clone());
            tasks.spawn(async move {
                let (mut ok, mut errors) = (0u64, Vec::new());
                let mut i = w;
                while !stop.load(Ordering::Relaxed) {
                    let r = &plan[i % plan.len()];
                    i += workers;
                    match teeway::demo::send_checked(&client, r).await {
                        Ok(()) => ok += 1,
                        Err(e) => errors.push(e),
                    }
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                (ok, errors)
            });
        }
        Load { stop, tasks, sent }
    }

    /// Requests sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops the workers and reports.
    pub async fn finish(mut self) -> LoadReport {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut report = LoadReport {
            ok: 0,
            errors: Vec::new(),
        };
        while let Some(joined) = self.tasks.join_next().await {
            let (ok, errors) = joined.expect("load worker");
            report.ok += ok;
            report.errors.extend(errors);
        }
        report
    }
}

/// The metrics an admin listener serves.
pub async fn scrape(admin: SocketAddr) -> Snapshot {
    Snapshot::parse(&admin_get(admin, "/metrics").await.1)
}

/// A program the test needs: its path, from `PATH` or Debian's sbin directories.
pub fn find_program(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(std::path::PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// A program the test needs is missing: a failure under `TEEWAY_REQUIRE_TOOLS` (CI installs it
/// and sets that), else a `SKIPPED` line saying why and how to get it (`.ci/run` repeats them).
pub fn tool_missing(tool: &str, why: &str, install: &str) {
    if std::env::var_os("TEEWAY_REQUIRE_TOOLS").is_some() {
        panic!("{tool} is required (TEEWAY_REQUIRE_TOOLS is set) but not found: {why}");
    }
    eprintln!("SKIPPED: {tool} not found ({why}); {install} to run this");
}

/// A loopback address that refuses connections for as long as the returned socket lives: bound,
/// never listening, so no other test (they run in parallel) can take the port meanwhile, as one
/// could a port merely found free.
pub fn refusing_addr() -> (socket2::Socket, SocketAddr) {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind");
    let addr = socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .expect("an inet address");
    (socket, addr)
}

/// A loopback port nobody listens on now, for a program that cannot be told to bind port 0
/// (nginx, redis-server). Another process may take it before the program binds, so callers
/// retry with a new port when the program reports the address in use.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Waits (at most [`LIMIT`]) until something accepts TCP connections on `addr`, or `child`
/// exits; whether it listens.
pub async fn wait_listening(addr: SocketAddr, child: &mut Child) -> bool {
    let deadline = Instant::now() + LIMIT;
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return true;
        }
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// An HTTP/2 connection with prior knowledge (h2c) to `addr`, driven on its own task.
pub async fn h2c(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2c handshake");
    tokio::spawn(conn);
    sender
}
