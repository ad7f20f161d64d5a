//! The agent against a real meshid-ca running in-process: JWT
//! authentication against the issuer's JWKS, the workload registry, TLS
//! verified against the CA's root, and revocation by deleting the pod.

use std::time::Duration;

use meshid_agent::App;
use meshid_common::bundle::Usage;
use meshid_common::{SpiffeId, TrustBundle};

use crate::support::{RealCa, SdsStream, eventually, request, secrets};

async fn serial_of(app: &App) -> String {
    let mut rx = app.credentials();
    tokio::time::timeout(Duration::from_secs(15), rx.wait_for(Option::is_some))
        .await
        .expect("a certificate from the CA")
        .unwrap()
        .as_ref()
        .unwrap()
        .svid
        .leaf()
        .serial
        .clone()
}

#[tokio::test]
async fn the_real_ca_issues_and_the_agent_serves_it_over_sds() {
    let ca = RealCa::start().await;
    let dir = tempfile::tempdir().unwrap();
    let app = ca.agent(dir.path(), &[]).await;
    let serial = serial_of(&app).await;
    let creds = app.manager().current().unwrap();
    let id = SpiffeId::for_service_account("cluster.local", "default", "web").unwrap();
    assert_eq!(creds.svid.id(), &id);
    let roots = TrustBundle::from_pem(&std::fs::read_to_string(ca.root_cert()).unwrap()).unwrap();
    assert!(roots.is_superset_of(&creds.bundle) || creds.bundle.is_superset_of(&roots));
    roots
        .verify(
            creds.svid.chain(),
            Usage::ClientAuth,
            std::time::SystemTime::now(),
        )
        .unwrap();

    let mut client = crate::support::sds_client(app.sds_socket()).await;
    let mut s = SdsStream::open(&mut client, request(Some("n"), &["default", "ROOTCA"]))
        .await
        .unwrap();
    let r = s.expect_response().await;
    assert_eq!(secrets(&r).len(), 2);
    assert!(r.version_info.contains(&serial));
    app.shutdown().await;
}

#[tokio::test]
async fn a_deleted_pod_cannot_renew_and_the_agent_reports_it() {
    let mut ca = RealCa::start().await;
    let dir = tempfile::tempdir().unwrap();
    let app = ca.agent(dir.path(), &[]).await;
    let serial = serial_of(&app).await;
    ca.delete_pod("web-0");
    // Give the CA's registry poll a moment, then renew.
    tokio::time::sleep(Duration::from_millis(300)).await;
    app.manager().refresh_now();
    let refused = eventually(Duration::from_secs(10), || app.manager().status().refused).await;
    let status = app.manager().status();
    assert!(refused, "{status:?}");
    assert!(!status.ready);
    assert_eq!(
        app.manager().current().unwrap().svid.leaf().serial,
        serial,
        "the still-valid cert is kept"
    );
    app.shutdown().await;
}
