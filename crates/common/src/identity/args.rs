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
/// ztunnel share. Each falls back to the environment variable in its help
/// ([`FLAGS`] holds the help texts).
#[derive(Clone, Debug, Default)]
pub struct CaClientArgs {
    pub ca_address: Option<String>,
    pub ca_root_ca: Option<PathBuf>,
    pub ca_server_name: Option<String>,
    pub token_path: Option<PathBuf>,
    pub cluster_id: Option<String>,
    pub secret_ttl: Option<String>,
    pub secret_grace_period_ratio: Option<f64>,
    pub secret_grace_period_ratio_jitter: Option<f64>,
    pub key_type: Option<String>,
    pub initial_backoff: Option<String>,
    pub max_backoff: Option<String>,
    pub ca_timeout: Option<String>,
    pub ca_connect_timeout: Option<String>,
}

/// How a flag's value is parsed.
#[derive(Clone, Copy)]
enum Kind {
    Text,
    Path,
    Number,
}

/// The flags of [`CaClientArgs`], in field order: id (the field's name),
/// long flag, value name, value kind, help.
///
/// `clap::Args` is written by hand over this table rather than derived: the
/// derive inlines one builder chain per flag, about 22 KB in each binary
/// that takes these flags, for start-up code (issue 11's size budget).
const FLAGS: [(&str, &str, &str, Kind, &str); 13] = [
    (
        "ca_address",
        "ca-address",
        "CA_ADDRESS",
        Kind::Text,
        "CA address, `https://host:port` or `host:port` [env: CA_ADDRESS] [default: https://localhost:15012]",
    ),
    (
        "ca_root_ca",
        "ca-root-ca",
        "CA_ROOT_CA",
        Kind::Path,
        "PEM roots that verify the CA's serving certificate, re-read before each CSR [env: CA_ROOT_CA] [default: ./var/run/secrets/istio/root-cert.pem]",
    ),
    (
        "ca_server_name",
        "ca-server-name",
        "CA_SERVER_NAME",
        Kind::Text,
        "DNS name checked in the CA's certificate [default: istiod.istio-system.svc]",
    ),
    (
        "token_path",
        "token-path",
        "TOKEN_PATH",
        Kind::Path,
        "Service-account token, read at every CSR [env: AUTH_TOKEN] [default: ./var/run/secrets/tokens/istio-token]",
    ),
    (
        "cluster_id",
        "cluster-id",
        "CLUSTER_ID",
        Kind::Text,
        "Sent to the CA as `clusterid` [env: CLUSTER_ID] [default: Kubernetes]",
    ),
    (
        "secret_ttl",
        "secret-ttl",
        "SECRET_TTL",
        Kind::Text,
        "Requested certificate TTL, e.g. `24h`, `90s` [env: SECRET_TTL] [default: 24h]",
    ),
    (
        "secret_grace_period_ratio",
        "secret-grace-period-ratio",
        "SECRET_GRACE_PERIOD_RATIO",
        Kind::Number,
        "Renew when this fraction of the life remains [env: SECRET_GRACE_PERIOD_RATIO] [default: 0.5]",
    ),
    (
        "secret_grace_period_ratio_jitter",
        "secret-grace-period-ratio-jitter",
        "SECRET_GRACE_PERIOD_RATIO_JITTER",
        Kind::Number,
        "± jitter on the ratio [env: SECRET_GRACE_PERIOD_RATIO_JITTER] [default: 0.01]",
    ),
    (
        "key_type",
        "key-type",
        "KEY_TYPE",
        Kind::Text,
        "Workload key: ecdsa-p256, ecdsa-p384 or rsa-2048 [env: ECC_SIGNATURE_ALGORITHM] [default: ecdsa-p256]",
    ),
    (
        "initial_backoff",
        "initial-backoff",
        "INITIAL_BACKOFF",
        Kind::Text,
        "First retry delay after a failed CSR, e.g. `500ms` [default: 500ms]",
    ),
    (
        "max_backoff",
        "max-backoff",
        "MAX_BACKOFF",
        Kind::Text,
        "Retry delay cap, e.g. `30s` [default: 30s]",
    ),
    (
        "ca_timeout",
        "ca-timeout",
        "CA_TIMEOUT",
        Kind::Text,
        "Time limit of one CA call, e.g. `10s` [default: 10s]",
    ),
    (
        "ca_connect_timeout",
        "ca-connect-timeout",
        "CA_CONNECT_TIMEOUT",
        Kind::Text,
        "TCP + TLS connect deadline to the CA, e.g. `5s` [default: 5s]",
    ),
];

impl clap::Args for CaClientArgs {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        FLAGS
            .iter()
            .fold(cmd, |cmd, &(id, long, value_name, kind, help)| {
                let parser = match kind {
                    Kind::Text => clap::builder::ValueParser::string(),
                    Kind::Path => clap::builder::ValueParser::path_buf(),
                    Kind::Number => clap::value_parser!(f64).into(),
                };
                cmd.arg(
                    clap::Arg::new(id)
                        .long(long)
                        .value_name(value_name)
                        .value_parser(parser)
                        .action(clap::ArgAction::Set)
                        .help(help),
                )
            })
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

impl clap::FromArgMatches for CaClientArgs {
    fn from_arg_matches(matches: &clap::ArgMatches) -> Result<Self, clap::Error> {
        Self::from_arg_matches_mut(&mut matches.clone())
    }

