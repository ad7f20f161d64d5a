//! The one error type of meshid-agent, and its mapping to gRPC status codes.
//! Every variant says what happened and to which identity, file or resource;
//! none carries a token or key material.

use std::path::PathBuf;

/// Everything that can go wrong in the agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {0}")]
    Config(String),

    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("cannot listen on {what} {addr}: {source}")]
    Listen {
        what: &'static str,
        addr: String,
        source: std::io::Error,
    },

    #[error("the first SDS request must carry node.id")]
    NoNodeId,

    #[error("unknown SDS resource {name:?}: this agent serves \"default\" and \"ROOTCA\"")]
    UnknownResource { name: String },

    #[error("unexpected SDS type_url {0:?}")]
    WrongTypeUrl(String),

    #[error("the SPIFFE Workload API requires the metadata `workload.spiffe.io: true`")]
    MissingSecurityHeader,

    #[error("no workload certificate is available yet")]
    NotReady,

    #[error(transparent)]
    Common(#[from] meshid_common::Error),
}

/// Shorthand used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The gRPC status a server of ours answers with for this error.
    pub fn to_status(&self) -> tonic::Status {
        let msg = self.to_string();
        match self {
            Error::NoNodeId
            | Error::UnknownResource { .. }
            | Error::WrongTypeUrl(_)
            | Error::MissingSecurityHeader => tonic::Status::invalid_argument(msg),
            Error::NotReady => tonic::Status::unavailable(msg),
            _ => tonic::Status::internal(msg),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        e.to_status()
    }
}

impl From<meshid_common::config::SettingError> for Error {
    fn from(e: meshid_common::config::SettingError) -> Self {
        Error::Config(e.0)
    }
}
