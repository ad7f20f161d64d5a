//! How suites act as mesh peers: a tester workload that gets its SVID from
//! the real CA (as a workload's agent would), TLS dialling with it, and an
//! attacker PKI that the mesh must refuse.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use meshid_common::ca_client::{CaClient, CaClientConfig, CallOptions};
use meshid_common::tls::{self, PeerMatcher};
use meshid_common::{CertInfo, Credentials, KeyType, PrivateKey, SpiffeId, Svid, TrustBundle};
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::topology::Topology;

pub type CaseResult = Result<(), String>;

/// A tester's credentials.
#[derive(Clone, Debug)]
pub struct Tester {
    pub creds: Credentials,
}

impl Tester {
    /// Registers pod `e2e/<pod>` (service account `sa`), mints its token and
    /// gets an SVID from the mesh's CA.
    pub async fn from_ca(
        mesh: &mut impl Topology,
        sa: &str,
        pod: &str,
        ttl: Duration,
    ) -> Result<Self, String> {
        let token = mesh
            .token_for("e2e", sa, pod)
            .await
            .map_err(|e| e.to_string())?;
        let root = mesh.ca_root_pem().map_err(|e| e.to_string())?;
        let client = CaClient::new(CaClientConfig::new(mesh.ca_address(), root))
            .map_err(|e| e.to_string())?;
        let id = SpiffeId::for_service_account(mesh.trust_domain(), "e2e", sa)
            .map_err(|e| e.to_string())?;
        let key = PrivateKey::generate(KeyType::EcdsaP256).map_err(|e| e.to_string())?;
        let (svid, bundle) = client
            .sign(
                key,
                &id,
                ttl,
                CallOptions {
                    token: Some(&token),
                    impersonate: None,
                },
            )
            .await
            .map_err(|e| format!("the CA refused the tester {id}: {e}"))?;
        Ok(Tester {
            creds: Credentials {
                svid: Arc::new(svid),
                bundle: Arc::new(bundle),
            },
        })
    }

    /// Credentials from any SVID and bundle (e.g. a foreign PKI).
    pub fn from_parts(svid: Svid, bundle: TrustBundle) -> Self {
        Tester {
            creds: Credentials {
                svid: Arc::new(svid),
                bundle: Arc::new(bundle),
            },
        }
    }

    pub fn id(&self) -> &SpiffeId {
        self.creds.svid.id()
    }
}

/// What an mTLS exchange saw.
#[derive(Debug)]
pub struct Exchange {
    /// The server's leaf.
    pub server_leaf: CertInfo,
    pub server_chain: Vec<CertificateDer<'static>>,
}

/// mTLS to `addr` as `tester`, expecting the server to be `expect`; sends
/// `payload` and checks the echo. Errors say which step failed.
pub async fn mtls_echo(
    addr: SocketAddr,
    tester: &Tester,
    expect: &SpiffeId,
    payload: &[u8],
) -> Result<Exchange, String> {
    let (_tx, rx) = watch::channel(Some(tester.creds.clone()));
    let config =
        tls::client_config(rx, PeerMatcher::Exact(expect.clone())).map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let run = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let mut tls = connector
            .connect(tls::sni_for(expect), tcp)
            .await
            .map_err(|e| format!("TLS handshake with {addr}: {e}"))?;
        let chain: Vec<_> = tls
            .get_ref()
            .1
            .peer_certificates()
            .map(|c| c.to_vec())
            .unwrap_or_default();
        let leaf = chain.first().ok_or("the server sent no certificate")?;
        let server_leaf = CertInfo::from_der(leaf).map_err(|e| e.to_string())?;
        echo(&mut tls, payload).await?;
        Ok(Exchange {
            server_leaf,
            server_chain: chain,
        })
    };
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .map_err(|_| format!("mTLS exchange with {addr} timed out"))?
}

/// Plaintext to `addr`: sends `payload`, expects it back.
pub async fn plain_echo(addr: SocketAddr, payload: &[u8]) -> Result<(), String> {
    let run = async {
        let mut tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        echo(&mut tcp, payload).await
    };
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .map_err(|_| format!("plaintext exchange with {addr} timed out"))?
}

async fn echo<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    payload: &[u8],
) -> Result<(), String> {
    s.write_all(payload)
        .await
        .map_err(|e| format!("write: {e}"))?;
    s.flush().await.map_err(|e| format!("flush: {e}"))?;
    let mut back = vec![0u8; payload.len()];
    s.read_exact(&mut back)
        .await
        .map_err(|e| format!("read echo: {e}"))?;
    if back != payload {
        return Err("the echo differs from what was sent".into());
    }
    Ok(())
}

/// Polls `check` every 200 ms until it returns Ok or `within` passes.
pub async fn eventually<F, Fut, T>(within: Duration, what: &str, mut check: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match check().await {
            Ok(v) => return Ok(v),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(format!("{what}: still failing after {within:?}: {e}"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}
