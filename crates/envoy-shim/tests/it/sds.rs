//! The SDS client: against the scripted peer for Envoy's request shape,
//! ACK / NACK, keeping the previous secret and reconnecting; against the
//! real agent for a late start and the admin API.

use std::time::Duration;

use meshid_common::proto::tls::{Secret, TlsCertificate, secret};
use meshid_common::sds::{tls_certificate, validation_context};
use meshid_common::testing::envoy::http_request;
use meshid_envoy_shim::{App, Config, Mode};
use tokio::io::AsyncWriteExt;

use crate::support::*;

#[tokio::test]
async fn requests_look_like_envoys_and_every_response_is_acked() {
    let pki = pki();
    let shim = Shim::start_scripted(&pki, Mode::Strict, |c, _| {
        c.node_id = "sidecar~10.0.0.7~web-1.shop~shop.svc.cluster.local".into();
        c.node_cluster = "web.shop".into();
    })
    .await;
    shim.ready().await;
    for name in ["default", "ROOTCA"] {
        let version = shim.scripted().version(name).unwrap();
        let ack = shim
            .scripted()
            .wait_for_request(WAIT, |r| {
                r.resource_names == [name]
                    && r.version_info == version
                    && !r.response_nonce.is_empty()
            })
            .await
            .unwrap_or_else(|| panic!("no ACK for {name}: {:#?}", shim.scripted().requests()));
        assert!(ack.error.is_none());
        let reqs: Vec<_> = shim
            .scripted()
            .requests()
            .into_iter()
            .filter(|r| r.resource_names == [name])
            .collect();
        // The first request of the stream names the node; later ones do not.
        assert_eq!(
            reqs[0].node_id.as_deref(),
            Some("sidecar~10.0.0.7~web-1.shop~shop.svc.cluster.local")
        );
        assert_eq!(reqs[0].node_cluster.as_deref(), Some("web.shop"));
        assert!(reqs[0].response_nonce.is_empty());
        assert!(reqs[1..].iter().all(|r| r.node_id.is_none()), "{reqs:#?}");
    }
    // One stream per secret.
    assert_eq!(shim.scripted().streams_opened(), 2);
}

