//! meshid-ca is the Citadel part of istiod: an Istio-compatible certificate
//! authority. It serves `istio.v1.auth.IstioCertificateService/CreateCertificate`
//! over TLS (DESIGN §2.1) so that an unmodified pilot-agent or ztunnel — or
//! meshid's own agent — gets X.509-SVIDs from it: it authenticates the caller
//! ([`authn`]: client certificate, service-account JWT against a JWKS, or a
//! Kubernetes TokenReview), decides which identity the caller may get
//! ([`authz`]: its own, or a workload of its node for trusted node agents),
//! and signs with a plugged-in or self-signed CA that rotates without a
//! restart ([`signer`]), or hands signing to Vault / OpenBao PKI as a
//! registration authority ([`vault`]) behind one seam ([`sign`]). In a
//! cluster (feature `kube`, `--kube`) it keeps its root in a Secret and
//! publishes it to every namespace ([`cluster`]). [`app::App`] runs it; `token::TokenIssuer` (cargo
//! feature `testing`) plays the Kubernetes token issuer for tests and the
//! harness.

pub mod app;
pub mod authn;
pub mod authz;
#[cfg(feature = "kube")]
pub mod cluster;
pub mod config;
pub mod directory;
pub mod error;
pub mod jwt_svid;
pub mod metrics;
pub mod monitoring;
pub mod server;
pub mod sign;
pub mod signer;
pub mod tls;
/// Minting service-account tokens is for tests and the e2e harness only.
#[cfg(any(test, feature = "testing"))]
pub mod token;
pub mod vault;

pub use app::App;
pub use config::Config;
pub use error::{Error, Result};
#[cfg(any(test, feature = "testing"))]
pub use token::{TokenAlgorithm, TokenClaims, TokenIssuer};
