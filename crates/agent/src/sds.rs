//! Envoy's Secret Discovery Service over the agent's Unix socket (DESIGN
//! §2.3): `StreamSecrets` (state of the world) and `FetchSecrets`.
//!
//! The names pilot-agent serves: `default`, the workload chain and key
//! (`TlsCertificate` with inline PEM); `ROOTCA`, the trust bundle
//! (`CertificateValidationContext` with inline PEM roots); `file-root:`,
//! `file-cert:` and `file-root:system`, read from files ([`crate::sds_files`]),
//! polled and re-pushed on change. Any other name gets the workload
//! certificate under that name, as pilot-agent's secret cache does. A file
//! secret that cannot be served (outside `--sds-file-allow`, unreadable, not
//! PEM) is logged and left out of the response; the stream stays open and
//! the secret is sent once the file is there. Each stream
//! task follows one client: the first request must name its node; a request
//! with the last nonce and no error is an ACK (no reply), with an error a
//! NACK (logged, no reply); an older nonce is stale and ignored. When the
//! credentials change, every stream whose resources changed version gets a
//! new response. Versions are content-derived (the leaf serial, the root
//! serials), so a reconnecting client sees the same version for the same
//! certificate.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use meshid_common::proto::discovery::{DiscoveryRequest, DiscoveryResponse};
use meshid_common::proto::sds::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use meshid_common::sds::SECRET_TYPE_URL;
use meshid_common::telemetry::{extract_grpc, set_remote_parent};
use meshid_common::{CertInfo, Credentials, CredentialsRx};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, field, info, info_span, warn};

use crate::error::Error;
use crate::metrics::Metrics;
use crate::sds_files::{FILE_POLL, FileAllow, FileError, FileResource};
use meshid_common::identity::Worker;

/// The two resource names (`default`, `ROOTCA`), as `meshid_common::sds`
/// defines them for the server and the clients alike.
pub use meshid_common::sds::{ROOT_SECRET as ROOT_RESOURCE, WORKLOAD_SECRET as WORKLOAD_RESOURCE};

/// How long `FetchSecrets` waits for a first certificate.
const FETCH_WAIT: Duration = Duration::from_secs(10);

/// The SDS service; clone-free, shared by every connection.
#[derive(Debug)]
pub struct SdsServer {
    manager: Arc<Worker>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
    next_stream: AtomicU64,
    cache: Arc<RenderCache>,
    allow: FileAllow,
}

impl SdsServer {
    pub fn new(manager: Arc<Worker>, metrics: Arc<Metrics>, cancel: CancellationToken) -> Self {
        SdsServer {
            manager,
            metrics,
            cancel,
            next_stream: AtomicU64::new(1),
            cache: Arc::default(),
            allow: FileAllow::default(),
        }
    }

    /// The directories `file-root:` / `file-cert:` secrets may be read from.
    pub fn with_file_allow(mut self, allow: FileAllow) -> Self {
        self.allow = allow;
        self
    }

