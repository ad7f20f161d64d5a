//! The ztunnel's settings: command-line flags first, then Istio's environment
//! variable names, then the `DEFAULT_*` values below. Built and validated
//! once at start ([`Config::resolve`]) and printed by `main`.
//!
//! The environment is read through [`EnvSource`], so tests pass a map and
//! never mutate the process environment.

use std::collections::HashMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use meshid_common::{KeyType, TrustDomain};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::policy::{PolicyRule, load_policy_file};

pub const DEFAULT_CA_ADDRESS: &str = meshid_common::ca_client::DEFAULT_CA_ADDRESS;
pub const DEFAULT_CA_SERVER_NAME: &str = meshid_common::ca_client::DEFAULT_CA_SERVER_NAME;
pub const DEFAULT_CA_ROOT_CA: &str = "./var/run/secrets/istio/root-cert.pem";
/// The ztunnel's own node-bound service-account token.
pub const DEFAULT_TOKEN_PATH: &str = "./var/run/secrets/tokens/istio-token";
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
pub const DEFAULT_NODE_NAME: &str = "node-a";
pub const DEFAULT_REGISTRY_FILE: &str = "./var/run/meshid/registry.json";
pub const DEFAULT_REGISTRY_POLL: Duration = Duration::from_millis(500);
pub const DEFAULT_SECRET_TTL: Duration = Duration::from_secs(24 * 3600);
pub const MAX_SECRET_TTL: Duration = Duration::from_secs(90 * 24 * 3600);
pub const DEFAULT_GRACE_PERIOD_RATIO: f64 = 0.5;
pub const DEFAULT_GRACE_PERIOD_RATIO_JITTER: f64 = 0.01;
pub const DEFAULT_KEY_TYPE: KeyType = KeyType::EcdsaP256;
pub const DEFAULT_HBONE_ADDR: &str = "0.0.0.0:15008";
pub const DEFAULT_INBOUND_PLAINTEXT_ADDR: &str = "0.0.0.0:15006";
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15000";
/// Where iptables redirects captured outbound connections (`--capture`).
pub const DEFAULT_OUTBOUND_CAPTURE_ADDR: &str = "0.0.0.0:15001";
/// Port of a peer ztunnel's HBONE server when no `--peer` names its address.
pub const DEFAULT_HBONE_PORT: u16 = 15008;
/// First retry delay after a failed fetch; doubles up to [`DEFAULT_MAX_BACKOFF`].
pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_millis(500);
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(30);
/// At most this many certificate requests are in flight at once.
pub const DEFAULT_MAX_CONCURRENT_FETCHES: usize = 8;
/// How long a connection waits for its workload's first certificate.
pub const DEFAULT_CERT_WAIT: Duration = Duration::from_secs(10);
/// Deadline of a TCP connect to a workload or a peer ztunnel, and of a TLS handshake.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_CA_TIMEOUT: Duration = Duration::from_secs(10);

use meshid_common::config::Layers;
pub use meshid_common::config::{EnvSource, ProcessEnv, parse_duration};

