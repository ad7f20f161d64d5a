//! The CA's configuration: clap flags with Istio's environment names as
//! fallbacks, `DEFAULT_*` constants, validated once and printed at start
//! (as YAML, like every component: `meshid_common::config::log_config`).

use std::collections::HashMap;
use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::Parser;
use meshid_common::TrustDomain;
use meshid_common::config::serialize_duration;
use serde::Serialize;

use crate::error::{Error, Result};

pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
pub const DEFAULT_GRPC_ADDR: &str = "0.0.0.0:15012";
pub const DEFAULT_MONITORING_ADDR: &str = "0.0.0.0:15014";
pub const DEFAULT_ROOT_CA_DIR: &str = "./etc/cacerts";
pub const DEFAULT_SELF_SIGNED_CA_CERT_TTL: &str = "87600h";
pub const DEFAULT_WORKLOAD_CERT_TTL: &str = "24h";
pub const DEFAULT_MAX_WORKLOAD_CERT_TTL: &str = "2160h";
pub const DEFAULT_TOKEN_AUDIENCE: &str = "istio-ca";
/// The issuer of projected service-account tokens in a default cluster.
pub const DEFAULT_TOKEN_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
pub const DEFAULT_TRUSTED_NODE_ACCOUNTS: &str = "istio-system/ztunnel";
/// Istio's name for the local cluster.
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";
/// Always in the serving certificate, whatever else is configured.
pub const CA_SERVICE_NAME: &str = "istiod.istio-system.svc";
/// The Services istiod's certificate names besides `istiod` (and
/// `istiod-<revision>` for a revision), in istio-system, as istiod does.
pub const KNOWN_SERVICE_HOSTS: [&str; 3] = ["istiod", "istiod-remote", "istio-pilot"];
/// The namespace of those Services.
pub const CA_NAMESPACE: &str = "istio-system";
/// A CSR is about a kilobyte: anything this big is refused before decoding.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 64 * 1024;
pub const DEFAULT_CA_DIR_POLL: &str = "1s";
pub const DEFAULT_FILE_POLL: &str = "500ms";
pub const DEFAULT_JWKS_REFRESH: &str = "5m";
/// IP addresses of the serving certificate, comma-separated.
pub const DEFAULT_SERVER_IPS: &str = "127.0.0.1";
/// Lifetime of the CA's own serving certificate (re-issued at half-life).
pub const SERVING_CERT_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// meshid-ca: an Istio-compatible certificate authority (the Citadel part of istiod).
///
/// Each flag falls back to the Istio environment variable named in its help,
/// then to a default.
#[derive(Clone, Debug, Default, Parser)]
#[command(name = "meshid-ca", version, about, long_about = None)]
pub struct Cli {
    /// SPIFFE trust domain of every issued identity [env: TRUST_DOMAIN] [default: cluster.local]
    #[arg(long)]
    pub trust_domain: Option<String>,

    /// Other trust domains that mean this one (Istio's meshConfig
    /// `trustDomainAliases`, comma-separated): a CSR naming the caller's
    /// identity in an alias is issued in the primary trust domain
    /// [env: TRUST_DOMAIN_ALIASES]
    #[arg(long, value_delimiter = ',')]
    pub trust_domain_aliases: Vec<String>,

    /// Address of the IstioCertificateService (gRPC over TLS) [env: CA_GRPC_ADDRESS] [default: 0.0.0.0:15012]
    #[arg(long)]
    pub grpc_addr: Option<SocketAddr>,

    /// Address of the monitoring endpoint (/ready, /metrics) [env: CA_MONITORING_ADDRESS] [default: 0.0.0.0:15014]
    #[arg(long)]
    pub monitoring_addr: Option<SocketAddr>,

    /// CA directory: a plugged-in CA (ca-cert.pem, ca-key.pem, cert-chain.pem,
    /// root-cert.pem), or else where the self-signed root is kept. Watched for
    /// rotation [env: ROOT_CA_DIR] [default: ./etc/cacerts]
    #[arg(long)]
    pub root_ca_dir: Option<PathBuf>,

    /// Where to write the root bundle (PEM) for clients and the harness [env: CA_ROOT_CERT_OUT]
    #[arg(long)]
    pub root_cert_out: Option<PathBuf>,

    /// Lifetime of a new self-signed root (e.g. 87600h) [env: CITADEL_SELF_SIGNED_CA_CERT_TTL] [default: 87600h]
    #[arg(long)]
    pub self_signed_ca_cert_ttl: Option<String>,

    /// Workload certificate lifetime when a request asks for <= 0 [env: DEFAULT_WORKLOAD_CERT_TTL] [default: 24h]
    #[arg(long)]
    pub default_workload_cert_ttl: Option<String>,

    /// Longest workload certificate lifetime; longer requests are rejected [env: MAX_WORKLOAD_CERT_TTL] [default: 2160h]
    #[arg(long)]
    pub max_workload_cert_ttl: Option<String>,

    /// Accepted token audiences, comma-separated [env: TOKEN_AUDIENCES] [default: istio-ca]
    #[arg(long, value_delimiter = ',')]
    pub token_audiences: Vec<String>,

    /// Required `iss` of service-account JWTs [env: TOKEN_ISSUER] [default: https://kubernetes.default.svc.cluster.local]
    #[arg(long)]
    pub token_issuer: Option<String>,

