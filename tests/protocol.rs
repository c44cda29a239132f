//! The gateway against a misbehaving agent: a raw QUIC client with a valid certificate that sends
//! malformed frames. Each bad stream is reset; the connection and the process keep serving.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use quinn::crypto::rustls::QuicClientConfig;
use quinn::{Connection, Endpoint, ReadError, ReadToEndError, VarInt};

use teeway::sample;
use teeway::stack::{self, Pki, RunningGateway};
use teeway_gateway::metrics as gm;
use teeway_wire::{codes, Envelope, Frame, Hello, Shed, PROTOCOL_VERSION};

use support::settle;

async fn connect(pki: &Pki, gateway: std::net::SocketAddr) -> (Endpoint, Connection) {
    connect_offering(pki, gateway, None).await
}

/// As [`connect`], offering only the ALPN id `alpn` when it is given.
async fn connect_offering(
    pki: &Pki,
    gateway: std::net::SocketAddr,
    alpn: Option<&[u8]>,
) -> (Endpoint, Connection) {
    let mut tls = teeway_wire::tls::client_config(&pki.agent_material()).expect("tls");
    if let Some(alpn) = alpn {
        tls.alpn_protocols = vec![alpn.to_vec()];
    }
    let quic = QuicClientConfig::try_from(tls).expect("quic tls");
    let mut endpoint = Endpoint::client(([127, 0, 0, 1], 0).into()).expect("endpoint");
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    let conn = endpoint
        .connect(gateway, "localhost")
        .expect("connect")
        .await
        .expect("handshake");
    (endpoint, conn)
}

/// A gateway trusting `pki`'s CA, replaying to a recording shadow (kept alive by the caller).
async fn start_gateway(pki: &Pki) -> (sample::Service, RunningGateway) {
    let ((gateway, shadow), _recording) = start_gateway_recording(pki).await;
    (shadow, gateway)
}

/// A copy of a `GET` of `path` to api.example.com, numbered `id`.
fn get_record(id: u64, path: &str) -> teeway_wire::MirroredRequest {
    let mut headers = http::HeaderMap::new();
    headers.insert("host", http::HeaderValue::from_static("api.example.com"));
    teeway_wire::MirroredRequest {
        meta: teeway_wire::Meta::basic(id, std::time::SystemTime::now(), "raw".into()),
        method: http::Method::GET,
        uri: path.parse().expect("uri"),
        version: http::Version::HTTP_11,
        headers,
        body: bytes::Bytes::new(),
        trailers: None,
        body_truncated: false,
        production: None,
    }
}

/// A named batch, encoded: its `BATCH` frame, then one `ENVELOPE` per record.
fn named_batch(
    session: u64,
    seq: u64,
    retry: bool,
    records: impl IntoIterator<Item = teeway_wire::MirroredRequest>,
) -> Vec<u8> {
    let mut buf = BytesMut::new();
    Frame::Batch(teeway_wire::BatchId {
        session,
        seq,
        retry,
    })
    .encode(&mut buf);
    for record in records {
        Frame::Envelope(Envelope::HttpRequest(record)).encode(&mut buf);
    }
    buf.to_vec()
}

/// Sends `bytes` on a new stream and returns the gateway's answer or its reset code.
async fn exchange(conn: &Connection, bytes: &[u8]) -> Result<Vec<u8>, u64> {
    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    // A write may fail if the gateway stops the stream early; the answer says why.
    let _ = send.write_all(bytes).await;
    let _ = send.finish();
    match recv.read_to_end(1 << 20).await {
        Ok(reply) => Ok(reply),
        Err(ReadToEndError::Read(ReadError::Reset(code))) => Err(code.into_inner()),
        Err(e) => panic!("unexpected stream error: {e}"),
    }
}

