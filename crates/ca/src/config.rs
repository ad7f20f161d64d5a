//! The CA's configuration: clap flags with Istio's environment names as
//! fallbacks, `DEFAULT_*` constants, validated once and printed at start.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use meshid_common::TrustDomain;

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
/// A CSR is about a kilobyte: anything this big is refused before decoding.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 64 * 1024;
pub const DEFAULT_CA_DIR_POLL: &str = "1s";
pub const DEFAULT_FILE_POLL: &str = "500ms";
pub const DEFAULT_JWKS_REFRESH: &str = "5m";
/// Lifetime of the CA's own serving certificate (re-issued at half-life).
pub const SERVING_CERT_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// meshid-ca: an Istio-compatible certificate authority (the Citadel part of istiod).
#[derive(Clone, Debug, Parser)]
#[command(name = "meshid-ca", version, about, long_about = None)]
pub struct Config {
    /// SPIFFE trust domain of every issued identity.
    #[arg(long, env = "TRUST_DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,

    /// Address of the IstioCertificateService (gRPC over TLS).
    #[arg(long, env = "CA_GRPC_ADDRESS", default_value = DEFAULT_GRPC_ADDR)]
    pub grpc_addr: SocketAddr,

    /// Address of the monitoring endpoint (/ready, /metrics).
    #[arg(long, env = "CA_MONITORING_ADDRESS", default_value = DEFAULT_MONITORING_ADDR)]
    pub monitoring_addr: SocketAddr,

    /// CA directory: a plugged-in CA (ca-cert.pem, ca-key.pem, cert-chain.pem,
    /// root-cert.pem), or else where the self-signed root is kept. Watched for
    /// rotation.
    #[arg(long, env = "ROOT_CA_DIR", default_value = DEFAULT_ROOT_CA_DIR)]
    pub root_ca_dir: PathBuf,

    /// Where to write the root bundle (PEM) for clients and the harness.
    #[arg(long, env = "CA_ROOT_CERT_OUT")]
    pub root_cert_out: Option<PathBuf>,

    /// Lifetime of a new self-signed root (e.g. 87600h).
    #[arg(long, env = "CITADEL_SELF_SIGNED_CA_CERT_TTL", default_value = DEFAULT_SELF_SIGNED_CA_CERT_TTL, value_parser = parse_duration)]
    pub self_signed_ca_cert_ttl: Duration,

    /// Workload certificate lifetime when a request asks for <= 0.
    #[arg(long, env = "DEFAULT_WORKLOAD_CERT_TTL", default_value = DEFAULT_WORKLOAD_CERT_TTL, value_parser = parse_duration)]
    pub default_workload_cert_ttl: Duration,

    /// Longest workload certificate lifetime; longer requests are rejected.
    #[arg(long, env = "MAX_WORKLOAD_CERT_TTL", default_value = DEFAULT_MAX_WORKLOAD_CERT_TTL, value_parser = parse_duration)]
    pub max_workload_cert_ttl: Duration,

    /// Accepted token audiences, comma-separated.
    #[arg(long, env = "TOKEN_AUDIENCES", default_value = DEFAULT_TOKEN_AUDIENCE, value_delimiter = ',')]
    pub token_audiences: Vec<String>,

    /// Required `iss` of service-account JWTs.
    #[arg(long, env = "TOKEN_ISSUER", default_value = DEFAULT_TOKEN_ISSUER)]
    pub token_issuer: String,

    /// JWKS file of the token issuer (re-read when it changes); enables JWT
    /// authentication. Needs --registry-file to check that pods are alive.
    #[arg(long, env = "JWKS_FILE")]
    pub jwks_file: Option<PathBuf>,

    /// JWKS URL of the token issuer (http:// or https://), fetched at start
    /// and every --jwks-refresh-interval; instead of --jwks-file.
    #[arg(long, env = "JWKS_URL")]
    pub jwks_url: Option<String>,

