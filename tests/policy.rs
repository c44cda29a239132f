//! Traffic policy end to end: redaction of what leaves production, fan-out with per-target
//! limits, agent authorization, and live reload under load with real processes and SIGHUP.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;

use teeway::sample;
use teeway::stack::{self, Pki, RunningAgent, RunningGateway};
use teeway_gateway::config::TargetConfig;
use teeway_gateway::metrics as gm;

use support::{
    admin_get, agent_settled, config_version, field, gateway_settled, get, hangup, replace_file,
    settle, settle_async, KeepAlive, Proc, LIMIT,
};

fn write_pki(dir: &Path, pki: &Pki) {
    std::fs::write(dir.join("ca.pem"), &pki.ca.certified.cert_pem).expect("write");
    std::fs::write(dir.join("agent.pem"), &pki.agent.cert_pem).expect("write");
    std::fs::write(dir.join("agent.key"), &pki.agent.key_pem).expect("write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redaction_scrubs_the_copy_and_the_primary_gets_the_original() {
    teeway_wire::tls::install_default_provider();
    let tmp = tempfile::tempdir().expect("tmp");
    let pki = Pki::generate("prod-eu-1").expect("pki");
    write_pki(tmp.path(), &pki);
    std::fs::write(tmp.path().join("redact.key"), [7u8; 32]).expect("key");
    // A recording service as the primary: it shows what production received.
    let (primary, primary_seen) = sample::start_shadow(Duration::ZERO).await.expect("primary");
    let (shadow, shadow_seen) = sample::start_shadow(Duration::ZERO).await.expect("shadow");
    let gateway = RunningGateway::start(stack::gateway_config(
        pki.gateway_material(),
        &[shadow.addr],
    ))
    .await
    .expect("gateway");
    let yaml = format!(
        "cluster: prod-eu-1
listen: 127.0.0.1:0
primary: {}
mirror: {{ percentage: 100 }}
redact:
  headers: [{{ name: x-session, action: hash }}]
  query: [token, {{ name: email, action: mask }}]
  hash_key_file: redact.key
gateway: {{ address: '{}', server_name: localhost, ca: ca.pem, cert: agent.pem, key: agent.key }}
",
        primary.url(),
        gateway.addr
    );
    let config = teeway_agent::AgentConfig::from_yaml(&yaml, tmp.path()).expect("valid config");
    let agent = RunningAgent::start(config).await.expect("agent");
    agent.agent.wait_connected(true).await;

    let mut client = KeepAlive::open(agent.addr).await;
    let req = Request::get("/account?token=s3cr3t&page=2&email=a@example.com")
        .header("host", "api.example.com")
        .header("authorization", "Bearer s3cr3t")
        .header("cookie", "sid=s3cr3t")
        .header("x-session", "s3cr3t-session")
        .body(Full::new(Bytes::new()))
        .expect("request");
    assert_eq!(client.send(req).await, Ok(StatusCode::OK));

    assert_eq!(shadow_seen.wait_for(1, LIMIT).await, 1);
    let copy = &shadow_seen.requests()[0];
    assert_eq!(copy.uri.path(), "/account");
    assert_eq!(copy.uri.query(), Some("page=2&email=redacted"));
    assert!(copy.headers.get("authorization").is_none());
    assert!(copy.headers.get("cookie").is_none());
    let session = copy.headers["x-session"].to_str().expect("text");
    assert!(session.starts_with("hmac-sha256:"), "{session}");
    let everything = format!("{:?} {:?}", copy.uri, copy.headers);
    assert!(
        !everything.contains("s3cr3t"),
        "a secret left production: {everything}"
    );

    let original = &primary_seen.requests()[0];
    assert_eq!(
        original.uri.query(),
        Some("token=s3cr3t&page=2&email=a@example.com")
    );
    assert_eq!(original.headers["authorization"], "Bearer s3cr3t");
    assert_eq!(original.headers["cookie"], "sid=s3cr3t");
    assert_eq!(original.headers["x-session"], "s3cr3t-session");

    agent.stop().await.expect("agent stops");
    gateway.stop().await.expect("gateway stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_with_a_rate_limited_target_and_a_dead_one() {
    teeway_wire::tls::install_default_provider();
    let pki = Pki::generate("prod-eu-1").expect("pki");
    let primary = sample::start_primary().await.expect("primary");
    let (v2, v2_seen) = sample::start_shadow(Duration::ZERO).await.expect("v2");
    let (v3, v3_seen) = sample::start_shadow(Duration::ZERO).await.expect("v3");
    // A port with nothing listening: bound, then closed.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let mut config = stack::gateway_config(pki.gateway_material(), &[v2.addr, v3.addr, dead]);
    // v3 takes a burst of 5, then one token a minute: no refill within this test.
    config.routes[0].targets[1].rate_limit = Some(teeway_gateway::config::RateLimit {
        per_second: 1.0 / 60.0,
        burst: 5,
    });
    config.routes[0].targets[2] = TargetConfig {
        timeout: Duration::from_secs(2),
        ..config.routes[0].targets[2].clone()
    };
    let gateway = RunningGateway::start(config).await.expect("gateway");
    let agent = RunningAgent::start(stack::agent_config(
        pki.agent_material(),
        primary.addr,
        gateway.addr,
        100.0,
    ))
    .await
    .expect("agent");
    agent.agent.wait_connected(true).await;

    let n = 20;
    let mut client = KeepAlive::open(agent.addr).await;
    for i in 0..n {
        assert_eq!(
            client.send(get(&format!("/items/{i}"))).await,
            Ok(StatusCode::OK)
        );
    }
    assert_eq!(v2_seen.wait_for(n, LIMIT).await, n, "v2 gets every copy");
    let g = settle(
        || gateway.gateway.metrics(),
        |m| {
            m.sum_where(gm::REPLAY_FAILED_TOTAL, &[("reason", "connect")]) == n as f64
                && gateway_settled(m, 3.0)
        },
    )
    .await;
    assert_eq!(v3_seen.requests().len(), 5, "v3 gets its burst and no more");
    // Each target's outcomes under its own labels: an operator sees which shadow fails.
    let url = |a: std::net::SocketAddr| format!("http://{a}");
    let (v2_url, v3_url, dead_url) = (url(v2.addr), url(v3.addr), url(dead));
    let of = |name: &str, target: &str, reason: (&str, &str)| {
        g.sum_where(name, &[("route", "routes[0]"), ("target", target), reason])
    };
    assert_eq!(
        of(gm::REPLAY_FAILED_TOTAL, &v3_url, ("reason", "rate_limited")),
        (n - 5) as f64
    );
    assert_eq!(
        of(gm::REPLAY_FAILED_TOTAL, &dead_url, ("reason", "connect")),
        n as f64,
        "the dead target fails alone"
    );
    assert_eq!(
        g.sum_where(gm::REPLAY_FAILED_TOTAL, &[("target", v2_url.as_str())]),
        0.0
    );
    assert_eq!(
        of(gm::REPLAYED_TOTAL, &v2_url, ("status_class", "2xx")),
        n as f64
    );
    assert_eq!(
        of(gm::REPLAYED_TOTAL, &v3_url, ("status_class", "2xx")),
        5.0
    );
    assert_eq!(g.sum(gm::REPLAYED_TOTAL), (n + 5) as f64);
    // Every (record, target) pair is accounted for.
    assert_eq!(
        g.get(gm::RECEIVED_TOTAL) * 3.0,
        g.sum(gm::REPLAYED_TOTAL)
            + g.sum(gm::REPLAY_FAILED_TOTAL)
            + g.sum(gm::REPLAY_SKIPPED_TOTAL)
    );
    // The marker names the agent by its certificate identity.
    assert!(v2_seen
        .requests()
        .iter()
        .all(|r| r.headers["x-teeway-mirror"] == "prod-eu-1"));

    agent.stop().await.expect("agent stops");
    gateway.stop().await.expect("gateway stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_not_in_the_allow_list_are_refused_after_the_handshake() {
    teeway_wire::tls::install_default_provider();
    let pki = Pki::generate("prod-eu-1").expect("pki");
    let primary = sample::start_primary().await.expect("primary");
    let (shadow, seen) = sample::start_shadow(Duration::ZERO).await.expect("shadow");
    let mut config = stack::gateway_config(pki.gateway_material(), &[shadow.addr]);
    config.agents_allow = Some(vec!["prod-us-*".into()]);
    let gateway = RunningGateway::start(config).await.expect("gateway");
    let agent = RunningAgent::start(stack::agent_config(
        pki.agent_material(),
        primary.addr,
        gateway.addr,
        100.0,
    ))
    .await
    .expect("agent");
    let g = settle(
        || gateway.gateway.metrics(),
        |m| {
            m.get(&format!(
                "{}{{result=\"unauthorized\"}}",
                gm::HANDSHAKES_TOTAL
            )) >= 1.0
        },
    )
    .await;
    assert!(
        g.get(&format!(
            "{}{{result=\"unauthorized\"}}",
            gm::HANDSHAKES_TOTAL
        )) >= 1.0
    );
    assert_eq!(
        g.get(&format!("{}{{result=\"ok\"}}", gm::HANDSHAKES_TOTAL)),
        0.0
    );
    // Production is unaffected: the client is served, the copy is counted as no_uplink.
    let mut client = KeepAlive::open(agent.addr).await;
    assert_eq!(client.send(get("/x")).await, Ok(StatusCode::OK));
    assert!(!agent.agent.is_connected());
    assert!(seen.requests().is_empty());
    agent.stop().await.expect("agent stops");
    gateway.stop().await.expect("gateway stops");
}

fn gateway_yaml(shadow: &str, extra: &str) -> String {
    format!(
        "listen: 127.0.0.1:0
tls: {{ ca: certs/dev/ca.pem, cert: certs/dev/gateway.pem, key: certs/dev/gateway.key }}
routes:
  - targets: [{shadow}]
{extra}admin: {{ listen: 127.0.0.1:0 }}
"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_drop_nothing_and_reject_bad_configs() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_teeway"))
        .args(["certs", "init", "--dir", "certs/dev"])
        .current_dir(tmp.path())
        .output()
        .expect("certs");
    assert!(out.status.success());
    let primary = sample::start_primary().await.expect("primary");
    let (blue, blue_seen) = sample::start_shadow(Duration::ZERO).await.expect("blue");
    let (green, green_seen) = sample::start_shadow(Duration::ZERO).await.expect("green");

    let gw_file = tmp.path().join("gateway.yaml");
    std::fs::write(&gw_file, gateway_yaml(&blue.url(), "")).expect("write");
    let gateway = Proc::spawn(tmp.path(), &["gateway", "--config", "gateway.yaml"]);
    let line = gateway.wait_for_line("gateway serving");
    let gateway_addr = field(&line, "listen");
    let gateway_admin: SocketAddr = field(&line, "admin").parse().expect("admin");

    let agent_yaml = |percentage: &str| {
        format!(
            "cluster: prod-eu-1\nlisten: 127.0.0.1:0\nprimary: {}\nmirror: {{ percentage: {percentage} }}\ngateway:\n  address: {gateway_addr}\n  server_name: localhost\n  ca: certs/dev/ca.pem\n  cert: certs/dev/agent.pem\n  key: certs/dev/agent.key\nadmin: {{ listen: 127.0.0.1:0 }}\n",
            primary.url()
        )
    };
    std::fs::write(tmp.path().join("agent.yaml"), agent_yaml("100")).expect("write");
    let agent = Proc::spawn(tmp.path(), &["agent", "--config", "agent.yaml"]);
    let line = agent.wait_for_line("agent serving");
    let agent_addr: SocketAddr = field(&line, "listen").parse().expect("listen");
    let agent_admin: SocketAddr = field(&line, "admin").parse().expect("admin");
    agent.wait_for_line("uplink connected");

    // A steady stream on one kept-alive connection, for the whole test.
    let stop = tokio_util::sync::CancellationToken::new();
    let load = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut client = KeepAlive::open(agent_addr).await;
            let (mut ok, mut errors) = (0u64, Vec::new());
            let mut i = 0u64;
            while !stop.is_cancelled() && i < 200_000 {
                match client.send(get(&format!("/load/{i}"))).await {
                    Ok(StatusCode::OK) => ok += 1,
                    other => errors.push(format!("{i}: {other:?}")),
                }
                i += 1;
                tokio::task::yield_now().await;
            }
            (ok, errors)
        })
    };

    let mut expected_version = 1;
    let rounds = 6;
    for round in 0..rounds {
        // A bad config: the old one stays in force.
        let before = (blue_seen.requests().len(), green_seen.requests().len());
        replace_file(
            &gw_file,
            "listen: 127.0.0.1:0\nroutes: [{ targets: [ftp://nope] }]\n",
        );
        hangup(&gateway);
        let (version, error) =
            settle_async(|| config_version(gateway_admin), |(_, e)| !e.is_empty()).await;
        assert_eq!(
            version, expected_version,
            "a rejected config changes nothing"
        );
        assert!(error.contains("routes[0].targets[0]"), "{error}");
        // Mirroring goes on to the same shadow.
        let target = if round % 2 == 0 {
            &blue_seen
        } else {
            &green_seen
        };
        let seen_before = if round % 2 == 0 { before.0 } else { before.1 };
        assert!(target.wait_for(seen_before + 5, LIMIT).await > seen_before);

        // A good one: routing moves to the other shadow (the file watcher picks it up too;
        // SIGHUP makes it immediate).
        let next = if round % 2 == 0 {
            green.url()
        } else {
            blue.url()
        };
        replace_file(&gw_file, gateway_yaml(&next, ""));
        hangup(&gateway);
        expected_version += 1;
        let (version, _) = settle_async(
            || config_version(gateway_admin),
            |(v, _)| *v >= expected_version,
        )
        .await;
        // The watcher and the signal may both apply the same text: count what was applied.
        expected_version = version;
        let other = if round % 2 == 0 {
            &green_seen
        } else {
            &blue_seen
        };
        let had = other.requests().len();
        assert!(
            other.wait_for(had + 5, LIMIT).await >= had + 5,
            "round {round}: the new route takes traffic"
        );
    }

    // The agent reloads too: mirroring off while the load goes on.
    replace_file(&tmp.path().join("agent.yaml"), agent_yaml("0"));
    hangup(&agent);
    let (version, _) = settle_async(|| config_version(agent_admin), |(v, _)| *v >= 2).await;
    assert_eq!(version, 2);

    let (_, metrics) = admin_get(gateway_admin, "/metrics").await;
    let m = teeway_runtime::metrics::Snapshot::parse(&metrics);
    assert_eq!(
        m.get("teeway_config_reload_total{result=\"rejected\"}"),
        rounds as f64
    );
    assert!(m.get("teeway_config_reload_total{result=\"applied\"}") >= rounds as f64);
    // One agent connection throughout: reloads never dropped the uplink.
    assert_eq!(
        m.get(&format!("{}{{result=\"ok\"}}", gm::HANDSHAKES_TOTAL)),
        1.0
    );
    let a = settle_async(
        || async {
            let (_, metrics) = admin_get(agent_admin, "/metrics").await;
            teeway_runtime::metrics::Snapshot::parse(&metrics)
        },
        |a| a.get("teeway_agent_not_sampled_total") > 0.0,
    )
    .await;
    assert!(
        a.get("teeway_agent_not_sampled_total") > 0.0,
        "after the agent's reload to 0%, requests are passed over"
    );
    assert_eq!(
        a.get("teeway_agent_uplink_connects_total{result=\"ok\"}"),
        1.0
    );
    stop.cancel();
    let (ok, errors) = load.await.expect("load task");
    assert!(
        errors.is_empty(),
        "client errors during reloads: {errors:?}"
    );
    assert!(ok > 0);

    let _ = agent.terminate_and_wait();
    let _ = gateway.terminate_and_wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_path_samples_the_configured_share() {
    use teeway_agent::metrics as am;
    // 25% of 800 requests: mean 200, sd ~12.2. The bound is ±6 sd, generous on purpose: this
    // checks the wiring on the real path; the precision is tested with a seeded RNG in
    // agent::policy.
    let stack = support::Stack::start(25.0).await;
    let n = 800;
    let mut client = KeepAlive::open(stack.agent.addr).await;
    for i in 0..n {
        assert_eq!(
            client.send(get(&format!("/s/{i}"))).await,
            Ok(StatusCode::OK)
        );
    }
    let a = settle(|| stack.agent_metrics(), agent_settled).await;
    support::assert_agent_identity(&a);
    assert_eq!(a.get(am::REQUESTS_TOTAL), n as f64);
    let mirrored = a.get(am::MIRRORED_TOTAL);
    assert!(
        (mirrored - 200.0).abs() <= 73.0,
        "mirrored {mirrored} of {n}"
    );
    assert_eq!(
        stack.recording.wait_for(mirrored as usize, LIMIT).await,
        mirrored as usize
    );
    stack.stop().await;
}

