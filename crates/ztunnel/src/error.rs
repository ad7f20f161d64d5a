//! The one error type of meshid-ztunnel. Every variant says what happened and
//! to which identity, address or file; none carries a token or key material.

use std::net::SocketAddr;
use std::path::PathBuf;

use meshid_common::SpiffeId;

/// Everything that can go wrong in the ztunnel.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {0}")]
    Config(String),

    #[error("cannot read {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("cannot listen on {what} {addr}: {source}")]
    Listen {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },

    #[error("this ztunnel does not host identity {0}")]
    NotHosted(SpiffeId),

    #[error("no certificate for {id} yet: {reason}")]
    CertUnavailable { id: SpiffeId, reason: String },

    #[error("no workload at {0} in the registry")]
    UnknownDestination(SocketAddr),

    #[error("workload {workload} has no usable identity: {reason}")]
    BadWorkload { workload: String, reason: String },

    #[error("workload {0} is STRICT: plaintext refused")]
    PlaintextRefused(String),

    #[error("plaintext from {0}: expected a PROXY v1 header naming the destination")]
    BadProxyHeader(SocketAddr),

    #[error("no local workload {0} on this node")]
    UnknownSource(String),

    #[error("cannot reach the ztunnel of node {node} at {addr}: {source}")]
    PeerConnect {
        node: String,
        addr: SocketAddr,
        source: std::io::Error,
    },

    #[error("TLS with {peer} at {addr}: {reason}")]
    Tls {
        peer: String,
        addr: SocketAddr,
        reason: String,
    },

    /// An HBONE connection dialled an address that names no workload of
    /// this node, and its SNI (if any) named no hosted identity either.
    #[error("HBONE connection from {peer} to {dialled}: {why}")]
    NoHostedDestination {
        peer: SocketAddr,
        dialled: String,
        why: String,
    },

    #[error("HTTP/2 with {addr}: {reason}")]
    Http { addr: SocketAddr, reason: String },

    #[error("the ztunnel at {addr} answered {status} to CONNECT {authority}")]
    ConnectRefused {
        addr: SocketAddr,
        authority: String,
        status: http::StatusCode,
    },

    #[error("timed out after {after:?} while {what}")]
    Timeout {
        what: String,
        after: std::time::Duration,
    },

    /// The Kubernetes API (feature `kube`) could not be used.
    #[error("Kubernetes API: {0}")]
    Kube(String),

    #[error(transparent)]
    Common(#[from] meshid_common::Error),
}

/// Every value of [`Error::handshake_failure_reason`].
pub const HANDSHAKE_FAILURE_REASONS: [&str; 5] = [
    "unknown_destination",
    "timeout",
    "tls",
    "no_certificate",
    "other",
];

impl Error {
    /// The `reason` label of `ztunnel_hbone_handshake_failures`.
    pub fn handshake_failure_reason(&self) -> &'static str {
        match self {
            Error::NoHostedDestination { .. } => "unknown_destination",
            Error::Timeout { .. } => "timeout",
            Error::Tls { .. } => "tls",
            Error::NotHosted(_) | Error::CertUnavailable { .. } => "no_certificate",
            _ => "other",
        }
    }
}

/// Shorthand used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<meshid_common::config::SettingError> for Error {
    fn from(e: meshid_common::config::SettingError) -> Self {
        Error::Config(e.0)
    }
}
