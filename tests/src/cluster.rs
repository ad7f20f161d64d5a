//! What the harness does as "the cluster" on every backend: the CA's
//! plugged-in certificate files (the `cacerts` secret) and how they are
//! written.

use std::path::Path;
use std::time::Duration;

use meshid_common::{CaOptions, CertificateAuthority};

use crate::Error;

/// Plugged-in CA material as Istio recommends (an offline root A and an
/// intermediate A that signs workloads), so the root-rotation case has a
/// root A to rotate away from.
pub fn plugged_ca_files(trust_domain: &str) -> Result<Vec<(&'static str, String)>, Error> {
    let setup = |e: meshid_common::Error| Error::Setup(format!("plugged-in CA: {e}"));
    let root = CertificateAuthority::self_signed_root(&CaOptions {
        common_name: Some("meshid e2e root A".into()),
        ..CaOptions::new(trust_domain, Duration::from_secs(86_400 * 30))
    })
    .map_err(setup)?;
    let inter = root
        .issue_intermediate(&CaOptions {
            common_name: Some("meshid e2e intermediate A".into()),
            ..CaOptions::new(trust_domain, Duration::from_secs(86_400 * 7))
        })
        .map_err(setup)?;
    Ok(vec![
        ("ca-cert.pem", inter.cert_pem()),
        ("ca-key.pem", inter.key().to_pkcs8_pem().to_string()),
        (
            "cert-chain.pem",
            format!("{}{}", inter.cert_pem(), root.cert_pem()),
        ),
        ("root-cert.pem", root.cert_pem()),
    ])
}

/// Writes CA files atomically (temp file + rename), keys with mode 0600.
pub fn write_ca_files(dir: &Path, files: &[(&str, String)]) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    for (name, contents) in files {
        let path = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, contents).map_err(|e| Error::io(&tmp, e))?;
        if name.contains("key") {
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| Error::io(&tmp, e))?;
        }
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
    }
    Ok(())
}
