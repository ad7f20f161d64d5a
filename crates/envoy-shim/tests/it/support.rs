//! Shared pieces: a PKI, an echo app, a shim fed by the real agent's SDS
//! server (or, for SDS-protocol tests, the scripted peer), and mTLS clients
//! made from TestPki credentials.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshid_common::cert::{CertInfo, LeafSpec};
use meshid_common::testing::TestPki;
use meshid_common::tls::{PeerMatcher, client_config, sni_for};
use meshid_common::{CredentialsRx, SpiffeId};
use meshid_envoy_shim::{AccessEvent, App, Config, Mode, Policy};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, watch};
use tokio_rustls::client::TlsStream;

pub const TD: &str = "cluster.local";
pub const WAIT: Duration = Duration::from_secs(10);

pub use crate::agent_sds::AgentSds;
pub use crate::scripted_sds::ScriptedSds;

pub fn pki() -> Arc<TestPki> {
    meshid_common::tls::install_crypto_provider();
    Arc::new(TestPki::new(TD).unwrap().with_intermediate().unwrap())
}

/// Echoes every byte; after the client's EOF, finishes echoing and closes
/// its write side (so half-close is visible end to end).
pub async fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// Where a test shim's secrets come from.
pub enum Feed {
    /// The real agent (every test that just needs credentials).
    Agent(Box<AgentSds>),
    /// The scripted peer (tests of the SDS client's protocol handling).
    Scripted(ScriptedSds),
}

/// A shim under test, fed over SDS, in front of an echo app.
pub struct Shim {
    pub app: App,
    pub feed: Feed,
    pub id: SpiffeId,
    pub events: broadcast::Receiver<AccessEvent>,
    pub dir: tempfile::TempDir,
}

impl Shim {
    /// A shim with identity default/server in `mode`; `tweak` edits the config.
    pub async fn start(
        pki: &Arc<TestPki>,
        mode: Mode,
        tweak: impl FnOnce(&mut Config, &std::path::Path),
    ) -> Shim {
        Self::start_as(pki, "server", Some(Policy::mode(mode)), tweak).await
    }

    /// A shim for default/`sa` fed by the real agent.
    pub async fn start_as(
        pki: &Arc<TestPki>,
        sa: &str,
        policy: Option<Policy>,
        tweak: impl FnOnce(&mut Config, &std::path::Path),
    ) -> Shim {
        Self::build(pki, sa, policy, tweak, false).await
    }

    /// A shim for default/server fed by the scripted SDS peer.
    pub async fn start_scripted(
        pki: &Arc<TestPki>,
        mode: Mode,
        tweak: impl FnOnce(&mut Config, &std::path::Path),
    ) -> Shim {
        Self::build(pki, "server", Some(Policy::mode(mode)), tweak, true).await
    }

    async fn build(
        pki: &Arc<TestPki>,
        sa: &str,
        policy: Option<Policy>,
        tweak: impl FnOnce(&mut Config, &std::path::Path),
        scripted: bool,
    ) -> Shim {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("sds.sock");
        let feed = if scripted {
            let creds = pki.credentials(pki.svid("default", sa).unwrap());
            Feed::Scripted(ScriptedSds::start_with(&sock, &creds).await.unwrap())
        } else {
            Feed::Agent(Box::new(AgentSds::start(pki, "default", sa, &sock).await))
        };
        let echo = echo_server().await;
        let mut config = Config::local(sock, echo);
        config.sds_backoff_min = Duration::from_millis(20);
        config.sds_backoff_max = Duration::from_millis(200);
        config.policy_poll = Duration::from_millis(20);
        config.handshake_timeout = Duration::from_secs(3);
        if let Some(p) = &policy {
            config.default_mode = p.mode;
        }
        tweak(&mut config, dir.path());
        let app = App::build(config).await.unwrap();
        if let Some(p) = policy
            && p.allow.is_some()
        {
            app.policy().set(p, "test");
        }
        let events = app.access_log();
        Shim {
            app,
            feed,
            id: pki.id("default", sa),
            events,
            dir,
        }
    }

    /// The agent feeding this shim.
    pub fn agent(&self) -> &AgentSds {
        match &self.feed {
            Feed::Agent(a) => a,
            Feed::Scripted(_) => panic!("this shim is fed by the scripted SDS peer"),
        }
    }

