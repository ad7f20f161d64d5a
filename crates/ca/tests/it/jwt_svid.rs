//! `meshid.v1.JwtSvidService` over real TLS: minting JWT-SVIDs with the
//! authentication and authorization of CreateCertificate, the JWKS bundle,
//! and the refusals.

use crate::support;

use std::path::Path;
use std::time::{Duration, SystemTime};

use meshid_common::Error as CommonError;
use meshid_common::ca_client::{CallOptions, JwtBundle, MintedJwt};
use meshid_common::proto::jwt_svid::MintJwtSvidRequest;
use meshid_common::proto::jwt_svid::jwt_svid_service_client::JwtSvidServiceClient;
use meshid_common::{CaOptions, CertificateAuthority, PrivateKey, SpiffeId};
use support::Fixture;
use tonic::Code;

const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";

fn opts(token: &str) -> CallOptions<'_> {
    CallOptions {
        token: Some(token),
        impersonate: None,
    }
}

fn code_and_message(e: CommonError) -> (Code, String) {
    match e {
        CommonError::Ca { code, message } => (code, message),
        other => panic!("not a CA status: {other}"),
    }
}

/// Verifies `token` against the JWKS and returns its claims.
fn verify(bundle: &JwtBundle, token: &str, audience: &str) -> serde_json::Value {
    let header = jsonwebtoken::decode_header(token).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::ES256);
    let set: jsonwebtoken::jwk::JwkSet = serde_json::from_slice(&bundle.jwks).unwrap();
    let jwk = set
        .find(header.kid.as_deref().expect("a kid"))
        .expect("the kid is in the bundle");
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    v.set_audience(&[audience]);
    v.set_required_spec_claims(&["sub", "aud", "exp"]);
    jsonwebtoken::decode::<serde_json::Value>(token, &key, &v)
        .expect("the JWT-SVID verifies")
        .claims
}

async fn mint(fx: &Fixture, token: &str, aud: &[&str]) -> Result<MintedJwt, CommonError> {
    let aud: Vec<String> = aud.iter().map(|s| s.to_string()).collect();
    fx.client()
        .mint_jwt(&aud, Duration::ZERO, opts(token))
        .await
}

#[tokio::test]
async fn a_workload_gets_a_jwt_svid_signed_by_the_trust_domain() {
    let fx = Fixture::start().await;
    let token = fx.token("default", "web-0");
    let minted = mint(&fx, &token, &["spire-server", "db"]).await.unwrap();
    assert_eq!(minted.spiffe_id, WEB);

    let bundle = fx.client().jwt_bundle(opts(&token)).await.unwrap();
    assert_eq!(bundle.trust_domain, "cluster.local");
    let jwks: serde_json::Value = serde_json::from_slice(&bundle.jwks).unwrap();
    for key in jwks["keys"].as_array().unwrap() {
        assert_eq!(key["use"], "jwt-svid", "{key}");
        assert!(key["kid"].is_string(), "{key}");
    }

    let claims = verify(&bundle, &minted.token, "db");
    assert_eq!(claims["sub"], WEB);
    assert_eq!(claims["aud"], serde_json::json!(["spire-server", "db"]));
    let exp = claims["exp"].as_u64().unwrap();
    let now = meshid_common::cert::unix_secs(SystemTime::now()) as u64;
    assert!(
        (now + 290..=now + 301).contains(&exp),
        "5 min default TTL: exp {exp}, now {now}"
    );
    assert_eq!(
        minted.expires_at,
        SystemTime::UNIX_EPOCH + Duration::from_secs(exp)
    );
}

#[tokio::test]
async fn the_key_survives_a_restart() {
    let mut fx = Fixture::start().await;
    let token = fx.token("default", "web-0");
    let minted = mint(&fx, &token, &["x"]).await.unwrap();
    fx.restart().await;
    let bundle = fx.client().jwt_bundle(opts(&token)).await.unwrap();
    verify(&bundle, &minted.token, "x");
}

