//! Beyond plain HTTP/1 at the ingress, end to end through the agent.
//!
//! gRPC: unary, server-streaming and client-streaming calls over h2c reach the primary and the
//! shadow intact, with the primary's trailers (`grpc-status` and the rest) delivered to the
//! client. The gRPC peer here is written from the protocol's framing (a 5-byte prefix per
//! message: compressed flag, big-endian length), not from a gRPC library, so the test sees
//! exactly the bytes on the wire.
//!
//! Upgrades: a WebSocket handshake passes through to the primary, the bytes after it flow both
//! ways untouched, and the request is counted as `not_mirrorable`, never copied.
//!
//! TLS at the ingress (`listen_tls`): the agent terminates TLS with a certificate made at test
//! time; ALPN gives HTTP/2 (a gRPC call) or HTTP/1.1; the primary and the copy are told
//! `x-forwarded-proto: https`; a client that does not speak TLS is closed, alone.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};

use teeway_agent::metrics as am;
use teeway_gateway::metrics as gm;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use support::{agent_settled, gateway_settled, settle, Stack, LIMIT};

type GrpcBody =
    StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

/// One gRPC message, length-prefixed, uncompressed.
fn message(payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + payload.len());
    b.put_u8(0);
    b.put_u32(u32::try_from(payload.len()).expect("small"));
    b.put_slice(payload);
    b.freeze()
}

/// Splits a body into its messages; `None` if the framing is broken.
fn messages(mut body: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    while !body.is_empty() {
        if body.len() < 5 || body[0] != 0 {
            return None;
        }
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        let rest = body.get(5..5 + len)?;
        out.push(rest.to_vec());
        body = &body[5 + len..];
    }
    Some(out)
}

fn body_of(frames: Vec<Frame<Bytes>>) -> GrpcBody {
    StreamBody::new(futures_util::stream::iter(
        frames.into_iter().map(Ok).collect::<Vec<_>>(),
    ))
}

/// A gRPC server with three methods:
/// - `/echo.Echo/Say` (unary): answers the message it got, upper-cased;
/// - `/echo.Echo/Count` (server-streaming): the request says how many, it sends `n` messages;
/// - `/echo.Echo/Sum` (client-streaming): answers how many messages and bytes it received.
///
/// Every answer ends with trailers: `grpc-status: 0`, `grpc-message`, and `x-served-by`.
async fn start_grpc_primary() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                let path = req.uri().path().to_owned();
                let h2 = req.version() == Version::HTTP_2;
                let grpc = req
                    .headers()
                    .get("content-type")
                    .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
                let te = req.headers().get("te").cloned();
                let body = req.into_body().collect().await.map(|b| b.to_bytes());
                let mut frames = Vec::new();
                let mut trailers = HeaderMap::new();
                let status = match (h2, grpc, te.as_ref().map(|v| v.as_bytes()), body) {
                    (true, true, Some(b"trailers"), Ok(body)) => match messages(&body) {
                        Some(msgs) => {
                            match path.as_str() {
                                "/echo.Echo/Say" => {
                                    let upper = msgs.concat().to_ascii_uppercase();
                                    frames.push(Frame::data(message(&upper)));
                                }
                                "/echo.Echo/Count" => {
                                    let n: usize = String::from_utf8_lossy(&msgs.concat())
                                        .parse()
                                        .unwrap_or(0);
                                    for i in 0..n {
                                        frames.push(Frame::data(message(
                                            format!("item {i}").as_bytes(),
                                        )));
                                    }
                                }
                                "/echo.Echo/Sum" => {
                                    let bytes: usize = msgs.iter().map(Vec::len).sum();
                                    frames.push(Frame::data(message(
                                        format!("{} messages, {bytes} bytes", msgs.len())
                                            .as_bytes(),
                                    )));
                                }
                                _ => {}
                            }
                            // A method this server does not have: UNIMPLEMENTED, as grpc does.
                            if path == "/echo.Echo/Gone" {
                                "12"
                            } else {
                                "0"
                            }
                        }
                        None => "13",
                    },
                    // Not gRPC as a client must speak it (h2, content-type, `te: trailers`).
                    _ => "3",
                };
                trailers.insert("grpc-status", HeaderValue::from_static(status));
                trailers.insert("grpc-message", HeaderValue::from_static("done"));
                trailers.insert("x-served-by", HeaderValue::from_static("primary"));
                frames.push(Frame::trailers(trailers));
                let mut resp = Response::new(body_of(frames));
                resp.headers_mut()
                    .insert("content-type", HeaderValue::from_static("application/grpc"));
                Ok::<_, Infallible>(resp)
            });
            tokio::spawn(async move {
                // Both versions: HTTP/1.1 callers get an answer (and `grpc-status: 3`).
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, task)
}

