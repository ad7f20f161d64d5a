//! Configuration: a typed [`Config`] with Istio's defaults, built from
//! command-line flags with Istio's environment names as fallback. The
//! environment is read through a function so tests pass a map.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use meshid_common::{SpiffeId, TrustDomain};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::policy::{Mode, Policy};

pub const DEFAULT_INBOUND_ADDR: &str = "0.0.0.0:15006";
pub const DEFAULT_OUTBOUND_ADDR: &str = "127.0.0.1:15001";
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15000";
pub const DEFAULT_APP_ADDR: &str = "127.0.0.1:8080";
pub const DEFAULT_SDS_DIR: &str = "./var/run/secrets/workload-spiffe-uds";
pub const DEFAULT_SDS_FILE: &str = "socket";
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
pub const DEFAULT_DRAIN_GRACE: Duration = Duration::from_secs(5);
pub const DEFAULT_POLICY_POLL: Duration = Duration::from_secs(1);
pub const DEFAULT_SDS_BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const DEFAULT_SDS_BACKOFF_MAX: Duration = Duration::from_secs(10);

/// One outbound listener and where it goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OutboundRoute {
    pub listen: SocketAddr,
    pub dest: SocketAddr,
    /// The server's expected SPIFFE ID; `None` = outside the mesh, plaintext.
    pub peer: Option<SpiffeId>,
}

impl OutboundRoute {
    /// `[LISTEN=]DEST,SPIFFE_ID` or `[LISTEN=]DEST,plaintext`; LISTEN
    /// defaults to [`DEFAULT_OUTBOUND_ADDR`].
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: &str| Error::Config(format!("--outbound {s:?}: {why}"));
        let (listen, rest) = match s.split_once('=') {
            Some((l, r)) => (l.parse().map_err(|_| bad("LISTEN is not an address"))?, r),
            None => (DEFAULT_OUTBOUND_ADDR.parse().expect("default address"), s),
        };
        let (dest, peer) = rest
            .split_once(',')
            .ok_or_else(|| bad("expected DEST,SPIFFE_ID or DEST,plaintext"))?;
        let dest = dest.parse().map_err(|_| bad("DEST is not an address"))?;
        let peer = match peer {
            "plaintext" => None,
            id => Some(SpiffeId::parse(id).map_err(|e| bad(&e.to_string()))?),
        };
        Ok(OutboundRoute { listen, dest, peer })
    }
}

/// Everything the shim needs to run.
#[derive(Clone, Debug, Serialize)]
pub struct Config {
    pub inbound_addr: SocketAddr,
    /// The local app that inbound connections go to.
    pub app_addr: SocketAddr,
    pub outbound: Vec<OutboundRoute>,
    /// Admin API; must be a loopback address.
    pub admin_addr: SocketAddr,
    pub sds_socket: PathBuf,
    pub node_id: String,
    pub node_cluster: String,
    pub trust_domain: String,
    /// Trust domains read as `trust_domain` in peer IDs (Istio's
    /// `trustDomainAliases`): inbound, outbound and the allow-list.
    pub trust_domain_aliases: Vec<String>,
    /// The PeerAuthentication-shaped YAML file, polled for changes.
    pub policy_file: Option<PathBuf>,
    /// The mode used when there is no policy file.
    pub default_mode: Mode,
    #[serde(serialize_with = "as_secs")]
    pub policy_poll: Duration,
    #[serde(serialize_with = "as_secs")]
    pub handshake_timeout: Duration,
    #[serde(serialize_with = "as_secs")]
    pub connect_timeout: Duration,
    pub max_connections: usize,
    #[serde(serialize_with = "as_secs")]
    pub drain_grace: Duration,
    #[serde(serialize_with = "as_secs")]
    pub sds_backoff_min: Duration,
    #[serde(serialize_with = "as_secs")]
    pub sds_backoff_max: Duration,
}

fn as_secs<S: serde::Serializer>(d: &Duration, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{}s", d.as_secs_f64()))
}