fn hello() -> Vec<u8> {
    let mut buf = BytesMut::new();
    Frame::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        source_cluster: "raw".into(),
        software: "test".into(),
    })
    .encode(&mut buf);
    buf.to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_streams_are_reset_one_by_one() {
    teeway_wire::tls::install_default_provider();
    let pki = Pki::generate("raw-agent").expect("pki");
    let (_shadow, gateway) = start_gateway(&pki).await;
    let (endpoint, conn) = connect(&pki, gateway.addr).await;

    let protocol_error = u64::from(codes::PROTOCOL_ERROR);
    let bad_streams: [&[u8]; 4] = [
        &[0, 0, 0, 1, 0x7f],             // unknown frame type
        &[0, 0, 0, 9, 0x03, 1, 2, 3],    // stream ends inside a frame
        &[0xff, 0xff, 0xff, 0xff, 0x03], // length beyond the protocol's limit
        &[],                             // empty stream
    ];
    for bytes in bad_streams {
        assert_eq!(
            exchange(&conn, bytes).await,
            Err(protocol_error),
            "input {bytes:?}"
        );
    }
    // HELLO and REQUEST mixed on one stream is out of place.
    let mut mixed = hello();
    mixed.extend(hello());
    assert_eq!(exchange(&conn, &mixed).await, Err(protocol_error));

    // The same connection still works.
    let reply = exchange(&conn, &hello()).await.expect("welcome");
    match Frame::decode(&mut BytesMut::from(&reply[..])) {
        Ok(Some(Frame::Welcome(w))) => assert_eq!(w.agent_identity, "raw-agent"),
        other => panic!("expected WELCOME, got {other:?}"),
    }
    // An agent greets once: a second HELLO on the connection is out of place.
    assert_eq!(exchange(&conn, &hello()).await, Err(protocol_error));
    assert!(conn.close_reason().is_none(), "the connection survived");

    let g = settle(
        || gateway.gateway.metrics(),
        |s| s.get("teeway_gateway_streams_rejected_total{reason=\"protocol\"}") >= 5.0,
    )
    .await;
    assert_eq!(
        g.get("teeway_gateway_streams_rejected_total{reason=\"protocol\"}"),
        5.0,
        "unknown type, cut frame, empty, mixed, second HELLO: {g:?}"
    );
    assert_eq!(
        g.get("teeway_gateway_streams_rejected_total{reason=\"too_large\"}"),
        1.0,
        "a length announced beyond the limit is too_large, not a protocol error"
    );
    assert_eq!(g.get(gm::RECEIVED_TOTAL), 0.0);

    conn.close(VarInt::from_u32(0), b"done");
    endpoint.wait_idle().await;
    gateway.stop().await.expect("gateway stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_without_certificate_is_refused() {
    teeway_wire::tls::install_default_provider();
    let pki = Pki::generate("agent").expect("pki");
    let (_shadow, gateway) = start_gateway(&pki).await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.certified.cert_der()).expect("root");
    let mut tls = rustls::ClientConfig::builder_with_provider(teeway_wire::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![teeway_wire::ALPN.to_vec()];
    let mut endpoint = Endpoint::client(([127, 0, 0, 1], 0).into()).expect("endpoint");
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(tls).expect("quic"),
    )));
    // The client may believe it connected; the refusal shows on the first exchange.
    let refused = match endpoint
        .connect(gateway.addr, "localhost")
        .expect("connect")
        .await
    {
        Err(_) => true,
        Ok(conn) => exchange_fails(&conn).await,
    };
    assert!(
        refused,
        "a client without a certificate must not get through"
    );
    let g = settle(
        || gateway.gateway.metrics(),
        |s| s.get("teeway_gateway_handshakes_total{result=\"refused\"}") >= 1.0,
    )
    .await;
    assert_eq!(
        g.get("teeway_gateway_handshakes_total{result=\"refused\"}"),
        1.0
    );
    gateway.stop().await.expect("gateway stops");
}

