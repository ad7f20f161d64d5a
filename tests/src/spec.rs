//! What a run brings up, whatever the backend: the mesh description, its
//! sidecar pods and its ambient nodes. The runner builds a [`MeshSpec`]; each
//! backend ([`crate::backend`]) turns it into running components.

use std::path::PathBuf;
use std::time::Duration;

use crate::topology::{Mode, Proxy};

/// The node every sidecar pod is scheduled on (in the registry and in the
/// pods' tokens).
pub const SIDECAR_NODE: &str = "node-sidecar";

/// What to bring up.
#[derive(Clone, Debug)]
pub struct MeshSpec {
    pub trust_domain: String,
    /// TTL the agents ask for.
    pub ttl: Duration,
    pub pods: Vec<PodSpec>,
    /// Ambient nodes, each with a ztunnel and its workloads.
    pub nodes: Vec<NodeSpec>,
    /// Where the component binaries are (target/debug).
    pub bin_dir: PathBuf,
    /// Also export spans to this collector (e.g. Jaeger) besides the harness's own.
    pub extra_otlp: Option<String>,
    /// Who signs: the CA's own key, or a real OpenBao the harness starts.
    pub signer: SignerKind,
    /// The CA-client retry cap of every agent and ztunnel (`--max-backoff`);
    /// `None`: the components' default (30 s). Small in a run, so a CA
    /// outage of a few seconds reaches it.
    pub max_backoff: Option<Duration>,
}

impl MeshSpec {
    /// `--max-backoff <cap>` when the run sets a cap.
    pub fn backoff_args(&self) -> Vec<String> {
        self.max_backoff
            .map(|cap| vec!["--max-backoff".into(), format!("{}ms", cap.as_millis())])
            .unwrap_or_default()
    }
}

/// The CA's signer in a run (`--signer`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SignerKind {
    /// The CA's plugged-in CA directory.
    #[default]
    Builtin,
    /// `bao server -dev` with a PKI mount; the CA runs `--signer vault`.
    Vault,
}

/// A sidecar pod: agent + proxy + echo app.
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub proxy: Proxy,
    pub mode: Mode,
}

impl PodSpec {
    pub fn new(name: &str, sa: &str, proxy: Proxy, mode: Mode) -> Self {
        PodSpec {
            name: name.into(),
            namespace: "default".into(),
            service_account: sa.into(),
            proxy,
            mode,
        }
    }
}

/// An ambient node: a ztunnel and the workloads scheduled on it.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    pub name: String,
    /// (pod name, service account), namespace `default`.
    pub workloads: Vec<(String, String)>,
}
