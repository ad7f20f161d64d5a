//! Projected service-account JWTs checked against the issuer's JWKS
//! (DESIGN §4): RS256 or ES256 only, `iss`, `aud`, `exp` and `nbf` checked,
//! `sub = system:serviceaccount:<ns>:<sa>`, and the `kubernetes.io` pod claim
//! must name a pod that is still alive — a token does not outlive its pod.
//!
//! The JWKS file is re-read when it changes; a bad new version is logged and
//! the last good one stays.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use futures::future::BoxFuture;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use meshid_common::SpiffeId;
use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{
    AuthContext, AuthError, Authenticator, Caller, TokenRefusal, parse_service_account_subject,
};
use crate::directory::PodDirectory;
use crate::error::{Error, Result};

/// Algorithms a service-account token may use.
pub const ALLOWED_ALGORITHMS: [Algorithm; 2] = [Algorithm::RS256, Algorithm::ES256];
/// Clock skew tolerated on `exp` and `nbf`.
pub const LEEWAY: Duration = Duration::from_secs(30);

/// One verification key of the JWKS.
#[derive(Clone)]
pub struct VerificationKey {
    pub kid: Option<String>,
    pub alg: Algorithm,
    key: DecodingKey,
}

impl std::fmt::Debug for VerificationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerificationKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish()
    }
}

/// The usable keys of a JWKS document.
#[derive(Clone, Debug, Default)]
pub struct Jwks {
    pub keys: Vec<VerificationKey>,
}

impl Jwks {
    /// Parses a JWKS document; keys of other algorithms are skipped (logged).
    pub fn parse(json: &str, source_name: &str) -> Result<Self> {
        let bad = |reason: String| Error::Jwks {
            source_name: source_name.to_owned(),
            reason,
        };
        let set: JwkSet = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
        let mut keys = Vec::new();
        for jwk in &set.keys {
            let alg = match (&jwk.common.key_algorithm, &jwk.algorithm) {
                (Some(KeyAlgorithm::RS256), _) => Some(Algorithm::RS256),
                (Some(KeyAlgorithm::ES256), _) => Some(Algorithm::ES256),
                (None, AlgorithmParameters::RSA(_)) => Some(Algorithm::RS256),
                (None, AlgorithmParameters::EllipticCurve(ec))
                    if ec.curve == EllipticCurve::P256 =>
                {
                    Some(Algorithm::ES256)
                }
                _ => None,
            };
            let Some(alg) = alg else {
                tracing::warn!(source = source_name, kid = ?jwk.common.key_id, "JWKS key skipped: not an RS256 or ES256 key");
                continue;
            };
            let key = DecodingKey::from_jwk(jwk).map_err(|e| {
                bad(format!(
                    "key {:?}: {e}",
                    jwk.common.key_id.as_deref().unwrap_or("")
                ))
            })?;
            keys.push(VerificationKey {
                kid: jwk.common.key_id.clone(),
                alg,
                key,
            });
        }
        if keys.is_empty() {
            return Err(bad("no RS256 or ES256 key in the set".into()));
        }
        Ok(Jwks { keys })
    }

    pub fn load(path: &Path) -> Result<Self> {
        let json = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&json, &path.display().to_string())
    }
}

/// The least time between two fetches a token with an unknown key id may
/// cause: a signer's new key is picked up at once, and tokens with made-up
/// key ids cannot turn the CA into a load on the JWKS server.
pub const UNKNOWN_KID_REFETCH_GAP: Duration = Duration::from_secs(10);

/// Keeps the JWKS of a file or URL current.
#[derive(Debug, Clone)]
pub struct JwksSource {
    rx: watch::Receiver<Arc<Jwks>>,
    /// URL sources only: asks the fetch task for a fetch now.
    refetch: Option<Arc<Refetch>>,
}

#[derive(Debug)]
struct Refetch {
    tx: tokio::sync::mpsc::Sender<tokio::sync::oneshot::Sender<()>>,
    last: std::sync::Mutex<Option<std::time::Instant>>,
}

impl JwksSource {
    /// A fixed set (tests).
    pub fn fixed(jwks: Jwks) -> Self {
        let (_, rx) = watch::channel(Arc::new(jwks));
        JwksSource { rx, refetch: None }
    }

