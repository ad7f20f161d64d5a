//! rustls configurations for mTLS between X.509-SVIDs.
//!
//! Credentials arrive through a [`tokio::sync::watch`] channel. Certificate
//! resolvers and peer verifiers read the channel at every handshake, so a
//! rotated certificate or trust bundle applies to the next handshake while
//! established connections carry on. Peers are checked in two steps: the
//! chain must verify to the current bundle, then the peer's SPIFFE ID must
//! satisfy a [`PeerMatcher`] (exact ID for secure naming on the client side,
//! trust domain or allow-list on the server side).
//!
//! Session resumption is off on both sides: a resumed session skips the
//! certificate exchange, so it would let a peer whose SVID has expired (or
//! whose identity was revoked by TTL) keep connecting, and would hide a
//! rotation from the peer. Every connection is a full, fully verified
//! handshake.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::sync::watch;

use crate::bundle::{TrustBundle, Usage, describe_webpki_error};
use crate::cert::CertInfo;
use crate::error::{Error, Result};
use crate::keys::PrivateKey;
use crate::spiffe::SpiffeId;

/// Installs aws-lc-rs as the process-wide rustls provider. Call at every
/// process start and in tests; calling it again is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

fn provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
}

/// An X.509-SVID: a certificate chain for one SPIFFE ID and its private key.
pub struct Svid {
    id: SpiffeId,
    /// Leaf first, then intermediates; never roots.
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKey,
    leaf: CertInfo,
    certified: Arc<CertifiedKey>,
}

impl fmt::Debug for Svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Svid")
            .field("id", &self.id.as_str())
            .field("leaf", &self.leaf)
            .field("chain_len", &self.chain.len())
            .field("key", &"[redacted]")
            .finish()
    }
}

impl Svid {
    /// Checks that the leaf carries exactly one SPIFFE ID and matches `key`.
    pub fn new(chain: Vec<CertificateDer<'static>>, key: PrivateKey) -> Result<Self> {
        let leaf_der = chain.first().ok_or(Error::EmptyChain)?;
        let leaf = CertInfo::from_der(leaf_der)?;
        let id = leaf.require_spiffe_id()?.clone();
        if leaf.public_key_spki != key.public_key_spki() {
            return Err(Error::InvalidPrivateKey(format!(
                "the private key does not match the public key of certificate {} ({id})",
                leaf.serial
            )));
        }
        let signing = provider()
            .key_provider
            .load_private_key(key.to_rustls())
            .map_err(|e| Error::Tls(e.to_string()))?;
        let certified = Arc::new(CertifiedKey::new(chain.clone(), signing));
        Ok(Svid {
            id,
            chain,
            key,
            leaf,
            certified,
        })
    }

    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    pub fn key(&self) -> &PrivateKey {
        &self.key
    }

    pub fn leaf(&self) -> &CertInfo {
        &self.leaf
    }

    /// Time left before the leaf expires (zero once expired).
    pub fn expires_in(&self, now: SystemTime) -> Duration {
        self.leaf.not_after.duration_since(now).unwrap_or_default()
    }
}

/// An SVID and the trust bundle its holder checks peers against.
#[derive(Clone, Debug)]
pub struct Credentials {
    pub svid: Arc<Svid>,
    pub bundle: Arc<TrustBundle>,
}

/// The receiving end of a credentials channel; `None` until the first SVID.
pub type CredentialsRx = watch::Receiver<Option<Credentials>>;

/// Which peer SPIFFE IDs a TLS endpoint accepts (after chain verification).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerMatcher {
    /// Any SVID of this trust domain.
    TrustDomain(String),
    /// Exactly this ID: secure naming when dialling a service.
    Exact(SpiffeId),
    /// Members of the trust domain that are listed by ID or by namespace.
    AllowList {
        trust_domain: String,
        ids: Vec<SpiffeId>,
        namespaces: Vec<String>,
    },
    /// `inner`, with an ID in one of `aliases` read as the same path in
    /// `inner`'s trust domain (Istio's `trustDomainAliases`: pilot expands
    /// every expected SAN and principal to each alias). Built by
    /// [`PeerMatcher::with_aliases`].
    Aliased {
        aliases: Vec<String>,
        inner: Box<PeerMatcher>,
    },
}

