//! SDS over the Unix socket: contents, ACK / NACK / stale nonce, pushes on
//! rotation and on a root change, and bad input.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use meshid_common::cert::parse_pem_certs;
use meshid_common::{CertInfo, PrivateKey, TrustBundle};

use crate::support::{
    AgentBuilder, SdsStream, TestAgent, eventually, request, secrets, tls_certificate, trusted_ca,
};

const QUIET: Duration = Duration::from_millis(300);

async fn agent() -> TestAgent {
    AgentBuilder::default().start().await
}

#[tokio::test]
async fn default_and_rootca_carry_the_chain_key_and_roots() {
    let a = agent().await;
    let serial = a.ready().await;
    let mut client = a.sds().await;

    let mut s = SdsStream::open(&mut client, request(Some("sidecar~1"), &["default"]))
        .await
        .unwrap();
    let resp = s.expect_response().await;
    assert_eq!(resp.type_url, meshid_common::sds::SECRET_TYPE_URL);
    assert!(!resp.nonce.is_empty() && resp.version_info.contains(&serial));
    let secrets_ = secrets(&resp);
    assert_eq!(secrets_.len(), 1, "exactly the secret asked for");
    assert_eq!(secrets_[0].name, "default");
    let (chain_pem, key_pem) = tls_certificate(&secrets_[0]);
    let chain = parse_pem_certs(&chain_pem).unwrap();
    assert_eq!(chain.len(), 2, "leaf + intermediate");
    let leaf = CertInfo::from_der(&chain[0]).unwrap();
    assert_eq!(leaf.serial, serial);
    assert_eq!(leaf.spiffe_id.as_ref(), Some(&a.id()));
    assert!(
        key_pem.starts_with("-----BEGIN PRIVATE KEY-----"),
        "PKCS#8 PEM"
    );
    let key = PrivateKey::from_pem(&key_pem).unwrap();
    assert_eq!(key.public_key_spki(), leaf.public_key_spki);

    let mut r = SdsStream::open(&mut client, request(Some("sidecar~1"), &["ROOTCA"]))
        .await
        .unwrap();
    let resp = r.expect_response().await;
    let secrets_ = secrets(&resp);
    assert_eq!(secrets_.len(), 1);
    assert_eq!(secrets_[0].name, "ROOTCA");
    let roots = TrustBundle::from_pem(&trusted_ca(&secrets_[0])).unwrap();
    assert_eq!(roots, a.ca.bundle());
    a.app.shutdown().await;
}

#[tokio::test]
async fn ack_gets_no_reply_nack_is_logged_and_a_stale_nonce_ignored() {
    let a = agent().await;
    let first = a.ready().await;
    let mut client = a.sds().await;
    let mut s = SdsStream::open(&mut client, request(Some("n"), &["default"]))
        .await
        .unwrap();
    let r1 = s.expect_response().await;
    s.ack(&r1, &["default"]).await;
    assert!(s.next_within(QUIET).await.is_none(), "no reply to an ACK");
    s.nack(&r1, &["default"]).await;
    assert!(s.next_within(QUIET).await.is_none(), "no reply to a NACK");

    // A rotation: a new version on the same stream.
    let second = a.rotate(&first).await;
    let r2 = s.expect_response().await;
    assert!(r2.version_info.contains(&second), "{}", r2.version_info);
    assert_ne!(r2.nonce, r1.nonce);
    // An ACK of the old response is stale now: ignored.
    s.ack(&r1, &["default"]).await;
    assert!(s.next_within(QUIET).await.is_none(), "stale nonce ignored");
    s.ack(&r2, &["default"]).await;
    assert!(s.next_within(QUIET).await.is_none());
    let text = a.app.metrics().encode();
    assert!(
        text.contains("meshid_agent_sds_nacks_total{resource_name=\"default\"} 1"),
        "{text}"
    );
    a.app.shutdown().await;
}

#[tokio::test]
async fn a_rotation_reaches_every_watching_stream() {
    let a = agent().await;
    let first = a.ready().await;
    let mut client = a.sds().await;
    let mut streams = Vec::new();
    for i in 0..10 {
        let names: &[&str] = if i % 2 == 0 {
            &["default"]
        } else {
            &["default", "ROOTCA"]
        };
        let mut s = SdsStream::open(&mut client, request(Some(&format!("n{i}")), names))
            .await
            .unwrap();
        let r = s.expect_response().await;
        assert_eq!(secrets(&r).len(), names.len());
        s.ack(&r, names).await;
        streams.push(s);
    }
    // A ROOTCA-only watcher gets nothing when only the leaf changes.
    let mut roots_only = SdsStream::open(&mut client, request(Some("r"), &["ROOTCA"]))
        .await
        .unwrap();
    let rr = roots_only.expect_response().await;
    roots_only.ack(&rr, &["ROOTCA"]).await;

    let second = a.rotate(&first).await;
    for s in &mut streams {
        let r = s.expect_response().await;
        let (chain, _) = tls_certificate(secrets(&r).iter().find(|s| s.name == "default").unwrap());
        let leaf = CertInfo::from_der(&parse_pem_certs(&chain).unwrap()[0]).unwrap();
        assert_eq!(leaf.serial, second);
    }
    assert!(
        roots_only.next_within(QUIET).await.is_none(),
        "same roots: no push for ROOTCA"
    );
    a.app.shutdown().await;
}

