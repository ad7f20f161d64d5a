//! The gRPC side: `IstioCertificateService/CreateCertificate` and the gRPC
//! health service over TLS, with the accept loop that does handshakes
//! concurrently and hands tonic connections that know their client
//! certificate. Every call gets a request id ([`request_id`], the caller's
//! `x-request-id` when sane); a refusal is answered by [`refuse`] alone: the
//! detail logged under that id, the caller told the category and the id.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use meshid_common::SpiffeId;
use meshid_common::keys::{ParsedCsr, parse_csr_pem};
use meshid_common::proto::istio_ca::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use meshid_common::proto::istio_ca::{IstioCertificateRequest, IstioCertificateResponse};
use meshid_common::serve::Drain;
use meshid_common::telemetry;
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::authn::{Authn, Caller};
use crate::authz::{Authorizer, impersonated_identity};
use crate::error::{Error, REQUEST_ID_KEY, Result, request_id};
use crate::metrics::Metrics;
use crate::sign::{CertSigner, SignRequest};
use crate::signer::Issued;

/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the service knows of a connection.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    /// The client's certificate chain, if it sent one (leaf first).
    pub peer_certs: Option<Arc<Vec<CertificateDer<'static>>>>,
}

/// A TLS connection as tonic sees it.
#[derive(Debug)]
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: ConnInfo,
}

impl Connected for TlsConn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts TCP connections on `drain`'s loop, handshakes each in its own
/// task, and yields the established ones.
pub fn tls_incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    drain: &Drain,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<TlsConn>> {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    drain.incoming("gRPC", listener, move |tcp: TcpStream, remote| {
        let acceptor = acceptor.clone();
        async move {
            let _ = tcp.set_nodelay(true);
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    let peer_certs = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .map(|c| Arc::new(c.iter().map(|d| d.clone().into_owned()).collect()));
                    let info = ConnInfo { remote, peer_certs };
                    Some(TlsConn { inner: tls, info })
                }
                Ok(Err(e)) => {
                    tracing::debug!(peer.addr = %remote, error = %e, "TLS handshake failed");
                    None
                }
                Err(_) => {
                    tracing::debug!(peer.addr = %remote, "TLS handshake timed out");
                    None
                }
            }
        }
    })
}

/// Everything a request needs.
#[derive(Debug)]
pub struct CaCore {
    pub trust_domain: String,
    pub cluster_id: String,
    pub default_ttl: Duration,
    pub max_ttl: Duration,
    pub authn: Authn,
    pub authz: Authorizer,
    /// The built-in signer or an external one (Vault): the CA is then a
    /// registration authority.
    pub signer: Arc<dyn CertSigner>,
    pub metrics: Arc<Metrics>,
}

/// The `IstioCertificateService` implementation.
#[derive(Debug, Clone)]
pub struct CaService {
    core: Arc<CaCore>,
}

impl CaService {
    pub fn new(core: Arc<CaCore>) -> Self {
        CaService { core }
    }

    /// The tonic service, with the request size limit answered as istiod
    /// answers it.
    pub fn into_server(
        self,
        max_request_bytes: usize,
    ) -> OversizeIsResourceExhausted<IstioCertificateServiceServer<CaService>> {
        OversizeIsResourceExhausted {
            inner: IstioCertificateServiceServer::new(self)
                .max_decoding_message_size(max_request_bytes),
        }
    }
}

/// tonic refuses a message above its decoding limit with `OUT_OF_RANGE`
/// (and reads no more of it than the limit); istiod's gRPC server (grpc-go)
/// says `RESOURCE_EXHAUSTED`, which is what Istio clients see and retry on.
/// This keeps tonic's limit and gives the refusal istiod's code.
#[derive(Clone, Debug)]
pub struct OversizeIsResourceExhausted<S> {
    inner: S,
}

impl<S: tonic::server::NamedService> tonic::server::NamedService
    for OversizeIsResourceExhausted<S>
{
    const NAME: &'static str = S::NAME;
}