/// meshid-ztunnel: ambient mode's node proxy.
///
/// Each flag falls back to the environment variable named in its help, then
/// to a default.
#[derive(Clone, Debug, Default, Parser)]
#[command(name = "meshid-ztunnel", version, about, long_about = None)]
pub struct Cli {
    /// CA address, `https://host:port` [env: CA_ADDRESS] [default: https://localhost:15012]
    #[arg(long)]
    pub ca_address: Option<String>,
    /// PEM roots that verify the CA's serving certificate [env: CA_ROOT_CA]
    #[arg(long)]
    pub ca_root_ca: Option<PathBuf>,
    /// DNS name checked in the CA's certificate [default: istiod.istio-system.svc]
    #[arg(long)]
    pub ca_server_name: Option<String>,
    /// The ztunnel's own token, read at every request [env: AUTH_TOKEN]
    #[arg(long)]
    pub token_path: Option<PathBuf>,
    /// Sent to the CA as `clusterid` [env: CLUSTER_ID]
    #[arg(long)]
    pub cluster_id: Option<String>,
    /// Trust domain [env: TRUST_DOMAIN] [default: cluster.local]
    #[arg(long)]
    pub trust_domain: Option<String>,
    /// The node this ztunnel serves [env: NODE_NAME] [default: node-a]
    #[arg(long)]
    pub node_name: Option<String>,
    /// Where workloads come from: `file` (the registry file) or `kube` (pods
    /// of this node in the Kubernetes API; needs feature `kube`)
    /// [env: REGISTRY_SOURCE] [default: file]
    #[arg(long = "registry")]
    pub registry_source: Option<String>,
    /// Workload registry file kept by the harness [env: WORKLOAD_REGISTRY]
    #[arg(long)]
    pub registry_file: Option<PathBuf>,
    /// How often the registry file is checked, e.g. `500ms`
    #[arg(long)]
    pub registry_poll: Option<String>,
    /// Requested workload certificate TTL, e.g. `24h` [env: SECRET_TTL]
    #[arg(long)]
    pub secret_ttl: Option<String>,
    /// Renew when this fraction of the life has passed [env: SECRET_GRACE_PERIOD_RATIO]
    #[arg(long)]
    pub secret_grace_period_ratio: Option<f64>,
    /// ± jitter on the ratio [env: SECRET_GRACE_PERIOD_RATIO_JITTER]
    #[arg(long)]
    pub secret_grace_period_ratio_jitter: Option<f64>,
    /// Workload key: ecdsa-p256, ecdsa-p384 or rsa-2048 [env: ECC_SIGNATURE_ALGORITHM]
    #[arg(long)]
    pub key_type: Option<String>,
    /// HBONE server (mTLS + HTTP/2 CONNECT) [default: 0.0.0.0:15008]
    #[arg(long)]
    pub hbone_addr: Option<SocketAddr>,
    /// Plaintext inbound for PERMISSIVE workloads (PROXY v1 header names the
    /// destination in process mode) [default: 0.0.0.0:15006]
    #[arg(long)]
    pub inbound_plaintext_addr: Option<SocketAddr>,
    /// Do not open the plaintext inbound listener
    #[arg(long)]
    pub no_inbound_plaintext: bool,
    /// Admin listener (/ready, /debug/certs, /metrics) [default: 127.0.0.1:15000]
    #[arg(long)]
    pub admin_addr: Option<SocketAddr>,
    /// Transparent capture: accept iptables-redirected outbound connections,
    /// destination from SO_ORIGINAL_DST, source workload by its IP [env: ZTUNNEL_CAPTURE]
    #[arg(long)]
    pub capture: bool,
    /// Listener of captured outbound connections [default: 0.0.0.0:15001]
    #[arg(long)]
    pub outbound_capture_addr: Option<SocketAddr>,
    /// A peer node's HBONE address, `NODE=IP:PORT`; repeatable [env: ZTUNNEL_PEERS, comma separated].
    /// Nodes not listed are reached at the destination workload's IP on port 15008.
    #[arg(long = "peer")]
    pub peers: Vec<String>,
    /// Process-mode outbound listener, `NAMESPACE/POD@LISTEN=DEST`; repeatable
    /// [env: ZTUNNEL_OUTBOUND, comma separated]
    #[arg(long = "outbound")]
    pub outbound: Vec<String>,
    /// Inbound policy file (JSON list of rules) [env: ZTUNNEL_POLICY_FILE]
    #[arg(long)]
    pub policy_file: Option<PathBuf>,
    /// First retry delay after a failed fetch, e.g. `500ms`
    #[arg(long)]
    pub initial_backoff: Option<String>,
    /// Retry delay cap, e.g. `30s`
    #[arg(long)]
    pub max_backoff: Option<String>,
    /// Certificate requests in flight at once [default: 8]
    #[arg(long)]
    pub max_concurrent_fetches: Option<usize>,
    /// How long a connection waits for a certificate, e.g. `10s`
    #[arg(long)]
    pub cert_wait: Option<String>,
    /// TCP connect and TLS handshake deadline, e.g. `5s`
    #[arg(long)]
    pub connect_timeout: Option<String>,
    /// Time limit of one CA call, e.g. `10s`
    #[arg(long)]
    pub ca_timeout: Option<String>,
}

