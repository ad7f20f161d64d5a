//! `--output-certs DIR`: the one, explicit opt-in under which the agent
//! writes key material to disk, for applications that can only read files.
//! Writes `cert-chain.pem`, `key.pem` and `root-cert.pem` (Istio's names),
//! each mode 0600, replaced atomically at every rotation.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use meshid_common::cert::certs_to_pem;
use meshid_common::{Credentials, CredentialsRx};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::error::{Error, Result};

pub const CERT_CHAIN_FILE: &str = "cert-chain.pem";
pub const KEY_FILE: &str = "key.pem";
pub const ROOT_CERT_FILE: &str = "root-cert.pem";

/// Writes the current credentials into `dir`.
pub fn write_all(dir: &Path, creds: &Credentials) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        what: "cannot create the output directory",
        path: dir.to_path_buf(),
        source,
    })?;
    write_private(
        &dir.join(CERT_CHAIN_FILE),
        certs_to_pem(creds.svid.chain()).as_bytes(),
    )?;
    write_private(
        &dir.join(KEY_FILE),
        creds.svid.key().to_pkcs8_pem().as_bytes(),
    )?;
    write_private(&dir.join(ROOT_CERT_FILE), creds.bundle.to_pem().as_bytes())?;
    Ok(())
}

/// Writes a temporary file created 0600, then renames it over `path`.
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp: PathBuf = path.with_extension("pem.tmp");
    let io = |source| Error::Io {
        what: "cannot write",
        path: path.to_path_buf(),
        source,
    };
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(())
}

/// Rewrites the files at every change of the credentials.
pub async fn run(dir: PathBuf, mut creds: CredentialsRx, cancel: CancellationToken) {
    loop {
        let current = creds.borrow_and_update().clone();
        if let Some(c) = current {
            match write_all(&dir, &c) {
                Ok(()) => {
                    info!(dir = %dir.display(), cert.serial = %c.svid.leaf().serial, "wrote the workload certificate files")
                }
                Err(e) => error!(error = %e, "cannot write the workload certificate files"),
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = creds.changed() => if changed.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshid_common::testing::TestPki;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn files_are_private_and_replaced() {
        let pki = TestPki::new("cluster.local").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("certs");
        for _ in 0..2 {
            let creds = pki.credentials(pki.svid("default", "web").unwrap());
            write_all(&out, &creds).unwrap();
            for f in [CERT_CHAIN_FILE, KEY_FILE, ROOT_CERT_FILE] {
                let meta = std::fs::metadata(out.join(f)).unwrap();
                assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{f}");
            }
            let key = std::fs::read_to_string(out.join(KEY_FILE)).unwrap();
            assert_eq!(key.as_str(), creds.svid.key().to_pkcs8_pem().as_str());
        }
        assert_eq!(
            std::fs::read_dir(&out).unwrap().count(),
            3,
            "no temp files left"
        );
    }
}
