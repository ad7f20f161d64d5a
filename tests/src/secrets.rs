//! The secrets scan: after a run, every file under the run's directory
//! (working directories, sockets' directories, logs, the registry, and the
//! components' own temp dir, `TMPDIR=<run>/tmp`) is searched for private-key
//! material. Only the CA's documented key files may hold a key; any other
//! hit fails the run (`--output-certs` directories are allowed only when the
//! run asked for them, which the default mesh does not).
//!
//! Keys are found by their structure, not by knowing them: meshid's keys
//! (P-256 by default, P-384, RSA-2048) only ever exist as PKCS#8 (what
//! `PrivateKey` serialises, what SDS and the Workload API carry), SEC1 or
//! PKCS#1 — so the scan looks for the PEM `PRIVATE KEY-----` armour, and for
//! the DER bytes that open each of those encodings (version + algorithm,
//! which a public key or certificate never carries), raw and in every
//! textual form a key could take on its way to a log: base64 (standard and
//! URL-safe, at each of the three alignments), hex, and Rust's `Debug` of a
//! byte slice. What this proves: no workload key in any encoding the code
//! base can produce reached the disk. What it cannot see: a key written as
//! a bare 32-byte scalar with no structure (nothing in meshid writes that).

use std::path::{Path, PathBuf};

/// One piece of key material found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub path: PathBuf,
    pub offset: usize,
    /// Which pattern matched (`PEM armour`, `PKCS#8 EC DER`, …).
    pub kind: String,
}

/// What a scan saw.
#[derive(Clone, Debug, Default)]
pub struct Scan {
    pub files: usize,
    pub bytes: u64,
    /// Hits in files the policy allows (the CA's key files).
    pub allowed: Vec<Finding>,
    /// Every other hit.
    pub leaks: Vec<Finding>,
}

/// DER openings of private keys: version then algorithm (PKCS#8), or
/// version then the key (SEC1, PKCS#1).
const DER_MARKERS: &[(&str, &[u8])] = &[
    // PKCS#8: INTEGER 0, AlgorithmIdentifier { id-ecPublicKey, secp384r1 }
    // (the SEQUENCE is shorter than P-256's: the curve OID is 5 bytes).
    (
        "PKCS#8 EC P-384",
        &[
            0x02, 0x01, 0x00, 0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01,
        ],
    ),
    // PKCS#8: INTEGER 0, AlgorithmIdentifier { id-ecPublicKey, prime256v1 }.
    (
        "PKCS#8 EC P-256",
        &[
            0x02, 0x01, 0x00, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01,
        ],
    ),
    // PKCS#8: INTEGER 0, AlgorithmIdentifier { rsaEncryption, NULL }, OCTET STRING.
    (
        "PKCS#8 RSA",
        &[
            0x02, 0x01, 0x00, 0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01,
            0x01, 0x01, 0x05, 0x00, 0x04,
        ],
    ),
    // SEC1 ECPrivateKey of P-256: SEQUENCE, INTEGER 1, OCTET STRING (32).
    ("SEC1 P-256", &[0x30, 0x77, 0x02, 0x01, 0x01, 0x04, 0x20]),
    // The same inside PKCS#8 (no curve parameters).
    (
        "SEC1 P-256 (in PKCS#8)",
        &[0x30, 0x6b, 0x02, 0x01, 0x01, 0x04, 0x20],
    ),
    // SEC1 ECPrivateKey of P-384.
    (
        "SEC1 P-384",
        &[0x30, 0x81, 0xa4, 0x02, 0x01, 0x01, 0x04, 0x30],
    ),
    // PKCS#1 RSAPrivateKey of a 2048-bit key: INTEGER 0, INTEGER (257 bytes).
    (
        "PKCS#1 RSA-2048",
        &[0x02, 0x01, 0x00, 0x02, 0x82, 0x01, 0x01, 0x00],
    ),
];

