//! SDS secrets read from files, as pilot-agent serves them (DESIGN §2.3):
//! `file-root:<path>` (a PEM trust bundle), `file-cert:<cert>~<key>` (a PEM
//! chain and key) and `file-root:system` (the OS trust store, found by
//! probing the usual bundle paths, as Istio does).
//!
//! Only files under a directory the operator allowed (`--sds-file-allow`,
//! env `SDS_FILE_ALLOW_DIRS`) are read, checked after resolving symlinks and
//! `..`; the OS trust store is always allowed. A stream polls the files it
//! serves and re-pushes when one changes (a mounted Secret is swapped through
//! a symlink, which a poll of the resolved file sees).

use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use meshid_common::sds::{
    FILE_CERT_PREFIX, FILE_ROOT_PREFIX, FILE_ROOT_SYSTEM, tls_certificate_pem, to_any,
    validation_context_pem,
};
use zeroize::Zeroize;

/// How often a stream serving file secrets looks at its files.
pub const FILE_POLL: Duration = Duration::from_millis(500);

/// The OS trust bundles probed for `file-root:system`, first found wins
/// (Debian/Ubuntu, Fedora/RHEL, openSUSE, OpenELEC, CentOS/RHEL 7, Alpine):
/// the list Istio and Go probe.
pub const SYSTEM_ROOT_PATHS: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/pki/tls/cacert.pem",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// What an SDS resource name asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileResource {
    /// `file-root:<path>`.
    Root(PathBuf),
    /// `file-root:system`.
    SystemRoot,
    /// `file-cert:<cert>~<key>`.
    Cert { cert: PathBuf, key: PathBuf },
}

impl FileResource {
    /// The file resource `name` names, or None for a name served from the
    /// agent's own credentials.
    pub fn parse(name: &str) -> Option<FileResource> {
        if name == FILE_ROOT_SYSTEM {
            return Some(FileResource::SystemRoot);
        }
        if let Some(path) = name.strip_prefix(FILE_ROOT_PREFIX) {
            return Some(FileResource::Root(PathBuf::from(path)));
        }
        let rest = name.strip_prefix(FILE_CERT_PREFIX)?;
        let (cert, key) = rest.split_once('~').unwrap_or((rest, ""));
        Some(FileResource::Cert {
            cert: PathBuf::from(cert),
            key: PathBuf::from(key),
        })
    }
}

/// Why a file secret cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error(
        "SDS {name}: {path} is outside the directories allowed by --sds-file-allow ({allowed})"
    )]
    NotAllowed {
        name: String,
        path: String,
        allowed: String,
    },
    #[error("SDS {name}: cannot read {path}: {source}")]
    Read {
        name: String,
        path: String,
        source: std::io::Error,
    },
    #[error("SDS {name}: {reason}")]
    Invalid { name: String, reason: String },
}

/// The directories file secrets may come from.
#[derive(Clone, Debug, Default)]
pub struct FileAllow {
    dirs: Vec<PathBuf>,
}

