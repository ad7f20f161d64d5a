//! meshid-tests is the end-to-end harness. It brings up a mesh (CA, sidecar
//! pods of agent + proxy + app, ztunnel nodes with ambient workloads) on a
//! backend ([`backend::process`], [`backend::docker`]) from a
//! [`spec::MeshSpec`], runs the suites against it through the
//! [`topology::Topology`] trait only, collects every component's spans with
//! an in-process OTLP receiver ([`otlp`]), and reports results as a table,
//! JUnit XML and JSON ([`report`]) with the issuance trace drawn as a
//! waterfall ([`waterfall`]).
//! `cargo xtask e2e` runs its `meshid-e2e` binary.

pub mod backend;
pub mod client;
pub mod cluster;
pub mod echo;
pub mod http;
pub mod otlp;
pub mod ports;
pub mod report;
pub mod runner;
pub mod secrets;
pub mod spec;
pub mod suites;
pub mod topology;
pub mod waterfall;

use std::path::{Path, PathBuf};

/// Everything the harness can fail at, each saying which component or file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{name}: {message}")]
    Component { name: String, message: String },
    #[error("{url}: {message}")]
    Http { url: String, message: String },
    #[error("{0}")]
    Setup(String),
    /// A step this backend cannot do; the case that needs it is reported as
    /// skipped with this reason, never as passed or failed. Its text starts
    /// with [`UNSUPPORTED`], which survives the suites' `to_string()`.
    #[error("{UNSUPPORTED}{step} {component} on the {backend} backend: {reason}")]
    Unsupported {
        backend: &'static str,
        step: String,
        component: String,
        reason: String,
    },
    /// A Docker operation (image build, network, container) failed; `action`
    /// names it and the image, network or container it was about.
    #[error("docker: {action}: {message}")]
    Docker { action: String, message: String },
}

/// How an [`Error::Unsupported`] reads, in every message that carries it:
/// [`suites::record`] reports a case whose error holds it as skipped.
pub const UNSUPPORTED: &str = "unsupported: ";

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_owned(),
            source,
        }
    }
}
