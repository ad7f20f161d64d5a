//! The client side of the Istio CA (`IstioCertificateService/CreateCertificate`,
//! DESIGN §2.1), shared by the agent and the ztunnel.
//!
//! It speaks gRPC over TLS to `CA_ADDRESS`, trusting the roots of `CA_ROOT_CA`
//! and checking the CA's DNS name (`istiod.istio-system.svc` unless told
//! otherwise: the address is often an IP). Each call carries the bearer token,
//! the `clusterid`, the optional `ImpersonatedIdentity` and the caller's W3C
//! trace context. Answers are not trusted blindly: the chain must have a leaf
//! and a root bundle, the leaf must hold our public key and the identity we
//! asked for, and it must verify to the returned roots for both client and
//! server use. Errors keep the gRPC status code so callers can tell a refusal
//! (`UNAUTHENTICATED`) from an outage (`UNAVAILABLE`).

use std::fmt;
use std::time::{Duration, SystemTime};

use rustls_pki_types::CertificateDer;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::bundle::{TrustBundle, Usage};
use crate::cert::{CertInfo, certs_to_pem, parse_pem_certs};
use crate::error::{Error, Result};
use crate::keys::PrivateKey;
use crate::proto::istio_ca::IstioCertificateRequest;
use crate::proto::istio_ca::istio_certificate_service_client::IstioCertificateServiceClient;
use crate::proto::jwt_svid::jwt_svid_service_client::JwtSvidServiceClient;
use crate::proto::jwt_svid::{JwtBundleRequest, MintJwtSvidRequest};
use crate::spiffe::SpiffeId;
use crate::tls::Svid;

/// The DNS name in the CA's serving certificate.
pub const DEFAULT_CA_SERVER_NAME: &str = "istiod.istio-system.svc";
/// Default `CA_ADDRESS`.
pub const DEFAULT_CA_ADDRESS: &str = "https://localhost:15012";
/// Metadata key a node agent uses to ask for another workload's certificate.
pub const IMPERSONATED_IDENTITY_KEY: &str = "ImpersonatedIdentity";
/// Default deadline of one CreateCertificate call.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Default TCP + TLS connect deadline.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the CA is and how to trust it.
#[derive(Clone)]
pub struct CaClientConfig {
    /// `https://host:port`, or Istio's `host:port` (TLS is implied).
    pub address: String,
    /// PEM roots the CA's serving certificate must chain to (`CA_ROOT_CA`).
    pub root_pem: String,
    /// The DNS name checked in the CA's certificate.
    pub server_name: String,
    /// Sent as `clusterid` when set.
    pub cluster_id: Option<String>,
    pub call_timeout: Duration,
    pub connect_timeout: Duration,
}

impl fmt::Debug for CaClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaClientConfig")
            .field("address", &self.address)
            .field("server_name", &self.server_name)
            .field("cluster_id", &self.cluster_id)
            .field(
                "roots",
                &parse_pem_certs(&self.root_pem).map_or(0, |c| c.len()),
            )
            .field("call_timeout", &self.call_timeout)
            .finish()
    }
}

impl CaClientConfig {
    /// A config with the default server name and timeouts.
    pub fn new(address: impl Into<String>, root_pem: impl Into<String>) -> Self {
        CaClientConfig {
            address: address.into(),
            root_pem: root_pem.into(),
            server_name: DEFAULT_CA_SERVER_NAME.to_owned(),
            cluster_id: None,
            call_timeout: DEFAULT_CALL_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }
}

/// What one call sends besides the CSR.
#[derive(Clone, Copy, Default)]
pub struct CallOptions<'a> {
    /// The service-account JWT, sent as `authorization: Bearer <token>`.
    pub token: Option<&'a str>,
    /// Ask for this identity on behalf of a workload (node agents only).
    pub impersonate: Option<&'a SpiffeId>,
}

impl fmt::Debug for CallOptions<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallOptions")
            .field("token", &self.token.map(|_| "[redacted]"))
            .field("impersonate", &self.impersonate.map(SpiffeId::as_str))
            .finish()
    }
}

/// A CA connection (lazily established, shared by clones).
#[derive(Clone)]
pub struct CaClient {
    client: IstioCertificateServiceClient<Channel>,
    jwt: JwtSvidServiceClient<Channel>,
    config: CaClientConfig,
}

/// A JWT-SVID as the CA minted it (unchecked: the agent verifies it against
/// the JWT bundle before handing it out).
#[derive(Clone)]
pub struct MintedJwt {
    pub token: String,
    pub spiffe_id: String,
    /// The `exp` claim.
    pub expires_at: SystemTime,
}

