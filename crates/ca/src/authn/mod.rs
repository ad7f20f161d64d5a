//! Authentication: who is calling. Authenticators are tried in order and the
//! first that accepts wins: the TLS client certificate (a workload renewing
//! with its current SVID), then the bearer JWT against the issuer's JWKS,
//! then (feature `kube`) a Kubernetes TokenReview. If none accepts, every
//! reason is logged and the caller is told each reason's category only
//! ([`AuthError::category`]). Tokens never appear in a reason.

pub mod client_cert;
pub mod jwt;
#[cfg(feature = "kube")]
pub mod token_review;

use std::sync::Arc;

use futures::future::BoxFuture;
use meshid_common::SpiffeId;
use rustls_pki_types::CertificateDer;
use tonic::metadata::MetadataMap;

use crate::error::Error;

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// `spiffe://<td>/ns/<ns>/sa/<sa>`.
    pub id: SpiffeId,
    pub namespace: String,
    pub service_account: String,
    /// The node the caller's pod runs on, when the credential says (tokens).
    pub node: Option<String>,
    /// The caller's pod, when the credential says (tokens).
    pub pod: Option<String>,
    /// Which authenticator accepted it.
    pub method: &'static str,
}

/// Why one authenticator refused a credential.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(
        "no credential: the request has no `authorization: Bearer <token>` header and no client certificate"
    )]
    NoCredential,
    #[error("malformed authorization header: {0}")]
    MalformedAuthorization(&'static str),
    #[error("client certificate: {0}")]
    ClientCert(String),
    #[error("JWT: {1}")]
    Jwt(TokenRefusal, String),
    #[error("TokenReview: {0}")]
    TokenReview(String),
    /// The credential could not be checked now (the API server is down):
    /// the call fails `UNAVAILABLE` unless another authenticator accepts.
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("unknown clusterid {got:?}: this CA serves cluster {expected:?}")]
    UnknownCluster { got: String, expected: String },
}

impl AuthError {
    /// What the caller is told: the kind of problem, not the registry facts
    /// behind it (the detail is logged under the request id).
    pub fn category(&self) -> &'static str {
        match self {
            AuthError::NoCredential => "no credential",
            AuthError::MalformedAuthorization(_) => "malformed authorization header",
            AuthError::ClientCert(_) => "client certificate not accepted",
            AuthError::Jwt(kind, _) => kind.as_str(),
            AuthError::TokenReview(_) => "token not accepted",
            AuthError::Unavailable(_) => {
                "token could not be checked now: the cluster API is unavailable"
            }
            AuthError::UnknownCluster { .. } => "cluster id not accepted",
        }
    }
}

/// Why a bearer token was refused, as the answer names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenRefusal {
    /// Not a JWT, or its parts do not decode.
    Malformed,
    /// `none`, HMAC or another algorithm than RS256 / ES256.
    Algorithm,
    /// No key of the JWKS has that id or algorithm.
    SigningKey,
    Signature,
    Expired,
    NotYetValid,
    Audience,
    Issuer,
    /// The subject or `kubernetes.io` claims are not a service account's.
    Claims,
    NotBoundToPod,
    /// The pod, service account or node it is bound to is gone or differs
    /// (kube-apiserver: "the token has been invalidated").
    Invalidated,
    /// The registry could not be asked.
    Unverifiable,
}

impl TokenRefusal {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenRefusal::Malformed => "token malformed",
            TokenRefusal::Algorithm => "token algorithm not accepted",
            TokenRefusal::SigningKey => "token signing key unknown",
            TokenRefusal::Signature => "token signature invalid",
            TokenRefusal::Expired => "token expired",
            TokenRefusal::NotYetValid => "token not yet valid",
            TokenRefusal::Audience => "token audience not accepted",
            TokenRefusal::Issuer => "token issuer not accepted",
            TokenRefusal::Claims => "token claims not accepted",
            TokenRefusal::NotBoundToPod => "token not bound to a pod",
            TokenRefusal::Invalidated => "token invalidated",
            TokenRefusal::Unverifiable => "token could not be checked",
        }
    }
}

/// What an authenticator sees of a request.
#[derive(Clone, Copy, Debug)]
pub struct AuthContext<'a> {
    /// The token of a well-formed `authorization: Bearer` header.
    pub bearer: Option<&'a str>,
    /// The TLS client certificate chain, leaf first.
    pub peer_certs: Option<&'a [CertificateDer<'static>]>,
}

/// One way of proving an identity.
pub trait Authenticator: Send + Sync + std::fmt::Debug {
    fn name(&self) -> &'static str;

    /// Whether the caller's `clusterid` header selects what this
    /// authenticator checks against (istiod: only the Kubernetes JWT
    /// authenticator reads it; a client certificate never depends on it).
    fn reads_cluster_id(&self) -> bool {
        false
    }

    /// `None` when the request carries no credential of this kind.
    fn authenticate<'a>(
        &'a self,
        ctx: AuthContext<'a>,
    ) -> BoxFuture<'a, Option<Result<Caller, AuthError>>>;
}

