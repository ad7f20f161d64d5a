//! SDS client: fetches the workload certificate (`default`) and the trust
//! bundle (`ROOTCA`) from an SDS server on a Unix socket, the way Envoy does.
//!
//! One `StreamSecrets` stream per secret over one HTTP/2 connection. The
//! first request carries `node.id` and `node.cluster`; every response is
//! ACKed (its `version_info` and `nonce`) when usable, or NACKed with an
//! `error_detail` when not (bad PEM, wrong type, key not matching the cert),
//! in which case the previous secret stays in use. A dropped stream is
//! reopened with capped exponential backoff. Once both secrets are present
//! they are published as [`Credentials`] on a watch channel, which the TLS
//! configs read at every handshake. Nothing is ever read from disk.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use meshid_common::proto::discovery::{DiscoveryRequest, DiscoveryResponse};
use meshid_common::proto::envoy_core::Node;
use meshid_common::proto::google::rpc::Status;
use meshid_common::proto::sds::secret_discovery_service_client::SecretDiscoveryServiceClient;
use meshid_common::sds::{Decoded as Update, SECRET_TYPE_URL};
use meshid_common::{Credentials, CredentialsRx, Svid, TrustBundle, telemetry};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// The two secrets the shim asks for (`default`, `ROOTCA`), as
/// `meshid_common::sds` defines them for the server and the clients alike.
pub use meshid_common::sds::{ROOT_SECRET as ROOTCA_SECRET, WORKLOAD_SECRET as DEFAULT_SECRET};

/// gRPC code Envoy puts in a NACK's `error_detail` (INTERNAL).
const NACK_CODE: i32 = 13;

/// Where the SDS server is and who we say we are.
#[derive(Clone, Debug)]
pub struct SdsConfig {
    pub socket: PathBuf,
    pub node_id: String,
    pub cluster: String,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

/// What the admin API shows about one secret.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SecretStatus {
    /// `version_info` of the secret in use.
    pub version: Option<String>,
    /// Seconds since the epoch when it was accepted.
    pub accepted_at: Option<i64>,
    pub acks: u64,
    pub nacks: u64,
    /// Why the last NACK happened (never contains key material).
    pub last_error: Option<String>,
    pub connected: bool,
}

struct State {
    svid: Option<Arc<Svid>>,
    bundle: Option<Arc<TrustBundle>>,
    status: BTreeMap<&'static str, SecretStatus>,
}

/// Handle on the running SDS streams.
#[derive(Clone)]
pub struct SdsClient {
    state: Arc<Mutex<State>>,
    creds: CredentialsRx,
}

impl std::fmt::Debug for SdsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SdsClient")
            .field("status", &self.status())
            .finish()
    }
}

impl SdsClient {
    /// Starts one stream per secret; they run until `cancel`.
    pub fn spawn(config: SdsConfig, metrics: Arc<Metrics>, cancel: CancellationToken) -> Self {
        let (tx, creds) = watch::channel(None);
        let state = Arc::new(Mutex::new(State {
            svid: None,
            bundle: None,
            status: [DEFAULT_SECRET, ROOTCA_SECRET]
                .into_iter()
                .map(|n| (n, SecretStatus::default()))
                .collect(),
        }));
        let tx = Arc::new(tx);
        let channel = connect_lazy(&config.socket);
        let config = Arc::new(config);
        for name in [DEFAULT_SECRET, ROOTCA_SECRET] {
            let stream = SecretStream {
                name,
                config: config.clone(),
                channel: channel.clone(),
                state: state.clone(),
                tx: tx.clone(),
                metrics: metrics.clone(),
            };
            tokio::spawn(stream.run(cancel.clone()));
        }
        SdsClient { state, creds }
    }

    /// The credentials channel: `None` until both secrets arrived.
    pub fn credentials(&self) -> CredentialsRx {
        self.creds.clone()
    }

    /// Per-secret status, for `/debug/certs`.
    pub fn status(&self) -> BTreeMap<&'static str, SecretStatus> {
        self.state.lock().expect("sds state").status.clone()
    }

    /// Names of the secrets not received yet.
    pub fn missing(&self) -> Vec<&'static str> {
        let st = self.state.lock().expect("sds state");
        let mut out = Vec::new();
        if st.svid.is_none() {
            out.push(DEFAULT_SECRET);
        }
        if st.bundle.is_none() {
            out.push(ROOTCA_SECRET);
        }
        out
    }
}