impl PeerMatcher {
    /// This matcher, also accepting the twin in `aliases` of every ID it
    /// accepts. No aliases: the matcher unchanged.
    pub fn with_aliases(self, aliases: &[String]) -> PeerMatcher {
        let primary = self.trust_domain().to_owned();
        let (mut all, inner) = match self {
            PeerMatcher::Aliased { aliases, inner } => (aliases, *inner),
            inner => (Vec::new(), inner),
        };
        for a in aliases {
            if *a != primary && !all.contains(a) {
                all.push(a.clone());
            }
        }
        if all.is_empty() {
            return inner;
        }
        // A listed ID in an alias is its primary twin too (istiod rewrites
        // such principals to every domain of the set).
        let inner = match inner {
            PeerMatcher::AllowList {
                trust_domain,
                ids,
                namespaces,
            } => PeerMatcher::AllowList {
                ids: ids
                    .into_iter()
                    .map(|id| match all.iter().any(|a| id.is_member_of(a)) {
                        true => id.with_trust_domain(&trust_domain).unwrap_or(id),
                        false => id,
                    })
                    .collect(),
                trust_domain,
                namespaces,
            },
            other => other,
        };
        PeerMatcher::Aliased {
            aliases: all,
            inner: Box::new(inner),
        }
    }

    /// The trust domain the accepted IDs belong to (the primary one).
    pub fn trust_domain(&self) -> &str {
        match self {
            PeerMatcher::TrustDomain(td) => td,
            PeerMatcher::Exact(id) => id.trust_domain(),
            PeerMatcher::AllowList { trust_domain, .. } => trust_domain,
            PeerMatcher::Aliased { inner, .. } => inner.trust_domain(),
        }
    }

    /// Ok if `peer` is acceptable, else an error that names it and why.
    pub fn check(&self, peer: &SpiffeId) -> Result<()> {
        if let PeerMatcher::Aliased { aliases, inner } = self {
            if aliases.iter().any(|a| peer.is_member_of(a)) {
                let twin = peer.with_trust_domain(inner.trust_domain())?;
                return inner.check(&twin).map_err(|e| match e {
                    Error::UnexpectedPeer { expected, .. } => Error::UnexpectedPeer {
                        peer: peer.to_string(),
                        expected,
                    },
                    Error::PeerNotAllowed { .. } => Error::PeerNotAllowed {
                        peer: peer.to_string(),
                    },
                    other => other,
                });
            }
            return inner.check(peer);
        }
        let same_domain = |td: &str| {
            if peer.trust_domain() == td {
                Ok(())
            } else {
                Err(Error::ForeignTrustDomain {
                    peer: peer.to_string(),
                    peer_td: peer.trust_domain().to_owned(),
                    expected_td: td.to_owned(),
                })
            }
        };
        match self {
            PeerMatcher::TrustDomain(td) => same_domain(td),
            PeerMatcher::Exact(expected) if expected == peer => Ok(()),
            PeerMatcher::Exact(expected) => Err(Error::UnexpectedPeer {
                peer: peer.to_string(),
                expected: expected.to_string(),
            }),
            PeerMatcher::Aliased { inner, .. } => inner.check(peer),
            PeerMatcher::AllowList {
                trust_domain,
                ids,
                namespaces,
            } => {
                same_domain(trust_domain)?;
                let by_ns = peer
                    .namespace()
                    .is_some_and(|ns| namespaces.iter().any(|n| n == ns));
                if by_ns || ids.contains(peer) {
                    Ok(())
                } else {
                    Err(Error::PeerNotAllowed {
                        peer: peer.to_string(),
                    })
                }
            }
        }
    }
}

/// Whether a server demands a client certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// mTLS: a client without a certificate is refused.
    Required,
    /// A certificate is asked for and checked if sent; none is also fine.
    Optional,
}

