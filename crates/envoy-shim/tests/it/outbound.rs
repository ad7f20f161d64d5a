//! Outbound mTLS with secure naming, plaintext destinations, and SDS
//! rotation under an open connection.

use std::time::Duration;

use meshid_envoy_shim::{ConnResult, Direction, Mode, OutboundRoute};
use tokio::net::TcpStream;

use crate::support::*;

#[tokio::test]
async fn shim_to_shim_mtls_names_both_peers() {
    let pki = pki();
    let mut server = Shim::start(&pki, Mode::Strict, |_, _| {}).await;
    server.ready().await;
    let server_id = server.id.clone();
    let dest = server.app.inbound_addr();
    let mut client = Shim::start_as(&pki, "client", None, |c, _| {
        c.outbound = vec![OutboundRoute {
            listen: "127.0.0.1:0".parse().unwrap(),
            dest,
            peer: Some(server_id.clone()),
        }];
    })
    .await;
    client.ready().await;
    let mut app = TcpStream::connect(client.app.outbound_addrs()[0])
        .await
        .unwrap();
    assert_eq!(
        roundtrip(&mut app, b"through two shims").await.unwrap(),
        b"through two shims"
    );
    drop(app);
    let out = client.event().await;
    assert_eq!(
        (out.direction, out.result, out.mode),
        (Direction::Outbound, ConnResult::Ok, "ISTIO_MUTUAL"),
        "{out:?}"
    );
    assert_eq!(out.peer_id, Some(server_id));
    let inb = server.event().await;
    assert_eq!(inb.peer_id, Some(pki.id("default", "client")), "{inb:?}");
}

#[tokio::test]
async fn outbound_refuses_a_server_with_the_wrong_identity() {
    let pki = pki();
    // The server at `dest` is default/server; the route expects default/payments.
    let mut server = Shim::start(&pki, Mode::Strict, |_, _| {}).await;
    server.ready().await;
    let dest = server.app.inbound_addr();
    let expected = pki.id("default", "payments");
    let mut client = Shim::start_as(&pki, "client", None, |c, _| {
        c.outbound = vec![OutboundRoute {
            listen: "127.0.0.1:0".parse().unwrap(),
            dest,
            peer: Some(expected.clone()),
        }];
    })
    .await;
    client.ready().await;
    let mut app = TcpStream::connect(client.app.outbound_addrs()[0])
        .await
        .unwrap();
    assert_refused(&mut app, b"card number").await;
    let ev = client.event().await;
    assert_eq!(ev.result, ConnResult::HandshakeFailed, "{ev:?}");
    assert_eq!(ev.failure, Some("unexpected_peer"), "{ev:?}");
    let reason = ev.reason.unwrap();
    assert!(
        reason.contains("sa/server") && reason.contains("sa/payments"),
        "{reason}"
    );
    // The server saw the client abort the handshake; nothing reached its app.
    let inb = server.event().await;
    assert_ne!(inb.result, ConnResult::Ok, "{inb:?}");
}

#[tokio::test]
async fn plaintext_only_to_destinations_outside_the_mesh() {
    let pki = pki();
    let outside = echo_server().await;
    let mut client = Shim::start_as(&pki, "client", None, |c, _| {
        c.outbound = vec![OutboundRoute {
            listen: "127.0.0.1:0".parse().unwrap(),
            dest: outside,
            peer: None,
        }];
    })
    .await;
    client.ready().await;
    let mut app = TcpStream::connect(client.app.outbound_addrs()[0])
        .await
        .unwrap();
    assert_eq!(roundtrip(&mut app, b"external").await.unwrap(), b"external");
    drop(app);
    let ev = client.event().await;
    assert_eq!(
        (ev.result, ev.tls, ev.mode),
        (ConnResult::Ok, false, "DISABLE"),
        "{ev:?}"
    );

    // A mesh route to a plaintext server fails the handshake instead of
    // falling back to plaintext.
    let mut strict = Shim::start_as(&pki, "client2", None, |c, _| {
        c.outbound = vec![OutboundRoute {
            listen: "127.0.0.1:0".parse().unwrap(),
            dest: outside,
            peer: Some(pki.id("default", "server")),
        }];
    })
    .await;
    strict.ready().await;
    let mut app = TcpStream::connect(strict.app.outbound_addrs()[0])
        .await
        .unwrap();
    assert_refused(&mut app, b"x").await;
    assert_eq!(strict.event().await.result, ConnResult::HandshakeFailed);
}

