//! The JWT half of the SPIFFE Workload API (DESIGN §2.4): JWT-SVIDs minted
//! by the CA (`meshid.v1.JwtSvidService/Mint`, with the workload's token),
//! cached per audience set until half their life; the trust domain's JWT
//! bundle fetched from the CA, refreshed on every X.509 rotation (the CA
//! rotates its JWT key with its CA keys) and at a fixed interval; and
//! validation of a JWT-SVID against that bundle (ES256, `kid`, `aud`, `exp`).
//!
//! Refusals follow SPIRE's agent: a missing audience or svid, a bad token or
//! SPIFFE ID → `INVALID_ARGUMENT`; an identity this workload does not hold →
//! `PERMISSION_DENIED`. A CA refusal keeps the CA's code.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use meshid_common::ca_client::{JwtBundle, MintedJwt};
use meshid_common::identity::{JwtRequest, JwtSource, TokenFile};
use meshid_common::{CredentialsRx, SpiffeId};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::Status;

/// How often the JWT bundle is fetched again without an X.509 rotation.
pub const BUNDLE_REFRESH_INTERVAL: Duration = Duration::from_secs(60);
/// How long a first call waits for the JWT bundle.
const FIRST_BUNDLE_WAIT: Duration = Duration::from_secs(10);

#[derive(Clone)]
struct Cached {
    token: String,
    refresh_at: SystemTime,
}

/// JWT-SVIDs and the JWT bundle of one workload.
pub struct JwtSvids {
    id: SpiffeId,
    source: Arc<dyn JwtSource>,
    token: TokenFile,
    credentials: CredentialsRx,
    cancel: CancellationToken,
    cache: Mutex<HashMap<Vec<String>, Cached>>,
    bundle: watch::Sender<Option<JwtBundle>>,
    refresher: AtomicBool,
}

impl std::fmt::Debug for JwtSvids {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtSvids")
            .field("id", &self.id)
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

fn ca_status(e: meshid_common::Error) -> Status {
    match e {
        meshid_common::Error::Ca { code, message } => {
            Status::new(code, format!("the CA refused: {message}"))
        }
        other => Status::unavailable(other.to_string()),
    }
}

impl JwtSvids {
    pub fn new(
        id: SpiffeId,
        source: Arc<dyn JwtSource>,
        token: TokenFile,
        credentials: CredentialsRx,
        cancel: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(JwtSvids {
            id,
            source,
            token,
            credentials,
            cancel,
            cache: Mutex::new(HashMap::new()),
            bundle: watch::channel(None).0,
            refresher: AtomicBool::new(false),
        })
    }

    /// A JWT-SVID for `audience` (`FetchJWTSVID`): `spiffe_id` must be empty
    /// or this workload's own.
    pub async fn fetch(&self, audience: &[String], spiffe_id: &str) -> Result<String, Status> {
        if audience.iter().all(|a| a.is_empty()) {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if !spiffe_id.is_empty() {
            let asked = SpiffeId::parse(spiffe_id).map_err(|e| {
                Status::invalid_argument(format!("spiffe_id {spiffe_id:?} is invalid: {e}"))
            })?;
            if asked != self.id {
                return Err(Status::permission_denied(format!(
                    "no identity issued: this workload is {}, not {asked}",
                    self.id
                )));
            }
        }
        let mut key: Vec<String> = audience.iter().filter(|a| !a.is_empty()).cloned().collect();
        key.sort();
        key.dedup();
        let now = SystemTime::now();
        if let Some(hit) = self.cached(&key, now) {
            return Ok(hit);
        }
        let token = self
            .token
            .read()
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let minted = self
            .source
            .mint_jwt(JwtRequest {
                audience: key.clone(),
                impersonate: None,
                ttl: Duration::ZERO,
                token,
            })
            .await
            .map_err(ca_status)?;
        if minted.spiffe_id != self.id.as_str() {
            return Err(Status::internal(format!(
                "the CA minted a JWT-SVID for {} instead of {}",
                minted.spiffe_id, self.id
            )));
        }
        self.store(key, &minted, now);
        Ok(minted.token)
    }

    fn cached(&self, key: &[String], now: SystemTime) -> Option<String> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get(key)
            .filter(|c| now < c.refresh_at)
            .map(|c| c.token.clone())
    }

    fn store(&self, key: Vec<String>, minted: &MintedJwt, now: SystemTime) {
        let life = minted.expires_at.duration_since(now).unwrap_or_default();
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.retain(|_, c| c.refresh_at > now);
        cache.insert(
            key,
            Cached {
                token: minted.token.clone(),
                refresh_at: now + life / 2,
            },
        );
    }

