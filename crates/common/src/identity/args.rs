//! The settings of every component that asks the CA for certificates (the
//! agent for its pod, the ztunnel for its node's workloads): one set of
//! flags, [`CaClientArgs`], flattened into each binary's command line, and
//! one [`CaClientArgs::resolve`] (flag, then Istio's environment variable,
//! then the default) into [`CaClientSettings`].

use std::path::PathBuf;
use std::time::Duration;

use super::RenewalPolicy;
use crate::ca_client::{
    CaClientConfig, DEFAULT_CA_ADDRESS, DEFAULT_CA_SERVER_NAME, DEFAULT_CONNECT_TIMEOUT,
};
use crate::config::{EnvSource, Layers, SettingError, format_duration, serialize_duration};
use crate::error::{Error, Result};
use crate::keys::KeyType;

pub const DEFAULT_CA_ROOT_CA: &str = "./var/run/secrets/istio/root-cert.pem";
pub const DEFAULT_TOKEN_PATH: &str = "./var/run/secrets/tokens/istio-token";
pub const DEFAULT_SECRET_TTL: Duration = Duration::from_secs(24 * 3600);
/// Istio's `MAX_WORKLOAD_CERT_TTL`: the CA refuses to sign for longer.
pub const MAX_SECRET_TTL: Duration = Duration::from_secs(90 * 24 * 3600);
pub const DEFAULT_GRACE_PERIOD_RATIO: f64 = 0.5;
pub const DEFAULT_GRACE_PERIOD_RATIO_JITTER: f64 = 0.01;
pub const DEFAULT_KEY_TYPE: KeyType = KeyType::EcdsaP256;
/// Istio's default `CLUSTER_ID`.
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";
/// First retry delay after a failed CSR; doubles up to [`DEFAULT_MAX_BACKOFF`].
pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_millis(500);
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long one CA call may take.
pub const DEFAULT_CA_TIMEOUT: Duration = Duration::from_secs(10);

/// How to reach the CA and when to renew: the flags the agent and the
/// ztunnel share. Each falls back to the environment variable in its help.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct CaClientArgs {
    /// CA address, `https://host:port` or `host:port` [env: CA_ADDRESS] [default: https://localhost:15012]
    #[arg(long)]
    pub ca_address: Option<String>,
    /// PEM roots that verify the CA's serving certificate, re-read before each CSR [env: CA_ROOT_CA] [default: ./var/run/secrets/istio/root-cert.pem]
    #[arg(long)]
    pub ca_root_ca: Option<PathBuf>,
    /// DNS name checked in the CA's certificate [default: istiod.istio-system.svc]
    #[arg(long)]
    pub ca_server_name: Option<String>,
    /// Service-account token, read at every CSR [env: AUTH_TOKEN] [default: ./var/run/secrets/tokens/istio-token]
    #[arg(long)]
    pub token_path: Option<PathBuf>,
    /// Sent to the CA as `clusterid` [env: CLUSTER_ID] [default: Kubernetes]
    #[arg(long)]
    pub cluster_id: Option<String>,
    /// Requested certificate TTL, e.g. `24h`, `90s` [env: SECRET_TTL] [default: 24h]
    #[arg(long)]
    pub secret_ttl: Option<String>,
    /// Renew when this fraction of the life remains [env: SECRET_GRACE_PERIOD_RATIO] [default: 0.5]
    #[arg(long)]
    pub secret_grace_period_ratio: Option<f64>,
    /// ± jitter on the ratio [env: SECRET_GRACE_PERIOD_RATIO_JITTER] [default: 0.01]
    #[arg(long)]
    pub secret_grace_period_ratio_jitter: Option<f64>,
    /// Workload key: ecdsa-p256, ecdsa-p384 or rsa-2048 [env: ECC_SIGNATURE_ALGORITHM] [default: ecdsa-p256]
    #[arg(long)]
    pub key_type: Option<String>,
    /// First retry delay after a failed CSR, e.g. `500ms` [default: 500ms]
    #[arg(long)]
    pub initial_backoff: Option<String>,
    /// Retry delay cap, e.g. `30s` [default: 30s]
    #[arg(long)]
    pub max_backoff: Option<String>,
    /// Time limit of one CA call, e.g. `10s` [default: 10s]
    #[arg(long)]
    pub ca_timeout: Option<String>,
    /// TCP + TLS connect deadline to the CA, e.g. `5s` [default: 5s]
    #[arg(long)]
    pub ca_connect_timeout: Option<String>,
}

