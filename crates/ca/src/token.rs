//! A service-account token issuer for tests and the harness (DESIGN §4): it
//! plays the Kubernetes API server's part outside a cluster. It holds an
//! ES256 or RS256 key in memory, publishes the JWKS, and mints
//! projected-service-account-style JWTs with every claim the CA checks.

use std::path::Path;
use std::time::{Duration, SystemTime};

use jsonwebtoken::jwk::{Jwk, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use meshid_common::{KeyType, PrivateKey};
use serde::Serialize;

use crate::config::{DEFAULT_TOKEN_AUDIENCE, DEFAULT_TOKEN_ISSUER};
use crate::error::{Error, Result};

/// The signing algorithm of an issuer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenAlgorithm {
    Es256,
    Rs256,
}

/// Mints tokens; the private key never leaves memory and is not in `Debug`.
pub struct TokenIssuer {
    alg: Algorithm,
    encoding: EncodingKey,
    key: PrivateKey,
    jwk: Jwk,
    kid: String,
    issuer: String,
}

impl std::fmt::Debug for TokenIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenIssuer")
            .field("alg", &self.alg)
            .field("kid", &self.kid)
            .field("issuer", &self.issuer)
            .field("key", &"[redacted]")
            .finish()
    }
}

/// The claims of one token. [`TokenClaims::for_pod`] fills them as the
/// Kubernetes API server would; tests then bend any of them.
#[derive(Clone, Debug)]
pub struct TokenClaims {
    /// `None`: the issuer's own.
    pub issuer: Option<String>,
    pub audiences: Vec<String>,
    pub subject: String,
    pub namespace: String,
    pub service_account: String,
    pub service_account_uid: String,
    /// Pod name and uid.
    pub pod: Option<(String, String)>,
    /// Node name and uid.
    pub node: Option<(String, String)>,
    pub issued_at: SystemTime,
    pub not_before: Option<SystemTime>,
    pub expires_at: SystemTime,
    /// Overrides the header's `kid` (`Some("")` leaves it out).
    pub kid: Option<String>,
}

impl TokenClaims {
    /// A token for pod `namespace/pod` (uid `pod_uid`) of service account
    /// `service_account` on node `node`, valid for an hour, audience `istio-ca`.
    pub fn for_pod(
        namespace: &str,
        service_account: &str,
        pod: &str,
        pod_uid: &str,
        node: &str,
        node_uid: &str,
    ) -> Self {
        let now = SystemTime::now();
        TokenClaims {
            issuer: None,
            audiences: vec![DEFAULT_TOKEN_AUDIENCE.to_owned()],
            subject: format!("system:serviceaccount:{namespace}:{service_account}"),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            service_account_uid: format!("sa-{namespace}-{service_account}"),
            pod: Some((pod.to_owned(), pod_uid.to_owned())),
            node: Some((node.to_owned(), node_uid.to_owned())),
            issued_at: now,
            not_before: Some(now),
            expires_at: now + Duration::from_secs(3600),
            kid: None,
        }
    }

    pub fn valid_for(mut self, ttl: Duration) -> Self {
        self.expires_at = self.issued_at + ttl;
        self
    }
}

#[derive(Serialize)]
struct NameUid<'a> {
    name: &'a str,
    uid: &'a str,
}

#[derive(Serialize)]
struct KubernetesClaims<'a> {
    namespace: &'a str,
    serviceaccount: NameUid<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pod: Option<NameUid<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<NameUid<'a>>,
}

#[derive(Serialize)]
struct WireClaims<'a> {
    iss: &'a str,
    aud: &'a [String],
    sub: &'a str,
    iat: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    nbf: Option<i64>,
    exp: i64,
    #[serde(rename = "kubernetes.io")]
    kubernetes: KubernetesClaims<'a>,
}

fn secs(t: SystemTime) -> i64 {
    meshid_common::cert::unix_secs(t)
}

impl TokenIssuer {
    /// A new issuer with a fresh key, the default issuer name and a random kid.
    pub fn generate(alg: TokenAlgorithm) -> Result<Self> {
        let (alg, key_type) = match alg {
            TokenAlgorithm::Es256 => (Algorithm::ES256, KeyType::EcdsaP256),
            TokenAlgorithm::Rs256 => (Algorithm::RS256, KeyType::Rsa2048),
        };
        let key = PrivateKey::generate(key_type)?;
        let pem = key.to_pkcs8_pem();
        let encoding = match alg {
            Algorithm::ES256 => EncodingKey::from_ec_pem(pem.as_bytes()),
            _ => EncodingKey::from_rsa_pem(pem.as_bytes()),
        }
        .map_err(|e| Error::Token(format!("signing key: {e}")))?;
        let mut kid_bytes = [0u8; 8];
        aws_lc_rs::rand::fill(&mut kid_bytes).map_err(|_| Error::Token("no randomness".into()))?;
        let kid: String = kid_bytes.iter().map(|b| format!("{b:02x}")).collect();
        let mut jwk = Jwk::from_encoding_key(&encoding, alg)
            .map_err(|e| Error::Token(format!("public JWK: {e}")))?;
        jwk.common.key_id = Some(kid.clone());
        jwk.common.public_key_use = Some(PublicKeyUse::Signature);
        Ok(TokenIssuer {
            alg,
            encoding,
            key,
            jwk,
            kid,
            issuer: DEFAULT_TOKEN_ISSUER.to_owned(),
        })
    }

