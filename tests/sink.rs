//! Sink mode: the agent takes the mirror feed an existing ingress sends, answers at once and
//! forwards the copies over the uplink like captured ones.
//!
//! nginx: Debian's nginx runs the shipped `deploy/examples/feeds/nginx-mirror.conf` (only the
//! addresses swapped for the test's) in front of the sample primary, with `mirror_request_body
//! on`. Clients get the primary's answers; every request reaches the shadow with its method,
//! path, query, original Host and body intact (a body large enough for nginx to spool to a temp
//! file included); a body over `max_body_bytes` is counted `body_too_large` while the client is
//! still served. `.ci/run` installs nginx; elsewhere the test prints `SKIPPED` when it is absent.
//!
//! Envoy and Istio: their feed is plain HTTP/1.1 or HTTP/2 with `-shadow` appended to the Host;
//! the test speaks it directly (neither can be installed here) and checks that the suffix is gone
//! at the shadow, for `Host` and for the HTTP/2 `:authority`, and that each copy is answered
//! `204` with no body.

mod support;

use std::net::SocketAddr;
use std::path::Path;

use bytes::Bytes;
use http::{Method, Request, StatusCode, Version};
use http_body_util::Full;

use teeway::sample::primary_answer;
use teeway_agent::config::SinkConfig;
use teeway_agent::metrics as am;

use support::nginx::Nginx;
use support::{agent_settled, host_of, settle, KeepAlive, Stack, LIMIT};

/// A stack whose agent is a sink (no primary) with `max_body_bytes`.
async fn sink_stack(max_body_bytes: u64) -> Stack {
    Stack::start_with(100.0, |c| {
        c.primary = None;
        c.sink = Some(SinkConfig {
            strip_host_suffix: "-shadow".into(),
        });
        c.mirror.policy.max_body_bytes = max_body_bytes;
    })
    .await
}

fn request(method: &Method, target: &str, host: &str, body: Bytes) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method.clone())
        .uri(target)
        .header("host", host)
        .body(Full::new(body))
        .expect("request")
}

