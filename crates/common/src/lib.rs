//! meshid-common is the identity crate every meshid component shares. It
//! knows what a workload identity is and how to prove one: SPIFFE IDs and
//! trust domains ([`spiffe`]), in-memory private keys and CSRs ([`keys`]),
//! the X.509-SVID certificate profile and CA signing ([`cert`]), multi-root
//! trust bundles and chain verification ([`bundle`]), rustls mTLS configs
//! that check peers by SPIFFE ID and pick up rotated credentials from a
//! watch channel ([`tls`]), the wire protos of the Istio CA, Envoy SDS and
//! the SPIFFE Workload API ([`proto`]), SDS secrets encoded and decoded
//! ([`sds`]), the Istio CA client that agents and ztunnels share
//! ([`ca_client`]) with the renewal engine they both run ([`identity`]), the
//! workload registry file that stands in for the Kubernetes API outside a
//! cluster ([`registry`]), logs/traces with W3C propagation ([`telemetry`]),
//! and how every component serves and stops: one accept loop, one drain,
//! one admin router ([`serve`]). Config files and what each process runs
//! live in the component crates. With the `kube` cargo feature, `kube` is the
//! one list/watch engine (a reflector) that the CA's and the ztunnel's
//! cluster modes run on. Test fixtures (`testing`, and the fake CA
//! `identity::fake`) exist only under the `testing` cargo feature, for other
//! crates' dev-dependencies.

pub mod bundle;
pub mod ca_client;
pub mod cert;
pub mod config;
pub mod error;
pub mod identity;
pub mod keys;
#[cfg(feature = "kube")]
pub mod kube;
pub mod metrics;
pub mod proto;
pub mod refresh;
pub mod registry;
pub mod sds;
pub mod serve;
pub mod signal;
pub mod spiffe;
pub mod telemetry;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tls;

pub use bundle::{TrustBundle, Usage};
pub use cert::{CaOptions, CertInfo, CertificateAuthority, LeafSpec};
pub use error::{Error, Result};
pub use keys::{KeyType, PrivateKey};
pub use spiffe::{SpiffeId, TrustDomain};
pub use tls::{ClientAuth, Credentials, CredentialsRx, PeerMatcher, Svid};