async fn exchange_fails(conn: &Connection) -> bool {
    let Ok((mut send, mut recv)) = conn.open_bi().await else {
        return true;
    };
    let _ = send.write_all(&hello()).await;
    let _ = send.finish();
    recv.read_to_end(1024).await.is_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_streams_are_served_in_turn_and_others_keep_going() {
    teeway_wire::tls::install_default_provider();
    let pki = Pki::generate("raw-agent").expect("pki");
    let (_shadow, gateway) = start_gateway(&pki).await;
    let (abuser_endpoint, abuser) = connect(&pki, gateway.addr).await;
    let (endpoint, conn) = connect(&pki, gateway.addr).await;

    // 3,000 streams at once, each a garbage frame: the gateway lets 64 run at a time (the
    // rest wait for stream credit) and resets every one.
    const STREAMS: usize = 3000;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..STREAMS {
        let abuser = abuser.clone();
        tasks.spawn(async move { exchange(&abuser, &[0, 0, 0, 1, 0x7f]).await });
    }
    // Meanwhile another agent is greeted as usual.
    let reply = exchange(&conn, &hello()).await.expect("welcome");
    assert!(matches!(
        Frame::decode(&mut BytesMut::from(&reply[..])),
        Ok(Some(Frame::Welcome(_)))
    ));
    let mut resets = 0;
    while let Some(outcome) = tasks.join_next().await {
        assert_eq!(
            outcome.expect("task"),
            Err(u64::from(codes::PROTOCOL_ERROR))
        );
        resets += 1;
    }
    assert_eq!(resets, STREAMS);
    let key = "teeway_gateway_streams_rejected_total{reason=\"protocol\"}";
    let g = settle(
        || gateway.gateway.metrics(),
        |s| s.get(key) >= STREAMS as f64,
    )
    .await;
    assert_eq!(g.get(key), STREAMS as f64);
    // Both connections still stand, and close cleanly: nothing is left behind.
    assert!(abuser.close_reason().is_none());
    abuser.close(VarInt::from_u32(0), b"done");
    conn.close(VarInt::from_u32(0), b"done");
    abuser_endpoint.wait_idle().await;
    endpoint.wait_idle().await;
    let g = settle(
        || gateway.gateway.metrics(),
        |s| s.get(gm::AGENTS_CONNECTED) == 0.0,
    )
    .await;
    assert_eq!(g.get(gm::AGENTS_CONNECTED), 0.0);
    gateway.stop().await.expect("gateway stops");
}

/// A TLS-over-TCP connection to `gateway` presenting `client` (none when `None`).
async fn tls_tcp(
    pki: &Pki,
    gateway: std::net::SocketAddr,
    client: Option<&teeway_wire::pki::CertifiedKey>,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    tls_tcp_offering(pki, gateway, client, vec![teeway_wire::ALPN.to_vec()]).await
}

/// As [`tls_tcp`], offering the ALPN ids `alpn`.
async fn tls_tcp_offering(
    pki: &Pki,
    gateway: std::net::SocketAddr,
    client: Option<&teeway_wire::pki::CertifiedKey>,
    alpn: Vec<Vec<u8>>,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.certified.cert_der()).expect("root");
    let builder = rustls::ClientConfig::builder_with_provider(teeway_wire::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_root_certificates(roots);
    let mut tls = match client {
        Some(c) => builder
            .with_client_auth_cert(vec![c.cert_der()], c.key_der())
            .expect("client cert"),
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = alpn;
    let tcp = tokio::net::TcpStream::connect(gateway).await?;
    tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect("localhost".try_into().expect("name"), tcp)
        .await
}

/// Writes `bytes` and reads until the gateway closes; what it sent, or the error that ended it.
async fn tcp_exchange(
    stream: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    bytes: &[u8],
) -> Result<Vec<u8>, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(bytes).await.map_err(|e| e.to_string())?;
    stream.flush().await.map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    match tokio::time::timeout(support::LIMIT, stream.read_to_end(&mut out)).await {
        Ok(Ok(_)) => Ok(out),
        Ok(Err(e)) if out.is_empty() => Err(e.to_string()),
        Ok(Err(_)) => Ok(out),
        Err(_) => Err("the gateway kept the connection open".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_certificates_and_bad_frames_over_tls_tcp_close_one_connection() {
    teeway_wire::tls::install_default_provider();
    let pki = Pki::generate("raw-agent").expect("pki");
    let (_shadow, gateway) = start_gateway(&pki).await;
    let refused = "teeway_gateway_handshakes_total{result=\"refused\"}";

    // No certificate, an expired one, one from another CA: each refused, none welcomed.
    let expired = pki.ca.expired_agent("raw-agent").expect("expired");
    let stranger_ca =
        teeway_wire::pki::CertificateAuthority::generate("stranger").expect("stranger ca");
    let stranger = stranger_ca.agent("raw-agent").expect("stranger");
    for (what, cert) in [
        ("no certificate", None),
        ("an expired certificate", Some(&expired)),
        ("a certificate from another CA", Some(&stranger)),
    ] {
        // TLS 1.3: the client may finish before the server judges its certificate.
        let outcome = match tls_tcp(&pki, gateway.addr, cert).await {
            Err(e) => Err(e.to_string()),
            Ok(mut s) => tcp_exchange(&mut s, &hello()).await,
        };
        assert!(
            outcome.is_err() || matches!(&outcome, Ok(b) if b.is_empty()),
            "{what} got through: {outcome:?}"
        );
    }
    let g = settle(|| gateway.gateway.metrics(), |s| s.get(refused) >= 3.0).await;
    assert_eq!(g.get(refused), 3.0, "{g:?}");

    // An authenticated agent sending garbage, or a batch over the limit, loses its connection.
    let good = Some(&pki.agent);
    let mut s = tls_tcp(&pki, gateway.addr, good).await.expect("tls");
    let mut garbage = hello();
    garbage.extend_from_slice(&[0, 0, 0, 1, 0x7f]);
    let reply = tcp_exchange(&mut s, &garbage)
        .await
        .expect("closed cleanly");
    let mut reply = BytesMut::from(&reply[..]);
    assert!(matches!(
        Frame::decode(&mut reply),
        Ok(Some(Frame::Welcome(_)))
    ));
    assert!(reply.is_empty(), "nothing but WELCOME before the close");

    // A client with a good certificate that agreed on no teeway version (no ALPN) is not an
    // agent of any version: closed without a WELCOME.
    let mut s = tls_tcp_offering(&pki, gateway.addr, good, Vec::new())
        .await
        .expect("tls");
    let reply = tcp_exchange(&mut s, &hello()).await.unwrap_or_default();
    assert!(reply.is_empty(), "no WELCOME without ALPN: {reply:?}");

    let mut s = tls_tcp(&pki, gateway.addr, good).await.expect("tls");
    let request = teeway_wire::MirroredRequest {
        meta: teeway_wire::Meta::basic(1, std::time::SystemTime::now(), "raw".into()),
        method: http::Method::POST,
        uri: "/big".parse().expect("uri"),
        version: http::Version::HTTP_11,
        headers: http::HeaderMap::new(),
        body: bytes::Bytes::from(vec![b'x'; 4 * 1024 * 1024]),
        trailers: None,
        body_truncated: false,
        production: None,
    };
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(&hello()).await.expect("hello");
        let mut got = BytesMut::new();
        while got.is_empty() || matches!(Frame::decode(&mut got.clone()), Ok(None)) {
            assert!(
                s.read_buf(&mut got).await.expect("read") > 0,
                "closed early"
            );
        }
        assert!(matches!(
            Frame::decode(&mut got),
            Ok(Some(Frame::Welcome(_)))
        ));
    }
    let mut big = BytesMut::new();
    for _ in 0..6 {
        Frame::Envelope(Envelope::HttpRequest(request.clone())).encode(&mut big);
    }
    // The gateway closes mid-write: the write fails or the read ends; either way, no ACK.
    let reply = tcp_exchange(&mut s, &big).await.unwrap_or_default();
    let reply = BytesMut::from(&reply[..]);
    assert!(reply.is_empty(), "no ACK for an oversized batch: {reply:?}");

    // All counted (the garbage and the client without ALPN as protocol errors); nothing
    // received; a well-behaved agent is still welcomed and acknowledged.
    let g = settle(
        || gateway.gateway.metrics(),
        |s| s.get("teeway_gateway_streams_rejected_total{reason=\"too_large\"}") >= 1.0,
    )
    .await;
    assert_eq!(
        g.get("teeway_gateway_streams_rejected_total{reason=\"protocol\"}"),
        2.0
    );
    assert_eq!(
        g.get("teeway_gateway_streams_rejected_total{reason=\"too_large\"}"),
        1.0
    );
    assert_eq!(g.get(gm::RECEIVED_TOTAL), 0.0);
    let mut s = tls_tcp(&pki, gateway.addr, good).await.expect("tls");
    let mut batch = hello();
    let mut small = request.clone();
    small.body = bytes::Bytes::from_static(b"ok");
    let mut frames = BytesMut::new();
    Frame::Envelope(Envelope::HttpRequest(small)).encode(&mut frames);
    Frame::End.encode(&mut frames);
    batch.extend_from_slice(&frames);
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(&batch).await.expect("write");
        let mut got = BytesMut::new();
        let mut frames_seen = Vec::new();
        while frames_seen.len() < 2 {
            assert!(
                s.read_buf(&mut got).await.expect("read") > 0,
                "closed early"
            );
            while let Some(f) = Frame::decode(&mut got).expect("frame") {
                frames_seen.push(f);
            }
        }
        assert!(matches!(frames_seen[0], Frame::Welcome(_)));
        assert_eq!(
            frames_seen[1],
            Frame::Ack {
                accepted: 1,
                shed: Shed::default()
            }
        );
    }
    gateway.stop().await.expect("gateway stops");
}

/// Protocol 3: a batch sent again (its ACK lost or late) is acknowledged and not replayed twice;
/// a batch marked as sent before that the gateway never saw is replayed and counted as retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_batch_is_replayed_once_however_often_it_is_sent() {
    teeway_wire::tls::install_default_provider();
    let pki = Pki::generate("raw-agent").expect("pki");
    let ((gateway, _shadow), recording) = start_gateway_recording(&pki).await;
    let (endpoint, conn) = connect(&pki, gateway.addr).await;
    assert_eq!(
        conn.handshake_data()
            .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|d| d.protocol),
        Some(teeway_wire::ALPN.to_vec()),
        "the newest protocol negotiated"
    );
    exchange(&conn, &hello()).await.expect("welcome");
    let batch = |seq: u64, retry: bool, id: u64| {
        named_batch(42, seq, retry, [get_record(id, &format!("/batch/{seq}"))])
    };
    let ack = |reply: Vec<u8>| match Frame::decode(&mut BytesMut::from(&reply[..])) {
        Ok(Some(Frame::Ack { accepted, .. })) => accepted,
        other => panic!("expected ACK, got {other:?}"),
    };
    assert_eq!(
        ack(exchange(&conn, &batch(1, false, 1)).await.expect("ack")),
        1
    );
    // Its ACK was lost: the agent sends it again; acknowledged, not replayed.
    assert_eq!(
        ack(exchange(&conn, &batch(1, true, 1)).await.expect("ack")),
        1
    );
    assert_eq!(
        ack(exchange(&conn, &batch(1, true, 1)).await.expect("ack")),
        1
    );
    // Sent before, but its first copy never arrived: replayed, counted as retried.
    assert_eq!(
        ack(exchange(&conn, &batch(2, true, 2)).await.expect("ack")),
        1
    );
    let g = settle(
        || gateway.gateway.metrics(),
        |s| s.get(gm::RECEIVED_TOTAL) >= 2.0 && support::gateway_settled(s, 1.0),
    )
    .await;
    assert_eq!(g.get(gm::RECEIVED_TOTAL), 2.0, "{g:?}");
    assert_eq!(g.get(gm::DUPLICATES_TOTAL), 2.0);
    assert_eq!(g.get(gm::RETRIED_TOTAL), 1.0);
    assert_eq!(recording.wait_for(2, support::LIMIT).await, 2);
    let paths: Vec<String> = recording
        .requests()
        .iter()
        .map(|r| r.uri.path().to_owned())
        .collect();
    assert_eq!(paths.len(), 2, "replayed once each: {paths:?}");
    conn.close(VarInt::from_u32(0), b"done");
    endpoint.wait_idle().await;
    gateway.stop().await.expect("gateway stops");
}