/// A channel over the Unix socket; (re)connects on demand.
fn connect_lazy(path: &std::path::Path) -> Channel {
    let path = path.to_owned();
    // The URI is required by the API and ignored by the connector.
    Endpoint::from_static("http://sds.invalid")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector_lazy(tower::service_fn(move |_: http::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(&path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
}

struct SecretStream {
    name: &'static str,
    config: Arc<SdsConfig>,
    channel: Channel,
    state: Arc<Mutex<State>>,
    tx: Arc<watch::Sender<Option<Credentials>>>,
    metrics: Arc<Metrics>,
}

impl SecretStream {
    async fn run(self, cancel: CancellationToken) {
        let mut backoff = self.config.backoff_min;
        let mut version = String::new();
        loop {
            // One span per fetch: from opening the stream to the first secret.
            // The rest of the stream (pushes, ACKs) is not part of that trace.
            let span = tracing::info_span!("sds.fetch", secret = self.name, sds.socket = %self.config.socket.display());
            let mut received = false;
            let outcome = tokio::select! {
                _ = cancel.cancelled() => return,
                r = self.stream_once(&mut version, &mut received, span) => r,
            };
            self.set_connected(false);
            match outcome {
                Ok(()) => tracing::info!(
                    secret = self.name,
                    "SDS stream closed by the server; reopening"
                ),
                Err(e) => {
                    tracing::warn!(secret = self.name, error = %e, retry_in_ms = backoff.as_millis() as u64, "SDS stream failed")
                }
            }
            if received {
                backoff = self.config.backoff_min;
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(self.config.backoff_max);
        }
    }

    fn request(&self, version: &str, nonce: &str, error: Option<String>) -> DiscoveryRequest {
        DiscoveryRequest {
            version_info: version.to_owned(),
            node: None,
            resource_names: vec![self.name.to_owned()],
            type_url: SECRET_TYPE_URL.to_owned(),
            response_nonce: nonce.to_owned(),
            error_detail: error.map(|message| Status {
                code: NACK_CODE,
                message,
                details: Vec::new(),
            }),
        }
    }

    /// One stream: first request, then ACK/NACK each response until it ends.
    async fn stream_once(
        &self,
        version: &mut String,
        received: &mut bool,
        fetch: tracing::Span,
    ) -> Result<()> {
        // Closed (exported) once the first response has been handled.
        let mut fetch = Some(fetch);
        let sds_err = |reason: String| Error::Sds {
            path: self.config.socket.clone(),
            reason,
        };
        let (req_tx, req_rx) = mpsc::channel::<DiscoveryRequest>(4);
        // Envoy resends the last accepted version when it reconnects.
        let mut first = self.request(version, "", None);
        first.node = Some(Node {
            id: self.config.node_id.clone(),
            cluster: self.config.cluster.clone(),
            ..Default::default()
        });
        req_tx
            .send(first)
            .await
            .map_err(|_| sds_err("request channel closed".into()))?;
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(req_rx));
        let span = fetch.clone().unwrap_or_else(tracing::Span::none);
        span.in_scope(|| telemetry::inject_grpc(request.metadata_mut()));
        let mut client = SecretDiscoveryServiceClient::new(self.channel.clone());
        let mut responses = client
            .stream_secrets(request)
            .instrument(span.clone())
            .await
            .map_err(|s| sds_err(format!("StreamSecrets: {} {}", s.code(), s.message())))?
            .into_inner();
        self.set_connected(true);
        tracing::debug!(secret = self.name, "SDS stream open");
        drop(span);
        loop {
            let waiting = fetch.clone().unwrap_or_else(tracing::Span::none);
            let response = responses
                .message()
                .instrument(waiting)
                .await
                .map_err(|s| sds_err(format!("stream: {} {}", s.code(), s.message())))?;
            let Some(response) = response else {
                return Ok(());
            };
            *received = true;
            let nonce = response.nonce.clone();
            let resp_version = response.version_info.clone();
            let reply = match decode(self.name, response) {
                Ok(update) => {
                    self.apply(update, &resp_version);
                    *version = resp_version;
                    self.metrics.sds_response(self.name, true);
                    self.request(version, &nonce, None)
                }
                Err(e) => {
                    let reason = e.to_string();
                    tracing::warn!(secret = self.name, version = %resp_version, error = %reason, "NACK: SDS response rejected; keeping the previous secret");
                    self.metrics.sds_response(self.name, false);
                    {
                        let mut st = self.state.lock().expect("sds state");
                        let s = st.status.get_mut(self.name).expect("known secret");
                        s.nacks += 1;
                        s.last_error = Some(reason.clone());
                    }
                    self.request(version, &nonce, Some(reason))
                }
            };
            // The fetch is done once its first answer is handled.
            fetch = None;
            req_tx
                .send(reply)
                .await
                .map_err(|_| sds_err("request stream closed".into()))?;
        }
    }

    fn set_connected(&self, connected: bool) {
        let mut st = self.state.lock().expect("sds state");
        st.status
            .get_mut(self.name)
            .expect("known secret")
            .connected = connected;
    }

    /// Stores a usable secret and publishes credentials once both are here.
    fn apply(&self, update: Update, version: &str) {
        let mut st = self.state.lock().expect("sds state");
        match update {
            Update::Svid(svid) => {
                let leaf = svid.leaf();
                tracing::info!(
                    secret = self.name,
                    version,
                    spiffe.id = %svid.id(),
                    cert.serial = %leaf.serial,
                    cert.not_after = meshid_common::cert::unix_secs(leaf.not_after),
                    "workload certificate accepted"
                );
                self.metrics.set_cert_expiry(DEFAULT_SECRET, leaf.not_after);
                st.svid = Some(Arc::from(svid));
            }
            Update::Bundle(bundle) => {
                tracing::info!(
                    secret = self.name,
                    version,
                    roots = bundle.roots().len(),
                    "trust bundle accepted"
                );
                if let Some(min) = bundle.earliest_expiry() {
                    self.metrics.set_cert_expiry(ROOTCA_SECRET, min);
                }
                st.bundle = Some(Arc::new(bundle));
            }
        }
        let s = st.status.get_mut(self.name).expect("known secret");
        s.version = Some(version.to_owned());
        s.accepted_at = Some(meshid_common::cert::unix_secs(SystemTime::now()));
        s.acks += 1;
        s.last_error = None;
        if let (Some(svid), Some(bundle)) = (&st.svid, &st.bundle) {
            self.tx.send_replace(Some(Credentials {
                svid: svid.clone(),
                bundle: bundle.clone(),
            }));
        }
    }
}

/// Pulls the one secret named `name` out of a response and checks it
/// (`meshid_common::sds::decode`, which wipes the response's bytes).
fn decode(name: &str, response: DiscoveryResponse) -> Result<Update> {
    meshid_common::sds::decode(name, response).map_err(|e| match e {
        meshid_common::Error::BadSecret { name, reason } => Error::BadSecret { name, reason },
        other => Error::BadSecret {
            name: name.to_owned(),
            reason: other.to_string(),
        },
    })
}