/// Credentials in headers, in the query, in `Referer` and in an absolute-form target's userinfo
/// leave production with the default configuration nowhere: not to the shadow, not into the
/// gateway's archive, not into the agent's spool. The primary gets them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_redaction_keeps_credentials_out_of_shadow_archive_and_spool() {
    teeway_wire::tls::install_default_provider();
    let tmp = tempfile::tempdir().expect("tmp");
    let pki = Pki::generate("prod-eu-1").expect("pki");
    let (primary, primary_seen) = sample::start_shadow(Duration::ZERO).await.expect("primary");
    let (shadow, shadow_seen) = sample::start_shadow(Duration::ZERO).await.expect("shadow");
    let mut gateway_config = stack::gateway_config(pki.gateway_material(), &[shadow.addr]);
    gateway_config.archive = Some(teeway_archive::ArchiveConfig::new(
        tmp.path().join("archive"),
        teeway_archive::Format::Teeway,
    ));
    let gateway = RunningGateway::start(gateway_config)
        .await
        .expect("gateway");
    let mut config = stack::agent_config(pki.agent_material(), primary.addr, gateway.addr, 100.0);
    if let Some(g) = config.gateway.as_mut() {
        g.spool = Some(teeway_agent::SpoolConfig {
            dir: tmp.path().join("spool"),
            max_bytes: 16 << 20,
        });
    }
    let agent = RunningAgent::start(config).await.expect("agent");
    assert!(agent.wait_connected(LIMIT).await);

    const SECRETS: [&str; 12] = [
        "sEcReT-api-key",
        "sEcReT-auth-token",
        "sEcReT-amz",
        "sEcReT-csrf",
        "sEcReT-fwd-authz",
        "sEcReT-access-token",
        "sEcReT-api_key-q",
        "sEcReT-token-q",
        "sEcReT-password-q",
        "sEcReT-referer-token",
        "sEcReT-userinfo",
        "sEcReT-bearer",
    ];
    let send = |addr: SocketAddr| async move {
        // Absolute form with userinfo, as a forward-proxy client writes it.
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request = format!(
            "GET http://user:{}@api.example.com/v1/items?access_token={}&api_key={}&token={}&password={}&page=2 HTTP/1.1\r\n\
             Host: api.example.com\r\nAuthorization: Bearer {}\r\nX-Api-Key: {}\r\nX-Auth-Token: {}\r\n\
             X-Amz-Security-Token: {}\r\nX-CSRF-Token: {}\r\nX-Forwarded-Authorization: Bearer {}\r\n\
             Referer: https://app.example.com/cb?access_token={}&x=1\r\nConnection: close\r\n\r\n",
            SECRETS[10], SECRETS[5], SECRETS[6], SECRETS[7], SECRETS[8], SECRETS[11], SECRETS[0],
            SECRETS[1], SECRETS[2], SECRETS[3], SECRETS[4], SECRETS[9]
        );
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.expect("read");
        assert!(
            answer.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
    };
    send(agent.addr).await;
    assert_eq!(shadow_seen.wait_for(1, LIMIT).await, 1);
    // The primary got every credential.
    let original = format!("{:?}", primary_seen.requests());
    for secret in &SECRETS[..10] {
        assert!(original.contains(secret), "the primary lost {secret}");
    }
    // The shadow got none.
    let copy = format!("{:?}", shadow_seen.requests());
    for secret in SECRETS {
        assert!(
            !copy.contains(secret),
            "{secret} reached the shadow: {copy}"
        );
    }
    assert!(
        copy.contains("page=2"),
        "the rest of the query stays: {copy}"
    );

    // The gateway goes away: the next copy waits in the agent's spool, on disk.
    gateway.stop().await.expect("gateway stops");
    agent.agent.wait_connected(false).await;
    send(agent.addr).await;
    settle(
        || agent.agent.metrics(),
        |m| m.get(teeway_agent::metrics::MIRROR_SPOOLED_TOTAL) >= 1.0,
    )
    .await;
    // Every byte written under the archive and the spool: no credential in any of them.
    let mut files = Vec::new();
    for dir in ["archive", "spool"] {
        for entry in std::fs::read_dir(tmp.path().join(dir)).expect("dir") {
            files.push(entry.expect("entry").path());
        }
    }
    assert!(files.len() >= 2, "{files:?}");
    for file in &files {
        let bytes = std::fs::read(file).expect("read");
        // The copy is in the file (uncompressed), so looking for the secrets means something.
        assert!(
            bytes.windows(b"/v1/items".len()).any(|w| w == b"/v1/items"),
            "no copy in {}",
            file.display()
        );
        for secret in SECRETS {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{secret} is in {}",
                file.display()
            );
        }
    }
    agent.stop().await.expect("agent stops");
}
