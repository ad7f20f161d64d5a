//! JWT-SVIDs (DESIGN §2.4), where meshid goes past Istio: the trust domain's
//! JWT authority ([`JwtAuthority`]: ES256 keys beside the CA keys) and the
//! `meshid.v1.JwtSvidService` gRPC service on the CA's TLS port.
//!
//! The signing key is P-256. With the self-signed root it is made once and
//! kept in the CA directory (`jwt-signing-key.pem`, mode 0600, refused when
//! group or others may read it), so a restarted CA keeps the tokens it minted
//! valid. A read-only plugged-in directory gets an in-memory key (logged).
//! When the X.509 signing material rotates, a new JWT key takes over; the old
//! one stays in the published bundle until the last token it signed has
//! expired.
//!
//! `Mint` goes through exactly the authentication and authorization of
//! `CreateCertificate` ([`CaCore::authenticate`], [`CaCore::authorize`]): a workload gets its own
//! identity; a trusted node account may name a workload of its node in
//! `spiffe_id` (the ztunnel's impersonation).

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use meshid_common::proto::jwt_svid::jwt_svid_service_server::{
    JwtSvidService, JwtSvidServiceServer,
};
use meshid_common::proto::jwt_svid::{
    JwtBundleRequest, JwtBundleResponse, MintJwtSvidRequest, MintJwtSvidResponse,
};
use meshid_common::{KeyType, PrivateKey, SpiffeId, telemetry};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::server::CaCore;
use crate::sign::CertSigner;

/// The JWT signing key's file in the CA directory.
pub const JWT_KEY_FILE: &str = "jwt-signing-key.pem";
/// A JWT-SVID's lifetime when the caller asks for none.
pub const DEFAULT_JWT_SVID_TTL: Duration = Duration::from_secs(5 * 60);
/// The longest lifetime a caller may ask for.
pub const MAX_JWT_SVID_TTL: Duration = Duration::from_secs(60 * 60);
/// Most audiences in one request, and the longest audience.
const MAX_AUDIENCES: usize = 32;
const MAX_AUDIENCE_LEN: usize = 512;

/// One signing key and its public JWK.
struct JwtKey {
    kid: String,
    encoding: jsonwebtoken::EncodingKey,
    jwk: serde_json::Value,
    /// Set once a newer key took over: the moment the last token this key
    /// signed expires, after which it leaves the bundle.
    retire_after: Option<SystemTime>,
}

impl std::fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtKey")
            .field("kid", &self.kid)
            .field("key", &"[redacted]")
            .field("retire_after", &self.retire_after)
            .finish()
    }
}

impl JwtKey {
    fn new(key: &PrivateKey) -> Result<Self> {
        let spki = key.public_key_spki();
        // A P-256 SubjectPublicKeyInfo ends with the 65-byte uncompressed
        // point 04 || x || y.
        let point = spki
            .len()
            .checked_sub(65)
            .map(|at| &spki[at..])
            .filter(|p| p[0] == 0x04)
            .ok_or_else(|| Error::Config("the JWT signing key is not a P-256 key".into()))?;
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, spki);
        let kid = URL_SAFE_NO_PAD.encode(&digest.as_ref()[..16]);
        let jwk = serde_json::json!({
            "kty": "EC",
            "crv": "P-256",
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..]),
            "kid": kid,
            "use": "jwt-svid",
        });
        Ok(JwtKey {
            kid,
            encoding: jsonwebtoken::EncodingKey::from_ec_der(key.pkcs8_der()),
            jwk,
            retire_after: None,
        })
    }
}

/// The claims of a JWT-SVID (JWT-SVID spec: `sub`, `aud`, `exp` required).
#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    aud: &'a [String],
    exp: u64,
    iat: u64,
}

/// A minted token.
#[derive(Debug)]
pub struct Minted {
    pub token: String,
    pub expires_at: SystemTime,
    pub kid: String,
}

