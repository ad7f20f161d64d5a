//! The SPIFFE Workload API (DESIGN §2.4) beside SDS: `FetchX509SVID` and
//! `FetchX509Bundles` stream the full state in every message, the first one
//! as soon as a certificate is held, then one per change. Every call must
//! carry `workload.spiffe.io: true` (else `INVALID_ARGUMENT`). The JWT calls
//! (`FetchJWTSVID`, `FetchJWTBundles`, `ValidateJWTSVID`) are served by
//! [`crate::jwt`] with JWT-SVIDs the CA mints.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use meshid_common::Credentials;
use meshid_common::proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use meshid_common::proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse,
    ValidateJwtsvidRequest, ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse,
    X509svid, X509svidRequest, X509svidResponse,
};
use meshid_common::telemetry::extract_grpc;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::error::Error;
use crate::jwt::JwtSvids;
use crate::metrics::Metrics;
use meshid_common::identity::Worker;

/// The header every Workload API call must carry.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

/// The Workload API service.
#[derive(Debug)]
pub struct WorkloadApiServer {
    manager: Arc<Worker>,
    jwt: Arc<JwtSvids>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
}

impl WorkloadApiServer {
    pub fn new(
        manager: Arc<Worker>,
        jwt: Arc<JwtSvids>,
        metrics: Arc<Metrics>,
        cancel: CancellationToken,
    ) -> Self {
        WorkloadApiServer {
            manager,
            jwt,
            metrics,
            cancel,
        }
    }

    pub fn into_service(self) -> SpiffeWorkloadApiServer<Self> {
        SpiffeWorkloadApiServer::new(self)
    }

    /// A stream of `render(current credentials)`: now, then at every change.
    fn watch<T: Send + 'static>(
        &self,
        metadata: &MetadataMap,
        render: fn(&Credentials) -> T,
    ) -> Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>> {
        self.manager.request(Some(extract_grpc(metadata)));
        let guard = StreamGuard::new(self.metrics.clone());
        let state = (
            self.manager.credentials(),
            self.cancel.clone(),
            guard,
            false,
        );
        Box::pin(futures::stream::unfold(
            state,
            move |(mut rx, cancel, guard, sent)| async move {
                if sent {
                    tokio::select! {
                        _ = cancel.cancelled() => return None,
                        changed = rx.changed() => changed.ok()?,
                    }
                }
                loop {
                    let current = rx.borrow_and_update().clone();
                    if let Some(creds) = current {
                        guard.metrics.workload_api_pushes.inc();
                        return Some((Ok(render(&creds)), (rx, cancel, guard, true)));
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => return None,
                        changed = rx.changed() => changed.ok()?,
                    }
                }
            },
        ))
    }
}

/// Counts an open stream for as long as tonic holds it.
struct StreamGuard {
    metrics: Arc<Metrics>,
}

impl StreamGuard {
    fn new(metrics: Arc<Metrics>) -> Self {
        metrics.workload_api_streams.inc();
        StreamGuard { metrics }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.metrics.workload_api_streams.dec();
    }
}

fn check_header(metadata: &MetadataMap) -> Result<(), Status> {
    match metadata.get(SECURITY_HEADER).map(|v| v.to_str()) {
        Some(Ok("true")) => Ok(()),
        _ => Err(Error::MissingSecurityHeader.to_status()),
    }
}

fn bundle_key(creds: &Credentials) -> String {
    format!("spiffe://{}", creds.svid.id().trust_domain())
}

fn x509_svid_response(creds: &Credentials) -> X509svidResponse {
    let svid = &creds.svid;
    X509svidResponse {
        svids: vec![X509svid {
            spiffe_id: svid.id().to_string(),
            x509_svid: svid
                .chain()
                .iter()
                .flat_map(|c| c.iter().copied())
                .collect(),
            x509_svid_key: svid.key().pkcs8_der().to_vec(),
            bundle: creds.bundle.to_concatenated_der(),
            hint: String::new(),
        }],
        crl: Vec::new(),
        federated_bundles: HashMap::new(),
    }
}

fn x509_bundles_response(creds: &Credentials) -> X509BundlesResponse {
    X509BundlesResponse {
        crl: Vec::new(),
        bundles: HashMap::from([(bundle_key(creds), creds.bundle.to_concatenated_der())]),
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApiServer {
    type FetchX509SVIDStream = BoxStream<X509svidResponse>;
    type FetchX509BundlesStream = BoxStream<X509BundlesResponse>;
    type FetchJWTBundlesStream = BoxStream<JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        check_header(request.metadata())?;
        Ok(Response::new(
            self.watch(request.metadata(), x509_svid_response),
        ))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        check_header(request.metadata())?;
        Ok(Response::new(
            self.watch(request.metadata(), x509_bundles_response),
        ))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        check_header(request.metadata())?;
        let span = tracing::info_span!("agent.jwt_fetch", spiffe.id = self.manager.id().as_str());
        meshid_common::telemetry::set_remote_parent(&span, extract_grpc(request.metadata()));
        let body = request.into_inner();
        let token = self
            .jwt
            .fetch(&body.audience, &body.spiffe_id)
            .instrument(span.clone())
            .await
            .inspect_err(|s| {
                span.in_scope(
                    || tracing::warn!(code = ?s.code(), error = s.message(), "JWT-SVID refused"),
                )
            })?;
        Ok(Response::new(JwtsvidResponse {
            svids: vec![Jwtsvid {
                spiffe_id: self.manager.id().to_string(),
                svid: token,
                hint: String::new(),
            }],
        }))
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        check_header(request.metadata())?;
        let rx = self.jwt.bundles();
        let guard = StreamGuard::new(self.metrics.clone());
        let state = (rx, self.cancel.clone(), guard, false);
        Ok(Response::new(Box::pin(futures::stream::unfold(
            state,
            |(mut rx, cancel, guard, sent)| async move {
                if sent {
                    tokio::select! {
                        _ = cancel.cancelled() => return None,
                        changed = rx.changed() => changed.ok()?,
                    }
                }
                loop {
                    let current = rx.borrow_and_update().clone();
                    if let Some(bundle) = current {
                        guard.metrics.workload_api_pushes.inc();
                        let response = JwtBundlesResponse {
                            bundles: HashMap::from([(
                                crate::jwt::bundle_key(&bundle.trust_domain),
                                bundle.jwks,
                            )]),
                        };
                        return Some((Ok(response), (rx, cancel, guard, true)));
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => return None,
                        changed = rx.changed() => changed.ok()?,
                    }
                }
            },
        ))))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        check_header(request.metadata())?;
        let span = tracing::info_span!("agent.jwt_validate");
        meshid_common::telemetry::set_remote_parent(&span, extract_grpc(request.metadata()));
        let body = request.into_inner();
        let (id, claims) = self
            .jwt
            .validate(&body.audience, &body.svid)
            .instrument(span.clone())
            .await
            .inspect_err(|s| {
                span.in_scope(
                    || tracing::info!(code = ?s.code(), error = s.message(), "JWT-SVID not valid"),
                )
            })?;
        Ok(Response::new(ValidateJwtsvidResponse {
            spiffe_id: id.to_string(),
            claims: Some(crate::jwt::to_struct(claims)),
        }))
    }
}
