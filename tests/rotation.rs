//! Certificate rotation without a restart, with real processes: the certificate files live in a
//! directory laid out as Kubernetes mounts a Secret (files are symlinks through `..data`, which
//! is swapped atomically), and a new CA, gateway certificate and agent certificate are published
//! while traffic flows. Both processes must pick them up from the file change alone.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use teeway::sample;
use teeway_runtime::metrics::Snapshot;

use support::{admin_get, config_version, field, settle_async, Proc, LIMIT};

/// Files as a Secret volume shows them: `dir/NAME -> ..data/NAME`, `..data -> ..vN`.
fn publish(dir: &Path, version: u32, files: &[(&str, Vec<u8>)]) {
    let versioned = dir.join(format!("..v{version}"));
    std::fs::create_dir_all(&versioned).expect("mkdir");
    for (name, bytes) in files {
        std::fs::write(versioned.join(name), bytes).expect("write");
        let link = dir.join(name);
        if link.symlink_metadata().is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(name), &link).expect("symlink");
        }
    }
    // The kubelet's swap: a new symlink renamed over `..data` in one step.
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(format!("..v{version}"), &tmp).expect("symlink");
    std::fs::rename(&tmp, dir.join("..data")).expect("rename");
}

fn certs_init(dir: &Path, name: &str, agent: &str) -> std::path::PathBuf {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_teeway"))
        .args(["certs", "init", "--dir", name, "--agent-name", agent])
        .current_dir(dir)
        .output()
        .expect("certs");
    assert!(out.status.success(), "{out:?}");
    dir.join(name)
}

fn read(dir: &Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name)).expect("read")
}

fn gateway_yaml(shadow: &str, allow: &str) -> String {
    format!(
        "listen: 127.0.0.1:0
tls: {{ ca: gw/ca.pem, cert: gw/tls.crt, key: gw/tls.key }}
agents: {{ allow: [{allow}] }}
routes:
  - targets: [{shadow}]
admin: {{ listen: 127.0.0.1:0 }}
"
    )
}

/// An agent config whose TLS files are `{certs}/ca.pem`, `{certs}/{cert}` and `{certs}/{key}`.
fn agent_yaml(primary: &str, gateway: &str, certs: &str, cert: &str, key: &str) -> String {
    format!(
        "cluster: prod-eu-1
listen: 127.0.0.1:0
primary: {primary}
mirror: {{ percentage: 100 }}
gateway:
  address: {gateway}
  server_name: localhost
  ca: {certs}/ca.pem
  cert: {certs}/{cert}
  key: {certs}/{key}
admin: {{ listen: 127.0.0.1:0 }}
"
    )
}

async fn metrics(admin: SocketAddr) -> Snapshot {
    let (_, body) = admin_get(admin, "/metrics").await;
    Snapshot::parse(&body)
}