/// Every byte string the scan looks for, with its name.
pub fn patterns() -> Vec<(String, Vec<u8>)> {
    use base64::Engine;
    let mut out = vec![("PEM armour".to_owned(), b"PRIVATE KEY-----".to_vec())];
    for (name, der) in DER_MARKERS {
        out.push((format!("{name} DER"), der.to_vec()));
        let hex: String = der.iter().map(|b| format!("{b:02x}")).collect();
        out.push((format!("{name} hex"), hex.clone().into_bytes()));
        out.push((format!("{name} HEX"), hex.to_uppercase().into_bytes()));
        let debug = der
            .iter()
            .map(|b| b.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        out.push((format!("{name} Debug bytes"), debug.into_bytes()));
        // Base64 of data holding `der` at any offset contains, for one of
        // the three alignments, the characters that only `der` determines.
        for shift in 0..3 {
            let mut padded = vec![0u8; shift];
            padded.extend_from_slice(der);
            let whole = padded.len() / 3 * 3;
            for (alphabet, engine) in [
                ("base64", base64::engine::general_purpose::STANDARD_NO_PAD),
                (
                    "base64url",
                    base64::engine::general_purpose::URL_SAFE_NO_PAD,
                ),
            ] {
                let text = engine.encode(&padded[..whole]);
                // Characters touched by the zero padding are unknown.
                let skip = if shift == 0 { 0 } else { 2 };
                let known = &text[skip..];
                if known.len() >= 8 {
                    out.push((
                        format!("{name} {alphabet} (+{shift})"),
                        known.as_bytes().to_vec(),
                    ));
                }
            }
        }
    }
    out.sort();
    out.dedup_by(|a, b| a.1 == b.1);
    out
}

fn find_all(haystack: &[u8], needle: &[u8]) -> Vec<usize> {
    if needle.is_empty() || haystack.len() < needle.len() {
        return Vec::new();
    }
    haystack
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect()
}

/// Scans every regular file under `roots` (symlinks are not followed:
/// what they point to is scanned where it lives, if it is under a root).
/// `allowed` says which files may hold a key.
pub fn scan(roots: &[PathBuf], allowed: &dyn Fn(&Path) -> bool) -> std::io::Result<Scan> {
    let patterns = patterns();
    let mut scan = Scan::default();
    let mut stack: Vec<PathBuf> = roots.to_vec();
    while let Some(path) = stack.pop() {
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path)? {
                stack.push(entry?.path());
            }
            continue;
        }
        if !meta.is_file() {
            continue;
        }
        let data = match std::fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let ok = allowed(&path);
        scan.add(&patterns, &data, path, ok);
    }
    Ok(scan)
}

impl Scan {
    /// Scans one file's bytes.
    fn add(&mut self, patterns: &[(String, Vec<u8>)], data: &[u8], path: PathBuf, allowed: bool) {
        self.files += 1;
        self.bytes += data.len() as u64;
        for (kind, needle) in patterns {
            for offset in find_all(data, needle) {
                let finding = Finding {
                    path: path.clone(),
                    offset,
                    kind: kind.clone(),
                };
                if allowed {
                    self.allowed.push(finding);
                } else {
                    self.leaks.push(finding);
                }
            }
        }
    }
}

/// Scans every regular file of a tar archive (as `docker cp <container>:<path> -`
/// writes it), naming each `<label><path in the archive>`. No file of an
/// archive is allowed to hold a key: the CA's key files live in its
/// mounted directory, which is on the host.
pub fn scan_tar(label: &str, tar: &[u8]) -> Result<Scan, String> {
    let patterns = patterns();
    let mut scan = Scan::default();
    for (name, data) in tar_files(tar)? {
        scan.add(
            &patterns,
            data,
            PathBuf::from(format!("{label}{name}")),
            false,
        );
    }
    Ok(scan)
}

/// The regular files of a ustar/GNU tar archive: (path, contents).
fn tar_files(tar: &[u8]) -> Result<Vec<(String, &[u8])>, String> {
    let mut out = Vec::new();
    let mut at = 0usize;
    let mut long_name: Option<String> = None;
    while at + 512 <= tar.len() {
        let header = &tar[at..at + 512];
        if header.iter().all(|b| *b == 0) {
            break;
        }
        let field = |range: std::ops::Range<usize>| {
            let raw = &header[range];
            let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
            String::from_utf8_lossy(&raw[..end]).into_owned()
        };
        let size_field = field(124..136);
        let size = u64::from_str_radix(size_field.trim(), 8)
            .map_err(|_| format!("tar entry at {at}: bad size {size_field:?}"))?
            as usize;
        let start = at + 512;
        let end = start
            .checked_add(size)
            .filter(|e| *e <= tar.len())
            .ok_or_else(|| format!("tar entry at {at}: {size} bytes past the end"))?;
        let data = &tar[start..end];
        let name = match long_name.take() {
            Some(n) => n,
            None => {
                let prefix = if &header[257..262] == b"ustar" {
                    field(345..500)
                } else {
                    String::new()
                };
                let name = field(0..100);
                if prefix.is_empty() {
                    name
                } else {
                    format!("{prefix}/{name}")
                }
            }
        };
        match header[156] {
            // GNU long name: the next entry's path.
            b'L' => {
                let end = data.iter().position(|b| *b == 0).unwrap_or(data.len());
                long_name = Some(String::from_utf8_lossy(&data[..end]).into_owned());
            }
            b'0' | 0 | b'7' => out.push((name, data)),
            // PAX headers, directories, links: no file contents of their own
            // (a PAX header's path override is not needed: docker writes GNU
            // long names).
            _ => {}
        }
        at = start + size.div_ceil(512) * 512;
    }
    Ok(out)
}