impl Config {
    /// Defaults everywhere, with the given SDS socket and app.
    pub fn new(sds_socket: PathBuf, app_addr: SocketAddr) -> Self {
        Config {
            inbound_addr: DEFAULT_INBOUND_ADDR.parse().expect("default address"),
            app_addr,
            outbound: Vec::new(),
            admin_addr: DEFAULT_ADMIN_ADDR.parse().expect("default address"),
            sds_socket,
            node_id: node_id("127.0.0.1", "meshid-envoy-shim", "default"),
            node_cluster: "meshid-envoy-shim.default".into(),
            trust_domain: DEFAULT_TRUST_DOMAIN.into(),
            trust_domain_aliases: Vec::new(),
            policy_file: None,
            default_mode: Policy::default().mode,
            policy_poll: DEFAULT_POLICY_POLL,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            drain_grace: DEFAULT_DRAIN_GRACE,
            sds_backoff_min: DEFAULT_SDS_BACKOFF_MIN,
            sds_backoff_max: DEFAULT_SDS_BACKOFF_MAX,
        }
    }

    /// Listens on 127.0.0.1 with OS-chosen ports (for tests and benches).
    pub fn local(sds_socket: PathBuf, app_addr: SocketAddr) -> Self {
        Config {
            inbound_addr: "127.0.0.1:0".parse().expect("address"),
            admin_addr: "127.0.0.1:0".parse().expect("address"),
            ..Config::new(sds_socket, app_addr)
        }
    }

    /// Checks what types cannot.
    pub fn validate(&self) -> Result<()> {
        if !self.admin_addr.ip().is_loopback() {
            return Err(Error::Config(format!(
                "admin address {} must be on loopback",
                self.admin_addr
            )));
        }
        TrustDomain::new(&self.trust_domain)?;
        for alias in &self.trust_domain_aliases {
            TrustDomain::new(alias)
                .map_err(|e| Error::Config(format!("--trust-domain-aliases {alias:?}: {e}")))?;
        }
        if self.node_id.is_empty() {
            return Err(Error::Config(
                "node id must not be empty (SDS requires it)".into(),
            ));
        }
        if self.max_connections == 0 {
            return Err(Error::Config("max connections must be at least 1".into()));
        }
        let mut listens: Vec<SocketAddr> = self.outbound.iter().map(|r| r.listen).collect();
        listens.push(self.inbound_addr);
        listens.push(self.admin_addr);
        listens.retain(|a| a.port() != 0);
        let n = listens.len();
        listens.sort();
        listens.dedup();
        if listens.len() != n {
            return Err(Error::Config("two listeners share an address".into()));
        }
        Ok(())
    }
}

/// Istio's sidecar node id: `sidecar~IP~POD.NS~NS.svc.cluster.local`.
pub fn node_id(ip: &str, pod: &str, namespace: &str) -> String {
    format!("sidecar~{ip}~{pod}.{namespace}~{namespace}.svc.cluster.local")
}

/// Command-line flags. Unset flags fall back to the environment variables
/// named in their help, then to the defaults.
#[derive(Clone, Debug, Default, Parser)]
#[command(
    name = "meshid-envoy-shim",
    version,
    about = "An SDS-fed mTLS proxy with Istio's inbound modes and secure naming outbound"
)]
pub struct Cli {
    /// Inbound listener [default: 0.0.0.0:15006].
    #[arg(long)]
    pub inbound: Option<SocketAddr>,
    /// The local app inbound traffic goes to [default: 127.0.0.1:8080].
    #[arg(long)]
    pub app: Option<SocketAddr>,
    /// Outbound listener: `[LISTEN=]DEST,SPIFFE_ID` (mTLS, server must be SPIFFE_ID)
    /// or `[LISTEN=]DEST,plaintext` (outside the mesh). LISTEN defaults to 127.0.0.1:15001.
    #[arg(long = "outbound", value_name = "ROUTE")]
    pub outbound: Vec<String>,
    /// Admin API on loopback [default: 127.0.0.1:15000].
    #[arg(long)]
    pub admin: Option<SocketAddr>,
    /// SDS Unix socket [env: WORKLOAD_IDENTITY_SOCKET_FILE renames the file in
    /// ./var/run/secrets/workload-spiffe-uds/].
    #[arg(long)]
    pub sds_socket: Option<PathBuf>,
    /// Node id sent to SDS [default: built from INSTANCE_IP, POD_NAME, POD_NAMESPACE].
    #[arg(long)]
    pub node_id: Option<String>,
    /// Node cluster sent to SDS [env: SERVICE_CLUSTER; default: POD_NAME.POD_NAMESPACE].
    #[arg(long)]
    pub cluster: Option<String>,
    /// Trust domain of accepted peers [env: TRUST_DOMAIN; default: cluster.local].
    #[arg(long)]
    pub trust_domain: Option<String>,
    /// Other trust domains that mean this one in peer IDs (Istio's
    /// `trustDomainAliases`), comma-separated [env: TRUST_DOMAIN_ALIASES].
    #[arg(long, value_delimiter = ',')]
    pub trust_domain_aliases: Vec<String>,
    /// PeerAuthentication-shaped policy YAML, reloaded when it changes.
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// Inbound mode when there is no policy file [default: PERMISSIVE].
    #[arg(long)]
    pub mode: Option<Mode>,
    /// Seconds to finish a TLS handshake [default: 10].
    #[arg(long)]
    pub handshake_timeout: Option<f64>,
    /// Seconds to connect to the app or a destination [default: 10].
    #[arg(long)]
    pub connect_timeout: Option<f64>,
    /// Open connections at most (inbound and outbound together) [default: 4096].
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Seconds open connections get at shutdown [env: TERMINATION_DRAIN_DURATION_SECONDS; default: 5].
    #[arg(long)]
    pub drain_grace: Option<f64>,
    /// Runtime worker threads, as Envoy's --concurrency [default: number of CPUs].
    #[arg(long)]
    pub concurrency: Option<usize>,
}

