//! meshid-fuzz holds the bodies of the libFuzzer targets: each public
//! function takes the fuzzer's bytes and runs them through the code a peer's
//! bytes reach first in a meshid component — the same functions the servers
//! call, never a copy. `fuzz_targets/<name>.rs` is the libFuzzer entry of the
//! function `<name>`; `corpus/<name>/` holds its committed seeds, made from
//! real inputs by [`seeds`]. A function may return early on input the
//! transport would already refuse (bytes that are not a header value, say);
//! it panics only where the code under test would crash a server, or where
//! an invariant it states is broken.
//!
//! The targets:
//! - [`spiffe_id`]: `SpiffeId::parse` and what callers do with an ID.
//! - [`csr`]: the CA's CSR checks (`meshid_ca::server::check_csr`) and the
//!   signing of the key of a CSR that passes.
//! - [`sds_request`]: a `DiscoveryRequest` decoded as tonic decodes it, then
//!   the agent's request checks and resource-name handling.
//! - [`hbone_connect`]: the ztunnel's HBONE request head (`parse_connect`),
//!   `forwarded`, `traceparent`, and the PROXY v1 line of its plaintext port.
//! - [`jwt_ca`]: a bearer token through the CA's JWT authenticator (header,
//!   key choice, signature, claims, pod lookup); half the inputs are claims
//!   the fixture issuer signs, to reach the checks after the signature.
//! - [`jwt_svid`]: the agent's `ValidateJWTSVID` on a token (raw, or claims
//!   signed by the fixture trust domain's key).
//! - [`registry`]: the workload registry file parser.

use std::sync::{Arc, OnceLock};

use meshid_ca::authn::jwt::{Jwks, JwksSource, JwtAuthenticator};
use meshid_ca::authn::{Authenticator, Authn};
use meshid_ca::authz::Authorizer;
use meshid_ca::directory::RegistryDirectory;
use meshid_ca::token::{TokenAlgorithm, TokenIssuer};
use meshid_common::SpiffeId;
use meshid_common::registry::{Node, Registry, RegistryWatcher, Workload};
use meshid_common::testing::TestPki;

pub mod seeds;

/// The trust domain of every fixture.
pub const TRUST_DOMAIN: &str = "cluster.local";
/// A trust domain alias the CA accepts in CSRs.
pub const ALIAS: &str = "old.example";
/// The live pod the CA's directory knows.
pub const POD: (&str, &str, &str, &str) = ("default", "web", "web-0", "uid-web-0");
/// Its node.
pub const NODE: &str = "node-a";
/// The audience the CA expects.
pub const AUDIENCE: &str = "istio-ca";

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
    })
}

/// What the CA and agent targets share: built once per process.
pub struct Fixture {
    pub issuer: TokenIssuer,
    pub authn: Authn,
    pub authz: Authorizer,
    pub pki: TestPki,
    pub identity: SpiffeId,
    pub agent: Arc<meshid_agent::jwt::JwtSvids>,
    _creds: tokio::sync::watch::Sender<Option<meshid_common::Credentials>>,
    _token_dir: TempDir,
}

/// A directory removed on drop (the fixture lives until exit, so this only
/// matters for tests; libFuzzer exits without dropping statics).
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The registry the CA's directory reads: one pod on one node.
pub fn fixture_registry() -> Registry {
    let (namespace, sa, name, uid) = POD;
    Registry {
        workloads: vec![Workload {
            name: name.into(),
            namespace: namespace.into(),
            service_account: sa.into(),
            node: NODE.into(),
            uid: uid.into(),
            address: Some("10.0.0.7:8080".into()),
            mode: Some("sidecar".into()),
        }],
        nodes: vec![Node {
            name: NODE.into(),
            uid: format!("uid-{NODE}"),
        }],
    }
}

/// The agent's view of the CA for JWT-SVIDs: the bundle is the fixture
/// issuer's JWKS; nothing is ever minted or signed.
#[derive(Debug)]
struct BundleSource {
    jwks: Vec<u8>,
}

impl meshid_agent::CertificateSource for BundleSource {
    fn sign(
        &self,
        _req: meshid_agent::SignRequest,
    ) -> futures::future::BoxFuture<'_, meshid_common::Result<Vec<String>>> {
        Box::pin(async { Ok(Vec::new()) })
    }
}