    /// JWKS file of the token issuer (re-read when it changes); enables JWT
    /// authentication. Needs --registry-file to check that pods are alive [env: JWKS_FILE]
    #[arg(long)]
    pub jwks_file: Option<PathBuf>,

    /// JWKS URL of the token issuer (http:// or https://), fetched at start
    /// and every --jwks-refresh-interval; instead of --jwks-file [env: JWKS_URL]
    #[arg(long)]
    pub jwks_url: Option<String>,

    /// PEM roots that an https --jwks-url must chain to [env: JWKS_URL_CA]
    #[arg(long)]
    pub jwks_url_ca: Option<PathBuf>,

    /// How often --jwks-url is fetched again (and at once, at most every 10 s,
    /// for a token whose key id it does not hold) [default: 5m]
    #[arg(long)]
    pub jwks_refresh_interval: Option<String>,

    /// Workload registry file (pods and nodes) kept by the harness [env: WORKLOAD_REGISTRY]
    #[arg(long)]
    pub registry_file: Option<PathBuf>,

    /// Service accounts (ns/sa, comma-separated) allowed to impersonate
    /// workloads of their own node [env: CA_TRUSTED_NODE_ACCOUNTS] [default: istio-system/ztunnel]
    #[arg(long, value_delimiter = ',')]
    pub trusted_node_accounts: Vec<String>,

    /// This cluster's id; a token caller naming another non-empty `clusterid` is refused (client-cert callers never are) [env: CLUSTER_ID] [default: Kubernetes]
    #[arg(long)]
    pub cluster_id: Option<String>,

    /// Other cluster ids that name this cluster (istiod's `--clusterAliases`), comma-separated [env: CLUSTER_ALIASES]
    #[arg(long, value_delimiter = ',')]
    pub cluster_aliases: Vec<String>,

    /// The control-plane revision: the serving certificate also names
    /// `istiod-<revision>.istio-system.svc` [env: REVISION]
    #[arg(long)]
    pub revision: Option<String>,

    /// Extra DNS names of the serving certificate (istiod.istio-system.svc is always there) [env: CA_SERVER_NAMES]
    #[arg(long = "server-name", value_delimiter = ',')]
    pub server_names: Vec<String>,

    /// IP addresses of the serving certificate [env: CA_SERVER_IPS] [default: 127.0.0.1]
    #[arg(long = "server-ip", value_delimiter = ',')]
    pub server_ips: Vec<IpAddr>,

    /// Largest accepted request message, in bytes [env: CA_MAX_REQUEST_BYTES] [default: 65536]
    #[arg(long)]
    pub max_request_bytes: Option<usize>,

    /// How often the CA directory is checked for rotation [default: 1s]
    #[arg(long)]
    pub ca_dir_poll_interval: Option<String>,

    /// How often the JWKS and registry files are checked for changes [default: 500ms]
    #[arg(long)]
    pub file_poll_interval: Option<String>,

    /// Authenticate tokens with a Kubernetes TokenReview and look pods up in
    /// the API (in-cluster config or KUBECONFIG) [env: CA_TOKEN_REVIEW]
    #[cfg(feature = "kube")]
    #[arg(long)]
    pub token_review: bool,

    /// `--signer builtin|vault` and the Vault settings.
    #[command(flatten)]
    pub signer: crate::vault::SignerCli,

    /// Cluster mode (implies --token-review): pods looked up through a watch
    /// cache, the self-signed root kept in the --ca-secret Secret, a
    /// plugged-in CA read from the --cacerts-secret Secret, and the root
    /// published to the --root-configmap ConfigMap of every namespace by the
    /// holder of the --leader-lease Lease [env: CA_KUBE]
    #[cfg(feature = "kube")]
    #[arg(long)]
    pub kube: bool,

    /// Namespace of the CA's Secrets and Lease (cluster mode) [env: POD_NAMESPACE] [default: istio-system]
    #[cfg(feature = "kube")]
    #[arg(long)]
    pub namespace: Option<String>,

    /// Secret holding the self-signed root (cluster mode; istiod's name) [default: istio-ca-secret]
    #[cfg(feature = "kube")]
    #[arg(long)]
    pub ca_secret: Option<String>,

    /// Secret holding a plugged-in CA, used instead of the self-signed root when present (cluster mode) [default: cacerts]
    #[cfg(feature = "kube")]
    #[arg(long)]
    pub cacerts_secret: Option<String>,

    /// ConfigMap the root bundle is published to, in every namespace (cluster mode) [default: istio-ca-root-cert]
    #[cfg(feature = "kube")]
    #[arg(long)]
    pub root_configmap: Option<String>,

    /// Lease whose holder publishes the root ConfigMaps (cluster mode) [default: istio-namespace-controller-election]
    #[cfg(feature = "kube")]
    #[arg(long)]
    pub leader_lease: Option<String>,
}

/// Cluster mode's defaults: istiod's names.
pub const DEFAULT_NAMESPACE: &str = "istio-system";
pub const DEFAULT_CA_SECRET: &str = "istio-ca-secret";
pub const DEFAULT_CACERTS_SECRET: &str = "cacerts";
pub const DEFAULT_ROOT_CONFIGMAP: &str = "istio-ca-root-cert";
/// istiod's election for the controller that writes the root ConfigMaps.
pub const DEFAULT_LEADER_LEASE: &str = "istio-namespace-controller-election";

