//! The admin listener: readiness, `/debug/certs`, `/metrics`.

use std::time::Duration;

use crate::support::{AgentBuilder, Answer, SdsStream, eventually, fake_ca, http_get, request};
use meshid_agent::Clock;

#[tokio::test]
async fn ready_follows_the_certificate() {
    let ca = fake_ca(Clock::System);
    ca.set_answer(Answer::Fail(tonic::Code::Unavailable));
    let a = AgentBuilder {
        ca: Some(ca.clone()),
        ..AgentBuilder::default()
    }
    .start()
    .await;
    let addr = a.app.admin_addr();
    assert!(addr.ip().is_loopback());
    let (code, body) = http_get(addr, "/ready").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("not ready"), "{body}");
    ca.set_answer(Answer::Good);
    a.ready().await;
    let (code, body) = http_get(addr, "/ready").await;
    assert_eq!(code, 200, "{body}");
    a.app.shutdown().await;
}

#[tokio::test]
async fn debug_certs_shows_identity_serial_validity_chain_and_next_rotation() {
    let a = AgentBuilder::default().start().await;
    let serial = a.ready().await;
    let (code, body) = http_get(a.app.admin_addr(), "/debug/certs").await;
    assert_eq!(code, 200);
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["identity"], a.id().as_str());
    assert_eq!(doc["serial"], serial.as_str());
    assert_eq!(doc["ready"], true);
    for field in ["not_before", "not_after", "next_rotation"] {
        let v = doc[field].as_str().unwrap_or_default();
        assert!(v.ends_with('Z') && v.len() == 20, "{field}: {v}");
    }
    let resources = doc["resources"].as_array().unwrap();
    assert_eq!(resources[0]["resource_name"], "default");
    assert_eq!(resources[0]["chain_subjects"].as_array().unwrap().len(), 2);
    assert_eq!(resources[1]["resource_name"], "ROOTCA");
    assert!(!body.contains("PRIVATE KEY"), "no key material");
    a.app.shutdown().await;
}

#[tokio::test]
async fn metrics_count_requests_pushes_and_streams() {
    let a = AgentBuilder::default().start().await;
    a.ready().await;
    let mut client = a.sds().await;
    let mut s = SdsStream::open(&mut client, request(Some("n"), &["default", "ROOTCA"]))
        .await
        .unwrap();
    s.expect_response().await;
    let (_, text) = http_get(a.app.admin_addr(), "/metrics").await;
    // pilot-agent's merged page, where Prometheus scrapes an Istio pod.
    let (_, merged) = http_get(a.app.admin_addr(), "/stats/prometheus").await;
    assert!(
        merged.contains("istio_agent_num_outgoing_requests{request_type=\"csr\"} 1"),
        "{merged}"
    );
    for needle in [
        "istio_agent_num_outgoing_requests{request_type=\"csr\"} 1",
        "meshid_agent_sds_pushes_total{resource_name=\"default\"} 1",
        "meshid_agent_sds_pushes_total{resource_name=\"ROOTCA\"} 1",
        "meshid_agent_sds_connected_streams 1",
        "istio_agent_cert_expiry_seconds{resource_name=\"default\"} 3",
        "istio_agent_cert_expiry_seconds{resource_name=\"ROOTCA\"}",
    ] {
        assert!(text.contains(needle), "{needle} missing in\n{text}");
    }
    drop(s);
    drop(client);
    let closed = eventually(Duration::from_secs(5), || {
        a.app
            .metrics()
            .encode()
            .contains("meshid_agent_sds_connected_streams 0")
    })
    .await;
    assert!(closed, "a closed stream is no longer counted");
    a.app.shutdown().await;
}

/// Prometheus scrapes an Istio pod at pilot-agent's status port
/// (:15020/stats/prometheus); the agent's scrape listener serves the same
/// page there, and nothing about its certificates.
#[tokio::test]
async fn the_metrics_listener_serves_the_scrape_page_only() {
    let a = AgentBuilder {
        extra_args: vec!["--metrics-addr".into(), "127.0.0.1:0".into()],
        ..Default::default()
    }
    .start()
    .await;
    a.ready().await;
    let addr = a.app.metrics_addr().expect("the metrics listener is on");
    let (code, text) = http_get(addr, "/stats/prometheus").await;
    assert_eq!(code, 200, "{text}");
    assert!(
        text.contains("istio_agent_num_outgoing_requests{request_type=\"csr\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("istio_agent_cert_expiry_seconds{resource_name=\"default\"}"),
        "{text}"
    );
    let (code, _) = http_get(addr, "/debug/certs").await;
    assert_eq!(
        code, 404,
        "certificate details stay on the localhost admin port"
    );
    a.app.shutdown().await;
}