    pub fn into_service(self) -> SecretDiscoveryServiceServer<Self> {
        SecretDiscoveryServiceServer::new(self).max_decoding_message_size(1 << 20)
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl SecretDiscoveryService for SdsServer {
    type StreamSecretsStream = ResponseStream;

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let parent = extract_grpc(request.metadata());
        let stream_id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let span = info_span!(
            "sds.stream",
            stream.id = stream_id,
            node.id = field::Empty,
            resources = field::Empty,
        );
        set_remote_parent(&span, parent.clone());
        let (tx, rx) = mpsc::channel(4);
        let task = StreamTask {
            manager: self.manager.clone(),
            metrics: self.metrics.clone(),
            creds: self.manager.credentials(),
            cache: self.cache.clone(),
            allow: self.allow.clone(),
            files: BTreeMap::new(),
            file_errors: BTreeMap::new(),
            parent,
            pending: None,
            stream_id,
            node: None,
            names: Vec::new(),
            last_nonce: None,
            sent: BTreeMap::new(),
            seq: 0,
            last_nacked: None,
            span: span.clone(),
        };
        let cancel = self.cancel.clone();
        let inbound = request.into_inner();
        tokio::spawn(task.run(inbound, tx, cancel).instrument(span));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn fetch_secrets(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let parent = extract_grpc(request.metadata());
        let req = request.into_inner();
        check_request(&req, true)?;
        let mut creds = self.manager.credentials();
        self.manager.request(Some(parent));
        let current = tokio::time::timeout(FETCH_WAIT, creds.wait_for(Option::is_some))
            .await
            .ok()
            .and_then(|r| r.ok())
            .and_then(|c| c.clone())
            .ok_or_else(|| Error::NotReady.to_status())?;
        let rendered = (self.cache.get(&current), current);
        let mut files = BTreeMap::new();
        let mut out = BTreeMap::new();
        for name in &req.resource_names {
            match resource(name, Some(&rendered), &self.allow, &mut files) {
                Ok(Some(r)) => {
                    out.insert(name.clone(), r);
                }
                Ok(None) => {}
                Err(e) => return Err(Status::not_found(e.to_string())),
            }
            self.metrics
                .sds_pushes
                .get_or_create(&Metrics::resource(name))
                .inc();
        }
        Ok(Response::new(response(&out, "fetch".into())))
    }
}

/// Checks node id, type URL and names of a subscribing request.
fn check_request(req: &DiscoveryRequest, need_node: bool) -> Result<(), Status> {
    if need_node && req.node.as_ref().is_none_or(|n| n.id.is_empty()) {
        return Err(Error::NoNodeId.to_status());
    }
    if !req.type_url.is_empty() && req.type_url != SECRET_TYPE_URL {
        return Err(Error::WrongTypeUrl(req.type_url.clone()).to_status());
    }
    if let Some(name) = req.resource_names.iter().find(|n| n.is_empty()) {
        return Err(Error::UnknownResource { name: name.clone() }.to_status());
    }
    Ok(())
}

/// A resource name and what became of it: served from the credentials later
/// (`Ok(false)`), a file secret read now (`Ok(true)`), or refused.
pub type NameOutcome = (String, Result<bool, FileError>);

/// What the agent makes of one request before any credentials exist: the
/// checks of a subscribing request (`need_node` for the first one of a
/// stream), then each name resolved as a stream resolves it — served from
/// the credentials later (`Ok(false)`), or a file secret read now under
/// `allow` (`Ok(true)`), or a refusal. The agent's own path, without a
/// running server: the SDS fuzz target runs it on decoded bytes.
pub fn inspect_request(
    req: &DiscoveryRequest,
    need_node: bool,
    allow: &FileAllow,
) -> Result<Vec<NameOutcome>, Status> {
    check_request(req, need_node)?;
    let mut files = BTreeMap::new();
    Ok(req
        .resource_names
        .iter()
        .map(|name| {
            let served = resource(name, None, allow, &mut files).map(|r| r.is_some());
            (name.clone(), served)
        })
        .collect())
}

/// One secret ready to send: its version and its encoding.
type Served = (String, prost_types::Any);

/// The version and encoding of resource `name`: from the credentials
/// (`Ok(None)` while there are none), or from files (`files` caches the
/// encodings by name, re-read when a file's version moves).
fn resource(
    name: &str,
    creds: Option<&(Arc<Rendered>, Credentials)>,
    allow: &FileAllow,
    files: &mut BTreeMap<String, Served>,
) -> Result<Option<Served>, FileError> {
    let Some(file) = FileResource::parse(name) else {
        let Some((rendered, creds)) = creds else {
            return Ok(None);
        };
        return Ok(Some(match name {
            WORKLOAD_RESOURCE => rendered.default.clone(),
            ROOT_RESOURCE => rendered.root.clone(),
            // pilot-agent answers any other name with the workload
            // certificate, named as asked.
            _ => (
                version(WORKLOAD_RESOURCE, creds),
                meshid_common::sds::to_any(meshid_common::sds::tls_certificate(name, &creds.svid)),
            ),
        }));
    };
    let v = format!("file.{}", crate::sds_files::version(name, &file, allow)?);
    if let Some(hit) = files.get(name).filter(|(old, _)| *old == v) {
        return Ok(Some(hit.clone()));
    }
    let any = crate::sds_files::load(name, &file, allow)?;
    files.insert(name.to_owned(), (v.clone(), any.clone()));
    Ok(Some((v, any)))
}

/// A response carrying `out`, its version naming each resource's.
fn response(out: &BTreeMap<String, Served>, nonce: String) -> DiscoveryResponse {
    meshid_common::sds::response(
        out.iter()
            .map(|(n, (v, _))| format!("{n}:{v}"))
            .collect::<Vec<_>>()
            .join(","),
        out.values().map(|(_, any)| any.clone()).collect(),
        nonce,
    )
}

/// The version of resource `name` in `creds`: the leaf serial, or the root serials.
fn version(name: &str, creds: &Credentials) -> String {
    if name == WORKLOAD_RESOURCE {
        creds.svid.leaf().serial.clone()
    } else {
        creds
            .bundle
            .roots()
            .iter()
            .map(|r| CertInfo::from_der(r).map(|i| i.serial).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("+")
    }
}

/// Both secrets of one credentials version, rendered once and shared by
/// every stream (a rotation pushed to a thousand streams encodes once).
#[derive(Debug)]
pub struct Rendered {
    svid: Arc<meshid_common::Svid>,
    bundle: Arc<meshid_common::TrustBundle>,
    default: (String, prost_types::Any),
    root: (String, prost_types::Any),
}

impl Rendered {
    fn new(creds: &Credentials) -> Self {
        Rendered {
            svid: creds.svid.clone(),
            bundle: creds.bundle.clone(),
            default: (
                version(WORKLOAD_RESOURCE, creds),
                meshid_common::sds::encode(WORKLOAD_RESOURCE, creds),
            ),
            root: (
                version(ROOT_RESOURCE, creds),
                meshid_common::sds::encode(ROOT_RESOURCE, creds),
            ),
        }
    }

    fn is_for(&self, creds: &Credentials) -> bool {
        Arc::ptr_eq(&self.svid, &creds.svid) && Arc::ptr_eq(&self.bundle, &creds.bundle)
    }
}

/// The latest [`Rendered`].
#[derive(Debug, Default)]
pub struct RenderCache {
    slot: Mutex<Option<Arc<Rendered>>>,
}

impl RenderCache {
    pub fn get(&self, creds: &Credentials) -> Arc<Rendered> {
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        match slot.as_ref() {
            Some(r) if r.is_for(creds) => r.clone(),
            _ => {
                let r = Arc::new(Rendered::new(creds));
                *slot = Some(r.clone());
                r
            }
        }
    }
}

/// The state of one `StreamSecrets` stream.
struct StreamTask {
    manager: Arc<Worker>,
    metrics: Arc<Metrics>,
    creds: CredentialsRx,
    cache: Arc<RenderCache>,
    allow: FileAllow,
    /// File secrets last read, by name.
    files: BTreeMap<String, Served>,
    /// The last error logged per file secret, so a missing file logs once.
    file_errors: BTreeMap<String, String>,
    /// The client's trace (the stream's `traceparent`), continued by each
    /// subscription's span.
    parent: opentelemetry::Context,
    /// `sds.subscribe` of the subscription not answered yet: it covers the
    /// wait for a certificate, so a first CSR nests under it.
    pending: Option<tracing::Span>,
    stream_id: u64,
    node: Option<String>,
    /// Subscribed resources, sorted.
    names: Vec<String>,
    last_nonce: Option<String>,
    /// Versions last sent, per resource.
    sent: BTreeMap<String, String>,
    seq: u64,
    /// The version last NACKed, so a NACK storm logs once.
    last_nacked: Option<String>,
    span: tracing::Span,
}

/// What the client is told when its request stream fails: tonic's refusal
/// of an oversized message (`OUT_OF_RANGE`) as grpc-go, and so pilot-agent,
/// says it (`RESOURCE_EXHAUSTED`); anything else as it is.
fn inbound_error(status: Status) -> Status {
    if status.code() == tonic::Code::OutOfRange
        && status.message().contains("message length too large")
    {
        Status::resource_exhausted(status.message().to_owned())
    } else {
        status
    }
}

impl StreamTask {
    async fn run(
        mut self,
        mut inbound: Streaming<DiscoveryRequest>,
        tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
        cancel: CancellationToken,
    ) {
        self.metrics.sds_connected_streams.inc();
        let mut poll = tokio::time::interval(FILE_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            let watching = self.names.iter().any(|n| FileResource::parse(n).is_some());
            let out = tokio::select! {
                _ = cancel.cancelled() => break,
                _ = poll.tick(), if watching => self.push(false),
                _ = tx.closed() => break,
                msg = inbound.message() => match msg {
                    Ok(Some(req)) => match self.on_request(req) {
                        Ok(reply) => reply,
                        Err(status) => {
                            warn!(error = %status.message(), "SDS stream refused");
                            let _ = tx.send(Err(status)).await;
                            break;
                        }
                    },
                    Ok(None) => break,
                    Err(status) => {
                        debug!(error = %status, "SDS stream closed by an error");
                        // Say why: a stream that just ends looks like a
                        // restart to the proxy, which then sends it again.
                        let _ = tx.send(Err(inbound_error(status))).await;
                        break;
                    }
                },
                changed = self.creds.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    self.push(false)
                }
            };
            if let Some(resp) = out
                && tx.send(Ok(resp)).await.is_err()
            {
                break;
            }
        }
        self.metrics.sds_connected_streams.dec();
        debug!(
            node.id = self.node.as_deref().unwrap_or(""),
            "SDS stream ended"
        );
    }

    /// Handles one request; `Ok(Some)` is the reply to send.
    fn on_request(&mut self, req: DiscoveryRequest) -> Result<Option<DiscoveryResponse>, Status> {
        if self.node.is_none() {
            check_request(&req, true)?;
            let node = req.node.as_ref().map(|n| n.id.clone()).unwrap_or_default();
            self.span.record("node.id", node.as_str());
            self.node = Some(node);
        }
        if !req.response_nonce.is_empty() {
            if self.last_nonce.as_deref() != Some(req.response_nonce.as_str()) {
                debug!(nonce = %req.response_nonce, "stale nonce; ignored");
                return Ok(None);
            }
            if let Some(err) = &req.error_detail {
                for name in &self.names {
                    self.metrics
                        .sds_nacks
                        .get_or_create(&Metrics::resource(name))
                        .inc();
                }
                if self.last_nacked.as_deref() != Some(req.version_info.as_str()) {
                    warn!(
                        resources = ?self.names,
                        version = %req.version_info,
                        error = %err.message,
                        "the SDS client rejected (NACKed) our secret"
                    );
                    self.last_nacked = Some(req.version_info.clone());
                } else {
                    debug!(version = %req.version_info, "repeated NACK");
                }
                return Ok(None);
            }
            let mut names = req.resource_names.clone();
            names.sort();
            names.dedup();
            if names == self.names {
                debug!(version = %req.version_info, "ACK");
                return Ok(None);
            }
        }
        check_request(&req, false)?;
        let mut names = req.resource_names;
        names.sort();
        names.dedup();
        info!(
            stream.id = self.stream_id,
            resources = ?names,
            "SDS subscription"
        );
        self.span.record("resources", field::debug(&names));
        self.names = names;
        // One span per subscription, from the request to its answer. The
        // stream's span lasts as long as the stream, so an exporter would
        // not see it until the proxy goes away; this one ends with the
        // answer and is what the first CSR continues.
        let subscribe = info_span!(
            "sds.subscribe",
            stream.id = self.stream_id,
            resources = ?self.names,
        );
        set_remote_parent(&subscribe, self.parent.clone());
        // A new subscription is answered at once (when we have credentials).
        self.sent.clear();
        if self.creds.borrow().is_none() {
            self.manager
                .request(Some(meshid_common::telemetry::context_of(&subscribe)));
        }
        self.pending = Some(subscribe);
        Ok(self.push(true))
    }

    /// A response if a subscribed resource's version moved (or `force`).
    fn push(&mut self, force: bool) -> Option<DiscoveryResponse> {
        let creds = self.creds.borrow_and_update().clone();
        if self.names.is_empty() {
            return None;
        }
        let rendered = creds.map(|c| (self.cache.get(&c), c));
        let mut out = BTreeMap::new();
        for name in &self.names {
            match resource(name, rendered.as_ref(), &self.allow, &mut self.files) {
                Ok(Some(r)) => {
                    if self.file_errors.remove(name).is_some() {
                        info!(resource = %name, "SDS file secret readable again");
                    }
                    out.insert(name.clone(), r);
                }
                Ok(None) => {}
                Err(e) => {
                    let msg = e.to_string();
                    if self.file_errors.get(name) != Some(&msg) {
                        warn!(
                            resource = %name,
                            error = %msg,
                            "SDS secret not served; the stream stays open and the file is watched"
                        );
                        self.file_errors.insert(name.clone(), msg);
                    }
                }
            }
        }
        if out.is_empty() {
            return None;
        }
        let versions: BTreeMap<String, String> = out
            .iter()
            .map(|(n, (v, _))| (n.clone(), v.clone()))
            .collect();
        if !force && versions == self.sent {
            return None;
        }
        self.seq += 1;
        let nonce = format!("{}-{}", self.stream_id, self.seq);
        let resp = response(&out, nonce.clone());
        for name in versions.keys() {
            self.metrics
                .sds_pushes
                .get_or_create(&Metrics::resource(name))
                .inc();
        }
        debug!(version = %resp.version_info, %nonce, "SDS push");
        // The subscription is answered: its span ends here.
        self.pending = None;
        self.sent = versions;
        self.last_nonce = Some(nonce);
        Some(resp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshid_common::proto::envoy_core::Node;

    fn request(node: &str, names: &[&str]) -> DiscoveryRequest {
        DiscoveryRequest {
            node: Some(Node {
                id: node.into(),
                ..Default::default()
            }),
            resource_names: names.iter().map(|n| n.to_string()).collect(),
            type_url: SECRET_TYPE_URL.into(),
            ..Default::default()
        }
    }

    #[test]
    fn requests_are_checked_and_names_resolved_without_credentials() {
        let deny = FileAllow::default();
        let out = inspect_request(
            &request("n", &["default", "ROOTCA", "file-root:/etc/passwd"]),
            true,
            &deny,
        )
        .unwrap();
        assert!(matches!(out[0], (ref n, Ok(false)) if n == "default"));
        assert!(matches!(out[1], (ref n, Ok(false)) if n == "ROOTCA"));
        assert!(
            matches!(out[2].1, Err(FileError::NotAllowed { .. })),
            "{:?}",
            out[2]
        );
        let no_node = inspect_request(&request("", &["default"]), true, &deny).unwrap_err();
        assert_eq!(no_node.code(), tonic::Code::InvalidArgument);
        assert!(inspect_request(&request("", &["default"]), false, &deny).is_ok());
        let empty_name = inspect_request(&request("n", &[""]), true, &deny).unwrap_err();
        assert_eq!(
            empty_name.code(),
            tonic::Code::InvalidArgument,
            "{empty_name:?}"
        );
    }
}