/// The SPIFFE ID of the peer of an established TLS connection, from its leaf.
pub fn peer_spiffe_id(certs: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    let leaf = certs?.first()?;
    CertInfo::from_der(leaf).ok()?.spiffe_id
}

/// The TLS versions a config offers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TlsVersions {
    /// TLS 1.2 and 1.3 (what Envoy's Istio configs allow).
    #[default]
    Tls12And13,
    /// TLS 1.3 only (HBONE): an older peer fails in the handshake.
    Tls13Only,
}

static TLS13_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

impl TlsVersions {
    fn list(self) -> &'static [&'static rustls::SupportedProtocolVersion] {
        match self {
            TlsVersions::Tls12And13 => rustls::DEFAULT_VERSIONS,
            TlsVersions::Tls13Only => TLS13_ONLY,
        }
    }
}

/// A server config presenting the current SVID and verifying clients against
/// the current bundle and `peers`, over TLS 1.2 and 1.3. Callers may set ALPN
/// on the result.
pub fn server_config(
    creds: CredentialsRx,
    peers: PeerMatcher,
    client_auth: ClientAuth,
) -> Result<rustls::ServerConfig> {
    server_config_for(creds, peers, client_auth, TlsVersions::default())
}

/// [`server_config`] offering only `versions`.
pub fn server_config_for(
    creds: CredentialsRx,
    peers: PeerMatcher,
    client_auth: ClientAuth,
    versions: TlsVersions,
) -> Result<rustls::ServerConfig> {
    let provider = provider();
    let verifier = Arc::new(SpiffeClientVerifier {
        check: PeerCheck {
            creds: creds.clone(),
            matcher: peers,
            usage: Usage::ClientAuth,
            provider: provider.clone(),
        },
        mandatory: client_auth == ClientAuth::Required,
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions.list())
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(SvidResolver { creds }));
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// A client config presenting the current SVID and accepting only a server
/// whose chain verifies to the current bundle and whose ID satisfies `server`,
/// over TLS 1.2 and 1.3.
pub fn client_config(creds: CredentialsRx, server: PeerMatcher) -> Result<rustls::ClientConfig> {
    client_config_for(creds, server, TlsVersions::default())
}

/// [`client_config`] offering only `versions`.
pub fn client_config_for(
    creds: CredentialsRx,
    server: PeerMatcher,
    versions: TlsVersions,
) -> Result<rustls::ClientConfig> {
    client_config_with(creds, server, versions.list())
}

fn client_config_with(
    creds: CredentialsRx,
    server: PeerMatcher,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<rustls::ClientConfig> {
    let provider = provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        check: PeerCheck {
            creds: creds.clone(),
            matcher: server,
            usage: Usage::ServerAuth,
            provider: provider.clone(),
        },
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|e| Error::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(SvidResolver { creds }));
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// The server name to pass to a connector: SVIDs carry no DNS names, so the
/// name is only used for SNI; verification is by SPIFFE ID.
pub fn sni_for(id: &SpiffeId) -> ServerName<'static> {
    // Istio sends outbound_.<port>_._.<host> style SNI; a DNS-safe rendering of
    // the identity path is as good for a peer that ignores it.
    let host: String = id
        .path()
        .trim_start_matches('/')
        .replace('/', ".")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let name = format!(
        "{}.{}",
        if host.is_empty() { "svid" } else { &host },
        id.trust_domain()
    );
    ServerName::try_from(name).unwrap_or_else(|_| {
        ServerName::try_from("svid.invalid")
            .expect("static name")
            .to_owned()
    })
}

#[derive(Debug)]
struct SvidResolver {
    creds: CredentialsRx,
}

impl SvidResolver {
    fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.creds
            .borrow()
            .as_ref()
            .map(|c| c.svid.certified.clone())
    }
}

impl rustls::server::ResolvesServerCert for SvidResolver {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl rustls::client::ResolvesClientCert for SvidResolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        self.creds.borrow().is_some()
    }
}

fn other(e: Error) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