fn secs(what: &str, v: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(v)
        .map_err(|_| Error::Config(format!("{what}: {v} is not a duration in seconds")))
}

impl Cli {
    /// The config these flags, the environment (through `env`) and the
    /// defaults give, validated.
    pub fn into_config(self, env: impl Fn(&str) -> Option<String>) -> Result<Config> {
        let env = |k: &str| env(k).filter(|v| !v.is_empty());
        let sds_socket = self.sds_socket.unwrap_or_else(|| {
            PathBuf::from(DEFAULT_SDS_DIR).join(
                env("WORKLOAD_IDENTITY_SOCKET_FILE").unwrap_or_else(|| DEFAULT_SDS_FILE.into()),
            )
        });
        let app = self
            .app
            .unwrap_or_else(|| DEFAULT_APP_ADDR.parse().expect("default address"));
        let mut c = Config::new(sds_socket, app);
        if let Some(a) = self.inbound {
            c.inbound_addr = a;
        }
        if let Some(a) = self.admin {
            c.admin_addr = a;
        }
        c.outbound = self
            .outbound
            .iter()
            .map(|r| OutboundRoute::parse(r))
            .collect::<Result<_>>()?;
        let pod = env("POD_NAME").unwrap_or_else(|| "meshid-envoy-shim".into());
        let ns = env("POD_NAMESPACE").unwrap_or_else(|| "default".into());
        let ip = env("INSTANCE_IP").unwrap_or_else(|| "127.0.0.1".into());
        c.node_id = self.node_id.unwrap_or_else(|| node_id(&ip, &pod, &ns));
        c.node_cluster = self
            .cluster
            .or_else(|| env("SERVICE_CLUSTER"))
            .unwrap_or_else(|| format!("{pod}.{ns}"));
        if let Some(td) = self.trust_domain.or_else(|| env("TRUST_DOMAIN")) {
            c.trust_domain = td;
        }
        c.trust_domain_aliases = if self.trust_domain_aliases.is_empty() {
            env("TRUST_DOMAIN_ALIASES")
                .map(|v| v.split(',').map(|a| a.trim().to_owned()).collect())
                .unwrap_or_default()
        } else {
            self.trust_domain_aliases
        };
        c.policy_file = self.policy;
        if let Some(m) = self.mode {
            c.default_mode = m;
        }
        if let Some(v) = self.handshake_timeout {
            c.handshake_timeout = secs("--handshake-timeout", v)?;
        }
        if let Some(v) = self.connect_timeout {
            c.connect_timeout = secs("--connect-timeout", v)?;
        }
        if let Some(v) = self.max_connections {
            c.max_connections = v;
        }
        match (self.drain_grace, env("TERMINATION_DRAIN_DURATION_SECONDS")) {
            (Some(v), _) => c.drain_grace = secs("--drain-grace", v)?,
            (None, Some(v)) => {
                let v: f64 = v.parse().map_err(|_| {
                    Error::Config(format!(
                        "TERMINATION_DRAIN_DURATION_SECONDS={v:?} is not a number"
                    ))
                })?;
                c.drain_grace = secs("TERMINATION_DRAIN_DURATION_SECONDS", v)?;
            }
            (None, None) => {}
        }
        c.validate()?;
        Ok(c)
    }
}