/// Batches travel on streams of their own and can arrive whole out of order: the gateway
/// dispatches those that carry RPC copies in the order their streams were opened, so that one
/// RPC client's requests are replayed in its order; HTTP batches go as they come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_batches_are_dispatched_in_the_order_their_streams_were_opened() {
    teeway_wire::tls::install_default_provider();
    let pki = Pki::generate("raw-agent").expect("pki");
    let ((gateway, _shadow), recording) = start_gateway_recording(&pki).await;
    let (endpoint, conn) = connect(&pki, gateway.addr).await;
    exchange(&conn, &hello()).await.expect("welcome");
    let rpc_batch = |seq: u64| {
        let mut buf = BytesMut::new();
        Frame::Batch(teeway_wire::BatchId {
            session: 7,
            seq,
            retry: false,
        })
        .encode(&mut buf);
        let call = teeway_wire::RpcCall {
            protocol: teeway_wire::RpcProtocol::Redis,
            variant: 0,
            service: String::new(),
            method: "SET".into(),
            attachments: vec![],
        };
        let meta = teeway_wire::Meta::basic(seq, std::time::SystemTime::now(), "raw".into());
        buf.extend_from_slice(&Frame::rpc_request(
            &meta,
            1,
            &call,
            b"*1\r\n$4\r\nPING\r\n",
        ));
        buf.to_vec()
    };
    // The first batch's stream is opened and its bytes sent but for the last one; a second
    // batch is sent whole after it.
    let first = rpc_batch(1);
    let (mut send1, mut recv1) = conn.open_bi().await.expect("stream");
    send1
        .write_all(&first[..first.len() - 1])
        .await
        .expect("write");
    let second = rpc_batch(2);
    let (mut send2, mut recv2) = conn.open_bi().await.expect("stream");
    send2.write_all(&second).await.expect("write");
    send2.finish().expect("finish");
    // The second is whole but waits its turn: no ACK comes.
    let early = tokio::time::timeout(Duration::from_millis(300), recv2.read_to_end(1024)).await;
    assert!(
        early.is_err(),
        "the second batch was answered before the first: {early:?}"
    );
    // An HTTP batch does not wait.
    let http = named_batch(7, 3, false, [get_record(3, "/http")]);
    exchange(&conn, &http)
        .await
        .expect("an HTTP batch is answered at once");
    assert_eq!(recording.wait_for(1, support::LIMIT).await, 1);
    send1
        .write_all(&first[first.len() - 1..])
        .await
        .expect("write");
    send1.finish().expect("finish");
    recv1.read_to_end(1024).await.expect("first ack");
    recv2.read_to_end(1024).await.expect("second ack");
    conn.close(VarInt::from_u32(0), b"done");
    endpoint.wait_idle().await;
    gateway.stop().await.expect("gateway stops");
}