impl meshid_agent::JwtSource for BundleSource {
    fn jwt_bundle(
        &self,
        _token: meshid_common::identity::Token,
    ) -> futures::future::BoxFuture<'_, meshid_common::Result<meshid_common::ca_client::JwtBundle>>
    {
        let bundle = meshid_common::ca_client::JwtBundle {
            trust_domain: TRUST_DOMAIN.into(),
            jwks: self.jwks.clone(),
        };
        Box::pin(async move { Ok(bundle) })
    }
}

pub fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        meshid_common::tls::install_crypto_provider();
        let issuer = TokenIssuer::generate(TokenAlgorithm::Es256).expect("a token issuer");
        let jwks = Jwks::parse(&issuer.jwks_json(), "fuzz").expect("the issuer's JWKS");
        let directory = Arc::new(RegistryDirectory::new(RegistryWatcher::fixed(
            fixture_registry(),
        )));
        let jwt: Arc<dyn Authenticator> = Arc::new(JwtAuthenticator::new(
            TRUST_DOMAIN.into(),
            meshid_ca::config::DEFAULT_TOKEN_ISSUER.into(),
            vec![AUDIENCE.into()],
            JwksSource::fixed(jwks),
            directory.clone(),
        ));
        let authn = Authn::new(vec![jwt]);
        let authz = Authorizer::new(TRUST_DOMAIN.into(), Vec::new(), Some(directory))
            .with_trust_domain_aliases(vec![ALIAS.into()]);
        let pki = TestPki::new(TRUST_DOMAIN).expect("a test PKI");
        let identity = SpiffeId::for_service_account(TRUST_DOMAIN, POD.0, POD.1).expect("an ID");
        let token_dir =
            TempDir(std::env::temp_dir().join(format!("meshid-fuzz-{}", std::process::id())));
        std::fs::create_dir_all(&token_dir.0).expect("a token directory");
        let token_path = token_dir.0.join("token");
        std::fs::write(&token_path, "fuzz").expect("a token file");
        let (creds, rx) = tokio::sync::watch::channel(None);
        let source = Arc::new(BundleSource {
            jwks: issuer.jwks_json().into_bytes(),
        });
        let agent = runtime().block_on(async {
            meshid_agent::jwt::JwtSvids::new(
                identity.clone(),
                source,
                meshid_common::identity::TokenFile::new(&token_path),
                rx,
                tokio_util::sync::CancellationToken::new(),
            )
        });
        Fixture {
            issuer,
            authn,
            authz,
            pki,
            identity,
            agent,
            _creds: creds,
            _token_dir: token_dir,
        }
    })
}

/// `SpiffeId::parse`, and the invariants callers rely on: a parsed ID
/// re-parses to itself, is within the spec's limits, and a service-account
/// ID rebuilds from its parts.
pub fn spiffe_id(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = meshid_common::TrustDomain::new(text);
    let Ok(id) = SpiffeId::parse(text) else {
        return;
    };
    assert!(id.as_str().len() <= 2048, "{id} is longer than 2048 bytes");
    assert_eq!(SpiffeId::parse(id.as_str()).ok().as_ref(), Some(&id));
    assert!(id.is_member_of(id.trust_domain()));
    let _ = id.path();
    let _ = id.namespace();
    if let Some((ns, sa)) = id.service_account() {
        let rebuilt = SpiffeId::for_service_account(id.trust_domain(), ns, sa)
            .expect("the parts of a valid ID make a valid ID");
        assert_eq!(rebuilt, id);
    }
    if let Ok(moved) = id.with_trust_domain(ALIAS) {
        assert_eq!(moved.path(), id.path());
    }
}

/// The CA on a CSR: the first byte picks the form, `0` PEM text as it
/// arrives in `IstioCertificateRequest.csr`, anything else DER (wrapped in
/// PEM here, so the fuzzer mutates the structure rather than base64). A CSR
/// that passes is signed, as `CreateCertificate` would.
pub fn csr(data: &[u8]) {
    let Some((&form, body)) = data.split_first() else {
        return;
    };
    let pem = if form == 0 {
        match std::str::from_utf8(body) {
            Ok(text) => text.to_owned(),
            Err(_) => return,
        }
    } else {
        meshid_common::keys::pem_encode("CERTIFICATE REQUEST", body)
    };
    let f = fixture();
    let Ok(parsed) = meshid_ca::server::check_csr(&pem, &f.identity, &f.authz, TRUST_DOMAIN) else {
        return;
    };
    let leaf = f
        .pki
        .signer()
        .issue_leaf(
            &parsed.public_key_spki,
            &f.identity,
            std::time::Duration::from_secs(3600),
            std::time::SystemTime::now(),
        )
        .expect("the key of a CSR whose signature verified can be certified");
    let info = meshid_common::CertInfo::from_der(&leaf).expect("an issued leaf parses");
    assert_eq!(info.spiffe_id.as_ref(), Some(&f.identity));
}