    fn from_arg_matches_mut(matches: &mut clap::ArgMatches) -> Result<Self, clap::Error> {
        let mut args = CaClientArgs::default();
        args.update_from_arg_matches_mut(matches)?;
        Ok(args)
    }

    fn update_from_arg_matches(&mut self, matches: &clap::ArgMatches) -> Result<(), clap::Error> {
        self.update_from_arg_matches_mut(&mut matches.clone())
    }

    fn update_from_arg_matches_mut(
        &mut self,
        matches: &mut clap::ArgMatches,
    ) -> Result<(), clap::Error> {
        fn take<T: Clone + Send + Sync + 'static>(
            m: &mut clap::ArgMatches,
            id: &str,
            field: &mut Option<T>,
        ) -> Result<(), clap::Error> {
            let value = m
                .try_remove_one::<T>(id)
                .map_err(|e| clap::Error::raw(clap::error::ErrorKind::ValueValidation, e))?;
            if value.is_some() {
                *field = value;
            }
            Ok(())
        }
        let m = matches;
        take(m, "ca_address", &mut self.ca_address)?;
        take(m, "ca_root_ca", &mut self.ca_root_ca)?;
        take(m, "ca_server_name", &mut self.ca_server_name)?;
        take(m, "token_path", &mut self.token_path)?;
        take(m, "cluster_id", &mut self.cluster_id)?;
        take(m, "secret_ttl", &mut self.secret_ttl)?;
        take(
            m,
            "secret_grace_period_ratio",
            &mut self.secret_grace_period_ratio,
        )?;
        take(
            m,
            "secret_grace_period_ratio_jitter",
            &mut self.secret_grace_period_ratio_jitter,
        )?;
        take(m, "key_type", &mut self.key_type)?;
        take(m, "initial_backoff", &mut self.initial_backoff)?;
        take(m, "max_backoff", &mut self.max_backoff)?;
        take(m, "ca_timeout", &mut self.ca_timeout)?;
        take(m, "ca_connect_timeout", &mut self.ca_connect_timeout)?;
        Ok(())
    }
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

    /// The hand-written `clap::Args`: every flag parses into its field, a
    /// bad number is a clap error, the help lists each flag with its value
    /// name and text, and unset flags leave the fields `None`.
    #[test]
    fn the_flags_parse_into_their_fields() {
        use clap::{Args, FromArgMatches};
        let cmd = || CaClientArgs::augment_args(clap::Command::new("t"));
        let m = cmd()
            .try_get_matches_from([
                "t",
                "--ca-address=ca:1",
                "--ca-root-ca=/r",
                "--ca-server-name=n",
                "--token-path=/t",
                "--cluster-id=c",
                "--secret-ttl=1h",
                "--secret-grace-period-ratio=0.4",
                "--secret-grace-period-ratio-jitter=0.02",
                "--key-type=rsa-2048",
                "--initial-backoff=1s",
                "--max-backoff=2s",
                "--ca-timeout=3s",
                "--ca-connect-timeout=4s",
            ])
            .unwrap();
        let a = CaClientArgs::from_arg_matches(&m).unwrap();
        assert_eq!(a.ca_address.as_deref(), Some("ca:1"));
        assert_eq!(a.ca_root_ca, Some(PathBuf::from("/r")));
        assert_eq!(a.ca_server_name.as_deref(), Some("n"));
        assert_eq!(a.token_path, Some(PathBuf::from("/t")));
        assert_eq!(a.cluster_id.as_deref(), Some("c"));
        assert_eq!(a.secret_ttl.as_deref(), Some("1h"));
        assert_eq!(a.secret_grace_period_ratio, Some(0.4));
        assert_eq!(a.secret_grace_period_ratio_jitter, Some(0.02));
        assert_eq!(a.key_type.as_deref(), Some("rsa-2048"));
        assert_eq!(a.initial_backoff.as_deref(), Some("1s"));
        assert_eq!(a.max_backoff.as_deref(), Some("2s"));
        assert_eq!(a.ca_timeout.as_deref(), Some("3s"));
        assert_eq!(a.ca_connect_timeout.as_deref(), Some("4s"));

        let m = cmd().try_get_matches_from(["t"]).unwrap();
        let a = CaClientArgs::from_arg_matches(&m).unwrap();
        assert!(a.ca_address.is_none() && a.secret_grace_period_ratio.is_none());

        let err = cmd()
            .try_get_matches_from(["t", "--secret-grace-period-ratio=half"])
            .unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);

        let help = cmd().render_help().to_string();
        for (_, long, value_name, _, text) in FLAGS {
            assert!(
                help.contains(&format!("--{long} <{value_name}>")),
                "{long}: {help}"
            );
            assert!(help.contains(text), "{long}: {help}");
        }
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