/// A gRPC client over one h2c connection.
struct GrpcClient {
    sender: hyper::client::conn::http2::SendRequest<GrpcBody>,
}

/// What a call returned.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    messages: Vec<Vec<u8>>,
    trailers: HeaderMap,
}

impl GrpcClient {
    async fn connect(addr: SocketAddr) -> Self {
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .expect("h2 handshake");
        tokio::spawn(conn);
        Self { sender }
    }

    /// Calls `method` with `requests` as separate DATA frames (a client stream when many).
    async fn call(&mut self, method: &str, requests: &[&[u8]]) -> Answer {
        let frames = requests.iter().map(|m| Frame::data(message(m))).collect();
        let req = Request::post(format!("http://api.example.com{method}"))
            .version(Version::HTTP_2)
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(body_of(frames))
            .expect("request");
        let resp = self.sender.send_request(req).await.expect("call");
        let status = resp.status();
        let collected = resp.into_body().collect().await.expect("body");
        let trailers = collected.trailers().cloned().unwrap_or_default();
        let body = collected.to_bytes();
        Answer {
            status,
            messages: messages(&body).expect("gRPC framing"),
            trailers,
        }
    }
}

fn trailer<'a>(answer: &'a Answer, name: &str) -> &'a str {
    answer
        .trailers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("<missing>")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_reach_primary_and_shadow_intact_with_trailers() {
    let (primary, _primary_task) = start_grpc_primary().await;
    let stack = Stack::start_with(100.0, |c| {
        c.primary = Some(teeway::stack::loopback_target(primary));
        // Small enough for one client stream below to go over it.
        c.mirror.policy.max_body_bytes = 64 * 1024;
    })
    .await;
    let mut client = GrpcClient::connect(stack.agent.addr).await;

    // Unary.
    let say = client.call("/echo.Echo/Say", &[b"hello"]).await;
    assert_eq!(say.status, StatusCode::OK);
    assert_eq!(say.messages, vec![b"HELLO".to_vec()]);
    assert_eq!(trailer(&say, "grpc-status"), "0", "{say:?}");
    assert_eq!(trailer(&say, "grpc-message"), "done");
    assert_eq!(trailer(&say, "x-served-by"), "primary");

    // Server-streaming: every message, then the trailers.
    let count = client.call("/echo.Echo/Count", &[b"7"]).await;
    assert_eq!(trailer(&count, "grpc-status"), "0", "{count:?}");
    let expected: Vec<Vec<u8>> = (0..7).map(|i| format!("item {i}").into_bytes()).collect();
    assert_eq!(count.messages, expected);

    // Client-streaming, within the body limit: mirrored once complete.
    let parts: Vec<Vec<u8>> = (0..20).map(|i| vec![b'a' + i as u8; 1000]).collect();
    let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    let sum = client.call("/echo.Echo/Sum", &refs).await;
    assert_eq!(trailer(&sum, "grpc-status"), "0", "{sum:?}");
    assert_eq!(sum.messages, vec![b"20 messages, 20000 bytes".to_vec()]);

    // Client-streaming over max_body_bytes: the primary gets all of it, the copy is dropped and
    // counted.
    let big: Vec<Vec<u8>> = (0..10).map(|_| vec![b'z'; 10_000]).collect();
    let refs: Vec<&[u8]> = big.iter().map(Vec::as_slice).collect();
    let over = client.call("/echo.Echo/Sum", &refs).await;
    assert_eq!(trailer(&over, "grpc-status"), "0", "{over:?}");
    assert_eq!(over.messages, vec![b"10 messages, 100000 bytes".to_vec()]);

    // The shadow saw the three mirrored calls as HTTP/2 gRPC requests, byte for byte.
    assert_eq!(stack.recording.wait_for(3, LIMIT).await, 3);
    let seen = stack.recording.requests();
    let at = |path: &str| {
        seen.iter()
            .find(|r| r.uri.path() == path)
            .unwrap_or_else(|| panic!("{path} not mirrored"))
    };
    let say_copy = at("/echo.Echo/Say");
    assert_eq!(say_copy.version, Version::HTTP_2);
    assert_eq!(say_copy.headers["content-type"], "application/grpc");
    assert_eq!(say_copy.headers["te"], "trailers");
    assert_eq!(say_copy.body, message(b"hello"));
    assert_eq!(at("/echo.Echo/Count").body, message(b"7"));
    let stream: BytesMut = parts.iter().fold(BytesMut::new(), |mut b, p| {
        b.put_slice(&message(p));
        b
    });
    assert_eq!(at("/echo.Echo/Sum").body, stream.freeze());

    // And the accounts add up: four calls, three mirrored, one too large.
    let a = settle(|| stack.agent_metrics(), agent_settled).await;
    assert_eq!(a.get(am::REQUESTS_TOTAL), 4.0);
    assert_eq!(a.get(am::MIRRORED_TOTAL), 3.0);
    assert_eq!(
        a.get(&format!(
            "{}{{reason=\"body_too_large\"}}",
            am::MIRROR_DROPPED_TOTAL
        )),
        1.0
    );
    let g = settle(
        || stack.gateway_metrics(),
        |m| gateway_settled(m, 1.0) && m.get(gm::RECEIVED_TOTAL) == 3.0,
    )
    .await;
    assert_eq!(g.sum(gm::REPLAYED_TOTAL), 3.0, "{g:?}");

    stack.stop().await;
}