#[tokio::test]
async fn a_root_change_is_pushed_to_rootca_watchers() {
    let a = agent().await;
    let first = a.ready().await;
    let mut client = a.sds().await;
    let mut roots = SdsStream::open(&mut client, request(Some("r"), &["ROOTCA"]))
        .await
        .unwrap();
    let r1 = roots.expect_response().await;
    roots.ack(&r1, &["ROOTCA"]).await;
    let new_bundle = a.ca.new_root();
    a.rotate(&first).await;
    let r2 = roots.expect_response().await;
    assert_ne!(r2.version_info, r1.version_info);
    let got = TrustBundle::from_pem(&trusted_ca(&secrets(&r2)[0])).unwrap();
    assert_eq!(got, new_bundle);
    a.app.shutdown().await;
}

#[tokio::test]
async fn a_stream_without_node_id_is_invalid_argument() {
    let a = agent().await;
    a.ready().await;
    let mut client = a.sds().await;
    let err = match SdsStream::open(&mut client, request(None, &["default"])).await {
        Err(status) => status,
        Ok(mut s) => match s.next_within(Duration::from_secs(5)).await {
            Some(Err(status)) => status,
            other => panic!("expected an error, got {other:?}"),
        },
    };
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("node.id"), "{}", err.message());
    let err = client
        .fetch_secrets(request(Some(""), &["default"]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    a.app.shutdown().await;
}

#[tokio::test]
async fn an_unknown_name_gets_the_workload_certificate_under_that_name() {
    // pilot-agent's secret cache answers any name that is neither ROOTCA
    // nor a file name with the workload certificate, named as asked.
    let a = agent().await;
    let serial = a.ready().await;
    let mut client = a.sds().await;
    let mut s = SdsStream::open(&mut client, request(Some("n"), &["kubernetes://other"]))
        .await
        .unwrap();
    let r = s.expect_response().await;
    let got = secrets(&r);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].name, "kubernetes://other");
    let (chain, _key) = tls_certificate(&got[0]);
    let leaf = CertInfo::from_der(&parse_pem_certs(&chain).unwrap()[0]).unwrap();
    assert_eq!(leaf.serial, serial);
    a.app.shutdown().await;
}

/// An agent allowed to read files under `<its dir>/allowed`.
async fn file_agent() -> (TestAgent, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let allowed = dir.path().join("allowed");
    std::fs::create_dir(&allowed).unwrap();
    let a = AgentBuilder {
        extra_args: vec!["--sds-file-allow".into(), allowed.display().to_string()],
        ..AgentBuilder::default()
    }
    .start()
    .await;
    // Keep the directory alive as long as the agent.
    std::mem::forget(dir);
    (a, allowed)
}

fn write_atomically(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn file_root_is_served_and_re_pushed_when_the_file_changes() {
    let (a, allowed) = file_agent().await;
    let one = meshid_common::testing::TestPki::new("one.example").unwrap();
    let two = meshid_common::testing::TestPki::new("two.example").unwrap();
    let path = allowed.join("root.pem");
    write_atomically(&path, &one.bundle().to_pem());
    let name = format!("file-root:{}", path.display());
    let mut client = a.sds().await;
    let mut s = SdsStream::open(&mut client, request(Some("n"), &[&name]))
        .await
        .unwrap();
    let r = s.expect_response().await;
    let got = secrets(&r);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].name, name);
    assert_eq!(
        TrustBundle::from_pem(&trusted_ca(&got[0])).unwrap(),
        one.bundle()
    );
    s.ack(&r, &[&name]).await;
    assert!(s.next_within(QUIET).await.is_none(), "no change, no push");

    write_atomically(&path, &two.bundle().to_pem());
    let r2 = s.expect_response().await;
    assert_ne!(r2.version_info, r.version_info);
    let got = secrets(&r2);
    assert_eq!(
        TrustBundle::from_pem(&trusted_ca(&got[0])).unwrap(),
        two.bundle()
    );
    a.app.shutdown().await;
}

