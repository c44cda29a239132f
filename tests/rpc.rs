//! Per-request RPC mirroring, end to end with the real binary, real QUIC and certificates made at
//! test time: an agent with an `rpc:` listener in front of Debian's `redis-server` as primary, a
//! gateway whose `rpc_routes` replay each copied command to another `redis-server` as shadow.
//!
//! - "Writes only" under `redis-benchmark` (pipelined): the shadow ends with the primary's data
//!   and has run no read; both sides' books close and agree.
//! - A shadow that answers every copy with an error is seen to: `error_reply`, by command.
//! - A client's connection state is followed: `SELECT` moves its copies to that database,
//!   transactions and `AUTH`-like commands are never copied, a command over `max_message_bytes`
//!   is counted and the stream is still followed after it.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use teeway_runtime::metrics::Snapshot;

use support::redis::{redis_cli, redis_server, Reap};
use support::{certs_init, field, scrape, settle_async, Proc, LIMIT};

/// A gateway replaying listener `redis` to `shadow`, and an agent whose only listener is that
/// `rpc:` listener in front of `primary`, configured with `policy` (YAML lines at its level).
struct Pair {
    gateway: Proc,
    agent: Proc,
    gateway_admin: SocketAddr,
    agent_admin: SocketAddr,
    /// Where clients connect: the agent's `rpc:` listener.
    listen: SocketAddr,
}

impl Pair {
    fn start(dir: &Path, primary: SocketAddr, shadow: SocketAddr, policy: &str) -> Pair {
        Self::start_speaking(dir, "redis", primary, shadow, policy)
    }

