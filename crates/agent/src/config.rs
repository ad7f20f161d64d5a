//! The agent's settings: command-line flags first, then Istio's environment
//! variable names, then the `DEFAULT_*` values below. Built and validated
//! once at start ([`Config::resolve`]) and printed as JSON by `main`.
//!
//! The environment is read through [`EnvSource`], so tests pass a map and
//! never mutate the process environment.

use std::collections::HashMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use meshid_common::identity::{CaClientArgs, CaClientSettings};
use meshid_common::{SpiffeId, TrustDomain};
use serde::Serialize;

use crate::error::{Error, Result};

pub use meshid_common::identity::{
    DEFAULT_CA_ROOT_CA, DEFAULT_CA_TIMEOUT, DEFAULT_CLUSTER_ID, DEFAULT_GRACE_PERIOD_RATIO,
    DEFAULT_GRACE_PERIOD_RATIO_JITTER, DEFAULT_INITIAL_BACKOFF, DEFAULT_KEY_TYPE,
    DEFAULT_MAX_BACKOFF, DEFAULT_SECRET_TTL, DEFAULT_TOKEN_PATH, MAX_SECRET_TTL,
};
pub const DEFAULT_TOKEN_AUDIENCE: &str = "istio-ca";
pub const DEFAULT_SOCKET_DIR: &str = "./var/run/secrets/workload-spiffe-uds";
/// Istio's name for the SDS socket file (`WORKLOAD_IDENTITY_SOCKET_FILE` renames it).
pub const DEFAULT_SDS_SOCKET_FILE: &str = "socket";
/// The SPIFFE Workload API socket, beside the SDS socket.
pub const DEFAULT_WORKLOAD_API_SOCKET: &str =
    "./var/run/secrets/workload-spiffe-uds/spiffe-workload-api.sock";
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
pub const DEFAULT_NAMESPACE: &str = "default";
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15000";
/// The first CSR goes out when the first SDS or Workload API client asks (so
/// it continues that client's trace), or after this delay, whichever is first.
pub const DEFAULT_FIRST_FETCH_DELAY: Duration = Duration::from_secs(1);

use meshid_common::config::Layers;
pub use meshid_common::config::{EnvSource, ProcessEnv, format_duration, parse_duration};

/// meshid-agent: the per-pod identity agent (Istio's pilot-agent SDS role).
///
/// Each flag falls back to the Istio environment variable named in its help,
/// then to a default.
#[derive(Clone, Debug, Default, Parser)]
#[command(name = "meshid-agent", version, about, long_about = None)]
pub struct Cli {
    #[command(flatten)]
    pub ca: CaClientArgs,
    /// Token audiences, comma separated [env: TOKEN_AUDIENCES] [default: istio-ca]
    #[arg(long)]
    pub token_audiences: Option<String>,
    /// Full path of the SDS socket [default: ./var/run/secrets/workload-spiffe-uds/socket]
    #[arg(long)]
    pub sds_socket: Option<PathBuf>,
    /// File name of the SDS socket in its directory [env: WORKLOAD_IDENTITY_SOCKET_FILE]
    #[arg(long)]
    pub sds_socket_file: Option<String>,
    /// SPIFFE Workload API socket, `unix:///path` or a path [env: SPIFFE_ENDPOINT_SOCKET]
    #[arg(long)]
    pub spiffe_endpoint_socket: Option<String>,
    /// Let this group connect to the sockets too (mode 0660 instead of 0600)
    #[arg(long)]
    pub socket_group: Option<u32>,
    /// A directory SDS `file-root:`/`file-cert:` secrets may be read from;
    /// repeat for more [env: SDS_FILE_ALLOW_DIRS, comma-separated] [default: none]
    #[arg(long = "sds-file-allow", value_name = "DIR")]
    pub sds_file_allow: Vec<PathBuf>,
    /// Trust domain [env: TRUST_DOMAIN] [default: cluster.local]
    #[arg(long)]
    pub trust_domain: Option<String>,
    /// The pod's namespace [env: POD_NAMESPACE] [default: default]
    #[arg(long)]
    pub namespace: Option<String>,
    /// The pod's service account [env: SERVICE_ACCOUNT] [default: default]
    #[arg(long)]
    pub service_account: Option<String>,
    /// Admin listener (/ready, /debug/certs, /metrics) [default: 127.0.0.1:15000]
    #[arg(long)]
    pub admin_addr: Option<SocketAddr>,
    /// Metrics listener, as pilot-agent's status port (e.g. 0.0.0.0:15020):
    /// only /stats/prometheus, /metrics and readiness, for Prometheus to
    /// scrape from outside the pod [default: off]
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// Opt-in: also write cert-chain.pem, key.pem, root-cert.pem (mode 0600) here [env: OUTPUT_CERTS]
    #[arg(long)]
    pub output_certs: Option<PathBuf>,
    /// Fetch the first certificate after this delay even if no client asked, e.g. `1s`
    #[arg(long)]
    pub first_fetch_delay: Option<String>,
}

