//! The `--signer` choice and the Vault settings: clap flags with Vault's own
//! environment names (`VAULT_ADDR`, `VAULT_CACERT`, `VAULT_CLIENT_TIMEOUT`)
//! and meshid's for the rest, resolved through the CA's one [`Layers`].

use std::path::PathBuf;
use std::time::Duration;

use meshid_common::config::{Layers, parse_duration, serialize_duration};
use serde::Serialize;

use crate::error::{Error, Result};

pub const DEFAULT_SIGNER: &str = "builtin";
pub const DEFAULT_VAULT_MOUNT: &str = "pki";
pub const DEFAULT_VAULT_AUTH: &str = "token";
pub const DEFAULT_VAULT_KUBE_MOUNT: &str = "kubernetes";
pub const DEFAULT_VAULT_KUBE_JWT_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
pub const DEFAULT_VAULT_TIMEOUT: &str = "5s";
pub const DEFAULT_VAULT_ROOTS_POLL: &str = "10s";

/// The signer flags (flattened into the CA's `Cli`).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct SignerCli {
    /// Who signs workload certificates: `builtin` (the CA's own key) or
    /// `vault` (Vault / OpenBao PKI; the CA only authenticates and
    /// authorizes) [env: CA_SIGNER] [default: builtin]
    #[arg(long)]
    pub signer: Option<String>,

    /// Vault address, https:// (http:// only for a dev server) [env: VAULT_ADDR]
    #[arg(long)]
    pub vault_addr: Option<String>,

    /// Path of the PKI secrets engine [env: VAULT_PKI_MOUNT] [default: pki]
    #[arg(long)]
    pub vault_mount: Option<String>,

    /// PKI role workload leaves are signed with (`<mount>/sign/<role>`) [env: VAULT_PKI_ROLE]
    #[arg(long)]
    pub vault_role: Option<String>,

    /// PKI role of the CA's own serving certificate (DNS and IP SANs) [env: VAULT_PKI_SERVING_ROLE] [default: --vault-role]
    #[arg(long)]
    pub vault_serving_role: Option<String>,

    /// How the CA logs in to Vault: `token` or `kubernetes` [env: VAULT_AUTH] [default: token]
    #[arg(long)]
    pub vault_auth: Option<String>,

    /// File holding a Vault token, re-read when it changes (`--vault-auth token`) [env: VAULT_TOKEN_FILE]
    #[arg(long)]
    pub vault_token_file: Option<PathBuf>,

    /// PEM roots the Vault server certificate must chain to [env: VAULT_CACERT]
    #[arg(long)]
    pub vault_ca_cert: Option<PathBuf>,

    /// Role of Vault's Kubernetes auth method (`--vault-auth kubernetes`) [env: VAULT_KUBE_ROLE]
    #[arg(long)]
    pub vault_kube_role: Option<String>,

    /// Service-account JWT presented to Vault's Kubernetes auth method, re-read at each login [env: VAULT_KUBE_JWT_FILE] [default: /var/run/secrets/kubernetes.io/serviceaccount/token]
    #[arg(long)]
    pub vault_kube_jwt_file: Option<PathBuf>,

    /// Path of Vault's Kubernetes auth method [env: VAULT_KUBE_AUTH_MOUNT] [default: kubernetes]
    #[arg(long)]
    pub vault_kube_mount: Option<String>,

    /// Deadline of one call to Vault [env: VAULT_CLIENT_TIMEOUT] [default: 5s]
    #[arg(long)]
    pub vault_timeout: Option<String>,

    /// How often the roots are read again from Vault (issuer rotation) [default: 10s]
    #[arg(long)]
    pub vault_roots_poll_interval: Option<String>,
}

/// Which signer the CA uses.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum SignerConfig {
    Builtin,
    Vault(Box<VaultConfig>),
}

/// How the CA authenticates to Vault.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(tag = "method", rename_all = "lowercase")]
pub enum VaultAuth {
    Token {
        token_file: PathBuf,
    },
    Kubernetes {
        role: String,
        jwt_file: PathBuf,
        mount: String,
    },
}