    /// PEM roots that an https --jwks-url must chain to.
    #[arg(long, env = "JWKS_URL_CA")]
    pub jwks_url_ca: Option<PathBuf>,

    /// How often --jwks-url is fetched again (and at once, at most every 10 s,
    /// for a token whose key id it does not hold).
    #[arg(long, default_value = DEFAULT_JWKS_REFRESH, value_parser = parse_duration)]
    pub jwks_refresh_interval: Duration,

    /// Workload registry file (pods and nodes) kept by the harness.
    #[arg(long, env = "WORKLOAD_REGISTRY")]
    pub registry_file: Option<PathBuf>,

    /// Service accounts (ns/sa, comma-separated) allowed to impersonate
    /// workloads of their own node.
    #[arg(long, env = "CA_TRUSTED_NODE_ACCOUNTS", default_value = DEFAULT_TRUSTED_NODE_ACCOUNTS, value_delimiter = ',')]
    pub trusted_node_accounts: Vec<String>,

    /// This cluster's id; a request with another non-empty `clusterid` is refused.
    #[arg(long, env = "CLUSTER_ID", default_value = DEFAULT_CLUSTER_ID)]
    pub cluster_id: String,

    /// Extra DNS names of the serving certificate (istiod.istio-system.svc is always there).
    #[arg(long = "server-name", env = "CA_SERVER_NAMES", value_delimiter = ',')]
    pub server_names: Vec<String>,

    /// IP addresses of the serving certificate.
    #[arg(
        long = "server-ip",
        env = "CA_SERVER_IPS",
        value_delimiter = ',',
        default_value = "127.0.0.1"
    )]
    pub server_ips: Vec<IpAddr>,

    /// Largest accepted request message, in bytes.
    #[arg(long, env = "CA_MAX_REQUEST_BYTES", default_value_t = DEFAULT_MAX_REQUEST_BYTES)]
    pub max_request_bytes: usize,

    /// How often the CA directory is checked for rotation.
    #[arg(long, default_value = DEFAULT_CA_DIR_POLL, value_parser = parse_duration)]
    pub ca_dir_poll_interval: Duration,

    /// How often the JWKS and registry files are checked for changes.
    #[arg(long, default_value = DEFAULT_FILE_POLL, value_parser = parse_duration)]
    pub file_poll_interval: Duration,

    /// Authenticate tokens with a Kubernetes TokenReview and look pods up in
    /// the API (in-cluster config or KUBECONFIG).
    #[cfg(feature = "kube")]
    #[arg(long, env = "CA_TOKEN_REVIEW")]
    pub token_review: bool,
}

pub use meshid_common::config::parse_duration;

/// A trusted node account, `namespace/service_account`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeAccount {
    pub namespace: String,
    pub service_account: String,
}

