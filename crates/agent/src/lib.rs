//! meshid-agent is the per-pod identity agent, the part of Istio's
//! pilot-agent that gives a workload its certificate. It reads the pod's
//! projected service-account token, makes a key and a CSR in memory, has the
//! Istio CA sign it, checks the answer and keeps the certificate fresh: one
//! worker of the shared renewal engine, `meshid_common::identity`. It hands the certificate and
//! trust bundle to Envoy over SDS ([`sds`]) and to any SPIFFE client over
//! the Workload API ([`workload`], JWT-SVIDs in [`jwt`]), both on Unix sockets that only the pod's
//! own user may use ([`uds`]), and reports readiness, certificates and
//! metrics on a local admin port ([`admin`], [`metrics`]). Keys never touch
//! the disk unless `--output-certs` asks for it ([`output`]). [`app::App`]
//! wires it together for `main` and for tests.

pub mod admin;
pub mod app;
pub mod authority;
pub mod config;
pub mod error;
pub mod jwt;
pub mod metrics;
pub mod output;
pub mod sds;
pub mod sds_files;
pub mod uds;
pub mod workload;

pub use app::{App, Parts};
pub use config::Config;
pub use error::{Error, Result};
pub use meshid_common::identity::{
    CertificateSource, Clock, JwtSource, SignRequest, Status, Worker,
};
