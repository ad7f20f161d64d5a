//! The seam between a [`Worker`](super::Worker) and whoever signs: one
//! request in, the `cert_chain` as the CA answered it out. The worker checks
//! every answer itself, so a fake source in a test goes through the same
//! checks as the real CA.

use std::fmt;
use std::time::Duration;

use futures::future::BoxFuture;

use super::args::CaClientSettings;
use super::token::Token;
use crate::ca_client::{CaClient, CallOptions, JwtBundle, MintedJwt, RootsFileCaClient};
use crate::error::{Error, Result};
use crate::spiffe::SpiffeId;

/// One certificate request, as a worker hands it to a source.
#[derive(Debug)]
pub struct SignRequest {
    /// The identity the CSR asks for (and the worker expects back).
    pub id: SpiffeId,
    /// PEM CSR built from the in-memory key.
    pub csr_pem: String,
    /// Requested validity (`validity_duration`).
    pub ttl: Duration,
    /// The service-account token read for this request: the workload's own,
    /// or the node agent's when `on_behalf` is set.
    pub token: Token,
    /// Ask for `id` on behalf of a workload (`ImpersonatedIdentity`, the
    /// ztunnel's way).
    pub on_behalf: bool,
}

/// Something that signs CSRs: the Istio CA over gRPC, or a fake in tests.
pub trait CertificateSource: Send + Sync + fmt::Debug + 'static {
    /// Sends the request and returns `cert_chain` as the CA answered it: the
    /// leaf PEM first, then one intermediate per element, the last element
    /// the PEM root bundle. CA statuses come back as
    /// [`Error::Ca`](crate::Error::Ca) with their code, so that
    /// [`classify`](super::classify) can tell a refusal from an outage.
    fn sign(&self, req: SignRequest) -> BoxFuture<'_, Result<Vec<String>>>;
}

/// A source that also mints JWT-SVIDs (the agent's Workload API). A trait
/// of its own rather than more methods of [`CertificateSource`]: a trait
/// object's vtable links every method, so the ztunnel, which signs CSRs
/// only, would carry the JWT calls' gRPC code for nothing.
pub trait JwtSource: CertificateSource {
    /// Mints a JWT-SVID for `audience` through the CA
    /// (`meshid.v1.JwtSvidService/Mint`), authenticated by `token`. A source
    /// without JWT-SVIDs answers `UNIMPLEMENTED`.
    fn mint_jwt(&self, req: JwtRequest) -> BoxFuture<'_, Result<MintedJwt>> {
        let _ = req;
        Box::pin(async { Err(jwt_unsupported()) })
    }

    /// The trust domain's JWT bundle from the CA.
    fn jwt_bundle(&self, token: Token) -> BoxFuture<'_, Result<JwtBundle>> {
        let _ = token;
        Box::pin(async { Err(jwt_unsupported()) })
    }
}

/// One JWT-SVID request, as the agent hands it to a source.
#[derive(Debug)]
pub struct JwtRequest {
    pub audience: Vec<String>,
    /// Ask for this identity on behalf of a workload (node agents only).
    pub impersonate: Option<SpiffeId>,
    /// Zero: the CA's default.
    pub ttl: Duration,
    pub token: Token,
}

fn jwt_unsupported() -> Error {
    Error::Ca {
        code: tonic::Code::Unimplemented,
        message: "this certificate source issues no JWT-SVIDs".into(),
    }
}

/// The Istio CA at `CA_ADDRESS`, trusted through the roots in `CA_ROOT_CA`
/// (re-read before each CSR, so a rotated root needs no restart).
#[derive(Debug)]
pub struct CaSource {
    client: RootsFileCaClient,
}

impl CaSource {
    /// Reads `CA_ROOT_CA` and prepares a lazily connecting client: the CA
    /// may come up after the workload. Must be called inside a Tokio runtime.
    pub fn new(settings: &CaClientSettings) -> Result<Self> {
        let client = CaClient::new(settings.connection()?)?;
        Ok(CaSource {
            client: RootsFileCaClient::new(&settings.root_ca, client),
        })
    }

    /// The CA's address, for logs.
    pub fn address(&self) -> String {
        self.client.config().address
    }
}

impl CertificateSource for CaSource {
    fn sign(&self, req: SignRequest) -> BoxFuture<'_, Result<Vec<String>>> {
        Box::pin(async move {
            let options = CallOptions {
                token: Some(req.token.expose()),
                impersonate: req.on_behalf.then_some(&req.id),
            };
            self.client
                .current()
                .create_certificate(&req.csr_pem, req.ttl, options)
                .await
        })
    }
}

impl JwtSource for CaSource {
    fn mint_jwt(&self, req: JwtRequest) -> BoxFuture<'_, Result<MintedJwt>> {
        Box::pin(async move {
            let options = CallOptions {
                token: Some(req.token.expose()),
                impersonate: req.impersonate.as_ref(),
            };
            self.client
                .current()
                .mint_jwt(&req.audience, req.ttl, options)
                .await
        })
    }

    fn jwt_bundle(&self, token: Token) -> BoxFuture<'_, Result<JwtBundle>> {
        Box::pin(async move {
            let options = CallOptions {
                token: Some(token.expose()),
                impersonate: None,
            };
            self.client.current().jwt_bundle(options).await
        })
    }
}