/// A gateway replaying to a recording shadow.
async fn start_gateway_recording(
    pki: &Pki,
) -> ((RunningGateway, sample::Service), sample::Recording) {
    let (shadow, recording) = sample::start_shadow(Duration::ZERO).await.expect("shadow");
    let gateway = RunningGateway::start(stack::gateway_config(
        pki.gateway_material(),
        &[shadow.addr],
    ))
    .await
    .expect("gateway");
    ((gateway, shadow), recording)
}

/// Protocol 6: the `ACK` marks the records no target could take, so that the agent makes
/// fewer of them; an agent of protocol 5 gets the `ACK` it knows, without the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ack_names_the_records_shed_from_version_6_on() {
    teeway_wire::tls::install_default_provider();
    let pki = Pki::generate("raw-agent").expect("pki");
    // A shadow that accepts and never answers: its one slot stays taken.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let silent = listener.local_addr().expect("addr");
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let mut config = stack::gateway_config(pki.gateway_material(), &[silent]);
    config.routes[0].targets[0].max_concurrency = 1;
    config.routes[0].targets[0].timeout = Duration::from_secs(2);
    let gateway = RunningGateway::start(config).await.expect("gateway");
    const RECORDS: usize = 40;
    let batch = |session: u64| {
        let records = (0..RECORDS as u64).map(|id| get_record(id, &format!("/shed/{id}")));
        named_batch(session, 1, false, records)
    };

    let (endpoint, conn) = connect_offering(&pki, gateway.addr, Some(teeway_wire::ALPN)).await;
    exchange(&conn, &hello()).await.expect("welcome");
    let reply = exchange(&conn, &batch(1)).await.expect("ack");
    let Ok(Some(Frame::Ack { accepted, shed })) = Frame::decode(&mut BytesMut::from(&reply[..]))
    else {
        panic!("expected ACK, got {reply:?}");
    };
    assert_eq!(accepted, RECORDS as u32);
    // The first record took the slot and a few wait briefly for it (the target has shed
    // nothing yet, so they are not marked); the rest were refused and are marked, in order.
    let first_shed = (0..RECORDS).find(|i| shed.contains(*i));
    assert!(
        matches!(first_shed, Some(i) if i > 0),
        "the first record took the slot, later ones were shed: {shed:?}"
    );
    let first_shed = first_shed.unwrap_or(RECORDS);
    assert!(
        (first_shed..RECORDS).all(|i| shed.contains(i)) && !shed.contains(RECORDS),
        "{shed:?}"
    );
    // The target is shedding now: the next batch, while the slot and the places to wait for it
    // are still taken, is marked whole. (A record that waits while the target sheds is marked
    // too: gateway/src/replay.rs's unit tests hold `shedding`.)
    let reply = exchange(&conn, &batch(3)).await.expect("ack");
    let Ok(Some(Frame::Ack { accepted, shed })) = Frame::decode(&mut BytesMut::from(&reply[..]))
    else {
        panic!("expected ACK, got {reply:?}");
    };
    assert_eq!(
        (accepted, shed.len()),
        (RECORDS as u32, RECORDS as u32),
        "{shed:?}"
    );
    conn.close(VarInt::from_u32(0), b"done");
    endpoint.wait_idle().await;

    // Version 5: the slot is still taken and records are shed, but the ACK is the one version 5
    // knows, byte for byte.
    let (endpoint, conn) = connect_offering(&pki, gateway.addr, Some(teeway_wire::ALPN_V5)).await;
    exchange(&conn, &hello()).await.expect("welcome");
    let reply = exchange(&conn, &batch(2)).await.expect("ack");
    assert_eq!(reply, [0, 0, 0, 5, 0x04, 0, 0, 0, RECORDS as u8]);
    conn.close(VarInt::from_u32(0), b"done");
    endpoint.wait_idle().await;
    gateway.stop().await.expect("gateway stops");
    holder.abort();
}