/// The CA's settings: [`Cli`] resolved against the environment and the
/// defaults ([`Config::resolve`]), checked by [`Config::validate`].
#[derive(Clone, Debug, Serialize)]
pub struct Config {
    pub trust_domain: String,
    pub trust_domain_aliases: Vec<String>,
    pub grpc_addr: SocketAddr,
    pub monitoring_addr: SocketAddr,
    pub root_ca_dir: PathBuf,
    pub root_cert_out: Option<PathBuf>,
    #[serde(serialize_with = "serialize_duration")]
    pub self_signed_ca_cert_ttl: Duration,
    #[serde(serialize_with = "serialize_duration")]
    pub default_workload_cert_ttl: Duration,
    #[serde(serialize_with = "serialize_duration")]
    pub max_workload_cert_ttl: Duration,
    pub token_audiences: Vec<String>,
    pub token_issuer: String,
    pub jwks_file: Option<PathBuf>,
    /// Printed without any user:password part.
    #[serde(serialize_with = "serialize_url")]
    pub jwks_url: Option<String>,
    pub jwks_url_ca: Option<PathBuf>,
    #[serde(serialize_with = "serialize_duration")]
    pub jwks_refresh_interval: Duration,
    pub registry_file: Option<PathBuf>,
    pub trusted_node_accounts: Vec<String>,
    pub cluster_id: String,
    pub cluster_aliases: Vec<String>,
    pub revision: Option<String>,
    pub server_names: Vec<String>,
    pub server_ips: Vec<IpAddr>,
    pub max_request_bytes: usize,
    #[serde(serialize_with = "serialize_duration")]
    pub ca_dir_poll_interval: Duration,
    #[serde(serialize_with = "serialize_duration")]
    pub file_poll_interval: Duration,
    #[cfg(feature = "kube")]
    pub token_review: bool,
    /// Who signs: the built-in CA or Vault PKI.
    pub signer: crate::vault::SignerConfig,
    #[cfg(feature = "kube")]
    pub kube: bool,
    #[cfg(feature = "kube")]
    pub namespace: String,
    #[cfg(feature = "kube")]
    pub ca_secret: String,
    #[cfg(feature = "kube")]
    pub cacerts_secret: String,
    #[cfg(feature = "kube")]
    pub root_configmap: String,
    #[cfg(feature = "kube")]
    pub leader_lease: String,
    /// This replica's name in the Lease: `POD_NAME`, else the host name.
    #[cfg(feature = "kube")]
    pub lease_holder: String,
}

use meshid_common::config::Layers;
pub use meshid_common::config::{EnvSource, ProcessEnv, parse_duration};

/// A trusted node account, `namespace/service_account`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeAccount {
    pub namespace: String,
    pub service_account: String,
}

impl Default for Config {
    fn default() -> Self {
        Config::resolve(Cli::default(), &HashMap::<String, String>::new())
            .expect("the defaults parse")
    }
}