    /// The JWT bundles as they change: starts the refresher on first use.
    pub fn bundles(self: &Arc<Self>) -> watch::Receiver<Option<JwtBundle>> {
        if !self.refresher.swap(true, Ordering::SeqCst) {
            tokio::spawn(self.clone().refresh_loop());
        }
        self.bundle.subscribe()
    }

    /// The current bundle, waiting a little for the first one.
    async fn current_bundle(self: &Arc<Self>) -> Result<JwtBundle, Status> {
        let mut rx = self.bundles();
        let got = tokio::time::timeout(FIRST_BUNDLE_WAIT, rx.wait_for(Option::is_some)).await;
        match got {
            Ok(Ok(b)) => Ok(b.clone().expect("waited for Some")),
            _ => Err(Status::unavailable(
                "the trust domain's JWT bundle is not available yet",
            )),
        }
    }

    async fn fetch_bundle(&self) -> Result<JwtBundle, Status> {
        let token = self
            .token
            .read()
            .map_err(|e| Status::unavailable(e.to_string()))?;
        self.source.jwt_bundle(token).await.map_err(ca_status)
    }

    /// Fetches the bundle now, publishes it if it changed.
    async fn refresh(&self) -> Result<(), Status> {
        let bundle = self.fetch_bundle().await?;
        self.bundle.send_if_modified(|cur| {
            if cur.as_ref() == Some(&bundle) {
                return false;
            }
            tracing::info!(trust_domain = %bundle.trust_domain, "JWT bundle updated");
            *cur = Some(bundle);
            true
        });
        Ok(())
    }

    async fn refresh_loop(self: Arc<Self>) {
        let mut credentials = self.credentials.clone();
        let mut backoff = Duration::from_millis(200);
        loop {
            let wait = match self.refresh().await {
                Ok(()) => {
                    backoff = Duration::from_millis(200);
                    BUNDLE_REFRESH_INTERVAL
                }
                Err(status) => {
                    tracing::warn!(code = ?status.code(), error = status.message(), "JWT bundle fetch failed; retrying");
                    backoff = (backoff * 2).min(BUNDLE_REFRESH_INTERVAL);
                    backoff
                }
            };
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
                changed = credentials.changed() => if changed.is_err() { return },
            }
        }
    }

    /// `ValidateJWTSVID`: the token's SPIFFE ID and claims, if it is signed
    /// by a key of its trust domain's bundle, names `audience` and has not
    /// expired.
    pub async fn validate(
        self: &Arc<Self>,
        audience: &str,
        svid: &str,
    ) -> Result<(SpiffeId, serde_json::Map<String, serde_json::Value>), Status> {
        if audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if svid.is_empty() {
            return Err(Status::invalid_argument("svid must be specified"));
        }
        let bad = |what: String| Status::invalid_argument(what);
        let header =
            jsonwebtoken::decode_header(svid).map_err(|e| bad(format!("malformed JWT: {e}")))?;
        if header.alg != jsonwebtoken::Algorithm::ES256 {
            return Err(bad(format!(
                "unsupported token signature algorithm {:?}",
                header.alg
            )));
        }
        let kid = header
            .kid
            .ok_or_else(|| bad("token header missing key id".into()))?;
        let sub = unverified_subject(svid)?;
        let id = SpiffeId::parse(&sub)
            .map_err(|e| bad(format!("token has an invalid subject claim: {e}")))?;
        let mut bundle = self.current_bundle().await?;
        if !id.is_member_of(&bundle.trust_domain) {
            return Err(bad(format!(
                "no keys found for trust domain {:?}",
                id.trust_domain()
            )));
        }
        let mut jwk = find_key(&bundle, &kid)?;
        if jwk.is_none() {
            // A key the CA made since the last refresh.
            self.refresh().await?;
            bundle = self.current_bundle().await?;
            jwk = find_key(&bundle, &kid)?;
        }
        let jwk = jwk.ok_or_else(|| {
            bad(format!(
                "no key {kid:?} in the bundle of trust domain {:?}",
                bundle.trust_domain
            ))
        })?;
        let key = jwk.es256_key(&kid)?;
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
        validation.leeway = 0;
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["sub", "aud", "exp"]);
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            svid,
            &key,
            &validation,
        )
        .map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            let what = match e.kind() {
                ErrorKind::ExpiredSignature => "token has expired".to_owned(),
                ErrorKind::InvalidAudience => {
                    format!("expected audience in {audience:?} (audience not in the token)")
                }
                ErrorKind::InvalidSignature => "token signature is invalid".to_owned(),
                ErrorKind::MissingRequiredClaim(c) => format!("token has no {c:?} claim"),
                _ => format!("token is invalid: {e}"),
            };
            bad(what)
        })?;
        Ok((id, data.claims))
    }
}