/// The validated settings of one agent.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Config {
    /// How to reach the CA and when to renew (shared with the ztunnel).
    pub ca: CaClientSettings,
    /// The audiences the projected token is minted for (by the kubelet, not
    /// by the agent): printed at start so a mismatch with the CA shows.
    pub token_audiences: Vec<String>,
    pub sds_socket: PathBuf,
    pub workload_api_socket: PathBuf,
    pub socket_group: Option<u32>,
    /// Directories SDS file secrets may come from (`file-root:system` is
    /// always allowed).
    pub sds_file_allow: Vec<PathBuf>,
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
    pub admin_addr: SocketAddr,
    /// The scrape listener ([`Cli::metrics_addr`]); `None` = off.
    pub metrics_addr: Option<SocketAddr>,
    pub output_certs: Option<PathBuf>,
    #[serde(serialize_with = "meshid_common::config::serialize_duration")]
    pub first_fetch_delay: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config::resolve(Cli::default(), &HashMap::<String, String>::new())
            .expect("the defaults are valid")
    }
}

impl Config {
    /// Parses flags from `args` (the first item is the program name) and
    /// resolves them against `env`.
    pub fn from_args<I, T>(args: I, env: &dyn EnvSource) -> Result<Self>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let cli = Cli::try_parse_from(args).map_err(|e| Error::Config(e.to_string()))?;
        Self::resolve(cli, env)
    }

    /// Flags, then environment, then defaults; then [`Config::validate`].
    pub fn resolve(cli: Cli, env: &dyn EnvSource) -> Result<Self> {
        let layers = Layers::new(env);

        let sds_socket = match (cli.sds_socket, cli.sds_socket_file) {
            (Some(path), _) => path,
            (None, file) => Path::new(DEFAULT_SOCKET_DIR).join(
                file.or_else(|| layers.env("WORKLOAD_IDENTITY_SOCKET_FILE"))
                    .unwrap_or_else(|| DEFAULT_SDS_SOCKET_FILE.to_owned()),
            ),
        };
        let workload_api_socket = match cli
            .spiffe_endpoint_socket
            .or_else(|| layers.env("SPIFFE_ENDPOINT_SOCKET"))
        {
            Some(s) => parse_socket_address(&s)?,
            None => PathBuf::from(DEFAULT_WORKLOAD_API_SOCKET),
        };
        let admin_addr = match cli.admin_addr {
            Some(a) => a,
            None => DEFAULT_ADMIN_ADDR.parse().expect("static address"),
        };

        let config = Config {
            ca: cli.ca.resolve(env)?,
            token_audiences: cli
                .token_audiences
                .or_else(|| layers.env("TOKEN_AUDIENCES"))
                .unwrap_or_else(|| DEFAULT_TOKEN_AUDIENCE.to_owned())
                .split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect(),
            sds_socket,
            workload_api_socket,
            socket_group: cli.socket_group,
            sds_file_allow: if cli.sds_file_allow.is_empty() {
                layers
                    .env("SDS_FILE_ALLOW_DIRS")
                    .unwrap_or_default()
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(PathBuf::from)
                    .collect()
            } else {
                cli.sds_file_allow
            },
            trust_domain: cli
                .trust_domain
                .or_else(|| layers.env("TRUST_DOMAIN"))
                .unwrap_or_else(|| DEFAULT_TRUST_DOMAIN.to_owned()),
            namespace: cli
                .namespace
                .or_else(|| layers.env("POD_NAMESPACE"))
                .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned()),
            service_account: cli
                .service_account
                .or_else(|| layers.env("SERVICE_ACCOUNT"))
                .unwrap_or_else(|| DEFAULT_SERVICE_ACCOUNT.to_owned()),
            admin_addr,
            metrics_addr: cli.metrics_addr,
            output_certs: cli
                .output_certs
                .or_else(|| layers.env("OUTPUT_CERTS").map(PathBuf::from)),
            first_fetch_delay: layers.duration(
                cli.first_fetch_delay,
                None,
                DEFAULT_FIRST_FETCH_DELAY,
                "--first-fetch-delay",
            )?,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks the values make sense together; errors name the setting.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(msg));
        self.ca.validate()?;
        TrustDomain::new(&self.trust_domain)?;
        for (what, value) in [
            ("namespace (POD_NAMESPACE)", &self.namespace),
            ("service account (SERVICE_ACCOUNT)", &self.service_account),
        ] {
            if value.is_empty() || value.contains('/') {
                return bad(format!(
                    "the {what} {value:?} must be one non-empty SPIFFE ID path segment"
                ));
            }
        }
        self.spiffe_id()?;
        if self.token_audiences.is_empty() {
            return bad("TOKEN_AUDIENCES is empty".into());
        }
        if self.sds_socket.as_os_str().is_empty() || self.workload_api_socket.as_os_str().is_empty()
        {
            return bad("socket paths must not be empty".into());
        }
        if self.sds_socket == self.workload_api_socket {
            return bad(format!(
                "the SDS socket and the Workload API socket are both {}",
                self.sds_socket.display()
            ));
        }
        Ok(())
    }

    /// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
    pub fn spiffe_id(&self) -> Result<SpiffeId> {
        Ok(SpiffeId::for_service_account(
            &self.trust_domain,
            &self.namespace,
            &self.service_account,
        )?)
    }
}