impl Config {
    /// Parses flags from `args` (the program name first) and resolves them
    /// against `env` (the process environment in `main`, a map in tests).
    pub fn from_args<I, T>(args: I, env: &dyn EnvSource) -> Result<Self>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let cli = Cli::try_parse_from(args).map_err(|e| Error::Config(e.to_string()))?;
        Self::resolve(cli, env)
    }

    /// Each setting from its flag, else its environment variable (unset and
    /// blank are the same), else its default. Errors name the setting whose
    /// value does not parse; [`Config::validate`] checks the rest.
    pub fn resolve(cli: Cli, env: &dyn EnvSource) -> Result<Self> {
        let layers = Layers::new(env);
        let text = |flag: Option<String>, key: &str, default: &str| {
            flag.or_else(|| layers.env(key))
                .unwrap_or_else(|| default.to_owned())
        };
        let path =
            |flag: Option<PathBuf>, key: &str| flag.or_else(|| layers.env(key).map(PathBuf::from));
        let duration = |flag: Option<String>, key: Option<&str>, default: &str, name: &str| {
            let default = parse_duration(default).expect("DEFAULT_* durations parse");
            layers
                .duration(flag, key, default, name)
                .map_err(|e| Error::Config(e.0))
        };
        // A list flag wins when given at all; else the variable, comma-separated.
        let list = |flag: Vec<String>, key: &str, default: &str| -> Vec<String> {
            if !flag.is_empty() {
                return flag;
            }
            let value = layers.env(key).unwrap_or_else(|| default.to_owned());
            if value.is_empty() {
                return Vec::new();
            }
            value.split(',').map(|s| s.trim().to_owned()).collect()
        };
        let addr = |flag: Option<SocketAddr>, key: &str, default: &str| -> Result<SocketAddr> {
            match flag {
                Some(a) => Ok(a),
                None => parse_env(key, layers.env(key), default),
            }
        };

        let server_ips = if cli.server_ips.is_empty() {
            list(Vec::new(), "CA_SERVER_IPS", DEFAULT_SERVER_IPS)
                .iter()
                .map(|ip| {
                    ip.parse::<IpAddr>().map_err(|_| {
                        Error::Config(format!("CA_SERVER_IPS: {ip:?} is not an IP address"))
                    })
                })
                .collect::<Result<Vec<_>>>()?
        } else {
            cli.server_ips
        };
        let max_request_bytes = match cli.max_request_bytes {
            Some(n) => n,
            None => parse_env(
                "CA_MAX_REQUEST_BYTES",
                layers.env("CA_MAX_REQUEST_BYTES"),
                &DEFAULT_MAX_REQUEST_BYTES.to_string(),
            )?,
        };

        Ok(Config {
            trust_domain: text(cli.trust_domain, "TRUST_DOMAIN", DEFAULT_TRUST_DOMAIN),
            trust_domain_aliases: list(cli.trust_domain_aliases, "TRUST_DOMAIN_ALIASES", "")
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect(),
            grpc_addr: addr(cli.grpc_addr, "CA_GRPC_ADDRESS", DEFAULT_GRPC_ADDR)?,
            monitoring_addr: addr(
                cli.monitoring_addr,
                "CA_MONITORING_ADDRESS",
                DEFAULT_MONITORING_ADDR,
            )?,
            root_ca_dir: path(cli.root_ca_dir, "ROOT_CA_DIR")
                .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT_CA_DIR)),
            root_cert_out: path(cli.root_cert_out, "CA_ROOT_CERT_OUT"),
            self_signed_ca_cert_ttl: duration(
                cli.self_signed_ca_cert_ttl,
                Some("CITADEL_SELF_SIGNED_CA_CERT_TTL"),
                DEFAULT_SELF_SIGNED_CA_CERT_TTL,
                "CITADEL_SELF_SIGNED_CA_CERT_TTL (--self-signed-ca-cert-ttl)",
            )?,
            default_workload_cert_ttl: duration(
                cli.default_workload_cert_ttl,
                Some("DEFAULT_WORKLOAD_CERT_TTL"),
                DEFAULT_WORKLOAD_CERT_TTL,
                "DEFAULT_WORKLOAD_CERT_TTL (--default-workload-cert-ttl)",
            )?,
            max_workload_cert_ttl: duration(
                cli.max_workload_cert_ttl,
                Some("MAX_WORKLOAD_CERT_TTL"),
                DEFAULT_MAX_WORKLOAD_CERT_TTL,
                "MAX_WORKLOAD_CERT_TTL (--max-workload-cert-ttl)",
            )?,
            token_audiences: list(
                cli.token_audiences,
                "TOKEN_AUDIENCES",
                DEFAULT_TOKEN_AUDIENCE,
            ),
            token_issuer: text(cli.token_issuer, "TOKEN_ISSUER", DEFAULT_TOKEN_ISSUER),
            jwks_file: path(cli.jwks_file, "JWKS_FILE"),
            jwks_url: cli.jwks_url.or_else(|| layers.env("JWKS_URL")),
            jwks_url_ca: path(cli.jwks_url_ca, "JWKS_URL_CA"),
            jwks_refresh_interval: duration(
                cli.jwks_refresh_interval,
                None,
                DEFAULT_JWKS_REFRESH,
                "--jwks-refresh-interval",
            )?,
            registry_file: path(cli.registry_file, "WORKLOAD_REGISTRY"),
            trusted_node_accounts: list(
                cli.trusted_node_accounts,
                "CA_TRUSTED_NODE_ACCOUNTS",
                DEFAULT_TRUSTED_NODE_ACCOUNTS,
            ),
            cluster_id: text(cli.cluster_id, "CLUSTER_ID", DEFAULT_CLUSTER_ID),
            cluster_aliases: list(cli.cluster_aliases, "CLUSTER_ALIASES", "")
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect(),
            revision: cli
                .revision
                .or_else(|| layers.env("REVISION"))
                .filter(|r| !r.is_empty()),
            server_names: list(cli.server_names, "CA_SERVER_NAMES", ""),
            server_ips,
            max_request_bytes,
            ca_dir_poll_interval: duration(
                cli.ca_dir_poll_interval,
                None,
                DEFAULT_CA_DIR_POLL,
                "--ca-dir-poll-interval",
            )?,
            file_poll_interval: duration(
                cli.file_poll_interval,
                None,
                DEFAULT_FILE_POLL,
                "--file-poll-interval",
            )?,
            #[cfg(feature = "kube")]
            token_review: cli.token_review
                || match layers.env("CA_TOKEN_REVIEW") {
                    Some(v) => parse_bool("CA_TOKEN_REVIEW", &v)?,
                    None => false,
                },
            signer: crate::vault::SignerConfig::resolve(cli.signer, &layers)?,
            #[cfg(feature = "kube")]
            kube: cli.kube
                || match layers.env("CA_KUBE") {
                    Some(v) => parse_bool("CA_KUBE", &v)?,
                    None => false,
                },
            #[cfg(feature = "kube")]
            namespace: text(cli.namespace, "POD_NAMESPACE", DEFAULT_NAMESPACE),
            #[cfg(feature = "kube")]
            ca_secret: cli.ca_secret.unwrap_or_else(|| DEFAULT_CA_SECRET.into()),
            #[cfg(feature = "kube")]
            cacerts_secret: cli
                .cacerts_secret
                .unwrap_or_else(|| DEFAULT_CACERTS_SECRET.into()),
            #[cfg(feature = "kube")]
            root_configmap: cli
                .root_configmap
                .unwrap_or_else(|| DEFAULT_ROOT_CONFIGMAP.into()),
            #[cfg(feature = "kube")]
            leader_lease: cli
                .leader_lease
                .unwrap_or_else(|| DEFAULT_LEADER_LEASE.into()),
            #[cfg(feature = "kube")]
            lease_holder: layers
                .env("POD_NAME")
                .or_else(|| layers.env("HOSTNAME"))
                .or_else(|| {
                    std::fs::read_to_string("/etc/hostname")
                        .ok()
                        .map(|h| h.trim().to_owned())
                        .filter(|h| !h.is_empty())
                })
                .unwrap_or_else(|| format!("meshid-ca-{}", std::process::id())),
        })
    }

    /// Checks the settings make sense together: called once by `App::build`.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if let Err(e) = TrustDomain::new(&self.trust_domain) {
            return bad(format!("--trust-domain: {e}"));
        }
        for alias in &self.trust_domain_aliases {
            if let Err(e) = TrustDomain::new(alias) {
                return bad(format!("--trust-domain-aliases {alias:?}: {e}"));
            }
        }
        if self.audiences().is_empty() {
            return bad("--token-audiences: at least one audience is needed".into());
        }
        if self.max_workload_cert_ttl.is_zero() {
            return bad("--max-workload-cert-ttl must be positive".into());
        }
        if self.default_workload_cert_ttl.is_zero()
            || self.default_workload_cert_ttl > self.max_workload_cert_ttl
        {
            return bad(format!(
                "--default-workload-cert-ttl {:?} must be positive and at most --max-workload-cert-ttl {:?}",
                self.default_workload_cert_ttl, self.max_workload_cert_ttl
            ));
        }
        if self.self_signed_ca_cert_ttl < Duration::from_secs(3600) {
            return bad("--self-signed-ca-cert-ttl must be at least 1h".into());
        }
        self.node_accounts()?;
        self.signer.validate()?;
        if self.jwks_file.is_some() && self.jwks_url.is_some() {
            return bad("--jwks-file and --jwks-url are exclusive: give one".into());
        }
        if (self.jwks_file.is_some() || self.jwks_url.is_some())
            && self.registry_file.is_none()
            && !self.kube_enabled()
        {
            return bad(
                "--jwks-file / --jwks-url need --registry-file: a token only authenticates while its pod is alive"
                    .into(),
            );
        }
        if let Some(url) = &self.jwks_url {
            let uri: http::Uri = url
                .parse()
                .map_err(|e| Error::Config(format!("--jwks-url {url:?}: {e}")))?;
            match uri.scheme_str() {
                Some("http") => {}
                Some("https") if self.jwks_url_ca.is_some() => {}
                Some("https") => {
                    return bad("an https --jwks-url needs --jwks-url-ca (PEM roots)".into());
                }
                _ => return bad(format!("--jwks-url {url:?} must be http:// or https://")),
            }
            if uri.host().is_none() {
                return bad(format!("--jwks-url {url:?} has no host"));
            }
        }
        #[cfg(feature = "kube")]
        for (flag, name) in [
            ("--namespace", &self.namespace),
            ("--ca-secret", &self.ca_secret),
            ("--cacerts-secret", &self.cacerts_secret),
            ("--root-configmap", &self.root_configmap),
            ("--leader-lease", &self.leader_lease),
        ] {
            let ok = !name.is_empty()
                && name.len() <= 253
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
                && !name.starts_with(['-', '.'])
                && !name.ends_with(['-', '.']);
            if !ok {
                return bad(format!(
                    "{flag} {name:?} is not a Kubernetes object name (lowercase letters, digits, '-' and '.')"
                ));
            }
        }
        if self.max_request_bytes < 4096 {
            return bad("--max-request-bytes must be at least 4096".into());
        }
        if let Some(rev) = &self.revision {
            let name = format!("istiod-{rev}.{CA_NAMESPACE}.svc");
            if rustls_pki_types::ServerName::try_from(name.as_str()).is_err() {
                return bad(format!("--revision {rev:?} does not make a DNS name"));
            }
        }
        for name in &self.server_names {
            if rustls_pki_types::ServerName::try_from(name.as_str()).is_err() {
                return bad(format!("--server-name {name:?} is not a DNS name"));
            }
        }
        Ok(())
    }

    /// Non-empty audiences.
    pub fn audiences(&self) -> Vec<String> {
        self.token_audiences
            .iter()
            .map(|a| a.trim().to_owned())
            .filter(|a| !a.is_empty())
            .collect()
    }

    /// The parsed `CA_TRUSTED_NODE_ACCOUNTS`.
    pub fn node_accounts(&self) -> Result<Vec<NodeAccount>> {
        self.trusted_node_accounts
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .map(|s| match s.split_once('/') {
                Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') => {
                    Ok(NodeAccount {
                        namespace: ns.to_owned(),
                        service_account: sa.to_owned(),
                    })
                }
                _ => Err(Error::Config(format!(
                    "CA_TRUSTED_NODE_ACCOUNTS entry {s:?} is not namespace/serviceaccount"
                ))),
            })
            .collect()
    }

    /// DNS names of the serving certificate: the names real clients dial
    /// (istiod's Services `istiod`, `istiod-remote`, `istio-pilot` and
    /// `istiod-<revision>` in istio-system, short `.svc` and full
    /// `.svc.cluster.local`; `localhost`, ztunnel's default CA address
    /// outside a cluster), then the configured ones.
    pub fn serving_dns_names(&self) -> Vec<String> {
        let mut hosts: Vec<String> = KNOWN_SERVICE_HOSTS.iter().map(|h| h.to_string()).collect();
        if let Some(rev) = self.revision.as_deref().filter(|r| *r != "default") {
            hosts.push(format!("istiod-{rev}"));
        }
        let mut names = vec![CA_SERVICE_NAME.to_owned()];
        for host in &hosts {
            for name in [
                format!("{host}.{CA_NAMESPACE}.svc"),
                format!("{host}.{CA_NAMESPACE}.svc.cluster.local"),
            ] {
                if !names.contains(&name) {
                    names.push(name);
                }
            }
        }
        names.push("localhost".to_owned());
        for n in &self.server_names {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
        names
    }

    pub fn kube_enabled(&self) -> bool {
        #[cfg(feature = "kube")]
        {
            self.token_review || self.kube
        }
        #[cfg(not(feature = "kube"))]
        {
            false
        }
    }
}