/// A shadow answering a method with UNIMPLEMENTED answers HTTP 200: the gateway counts its
/// `grpc-status`, per route and target, so that is not read as success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_replays_are_counted_by_the_shadows_grpc_status() {
    let (primary, _primary_task) = start_grpc_primary().await;
    let (shadow, _shadow_task) = start_grpc_primary().await;
    let stack = Stack::start_configured(
        100.0,
        |g| {
            g.routes[0].targets = vec![teeway_gateway::config::TargetConfig::new(
                teeway::stack::loopback_target(shadow),
            )];
            g.routes[0].protocol = teeway_runtime::config::UpstreamProtocol::Auto;
        },
        |c| c.primary = Some(teeway::stack::loopback_target(primary)),
    )
    .await;
    let mut client = GrpcClient::connect(stack.agent.addr).await;
    let say = client.call("/echo.Echo/Say", &[b"hello"]).await;
    assert_eq!(trailer(&say, "grpc-status"), "0", "{say:?}");
    for _ in 0..3 {
        let gone = client.call("/echo.Echo/Gone", &[b"x"]).await;
        assert_eq!(trailer(&gone, "grpc-status"), "12", "{gone:?}");
    }
    let g = settle(
        || stack.gateway_metrics(),
        |m| gateway_settled(m, 1.0) && m.get(gm::RECEIVED_TOTAL) == 4.0,
    )
    .await;
    let target = format!("http://{shadow}");
    let grpc = |code: &str| {
        g.sum_where(
            gm::REPLAY_GRPC_TOTAL,
            &[("target", target.as_str()), ("grpc_status", code)],
        )
    };
    assert_eq!(grpc("0"), 1.0, "{g:?}");
    assert_eq!(grpc("12"), 3.0, "UNIMPLEMENTED counted as such: {g:?}");
    assert_eq!(
        g.sum_where(gm::REPLAYED_TOTAL, &[("status_class", "2xx")]),
        4.0,
        "HTTP said 200 each time"
    );
    stack.stop().await;
}