/// A batch's records are what its connection's version says: `REQUEST` frames up to version 4,
/// `ENVELOPE` frames from version 5; the other is out of place. An envelope of a kind the gateway
/// does not know is accepted, counted as having no route and archived unchanged, and the
/// identity a record claims is replaced by its certificate's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_follow_the_connections_version_and_unknown_kinds_are_kept() {
    teeway_wire::tls::install_default_provider();
    let pki = Pki::generate("raw-agent").expect("pki");
    let (shadow, recording) = sample::start_shadow(Duration::ZERO).await.expect("shadow");
    let archive_dir = tempfile::tempdir().expect("tempdir");
    let mut config = stack::gateway_config(pki.gateway_material(), &[shadow.addr]);
    config.archive = Some(teeway_archive::ArchiveConfig::new(
        archive_dir.path(),
        teeway_archive::Format::Teeway,
    ));
    let gateway = RunningGateway::start(config).await.expect("gateway");
    let record = |path: &str| {
        let mut record = get_record(1, path);
        record.meta.source_identity = "someone-else".into();
        record.meta.tap = "http".into();
        record
    };
    let frames = |frame: Frame| {
        let mut buf = BytesMut::new();
        frame.encode(&mut buf);
        buf.to_vec()
    };
    let ack = |reply: Result<Vec<u8>, u64>| match reply {
        Ok(reply) => match Frame::decode(&mut BytesMut::from(&reply[..])) {
            Ok(Some(Frame::Ack { accepted, .. })) => Ok(accepted),
            other => panic!("expected ACK, got {other:?}"),
        },
        Err(code) => Err(code),
    };
    let protocol_error = Err(u64::from(codes::PROTOCOL_ERROR));

    // Version 5.
    let (endpoint, conn) = connect(&pki, gateway.addr).await;
    exchange(&conn, &hello()).await.expect("welcome");
    let request = Frame::Request(record("/v4-frame-on-v5"));
    assert_eq!(ack(exchange(&conn, &frames(request)).await), protocol_error);
    let envelope = Frame::Envelope(Envelope::HttpRequest(record("/v5")));
    assert_eq!(ack(exchange(&conn, &frames(envelope)).await), Ok(1));
    // A newer agent's record: a kind and a metadata field this gateway does not know.
    let mut later_meta = teeway_wire::Meta::basic(2, std::time::SystemTime::now(), "raw".into());
    later_meta.extra = bytes::Bytes::from_static(b"\x00\x07a later field");
    let future = Envelope::Other {
        meta: later_meta,
        kind: 200,
        part: bytes::Bytes::from_static(b"a kind from a newer agent"),
    };
    assert_eq!(
        ack(exchange(&conn, &frames(Frame::Envelope(future.clone()))).await),
        Ok(1)
    );
    conn.close(VarInt::from_u32(0), b"done");
    endpoint.wait_idle().await;

    // Version 4: an agent of this version talking to it sends `REQUEST`s.
    let mut tls = teeway_wire::tls::client_config(&pki.agent_material()).expect("tls");
    tls.alpn_protocols = vec![teeway_wire::ALPN_V4.to_vec()];
    let mut endpoint = Endpoint::client(([127, 0, 0, 1], 0).into()).expect("endpoint");
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(tls).expect("quic"),
    )));
    let conn = endpoint
        .connect(gateway.addr, "localhost")
        .expect("connect")
        .await
        .expect("handshake");
    exchange(&conn, &hello()).await.expect("welcome");
    let envelope = Frame::Envelope(Envelope::HttpRequest(record("/v5-frame-on-v4")));
    assert_eq!(
        ack(exchange(&conn, &frames(envelope)).await),
        protocol_error
    );
    let request = Frame::Request(record("/v4"));
    assert_eq!(ack(exchange(&conn, &frames(request)).await), Ok(1));
    conn.close(VarInt::from_u32(0), b"done");
    endpoint.wait_idle().await;

    assert_eq!(recording.wait_for(2, support::LIMIT).await, 2);
    let mut paths: Vec<String> = recording
        .requests()
        .iter()
        .map(|r| r.uri.path().to_owned())
        .collect();
    paths.sort();
    assert_eq!(paths, ["/v4", "/v5"]);
    let g = settle(
        || gateway.gateway.metrics(),
        |s| s.get(gm::RECEIVED_TOTAL) >= 3.0 && support::gateway_settled(s, 2.0),
    )
    .await;
    assert_eq!(g.get(gm::RECEIVED_TOTAL), 3.0, "{g:?}");
    assert_eq!(
        g.get("teeway_gateway_replay_failed_total{route=\"\",target=\"\",reason=\"no_route\"}"),
        1.0,
        "the unknown kind has no route"
    );
    assert_eq!(
        g.get("teeway_gateway_streams_rejected_total{reason=\"protocol\"}"),
        2.0
    );
    gateway
        .stop()
        .await
        .expect("gateway stops, closing the archive");

    let archived: Vec<Envelope> = teeway_archive::Reader::open(&[archive_dir.path().to_owned()])
        .expect("archive")
        .collect();
    assert_eq!(archived.len(), 3, "{archived:?}");
    assert!(
        archived
            .iter()
            .all(|r| &*r.meta().source_identity == "raw-agent"),
        "the certificate's identity, not the claimed one: {archived:?}"
    );
    let kept = archived
        .iter()
        .find(|r| matches!(r, Envelope::Other { .. }))
        .expect("the unknown kind is archived");
    let Envelope::Other { kind, part, meta } = kept else {
        unreachable!()
    };
    assert_eq!((*kind, &part[..]), (200, &b"a kind from a newer agent"[..]));
    assert_eq!(
        &meta.extra[..],
        b"\x00\x07a later field",
        "metadata it does not know is kept"
    );
    let v5 = archived
        .iter()
        .find_map(|r| match r {
            Envelope::HttpRequest(r) if r.uri.path() == "/v5" => Some(r),
            _ => None,
        })
        .expect("the v5 request is archived");
    assert_eq!(&*v5.meta.tap, "http", "the envelope's metadata is kept");
}

