//! The committed seed corpora, made from real inputs: IDs, CSRs, SDS
//! requests, HBONE heads, tokens and registry files as meshid's own
//! components, Envoy and the e2e harness produce them, plus a few refusals
//! each. Regenerate with `cargo test --manifest-path fuzz/Cargo.toml --
//! --ignored write_seeds` (keys and signatures change each time; the
//! shapes do not).

use std::path::Path;

use meshid_common::proto::discovery::DiscoveryRequest;
use meshid_common::proto::envoy_core::Node;
use meshid_common::{KeyType, PrivateKey, SpiffeId};
use prost::Message;

use crate::{AUDIENCE, NODE, POD, TRUST_DOMAIN};

/// The audience the JWT-SVID target validates for.
pub const SVID_AUDIENCE: &str = "spiffe://cluster.local/ns/default/sa/reviews";
/// `exp` of the seed tokens: 2100-01-01, so committed seeds stay unexpired.
const FAR_EXP: i64 = 4_102_444_800;
const IAT: i64 = 1_767_225_600;

/// Claims of a projected service-account token for the fixture's pod, as
/// the harness's token issuer writes them.
pub fn ca_claims() -> serde_json::Value {
    let (namespace, sa, pod, pod_uid) = POD;
    serde_json::json!({
        "iss": meshid_ca::config::DEFAULT_TOKEN_ISSUER,
        "aud": [AUDIENCE],
        "sub": format!("system:serviceaccount:{namespace}:{sa}"),
        "iat": IAT,
        "nbf": IAT,
        "exp": FAR_EXP,
        "kubernetes.io": {
            "namespace": namespace,
            "serviceaccount": {"name": sa, "uid": format!("sa-{namespace}-{sa}")},
            "pod": {"name": pod, "uid": pod_uid},
            "node": {"name": NODE, "uid": format!("uid-{NODE}")},
        },
    })
}

/// Claims of a JWT-SVID as the CA mints them.
pub fn svid_claims() -> serde_json::Value {
    serde_json::json!({
        "sub": format!("spiffe://{TRUST_DOMAIN}/ns/{}/sa/{}", POD.0, POD.1),
        "aud": [SVID_AUDIENCE],
        "iat": IAT,
        "exp": FAR_EXP,
    })
}

fn sds(node: &str, names: &[&str], version: &str, nonce: &str, nack: bool) -> Vec<u8> {
    DiscoveryRequest {
        version_info: version.into(),
        node: (!node.is_empty()).then(|| Node {
            id: node.into(),
            cluster: "productpage.default".into(),
            ..Default::default()
        }),
        resource_names: names.iter().map(|n| n.to_string()).collect(),
        type_url: meshid_common::sds::SECRET_TYPE_URL.into(),
        response_nonce: nonce.into(),
        error_detail: nack.then(|| meshid_common::proto::google::rpc::Status {
            code: 3,
            message: "bad certificate".into(),
            ..Default::default()
        }),
    }
    .encode_to_vec()
}