/// Reads from `stream` until the end of an HTTP head; the head as text.
async fn read_head(stream: &mut tokio::net::TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert!(head.len() < 16 * 1024, "head too long");
        let n = stream.read(&mut byte).await.expect("read");
        assert_eq!(
            n,
            1,
            "closed inside the head: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// A primary that accepts one WebSocket handshake, answers `101`, then echoes every byte; it
/// hands the request head it received to the test.
async fn start_upgrading_primary() -> (SocketAddr, tokio::sync::oneshot::Receiver<String>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (head_tx, head_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.expect("accept");
        let head = read_head(&mut stream).await;
        let _ = head_tx.send(head);
        stream
            .write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                  Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
            )
            .await
            .expect("write");
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if stream.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
    });
    (addr, head_rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_pass_through_and_are_counted_not_mirrorable() {
    let (primary, head_rx) = start_upgrading_primary().await;
    let stack = Stack::start_with(100.0, |c| {
        c.primary = Some(teeway::stack::loopback_target(primary));
    })
    .await;

    let mut ws = tokio::net::TcpStream::connect(stack.agent.addr)
        .await
        .expect("connect");
    ws.write_all(
        b"GET /chat HTTP/1.1\r\nHost: api.example.com\r\nConnection: Upgrade\r\n\
          Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .expect("write");
    let answer = read_head(&mut ws).await;
    assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
    let lower = answer.to_ascii_lowercase();
    assert!(lower.contains("upgrade: websocket"), "{answer}");
    assert!(
        lower.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{answer}"
    );

    // The primary got the handshake with its upgrade headers.
    let head = tokio::time::timeout(LIMIT, head_rx)
        .await
        .expect("in time")
        .expect("head")
        .to_ascii_lowercase();
    assert!(head.starts_with("get /chat http/1.1"), "{head}");
    assert!(head.contains("connection: upgrade"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(
        head.contains("sec-websocket-key: dghlihnhbxbszsbub25jzq=="),
        "{head}"
    );

    // After the upgrade: bytes both ways, untouched (a masked text frame, then arbitrary bytes).
    for message in [
        &[
            0x81u8, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ][..],
        &(0u8..=255).collect::<Vec<u8>>()[..],
    ] {
        ws.write_all(message).await.expect("write");
        let mut echoed = vec![0u8; message.len()];
        tokio::time::timeout(LIMIT, ws.read_exact(&mut echoed))
            .await
            .expect("in time")
            .expect("echo");
        assert_eq!(echoed, message);
    }
    drop(ws);

    let a = settle(
        || stack.agent_metrics(),
        |m| m.get(am::REQUESTS_TOTAL) == 1.0,
    )
    .await;
    assert_eq!(
        a.get(&format!(
            "{}{{reason=\"not_mirrorable\"}}",
            am::MIRROR_DROPPED_TOTAL
        )),
        1.0,
        "{a:?}"
    );
    assert_eq!(a.get(am::MIRRORED_TOTAL), 0.0);
    assert_eq!(a.get(am::MIRROR_IN_FLIGHT), 0.0);
    assert_eq!(stack.gateway_metrics().get(gm::RECEIVED_TOTAL), 0.0);
    assert_eq!(stack.recording.count(), 0, "nothing reached the shadow");

    stack.stop().await;
}

/// A TLS client connection to `addr` trusting `ca_pem`, offering `alpn`; the protocol agreed.
async fn tls_connect(
    addr: SocketAddr,
    ca_pem: &str,
    alpn: &[u8],
) -> (
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    Vec<u8>,
) {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile_certs(ca_pem) {
        roots.add(cert).expect("CA");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(teeway_wire::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let tls = connector.connect(name, tcp).await.expect("TLS handshake");
    let agreed = tls.get_ref().1.alpn_protocol().unwrap_or_default().to_vec();
    (tls, agreed)
}

fn rustls_pemfile_certs(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .expect("PEM")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_tls_terminates_tls_and_alpn_picks_the_version() {
    teeway_wire::tls::install_default_provider();
    let tmp = tempfile::tempdir().expect("tmp");
    // The ingress certificate comes from a CA of its own, as a public one would.
    let ingress_ca = teeway_wire::pki::CertificateAuthority::generate("ingress-ca").expect("ca");
    let leaf = ingress_ca.gateway(&[]).expect("leaf");
    let (cert, key) = (tmp.path().join("tls.pem"), tmp.path().join("tls.key"));
    std::fs::write(&cert, &leaf.cert_pem).expect("write");
    std::fs::write(&key, &leaf.key_pem).expect("write");

    let (primary, _primary_task) = start_grpc_primary().await;
    let stack = Stack::start_with(100.0, |c| {
        c.primary = Some(teeway::stack::loopback_target(primary));
        c.listen_tls = Some(teeway_agent::config::ListenTls {
            config: std::sync::Arc::new(
                teeway_wire::tls::https_server_config(&cert, &key).expect("server config"),
            ),
            cert,
            key,
        });
    })
    .await;

    // A client that does not speak TLS is closed; nobody else notices.
    let mut plain = tokio::net::TcpStream::connect(stack.agent.addr)
        .await
        .expect("connect");
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    let n = tokio::time::timeout(LIMIT, plain.read_to_end(&mut buf))
        .await
        .expect("closed in time");
    assert!(
        !String::from_utf8_lossy(&buf).contains("HTTP/1.1 200"),
        "plain HTTP got an answer: {n:?}"
    );

    // ALPN h2: a gRPC call, trailers and all.
    let (tls, agreed) = tls_connect(stack.agent.addr, &ingress_ca.certified.cert_pem, b"h2").await;
    assert_eq!(agreed, b"h2");
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let mut grpc = GrpcClient { sender };
    let say = grpc.call("/echo.Echo/Say", &[b"over tls"]).await;
    assert_eq!(say.messages, vec![b"OVER TLS".to_vec()]);
    assert_eq!(trailer(&say, "grpc-status"), "0", "{say:?}");

    // ALPN http/1.1: a plain request.
    let (tls, agreed) = tls_connect(
        stack.agent.addr,
        &ingress_ca.certified.cert_pem,
        b"http/1.1",
    )
    .await;
    assert_eq!(agreed, b"http/1.1");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("h1 handshake");
    tokio::spawn(conn);
    let req = Request::post("/echo.Echo/Say")
        .header("host", "api.example.com")
        .header("content-type", "application/grpc")
        .body(http_body_util::Full::new(message(b"one")))
        .expect("request");
    let resp = sender.send_request(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), Version::HTTP_11);
    resp.into_body().collect().await.expect("body");

    // Both copies reached the shadow, told the client came over HTTPS.
    assert_eq!(stack.recording.wait_for(2, LIMIT).await, 2);
    let seen = stack.recording.requests();
    assert!(
        seen.iter()
            .all(|r| r.headers["x-forwarded-proto"] == "https"),
        "{seen:?}"
    );
    assert!(seen
        .iter()
        .any(|r| r.version == Version::HTTP_2 && r.body == message(b"over tls")));
    assert!(seen.iter().any(|r| r.body == message(b"one")));

    stack.stop().await;
}

/// What a TLS front saw of one client: the SNI name and the ALPN protocol agreed.
#[derive(Debug, Clone, PartialEq)]
struct Hello {
    sni: Option<String>,
    alpn: Vec<u8>,
}

/// A TLS front for the plain service at `inner`, as an HTTPS upstream would be: it terminates TLS
/// with `leaf` (ALPN h2 and http/1.1) and joins the bytes to `inner`. Every handshake it
/// completes is logged.
async fn tls_front(
    inner: SocketAddr,
    leaf: &teeway_wire::pki::CertifiedKey,
    dir: &std::path::Path,
) -> (SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<Hello>>>) {
    let (cert, key) = (dir.join("front.pem"), dir.join("front.key"));
    std::fs::write(&cert, &leaf.cert_pem).expect("write");
    std::fs::write(&key, &leaf.key_pem).expect("write");
    let config = teeway_wire::tls::https_server_config(&cert, &key).expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = log.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, seen) = (acceptor.clone(), seen.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let session = tls.get_ref().1;
                let hello = Hello {
                    sni: session.server_name().map(str::to_owned),
                    alpn: session.alpn_protocol().unwrap_or_default().to_vec(),
                };
                seen.lock().expect("log").push(hello);
                if let Ok(mut plain) = tokio::net::TcpStream::connect(inner).await {
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                }
            });
        }
    });
    (addr, log)
}

/// The trust block of an https upstream, as the config loader builds it.
fn upstream_tls(
    url: &str,
    ca: &std::path::Path,
    server_name: Option<&str>,
) -> (
    teeway_runtime::config::HttpTarget,
    teeway_runtime::config::UpstreamTlsConfig,
) {
    let target = teeway_runtime::config::http_target(&url.into()).expect("url");
    let mut problems = teeway_runtime::config::Problems::default();
    let tls = teeway_runtime::config::upstream_tls_config(
        &mut problems,
        "tls",
        &target,
        Some(ca.to_owned()),
        server_name.map(str::to_owned),
    )
    .expect("trust");
    (target, tls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_primary_and_https_target_are_verified_against_their_ca_bundle() {
    teeway_wire::tls::install_default_provider();
    let tmp = tempfile::tempdir().expect("tmp");
    // The upstreams' certificates come from a CA of their own, named in a bundle file.
    let upstream_ca = teeway_wire::pki::CertificateAuthority::generate("upstream-ca").expect("ca");
    let leaf = upstream_ca
        .gateway(&["shadow.internal".to_owned()])
        .expect("leaf");
    let ca = tmp.path().join("upstream-ca.pem");
    std::fs::write(&ca, &upstream_ca.certified.cert_pem).expect("write");
    let primary_dir = tmp.path().join("primary");
    let shadow_dir = tmp.path().join("shadow");
    std::fs::create_dir_all(&primary_dir).expect("dir");
    std::fs::create_dir_all(&shadow_dir).expect("dir");

    let plain_primary = teeway::sample::start_primary().await.expect("primary");
    let (primary_front, primary_hellos) = tls_front(plain_primary.addr, &leaf, &primary_dir).await;
    let (plain_shadow, recording) = teeway::sample::start_shadow(std::time::Duration::ZERO)
        .await
        .expect("shadow");
    let (shadow_front, shadow_hellos) = tls_front(plain_shadow.addr, &leaf, &shadow_dir).await;

    let stack = Stack::start_configured(
        100.0,
        |g| {
            // The target is reached by IP but verified under another name the certificate carries.
            let (target, tls) = upstream_tls(
                &format!("https://{shadow_front}"),
                &ca,
                Some("shadow.internal"),
            );
            let t = &mut g.routes[0].targets[0];
            t.target = target;
            t.tls = Some(tls);
        },
        |c| {
            let (target, tls) = upstream_tls(&format!("https://{primary_front}"), &ca, None);
            c.primary = Some(target);
            c.primary_tls = Some(tls);
        },
    )
    .await;

    // HTTP/1.1 from the client: HTTP/1.1 over TLS to the primary.
    let mut client = support::KeepAlive::open(stack.agent.addr).await;
    let (status, body) = client
        .exchange(support::post(
            "/orders?id=7",
            Bytes::from_static(b"over https"),
        ))
        .await
        .expect("an answer");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        teeway::sample::primary_answer(&http::Method::POST, "/orders?id=7", b"over https")
            .as_bytes()
    );
    // HTTP/2 from the client (primary_protocol auto): HTTP/2 over TLS to the primary.
    let mut sender = support::h2c(stack.agent.addr).await;
    let req = Request::post("http://api.example.com/h2")
        .body(http_body_util::Full::new(Bytes::from_static(
            b"h2 over https",
        )))
        .expect("request");
    let resp = sender.send_request(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(
        body,
        teeway::sample::primary_answer(&http::Method::POST, "/h2", b"h2 over https").as_bytes()
    );

    // Both copies were replayed over TLS to the shadow, intact.
    assert_eq!(recording.wait_for(2, LIMIT).await, 2);
    let mut bodies: Vec<Bytes> = recording.requests().into_iter().map(|r| r.body).collect();
    bodies.sort();
    assert_eq!(
        bodies,
        vec![
            Bytes::from_static(b"h2 over https"),
            Bytes::from_static(b"over https")
        ]
    );

    // The fronts saw TLS handshakes offering exactly the version each connection spoke, and
    // the name each upstream is verified under (an IP is not sent as SNI).
    let primary_hellos = primary_hellos.lock().expect("log").clone();
    assert!(
        primary_hellos.contains(&Hello {
            sni: None,
            alpn: b"http/1.1".to_vec()
        }),
        "{primary_hellos:?}"
    );
    assert!(
        primary_hellos.contains(&Hello {
            sni: None,
            alpn: b"h2".to_vec()
        }),
        "{primary_hellos:?}"
    );
    let shadow_hellos = shadow_hellos.lock().expect("log").clone();
    assert!(!shadow_hellos.is_empty());
    assert!(
        shadow_hellos
            .iter()
            .all(|h| h.sni.as_deref() == Some("shadow.internal")),
        "{shadow_hellos:?}"
    );

    let books = settle(|| stack.agent_metrics(), agent_settled).await;
    assert_eq!(books.get(am::MIRRORED_TOTAL), 2.0, "{books:?}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_outside_the_ca_bundle_is_refused() {
    teeway_wire::tls::install_default_provider();
    let tmp = tempfile::tempdir().expect("tmp");
    let real_ca = teeway_wire::pki::CertificateAuthority::generate("real-ca").expect("ca");
    let other_ca = teeway_wire::pki::CertificateAuthority::generate("other-ca").expect("ca");
    let leaf = real_ca.gateway(&[]).expect("leaf");
    let other = tmp.path().join("other-ca.pem");
    std::fs::write(&other, &other_ca.certified.cert_pem).expect("write");
    let plain_primary = teeway::sample::start_primary().await.expect("primary");
    let (front, hellos) = tls_front(plain_primary.addr, &leaf, tmp.path()).await;

    let stack = Stack::start_with(100.0, |c| {
        let (target, tls) = upstream_tls(&format!("https://{front}"), &other, Some("localhost"));
        c.primary = Some(target);
        c.primary_tls = Some(tls);
    })
    .await;
    let mut client = support::KeepAlive::open(stack.agent.addr).await;
    let status = client
        .send(support::post("/pay", Bytes::from_static(b"secret")))
        .await
        .expect("an answer from the agent");
    assert_eq!(
        status,
        StatusCode::BAD_GATEWAY,
        "a primary whose certificate is not trusted"
    );
    assert!(
        hellos.lock().expect("log").is_empty(),
        "no handshake completed"
    );
    let a = stack.agent_metrics();
    assert_eq!(a.get(am::PRIMARY_ERRORS_TOTAL), 1.0, "{a:?}");
    stack.stop().await;
}
