//! The `meshid-agent` binary itself: flags and Istio environment variables,
//! the printed configuration, readiness with a real CA, a clean stop on
//! SIGTERM.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;

use crate::support::{RealCa, SdsStream, eventually, http_get, request, sds_client};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_sds_and_stops_cleanly_on_sigterm() {
    let ca = RealCa::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), ca.token("web-0")).unwrap();
    let admin_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let sds = dir.path().join("sds/socket");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_meshid-agent"))
        .arg("--sds-socket")
        .arg(&sds)
        .arg("--admin-addr")
        .arg(format!("127.0.0.1:{admin_port}"))
        // The rest through Istio's environment variables.
        .env_clear()
        .env("CA_ADDRESS", ca.address())
        .env("CA_ROOT_CA", ca.root_cert())
        .env("AUTH_TOKEN", dir.path().join("token"))
        .env("POD_NAMESPACE", "default")
        .env("SERVICE_ACCOUNT", "web")
        .env("TRUST_DOMAIN", "cluster.local")
        .env(
            "SPIFFE_ENDPOINT_SOCKET",
            format!("unix://{}", dir.path().join("api.sock").display()),
        )
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

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

    let pid = child.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
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
    let out = out.replace('\u{1b}', "");
    assert!(out.contains("configuration:"), "{out}");
    assert!(out.contains("\"service_account\": \"web\""), "{out}");
    assert!(out.contains("shutting down"), "{out}");
    assert!(!out.contains("PRIVATE KEY"), "{out}");
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
