//! The one error type of meshid-agent, and its mapping to gRPC status codes.
//! Every variant says what happened and to which identity, file or resource;
//! none carries a token or key material.

use std::path::PathBuf;

use meshid_common::SpiffeId;

/// Everything that can go wrong in the agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {0}")]
    Config(String),

    #[error("cannot read the service-account token {path}: {source}")]
    TokenUnreadable {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("the service-account token file {path} is empty")]
    TokenEmpty { path: PathBuf },

    /// The CA refused the caller or the request (`UNAUTHENTICATED`,
    /// `INVALID_ARGUMENT`, `PERMISSION_DENIED`): retrying soon will not help.
    #[error("the CA refused the certificate request for {id} ({code:?}): {message}")]
    CaRefused {
        id: SpiffeId,
        code: tonic::Code,
        message: String,
    },

    /// The CA could not be reached or failed on its side: worth retrying.
    #[error("the CA did not issue a certificate for {id}: {message}")]
    CaUnavailable { id: SpiffeId, message: String },

    /// The CA answered, but not with a usable chain for our identity and key.
    #[error("refused the CA's answer for {id}: {reason}")]
    BadAnswer { id: SpiffeId, reason: String },

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
    /// The CA said no to who we are or to what we asked: back off to the cap
    /// and report not ready rather than retrying in a tight loop.
    pub fn is_refusal(&self) -> bool {
        matches!(self, Error::CaRefused { .. })
    }

    /// Builds the refusal or the retryable error for a CA status.
    pub fn from_ca_status(id: &SpiffeId, status: &tonic::Status) -> Self {
        match status.code() {
            tonic::Code::Unauthenticated
            | tonic::Code::InvalidArgument
            | tonic::Code::PermissionDenied => Error::CaRefused {
                id: id.clone(),
                code: status.code(),
                message: status.message().to_owned(),
            },
            code => Error::CaUnavailable {
                id: id.clone(),
                message: format!("{code:?}: {}", status.message()),
            },
        }
    }

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
