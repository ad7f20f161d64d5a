//! The Vault / OpenBao PKI signer: meshid-ca as a registration authority.
//!
//! The CA authenticates and authorizes as always, then asks Vault to sign
//! with `POST <mount>/sign/<role>`, passing the workload's CSR and the
//! authorized identity as `uri_sans`. The role must have
//! `use_csr_sans=false` (Vault then writes exactly the `uri_sans` it is
//! given, so a CSR without a SAN gets the right identity too), be limited to
//! `allowed_uri_sans=spiffe://<td>/*`, and have
//! `basic_constraints_valid_for_non_ca=true`; `sign-verbatim` is not used,
//! because it copies whatever the CSR asks for and needs a broader policy.
//! What Vault returns is checked against the profile ([`check`]) and refused
//! with `INTERNAL` when off-profile; an unreachable or sealed Vault is
//! `UNAVAILABLE`, within `--vault-timeout`.
//!
//! Roots come from the mount's issuers (every self-signed certificate in an
//! issuer's chain), polled, so `pki/root/rotate` plus a default-issuer change
//! is followed without a restart, both roots published while both issuers
//! exist. The CA's own serving certificate is issued by Vault as well
//! (`--vault-serving-role`), so clients verify the CA with the same root
//! bundle they trust for workloads.

pub mod auth;
pub mod check;
pub mod config;
pub mod http;
/// A real OpenBao dev server for tests and the e2e harness.
#[cfg(any(test, feature = "testing"))]
pub mod testing;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::FutureExt;
use futures::future::BoxFuture;
use meshid_common::cert::{CertInfo, cert_to_pem, parse_pem_certs};
use meshid_common::{PrivateKey, SpiffeId, TrustBundle};
use rustls_pki_types::CertificateDer;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use self::auth::{Auth, LoginCall};
pub use self::config::{SignerCli, SignerConfig, VaultAuth, VaultConfig};
use self::http::{Transport, VaultHttp};
use crate::error::{Error, Result};
use crate::sign::{CertSigner, Roots, SignRequest};
use crate::signer::Issued;

/// Signs through Vault's PKI secrets engine.
#[derive(Debug)]
pub struct VaultSigner {
    api: Api,
    config: VaultConfig,
    trust_domain: String,
    roots: watch::Sender<Arc<Roots>>,
    /// One roots refresh at a time.
    refreshing: tokio::sync::Mutex<()>,
}

/// The roots as read from Vault, before they get a generation.
#[derive(Debug, PartialEq)]
struct RootsRead {
    bundle: TrustBundle,
    signing_serial: String,
    signing_not_after: SystemTime,
}

impl VaultSigner {
    /// Connects, logs in and reads the roots: a CA that cannot reach Vault
    /// at start has nothing to publish, so this fails with a message naming
    /// Vault.
    pub async fn connect(config: VaultConfig, trust_domain: &str) -> Result<Arc<Self>> {
        let roots = match &config.ca_cert {
            Some(path) => Some(crate::app::root_store(path)?),
            None => None,
        };
        let api = Api {
            http: VaultHttp::new(&config.addr, roots, config.timeout).map_err(Error::Config)?,
            auth: Auth::new(config.auth.clone()),
        };
        let read = read_roots(&api, &config.mount).await?;
        let roots = Arc::new(Roots {
            bundle_pem: read.bundle.to_pem(),
            bundle: read.bundle,
            signing_serial: read.signing_serial,
            signing_not_after: read.signing_not_after,
            generation: 0,
        });
        let signer = Arc::new(VaultSigner {
            api,
            trust_domain: trust_domain.to_owned(),
            config,
            roots: watch::channel(roots.clone()).0,
            refreshing: tokio::sync::Mutex::new(()),
        });
        tracing::info!(
            vault.addr = %signer.api.http.addr(),
            vault.mount = %signer.config.mount,
            vault.role = %signer.config.role,
            vault.auth = signer.api.auth.method_name(),
            roots = roots.bundle.roots().len(),
            cert.serial = %roots.signing_serial,
            "signing through Vault PKI"
        );
        Ok(signer)
    }

