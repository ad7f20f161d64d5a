//! The JWT half of the Workload API against a real meshid-ca in-process:
//! the `spiffe` crate's JwtSource and WorkloadApiClient fetch a JWT-SVID the
//! CA minted and the trust domain's JWT bundle, and validate the token; the
//! agent's ValidateJWTSVID refuses a wrong audience and an expired token.

use std::time::{Duration, SystemTime};

use meshid_common::SpiffeId;
use meshid_common::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use meshid_common::proto::workload::{JwtBundlesRequest, JwtsvidRequest, ValidateJwtsvidRequest};
use tonic::Code;

use crate::support::{RealCa, uds_channel};

const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";

fn with_header<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    req
}

#[tokio::test]
async fn the_spiffe_crate_fetches_and_validates_a_jwt_svid_minted_by_the_ca() {
    let ca = RealCa::start().await;
    let dir = tempfile::tempdir().unwrap();
    let app = ca.agent(dir.path(), &[]).await;
    let endpoint = format!("unix:{}", app.workload_api_socket().display());

    let source = tokio::time::timeout(
        Duration::from_secs(20),
        spiffe::JwtSource::builder().endpoint(&endpoint).build(),
    )
    .await
    .expect("JwtSource does not hang")
    .expect("JwtSource connects to the agent");
    let svid = source
        .fetch_jwt_svid(["backend", "audit"])
        .await
        .expect("a JWT-SVID");
    assert_eq!(svid.spiffe_id().to_string(), WEB);
    let mut aud = svid.audience().to_vec();
    aud.sort();
    assert_eq!(aud, ["audit", "backend"]);
    assert_eq!(
        svid.key_id(),
        ca.app.jwt_authority().current_kid(),
        "signed by the CA's JWT key"
    );

    // The bundle source: the trust domain's JWKS, and the token verifies
    // against it locally.
    let td = spiffe::TrustDomain::new("cluster.local").unwrap();
    let bundle = source
        .try_bundle_for_trust_domain(&td)
        .expect("the trust domain's JWT bundle");
    assert!(bundle.find_jwt_authority(svid.key_id()).is_some());
    let checked = spiffe::JwtSvid::parse_and_validate(svid.token(), &source, &["backend"])
        .expect("the JWT-SVID verifies against the bundle source");
    assert_eq!(checked.spiffe_id().to_string(), WEB);

    // And through the agent's ValidateJWTSVID.
    let client = spiffe::WorkloadApiClient::connect_to(&endpoint)
        .await
        .unwrap();
    let validated = client
        .validate_jwt_token("audit", svid.token())
        .await
        .expect("the agent validates its own token");
    assert_eq!(validated.spiffe_id().to_string(), WEB);
    let bundles = client.fetch_jwt_bundles().await.unwrap();
    assert!(bundles.get(&td).is_some());

    // Cached until half-life: the same token for the same audience set.
    let again = source.fetch_jwt_svid(["audit", "backend"]).await.unwrap();
    assert_eq!(again.token(), svid.token());

    source.shutdown().await;
    app.shutdown().await;
}

#[tokio::test]
async fn validate_refuses_a_wrong_audience_an_expired_token_and_a_foreign_key() {
    let ca = RealCa::start().await;
    let dir = tempfile::tempdir().unwrap();
    let app = ca.agent(dir.path(), &[]).await;
    let mut client = SpiffeWorkloadApiClient::new(uds_channel(app.workload_api_socket()).await);

    let token = client
        .fetch_jwtsvid(with_header(JwtsvidRequest {
            audience: vec!["backend".into()],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap()
        .into_inner()
        .svids
        .remove(0)
        .svid;
    let validate = |audience: &str, svid: &str| {
        let mut client = client.clone();
        let req = with_header(ValidateJwtsvidRequest {
            audience: audience.into(),
            svid: svid.into(),
        });
        async move { client.validate_jwtsvid(req).await }
    };

    let ok = validate("backend", &token).await.unwrap().into_inner();
    assert_eq!(ok.spiffe_id, WEB);
    let claims = ok.claims.unwrap();
    assert!(claims.fields.contains_key("exp"));
    assert!(claims.fields.contains_key("aud"));

    let wrong = validate("frontend", &token).await.unwrap_err();
    assert_eq!(wrong.code(), Code::InvalidArgument, "{wrong:?}");
    assert!(wrong.message().contains("audience"), "{wrong:?}");

    // Minted by the CA's own key ten minutes ago with a five-minute life.
    let web = SpiffeId::parse(WEB).unwrap();
    let expired = ca
        .app
        .jwt_authority()
        .mint(
            &web,
            &["backend".into()],
            Duration::from_secs(300),
            SystemTime::now() - Duration::from_secs(600),
        )
        .unwrap();
    let refused = validate("backend", &expired.token).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("expired"), "{refused:?}");

    // Signed by a key the trust domain never published.
    let stranger = meshid_ca::jwt_svid::JwtAuthority::ephemeral("cluster.local").unwrap();
    let forged = stranger
        .mint(
            &web,
            &["backend".into()],
            Duration::from_secs(300),
            SystemTime::now(),
        )
        .unwrap();
    let refused = validate("backend", &forged.token).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");

    let refused = validate("", &token).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("audience must be specified"));
    let refused = validate("backend", "").await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("svid must be specified"));
    app.shutdown().await;
}

#[tokio::test]
async fn fetch_jwt_svid_refuses_what_spire_refuses() {
    let ca = RealCa::start().await;
    let dir = tempfile::tempdir().unwrap();
    let app = ca.agent(dir.path(), &[]).await;
    let mut client = SpiffeWorkloadApiClient::new(uds_channel(app.workload_api_socket()).await);
    let fetch = |audience: Vec<String>, spiffe_id: &str| {
        let mut client = client.clone();
        let req = with_header(JwtsvidRequest {
            audience,
            spiffe_id: spiffe_id.into(),
        });
        async move { client.fetch_jwtsvid(req).await }
    };
    let e = fetch(vec![], "").await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("audience must be specified"), "{e:?}");
    let e = fetch(vec!["x".into()], "not-an-id").await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = fetch(vec!["x".into()], "spiffe://cluster.local/ns/default/sa/db")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let own = fetch(vec!["x".into()], WEB).await.unwrap().into_inner();
    assert_eq!(own.svids[0].spiffe_id, WEB);

    // The bundle stream sends the JWKS at once, keyed by trust domain.
    let mut stream = client
        .fetch_jwt_bundles(with_header(JwtBundlesRequest {}))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let jwks: serde_json::Value =
        serde_json::from_slice(&first.bundles["spiffe://cluster.local"]).unwrap();
    assert_eq!(jwks["keys"][0]["use"], "jwt-svid");
    app.shutdown().await;
}