#[tokio::test]
async fn an_unusable_secret_is_nacked_and_the_previous_one_stays() {
    let pki = pki();
    let shim = Shim::start_scripted(&pki, Mode::Strict, |_, _| {}).await;
    shim.ready().await;
    let good_serial = shim
        .app
        .credentials()
        .borrow()
        .as_ref()
        .unwrap()
        .svid
        .leaf()
        .serial
        .clone();
    let good_version = shim.scripted().version("default").unwrap();

    let svid = pki.svid("default", "server").unwrap();
    let other = pki.svid("default", "server").unwrap();
    let mismatched = {
        let mut s = tls_certificate("default", &svid);
        if let Some(secret::Type::TlsCertificate(t)) = &mut s.r#type {
            t.private_key = tls_cert(&other).private_key;
        }
        s
    };
    let bad_pem = Secret {
        name: "default".into(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: Some(meshid_common::proto::envoy_core::DataSource {
                specifier: Some(
                    meshid_common::proto::envoy_core::data_source::Specifier::InlineBytes(
                        b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n"
                            .to_vec(),
                    ),
                ),
            }),
            private_key: tls_cert(&svid).private_key,
        })),
    };
    let wrong_type = validation_context("default", &pki.bundle());
    for (i, (bad, expect)) in [
        (mismatched, "does not match"),
        (bad_pem, "certificate_chain"),
        (wrong_type, "validation_context"),
    ]
    .into_iter()
    .enumerate()
    {
        shim.scripted().set_secret(bad);
        let deadline = std::time::Instant::now() + WAIT;
        let nack = loop {
            let nacks: Vec<_> = shim
                .scripted()
                .requests()
                .into_iter()
                .filter(|r| r.resource_names == ["default"] && r.error.is_some())
                .collect();
            if nacks.len() > i {
                break nacks[i].clone();
            }
            assert!(std::time::Instant::now() < deadline, "no NACK for case {i}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        // A NACK carries the last accepted version and the rejected nonce.
        assert_eq!(nack.version_info, good_version);
        assert!(!nack.response_nonce.is_empty());
        let msg = nack.error.unwrap();
        assert!(msg.contains(expect), "{msg}");
        assert!(!msg.contains("PRIVATE KEY"), "{msg}");
        // Still the old certificate, still serving.
        assert_eq!(
            shim.app
                .credentials()
                .borrow()
                .as_ref()
                .unwrap()
                .svid
                .leaf()
                .serial,
            good_serial
        );
        let mut tls = mtls(shim.app.inbound_addr(), creds(&pki, "client"), &shim.id)
            .await
            .unwrap();
        assert_eq!(server_serial(&tls), good_serial);
        assert_eq!(roundtrip(&mut tls, b"ok").await.unwrap(), b"ok");
    }
    let (_, certs) = http_get(shim.app.admin_addr(), "/debug/certs").await;
    assert!(certs.contains("\"nacks\":3"), "{certs}");
    let (_, metrics) = http_get(shim.app.admin_addr(), "/metrics").await;
    assert!(
        metrics.contains(
            "meshid_shim_sds_responses_total{resource_name=\"default\",result=\"nack\"} 3"
        ),
        "{metrics}"
    );

    // A good version after the bad ones is taken.
    let fresh = pki.svid("default", "server").unwrap();
    let fresh_serial = fresh.leaf().serial.clone();
    shim.scripted()
        .set_secret(tls_certificate("default", &fresh));
    let mut rx = shim.app.credentials();
    tokio::time::timeout(
        WAIT,
        rx.wait_for(|c| c.as_ref().unwrap().svid.leaf().serial == fresh_serial),
    )
    .await
    .unwrap()
    .unwrap();
}

fn tls_cert(svid: &meshid_common::Svid) -> TlsCertificate {
    match tls_certificate("default", svid).r#type {
        Some(secret::Type::TlsCertificate(t)) => t,
        _ => unreachable!(),
    }
}