/// A gateway of protocol 4, written from docs/protocol.md: QUIC with ALPN `teeway/4` only,
/// `WELCOME` of version 4, and batches of `BATCH` then `REQUEST` frames, each acknowledged in
/// full. Every record it takes is kept; anything else in a batch is noted.
async fn old_gateway(
    pki: &Pki,
) -> (
    std::net::SocketAddr,
    Arc<std::sync::Mutex<Vec<Frame>>>,
    tokio::task::JoinHandle<()>,
) {
    let mut tls = teeway_wire::tls::server_config(&pki.gateway_material()).expect("tls");
    tls.alpn_protocols = vec![teeway_wire::ALPN_V4.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls).expect("quic");
    let endpoint = Endpoint::server(
        quinn::ServerConfig::with_crypto(Arc::new(quic)),
        ([127, 0, 0, 1], 0).into(),
    )
    .expect("endpoint");
    let addr = endpoint.local_addr().expect("addr");
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let task = tokio::spawn({
        let seen = seen.clone();
        async move {
            while let Some(incoming) = endpoint.accept().await {
                let Ok(conn) = incoming.await else { continue };
                let seen = seen.clone();
                tokio::spawn(async move {
                    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                        let Ok(bytes) = recv.read_to_end(4 << 20).await else {
                            continue;
                        };
                        let mut buf = BytesMut::from(&bytes[..]);
                        let mut frames = Vec::new();
                        while let Ok(Some(frame)) = Frame::decode(&mut buf) {
                            frames.push(frame);
                        }
                        let reply = match frames.first() {
                            Some(Frame::Hello(_)) => Frame::Welcome(teeway_wire::Welcome {
                                protocol_version: 4,
                                agent_identity: "agent".into(),
                                software: "an old gateway".into(),
                                gateway_instance: 1,
                            }),
                            _ => {
                                let records = frames
                                    .iter()
                                    .filter(|f| matches!(f, Frame::Request(_)))
                                    .count();
                                seen.lock().expect("lock").extend(frames);
                                Frame::Ack {
                                    accepted: records as u32,
                                    shed: Shed::default(),
                                }
                            }
                        };
                        let mut out = BytesMut::new();
                        reply.encode(&mut out);
                        let _ = send.write_all(&out).await;
                        let _ = send.finish();
                        let _ = send.stopped().await;
                    }
                });
            }
        }
    });
    (addr, seen, task)
}

