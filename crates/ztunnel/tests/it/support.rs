//! A two-node mesh in one process: ztunnels `node-a` (127.0.0.1) and
//! `node-b` (127.0.0.2) sharing a registry file and a test PKI, with echo
//! servers standing in for workloads.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshid_common::identity::Clock;
use meshid_common::identity::fake::TestCa;
use meshid_common::registry::{Registry, Workload};
use meshid_common::testing::TestPki;
use meshid_common::{Credentials, SpiffeId, Svid};
use meshid_ztunnel::config::OutboundRoute;
use meshid_ztunnel::policy::PolicyRule;
use meshid_ztunnel::{App, Config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const TD: &str = "cluster.local";

pub fn pod(name: &str, sa: &str, node: &str, addr: SocketAddr) -> Workload {
    Workload {
        name: name.into(),
        namespace: "default".into(),
        service_account: sa.into(),
        node: node.into(),
        uid: format!("uid-{name}"),
        address: Some(addr.to_string()),
        mode: Some("ambient".into()),
    }
}

/// A TCP echo server on `ip`, port chosen by the OS.
pub async fn echo_server(ip: &str) -> SocketAddr {
    let listener = TcpListener::bind(format!("{ip}:0")).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// A port on `ip` where nothing listens.
pub async fn closed_port(ip: &str) -> SocketAddr {
    let l = TcpListener::bind(format!("{ip}:0")).await.unwrap();
    l.local_addr().unwrap()
}

/// Writes `msg`, half-closes, reads everything back.
pub async fn echo_through(addr: SocketAddr, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(msg).await?;
    s.shutdown().await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .map_err(|_| std::io::Error::other("echo timed out"))??;
    Ok(out)
}

pub struct Mesh {
    pub pki: Arc<TestPki>,
    pub dir: tempfile::TempDir,
    pub registry_path: PathBuf,
    pub registry: Registry,
    pub a: App,
    pub b: App,
    pub source_a: Arc<TestCa>,
    pub source_b: Arc<TestCa>,
}

/// A test CA over `pki` that issues for `ttl` whatever is asked.
pub fn test_ca(pki: &Arc<TestPki>, ttl: Duration) -> Arc<TestCa> {
    let ca = TestCa::new(pki.clone(), Clock::System);
    ca.set_ttl(Some(ttl));
    ca
}

/// A node token file for ztunnels whose CA is a [`TestCa`] (which reads
/// but does not check it), written once per test process.
pub fn node_token() -> PathBuf {
    static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let path =
            std::env::temp_dir().join(format!("meshid-ztunnel-test-token-{}", std::process::id()));
        std::fs::write(&path, "node.jwt").unwrap();
        path
    })
    .clone()
}

/// The settings of a ztunnel under test: the node token of [`node_token`].
pub fn ca_settings() -> meshid_common::identity::CaClientSettings {
    meshid_common::identity::CaClientSettings {
        token_path: node_token(),
        ..Default::default()
    }
}

pub fn config(node: &str, ip: &str, registry: &std::path::Path) -> Config {
    Config {
        ca: ca_settings(),
        node_name: node.into(),
        hbone_addr: format!("{ip}:0").parse().unwrap(),
        inbound_plaintext_addr: Some(format!("{ip}:0").parse().unwrap()),
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        registry_file: registry.to_owned(),
        registry_poll: Duration::from_millis(50),
        connect_timeout: Duration::from_secs(3),
        ..Config::default()
    }
}

impl Mesh {
    /// Both ztunnels over `registry`, with `policies` on node-b and certs of `ttl`.
    pub async fn start(registry: Registry, policies: Vec<PolicyRule>, ttl: Duration) -> Mesh {
        Self::start_with(registry, policies, ttl, |_| {}).await
    }