impl clap::ValueEnum for Mode {
    fn value_variants<'a>() -> &'a [Self] {
        &[Mode::Strict, Mode::Permissive, Mode::Disable]
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse(args: &[&str], env: &[(&str, &str)]) -> Result<Config> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let cli =
            Cli::try_parse_from(std::iter::once("meshid-envoy-shim").chain(args.iter().copied()))
                .map_err(|e| Error::Config(e.to_string()))?;
        cli.into_config(|k| env.get(k).cloned())
    }

    #[test]
    fn defaults_are_istios() {
        let c = parse(&[], &[]).unwrap();
        assert_eq!(c.inbound_addr.to_string(), "0.0.0.0:15006");
        assert_eq!(c.admin_addr.to_string(), "127.0.0.1:15000");
        assert_eq!(
            c.sds_socket,
            PathBuf::from("./var/run/secrets/workload-spiffe-uds/socket")
        );
        assert_eq!(c.trust_domain, "cluster.local");
        assert_eq!(c.default_mode, Mode::Permissive);
        assert_eq!(
            c.node_id,
            "sidecar~127.0.0.1~meshid-envoy-shim.default~default.svc.cluster.local"
        );
    }

    #[test]
    fn flags_and_environment() {
        let c = parse(
            &[
                "--outbound",
                "127.0.0.1:9000=10.0.0.2:15006,spiffe://td/ns/b/sa/s",
                "--outbound",
                "10.0.0.3:80,plaintext",
                "--mode",
                "STRICT",
            ],
            &[
                ("TRUST_DOMAIN", "td"),
                ("POD_NAME", "web-1"),
                ("POD_NAMESPACE", "shop"),
                ("INSTANCE_IP", "10.1.1.1"),
                ("WORKLOAD_IDENTITY_SOCKET_FILE", "sds.sock"),
            ],
        )
        .unwrap();
        assert_eq!(c.trust_domain, "td");
        assert_eq!(
            c.node_id,
            "sidecar~10.1.1.1~web-1.shop~shop.svc.cluster.local"
        );
        assert_eq!(c.node_cluster, "web-1.shop");
        assert_eq!(
            c.sds_socket,
            PathBuf::from("./var/run/secrets/workload-spiffe-uds/sds.sock")
        );
        assert_eq!(c.default_mode, Mode::Strict);
        assert_eq!(
            c.outbound[0].peer.as_ref().unwrap().as_str(),
            "spiffe://td/ns/b/sa/s"
        );
        assert_eq!(c.outbound[1].listen.to_string(), "127.0.0.1:15001");
        assert_eq!(c.outbound[1].peer, None);
    }

    #[test]
    fn trust_domain_aliases_from_the_flag_or_the_cas_variable() {
        let c = parse(
            &[],
            &[("TRUST_DOMAIN_ALIASES", "old.example, older.example")],
        )
        .unwrap();
        assert_eq!(c.trust_domain_aliases, ["old.example", "older.example"]);
        let c = parse(
            &["--trust-domain-aliases", "flag.example"],
            &[("TRUST_DOMAIN_ALIASES", "old.example")],
        )
        .unwrap();
        assert_eq!(c.trust_domain_aliases, ["flag.example"]);
        assert!(parse(&[], &[]).unwrap().trust_domain_aliases.is_empty());
        let err = parse(&["--trust-domain-aliases", "Bad Alias"], &[]).unwrap_err();
        assert!(err.to_string().contains("Bad Alias"), "{err}");
    }

    #[test]
    fn bad_input_is_refused() {
        assert!(parse(&["--admin", "0.0.0.0:15000"], &[]).is_err());
        assert!(parse(&["--outbound", "10.0.0.3:80"], &[]).is_err());
        assert!(parse(&["--outbound", "10.0.0.3:80,http://x"], &[]).is_err());
        assert!(
            parse(
                &[
                    "--outbound",
                    "10.0.0.3:80,plaintext",
                    "--outbound",
                    "10.0.0.4:80,plaintext"
                ],
                &[]
            )
            .is_err()
        );
        assert!(parse(&[], &[("TRUST_DOMAIN", "Bad Domain")]).is_err());
        assert!(parse(&["--handshake-timeout", "-1"], &[]).is_err());
    }
}
