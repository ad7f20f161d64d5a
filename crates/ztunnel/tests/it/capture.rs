//! Transparent capture in a network namespace: iptables redirects a
//! workload's connection to node-a's ztunnel (:15001), which reads the
//! original destination with `SO_ORIGINAL_DST`, names the source by its IP
//! and tunnels it over HBONE; a plaintext client redirected to node-b's
//! :15006 reaches a PERMISSIVE workload but not a STRICT one.
//!
//! The test re-runs itself inside `unshare -rn` (a new user and network
//! namespace, so it needs no root). Where namespaces or iptables are not
//! available it says so and skips locally, and fails when `CI` is set.

use crate::support;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use meshid_common::registry::{Registry, RegistryWatcher, Workload};
use meshid_common::testing::TestPki;
use meshid_ztunnel::policy::{Mode, PolicyRule};
use meshid_ztunnel::{App, Config};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const INNER: &str = "MESHID_ZTUNNEL_IN_NETNS";
/// The test's name as libtest knows it in this binary (module path first).
const TEST: &str = "capture::captured_connections_go_through_hbone_as_the_workload";
const WEB_IP: &str = "127.0.0.10";
const PLAIN_CLIENT_IP: &str = "127.0.0.20";

fn sh(cmd: &str) -> Result<(), String> {
    let out = Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn skip_or_fail(why: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("transparent capture test cannot run: {why}");
    }
    eprintln!("SKIPPED {TEST}: {why} (this fails in CI)");
}

#[test]
fn captured_connections_go_through_hbone_as_the_workload() {
    if std::env::var_os(INNER).is_some() {
        inner();
        return;
    }
    let probe = "unshare -rn sh -c 'ip link set lo up && iptables -t nat -L OUTPUT -n >/dev/null'";
    if let Err(why) = sh(probe) {
        skip_or_fail(&format!("no network namespace with iptables here ({why})"));
        return;
    }
    let out = Command::new("unshare")
        .arg("-rn")
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", TEST, "--nocapture", "--test-threads=1"])
        .env(INNER, "1")
        .output()
        .expect("run the test in a namespace");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("capture inside the namespace: ok"),
        "the test failed inside the namespace:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ztunnel_config(node: &str, ip: &str) -> Config {
    Config {
        ca: ca_settings(),
        node_name: node.into(),
        hbone_addr: format!("{ip}:0").parse().unwrap(),
        inbound_plaintext_addr: None,
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        connect_timeout: Duration::from_secs(3),
        ..Config::default()
    }
}

async fn connect_from(src_ip: &str, dst: SocketAddr, msg: &[u8]) -> Vec<u8> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{src_ip}:0").parse().unwrap()).unwrap();
    let mut s = socket.connect(dst).await.unwrap();
    s.write_all(msg).await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    out
}

fn inner() {
    sh("ip link set lo up").unwrap();
    // Only the workloads' own connections are redirected (by source IP), so
    // the ztunnels' connections to peers and to workloads are not.
    sh(&format!(
        "iptables -t nat -A OUTPUT -p tcp -s {WEB_IP} -j REDIRECT --to-ports 15001"
    ))
    .unwrap();
    sh(&format!(
        "iptables -t nat -A OUTPUT -p tcp -s {PLAIN_CLIENT_IP} -j REDIRECT --to-ports 15006"
    ))
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        meshid_common::tls::install_crypto_provider();
        let pki = Arc::new(TestPki::new(TD).unwrap());
        let db = echo_server("127.0.0.2").await;
        let legacy = echo_server("127.0.0.2").await;
        let mut registry = Registry::default();
        registry.upsert_workload(Workload {
            address: Some(WEB_IP.into()),
            ..pod("web-0", "web", "node-a", "127.0.0.1:1".parse().unwrap())
        });
        registry.upsert_workload(pod("db-0", "db", "node-b", db));
        registry.upsert_workload(pod("legacy-0", "legacy", "node-b", legacy));
        let ttl = Duration::from_secs(3600);
        let b = App::build_with(
            Config {
                inbound_plaintext_addr: Some("127.0.0.1:15006".parse().unwrap()),
                policies: vec![PolicyRule {
                    namespace: "default".into(),
                    workload: Some("legacy-0".into()),
                    mode: Mode::Permissive,
                    allow: None,
                }],
                ..ztunnel_config("node-b", "127.0.0.2")
            },
            test_ca(&pki, ttl),
            RegistryWatcher::fixed(registry.clone()),
        )
        .await
        .unwrap();
        let a = App::build_with(
            Config {
                outbound_capture_addr: Some("127.0.0.1:15001".parse().unwrap()),
                peers: vec![("node-b".into(), b.hbone_addr())],
                ..ztunnel_config("node-a", "127.0.0.1")
            },
            test_ca(&pki, ttl),
            RegistryWatcher::fixed(registry),
        )
        .await
        .unwrap();
        a.wait_ready(Duration::from_secs(20)).await.unwrap();
        b.wait_ready(Duration::from_secs(20)).await.unwrap();

        // web-0 dials db-0 directly; the kernel hands the connection to node-a.
        assert_eq!(connect_from(WEB_IP, db, b"captured").await, b"captured");
        wait_until("node-b's record", || !b.recent_connections().is_empty()).await;
        let seen = b.recent_connections();
        assert_eq!(
            seen[0].src_identity.as_deref(),
            Some(pki.id("default", "web").as_str())
        );
        assert_eq!(seen[0].forwarded.as_deref(), Some("for=\"127.0.0.10\""));

        // A plaintext client redirected to node-b's :15006.
        assert_eq!(
            connect_from(PLAIN_CLIENT_IP, legacy, b"plain").await,
            b"plain"
        );
        assert!(connect_from(PLAIN_CLIENT_IP, db, b"plain").await.is_empty());
        println!("capture inside the namespace: ok");
    });
}