/// The shipped example with the test's addresses; panics if the example lost a line the test
/// (and a user following it) relies on.
/// `{port}` stands for the port nginx listens on ([`Nginx::start`] picks it).
fn example_for(primary: SocketAddr, sink: SocketAddr) -> String {
    let example = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples/feeds/nginx-mirror.conf"),
    )
    .expect("example");
    for needle in [
        "server 127.0.0.1:9000;",
        "server 127.0.0.1:8090;",
        "listen 8080;",
        "mirror_request_body on;",
    ] {
        assert!(example.contains(needle), "the example lost `{needle}`");
    }
    example
        .replace("server 127.0.0.1:9000;", &format!("server {primary};"))
        .replace("server 127.0.0.1:8090;", &format!("server {sink};"))
        .replace("listen 8080;", "listen 127.0.0.1:{port};")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_mirror_feeds_the_sink_with_bodies_and_hosts_intact() {
    let Some(nginx_program) = support::find_program("nginx") else {
        support::tool_missing(
            "nginx",
            "the ingress of this test",
            "`apt-get install nginx`",
        );
        return;
    };
    const LIMIT_BYTES: u64 = 256 * 1024;
    let stack = sink_stack(LIMIT_BYTES).await;
    let tmp = tempfile::tempdir().expect("tmp");
    let nginx = Nginx::start(
        &nginx_program,
        tmp.path(),
        &example_for(stack.primary.addr, stack.agent.addr),
    )
    .await;

    // A mix: queries, small and empty bodies, one nginx keeps in a temp file (over its 16 KiB
    // buffer), several methods, two hosts.
    let big: Bytes = (0..200 * 1024)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<_>>()
        .into();
    let mut sent = Vec::new();
    for i in 0..24 {
        let (method, target, body) = match i % 4 {
            0 => (
                Method::GET,
                format!("/items?page={i}&q=a%20b"),
                Bytes::new(),
            ),
            1 => (
                Method::POST,
                format!("/orders/{i}"),
                Bytes::from(format!("{{\"order\":{i}}}")),
            ),
            2 => (Method::PUT, format!("/carts/{i}"), big.clone()),
            _ => (Method::DELETE, format!("/sessions/{i}"), Bytes::new()),
        };
        let host = if i % 2 == 0 {
            "api.example.com"
        } else {
            "shop.example.com:8443"
        };
        sent.push((method, target, host, body));
    }
    let mut client = KeepAlive::open(nginx.addr).await;
    for (method, target, host, body) in &sent {
        let (status, answer) = client
            .exchange(request(method, target, host, body.clone()))
            .await
            .expect("an answer");
        assert_eq!(status, StatusCode::OK, "{method} {target}");
        assert_eq!(
            answer,
            primary_answer(method, target, body).as_bytes(),
            "the client got the primary's answer"
        );
    }

    // Every copy reached the shadow, intact.
    let n = sent.len();
    assert_eq!(stack.recording.wait_for(n, LIMIT).await, n);
    let seen = stack.recording.requests();
    for (method, target, host, body) in &sent {
        let found = seen.iter().find(|r| {
            r.method == *method
                && r.uri.path_and_query().map(|pq| pq.as_str()) == Some(target.as_str())
        });
        let r = found.unwrap_or_else(|| panic!("{method} {target} did not reach the shadow"));
        assert_eq!(r.body, *body, "{method} {target}: body");
        assert_eq!(host_of(r), *host, "{method} {target}: host");
        let forwarded = r
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok());
        assert_eq!(
            forwarded,
            Some("127.0.0.1"),
            "nginx's own forwarding header"
        );
    }
    assert_eq!(stack.recording.count(), n, "each copy once");

    // Over the agent's limit: the client is served, the copy counted, not silently lost.
    let huge: Bytes = vec![b'x'; 2 * LIMIT_BYTES as usize].into();
    let (status, answer) = client
        .exchange(request(
            &Method::POST,
            "/upload",
            "api.example.com",
            huge.clone(),
        ))
        .await
        .expect("an answer");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        answer,
        primary_answer(&Method::POST, "/upload", &huge).as_bytes()
    );

    let a = settle(
        || stack.agent_metrics(),
        |s| agent_settled(s) && s.get(am::REQUESTS_TOTAL) == n as f64 + 1.0,
    )
    .await;
    assert_eq!(a.get(am::REQUESTS_TOTAL), n as f64 + 1.0, "{a:?}");
    assert_eq!(a.get(am::MIRRORED_TOTAL), n as f64, "{a:?}");
    assert_eq!(
        a.get(&format!(
            "{}{{reason=\"body_too_large\"}}",
            am::MIRROR_DROPPED_TOTAL
        )),
        1.0,
        "{a:?}"
    );
    assert_eq!(
        stack.recording.count(),
        n,
        "the oversized copy was not sent"
    );

    drop(nginx);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_style_feeds_lose_the_shadow_suffix_and_are_answered_at_once() {
    let stack = sink_stack(1024 * 1024).await;

    // HTTP/1.1, as Envoy sends a mirror: Host with -shadow, before or after the port.
    let mut client = KeepAlive::open(stack.agent.addr).await;
    for (host, target) in [
        ("orders.prod-shadow:8080", "/v1/orders?id=1"),
        ("orders.prod:8080-shadow", "/v1/orders?id=2"),
        ("plain.example.com", "/v1/orders?id=3"),
    ] {
        let (status, body) = client
            .exchange(request(
                &Method::POST,
                target,
                host,
                Bytes::from_static(b"{}"),
            ))
            .await
            .expect("an answer");
        assert_eq!(status, StatusCode::NO_CONTENT, "{host}");
        assert!(body.is_empty());
    }

    // HTTP/2 (gRPC through Istio): the suffix is on :authority.
    let mut sender = support::h2c(stack.agent.addr).await;
    let req = Request::post("http://grpc.internal-shadow:50051/echo.Echo/Say")
        .header("content-type", "application/grpc")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\x02hi")))
        .expect("request");
    let resp = sender.send_request(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);

    assert_eq!(stack.recording.wait_for(4, LIMIT).await, 4);
    let seen = stack.recording.requests();
    let host_for = |path: &str| {
        seen.iter()
            .find(|r| r.uri.path_and_query().map(|pq| pq.as_str()) == Some(path))
            .map(host_of)
            .unwrap_or_else(|| panic!("{path} did not reach the shadow"))
    };
    assert_eq!(host_for("/v1/orders?id=1"), "orders.prod:8080");
    assert_eq!(host_for("/v1/orders?id=2"), "orders.prod:8080");
    assert_eq!(host_for("/v1/orders?id=3"), "plain.example.com");
    let grpc = seen
        .iter()
        .find(|r| r.uri.path() == "/echo.Echo/Say")
        .expect("the gRPC copy");
    assert_eq!(grpc.version, Version::HTTP_2);
    assert_eq!(host_of(grpc), "grpc.internal:50051");
    assert_eq!(grpc.body, Bytes::from_static(b"\0\0\0\0\x02hi"));

    let a = settle(|| stack.agent_metrics(), agent_settled).await;
    assert_eq!(a.get(am::MIRRORED_TOTAL), 4.0, "{a:?}");
    stack.stop().await;
}
