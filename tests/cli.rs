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

/// With `--log-format json` every line on stderr is a JSON object, the error that stops the
/// process included: a configuration that does not validate, and a port that cannot be bound.
#[test]
fn json_logs_stay_json_for_start_up_and_fatal_errors() {
    let tmp = tempfile::tempdir().expect("tmp");
    certs(tmp.path());
    std::fs::write(
        tmp.path().join("bad.yaml"),
        "listen: 127.0.0.1:0\ntls: { ca: certs/dev/ca.pem, cert: certs/dev/gateway.pem, key: certs/dev/nope.key }\nroutes:\n  - targets: [http://127.0.0.1:9]\n",
    )
    .expect("write");
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    std::fs::write(
        tmp.path().join("busy.yaml"),
        format!("listen: 127.0.0.1:{port}\ntransports: [quic]\ntls: {{ ca: certs/dev/ca.pem, cert: certs/dev/gateway.pem, key: certs/dev/gateway.key }}\nroutes:\n  - targets: [http://127.0.0.1:9]\n"),
    )
    .expect("write");
    for (file, code, says) in [("bad.yaml", 2, "tls.key"), ("busy.yaml", 1, "error")] {
        // RUST_LOG as the help text suggests it: the fatal line must not be filtered away.
        let out = Command::new(env!("CARGO_BIN_EXE_teeway"))
            .args(["gateway", "--config", file, "--log-format", "json"])
            .env("RUST_LOG", "teeway_gateway=debug")
            .current_dir(tmp.path())
            .output()
            .expect("teeway runs");
        assert_eq!(out.status.code(), Some(code), "{}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.trim().is_empty());
        for line in stderr.lines() {
            let event: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{file}: not JSON ({e}): {line}"));
            assert!(event["level"].is_string(), "{line}");
        }
        let last: serde_json::Value =
            serde_json::from_str(stderr.lines().last().expect("a line")).expect("json");
        assert_eq!(last["level"], "ERROR", "{stderr}");
        assert!(
            last["message"].as_str().unwrap_or("").contains(says),
            "{stderr}"
        );
    }
}

/// A refused agent is told why, in its own log: a certificate from another CA, an identity not
/// in `agents.allow`. The gateway logs each cause (and each refused identity) once, not once per
/// retry, and says at shutdown how many more there were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_agents_are_told_why_and_the_gateway_does_not_repeat_itself() {
    let tmp = tempfile::tempdir().expect("tmp");
    certs(tmp.path());
    let other = teeway(
        tmp.path(),
        &[
            "certs",
            "init",
            "--dir",
            "other",
            "--agent-name",
            "prod-eu-1",
        ],
    );
    assert!(other.status.success(), "{}", text(&other));
    std::fs::write(
        tmp.path().join("gateway.yaml"),
        "listen: 127.0.0.1:0\ntls: { ca: certs/dev/ca.pem, cert: certs/dev/gateway.pem, key: certs/dev/gateway.key }\nagents: { allow: [prod-us-*] }\nroutes:\n  - targets: [http://127.0.0.1:9]\nadmin: { listen: 127.0.0.1:0 }\n",
    )
    .expect("write");
    let gateway = Proc::spawn(tmp.path(), &["gateway", "--config", "gateway.yaml"]);
    let serving = gateway.wait_for_line("gateway serving");
    let addr = field(&serving, "listen");
    let admin: std::net::SocketAddr = field(&serving, "admin").parse().expect("admin");
    let agent_yaml = |name: &str, cert_dir: &str| {
        std::fs::write(
            tmp.path().join(name),
            format!("cluster: prod-eu-1\nlisten: 127.0.0.1:0\nprimary: http://127.0.0.1:9\ndrain_time: 0s\ngateway: {{ address: {addr}, server_name: localhost, ca: certs/dev/ca.pem, cert: {cert_dir}/agent.pem, key: {cert_dir}/agent.key }}\n"),
        )
        .expect("write");
    };
    agent_yaml("foreign.yaml", "other");
    agent_yaml("unlisted.yaml", "certs/dev");

    let foreign = Proc::spawn(tmp.path(), &["agent", "--config", "foreign.yaml"]);
    let line = foreign.wait_for_line("cannot reach a gateway");
    // Another CA's signature: unknown_ca or decrypt_error, as the verifier meets it.
    assert!(
        line.contains("not signed by a CA the gateway trusts")
            || line.contains("does not verify against the gateway's tls.ca"),
        "{line}"
    );
    let line = gateway.wait_for_line("agent handshake refused");
    assert!(line.contains("cause=\"unknown_ca\""), "{line}");
    assert!(foreign.terminate_and_wait().success());

    let unlisted = Proc::spawn(tmp.path(), &["agent", "--config", "unlisted.yaml"]);
    let line = unlisted.wait_for_line("cannot reach a gateway");
    assert!(line.contains("is not in agents.allow"), "{line}");
    gateway.wait_for_line("its certificate identity is not in agents.allow");
    // The agent retries with backoff (50 ms doubling): wait for a few more refusals.
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        let m = Snapshot::parse(&admin_get(admin, "/metrics").await.1);
        if m.get("teeway_gateway_handshakes_total{result=\"unauthorized\"}") >= 4.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the agent did not retry"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(unlisted.terminate_and_wait().success());
    // At shutdown the gateway says how many refusals its one line stood for; until then, no
    // line per retry (every line it wrote is read, up to the summary).
    let status = Command::new("kill")
        .args(["-TERM", &gateway.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let lines = gateway.lines_until("not in agents.allow: ");
    let repeated: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("its certificate identity is not in agents.allow"))
        .collect();
    assert!(
        repeated.is_empty(),
        "one line per identity a minute, not one per retry: {repeated:?}"
    );
    let summary = lines.last().expect("the summary");
    let more: u64 = field(summary, "events").parse().expect("events");
    assert!(more >= 3, "{summary}");
}

/// `teeway check` names what a handshake would refuse at run time, and what YAML itself gets
/// wrong, each as a problem with the field, the file and the fix (exit 2); a certificate
/// expiring within 30 days is a warning (exit 0).
#[test]
fn check_names_what_would_fail_at_run_time() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    certs(dir);
    let other = teeway(dir, &["certs", "init", "--dir", "other"]);
    assert!(other.status.success(), "{}", text(&other));
    // An expired agent certificate from the same CA.
    let ca = teeway_wire::pki::CertificateAuthority::from_pem(
        &std::fs::read_to_string(dir.join("certs/dev/ca.pem")).expect("ca"),
        &std::fs::read_to_string(dir.join("certs/dev/ca.key")).expect("key"),
    )
    .expect("ca");
    let expired = ca.expired_agent("prod-eu-1").expect("expired");
    std::fs::write(dir.join("expired.pem"), &expired.cert_pem).expect("write");
    std::fs::write(dir.join("expired.key"), &expired.key_pem).expect("write");
    let soon = teeway(
        dir,
        &[
            "certs",
            "issue",
            "--dir",
            "certs/dev",
            "--agent-name",
            "soon",
            "--days",
            "10",
        ],
    );
    assert!(soon.status.success(), "{}", text(&soon));

    let gateway = |extra: &str| {
        format!("listen: 127.0.0.1:4433\ntls: {{ ca: certs/dev/ca.pem, cert: certs/dev/gateway.pem, key: certs/dev/gateway.key }}\nroutes:\n  - targets: [http://127.0.0.1:9]\n{extra}")
    };
    let agent = |ca: &str, cert: &str, key: &str| {
        format!("cluster: prod-eu-1\nlisten: 127.0.0.1:8080\nprimary: http://127.0.0.1:9\ngateway: {{ address: 127.0.0.1:4433, server_name: localhost, ca: {ca}, cert: {cert}, key: {key} }}\n")
    };
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "expired.yaml",
            agent("certs/dev/ca.pem", "expired.pem", "expired.key"),
            "gateway.cert: ./expired.pem (O=teeway, CN=prod-eu-1) expired on 2021-01-01",
        ),
        (
            "swapped.yaml",
            agent(
                "certs/dev/ca.pem",
                "certs/dev/gateway.pem",
                "certs/dev/gateway.key",
            ),
            "gateway.cert: ./certs/dev/gateway.pem is not for clientAuth",
        ),
        (
            "leaf-as-ca.yaml",
            agent(
                "certs/dev/agent.pem",
                "certs/dev/agent.pem",
                "certs/dev/agent.key",
            ),
            "gateway.ca: ./certs/dev/agent.pem holds a leaf certificate",
        ),
        (
            "wrong-key.yaml",
            agent("certs/dev/ca.pem", "certs/dev/agent.pem", "other/agent.key"),
            "gateway.cert: the agent certificate and key do not fit together",
        ),
        (
            "admin.yaml",
            gateway("admin: { listen: 127.0.0.1:4433 }\n"),
            "admin.listen: is the address agents connect to",
        ),
        (
            "zero.yaml",
            gateway("").replace(
                "targets: [http://127.0.0.1:9]",
                "targets: [http://127.0.0.1:9]\n    timeout: 0s",
            ),
            "routes[0].timeout: must be more than zero",
        ),
        (
            "syntax.yaml",
            "listen: [\n".into(),
            "is not valid YAML: did not find expected node content at line 2 column 1",
        ),
        (
            "duplicate.yaml",
            gateway("listen: 127.0.0.1:5555\n"),
            "duplicate entry with key \"listen\" at line 5 column 1",
        ),
    ];
    for (file, yaml, says) in &cases {
        std::fs::write(dir.join(file), yaml).expect("write");
        let out = teeway(dir, &["check", file]);
        assert_eq!(out.status.code(), Some(2), "{file}: {}", text(&out));
        assert!(
            text(&out).contains(says),
            "{file}: wanted {says:?} in\n{}",
            text(&out)
        );
    }

    // Together: an agent certificate from another CA than the gateway's, and a gateway
    // certificate the agent's bundle does not take.
    std::fs::write(dir.join("gateway.yaml"), gateway("")).expect("write");
    std::fs::write(
        dir.join("foreign.yaml"),
        agent("other/ca.pem", "other/agent.pem", "other/agent.key"),
    )
    .expect("write");
    let alone = teeway(dir, &["check", "foreign.yaml"]);
    assert_eq!(
        alone.status.code(),
        Some(0),
        "fine on its own: {}",
        text(&alone)
    );
    let out = teeway(dir, &["check", "gateway.yaml", "foreign.yaml"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("gateway.yaml: ok"), "{t}");
    assert!(t.contains("gateway.cert: the gateway of gateway.yaml would refuse it (its tls.ca): it is not signed by a CA in the bundle"), "{t}");
    assert!(
        t.contains("gateway.ca: would not accept the certificate of gateway.yaml"),
        "{t}"
    );

    // Expiring within 30 days: ok, with a warning.
    std::fs::write(
        dir.join("soon.yaml"),
        agent(
            "certs/dev/ca.pem",
            "certs/dev/agent-soon.pem",
            "certs/dev/agent-soon.key",
        ),
    )
    .expect("write");
    let out = teeway(dir, &["check", "gateway.yaml", "soon.yaml"]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(
        t.contains("warning: gateway.cert: ./certs/dev/agent-soon.pem"),
        "{t}"
    );
    assert!(
        t.contains("in 9 days; renew it") || t.contains("in 10 days; renew it"),
        "{t}"
    );

    // A gateway configuration given to the agent says so.
    let out = teeway(dir, &["agent", "--config", "gateway.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).contains(
            "this is a gateway configuration; run `teeway gateway --config gateway.yaml`"
        ),
        "{}",
        text(&out)
    );
}

/// `certs issue` signs another agent certificate with the existing CA and leaves the CA as it
/// is; the gateway accepts the new agent. Leaves are valid for `--days` (365 by default), not
/// for centuries.
#[test]
fn certs_issue_adds_an_agent_from_the_same_ca_and_leaves_expire() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    certs(dir);
    let ca_before = std::fs::read(dir.join("certs/dev/ca.pem")).expect("ca");
    let out = teeway(
        dir,
        &[
            "certs",
            "issue",
            "--dir",
            "certs/dev",
            "--agent-name",
            "prod-us-1",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("agent-prod-us-1.pem"), "{}", text(&out));
    assert_eq!(
        std::fs::read(dir.join("certs/dev/ca.pem")).expect("ca"),
        ca_before
    );
    let again = teeway(
        dir,
        &[
            "certs",
            "issue",
            "--dir",
            "certs/dev",
            "--agent-name",
            "prod-us-1",
        ],
    );
    assert_eq!(
        again.status.code(),
        Some(1),
        "never overwritten: {}",
        text(&again)
    );

    let pem = std::fs::read(dir.join("certs/dev/agent-prod-us-1.pem")).expect("cert");
    let der = rustls_pki_types::CertificateDer::from_pem_slice(&pem).expect("pem");
    use rustls_pki_types::pem::PemObject;
    let facts = teeway_wire::certinfo::facts(&der).expect("parses");
    let days = (facts.not_after - facts.not_before) / 86_400;
    assert_eq!(days, 365, "{facts:?}");
    let ca = std::fs::read(dir.join("certs/dev/ca.pem")).expect("ca");
    let ca = rustls_pki_types::CertificateDer::from_pem_slice(&ca).expect("pem");
    teeway_wire::tls::install_default_provider();
    assert_eq!(
        teeway_wire::certinfo::verify_as_client(&[der], &[ca], rustls_pki_types::UnixTime::now()),
        Ok(()),
        "the gateway trusting the CA accepts the new agent"
    );
    std::fs::write(
        dir.join("us.yaml"),
        "cluster: prod-us-1\nlisten: 127.0.0.1:8080\nprimary: http://127.0.0.1:9\ngateway: { address: 127.0.0.1:4433, server_name: localhost, ca: certs/dev/ca.pem, cert: certs/dev/agent-prod-us-1.pem, key: certs/dev/agent-prod-us-1.key }\n",
    )
    .expect("write");
    std::fs::write(
        dir.join("gateway.yaml"),
        "listen: 127.0.0.1:4433\ntls: { ca: certs/dev/ca.pem, cert: certs/dev/gateway.pem, key: certs/dev/gateway.key }\nroutes:\n  - targets: [http://127.0.0.1:9]\n",
    )
    .expect("write");
    let out = teeway(dir, &["check", "gateway.yaml", "us.yaml"]);
    assert!(out.status.success(), "{}", text(&out));
}