fn webpki_to_rustls(e: webpki::Error, leaf: &CertificateDer<'_>) -> rustls::Error {
    let cert = match e {
        webpki::Error::CertExpired { .. } => CertificateError::Expired,
        webpki::Error::CertNotValidYet { .. } => CertificateError::NotValidYet,
        webpki::Error::UnknownIssuer => CertificateError::UnknownIssuer,
        webpki::Error::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        webpki::Error::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        webpki::Error::BadDer | webpki::Error::BadDerTime => CertificateError::BadEncoding,
        other_err => {
            let serial = CertInfo::from_der(leaf)
                .map(|i| i.serial)
                .unwrap_or_default();
            return other(Error::Untrusted {
                serial,
                reason: describe_webpki_error(&other_err),
            });
        }
    };
    rustls::Error::InvalidCertificate(cert)
}

/// Chain to the current bundle, then the SPIFFE ID check.
fn verify_peer(
    creds: &CredentialsRx,
    matcher: &PeerMatcher,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    usage: Usage,
    now: UnixTime,
) -> std::result::Result<SpiffeId, rustls::Error> {
    let bundle = creds
        .borrow()
        .as_ref()
        .map(|c| c.bundle.clone())
        .ok_or_else(|| other(Error::NoCredentials))?;
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(now.as_secs());
    bundle
        .verify_webpki(end_entity, intermediates, usage, now)
        .map_err(|e| webpki_to_rustls(e, end_entity))?;
    let info = CertInfo::from_der(end_entity).map_err(other)?;
    let id = info.require_spiffe_id().map_err(other)?.clone();
    matcher.check(&id).map_err(other)?;
    Ok(id)
}

/// What both verifiers do: chain + identity against the current
/// credentials, and handshake signatures with the provider's algorithms.
#[derive(Debug)]
struct PeerCheck {
    creds: CredentialsRx,
    matcher: PeerMatcher,
    usage: Usage,
    provider: Arc<CryptoProvider>,
}

impl PeerCheck {
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> std::result::Result<SpiffeId, rustls::Error> {
        verify_peer(
            &self.creds,
            &self.matcher,
            end_entity,
            intermediates,
            self.usage,
            now,
        )
    }

    fn tls12(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algs)
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[derive(Debug)]
struct SpiffeClientVerifier {
    check: PeerCheck,
    mandatory: bool,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        self.check.verify(end_entity, intermediates, now)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.check.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.check.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.check.schemes()
    }
}

#[derive(Debug)]
struct SpiffeServerVerifier {
    check: PeerCheck,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        self.check.verify(end_entity, intermediates, now)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.check.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.check.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.check.schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cert::LeafSpec;
    use crate::testing::TestPki;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Outcome {
        client: std::result::Result<Option<SpiffeId>, String>,
        server: std::result::Result<Option<SpiffeId>, String>,
        server_serial_seen: Option<String>,
    }

    /// One handshake over an in-memory pipe, then one byte each way.
    async fn handshake(
        server: rustls::ServerConfig,
        client: rustls::ClientConfig,
        expect_server: &SpiffeId,
    ) -> Outcome {
        let (c, s) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let server_task = tokio::spawn(async move {
            let mut tls = acceptor.accept(s).await.map_err(|e| e.to_string())?;
            let peer = peer_spiffe_id(tls.get_ref().1.peer_certificates());
            let mut b = [0u8; 1];
            tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
            tls.write_all(&b).await.map_err(|e| e.to_string())?;
            tls.flush().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(peer)
        });
        let client_res = async {
            let mut tls = connector
                .connect(sni_for(expect_server), c)
                .await
                .map_err(|e| e.to_string())?;
            let certs = tls.get_ref().1.peer_certificates().map(|c| c.to_vec());
            tls.write_all(b"x").await.map_err(|e| e.to_string())?;
            let mut b = [0u8; 1];
            tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(certs)
        }
        .await;
        let server_res = server_task.await.expect("server task");
        let serial = client_res
            .as_ref()
            .ok()
            .and_then(|c| c.as_ref())
            .and_then(|c| c.first())
            .map(|leaf| CertInfo::from_der(leaf).unwrap().serial);
        Outcome {
            client: client_res.map(|c| peer_spiffe_id(c.as_deref())),
            server: server_res,
            server_serial_seen: serial,
        }
    }

