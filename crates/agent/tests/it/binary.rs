//! The `meshid-agent` binary itself: flags and Istio environment variables,
//! the printed configuration, readiness with a real CA, a clean stop on
//! SIGTERM.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;

use crate::support::{RealCa, SdsStream, eventually, http_get, request, sds_client};

/// The agent binary, configured through Istio's environment variables
/// (plus `env`), its SDS socket in `dir` and its admin port.
fn spawn_agent(
    ca: &RealCa,
    dir: &std::path::Path,
    env: &[(&str, &str)],
) -> (tokio::process::Child, std::path::PathBuf, u16) {
    std::fs::write(dir.join("token"), ca.token("web-0")).unwrap();
    let admin_port = meshid_common::testing::ports::reserve().unwrap().port();
    let sds = dir.join("sds/socket");
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_meshid-agent"))
        .arg("--sds-socket")
        .arg(&sds)
        .arg("--admin-addr")
        .arg(format!("127.0.0.1:{admin_port}"))
        // The rest through Istio's environment variables.
        .env_clear()
        .env("CA_ADDRESS", ca.address())
        .env("CA_ROOT_CA", ca.root_cert())
        .env("AUTH_TOKEN", dir.join("token"))
        .env("POD_NAMESPACE", "default")
        .env("SERVICE_ACCOUNT", "web")
        .env("TRUST_DOMAIN", "cluster.local")
        .env(
            "SPIFFE_ENDPOINT_SOCKET",
            format!("unix://{}", dir.join("api.sock").display()),
        )
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    (child, sds, admin_port)
}

fn sigterm(child: &tokio::process::Child) {
    let pid = child.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_sds_and_stops_cleanly_on_sigterm() {
    let ca = RealCa::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut child, sds, admin_port) = spawn_agent(&ca, dir.path(), &[]);

    let up = eventually(Duration::from_secs(10), || sds.exists()).await;
    assert!(up, "the SDS socket appears");
    let mut client = sds_client(&sds).await;
    let mut s = SdsStream::open(&mut client, request(Some("n"), &["default"]))
        .await
        .unwrap();
    s.expect_response().await;
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], admin_port));
    let (code, body) = http_get(admin, "/ready").await;
    assert_eq!(code, 200, "{body}");
    drop(s);
    drop(client);

    sigterm(&child);
    let exit = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("the agent stops within 10 s of SIGTERM")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    assert!(!sds.exists(), "the socket is removed");

    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .await
        .unwrap();
    // A pipe is no terminal: no colour escape codes for a log collector.
    assert!(
        !out.contains('\u{1b}'),
        "escape codes in piped logs: {out:?}"
    );
    assert!(out.contains("configuration:"), "{out}");
    assert!(out.contains("\nservice_account: web\n"), "{out}");
    assert!(out.contains("shutting down"), "{out}");
    assert!(!out.contains("PRIVATE KEY"), "{out}");
    ca.app.shutdown().await;
}

/// With a trace collector that never answers and an SDS stream open (its
/// spans end at shutdown), SIGTERM still ends the agent within the
/// telemetry's flush bound: the last export neither blocks the agent's one
/// runtime thread nor waits out the exporter's own timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswering_trace_collector_does_not_hold_up_the_exit() {
    let ca = RealCa::start().await;
    let collector = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", collector.local_addr().unwrap());
    // Accepts and holds connections, reads nothing, answers nothing.
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((c, _)) = collector.accept().await {
            conns.push(c);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let (mut child, sds, _) = spawn_agent(
        &ca,
        dir.path(),
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str())],
    );
    assert!(eventually(Duration::from_secs(10), || sds.exists()).await);
    let mut client = sds_client(&sds).await;
    let mut s = SdsStream::open(&mut client, request(Some("n"), &["default"]))
        .await
        .unwrap();
    s.expect_response().await;

    let asked = std::time::Instant::now();
    sigterm(&child);
    let exit = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the agent stops")
        .unwrap();
    let took = asked.elapsed();
    assert!(exit.success(), "{exit:?}");
    // An in-place flush would wait out the SDK's own 5 s timeout.
    let bound = meshid_common::telemetry::SHUTDOWN_FLUSH + Duration::from_millis(1500);
    assert!(
        took < bound,
        "the agent took {took:?} to stop; the flush bound is {:?}",
        meshid_common::telemetry::SHUTDOWN_FLUSH
    );
    drop(s);
    held.abort();
    ca.app.shutdown().await;
}

#[tokio::test]
async fn bad_configuration_fails_at_start_with_the_reason() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_meshid-agent"))
        .env_clear()
        .env("SECRET_GRACE_PERIOD_RATIO", "2")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("SECRET_GRACE_PERIOD_RATIO"), "{err}");
}