    /// Reads the roots every `--vault-roots-poll-interval` until `cancel`;
    /// a failed read keeps the roots in use.
    pub async fn follow_roots(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(self.config.roots_poll_interval) => {}
            }
            if let Err(e) = self.refresh_roots().await {
                tracing::warn!(error = %e, "Vault roots not refreshed; keeping the ones in use");
            }
        }
    }

    /// Reads the roots now; publishes them when they changed.
    pub async fn refresh_roots(&self) -> Result<bool> {
        let _one = self.refreshing.lock().await;
        let read = read_roots(&self.api, &self.config.mount).await?;
        let current = self.roots.borrow().clone();
        if current.bundle == read.bundle && current.signing_serial == read.signing_serial {
            return Ok(false);
        }
        let generation = current.generation + 1;
        let roots = Roots {
            bundle_pem: read.bundle.to_pem(),
            bundle: read.bundle,
            signing_serial: read.signing_serial,
            signing_not_after: read.signing_not_after,
            generation,
        };
        {
            let serials: Vec<String> = roots.bundle.infos().map(|i| i.serial).collect();
            tracing::info!(roots = ?serials, cert.serial = %roots.signing_serial, generation, "Vault roots or issuer changed");
        }
        self.roots.send_replace(Arc::new(roots));
        Ok(true)
    }

    /// `sign/<role>` with the CSR, answered as leaf + intermediates.
    async fn sign_csr(
        &self,
        role: &str,
        body: serde_json::Value,
    ) -> Result<Vec<CertificateDer<'static>>> {
        let path = format!("{}/sign/{role}", self.config.mount);
        let answer = self
            .api
            .call(::http::Method::POST, &path, Some(&body))
            .await?;
        let data = answer.get("data").cloned().unwrap_or_default();
        let leaf_pem = data
            .get("certificate")
            .and_then(|c| c.as_str())
            .ok_or_else(|| self.api.refused(&path, 200, "no certificate in the answer"))?;
        let mut chain = vec![first_cert(leaf_pem).map_err(|e| self.api.refused(&path, 200, &e))?];
        // Intermediates: the issuing CA and its chain, roots left out (they
        // travel as the bundle).
        let mut pems: Vec<String> = Vec::new();
        if let Some(issuing) = data.get("issuing_ca").and_then(|c| c.as_str()) {
            pems.push(issuing.to_owned());
        }
        if let Some(list) = data.get("ca_chain").and_then(|c| c.as_array()) {
            pems.extend(list.iter().filter_map(|c| c.as_str().map(str::to_owned)));
        }
        for pem in pems {
            for cert in parse_pem_certs(&pem).unwrap_or_default() {
                if !meshid_common::cert::is_self_signed(&cert) && !chain.contains(&cert) {
                    chain.push(cert);
                }
            }
        }
        Ok(chain)
    }

    /// Checks with the roots in use; when that fails, reads the roots once
    /// more (Vault may have switched issuers since the last poll) and checks
    /// again.
    async fn checked<T>(
        &self,
        check: impl Fn(&TrustBundle) -> std::result::Result<T, String>,
    ) -> std::result::Result<T, String> {
        let first = check(&self.roots.borrow().bundle);
        match first {
            Ok(v) => Ok(v),
            Err(e) if e.contains("published roots") => {
                if let Err(refresh) = self.refresh_roots().await {
                    tracing::warn!(error = %refresh, "Vault roots not refreshed");
                }
                check(&self.roots.borrow().bundle)
            }
            Err(e) => Err(e),
        }
    }

    async fn sign_leaf(&self, request: SignRequest<'_>) -> Result<Issued> {
        let ttl = request.ttl.max(Duration::from_secs(1));
        let body = serde_json::json!({
            "csr": request.csr_pem,
            "uri_sans": request.id.as_str(),
            "ttl": format!("{}s", ttl.as_secs()),
            "format": "pem",
            "exclude_cn_from_sans": true,
        });
        let chain = self.sign_csr(&self.config.role, body).await?;
        let now = SystemTime::now();
        let leaf = self
            .checked(|roots| {
                check::check_leaf(&chain, roots, request.id, request.public_key_spki, ttl, now)
            })
            .await
            .map_err(|reason| Error::OffProfile {
                id: request.id.to_string(),
                role: self.config.role.clone(),
                reason,
            })?;
        let roots = self.roots.borrow().clone();
        let mut pems: Vec<String> = chain.iter().map(|c| cert_to_pem(c)).collect();
        pems.push(roots.bundle_pem.clone());
        Ok(Issued { chain: pems, leaf })
    }

    async fn sign_serving(
        &self,
        key: &PrivateKey,
        dns_names: &[String],
        ips: &[IpAddr],
        ttl: Duration,
    ) -> Result<Vec<CertificateDer<'static>>> {
        // Vault wants a CSR: the key's, naming the CA's own SPIFFE ID (a role
        // with use_csr_sans=false ignores it; alt_names and ip_sans decide).
        let probe = SpiffeId::for_service_account(&self.trust_domain, "istio-system", "istiod")?;
        let csr = key.csr_for(&probe)?;
        let body = serde_json::json!({
            "csr": csr,
            "common_name": dns_names.first().cloned().unwrap_or_default(),
            "alt_names": dns_names.join(","),
            "ip_sans": ips.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
            "ttl": format!("{}s", ttl.as_secs()),
            "format": "pem",
        });
        let chain = self.sign_csr(&self.config.serving_role, body).await?;
        let now = SystemTime::now();
        self.checked(|roots| check::check_serving(&chain, roots, dns_names, now))
            .await
            .map_err(|reason| {
                Error::Tls(format!(
                    "Vault role {:?} issued an unusable serving certificate: {reason}",
                    self.config.serving_role
                ))
            })?;
        Ok(chain)
    }
}

