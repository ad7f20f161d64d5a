//! The ztunnels against a real meshid CA in-process: each authenticates with
//! its own node-bound token and gets its node's workload certificates by
//! impersonation; the CA refuses node-a's ztunnel a workload of node-b.

use crate::support;

use std::path::Path;
use std::time::Duration;

use meshid_ca::{TokenAlgorithm, TokenClaims, TokenIssuer};
use meshid_common::identity::{CaSource, CertificateSource, SignRequest, TokenFile};
use meshid_common::registry::{Node, Registry, Workload};
use meshid_common::{KeyType, PrivateKey, SpiffeId};
use meshid_ztunnel::{App, Config};
use support::*;

struct Cluster {
    _tmp: tempfile::TempDir,
    ca: meshid_ca::App,
    a: Config,
    b: Config,
    registry: Registry,
}

fn ztunnel_pod(node: &str) -> Workload {
    Workload {
        name: format!("ztunnel-{node}"),
        namespace: "istio-system".into(),
        service_account: "ztunnel".into(),
        node: node.into(),
        uid: format!("uid-ztunnel-{node}"),
        address: None,
        // The ztunnel is not in the mesh it serves.
        mode: Some("none".into()),
    }
}

fn write_token(issuer: &TokenIssuer, w: &Workload, path: &Path) {
    let claims = TokenClaims::for_pod(
        &w.namespace,
        &w.service_account,
        &w.name,
        &w.uid,
        &w.node,
        &format!("uid-{}", w.node),
    );
    std::fs::write(path, issuer.mint(&claims).unwrap()).unwrap();
}

async fn cluster() -> Cluster {
    meshid_common::tls::install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let p = |n: &str| tmp.path().join(n);
    let web = echo_server("127.0.0.1").await;
    let db = echo_server("127.0.0.2").await;
    let mut registry = Registry::default();
    registry.upsert_workload(pod("web-0", "web", "node-a", web));
    registry.upsert_workload(pod("db-0", "db", "node-b", db));
    for node in ["node-a", "node-b"] {
        registry.upsert_workload(ztunnel_pod(node));
        registry.upsert_node(Node {
            name: node.into(),
            uid: format!("uid-{node}"),
        });
    }
    registry.write_atomic(&p("registry.json")).unwrap();
    let issuer = TokenIssuer::generate(TokenAlgorithm::Es256).unwrap();
    TokenIssuer::write_jwks(&p("jwks.json"), &[&issuer]).unwrap();
    let s = |path: &Path| path.display().to_string();
    let ca_config = meshid_ca::Config::from_args(
        [
            "meshid-ca".to_string(),
            "--trust-domain".into(),
            TD.into(),
            "--grpc-addr".into(),
            "127.0.0.1:0".into(),
            "--monitoring-addr".into(),
            "127.0.0.1:0".into(),
            "--root-ca-dir".into(),
            s(&p("cacerts")),
            "--root-cert-out".into(),
            s(&p("root-cert.pem")),
            "--jwks-file".into(),
            s(&p("jwks.json")),
            "--registry-file".into(),
            s(&p("registry.json")),
            "--file-poll-interval".into(),
            "50ms".into(),
        ],
        &std::collections::HashMap::<String, String>::new(),
    )
    .unwrap();
    let ca = meshid_ca::App::build(ca_config).await.unwrap();
    let mut configs = Vec::new();
    for (node, ip) in [("node-a", "127.0.0.1"), ("node-b", "127.0.0.2")] {
        let token = p(&format!("token-{node}"));
        write_token(&issuer, &ztunnel_pod(node), &token);
        configs.push(Config {
            ca: meshid_common::identity::CaClientSettings {
                address: format!("https://127.0.0.1:{}", ca.grpc_addr().port()),
                root_ca: p("root-cert.pem"),
                token_path: token,
                ..Default::default()
            },
            ..config(node, ip, &p("registry.json"))
        });
    }
    let b = configs.pop().unwrap();
    let a = configs.pop().unwrap();
    Cluster {
        _tmp: tmp,
        ca,
        a,
        b,
        registry,
    }
}

/// What the ztunnel's CA source sends for `id`: a CSR over a fresh key, the
/// node's token, on behalf of `id`.
async fn ask(config: &Config, id: &SpiffeId) -> meshid_common::Result<Vec<String>> {
    let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
    CaSource::new(&config.ca)
        .unwrap()
        .sign(SignRequest {
            id: id.clone(),
            csr_pem: key.csr_for(id).unwrap(),
            ttl: Duration::from_secs(3600),
            token: TokenFile::new(&config.ca.token_path).read().unwrap(),
            on_behalf: true,
        })
        .await
}

/// The SPIFFE ID of the leaf of a `cert_chain` answer.
fn leaf_id(chain: &[String]) -> SpiffeId {
    let certs = meshid_common::cert::parse_pem_certs(&chain[0]).unwrap();
    meshid_common::CertInfo::from_der(&certs[0])
        .unwrap()
        .require_spiffe_id()
        .unwrap()
        .clone()
}