impl FileAllow {
    pub fn new(dirs: impl IntoIterator<Item = PathBuf>) -> Self {
        FileAllow {
            dirs: dirs.into_iter().collect(),
        }
    }

    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// `path` resolved, if it is under an allowed directory.
    fn check(&self, name: &str, path: &Path) -> Result<PathBuf, FileError> {
        let shown = path.display().to_string();
        let read = |source| FileError::Read {
            name: name.to_owned(),
            path: shown.clone(),
            source,
        };
        let not_allowed = || FileError::NotAllowed {
            name: name.to_owned(),
            path: shown.clone(),
            allowed: if self.dirs.is_empty() {
                "none allowed".to_owned()
            } else {
                self.dirs
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        };
        if !path.is_absolute() {
            return Err(not_allowed());
        }
        let real = std::fs::canonicalize(path).map_err(read)?;
        let allowed = self.dirs.iter().any(|dir| {
            std::fs::canonicalize(dir)
                .map(|d| real.starts_with(d))
                .unwrap_or(false)
        });
        if allowed {
            Ok(real)
        } else {
            Err(not_allowed())
        }
    }
}

/// The first OS trust bundle that exists.
pub fn system_roots_path() -> Option<PathBuf> {
    SYSTEM_ROOT_PATHS
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// A content version cheap enough to poll: modification time and size of
/// each resolved file.
fn stamp(name: &str, paths: &[&Path]) -> Result<String, FileError> {
    let mut parts = Vec::new();
    for p in paths {
        let meta = std::fs::metadata(p).map_err(|source| FileError::Read {
            name: name.to_owned(),
            path: p.display().to_string(),
            source,
        })?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        parts.push(format!("{mtime:x}.{:x}", meta.len()));
    }
    Ok(parts.join("+"))
}

fn read(name: &str, path: &Path) -> Result<Vec<u8>, FileError> {
    std::fs::read(path).map_err(|source| FileError::Read {
        name: name.to_owned(),
        path: path.display().to_string(),
        source,
    })
}

fn check_certs(name: &str, what: &Path, pem: &[u8]) -> Result<(), FileError> {
    let text = std::str::from_utf8(pem).map_err(|_| FileError::Invalid {
        name: name.to_owned(),
        reason: format!("{} is not PEM", what.display()),
    })?;
    meshid_common::cert::parse_pem_certs(text)
        .map(|_| ())
        .map_err(|e| FileError::Invalid {
            name: name.to_owned(),
            reason: format!("{}: {e}", what.display()),
        })
}

/// The current version of resource `name` (`res`), without reading the
/// files' contents.
pub fn version(name: &str, res: &FileResource, allow: &FileAllow) -> Result<String, FileError> {
    match res {
        FileResource::SystemRoot => {
            let path = system_root(name)?;
            stamp(name, &[&path])
        }
        FileResource::Root(p) => stamp(name, &[&allow.check(name, p)?]),
        FileResource::Cert { cert, key } => {
            let cert = allow.check(name, cert)?;
            let key = allow.check(name, key)?;
            stamp(name, &[&cert, &key])
        }
    }
}

fn system_root(name: &str) -> Result<PathBuf, FileError> {
    system_roots_path().ok_or_else(|| FileError::Invalid {
        name: name.to_owned(),
        reason: format!(
            "no OS trust bundle found (looked for {})",
            SYSTEM_ROOT_PATHS.join(", ")
        ),
    })
}

/// Reads and encodes resource `name`.
pub fn load(
    name: &str,
    res: &FileResource,
    allow: &FileAllow,
) -> Result<prost_types::Any, FileError> {
    match res {
        FileResource::SystemRoot | FileResource::Root(_) => {
            let path = match res {
                FileResource::Root(p) => allow.check(name, p)?,
                _ => system_root(name)?,
            };
            let pem = read(name, &path)?;
            check_certs(name, &path, &pem)?;
            Ok(to_any(validation_context_pem(name, &pem)))
        }
        FileResource::Cert { cert, key } => {
            let cert = allow.check(name, cert)?;
            let key = allow.check(name, key)?;
            let chain = read(name, &cert)?;
            check_certs(name, &cert, &chain)?;
            let mut key_pem = read(name, &key)?;
            if !String::from_utf8_lossy(&key_pem).contains("PRIVATE KEY-----") {
                key_pem.zeroize();
                return Err(FileError::Invalid {
                    name: name.to_owned(),
                    reason: format!("{} holds no PEM private key", key.display()),
                });
            }
            let any = to_any(tls_certificate_pem(name, &chain, &key_pem));
            key_pem.zeroize();
            Ok(any)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_as_pilot_agent_writes_them() {
        assert_eq!(
            FileResource::parse("file-root:system"),
            Some(FileResource::SystemRoot)
        );
        assert_eq!(
            FileResource::parse("file-root:/etc/certs/root.pem"),
            Some(FileResource::Root("/etc/certs/root.pem".into()))
        );
        assert_eq!(
            FileResource::parse("file-cert:/etc/c.pem~/etc/k.pem"),
            Some(FileResource::Cert {
                cert: "/etc/c.pem".into(),
                key: "/etc/k.pem".into()
            })
        );
        assert_eq!(FileResource::parse("default"), None);
        assert_eq!(FileResource::parse("ROOTCA"), None);
    }

    #[test]
    fn only_allowed_directories_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let inside = dir.path().join("in");
        std::fs::create_dir(&inside).unwrap();
        std::fs::write(inside.join("a.pem"), "x").unwrap();
        std::fs::write(dir.path().join("b.pem"), "x").unwrap();
        let allow = FileAllow::new([inside.clone()]);
        assert!(allow.check("n", &inside.join("a.pem")).is_ok());
        let err = allow
            .check("n", &inside.join("../b.pem"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--sds-file-allow"), "{err}");
        let err = allow.check("n", Path::new("rel.pem")).unwrap_err();
        assert!(matches!(err, FileError::NotAllowed { .. }));
        // A symlink inside pointing outside is refused too.
        std::os::unix::fs::symlink(dir.path().join("b.pem"), inside.join("link.pem")).unwrap();
        assert!(allow.check("n", &inside.join("link.pem")).is_err());
    }
}