/// Sends requests through the agent until the shadow has seen one marked with `identity`
/// (the gateway's mirror header carries the agent's certificate identity); every client
/// response must be 200 meanwhile.
async fn mirror_until_marked(agent: SocketAddr, seen: &sample::Recording, identity: &str) {
    let marked = |seen: &sample::Recording| {
        seen.requests().iter().any(|r| {
            r.headers
                .get("x-teeway-mirror")
                .is_some_and(|v| v.as_bytes() == identity.as_bytes())
        })
    };
    let deadline = std::time::Instant::now() + LIMIT;
    let mut sent = 0;
    while !marked(seen) {
        assert!(
            std::time::Instant::now() < deadline,
            "no copy marked {identity} reached the shadow after {sent} requests"
        );
        let (status, _) = admin_get(agent, &format!("/rotation/{sent}")).await;
        assert_eq!(status, 200, "production must not notice the rotation");
        sent += 1;
        // Give the uplink a moment between requests (bounded: the deadline above).
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_on_file_change_without_a_restart() {
    let tmp = tempfile::tempdir().expect("tmp");
    let root = tmp.path();
    let old = certs_init(root, "old", "agent-old");
    let new = certs_init(root, "new", "agent-new");
    let gw = root.join("gw");
    let ag = root.join("ag");
    std::fs::create_dir_all(&gw).expect("mkdir");
    std::fs::create_dir_all(&ag).expect("mkdir");
    publish(
        &gw,
        1,
        &[
            ("ca.pem", read(&old, "ca.pem")),
            ("tls.crt", read(&old, "gateway.pem")),
            ("tls.key", read(&old, "gateway.key")),
        ],
    );
    publish(
        &ag,
        1,
        &[
            ("ca.pem", read(&old, "ca.pem")),
            ("tls.crt", read(&old, "agent.pem")),
            ("tls.key", read(&old, "agent.key")),
        ],
    );

    let primary = sample::start_primary().await.expect("primary");
    let (shadow, seen) = sample::start_shadow(Duration::ZERO).await.expect("shadow");
    std::fs::write(
        root.join("gateway.yaml"),
        gateway_yaml(&shadow.url(), "agent-old, agent-new"),
    )
    .expect("write");
    let gateway = Proc::spawn(root, &["gateway", "--config", "gateway.yaml"]);
    let line = gateway.wait_for_line("gateway serving");
    let gateway_addr = field(&line, "listen");
    let gateway_admin: SocketAddr = field(&line, "admin").parse().expect("admin");
    std::fs::write(
        root.join("agent.yaml"),
        agent_yaml(&primary.url(), &gateway_addr, "ag", "tls.crt", "tls.key"),
    )
    .expect("write");
    let agent = Proc::spawn(root, &["agent", "--config", "agent.yaml"]);
    let line = agent.wait_for_line("agent serving");
    let agent_addr: SocketAddr = field(&line, "listen").parse().expect("listen");
    let agent_admin: SocketAddr = field(&line, "admin").parse().expect("admin");
    agent.wait_for_line("uplink connected");
    mirror_until_marked(agent_addr, &seen, "agent-old").await;

    // Rotate to a new CA: both sides trust old and new during the overlap; the gateway and the
    // agent get certificates from the new CA. Only the Secret-like directories change.
    let both_cas = [read(&old, "ca.pem"), read(&new, "ca.pem")].concat();
    publish(
        &gw,
        2,
        &[
            ("ca.pem", both_cas.clone()),
            ("tls.crt", read(&new, "gateway.pem")),
            ("tls.key", read(&new, "gateway.key")),
        ],
    );
    publish(
        &ag,
        2,
        &[
            ("ca.pem", both_cas),
            ("tls.crt", read(&new, "agent.pem")),
            ("tls.key", read(&new, "agent.key")),
        ],
    );
    for admin in [gateway_admin, agent_admin] {
        let (version, rejected) = settle_async(|| config_version(admin), |(v, _)| *v >= 2).await;
        assert_eq!(version, 2, "the file change alone reloads ({admin})");
        assert!(rejected.is_empty(), "{rejected}");
    }
    // The connection made before the rotation is kept: nothing was torn down.
    let a = metrics(agent_admin).await;
    assert_eq!(
        a.get("teeway_agent_uplink_connects_total{result=\"ok\"}"),
        1.0
    );

    // Retire the old identity at the gateway: its next batch is refused, and the agent
    // reconnects with the certificate it reloaded (signed by the new CA).
    std::fs::write(
        root.join("gateway.yaml"),
        gateway_yaml(&shadow.url(), "agent-new"),
    )
    .expect("write");
    settle_async(|| config_version(gateway_admin), |(v, _)| *v >= 3).await;
    mirror_until_marked(agent_addr, &seen, "agent-new").await;
    let a = metrics(agent_admin).await;
    assert_eq!(
        a.get("teeway_agent_uplink_connects_total{result=\"ok\"}"),
        2.0,
        "one reconnect, with the new certificate"
    );
    let g = metrics(gateway_admin).await;
    assert!(g.get("teeway_gateway_handshakes_total{result=\"unauthorized\"}") >= 1.0);

    // The gateway now presents the new CA's certificate: an agent that trusts only the new CA
    // connects (before the rotation its handshake would have failed).
    std::fs::write(
        root.join("agent-new-only.yaml"),
        agent_yaml(
            &primary.url(),
            &gateway_addr,
            "new",
            "agent.pem",
            "agent.key",
        ),
    )
    .expect("write");
    let second = Proc::spawn(root, &["agent", "--config", "agent-new-only.yaml"]);
    second.wait_for_line("uplink connected");

    let _ = second.terminate_and_wait();
    let _ = agent.terminate_and_wait();
    let _ = gateway.terminate_and_wait();
}
