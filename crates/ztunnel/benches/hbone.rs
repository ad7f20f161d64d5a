//! HBONE benchmark (`cargo bench -p meshid-ztunnel --bench hbone`): two
//! ztunnels in one process (node-a on 127.0.0.1, node-b on 127.0.0.2) with an
//! in-process signer, compared in the same run with direct TCP and with a
//! pair of meshid-envoy-shims (sidecar mTLS, credentials over SDS), also
//! in-process:
//!
//! - throughput of one connection (MiB/s),
//! - round-trip latency p50 / p99 of 64-byte ping-pongs on one connection,
//! - new connections per second (connect, one echo, close; 16 at a time),
//! - RSS of a ztunnel holding 1,000 workload certificates, and the time to
//!   warm them up (measured in a fresh child process so the other phases do
//!   not count), with the in-process signer and with a real meshid CA over
//!   gRPC + TLS.
//!
//! Options: `--quick` (smaller sizes), `--phase warmup-pki|warmup-ca` (the
//! child phases, run by the parent).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshid_common::identity::fake::TestCa;
use meshid_common::identity::{CaClientSettings, Clock};
use meshid_common::registry::{Node, Registry, RegistryWatcher, Workload};
use meshid_common::testing::TestPki;
use meshid_ztunnel::config::OutboundRoute;
use meshid_ztunnel::{App, Config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

// The shims' SDS server is the real agent, as in the shim's own tests.
#[allow(dead_code)]
#[path = "../../envoy-shim/tests/it/agent_sds.rs"]
mod agent_sds;

const TD: &str = "cluster.local";

fn pod(name: &str, sa: &str, node: &str, addr: Option<SocketAddr>) -> Workload {
    Workload {
        name: name.into(),
        namespace: "default".into(),
        service_account: sa.into(),
        node: node.into(),
        uid: format!("uid-{name}"),
        address: addr.map(|a| a.to_string()),
        mode: None,
    }
}

/// A test CA that issues for `ttl`.
fn test_ca(pki: &Arc<TestPki>, ttl: Duration) -> Arc<TestCa> {
    let ca = TestCa::new(pki.clone(), Clock::System);
    ca.set_ttl(Some(ttl));
    ca
}

/// A node token for ztunnels on a [`TestCa`], written once per process.
fn node_token() -> std::path::PathBuf {
    let path =
        std::env::temp_dir().join(format!("meshid-hbone-bench-token-{}", std::process::id()));
    if !path.exists() {
        std::fs::write(&path, "node.jwt").unwrap();
    }
    path
}

fn config(node: &str, ip: &str) -> Config {
    Config {
        ca: CaClientSettings {
            token_path: node_token(),
            ..Default::default()
        },
        node_name: node.into(),
        hbone_addr: format!("{ip}:0").parse().unwrap(),
        inbound_plaintext_addr: None,
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        ..Config::default()
    }
}

/// Echoes everything back.
async fn echo_server(ip: &str) -> SocketAddr {
    let l = TcpListener::bind(format!("{ip}:0")).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// Reads until EOF, then answers with the byte count.
async fn sink_server(ip: &str) -> SocketAddr {
    let l = TcpListener::bind(format!("{ip}:0")).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => total += n as u64,
                    }
                }
                let _ = s.write_all(&total.to_be_bytes()).await;
            });
        }
    });
    addr
}

async fn throughput(addr: SocketAddr, bytes: u64) -> f64 {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let chunk = vec![0x5au8; 256 * 1024];
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        s.write_all(&chunk).await.unwrap();
        sent += chunk.len() as u64;
    }
    s.shutdown().await.unwrap();
    let mut ack = [0u8; 8];
    s.read_exact(&mut ack).await.unwrap();
    assert_eq!(u64::from_be_bytes(ack), sent);
    sent as f64 / (1024.0 * 1024.0) / start.elapsed().as_secs_f64()
}