impl fmt::Debug for MintedJwt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MintedJwt")
            .field("token", &"[redacted]")
            .field("spiffe_id", &self.spiffe_id)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// The trust domain's JWT authorities, as the CA publishes them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JwtBundle {
    pub trust_domain: String,
    /// JWKS JSON (`use: jwt-svid` keys with `kid`).
    pub jwks: Vec<u8>,
}

impl fmt::Debug for CaClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaClient")
            .field("config", &self.config)
            .finish()
    }
}

impl CaClient {
    /// A client that connects on first use (so a workload may start before
    /// the CA). Fails only on a bad address or unusable roots. Must be called
    /// inside a Tokio runtime.
    pub fn new(config: CaClientConfig) -> Result<Self> {
        Self::build(config, None)
    }

    /// A client that also presents `svid` as its TLS client certificate, so
    /// the CA may authenticate a renewal by the current certificate.
    pub fn with_client_certificate(config: CaClientConfig, svid: &Svid) -> Result<Self> {
        let chain = certs_to_pem(svid.chain());
        let key = svid.key().to_pkcs8_pem();
        Self::build(config, Some(Identity::from_pem(chain, key.as_bytes())))
    }

    fn build(mut config: CaClientConfig, identity: Option<Identity>) -> Result<Self> {
        // Istio writes CA_ADDRESS as host:port; the scheme is always TLS.
        if !config.address.contains("://") {
            config.address = format!("https://{}", config.address);
        }
        let fail = |reason: String| Error::CaConnect {
            address: config.address.clone(),
            reason,
        };
        if !config.address.starts_with("https://") {
            return Err(fail("the CA is only reached over TLS: use https://".into()));
        }
        let roots = parse_pem_certs(&config.root_pem)
            .map_err(|e| fail(format!("CA root certificates: {e}")))?;
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(certs_to_pem(&roots)))
            .domain_name(config.server_name.clone());
        if let Some(identity) = identity {
            tls = tls.identity(identity);
        }
        let channel = Channel::from_shared(config.address.clone())
            .map_err(|e| fail(e.to_string()))?
            .tls_config(tls)
            .map_err(|e| fail(e.to_string()))?
            .connect_timeout(config.connect_timeout)
            .timeout(config.call_timeout)
            .connect_lazy();
        Ok(CaClient {
            client: IstioCertificateServiceClient::new(channel.clone()),
            jwt: JwtSvidServiceClient::new(channel),
            config,
        })
    }

    pub fn config(&self) -> &CaClientConfig {
        &self.config
    }

    /// The generated client on the same connection, for callers (tests) that
    /// need to send requests this API would not build.
    pub fn raw(&self) -> IstioCertificateServiceClient<Channel> {
        self.client.clone()
    }

    /// The headers every call carries: bearer token, `clusterid`, trace
    /// context.
    fn prepare<T>(&self, message: T, token: Option<&str>) -> Result<tonic::Request<T>> {
        let mut request = tonic::Request::new(message);
        let md = request.metadata_mut();
        if let Some(token) = token {
            let value = format!("Bearer {token}")
                .parse()
                .map_err(|_| Error::CaResponse("the token is not a valid header value".into()))?;
            md.insert("authorization", value);
        }
        if let Some(cluster) = &self.config.cluster_id {
            let value = cluster.parse().map_err(|_| Error::CaConnect {
                address: self.config.address.clone(),
                reason: format!("cluster id {cluster:?} is not a valid header value"),
            })?;
            md.insert("clusterid", value);
        }
        crate::telemetry::inject_grpc(md);
        Ok(request)
    }

    /// One call within `call_timeout`, connecting included: tonic's own
    /// timeout starts only once a connection is up, so a CA that accepts
    /// TCP but never answers the TLS handshake (a frozen process) would
    /// hold the call for as long as it stays frozen.
    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = std::result::Result<T, tonic::Status>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.config.call_timeout, call).await {
            Ok(answer) => answer.map_err(|status| Error::from_ca_status(&status)),
            Err(_) => Err(Error::Ca {
                code: tonic::Code::DeadlineExceeded,
                message: format!(
                    "no answer from {} within {:?}",
                    self.config.address, self.config.call_timeout
                ),
            }),
        }
    }

    /// Asks the CA's `meshid.v1.JwtSvidService/Mint` for a JWT-SVID for
    /// `audience`: the caller's own identity, or `options.impersonate`'s.
    /// `ttl` zero asks for the CA's default.
    pub async fn mint_jwt(
        &self,
        audience: &[String],
        ttl: Duration,
        options: CallOptions<'_>,
    ) -> Result<MintedJwt> {
        let request = self.prepare(
            MintJwtSvidRequest {
                audience: audience.to_vec(),
                spiffe_id: options
                    .impersonate
                    .map(SpiffeId::to_string)
                    .unwrap_or_default(),
                ttl_seconds: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
            },
            options.token,
        )?;
        let answer = self
            .bounded(self.jwt.clone().mint(request))
            .await?
            .into_inner();
        let expires_at = u64::try_from(answer.expires_at)
            .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s))
            .map_err(|_| Error::CaResponse(format!("negative expiry {}", answer.expires_at)))?;
        Ok(MintedJwt {
            token: answer.token,
            spiffe_id: answer.spiffe_id,
            expires_at,
        })
    }

    /// The trust domain's JWT bundle (`meshid.v1.JwtSvidService/Bundle`).
    pub async fn jwt_bundle(&self, options: CallOptions<'_>) -> Result<JwtBundle> {
        let request = self.prepare(JwtBundleRequest {}, options.token)?;
        let answer = self
            .bounded(self.jwt.clone().bundle(request))
            .await?
            .into_inner();
        Ok(JwtBundle {
            trust_domain: answer.trust_domain,
            jwks: answer.jwks,
        })
    }

    /// Sends a CSR and returns the certificate chain as the CA answered it,
    /// unchecked. `validity` zero asks for the CA's default.
    pub async fn create_certificate(
        &self,
        csr_pem: &str,
        validity: Duration,
        options: CallOptions<'_>,
    ) -> Result<Vec<String>> {
        let mut metadata_struct = None;
        if let Some(id) = options.impersonate {
            metadata_struct = Some(prost_types::Struct {
                fields: [(
                    IMPERSONATED_IDENTITY_KEY.to_owned(),
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::StringValue(id.to_string())),
                    },
                )]
                .into(),
            });
        }
        let request = self.prepare(
            IstioCertificateRequest {
                csr: csr_pem.to_owned(),
                validity_duration: i64::try_from(validity.as_secs()).unwrap_or(i64::MAX),
                metadata: metadata_struct,
            },
            options.token,
        )?;
        let response = self
            .bounded(self.client.clone().create_certificate(request))
            .await?;
        Ok(response.into_inner().cert_chain)
    }

    /// Asks for a certificate for `id` over `key` and checks the answer (see
    /// [`validate_response`]). With `options.impersonate` set, `id` must be
    /// that identity.
    pub async fn sign(
        &self,
        key: PrivateKey,
        id: &SpiffeId,
        validity: Duration,
        options: CallOptions<'_>,
    ) -> Result<(Svid, TrustBundle)> {
        let csr = key.csr_for(id)?;
        let chain = self.create_certificate(&csr, validity, options).await?;
        let (certs, bundle) = validate_response(&chain, &key, id, SystemTime::now())?;
        Ok((Svid::new(certs, key)?, bundle))
    }
}