    fn pki() -> TestPki {
        crate::tls::install_crypto_provider();
        TestPki::new("cluster.local")
            .unwrap()
            .with_intermediate()
            .unwrap()
    }

    fn td(pki: &TestPki) -> PeerMatcher {
        PeerMatcher::TrustDomain(pki.trust_domain.clone())
    }

    #[tokio::test]
    async fn two_svids_of_the_trust_domain_complete_mtls() {
        let pki = pki();
        let (_s_tx, s_rx) = pki.channel("default", "server").unwrap();
        let (_c_tx, c_rx) = pki.channel("default", "client").unwrap();
        let server_id = pki.id("default", "server");
        let out = handshake(
            server_config(s_rx, td(&pki), ClientAuth::Required).unwrap(),
            client_config(c_rx, PeerMatcher::Exact(server_id.clone())).unwrap(),
            &server_id,
        )
        .await;
        assert_eq!(out.client.unwrap(), Some(server_id));
        assert_eq!(out.server.unwrap(), Some(pki.id("default", "client")));
    }

    #[tokio::test]
    async fn a_tls13_only_server_refuses_a_tls12_client_in_the_handshake() {
        let pki = pki();
        let (_s_tx, s_rx) = pki.channel("default", "server").unwrap();
        let (_c_tx, c_rx) = pki.channel("default", "client").unwrap();
        let server_id = pki.id("default", "server");
        let server = || {
            server_config_for(
                s_rx.clone(),
                td(&pki),
                ClientAuth::Required,
                TlsVersions::Tls13Only,
            )
            .unwrap()
        };
        // A default client negotiates 1.3 with it.
        let out = handshake(
            server(),
            client_config(c_rx.clone(), PeerMatcher::Exact(server_id.clone())).unwrap(),
            &server_id,
        )
        .await;
        assert_eq!(out.client.unwrap(), Some(server_id.clone()));
        // A client offering only 1.2 gets no session at all.
        let old = client_config_with(
            c_rx,
            PeerMatcher::Exact(server_id.clone()),
            &[&rustls::version::TLS12],
        )
        .unwrap();
        let out = handshake(server(), old, &server_id).await;
        let err = out.server.unwrap_err();
        assert!(
            err.contains("incompatible") && err.contains("Tls12NotOfferedOrEnabled"),
            "{err}"
        );
        assert!(out.client.is_err());
    }

    #[tokio::test]
    async fn a_peer_of_a_foreign_trust_domain_is_refused_by_name() {
        let pki = pki();
        let (_s_tx, s_rx) = pki.channel("default", "server").unwrap();
        // Same root, but the SVID names another trust domain.
        let evil = SpiffeId::parse("spiffe://evil.example/ns/default/sa/client").unwrap();
        let svid = pki
            .svid_at(&evil, Duration::from_secs(600), SystemTime::now())
            .unwrap();
        let (_c_tx, c_rx) = watch::channel(Some(pki.credentials(svid)));
        let server_id = pki.id("default", "server");
        let out = handshake(
            server_config(s_rx, td(&pki), ClientAuth::Required).unwrap(),
            client_config(c_rx, PeerMatcher::Exact(server_id.clone())).unwrap(),
            &server_id,
        )
        .await;
        let err = out.server.unwrap_err();
        assert!(
            err.contains("evil.example") && err.contains("cluster.local"),
            "{err}"
        );
        assert!(out.client.is_err());
    }

    #[tokio::test]
    async fn an_expired_client_cert_is_refused_as_expired() {
        let pki = pki();
        let (_s_tx, s_rx) = pki.channel("default", "server").unwrap();
        let long_ago = SystemTime::now() - Duration::from_secs(7200);
        let svid = pki
            .svid_at(
                &pki.id("default", "client"),
                Duration::from_secs(60),
                long_ago,
            )
            .unwrap();
        let (_c_tx, c_rx) = watch::channel(Some(pki.credentials(svid)));
        let server_id = pki.id("default", "server");
        let out = handshake(
            server_config(s_rx, td(&pki), ClientAuth::Required).unwrap(),
            client_config(c_rx, PeerMatcher::Exact(server_id.clone())).unwrap(),
            &server_id,
        )
        .await;
        let err = out.server.unwrap_err();
        assert!(err.contains("Expired"), "{err}");
    }