impl CertSigner for VaultSigner {
    fn kind(&self) -> &'static str {
        "vault"
    }

    fn sign<'a>(&'a self, request: SignRequest<'a>) -> BoxFuture<'a, Result<Issued>> {
        self.sign_leaf(request).boxed()
    }

    fn issue_serving<'a>(
        &'a self,
        key: &'a PrivateKey,
        dns_names: &'a [String],
        ips: &'a [IpAddr],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Vec<CertificateDer<'static>>>> {
        self.sign_serving(key, dns_names, ips, ttl).boxed()
    }

    fn roots(&self) -> Arc<Roots> {
        self.roots.borrow().clone()
    }

    fn subscribe(&self) -> watch::Receiver<Arc<Roots>> {
        self.roots.subscribe()
    }
}

/// The PEM of an issuer answer's chain (`ca_chain`, else `certificate`).
fn chain_pem(answer: &serde_json::Value) -> String {
    let data = answer.get("data");
    let mut out = String::new();
    if let Some(list) = data
        .and_then(|d| d.get("ca_chain"))
        .and_then(|c| c.as_array())
    {
        for pem in list.iter().filter_map(|c| c.as_str()) {
            out.push_str(pem);
            out.push('\n');
        }
    }
    if let Some(pem) = data
        .and_then(|d| d.get("certificate"))
        .and_then(|c| c.as_str())
    {
        out.push_str(pem);
        out.push('\n');
    }
    out
}

fn first_cert(pem: &str) -> std::result::Result<CertificateDer<'static>, String> {
    parse_pem_certs(pem)
        .map_err(|e| e.to_string())?
        .into_iter()
        .next()
        .ok_or_else(|| "no certificate in the PEM".to_owned())
}

/// The authenticated side of the Vault API.
#[derive(Debug)]
struct Api {
    http: VaultHttp,
    auth: Auth,
}

