//! The one error type of meshid-envoy-shim. Each variant says what went wrong
//! and to which secret, file or address; none ever carries key material.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Errors from configuration, policy files, SDS and listener setup.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {0}")]
    Config(String),

    #[error("cannot bind the {what} listener on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },

    #[error("invalid policy: {0}")]
    Policy(String),

    #[error("policy file {path}: {reason}")]
    PolicyFile { path: PathBuf, reason: String },

    #[error("SDS secret {name:?} rejected: {reason}")]
    BadSecret { name: String, reason: String },

    #[error("SDS server {path}: {reason}")]
    Sds { path: PathBuf, reason: String },

    #[error(transparent)]
    Identity(#[from] meshid_common::Error),
}

/// Shorthand used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