impl<S, B> tonic::codegen::Service<http::Request<tonic::body::Body>>
    for OversizeIsResourceExhausted<S>
where
    S: tonic::codegen::Service<http::Request<tonic::body::Body>, Response = http::Response<B>>,
{
    type Response = http::Response<B>;
    type Error = S::Error;
    type Future = futures::future::MapOk<S::Future, fn(http::Response<B>) -> http::Response<B>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        use futures::TryFutureExt;
        self.inner
            .call(request)
            .map_ok(oversize_is_resource_exhausted::<B>)
    }
}

/// Rewrites tonic's trailers-only "message length too large" refusal.
fn oversize_is_resource_exhausted<B>(mut response: http::Response<B>) -> http::Response<B> {
    let oversize = Status::from_header_map(response.headers()).is_some_and(|s| {
        s.code() == tonic::Code::OutOfRange && s.message().contains("message length too large")
    });
    if oversize {
        response.headers_mut().insert(
            "grpc-status",
            http::HeaderValue::from(tonic::Code::ResourceExhausted as i32),
        );
    }
    response
}

impl CaCore {
    fn ttl(&self, validity_duration: i64) -> Result<Duration> {
        if validity_duration <= 0 {
            return Ok(self.default_ttl);
        }
        let requested = Duration::from_secs(validity_duration as u64);
        if requested > self.max_ttl {
            return Err(Error::TtlTooLong {
                requested_secs: validity_duration,
                max_secs: self.max_ttl.as_secs(),
            });
        }
        Ok(requested)
    }

    /// Who is calling: the `clusterid` check and the authenticator chain,
    /// the same for every CA service (CreateCertificate, JWT-SVIDs).
    pub async fn authenticate<T>(&self, request: &Request<T>) -> Result<Caller> {
        let metadata = request.metadata();
        let peer_certs = request
            .extensions()
            .get::<ConnInfo>()
            .and_then(|c| c.peer_certs.clone());
        self.authn
            .authenticate(metadata, peer_certs.as_deref().map(Vec::as_slice))
            .instrument(tracing::info_span!("ca.authenticate"))
            .await
    }

    /// The identity `caller` gets: its own, or `target` when it may
    /// impersonate (DESIGN §2.1).
    pub async fn authorize(&self, caller: &Caller, target: Option<&str>) -> Result<SpiffeId> {
        self.authz
            .authorize(caller, target)
            .instrument(tracing::info_span!(
                "ca.authorize",
                caller = %caller.id,
                method = caller.method
            ))
            .await
    }

    async fn issue(
        &self,
        request: &Request<IstioCertificateRequest>,
    ) -> Result<(Caller, SpiffeId, Issued)> {
        let caller = self.authenticate(request).await?;
        let body = request.get_ref();
        let target = impersonated_identity(body.metadata.as_ref())?;
        let identity = self.authorize(&caller, target.as_deref()).await?;
        let span =
            tracing::info_span!("ca.sign", spiffe.id = %identity, signer = self.signer.kind());
        let (ttl, csr) = span.in_scope(|| {
            let ttl = self.ttl(body.validity_duration)?;
            let csr = check_csr(&body.csr, &identity, &self.authz, &self.trust_domain)?;
            Ok::<_, Error>((ttl, csr))
        })?;
        let issued = self
            .signer
            .sign(SignRequest {
                id: &identity,
                csr_pem: &body.csr,
                public_key_spki: &csr.public_key_spki,
                ttl,
            })
            .instrument(span)
            .await?;
        Ok((caller, identity, issued))
    }
}

