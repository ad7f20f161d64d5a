//! The shim fed by the real meshid-agent SDS server (the agent signing
//! through an in-test CA built on TestPki): it becomes ready with the
//! agent's identity and picks up the agent's rotations.

use std::collections::HashMap;
use std::sync::Arc;

use meshid_agent::app::Parts;
use meshid_agent::{App as Agent, Clock, Config as AgentConfig};
use meshid_common::SpiffeId;
use meshid_common::identity::fake::TestCa;
use meshid_envoy_shim::{App, Config, ConnResult, Mode};

use crate::support::*;

#[tokio::test]
async fn the_real_agent_sds_server_feeds_the_shim_and_its_rotations_land() {
    let pki = Arc::new(pki());
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).display().to_string();
    std::fs::write(dir.path().join("token"), "test.jwt.token").unwrap();
    let config = AgentConfig::from_args(
        [
            "meshid-agent".to_owned(),
            "--sds-socket".into(),
            p("sds.sock"),
            "--spiffe-endpoint-socket".into(),
            format!("unix://{}", p("api.sock")),
            "--admin-addr".into(),
            "127.0.0.1:0".into(),
            "--token-path".into(),
            p("token"),
            "--ca-root-ca".into(),
            p("ca-root.pem"),
            "--namespace".into(),
            "default".into(),
            "--service-account".into(),
            "web".into(),
        ],
        &HashMap::<String, String>::new(),
    )
    .unwrap();
    let agent = Agent::build_with(
        config,
        Parts {
            source: TestCa::new(pki.clone(), Clock::System),
            clock: Clock::System,
        },
    )
    .await
    .unwrap();

    let echo = echo_server().await;
    let mut shim_config = Config::local(dir.path().join("sds.sock"), echo);
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
    agent.manager().refresh_now();
    let mut rx = shim.credentials();
    let old = first.svid.leaf().serial.clone();
    tokio::time::timeout(
        WAIT,
        rx.wait_for(|c| c.as_ref().is_some_and(|c| c.svid.leaf().serial != old)),
    )
    .await
    .unwrap()
    .unwrap();
    let new = shim
        .credentials()
        .borrow()
        .as_ref()
        .unwrap()
        .svid
        .leaf()
        .serial
        .clone();
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