/// A URL with its credentials (`user:password@`), if any, replaced.
fn without_userinfo(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..end].rfind('@') {
        Some(at) => format!("{scheme}://[redacted]{}", &rest[at..]),
        None => url.to_owned(),
    }
}

fn serialize_url<S: serde::Serializer>(
    url: &Option<String>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match url {
        Some(u) => s.serialize_some(&without_userinfo(u)),
        None => s.serialize_none(),
    }
}

/// `value` (from `key`) parsed, else `default` parsed; the error names `key`.
fn parse_env<T: FromStr>(key: &str, value: Option<String>, default: &str) -> Result<T> {
    match value {
        Some(v) => v
            .trim()
            .parse()
            .map_err(|_| Error::Config(format!("{key}: {v:?} cannot be parsed"))),
        None => Ok(default.parse().ok().expect("DEFAULT_* values parse")),
    }
}

/// `true`/`1`/`yes`/`on` or `false`/`0`/`no`/`off`, any case.
#[cfg(feature = "kube")]
fn parse_bool(key: &str, value: &str) -> Result<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(Error::Config(format!(
            "{key}: {value:?} is not true or false"
        ))),
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

    fn args(flags: &[&str]) -> Vec<String> {
        std::iter::once("meshid-ca")
            .chain(flags.iter().copied())
            .map(str::to_owned)
            .collect()
    }

    /// Parses `flags` against an empty environment.
    fn flags(flags: &[&str]) -> Config {
        Config::from_args(args(flags), &env(&[])).unwrap()
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86_400));
        assert_eq!(
            parse_duration("90d").unwrap(),
            Duration::from_secs(90 * 86_400)
        );
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("60").unwrap(), Duration::from_secs(60));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn defaults_are_istios() {
        let c = flags(&[]);
        assert_eq!(c.trust_domain, "cluster.local");
        assert_eq!(c.grpc_addr.port(), 15012);
        assert_eq!(c.monitoring_addr.port(), 15014);
        assert_eq!(c.root_ca_dir, PathBuf::from("./etc/cacerts"));
        assert_eq!(
            c.self_signed_ca_cert_ttl,
            Duration::from_secs(87_600 * 3600)
        );
        assert_eq!(c.default_workload_cert_ttl, Duration::from_secs(86_400));
        assert_eq!(c.max_workload_cert_ttl, Duration::from_secs(90 * 86_400));
        assert_eq!(c.jwks_refresh_interval, Duration::from_secs(300));
        assert_eq!(c.audiences(), ["istio-ca"]);
        assert_eq!(c.token_issuer, DEFAULT_TOKEN_ISSUER);
        assert_eq!(c.cluster_id, "Kubernetes");
        assert_eq!(c.server_names, Vec::<String>::new());
        assert_eq!(c.server_ips, [IpAddr::from([127, 0, 0, 1])]);
        assert_eq!(c.max_request_bytes, DEFAULT_MAX_REQUEST_BYTES);
        assert_eq!(c.ca_dir_poll_interval, Duration::from_secs(1));
        assert_eq!(c.file_poll_interval, Duration::from_millis(500));
        assert_eq!(
            c.node_accounts().unwrap(),
            [NodeAccount {
                namespace: "istio-system".into(),
                service_account: "ztunnel".into()
            }]
        );
        c.validate().unwrap();
        assert!(!c.kube_enabled());
    }

    #[test]
    fn the_environment_fills_in_what_no_flag_sets() {
        let e = env(&[
            ("TRUST_DOMAIN", "example.org"),
            ("TRUST_DOMAIN_ALIASES", "old.example, older.example"),
            ("CA_GRPC_ADDRESS", "127.0.0.1:9012"),
            ("CA_MONITORING_ADDRESS", "127.0.0.1:9014"),
            ("ROOT_CA_DIR", "/etc/ca"),
            ("CA_ROOT_CERT_OUT", "/out/root.pem"),
            ("CITADEL_SELF_SIGNED_CA_CERT_TTL", "48h"),
            ("DEFAULT_WORKLOAD_CERT_TTL", "1h"),
            ("MAX_WORKLOAD_CERT_TTL", "2h"),
            ("TOKEN_AUDIENCES", "istio-ca, other"),
            ("TOKEN_ISSUER", "https://issuer"),
            ("JWKS_FILE", "/jwks.json"),
            ("WORKLOAD_REGISTRY", "/registry.json"),
            (
                "CA_TRUSTED_NODE_ACCOUNTS",
                "kube-system/node,istio-system/ztunnel",
            ),
            ("CLUSTER_ID", "east"),
            ("CLUSTER_ALIASES", "east-old"),
            ("CA_SERVER_NAMES", "ca.example,ca2.example"),
            ("CA_SERVER_IPS", "10.0.0.1, ::1"),
            ("CA_MAX_REQUEST_BYTES", "8192"),
        ]);
        let c = Config::from_args(args(&[]), &e).unwrap();
        assert_eq!(c.trust_domain, "example.org");
        assert_eq!(c.trust_domain_aliases, ["old.example", "older.example"]);
        assert_eq!(c.grpc_addr.to_string(), "127.0.0.1:9012");
        assert_eq!(c.monitoring_addr.to_string(), "127.0.0.1:9014");
        assert_eq!(c.root_ca_dir, PathBuf::from("/etc/ca"));
        assert_eq!(c.root_cert_out, Some(PathBuf::from("/out/root.pem")));
        assert_eq!(c.self_signed_ca_cert_ttl, Duration::from_secs(48 * 3600));
        assert_eq!(c.default_workload_cert_ttl, Duration::from_secs(3600));
        assert_eq!(c.max_workload_cert_ttl, Duration::from_secs(7200));
        assert_eq!(c.audiences(), ["istio-ca", "other"]);
        assert_eq!(c.token_issuer, "https://issuer");
        assert_eq!(c.jwks_file, Some(PathBuf::from("/jwks.json")));
        assert_eq!(c.registry_file, Some(PathBuf::from("/registry.json")));
        assert_eq!(c.node_accounts().unwrap().len(), 2);
        assert_eq!(c.cluster_id, "east");
        assert_eq!(c.cluster_aliases, ["east-old"]);
        assert_eq!(c.server_names, ["ca.example", "ca2.example"]);
        assert_eq!(
            c.server_ips,
            [
                IpAddr::from([10, 0, 0, 1]),
                "::1".parse::<IpAddr>().unwrap()
            ]
        );
        assert_eq!(c.max_request_bytes, 8192);
        c.validate().unwrap();
    }

    #[test]
    fn a_flag_wins_over_the_environment_which_wins_over_the_default() {
        let e = env(&[
            ("TRUST_DOMAIN", "env.example"),
            ("DEFAULT_WORKLOAD_CERT_TTL", "2h"),
            ("TOKEN_AUDIENCES", "from-env"),
            ("CA_SERVER_IPS", "10.0.0.1"),
            ("CA_GRPC_ADDRESS", "127.0.0.1:1"),
            ("CA_MAX_REQUEST_BYTES", "8192"),
            // Blank is unset: the default applies.
            ("CLUSTER_ID", "  "),
        ]);
        let c = Config::from_args(
            args(&[
                "--trust-domain",
                "flag.example",
                "--default-workload-cert-ttl",
                "30m",
                "--token-audiences",
                "a,b",
                "--server-ip",
                "10.0.0.2",
                "--grpc-addr",
                "127.0.0.1:2",
                "--max-request-bytes",
                "4096",
            ]),
            &e,
        )
        .unwrap();
        assert_eq!(c.trust_domain, "flag.example");
        assert_eq!(c.default_workload_cert_ttl, Duration::from_secs(1800));
        assert_eq!(c.audiences(), ["a", "b"]);
        assert_eq!(c.server_ips, [IpAddr::from([10, 0, 0, 2])]);
        assert_eq!(c.grpc_addr.port(), 2);
        assert_eq!(c.max_request_bytes, 4096);
        assert_eq!(c.cluster_id, DEFAULT_CLUSTER_ID);

        let c = Config::from_args(args(&[]), &e).unwrap();
        assert_eq!(c.trust_domain, "env.example");
        assert_eq!(c.default_workload_cert_ttl, Duration::from_secs(7200));
        assert_eq!(c.audiences(), ["from-env"]);
        assert_eq!(c.server_ips, [IpAddr::from([10, 0, 0, 1])]);
        assert_eq!(c.grpc_addr.port(), 1);
        assert_eq!(c.max_request_bytes, 8192);
    }

    #[test]
    fn unparseable_values_name_their_setting() {
        for (vars, needle) in [
            (&[("CA_GRPC_ADDRESS", "nowhere")][..], "CA_GRPC_ADDRESS"),
            (
                &[("MAX_WORKLOAD_CERT_TTL", "soon")],
                "MAX_WORKLOAD_CERT_TTL",
            ),
            (&[("CA_SERVER_IPS", "10.0.0.300")], "CA_SERVER_IPS"),
            (&[("CA_MAX_REQUEST_BYTES", "lots")], "CA_MAX_REQUEST_BYTES"),
        ] {
            let err = Config::from_args(args(&[]), &env(vars))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{vars:?}: {err}");
        }
        let err = Config::from_args(args(&["--file-poll-interval", "often"]), &env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--file-poll-interval"), "{err}");
        let err = Config::from_args(args(&["--grpc-addr", "x"]), &env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--grpc-addr"), "{err}");
    }

    #[cfg(feature = "kube")]
    #[test]
    fn token_review_comes_from_the_flag_or_the_variable() {
        assert!(!flags(&[]).token_review);
        assert!(flags(&["--token-review"]).token_review);
        let on = |v: &str| Config::from_args(args(&[]), &env(&[("CA_TOKEN_REVIEW", v)]));
        assert!(on("true").unwrap().token_review);
        assert!(!on("0").unwrap().token_review);
        let err = on("maybe").unwrap_err().to_string();
        assert!(err.contains("CA_TOKEN_REVIEW"), "{err}");
    }

    #[cfg(feature = "kube")]
    #[test]
    fn cluster_mode_names_default_to_istiods() {
        let c = flags(&[]);
        assert!(!c.kube && !c.kube_enabled());
        assert_eq!(c.namespace, "istio-system");
        assert_eq!(c.ca_secret, "istio-ca-secret");
        assert_eq!(c.cacerts_secret, "cacerts");
        assert_eq!(c.root_configmap, "istio-ca-root-cert");
        assert_eq!(c.leader_lease, "istio-namespace-controller-election");
        let e = env(&[
            ("CA_KUBE", "true"),
            ("POD_NAMESPACE", "mesh"),
            ("POD_NAME", "meshid-ca-7d9f-x2"),
        ]);
        let c = Config::from_args(args(&["--ca-secret", "root"]), &e).unwrap();
        assert!(c.kube && c.kube_enabled());
        assert_eq!(c.namespace, "mesh");
        assert_eq!(c.ca_secret, "root");
        assert_eq!(c.lease_holder, "meshid-ca-7d9f-x2");
        c.validate().unwrap();
        let err = flags(&["--kube", "--leader-lease", "Bad_Name"])
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("--leader-lease"), "{err}");
    }

    #[test]
    fn help_documents_every_istio_variable() {
        use clap::CommandFactory;
        let help = Cli::command().render_long_help().to_string();
        for env in [
            "TRUST_DOMAIN",
            "CA_GRPC_ADDRESS",
            "CA_MONITORING_ADDRESS",
            "ROOT_CA_DIR",
            "CA_ROOT_CERT_OUT",
            "TOKEN_AUDIENCES",
            "TOKEN_ISSUER",
            "JWKS_FILE",
            "JWKS_URL",
            "JWKS_URL_CA",
            "WORKLOAD_REGISTRY",
            "CA_TRUSTED_NODE_ACCOUNTS",
            "CLUSTER_ID",
            "CA_SERVER_NAMES",
            "CA_SERVER_IPS",
            "CA_MAX_REQUEST_BYTES",
            "DEFAULT_WORKLOAD_CERT_TTL",
            "MAX_WORKLOAD_CERT_TTL",
            "CITADEL_SELF_SIGNED_CA_CERT_TTL",
        ] {
            assert!(
                help.contains(&format!("[env: {env}]")),
                "{env} missing from --help"
            );
        }
    }

    #[test]
    fn printed_config_is_yaml_with_every_setting_and_no_credentials() {
        let c = flags(&[
            "--jwks-url",
            "https://user:s3cret@issuer.example/jwks",
            "--registry-file",
            "/r",
        ]);
        let yaml = meshid_common::config::to_yaml(&c);
        for line in [
            "trust_domain: cluster.local",
            "grpc_addr: 0.0.0.0:15012",
            "default_workload_cert_ttl: 24h0m0s",
            "max_workload_cert_ttl: 2160h0m0s",
            "jwks_url: \"https://[redacted]@issuer.example/jwks\"",
            "- istio-system/ztunnel",
            "cluster_id: Kubernetes",
        ] {
            assert!(yaml.contains(line), "{line:?} missing from\n{yaml}");
        }
        assert!(!yaml.contains("s3cret"), "{yaml}");
        assert_eq!(
            without_userinfo("http://issuer:8080/a@b"),
            "http://issuer:8080/a@b"
        );
    }

    /// docs/configuration.md is written from `--help`: every flag and
    /// variable of the help is in the CA's table there.
    #[test]
    fn the_configuration_doc_lists_every_flag_and_variable() {
        use clap::CommandFactory;
        let doc = include_str!("../../../docs/configuration.md");
        let table = doc
            .split("## CA (`meshid-ca`)")
            .nth(1)
            .and_then(|rest| rest.split("\n## ").next())
            .expect("docs/configuration.md has a CA section");
        for arg in Cli::command().get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if ["help", "version", "token-review"].contains(&long) {
                continue;
            }
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            let env = help
                .split("[env: ")
                .nth(1)
                .and_then(|e| e.split(']').next())
                .map(|e| format!("`{e}`"))
                .unwrap_or_default();
            let row = format!("| `--{long}` | {env} |");
            assert!(table.contains(&row), "docs/configuration.md lacks {row}");
        }
    }

    #[test]
    fn bad_settings_are_named() {
        let c = flags(&["--trust-domain", "Bad.Domain"]);
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("--trust-domain")
        );
        let c = flags(&["--trusted-node-accounts", "ztunnel"]);
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("\"ztunnel\"")
        );
        let c = flags(&["--jwks-file", "/x"]);
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("--registry-file")
        );
        let url = |u: &str| {
            flags(&["--jwks-url", u, "--registry-file", "/r"])
                .validate()
                .unwrap_err()
                .to_string()
        };
        assert!(url("https://issuer.example/jwks").contains("--jwks-url-ca"));
        assert!(url("ftp://issuer.example/jwks").contains("http://"));
        let c = flags(&["--default-workload-cert-ttl", "100d"]);
        assert!(c.validate().is_err());
    }
}