    /// The scripted SDS peer feeding this shim.
    pub fn scripted(&self) -> &ScriptedSds {
        match &self.feed {
            Feed::Scripted(s) => s,
            Feed::Agent(_) => panic!("this shim is fed by the agent"),
        }
    }

    pub async fn ready(&self) {
        assert!(self.app.ready(WAIT).await, "shim never got its SDS secrets");
    }

    /// The next access event (skipping none).
    pub async fn event(&mut self) -> AccessEvent {
        tokio::time::timeout(WAIT, self.events.recv())
            .await
            .expect("an access event")
            .expect("event channel")
    }
}

/// A credentials channel for `ns/sa` of `pki`.
pub fn creds(pki: &TestPki, sa: &str) -> CredentialsRx {
    pki.channel("default", sa).unwrap().1
}

/// mTLS to `addr` with `client`, expecting the server to be `server`.
pub async fn mtls(
    addr: SocketAddr,
    client: CredentialsRx,
    server: &SpiffeId,
) -> std::io::Result<TlsStream<TcpStream>> {
    let config = client_config(client, PeerMatcher::Exact(server.clone())).unwrap();
    mtls_with(addr, config, server).await
}

pub async fn mtls_with(
    addr: SocketAddr,
    config: rustls::ClientConfig,
    server: &SpiffeId,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(sni_for(server), tcp)
        .await
}

/// Writes `msg` and reads the same number of bytes back.
pub async fn roundtrip<S: AsyncReadExt + AsyncWriteExt + Unpin>(
    s: &mut S,
    msg: &[u8],
) -> std::io::Result<Vec<u8>> {
    s.write_all(msg).await?;
    s.flush().await?;
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(WAIT, s.read_exact(&mut buf))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no echo"))??;
    Ok(buf)
}

/// Expects `s` to be closed by the other side without `msg` reaching the
/// app (a TLS alert before the close is fine).
pub async fn assert_refused<S: AsyncReadExt + AsyncWriteExt + Unpin>(s: &mut S, msg: &[u8]) {
    let _ = s.write_all(msg).await;
    let _ = s.flush().await;
    let mut got = Vec::new();
    match tokio::time::timeout(WAIT, s.read_to_end(&mut got)).await {
        Ok(_) => assert!(
            !got.windows(msg.len()).any(|w| w == msg),
            "the message was echoed: {got:?}"
        ),
        Err(_) => panic!("connection left open"),
    }
}

/// A client config presenting an arbitrary chain and key (for off-profile
/// certs that `Svid::new` refuses), trusting `pki`'s bundle for the server.
pub fn raw_client_config(
    pki: &TestPki,
    server: &SpiffeId,
    spec: &LeafSpec,
    now: SystemTime,
) -> rustls::ClientConfig {
    #[derive(Debug)]
    struct Fixed(Arc<CertifiedKey>);
    impl rustls::client::ResolvesClientCert for Fixed {
        fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
            Some(self.0.clone())
        }
        fn has_certs(&self) -> bool {
            true
        }
    }
    let (chain, key) = pki.custom_chain(spec, now).unwrap();
    let signing = rustls::crypto::aws_lc_rs::default_provider()
        .key_provider
        .load_private_key(key.to_rustls())
        .unwrap();
    // Server verification uses a channel holding any SVID of the PKI (for its bundle).
    // (a watch receiver keeps the last value after its sender is gone).
    let (_, rx) = watch::channel(Some(
        pki.credentials(pki.svid("default", "verifier").unwrap()),
    ));
    let mut config = client_config(rx, PeerMatcher::Exact(server.clone())).unwrap();
    config.client_auth_cert_resolver = Arc::new(Fixed(Arc::new(CertifiedKey::new(chain, signing))));
    config
}

/// The serial of the server cert seen on an established client connection.
pub fn server_serial(s: &TlsStream<TcpStream>) -> String {
    let certs = s.get_ref().1.peer_certificates().unwrap();
    CertInfo::from_der(&certs[0]).unwrap().serial
}

pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    meshid_common::testing::envoy::http_get(addr, path)
        .await
        .unwrap()
}