    /// [`Mesh::start`], with `tweak` applied to both ztunnels' configs.
    pub async fn start_with(
        registry: Registry,
        policies: Vec<PolicyRule>,
        ttl: Duration,
        tweak: impl Fn(&mut Config),
    ) -> Mesh {
        meshid_common::tls::install_crypto_provider();
        let pki = Arc::new(TestPki::new(TD).unwrap().with_intermediate().unwrap());
        let dir = tempfile::tempdir().unwrap();
        let registry_path = dir.path().join("registry.json");
        registry.write_atomic(&registry_path).unwrap();
        let source_a = test_ca(&pki, ttl);
        let source_b = test_ca(&pki, ttl);
        let mut config_b = Config {
            policies,
            ..config("node-b", "127.0.0.2", &registry_path)
        };
        tweak(&mut config_b);
        let b = App::build_with_source(config_b, source_b.clone())
            .await
            .unwrap();
        let mut config_a = Config {
            peers: vec![("node-b".into(), b.hbone_addr())],
            ..config("node-a", "127.0.0.1", &registry_path)
        };
        tweak(&mut config_a);
        let a = App::build_with_source(config_a, source_a.clone())
            .await
            .unwrap();
        b.set_peer("node-a", a.hbone_addr());
        a.wait_ready(Duration::from_secs(20)).await.unwrap();
        b.wait_ready(Duration::from_secs(20)).await.unwrap();
        Mesh {
            pki,
            dir,
            registry_path,
            registry,
            a,
            b,
            source_a,
            source_b,
        }
    }

    /// An outbound listener on node-a for `source` (a pod name in `default`) to `dest`.
    pub async fn route_a(&self, source: &str, dest: SocketAddr) -> SocketAddr {
        self.a
            .add_outbound(&OutboundRoute {
                source: format!("default/{source}"),
                listen: "127.0.0.1:0".parse().unwrap(),
                destination: dest,
            })
            .await
            .unwrap()
    }

    pub fn update_registry(&mut self, f: impl FnOnce(&mut Registry)) {
        f(&mut self.registry);
        self.registry.write_atomic(&self.registry_path).unwrap();
    }

    pub fn id(&self, sa: &str) -> SpiffeId {
        self.pki.id("default", sa)
    }
}

/// An HBONE client built by hand (tests of the server's answers), sending
/// the SNI of `server_id` as a hint.
pub async fn raw_hbone(
    pki: &TestPki,
    client: Svid,
    server_id: &SpiffeId,
    addr: SocketAddr,
) -> Result<SendRequest<Empty<Bytes>>, String> {
    raw_hbone_sni(pki, client, server_id, addr, Some(server_id)).await
}

/// An HBONE client built by hand that accepts only `server_id` and sends the
/// SNI of `sni`, or none (as a real ztunnel) when `None`.
pub async fn raw_hbone_sni(
    pki: &TestPki,
    client: Svid,
    server_id: &SpiffeId,
    addr: SocketAddr,
    sni: Option<&SpiffeId>,
) -> Result<SendRequest<Empty<Bytes>>, String> {
    // A receiver still reads the last value after its sender is gone.
    let (_tx, rx) = tokio::sync::watch::channel(Some(Credentials {
        svid: Arc::new(client),
        bundle: Arc::new(pki.bundle()),
    }));
    let mut config =
        meshid_common::tls::client_config(rx, meshid_common::PeerMatcher::Exact(server_id.clone()))
            .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    config.enable_sni = sni.is_some();
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(meshid_common::tls::sni_for(sni.unwrap_or(server_id)), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// Sends one request and returns the status code.
pub async fn status_of(
    sender: &mut SendRequest<Empty<Bytes>>,
    method: http::Method,
    uri: &str,
) -> u16 {
    let req = http::Request::builder()
        .method(method)
        .uri(uri)
        .body(Empty::new())
        .unwrap();
    sender.send_request(req).await.unwrap().status().as_u16()
}

/// A plain HTTP/1.1 GET against the admin listener: (status, body).
pub async fn admin_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Polls `cond` every 10 ms until it holds; panics after 10 s naming `what`.
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