/// An SDS request as the agent gets it: protobuf bytes decoded as tonic
/// decodes a `DiscoveryRequest`, then the checks and the name handling of a
/// stream's first request (and of a later one, which needs no node). File
/// secrets are allowed under a directory that does not exist, so names
/// reach the path checks without reading anything but the OS trust store.
pub fn sds_request(data: &[u8]) {
    use prost::Message;
    let Ok(req) = meshid_common::proto::discovery::DiscoveryRequest::decode(data) else {
        return;
    };
    let allow = meshid_agent::sds_files::FileAllow::new([std::path::PathBuf::from(
        "/nonexistent/meshid-fuzz",
    )]);
    for need_node in [true, false] {
        if let Ok(names) = meshid_agent::sds::inspect_request(&req, need_node, &allow) {
            assert_eq!(names.len(), req.resource_names.len());
            for (name, served) in names {
                // The OS trust store is always allowed (as pilot-agent);
                // nothing else is, since the allowed directory is absent.
                if let Ok(true) = served
                    && name != meshid_common::sds::FILE_ROOT_SYSTEM
                {
                    panic!("file secret {name:?} served from outside the allowed directory");
                }
            }
        }
    }
}

/// An HBONE request head as the ztunnel's HBONE server reads it. The input
/// is lines: the method, the URI (the `:authority` of a CONNECT), then
/// `name: value` headers; a head `http` would not build is one h2 refuses
/// before the ztunnel sees it. The whole input is also the first line of a
/// plaintext connection (PROXY v1).
pub fn hbone_connect(data: &[u8]) {
    let _ = meshid_ztunnel::inbound::parse_proxy_v1(data);
    let mut lines = data.split(|b| *b == b'\n');
    let (Some(method), Some(uri)) = (lines.next(), lines.next()) else {
        return;
    };
    let Ok(method) = http::Method::from_bytes(method) else {
        return;
    };
    let Ok(uri) = http::Uri::try_from(uri) else {
        return;
    };
    let mut builder = http::Request::builder().method(method).uri(uri);
    for line in lines {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(&line[..colon]),
            http::HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        builder = builder.header(name, value);
    }
    let Ok(req) = builder.body(()) else {
        return;
    };
    let _ = meshid_common::telemetry::extract_http(req.headers());
    if let Ok(head) = meshid_ztunnel::inbound::parse_connect(&req) {
        assert_eq!(req.method(), http::Method::CONNECT);
        if let Some(forwarded) = head.forwarded.as_deref() {
            let _ = meshid_ztunnel::inbound::forwarded_for(forwarded);
        }
    }
}

/// A bearer token through the CA's authenticator chain. The first byte
/// picks the form: even, the rest is the token as sent; odd, the rest is a
/// JSON claims document that the fixture issuer signs, so the claim checks
/// after the signature (subject, `kubernetes.io`, the pod lookup) see the
/// fuzzer's values.
pub fn jwt_ca(data: &[u8]) {
    let Some((&form, body)) = data.split_first() else {
        return;
    };
    let f = fixture();
    let token = if form % 2 == 0 {
        match std::str::from_utf8(body) {
            Ok(t) => t.to_owned(),
            Err(_) => return,
        }
    } else {
        let Ok(claims) = serde_json::from_slice::<serde_json::Value>(body) else {
            return;
        };
        match f.issuer.sign_json(&claims) {
            Ok(t) => t,
            Err(_) => return,
        }
    };
    let Ok(value) = format!("Bearer {token}").parse::<tonic::metadata::MetadataValue<_>>() else {
        return;
    };
    let mut metadata = tonic::metadata::MetadataMap::new();
    metadata.insert("authorization", value);
    let result = runtime().block_on(f.authn.authenticate(&metadata, None));
    if let Ok(caller) = result {
        // Only the one live pod of the directory can authenticate.
        assert_eq!(caller.id, f.identity, "authenticated as {}", caller.id);
        assert_eq!(caller.pod.as_deref(), Some(POD.2));
    }
}

