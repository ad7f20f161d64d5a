//! The CA's Vault token: read from a file (re-read whenever the file
//! changes, so an external renewer such as Vault Agent can replace it), or
//! obtained by Vault's Kubernetes auth method (`auth/<mount>/login` with the
//! CA's service-account JWT) and renewed by logging in again once two thirds
//! of its lease have passed.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use zeroize::Zeroizing;

use super::config::VaultAuth;

/// A token with the point after which it is obtained again.
#[derive(Clone)]
pub struct Token {
    pub value: Arc<Zeroizing<String>>,
    renew_at: Option<Instant>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token([redacted])")
    }
}

type Stamp = (SystemTime, u64, u64);

/// Where tokens come from, and the one in use.
#[derive(Debug)]
pub struct Auth {
    method: VaultAuth,
    cached: Mutex<Option<(Option<Stamp>, Token)>>,
    /// One login at a time.
    login: tokio::sync::Mutex<()>,
}

/// What a login needs from the signer: one unauthenticated call.
pub trait LoginCall: Send + Sync {
    fn login<'a>(
        &'a self,
        path: String,
        body: serde_json::Value,
    ) -> futures::future::BoxFuture<'a, crate::Result<serde_json::Value>>;
}

impl Auth {
    pub fn new(method: VaultAuth) -> Self {
        Auth {
            method,
            cached: Mutex::new(None),
            login: tokio::sync::Mutex::new(()),
        }
    }

    pub fn method_name(&self) -> &'static str {
        match self.method {
            VaultAuth::Token { .. } => "token",
            VaultAuth::Kubernetes { .. } => "kubernetes",
        }
    }

    /// The token to use now.
    pub async fn token(&self, client: &dyn LoginCall) -> crate::Result<Token> {
        match &self.method {
            VaultAuth::Token { token_file } => self.read_file(token_file),
            VaultAuth::Kubernetes {
                role,
                jwt_file,
                mount,
            } => {
                if let Some(t) = self.fresh() {
                    return Ok(t);
                }
                let _one = self.login.lock().await;
                if let Some(t) = self.fresh() {
                    return Ok(t);
                }
                let token = kube_login(client, role, jwt_file, mount).await?;
                *self.cached.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some((None, token.clone()));
                Ok(token)
            }
        }
    }

    /// Vault refused the token (403): forget it, so the next call reads the
    /// file again or logs in again.
    pub fn invalidate(&self) {
        *self.cached.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn fresh(&self) -> Option<Token> {
        let cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        let (_, token) = cached.as_ref()?;
        match token.renew_at {
            Some(at) if Instant::now() >= at => None,
            _ => Some(token.clone()),
        }
    }

    fn read_file(&self, path: &Path) -> crate::Result<Token> {
        let io = |source| crate::Error::Io {
            path: path.to_owned(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(io)?;
        let stamp = (
            meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            meta.len(),
            meta.ino(),
        );
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((Some(s), token)) = cached.as_ref()
            && *s == stamp
        {
            return Ok(token.clone());
        }
        let value = Zeroizing::new(std::fs::read_to_string(path).map_err(io)?);
        let trimmed = value.trim();
        if trimmed.is_empty() {
            return Err(crate::Error::Config(format!(
                "Vault token file {} is empty",
                path.display()
            )));
        }
        let token = Token {
            value: Arc::new(Zeroizing::new(trimmed.to_owned())),
            renew_at: None,
        };
        if cached.is_some() {
            tracing::info!(path = %path.display(), "Vault token file changed: using the new token");
        }
        *cached = Some((Some(stamp), token.clone()));
        Ok(token)
    }
}

async fn kube_login(
    client: &dyn LoginCall,
    role: &str,
    jwt_file: &PathBuf,
    mount: &str,
) -> crate::Result<Token> {
    let jwt =
        Zeroizing::new(
            std::fs::read_to_string(jwt_file).map_err(|source| crate::Error::Io {
                path: jwt_file.clone(),
                source,
            })?,
        );
    let body = serde_json::json!({ "role": role, "jwt": jwt.trim() });
    let answer = client.login(format!("auth/{mount}/login"), body).await?;
    let auth = answer.get("auth").cloned().unwrap_or_default();
    let value = auth
        .get("client_token")
        .and_then(|t| t.as_str())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            crate::Error::Config(format!(
                "auth/{mount}/login answered without a client_token"
            ))
        })?;
    let lease = auth
        .get("lease_duration")
        .and_then(|l| l.as_u64())
        .unwrap_or(0);
    // Log in again at two thirds of the lease; a lease of 0 never expires.
    let renew_at = (lease > 0).then(|| Instant::now() + Duration::from_secs(lease * 2 / 3));
    tracing::info!(
        role,
        lease_secs = lease,
        "logged in to Vault (kubernetes auth)"
    );
    Ok(Token {
        value: Arc::new(Zeroizing::new(value.to_owned())),
        renew_at,
    })
}