#[tokio::test]
async fn a_dropped_stream_is_reopened_and_new_versions_still_land() {
    let pki = pki();
    let shim = Shim::start_scripted(&pki, Mode::Strict, |_, _| {}).await;
    shim.ready().await;
    assert_eq!(shim.scripted().streams_opened(), 2);
    shim.scripted().kick();
    let deadline = std::time::Instant::now() + WAIT;
    while shim.scripted().streams_opened() < 4 {
        assert!(std::time::Instant::now() < deadline, "streams not reopened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Still ready throughout: the secrets in use are kept.
    assert_eq!(http_get(shim.app.admin_addr(), "/ready").await.0, 200);
    let rotated = pki.svid("default", "server").unwrap();
    let serial = rotated.leaf().serial.clone();
    shim.scripted().set_credentials(&pki.credentials(rotated));
    let mut rx = shim.app.credentials();
    tokio::time::timeout(
        WAIT,
        rx.wait_for(|c| c.as_ref().unwrap().svid.leaf().serial == serial),
    )
    .await
    .unwrap()
    .unwrap();
}

#[tokio::test]
async fn the_shim_waits_for_an_sds_server_that_starts_late() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("late.sock");
    let mut config = Config::local(sock.clone(), echo_server().await);
    config.sds_backoff_min = Duration::from_millis(20);
    config.sds_backoff_max = Duration::from_millis(100);
    let app = App::build(config).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (code, body) = http_get(app.admin_addr(), "/ready").await;
    assert_eq!(code, 503);
    assert!(
        body.contains("default") && body.contains("ROOTCA"),
        "{body}"
    );
    let agent = AgentSds::start(&pki, "default", "late", &sock).await;
    assert!(app.ready(WAIT).await);
    agent.shutdown().await;
}

#[tokio::test]
async fn admin_shows_certs_metrics_and_sets_the_policy() {
    let pki = pki();
    let shim = Shim::start(&pki, Mode::Permissive, |_, _| {}).await;
    shim.ready().await;
    let admin = shim.app.admin_addr();
    assert!(admin.ip().is_loopback());
    let creds = shim.app.credentials().borrow().clone().unwrap();

    let (code, certs) = http_get(admin, "/debug/certs").await;
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&certs).unwrap();
    assert_eq!(
        v["spiffe_id"],
        "spiffe://cluster.local/ns/default/sa/server"
    );
    assert_eq!(
        v["default"]["cert_chain"][0]["serial_number"],
        creds.svid.leaf().serial.as_str()
    );
    // The agent's versions name the leaf serial.
    let version = v["default"]["sds"]["version"].as_str().unwrap();
    assert!(
        version.contains(creds.svid.leaf().serial.as_str()),
        "{version}"
    );
    assert_eq!(v["ROOTCA"]["ca_cert"].as_array().unwrap().len(), 1);
    assert!(!certs.contains("PRIVATE KEY"));

    let mut events = shim.app.access_log();
    let mut plain = tokio::net::TcpStream::connect(shim.app.inbound_addr())
        .await
        .unwrap();
    assert_eq!(
        roundtrip(&mut plain, b"count me").await.unwrap(),
        b"count me"
    );
    drop(plain);
    let mut garbage = tokio::net::TcpStream::connect(shim.app.inbound_addr())
        .await
        .unwrap();
    garbage
        .write_all(&[0x16, 0x03, 0x01, 0x00, 0x01, 0xff])
        .await
        .unwrap();
    garbage.shutdown().await.unwrap();
    for _ in 0..2 {
        tokio::time::timeout(WAIT, events.recv())
            .await
            .unwrap()
            .unwrap();
    }
    let (code, metrics) = http_get(admin, "/metrics").await;
    assert_eq!(code, 200);
    for name in [
        "meshid_shim_connections_total{direction=\"inbound\",mode=\"PERMISSIVE\",result=\"ok\"} 1",
        "meshid_shim_handshake_failures_total{direction=\"inbound\",reason=",
        "meshid_shim_bytes_total{direction=\"inbound\",flow=\"received\"} 8",
        "cert_expiry_seconds{resource_name=\"default\"}",
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }

    let (code, _) = http_request(admin, "PUT", "/policy", "mtls: {mode: BOGUS}")
        .await
        .unwrap();
    assert_eq!(code, 400);
    let (code, body) = http_request(admin, "PUT", "/policy", "mtls: {mode: STRICT}")
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(shim.app.policy().current().mode, Mode::Strict);
    let mut plain = tokio::net::TcpStream::connect(shim.app.inbound_addr())
        .await
        .unwrap();
    assert_refused(&mut plain, b"plaintext").await;
    assert!(http_get(admin, "/policy").await.1.contains("STRICT"));
}

#[tokio::test]
async fn each_sds_stream_carries_a_traceparent_from_its_sds_fetch_span() {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt;
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("envoy-shim-test")));
    // This test's runtime is single-threaded: the shim's tasks see this subscriber.
    let _guard = tracing::subscriber::set_default(subscriber);
    let pki = pki();
    let shim = Shim::start_scripted(&pki, Mode::Strict, |_, _| {}).await;
    shim.ready().await;
    let mut traces = Vec::new();
    for name in ["default", "ROOTCA"] {
        let first = shim
            .scripted()
            .requests()
            .into_iter()
            .find(|r| r.resource_names == [name])
            .unwrap();
        let tp = first
            .traceparent
            .unwrap_or_else(|| panic!("no traceparent on the {name} stream"));
        let parts: Vec<&str> = tp.split('-').collect();
        assert_eq!(parts.len(), 4, "{tp}");
        assert_eq!(
            (parts[0], parts[1].len(), parts[2].len()),
            ("00", 32, 16),
            "{tp}"
        );
        traces.push(parts[1].to_owned());
    }
    // One span per stream: two root traces.
    assert_ne!(traces[0], traces[1]);
}
