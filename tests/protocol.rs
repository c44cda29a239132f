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
use teeway_wire::{codes, Frame, Hello, PROTOCOL_VERSION};

use support::settle;

async fn connect(pki: &Pki, gateway: std::net::SocketAddr) -> (Endpoint, Connection) {
    let tls = teeway_wire::tls::client_config(&pki.agent_material()).expect("tls");
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
    let (shadow, _recording) = sample::start_shadow(Duration::ZERO).await.expect("shadow");
    let gateway = RunningGateway::start(stack::gateway_config(
        pki.gateway_material(),
        &[shadow.addr],
    ))
    .await
    .expect("gateway");
    (shadow, gateway)
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
    assert!(conn.close_reason().is_none(), "the connection survived");

    let g = settle(
        || gateway.gateway.metrics(),
        |s| s.get("teeway_gateway_streams_rejected_total{reason=\"protocol\"}") >= 5.0,
    )
    .await;
    assert_eq!(
        g.get("teeway_gateway_streams_rejected_total{reason=\"protocol\"}"),
        5.0,
        "{g:?}"
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