    /// Sets the `iss` of minted tokens.
    pub fn with_issuer(mut self, issuer: impl Into<String>) -> Self {
        self.issuer = issuer.into();
        self
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }

    /// The public key as SubjectPublicKeyInfo PEM (what an algorithm-confusion
    /// attacker would use as an HMAC secret).
    pub fn public_key_pem(&self) -> String {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(self.key.public_key_spki());
        let mut out = String::from("-----BEGIN PUBLIC KEY-----\n");
        for line in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
            out.push('\n');
        }
        out.push_str("-----END PUBLIC KEY-----\n");
        out
    }

    /// The JWKS holding this issuer's public key.
    pub fn jwks(&self) -> JwkSet {
        JwkSet {
            keys: vec![self.jwk.clone()],
        }
    }

    pub fn jwks_json(&self) -> String {
        serde_json::to_string_pretty(&self.jwks()).expect("a JWKS always serializes")
    }

    /// Writes the JWKS of `issuers` to `path` atomically (several issuers
    /// make a key rotation).
    pub fn write_jwks(path: &Path, issuers: &[&TokenIssuer]) -> Result<()> {
        let set = JwkSet {
            keys: issuers.iter().map(|i| i.jwk.clone()).collect(),
        };
        let json = serde_json::to_string_pretty(&set).expect("a JWKS always serializes");
        crate::signer::write_atomic(path, &json)
    }

    /// Signs `claims`.
    pub fn mint(&self, claims: &TokenClaims) -> Result<String> {
        let mut header = Header::new(self.alg);
        header.kid = match claims.kid.as_deref() {
            None => Some(self.kid.clone()),
            Some("") => None,
            Some(other) => Some(other.to_owned()),
        };
        let wire = WireClaims {
            iss: claims.issuer.as_deref().unwrap_or(&self.issuer),
            aud: &claims.audiences,
            sub: &claims.subject,
            iat: secs(claims.issued_at),
            nbf: claims.not_before.map(secs),
            exp: secs(claims.expires_at),
            kubernetes: KubernetesClaims {
                namespace: &claims.namespace,
                serviceaccount: NameUid {
                    name: &claims.service_account,
                    uid: &claims.service_account_uid,
                },
                pod: claims.pod.as_ref().map(|(name, uid)| NameUid { name, uid }),
                node: claims
                    .node
                    .as_ref()
                    .map(|(name, uid)| NameUid { name, uid }),
            },
        };
        jsonwebtoken::encode(&header, &wire, &self.encoding)
            .map_err(|e| Error::Token(format!("signing: {e}")))
    }

    /// Signs any claims with this issuer's key and key id: tokens whose
    /// claims no well-behaved issuer writes (the fuzz targets sign what the
    /// fuzzer makes, to reach the checks after the signature).
    pub fn sign_json(&self, claims: &serde_json::Value) -> Result<String> {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding)
            .map_err(|e| Error::Token(format!("signing: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authn::jwt::Jwks;

    #[test]
    fn minted_tokens_verify_with_the_published_jwks() {
        for alg in [TokenAlgorithm::Es256, TokenAlgorithm::Rs256] {
            let issuer = TokenIssuer::generate(alg).unwrap();
            let jwks = Jwks::parse(&issuer.jwks_json(), "mem").unwrap();
            assert_eq!(jwks.keys.len(), 1);
            assert_eq!(jwks.keys[0].kid.as_deref(), Some(issuer.kid()));
            let token = issuer
                .mint(&TokenClaims::for_pod(
                    "default", "web", "web-0", "u1", "node-a", "n1",
                ))
                .unwrap();
            let header = jsonwebtoken::decode_header(&token).unwrap();
            assert_eq!(header.alg, issuer.algorithm());
            let claims: serde_json::Value = jsonwebtoken::dangerous::insecure_decode(&token)
                .unwrap()
                .claims;
            assert_eq!(claims["sub"], "system:serviceaccount:default:web");
            assert_eq!(claims["kubernetes.io"]["pod"]["uid"], "u1");
            assert_eq!(claims["kubernetes.io"]["node"]["name"], "node-a");
            assert_eq!(claims["aud"][0], "istio-ca");
            assert!(!format!("{issuer:?}").contains("PRIVATE"));
        }
    }
}