    /// For a token whose key id is not in the set: a URL source fetches
    /// again now (at most once per [`UNKNOWN_KID_REFETCH_GAP`]) and returns
    /// the set as it is after that; `None` when there was nothing to do.
    pub async fn refetch_for_unknown_kid(&self) -> Option<Arc<Jwks>> {
        let refetch = self.refetch.as_ref()?;
        {
            let mut last = refetch.last.lock().unwrap_or_else(|e| e.into_inner());
            let now = std::time::Instant::now();
            if last.is_some_and(|t| now.duration_since(t) < UNKNOWN_KID_REFETCH_GAP) {
                return None;
            }
            *last = Some(now);
        }
        let (done, fetched) = tokio::sync::oneshot::channel();
        refetch.tx.try_send(done).ok()?;
        tokio::time::timeout(FETCH_TIMEOUT + Duration::from_secs(1), fetched)
            .await
            .ok()?
            .ok()?;
        Some(self.current())
    }

    /// Loads `path` (an error if it is missing or bad) and re-reads it when
    /// it changes, until `cancel`.
    pub fn watch_file(
        path: PathBuf,
        interval: Duration,
        cancel: CancellationToken,
    ) -> Result<Self> {
        let stamp = |p: &Path| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(p)
                .ok()
                .map(|m| (m.modified().ok(), m.len(), m.ino()))
        };
        // Stamp before reading: a change after this is seen by the next poll.
        let mut last = stamp(&path);
        let jwks = Jwks::load(&path)?;
        let (tx, rx) = watch::channel(Arc::new(jwks));
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = cancel.cancelled() => return,
                }
                let now = stamp(&path);
                if now == last || now.is_none() {
                    continue;
                }
                last = now;
                match Jwks::load(&path) {
                    Ok(jwks) => {
                        tracing::info!(path = %path.display(), keys = jwks.keys.len(), "JWKS reloaded");
                        tx.send_replace(Arc::new(jwks));
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "JWKS change rejected; keeping the last good keys")
                    }
                }
            }
        });
        Ok(JwksSource { rx, refetch: None })
    }

    /// Fetches `url` (an error if that fails) and again every `interval`,
    /// and when a token names a key id it does not hold (see
    /// [`refetch_for_unknown_kid`](Self::refetch_for_unknown_kid)), until
    /// `cancel`. `roots` are what an https server must chain to.
    pub async fn watch_url(
        url: String,
        roots: Option<rustls::RootCertStore>,
        interval: Duration,
        cancel: CancellationToken,
    ) -> Result<Self> {
        let fetcher = Arc::new(UrlFetcher::new(&url, roots)?);
        let jwks = fetcher.fetch_jwks().await?;
        let (tx, rx) = watch::channel(Arc::new(jwks));
        let (refetch_tx, mut refetch_rx) =
            tokio::sync::mpsc::channel::<tokio::sync::oneshot::Sender<()>>(1);
        tokio::spawn(async move {
            let mut next = tokio::time::Instant::now() + interval;
            loop {
                let asked = tokio::select! {
                    _ = tokio::time::sleep_until(next) => None,
                    Some(done) = refetch_rx.recv() => Some(done),
                    _ = cancel.cancelled() => return,
                };
                match fetcher.fetch_jwks().await {
                    Ok(jwks) => {
                        tracing::debug!(
                            url = %fetcher.url,
                            keys = jwks.keys.len(),
                            on_unknown_kid = asked.is_some(),
                            "JWKS fetched"
                        );
                        tx.send_replace(Arc::new(jwks));
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "JWKS fetch failed; keeping the last good keys")
                    }
                }
                if let Some(done) = asked {
                    let _ = done.send(());
                }
                next = tokio::time::Instant::now() + interval;
            }
        });
        Ok(JwksSource {
            rx,
            refetch: Some(Arc::new(Refetch {
                tx: refetch_tx,
                last: std::sync::Mutex::new(None),
            })),
        })
    }

    pub fn current(&self) -> Arc<Jwks> {
        self.rx.borrow().clone()
    }
}

