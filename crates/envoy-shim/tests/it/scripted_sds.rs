//! A scripted SDS peer for the shim's SDS-client protocol tests only: it
//! records every request (node, nonces, NACKs, `traceparent`), serves
//! whatever `Secret` a test hands it — malformed ones included — and can drop
//! every stream. Good secrets are encoded by `meshid_common::sds`, like the
//! agent's; everything that just needs credentials uses the real agent
//! ([`crate::agent_sds`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshid_common::Credentials;
use meshid_common::proto::discovery::{DiscoveryRequest, DiscoveryResponse};
use meshid_common::proto::sds::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use meshid_common::proto::tls::Secret;
use meshid_common::sds::{ROOT_SECRET, WORKLOAD_SECRET};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

/// One request an SDS client sent, as recorded by [`ScriptedSds`].
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
pub struct ScriptedSds {
    path: PathBuf,
    state: Arc<SdsState>,
    cancel: CancellationToken,
}

impl std::fmt::Debug for ScriptedSds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScriptedSds")
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
                    let response = meshid_common::sds::response(
                        version.to_string(),
                        vec![meshid_common::sds::to_any(secret)],
                        format!("nonce-{nonce}"),
                    );
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

impl ScriptedSds {
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
        Ok(ScriptedSds {
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

    /// Pushes a new version of both secrets.
    pub fn set_credentials(&self, creds: &Credentials) {
        self.set_secret(meshid_common::sds::tls_certificate(
            WORKLOAD_SECRET,
            &creds.svid,
        ));
        self.set_secret(meshid_common::sds::validation_context(
            ROOT_SECRET,
            &creds.bundle,
        ));
    }

    /// Pushes a new version of one secret (named by `secret.name`), good or not.
    pub fn set_secret(&self, secret: Secret) {
        let version = self.state.counter.fetch_add(1, Ordering::Relaxed) + 1;
        self.state.secrets.send_modify(|m| {
            m.insert(secret.name.clone(), (version, secret));
        });
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

impl Drop for ScriptedSds {
    fn drop(&mut self) {
        self.kick();
        self.cancel.cancel();
    }
}
