//! Test parts: a fake CA (as a `CertificateSource` and as a real TLS gRPC
//! server), an agent builder, and SDS / Workload API / HTTP clients.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hyper_util::rt::TokioIo;
use meshid_agent::{App, Clock, Config, Parts};
use meshid_ca::{TokenAlgorithm, TokenClaims, TokenIssuer};
use meshid_common::cert::cert_to_pem;
use meshid_common::proto::discovery::{DiscoveryRequest, DiscoveryResponse};
use meshid_common::proto::envoy_core::Node;
use meshid_common::proto::envoy_core::data_source::Specifier;
use meshid_common::proto::istio_ca::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use meshid_common::proto::istio_ca::{IstioCertificateRequest, IstioCertificateResponse};
use meshid_common::proto::sds::secret_discovery_service_client::SecretDiscoveryServiceClient;
use meshid_common::proto::tls::{Secret, secret::Type as SecretType};
use meshid_common::registry::{Node as RegistryNode, Registry, Workload};
use meshid_common::testing::TestPki;
use meshid_common::{KeyType, PrivateKey, SpiffeId};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Status, Streaming};

pub const TD: &str = "cluster.local";

pub fn init() {
    meshid_common::tls::install_crypto_provider();
    let _ = tracing_subscriber_init();
}

fn tracing_subscriber_init() -> Option<()> {
    // Logs help when a test fails; ignore "already set".
    let cfg = meshid_common::telemetry::TelemetryConfig {
        service_name: "agent-test".into(),
        filter: std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        json: false,
        no_color: false,
        otlp_endpoint: None,
    };
    std::mem::forget(meshid_common::telemetry::init(&cfg).ok()?);
    Some(())
}

/// The fake CA: the shared test CA of the renewal engine, signing with an
/// intermediate under a test root.
#[allow(unused_imports)] // the agent bench includes this file and uses part of it
pub use meshid_common::identity::fake::{Answer, Call, TestCa as FakeCa};

/// A fake CA at `clock`'s time, with an intermediate.
pub fn fake_ca(clock: Clock) -> Arc<FakeCa> {
    FakeCa::new(
        Arc::new(TestPki::new(TD).unwrap().with_intermediate().unwrap()),
        clock,
    )
}

/// The fake CA behind a real TLS gRPC server (`IstioCertificateService`).
pub struct FakeCaServer {
    pub addr: SocketAddr,
    /// PEM roots that verify the server (for `CA_ROOT_CA`).
    pub root_pem: String,
    stop: tokio_util::sync::CancellationToken,
}

impl Drop for FakeCaServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct CaService(Arc<FakeCa>);

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: tonic::Request<IstioCertificateRequest>,
    ) -> Result<tonic::Response<IstioCertificateResponse>, Status> {
        let md = request.metadata();
        let get = |k: &str| md.get(k).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let token = get("authorization")
            .and_then(|a| a.strip_prefix("Bearer ").map(str::to_owned))
            .ok_or_else(|| Status::unauthenticated("no bearer token"))?;
        self.0.record(Call {
            at: tokio::time::Instant::now(),
            id: None,
            token,
            on_behalf: false,
            ttl: Duration::from_secs(request.get_ref().validity_duration.max(0) as u64),
            cluster_id: get("clusterid"),
            traceparent: get("traceparent"),
        });
        let req = request.into_inner();
        let chain = self.0.answer(
            &req.csr,
            Duration::from_secs(req.validity_duration.max(1) as u64),
        )?;
        Ok(tonic::Response::new(IstioCertificateResponse {
            cert_chain: chain,
        }))
    }
}

impl FakeCaServer {
    /// Serves `ca` over TLS on `addr` (127.0.0.1:0 for any port) with a
    /// serving certificate for `istiod.istio-system.svc` from a separate root.
    pub async fn start(ca: Arc<FakeCa>, addr: SocketAddr) -> FakeCaServer {
        Self::start_with(ca, addr, TestPki::new("serving.ca").unwrap()).await
    }

    /// As [`FakeCaServer::start`], with the serving certificate from `serving`.
    pub async fn start_with(ca: Arc<FakeCa>, addr: SocketAddr, serving: TestPki) -> FakeCaServer {
        let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let cert = serving
            .root
            .issue_server_cert(
                key.public_key_spki(),
                &["istiod.istio-system.svc".to_owned()],
                &[],
                Duration::from_secs(3600),
                SystemTime::now(),
            )
            .unwrap();
        let identity =
            tonic::transport::Identity::from_pem(cert_to_pem(&cert), key.to_pkcs8_pem().as_bytes());
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
                .unwrap()
                .add_service(IstioCertificateServiceServer::new(CaService(ca)))
                .serve_with_incoming_shutdown(
                    tokio_stream::StreamExt::map(
                        tokio_stream::wrappers::TcpListenerStream::new(listener),
                        |conn| {
                            conn.inspect(|s| {
                                let _ = s.set_nodelay(true);
                            })
                        },
                    ),
                    token.cancelled_owned(),
                )
                .await
                .unwrap();
        });
        FakeCaServer {
            addr,
            root_pem: serving.bundle().to_pem(),
            stop,
        }
    }
}