/// The resolved and validated [`CaClientArgs`].
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct CaClientSettings {
    /// Always `https://…`: Istio's `host:port` form gets the scheme added.
    pub address: String,
    pub root_ca: PathBuf,
    pub server_name: String,
    pub token_path: PathBuf,
    pub cluster_id: String,
    #[serde(serialize_with = "serialize_duration")]
    pub ttl: Duration,
    pub key_type: KeyType,
    #[serde(flatten)]
    pub policy: RenewalPolicy,
    #[serde(serialize_with = "serialize_duration")]
    pub ca_timeout: Duration,
    #[serde(serialize_with = "serialize_duration")]
    pub connect_timeout: Duration,
}

impl Default for CaClientSettings {
    fn default() -> Self {
        CaClientArgs::default()
            .resolve(&std::collections::HashMap::<String, String>::new())
            .expect("the defaults are valid")
    }
}

impl CaClientArgs {
    /// Flags, then environment, then defaults; then validation. Errors name
    /// the setting and the value.
    pub fn resolve(self, env: &dyn EnvSource) -> Result<CaClientSettings, SettingError> {
        let layers = Layers::new(env);
        let key_type = match self
            .key_type
            .or_else(|| layers.env("ECC_SIGNATURE_ALGORITHM"))
        {
            Some(s) => s
                .parse::<KeyType>()
                .map_err(|e| SettingError(format!("ECC_SIGNATURE_ALGORITHM: {e}")))?,
            None => DEFAULT_KEY_TYPE,
        };
        let mut address = self
            .ca_address
            .or_else(|| layers.env("CA_ADDRESS"))
            .unwrap_or_else(|| DEFAULT_CA_ADDRESS.to_owned());
        if !address.contains("://") {
            address = format!("https://{address}");
        }
        let settings = CaClientSettings {
            address,
            root_ca: self
                .ca_root_ca
                .or_else(|| layers.env("CA_ROOT_CA").map(PathBuf::from))
                .unwrap_or_else(|| PathBuf::from(DEFAULT_CA_ROOT_CA)),
            server_name: self
                .ca_server_name
                .unwrap_or_else(|| DEFAULT_CA_SERVER_NAME.to_owned()),
            token_path: self
                .token_path
                .or_else(|| layers.env("AUTH_TOKEN").map(PathBuf::from))
                .unwrap_or_else(|| PathBuf::from(DEFAULT_TOKEN_PATH)),
            cluster_id: self
                .cluster_id
                .or_else(|| layers.env("CLUSTER_ID"))
                .unwrap_or_else(|| DEFAULT_CLUSTER_ID.to_owned()),
            ttl: layers.duration(
                self.secret_ttl,
                Some("SECRET_TTL"),
                DEFAULT_SECRET_TTL,
                "SECRET_TTL",
            )?,
            key_type,
            policy: RenewalPolicy {
                grace_period_ratio: layers.float(
                    self.secret_grace_period_ratio,
                    "SECRET_GRACE_PERIOD_RATIO",
                    DEFAULT_GRACE_PERIOD_RATIO,
                )?,
                grace_period_ratio_jitter: layers.float(
                    self.secret_grace_period_ratio_jitter,
                    "SECRET_GRACE_PERIOD_RATIO_JITTER",
                    DEFAULT_GRACE_PERIOD_RATIO_JITTER,
                )?,
                initial_backoff: layers.duration(
                    self.initial_backoff,
                    None,
                    DEFAULT_INITIAL_BACKOFF,
                    "--initial-backoff",
                )?,
                max_backoff: layers.duration(
                    self.max_backoff,
                    None,
                    DEFAULT_MAX_BACKOFF,
                    "--max-backoff",
                )?,
            },
            ca_timeout: layers.duration(
                self.ca_timeout,
                None,
                DEFAULT_CA_TIMEOUT,
                "--ca-timeout",
            )?,
            connect_timeout: layers.duration(
                self.ca_connect_timeout,
                None,
                DEFAULT_CONNECT_TIMEOUT,
                "--ca-connect-timeout",
            )?,
        };
        settings.validate()?;
        Ok(settings)
    }
}

