//! The CA's own TLS: a serving certificate issued by the mesh CA (DNS SANs
//! `istiod.istio-system.svc` plus configured names and addresses), re-issued
//! when the signing CA rotates or at half-life, and optional client
//! certificates.
//!
//! The handshake only proves that a client holds the key of the certificate
//! it sends; the chain and identity are judged by the client-certificate
//! authenticator at request time, so a stale certificate falls back to the
//! token instead of failing the connection.

use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use meshid_common::{KeyType, PrivateKey};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, UnixTime};
use tokio_util::sync::CancellationToken;

use crate::config::SERVING_CERT_TTL;
use crate::error::{Error, Result};
use crate::sign::CertSigner;

fn provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
}

/// The current serving certificate.
#[derive(Debug)]
pub struct ServingCert {
    dns_names: Vec<String>,
    ips: Vec<IpAddr>,
    current: RwLock<Current>,
}

#[derive(Debug)]
struct Current {
    key: Arc<CertifiedKey>,
    not_before: SystemTime,
    not_after: SystemTime,
    generation: u64,
}

impl ServingCert {
    /// Issues the first serving certificate through `signer`.
    pub async fn new(
        signer: &dyn CertSigner,
        dns_names: Vec<String>,
        ips: Vec<IpAddr>,
    ) -> Result<Self> {
        let current = issue(signer, &dns_names, &ips).await?;
        Ok(ServingCert {
            dns_names,
            ips,
            current: RwLock::new(current),
        })
    }

    fn get(&self) -> Arc<CertifiedKey> {
        self.current.read().expect("serving cert lock").key.clone()
    }

    /// Re-issues when the signer changed or half the lifetime is gone.
    async fn refresh_if_needed(&self, signer: &dyn CertSigner) -> Result<bool> {
        let generation_now = signer.roots().generation;
        let (generation, not_before, not_after) = {
            let c = self.current.read().expect("serving cert lock");
            (c.generation, c.not_before, c.not_after)
        };
        let half = not_before + not_after.duration_since(not_before).unwrap_or_default() / 2;
        if generation == generation_now && SystemTime::now() < half {
            return Ok(false);
        }
        let next = issue(signer, &self.dns_names, &self.ips).await?;
        *self.current.write().expect("serving cert lock") = next;
        Ok(true)
    }

    /// Keeps the certificate fresh until `cancel`.
    pub async fn maintain(self: Arc<Self>, signer: Arc<dyn CertSigner>, cancel: CancellationToken) {
        let mut rx = signer.subscribe();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                changed = rx.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(Duration::from_secs(60)) => {}
            }
            match self.refresh_if_needed(signer.as_ref()).await {
                Ok(true) => tracing::info!(
                    generation = signer.roots().generation,
                    "serving certificate re-issued"
                ),
                Ok(false) => {}
                Err(e) => tracing::error!(error = %e, "serving certificate could not be re-issued"),
            }
        }
    }
}

async fn issue(signer: &dyn CertSigner, dns_names: &[String], ips: &[IpAddr]) -> Result<Current> {
    let key = PrivateKey::generate(KeyType::EcdsaP256)?;
    // Read before issuing: a rotation meanwhile makes the next check re-issue.
    let generation = signer.roots().generation;
    let chain: Vec<CertificateDer<'static>> = signer
        .issue_serving(&key, dns_names, ips, SERVING_CERT_TTL)
        .await?;
    let leaf = chain.first().ok_or_else(|| {
        Error::Tls("serving certificate: the signer returned no certificate".into())
    })?;
    let info = meshid_common::CertInfo::from_der(leaf)?;
    let signing = provider()
        .key_provider
        .load_private_key(key.to_rustls())
        .map_err(|e| Error::Tls(e.to_string()))?;
    Ok(Current {
        key: Arc::new(CertifiedKey::new(chain, signing)),
        not_before: info.not_before,
        not_after: info.not_after,
        generation,
    })
}

#[derive(Debug)]
struct Resolver(Arc<ServingCert>);

impl rustls::server::ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.get())
    }
}

/// Asks for a client certificate, accepts any (proof of key possession
/// only) and none.
#[derive(Debug)]
struct OptionalClientCert {
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for OptionalClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The rustls server config of the gRPC port (ALPN h2).
pub fn server_config(serving: Arc<ServingCert>) -> Result<rustls::ServerConfig> {
    let provider = provider();
    let mut config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_client_cert_verifier(Arc::new(OptionalClientCert { provider }))
        .with_cert_resolver(Arc::new(Resolver(serving)));
    config.alpn_protocols = vec![b"h2".to_vec()];
    // Resumed sessions skip the certificate exchange; every call is judged on
    // a full handshake.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}
