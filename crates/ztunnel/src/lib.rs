//! meshid-ztunnel is ambient mode's node proxy: one process per node that
//! gives every workload on its node a mesh identity without a sidecar. It
//! follows the workload registry (a file, or with feature `kube` the pods of
//! its node in the Kubernetes API) to learn which workloads run on its node
//! ([`directory`]), asks the CA for each of their certificates on their
//! behalf with its own node-bound token and `ImpersonatedIdentity`, keeps
//! those certificates fresh ([`certs`], one worker of the shared renewal
//! engine `meshid_common::identity` per identity), and carries the
//! workloads' TCP connections between nodes as HBONE: HTTP/2 `CONNECT`
//! streams inside mTLS where each side presents the *workload's* certificate
//! ([`outbound`], [`pool`], [`inbound`], [`tls`]). Connections reach it
//! through per-workload listeners (process mode) or iptables redirection
//! ([`capture`]). Inbound traffic is checked against the workload's policy
//! ([`policy`]); an admin listener serves readiness, `/debug/certs` and
//! `/metrics` ([`admin`], [`metrics`], [`connlog`]). [`App`] runs the whole
//! thing in-process; `main.rs` only parses the config and waits for a signal.

pub mod admin;
pub mod app;
pub mod capture;
pub mod certs;
pub mod config;
pub mod connlog;
pub mod directory;
pub mod error;
pub mod h2io;
pub mod inbound;
#[cfg(feature = "kube")]
pub mod kube_registry;
pub mod metrics;
pub mod outbound;
pub mod policy;
pub mod pool;
pub mod tls;

pub use app::App;
pub use config::Config;
pub use error::{Error, Result};
