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
use meshid_common::TrustDomain;
use meshid_common::identity::{CaClientArgs, CaClientSettings};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::policy::{PolicyRule, load_policy_file};

pub use meshid_common::identity::{
    DEFAULT_CA_ROOT_CA, DEFAULT_CA_TIMEOUT, DEFAULT_GRACE_PERIOD_RATIO,
    DEFAULT_GRACE_PERIOD_RATIO_JITTER, DEFAULT_INITIAL_BACKOFF, DEFAULT_KEY_TYPE,
    DEFAULT_MAX_BACKOFF, DEFAULT_SECRET_TTL, DEFAULT_TOKEN_PATH, MAX_SECRET_TTL,
};
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
pub const DEFAULT_NODE_NAME: &str = "node-a";
pub const DEFAULT_REGISTRY_FILE: &str = "./var/run/meshid/registry.json";
pub const DEFAULT_REGISTRY_POLL: Duration = Duration::from_millis(500);
pub const DEFAULT_HBONE_ADDR: &str = "0.0.0.0:15008";
pub const DEFAULT_INBOUND_PLAINTEXT_ADDR: &str = "0.0.0.0:15006";
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15000";
/// Where iptables redirects captured outbound connections (`--capture`).
pub const DEFAULT_OUTBOUND_CAPTURE_ADDR: &str = "0.0.0.0:15001";
/// Port of a peer ztunnel's HBONE server when no `--peer` names its address.
pub const DEFAULT_HBONE_PORT: u16 = 15008;
/// At most this many certificate requests are in flight at once.
pub const DEFAULT_MAX_CONCURRENT_FETCHES: usize = 8;
/// How long a connection waits for its workload's first certificate.
pub const DEFAULT_CERT_WAIT: Duration = Duration::from_secs(10);
/// Deadline of a TCP connect to a workload or a peer ztunnel, and of a TLS handshake.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

use meshid_common::config::Layers;
pub use meshid_common::config::{EnvSource, ProcessEnv, format_duration, parse_duration};