async fn latency(addr: SocketAddr, rounds: usize) -> (Duration, Duration) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let msg = [7u8; 64];
    let mut back = [0u8; 64];
    for _ in 0..rounds / 10 {
        s.write_all(&msg).await.unwrap();
        s.read_exact(&mut back).await.unwrap();
    }
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        s.write_all(&msg).await.unwrap();
        s.read_exact(&mut back).await.unwrap();
        samples.push(t.elapsed());
    }
    samples.sort();
    (samples[rounds / 2], samples[rounds * 99 / 100])
}

async fn connections_per_second(addr: SocketAddr, run_for: Duration) -> f64 {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..16 {
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while start.elapsed() < run_for {
                let mut s = TcpStream::connect(addr).await.unwrap();
                s.write_all(b"x").await.unwrap();
                let mut b = [0u8; 1];
                s.read_exact(&mut b).await.unwrap();
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total as f64 / start.elapsed().as_secs_f64()
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn thousand(node: &str) -> Registry {
    let mut r = Registry::default();
    for i in 0..1000 {
        r.upsert_workload(pod(&format!("w-{i}"), &format!("sa-{i}"), node, None));
    }
    r
}

/// Child phase: one ztunnel warms up 1,000 certificates from an in-process signer.
async fn warmup_pki() {
    let pki = Arc::new(TestPki::new(TD).unwrap());
    let source = test_ca(&pki, Duration::from_secs(86_400));
    let before = rss_kib();
    let start = Instant::now();
    let app = App::build_with(
        config("node-a", "127.0.0.1"),
        source,
        RegistryWatcher::fixed(thousand("node-a")),
    )
    .await
    .unwrap();
    app.wait_ready(Duration::from_secs(300)).await.unwrap();
    let took = start.elapsed();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = rss_kib();
    println!(
        "RESULT warmup_ms={} rss_kib={after} rss_before_kib={before}",
        took.as_millis()
    );
}

/// Child phase: the same against a real meshid CA (in this process) over gRPC + TLS.
async fn warmup_ca() {
    use meshid_ca::{TokenAlgorithm, TokenClaims, TokenIssuer};
    let tmp = tempfile::tempdir().unwrap();
    let p = |n: &str| tmp.path().join(n);
    let mut registry = thousand("node-a");
    registry.upsert_workload(Workload {
        namespace: "istio-system".into(),
        mode: Some("none".into()),
        ..pod("ztunnel-a", "ztunnel", "node-a", None)
    });
    registry.upsert_node(Node {
        name: "node-a".into(),
        uid: "uid-node-a".into(),
    });
    registry.write_atomic(&p("registry.json")).unwrap();
    let issuer = TokenIssuer::generate(TokenAlgorithm::Es256).unwrap();
    TokenIssuer::write_jwks(&p("jwks.json"), &[&issuer]).unwrap();
    let s = |path: &Path| path.display().to_string();
    let ca = meshid_ca::App::build(
        meshid_ca::Config::from_args(
            [
                "meshid-ca".to_string(),
                "--grpc-addr".into(),
                "127.0.0.1:0".into(),
                "--monitoring-addr".into(),
                "127.0.0.1:0".into(),
                "--root-ca-dir".into(),
                s(&p("cacerts")),
                "--root-cert-out".into(),
                s(&p("root-cert.pem")),
                "--jwks-file".into(),
                s(&p("jwks.json")),
                "--registry-file".into(),
                s(&p("registry.json")),
            ],
            &std::collections::HashMap::<String, String>::new(),
        )
        .unwrap(),
    )
    .await
    .unwrap();
    let claims = TokenClaims::for_pod(
        "istio-system",
        "ztunnel",
        "ztunnel-a",
        "uid-ztunnel-a",
        "node-a",
        "uid-node-a",
    );
    std::fs::write(p("token"), issuer.mint(&claims).unwrap()).unwrap();
    let start = Instant::now();
    let app = App::build(Config {
        ca: CaClientSettings {
            address: format!("https://127.0.0.1:{}", ca.grpc_addr().port()),
            root_ca: p("root-cert.pem"),
            token_path: p("token"),
            ..Default::default()
        },
        registry_file: p("registry.json"),
        ..config("node-a", "127.0.0.1")
    })
    .await
    .unwrap();
    app.wait_ready(Duration::from_secs(300)).await.unwrap();
    println!("RESULT warmup_ms={}", start.elapsed().as_millis());
    app.shutdown().await;
    ca.shutdown().await;
}

fn child(phase: &str) -> String {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--phase", phase])
        .output()
        .expect("run the child phase");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    stdout
        .lines()
        .find(|l| l.starts_with("RESULT "))
        .map(|l| l.trim_start_matches("RESULT ").to_owned())
        .unwrap_or_else(|| {
            format!(
                "failed: {}",
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            )
        })
}

fn field(result: &str, key: &str) -> Option<f64> {
    result
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
}

/// A client shim with outbound listeners to two server shims (one in front
/// of `echo`, one of `sink`). Returns (to echo, to sink) and what keeps them up.
async fn shim_pair(
    pki: &Arc<TestPki>,
    dir: &Path,
    echo: SocketAddr,
    sink: SocketAddr,
) -> (SocketAddr, SocketAddr, Vec<Box<dyn std::any::Any>>) {
    use agent_sds::AgentSds;
    use meshid_envoy_shim::{App as Shim, Config as ShimConfig, OutboundRoute as ShimRoute};
    let client_id = pki.id("default", "shim-client");
    let server_id = pki.id("default", "shim-server");
    let _ = &client_id;
    let sds_c = AgentSds::start(pki, "default", "shim-client", &dir.join("c.sock")).await;
    let sds_s = AgentSds::start(pki, "default", "shim-server", &dir.join("s.sock")).await;
    let mut keep: Vec<Box<dyn std::any::Any>> = vec![Box::new(sds_c), Box::new(sds_s)];
    let mut servers = Vec::new();
    for app in [echo, sink] {
        let shim = Shim::build(ShimConfig::local(dir.join("s.sock"), app))
            .await
            .unwrap();
        servers.push(shim.inbound_addr());
        keep.push(Box::new(shim));
    }
    let client = Shim::build(ShimConfig {
        outbound: servers
            .iter()
            .map(|dest| ShimRoute {
                listen: "127.0.0.1:0".parse().unwrap(),
                dest: *dest,
                peer: Some(server_id.clone()),
            })
            .collect(),
        ..ShimConfig::local(dir.join("c.sock"), echo)
    })
    .await
    .unwrap();
    let mut creds = client.credentials();
    let _ = tokio::time::timeout(Duration::from_secs(10), creds.wait_for(|c| c.is_some())).await;
    let outs = client.outbound_addrs().to_vec();
    keep.push(Box::new(client));
    (outs[0], outs[1], keep)
}

async fn main_phase(quick: bool) {
    let pki = Arc::new(TestPki::new(TD).unwrap());
    let web = echo_server("127.0.0.1").await;
    let echo = echo_server("127.0.0.2").await;
    let sink = sink_server("127.0.0.2").await;
    let mut registry = Registry::default();
    registry.upsert_workload(pod("web-0", "web", "node-a", Some(web)));
    registry.upsert_workload(pod("echo-0", "echo", "node-b", Some(echo)));
    registry.upsert_workload(pod("sink-0", "sink", "node-b", Some(sink)));
    let ttl = Duration::from_secs(86_400);
    let b = App::build_with(
        config("node-b", "127.0.0.2"),
        test_ca(&pki, ttl),
        RegistryWatcher::fixed(registry.clone()),
    )
    .await
    .unwrap();
    let a = App::build_with(
        Config {
            peers: vec![("node-b".into(), b.hbone_addr())],
            ..config("node-a", "127.0.0.1")
        },
        test_ca(&pki, ttl),
        RegistryWatcher::fixed(registry),
    )
    .await
    .unwrap();
    a.wait_ready(Duration::from_secs(30)).await.unwrap();
    b.wait_ready(Duration::from_secs(30)).await.unwrap();
    let route = |dest| OutboundRoute {
        source: "default/web-0".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        destination: dest,
    };
    let hbone_echo = a.add_outbound(&route(echo)).await.unwrap();
    let hbone_sink = a.add_outbound(&route(sink)).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (shim_echo, shim_sink, _shims) = shim_pair(&pki, tmp.path(), echo, sink).await;
    // Let the server shims get their SDS credentials too.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let bytes: u64 = if quick { 64 << 20 } else { 512 << 20 };
    let rounds = if quick { 2_000 } else { 20_000 };
    let conn_time = Duration::from_secs(if quick { 1 } else { 3 });

    println!("meshid-ztunnel HBONE benchmark (2 ztunnels + client + servers in one process)");
    println!(
        "{:<36} {:>11} {:>11} {:>11} {:>11}",
        "", "direct TCP", "shim pair", "HBONE", "HBONE/shim"
    );
    let row = |what: &str, d: f64, s: f64, h: f64| {
        println!("{what:<36} {d:>11.1} {s:>11.1} {h:>11.1} {:>11.2}", h / s);
    };
    let d = throughput(sink, bytes).await;
    let s = throughput(shim_sink, bytes).await;
    let h = throughput(hbone_sink, bytes).await;
    row(
        &format!("throughput, 1 conn, {} MiB (MiB/s)", bytes >> 20),
        d,
        s,
        h,
    );
    let (d50, d99) = latency(echo, rounds).await;
    let (s50, s99) = latency(shim_echo, rounds).await;
    let (h50, h99) = latency(hbone_echo, rounds).await;
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    row(
        "latency p50, 64 B ping-pong (µs)",
        us(d50),
        us(s50),
        us(h50),
    );
    row(
        "latency p99, 64 B ping-pong (µs)",
        us(d99),
        us(s99),
        us(h99),
    );
    let dc = connections_per_second(echo, conn_time).await;
    let sc = connections_per_second(shim_echo, conn_time).await;
    let hc = connections_per_second(hbone_echo, conn_time).await;
    row("new connections/s (16 at a time)", dc, sc, hc);
    println!(
        "HBONE mTLS connections opened by node-a: {}",
        a.metrics().hbone_pool_connections.get()
    );
    a.shutdown().await;
    b.shutdown().await;
}

fn main() {
    meshid_common::tls::install_crypto_provider();
    let args: Vec<String> = std::env::args().collect();
    let phase = args
        .iter()
        .position(|a| a == "--phase")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let quick = args.iter().any(|a| a == "--quick");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    match phase.as_deref() {
        Some("warmup-pki") => rt.block_on(warmup_pki()),
        Some("warmup-ca") => rt.block_on(warmup_ca()),
        Some(other) => panic!("unknown phase {other}"),
        None => {
            rt.block_on(main_phase(quick));
            let pki = child("warmup-pki");
            let ca = child("warmup-ca");
            println!();
            match (field(&pki, "rss_kib"), field(&pki, "warmup_ms")) {
                (Some(rss), Some(ms)) => {
                    println!(
                        "RSS with 1,000 workload certs cached: {:.1} MiB (target < 30 MiB; \
                         process before start: {:.1} MiB)",
                        rss / 1024.0,
                        field(&pki, "rss_before_kib").unwrap_or(0.0) / 1024.0
                    );
                    println!("warm-up of 1,000 certs, in-process signer: {ms:.0} ms");
                }
                _ => println!("warm-up (in-process signer) {pki}"),
            }
            match field(&ca, "warmup_ms") {
                Some(ms) => println!(
                    "warm-up of 1,000 certs, meshid CA over gRPC+TLS (same process): {ms:.0} ms"
                ),
                None => println!("warm-up (CA) {ca}"),
            }
        }
    }
}
