//! meshid-ca as a registration authority in front of a real OpenBao (`bao
//! server -dev -dev-tls`): issuance through Vault PKI (CSR with and without
//! a SAN), off-profile roles refused, the token file re-read, Vault sealed,
//! hung or gone answered UNAVAILABLE within the deadline, and a Vault root
//! rotation followed without a restart.
//!
//! Each test skips with a printed reason when `bao` is absent, unless `CI`
//! is set: then it fails.

use crate::support;

use std::time::{Duration, Instant, SystemTime};

use meshid_ca::vault::testing::DevBao;
use meshid_ca::{Config, TokenAlgorithm};
use meshid_common::cert::{CertInfo, parse_pem_certs};
use meshid_common::{KeyType, PrivateKey, SpiffeId, TrustBundle, Usage};
use support::{Fixture, TD, eventually};
use tonic::Code;

struct VaultCa {
    fx: Fixture,
    bao: DevBao,
    _dir: tempfile::TempDir,
}

async fn start(test: &str, extra: &[&str]) -> Option<VaultCa> {
    let (bao, dir) = start_bao(test).await?;
    let token_file = bao.token_file.display().to_string();
    Some(
        start_ca(
            bao,
            dir,
            &[&["--vault-token-file", token_file.as_str()], extra].concat(),
        )
        .await,
    )
}

async fn start_bao(test: &str) -> Option<(DevBao, tempfile::TempDir)> {
    let bin = DevBao::binary_or_skip(test)?;
    let dir = tempfile::tempdir().unwrap();
    let bao = DevBao::start(&bin, dir.path()).await.expect("bao starts");
    bao.setup_pki(TD, &Config::default().serving_dns_names())
        .await
        .expect("pki set up");
    Some((bao, dir))
}