/// Settings of the Vault PKI signer.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct VaultConfig {
    pub addr: String,
    pub mount: String,
    pub role: String,
    pub serving_role: String,
    pub auth: VaultAuth,
    pub ca_cert: Option<PathBuf>,
    #[serde(serialize_with = "serialize_duration")]
    pub timeout: Duration,
    #[serde(serialize_with = "serialize_duration")]
    pub roots_poll_interval: Duration,
}

impl SignerConfig {
    /// Resolves the flags against the environment; a Vault signer with a
    /// setting missing is an error that names the flag.
    pub fn resolve(cli: SignerCli, layers: &Layers<'_>) -> Result<Self> {
        let text = |flag: Option<String>, key: &str| flag.or_else(|| layers.env(key));
        let bad = |m: String| Error::Config(m);
        let duration = |flag: Option<String>, key: Option<&str>, default: &str, name: &str| {
            let default = parse_duration(default).expect("DEFAULT_* durations parse");
            layers
                .duration(flag, key, default, name)
                .map_err(|e| Error::Config(e.0))
        };
        let kind = text(cli.signer, "CA_SIGNER").unwrap_or_else(|| DEFAULT_SIGNER.into());
        match kind.as_str() {
            "builtin" => return Ok(SignerConfig::Builtin),
            "vault" => {}
            other => {
                return Err(bad(format!(
                    "--signer {other:?}: expected `builtin` or `vault`"
                )));
            }
        }
        let addr = text(cli.vault_addr, "VAULT_ADDR")
            .ok_or_else(|| bad("--signer vault needs --vault-addr (VAULT_ADDR)".into()))?;
        let role = text(cli.vault_role, "VAULT_PKI_ROLE")
            .ok_or_else(|| bad("--signer vault needs --vault-role (VAULT_PKI_ROLE)".into()))?;
        let serving_role =
            text(cli.vault_serving_role, "VAULT_PKI_SERVING_ROLE").unwrap_or_else(|| role.clone());
        let mount = text(cli.vault_mount, "VAULT_PKI_MOUNT")
            .unwrap_or_else(|| DEFAULT_VAULT_MOUNT.into())
            .trim_matches('/')
            .to_owned();
        let method =
            text(cli.vault_auth, "VAULT_AUTH").unwrap_or_else(|| DEFAULT_VAULT_AUTH.into());
        let auth = match method.as_str() {
            "token" => VaultAuth::Token {
                token_file: cli
                    .vault_token_file
                    .or_else(|| layers.env("VAULT_TOKEN_FILE").map(PathBuf::from))
                    .ok_or_else(|| {
                        bad("--vault-auth token needs --vault-token-file (VAULT_TOKEN_FILE)".into())
                    })?,
            },
            "kubernetes" => VaultAuth::Kubernetes {
                role: text(cli.vault_kube_role, "VAULT_KUBE_ROLE").ok_or_else(|| {
                    bad("--vault-auth kubernetes needs --vault-kube-role (VAULT_KUBE_ROLE)".into())
                })?,
                jwt_file: cli
                    .vault_kube_jwt_file
                    .or_else(|| layers.env("VAULT_KUBE_JWT_FILE").map(PathBuf::from))
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_VAULT_KUBE_JWT_FILE)),
                mount: text(cli.vault_kube_mount, "VAULT_KUBE_AUTH_MOUNT")
                    .unwrap_or_else(|| DEFAULT_VAULT_KUBE_MOUNT.into())
                    .trim_matches('/')
                    .to_owned(),
            },
            other => {
                return Err(bad(format!(
                    "--vault-auth {other:?}: expected `token` or `kubernetes`"
                )));
            }
        };
        Ok(SignerConfig::Vault(Box::new(VaultConfig {
            addr,
            mount,
            role,
            serving_role,
            auth,
            ca_cert: cli
                .vault_ca_cert
                .or_else(|| layers.env("VAULT_CACERT").map(PathBuf::from)),
            timeout: duration(
                cli.vault_timeout,
                Some("VAULT_CLIENT_TIMEOUT"),
                DEFAULT_VAULT_TIMEOUT,
                "VAULT_CLIENT_TIMEOUT (--vault-timeout)",
            )?,
            roots_poll_interval: duration(
                cli.vault_roots_poll_interval,
                None,
                DEFAULT_VAULT_ROOTS_POLL,
                "--vault-roots-poll-interval",
            )?,
        })))
    }

    /// Checks what resolving could not: the address scheme, non-zero times.
    pub fn validate(&self) -> Result<()> {
        let SignerConfig::Vault(v) = self else {
            return Ok(());
        };
        let bad = |m: String| Err(Error::Config(m));
        match v.addr.parse::<http::Uri>() {
            Ok(uri)
                if matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some() => {}
            _ => {
                return bad(format!(
                    "--vault-addr {:?}: expected http(s)://host[:port]",
                    v.addr
                ));
            }
        }
        if v.timeout.is_zero() || v.roots_poll_interval.is_zero() {
            return bad("--vault-timeout and --vault-roots-poll-interval must be positive".into());
        }
        for (name, value) in [("--vault-role", &v.role), ("--vault-mount", &v.mount)] {
            if value.is_empty() || value.contains(['?', '#', ' ']) {
                return bad(format!("{name} {value:?} is not a Vault path segment"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn resolve(args: &[&str], env: &[(&str, &str)]) -> Result<SignerConfig> {
        #[derive(clap::Parser)]
        struct Wrap {
            #[command(flatten)]
            s: SignerCli,
        }
        use clap::Parser;
        let cli = Wrap::try_parse_from(std::iter::once("x").chain(args.iter().copied()))
            .unwrap()
            .s;
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect();
        SignerConfig::resolve(cli, &Layers::new(&env))
    }

    #[test]
    fn builtin_is_the_default_and_vault_reads_vaults_env_names() {
        assert_eq!(resolve(&[], &[]).unwrap(), SignerConfig::Builtin);
        let c = resolve(
            &["--signer", "vault", "--vault-role", "mesh"],
            &[
                ("VAULT_ADDR", "https://vault:8200"),
                ("VAULT_CACERT", "/etc/vault/ca.pem"),
                ("VAULT_TOKEN_FILE", "/run/token"),
                ("VAULT_CLIENT_TIMEOUT", "2s"),
            ],
        )
        .unwrap();
        let SignerConfig::Vault(v) = &c else {
            panic!("{c:?}")
        };
        assert_eq!(v.addr, "https://vault:8200");
        assert_eq!(v.mount, "pki");
        assert_eq!(v.serving_role, "mesh");
        assert_eq!(v.ca_cert, Some(PathBuf::from("/etc/vault/ca.pem")));
        assert_eq!(v.timeout, Duration::from_secs(2));
        assert_eq!(
            v.auth,
            VaultAuth::Token {
                token_file: "/run/token".into()
            }
        );
        c.validate().unwrap();
    }

    #[test]
    fn missing_or_bad_vault_settings_are_named() {
        let err = |args: &[&str], env: &[(&str, &str)]| {
            resolve(args, env)
                .and_then(|c| c.validate())
                .unwrap_err()
                .to_string()
        };
        assert!(err(&["--signer", "hsm"], &[]).contains("--signer \"hsm\""));
        assert!(err(&["--signer", "vault"], &[]).contains("--vault-addr"));
        let addr = [("VAULT_ADDR", "https://v:8200")];
        assert!(err(&["--signer", "vault"], &addr).contains("--vault-role"));
        let base = ["--signer", "vault", "--vault-role", "r"];
        assert!(err(&base, &addr).contains("--vault-token-file"));
        let kube = [
            "--signer",
            "vault",
            "--vault-role",
            "r",
            "--vault-auth",
            "kubernetes",
        ];
        assert!(err(&kube, &addr).contains("--vault-kube-role"));
        let bad_addr = [("VAULT_ADDR", "vault:8200"), ("VAULT_TOKEN_FILE", "/t")];
        assert!(err(&base, &bad_addr).contains("--vault-addr"));
    }
}