/// Largest JWKS document accepted from a URL.
const MAX_JWKS_BYTES: usize = 1 << 20;
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Fetches a JWKS over HTTP/1.1 (plain or TLS).
struct UrlFetcher {
    url: String,
    uri: http::Uri,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl std::fmt::Debug for UrlFetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UrlFetcher")
            .field("url", &self.url)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl UrlFetcher {
    fn new(url: &str, roots: Option<rustls::RootCertStore>) -> Result<Self> {
        let bad = |reason: String| Error::Jwks {
            source_name: url.to_owned(),
            reason,
        };
        let uri: http::Uri = url.parse().map_err(|e| bad(format!("{e}")))?;
        let tls = match (uri.scheme_str(), roots) {
            (Some("http"), _) => None,
            (Some("https"), Some(roots)) => {
                let provider = rustls::crypto::CryptoProvider::get_default()
                    .cloned()
                    .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
                let config = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(|e| bad(e.to_string()))?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                Some(tokio_rustls::TlsConnector::from(Arc::new(config)))
            }
            (Some("https"), None) => return Err(bad("https needs trusted roots".into())),
            _ => return Err(bad("the URL must be http:// or https://".into())),
        };
        if uri.host().is_none() {
            return Err(bad("the URL has no host".into()));
        }
        Ok(UrlFetcher {
            url: url.to_owned(),
            uri,
            tls,
        })
    }

    async fn fetch_jwks(&self) -> Result<Jwks> {
        let json = tokio::time::timeout(FETCH_TIMEOUT, self.fetch())
            .await
            .map_err(|_| "timed out".to_owned())
            .and_then(|r| r)
            .map_err(|reason| Error::Jwks {
                source_name: self.url.clone(),
                reason,
            })?;
        Jwks::parse(&json, &self.url)
    }

    async fn fetch(&self) -> std::result::Result<String, String> {
        let host = self.uri.host().unwrap_or_default();
        let bare_host = host.trim_start_matches('[').trim_end_matches(']');
        let port = self
            .uri
            .port_u16()
            .unwrap_or(if self.tls.is_some() { 443 } else { 80 });
        let tcp = tokio::net::TcpStream::connect((bare_host, port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let authority = self
            .uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_default();
        let request =
            http::Request::get(self.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
                .header(http::header::HOST, authority)
                .header(http::header::ACCEPT, "application/json")
                .body(http_body_util::Empty::<hyper::body::Bytes>::new())
                .map_err(|e| e.to_string())?;
        match &self.tls {
            None => send(hyper_util::rt::TokioIo::new(tcp), request).await,
            Some(connector) => {
                let name = rustls_pki_types::ServerName::try_from(bare_host.to_owned())
                    .map_err(|e| format!("server name {bare_host:?}: {e}"))?;
                let tls = connector
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                send(hyper_util::rt::TokioIo::new(tls), request).await
            }
        }
    }
}

async fn send<IO>(
    io: IO,
    request: http::Request<http_body_util::Empty<hyper::body::Bytes>>,
) -> std::result::Result<String, String>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    use http_body_util::BodyExt;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    let conn = tokio::spawn(conn);
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    let status = response.status();
    let body = http_body_util::Limited::new(response.into_body(), MAX_JWKS_BYTES)
        .collect()
        .await
        .map_err(|e| format!("reading the body: {e}"))?
        .to_bytes();
    conn.abort();
    if !status.is_success() {
        return Err(format!("HTTP status {status}"));
    }
    String::from_utf8(body.to_vec()).map_err(|_| "the body is not UTF-8".to_owned())
}

/// The claims meshid reads from a service-account token.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    #[serde(rename = "kubernetes.io")]
    kubernetes: Option<KubernetesClaims>,
}

#[derive(Debug, Deserialize)]
struct KubernetesClaims {
    namespace: Option<String>,
    serviceaccount: Option<NameUid>,
    pod: Option<NameUid>,
    node: Option<NameUid>,
}

#[derive(Debug, Deserialize)]
struct NameUid {
    name: String,
    uid: String,
}

/// Validates bearer JWTs.
#[derive(Debug)]
pub struct JwtAuthenticator {
    trust_domain: String,
    issuer: String,
    audiences: Vec<String>,
    jwks: JwksSource,
    directory: Arc<dyn PodDirectory>,
}

impl JwtAuthenticator {
    pub fn new(
        trust_domain: String,
        issuer: String,
        audiences: Vec<String>,
        jwks: JwksSource,
        directory: Arc<dyn PodDirectory>,
    ) -> Self {
        JwtAuthenticator {
            trust_domain,
            issuer,
            audiences,
            jwks,
            directory,
        }
    }

    async fn check(&self, token: &str) -> Result<Caller, AuthError> {
        use TokenRefusal as R;
        let fail = |kind: TokenRefusal, m: String| AuthError::Jwt(kind, m);
        let (alg, kid) = header_alg_and_kid(token).map_err(|(kind, m)| fail(kind, m))?;
        let matches = |k: &VerificationKey| k.alg == alg && (kid.is_none() || k.kid == kid);
        let mut jwks = self.jwks.current();
        if kid.is_some() && !jwks.keys.iter().any(matches) {
            // A signer that rotated its key: a JWKS URL may have it already.
            if let Some(fresh) = self.jwks.refetch_for_unknown_kid().await {
                jwks = fresh;
            }
        }
        let candidates: Vec<&VerificationKey> = jwks.keys.iter().filter(|k| matches(k)).collect();
        if candidates.is_empty() {
            return Err(fail(
                R::SigningKey,
                match &kid {
                    Some(kid) => {
                        format!("unknown signing key id {kid:?} (not in the JWKS for {alg:?})")
                    }
                    None => format!("no JWKS key for algorithm {alg:?}"),
                },
            ));
        }
        let mut validation = Validation::new(alg);
        validation.set_audience(&self.audiences);
        validation.set_issuer(&[&self.issuer]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = LEEWAY.as_secs();
        let mut claims = None;
        for key in &candidates {
            match jsonwebtoken::decode::<Claims>(token, &key.key, &validation) {
                Ok(data) => {
                    claims = Some(data.claims);
                    break;
                }
                Err(e) if matches!(e.kind(), jsonwebtoken::errors::ErrorKind::InvalidSignature) => {
                }
                Err(e) => {
                    let (kind, detail) = self.describe(&e);
                    return Err(fail(kind, detail));
                }
            }
        }
        let Some(claims) = claims else {
            return Err(fail(
                R::Signature,
                if kid.is_some() {
                    "the signature does not verify with the JWKS key of that id".into()
                } else {
                    "the signature does not verify with any JWKS key (unknown signing key)".into()
                },
            ));
        };
        let (ns, sa) = parse_service_account_subject(&claims.sub).ok_or_else(|| {
            fail(R::Claims, format!(
                "subject {:?} is not a service account (system:serviceaccount:<namespace>:<name>)",
                claims.sub
            ))
        })?;
        let k8s = claims.kubernetes.as_ref();
        if let Some(claimed) = k8s.and_then(|k| k.namespace.as_deref())
            && claimed != ns
        {
            return Err(fail(
                R::Claims,
                format!("kubernetes.io.namespace {claimed:?} does not match the subject's {ns:?}"),
            ));
        }
        if let Some(claimed) = k8s.and_then(|k| k.serviceaccount.as_ref())
            && claimed.name != sa
        {
            return Err(fail(
                R::Claims,
                format!(
                    "kubernetes.io.serviceaccount {:?} does not match the subject's {sa:?}",
                    claimed.name
                ),
            ));
        }
        let pod = k8s.and_then(|k| k.pod.as_ref()).ok_or_else(|| {
            fail(
                R::NotBoundToPod,
                "the token is not bound to a pod (no kubernetes.io.pod claim)".into(),
            )
        })?;
        let live = self
            .directory
            .live_pod(ns, &pod.name, &pod.uid)
            .await
            .map_err(|e| fail(R::Unverifiable, format!("pod lookup failed: {e}")))?
            .ok_or_else(|| {
                fail(
                    R::Invalidated,
                    format!(
                        "pod {ns}/{} (uid {}) is not running: the token's pod is gone",
                        pod.name, pod.uid
                    ),
                )
            })?;
        if live.service_account != sa {
            return Err(fail(
                R::Invalidated,
                format!(
                    "pod {ns}/{} runs as {:?}, not {sa:?}",
                    pod.name, live.service_account
                ),
            ));
        }
        if let Some(node) = k8s.and_then(|k| k.node.as_ref())
            && node.name != live.node
        {
            return Err(fail(
                R::Invalidated,
                format!(
                    "token is bound to node {:?} but pod {ns}/{} runs on {:?}",
                    node.name, pod.name, live.node
                ),
            ));
        }
        let id = SpiffeId::for_service_account(&self.trust_domain, ns, sa).map_err(|e| {
            fail(
                R::Claims,
                format!("the service account makes no valid SPIFFE ID: {e}"),
            )
        })?;
        Ok(Caller {
            id,
            namespace: ns.to_owned(),
            service_account: sa.to_owned(),
            node: Some(live.node),
            pod: Some(live.name),
            method: "jwt",
        })
    }

    fn describe(&self, e: &jsonwebtoken::errors::Error) -> (TokenRefusal, String) {
        use TokenRefusal as R;
        use jsonwebtoken::errors::ErrorKind;
        match e.kind() {
            ErrorKind::ExpiredSignature => (
                R::Expired,
                "the token has expired (exp is in the past)".into(),
            ),
            ErrorKind::ImmatureSignature => (
                R::NotYetValid,
                "the token is not valid yet (nbf is in the future)".into(),
            ),
            ErrorKind::InvalidAudience => (
                R::Audience,
                format!(
                    "wrong audience: the token's aud is not one of {:?}",
                    self.audiences
                ),
            ),
            ErrorKind::InvalidIssuer => (
                R::Issuer,
                format!("wrong issuer: the token's iss is not {:?}", self.issuer),
            ),
            ErrorKind::MissingRequiredClaim(c) => {
                (R::Claims, format!("the token has no {c:?} claim"))
            }
            ErrorKind::InvalidAlgorithm => (
                R::Algorithm,
                "the token's algorithm does not match its key".into(),
            ),
            ErrorKind::Json(_) | ErrorKind::InvalidClaimFormat(_) => {
                (R::Malformed, "the token's claims are malformed".into())
            }
            ErrorKind::Base64(_) | ErrorKind::InvalidToken | ErrorKind::Utf8(_) => {
                (R::Malformed, "the token is malformed".into())
            }
            other => (R::Malformed, format!("the token is invalid ({other:?})")),
        }
    }
}

/// Reads `alg` and `kid` from the header without trusting anything else,
/// so `none`, HMAC and unknown algorithms get a clear refusal.
fn header_alg_and_kid(
    token: &str,
) -> std::result::Result<(Algorithm, Option<String>), (TokenRefusal, String)> {
    let malformed = |m: &str| (TokenRefusal::Malformed, m.to_owned());
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed(
            "the token is not a JWT (expected three dot-separated parts)",
        ));
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header.trim_end_matches('='))
        .map_err(|_| malformed("the token header is not base64url"))?;
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|_| malformed("the token header is not JSON"))?;
    let alg = value
        .get("alg")
        .and_then(|a| a.as_str())
        .ok_or_else(|| malformed("the token header has no alg"))?;
    let alg = match alg {
        "RS256" => Algorithm::RS256,
        "ES256" => Algorithm::ES256,
        a if a.eq_ignore_ascii_case("none") => {
            return Err((
                TokenRefusal::Algorithm,
                "unsigned tokens (alg none) are not accepted".into(),
            ));
        }
        other => {
            return Err((
                TokenRefusal::Algorithm,
                format!("algorithm {other:?} is not accepted (only RS256 and ES256)"),
            ));
        }
    };
    let kid = value.get("kid").and_then(|k| k.as_str()).map(str::to_owned);
    Ok((alg, kid))
}

