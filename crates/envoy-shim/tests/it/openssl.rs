//! `openssl s_client` against the inbound listener: a TLS stack that is not
//! ours. The TestPki certs are written to a tempdir for openssl only.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use meshid_common::cert::certs_to_pem;
use meshid_common::testing::TestPki;
use meshid_envoy_shim::{ConnResult, Mode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;

use crate::support::*;

/// Writes client.pem, chain.pem, client.key and roots.pem for `default/client`.
fn write_client_files(pki: &TestPki, dir: &Path) {
    let svid = pki.svid("default", "client").unwrap();
    // s_client sends only the first cert of -cert; intermediates go in -cert_chain.
    std::fs::write(dir.join("client.pem"), certs_to_pem(&svid.chain()[..1])).unwrap();
    std::fs::write(dir.join("chain.pem"), certs_to_pem(&svid.chain()[1..])).unwrap();
    std::fs::write(dir.join("client.key"), svid.key().to_pkcs8_pem().as_bytes()).unwrap();
    std::fs::write(dir.join("roots.pem"), pki.bundle().to_pem()).unwrap();
}

/// Runs `openssl s_client` with `args`, sends `msg`, and returns what came
/// back on stdout within a few seconds plus whether the echo was seen.
async fn s_client(
    addr: std::net::SocketAddr,
    dir: &Path,
    with_cert: bool,
    msg: &str,
) -> (bool, String) {
    let mut cmd = Command::new("openssl");
    cmd.arg("s_client")
        .arg("-connect")
        .arg(addr.to_string())
        .arg("-CAfile")
        .arg(dir.join("roots.pem"))
        .arg("-quiet");
    if with_cert {
        cmd.arg("-cert")
            .arg(dir.join("client.pem"))
            .arg("-cert_chain")
            .arg(dir.join("chain.pem"))
            .arg("-key")
            .arg(dir.join("client.key"));
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("openssl is installed");
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let _ = stdin.write_all(msg.as_bytes()).await;
    let _ = stdin.flush().await;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, stdout.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => {
                got.extend_from_slice(&buf[..n]);
                if String::from_utf8_lossy(&got).contains(msg.trim()) {
                    break;
                }
            }
        }
    }
    drop(stdin);
    let _ = child.kill().await;
    let mut err = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), stderr.read_to_string(&mut err)).await;
    let out = String::from_utf8_lossy(&got).into_owned();
    (
        out.contains(msg.trim()),
        format!("stdout: {out}\nstderr: {err}"),
    )
}

#[tokio::test]
async fn openssl_without_a_client_cert_is_refused_in_strict() {
    let pki = pki();
    let mut shim = Shim::start(&pki, Mode::Strict, |_, _| {}).await;
    shim.ready().await;
    write_client_files(&pki, shim.dir.path());
    let (echoed, out) =
        s_client(shim.app.inbound_addr(), shim.dir.path(), false, "no cert\n").await;
    assert!(!echoed, "{out}");
    let ev = shim.event().await;
    assert_eq!(ev.result, ConnResult::HandshakeFailed, "{ev:?}");
    assert_eq!(ev.failure, Some("no_client_cert"), "{ev:?} {out}");

    // With the client cert, openssl gets through.
    let (echoed, out) = s_client(
        shim.app.inbound_addr(),
        shim.dir.path(),
        true,
        "with cert\n",
    )
    .await;
    assert!(echoed, "{out}");
}

#[tokio::test]
async fn openssl_mtls_and_plaintext_share_the_permissive_port() {
    let pki = pki();
    let mut shim = Shim::start(&pki, Mode::Permissive, |_, _| {}).await;
    shim.ready().await;
    write_client_files(&pki, shim.dir.path());
    let addr = shim.app.inbound_addr();

    let (echoed, out) = s_client(addr, shim.dir.path(), true, "over mtls\n").await;
    assert!(echoed, "{out}");
    let ev = shim.event().await;
    assert_eq!((ev.result, ev.tls), (ConnResult::Ok, true), "{ev:?}");
    assert_eq!(ev.peer_id, Some(pki.id("default", "client")));

    let mut plain = TcpStream::connect(addr).await.unwrap();
    assert_eq!(
        roundtrip(&mut plain, b"over plaintext\n").await.unwrap(),
        b"over plaintext\n"
    );
    drop(plain);
    let ev = shim.event().await;
    assert_eq!((ev.result, ev.tls), (ConnResult::Ok, false), "{ev:?}");
}