#[tokio::test]
async fn an_sds_rotation_applies_to_the_next_handshake_and_spares_open_connections() {
    let pki = pki();
    let shim = Shim::start(&pki, Mode::Strict, |_, _| {}).await;
    shim.ready().await;
    let addr = shim.app.inbound_addr();
    let mut before = mtls(addr, creds(&pki, "client"), &shim.id).await.unwrap();
    let first = server_serial(&before);
    assert_eq!(roundtrip(&mut before, b"one").await.unwrap(), b"one");

    let mut rx = shim.app.credentials();
    let new_serial = shim.agent().rotate().await;
    tokio::time::timeout(
        WAIT,
        rx.wait_for(|c| {
            c.as_ref()
                .is_some_and(|c| c.svid.leaf().serial == new_serial)
        }),
    )
    .await
    .unwrap()
    .unwrap();

    let mut after = mtls(addr, creds(&pki, "client"), &shim.id).await.unwrap();
    assert_eq!(server_serial(&after), new_serial);
    assert_ne!(first, new_serial);
    assert_eq!(roundtrip(&mut after, b"two").await.unwrap(), b"two");
    // The connection from before the rotation is untouched.
    assert_eq!(
        roundtrip(&mut before, b"still one").await.unwrap(),
        b"still one"
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
    let (_, certs) = http_get(shim.app.admin_addr(), "/debug/certs").await;
    assert!(certs.contains(&new_serial), "{certs}");
}

#[tokio::test]
async fn outbound_expecting_the_primary_id_accepts_the_alias_domain_server() {
    use std::sync::Arc;
    use std::time::SystemTime;

    use meshid_common::SpiffeId;
    use meshid_common::tls::{ClientAuth, PeerMatcher, server_config};

    let pki = pki();
    // A server of the same workload holding its alias-domain SVID (same root),
    // as a peer not yet moved to the new trust domain.
    let alias_server = SpiffeId::parse("spiffe://old.example/ns/default/sa/server").unwrap();
    let svid = pki
        .svid_at(&alias_server, Duration::from_secs(600), SystemTime::now())
        .unwrap();
    let (_tx, rx) = tokio::sync::watch::channel(Some(pki.credentials(svid)));
    let aliases = vec!["old.example".to_owned()];
    let config = server_config(
        rx,
        PeerMatcher::TrustDomain(TD.into()).with_aliases(&aliases),
        ClientAuth::Required,
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dest = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    let (mut r, mut w) = tokio::io::split(tls);
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }
            });
        }
    });

    let expected = pki.id("default", "server");
    let mut client = Shim::start_as(&pki, "client", None, |c, _| {
        c.trust_domain_aliases = aliases.clone();
        c.outbound = vec![OutboundRoute {
            listen: "127.0.0.1:0".parse().unwrap(),
            dest,
            peer: Some(expected.clone()),
        }];
    })
    .await;
    client.ready().await;
    let mut app = TcpStream::connect(client.app.outbound_addrs()[0])
        .await
        .unwrap();
    assert_eq!(
        roundtrip(&mut app, b"to the alias twin").await.unwrap(),
        b"to the alias twin"
    );
    drop(app);
    let out = client.event().await;
    assert_eq!(out.result, ConnResult::Ok, "{out:?}");
    // The outbound access log names the identity the route asked for.
    assert_eq!(out.peer_id, Some(expected));
}
