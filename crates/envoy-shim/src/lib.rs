//! meshid-envoy-shim stands in for Envoy in a pod: a small TCP proxy that
//! gets its workload certificate and trust bundle only over SDS (exactly as
//! Envoy asks for them), terminates inbound mTLS on :15006 in Istio's
//! PeerAuthentication modes (STRICT, PERMISSIVE with TLS sniffing on one
//! port, DISABLE) with an optional allow-list of peer identities, and dials
//! outbound destinations with mTLS while checking each server's SPIFFE ID
//! (secure naming). Certificates rotate under open connections; policy
//! changes apply to new connections. It logs one access event per
//! connection and serves `/ready`, `/debug/certs` and `/metrics` on a
//! loopback admin port. [`App::build`] runs the whole proxy in-process;
//! the binary only parses flags and waits for a signal.

pub mod admin;
pub mod app;
pub mod config;
pub mod conn;
pub mod error;
pub mod inbound;
pub mod metrics;
pub mod outbound;
pub mod policy;
pub mod sds;

pub use app::App;
pub use config::{Cli, Config, OutboundRoute};
pub use conn::{AccessEvent, ConnResult, Direction};
pub use error::{Error, Result};
pub use policy::{AllowList, Mode, Policy, PolicyStore};
