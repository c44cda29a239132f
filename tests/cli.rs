//! The real `teeway` binary: `certs init`, `check`, and an agent and a gateway as two processes
//! that mirror traffic and drain on SIGTERM.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use std::time::Duration;

use teeway::demo::{compare, plan, send_plan};
use teeway::sample;
use teeway_runtime::metrics::Snapshot;

use support::{admin_get, field, Proc, LIMIT};

fn teeway(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_teeway"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("teeway runs")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn certs(dir: &Path) {
    let out = teeway(
        dir,
        &[
            "certs",
            "init",
            "--dir",
            "certs/dev",
            "--agent-name",
            "prod-eu-1",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn certs_init_writes_six_files_with_private_keys_closed_and_never_overwrites() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().expect("tmp");
    certs(tmp.path());
    for f in teeway::certs::FILES {
        let path = tmp.path().join("certs/dev").join(f);
        let mode = std::fs::metadata(&path)
            .expect("written")
            .permissions()
            .mode()
            & 0o777;
        if f.ends_with(".key") {
            assert_eq!(mode, 0o600, "{f} must be private");
        }
    }
    let before = std::fs::read(tmp.path().join("certs/dev/ca.key")).expect("key");
    let again = teeway(tmp.path(), &["certs", "init", "--dir", "certs/dev"]);
    assert!(!again.status.success());
    assert!(
        text(&again).contains("refusing to overwrite"),
        "{}",
        text(&again)
    );
    assert_eq!(
        std::fs::read(tmp.path().join("certs/dev/ca.key")).expect("key"),
        before,
        "untouched"
    );
    let forced = teeway(
        tmp.path(),
        &["certs", "init", "--dir", "certs/dev", "--force"],
    );
    assert!(forced.status.success(), "{}", text(&forced));
    assert_ne!(
        std::fs::read(tmp.path().join("certs/dev/ca.key")).expect("key"),
        before,
        "replaced"
    );
}

#[test]
fn every_shipped_example_passes_check() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples");
    let files: Vec<PathBuf> = std::fs::read_dir(&examples)
        .expect("deploy/examples exists")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    assert!(files.len() >= 2, "found only {files:?}");
    let tmp = tempfile::tempdir().expect("tmp");
    certs(tmp.path());
    for file in files {
        let out = teeway(tmp.path(), &["check", file.to_str().expect("utf-8 path")]);
        assert!(out.status.success(), "{}: {}", file.display(), text(&out));
        assert!(text(&out).contains(": ok ("), "{}", text(&out));
    }
}

#[test]
fn check_names_every_problem() {
    let tmp = tempfile::tempdir().expect("tmp");
    certs(tmp.path());
    std::fs::write(
        tmp.path().join("agent.yaml"),
        "cluster: prod
listen: 127.0.0.1:80800
primary: http://127.0.0.1:9000
mirror: { percentage: 100, qeue: 5 }
gateway:
  address: 127.0.0.1:4433
  ca: certs/dev/ca.pem
  cert: certs/dev/nope.pem
  key: certs/dev/agent.key
",
    )
    .expect("write");
    let out = teeway(tmp.path(), &["check", "agent.yaml"]);
    assert!(!out.status.success());
    let t = text(&out);
    assert!(t.contains("agent.yaml: 3 problems"), "{t}");
    assert!(
        t.contains("listen: is not an `ip:port` address to listen on (found `127.0.0.1:80800`)"),
        "{t}"
    );
    assert!(
        t.contains("mirror.qeue: unknown key; did you mean `queue`?"),
        "{t}"
    );
    assert!(
        t.contains("gateway.cert: cannot be read: ./certs/dev/nope.pem"),
        "{t}"
    );

    std::fs::write(tmp.path().join("mystery.yaml"), "hello: world\n").expect("write");
    let out = teeway(tmp.path(), &["check", "mystery.yaml"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("cannot tell whether this is an agent or a gateway"),
        "{}",
        text(&out)
    );
}

#[test]
fn a_bad_config_stops_the_agent_before_it_binds() {
    let tmp = tempfile::tempdir().expect("tmp");
    // The listen port is taken by this test; a config error must be reported, not a bind error.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    std::fs::write(
        tmp.path().join("agent.yaml"),
        format!("cluster: c\nlisten: 127.0.0.1:{port}\nprimary: http://127.0.0.1:1\ngateway: {{ address: nowhere }}\n"),
    )
    .expect("write");
    let out = teeway(tmp.path(), &["agent", "--config", "agent.yaml"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("gateway.address: is not a `host:port` address"),
        "{t}"
    );
    assert!(!t.contains("cannot listen"), "{t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_and_gateway_processes_mirror_and_drain_on_sigterm() {
    let tmp = tempfile::tempdir().expect("tmp");
    certs(tmp.path());
    let primary = sample::start_primary().await.expect("primary");
    let (shadow, recording) = sample::start_shadow(Duration::ZERO).await.expect("shadow");

    std::fs::write(
        tmp.path().join("gateway.yaml"),
        format!(
            "listen: 127.0.0.1:0\ntls: {{ ca: certs/dev/ca.pem, cert: certs/dev/gateway.pem, key: certs/dev/gateway.key }}\nroutes:\n  - targets: [{}]\nadmin: {{ listen: 127.0.0.1:0 }}\n",
            shadow.url()
        ),
    )
    .expect("write");
    let gateway = Proc::spawn(tmp.path(), &["gateway", "--config", "gateway.yaml"]);
    let gateway_addr = field(&gateway.wait_for_line("gateway serving"), "listen");

    std::fs::write(
        tmp.path().join("agent.yaml"),
        format!(
            "cluster: prod-eu-1\nlisten: 127.0.0.1:0\nprimary: {}\ngateway:\n  address: {gateway_addr}\n  server_name: localhost\n  ca: certs/dev/ca.pem\n  cert: certs/dev/agent.pem\n  key: certs/dev/agent.key\nadmin: {{ listen: 127.0.0.1:0 }}\n",
            primary.url()
        ),
    )
    .expect("write");
    let agent = Proc::spawn(tmp.path(), &["agent", "--config", "agent.yaml"]);
    let serving = agent.wait_for_line("agent serving");
    let agent_addr: std::net::SocketAddr = field(&serving, "listen").parse().expect("listen addr");
    let admin: std::net::SocketAddr = field(&serving, "admin").parse().expect("admin addr");
    agent.wait_for_line("uplink connected");
    let (status, body) = admin_get(admin, "/readyz").await;
    assert_eq!(status, 200, "{body}");

    let plan = plan(48);
    let outcomes = send_plan(agent_addr, &plan).await;
    assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
    assert_eq!(recording.wait_for(48, LIMIT).await, 48);
    let verdicts = compare(&plan, &recording.requests());
    assert!(verdicts.values().all(Result::is_ok), "{verdicts:?}");

    // The shadow can see a copy before the agent has read the gateway's ACK for it: wait.
    let deadline = std::time::Instant::now() + LIMIT;
    let metrics = loop {
        let m = Snapshot::parse(&admin_get(admin, "/metrics").await.1);
        if m.get("teeway_agent_mirrored_total") >= 48.0 || std::time::Instant::now() >= deadline {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(metrics.get("teeway_agent_requests_total"), 48.0);
    assert_eq!(metrics.get("teeway_agent_mirrored_total"), 48.0);

    let status = agent.terminate_and_wait();
    assert!(status.success(), "agent exit status {status}");
    let status = gateway.terminate_and_wait();
    assert!(status.success(), "gateway exit status {status}");
}

#[test]
fn json_logs_are_one_object_a_line_with_the_fields_at_the_top() {
    let tmp = tempfile::tempdir().expect("tmp");
    certs(tmp.path());
    std::fs::write(
        tmp.path().join("gateway.yaml"),
        "listen: 127.0.0.1:0\ntls: { ca: certs/dev/ca.pem, cert: certs/dev/gateway.pem, key: certs/dev/gateway.key }\nroutes:\n  - targets: [http://127.0.0.1:9]\n",
    )
    .expect("write");
    // The flag after the subcommand, as the Kubernetes manifests pass it.
    let gateway = Proc::spawn(
        tmp.path(),
        &[
            "gateway",
            "--config",
            "gateway.yaml",
            "--log-format",
            "json",
        ],
    );
    let line = gateway.wait_for_line("gateway serving");
    let event: serde_json::Value = serde_json::from_str(&line).expect("a JSON object");
    assert_eq!(event["level"], "INFO", "{line}");
    assert_eq!(event["message"], "gateway serving", "{line}");
    assert_eq!(event["target"], "teeway_gateway", "{line}");
    let listen = event["listen"].as_str().expect("fields at the top level");
    assert!(listen.starts_with("127.0.0.1:"), "{line}");
    assert!(event["timestamp"].is_string(), "{line}");
    let status = gateway.terminate_and_wait();
    assert!(status.success(), "{status:?}");
}
