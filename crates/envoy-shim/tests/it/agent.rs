//! The shim fed by the real meshid-agent SDS server (the agent signing
//! through an in-test CA built on TestPki): it becomes ready with the
//! agent's identity and picks up the agent's rotations.

use meshid_common::SpiffeId;
use meshid_envoy_shim::{App, Config, ConnResult, Mode};

use crate::support::*;

#[tokio::test]
async fn the_real_agent_sds_server_feeds_the_shim_and_its_rotations_land() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let agent = AgentSds::start(&pki, "default", "web", &dir.path().join("sds.sock")).await;

    let echo = echo_server().await;
    let mut shim_config = Config::local(agent.socket().to_owned(), echo);
    shim_config.default_mode = Mode::Strict;
    let shim = App::build(shim_config).await.unwrap();
    assert!(
        shim.ready(WAIT).await,
        "the shim got nothing from the agent"
    );
    let mut events = shim.access_log();
    let web = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/web").unwrap();
    let first = shim.credentials().borrow().clone().unwrap();
    assert_eq!(first.svid.id(), &web);
    assert_eq!(
        agent
            .credentials()
            .borrow()
            .as_ref()
            .unwrap()
            .svid
            .leaf()
            .serial,
        first.svid.leaf().serial
    );

    let mut tls = mtls(shim.inbound_addr(), creds(&pki, "client"), &web)
        .await
        .unwrap();
    assert_eq!(server_serial(&tls), first.svid.leaf().serial);
    assert_eq!(
        roundtrip(&mut tls, b"agent-fed").await.unwrap(),
        b"agent-fed"
    );

    // The agent renews: the shim takes the new cert for the next handshake.
    let mut rx = shim.credentials();
    let new = agent.rotate().await;
    tokio::time::timeout(
        WAIT,
        rx.wait_for(|c| c.as_ref().is_some_and(|c| c.svid.leaf().serial == new)),
    )
    .await
    .unwrap()
    .unwrap();
    let mut tls2 = mtls(shim.inbound_addr(), creds(&pki, "client"), &web)
        .await
        .unwrap();
    assert_eq!(server_serial(&tls2), new);
    assert_eq!(roundtrip(&mut tls2, b"rotated").await.unwrap(), b"rotated");
    assert_eq!(roundtrip(&mut tls, b"old conn").await.unwrap(), b"old conn");
    drop(tls2);
    let ev = tokio::time::timeout(WAIT, events.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ev.result, ConnResult::Ok, "{ev:?}");
    let (_, certs) = http_get(shim.admin_addr(), "/debug/certs").await;
    assert!(certs.contains(&new), "{certs}");
    agent.shutdown().await;
}
