//! A CA running in-process on 127.0.0.1:0 with a token issuer, a workload
//! registry and a client that speaks to it over real TLS.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use meshid_ca::{App, Config, TokenAlgorithm, TokenClaims, TokenIssuer};
use meshid_common::ca_client::{CaClient, CaClientConfig};
use meshid_common::proto::istio_ca::IstioCertificateRequest;
use meshid_common::registry::{Node, Registry, Workload};

pub const TD: &str = "cluster.local";

/// Every log line of the test process, to check no secret is ever logged.
pub fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = buf.clone();
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        let filter = meshid_common::telemetry::log_filter(
            "debug,h2=info,hyper=info,tower=info,rustls=info,tonic=info",
        )
        .expect("filter");
        let _ = tracing_subscriber::fmt()
            .with_writer(move || LogWriter(writer.clone()))
            .finish()
            .with(filter)
            .try_init();
        buf
    })
    .clone()
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub fn pod(name: &str, ns: &str, sa: &str, node: &str) -> Workload {
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

pub fn sample_registry() -> Registry {
    let mut r = Registry::default();
    for w in [
        pod("web-0", "default", "web", "node-a"),
        pod("db-0", "default", "db", "node-b"),
        pod("ztunnel-a", "istio-system", "ztunnel", "node-a"),
        pod("ztunnel-b", "istio-system", "ztunnel", "node-b"),
    ] {
        r.upsert_workload(w);
    }
    for n in ["node-a", "node-b"] {
        r.upsert_node(Node {
            name: n.into(),
            uid: format!("uid-{n}"),
        });
    }
    r
}

pub struct Fixture {
    pub tmp: tempfile::TempDir,
    pub app: Option<App>,
    pub issuer: TokenIssuer,
    pub registry: Registry,
    pub extra_args: Vec<String>,
}

impl Fixture {
    pub async fn start() -> Fixture {
        Self::start_with(TokenAlgorithm::Es256, &[]).await
    }

    pub async fn start_with(alg: TokenAlgorithm, extra: &[&str]) -> Fixture {
        captured_logs();
        meshid_common::tls::install_crypto_provider();
        let tmp = tempfile::tempdir().unwrap();
        let issuer = TokenIssuer::generate(alg).unwrap();
        let registry = sample_registry();
        let mut fx = Fixture {
            tmp,
            app: None,
            issuer,
            registry,
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
        };
        TokenIssuer::write_jwks(&fx.path("jwks.json"), &[&fx.issuer]).unwrap();
        fx.registry.write_atomic(&fx.path("registry.json")).unwrap();
        fx.restart().await;
        fx
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    pub fn ca_dir(&self) -> PathBuf {
        self.path("cacerts")
    }

    pub fn config(&self) -> Config {
        let dir = |p: &Path| p.display().to_string();
        let mut args = vec![
            "meshid-ca".to_string(),
            "--trust-domain".into(),
            TD.into(),
            "--grpc-addr".into(),
            "127.0.0.1:0".into(),
            "--monitoring-addr".into(),
            "127.0.0.1:0".into(),
            "--root-ca-dir".into(),
            dir(&self.ca_dir()),
            "--root-cert-out".into(),
            dir(&self.path("root-cert.pem")),
            "--registry-file".into(),
            dir(&self.path("registry.json")),
            "--ca-dir-poll-interval".into(),
            "100ms".into(),
            "--file-poll-interval".into(),
            "50ms".into(),
        ];
        if !self.extra_args.iter().any(|a| a == "--jwks-url") {
            args.extend(["--jwks-file".into(), dir(&self.path("jwks.json"))]);
        }
        args.extend(self.extra_args.iter().cloned());
        Config::from_args(args, &std::collections::HashMap::<String, String>::new()).unwrap()
    }

    /// (Re)starts the CA on the same directory.
    pub async fn restart(&mut self) {
        if let Some(app) = self.app.take() {
            app.shutdown().await;
        }
        self.app = Some(App::build(self.config()).await.expect("CA starts"));
    }

    pub fn app(&self) -> &App {
        self.app.as_ref().unwrap()
    }

    pub fn roots_pem(&self) -> String {
        std::fs::read_to_string(self.path("root-cert.pem")).unwrap()
    }

    pub fn client(&self) -> CaClient {
        let config = CaClientConfig::new(
            format!("https://127.0.0.1:{}", self.app().grpc_addr().port()),
            self.roots_pem(),
        );
        CaClient::new(config).unwrap()
    }

    pub fn claims(&self, ns: &str, name: &str) -> TokenClaims {
        let w = self
            .registry
            .pod(ns, name)
            .unwrap_or_else(|| panic!("no pod {ns}/{name}"));
        TokenClaims::for_pod(
            &w.namespace,
            &w.service_account,
            &w.name,
            &w.uid,
            &w.node,
            &format!("uid-{}", w.node),
        )
    }

    pub fn token(&self, ns: &str, name: &str) -> String {
        self.issuer.mint(&self.claims(ns, name)).unwrap()
    }

    pub fn write_registry(&self) {
        self.registry
            .write_atomic(&self.path("registry.json"))
            .unwrap();
    }

    /// A raw CreateCertificate call.
    pub async fn call(
        &self,
        csr: &str,
        validity: i64,
        authorization: Option<&str>,
        edit: impl FnOnce(&mut tonic::Request<IstioCertificateRequest>),
    ) -> Result<Vec<String>, tonic::Status> {
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr: csr.to_owned(),
            validity_duration: validity,
            metadata: None,
        });
        if let Some(value) = authorization {
            request
                .metadata_mut()
                .insert("authorization", value.parse().unwrap());
        }
        edit(&mut request);
        self.client()
            .raw()
            .max_encoding_message_size(16 << 20)
            .create_certificate(request)
            .await
            .map(|r| r.into_inner().cert_chain)
    }
}

/// Waits until `f` holds (polling), or panics after `secs`.
pub async fn eventually(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Names, UIDs and nodes of [`sample_registry`]: a refusal must tell none
/// of them (they stay in the CA's log, under the request id).
pub const REGISTRY_FACTS: &[&str] = &[
    "web-0",
    "db-0",
    "ztunnel-a",
    "ztunnel-b",
    "uid-",
    "node-a",
    "node-b",
];

/// The request id of a refusal's message (`… (request id <id>)`).
#[track_caller]
pub fn request_id_of(message: &str) -> String {
    let (_, rest) = message
        .rsplit_once("(request id ")
        .unwrap_or_else(|| panic!("the refusal {message:?} carries no request id"));
    rest.trim_end_matches(')').to_owned()
}

/// The captured log lines that name `request_id`.
pub fn logged_under(request_id: &str) -> Vec<String> {
    let logs = captured_logs();
    let logs = logs.lock().unwrap();
    String::from_utf8_lossy(&logs)
        .lines()
        .filter(|l| l.contains(request_id))
        .map(str::to_owned)
        .collect()
}

/// Checks a refusal's message: it has the request id and the `category`,
/// tells no registry fact, and the CA logged `detail` under that id.
#[track_caller]
pub fn check_opaque(message: &str, category: &str, detail: &str) -> String {
    assert!(
        message.contains(category),
        "{message:?} should name the category {category:?}"
    );
    for fact in REGISTRY_FACTS {
        assert!(
            !message.contains(fact),
            "the refusal {message:?} tells a registry fact ({fact:?})"
        );
    }
    let id = request_id_of(message);
    let lines = logged_under(&id);
    assert!(
        lines.iter().any(|l| l.contains(detail)),
        "no log line under request id {id} has {detail:?}: {lines:#?}"
    );
    id
}