/// A real meshid-ca running in-process with a token issuer (JWKS file) and
/// a workload registry holding `default/web-0`, `default/client-0` and
/// `default/bench-0` on `node-a`.
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
        registry.upsert_workload(pod("bench-0", "default", "bench", "node-a"));
        registry.upsert_node(RegistryNode {
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
        let config =
            meshid_ca::Config::from_args(args, &std::collections::HashMap::<String, String>::new())
                .unwrap();
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
        std::fs::copy(self.root_cert(), dir.join("ca-root.pem")).unwrap();
        let builder = AgentBuilder {
            extra_args: ["--ca-address", &self.address()]
                .iter()
                .chain(extra)
                .map(|s| s.to_string())
                .collect(),
            ..AgentBuilder::default()
        };
        App::build(builder.config(dir)).await.unwrap()
    }
}

/// Builds an agent on a temp dir with a fake CA.
pub struct AgentBuilder {
    pub ttl: Duration,
    pub first_fetch_delay: Duration,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub token: Option<String>,
    pub extra_args: Vec<String>,
    pub ca: Option<Arc<FakeCa>>,
}

impl Default for AgentBuilder {
    fn default() -> Self {
        AgentBuilder {
            ttl: Duration::from_secs(3600),
            first_fetch_delay: Duration::ZERO,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(500),
            token: Some("test.jwt.token".into()),
            extra_args: Vec::new(),
            ca: None,
        }
    }
}

pub struct TestAgent {
    pub app: App,
    pub ca: Arc<FakeCa>,
    pub dir: tempfile::TempDir,
}

impl AgentBuilder {
    pub fn config(&self, dir: &Path) -> Config {
        let p = |name: &str| dir.join(name).display().to_string();
        let mut args = vec![
            "meshid-agent".to_owned(),
            "--sds-socket".into(),
            p("sds.sock"),
            "--spiffe-endpoint-socket".into(),
            format!("unix://{}", p("api.sock")),
            "--admin-addr".into(),
            "127.0.0.1:0".into(),
            "--token-path".into(),
            p("token"),
            "--ca-root-ca".into(),
            p("ca-root.pem"),
            "--secret-ttl".into(),
            format!("{}ms", self.ttl.as_millis()),
            "--first-fetch-delay".into(),
            format!("{}ms", self.first_fetch_delay.as_millis()),
            "--initial-backoff".into(),
            format!("{}ms", self.initial_backoff.as_millis()),
            "--max-backoff".into(),
            format!("{}ms", self.max_backoff.as_millis()),
            "--namespace".into(),
            "default".into(),
            "--service-account".into(),
            "web".into(),
        ];
        args.extend(self.extra_args.iter().cloned());
        Config::from_args(args, &std::collections::HashMap::<String, String>::new()).unwrap()
    }

    pub async fn start(self) -> TestAgent {
        init();
        let dir = tempfile::tempdir().unwrap();
        if let Some(token) = &self.token {
            std::fs::write(dir.path().join("token"), token).unwrap();
        }
        let ca = self.ca.clone().unwrap_or_else(|| fake_ca(Clock::System));
        let app = App::build_with(
            self.config(dir.path()),
            Parts {
                source: ca.clone(),
                clock: Clock::System,
            },
        )
        .await
        .unwrap();
        TestAgent { app, ca, dir }
    }
}

impl TestAgent {
    pub fn id(&self) -> SpiffeId {
        SpiffeId::for_service_account(TD, "default", "web").unwrap()
    }

    /// Waits until the agent holds a certificate; returns its serial.
    pub async fn ready(&self) -> String {
        let mut rx = self.app.credentials();
        let creds = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(Option::is_some))
            .await
            .expect("a certificate within 10 s")
            .unwrap()
            .clone()
            .unwrap();
        creds.svid.leaf().serial.clone()
    }

    /// Forces a renewal and waits for a serial other than `old`.
    pub async fn rotate(&self, old: &str) -> String {
        self.app.manager().refresh_now();
        let mut rx = self.app.credentials();
        let creds = tokio::time::timeout(
            Duration::from_secs(10),
            rx.wait_for(|c| c.as_ref().is_some_and(|c| c.svid.leaf().serial != old)),
        )
        .await
        .expect("a rotation within 10 s")
        .unwrap()
        .clone()
        .unwrap();
        creds.svid.leaf().serial.clone()
    }

    pub async fn sds(&self) -> SecretDiscoveryServiceClient<Channel> {
        SecretDiscoveryServiceClient::new(uds_channel(self.app.sds_socket()).await)
    }

    pub fn api_socket(&self) -> PathBuf {
        self.app.workload_api_socket().to_path_buf()
    }
}