/// `unix:///abs/path`, `unix:relative` or a bare path.
fn parse_socket_address(s: &str) -> Result<PathBuf> {
    let path = if let Some(rest) = s.strip_prefix("unix://") {
        rest
    } else if let Some(rest) = s.strip_prefix("unix:") {
        rest
    } else if s.contains("://") {
        return Err(Error::Config(format!(
            "SPIFFE_ENDPOINT_SOCKET {s:?}: only unix:// addresses are served"
        )));
    } else {
        s
    };
    if path.is_empty() {
        return Err(Error::Config(format!(
            "SPIFFE_ENDPOINT_SOCKET {s:?} has no path"
        )));
    }
    Ok(PathBuf::from(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshid_common::KeyType;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defaults_are_istios() {
        let c = Config::from_args(["meshid-agent"], &env(&[])).unwrap();
        assert_eq!(c.ca.address, meshid_common::ca_client::DEFAULT_CA_ADDRESS);
        assert_eq!(
            c.sds_socket,
            PathBuf::from("./var/run/secrets/workload-spiffe-uds/socket")
        );
        assert_eq!(c.ca.ttl, Duration::from_secs(86_400));
        assert_eq!(c.ca.policy.grace_period_ratio, 0.5);
        assert_eq!(c.ca.key_type, KeyType::EcdsaP256);
        assert_eq!(
            c.spiffe_id().unwrap().as_str(),
            "spiffe://cluster.local/ns/default/sa/default"
        );
        assert_eq!(c.admin_addr.to_string(), "127.0.0.1:15000");
        assert_eq!(c.output_certs, None);
        assert_eq!(c, Config::default());
    }

    #[test]
    fn environment_fills_in_and_flags_win() {
        let e = env(&[
            ("CA_ADDRESS", "https://istiod.istio-system.svc:15012"),
            ("SECRET_TTL", "1h30m"),
            ("SECRET_GRACE_PERIOD_RATIO", "0.25"),
            ("ECC_SIGNATURE_ALGORITHM", "RSA"),
            ("WORKLOAD_IDENTITY_SOCKET_FILE", "sds.sock"),
            ("SPIFFE_ENDPOINT_SOCKET", "unix:///tmp/agent/api.sock"),
            ("TRUST_DOMAIN", "example.org"),
            ("POD_NAMESPACE", "shop"),
            ("SERVICE_ACCOUNT", "cart"),
            ("CLUSTER_ID", "east"),
            ("TOKEN_AUDIENCES", "istio-ca, other"),
            ("AUTH_TOKEN", "/tok"),
        ]);
        let c = Config::from_args(["a", "--namespace", "web"], &e).unwrap();
        assert_eq!(c.ca.address, "https://istiod.istio-system.svc:15012");
        assert_eq!(c.ca.ttl, Duration::from_secs(5400));
        assert_eq!(c.ca.policy.grace_period_ratio, 0.25);
        assert_eq!(c.ca.key_type, KeyType::Rsa2048);
        assert_eq!(
            c.sds_socket,
            PathBuf::from("./var/run/secrets/workload-spiffe-uds/sds.sock")
        );
        assert_eq!(c.workload_api_socket, PathBuf::from("/tmp/agent/api.sock"));
        assert_eq!(
            c.spiffe_id().unwrap().as_str(),
            "spiffe://example.org/ns/web/sa/cart"
        );
        assert_eq!(c.ca.cluster_id, "east");
        assert_eq!(c.token_audiences, vec!["istio-ca", "other"]);
        assert_eq!(c.ca.token_path, PathBuf::from("/tok"));
        // An empty variable counts as unset (Istio sets ECC_SIGNATURE_ALGORITHM="").
        let c = Config::from_args(["a"], &env(&[("ECC_SIGNATURE_ALGORITHM", "")])).unwrap();
        assert_eq!(c.ca.key_type, KeyType::EcdsaP256);
    }

    #[test]
    fn bad_values_are_refused_by_name() {
        type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
        let cases: &[Case] = &[
            (&[], &[("SECRET_TTL", "soon")], "SECRET_TTL"),
            (&[], &[("SECRET_TTL", "100d")], "SECRET_TTL"),
            (&[], &[("SECRET_GRACE_PERIOD_RATIO", "1.5")], "RATIO"),
            (
                &[],
                &[("SECRET_GRACE_PERIOD_RATIO_JITTER", "0.6")],
                "JITTER",
            ),
            (&[], &[("TRUST_DOMAIN", "Bad Domain")], "trust domain"),
            (
                &[],
                &[("CA_ADDRESS", "http://localhost:15012")],
                "CA_ADDRESS",
            ),
            (&[], &[("ECC_SIGNATURE_ALGORITHM", "dsa")], "dsa"),
            (
                &[],
                &[("SPIFFE_ENDPOINT_SOCKET", "tcp://1.2.3.4:1")],
                "unix",
            ),
            (&["--namespace", "a/b"], &[], "namespace"),
            (&["--service-account", "x y"], &[], "SPIFFE ID"),
            (
                &["--initial-backoff", "1m", "--max-backoff", "1s"],
                &[],
                "backoff",
            ),
        ];
        for (flags, vars, needle) in cases {
            let args = std::iter::once("a").chain(flags.iter().copied());
            let err = Config::from_args(args, &env(vars)).unwrap_err().to_string();
            assert!(err.contains(needle), "{flags:?} {vars:?}: {err}");
        }
    }

    #[test]
    fn durations_parse_like_go() {
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("").is_err());
        for d in [
            Duration::from_secs(86_400),
            Duration::from_millis(250),
            Duration::from_millis(90_500),
            Duration::from_secs(61),
        ] {
            assert_eq!(parse_duration(&format_duration(d)), Ok(d), "{d:?}");
        }
    }

    #[test]
    fn printed_config_has_every_setting_and_no_secrets() {
        let yaml = meshid_common::config::to_yaml(&Config::default());
        for key in ["address:", "sds_socket:", "cluster_id: Kubernetes"] {
            assert!(yaml.contains(key), "{yaml}");
        }
        assert!(yaml.contains("ttl: 24h0m0s"), "{yaml}");
        assert!(yaml.contains("grace_period_ratio: 0.5"), "{yaml}");
    }
}