#[tokio::test]
async fn file_cert_is_served_and_re_pushed_when_the_files_change() {
    let (a, allowed) = file_agent().await;
    let pki = meshid_common::testing::TestPki::new("cluster.local").unwrap();
    let cert = allowed.join("cert.pem");
    let key = allowed.join("key.pem");
    let write = |svid: &meshid_common::Svid| {
        write_atomically(&key, svid.key().to_pkcs8_pem().as_str());
        write_atomically(&cert, &meshid_common::cert::certs_to_pem(svid.chain()));
    };
    let first = pki.svid("default", "gw").unwrap();
    write(&first);
    let name = format!("file-cert:{}~{}", cert.display(), key.display());
    let mut client = a.sds().await;
    let mut s = SdsStream::open(&mut client, request(Some("n"), &[&name]))
        .await
        .unwrap();
    let r = s.expect_response().await;
    let got = secrets(&r);
    assert_eq!(got[0].name, name);
    let (chain, key_pem) = tls_certificate(&got[0]);
    let leaf = CertInfo::from_der(&parse_pem_certs(&chain).unwrap()[0]).unwrap();
    assert_eq!(leaf.serial, first.leaf().serial);
    assert_eq!(key_pem, first.key().to_pkcs8_pem().as_str());
    s.ack(&r, &[&name]).await;

    let second = pki.svid("default", "gw").unwrap();
    write(&second);
    let serial = eventually_serial(&mut s, &second.leaf().serial).await;
    assert_eq!(serial, second.leaf().serial);
    a.app.shutdown().await;
}

/// Reads pushes until one carries `want`'s leaf; returns that serial.
async fn eventually_serial(s: &mut SdsStream, want: &str) -> String {
    for _ in 0..5 {
        let r = s.expect_response().await;
        let (chain, _) = tls_certificate(&secrets(&r)[0]);
        let serial = CertInfo::from_der(&parse_pem_certs(&chain).unwrap()[0])
            .unwrap()
            .serial;
        if serial == want {
            return serial;
        }
    }
    panic!("never saw {want}")
}

#[tokio::test]
async fn a_file_outside_the_allow_list_is_refused_and_the_stream_stays_alive() {
    let (a, allowed) = file_agent().await;
    let pki = meshid_common::testing::TestPki::new("cluster.local").unwrap();
    // Readable, but outside the allowed directory.
    let outside = allowed.parent().unwrap().join("root.pem");
    std::fs::write(&outside, pki.bundle().to_pem()).unwrap();
    let refused = format!("file-root:{}", outside.display());
    let mut client = a.sds().await;
    let mut s = SdsStream::open(&mut client, request(Some("n"), &[&refused]))
        .await
        .unwrap();
    assert!(
        s.next_within(Duration::from_secs(1)).await.is_none(),
        "nothing is served for a refused path, and the stream is not ended"
    );
    // The same stream still serves: a missing file inside the allowed
    // directory is sent once it appears.
    let later = allowed.join("later.pem");
    let name = format!("file-root:{}", later.display());
    s.send(request(None, &[&name])).await;
    assert!(s.next_within(Duration::from_secs(1)).await.is_none());
    write_atomically(&later, &pki.bundle().to_pem());
    let r = s.expect_response().await;
    assert_eq!(secrets(&r)[0].name, name);
    a.app.shutdown().await;
}

#[tokio::test]
async fn file_root_system_is_the_os_trust_store() {
    let Some(path) = meshid_agent::sds_files::system_roots_path() else {
        panic!(
            "no OS trust bundle at any of {:?}: install the ca-certificates package",
            meshid_agent::sds_files::SYSTEM_ROOT_PATHS
        )
    };
    let a = agent().await;
    let mut client = a.sds().await;
    let mut s = SdsStream::open(&mut client, request(Some("n"), &["file-root:system"]))
        .await
        .unwrap();
    let r = s.expect_response().await;
    let got = secrets(&r);
    assert_eq!(got[0].name, "file-root:system");
    let pem = trusted_ca(&got[0]);
    assert_eq!(pem, std::fs::read_to_string(&path).unwrap());
    assert!(parse_pem_certs(&pem).unwrap().len() > 10, "a real store");
    a.app.shutdown().await;
}

#[tokio::test]
async fn a_nack_storm_gets_no_replies_and_the_stream_keeps_working() {
    let a = agent().await;
    let first = a.ready().await;
    let mut client = a.sds().await;
    let mut s = SdsStream::open(&mut client, request(Some("n"), &["default"]))
        .await
        .unwrap();
    let r = s.expect_response().await;
    for _ in 0..500 {
        s.nack(&r, &["default"]).await;
    }
    assert!(s.next_within(Duration::from_millis(500)).await.is_none());
    let counted = eventually(Duration::from_secs(5), || {
        a.app
            .metrics()
            .encode()
            .contains("meshid_agent_sds_nacks_total{resource_name=\"default\"} 500")
    })
    .await;
    assert!(counted, "{}", a.app.metrics().encode());
    let second = a.rotate(&first).await;
    let r2 = s.expect_response().await;
    assert!(r2.version_info.contains(&second));
    a.app.shutdown().await;
}