    async fn client_from_other_root(pki: &TestPki, other: &TestPki) -> String {
        let (_s_tx, s_rx) = pki.channel("default", "server").unwrap();
        // The client trusts the server's root, but its own cert comes from the other root.
        let svid = other.svid("default", "client").unwrap();
        let (_c_tx, c_rx) = watch::channel(Some(Credentials {
            svid: Arc::new(svid),
            bundle: Arc::new(pki.bundle()),
        }));
        let server_id = pki.id("default", "server");
        let out = handshake(
            server_config(s_rx, td(pki), ClientAuth::Required).unwrap(),
            client_config(c_rx, PeerMatcher::Exact(server_id.clone())).unwrap(),
            &server_id,
        )
        .await;
        out.server.unwrap_err()
    }

    #[tokio::test]
    async fn a_cert_from_another_root_is_refused() {
        let pki = pki();
        // A root with another name: no issuer in the bundle.
        let err = client_from_other_root(&pki, &TestPki::new("other.mesh").unwrap()).await;
        assert!(err.contains("UnknownIssuer"), "{err}");
        // Another mesh that also calls itself cluster.local: the name matches,
        // the signature does not.
        let err = client_from_other_root(&pki, &TestPki::new("cluster.local").unwrap()).await;
        assert!(err.contains("BadSignature"), "{err}");
    }