/// An SDS client on the socket at `path`.
pub async fn sds_client(path: &Path) -> SecretDiscoveryServiceClient<Channel> {
    SecretDiscoveryServiceClient::new(uds_channel(path).await)
}

/// A gRPC channel over a Unix socket.
pub async fn uds_channel(path: &Path) -> Channel {
    let path = path.to_path_buf();
    Endpoint::try_from("http://[::1]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .unwrap()
}

pub fn request(node: Option<&str>, names: &[&str]) -> DiscoveryRequest {
    DiscoveryRequest {
        node: node.map(|id| Node {
            id: id.to_owned(),
            cluster: "test-cluster".into(),
            ..Node::default()
        }),
        resource_names: names.iter().map(|s| (*s).to_owned()).collect(),
        type_url: meshid_common::sds::SECRET_TYPE_URL.to_owned(),
        ..DiscoveryRequest::default()
    }
}

/// One open `StreamSecrets` stream.
pub struct SdsStream {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: Streaming<DiscoveryResponse>,
}

impl SdsStream {
    /// Opens a stream and sends `first`.
    pub async fn open(
        client: &mut SecretDiscoveryServiceClient<Channel>,
        first: DiscoveryRequest,
    ) -> Result<SdsStream, Status> {
        let (tx, rx) = mpsc::channel(1024);
        tx.send(first).await.unwrap();
        let resp = client.stream_secrets(ReceiverStream::new(rx)).await?;
        Ok(SdsStream {
            tx,
            rx: resp.into_inner(),
        })
    }

    pub async fn send(&self, req: DiscoveryRequest) {
        self.tx.send(req).await.unwrap();
    }

    /// The next message within `within`; `None` on timeout.
    pub async fn next_within(
        &mut self,
        within: Duration,
    ) -> Option<Result<Option<DiscoveryResponse>, Status>> {
        tokio::time::timeout(within, self.rx.message()).await.ok()
    }

    /// The next response, failing the test on an error or timeout.
    pub async fn expect_response(&mut self) -> DiscoveryResponse {
        match self.next_within(Duration::from_secs(10)).await {
            Some(Ok(Some(r))) => r,
            other => panic!("expected a response, got {other:?}"),
        }
    }

    /// ACKs `resp` for `names`.
    pub async fn ack(&self, resp: &DiscoveryResponse, names: &[&str]) {
        let mut req = request(None, names);
        req.version_info = resp.version_info.clone();
        req.response_nonce = resp.nonce.clone();
        self.send(req).await;
    }

    /// NACKs `resp` for `names`.
    pub async fn nack(&self, resp: &DiscoveryResponse, names: &[&str]) {
        let mut req = request(None, names);
        req.version_info = "previous".into();
        req.response_nonce = resp.nonce.clone();
        req.error_detail = Some(meshid_common::proto::google::rpc::Status {
            code: 3,
            message: "bad secret (test)".into(),
            details: Vec::new(),
        });
        self.send(req).await;
    }
}

/// The secrets in a response, decoded.
pub fn secrets(resp: &DiscoveryResponse) -> Vec<Secret> {
    resp.resources
        .iter()
        .map(|any| {
            assert_eq!(any.type_url, meshid_common::sds::SECRET_TYPE_URL);
            Secret::decode(any.value.as_slice()).unwrap()
        })
        .collect()
}

fn inline(ds: &Option<meshid_common::proto::envoy_core::DataSource>) -> String {
    match ds.as_ref().and_then(|d| d.specifier.as_ref()) {
        Some(Specifier::InlineBytes(b)) => String::from_utf8(b.clone()).unwrap(),
        other => panic!("expected inline bytes, got {other:?}"),
    }
}

/// (chain PEM, key PEM) of a `default` secret.
pub fn tls_certificate(secret: &Secret) -> (String, String) {
    match &secret.r#type {
        Some(SecretType::TlsCertificate(t)) => {
            (inline(&t.certificate_chain), inline(&t.private_key))
        }
        other => panic!("expected a TlsCertificate, got {other:?}"),
    }
}

/// The PEM roots of a `ROOTCA` secret.
pub fn trusted_ca(secret: &Secret) -> String {
    match &secret.r#type {
        Some(SecretType::ValidationContext(v)) => inline(&v.trusted_ca),
        other => panic!("expected a validation context, got {other:?}"),
    }
}

/// A bare HTTP/1.1 GET: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Polls `f` every 20 ms until it is true or `within` passes.
pub async fn eventually<F: FnMut() -> bool>(within: Duration, mut f: F) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