async fn start_ca(bao: DevBao, dir: tempfile::TempDir, extra: &[&str]) -> VaultCa {
    let mut args = bao.ca_args();
    args.extend(
        [
            "--vault-roots-poll-interval",
            "200ms",
            "--vault-timeout",
            "2s",
        ]
        .iter()
        .chain(extra)
        .map(|s| s.to_string()),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let fx = Fixture::start_with(TokenAlgorithm::Es256, &args).await;
    VaultCa { fx, bao, _dir: dir }
}

fn web() -> SpiffeId {
    SpiffeId::for_service_account(TD, "default", "web").unwrap()
}

fn csr_with_uris(key: &PrivateKey, uris: &[&str]) -> String {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = uris
        .iter()
        .map(|u| rcgen::SanType::URI((*u).try_into().unwrap()))
        .collect();
    params.serialize_request(key).unwrap().pem().unwrap()
}

impl VaultCa {
    async fn issue(&self, csr: &str, ttl: i64) -> Result<Vec<String>, tonic::Status> {
        let token = format!("Bearer {}", self.fx.token("default", "web-0"));
        self.fx.call(csr, ttl, Some(&token), |_| {}).await
    }

    fn metrics(&self) -> String {
        let app = self.fx.app();
        app.metrics().render(app.signer().as_ref())
    }
}

/// Checks a chain as a workload would: leaf for `id` over `key`, BasicConstraints
/// cA=false, verifying to the published root file, root bundle last.
fn check_chain(chain: &[String], roots_pem: &str, id: &SpiffeId, key: &PrivateKey) -> CertInfo {
    assert!(chain.len() >= 2, "leaf and root bundle: {chain:?}");
    assert_eq!(chain.last().unwrap(), roots_pem, "root bundle last");
    let ders: Vec<_> = chain[..chain.len() - 1]
        .iter()
        .flat_map(|p| parse_pem_certs(p).unwrap())
        .collect();
    let bundle = TrustBundle::from_pem(roots_pem).unwrap();
    let info = bundle
        .verify(&ders, Usage::ClientAuth, SystemTime::now())
        .unwrap();
    assert_eq!(info.uri_sans, vec![id.to_string()]);
    assert!(!info.is_ca);
    assert_eq!(info.public_key_spki, key.public_key_spki());
    info
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_issues_the_authorized_identity_with_and_without_a_csr_san() {
    let Some(v) = start("vault_issues_the_authorized_identity", &[]).await else {
        return;
    };
    let roots = v.fx.roots_pem();
    assert_eq!(TrustBundle::from_pem(&roots).unwrap().roots().len(), 1);
    let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
    for uris in [vec![web().to_string()], vec![]] {
        let uris: Vec<&str> = uris.iter().map(String::as_str).collect();
        let chain = v
            .issue(&csr_with_uris(&key, &uris), 3600)
            .await
            .unwrap_or_else(|e| panic!("CSR SANs {uris:?}: {e:?}"));
        let info = check_chain(&chain, &roots, &web(), &key);
        let life = info.not_after.duration_since(SystemTime::now()).unwrap();
        assert!(life <= Duration::from_secs(3600 + 60), "{life:?}");
        assert!(life >= Duration::from_secs(3500), "{life:?}");
        // The SVID profile's BasicConstraints, from the role's option.
        let der = parse_pem_certs(&chain[0]).unwrap().remove(0);
        let text = format!("{:?}", x509_bc(&der));
        assert_eq!(text, "Some(false)");
    }
    // A CSR for someone else is still refused by the CA, before Vault.
    let other = SpiffeId::for_service_account(TD, "default", "db").unwrap();
    let err = v
        .issue(&csr_with_uris(&key, &[other.as_str()]), 3600)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // The CA's own serving certificate came from Vault: the client above
    // verified it against the Vault root alone.
    assert!(
        v.metrics()
            .contains("citadel_server_success_cert_issuance_count 2")
    );
}

fn x509_bc(der: &[u8]) -> Option<bool> {
    use x509_parser::prelude::{FromDer, ParsedExtension, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).unwrap();
    cert.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::BasicConstraints(bc) => Some(bc.ca),
            _ => None,
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_that_issues_off_profile_leaves_is_refused_internal_and_counted() {
    let Some(v) = start(
        "a_role_that_issues_off_profile_leaves",
        &["--trust-domain-aliases", "old.example"],
    )
    .await
    else {
        return;
    };
    let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
    let no_san_csr = csr_with_uris(&key, &[]);
    // A CSR in a trust-domain alias passes the CA (it is issued in the
    // primary trust domain) but a role that copies CSR SANs writes the alias.
    let alias_csr = csr_with_uris(&key, &["spiffe://old.example/ns/default/sa/web"]);
    let cases: [(serde_json::Value, &str, &str); 3] = [
        // Vault's default: the SAN comes from the CSR, which has none.
        (
            serde_json::json!({"use_csr_sans": true}),
            &no_san_csr,
            "URI SANs []",
        ),
        // Vault's default again: leaves without BasicConstraints.
        (
            serde_json::json!({"basic_constraints_valid_for_non_ca": false}),
            &no_san_csr,
            "BasicConstraints",
        ),
        // The wrong SAN: the alias, copied from the CSR.
        (
            serde_json::json!({"use_csr_sans": true,
                "allowed_uri_sans": "spiffe://cluster.local/*,spiffe://old.example/*"}),
            &alias_csr,
            "URI SANs [\"spiffe://old.example/ns/default/sa/web\"]",
        ),
    ];
    // (A leaf beyond the requested TTL or with cA=true cannot be had from
    // sign/<role> at all: check.rs's unit tests cover those.)
    for (n, (patch, csr, needle)) in cases.into_iter().enumerate() {
        v.bao.set_workload_role(TD, patch.clone()).await.unwrap();
        let started = Instant::now();
        let err = v.issue(csr, 3600).await.unwrap_err();
        assert_eq!(err.code(), Code::Internal, "{patch}: {err:?}");
        support::check_opaque(
            err.message(),
            "Vault issued a certificate outside the X.509-SVID profile",
            needle,
        );
        assert!(started.elapsed() < Duration::from_secs(3));
        let metrics = v.metrics();
        assert!(
            metrics.contains(&format!(
                "citadel_server_csr_sign_err_count{{error=\"OFF_PROFILE_CERT\"}} {}",
                n + 1
            )),
            "{metrics}"
        );
    }
    // The documented role issues again.
    v.bao
        .set_workload_role(TD, serde_json::json!({}))
        .await
        .unwrap();
    let chain = v.issue(&no_san_csr, 3600).await.unwrap();
    check_chain(&chain, &v.fx.roots_pem(), &web(), &key);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_file_is_read_again_when_it_changes() {
    let Some(v) = start("the_token_file_is_read_again", &[]).await else {
        return;
    };
    let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
    let csr = csr_with_uris(&key, &[]);
    v.issue(&csr, 600).await.expect("root token works");

    std::fs::write(&v.bao.token_file, "s.not-a-token").unwrap();
    let err = v.issue(&csr, 600).await.unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    support::check_opaque(
        err.message(),
        "Vault refused the request",
        "permission denied",
    );
    assert!(!err.message().contains("s.not-a-token"), "token echoed");

    // A token with exactly the documented policy.
    let token = v
        .bao
        .token_with_policy("meshid-ca", &DevBao::ca_policy("pki"), "1h")
        .await
        .unwrap();
    std::fs::write(&v.bao.token_file, format!("{token}\n")).unwrap();
    let chain = v.issue(&csr, 600).await.expect("the new token is used");
    check_chain(&chain, &v.fx.roots_pem(), &web(), &key);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_hung_or_stopped_vault_is_unavailable_within_the_deadline() {
    let Some(mut v) = start("sealed_hung_or_stopped_vault", &[]).await else {
        return;
    };
    let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
    let csr = csr_with_uris(&key, &[]);
    v.issue(&csr, 600).await.expect("issues");

    v.bao.seal().await.unwrap();
    let started = Instant::now();
    let err = v.issue(&csr, 600).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let id = support::check_opaque(err.message(), "Vault did not answer", "sealed");
    assert!(
        support::logged_under(&id)
            .iter()
            .any(|l| l.contains("Vault at https://127.0.0.1:")),
        "the log names the Vault address"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    v.bao.unseal().await.unwrap();
    v.issue(&csr, 600)
        .await
        .expect("issues again once unsealed");

    // Hung (SIGSTOP): the answer waits for --vault-timeout (2s), no longer.
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &v.bao.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    };
    signal("-STOP");
    let started = Instant::now();
    let err = v.issue(&csr, 600).await.unwrap_err();
    let waited = started.elapsed();
    signal("-CONT");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    support::check_opaque(err.message(), "Vault did not answer", "no answer within 2s");
    assert!(waited < Duration::from_secs(4), "{waited:?}");

    // Gone: refused connections are answered at once.
    v.bao.stop();
    let started = Instant::now();
    let err = v.issue(&csr, 600).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    support::check_opaque(err.message(), "Vault did not answer", "connect");
    assert!(started.elapsed() < Duration::from_secs(1));
    // /ready keeps saying ready: the roots in use are still valid and the
    // CA answers; the metric counts the outage as CA_NOT_READY.
    assert!(
        v.metrics()
            .contains("citadel_server_csr_sign_err_count{error=\"CA_NOT_READY\"} 3"),
        "{}",
        v.metrics()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vault_root_rotation_is_followed_without_a_restart() {
    let Some(v) = start("a_vault_root_rotation_is_followed", &[]).await else {
        return;
    };
    let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
    let csr = csr_with_uris(&key, &[]);
    let old_roots = v.fx.roots_pem();
    let old_chain = v.issue(&csr, 3600).await.unwrap();
    let old_issuer = v.bao.default_issuer().await.unwrap();
    let generation = v.fx.app().signer().roots().generation;

    v.bao.rotate_root("meshid test root 2").await.unwrap();
    let path = v.fx.path("root-cert.pem");
    eventually(10, "both roots published", || {
        std::fs::read_to_string(&path)
            .ok()
            .and_then(|p| TrustBundle::from_pem(&p).ok())
            .is_some_and(|b| b.roots().len() == 2)
    })
    .await;
    let both = v.fx.roots_pem();
    assert!(
        both.contains(old_roots.trim()),
        "the old root stays during overlap"
    );
    assert!(v.fx.app().signer().roots().generation > generation);

    // New leaves chain to the new root; the old leaf still verifies.
    let new_chain = v.issue(&csr, 3600).await.unwrap();
    check_chain(&new_chain, &both, &web(), &key);
    let new_root_only = TrustBundle::new(
        TrustBundle::from_pem(&both)
            .unwrap()
            .roots()
            .iter()
            .filter(|r| !old_roots.contains(meshid_common::cert::cert_to_pem(r).trim()))
            .cloned()
            .collect(),
    )
    .unwrap();
    let leaf = parse_pem_certs(&new_chain[0]).unwrap();
    new_root_only
        .verify(&leaf, Usage::ClientAuth, SystemTime::now())
        .expect("issued by the new root");
    let old_leaf = parse_pem_certs(&old_chain[0]).unwrap();
    TrustBundle::from_pem(&both)
        .unwrap()
        .verify(&old_leaf, Usage::ClientAuth, SystemTime::now())
        .expect("old leaves still trusted during overlap");

    // The CA's serving certificate follows too: a client trusting only the
    // new root connects (the serving certificate was re-issued).
    let mut only_new_ok = false;
    for _ in 0..40 {
        let config = meshid_common::ca_client::CaClientConfig::new(
            format!("https://127.0.0.1:{}", v.fx.app().grpc_addr().port()),
            new_root_only.to_pem(),
        );
        let client = meshid_common::ca_client::CaClient::new(config).unwrap();
        let mut request =
            tonic::Request::new(meshid_common::proto::istio_ca::IstioCertificateRequest {
                csr: csr.clone(),
                validity_duration: 600,
                metadata: None,
            });
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", v.fx.token("default", "web-0"))
                .parse()
                .unwrap(),
        );
        if client.raw().create_certificate(request).await.is_ok() {
            only_new_ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        only_new_ok,
        "the serving certificate did not move to the new root"
    );

    // Retiring the old issuer drops the old root from the bundle.
    v.bao.delete_issuer(&old_issuer).await.unwrap();
    eventually(10, "old root dropped", || {
        std::fs::read_to_string(&path)
            .ok()
            .and_then(|p| TrustBundle::from_pem(&p).ok())
            .is_some_and(|b| b.roots().len() == 1 && b == new_root_only)
    })
    .await;
}

/// A Kubernetes API server that only answers TokenReview: tokens it was
/// given are `istio-system/istiod`, anything else is unauthenticated.
struct FakeTokenReview {
    url: String,
    reviews: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    _drain: meshid_common::serve::Drain,
}

impl FakeTokenReview {
    async fn start(valid: Vec<String>) -> Self {
        use http_body_util::BodyExt;
        use meshid_common::serve::{AdminRouter, reply};
        let reviews = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = reviews.clone();
        let valid = std::sync::Arc::new(valid);
        let router = AdminRouter::new("fake-apiserver", || Ok(())).route(
            "/apis/authentication.k8s.io/v1/tokenreviews",
            move |req| {
                let (counter, valid) = (counter.clone(), valid.clone());
                async move {
                    counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    let review: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    let token = review["spec"]["token"].as_str().unwrap_or_default();
                    // As the API server: the audiences asked for (Vault passes
                    // the JWT's own) come back when the token is valid for them.
                    let status = if valid.iter().any(|t| t == token) {
                        serde_json::json!({"authenticated": true, "user": {
                            "username": "system:serviceaccount:istio-system:istiod",
                            "uid": "sa-istio-system-istiod",
                            "groups": ["system:serviceaccounts"]},
                            "audiences": review["spec"]["audiences"]})
                    } else {
                        serde_json::json!({"authenticated": false, "error": "unknown token"})
                    };
                    let answer = serde_json::json!({"apiVersion": "authentication.k8s.io/v1",
                        "kind": "TokenReview", "status": status});
                    reply(
                        http::StatusCode::CREATED,
                        "application/json",
                        serde_json::to_vec(&answer).unwrap(),
                    )
                }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let drain = meshid_common::serve::Drain::new();
        router.serve(listener, &drain);
        FakeTokenReview {
            url,
            reviews,
            _drain: drain,
        }
    }

    fn reviews(&self) -> usize {
        self.reviews.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_auth_logs_in_with_the_service_account_jwt_and_again_before_expiry() {
    let Some((bao, dir)) = start_bao("kubernetes_auth_logs_in").await else {
        return;
    };
    let issuer = meshid_ca::TokenIssuer::generate(TokenAlgorithm::Es256).unwrap();
    let jwt = issuer
        .mint(&meshid_ca::TokenClaims::for_pod(
            "istio-system",
            "istiod",
            "istiod-0",
            "uid-istiod-0",
            "node-a",
            "uid-node-a",
        ))
        .unwrap();
    let reviewer = FakeTokenReview::start(vec![jwt.clone()]).await;
    // Vault tokens of 9 s: the CA logs in again at two thirds (6 s), before
    // they expire.
    bao.enable_kubernetes_auth(&reviewer.url, "meshid-ca", "istio-system", "istiod", "9s")
        .await
        .unwrap();
    let jwt_file = dir.path().join("sa-token");
    std::fs::write(&jwt_file, &jwt).unwrap();
    let jwt_path = jwt_file.display().to_string();
    let v = start_ca(
        bao,
        dir,
        &[
            "--vault-auth",
            "kubernetes",
            "--vault-kube-role",
            "meshid-ca",
            "--vault-kube-jwt-file",
            jwt_path.as_str(),
        ],
    )
    .await;
    // The first login happened before this point, so its token expires
    // after `started + 9 s` and is renewed before `started + 6 s`.
    let started = Instant::now();
    let logins = reviewer.reviews();
    assert!(logins >= 1, "the CA logged in through the TokenReview");
    let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
    let csr = csr_with_uris(&key, &[]);
    // Issue for 12 s, past the first token's lease: never a failure, and a
    // second login before the first token expired (not after a 403).
    let mut relogin_before_expiry = None;
    let mut issued = 0;
    while started.elapsed() < Duration::from_secs(12) {
        let chain = v
            .issue(&csr, 600)
            .await
            .unwrap_or_else(|e| panic!("after {issued} certificates: {e:?}"));
        check_chain(&chain, &v.fx.roots_pem(), &web(), &key);
        issued += 1;
        if started.elapsed() >= Duration::from_secs(7) && relogin_before_expiry.is_none() {
            relogin_before_expiry = Some(reviewer.reviews() > logins);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        relogin_before_expiry,
        Some(true),
        "no second login 7 s into a 9 s token"
    );

    // A JWT the API server does not know: the next login fails, clearly.
    std::fs::write(&jwt_file, "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.").unwrap();
    tokio::time::sleep(Duration::from_secs(7)).await;
    let err = v.issue(&csr, 600).await.unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    support::check_opaque(
        err.message(),
        "Vault refused the request",
        "auth/kubernetes/login",
    );
}
