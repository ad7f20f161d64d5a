//! Unix sockets that only the pod's own processes may use: the file is mode
//! 0600 (0660 with a configured group), and every accepted connection's peer
//! credentials (`SO_PEERCRED`) are checked against the socket's owner (or
//! the group) before a byte is read. The check covers the moment between
//! `bind` and `chmod` and any later change to the file's mode.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::Stream;
use meshid_common::serve::Drain;
use tokio::io::DuplexStream;
use tokio::net::{UnixListener, UnixStream};
use tracing::warn;

use crate::authority::any_authority;
use crate::error::{Error, Result};

/// A bound socket and who may connect to it.
#[derive(Debug)]
pub struct UdsListener {
    listener: UnixListener,
    path: PathBuf,
    policy: PeerPolicy,
}

/// Who may connect: the socket owner's uid, or members of `group`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerPolicy {
    pub owner_uid: u32,
    pub group: Option<u32>,
}

impl PeerPolicy {
    pub fn allows(&self, uid: u32, gid: u32) -> bool {
        uid == self.owner_uid || self.group.is_some_and(|g| g == gid)
    }
}

impl UdsListener {
    /// Creates the parent directory, replaces a stale socket file, binds, and
    /// restricts the file's mode.
    pub fn bind(path: &Path, group: Option<u32>) -> Result<Self> {
        let io = |what: &'static str| {
            let path = path.to_path_buf();
            move |source| Error::Io { what, path, source }
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io("cannot create the socket directory of"))?;
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) if std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) => {
                std::fs::remove_file(path).map_err(io("cannot remove the stale socket"))?;
            }
            Ok(_) => {
                return Err(Error::Io {
                    what: "refusing to replace a file that is not a socket:",
                    path: path.to_path_buf(),
                    source: std::io::Error::from(std::io::ErrorKind::AlreadyExists),
                });
            }
            Err(_) => {}
        }
        let listener = UnixListener::bind(path).map_err(|source| Error::Listen {
            what: "the Unix socket",
            addr: path.display().to_string(),
            source,
        })?;
        let mode = if group.is_some() { 0o660 } else { 0o600 };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(io("cannot set the mode of"))?;
        if let Some(gid) = group {
            std::os::unix::fs::chown(path, None, Some(gid))
                .map_err(io("cannot give the socket to its group:"))?;
        }
        let owner_uid = std::fs::metadata(path).map_err(io("cannot stat"))?.uid();
        Ok(UdsListener {
            listener,
            path: path.to_path_buf(),
            policy: PeerPolicy { owner_uid, group },
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn policy(&self) -> PeerPolicy {
        self.policy
    }

    /// Accepted connections whose peer passes the policy, accepted on
    /// `drain`'s loop until it stops. Refused peers are logged and dropped,
    /// never handed to the server. Each accepted connection goes through
    /// [`any_authority`], so gRPC C-core clients are served too.
    pub fn incoming(
        self,
        what: &'static str,
        drain: &Drain,
    ) -> impl Stream<Item = std::io::Result<DuplexStream>> + Send + 'static {
        let policy = self.policy;
        let path = Arc::new(self.path);
        drain.incoming(what, self.listener, move |stream: UnixStream, _| {
            let path = path.clone();
            async move {
                match stream.peer_cred() {
                    Ok(cred) if policy.allows(cred.uid(), cred.gid()) => Some(any_authority(stream)),
                    Ok(cred) => {
                        warn!(
                            socket = %path.display(),
                            peer.uid = cred.uid(),
                            peer.gid = cred.gid(),
                            peer.pid = cred.pid(),
                            "{}",
                            refusal(what, cred.uid(), cred.gid(), &policy)
                        );
                        None
                    }
                    Err(e) => {
                        warn!(socket = %path.display(), error = %e, "{what}: no peer credentials; refused");
                        None
                    }
                }
            }
        })
    }
}

/// The log line for a refused peer: who it was, who may connect, and the
/// way to let another uid in (Istio's proxy runs as uid 1337).
pub fn refusal(what: &str, uid: u32, gid: u32, policy: &PeerPolicy) -> String {
    let allowed = match policy.group {
        Some(g) => format!("uid {} or gid {g}", policy.owner_uid),
        None => format!("uid {} only", policy.owner_uid),
    };
    format!(
        "{what}: refused a connection from uid {uid} gid {gid} (allowed: {allowed}); \
         to let a proxy running as another user connect (Istio's runs as uid 1337), \
         start the agent with --socket-group <a gid that proxy runs with>"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[test]
    fn only_the_owner_or_the_group_may_connect() {
        let p = PeerPolicy {
            owner_uid: 1337,
            group: None,
        };
        assert!(p.allows(1337, 1));
        assert!(!p.allows(0, 0));
        assert!(!p.allows(1000, 1337));
        let g = PeerPolicy {
            owner_uid: 1337,
            group: Some(2000),
        };
        assert!(g.allows(1000, 2000));
        assert!(!g.allows(1000, 1000));
    }

    #[test]
    fn a_refusal_names_the_uid_and_points_at_socket_group() {
        let p = PeerPolicy {
            owner_uid: 0,
            group: None,
        };
        let line = refusal("SDS", 1337, 1337, &p);
        assert!(line.contains("uid 1337 gid 1337"), "{line}");
        assert!(line.contains("uid 0 only"), "{line}");
        assert!(line.contains("--socket-group"), "{line}");
    }

    #[tokio::test]
    async fn the_socket_is_private_and_a_stale_one_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/dir/socket");
        let l = UdsListener::bind(&path, None).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        drop(l);
        // The file is still there (a crashed agent): binding again works.
        assert!(path.exists());
        let l = UdsListener::bind(&path, None).unwrap();
        let drain = Drain::new();
        let mut incoming = Box::pin(l.incoming("test", &drain));
        let _client = UnixStream::connect(&path).await.unwrap();
        let accepted = incoming.next().await.unwrap();
        assert!(accepted.is_ok(), "our own process is allowed");

        // With a group: 0660 and owned by that group.
        let grouped = dir.path().join("grouped.sock");
        let l = UdsListener::bind(&grouped, Some(65534)).unwrap();
        let meta = std::fs::metadata(&grouped).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o660);
        assert_eq!(meta.gid(), 65534);
        assert_eq!(l.policy().group, Some(65534));

        let file = dir.path().join("plain");
        std::fs::write(&file, "x").unwrap();
        let err = UdsListener::bind(&file, None).unwrap_err().to_string();
        assert!(err.contains("not a socket"), "{err}");
    }
}