/// A [`CaClient`] whose roots follow a file (`CA_ROOT_CA`). Each
/// [`current`](Self::current) re-reads the file (a few kilobytes, once per
/// CSR); when the roots changed and are usable, later calls go over a new
/// connection that trusts them, so a CA whose serving certificate moved to a
/// new root is reached without restarting the workload. An unreadable or
/// unusable file keeps the roots in use, with a warning.
#[derive(Debug)]
pub struct RootsFileCaClient {
    path: std::path::PathBuf,
    current: std::sync::Mutex<CaClient>,
}

impl RootsFileCaClient {
    /// Follows `path`, starting from `client` (built from its content).
    pub fn new(path: impl Into<std::path::PathBuf>, client: CaClient) -> Self {
        RootsFileCaClient {
            path: path.into(),
            current: std::sync::Mutex::new(client),
        }
    }

    /// The client for the roots the file holds now. Must be called inside a
    /// Tokio runtime (a new client connects lazily).
    pub fn current(&self) -> CaClient {
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match std::fs::read_to_string(&self.path) {
            Ok(pem) if pem != current.config.root_pem => {
                let mut config = current.config.clone();
                config.root_pem = pem;
                match CaClient::new(config) {
                    Ok(client) => {
                        tracing::info!(
                            path = %self.path.display(),
                            "CA root certificates changed; new connections trust the new set"
                        );
                        *current = client;
                    }
                    Err(e) => tracing::warn!(
                        path = %self.path.display(),
                        error = %e,
                        "CA root certificates changed but cannot be used; keeping the previous set"
                    ),
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(
                path = %self.path.display(),
                error = %e,
                "cannot re-read the CA root certificates; keeping the previous set"
            ),
        }
        current.clone()
    }

    /// The configuration in use (roots included).
    pub fn config(&self) -> CaClientConfig {
        self.current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .config
            .clone()
    }
}

/// Checks a `cert_chain` answer for a CSR over `key` asking for `id`:
/// at least a leaf and a root bundle; the leaf holds `key`'s public key and
/// exactly `id`; it verifies through the intermediates to the roots of the
/// last element, for client and for server use. Returns the chain to present
/// (leaf + intermediates) and the trust bundle.
pub fn validate_response(
    chain: &[String],
    key: &PrivateKey,
    id: &SpiffeId,
    now: SystemTime,
) -> Result<(Vec<CertificateDer<'static>>, TrustBundle)> {
    let bad = |reason: String| Error::CaResponse(reason);
    if chain.len() < 2 {
        return Err(bad(format!(
            "the certificate chain has {} element(s); a leaf and a root bundle are required",
            chain.len()
        )));
    }
    let (roots_pem, certs_pem) = chain.split_last().expect("two elements at least");
    let bundle = TrustBundle::from_pem(roots_pem)
        .map_err(|e| bad(format!("the last element is not a root bundle: {e}")))?;
    let mut certs = Vec::with_capacity(certs_pem.len());
    for (i, pem) in certs_pem.iter().enumerate() {
        let parsed = parse_pem_certs(pem).map_err(|e| bad(format!("chain element {i}: {e}")))?;
        if i == 0 && parsed.len() != 1 {
            return Err(bad(format!(
                "the leaf element holds {} certificates",
                parsed.len()
            )));
        }
        certs.extend(parsed);
    }
    let leaf = CertInfo::from_der(&certs[0]).map_err(|e| bad(format!("leaf: {e}")))?;
    if leaf.public_key_spki != key.public_key_spki() {
        return Err(bad(format!(
            "leaf {} does not hold the public key of our CSR",
            leaf.serial
        )));
    }
    let got = leaf
        .require_spiffe_id()
        .map_err(|e| bad(format!("leaf: {e}")))?;
    if got != id {
        return Err(bad(format!(
            "leaf {} is for {got}, we asked for {id}",
            leaf.serial
        )));
    }
    for usage in [Usage::ClientAuth, Usage::ServerAuth] {
        bundle
            .verify(&certs, usage, now)
            .map_err(|e| bad(format!("{usage:?}: {e}")))?;
    }
    Ok((certs, bundle))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cert::cert_to_pem;
    use crate::keys::KeyType;
    use crate::testing::TestPki;

    fn answer(pki: &TestPki, key: &PrivateKey, id: &SpiffeId) -> Vec<String> {
        let leaf = pki
            .signer()
            .issue_leaf(
                key.public_key_spki(),
                id,
                Duration::from_secs(600),
                SystemTime::now(),
            )
            .unwrap();
        let mut chain = vec![cert_to_pem(&leaf)];
        if let Some(inter) = &pki.intermediate {
            chain.push(inter.cert_pem());
        }
        chain.push(pki.bundle().to_pem());
        chain
    }

    #[tokio::test]
    async fn the_roots_file_is_followed_and_a_bad_one_ignored() {
        let a = TestPki::new("cluster.local").unwrap().bundle().to_pem();
        let b = TestPki::new("cluster.local").unwrap().bundle().to_pem();
        let dir = std::env::temp_dir().join(format!("meshid-roots-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("root-cert.pem");
        std::fs::write(&path, &a).unwrap();
        let client = CaClient::new(CaClientConfig::new("127.0.0.1:15012", a.clone())).unwrap();
        let follow = RootsFileCaClient::new(&path, client);
        assert_eq!(follow.current().config().root_pem, a);
        std::fs::write(&path, &b).unwrap();
        assert_eq!(follow.current().config().root_pem, b, "new roots are taken");
        std::fs::write(&path, "not a certificate").unwrap();
        assert_eq!(
            follow.current().config().root_pem,
            b,
            "unusable roots are not"
        );
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            follow.current().config().root_pem,
            b,
            "nor is a missing file"
        );
        assert_eq!(follow.config().address, "https://127.0.0.1:15012");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_good_answer_is_accepted() {
        let pki = TestPki::new("cluster.local")
            .unwrap()
            .with_intermediate()
            .unwrap();
        let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let id = pki.id("default", "web");
        let (certs, bundle) =
            validate_response(&answer(&pki, &key, &id), &key, &id, SystemTime::now()).unwrap();
        assert_eq!(certs.len(), 2);
        assert_eq!(bundle, pki.bundle());
    }

    #[test]
    fn bad_answers_are_rejected_with_a_reason() {
        let pki = TestPki::new("cluster.local").unwrap();
        let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let id = pki.id("default", "web");
        let good = answer(&pki, &key, &id);
        let now = SystemTime::now();

        let err = validate_response(&good[..1], &key, &id, now).unwrap_err();
        assert!(err.to_string().contains("1 element"), "{err}");

        let other_key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let err = validate_response(&good, &other_key, &id, now).unwrap_err();
        assert!(err.to_string().contains("public key"), "{err}");

        let other_id = pki.id("default", "db");
        let err = validate_response(&good, &key, &other_id, now).unwrap_err();
        assert!(err.to_string().contains("we asked for"), "{err}");

        let stranger = TestPki::new("cluster.local").unwrap();
        let mut foreign_roots = good.clone();
        *foreign_roots.last_mut().unwrap() = stranger.bundle().to_pem();
        let err = validate_response(&foreign_roots, &key, &id, now).unwrap_err();
        assert!(err.to_string().contains("does not chain"), "{err}");

        let mut not_roots = good.clone();
        *not_roots.last_mut().unwrap() = "garbage".into();
        let err = validate_response(&not_roots, &key, &id, now).unwrap_err();
        assert!(err.to_string().contains("root bundle"), "{err}");
    }

    #[test]
    fn config_needs_https_and_roots() {
        let pki = TestPki::new("cluster.local").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let err = CaClient::new(CaClientConfig::new(
                "http://127.0.0.1:1",
                pki.bundle().to_pem(),
            ))
            .unwrap_err();
            assert!(err.to_string().contains("https://"), "{err}");
            let bare = CaClient::new(CaClientConfig::new(
                "istiod.istio-system.svc:15012",
                pki.bundle().to_pem(),
            ))
            .unwrap();
            assert_eq!(
                bare.config().address,
                "https://istiod.istio-system.svc:15012"
            );
            let err =
                CaClient::new(CaClientConfig::new("https://127.0.0.1:1", "nope")).unwrap_err();
            assert!(err.to_string().contains("root"), "{err}");
        });
    }

    #[tokio::test]
    async fn a_ca_that_accepts_but_never_answers_fails_within_the_call_timeout() {
        // A frozen CA (SIGSTOP): the kernel completes the TCP handshake,
        // nothing ever answers the TLS one.
        crate::tls::install_crypto_provider();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let held = tokio::spawn(async move {
            let mut conns = Vec::new();
            while let Ok((c, _)) = listener.accept().await {
                conns.push(c);
            }
        });
        let pki = TestPki::new("cluster.local").unwrap();
        let mut config = CaClientConfig::new(format!("https://{addr}"), pki.bundle().to_pem());
        config.call_timeout = Duration::from_millis(500);
        config.connect_timeout = Duration::from_millis(500);
        let client = CaClient::new(config).unwrap();
        let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let started = std::time::Instant::now();
        let answer = tokio::time::timeout(
            Duration::from_secs(5),
            client.sign(
                key,
                &pki.id("default", "web"),
                Duration::from_secs(60),
                CallOptions::default(),
            ),
        )
        .await;
        held.abort();
        let err = answer
            .expect("the call hung past its deadline")
            .unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert!(
            matches!(
                err,
                Error::Ca {
                    code: tonic::Code::DeadlineExceeded | tonic::Code::Unavailable,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn an_unreachable_ca_is_unavailable() {
        crate::tls::install_crypto_provider();
        let pki = TestPki::new("cluster.local").unwrap();
        let mut config = CaClientConfig::new("https://127.0.0.1:1", pki.bundle().to_pem());
        config.connect_timeout = Duration::from_millis(500);
        let client = CaClient::new(config).unwrap();
        let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let err = client
            .sign(
                key,
                &pki.id("default", "web"),
                Duration::from_secs(60),
                CallOptions::default(),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::Ca {
                    code: tonic::Code::Unavailable,
                    ..
                }
            ),
            "{err}"
        );
    }
}
