//! The agent against a real meshid-ca running in-process: JWT
//! authentication against the issuer's JWKS, the workload registry, TLS
//! verified against the CA's root, and revocation by deleting the pod.

use std::path::{Path, PathBuf};
use std::time::Duration;

use meshid_agent::App;
use meshid_ca::{TokenAlgorithm, TokenClaims, TokenIssuer};
use meshid_common::bundle::Usage;
use meshid_common::registry::{Node, Registry, Workload};
use meshid_common::{SpiffeId, TrustBundle};

use crate::support::{AgentBuilder, SdsStream, eventually, init, request, secrets};

pub struct RealCa {
    pub tmp: tempfile::TempDir,
    pub app: meshid_ca::App,
    pub issuer: TokenIssuer,
    pub registry: Registry,
}

fn pod(name: &str, ns: &str, sa: &str, node: &str) -> Workload {
    Workload {
        name: name.into(),
        namespace: ns.into(),
        service_account: sa.into(),
        node: node.into(),
        uid: format!("uid-{ns}-{name}"),
        address: None,
        mode: None,
    }
}

impl RealCa {
    pub async fn start() -> RealCa {
        init();
        let tmp = tempfile::tempdir().unwrap();
        let issuer = TokenIssuer::generate(TokenAlgorithm::Es256).unwrap();
        let mut registry = Registry::default();
        registry.upsert_workload(pod("web-0", "default", "web", "node-a"));
        registry.upsert_workload(pod("client-0", "default", "client", "node-a"));
        registry.upsert_node(Node {
            name: "node-a".into(),
            uid: "uid-node-a".into(),
        });
        let p = |n: &str| tmp.path().join(n);
        TokenIssuer::write_jwks(&p("jwks.json"), &[&issuer]).unwrap();
        registry.write_atomic(&p("registry.json")).unwrap();
        let args: Vec<String> = [
            "meshid-ca",
            "--trust-domain",
            "cluster.local",
            "--grpc-addr",
            "127.0.0.1:0",
            "--monitoring-addr",
            "127.0.0.1:0",
            "--file-poll-interval",
            "50ms",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([
            "--root-ca-dir".into(),
            p("cacerts").display().to_string(),
            "--root-cert-out".into(),
            p("root-cert.pem").display().to_string(),
            "--registry-file".into(),
            p("registry.json").display().to_string(),
            "--jwks-file".into(),
            p("jwks.json").display().to_string(),
        ])
        .collect();
        let config = meshid_ca::Config::from_args(args).unwrap();
        let app = meshid_ca::App::build(config).await.expect("the CA starts");
        RealCa {
            tmp,
            app,
            issuer,
            registry,
        }
    }

    pub fn root_cert(&self) -> PathBuf {
        self.tmp.path().join("root-cert.pem")
    }

    pub fn address(&self) -> String {
        format!("https://127.0.0.1:{}", self.app.grpc_addr().port())
    }

    /// A projected-token-like JWT for pod `name` of `default`.
    pub fn token(&self, name: &str) -> String {
        let w = self.registry.pod("default", name).unwrap();
        self.issuer
            .mint(&TokenClaims::for_pod(
                &w.namespace,
                &w.service_account,
                &w.name,
                &w.uid,
                &w.node,
                &format!("uid-{}", w.node),
            ))
            .unwrap()
    }

    pub fn delete_pod(&mut self, name: &str) {
        self.registry.remove_workload("default", name);
        self.registry
            .write_atomic(&self.tmp.path().join("registry.json"))
            .unwrap();
    }

    /// An agent for pod `web-0` (default/web) using this CA.
    pub async fn agent(&self, dir: &Path, extra: &[&str]) -> App {
        std::fs::write(dir.join("token"), self.token("web-0")).unwrap();
        let builder = AgentBuilder {
            extra_args: ["--ca-address", &self.address(), "--ca-root-ca"]
                .iter()
                .map(|s| s.to_string())
                .chain([self.root_cert().display().to_string()])
                .chain(extra.iter().map(|s| s.to_string()))
                .collect(),
            ..AgentBuilder::default()
        };
        App::build(builder.config(dir)).await.unwrap()
    }
}

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
        .verify(creds.svid.chain(), Usage::ClientAuth, std::time::SystemTime::now())
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