/// The CA's own key files (DESIGN §3: the persisted self-signed root, the
/// plugged-in CA key, the JWT-SVID signing key), each under a CA directory
/// of the run: the only files of a run that may hold a private key.
pub const CA_KEY_FILES: &[&str] = &[
    "ca-key.pem",
    "self-signed-ca-key.pem",
    "jwt-signing-key.pem",
];

/// The TLS key the dev OpenBao of `--signer vault` writes for its own
/// listener (`bao server -dev-tls`): a peer's key, not meshid's.
pub const DEV_VAULT_TLS_KEY: &str = "vault/tls/vault-key.pem";

/// The policy of an e2e run in `run_dir`: the CA's key files under
/// `<run>/ca/` (and the dev Vault's own listener key), nothing else.
pub fn ca_keys_only(run_dir: &Path) -> impl Fn(&Path) -> bool + '_ {
    let ca = run_dir.join("ca");
    let vault_tls = run_dir.join(DEV_VAULT_TLS_KEY);
    move |path: &Path| {
        path == vault_tls
            || path.starts_with(&ca)
                && path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| CA_KEY_FILES.contains(&n))
    }
}

/// One line per leak (at most `max`), for a failure message.
pub fn describe(leaks: &[Finding], max: usize) -> String {
    let mut lines: Vec<String> = leaks
        .iter()
        .take(max)
        .map(|f| format!("{} @{}: {}", f.path.display(), f.offset, f.kind))
        .collect();
    if leaks.len() > max {
        lines.push(format!("… and {} more", leaks.len() - max));
    }
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshid_common::{KeyType, PrivateKey};

    fn tempdir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("meshid-secrets-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Every encoding of every key type is found, wherever it sits in a file.
    /// A tar archive of `files` (ustar; a GNU long-name entry for long paths).
    fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        fn header(name: &str, size: usize, kind: u8) -> [u8; 512] {
            let mut h = [0u8; 512];
            h[..name.len().min(100)].copy_from_slice(&name.as_bytes()[..name.len().min(100)]);
            h[100..107].copy_from_slice(b"0000644");
            h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
            h[156] = kind;
            h[257..263].copy_from_slice(b"ustar\0");
            h[148..156].copy_from_slice(b"        ");
            let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
            h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
            h
        }
        let mut out = Vec::new();
        let mut push = |bytes: &[u8], h: [u8; 512]| {
            out.extend_from_slice(&h);
            out.extend_from_slice(bytes);
            out.resize(out.len().div_ceil(512) * 512, 0);
        };
        for (name, data) in files {
            if name.len() > 100 {
                let mut long = name.as_bytes().to_vec();
                long.push(0);
                push(&long, header("././@LongLink", long.len(), b'L'));
            }
            push(data, header(name, data.len(), b'0'));
        }
        push(&[], header("tmp/", 0, b'5'));
        out.extend_from_slice(&[0u8; 1024]);
        out
    }

    #[test]
    fn keys_in_a_containers_files_are_found_and_named() {
        let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let pem = key.to_pkcs8_pem().to_string();
        let long = format!("tmp/{}/key.pem", "d".repeat(120));
        let cert_free = b"nothing secret here".as_slice();
        let tar = tar_of(&[
            ("tmp/log.txt", cert_free),
            ("tmp/leak.pem", pem.as_bytes()),
            (&long, key.pkcs8_der()),
        ]);
        let scan = scan_tar("docker:pod-a:/", &tar).unwrap();
        assert_eq!(scan.files, 3);
        let paths: std::collections::BTreeSet<String> = scan
            .leaks
            .iter()
            .map(|f| f.path.display().to_string())
            .collect();
        assert_eq!(
            paths,
            [
                format!("docker:pod-a:/{long}"),
                "docker:pod-a:/tmp/leak.pem".to_owned()
            ]
            .into_iter()
            .collect()
        );
        assert!(scan.allowed.is_empty());
        // A clean archive: nothing found; a truncated one: an error.
        assert!(
            scan_tar("x:", &tar_of(&[("a", cert_free)]))
                .unwrap()
                .leaks
                .is_empty()
        );
        assert!(scan_tar("x:", &tar[..520]).is_err());
    }

    #[test]
    fn keys_are_found_in_every_encoding() {
        use base64::Engine;
        let dir = tempdir("find");
        for key_type in [KeyType::EcdsaP256, KeyType::EcdsaP384, KeyType::Rsa2048] {
            let key = PrivateKey::generate(key_type).unwrap();
            let der = key.pkcs8_der().to_vec();
            let pem = key.to_pkcs8_pem().to_string();
            let forms: Vec<(&str, Vec<u8>)> = vec![
                ("pem", pem.into_bytes()),
                ("der", der.clone()),
                (
                    "b64",
                    base64::engine::general_purpose::STANDARD
                        .encode(&der)
                        .into_bytes(),
                ),
                (
                    "b64url",
                    base64::engine::general_purpose::URL_SAFE_NO_PAD
                        .encode(&der)
                        .into_bytes(),
                ),
                (
                    "hex",
                    der.iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<String>()
                        .into_bytes(),
                ),
                ("debug", format!("{der:?}").into_bytes()),
            ];
            for (form, bytes) in forms {
                // At each of three offsets inside a log line, so every
                // base64 alignment is exercised.
                for pad in 0..3 {
                    let mut file = b"2026-01-01T00:00:00Z INFO key=".to_vec();
                    file.extend(std::iter::repeat_n(b'x', pad));
                    if form == "b64" || form == "b64url" {
                        // A key inside a longer base64 blob (e.g. a JSON field).
                        let mut blob = vec![0x55u8; pad];
                        blob.extend_from_slice(&der);
                        file.extend(
                            base64::engine::general_purpose::STANDARD
                                .encode(&blob)
                                .into_bytes(),
                        );
                    }
                    file.extend_from_slice(&bytes);
                    file.extend_from_slice(b"\n");
                    let path = dir.join(format!("{key_type:?}-{form}-{pad}.log"));
                    std::fs::write(&path, &file).unwrap();
                    let scan = scan(std::slice::from_ref(&path), &|_| false).unwrap();
                    assert!(
                        !scan.leaks.is_empty(),
                        "{key_type:?} as {form} (pad {pad}) not found"
                    );
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Certificates, public keys, CSRs, trust bundles and tokens — what a
    /// run legitimately leaves on disk — are not mistaken for keys.
    #[test]
    fn public_material_is_not_a_finding() {
        let dir = tempdir("public");
        let pki = meshid_common::testing::TestPki::new("cluster.local").unwrap();
        let svid = pki.svid("default", "web").unwrap();
        let mut files: Vec<(String, Vec<u8>)> = Vec::new();
        for (i, der) in svid.chain().iter().enumerate() {
            files.push((format!("cert-{i}.der"), der.to_vec()));
            files.push((
                format!("cert-{i}.pem"),
                meshid_common::cert::cert_to_pem(der).into_bytes(),
            ));
        }
        for key_type in [KeyType::EcdsaP256, KeyType::Rsa2048] {
            let key = PrivateKey::generate(key_type).unwrap();
            let id = pki.id("default", "web");
            files.push((
                format!("{key_type:?}.csr"),
                key.csr_for(&id).unwrap().into_bytes(),
            ));
            files.push((format!("{key_type:?}.spki"), key.public_key_spki().to_vec()));
        }
        for (name, bytes) in &files {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
        let scan = scan(std::slice::from_ref(&dir), &|_| false).unwrap();
        assert_eq!(scan.files, files.len());
        assert!(scan.leaks.is_empty(), "{}", describe(&scan.leaks, 10));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn only_the_cas_key_files_are_allowed() {
        let run = Path::new("/tmp/run");
        let allowed = ca_keys_only(run);
        assert!(allowed(Path::new(
            "/tmp/run/ca/cacerts/self-signed-ca-key.pem"
        )));
        assert!(allowed(Path::new(
            "/tmp/run/ca/cacerts/jwt-signing-key.pem"
        )));
        assert!(!allowed(Path::new("/tmp/run/pods/web/key.pem")));
        assert!(!allowed(Path::new("/tmp/run/pods/web/ca-key.pem")));
        assert!(!allowed(Path::new("/tmp/run/logs/ca.log")));
        assert!(allowed(Path::new("/tmp/run/vault/tls/vault-key.pem")));
        assert!(!allowed(Path::new("/tmp/run/vault/tls/other-key.pem")));
    }
}