/// A JWKS (RFC 7517) as far as validation reads it: an ES256 token needs an
/// EC P-256 key, given by its coordinates. Members it does not name (`use`,
/// `alg`, an RSA key's `n` and `e`, …) are ignored, as a JWKS reader must.
#[derive(serde::Deserialize)]
struct KeySet {
    keys: Vec<BundleKey>,
}

#[derive(serde::Deserialize)]
struct BundleKey {
    #[serde(default)]
    kid: Option<String>,
    kty: String,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
}

impl BundleKey {
    /// The key that verifies an ES256 signature, or why this one cannot.
    fn es256_key(&self, kid: &str) -> Result<jsonwebtoken::DecodingKey, Status> {
        match (self.kty.as_str(), self.crv.as_deref(), &self.x, &self.y) {
            ("EC", Some("P-256"), Some(x), Some(y)) => {
                jsonwebtoken::DecodingKey::from_ec_components(x, y)
                    .map_err(|e| Status::internal(format!("bundle key {kid:?} is unusable: {e}")))
            }
            (kty, crv, _, _) => Err(Status::invalid_argument(format!(
                "token is signed with ES256 but bundle key {kid:?} is not an EC P-256 key \
                 (kty {kty:?}, crv {crv:?})"
            ))),
        }
    }
}

fn find_key(bundle: &JwtBundle, kid: &str) -> Result<Option<BundleKey>, Status> {
    let set: KeySet = serde_json::from_slice(&bundle.jwks)
        .map_err(|e| Status::internal(format!("the CA's JWT bundle is not a JWKS: {e}")))?;
    Ok(set.keys.into_iter().find(|k| k.kid.as_deref() == Some(kid)))
}

/// The `sub` claim before verification, to pick the trust domain's bundle.
fn unverified_subject(token: &str) -> Result<String, Status> {
    use base64::Engine;
    let bad = |what: &str| Status::invalid_argument(format!("malformed JWT: {what}"));
    let payload = token.split('.').nth(1).ok_or_else(|| bad("no payload"))?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| bad("the payload is not base64url"))?;
    let claims: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|_| bad("the payload is not JSON"))?;
    claims
        .get("sub")
        .and_then(|s| s.as_str())
        .map(str::to_owned)
        .ok_or_else(|| Status::invalid_argument("token has no \"sub\" claim"))
}

/// A JSON object as a protobuf `Struct` (the `claims` of ValidateJWTSVID).
pub fn to_struct(map: serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: map.into_iter().map(|(k, v)| (k, to_value(v))).collect(),
    }
}