#[tokio::test]
async fn a_subscription_before_the_first_cert_triggers_it_and_is_answered() {
    let a = AgentBuilder {
        first_fetch_delay: Duration::from_secs(600),
        ..AgentBuilder::default()
    }
    .start()
    .await;
    let mut client = a.sds().await;
    let t0 = std::time::Instant::now();
    let mut s = SdsStream::open(&mut client, request(Some("n"), &["default"]))
        .await
        .unwrap();
    let r = s.expect_response().await;
    assert_eq!(secrets(&r).len(), 1);
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(a.ca.calls().len(), 1);
    a.app.shutdown().await;
}

#[tokio::test]
async fn fetch_secrets_answers_once() {
    let a = agent().await;
    let serial = a.ready().await;
    let mut client = a.sds().await;
    let resp = client
        .fetch_secrets(request(Some("n"), &["default", "ROOTCA"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(secrets(&resp).len(), 2);
    assert!(resp.version_info.contains(&serial));
    a.app.shutdown().await;
}

#[tokio::test]
async fn the_sockets_are_private() {
    let a = agent().await;
    for path in [a.app.sds_socket(), a.app.workload_api_socket()] {
        let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", path.display());
    }
    a.app.shutdown().await;
}

/// A process of another user that gets past the file mode (here the mode is
/// opened up on purpose) is still refused by the peer-credential check.
#[tokio::test]
async fn a_peer_of_another_user_is_refused() {
    let a = agent().await;
    a.ready().await;
    let sock = a.app.sds_socket().to_path_buf();
    if !is_root() {
        panic!(
            "this test needs root to run a client as another user (uid 65534); \
             it runs as root in CI"
        );
    }
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    std::fs::set_permissions(a.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // The client sends the HTTP/2 preface and reports whether the server
    // answered anything before closing.
    let script = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(5)
s.connect(sys.argv[1])
try:
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    data = s.recv(100)
except OSError:
    # Closed by the agent before or while we wrote: refused.
    data = b""
print("GOT", len(data))
"#;
    let out = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&sock)
        .uid(65534)
        .gid(65534)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("GOT 0"),
        "the server must not answer: {stdout}"
    );
    // Our own user is served.
    let mut client = a.sds().await;
    let mut s = SdsStream::open(&mut client, request(Some("n"), &["default"]))
        .await
        .unwrap();
    s.expect_response().await;
    a.app.shutdown().await;
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// What a process of uid/gid 65534 gets from the socket at `sock`:
/// `EACCES` when it may not connect, else `GOT <n>` with the bytes the
/// server answered an HTTP/2 preface with (0: closed on it).
async fn probe_as_nobody(sock: &std::path::Path) -> String {
    let script = r#"
import errno, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(5)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e.errno)))
    sys.exit(0)
try:
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    data = s.recv(100)
except OSError:
    data = b""
print("GOT", len(data))
"#;
    let out = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(sock)
        .uid(65534)
        .gid(65534)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// DESIGN §2.3: only the pod's own processes may use the sockets. Both the
/// SDS and the Workload API socket are mode 0600, so a process of another
/// uid cannot even connect (the directory is opened up here, so only the
/// socket's own mode stands in the way); with the mode opened up too, the
/// peer-credential check still refuses it on both sockets.
#[tokio::test]
async fn another_uid_can_use_neither_socket() {
    if !is_root() {
        let reason = "this test needs root to run a client as another user (uid 65534)";
        assert!(
            std::env::var_os("CI").is_none(),
            "{reason}; CI runs as root"
        );
        eprintln!("SKIPPED another_uid_can_use_neither_socket: {reason}");
        return;
    }
    let a = agent().await;
    a.ready().await;
    std::fs::set_permissions(a.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let sockets = [
        a.app.sds_socket().to_path_buf(),
        a.app.workload_api_socket().to_path_buf(),
    ];
    for sock in &sockets {
        let mode = std::fs::metadata(sock).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", sock.display());
        assert_eq!(
            probe_as_nobody(sock).await,
            "EACCES",
            "uid 65534 connected to {}",
            sock.display()
        );
    }
    for sock in &sockets {
        std::fs::set_permissions(sock, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert_eq!(
            probe_as_nobody(sock).await,
            "GOT 0",
            "{} answered uid 65534",
            sock.display()
        );
    }
    // Our own user is still served on both.
    let mut client = a.sds().await;
    let mut s = SdsStream::open(&mut client, request(Some("n"), &["default"]))
        .await
        .unwrap();
    s.expect_response().await;
    a.app.shutdown().await;
}