#[tokio::test]
async fn no_audience_or_a_long_ttl_is_invalid_argument() {
    let fx = Fixture::start().await;
    let token = fx.token("default", "web-0");
    let (code, message) = code_and_message(mint(&fx, &token, &[]).await.unwrap_err());
    assert_eq!(code, Code::InvalidArgument, "{message}");
    support::check_opaque(&message, "JWT-SVID request invalid", "audience is required");

    let (code, message) = code_and_message(
        fx.client()
            .mint_jwt(&["x".into()], Duration::from_secs(86_400), opts(&token))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, Code::InvalidArgument, "{message}");
    support::check_opaque(&message, "JWT-SVID request invalid", "ttl_seconds");
}

#[tokio::test]
async fn refusals_are_as_create_certificate() {
    let fx = Fixture::start().await;
    // No credentials at all.
    let mut raw = JwtSvidServiceClient::new(
        tonic::transport::Channel::from_shared(format!(
            "https://127.0.0.1:{}",
            fx.app().grpc_addr().port()
        ))
        .unwrap()
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(fx.roots_pem()))
                .domain_name("istiod.istio-system.svc"),
        )
        .unwrap()
        .connect_lazy(),
    );
    let status = raw
        .mint(MintJwtSvidRequest {
            audience: vec!["x".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    // A workload may name itself, but not another workload.
    let web_token = fx.token("default", "web-0");
    let aud = vec!["x".to_string()];
    let web = SpiffeId::parse(WEB).unwrap();
    let own = fx
        .client()
        .mint_jwt(
            &aud,
            Duration::ZERO,
            CallOptions {
                token: Some(&web_token),
                impersonate: Some(&web),
            },
        )
        .await
        .unwrap();
    assert_eq!(own.spiffe_id, WEB);
    let db = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/db").unwrap();
    let (code, message) = code_and_message(
        fx.client()
            .mint_jwt(
                &aud,
                Duration::ZERO,
                CallOptions {
                    token: Some(&web_token),
                    impersonate: Some(&db),
                },
            )
            .await
            .unwrap_err(),
    );
    assert_eq!(code, Code::Unauthenticated, "{message}");
    support::check_opaque(
        &message,
        "not allowed to impersonate",
        "default/web is not a trusted node account",
    );
    assert!(!message.contains(&web_token));

    // A bad spiffe_id is refused with what was wrong.
    let status = raw
        .mint({
            let mut r = tonic::Request::new(MintJwtSvidRequest {
                audience: aud.clone(),
                spiffe_id: "spiffe://cluster.local/ns/../sa/x".into(),
                ttl_seconds: 0,
            });
            r.metadata_mut().insert(
                "authorization",
                format!("Bearer {web_token}").parse().unwrap(),
            );
            r
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    support::check_opaque(
        status.message(),
        "impersonated identity invalid",
        "not a valid SPIFFE ID",
    );
}

#[tokio::test]
async fn the_node_account_mints_for_workloads_of_its_node_only() {
    let fx = Fixture::start().await;
    let web = SpiffeId::parse(WEB).unwrap();
    let aud = vec!["x".to_string()];
    let on_behalf = |token: &str| {
        let token = token.to_owned();
        let web = web.clone();
        let client = fx.client();
        let aud = aud.clone();
        async move {
            client
                .mint_jwt(
                    &aud,
                    Duration::ZERO,
                    CallOptions {
                        token: Some(&token),
                        impersonate: Some(&web),
                    },
                )
                .await
        }
    };
    let minted = on_behalf(&fx.token("istio-system", "ztunnel-a"))
        .await
        .unwrap();
    assert_eq!(minted.spiffe_id, WEB);
    let bundle = fx
        .client()
        .jwt_bundle(opts(&fx.token("default", "web-0")))
        .await
        .unwrap();
    assert_eq!(verify(&bundle, &minted.token, "x")["sub"], WEB);

    // The ztunnel of node-b: web runs on node-a.
    let (code, message) = code_and_message(
        on_behalf(&fx.token("istio-system", "ztunnel-b"))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, Code::Unauthenticated, "{message}");
    // The answer does not tell where web runs; the log does.
    support::check_opaque(&message, "identity not allowed", "runs on node \"node-b\"");
}

#[tokio::test]
async fn a_client_certificate_authenticates_a_mint() {
    let fx = Fixture::start().await;
    let token = fx.token("default", "web-0");
    let web = SpiffeId::parse(WEB).unwrap();
    let key = PrivateKey::generate(meshid_common::KeyType::EcdsaP256).unwrap();
    let (svid, _) = fx
        .client()
        .sign(key, &web, Duration::from_secs(600), opts(&token))
        .await
        .unwrap();
    let config = fx.client().config().clone();
    let by_cert = meshid_common::ca_client::CaClient::with_client_certificate(config, &svid)
        .unwrap()
        .mint_jwt(
            &["x".into()],
            Duration::ZERO,
            CallOptions {
                token: None,
                impersonate: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(by_cert.spiffe_id, WEB);
}

fn ca_pair(name: &str) -> (CertificateAuthority, CertificateAuthority) {
    let root = CertificateAuthority::self_signed_root(&CaOptions::new(
        name,
        Duration::from_secs(86_400 * 30),
    ))
    .unwrap();
    let inter = root
        .issue_intermediate(&CaOptions {
            common_name: Some(format!("{name} intermediate")),
            ..CaOptions::new(name, Duration::from_secs(86_400 * 7))
        })
        .unwrap();
    (root, inter)
}

fn plug(dir: &Path, root: &CertificateAuthority, inter: &CertificateAuthority, roots_pem: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let write = |name: &str, body: &str| {
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, body).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    };
    write("ca-key.pem", &inter.key().to_pkcs8_pem());
    write(
        "cert-chain.pem",
        &format!("{}{}", inter.cert_pem(), root.cert_pem()),
    );
    write("root-cert.pem", roots_pem);
    write("ca-cert.pem", &inter.cert_pem());
}

fn kids(bundle: &JwtBundle) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_slice(&bundle.jwks).unwrap();
    v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn the_jwt_key_rotates_with_the_ca_and_the_old_one_stays_published() {
    let (root_a, inter_a) = ca_pair("root-a");
    let (root_b, inter_b) = ca_pair("root-b");
    let mut fx = Fixture::start().await;
    fx.app.take().unwrap().shutdown().await;
    std::fs::remove_dir_all(fx.ca_dir()).unwrap();
    plug(&fx.ca_dir(), &root_a, &inter_a, &root_a.cert_pem());
    fx.restart().await;

    let token = fx.token("default", "web-0");
    let before = mint(&fx, &token, &["x"]).await.unwrap();
    let old_kid = fx.app().jwt_authority().current_kid();

    let both = format!("{}{}", root_a.cert_pem(), root_b.cert_pem());
    plug(&fx.ca_dir(), &root_b, &inter_b, &both);
    support::eventually(10, "the JWT key rotates with the CA", || {
        fx.app().jwt_authority().current_kid() != old_kid
    })
    .await;
    let new_kid = fx.app().jwt_authority().current_kid();
    support::eventually(5, "the published roots", || {
        meshid_common::TrustBundle::from_pem(&fx.roots_pem())
            .map(|b| b.roots().len() == 2)
            .unwrap_or(false)
    })
    .await;

    let bundle = fx.client().jwt_bundle(opts(&token)).await.unwrap();
    assert_eq!(kids(&bundle), vec![old_kid, new_kid.clone()]);
    verify(&bundle, &before.token, "x");
    let after = mint(&fx, &token, &["x"]).await.unwrap();
    let header = jsonwebtoken::decode_header(&after.token).unwrap();
    assert_eq!(header.kid.as_deref(), Some(new_kid.as_str()));
    verify(&bundle, &after.token, "x");
}