/// One process-mode outbound listener: connections accepted on `listen` come
/// from workload `source` (`namespace/pod`) and go to `destination`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OutboundRoute {
    pub source: String,
    pub listen: SocketAddr,
    pub destination: SocketAddr,
}

impl std::str::FromStr for OutboundRoute {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::Config(format!(
                "outbound route {s:?}: expected NAMESPACE/POD@LISTEN_ADDR=DEST_ADDR"
            ))
        };
        let (source, rest) = s.trim().split_once('@').ok_or_else(bad)?;
        let (listen, dest) = rest.split_once('=').ok_or_else(bad)?;
        if source.split('/').filter(|p| !p.is_empty()).count() != 2 {
            return Err(bad());
        }
        Ok(OutboundRoute {
            source: source.to_owned(),
            listen: listen.trim().parse().map_err(|_| bad())?,
            destination: dest.trim().parse().map_err(|_| bad())?,
        })
    }
}

/// Where the ztunnel learns its node's workloads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RegistrySource {
    /// The registry file, polled for changes.
    #[default]
    File,
    /// The pods of this node, listed and watched in the Kubernetes API
    /// (only in a build with feature `kube`).
    Kube,
}

impl std::str::FromStr for RegistrySource {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "file" => Ok(RegistrySource::File),
            "kube" | "kubernetes" if cfg!(feature = "kube") => Ok(RegistrySource::Kube),
            "kube" | "kubernetes" => Err(Error::Config(
                "REGISTRY_SOURCE kube: this meshid-ztunnel was built without the `kube` \
                 feature; rebuild with `--features kube` or use the registry file"
                    .into(),
            )),
            _ => Err(Error::Config(format!(
                "REGISTRY_SOURCE {s:?}: expected `file` or `kube`"
            ))),
        }
    }
}

/// The validated settings of one ztunnel.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Config {
    pub ca_address: String,
    pub ca_root_ca: PathBuf,
    pub ca_server_name: String,
    pub token_path: PathBuf,
    pub cluster_id: Option<String>,
    pub trust_domain: String,
    pub node_name: String,
    pub registry_source: RegistrySource,
    pub registry_file: PathBuf,
    #[serde(serialize_with = "ser_duration")]
    pub registry_poll: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub secret_ttl: Duration,
    pub grace_period_ratio: f64,
    pub grace_period_ratio_jitter: f64,
    pub key_type: KeyType,
    pub hbone_addr: SocketAddr,
    pub inbound_plaintext_addr: Option<SocketAddr>,
    pub admin_addr: SocketAddr,
    /// Set with `--capture`: the listener of redirected outbound connections.
    pub outbound_capture_addr: Option<SocketAddr>,
    pub peers: Vec<(String, SocketAddr)>,
    pub outbound: Vec<OutboundRoute>,
    pub policy_file: Option<PathBuf>,
    pub policies: Vec<PolicyRule>,
    #[serde(serialize_with = "ser_duration")]
    pub initial_backoff: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub max_backoff: Duration,
    pub max_concurrent_fetches: usize,
    #[serde(serialize_with = "ser_duration")]
    pub cert_wait: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub connect_timeout: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub ca_timeout: Duration,
}

fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{d:?}"))
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
        let list = |flag: Vec<String>, key: &str| -> Vec<String> {
            let items = if flag.is_empty() {
                layers
                    .env(key)
                    .map(|v| v.split(',').map(str::to_owned).collect())
                    .unwrap_or_default()
            } else {
                flag
            };
            items
                .into_iter()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect()
        };
        let addr = |flag: Option<SocketAddr>, default: &str| {
            flag.unwrap_or_else(|| default.parse().expect("static address"))
        };

        let key_type = match cli
            .key_type
            .or_else(|| layers.env("ECC_SIGNATURE_ALGORITHM"))
        {
            Some(s) => s.parse::<KeyType>()?,
            None => DEFAULT_KEY_TYPE,
        };
        let peers = list(cli.peers, "ZTUNNEL_PEERS")
            .into_iter()
            .map(|p| {
                let (node, a) = p
                    .split_once('=')
                    .ok_or_else(|| Error::Config(format!("peer {p:?}: expected NODE=IP:PORT")))?;
                let a = a
                    .trim()
                    .parse()
                    .map_err(|_| Error::Config(format!("peer {p:?}: {a:?} is not an IP:PORT")))?;
                Ok((node.trim().to_owned(), a))
            })
            .collect::<Result<Vec<_>>>()?;
        let outbound = list(cli.outbound, "ZTUNNEL_OUTBOUND")
            .iter()
            .map(|s| s.parse())
            .collect::<Result<Vec<OutboundRoute>>>()?;
        let registry_source = match cli
            .registry_source
            .or_else(|| layers.env("REGISTRY_SOURCE"))
        {
            Some(s) => s.parse()?,
            None => RegistrySource::File,
        };
        let policy_file = cli
            .policy_file
            .or_else(|| layers.env("ZTUNNEL_POLICY_FILE").map(PathBuf::from));
        let policies = match &policy_file {
            Some(path) => load_policy_file(path)?,
            None => Vec::new(),
        };

        let config = Config {
            ca_address: cli
                .ca_address
                .or_else(|| layers.env("CA_ADDRESS"))
                .unwrap_or_else(|| DEFAULT_CA_ADDRESS.to_owned()),
            ca_root_ca: cli
                .ca_root_ca
                .or_else(|| layers.env("CA_ROOT_CA").map(PathBuf::from))
                .unwrap_or_else(|| PathBuf::from(DEFAULT_CA_ROOT_CA)),
            ca_server_name: cli
                .ca_server_name
                .unwrap_or_else(|| DEFAULT_CA_SERVER_NAME.to_owned()),
            token_path: cli
                .token_path
                .or_else(|| layers.env("AUTH_TOKEN").map(PathBuf::from))
                .unwrap_or_else(|| PathBuf::from(DEFAULT_TOKEN_PATH)),
            cluster_id: cli.cluster_id.or_else(|| layers.env("CLUSTER_ID")),
            trust_domain: cli
                .trust_domain
                .or_else(|| layers.env("TRUST_DOMAIN"))
                .unwrap_or_else(|| DEFAULT_TRUST_DOMAIN.to_owned()),
            node_name: cli
                .node_name
                .or_else(|| layers.env("NODE_NAME"))
                .unwrap_or_else(|| DEFAULT_NODE_NAME.to_owned()),
            registry_source,
            registry_file: cli
                .registry_file
                .or_else(|| layers.env("WORKLOAD_REGISTRY").map(PathBuf::from))
                .unwrap_or_else(|| PathBuf::from(DEFAULT_REGISTRY_FILE)),
            registry_poll: layers.duration(
                cli.registry_poll,
                None,
                DEFAULT_REGISTRY_POLL,
                "--registry-poll",
            )?,
            secret_ttl: layers.duration(
                cli.secret_ttl,
                Some("SECRET_TTL"),
                DEFAULT_SECRET_TTL,
                "SECRET_TTL",
            )?,
            grace_period_ratio: layers.float(
                cli.secret_grace_period_ratio,
                "SECRET_GRACE_PERIOD_RATIO",
                DEFAULT_GRACE_PERIOD_RATIO,
            )?,
            grace_period_ratio_jitter: layers.float(
                cli.secret_grace_period_ratio_jitter,
                "SECRET_GRACE_PERIOD_RATIO_JITTER",
                DEFAULT_GRACE_PERIOD_RATIO_JITTER,
            )?,
            key_type,
            hbone_addr: addr(cli.hbone_addr, DEFAULT_HBONE_ADDR),
            inbound_plaintext_addr: (!cli.no_inbound_plaintext)
                .then(|| addr(cli.inbound_plaintext_addr, DEFAULT_INBOUND_PLAINTEXT_ADDR)),
            admin_addr: addr(cli.admin_addr, DEFAULT_ADMIN_ADDR),
            outbound_capture_addr: (cli.capture
                || layers
                    .env("ZTUNNEL_CAPTURE")
                    .is_some_and(|v| v == "true" || v == "1"))
            .then(|| addr(cli.outbound_capture_addr, DEFAULT_OUTBOUND_CAPTURE_ADDR)),
            peers,
            outbound,
            policy_file,
            policies,
            initial_backoff: layers.duration(
                cli.initial_backoff,
                None,
                DEFAULT_INITIAL_BACKOFF,
                "--initial-backoff",
            )?,
            max_backoff: layers.duration(
                cli.max_backoff,
                None,
                DEFAULT_MAX_BACKOFF,
                "--max-backoff",
            )?,
            max_concurrent_fetches: cli
                .max_concurrent_fetches
                .unwrap_or(DEFAULT_MAX_CONCURRENT_FETCHES),
            cert_wait: layers.duration(cli.cert_wait, None, DEFAULT_CERT_WAIT, "--cert-wait")?,
            connect_timeout: layers.duration(
                cli.connect_timeout,
                None,
                DEFAULT_CONNECT_TIMEOUT,
                "--connect-timeout",
            )?,
            ca_timeout: layers.duration(
                cli.ca_timeout,
                None,
                DEFAULT_CA_TIMEOUT,
                "--ca-timeout",
            )?,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks the values make sense together; errors name the setting.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(msg));
        if !self.ca_address.starts_with("https://") {
            return bad(format!(
                "CA_ADDRESS {:?} must start with https://",
                self.ca_address
            ));
        }
        if self.secret_ttl.is_zero() || self.secret_ttl > MAX_SECRET_TTL {
            return bad(format!(
                "SECRET_TTL {:?} must be above 0 and at most {:?}",
                self.secret_ttl, MAX_SECRET_TTL
            ));
        }
        let (ratio, jitter) = (self.grace_period_ratio, self.grace_period_ratio_jitter);
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
        TrustDomain::new(&self.trust_domain)?;
        if self.node_name.trim().is_empty() {
            return bad("NODE_NAME is empty".into());
        }
        if self.initial_backoff.is_zero() || self.initial_backoff > self.max_backoff {
            return bad(format!(
                "the initial backoff {:?} must be above 0 and at most the cap {:?}",
                self.initial_backoff, self.max_backoff
            ));
        }
        if self.max_concurrent_fetches == 0 {
            return bad("--max-concurrent-fetches must be at least 1".into());
        }
        for (what, d) in [
            ("--cert-wait", self.cert_wait),
            ("--connect-timeout", self.connect_timeout),
            ("--ca-timeout", self.ca_timeout),
            ("--registry-poll", self.registry_poll),
        ] {
            if d.is_zero() {
                return bad(format!("{what} must be above 0"));
            }
        }
        let mut listens: Vec<SocketAddr> = vec![self.hbone_addr, self.admin_addr];
        listens.extend(self.inbound_plaintext_addr);
        listens.extend(self.outbound_capture_addr);
        listens.extend(self.outbound.iter().map(|r| r.listen));
        for (i, a) in listens.iter().enumerate() {
            if a.port() != 0 && listens[..i].contains(a) {
                return bad(format!("two listeners are configured on {a}"));
            }
        }
        Ok(())
    }

    /// The HBONE address of `node`'s ztunnel, if configured.
    pub fn peer_address(&self, node: &str) -> Option<SocketAddr> {
        self.peers.iter().find(|(n, _)| n == node).map(|(_, a)| *a)
    }

    /// The config as pretty JSON, for the start-up log.
    pub fn to_pretty_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("<{e}>"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defaults_are_istios() {
        let c = Config::from_args(["meshid-ztunnel"], &env(&[])).unwrap();
        assert_eq!(c.ca_address, "https://localhost:15012");
        assert_eq!(c.trust_domain, "cluster.local");
        assert_eq!(c.hbone_addr.port(), 15008);
        assert_eq!(c.inbound_plaintext_addr.unwrap().port(), 15006);
        assert_eq!(c.admin_addr, "127.0.0.1:15000".parse().unwrap());
        assert_eq!(c.max_concurrent_fetches, 8);
        assert_eq!(c.outbound_capture_addr, None, "capture is opt-in");
        let c = Config::from_args(["meshid-ztunnel", "--capture"], &env(&[])).unwrap();
        assert_eq!(c.outbound_capture_addr.unwrap().port(), 15001);
        assert_eq!(c.grace_period_ratio, 0.5);
        assert_eq!(c.secret_ttl, Duration::from_secs(86_400));
        assert!(c.to_pretty_json().contains("\"node_name\": \"node-a\""));
    }

    #[test]
    fn flags_beat_env_and_env_beats_defaults() {
        let e = env(&[
            ("CA_ADDRESS", "https://ca:1"),
            ("TRUST_DOMAIN", "env.example"),
            ("NODE_NAME", "node-env"),
            ("WORKLOAD_REGISTRY", "/tmp/reg.json"),
            (
                "ZTUNNEL_PEERS",
                "node-b=127.0.0.2:15008, node-c=127.0.0.3:15008",
            ),
            ("SECRET_TTL", "90s"),
        ]);
        let c = Config::from_args(
            [
                "meshid-ztunnel",
                "--trust-domain",
                "flag.example",
                "--outbound",
                "default/web-0@127.0.0.1:16001=127.0.0.2:8080",
            ],
            &e,
        )
        .unwrap();
        assert_eq!(c.ca_address, "https://ca:1");
        assert_eq!(c.trust_domain, "flag.example");
        assert_eq!(c.node_name, "node-env");
        assert_eq!(c.registry_file, PathBuf::from("/tmp/reg.json"));
        assert_eq!(c.secret_ttl, Duration::from_secs(90));
        assert_eq!(
            c.peer_address("node-c"),
            Some("127.0.0.3:15008".parse().unwrap())
        );
        assert_eq!(c.outbound[0].source, "default/web-0");
        assert_eq!(c.outbound[0].destination, "127.0.0.2:8080".parse().unwrap());
    }

    #[test]
    fn bad_values_are_named() {
        let cases: &[(&[&str], &str)] = &[
            (&["--ca-address", "http://x"], "https://"),
            (&["--secret-grace-period-ratio", "1.5"], "RATIO"),
            (&["--outbound", "web@1.2.3.4:1=5.6.7.8:9"], "NAMESPACE/POD"),
            (&["--peer", "node-b"], "NODE=IP:PORT"),
            (&["--max-concurrent-fetches", "0"], "at least 1"),
            (&["--trust-domain", "Bad Domain"], "trust domain"),
            (
                &[
                    "--hbone-addr",
                    "127.0.0.1:7000",
                    "--admin-addr",
                    "127.0.0.1:7000",
                ],
                "two listeners",
            ),
        ];
        for (args, want) in cases {
            let mut argv = vec!["meshid-ztunnel"];
            argv.extend_from_slice(args);
            let err = Config::from_args(argv, &env(&[])).unwrap_err().to_string();
            assert!(err.contains(want), "{args:?}: {err}");
        }
    }

    #[test]
    fn the_registry_source_is_the_file_unless_kube_is_asked_for() {
        let c = Config::from_args(["meshid-ztunnel"], &env(&[])).unwrap();
        assert_eq!(c.registry_source, RegistrySource::File);
        let c = Config::from_args(["meshid-ztunnel", "--registry", "file"], &env(&[])).unwrap();
        assert_eq!(c.registry_source, RegistrySource::File);
        let err = Config::from_args(["meshid-ztunnel", "--registry", "etcd"], &env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("expected `file` or `kube`"), "{err}");
        let by_flag = Config::from_args(["meshid-ztunnel", "--registry", "kube"], &env(&[]));
        let by_env = Config::from_args(["meshid-ztunnel"], &env(&[("REGISTRY_SOURCE", "kube")]));
        for got in [by_flag, by_env] {
            if cfg!(feature = "kube") {
                assert_eq!(got.unwrap().registry_source, RegistrySource::Kube);
            } else {
                let err = got.unwrap_err().to_string();
                assert!(err.contains("without the `kube` feature"), "{err}");
            }
        }
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("12"), Ok(Duration::from_secs(12)));
        assert!(parse_duration("x").is_err());
    }
}
