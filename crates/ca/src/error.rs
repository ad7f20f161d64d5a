//! The one error type of meshid-ca, and its mapping to gRPC status codes
//! (DESIGN §2.1): the only place that decides which code a failure gets.
//!
//! No variant carries a token or key material; messages name the identity,
//! file or field that was wrong. Those messages are for the CA's log: a
//! refused caller is told only a category ([`Error::category`]) and a
//! request id ([`Error::to_status`]), as istiod answers "request
//! authenticate failure" and keeps the reason in its log. Pod names and
//! UIDs, nodes and who runs where never leave the CA in an answer.

use std::path::PathBuf;

use crate::authn::AuthError;

/// Everything that can go wrong in the CA, at start or for one request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // ---- per request -------------------------------------------------------
    #[error("authentication failed: {}", join(.reasons))]
    Authentication { reasons: Vec<AuthError> },

    #[error("impersonation of {target:?} by {caller} refused: {reason}")]
    Impersonation {
        caller: String,
        target: String,
        reason: String,
        kind: ImpersonationRefusal,
    },

    #[error("invalid CSR: {0}")]
    Csr(#[source] meshid_common::Error),

    #[error("the CSR asks for {requested} but the caller may only get {allowed}")]
    CsrIdentity { requested: String, allowed: String },

    #[error("the CSR has {count} URI SANs; at most one (the caller's SPIFFE ID) is allowed")]
    CsrUriSans { count: usize },

    #[error(
        "the CSR asks for {requested} in trust domain {requested_td:?}; this CA serves {trust_domain:?}"
    )]
    CsrTrustDomain {
        requested: String,
        requested_td: String,
        trust_domain: String,
    },

    #[error("the CSR's URI SAN {uri:?} is not a SPIFFE ID: {reason}")]
    CsrUri { uri: String, reason: String },

    #[error(
        "validity_duration {requested_secs}s is above the maximum {max_secs}s (MAX_WORKLOAD_CERT_TTL)"
    )]
    TtlTooLong { requested_secs: i64, max_secs: u64 },

    #[error(
        "the signing certificate {serial} expired at {not_after} (unix seconds); the CA cannot issue"
    )]
    SignerExpired { serial: String, not_after: i64 },

    #[error("signing failed: {0}")]
    Signing(#[source] meshid_common::Error),

    #[error("Vault at {addr} is unavailable: {reason}")]
    VaultUnavailable { addr: String, reason: String },

    #[error("Vault at {addr} refused {path} (HTTP {status}): {errors}")]
    VaultRefused {
        addr: String,
        path: String,
        status: u16,
        errors: String,
    },

    #[error(
        "Vault role {role:?} issued a certificate for {id} outside the X.509-SVID profile: {reason}; not handed out"
    )]
    OffProfile {
        id: String,
        role: String,
        reason: String,
    },

    #[error("invalid JWT-SVID request: {0}")]
    JwtRequest(String),

    #[error("JWT-SVID signing failed: {0}")]
    JwtSigning(String),

    // ---- configuration and start-up ---------------------------------------
    #[error("configuration: {0}")]
    Config(String),

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "CA directory {dir} holds only part of a plugged-in CA: missing {missing:?} (all of ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem are needed)"
    )]
    PartialCaDir { dir: PathBuf, missing: Vec<String> },

    #[error(
        "private key {path} is readable by group or others (mode {mode:o}); run chmod 600 on it"
    )]
    KeyPermissions { path: PathBuf, mode: u32 },

    #[error("CA material {path}: {source}")]
    CaMaterial {
        path: PathBuf,
        #[source]
        source: meshid_common::Error,
    },

    #[error("CA material in {dir}: {reason}")]
    CaChain { dir: PathBuf, reason: String },

    #[error(
        "new root bundle in {dir} is neither a superset nor a subset of the one in use; refused"
    )]
    RootRotationRefused { dir: PathBuf },

    #[error("JWKS {source_name}: {reason}")]
    Jwks { source_name: String, reason: String },

    #[error("workload registry: {0}")]
    Registry(#[source] meshid_common::Error),

    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },

    #[error("TLS: {0}")]
    Tls(String),

    #[error("token issuer: {0}")]
    Token(String),

    #[error("Kubernetes API: {0}")]
    Kube(String),

    #[error("Kubernetes API unavailable: {0}")]
    KubeUnavailable(String),

    #[error("Secret {secret}: {reason}")]
    CaSecret { secret: String, reason: String },

    #[error("{0}")]
    Common(#[from] meshid_common::Error),
}

/// Why an impersonation was refused, as the answer names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImpersonationRefusal {
    /// The caller is not a trusted node account.
    NotANodeAccount,
    /// The target is no SPIFFE ID of a service account in this trust domain.
    InvalidTarget,
    /// The target may not be impersonated by this caller (not on its node,
    /// its node unknown, or the registry could not tell).
    NotAllowed,
}

impl ImpersonationRefusal {
    pub fn as_str(self) -> &'static str {
        match self {
            ImpersonationRefusal::NotANodeAccount => "not allowed to impersonate",
            ImpersonationRefusal::InvalidTarget => "impersonated identity invalid",
            ImpersonationRefusal::NotAllowed => "identity not allowed",
        }
    }
}

/// The metadata key a refusal's request id travels in, both ways: a caller
/// may send its own (Envoy and most gateways set one), the answer carries it.
pub const REQUEST_ID_KEY: &str = "x-request-id";

/// The longest caller-supplied request id that is kept.
const MAX_REQUEST_ID_LEN: usize = 128;