    #[tokio::test]
    async fn the_wrong_server_identity_is_refused_by_the_client() {
        let pki = pki();
        let (_s_tx, s_rx) = pki.channel("default", "impostor").unwrap();
        let (_c_tx, c_rx) = pki.channel("default", "client").unwrap();
        let expected = pki.id("default", "server");
        let out = handshake(
            server_config(s_rx, td(&pki), ClientAuth::Required).unwrap(),
            client_config(c_rx, PeerMatcher::Exact(expected.clone())).unwrap(),
            &expected,
        )
        .await;
        let err = out.client.unwrap_err();
        assert!(
            err.contains("sa/impostor") && err.contains("sa/server"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_leaf_without_client_auth_is_refused_as_client() {
        let pki = pki();
        let (_s_tx, s_rx) = pki.channel("default", "server").unwrap();
        let spec = LeafSpec {
            client_auth: false,
            ..LeafSpec::svid(&pki.id("default", "client"), Duration::from_secs(600))
        };
        let svid = pki.custom_svid(&spec, SystemTime::now()).unwrap();
        let (_c_tx, c_rx) = watch::channel(Some(pki.credentials(svid)));
        let server_id = pki.id("default", "server");
        let out = handshake(
            server_config(s_rx, td(&pki), ClientAuth::Required).unwrap(),
            client_config(c_rx, PeerMatcher::Exact(server_id.clone())).unwrap(),
            &server_id,
        )
        .await;
        let err = out.server.unwrap_err();
        assert!(err.contains("InvalidPurpose"), "{err}");
    }

    #[tokio::test]
    async fn a_client_without_a_cert_is_refused_only_when_required() {
        let pki = pki();
        let server_id = pki.id("default", "server");
        // The client trusts the bundle but has no SVID of its own: use a
        // channel whose SVID resolver is empty by building from `None`.
        let (_c_tx, c_rx) = watch::channel::<Option<Credentials>>(None);
        let client = client_config(c_rx, PeerMatcher::Exact(server_id.clone())).unwrap();
        let (_s_tx, s_rx) = pki.channel("default", "server").unwrap();
        let out = handshake(
            server_config(s_rx, td(&pki), ClientAuth::Required).unwrap(),
            client,
            &server_id,
        )
        .await;
        // With no bundle the client cannot verify the server either; the server refuses first or the client does.
        assert!(out.server.is_err() || out.client.is_err());

        // Optional client auth with a client that has creds but we check the server side accepts none:
        let (_s_tx, s_rx) = pki.channel("default", "server").unwrap();
        let bundle_only = {
            let (tx, rx) = watch::channel(Some(
                pki.credentials(pki.svid("default", "client").unwrap()),
            ));
            (tx, rx)
        };
        let mut client =
            client_config(bundle_only.1, PeerMatcher::Exact(server_id.clone())).unwrap();
        client.client_auth_cert_resolver = Arc::new(NoCert);
        let out = handshake(
            server_config(s_rx, td(&pki), ClientAuth::Optional).unwrap(),
            client.clone(),
            &server_id,
        )
        .await;
        assert_eq!(
            out.server.unwrap(),
            None,
            "optional auth accepts a client without a cert"
        );
        let (_s_tx, s_rx) = pki.channel("default", "server").unwrap();
        let out = handshake(
            server_config(s_rx, td(&pki), ClientAuth::Required).unwrap(),
            client,
            &server_id,
        )
        .await;
        let err = out.server.unwrap_err();
        assert!(
            err.to_lowercase().contains("no certificate")
                || err.contains("NoCertificatesPresented"),
            "{err}"
        );
    }

    #[derive(Debug)]
    struct NoCert;
    impl rustls::client::ResolvesClientCert for NoCert {
        fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
            None
        }
        fn has_certs(&self) -> bool {
            false
        }
    }

    #[tokio::test]
    async fn a_rotated_svid_applies_to_the_next_handshake() {
        let pki = pki();
        let (s_tx, s_rx) = pki.channel("default", "server").unwrap();
        let (_c_tx, c_rx) = pki.channel("default", "client").unwrap();
        let server_id = pki.id("default", "server");
        let server = server_config(s_rx, td(&pki), ClientAuth::Required).unwrap();
        let client = client_config(c_rx, PeerMatcher::Exact(server_id.clone())).unwrap();
        let first = handshake(server.clone(), client.clone(), &server_id)
            .await
            .server_serial_seen
            .unwrap();
        let rotated = pki.svid("default", "server").unwrap();
        let new_serial = rotated.leaf().serial.clone();
        s_tx.send_replace(Some(pki.credentials(rotated)));
        let second = handshake(server, client, &server_id)
            .await
            .server_serial_seen
            .unwrap();
        assert_ne!(first, second);
        assert_eq!(second, new_serial);
    }

    #[test]
    fn allow_lists_match_by_id_and_namespace() {
        let id = |s: &str| SpiffeId::parse(s).unwrap();
        let m = PeerMatcher::AllowList {
            trust_domain: "td".into(),
            ids: vec![id("spiffe://td/ns/a/sa/x")],
            namespaces: vec!["b".into()],
        };
        assert!(m.check(&id("spiffe://td/ns/a/sa/x")).is_ok());
        assert!(m.check(&id("spiffe://td/ns/b/sa/anything")).is_ok());
        let err = m
            .check(&id("spiffe://td/ns/a/sa/y"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("spiffe://td/ns/a/sa/y") && err.contains("not allowed"),
            "{err}"
        );
        assert!(matches!(
            m.check(&id("spiffe://other/ns/b/sa/z")),
            Err(Error::ForeignTrustDomain { .. })
        ));
    }

    #[test]
    fn aliases_read_as_the_primary_domain_in_every_matcher() {
        let id = |s: &str| SpiffeId::parse(s).unwrap();
        let aliases = vec!["old.example".to_owned(), "td".to_owned()];
        let td = PeerMatcher::TrustDomain("td".into()).with_aliases(&aliases);
        assert_eq!(td.trust_domain(), "td");
        assert!(td.check(&id("spiffe://old.example/ns/a/sa/x")).is_ok());
        assert!(td.check(&id("spiffe://td/ns/a/sa/x")).is_ok());
        assert!(matches!(
            td.check(&id("spiffe://evil.example/ns/a/sa/x")),
            Err(Error::ForeignTrustDomain { .. })
        ));
        let exact = PeerMatcher::Exact(id("spiffe://td/ns/a/sa/x")).with_aliases(&aliases);
        assert!(exact.check(&id("spiffe://old.example/ns/a/sa/x")).is_ok());
        let err = exact
            .check(&id("spiffe://old.example/ns/a/sa/y"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("spiffe://old.example/ns/a/sa/y"), "{err}");
        let allow = PeerMatcher::AllowList {
            trust_domain: "td".into(),
            ids: vec![id("spiffe://td/ns/a/sa/x")],
            namespaces: vec!["b".into()],
        }
        .with_aliases(&aliases);
        assert!(allow.check(&id("spiffe://old.example/ns/a/sa/x")).is_ok());
        assert!(allow.check(&id("spiffe://old.example/ns/b/sa/z")).is_ok());
        assert!(matches!(
            allow.check(&id("spiffe://old.example/ns/a/sa/y")),
            Err(Error::PeerNotAllowed { .. })
        ));
        // A principal written in the alias admits both twins.
        let allow = PeerMatcher::AllowList {
            trust_domain: "td".into(),
            ids: vec![id("spiffe://old.example/ns/a/sa/x")],
            namespaces: vec![],
        }
        .with_aliases(&aliases);
        assert!(allow.check(&id("spiffe://td/ns/a/sa/x")).is_ok());
        assert!(allow.check(&id("spiffe://old.example/ns/a/sa/x")).is_ok());
        // No aliases (or only the primary itself): nothing changes.
        let plain = PeerMatcher::TrustDomain("td".into());
        assert_eq!(
            plain.clone().with_aliases(&["td".to_owned()]),
            plain.clone()
        );
        assert_eq!(plain.clone().with_aliases(&[]), plain);
    }

    #[tokio::test]
    async fn an_alias_domain_peer_completes_mtls_both_ways() {
        let pki = pki();
        let aliases = vec!["old.example".to_owned()];
        // Same root, both SVIDs name the alias trust domain.
        let alias_svid = |sa: &str| {
            let id = SpiffeId::parse(&format!("spiffe://old.example/ns/default/sa/{sa}")).unwrap();
            pki.svid_at(&id, Duration::from_secs(600), SystemTime::now())
                .unwrap()
        };
        let (_s_tx, s_rx) = watch::channel(Some(pki.credentials(alias_svid("server"))));
        let (_c_tx, c_rx) = watch::channel(Some(pki.credentials(alias_svid("client"))));
        // The client expects the primary-domain name of the server.
        let server_id = pki.id("default", "server");
        let out = handshake(
            server_config(s_rx, td(&pki).with_aliases(&aliases), ClientAuth::Required).unwrap(),
            client_config(
                c_rx,
                PeerMatcher::Exact(server_id.clone()).with_aliases(&aliases),
            )
            .unwrap(),
            &server_id,
        )
        .await;
        let client_seen = SpiffeId::parse("spiffe://old.example/ns/default/sa/client").unwrap();
        assert_eq!(out.server.unwrap(), Some(client_seen));
        assert!(out.client.unwrap().is_some());
    }

    #[test]
    fn svid_rejects_a_mismatched_key_and_a_cert_without_spiffe_id() {
        let pki = pki();
        let svid = pki.svid("a", "b").unwrap();
        let other = PrivateKey::generate(crate::keys::KeyType::EcdsaP256).unwrap();
        let err = Svid::new(svid.chain().to_vec(), other).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
        let (chain, key) = pki
            .custom_chain(
                &LeafSpec {
                    dns_names: vec!["x.example".into()],
                    ..LeafSpec::new(Duration::from_secs(60))
                },
                SystemTime::now(),
            )
            .unwrap();
        assert!(matches!(
            Svid::new(chain, key),
            Err(Error::NoSpiffeId { .. })
        ));
    }

    #[test]
    fn sni_is_a_valid_dns_name() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/Web_1").unwrap();
        assert_eq!(
            format!("{:?}", sni_for(&id)),
            format!(
                "{:?}",
                ServerName::try_from("ns.default.sa.web-1.cluster.local").unwrap()
            )
        );
    }
}