#[tokio::test]
async fn the_ca_refuses_node_a_a_cert_for_a_workload_only_on_node_b() {
    let c = cluster().await;
    let web = SpiffeId::for_service_account(TD, "default", "web").unwrap();
    let db = SpiffeId::for_service_account(TD, "default", "db").unwrap();
    // Its own node's workload: granted, for exactly that identity.
    assert_eq!(leaf_id(&ask(&c.a, &web).await.unwrap()), web);
    // A workload that runs only on node-b: refused as unauthenticated.
    match ask(&c.a, &db).await {
        Err(meshid_common::Error::Ca { code, message }) => {
            assert_eq!(code, tonic::Code::Unauthenticated, "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // node-b's ztunnel may have it.
    assert_eq!(leaf_id(&ask(&c.b, &db).await.unwrap()), db);
    c.ca.shutdown().await;
}

#[tokio::test]
async fn two_ztunnels_with_certs_from_the_ca_carry_a_connection() {
    let c = cluster().await;
    let b = App::build(c.b.clone()).await.unwrap();
    let a = App::build(Config {
        peers: vec![("node-b".into(), b.hbone_addr())],
        ..c.a.clone()
    })
    .await
    .unwrap();
    a.wait_ready(Duration::from_secs(20)).await.unwrap();
    b.wait_ready(Duration::from_secs(20)).await.unwrap();
    // Each ztunnel holds only its own node's workload identity.
    let ids = |app: &App| -> Vec<String> {
        app.certs()
            .snapshot()
            .into_iter()
            .map(|s| s.identity)
            .collect()
    };
    assert_eq!(ids(&a), vec![format!("spiffe://{TD}/ns/default/sa/web")]);
    assert_eq!(ids(&b), vec![format!("spiffe://{TD}/ns/default/sa/db")]);
    let db = c
        .registry
        .pod("default", "db-0")
        .unwrap()
        .socket_addr()
        .unwrap();
    let route = a
        .add_outbound(&meshid_ztunnel::config::OutboundRoute {
            source: "default/web-0".into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            destination: db,
        })
        .await
        .unwrap();
    assert_eq!(
        echo_through(route, b"through the CA").await.unwrap(),
        b"through the CA"
    );
    wait_until("an inbound record", || !b.recent_connections().is_empty()).await;
    let seen = b.recent_connections();
    assert_eq!(
        seen[0].src_identity.as_deref(),
        Some(format!("spiffe://{TD}/ns/default/sa/web").as_str())
    );
    a.shutdown().await;
    b.shutdown().await;
    c.ca.shutdown().await;
}

/// Kills the child process when the test ends, however it ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port reserved for the binary (outside the ephemeral range; the HBONE
/// listener binds it on 127.0.0.2, the admin on 127.0.0.1).
fn free_port() -> u16 {
    meshid_common::testing::ports::reserve().unwrap().port()
}

#[tokio::test]
async fn the_binary_serves_a_node_from_flags_and_environment() {
    let c = cluster().await;
    let (hbone, admin) = (free_port(), free_port());
    let hbone_addr: std::net::SocketAddr = format!("127.0.0.2:{hbone}").parse().unwrap();
    let admin_addr: std::net::SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    let _b = Child(
        std::process::Command::new(env!("CARGO_BIN_EXE_meshid-ztunnel"))
            .args(["--hbone-addr", &hbone_addr.to_string()])
            .args(["--admin-addr", &admin_addr.to_string()])
            .arg("--no-inbound-plaintext")
            .args(["--registry-poll", "50ms"])
            .env("CA_ADDRESS", &c.b.ca.address)
            .env("CA_ROOT_CA", &c.b.ca.root_ca)
            .env("AUTH_TOKEN", &c.b.ca.token_path)
            .env("WORKLOAD_REGISTRY", &c.b.registry_file)
            .env("NODE_NAME", "node-b")
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_secs(1),
            tokio::net::TcpStream::connect(admin_addr),
        )
        .await
        {
            drop(s);
            if admin_get(admin_addr, "/ready").await.0 == 200 {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the binary never got ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, certs) = admin_get(admin_addr, "/debug/certs").await;
    assert!(
        certs.contains("sa/db") && certs.contains("available"),
        "{certs}"
    );

    let a = App::build(Config {
        peers: vec![("node-b".into(), hbone_addr)],
        ..c.a.clone()
    })
    .await
    .unwrap();
    a.wait_ready(Duration::from_secs(20)).await.unwrap();
    let db = c
        .registry
        .pod("default", "db-0")
        .unwrap()
        .socket_addr()
        .unwrap();
    let route = a
        .add_outbound(&meshid_ztunnel::config::OutboundRoute {
            source: "default/web-0".into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            destination: db,
        })
        .await
        .unwrap();
    assert_eq!(
        echo_through(route, b"to a process").await.unwrap(),
        b"to a process"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, conns) = admin_get(admin_addr, "/debug/connections").await;
        if conns.contains("spiffe://cluster.local/ns/default/sa/web") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{conns}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, metrics) = admin_get(admin_addr, "/metrics").await;
    assert!(
        metrics.contains("ztunnel_hbone_responses_total{code=\"200\"} 1"),
        "{metrics}"
    );
    a.shutdown().await;
    c.ca.shutdown().await;
}