/// The trust domain's JWT signing keys: the current one last, older ones
/// kept for verification until their tokens have expired.
#[derive(Debug)]
pub struct JwtAuthority {
    trust_domain: String,
    keys: RwLock<Vec<JwtKey>>,
}

impl JwtAuthority {
    /// Loads the key kept in `dir`, or makes one and keeps it there
    /// (mode 0600). A directory that cannot be written gets an in-memory key.
    pub fn open(dir: &std::path::Path, trust_domain: &str) -> Result<Self> {
        let path = dir.join(JWT_KEY_FILE);
        let key = if path.exists() {
            read_key(&path)?
        } else {
            let key = PrivateKey::generate(KeyType::EcdsaP256)?;
            match write_key(&path, &key) {
                Ok(()) => tracing::info!(path = %path.display(), "made a new JWT-SVID signing key"),
                Err(e) => tracing::warn!(
                    error = %e,
                    "the JWT-SVID signing key is kept in memory only: tokens minted before a restart will not verify after it"
                ),
            }
            key
        };
        Ok(JwtAuthority {
            trust_domain: trust_domain.to_owned(),
            keys: RwLock::new(vec![JwtKey::new(&key)?]),
        })
    }

    /// An authority with a fresh in-memory key (tests).
    pub fn ephemeral(trust_domain: &str) -> Result<Self> {
        let key = PrivateKey::generate(KeyType::EcdsaP256)?;
        Ok(JwtAuthority {
            trust_domain: trust_domain.to_owned(),
            keys: RwLock::new(vec![JwtKey::new(&key)?]),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The `kid` of the key that signs now.
    pub fn current_kid(&self) -> String {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        keys.last().map(|k| k.kid.clone()).unwrap_or_default()
    }

    /// Puts `key` in charge; the previous keys stay published for
    /// `MAX_JWT_SVID_TTL` (the longest a token they signed may live).
    pub fn rotate_to(&self, key: &PrivateKey, now: SystemTime) -> Result<()> {
        let next = JwtKey::new(key)?;
        let mut keys = self.keys.write().unwrap_or_else(|e| e.into_inner());
        keys.retain(|k| k.retire_after.is_none_or(|t| t > now));
        for k in keys.iter_mut() {
            k.retire_after.get_or_insert(now + MAX_JWT_SVID_TTL);
        }
        tracing::info!(jwt.kid = %next.kid, "JWT-SVID signing key rotated");
        keys.push(next);
        Ok(())
    }

    /// Signs a JWT-SVID for `id` and `audience`, valid `ttl` from `now`.
    pub fn mint(
        &self,
        id: &SpiffeId,
        audience: &[String],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Minted> {
        let iat = meshid_common::cert::unix_secs(now).max(0) as u64;
        let exp = iat + ttl.as_secs().max(1);
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        let key = keys
            .last()
            .ok_or_else(|| Error::Config("no JWT signing key".into()))?;
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(key.kid.clone());
        header.typ = Some("JWT".into());
        let claims = Claims {
            sub: id.as_str(),
            aud: audience,
            exp,
            iat,
        };
        let token = jsonwebtoken::encode(&header, &claims, &key.encoding)
            .map_err(|e| Error::JwtSigning(e.to_string()))?;
        Ok(Minted {
            token,
            expires_at: SystemTime::UNIX_EPOCH + Duration::from_secs(exp),
            kid: key.kid.clone(),
        })
    }

    /// The JWKS of the keys a verifier must know now (SPIFFE bundle format:
    /// `use: jwt-svid`, `kid`).
    pub fn jwks(&self, now: SystemTime) -> Vec<u8> {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        let published: Vec<&serde_json::Value> = keys
            .iter()
            .filter(|k| k.retire_after.is_none_or(|t| t > now))
            .map(|k| &k.jwk)
            .collect();
        serde_json::to_vec(&serde_json::json!({ "keys": published })).unwrap_or_default()
    }

    /// Follows the signer: a new JWT key whenever the X.509 signing material
    /// rotates, persisted in `dir` when it can be.
    pub async fn follow(
        self: Arc<Self>,
        signer: Arc<dyn CertSigner>,
        dir: std::path::PathBuf,
        cancel: CancellationToken,
    ) {
        let mut rx = signer.subscribe();
        let mut generation = rx.borrow_and_update().generation;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                changed = rx.changed() => if changed.is_err() { return },
            }
            let now_generation = rx.borrow_and_update().generation;
            if now_generation == generation {
                continue;
            }
            generation = now_generation;
            let rotated = PrivateKey::generate(KeyType::EcdsaP256)
                .map_err(Error::from)
                .and_then(|key| {
                    let path = dir.join(JWT_KEY_FILE);
                    if let Err(e) = write_key(&path, &key) {
                        tracing::warn!(error = %e, "the new JWT-SVID signing key is kept in memory only");
                    }
                    self.rotate_to(&key, SystemTime::now())
                });
            if let Err(e) = rotated {
                tracing::error!(error = %e, "JWT-SVID signing key not rotated");
            }
        }
    }
}

fn read_key(path: &std::path::Path) -> Result<PrivateKey> {
    use std::os::unix::fs::PermissionsExt;
    let io = |source| Error::Io {
        path: path.to_owned(),
        source,
    };
    let mode = std::fs::metadata(path).map_err(io)?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(Error::KeyPermissions {
            path: path.to_owned(),
            mode: mode & 0o777,
        });
    }
    let pem = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(io)?);
    let key = PrivateKey::from_pem(&pem).map_err(|source| Error::CaMaterial {
        path: path.to_owned(),
        source,
    })?;
    if key.key_type() != KeyType::EcdsaP256 {
        return Err(Error::Config(format!(
            "{}: the JWT-SVID signing key must be ECDSA P-256 (ES256)",
            path.display()
        )));
    }
    Ok(key)
}

