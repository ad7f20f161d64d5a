//! Key material stays in memory: nothing on disk unless `--output-certs`
//! asks for it (then 0600 files), and never in logs.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use meshid_agent::output::{CERT_CHAIN_FILE, KEY_FILE, ROOT_CERT_FILE};

use crate::support::{AgentBuilder, SdsStream, request, tls_certificate};

fn files_with(dir: &Path, needle: &str) -> Vec<String> {
    let mut hits = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            hits.extend(files_with(&path, needle));
        } else if std::fs::read(&path)
            .map(|b| String::from_utf8_lossy(&b).contains(needle))
            .unwrap_or(false)
        {
            hits.push(path.display().to_string());
        }
    }
    hits
}

#[tokio::test]
async fn no_key_material_on_disk_without_output_certs() {
    let a = AgentBuilder::default().start().await;
    a.ready().await;
    let mut client = a.sds().await;
    let mut s = SdsStream::open(&mut client, request(Some("n"), &["default"]))
        .await
        .unwrap();
    s.expect_response().await;
    assert_eq!(
        files_with(a.dir.path(), "PRIVATE KEY"),
        Vec::<String>::new()
    );
    a.app.shutdown().await;
}

#[tokio::test]
async fn output_certs_writes_private_files_and_rewrites_them_on_rotation() {
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("certs");
    let a = AgentBuilder {
        extra_args: vec!["--output-certs".into(), out.display().to_string()],
        ..AgentBuilder::default()
    }
    .start()
    .await;
    let first = a.ready().await;
    let written = crate::support::eventually(std::time::Duration::from_secs(5), || {
        out.join(ROOT_CERT_FILE).exists()
    })
    .await;
    assert!(written);
    for f in [CERT_CHAIN_FILE, KEY_FILE, ROOT_CERT_FILE] {
        let mode = std::fs::metadata(out.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    let key1 = std::fs::read_to_string(out.join(KEY_FILE)).unwrap();
    a.rotate(&first).await;
    let rewritten = crate::support::eventually(std::time::Duration::from_secs(5), || {
        std::fs::read_to_string(out.join(KEY_FILE)).is_ok_and(|k| k != key1)
    })
    .await;
    assert!(rewritten, "a new key after the rotation");
    let current = a.app.manager().current().unwrap();
    assert_eq!(
        std::fs::read_to_string(out.join(KEY_FILE))
            .unwrap()
            .as_str(),
        current.svid.key().to_pkcs8_pem().as_str()
    );
    a.app.shutdown().await;
}

#[derive(Clone)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Everything logged at debug level while issuing, serving and rotating,
/// with the token and the key, holds neither.
#[tokio::test]
async fn logs_carry_neither_keys_nor_tokens() {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let writer = Capture(buf.clone());
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(move || writer.clone())
        .finish();
    // A current-thread test: every task of the agent logs through this.
    let _guard = tracing::subscriber::set_default(subscriber);
    let a = AgentBuilder {
        token: Some("secret-token-value.jwt".into()),
        ..AgentBuilder::default()
    }
    .start()
    .await;
    let first = a.ready().await;
    let mut client = a.sds().await;
    let mut s = SdsStream::open(&mut client, request(Some("n"), &["default"]))
        .await
        .unwrap();
    let r = s.expect_response().await;
    let (_, key_pem) = tls_certificate(&crate::support::secrets(&r)[0]);
    a.rotate(&first).await;
    a.app.shutdown().await;
    let logs = String::from_utf8_lossy(&buf.lock().unwrap()).into_owned();
    assert!(
        logs.contains("workload certificate issued"),
        "logs were captured"
    );
    assert!(!logs.contains("secret-token-value"), "the token leaked");
    assert!(!logs.contains("PRIVATE KEY"), "a key leaked");
    let key_body: String = key_pem.lines().nth(1).unwrap().chars().take(24).collect();
    assert!(!logs.contains(&key_body), "key material leaked");
}
