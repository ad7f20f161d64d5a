//! The one error type of meshid-common. Each variant says what went wrong and
//! to which identity, certificate or file; none ever carries key material.

/// Errors from identity parsing, key and certificate handling, TLS and telemetry.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid SPIFFE ID {id:?}: {reason}")]
    InvalidSpiffeId { id: String, reason: &'static str },

    #[error("invalid trust domain {name:?}: {reason}")]
    InvalidTrustDomain { name: String, reason: &'static str },

    #[error("unsupported key type {0:?} (expected ecdsa-p256, ecdsa-p384 or rsa-2048)")]
    UnknownKeyType(String),

    #[error("key generation failed for {key_type}: {reason}")]
    KeyGeneration {
        key_type: &'static str,
        reason: String,
    },

    #[error("private key rejected: {0}")]
    InvalidPrivateKey(String),

    #[error("signing failed: {0}")]
    Signing(String),

    #[error("no PEM block of type {expected} found")]
    NotPem { expected: &'static str },

    #[error("malformed PEM: {0}")]
    BadPem(String),

    #[error("malformed CSR: {0}")]
    BadCsr(String),

    #[error("CSR signature does not verify with the CSR's public key")]
    CsrSignature,

    #[error("malformed certificate: {0}")]
    BadCertificate(String),

    #[error("certificate building failed: {0}")]
    CertificateBuild(String),

    #[error("certificate chain is empty")]
    EmptyChain,

    #[error("trust bundle is empty")]
    EmptyBundle,

    #[error("certificate {serial} does not chain to the trust bundle: {reason}")]
    Untrusted { serial: String, reason: String },

    #[error("certificate {serial} has no SPIFFE ID (exactly one spiffe:// URI SAN is required)")]
    NoSpiffeId { serial: String },

    #[error("certificate {serial} has {count} URI SANs; an X.509-SVID has exactly one")]
    MultipleUriSans { serial: String, count: usize },

    #[error("peer {peer} is in trust domain {peer_td:?}, expected {expected_td:?}")]
    ForeignTrustDomain {
        peer: String,
        peer_td: String,
        expected_td: String,
    },

    #[error("peer identity {peer} is not the expected {expected}")]
    UnexpectedPeer { peer: String, expected: String },

    #[error("peer identity {peer} is not allowed by the policy")]
    PeerNotAllowed { peer: String },

    #[error("no credentials available yet")]
    NoCredentials,

    #[error("TLS configuration: {0}")]
    Tls(String),

    #[error("telemetry: {0}")]
    Telemetry(String),

    #[error("workload registry {path}: {reason}")]
    Registry { path: String, reason: String },

    #[error("CA at {address}: {reason}")]
    CaConnect { address: String, reason: String },

    #[error("CA answered {code:?}: {message}")]
    Ca { code: tonic::Code, message: String },

    #[error("CA response rejected: {0}")]
    CaResponse(String),

    #[error("cannot read the service-account token {path}: {source}")]
    TokenUnreadable {
        path: std::path::PathBuf,
        source: std::io::Error,
    },

    #[error("the service-account token file {path} is empty")]
    TokenEmpty { path: std::path::PathBuf },

    #[error("no certificate for {id}: {reason}")]
    CertificateUnavailable { id: String, reason: String },

    #[error("no certificate for {id} after waiting {after:?}")]
    CertificateWait {
        id: String,
        after: std::time::Duration,
    },

    #[error("SDS secret {name:?} rejected: {reason}")]
    BadSecret { name: String, reason: String },

    /// The Kubernetes API refused or failed a call (`code` is the HTTP
    /// status of an API answer, 0 when there was none: no connection, a
    /// broken stream).
    #[error("{what}: {reason}")]
    KubeApi {
        what: String,
        code: u16,
        reason: String,
    },
}

impl Error {
    /// A CA's gRPC answer, keeping its code for
    /// [`classify`](crate::identity::classify).
    pub fn from_ca_status(status: &tonic::Status) -> Self {
        Error::Ca {
            code: status.code(),
            message: status.message().to_owned(),
        }
    }
}

/// Shorthand used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