/// The request id of a call: the caller's `x-request-id` when it is sane
/// (1 to 128 characters of `[A-Za-z0-9._:-]`), else a new random one.
pub fn request_id(metadata: &tonic::metadata::MetadataMap) -> String {
    let supplied = metadata
        .get(REQUEST_ID_KEY)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= MAX_REQUEST_ID_LEN
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
        });
    match supplied {
        Some(id) => id.to_owned(),
        None => new_request_id(),
    }
}

/// 128 random bits, hex.
fn new_request_id() -> String {
    let mut bytes = [0u8; 16];
    if aws_lc_rs::rand::fill(&mut bytes).is_err() {
        // Uniqueness, not secrecy, is what matters here.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        bytes = nanos.to_be_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn join(reasons: &[AuthError]) -> String {
    if reasons.is_empty() {
        return "no authenticator is configured".into();
    }
    reasons
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl Error {
    /// The gRPC code istiod would answer with.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            // Only when no authenticator accepted and one could not ask the API.
            Error::Authentication { reasons }
                if reasons
                    .iter()
                    .any(|r| matches!(r, AuthError::Unavailable(_))) =>
            {
                Code::Unavailable
            }
            Error::Authentication { .. } | Error::Impersonation { .. } => Code::Unauthenticated,
            Error::Csr(_)
            | Error::CsrIdentity { .. }
            | Error::CsrUriSans { .. }
            | Error::CsrTrustDomain { .. }
            | Error::CsrUri { .. }
            | Error::TtlTooLong { .. }
            | Error::JwtRequest(_) => Code::InvalidArgument,
            // Clients retry UNAVAILABLE with backoff, as for an istiod that is down.
            Error::VaultUnavailable { .. } => Code::Unavailable,
            Error::KubeUnavailable(_) => Code::Unavailable,
            _ => Code::Internal,
        }
    }

    /// istiod's `citadel_server_csr_sign_err_count{error}` value (its CA
    /// error types `CA_NOT_READY`, `CSR_ERROR`, `TTL_ERROR`,
    /// `CERT_GEN_ERROR`); `None` for refusals istiod counts elsewhere
    /// (authentication, impersonation: `citadel_server_authentication_failure_count`).
    pub fn sign_error_type(&self) -> Option<&'static str> {
        match self {
            Error::Authentication { .. } | Error::Impersonation { .. } => None,
            Error::Csr(_)
            | Error::CsrIdentity { .. }
            | Error::CsrUriSans { .. }
            | Error::CsrTrustDomain { .. }
            | Error::CsrUri { .. } => Some("CSR_ERROR"),
            Error::TtlTooLong { .. } => Some("TTL_ERROR"),
            Error::Signing(_) | Error::JwtSigning(_) | Error::VaultRefused { .. } => {
                Some("CERT_GEN_ERROR")
            }
            // meshid's own value: an external signer (Vault) answered with a
            // certificate outside the SVID profile, which was not handed out.
            Error::OffProfile { .. } => Some("OFF_PROFILE_CERT"),
            // A bad JWT-SVID request is no CSR: counted in meshid_ca_jwt_svids_total.
            Error::JwtRequest(_) => None,
            _ => Some("CA_NOT_READY"),
        }
    }

    /// What a refused caller is told: a category, never a name, UID or
    /// node from the registry, nor anything the caller did not send.
    pub fn category(&self) -> String {
        match self {
            Error::Authentication { reasons } => {
                let mut categories: Vec<&str> = Vec::new();
                for c in reasons.iter().map(AuthError::category) {
                    if !categories.contains(&c) {
                        categories.push(c);
                    }
                }
                if categories.is_empty() {
                    categories.push(AuthError::NoCredential.category());
                }
                format!("request authenticate failure: {}", categories.join("; "))
            }
            Error::Impersonation { kind, .. } => format!(
                "request impersonation authentication failure: {}",
                kind.as_str()
            ),
            Error::Csr(_) => "CSR invalid".into(),
            Error::CsrUriSans { .. } | Error::CsrUri { .. } => "CSR SAN invalid".into(),
            Error::CsrIdentity { .. } => "CSR identity not allowed".into(),
            Error::CsrTrustDomain { .. } => "CSR trust domain not served".into(),
            Error::TtlTooLong { .. } => "requested TTL above the maximum".into(),
            Error::JwtRequest(_) => "JWT-SVID request invalid".into(),
            Error::Signing(_) | Error::JwtSigning(_) => "signing failed".into(),
            Error::SignerExpired { .. } => "CA not ready".into(),
            // An external signer's trouble is named (the caller learns it
            // must retry, or that the CA's PKI is misconfigured), its detail
            // is logged.
            Error::VaultUnavailable { .. } => "signer unavailable: Vault did not answer".into(),
            Error::VaultRefused { .. } => "signing failed: Vault refused the request".into(),
            Error::OffProfile { .. } => {
                "signing failed: Vault issued a certificate outside the X.509-SVID profile".into()
            }
            _ => "internal error".into(),
        }
    }

    /// The status returned to the caller: the code, the category and the
    /// request id (also in the `x-request-id` metadata) under which the CA
    /// logged the detail.
    pub fn to_status(&self, request_id: &str) -> tonic::Status {
        let mut metadata = tonic::metadata::MetadataMap::new();
        if let Ok(value) = request_id.parse() {
            metadata.insert(REQUEST_ID_KEY, value);
        }
        tonic::Status::with_metadata(
            self.code(),
            format!("{} (request id {request_id})", self.category()),
            metadata,
        )
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