/// An agent of this version against a gateway of protocol 4 (gateways first is the rule, but a
/// rollout can go the other way): it agrees on version 4 and sends its copies as `REQUEST`
/// frames, each one acknowledged and counted as mirrored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_mirrors_to_a_gateway_of_protocol_4_with_request_frames() {
    teeway_wire::tls::install_default_provider();
    let pki = Pki::generate("agent").expect("pki");
    let (gateway, seen, task) = old_gateway(&pki).await;
    let primary = sample::start_primary().await.expect("primary");
    let agent = teeway::stack::RunningAgent::start(stack::agent_config(
        pki.agent_material(),
        primary.addr,
        gateway,
        100.0,
    ))
    .await
    .expect("agent");
    assert!(
        agent.wait_connected(support::LIMIT).await,
        "welcomed as version 4"
    );
    let client = twenty_gets(agent.addr).await;
    assert_eq!(client, 20, "production answered every request");
    let a = settle(
        || agent.agent.metrics(),
        |s| s.get(teeway_agent::metrics::MIRRORED_TOTAL) >= 20.0,
    )
    .await;
    assert_eq!(a.get(teeway_agent::metrics::MIRRORED_TOTAL), 20.0, "{a:?}");
    let frames = seen.lock().expect("lock").clone();
    let paths: Vec<String> = frames
        .iter()
        .filter_map(|f| match f {
            Frame::Request(r) => Some(r.uri.path().to_owned()),
            _ => None,
        })
        .collect();
    assert_eq!(paths.len(), 20, "every copy as a REQUEST frame");
    assert!(paths.iter().all(|p| p.starts_with("/old-gateway/")));
    assert!(
        frames
            .iter()
            .all(|f| matches!(f, Frame::Request(_) | Frame::Batch(_))),
        "nothing a gateway of version 4 cannot read"
    );
    agent.stop().await.expect("agent stops");
    task.abort();
}

/// Sends 20 GETs through the agent, each on a connection of its own; returns how many were
/// answered 200.
async fn twenty_gets(addr: std::net::SocketAddr) -> usize {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut ok = 0;
    for i in 0..20 {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let req = format!(
            "GET /old-gateway/{i} HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.expect("write");
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).await.expect("read");
        if resp.starts_with(b"HTTP/1.1 200") {
            ok += 1;
        }
    }
    ok
}
