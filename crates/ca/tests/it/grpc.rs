//! meshid-ca end to end, in-process, over real TLS: good paths, every bad
//! input of the issue with its status code and message, restarts, rotation.

use crate::support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use meshid_ca::{TokenAlgorithm, TokenIssuer};
use meshid_common::ca_client::{
    CaClient, CallOptions, IMPERSONATED_IDENTITY_KEY, validate_response,
};
use meshid_common::cert::{CertInfo, parse_pem_certs};
use meshid_common::{
    CaOptions, CertificateAuthority, Error as CommonError, KeyType, PrivateKey, SpiffeId,
    TrustBundle, Usage,
};
use support::{Fixture, TD, eventually};
use tonic::Code;

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::for_service_account(TD, ns, sa).unwrap()
}

fn key() -> PrivateKey {
    PrivateKey::generate(KeyType::EcdsaP256).unwrap()
}

/// A CSR with exactly these URI SANs (none for an empty list).
fn csr_with_uris(key: &PrivateKey, uris: &[&str]) -> String {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = uris
        .iter()
        .map(|u| rcgen::SanType::URI((*u).try_into().unwrap()))
        .collect();
    params.serialize_request(key).unwrap().pem().unwrap()
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Asserts the code; that the answer tells no registry fact and carries a
/// request id (in the message and in `x-request-id`); that the CA logged
/// the problem (`needle`) under that id; and that no secret leaked into
/// the answer or that log line.
#[track_caller]
fn refused(
    result: Result<Vec<String>, tonic::Status>,
    code: Code,
    needle: &str,
    secrets: &[&str],
) -> tonic::Status {
    let status = result.expect_err("the request must be refused");
    assert_eq!(status.code(), code, "{status:?}");
    let id = status
        .metadata()
        .get("x-request-id")
        .unwrap_or_else(|| panic!("no x-request-id in {status:?}"))
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(support::request_id_of(status.message()), id);
    for fact in support::REGISTRY_FACTS {
        assert!(
            !status.message().contains(fact),
            "the answer tells a registry fact ({fact:?}): {status:?}"
        );
    }
    let lines = support::logged_under(&id);
    assert!(
        lines.iter().any(|l| l.contains(needle)),
        "no log line under request id {id} names {needle:?}: {lines:#?}"
    );
    for secret in secrets {
        assert!(
            !status.message().contains(secret),
            "a secret leaked: {status:?}"
        );
        assert!(
            lines.iter().all(|l| !l.contains(secret)),
            "a secret was logged"
        );
    }
    status
}

fn leaf_of(chain: &[String]) -> CertInfo {
    CertInfo::from_der(&parse_pem_certs(&chain[0]).unwrap()[0]).unwrap()
}

// ---------------------------------------------------------------- good paths

#[tokio::test]
async fn p256_and_rsa2048_csrs_get_verified_svids() {
    let fx = Fixture::start().await;
    let token = fx.token("default", "web-0");
    for kt in [KeyType::EcdsaP256, KeyType::Rsa2048] {
        let (svid, bundle) = fx
            .client()
            .sign(
                PrivateKey::generate(kt).unwrap(),
                &id("default", "web"),
                Duration::from_secs(3600),
                CallOptions {
                    token: Some(&token),
                    impersonate: None,
                },
            )
            .await
            .unwrap_or_else(|e| panic!("{kt}: {e}"));
        assert_eq!(svid.id(), &id("default", "web"));
        assert_eq!(bundle, fx.app().root_bundle());
        let lifetime = svid
            .leaf()
            .not_after
            .duration_since(SystemTime::now())
            .unwrap();
        assert!(
            lifetime > Duration::from_secs(3500) && lifetime <= Duration::from_secs(3600),
            "{lifetime:?}"
        );
        bundle
            .verify(svid.chain(), Usage::ServerAuth, SystemTime::now())
            .unwrap();
    }
}

#[tokio::test]
async fn rs256_tokens_work_too() {
    let fx = Fixture::start_with(TokenAlgorithm::Rs256, &[]).await;
    let token = fx.token("default", "db-0");
    let (svid, _) = fx
        .client()
        .sign(
            key(),
            &id("default", "db"),
            Duration::from_secs(600),
            CallOptions {
                token: Some(&token),
                impersonate: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(svid.id(), &id("default", "db"));
}

#[tokio::test]
async fn a_csr_without_san_gets_the_callers_identity() {
    let fx = Fixture::start().await;
    let k = key();
    let chain = fx
        .call(
            &csr_with_uris(&k, &[]),
            600,
            Some(&bearer(&fx.token("default", "web-0"))),
            |_| {},
        )
        .await
        .unwrap();
    assert_eq!(chain.len(), 2, "self-signed CA answers [leaf, root]");
    validate_response(&chain, &k, &id("default", "web"), SystemTime::now()).unwrap();
}

#[tokio::test]
async fn ttl_zero_means_24h_and_short_ttls_work() {
    let fx = Fixture::start().await;
    let token = fx.token("default", "web-0");
    let k = key();
    let csr = k.csr_for(&id("default", "web")).unwrap();
    let day = fx
        .call(&csr, 0, Some(&bearer(&token)), |_| {})
        .await
        .unwrap();
    let leaf = leaf_of(&day);
    let left = leaf.not_after.duration_since(SystemTime::now()).unwrap();
    assert!(
        left > Duration::from_secs(86_300) && left <= Duration::from_secs(86_400),
        "{left:?}"
    );
    // NotBefore is backdated two minutes for clock skew.
    assert!(leaf.lifetime() >= Duration::from_secs(86_400 + 110));

    let negative = fx
        .call(&csr, -5, Some(&bearer(&token)), |_| {})
        .await
        .unwrap();
    assert!(leaf_of(&negative).not_after > SystemTime::now() + Duration::from_secs(86_000));

    let short = fx
        .call(&csr, 5, Some(&bearer(&token)), |_| {})
        .await
        .unwrap();
    let not_after = leaf_of(&short).not_after;
    let left = not_after
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    assert!(left <= Duration::from_secs(5), "{left:?}");
    validate_response(&short, &k, &id("default", "web"), SystemTime::now()).unwrap();
    let bundle = TrustBundle::from_pem(short.last().unwrap()).unwrap();
    let certs = parse_pem_certs(&short[0]).unwrap();
    let err = bundle
        .verify(
            &certs,
            Usage::ClientAuth,
            SystemTime::now() + Duration::from_secs(7),
        )
        .unwrap_err();
    assert!(err.to_string().contains("expired"), "{err}");
}

#[tokio::test]
async fn a_node_agent_gets_certificates_for_workloads_of_its_node() {
    let fx = Fixture::start().await;
    let ztunnel_token = fx.token("istio-system", "ztunnel-a");
    let web = id("default", "web");
    let (svid, _) = fx
        .client()
        .sign(
            key(),
            &web,
            Duration::from_secs(600),
            CallOptions {
                token: Some(&ztunnel_token),
                impersonate: Some(&web),
            },
        )
        .await
        .unwrap();
    assert_eq!(svid.id(), &web);
}

#[tokio::test]
async fn a_current_svid_authenticates_its_own_renewal() {
    let fx = Fixture::start().await;
    let token = fx.token("default", "web-0");
    let web = id("default", "web");
    let (svid, _) = fx
        .client()
        .sign(
            key(),
            &web,
            Duration::from_secs(600),
            CallOptions {
                token: Some(&token),
                impersonate: None,
            },
        )
        .await
        .unwrap();
    let config = fx.client().config().clone();
    let by_cert = CaClient::with_client_certificate(config, &svid).unwrap();
    let (renewed, _) = by_cert
        .sign(
            key(),
            &web,
            Duration::from_secs(600),
            CallOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(renewed.id(), &web);
    assert_ne!(renewed.leaf().serial, svid.leaf().serial);
    // The certificate does not buy another identity.
    let err = by_cert
        .sign(
            key(),
            &id("default", "db"),
            Duration::from_secs(600),
            CallOptions::default(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            CommonError::Ca {
                code: Code::InvalidArgument,
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn a_deleted_pod_stops_authenticating() {
    let mut fx = Fixture::start().await;
    let token = fx.token("default", "web-0");
    let csr = key().csr_for(&id("default", "web")).unwrap();
    fx.call(&csr, 60, Some(&bearer(&token)), |_| {})
        .await
        .unwrap();
    fx.registry.remove_workload("default", "web-0");
    fx.write_registry();
    let mut last = Ok(vec![]);
    for _ in 0..100 {
        last = fx.call(&csr, 60, Some(&bearer(&token)), |_| {}).await;
        if last.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    refused(last, Code::Unauthenticated, "is not running", &[&token]);
}

// ---------------------------------------------------------------- bad CSRs

#[tokio::test]
async fn bad_csrs_are_invalid_argument_and_say_why() {
    let fx = Fixture::start().await;
    let token = fx.token("default", "web-0");
    let auth = bearer(&token);
    let k = key();
    let secrets = [token.as_str()];

    refused(
        fx.call("hello", 60, Some(&auth), |_| {}).await,
        Code::InvalidArgument,
        "no PEM block",
        &secrets,
    );

    let garbage =
        "-----BEGIN CERTIFICATE REQUEST-----\nMAMCAQA=\n-----END CERTIFICATE REQUEST-----\n";
    refused(
        fx.call(garbage, 60, Some(&auth), |_| {}).await,
        Code::InvalidArgument,
        "malformed CSR",
        &secrets,
    );

    // Flip a bit inside the signed part: it parses, the signature fails.
    let good = k.csr_for(&id("default", "web")).unwrap();
    let der = parse_pem_body(&good);
    let mut tampered = der.clone();
    let at = tampered.windows(6).position(|w| w == b"spiffe").unwrap();
    tampered[at + 12] ^= 0x01;
    let tampered = pem("CERTIFICATE REQUEST", &tampered);
    refused(
        fx.call(&tampered, 60, Some(&auth), |_| {}).await,
        Code::InvalidArgument,
        "signature does not verify",
        &secrets,
    );

    let other = k.csr_for(&id("default", "db")).unwrap();
    refused(
        fx.call(&other, 60, Some(&auth), |_| {}).await,
        Code::InvalidArgument,
        "asks for spiffe://cluster.local/ns/default/sa/db but the caller may only get spiffe://cluster.local/ns/default/sa/web",
        &secrets,
    );

    let two = csr_with_uris(
        &k,
        &[
            "spiffe://cluster.local/ns/default/sa/web",
            "spiffe://cluster.local/ns/default/sa/db",
        ],
    );
    refused(
        fx.call(&two, 60, Some(&auth), |_| {}).await,
        Code::InvalidArgument,
        "2 URI SANs",
        &secrets,
    );

    let foreign = csr_with_uris(&k, &["spiffe://evil.example/ns/default/sa/web"]);
    refused(
        fx.call(&foreign, 60, Some(&auth), |_| {}).await,
        Code::InvalidArgument,
        "trust domain \"evil.example\"",
        &secrets,
    );

    let not_spiffe = csr_with_uris(&k, &["https://example.com/web"]);
    refused(
        fx.call(&not_spiffe, 60, Some(&auth), |_| {}).await,
        Code::InvalidArgument,
        "not a SPIFFE ID",
        &secrets,
    );

    let max = 90 * 86_400;
    refused(
        fx.call(&good, max + 1, Some(&auth), |_| {}).await,
        Code::InvalidArgument,
        "above the maximum",
        &secrets,
    );
    // The maximum itself is fine.
    fx.call(&good, max, Some(&auth), |_| {}).await.unwrap();
}

/// pilot-agent writes its own `TRUST_DOMAIN` into the CSR: one in a
/// `--trust-domain-aliases` entry is the caller's identity, issued in the
/// primary trust domain; another workload's identity stays refused, in an
/// alias too, and an alias that is not configured stays refused.
#[tokio::test]
async fn a_csr_in_a_trust_domain_alias_is_issued_in_the_primary() {
    let fx = Fixture::start_with(
        TokenAlgorithm::Es256,
        &["--trust-domain-aliases", "old.example,older.example"],
    )
    .await;
    let token = fx.token("default", "web-0");
    let auth = bearer(&token);
    let k = key();
    for alias in ["old.example", "older.example"] {
        let csr = csr_with_uris(&k, &[&format!("spiffe://{alias}/ns/default/sa/web")]);
        let chain = fx.call(&csr, 600, Some(&auth), |_| {}).await.unwrap();
        validate_response(&chain, &k, &id("default", "web"), SystemTime::now()).unwrap();
        assert_eq!(leaf_of(&chain).uri_sans, [id("default", "web").to_string()]);
    }

    let other = csr_with_uris(&k, &["spiffe://old.example/ns/default/sa/db"]);
    refused(
        fx.call(&other, 60, Some(&auth), |_| {}).await,
        Code::InvalidArgument,
        "asks for spiffe://old.example/ns/default/sa/db but the caller may only get spiffe://cluster.local/ns/default/sa/web",
        &[&token],
    );
    let unknown = csr_with_uris(&k, &["spiffe://evil.example/ns/default/sa/web"]);
    refused(
        fx.call(&unknown, 60, Some(&auth), |_| {}).await,
        Code::InvalidArgument,
        "trust domain \"evil.example\"",
        &[&token],
    );
}

#[tokio::test]
async fn a_2mib_request_is_refused_and_the_server_carries_on() {
    let fx = Fixture::start().await;
    let token = fx.token("default", "web-0");
    let huge = "A".repeat(2 << 20);
    let status = fx
        .call(&huge, 60, Some(&bearer(&token)), |_| {})
        .await
        .unwrap_err();
    // As istiod (grpc-go) answers an oversized message.
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("message length too large"),
        "{status:?}"
    );
    // Unharmed.
    let csr = key().csr_for(&id("default", "web")).unwrap();
    fx.call(&csr, 60, Some(&bearer(&token)), |_| {})
        .await
        .unwrap();
}

fn parse_pem_body(pem_text: &str) -> Vec<u8> {
    use base64::Engine;
    let body: String = pem_text
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap()
}

fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

// ---------------------------------------------------------------- bad tokens

#[tokio::test]
async fn bad_credentials_are_unauthenticated_and_say_why() {
    let fx = Fixture::start().await;
    let csr = key().csr_for(&id("default", "web")).unwrap();
    let call = |auth: Option<String>| {
        let csr = csr.clone();
        let fx = &fx;
        async move { fx.call(&csr, 60, auth.as_deref(), |_| {}).await }
    };
    let claims = || fx.claims("default", "web-0");
    let now = SystemTime::now();

    refused(
        call(None).await,
        Code::Unauthenticated,
        "no `authorization: Bearer <token>` header",
        &[],
    );
    refused(
        call(Some("Basic dXNlcjpwdw==".into())).await,
        Code::Unauthenticated,
        "scheme is not Bearer",
        &["dXNlcjpwdw=="],
    );
    refused(
        call(Some("Bearer".into())).await,
        Code::Unauthenticated,
        "malformed authorization header",
        &[],
    );
    refused(
        call(Some("Bearer not.a.jwt.at-all".into())).await,
        Code::Unauthenticated,
        "not a JWT",
        &["not.a.jwt.at-all"],
    );

    let mut c = claims();
    c.issued_at = now - Duration::from_secs(7200);
    c.not_before = Some(c.issued_at);
    c.expires_at = now - Duration::from_secs(3600);
    let t = fx.issuer.mint(&c).unwrap();
    refused(
        call(Some(bearer(&t))).await,
        Code::Unauthenticated,
        "has expired",
        &[&t],
    );

    let mut c = claims();
    c.not_before = Some(now + Duration::from_secs(3600));
    c.expires_at = now + Duration::from_secs(7200);
    let t = fx.issuer.mint(&c).unwrap();
    refused(
        call(Some(bearer(&t))).await,
        Code::Unauthenticated,
        "not valid yet",
        &[&t],
    );

    let mut c = claims();
    c.audiences = vec!["some-other-service".into()];
    let t = fx.issuer.mint(&c).unwrap();
    refused(
        call(Some(bearer(&t))).await,
        Code::Unauthenticated,
        "wrong audience",
        &[&t],
    );

    let mut c = claims();
    c.issuer = Some("https://evil.example".into());
    let t = fx.issuer.mint(&c).unwrap();
    refused(
        call(Some(bearer(&t))).await,
        Code::Unauthenticated,
        "wrong issuer",
        &[&t],
    );

    // alg none: a valid-looking token without a signature.
    let real = fx.token("default", "web-0");
    let payload = real.split('.').nth(1).unwrap();
    let none = format!("{}.{payload}.", b64url(r#"{"alg":"none","typ":"JWT"}"#));
    refused(
        call(Some(bearer(&none))).await,
        Code::Unauthenticated,
        "alg none",
        &[&none],
    );

    // Algorithm confusion: HS256 keyed with the issuer's public key.
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some(fx.issuer.kid().to_owned());
    let claims_json: serde_json::Value = jsonwebtoken::dangerous::insecure_decode(&real)
        .unwrap()
        .claims;
    let hs = jsonwebtoken::encode(
        &header,
        &claims_json,
        &jsonwebtoken::EncodingKey::from_secret(fx.issuer.public_key_pem().as_bytes()),
    )
    .unwrap();
    refused(
        call(Some(bearer(&hs))).await,
        Code::Unauthenticated,
        "\"HS256\" is not accepted",
        &[&hs],
    );

    // Unknown kid, and an unknown key without a kid.
    let stranger = TokenIssuer::generate(TokenAlgorithm::Es256).unwrap();
    let t = stranger.mint(&claims()).unwrap();
    refused(
        call(Some(bearer(&t))).await,
        Code::Unauthenticated,
        "unknown signing key id",
        &[&t],
    );
    let mut c = claims();
    c.kid = Some(String::new());
    let t = stranger.mint(&c).unwrap();
    refused(
        call(Some(bearer(&t))).await,
        Code::Unauthenticated,
        "unknown signing key",
        &[&t],
    );
    // Our kid, someone else's key.
    let mut c = claims();
    c.kid = Some(fx.issuer.kid().to_owned());
    let t = stranger.mint(&c).unwrap();
    refused(
        call(Some(bearer(&t))).await,
        Code::Unauthenticated,
        "signature does not verify",
        &[&t],
    );

    let mut c = claims();
    c.subject = "system:node:node-a".into();
    let t = fx.issuer.mint(&c).unwrap();
    refused(
        call(Some(bearer(&t))).await,
        Code::Unauthenticated,
        "is not a service account",
        &[&t],
    );

    let mut c = claims();
    c.pod = None;
    let t = fx.issuer.mint(&c).unwrap();
    refused(
        call(Some(bearer(&t))).await,
        Code::Unauthenticated,
        "not bound to a pod",
        &[&t],
    );

    let mut c = claims();
    c.pod = Some(("web-0".into(), "uid-of-a-deleted-pod".into()));
    let t = fx.issuer.mint(&c).unwrap();
    refused(
        call(Some(bearer(&t))).await,
        Code::Unauthenticated,
        "is not running",
        &[&t],
    );
}

fn b64url(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

/// istiod answers refusals opaquely ("request authenticate failure"): the
/// caller learns the category and a request id, the CA's log has the
/// detail (pod names, UIDs, nodes) under that id.
#[tokio::test]
async fn refusals_tell_a_category_and_a_request_id_not_registry_facts() {
    let fx = Fixture::start().await;
    let csr = key().csr_for(&id("default", "web")).unwrap();
    let web = "spiffe://cluster.local/ns/default/sa/web";
    let now = SystemTime::now();
    let mint = |edit: &dyn Fn(&mut meshid_ca::TokenClaims)| {
        let mut c = fx.claims("default", "web-0");
        edit(&mut c);
        bearer(&fx.issuer.mint(&c).unwrap())
    };
    let gone = mint(&|c| c.pod = Some(("web-0".into(), "uid-of-a-deleted-pod".into())));
    let expired = mint(&|c| {
        c.issued_at = now - Duration::from_secs(7200);
        c.not_before = Some(c.issued_at);
        c.expires_at = now - Duration::from_secs(3600);
    });
    let audience = mint(&|c| c.audiences = vec!["elsewhere".into()]);
    let zt_b = bearer(&fx.token("istio-system", "ztunnel-b"));
    let db = bearer(&fx.token("default", "db-0"));
    let web_token = bearer(&fx.token("default", "web-0"));
    let db_csr = key().csr_for(&id("default", "db")).unwrap();
    let cases = [
        (
            fx.call(&csr, 60, Some(&gone), |_| {}).await,
            "request authenticate failure: token invalidated",
            "pod default/web-0 (uid uid-of-a-deleted-pod) is not running",
        ),
        (
            fx.call(&csr, 60, Some(&expired), |_| {}).await,
            "request authenticate failure: token expired",
            "the token has expired",
        ),
        (
            fx.call(&csr, 60, Some(&audience), |_| {}).await,
            "request authenticate failure: token audience not accepted",
            "wrong audience",
        ),
        (
            fx.call(&csr, 60, Some(&zt_b), impersonate(web)).await,
            "request impersonation authentication failure: identity not allowed",
            "no pod of service account default/web runs on node \"node-b\"",
        ),
        (
            fx.call(&csr, 60, Some(&db), impersonate(web)).await,
            "request impersonation authentication failure: not allowed to impersonate",
            "default/db is not a trusted node account",
        ),
        (
            fx.call(&db_csr, 60, Some(&web_token), |_| {}).await,
            "CSR identity not allowed",
            "the CSR asks for spiffe://cluster.local/ns/default/sa/db",
        ),
        (
            fx.call(&csr, 60, Some(&web_token), |r| {
                r.metadata_mut()
                    .insert("clusterid", "cluster-2".parse().unwrap());
            })
            .await,
            "request authenticate failure: cluster id not accepted",
            "unknown clusterid \"cluster-2\"",
        ),
    ];
    for (result, category, detail) in cases {
        let status = result.expect_err(category);
        assert!(
            status.message().starts_with(category),
            "{:?} should start with {category:?}",
            status.message()
        );
        support::check_opaque(status.message(), category, detail);
    }

    // A sane caller-supplied x-request-id is kept; anything else is replaced.
    let with_id = |value: &'static str| {
        move |r: &mut tonic::Request<meshid_common::proto::istio_ca::IstioCertificateRequest>| {
            r.metadata_mut()
                .insert("x-request-id", value.parse().unwrap());
        }
    };
    let status = fx
        .call(&csr, 60, Some(&gone), with_id("req-42.a_b:c"))
        .await
        .unwrap_err();
    assert!(
        status.message().ends_with("(request id req-42.a_b:c)"),
        "{status:?}"
    );
    assert_eq!(
        status.metadata().get("x-request-id").unwrap(),
        "req-42.a_b:c"
    );
    let status = fx
        .call(&csr, 60, Some(&gone), with_id("<script> and more"))
        .await
        .unwrap_err();
    let id = support::request_id_of(status.message());
    assert_eq!(id.len(), 32, "{status:?}");
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{status:?}");
    assert!(!status.message().contains("script"), "{status:?}");

    // A success carries its request id too.
    let mut request =
        tonic::Request::new(meshid_common::proto::istio_ca::IstioCertificateRequest {
            csr: csr.clone(),
            validity_duration: 60,
            metadata: None,
        });
    request
        .metadata_mut()
        .insert("authorization", web_token.parse().unwrap());
    with_id("ok-1")(&mut request);
    let ok = fx.client().raw().create_certificate(request).await.unwrap();
    assert_eq!(ok.metadata().get("x-request-id").unwrap(), "ok-1");
}

// ---------------------------------------------------------------- impersonation and cluster

fn impersonate(
    target: &str,
) -> impl FnOnce(&mut tonic::Request<meshid_common::proto::istio_ca::IstioCertificateRequest>) + '_
{
    move |req| {
        req.get_mut().metadata = Some(prost_types::Struct {
            fields: [(
                IMPERSONATED_IDENTITY_KEY.to_owned(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(target.to_owned())),
                },
            )]
            .into(),
        });
    }
}

#[tokio::test]
async fn impersonation_refusals_are_unauthenticated_and_say_why() {
    let fx = Fixture::start().await;
    let web = "spiffe://cluster.local/ns/default/sa/web";
    let csr = key().csr_for(&id("default", "web")).unwrap();

    let db_token = fx.token("default", "db-0");
    refused(
        fx.call(&csr, 60, Some(&bearer(&db_token)), impersonate(web))
            .await,
        Code::Unauthenticated,
        "default/db is not a trusted node account",
        &[&db_token],
    );

    // ztunnel of node-b: web runs on node-a.
    let zt_b = fx.token("istio-system", "ztunnel-b");
    refused(
        fx.call(&csr, 60, Some(&bearer(&zt_b)), impersonate(web))
            .await,
        Code::Unauthenticated,
        "no pod of service account default/web runs on node \"node-b\"",
        &[&zt_b],
    );

    let zt_a = fx.token("istio-system", "ztunnel-a");
    refused(
        fx.call(
            &csr,
            60,
            Some(&bearer(&zt_a)),
            impersonate("spiffe://cluster.local/ns/../sa/web"),
        )
        .await,
        Code::Unauthenticated,
        "not a valid SPIFFE ID",
        &[&zt_a],
    );
    refused(
        fx.call(&csr, 60, Some(&bearer(&zt_a)), impersonate("web"))
            .await,
        Code::Unauthenticated,
        "not a valid SPIFFE ID",
        &[&zt_a],
    );
    // The CSR must ask for the impersonated identity (or nothing).
    let zt_csr = key().csr_for(&id("istio-system", "ztunnel")).unwrap();
    refused(
        fx.call(&zt_csr, 60, Some(&bearer(&zt_a)), impersonate(web))
            .await,
        Code::InvalidArgument,
        "may only get spiffe://cluster.local/ns/default/sa/web",
        &[&zt_a],
    );
}

#[tokio::test]
async fn an_unknown_clusterid_is_unauthenticated() {
    let fx = Fixture::start().await;
    let token = fx.token("default", "web-0");
    let csr = key().csr_for(&id("default", "web")).unwrap();
    refused(
        fx.call(&csr, 60, Some(&bearer(&token)), |r| {
            r.metadata_mut()
                .insert("clusterid", "cluster-2".parse().unwrap());
        })
        .await,
        Code::Unauthenticated,
        "unknown clusterid \"cluster-2\"",
        &[&token],
    );
    for ok in ["Kubernetes", ""] {
        fx.call(&csr, 60, Some(&bearer(&token)), |r| {
            r.metadata_mut().insert("clusterid", ok.parse().unwrap());
        })
        .await
        .unwrap();
    }
}

/// istiod reads `clusterid` in its Kubernetes JWT authenticator only: a
/// workload renewing with its current certificate is never refused for it,
/// and a configured cluster alias is this cluster.
#[tokio::test]
async fn clusterid_binds_tokens_only_and_accepts_aliases() {
    let fx = Fixture::start_with(TokenAlgorithm::Es256, &["--cluster-aliases", "old-name"]).await;
    let token = fx.token("default", "web-0");
    let web = id("default", "web");
    let csr = key().csr_for(&web).unwrap();
    fx.call(&csr, 60, Some(&bearer(&token)), |r| {
        r.metadata_mut()
            .insert("clusterid", "old-name".parse().unwrap());
    })
    .await
    .unwrap();

    let (svid, _) = fx
        .client()
        .sign(
            key(),
            &web,
            Duration::from_secs(600),
            CallOptions {
                token: Some(&token),
                impersonate: None,
            },
        )
        .await
        .unwrap();
    let mut config = fx.client().config().clone();
    config.cluster_id = Some("cluster-2".into());
    let by_cert = CaClient::with_client_certificate(config, &svid).unwrap();
    let (renewed, _) = by_cert
        .sign(
            key(),
            &web,
            Duration::from_secs(600),
            CallOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(renewed.id(), &web);
}

// ---------------------------------------------------------------- logs, metrics, health

#[tokio::test]
async fn no_token_or_key_appears_in_logs() {
    let fx = Fixture::start().await;
    let token = fx.token("default", "web-0");
    let k = key();
    let csr = k.csr_for(&id("default", "web")).unwrap();
    fx.call(&csr, 60, Some(&bearer(&token)), |_| {})
        .await
        .unwrap();
    let mut c = fx.claims("default", "web-0");
    c.audiences = vec!["nope".into()];
    let bad = fx.issuer.mint(&c).unwrap();
    let _ = fx.call(&csr, 60, Some(&bearer(&bad)), |_| {}).await;
    let logs = String::from_utf8_lossy(&support::captured_logs().lock().unwrap()).into_owned();
    assert!(
        logs.contains("certificate issued"),
        "the issuance is logged"
    );
    assert!(
        logs.contains("certificate request refused"),
        "the refusal is logged"
    );
    let sig = |t: &str| t.rsplit('.').next().unwrap().to_owned();
    for secret in [sig(&token), sig(&bad)] {
        assert!(!logs.contains(&secret), "a token signature is in the logs");
    }
    let ca_key = std::fs::read_to_string(fx.ca_dir().join("self-signed-ca-key.pem")).unwrap();
    let key_line = ca_key.lines().nth(1).unwrap();
    assert!(!logs.contains(key_line), "the CA key is in the logs");
    assert!(!logs.contains(k.to_pkcs8_pem().lines().nth(1).unwrap()));
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let code = out.split(' ').nth(1).unwrap().parse().unwrap();
    (code, out)
}

#[tokio::test]
async fn ready_metrics_and_grpc_health() {
    let fx = Fixture::start().await;
    let mon = fx.app().monitoring_addr();
    let token = fx.token("default", "web-0");
    let csr = key().csr_for(&id("default", "web")).unwrap();
    fx.call(&csr, 60, Some(&bearer(&token)), |_| {})
        .await
        .unwrap();
    let _ = fx.call(&csr, 60, None, |_| {}).await;
    let _ = fx.call("hello", 60, Some(&bearer(&token)), |_| {}).await;
    let other = key().csr_for(&id("default", "db")).unwrap();
    let _ = fx.call(&other, 60, Some(&bearer(&token)), |_| {}).await;
    eventually(5, "ready", || true).await;
    let (code, _) = http_get(mon, "/ready").await;
    assert_eq!(code, 200);
    let (code, body) = http_get(mon, "/metrics").await;
    assert_eq!(code, 200);
    assert!(!body.contains("error=\"authentication\""), "{body}");
    for needle in [
        "citadel_server_csr_count 4",
        "citadel_server_success_cert_issuance_count 1",
        "citadel_server_authentication_failure_count 1",
        // istiod's CA error types; authentication is counted apart.
        "citadel_server_csr_sign_err_count{error=\"CSR_ERROR\"} 2",
        "citadel_server_csr_parsing_err_count 1",
        "citadel_server_id_extraction_err_count 1",
        "citadel_server_root_cert_expiry_seconds",
        "citadel_server_root_cert_expiry_timestamp",
        "citadel_server_cert_chain_expiry_seconds",
        "citadel_server_cert_chain_expiry_timestamp",
        "meshid_ca_issuance_duration_seconds_count 4",
    ] {
        assert!(body.contains(needle), "{needle} missing from\n{body}");
    }
    assert_eq!(http_get(mon, "/nope").await.0, 404);

    let channel = tonic::transport::Channel::from_shared(format!(
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
    .connect()
    .await
    .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let answer = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "istio.v1.auth.IstioCertificateService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        answer.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
}

#[tokio::test]
async fn the_serving_certificate_names_istiod_and_configured_hosts() {
    let fx = Fixture::start_with(
        TokenAlgorithm::Es256,
        &["--server-name", "ca.meshid.test", "--revision", "canary"],
    )
    .await;
    let mut config = fx.client().config().clone();
    let token = fx.token("default", "web-0");
    // The names real clients dial, as istiod's certificate has them.
    for name in [
        "ca.meshid.test",
        "localhost",
        "istiod.istio-system.svc",
        "istiod.istio-system.svc.cluster.local",
        "istiod-remote.istio-system.svc",
        "istio-pilot.istio-system.svc",
        "istiod-canary.istio-system.svc",
        "istiod-canary.istio-system.svc.cluster.local",
    ] {
        config.server_name = name.into();
        CaClient::new(config.clone())
            .unwrap()
            .sign(
                key(),
                &id("default", "web"),
                Duration::from_secs(60),
                CallOptions {
                    token: Some(&token),
                    impersonate: None,
                },
            )
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    config.server_name = "not-the-ca.example".into();
    let err = CaClient::new(config)
        .unwrap()
        .sign(
            key(),
            &id("default", "web"),
            Duration::from_secs(60),
            CallOptions {
                token: Some(&token),
                impersonate: None,
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            CommonError::Ca {
                code: Code::Unavailable,
                ..
            }
        ),
        "{err}"
    );
}

// ---------------------------------------------------------------- persistence and rotation

#[tokio::test]
async fn a_restarted_ca_keeps_its_root() {
    let mut fx = Fixture::start().await;
    let token = fx.token("default", "web-0");
    let (before, _) = fx
        .client()
        .sign(
            key(),
            &id("default", "web"),
            Duration::from_secs(600),
            CallOptions {
                token: Some(&token),
                impersonate: None,
            },
        )
        .await
        .unwrap();
    fx.restart().await;
    let published = TrustBundle::from_pem(&fx.roots_pem()).unwrap();
    published
        .verify(before.chain(), Usage::ClientAuth, SystemTime::now())
        .unwrap();
    // And it still issues.
    fx.client()
        .sign(
            key(),
            &id("default", "web"),
            Duration::from_secs(600),
            CallOptions {
                token: Some(&token),
                impersonate: None,
            },
        )
        .await
        .unwrap();
}

fn plug(
    dir: &std::path::Path,
    root: &CertificateAuthority,
    inter: &CertificateAuthority,
    roots_pem: &str,
) {
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

#[tokio::test]
async fn a_plugged_in_ca_rotates_without_restart() {
    let (root_a, inter_a) = ca_pair("root-a");
    let (root_b, inter_b) = ca_pair("root-b");
    // Plug the first CA in before start.
    let mut fx = Fixture::start().await;
    fx.app.take().unwrap().shutdown().await;
    std::fs::remove_dir_all(fx.ca_dir()).unwrap();
    plug(&fx.ca_dir(), &root_a, &inter_a, &root_a.cert_pem());
    fx.restart().await;

    let token = fx.token("default", "web-0");
    let csr = key().csr_for(&id("default", "web")).unwrap();
    let chain = fx
        .call(&csr, 600, Some(&bearer(&token)), |_| {})
        .await
        .unwrap();
    assert_eq!(chain.len(), 3, "[leaf, intermediate, roots]");
    assert_eq!(chain[1], inter_a.cert_pem());
    assert_eq!(chain[2], root_a.cert_pem());

    // An unrelated root is refused: the CA keeps signing with A.
    plug(&fx.ca_dir(), &root_b, &inter_b, &root_b.cert_pem());
    tokio::time::sleep(Duration::from_millis(600)).await;
    let chain = fx
        .call(&csr, 600, Some(&bearer(&token)), |_| {})
        .await
        .unwrap();
    assert_eq!(
        chain[1],
        inter_a.cert_pem(),
        "a jump to an unrelated root is refused"
    );
    let logs = String::from_utf8_lossy(&support::captured_logs().lock().unwrap()).into_owned();
    assert!(
        logs.contains("neither a superset nor a subset"),
        "the refusal is logged"
    );

    // A superset (both roots) with B signing is taken without a restart.
    let both = format!("{}{}", root_a.cert_pem(), root_b.cert_pem());
    plug(&fx.ca_dir(), &root_b, &inter_b, &both);
    let mut rotated = None;
    for _ in 0..60 {
        let chain = fx.call(&csr, 600, Some(&bearer(&token)), |_| {}).await;
        if let Ok(chain) = chain
            && chain[1] == inter_b.cert_pem()
        {
            rotated = Some(chain);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let chain = rotated.expect("the new signing CA is used");
    let bundle = TrustBundle::from_pem(chain.last().unwrap()).unwrap();
    assert_eq!(bundle.roots().len(), 2);
    eventually(5, "the published roots", || {
        TrustBundle::from_pem(&std::fs::read_to_string(fx.path("root-cert.pem")).unwrap())
            .map(|b| b.roots().len() == 2)
            .unwrap_or(false)
    })
    .await;
    // The serving certificate now chains to B, which clients learn from the
    // published bundle.
    let fresh = fx.client();
    fresh
        .sign(
            key(),
            &id("default", "web"),
            Duration::from_secs(60),
            CallOptions {
                token: Some(&token),
                impersonate: None,
            },
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn bad_ca_directories_refuse_to_start() {
    let mut fx = Fixture::start().await;
    fx.app.take().unwrap().shutdown().await;
    // Self-signed key readable by others.
    use std::os::unix::fs::PermissionsExt;
    let key_path = fx.ca_dir().join("self-signed-ca-key.pem");
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = meshid_ca::App::build(fx.config()).await.unwrap_err();
    assert!(
        err.to_string().contains("readable by group or others"),
        "{err}"
    );

    // A partial plugged-in set.
    std::fs::remove_dir_all(fx.ca_dir()).unwrap();
    let (root, inter) = ca_pair("root");
    plug(&fx.ca_dir(), &root, &inter, &root.cert_pem());
    std::fs::remove_file(fx.ca_dir().join("root-cert.pem")).unwrap();
    let err = meshid_ca::App::build(fx.config()).await.unwrap_err();
    assert!(err.to_string().contains("root-cert.pem"), "{err}");
}

// ---------------------------------------------------------------- files followed at run time

/// Calls until the CA accepts (or 5 s pass); returns the last result.
async fn until_ok(fx: &Fixture, csr: &str, auth: &str) -> Result<Vec<String>, tonic::Status> {
    let mut last = fx.call(csr, 60, Some(auth), |_| {}).await;
    for _ in 0..100 {
        if last.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        last = fx.call(csr, 60, Some(auth), |_| {}).await;
    }
    last
}

#[tokio::test]
async fn a_rotated_jwks_is_used_without_restart() {
    let fx = Fixture::start().await;
    let next = TokenIssuer::generate(TokenAlgorithm::Rs256).unwrap();
    let t = next.mint(&fx.claims("default", "web-0")).unwrap();
    let csr = key().csr_for(&id("default", "web")).unwrap();
    refused(
        fx.call(&csr, 60, Some(&bearer(&t)), |_| {}).await,
        Code::Unauthenticated,
        "unknown signing key id",
        &[&t],
    );
    TokenIssuer::write_jwks(&fx.path("jwks.json"), &[&fx.issuer, &next]).unwrap();
    until_ok(&fx, &csr, &bearer(&t))
        .await
        .expect("the new key is trusted");
    // The old key too, while it is in the set.
    fx.call(
        &csr,
        60,
        Some(&bearer(&fx.token("default", "web-0"))),
        |_| {},
    )
    .await
    .unwrap();
    // A broken JWKS keeps the last good keys.
    std::fs::write(fx.path("jwks.json"), "{ not json").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    fx.call(&csr, 60, Some(&bearer(&t)), |_| {}).await.unwrap();
}

#[tokio::test]
async fn a_new_pod_authenticates_once_registered() {
    let mut fx = Fixture::start().await;
    fx.registry
        .upsert_workload(support::pod("api-0", "apps", "api", "node-b"));
    let t = fx.token("apps", "api-0");
    let csr = key().csr_for(&id("apps", "api")).unwrap();
    refused(
        fx.call(&csr, 60, Some(&bearer(&t)), |_| {}).await,
        Code::Unauthenticated,
        "pod apps/api-0",
        &[&t],
    );
    fx.write_registry();
    until_ok(&fx, &csr, &bearer(&t))
        .await
        .expect("the registered pod authenticates");
    // And the node agent of node-b may now act for it.
    let zt_b = fx.token("istio-system", "ztunnel-b");
    fx.call(
        &csr,
        60,
        Some(&bearer(&zt_b)),
        impersonate("spiffe://cluster.local/ns/apps/sa/api"),
    )
    .await
    .unwrap();
}

/// Serves `body` at every path over plain HTTP/1.1.
async fn serve_jwks(body: String) -> std::net::SocketAddr {
    serve_jwks_from(Arc::new(Mutex::new(body)), Arc::default()).await
}

/// Serves the current `body` at every path, counting requests in `fetches`.
async fn serve_jwks_from(
    body: Arc<Mutex<String>>,
    fetches: Arc<std::sync::atomic::AtomicUsize>,
) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let body = body.clone();
            let fetches = fetches.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req| {
                    fetches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let body = body.lock().unwrap().clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(hyper::body::Bytes::from(body)),
                        ))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    addr
}

/// A signer that moved to a new key: the first token naming the new key id
/// makes the CA fetch the JWKS URL again at once, not at the next refresh;
/// a second unknown id within the gap costs no fetch.
#[tokio::test]
async fn a_token_with_a_new_key_id_makes_the_jwks_url_be_fetched_again() {
    use std::sync::atomic::Ordering::SeqCst;
    let old = TokenIssuer::generate(TokenAlgorithm::Es256).unwrap();
    let body = Arc::new(Mutex::new(old.jwks_json()));
    let fetches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let addr = serve_jwks_from(body.clone(), fetches.clone()).await;
    let url = format!("http://{addr}/openid/v1/jwks");
    let mut fx = Fixture::start_with(
        TokenAlgorithm::Es256,
        &["--jwks-url", &url, "--jwks-refresh-interval", "1h"],
    )
    .await;
    assert_eq!(fetches.load(SeqCst), 1, "fetched once at start");
    let new = TokenIssuer::generate(TokenAlgorithm::Es256).unwrap();
    *body.lock().unwrap() = new.jwks_json();
    fx.issuer = new;
    let csr = key().csr_for(&id("default", "web")).unwrap();
    let token = fx.token("default", "web-0");
    fx.call(&csr, 60, Some(&bearer(&token)), |_| {})
        .await
        .expect("the new key is fetched for the token that names it");
    assert_eq!(fetches.load(SeqCst), 2);

    // Another unknown key id right after: refused, and no fetch.
    fx.issuer = TokenIssuer::generate(TokenAlgorithm::Es256).unwrap();
    let token = fx.token("default", "web-0");
    let status = fx
        .call(&csr, 60, Some(&bearer(&token)), |_| {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(
        status.message().contains("token signing key unknown"),
        "{status:?}"
    );
    assert_eq!(fetches.load(SeqCst), 2, "at most one fetch per gap");
}

#[tokio::test]
async fn a_jwks_can_come_from_a_url() {
    let issuer = TokenIssuer::generate(TokenAlgorithm::Es256).unwrap();
    let addr = serve_jwks(issuer.jwks_json()).await;
    let url = format!("http://{addr}/openid/v1/jwks");
    let mut fx = Fixture::start_with(TokenAlgorithm::Es256, &["--jwks-url", &url]).await;
    fx.issuer = issuer;
    let token = fx.token("default", "web-0");
    let csr = key().csr_for(&id("default", "web")).unwrap();
    fx.call(&csr, 60, Some(&bearer(&token)), |_| {})
        .await
        .unwrap();

    // A URL that does not answer stops the start with a clear error.
    let mut config = fx.config();
    config.jwks_url = Some("http://127.0.0.1:1/jwks".into());
    let err = meshid_ca::App::build(config).await.unwrap_err();
    assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
}

/// After an istiod restart every workload's next CSR should go through as
/// soon as the CA listens again: the client's connection, broken by the
/// stop and refused while the CA was away, is re-established by the next
/// call, with no reconnect backoff of its own. (Measured here: about 4 ms
/// from the CA's return to the first certificate.)
#[tokio::test]
async fn a_client_reaches_a_restarted_ca_promptly() {
    let mut fx = Fixture::start().await;
    let token = fx.token("default", "web-0");
    let client = fx.client();
    let addr = fx.app().grpc_addr();
    let web = id("default", "web");
    let sign = || {
        client.sign(
            key(),
            &web,
            Duration::from_secs(600),
            CallOptions {
                token: Some(&token),
                impersonate: None,
            },
        )
    };
    sign().await.expect("the first certificate");

    fx.app.take().unwrap().shutdown().await;
    // A worker retrying through a short outage, every 20 ms.
    let outage_end = std::time::Instant::now() + Duration::from_millis(500);
    let mut refused = 0;
    while std::time::Instant::now() < outage_end {
        let err = sign().await.expect_err("no CA is listening");
        assert!(
            matches!(
                err,
                CommonError::Ca {
                    code: Code::Unavailable,
                    ..
                }
            ),
            "{err}"
        );
        refused += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused > 5, "only {refused} calls in the outage");

    let mut config = fx.config();
    config.grpc_addr = addr;
    fx.app = Some(
        meshid_ca::App::build(config)
            .await
            .expect("the CA starts again"),
    );
    let back = std::time::Instant::now();
    let mut calls = 0;
    let took = loop {
        calls += 1;
        if sign().await.is_ok() {
            break back.elapsed();
        }
        assert!(
            back.elapsed() < Duration::from_secs(10),
            "no certificate 10 s after the CA's return ({calls} calls)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        took < Duration::from_millis(500),
        "the first certificate came {took:?} after the CA's return ({calls} calls every 20 ms)"
    );
}