    /// As [`Pair::start`], the listener and the route speaking `protocol`.
    fn start_speaking(
        dir: &Path,
        protocol: &str,
        primary: SocketAddr,
        shadow: SocketAddr,
        policy: &str,
    ) -> Pair {
        certs_init(dir);
        std::fs::write(
            dir.join("gateway.yaml"),
            format!(
                "listen: 127.0.0.1:0
tls: {{ ca: certs/dev/ca.pem, cert: certs/dev/gateway.pem, key: certs/dev/gateway.key }}
rpc_routes:
  - name: shadow
    protocol: {protocol}
    match: {{ listener: tap }}
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
rpc:
  - name: tap
    protocol: {protocol}
    listen: 127.0.0.1:0
    primary: {primary}
{policy}gateway:
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
        let listen = field(&serving, "rpc")
            .strip_prefix("tap@")
            .unwrap_or_else(|| panic!("listener tap in {serving}"))
            .parse()
            .expect("rpc listen addr");
        let agent_admin = field(&serving, "admin").parse().expect("admin");
        // Commands copied before the uplink is up would be counted `no_uplink`.
        agent.wait_for_line("uplink connected");
        Pair {
            gateway,
            agent,
            gateway_admin,
            agent_admin,
            listen,
        }
    }

    /// Both sides' metrics once `requests` requests are counted, every copy resolved and every
    /// replay over. The books are part of the wait: a real imbalance never settles and fails the
    /// assertions after it.
    async fn settled(&self, requests: f64) -> (Snapshot, Snapshot) {
        let agent = settle_async(
            || scrape(self.agent_admin),
            |s: &Snapshot| {
                let (seen, accounted) = books(s);
                seen >= requests && s.sum("teeway_agent_rpc_in_flight") == 0.0 && seen == accounted
            },
        )
        .await;
        let mirrored = agent.sum("teeway_agent_rpc_mirrored_total");
        let gateway = settle_async(
            || scrape(self.gateway_admin),
            |s: &Snapshot| {
                s.sum("teeway_gateway_rpc_replays_in_flight") == 0.0
                    && s.sum("teeway_gateway_rpc_replays_total") >= mirrored
            },
        )
        .await;
        (agent, gateway)
    }
}

/// Requests the agent read, and the sum of its buckets.
fn books(s: &Snapshot) -> (f64, f64) {
    (
        s.sum("teeway_agent_rpc_requests_total"),
        s.sum("teeway_agent_rpc_not_sampled_total")
            + s.sum("teeway_agent_rpc_mirrored_total")
            + s.sum("teeway_agent_rpc_dropped_total")
            + s.sum("teeway_agent_rpc_in_flight")
            + s.sum("teeway_agent_rpc_spooled_total"),
    )
}

/// Replays that ended as `outcome`, for `method` (any when `None`).
fn replays(s: &Snapshot, outcome: &str, method: Option<&str>) -> f64 {
    let mut labels = vec![("outcome", outcome)];
    if let Some(m) = method {
        labels.push(("method", m));
    }
    s.sum_where("teeway_gateway_rpc_replays_total", &labels)
}

/// A call count from `INFO commandstats` (0 when the command never ran).
fn calls(cli: &Path, server: SocketAddr, command: &str) -> u64 {
    let stats = redis_cli(cli, server, &["INFO", "commandstats"]);
    let prefix = format!("cmdstat_{command}:calls=");
    stats
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().expect("a count"))
}

struct Redis {
    cli: std::path::PathBuf,
    benchmark: std::path::PathBuf,
    primary: SocketAddr,
    shadow: SocketAddr,
    _servers: [Reap; 2],
}

/// A primary and a shadow `redis-server`; `None` (the test skips, or fails under
/// `TEEWAY_REQUIRE_TOOLS`) when Redis is not installed.
async fn redis_pair(dir: &Path) -> Option<Redis> {
    let found = ["redis-server", "redis-benchmark", "redis-cli"].map(support::find_program);
    let [Some(server), Some(benchmark), Some(cli)] = found else {
        support::tool_missing(
            "redis-server, redis-benchmark, redis-cli",
            "Redis as primary and shadow of rpc listeners",
            "apt-get install redis-server redis-tools",
        );
        return None;
    };
    let (primary, primary_addr) = redis_server(dir, &server, "primary").await;
    let (shadow, shadow_addr) = redis_server(dir, &server, "shadow").await;
    Some(Redis {
        cli,
        benchmark,
        primary: primary_addr,
        shadow: shadow_addr,
        _servers: [Reap(primary), Reap(shadow)],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_only_leaves_the_shadow_with_the_primary_data_and_none_of_its_reads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(redis) = redis_pair(dir.path()).await else {
        return;
    };
    let pair = Pair::start(
        dir.path(),
        redis.primary,
        redis.shadow,
        "    commands: writes\n",
    );
    // Writes whose end state does not depend on how clients interleave, and reads; pipelined.
    let out = Command::new(&redis.benchmark)
        .args(["-h", "127.0.0.1", "-p", &pair.listen.port().to_string()])
        .args([
            "-t",
            "set,get,incr,lpush,sadd,hset,lrange_100",
            "-n",
            "3000",
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
    for test in ["SET", "GET", "INCR", "LPUSH", "SADD", "HSET"] {
        assert!(
            report.contains(test),
            "{test} ran through the agent: {report}"
        );
    }
    let primary_sets = calls(&redis.cli, redis.primary, "set");
    assert!(
        primary_sets >= 3000,
        "every SET reached the primary: {primary_sets}"
    );

    let (agent, gateway) = pair.settled(1.0).await;
    let (seen, accounted) = books(&agent);
    assert_eq!(
        seen, accounted,
        "requests = not sampled + mirrored + dropped + in flight"
    );
    let mirrored = agent.sum("teeway_agent_rpc_mirrored_total");
    assert_eq!(
        agent.sum("teeway_agent_rpc_dropped_total"),
        0.0,
        "nothing dropped: {}",
        pair.agent.unread_lines()
    );
    // redis-benchmark may send a few more than -n (pipelines in flight when it stops): the
    // primary's own count of the writes it ran is the reference.
    let writes: u64 = ["set", "incr", "lpush", "sadd", "hset"]
        .iter()
        .map(|c| calls(&redis.cli, redis.primary, c))
        .sum();
    assert!(
        writes >= 6 * 3000,
        "LPUSH runs twice (its test, LRANGE's fill): {writes}"
    );
    assert_eq!(
        mirrored, writes as f64,
        "every write copied, and nothing else"
    );
    assert_eq!(
        replays(&gateway, "ok", None),
        mirrored,
        "the gateway replayed every copy the agent counted, and the shadow answered each"
    );
    assert_eq!(replays(&gateway, "ok", Some("SET")), primary_sets as f64);

    assert_eq!(calls(&redis.cli, redis.shadow, "set"), primary_sets);
    assert_eq!(
        calls(&redis.cli, redis.shadow, "get"),
        0,
        "no read reached the shadow"
    );
    assert_eq!(calls(&redis.cli, redis.shadow, "lrange"), 0);
    assert!(calls(&redis.cli, redis.primary, "get") >= 3000);
    assert_eq!(
        redis_cli(&redis.cli, redis.shadow, &["DEBUG", "DIGEST"]),
        redis_cli(&redis.cli, redis.primary, &["DEBUG", "DIGEST"]),
        "the shadow holds the same data as the primary"
    );

    // A reload changes what is copied, live: reads too from now on.
    let text = std::fs::read_to_string(dir.path().join("agent.yaml")).expect("read");
    support::replace_file(
        &dir.path().join("agent.yaml"),
        text.replace("commands: writes", "commands: all"),
    );
    support::hangup(&pair.agent);
    pair.agent.wait_for_line("configuration reloaded");
    let gets = calls(&redis.cli, redis.shadow, "get");
    redis_cli(&redis.cli, pair.listen, &["GET", "key:__rand_int__"]);
    let (agent, _) = pair.settled(seen + 1.0).await;
    assert_eq!(agent.sum("teeway_agent_rpc_mirrored_total"), mirrored + 1.0);
    let replayed = settle_async(
        || async { calls(&redis.cli, redis.shadow, "get") },
        |n| *n == gets + 1,
    )
    .await;
    assert_eq!(replayed, gets + 1, "the shadow ran the read");

    // A gateway with rpc routes alone reloads too.
    let text = std::fs::read_to_string(dir.path().join("gateway.yaml")).expect("read");
    support::replace_file(
        &dir.path().join("gateway.yaml"),
        text.replace(
            "match: { listener: tap }",
            "match: { listener: tap }\n    timeout: 2s",
        ),
    );
    pair.gateway.wait_for_line("configuration reloaded");
}

/// Sends `commands` (inline, one per line) on one connection and reads until the reply to the
/// final `ECHO done` arrives; returns what the server answered.
async fn session(listen: SocketAddr, commands: &[&str]) -> String {
    let mut stream = TcpStream::connect(listen).await.expect("connect");
    let mut out = String::new();
    for c in commands {
        out.push_str(c);
        out.push_str("\r\n");
    }
    out.push_str("ECHO done\r\n");
    stream.write_all(out.as_bytes()).await.expect("write");
    let mut got = Vec::new();
    tokio::time::timeout(LIMIT, async {
        while !got.ends_with(b"$4\r\ndone\r\n") {
            let mut buf = [0u8; 4096];
            let n = stream.read(&mut buf).await.expect("read");
            assert!(
                n > 0,
                "the primary closed early: {}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("the primary answered everything");
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_state_is_followed_and_shadow_errors_are_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(redis) = redis_pair(dir.path()).await else {
        return;
    };
    // On the shadow only, `k` is a list: every INCR of it is an error there, not at the primary.
    redis_cli(&redis.cli, redis.shadow, &["RPUSH", "k", "x"]);
    let pair = Pair::start(
        dir.path(),
        redis.primary,
        redis.shadow,
        "    max_message_bytes: 1KiB\n    rules:\n      - name: no-sessions\n        match: { keys: \"session:*\" }\n        percentage: off\n",
    );
    let big = "x".repeat(4096);
    let incrs: Vec<&str> = std::iter::repeat_n("INCR k", 100).collect();
    let mut commands = incrs.clone();
    commands.extend([
        "SET session:1 secret",
        "SELECT 3",
        "SET in3 yes",
        "MULTI",
        "SET queued yes",
        "EXEC",
        "CLIENT SETNAME app",
    ]);
    let set_big = format!("SET big {big}");
    commands.push(&set_big);
    commands.push("SET after-big yes");
    let answered = session(pair.listen, &commands).await;
    assert!(
        answered.starts_with(":1\r\n:2\r\n"),
        "the primary's INCRs: {answered:.40}"
    );
    assert!(
        answered.contains("+QUEUED\r\n*1\r\n+OK\r\n"),
        "the transaction ran: {answered}"
    );

    // 100 INCR, then SET session, SELECT, SET in3, MULTI, SET queued, EXEC, CLIENT, SET big,
    // SET after-big, ECHO.
    let (agent, gateway) = pair.settled(110.0).await;
    let (seen, accounted) = books(&agent);
    assert_eq!(seen, 110.0, "every command counted once");
    assert_eq!(
        seen, accounted,
        "requests = not sampled + mirrored + dropped + in flight"
    );
    assert_eq!(
        agent.sum_where(
            "teeway_agent_rpc_dropped_total",
            &[("reason", "message_too_large")]
        ),
        1.0,
        "the command over max_message_bytes"
    );
    // INCR ×100, SET in3, SET after-big, ECHO.
    assert_eq!(agent.sum("teeway_agent_rpc_mirrored_total"), 103.0);
    assert_eq!(
        agent.sum_where(
            "teeway_agent_rpc_rule_matched_total",
            &[("rule", "unmirrorable")]
        ),
        5.0,
        "SELECT, MULTI, the command it queued, EXEC, CLIENT"
    );
    assert_eq!(
        agent.sum_where(
            "teeway_agent_rpc_rule_matched_total",
            &[("rule", "no-sessions")]
        ),
        1.0
    );
    assert_eq!(
        replays(&gateway, "error_reply", Some("INCR")),
        100.0,
        "WRONGTYPE at the shadow"
    );
    assert_eq!(replays(&gateway, "ok", None), 3.0);

    let get = |db: &str, key: &str| redis_cli(&redis.cli, redis.shadow, &["-n", db, "GET", key]);
    assert_eq!(
        get("3", "in3"),
        "yes",
        "copied to the database the client had selected"
    );
    assert_eq!(get("0", "in3"), "");
    assert_eq!(
        get("3", "after-big"),
        "yes",
        "the stream was followed past the big command"
    );
    assert_eq!(
        get("3", "queued"),
        "",
        "a transaction's commands are not copied"
    );
    assert_eq!(get("0", "session:1"), "", "the rule's keys are not copied");
    assert_eq!(get("3", "big"), "");
    assert_eq!(calls(&redis.cli, redis.shadow, "client"), 0);
}

/// `teeway replay`, as the README shows it (progress on), on what an agent archived.
fn replay(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_teeway"))
        .arg("replay")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("teeway replay runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `teeway replay --target TARGET --max-rate archive` in `dir`, which must succeed; its report.
fn replay_archive(dir: &Path, target: &str) -> String {
    let (ok, stdout, stderr) = replay(dir, &["--target", target, "--max-rate", "archive"]);
    assert!(ok, "replay to {target} failed:\n{stdout}\n{stderr}");
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_archive_of_redis_writes_replays_to_a_shadow_that_ends_with_the_primary_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(redis) = redis_pair(dir.path()).await else {
        return;
    };
    // An agent without a gateway: its rpc listener's copies go to the archive.
    std::fs::write(
        dir.path().join("agent.yaml"),
        format!(
            "cluster: prod-eu-1
rpc:
  - name: tap
    protocol: redis
    listen: 127.0.0.1:0
    primary: {}
    commands: writes
archive: {{ dir: archive }}
admin: {{ listen: 127.0.0.1:0 }}
",
            redis.primary
        ),
    )
    .expect("write");
    let agent = Proc::spawn(dir.path(), &["agent", "--config", "agent.yaml"]);
    let serving = agent.wait_for_line("agent serving");
    let listen: SocketAddr = field(&serving, "rpc")
        .strip_prefix("tap@")
        .unwrap_or_else(|| panic!("listener tap in {serving}"))
        .parse()
        .expect("rpc listen addr");
    let admin: SocketAddr = field(&serving, "admin").parse().expect("admin");
    let out = Command::new(&redis.benchmark)
        .args(["-h", "127.0.0.1", "-p", &listen.port().to_string()])
        .args([
            "-t",
            "set,get,incr,lpush,sadd",
            "-n",
            "2000",
            "-r",
            "300",
            "-c",
            "4",
            "-P",
            "8",
            "-q",
        ])
        .output()
        .expect("redis-benchmark runs");
    assert!(out.status.success(), "redis-benchmark: {out:?}");
    // A client that selected another database: its writes replay there, in their order.
    let ordered = [
        "SELECT 5",
        "SET in5 yes",
        "GET in5",
        "SET ord a",
        "APPEND ord b",
        "SET ord c",
        "APPEND ord d",
        "RPUSH l 1",
        "LPUSH l 0",
        "RPUSH l 2",
    ];
    session(listen, &ordered).await;
    let writes: u64 = ["set", "incr", "lpush", "sadd", "append", "rpush"]
        .iter()
        .map(|c| calls(&redis.cli, redis.primary, c))
        .sum();
    let agent_books = settle_async(
        || scrape(admin),
        |s: &Snapshot| {
            let (seen, accounted) = books(s);
            s.sum("teeway_agent_rpc_mirrored_total") >= writes as f64 && seen == accounted
        },
    )
    .await;
    assert_eq!(
        agent_books.sum("teeway_agent_rpc_mirrored_total"),
        writes as f64,
        "every write archived, and nothing else: {}",
        agent.unread_lines()
    );
    let stopped = agent.terminate_and_wait();
    assert!(stopped.success(), "the agent stopped cleanly: {stopped:?}");

    let inspect = Command::new(env!("CARGO_BIN_EXE_teeway"))
        .args(["archive", "inspect", "archive"])
        .current_dir(dir.path())
        .output()
        .expect("teeway archive inspect runs");
    let summary = String::from_utf8_lossy(&inspect.stdout);
    assert!(inspect.status.success(), "{inspect:?}");
    assert!(
        summary.contains(&format!(
            "records:    {writes} (0 requests, 0 responses, {writes} rpc requests)"
        )),
        "{summary}"
    );
    assert!(!summary.contains("top paths"), "no HTTP lines: {summary}");

    // Nothing reached the shadow yet; the replay brings it the primary's data.
    assert_eq!(calls(&redis.cli, redis.shadow, "set"), 0);
    let shadow = format!("redis://{}", redis.shadow);
    let stdout = replay_archive(dir.path(), &shadow);
    assert!(
        stdout.contains(&format!("sent {writes} in")),
        "every archived write sent: {stdout}"
    );
    assert!(
        stdout.contains(&format!("replies:  ok {writes}\n")),
        "and answered: {stdout}"
    );
    assert_eq!(
        redis_cli(&redis.cli, redis.shadow, &["DEBUG", "DIGEST"]),
        redis_cli(&redis.cli, redis.primary, &["DEBUG", "DIGEST"]),
        "the shadow holds the same data as the primary"
    );
    let in5 = |server, args: &[&str]| {
        let mut all = vec!["-n", "5"];
        all.extend(args);
        redis_cli(&redis.cli, server, &all)
    };
    assert_eq!(in5(redis.shadow, &["GET", "in5"]), "yes");
    assert_eq!(
        in5(redis.shadow, &["GET", "ord"]),
        "cd",
        "in the client's order"
    );
    assert_eq!(
        in5(redis.shadow, &["LRANGE", "l", "0", "-1"]),
        in5(redis.primary, &["LRANGE", "l", "0", "-1"])
    );

    // Only some commands; and the report for machines.
    let (ok, stdout, stderr) = replay(
        dir.path(),
        &[
            "--target",
            &shadow,
            "--max-rate",
            "--filter-method",
            "^INCR$",
            "--report",
            "json",
            "--quiet",
            "archive",
        ],
    );
    assert!(ok, "replay failed:\n{stdout}\n{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("a JSON report");
    let incrs = calls(&redis.cli, redis.primary, "incr");
    assert_eq!(report["protocol"], "redis");
    assert_eq!(report["sent"], incrs);
    assert_eq!(report["status"]["ok"], incrs);
    assert_eq!(report["skipped"]["filter_method"], writes - incrs);

    // The same archive to a target of another protocol: nothing of it is sent, and the
    // command says why.
    let (ok, stdout, stderr) = replay(
        dir.path(),
        &["--target", "http://127.0.0.1:9", "--dry-run", "archive"],
    );
    assert!(!ok, "nothing to send is a failure:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!("skipped:  other_protocol {writes}")),
        "{stdout}"
    );
    assert!(
        stderr.contains(&format!(
            "the archives hold no request for this target, which speaks http; they hold redis {writes}"
        )),
        "{stderr}"
    );
    // A target that is not there: the exit status says so.
    let (port_holder, refusing) = support::refusing_addr();
    let (ok, stdout, _) = replay(
        dir.path(),
        &[
            "--target",
            &format!("redis://{refusing}"),
            "--max-rate",
            "--quiet",
            "archive",
        ],
    );
    drop(port_holder);
    assert!(!ok, "an unreachable target fails the command: {stdout}");
    assert!(
        stdout.contains(&format!("failed:   connect {writes}")),
        "{stdout}"
    );
}

// ---------------------------------------------------------------------------------------------
// Thrift: Apache Thrift's own Python library (PyPI `thrift`) as client, primary and shadow, with
// code generated by the Thrift compiler (tests/interop/thrift/peer.py).

/// `tests/interop/thrift/peer.py`, if Python's `thrift` and the compiler are installed.
fn thrift_peer() -> Option<std::path::PathBuf> {
    let python = support::find_program("python3")?;
    let has_library = Command::new(&python)
        .args(["-c", "import thrift"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_library || support::find_program("thrift").is_none() {
        support::tool_missing(
            "python3 with thrift, and the thrift compiler",
            "Apache Thrift peers for rpc listeners",
            "pip install thrift and apt-get install thrift-compiler",
        );
        return None;
    }
    Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/thrift/peer.py"))
}

/// A test peer's server (`peer.py serve ARGS --port 0 --log LOG`), once it said where it
/// listens.
fn peer_server(peer: &Path, args: &[&str], log: &Path) -> (Reap, SocketAddr) {
    use std::io::BufRead;
    let mut child = Command::new("python3")
        .arg(peer)
        .arg("serve")
        .args(args)
        .args(["--port", "0", "--log"])
        .arg(log)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("peer.py runs");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .expect("a line");
    let port = line
        .trim()
        .strip_prefix("listening ")
        .unwrap_or_else(|| panic!("peer.py serve said {line:?}"))
        .parse::<u16>()
        .expect("a port");
    (Reap(child), SocketAddr::from(([127, 0, 0, 1], port)))
}

/// A Thrift server logging every call it receives to `log`.
fn thrift_server(peer: &Path, transport: &str, protocol: &str, log: &Path) -> (Reap, SocketAddr) {
    peer_server(
        peer,
        &["--transport", transport, "--protocol", protocol],
        log,
    )
}

/// The calls a server logged, one JSON line each.
fn logged(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thrift_calls_are_mirrored_one_by_one_with_their_exceptions_and_oneways() {
    let Some(peer) = thrift_peer() else {
        return;
    };
    let calls = [
        r#"{"method": "put", "args": {"key": "a", "value": "alpha"}}"#,
        r#"{"method": "get", "args": {"key": "a"}}"#,
        r#"{"method": "add", "args": {"a": 2, "b": 3}}"#,
        r#"{"method": "get", "args": {"key": "zz"}}"#,
        r#"{"method": "log", "args": {"line": "hello"}}"#,
        r#"{"method": "put", "args": {"key": "b", "value": "beta"}}"#,
    ];
    for (transport, protocol) in [("framed", "binary"), ("buffered", "compact")] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (primary_log, shadow_log) = (
            dir.path().join("primary.log"),
            dir.path().join("shadow.log"),
        );
        let (_primary, primary) = thrift_server(&peer, transport, protocol, &primary_log);
        let (_shadow, shadow) = thrift_server(&peer, transport, protocol, &shadow_log);
        // `add` is never copied; everything else is, on one client connection. The agent also
        // archives its copies (a top-level key after the listener's lines).
        let pair = Pair::start_speaking(
            dir.path(),
            "thrift",
            primary,
            shadow,
            "    rules:\n      - name: no-add\n        match: { method: [add] }\n        percentage: off\narchive: { dir: archive }\n",
        );
        let script = dir.path().join("calls.jsonl");
        std::fs::write(&script, calls.join("\n")).expect("write");
        let out = Command::new("python3")
            .arg(&peer)
            .args(["call", "--port", &pair.listen.port().to_string()])
            .args(["--transport", transport, "--protocol", protocol, "--script"])
            .arg(&script)
            .output()
            .expect("peer.py call runs");
        let answers = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{transport}+{protocol}: {out:?}");
        assert!(answers.contains(r#""result": "alpha""#), "{answers}");
        assert!(answers.contains(r#""result": 5"#), "{answers}");
        assert!(answers.contains(r#""exception": "NotFound""#), "{answers}");

        let (agent, gateway) = pair.settled(6.0).await;
        let (seen, accounted) = books(&agent);
        assert_eq!(seen, 6.0, "{transport}+{protocol}: every call counted once");
        assert_eq!(seen, accounted);
        assert_eq!(agent.sum("teeway_agent_rpc_mirrored_total"), 5.0);
        assert_eq!(
            agent.sum_where("teeway_agent_rpc_rule_matched_total", &[("rule", "no-add")]),
            1.0
        );
        assert_eq!(replays(&gateway, "ok", Some("put")), 2.0);
        assert_eq!(replays(&gateway, "ok", Some("get")), 1.0);
        assert_eq!(
            replays(&gateway, "error_reply", Some("get")),
            1.0,
            "NotFound, a declared exception, counted as the shadow's error"
        );
        assert_eq!(replays(&gateway, "ok", Some("log")), 1.0, "oneway: sent");

        // The shadow got exactly the copied calls, in order, with their arguments.
        let want: Vec<String> = calls
            .iter()
            .filter(|c| !c.contains(r#""add""#))
            .map(|c| (*c).to_owned())
            .collect();
        let primary_calls = logged(&primary_log);
        assert_eq!(primary_calls.len(), calls.len(), "{primary_calls:?}");
        let shadow_calls = settle_async(
            || async { logged(&shadow_log) },
            |l: &Vec<String>| l.len() >= want.len(),
        )
        .await;
        assert_eq!(shadow_calls, want, "{transport}+{protocol}");

        // What the agent archived replays to another server as the gateway replayed it.
        assert!(pair.agent.terminate_and_wait().success());
        let replay_log = dir.path().join("replayed.log");
        let (_again, again) = thrift_server(&peer, transport, protocol, &replay_log);
        let report = replay_archive(dir.path(), &format!("thrift://{again}"));
        assert!(
            report.contains("replies:  error_reply 1, ok 4\n"),
            "{report}"
        );
        assert_eq!(logged(&replay_log), want, "{transport}+{protocol} replayed");
    }
}

// ---------------------------------------------------------------------------------------------
// Dubbo: PyPI's dubbo-ssl-python as the consumer; the provider (v1 as primary, v2 as shadow, as
// in Aeraki's Dubbo sample) is tests/interop/dubbo/peer.py, with a Hessian2 codec of its own.

/// `tests/interop/dubbo/peer.py`, if Python's dubbo-ssl-python is installed.
fn dubbo_peer() -> Option<std::path::PathBuf> {
    let has_library = Command::new("python3")
        .args(["-c", "import dubbo_ssl"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_library {
        support::tool_missing(
            "python3 with dubbo-ssl-python",
            "a Dubbo 2 consumer for rpc listeners",
            "pip install dubbo-ssl-python==0.9.6",
        );
        return None;
    }
    Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/dubbo/peer.py"))
}

/// A Dubbo provider answering as `version`, logging each invocation to `log`.
fn dubbo_provider(peer: &Path, version: &str, log: &Path) -> (Reap, SocketAddr) {
    peer_server(peer, &["--version", version], log)
}

/// The invocations a provider logged: (method, first argument, attachments).
fn invocations(log: &Path) -> Vec<(String, String, serde_json::Value)> {
    logged(log)
        .iter()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
            (
                v["method"].as_str().unwrap_or_default().to_owned(),
                v["args"][0].as_str().unwrap_or_default().to_owned(),
                v["attachments"].clone(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dubbo_invocations_are_chosen_one_by_one_and_their_secrets_stay_home() {
    let Some(peer) = dubbo_peer() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let (v1_log, v2_log) = (dir.path().join("v1.log"), dir.path().join("v2.log"));
    let (_v1, v1) = dubbo_provider(&peer, "v1", &v1_log);
    let (_v2, v2) = dubbo_provider(&peer, "v2", &v2_log);
    // Aeraki's sample mirrors 100%; here a 30% rule on one method and 0% on another show that
    // the choice is made per invocation, on one pooled client connection.
    let pair = Pair::start_speaking(
        dir.path(),
        "dubbo",
        v1,
        v2,
        "    rules:
      - name: hello
        match: { method: [sayHello] }
        percentage: 30
      - name: no-goodbye
        match: { method: [sayGoodbye] }
        percentage: off
archive: { dir: archive }
",
    );
    let mut script = String::new();
    for i in 0..100 {
        script.push_str(&format!(
            "{{\"method\": \"sayHello\", \"args\": [\"n{i}\"], \"attachments\": {{\"user\": \"u{i}\", \"token\": \"s3cret\"}}}}\n"
        ));
        if i % 5 == 0 {
            script.push_str(&format!(
                "{{\"method\": \"sayGoodbye\", \"args\": [\"g{i}\"]}}\n{{\"method\": \"fail\", \"args\": [\"f{i}\"]}}\n"
            ));
        }
    }
    std::fs::write(dir.path().join("calls.jsonl"), &script).expect("write");
    let out = Command::new("python3")
        .arg(&peer)
        .args([
            "call",
            "--port",
            &pair.listen.port().to_string(),
            "--script",
        ])
        .arg(dir.path().join("calls.jsonl"))
        .output()
        .expect("peer.py call runs");
    let answers = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        answers.contains("Hello n0, response from provider: v1"),
        "production answered by v1: {answers:.300}"
    );

    let calls = 100.0 + 20.0 + 20.0;
    let (agent, gateway) = pair.settled(calls).await;
    let (seen, accounted) = books(&agent);
    assert_eq!(
        seen, calls,
        "every invocation counted once (heartbeats never)"
    );
    assert_eq!(seen, accounted);
    let hello = agent.sum_where("teeway_agent_rpc_rule_matched_total", &[("rule", "hello")]);
    assert_eq!(hello, 100.0);
    let mirrored = agent.sum("teeway_agent_rpc_mirrored_total");
    let hellos_copied = mirrored - 20.0; // and every `fail`
    assert!(
        (10.0..=60.0).contains(&hellos_copied),
        "about 30% of 100 sayHello: {hellos_copied}"
    );
    assert_eq!(replays(&gateway, "ok", Some("sayHello")), hellos_copied);
    assert_eq!(
        replays(&gateway, "error_reply", Some("fail")),
        20.0,
        "v2's exceptions counted as its errors"
    );

    // v2 saw exactly the chosen calls, in production's order, with their arguments, and
    // without the token.
    let primary = invocations(&v1_log);
    assert_eq!(primary.len(), 140);
    assert!(primary
        .iter()
        .all(|(m, _, a)| m != "sayHello" || a["token"] == "s3cret"));
    let shadow = settle_async(
        || async { invocations(&v2_log) },
        |l: &Vec<_>| l.len() as f64 >= mirrored,
    )
    .await;
    assert_eq!(shadow.len() as f64, mirrored);
    assert!(shadow.iter().all(|(m, _, _)| m != "sayGoodbye"), "rule off");
    let in_order: Vec<&(String, String, serde_json::Value)> = primary
        .iter()
        .filter(|p| shadow.iter().any(|s| s.0 == p.0 && s.1 == p.1))
        .collect();
    assert_eq!(
        shadow.iter().collect::<Vec<_>>().len(),
        in_order.len(),
        "every shadow call is one production made"
    );
    for (s, p) in shadow.iter().zip(&in_order) {
        assert_eq!(
            (&s.0, &s.1),
            (&p.0, &p.1),
            "same order ({} client connections)",
            agent.sum("teeway_agent_rpc_connections_total")
        );
        assert!(
            s.2.get("token").is_none(),
            "the token was scrubbed: {}",
            s.2
        );
        if s.0 == "sayHello" {
            assert_eq!(s.2["user"], p.2["user"], "other attachments kept");
        }
    }

    // The agent archived what it sent, token scrubbed: a replay to another provider gives it
    // the same invocations as v2, in the same order.
    assert!(pair.agent.terminate_and_wait().success());
    let v3_log = dir.path().join("v3.log");
    let (_v3, v3) = dubbo_provider(&peer, "v3", &v3_log);
    let report = replay_archive(dir.path(), &format!("dubbo://{v3}"));
    assert!(
        report.contains(&format!("replies:  error_reply 20, ok {hellos_copied}\n")),
        "{report}"
    );
    assert_eq!(invocations(&v3_log), shadow, "replayed as mirrored");
}