impl Api {
    /// One authenticated call; a 403 gets a fresh token and one retry.
    async fn call(
        &self,
        method: ::http::Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value> {
        let mut retried = false;
        loop {
            let token = self.auth.token(self).await?;
            let answer = self
                .http
                .call(method.clone(), path, Some(token.value.as_str()), body)
                .await
                .map_err(|e| self.unavailable(path, e))?;
            let status = answer.status.as_u16();
            if answer.status.is_success() {
                return Ok(answer.json());
            }
            if status == 403 && !retried {
                retried = true;
                self.auth.invalidate();
                continue;
            }
            return Err(self.failed(path, &answer));
        }
    }

    /// A non-2xx answer: 5xx (503 is sealed or standby) and 429 are Vault
    /// being unavailable, the rest a refusal.
    fn failed(&self, path: &str, answer: &http::Answer) -> Error {
        let status = answer.status.as_u16();
        if answer.status.is_server_error() || status == 429 {
            return Error::VaultUnavailable {
                addr: self.http.addr().to_owned(),
                reason: format!("{path}: HTTP {status}: {}", answer.errors()),
            };
        }
        self.refused(path, status, &answer.errors())
    }

    fn unavailable(&self, path: &str, e: Transport) -> Error {
        // A broken connection may be a restarted Vault: dial afresh next time.
        self.http.reset();
        Error::VaultUnavailable {
            addr: self.http.addr().to_owned(),
            reason: format!("{path}: {e}"),
        }
    }

    fn refused(&self, path: &str, status: u16, errors: &str) -> Error {
        Error::VaultRefused {
            addr: self.http.addr().to_owned(),
            path: path.to_owned(),
            status,
            errors: errors.to_owned(),
        }
    }
}

impl LoginCall for Api {
    fn login<'a>(
        &'a self,
        path: String,
        body: serde_json::Value,
    ) -> BoxFuture<'a, Result<serde_json::Value>> {
        async move {
            let answer = self
                .http
                .call(::http::Method::POST, &path, None, Some(&body))
                .await
                .map_err(|e| self.unavailable(&path, e))?;
            if answer.status.is_success() {
                Ok(answer.json())
            } else {
                Err(self.failed(&path, &answer))
            }
        }
        .boxed()
    }
}

/// Every self-signed certificate in any issuer's chain of the mount (an
/// expired one left out), oldest first, and the default issuer.
async fn read_roots(api: &Api, mount: &str) -> Result<RootsRead> {
    let list = api
        .call(
            ::http::Method::GET,
            &format!("{mount}/issuers?list=true"),
            None,
        )
        .await?;
    let ids: Vec<String> = list
        .pointer("/data/keys")
        .and_then(|k| k.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|k| k.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let default_path = format!("{mount}/issuer/default");
    let default = api.call(::http::Method::GET, &default_path, None).await?;
    let signing_pem = default
        .pointer("/data/certificate")
        .and_then(|c| c.as_str())
        .ok_or_else(|| api.refused(&default_path, 200, "no certificate in the answer"))?;
    let signing = first_cert(signing_pem).map_err(|e| api.refused(&default_path, 200, &e))?;
    let signing_info = CertInfo::from_der(&signing)?;
    let now = SystemTime::now();
    let mut roots: Vec<(SystemTime, CertificateDer<'static>)> = Vec::new();
    let mut add = |pem: &str| {
        for cert in parse_pem_certs(pem).unwrap_or_default() {
            if !meshid_common::cert::is_self_signed(&cert) || roots.iter().any(|(_, c)| *c == cert)
            {
                continue;
            }
            match CertInfo::from_der(&cert) {
                Ok(info) if info.not_after > now => roots.push((info.not_before, cert)),
                _ => {}
            }
        }
    };
    add(&chain_pem(&default));
    for id in &ids {
        let issuer = api
            .call(::http::Method::GET, &format!("{mount}/issuer/{id}"), None)
            .await?;
        add(&chain_pem(&issuer));
    }
    roots.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.as_ref().cmp(b.1.as_ref())));
    if roots.is_empty() {
        return Err(api.refused(
            &format!("{mount}/issuers"),
            200,
            "no valid root certificate in any issuer",
        ));
    }
    Ok(RootsRead {
        bundle: TrustBundle::new(roots.into_iter().map(|(_, c)| c).collect())?,
        signing_serial: signing_info.serial,
        signing_not_after: signing_info.not_after,
    })
}
