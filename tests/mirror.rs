//! End to end through the library entry points: real sockets, real TLS, real QUIC, certificates
//! generated at test time.

mod support;

use std::time::Duration;

use teeway::demo::{compare, plan, send_plan};
use teeway::sample;
use teeway::stack::{self, Pki, RunningAgent, RunningGateway};
use teeway_agent::metrics as am;
use teeway_gateway::metrics as gm;

use support::{admin_get, agent_settled, assert_agent_identity, settle, Stack, LIMIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn varied_requests_reach_primary_and_arrive_intact_at_shadow() {
    let stack = Stack::start(100.0).await;
    let plan = plan(160);

    let outcomes = send_plan(stack.agent.addr, &plan).await;
    let failures: Vec<&String> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    assert!(
        failures.is_empty(),
        "clients got something other than the primary's answer: {failures:?}"
    );

    assert_eq!(
        stack.recording.wait_for(plan.len(), LIMIT).await,
        plan.len(),
        "every copy arrives"
    );
    let verdicts = compare(&plan, &stack.recording.requests());
    assert_eq!(verdicts.len(), plan.len());
    let bad: Vec<_> = verdicts.iter().filter(|(_, v)| v.is_err()).collect();
    assert!(bad.is_empty(), "copies differ from what was sent: {bad:?}");

    let a = settle(|| stack.agent_metrics(), agent_settled).await;
    assert_eq!(a.get(am::REQUESTS_TOTAL), 160.0);
    assert_eq!(a.get(am::MIRRORED_TOTAL), 160.0);
    // What production got, as the agent saw it: every answer from the primary, timed.
    assert_eq!(a.sum(am::PRIMARY_RESPONSES_TOTAL), 160.0, "{a:?}");
    assert_eq!(
        a.get(&format!("{}_count", am::PRIMARY_DURATION_SECONDS)),
        160.0
    );
    assert!(a.get(am::UPLINK_BYTES_SENT_TOTAL) > 0.0);
    // The test PKI's leaf expires within days-to-years; what matters is that it is read.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let expiry = a.get("teeway_certificate_expiry_timestamp_seconds{cert=\"gateway.cert\"}");
    assert!(expiry > now, "{a:?}");
    assert_eq!(a.sum("teeway_build_info"), 1.0);
    assert_eq!(a.sum(am::MIRROR_DROPPED_TOTAL), 0.0);
    assert_agent_identity(&a);
    let g = settle(
        || stack.gateway_metrics(),
        |s| s.sum(gm::REPLAYED_TOTAL) == 160.0,
    )
    .await;
    assert_eq!(g.get(gm::RECEIVED_TOTAL), 160.0);
    assert_eq!(
        g.sum_where(gm::REPLAYED_TOTAL, &[("status_class", "2xx")]),
        160.0
    );
    assert_eq!(g.sum(gm::REPLAY_FAILED_TOTAL), 0.0);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn percentage_zero_mirrors_nothing() {
    let stack = Stack::start(0.0).await;
    let plan = plan(50);
    assert!(send_plan(stack.agent.addr, &plan)
        .await
        .iter()
        .all(Result::is_ok));
    let a = stack.agent_metrics();
    assert_eq!(a.get(am::REQUESTS_TOTAL), 50.0);
    assert_eq!(a.get(am::NOT_SAMPLED_TOTAL), 50.0);
    assert_eq!(
        a.get(am::MIRROR_IN_FLIGHT),
        0.0,
        "nothing was sampled, so nothing is on its way"
    );
    assert_eq!(a.get(am::MIRRORED_TOTAL), 0.0);
    assert_agent_identity(&a);
    assert_eq!(stack.gateway_metrics().get(gm::RECEIVED_TOTAL), 0.0);
    assert_eq!(stack.recording.count(), 0);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_sampling_accounts_for_every_request() {
    let stack = Stack::start(50.0).await;
    let plan = plan(400);
    assert!(send_plan(stack.agent.addr, &plan)
        .await
        .iter()
        .all(Result::is_ok));
    let a = settle(|| stack.agent_metrics(), agent_settled).await;
    let mirrored = a.get(am::MIRRORED_TOTAL);
    assert_eq!(a.get(am::NOT_SAMPLED_TOTAL) + mirrored, 400.0, "{a:?}");
    // Binomial(400, 0.5): sd = 10; 6 sd either way fails once in a billion runs.
    assert!(
        (140.0..=260.0).contains(&mirrored),
        "mirrored {mirrored} of 400 at 50%"
    );
    assert_eq!(
        stack.recording.wait_for(mirrored as usize, LIMIT).await,
        mirrored as usize
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_report_metrics_and_readiness() {
    let stack = Stack::start(100.0).await;
    let admin = stack.agent.admin.expect("agent admin");
    let (status, body) = admin_get(admin, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(admin_get(admin, "/healthz").await.0, 200);
    assert!(send_plan(stack.agent.addr, &plan(3))
        .await
        .iter()
        .all(Result::is_ok));
    let (status, text) = admin_get(admin, "/metrics").await;
    assert_eq!(status, 200);
    assert!(text.contains("teeway_agent_requests_total 3"), "{text}");
    assert!(
        text.contains("teeway_agent_mirror_dropped_total{reason=\"queue_full\"} 0"),
        "{text}"
    );
    let (status, text) = admin_get(
        stack
            .gateway
            .as_ref()
            .and_then(|g| g.admin)
            .expect("gateway admin"),
        "/metrics",
    )
    .await;
    assert_eq!(status, 200);
    assert!(text.contains("teeway_gateway_received_total"), "{text}");
    assert_eq!(admin_get(admin, "/nope").await.0, 404);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_with_certificate_from_another_ca_is_refused_and_still_serves() {
    teeway_wire::tls::install_default_provider();
    let trusted = Pki::generate("good-agent").expect("pki");
    let rogue = Pki::generate("rogue-agent").expect("rogue pki");
    let primary = sample::start_primary().await.expect("primary");
    let (shadow, recording) = sample::start_shadow(Duration::ZERO).await.expect("shadow");
    let gateway = RunningGateway::start(stack::gateway_config(
        trusted.gateway_material(),
        &[shadow.addr],
    ))
    .await
    .expect("gateway");
    // Trusts the gateway's CA, but presents a certificate the gateway's CA never signed.
    let mut material = rogue.agent_material();
    material.ca = vec![trusted.ca.certified.cert_der()];
    let agent = RunningAgent::start(stack::agent_config(
        material,
        primary.addr,
        gateway.addr,
        100.0,
    ))
    .await
    .expect("agent");

    let g = settle(
        || gateway.gateway.metrics(),
        |s| s.get("teeway_gateway_handshakes_total{result=\"refused\"}") >= 1.0,
    )
    .await;
    assert!(
        g.get("teeway_gateway_handshakes_total{result=\"refused\"}") >= 1.0,
        "{g:?}"
    );
    assert_eq!(g.get("teeway_gateway_handshakes_total{result=\"ok\"}"), 0.0);
    assert!(!agent.agent.is_connected());
    let (status, body) = admin_get(agent.admin.expect("admin"), "/readyz").await;
    assert_eq!(status, 503, "{body}");

    let plan = plan(40);
    let outcomes = send_plan(agent.addr, &plan).await;
    assert!(
        outcomes.iter().all(Result::is_ok),
        "clients are served: {outcomes:?}"
    );
    let a = settle(|| agent.agent.metrics(), agent_settled).await;
    assert_eq!(a.get(am::MIRRORED_TOTAL), 0.0);
    assert_eq!(
        a.get("teeway_agent_mirror_dropped_total{reason=\"no_uplink\"}"),
        40.0,
        "{a:?}"
    );
    assert_agent_identity(&a);
    assert_eq!(recording.count(), 0);
    assert_eq!(gateway.gateway.metrics().get(gm::RECEIVED_TOTAL), 0.0);
    agent.stop().await.expect("agent stops");
    gateway.stop().await.expect("gateway stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_gateway_stopped_clients_are_served_and_drops_counted() {
    let mut stack = Stack::start(100.0).await;
    let gateway = stack.gateway.take().expect("gateway");
    gateway.stop().await.expect("gateway stops");
    tokio::time::timeout(LIMIT, stack.agent.agent.wait_connected(false))
        .await
        .expect("agent sees the gateway go");

    let plan = plan(60);
    let outcomes = send_plan(stack.agent.addr, &plan).await;
    assert!(
        outcomes.iter().all(Result::is_ok),
        "clients are served: {outcomes:?}"
    );
    let a = settle(|| stack.agent_metrics(), agent_settled).await;
    assert_eq!(a.get(am::REQUESTS_TOTAL), 60.0);
    assert_eq!(a.get(am::MIRRORED_TOTAL), 0.0);
    let lost = a.get("teeway_agent_mirror_dropped_total{reason=\"no_uplink\"}")
        + a.get("teeway_agent_mirror_dropped_total{reason=\"uplink_error\"}");
    assert_eq!(lost, 60.0, "{a:?}");
    assert_agent_identity(&a);
    assert_eq!(stack.recording.count(), 0);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_sends_what_is_queued() {
    let stack = Stack::start(100.0).await;
    let plan = plan(100);
    assert!(send_plan(stack.agent.addr, &plan)
        .await
        .iter()
        .all(Result::is_ok));
    // Stop the agent at once: the drain must still deliver every copy it held.
    let Stack {
        agent,
        gateway,
        recording,
        ..
    } = stack;
    let agent_handle = agent.agent.clone();
    agent.stop().await.expect("agent stops");
    let a = agent_handle.metrics();
    assert_eq!(a.get(am::MIRRORED_TOTAL), 100.0, "{a:?}");
    assert_eq!(a.get(am::MIRROR_IN_FLIGHT), 0.0);
    assert_eq!(recording.wait_for(100, LIMIT).await, 100);
    gateway
        .expect("gateway")
        .stop()
        .await
        .expect("gateway stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_limit_reach_the_primary_but_are_not_mirrored() {
    let stack = Stack::start_with(100.0, |c| c.mirror.policy.max_body_bytes = 1024).await;
    let mut requests = plan(8);
    for r in &mut requests {
        r.method = http::Method::POST;
        r.chunked = r.seq % 2 == 0; // the limit holds with and without content-length
        r.body = bytes::Bytes::from(vec![b'z'; if r.seq < 4 { 4096 } else { 1024 }]);
    }
    let outcomes = send_plan(stack.agent.addr, &requests).await;
    assert!(
        outcomes.iter().all(Result::is_ok),
        "the primary gets every body: {outcomes:?}"
    );

    assert_eq!(stack.recording.wait_for(4, LIMIT).await, 4);
    let a = settle(|| stack.agent_metrics(), agent_settled).await;
    assert_eq!(
        a.get("teeway_agent_mirror_dropped_total{reason=\"body_too_large\"}"),
        4.0,
        "{a:?}"
    );
    assert_eq!(a.get(am::MIRRORED_TOTAL), 4.0);
    assert_agent_identity(&a);
    let arrived = compare(&requests, &stack.recording.requests());
    assert_eq!(
        arrived.keys().copied().collect::<Vec<_>>(),
        vec![4, 5, 6, 7],
        "only bodies within the limit"
    );
    assert!(arrived.values().all(Result::is_ok), "{arrived:?}");
    stack.stop().await;
}