/// The ordered list of authenticators.
#[derive(Debug, Clone, Default)]
pub struct Authn {
    chain: Vec<Arc<dyn Authenticator>>,
    /// The cluster ids a token may name in `clusterid`: this cluster's and
    /// its aliases (empty: not checked).
    clusters: Vec<String>,
}

impl Authn {
    pub fn new(chain: Vec<Arc<dyn Authenticator>>) -> Self {
        Authn {
            chain,
            clusters: Vec::new(),
        }
    }

    /// This cluster's id first, then its aliases: a token-based caller whose
    /// non-empty `clusterid` is none of them is refused by that authenticator.
    pub fn with_clusters(mut self, clusters: Vec<String>) -> Self {
        self.clusters = clusters;
        self
    }

    /// Why a token authenticator must not accept this `clusterid`.
    fn cluster_refusal(&self, metadata: &MetadataMap) -> Option<AuthError> {
        let value = metadata.get("clusterid")?;
        let got = value.to_str().unwrap_or("<non-ASCII>");
        if got.is_empty() || self.clusters.is_empty() || self.clusters.iter().any(|c| c == got) {
            return None;
        }
        Some(AuthError::UnknownCluster {
            got: got.chars().take(128).collect(),
            expected: self.clusters[0].clone(),
        })
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.chain.iter().map(|a| a.name()).collect()
    }

    /// Tries each authenticator in turn.
    pub async fn authenticate(
        &self,
        metadata: &MetadataMap,
        peer_certs: Option<&[CertificateDer<'static>]>,
    ) -> Result<Caller, Error> {
        let mut reasons = Vec::new();
        let bearer = match bearer_token(metadata) {
            Ok(token) => token,
            Err(e) => {
                reasons.push(e);
                None
            }
        };
        let ctx = AuthContext {
            bearer,
            peer_certs: peer_certs.filter(|c| !c.is_empty()),
        };
        let cluster_refusal = self.cluster_refusal(metadata);
        for authenticator in &self.chain {
            if authenticator.reads_cluster_id()
                && ctx.bearer.is_some()
                && let Some(e) = &cluster_refusal
            {
                reasons.push(e.clone());
                continue;
            }
            match authenticator.authenticate(ctx).await {
                Some(Ok(caller)) => return Ok(caller),
                Some(Err(e)) => reasons.push(e),
                None => {}
            }
        }
        if reasons.is_empty() {
            reasons.push(AuthError::NoCredential);
        }
        Err(Error::Authentication { reasons })
    }
}

/// The token of `authorization: Bearer <token>`; `Ok(None)` without the header.
pub fn bearer_token(metadata: &MetadataMap) -> Result<Option<&str>, AuthError> {
    let Some(value) = metadata.get("authorization") else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| AuthError::MalformedAuthorization("the value is not ASCII"))?;
    let Some((scheme, token)) = value.split_once(' ') else {
        return Err(AuthError::MalformedAuthorization(
            "expected `Bearer <token>`",
        ));
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::MalformedAuthorization(
            "the scheme is not Bearer",
        ));
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(AuthError::MalformedAuthorization("the token is empty"));
    }
    Ok(Some(token))
}

/// Splits `system:serviceaccount:<ns>:<sa>`.
pub fn parse_service_account_subject(sub: &str) -> Option<(&str, &str)> {
    let rest = sub.strip_prefix("system:serviceaccount:")?;
    let (ns, sa) = rest.split_once(':')?;
    (!ns.is_empty() && !sa.is_empty() && !sa.contains(':')).then_some((ns, sa))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(value: &str) -> MetadataMap {
        let mut md = MetadataMap::new();
        md.insert("authorization", value.parse().unwrap());
        md
    }

    #[test]
    fn bearer_header_forms() {
        assert_eq!(bearer_token(&MetadataMap::new()), Ok(None));
        assert_eq!(bearer_token(&md("Bearer abc")), Ok(Some("abc")));
        assert_eq!(bearer_token(&md("bearer abc")), Ok(Some("abc")));
        assert!(bearer_token(&md("Basic abc")).is_err());
        assert!(bearer_token(&md("abc")).is_err());
        assert!(bearer_token(&md("Bearer  ")).is_err());
    }

    #[test]
    fn subjects() {
        assert_eq!(
            parse_service_account_subject("system:serviceaccount:default:web"),
            Some(("default", "web"))
        );
        assert_eq!(parse_service_account_subject("system:node:n1"), None);
        assert_eq!(
            parse_service_account_subject("system:serviceaccount:default:"),
            None
        );
        assert_eq!(
            parse_service_account_subject("system:serviceaccount:a:b:c"),
            None
        );
    }

    #[tokio::test]
    async fn no_credential_at_all_says_so() {
        let err = Authn::default()
            .authenticate(&MetadataMap::new(), None)
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert!(err.to_string().contains("no `authorization"), "{err}");
    }
}
