//! What every backend keeps alike: the spec, the run directory, the harness
//! playing the cluster (token issuer, registry file, the CA's root bundle),
//! the pods and ambient workloads as suites see them, and the spans. The
//! [`Topology`](crate::topology::Topology) accessors read it, written once
//! for every backend.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use meshid_ca::token::{TokenAlgorithm, TokenClaims, TokenIssuer};
use meshid_common::registry::{Node, Registry, Workload};

use crate::Error;
use crate::otlp::OtlpReceiver;
use crate::spec::{MeshSpec, SIDECAR_NODE};
use crate::topology::{Ambient, Pod};

/// The shared state of a running mesh.
#[derive(Debug)]
pub struct MeshState {
    pub(crate) spec: MeshSpec,
    /// The run directory on the host.
    pub(crate) dir: PathBuf,
    pub(crate) issuer: TokenIssuer,
    pub(crate) registry: Registry,
    pub(crate) registry_path: PathBuf,
    /// Where the CA writes its root bundle.
    pub(crate) root_out: PathBuf,
    /// The CA's gRPC and monitoring endpoints, as the harness reaches them.
    pub(crate) ca_grpc: SocketAddr,
    pub(crate) ca_monitoring: SocketAddr,
    pub(crate) pods: Vec<Pod>,
    pub(crate) ambient: Vec<Ambient>,
    /// Each node's HBONE address as the harness reaches it, where the
    /// backend can tell (process); the bad-input suite dials it.
    pub(crate) hbone: Vec<(String, SocketAddr)>,
    pub(crate) otlp: OtlpReceiver,
    /// The OpenBao dev server of a `--signer vault` run.
    pub(crate) vault: Option<meshid_ca::vault::testing::DevBao>,
}

impl MeshState {
    /// The cluster of a new run in `dir`: a fresh token issuer with its JWKS
    /// at `cluster/jwks.json`, and a registry (`cluster/registry.json`, not
    /// saved yet) holding the sidecar pods' node and every sidecar pod.
    pub(crate) fn new(
        spec: MeshSpec,
        dir: PathBuf,
        otlp: OtlpReceiver,
        ca_grpc: SocketAddr,
        ca_monitoring: SocketAddr,
    ) -> Result<Self, Error> {
        let issuer = TokenIssuer::generate(TokenAlgorithm::Es256)
            .map_err(|e| Error::Setup(e.to_string()))?;
        write(&dir.join("cluster/jwks.json"), &issuer.jwks_json())?;
        let mut registry = Registry::default();
        registry.upsert_node(Node {
            name: SIDECAR_NODE.into(),
            uid: format!("uid-{SIDECAR_NODE}"),
        });
        let mut state = MeshState {
            registry_path: dir.join("cluster/registry.json"),
            root_out: dir.join("ca/root-cert.pem"),
            registry,
            issuer,
            ca_grpc,
            ca_monitoring,
            pods: Vec::new(),
            ambient: Vec::new(),
            hbone: Vec::new(),
            otlp,
            dir,
            spec,
            vault: None,
        };
        for pod in state.spec.pods.clone() {
            state.register(&pod.namespace, &pod.service_account, &pod.name);
        }
        Ok(state)
    }

    /// Registers sidecar pod `namespace/pod` (not saved).
    pub(crate) fn register(&mut self, namespace: &str, sa: &str, pod: &str) {
        self.registry.upsert_workload(Workload {
            name: pod.into(),
            namespace: namespace.into(),
            service_account: sa.into(),
            node: SIDECAR_NODE.into(),
            uid: format!("uid-{namespace}-{pod}"),
            address: None,
            mode: Some("sidecar".into()),
        });
    }

    pub(crate) fn save_registry(&self) -> Result<(), Error> {
        crate::cluster::save_registry(&self.registry, &self.registry_path)
    }

    /// A projected-style token of sidecar pod `namespace/pod`.
    pub(crate) fn mint(&self, namespace: &str, sa: &str, pod: &str) -> Result<String, Error> {
        let claims = TokenClaims::for_pod(
            namespace,
            sa,
            pod,
            &format!("uid-{namespace}-{pod}"),
            SIDECAR_NODE,
            &format!("uid-{SIDECAR_NODE}"),
        )
        .valid_for(Duration::from_secs(3600));
        self.issuer
            .mint(&claims)
            .map_err(|e| Error::Setup(format!("minting a token for {namespace}/{pod}: {e}")))
    }

    /// A token of sidecar pod `namespace/pod` that expired `ago` (signed by
    /// the cluster's real issuer: only its expiry is wrong).
    pub(crate) fn mint_expired(
        &self,
        namespace: &str,
        sa: &str,
        pod: &str,
        ago: Duration,
    ) -> Result<String, Error> {
        let mut claims = TokenClaims::for_pod(
            namespace,
            sa,
            pod,
            &format!("uid-{namespace}-{pod}"),
            SIDECAR_NODE,
            &format!("uid-{SIDECAR_NODE}"),
        );
        let now = std::time::SystemTime::now();
        claims.issued_at = now - ago - Duration::from_secs(3600);
        claims.not_before = Some(claims.issued_at);
        claims.expires_at = now - ago;
        self.issuer
            .mint(&claims)
            .map_err(|e| Error::Setup(format!("minting a token for {namespace}/{pod}: {e}")))
    }

    /// Lays out sidecar pod `pod`'s files as the kubelet would (its
    /// projected token and the CA root) and returns its directory and
    /// identity: the same for every backend.
    pub(crate) fn prepare_pod(
        &self,
        pod: &crate::spec::PodSpec,
    ) -> Result<(PathBuf, meshid_common::SpiffeId), Error> {
        let dir = self.dir.join("pods").join(&pod.name);
        let id = meshid_common::SpiffeId::for_service_account(
            &self.spec.trust_domain,
            &pod.namespace,
            &pod.service_account,
        )
        .map_err(|e| Error::Setup(e.to_string()))?;
        super::write(
            &dir.join("var/run/secrets/tokens/istio-token"),
            &self.mint(&pod.namespace, &pod.service_account, &pod.name)?,
        )?;
        super::write(
            &dir.join("var/run/secrets/istio/root-cert.pem"),
            &self.root_pem()?,
        )?;
        Ok((dir, id))
    }

    /// The root bundle the CA wrote.
    pub(crate) fn root_pem(&self) -> Result<String, Error> {
        std::fs::read_to_string(&self.root_out).map_err(|e| Error::io(&self.root_out, e))
    }

    /// `https://host:port` of the CA, as the harness dials it.
    pub(crate) fn ca_address(&self) -> String {
        format!("https://{}", self.ca_grpc)
    }

    /// A fresh token for `namespace/pod`, registering the pod first when
    /// the cluster does not know it (a test client's own pod).
    pub(crate) async fn token_for(
        &mut self,
        namespace: &str,
        service_account: &str,
        pod: &str,
    ) -> Result<String, Error> {
        if self.registry.pod(namespace, pod).is_none() {
            self.register(namespace, service_account, pod);
            self.save_registry()?;
            // The CA polls the registry file; give it a beat to see the new pod.
            tokio::time::sleep(Duration::from_millis(1200)).await;
        }
        self.mint(namespace, service_account, pod)
    }
}

/// Writes `contents` to `path`, creating its directory.
pub(crate) fn write(path: &Path, contents: &str) -> Result<(), Error> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::write(path, contents).map_err(|e| Error::io(path, e))
}