impl CaClientSettings {
    /// Checks the values make sense together; errors name the setting.
    pub fn validate(&self) -> Result<(), SettingError> {
        let bad = |msg: String| Err(SettingError(msg));
        if !self.address.starts_with("https://") {
            return bad(format!(
                "CA_ADDRESS {:?}: the CA is only reached over TLS, use https://",
                self.address
            ));
        }
        if self.ttl.is_zero() || self.ttl > MAX_SECRET_TTL {
            return bad(format!(
                "SECRET_TTL {} must be above 0 and at most {}",
                format_duration(self.ttl),
                format_duration(MAX_SECRET_TTL)
            ));
        }
        let (ratio, jitter) = (
            self.policy.grace_period_ratio,
            self.policy.grace_period_ratio_jitter,
        );
        if !(ratio > 0.0 && ratio < 1.0) {
            return bad(format!(
                "SECRET_GRACE_PERIOD_RATIO {ratio} must be between 0 and 1"
            ));
        }
        if !(0.0..ratio.min(1.0 - ratio)).contains(&jitter) {
            return bad(format!(
                "SECRET_GRACE_PERIOD_RATIO_JITTER {jitter} must be at least 0 and below {}",
                ratio.min(1.0 - ratio)
            ));
        }
        let (initial, max) = (self.policy.initial_backoff, self.policy.max_backoff);
        if initial.is_zero() || initial > max {
            return bad(format!(
                "the initial backoff {} must be above 0 and at most the cap {}",
                format_duration(initial),
                format_duration(max)
            ));
        }
        if self.ca_timeout.is_zero() || self.connect_timeout.is_zero() {
            return bad("the CA timeouts must be above 0".into());
        }
        if self.cluster_id.trim().is_empty() {
            return bad("CLUSTER_ID is empty".into());
        }
        Ok(())
    }

    /// The connection settings, with the roots read from `CA_ROOT_CA` now.
    pub fn connection(&self) -> Result<CaClientConfig> {
        let root_pem = std::fs::read_to_string(&self.root_ca).map_err(|e| Error::CaConnect {
            address: self.address.clone(),
            reason: format!(
                "cannot read the CA roots (CA_ROOT_CA) {}: {e}",
                self.root_ca.display()
            ),
        })?;
        let mut config = CaClientConfig::new(self.address.clone(), root_pem);
        config.server_name = self.server_name.clone();
        config.cluster_id = Some(self.cluster_id.clone());
        config.call_timeout = self.ca_timeout;
        config.connect_timeout = self.connect_timeout;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn resolve(args: CaClientArgs, env: &[(&str, &str)]) -> Result<CaClientSettings, SettingError> {
        let env: HashMap<&str, &str> = env.iter().copied().collect();
        args.resolve(&env)
    }

    #[test]
    fn defaults_are_istios() {
        let s = CaClientSettings::default();
        assert_eq!(s.address, "https://localhost:15012");
        assert_eq!(s.ttl, Duration::from_secs(86_400));
        assert_eq!(s.policy.grace_period_ratio, 0.5);
        assert_eq!(s.key_type, KeyType::EcdsaP256);
        assert_eq!(s.cluster_id, "Kubernetes");
        assert_eq!(s.server_name, "istiod.istio-system.svc");
    }

    #[test]
    fn flags_win_over_the_environment_which_wins_over_defaults() {
        let env = [
            ("CA_ADDRESS", "istiod.istio-system.svc:15012"),
            ("SECRET_TTL", "1h"),
            ("ECC_SIGNATURE_ALGORITHM", "rsa-2048"),
            ("CLUSTER_ID", "east"),
        ];
        let s = resolve(CaClientArgs::default(), &env).unwrap();
        assert_eq!(s.address, "https://istiod.istio-system.svc:15012");
        assert_eq!(s.ttl, Duration::from_secs(3600));
        assert_eq!(s.key_type, KeyType::Rsa2048);
        assert_eq!(s.cluster_id, "east");
        let args = CaClientArgs {
            secret_ttl: Some("90s".into()),
            cluster_id: Some("west".into()),
            ..CaClientArgs::default()
        };
        let s = resolve(args, &env).unwrap();
        assert_eq!(s.ttl, Duration::from_secs(90));
        assert_eq!(s.cluster_id, "west");
    }

    #[test]
    fn bad_values_name_the_setting() {
        for (env, want) in [
            (vec![("SECRET_TTL", "91d")], "SECRET_TTL"),
            (
                vec![("SECRET_GRACE_PERIOD_RATIO", "1.5")],
                "SECRET_GRACE_PERIOD_RATIO",
            ),
            (
                vec![("SECRET_GRACE_PERIOD_RATIO_JITTER", "0.6")],
                "SECRET_GRACE_PERIOD_RATIO_JITTER",
            ),
            (
                vec![("ECC_SIGNATURE_ALGORITHM", "dsa")],
                "ECC_SIGNATURE_ALGORITHM",
            ),
            (vec![("CA_ADDRESS", "http://ca:15012")], "CA_ADDRESS"),
        ] {
            let err = resolve(CaClientArgs::default(), &env).unwrap_err();
            assert!(err.0.contains(want), "{want}: {err}");
        }
        let args = CaClientArgs {
            initial_backoff: Some("1m".into()),
            max_backoff: Some("1s".into()),
            ..CaClientArgs::default()
        };
        assert!(resolve(args, &[]).unwrap_err().0.contains("backoff"));
    }
}