/// Writes the key with mode 0600 through a temporary file and a rename.
fn write_key(path: &std::path::Path, key: &PrivateKey) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| Error::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_file_name(format!(".{JWT_KEY_FILE}.tmp.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    file.write_all(key.to_pkcs8_pem().as_bytes())
        .and_then(|_| file.sync_all())
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(io)
}

/// The `meshid.v1.JwtSvidService` implementation.
#[derive(Debug, Clone)]
pub struct JwtSvidServer {
    core: Arc<CaCore>,
    authority: Arc<JwtAuthority>,
}

impl JwtSvidServer {
    pub fn new(core: Arc<CaCore>, authority: Arc<JwtAuthority>) -> Self {
        JwtSvidServer { core, authority }
    }

    pub fn into_server(self, max_request_bytes: usize) -> JwtSvidServiceServer<Self> {
        JwtSvidServiceServer::new(self).max_decoding_message_size(max_request_bytes)
    }

    async fn mint_for(&self, request: &Request<MintJwtSvidRequest>) -> Result<(SpiffeId, Minted)> {
        let body = request.get_ref();
        let audience = check_audience(&body.audience)?;
        let ttl = jwt_ttl(body.ttl_seconds)?;
        let caller = self.core.authenticate(request).await?;
        // Naming one's own identity is asking for it (as SPIRE's agent
        // allows); any other is impersonation, for node accounts only.
        let target = (!body.spiffe_id.is_empty() && body.spiffe_id != caller.id.as_str())
            .then_some(body.spiffe_id.as_str());
        let identity = self.core.authorize(&caller, target).await?;
        let minted = tracing::info_span!("ca.sign_jwt", spiffe.id = %identity).in_scope(|| {
            self.authority
                .mint(&identity, &audience, ttl, SystemTime::now())
        })?;
        Ok((identity, minted))
    }
}

fn check_audience(audience: &[String]) -> Result<Vec<String>> {
    let bad = |reason: String| Error::JwtRequest(reason);
    if audience.is_empty() {
        return Err(bad("audience is required (at least one)".into()));
    }
    if audience.len() > MAX_AUDIENCES {
        return Err(bad(format!(
            "{} audiences; at most {MAX_AUDIENCES}",
            audience.len()
        )));
    }
    for a in audience {
        if a.trim().is_empty() {
            return Err(bad("an audience is empty".into()));
        }
        if a.len() > MAX_AUDIENCE_LEN {
            return Err(bad(format!(
                "an audience is {} bytes; at most {MAX_AUDIENCE_LEN}",
                a.len()
            )));
        }
    }
    Ok(audience.to_vec())
}

fn jwt_ttl(seconds: i64) -> Result<Duration> {
    if seconds <= 0 {
        return Ok(DEFAULT_JWT_SVID_TTL);
    }
    let ttl = Duration::from_secs(seconds as u64);
    if ttl > MAX_JWT_SVID_TTL {
        return Err(Error::JwtRequest(format!(
            "ttl_seconds {seconds} is above the maximum {}",
            MAX_JWT_SVID_TTL.as_secs()
        )));
    }
    Ok(ttl)
}

#[tonic::async_trait]
impl JwtSvidService for JwtSvidServer {
    async fn mint(
        &self,
        request: Request<MintJwtSvidRequest>,
    ) -> std::result::Result<Response<MintJwtSvidResponse>, Status> {
        let started = Instant::now();
        let remote = request
            .extensions()
            .get::<crate::server::ConnInfo>()
            .map(|c| c.remote);
        let request_id = crate::error::request_id(request.metadata());
        let span =
            tracing::info_span!("ca.mint_jwt", peer.addr = ?remote, request_id = %request_id);
        telemetry::set_remote_parent(&span, telemetry::extract_grpc(request.metadata()));
        let result = self.mint_for(&request).instrument(span.clone()).await;
        let _entered = span.enter();
        let metrics = &self.core.metrics;
        match result {
            Ok((identity, minted)) => {
                metrics.jwt_svid("issued");
                tracing::info!(
                    spiffe.id = %identity,
                    jwt.kid = %minted.kid,
                    jwt.exp = meshid_common::cert::unix_secs(minted.expires_at),
                    jwt.aud = ?request.get_ref().audience,
                    latency_us = started.elapsed().as_micros() as u64,
                    "JWT-SVID minted"
                );
                Ok(crate::server::with_request_id(
                    Response::new(MintJwtSvidResponse {
                        token: minted.token,
                        expires_at: meshid_common::cert::unix_secs(minted.expires_at),
                        spiffe_id: identity.to_string(),
                    }),
                    &request_id,
                ))
            }
            Err(e) => {
                if e.code() == tonic::Code::Unauthenticated {
                    metrics.authentication_failures.inc();
                }
                metrics.jwt_svid(refusal_label(&e));
                Err(crate::server::refuse(
                    &e,
                    &request_id,
                    "JWT-SVID request refused",
                ))
            }
        }
    }

    async fn bundle(
        &self,
        request: Request<JwtBundleRequest>,
    ) -> std::result::Result<Response<JwtBundleResponse>, Status> {
        let request_id = crate::error::request_id(request.metadata());
        let span = tracing::info_span!("ca.jwt_bundle", request_id = %request_id);
        telemetry::set_remote_parent(&span, telemetry::extract_grpc(request.metadata()));
        // Only a caller that could get an SVID reads the bundle.
        let identified = self
            .core
            .authenticate(&request)
            .instrument(span.clone())
            .await;
        if let Err(e) = identified {
            let _entered = span.enter();
            return Err(crate::server::refuse(
                &e,
                &request_id,
                "JWT bundle request refused",
            ));
        }
        Ok(Response::new(JwtBundleResponse {
            trust_domain: self.authority.trust_domain.clone(),
            jwks: self.authority.jwks(SystemTime::now()),
        }))
    }
}

/// The `result` label of a refused JWT-SVID request.
fn refusal_label(e: &Error) -> &'static str {
    match e {
        Error::Authentication { .. } => "authentication",
        Error::Impersonation { .. } => "impersonation",
        Error::JwtRequest(_) => "bad_request",
        Error::JwtSigning(_) | Error::Signing(_) => "sign",
        _ => "internal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> SpiffeId {
        SpiffeId::parse("spiffe://cluster.local/ns/default/sa/web").unwrap()
    }

    fn jwks_keys(a: &JwtAuthority, now: SystemTime) -> Vec<String> {
        let v: serde_json::Value = serde_json::from_slice(&a.jwks(now)).unwrap();
        v["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| {
                assert_eq!(k["use"], "jwt-svid");
                assert_eq!(k["kty"], "EC");
                assert_eq!(k["crv"], "P-256");
                k["kid"].as_str().unwrap().to_owned()
            })
            .collect()
    }

    fn verify(a: &JwtAuthority, token: &str, aud: &str) -> serde_json::Value {
        let header = jsonwebtoken::decode_header(token).unwrap();
        assert_eq!(header.alg, jsonwebtoken::Algorithm::ES256);
        assert_eq!(header.typ.as_deref(), Some("JWT"));
        let set: jsonwebtoken::jwk::JwkSet =
            serde_json::from_slice(&a.jwks(SystemTime::now())).unwrap();
        let jwk = set
            .find(header.kid.as_deref().unwrap())
            .expect("kid in JWKS");
        let key = jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
        v.set_audience(&[aud]);
        v.set_required_spec_claims(&["sub", "aud", "exp"]);
        jsonwebtoken::decode::<serde_json::Value>(token, &key, &v)
            .unwrap()
            .claims
    }

    #[test]
    fn minted_tokens_verify_against_the_published_jwks() {
        let a = JwtAuthority::ephemeral("cluster.local").unwrap();
        let m = a
            .mint(
                &id(),
                &["x".into(), "y".into()],
                DEFAULT_JWT_SVID_TTL,
                SystemTime::now(),
            )
            .unwrap();
        let claims = verify(&a, &m.token, "y");
        assert_eq!(claims["sub"], id().as_str());
        assert_eq!(claims["aud"], serde_json::json!(["x", "y"]));
        let exp = claims["exp"].as_i64().unwrap();
        let iat = claims["iat"].as_i64().unwrap();
        assert_eq!(exp - iat, 300);
    }

    #[test]
    fn the_key_is_persisted_0600_and_reused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let a = JwtAuthority::open(dir.path(), "cluster.local").unwrap();
        let path = dir.path().join(JWT_KEY_FILE);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = JwtAuthority::open(dir.path(), "cluster.local").unwrap();
        assert_eq!(a.current_kid(), b.current_kid());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = JwtAuthority::open(dir.path(), "cluster.local").unwrap_err();
        assert!(matches!(err, Error::KeyPermissions { .. }), "{err}");
    }

    #[test]
    fn a_rotated_key_stays_published_until_its_tokens_expire() {
        let a = JwtAuthority::ephemeral("cluster.local").unwrap();
        let now = SystemTime::now();
        let old = a.current_kid();
        let old_token = a
            .mint(&id(), &["x".into()], DEFAULT_JWT_SVID_TTL, now)
            .unwrap();
        a.rotate_to(&PrivateKey::generate(KeyType::EcdsaP256).unwrap(), now)
            .unwrap();
        let new = a.current_kid();
        assert_ne!(old, new);
        assert_eq!(jwks_keys(&a, now), vec![old.clone(), new.clone()]);
        verify(&a, &old_token.token, "x");
        let later = now + MAX_JWT_SVID_TTL + Duration::from_secs(1);
        assert_eq!(jwks_keys(&a, later), vec![new]);
    }

    #[test]
    fn audience_and_ttl_are_checked() {
        assert!(matches!(check_audience(&[]), Err(Error::JwtRequest(_))));
        assert!(check_audience(&[" ".into()]).is_err());
        assert_eq!(jwt_ttl(0).unwrap(), DEFAULT_JWT_SVID_TTL);
        assert_eq!(jwt_ttl(30).unwrap(), Duration::from_secs(30));
        assert!(jwt_ttl(MAX_JWT_SVID_TTL.as_secs() as i64 + 1).is_err());
    }
}