/// Every target's seeds: (target, file name, bytes).
pub fn all() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out: Vec<(&'static str, String, Vec<u8>)> = Vec::new();
    let mut add = |t: &'static str, name: &str, bytes: Vec<u8>| out.push((t, name.into(), bytes));

    for (name, id) in [
        (
            "istio-sa",
            "spiffe://cluster.local/ns/default/sa/productpage",
        ),
        ("bare-td", "spiffe://example.org"),
        (
            "deep-path",
            "spiffe://prod.example.org/region/eu-1/svc_a.b-c",
        ),
        ("bad-upper-td", "spiffe://Cluster.Local/ns/a/sa/b"),
        ("bad-dot-segment", "spiffe://td/ns/./sa/b"),
        ("bad-percent", "spiffe://td/ns/a%2Fb/sa/c"),
        ("bad-trailing-slash", "spiffe://td/ns/a/"),
    ] {
        add("spiffe_id", name, id.as_bytes().to_vec());
    }

    let me = SpiffeId::for_service_account(TRUST_DOMAIN, POD.0, POD.1).expect("an ID");
    let aliased = me.with_trust_domain(crate::ALIAS).expect("an ID");
    let other = SpiffeId::for_service_account(TRUST_DOMAIN, "default", "db").expect("an ID");
    for (name, key_type, id) in [
        ("p256", KeyType::EcdsaP256, &me),
        ("p384", KeyType::EcdsaP384, &me),
        ("rsa2048", KeyType::Rsa2048, &me),
        ("p256-alias-td", KeyType::EcdsaP256, &aliased),
        ("p256-other-identity", KeyType::EcdsaP256, &other),
    ] {
        let key = PrivateKey::generate(key_type).expect("a key");
        let pem = key.csr_for(id).expect("a CSR");
        let der = csr_der(&pem);
        let mut der_form = vec![1];
        der_form.extend_from_slice(&der);
        add("csr", &format!("{name}.der"), der_form);
        if name == "p256" || name == "rsa2048" {
            let mut pem_form = vec![0];
            pem_form.extend_from_slice(pem.as_bytes());
            add("csr", &format!("{name}.pem"), pem_form);
        }
    }

    let first = sds(
        "sidecar~10.0.0.7~productpage-0.default~default.svc.cluster.local",
        &["default"],
        "",
        "",
        false,
    );
    add("sds_request", "envoy-first-default", first);
    add(
        "sds_request",
        "envoy-first-rootca",
        sds("sidecar~10.0.0.7~p~d", &["ROOTCA"], "", "", false),
    );
    add(
        "sds_request",
        "ack",
        sds("", &["default"], "default:0a1b", "1", false),
    );
    add(
        "sds_request",
        "nack",
        sds("", &["default"], "default:0a1b", "2", true),
    );
    add(
        "sds_request",
        "file-secrets",
        sds(
            "n",
            &[
                "file-root:/etc/certs/root.pem",
                "file-cert:/etc/certs/cert.pem~/etc/certs/key.pem",
                "file-root:system",
            ],
            "",
            "",
            false,
        ),
    );
    add(
        "sds_request",
        "gateway-credential",
        sds("n", &["kubernetes://ingress-cert"], "", "", false),
    );
    add(
        "sds_request",
        "no-node",
        sds("", &["default"], "", "", false),
    );

    for (name, head) in [
        (
            "hbone-connect",
            "CONNECT\n127.10.2.1:8080\nforwarded: for=\"127.10.1.1\"\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\n",
        ),
        (
            "hbone-connect-ipv6",
            "CONNECT\n[fd00::7]:80\nforwarded: for=\"[fd00::1]:4000\";proto=https, for=10.0.0.1\nbaggage: k=v\n",
        ),
        ("hbone-get", "GET\nhttp://10.0.0.9:8080/\n"),
        (
            "hbone-name-authority",
            "CONNECT\nbackend.default.svc:8080\n",
        ),
        ("proxy-v1", "PROXY TCP4 10.0.0.1 10.0.0.9 40000 8080\r\n"),
    ] {
        add("hbone_connect", name, head.as_bytes().to_vec());
    }

    let f = crate::fixture();
    let mut signed = |target: &'static str, name: &str, claims: &serde_json::Value| {
        let mut raw = vec![0];
        raw.extend_from_slice(f.issuer.sign_json(claims).expect("a token").as_bytes());
        add(target, &format!("{name}.token"), raw);
        let mut claims_form = vec![1];
        claims_form.extend_from_slice(claims.to_string().as_bytes());
        add(target, &format!("{name}.claims"), claims_form);
    };
    let good = ca_claims();
    signed("jwt_ca", "pod-token", &good);
    let mut gone = good.clone();
    gone["kubernetes.io"]["pod"]["uid"] = "uid-deleted".into();
    signed("jwt_ca", "deleted-pod", &gone);
    let mut wrong_aud = good.clone();
    wrong_aud["aud"] = serde_json::json!(["api"]);
    signed("jwt_ca", "wrong-audience", &wrong_aud);
    signed("jwt_svid", "jwt-svid", &svid_claims());
    let mut foreign = svid_claims();
    foreign["sub"] = "spiffe://other.example/ns/a/sa/b".into();
    signed("jwt_svid", "foreign-td", &foreign);
    out.push((
        "jwt_ca",
        "alg-none.token".into(),
        b"\0eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.".to_vec(),
    ));
    out.push(("jwt_svid", "alg-hs256.token".into(), b"\0eyJhbGciOiJIUzI1NiIsImtpZCI6ImsifQ.eyJzdWIiOiJzcGlmZmU6Ly9jbHVzdGVyLmxvY2FsL25zL2Evc2EvYiJ9.c2ln".to_vec()));

    let registry = crate::fixture_registry();
    out.push((
        "registry",
        "one-pod.json".into(),
        registry.to_json().into_bytes(),
    ));
    let mut ambient = registry.clone();
    ambient.workloads.push(meshid_common::registry::Workload {
        name: "backend-0".into(),
        namespace: "default".into(),
        service_account: "backend".into(),
        node: "node-b".into(),
        uid: "uid-default-backend-0".into(),
        address: Some("127.10.2.1".into()),
        mode: Some("ambient".into()),
    });
    ambient.nodes.push(meshid_common::registry::Node {
        name: "node-b".into(),
        uid: "uid-node-b".into(),
    });
    out.push((
        "registry",
        "ambient.json".into(),
        ambient.to_json().into_bytes(),
    ));
    let mut dup = registry;
    dup.workloads.push(dup.workloads[0].clone());
    out.push((
        "registry",
        "duplicate-uid.json".into(),
        dup.to_json().into_bytes(),
    ));
    out.push(("registry", "empty.json".into(), b"{}".to_vec()));
    out
}

fn csr_der(pem: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .expect("a PEM CSR")
        .as_ref()
        .to_vec()
}

/// Writes every seed under `root/<target>/`.
pub fn write_all(root: &Path) -> std::io::Result<()> {
    for (target, name, bytes) in all() {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(name), bytes)?;
    }
    Ok(())
}