impl Authenticator for JwtAuthenticator {
    fn name(&self) -> &'static str {
        "jwt"
    }

    fn reads_cluster_id(&self) -> bool {
        true
    }

    fn authenticate<'a>(
        &'a self,
        ctx: AuthContext<'a>,
    ) -> BoxFuture<'a, Option<Result<Caller, AuthError>>> {
        Box::pin(async move {
            let token = ctx.bearer?;
            Some(self.check(token).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    }

    #[test]
    fn header_refusals_name_the_algorithm() {
        let t = |h: &str| format!("{}.{}.sig", b64(h), b64("{}"));
        assert!(
            header_alg_and_kid(&t(r#"{"alg":"none"}"#))
                .unwrap_err()
                .1
                .contains("alg none")
        );
        assert!(
            header_alg_and_kid(&t(r#"{"alg":"HS256"}"#))
                .unwrap_err()
                .1
                .contains("\"HS256\"")
        );
        let (kind, detail) = header_alg_and_kid("abc").unwrap_err();
        assert_eq!(kind, TokenRefusal::Malformed);
        assert!(detail.contains("three"));
        let (alg, kid) = header_alg_and_kid(&t(r#"{"alg":"ES256","kid":"k1"}"#)).unwrap();
        assert_eq!(alg, Algorithm::ES256);
        assert_eq!(kid.as_deref(), Some("k1"));
    }
}