impl Config {
    /// Parses flags from `args` (the program name first), with environment
    /// fallbacks — what `main` does; tests pass their own list.
    pub fn from_args<I, T>(args: I) -> std::result::Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Config::try_parse_from(args)
    }

    /// Checks what clap cannot: called once by `App::build`.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if let Err(e) = TrustDomain::new(&self.trust_domain) {
            return bad(format!("--trust-domain: {e}"));
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
        if self.max_request_bytes < 4096 {
            return bad("--max-request-bytes must be at least 4096".into());
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

    /// DNS names of the serving certificate.
    pub fn serving_dns_names(&self) -> Vec<String> {
        let mut names = vec![CA_SERVICE_NAME.to_owned()];
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
            self.token_review
        }
        #[cfg(not(feature = "kube"))]
        {
            false
        }
    }

    /// One line per setting, printed at start.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        let path = |p: &Option<PathBuf>| {
            p.as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "-".into())
        };
        let _ = writeln!(out, "trust_domain: {}", self.trust_domain);
        let _ = writeln!(out, "grpc_addr: {}", self.grpc_addr);
        let _ = writeln!(out, "monitoring_addr: {}", self.monitoring_addr);
        let _ = writeln!(out, "root_ca_dir: {}", self.root_ca_dir.display());
        let _ = writeln!(out, "root_cert_out: {}", path(&self.root_cert_out));
        let _ = writeln!(
            out,
            "self_signed_ca_cert_ttl: {}s",
            self.self_signed_ca_cert_ttl.as_secs()
        );
        let _ = writeln!(
            out,
            "default_workload_cert_ttl: {}s",
            self.default_workload_cert_ttl.as_secs()
        );
        let _ = writeln!(
            out,
            "max_workload_cert_ttl: {}s",
            self.max_workload_cert_ttl.as_secs()
        );
        let _ = writeln!(out, "token_audiences: {:?}", self.audiences());
        let _ = writeln!(out, "token_issuer: {}", self.token_issuer);
        let _ = writeln!(out, "jwks_file: {}", path(&self.jwks_file));
        let _ = writeln!(out, "jwks_url: {}", self.jwks_url.as_deref().unwrap_or("-"));
        let _ = writeln!(out, "registry_file: {}", path(&self.registry_file));
        let _ = writeln!(
            out,
            "trusted_node_accounts: {:?}",
            self.trusted_node_accounts
        );
        let _ = writeln!(out, "cluster_id: {}", self.cluster_id);
        let _ = writeln!(out, "serving_dns_names: {:?}", self.serving_dns_names());
        let _ = writeln!(out, "serving_ips: {:?}", self.server_ips);
        let _ = writeln!(out, "max_request_bytes: {}", self.max_request_bytes);
        let _ = write!(out, "token_review: {}", self.kube_enabled());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let c = Config::from_args(["meshid-ca"]).unwrap();
        assert_eq!(c.trust_domain, "cluster.local");
        assert_eq!(c.grpc_addr.port(), 15012);
        assert_eq!(c.monitoring_addr.port(), 15014);
        assert_eq!(c.default_workload_cert_ttl, Duration::from_secs(86_400));
        assert_eq!(c.max_workload_cert_ttl, Duration::from_secs(90 * 86_400));
        assert_eq!(c.audiences(), ["istio-ca"]);
        assert_eq!(
            c.node_accounts().unwrap(),
            [NodeAccount {
                namespace: "istio-system".into(),
                service_account: "ztunnel".into()
            }]
        );
        c.validate().unwrap();
        assert!(c.describe().contains("trust_domain: cluster.local"));
    }

    #[test]
    fn help_documents_every_istio_variable() {
        use clap::CommandFactory;
        let help = Config::command().render_long_help().to_string();
        for env in [
            "TRUST_DOMAIN",
            "ROOT_CA_DIR",
            "TOKEN_AUDIENCES",
            "CA_TRUSTED_NODE_ACCOUNTS",
            "DEFAULT_WORKLOAD_CERT_TTL",
            "MAX_WORKLOAD_CERT_TTL",
            "CITADEL_SELF_SIGNED_CA_CERT_TTL",
        ] {
            assert!(
                help.contains(&format!("env: {env}")),
                "{env} missing from --help"
            );
        }
    }

    #[test]
    fn bad_settings_are_named() {
        let c = Config::from_args(["meshid-ca", "--trust-domain", "Bad.Domain"]).unwrap();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("--trust-domain")
        );
        let c = Config::from_args(["meshid-ca", "--trusted-node-accounts", "ztunnel"]).unwrap();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("\"ztunnel\"")
        );
        let c = Config::from_args(["meshid-ca", "--jwks-file", "/x"]).unwrap();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("--registry-file")
        );
        let url = |u: &str| {
            Config::from_args(["meshid-ca", "--jwks-url", u, "--registry-file", "/r"])
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string()
        };
        assert!(url("https://issuer.example/jwks").contains("--jwks-url-ca"));
        assert!(url("ftp://issuer.example/jwks").contains("http://"));
        let c = Config::from_args(["meshid-ca", "--default-workload-cert-ttl", "100d"]).unwrap();
        assert!(c.validate().is_err());
    }
}