fn to_value(v: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(to_value).collect(),
        }),
        serde_json::Value::Object(o) => Kind::StructValue(to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// The map key of a trust domain's bundle in the Workload API.
pub fn bundle_key(trust_domain: &str) -> String {
    format!("spiffe://{trust_domain}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::future::BoxFuture;
    use meshid_common::identity::{CertificateSource, SignRequest};

    /// Answers the JWT bundle it holds now, and counts mints.
    #[derive(Debug, Default)]
    struct Bundles {
        jwks: Mutex<Vec<u8>>,
        mints: Mutex<u32>,
    }

    impl CertificateSource for Bundles {
        fn sign(&self, _req: SignRequest) -> BoxFuture<'_, meshid_common::Result<Vec<String>>> {
            Box::pin(async { Ok(Vec::new()) })
        }
    }

    impl JwtSource for Bundles {
        fn mint_jwt(&self, req: JwtRequest) -> BoxFuture<'_, meshid_common::Result<MintedJwt>> {
            let mut n = self.mints.lock().unwrap();
            *n += 1;
            let minted = MintedJwt {
                token: format!("token-{n}-{}", req.audience.join(",")),
                spiffe_id: "spiffe://cluster.local/ns/default/sa/web".into(),
                expires_at: SystemTime::now() + Duration::from_secs(300),
            };
            Box::pin(async move { Ok(minted) })
        }

        fn jwt_bundle(
            &self,
            _token: meshid_common::identity::Token,
        ) -> BoxFuture<'_, meshid_common::Result<JwtBundle>> {
            let jwks = self.jwks.lock().unwrap().clone();
            Box::pin(async move {
                Ok(JwtBundle {
                    trust_domain: "cluster.local".into(),
                    jwks,
                })
            })
        }
    }

    fn setup() -> (
        Arc<Bundles>,
        Arc<JwtSvids>,
        watch::Sender<Option<meshid_common::Credentials>>,
        tempfile::TempDir,
    ) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "t").unwrap();
        let source = Arc::new(Bundles::default());
        *source.jwks.lock().unwrap() = b"{\"keys\":[1]}".to_vec();
        let (tx, rx) = watch::channel(None);
        let jwt = JwtSvids::new(
            SpiffeId::parse("spiffe://cluster.local/ns/default/sa/web").unwrap(),
            source.clone(),
            TokenFile::new(dir.path().join("token")),
            rx,
            CancellationToken::new(),
        );
        (source, jwt, tx, dir)
    }

    #[tokio::test]
    async fn the_bundle_is_pushed_again_when_the_x509_credentials_rotate() {
        let (source, jwt, creds, _dir) = setup();
        let mut rx = jwt.bundles();
        let first = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(Option::is_some))
            .await
            .unwrap()
            .unwrap()
            .clone()
            .unwrap();
        assert_eq!(first.jwks, b"{\"keys\":[1]}");
        *source.jwks.lock().unwrap() = b"{\"keys\":[1,2]}".to_vec();
        creds.send_replace(None);
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .expect("a push after the rotation")
            .unwrap();
        let second = rx.borrow().clone().unwrap();
        assert_eq!(second.jwks, b"{\"keys\":[1,2]}");
    }

    /// A JWKS as SPIRE or a federated bundle may hold it: an RSA key and an
    /// EC key with members validation does not read.
    fn jwks_with(key: &meshid_common::PrivateKey, kid: &str) -> Vec<u8> {
        use base64::Engine;
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let spki = key.public_key_spki();
        let point = &spki[spki.len() - 65..];
        serde_json::to_vec(&serde_json::json!({"keys": [
            {"kty": "RSA", "kid": "rsa-1", "n": "sXch", "e": "AQAB", "use": "jwt-svid"},
            {"kty": "EC", "crv": "P-256", "kid": kid, "use": "jwt-svid", "alg": "ES256",
             "x": b64(&point[1..33]), "y": b64(&point[33..])},
        ]}))
        .unwrap()
    }

    fn es256(key: &meshid_common::PrivateKey, kid: &str, sub: &str, aud: &str) -> String {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(kid.into());
        let exp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 300;
        let claims = serde_json::json!({"sub": sub, "aud": [aud], "exp": exp});
        jsonwebtoken::encode(
            &header,
            &claims,
            &jsonwebtoken::EncodingKey::from_ec_der(key.pkcs8_der()),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn a_token_verifies_against_its_ec_key_among_other_keys() {
        let (source, jwt, _creds, _dir) = setup();
        let key = meshid_common::PrivateKey::generate(meshid_common::KeyType::EcdsaP256).unwrap();
        *source.jwks.lock().unwrap() = jwks_with(&key, "ec-1");
        let sub = "spiffe://cluster.local/ns/default/sa/db";

        let token = es256(&key, "ec-1", sub, "db");
        let (id, claims) = jwt.validate("db", &token).await.unwrap();
        assert_eq!(id.as_str(), sub);
        assert_eq!(claims["sub"], sub);

        let other = meshid_common::PrivateKey::generate(meshid_common::KeyType::EcdsaP256).unwrap();
        let forged = es256(&other, "ec-1", sub, "db");
        let e = jwt.validate("db", &forged).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(
            e.message().contains("signature is invalid"),
            "{}",
            e.message()
        );

        let wrong_type = es256(&key, "rsa-1", sub, "db");
        let e = jwt.validate("db", &wrong_type).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(
            e.message().contains("not an EC P-256 key"),
            "{}",
            e.message()
        );
    }

    #[tokio::test]
    async fn tokens_are_cached_per_audience_set() {
        let (source, jwt, _creds, _dir) = setup();
        let a = jwt.fetch(&["b".into(), "a".into()], "").await.unwrap();
        let again = jwt
            .fetch(&["a".into(), "b".into(), "a".into()], "")
            .await
            .unwrap();
        assert_eq!(a, again);
        let other = jwt.fetch(&["c".into()], "").await.unwrap();
        assert_ne!(a, other);
        assert_eq!(*source.mints.lock().unwrap(), 2);
    }
}