/// The agent's `ValidateJWTSVID` for audience [`seeds::SVID_AUDIENCE`]. The
/// first byte picks the form, as in [`jwt_ca`]: the token as sent, or claims
/// signed with the trust domain's JWT key (the bundle the agent holds).
pub fn jwt_svid(data: &[u8]) {
    let Some((&form, body)) = data.split_first() else {
        return;
    };
    let f = fixture();
    let token = if form % 2 == 0 {
        match std::str::from_utf8(body) {
            Ok(t) => t.to_owned(),
            Err(_) => return,
        }
    } else {
        let Ok(claims) = serde_json::from_slice::<serde_json::Value>(body) else {
            return;
        };
        match f.issuer.sign_json(&claims) {
            Ok(t) => t,
            Err(_) => return,
        }
    };
    let result = runtime().block_on(f.agent.validate(seeds::SVID_AUDIENCE, &token));
    if let Ok((id, claims)) = result {
        assert!(id.is_member_of(TRUST_DOMAIN), "{id} accepted");
        assert_eq!(
            claims.get("sub").and_then(|s| s.as_str()),
            Some(id.as_str())
        );
        let _ = meshid_agent::jwt::to_struct(claims);
    }
}

/// The workload registry file: a document that parses re-serialises to one
/// that parses the same, and every workload's identity and address helpers
/// take what the parser let through.
pub fn registry(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(registry) = Registry::parse(text, "fuzz") else {
        return;
    };
    let again =
        Registry::parse(&registry.to_json(), "fuzz (again)").expect("a parsed registry re-parses");
    assert_eq!(again, registry);
    for w in &registry.workloads {
        let _ = w.identity(TRUST_DOMAIN);
        let _ = w.ip();
        let _ = w.socket_addr();
        assert!(registry.pod(&w.namespace, &w.name).is_some());
        let _ = registry.service_account_on_node(&w.namespace, &w.service_account, &w.node);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Target = fn(&[u8]);

    const TARGETS: &[(&str, Target)] = &[
        ("spiffe_id", spiffe_id),
        ("csr", csr),
        ("sds_request", sds_request),
        ("hbone_connect", hbone_connect),
        ("jwt_ca", jwt_ca),
        ("jwt_svid", jwt_svid),
        ("registry", registry),
    ];

    /// Every committed seed (and every regression input under
    /// `regressions/<target>/`) runs through its target without a panic.
    #[test]
    fn committed_corpora_replay() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        for (name, target) in TARGETS {
            let mut count = 0;
            for dir in [
                root.join("corpus").join(name),
                root.join("regressions").join(name),
            ] {
                let Ok(entries) = std::fs::read_dir(&dir) else {
                    continue;
                };
                for entry in entries {
                    let path = entry.unwrap().path();
                    let data = std::fs::read(&path).unwrap();
                    eprintln!("{name}: {}", path.display());
                    target(&data);
                    count += 1;
                }
            }
            assert!(count >= 3, "{name}: only {count} seeds committed");
        }
    }

    /// The seeds still reach the deep end of their targets: a seed that
    /// the code under test accepts stays accepted (a refactor that made
    /// every seed bounce off a first check would make the fuzzing useless).
    #[test]
    fn seeds_reach_past_the_first_check() {
        let f = fixture();
        let key = meshid_common::PrivateKey::generate(meshid_common::KeyType::EcdsaP256).unwrap();
        let csr_pem = key.csr_for(&f.identity).unwrap();
        assert!(
            meshid_ca::server::check_csr(&csr_pem, &f.identity, &f.authz, TRUST_DOMAIN).is_ok()
        );
        let token = f.issuer.sign_json(&seeds::ca_claims()).unwrap();
        let mut md = tonic::metadata::MetadataMap::new();
        md.insert("authorization", format!("Bearer {token}").parse().unwrap());
        let caller = runtime()
            .block_on(f.authn.authenticate(&md, None))
            .expect("the seed claims authenticate");
        assert_eq!(caller.id, f.identity);
        let svid = f.issuer.sign_json(&seeds::svid_claims()).unwrap();
        let (id, _) = runtime()
            .block_on(f.agent.validate(seeds::SVID_AUDIENCE, &svid))
            .expect("the seed JWT-SVID validates");
        assert_eq!(id, f.identity);
    }

    /// `cargo test -- --ignored write_seeds` regenerates corpus/ from real
    /// inputs (see [`seeds`]).
    #[test]
    #[ignore]
    fn write_seeds() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
        seeds::write_all(&root).unwrap();
    }
}