/// What the CA does with a CSR's bytes before it signs for `identity`:
/// parse the PEM and the DER, verify the self-signature, and refuse a URI
/// SAN naming anyone else. istiod ignores the CSR's SANs; meshid refuses a
/// CSR that asks for anything but the identity it will get, compared in the
/// primary trust domain. Pure, so the CSR fuzz target runs it as the CA does.
pub fn check_csr(
    csr_pem: &str,
    identity: &SpiffeId,
    authz: &Authorizer,
    trust_domain: &str,
) -> Result<ParsedCsr> {
    let csr = parse_csr_pem(csr_pem).map_err(Error::Csr)?;
    match csr.uri_sans.as_slice() {
        [] => {}
        [uri] => {
            let requested = SpiffeId::parse(uri).map_err(|e| Error::CsrUri {
                uri: uri.chars().take(256).collect(),
                reason: e.to_string(),
            })?;
            // A trust domain alias names the same identity (Istio's
            // trustDomainAliases): compare in the primary trust domain.
            let Some(primary) = authz.in_primary_trust_domain(&requested) else {
                return Err(Error::CsrTrustDomain {
                    requested: requested.to_string(),
                    requested_td: requested.trust_domain().to_owned(),
                    trust_domain: trust_domain.to_owned(),
                });
            };
            if &primary != identity {
                return Err(Error::CsrIdentity {
                    requested: requested.to_string(),
                    allowed: identity.to_string(),
                });
            }
        }
        many => return Err(Error::CsrUriSans { count: many.len() }),
    }
    Ok(csr)
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> std::result::Result<Response<IstioCertificateResponse>, Status> {
        let started = Instant::now();
        let remote = request.extensions().get::<ConnInfo>().map(|c| c.remote);
        let request_id = request_id(request.metadata());
        let span = tracing::info_span!(
            "ca.create_certificate",
            peer.addr = ?remote,
            request_id = %request_id
        );
        telemetry::set_remote_parent(&span, telemetry::extract_grpc(request.metadata()));
        let core = &self.core;
        core.metrics.csr_count.inc();
        let result = core.issue(&request).instrument(span.clone()).await;
        let elapsed = started.elapsed();
        core.metrics.observe_latency(elapsed);
        let _entered = span.enter();
        match result {
            Ok((caller, identity, issued)) => {
                core.metrics.success_count.inc();
                tracing::info!(
                    spiffe.id = %identity,
                    cert.serial = %issued.leaf.serial,
                    cert.not_after = meshid_common::cert::unix_secs(issued.leaf.not_after),
                    caller = %caller.id,
                    caller.method = caller.method,
                    caller.node = caller.node.as_deref().unwrap_or(""),
                    latency_us = elapsed.as_micros() as u64,
                    "certificate issued"
                );
                Ok(with_request_id(
                    Response::new(IstioCertificateResponse {
                        cert_chain: issued.chain,
                    }),
                    &request_id,
                ))
            }
            Err(e) => {
                core.metrics.refused(&e);
                Err(refuse(&e, &request_id, "certificate request refused"))
            }
        }
    }
}

/// The one way a CA service answers a refusal: the detail is logged under
/// `request_id` (also a field of the request's span), the caller gets the
/// code, the category and the id (DESIGN §2.1; istiod answers refusals
/// opaquely too).
pub fn refuse(error: &Error, request_id: &str, what: &str) -> Status {
    tracing::warn!(
        request_id,
        error = %error,
        code = ?error.code(),
        "{what}"
    );
    error.to_status(request_id)
}

/// Sets `x-request-id` on a successful answer.
pub fn with_request_id<T>(mut response: Response<T>, request_id: &str) -> Response<T> {
    if let Ok(value) = request_id.parse() {
        response.metadata_mut().insert(REQUEST_ID_KEY, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(status: Status) -> http::Response<tonic::body::Body> {
        status.into_http()
    }

    #[test]
    fn only_the_size_refusal_becomes_resource_exhausted() {
        let too_large = refusal(Status::out_of_range(
            "Error, decoded message length too large: found 2097159 bytes, the limit is: 65536 bytes",
        ));
        let rewritten = oversize_is_resource_exhausted(too_large);
        let status = Status::from_header_map(rewritten.headers()).expect("status");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(
            status.message().contains("found 2097159 bytes"),
            "{status:?}"
        );

        let other = refusal(Status::out_of_range("something else"));
        let kept = oversize_is_resource_exhausted(other);
        let status = Status::from_header_map(kept.headers()).expect("status");
        assert_eq!(status.code(), tonic::Code::OutOfRange);
    }
}
