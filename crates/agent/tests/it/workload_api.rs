//! The SPIFFE Workload API, seen by the `spiffe` crate and by a raw client.

use std::time::Duration;

use meshid_common::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use meshid_common::proto::workload::{JwtsvidRequest, X509BundlesRequest, X509svidRequest};
use meshid_common::{CertInfo, PrivateKey};
use rustls_pki_types::CertificateDer;

use crate::support::{AgentBuilder, uds_channel};

#[tokio::test]
async fn x509_source_gets_the_svid_and_bundle_and_sees_a_rotation() {
    let a = AgentBuilder::default().start().await;
    let first = a.ready().await;
    let endpoint = format!("unix:{}", a.api_socket().display());
    let source = spiffe::X509Source::builder()
        .endpoint(&endpoint)
        .build()
        .await
        .expect("X509Source connects to the agent");
    let svid = source.svid().unwrap();
    assert_eq!(svid.spiffe_id().to_string(), a.id().to_string());
    let leaf = CertInfo::from_der(svid.leaf().as_ref()).unwrap();
    assert_eq!(leaf.serial, first);
    let td = spiffe::TrustDomain::new("cluster.local").unwrap();
    let bundle = source.try_bundle_for_trust_domain(&td).expect("a bundle");
    assert_eq!(
        bundle.authorities()[0].as_ref(),
        a.ca.bundle().roots()[0].as_ref()
    );

    let mut updates = source.updated();
    let second = a.rotate(&first).await;
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let now = CertInfo::from_der(source.svid().unwrap().leaf().as_ref())
                .unwrap()
                .serial;
            if now == second {
                break;
            }
            updates.changed().await.unwrap();
        }
    })
    .await
    .expect("the X509Source sees the rotation");
    source.shutdown().await;
    a.app.shutdown().await;
}

fn with_header<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    req
}

#[tokio::test]
async fn the_security_header_is_required() {
    let a = AgentBuilder::default().start().await;
    a.ready().await;
    let mut client = SpiffeWorkloadApiClient::new(uds_channel(&a.api_socket()).await);
    let err = client.fetch_x509svid(X509svidRequest {}).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("workload.spiffe.io"),
        "{}",
        err.message()
    );
    let mut wrong = tonic::Request::new(X509BundlesRequest {});
    wrong
        .metadata_mut()
        .insert("workload.spiffe.io", "yes".parse().unwrap());
    let err = client.fetch_x509_bundles(wrong).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = client
        .fetch_jwtsvid(JwtsvidRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = client
        .fetch_jwtsvid(with_header(JwtsvidRequest::default()))
        .await
        .unwrap_err();
    // With the header, the call is served: no audience is SPIRE's refusal.
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("audience must be specified"),
        "{err:?}"
    );
    a.app.shutdown().await;
}

#[tokio::test]
async fn each_message_carries_the_full_state() {
    let a = AgentBuilder::default().start().await;
    let first = a.ready().await;
    let mut client = SpiffeWorkloadApiClient::new(uds_channel(&a.api_socket()).await);
    let mut svids = client
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let mut bundles = client
        .fetch_x509_bundles(with_header(X509BundlesRequest {}))
        .await
        .unwrap()
        .into_inner();
    let check = |msg: &meshid_common::proto::workload::X509svidResponse, serial: &str| {
        assert_eq!(msg.svids.len(), 1);
        let s = &msg.svids[0];
        assert_eq!(s.spiffe_id, a.id().to_string());
        assert!(!s.bundle.is_empty());
        let leaf = CertInfo::from_der(&CertificateDer::from(s.x509_svid.clone())).ok();
        // The chain is DER certificates back to back: parse the first one.
        let leaf = leaf.unwrap_or_else(|| first_der(&s.x509_svid));
        assert_eq!(leaf.serial, serial);
        let key = PrivateKey::from_der(&rustls_pki_types::PrivateKeyDer::Pkcs8(
            s.x509_svid_key.clone().into(),
        ))
        .unwrap();
        assert_eq!(key.public_key_spki(), leaf.public_key_spki);
    };
    let m1 = tokio::time::timeout(Duration::from_secs(5), svids.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    check(&m1, &first);
    let b1 = bundles.message().await.unwrap().unwrap();
    assert_eq!(
        b1.bundles.get("spiffe://cluster.local").unwrap(),
        &a.ca.bundle().to_concatenated_der()
    );
    let second = a.rotate(&first).await;
    let m2 = tokio::time::timeout(Duration::from_secs(5), svids.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    check(&m2, &second);
    a.app.shutdown().await;
}

/// The first certificate of DER certificates concatenated.
fn first_der(bytes: &[u8]) -> CertInfo {
    // DER SEQUENCE with a long-form length: 0x30 0x82 hi lo.
    assert_eq!(bytes[0], 0x30);
    let len = match bytes[1] {
        0x82 => 4 + ((bytes[2] as usize) << 8 | bytes[3] as usize),
        0x81 => 3 + bytes[2] as usize,
        n => 2 + n as usize,
    };
    CertInfo::from_der(&bytes[..len]).unwrap()
}