/// meshid-ztunnel: ambient mode's node proxy.
///
/// Each flag falls back to the environment variable named in its help, then
/// to a default.
#[derive(Clone, Debug, Default, Parser)]
#[command(name = "meshid-ztunnel", version, about, long_about = None)]
pub struct Cli {
    /// How the ztunnel reaches the CA (with its own node token) and renews.
    #[command(flatten)]
    pub ca: CaClientArgs,
    /// Trust domain [env: TRUST_DOMAIN] [default: cluster.local]
    #[arg(long)]
    pub trust_domain: Option<String>,
    /// Other trust domains that mean this one in peer IDs (Istio's
    /// `trustDomainAliases`), comma-separated [env: TRUST_DOMAIN_ALIASES]
    #[arg(long, value_delimiter = ',')]
    pub trust_domain_aliases: Vec<String>,
    /// The node this ztunnel serves [env: NODE_NAME] [default: node-a]
    #[arg(long)]
    pub node_name: Option<String>,
    /// Where workloads come from: `file` (the registry file) or `kube` (the
    /// ambient pods of every node, listed and watched in the Kubernetes API;
    /// needs feature `kube`)
    /// [env: REGISTRY_SOURCE] [default: file]
    #[arg(long = "registry")]
    pub registry_source: Option<String>,
    /// Workload registry file kept by the harness [env: WORKLOAD_REGISTRY]
    #[arg(long)]
    pub registry_file: Option<PathBuf>,
    /// How often the registry file is checked, e.g. `500ms`
    #[arg(long)]
    pub registry_poll: Option<String>,
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
    /// Certificate requests in flight at once [default: 8]
    #[arg(long)]
    pub max_concurrent_fetches: Option<usize>,
    /// How long a connection waits for a certificate, e.g. `10s`
    #[arg(long)]
    pub cert_wait: Option<String>,
    /// TCP connect and TLS handshake deadline, e.g. `5s`
    #[arg(long)]
    pub connect_timeout: Option<String>,
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
    /// The ambient pods (of every node: this one's are served, the others'
    /// dialled), listed and watched in the Kubernetes API (only in a build
    /// with feature `kube`).
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
    /// How to reach the CA and when to renew (shared with the agent).
    pub ca: CaClientSettings,
    pub trust_domain: String,
    /// Trust domains read as `trust_domain` in a peer's ID: the HBONE server
    /// and the inbound policy accept `spiffe://alias/…` as its twin.
    pub trust_domain_aliases: Vec<String>,
    pub node_name: String,
    pub registry_source: RegistrySource,
    pub registry_file: PathBuf,
    #[serde(serialize_with = "meshid_common::config::serialize_duration")]
    pub registry_poll: Duration,
    pub hbone_addr: SocketAddr,
    pub inbound_plaintext_addr: Option<SocketAddr>,
    pub admin_addr: SocketAddr,
    /// Set with `--capture`: the listener of redirected outbound connections.
    pub outbound_capture_addr: Option<SocketAddr>,
    pub peers: Vec<(String, SocketAddr)>,
    pub outbound: Vec<OutboundRoute>,
    pub policy_file: Option<PathBuf>,
    pub policies: Vec<PolicyRule>,
    pub max_concurrent_fetches: usize,
    #[serde(serialize_with = "meshid_common::config::serialize_duration")]
    pub cert_wait: Duration,
    #[serde(serialize_with = "meshid_common::config::serialize_duration")]
    pub connect_timeout: Duration,
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
            ca: cli.ca.resolve(env)?,
            trust_domain: cli
                .trust_domain
                .or_else(|| layers.env("TRUST_DOMAIN"))
                .unwrap_or_else(|| DEFAULT_TRUST_DOMAIN.to_owned()),
            trust_domain_aliases: list(cli.trust_domain_aliases, "TRUST_DOMAIN_ALIASES"),
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
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks the values make sense together; errors name the setting.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(msg));
        self.ca.validate()?;
        TrustDomain::new(&self.trust_domain)?;
        for alias in &self.trust_domain_aliases {
            if let Err(e) = TrustDomain::new(alias) {
                return bad(format!("--trust-domain-aliases {alias:?}: {e}"));
            }
        }
        if self.node_name.trim().is_empty() {
            return bad("NODE_NAME is empty".into());
        }
        if self.max_concurrent_fetches == 0 {
            return bad("--max-concurrent-fetches must be at least 1".into());
        }
        for (what, d) in [
            ("--cert-wait", self.cert_wait),
            ("--connect-timeout", self.connect_timeout),
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
        assert_eq!(c.ca.address, "https://localhost:15012");
        assert_eq!(c.trust_domain, "cluster.local");
        assert_eq!(c.hbone_addr.port(), 15008);
        assert_eq!(c.inbound_plaintext_addr.unwrap().port(), 15006);
        assert_eq!(c.admin_addr, "127.0.0.1:15000".parse().unwrap());
        assert_eq!(c.max_concurrent_fetches, 8);
        assert_eq!(c.outbound_capture_addr, None, "capture is opt-in");
        let c = Config::from_args(["meshid-ztunnel", "--capture"], &env(&[])).unwrap();
        assert_eq!(c.outbound_capture_addr.unwrap().port(), 15001);
        assert_eq!(c.ca.policy.grace_period_ratio, 0.5);
        assert_eq!(c.ca.ttl, Duration::from_secs(86_400));
        let yaml = meshid_common::config::to_yaml(&c);
        assert!(yaml.contains("node_name: node-a"), "{yaml}");
        assert!(
            yaml.contains("token_path: ./var/run/secrets/tokens/istio-token"),
            "{yaml}"
        );
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
        assert_eq!(c.ca.address, "https://ca:1");
        assert_eq!(c.trust_domain, "flag.example");
        assert_eq!(c.node_name, "node-env");
        assert_eq!(c.registry_file, PathBuf::from("/tmp/reg.json"));
        assert_eq!(c.ca.ttl, Duration::from_secs(90));
        assert_eq!(
            c.peer_address("node-c"),
            Some("127.0.0.3:15008".parse().unwrap())
        );
        assert_eq!(c.outbound[0].source, "default/web-0");
        assert_eq!(c.outbound[0].destination, "127.0.0.2:8080".parse().unwrap());
    }

    #[test]
    fn trust_domain_aliases_from_the_flag_or_the_variable() {
        let e = env(&[("TRUST_DOMAIN_ALIASES", "old.example, older.example")]);
        let c = Config::from_args(["meshid-ztunnel"], &e).unwrap();
        assert_eq!(c.trust_domain_aliases, ["old.example", "older.example"]);
        let c = Config::from_args(
            ["meshid-ztunnel", "--trust-domain-aliases", "flag.example"],
            &e,
        )
        .unwrap();
        assert_eq!(c.trust_domain_aliases, ["flag.example"]);
        let c = Config::from_args(["meshid-ztunnel"], &env(&[])).unwrap();
        assert!(c.trust_domain_aliases.is_empty());
        let err = Config::from_args(
            ["meshid-ztunnel", "--trust-domain-aliases", "Bad Alias"],
            &env(&[]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("Bad Alias"), "{err}");
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
