//! What a suite sees of a running mesh. Every backend (process, docker,
//! kind) implements [`Topology`]; suites use nothing else, so each suite
//! runs unchanged on each backend.

use std::net::SocketAddr;
use std::time::Duration;

use meshid_common::SpiffeId;

use crate::Error;
use crate::backend::MeshState;
use crate::http::Response;
use crate::otlp::SpanStore;

/// Which proxy a sidecar pod runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Proxy {
    Shim,
    Envoy,
}

/// PeerAuthentication mode of a pod's inbound.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Mode {
    Strict,
    Permissive,
    Disable,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Strict => "STRICT",
            Mode::Permissive => "PERMISSIVE",
            Mode::Disable => "DISABLE",
        }
    }
}

/// A sidecar pod: agent + proxy + echo app.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub id: SpiffeId,
    pub proxy: Proxy,
    /// The inbound mode the pod starts with.
    pub mode: Mode,
    /// The proxy's inbound listener (what mesh peers dial).
    pub inbound: SocketAddr,
    /// The proxy's outbound listener to the first other pod, if any: plaintext in,
    /// mTLS out with secure naming.
    pub outbound: Option<(SocketAddr, String)>,
    /// The echo app behind the proxy (plaintext, local only).
    pub app: SocketAddr,
    /// Component names, for [`Topology::admin_get`] and restarts.
    pub agent: String,
    pub proxy_component: String,
}

/// An ambient workload behind a ztunnel.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Ambient {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub node: String,
    pub id: SpiffeId,
    /// Where the workload's app listens (its pod address).
    pub app: SocketAddr,
    /// The workload's outbound listener on its ztunnel (process mode has no
    /// traffic capture) and the workload it leads to.
    pub outbound: Option<(SocketAddr, String)>,
    /// The node's ztunnel component, e.g. `node-a/ztunnel`.
    pub ztunnel: String,
}

/// What the components wrote outside the run's directory
/// ([`Topology::written_files`]).
#[derive(Debug, Default)]
pub struct WrittenFiles {
    /// Containers (or other sandboxes) looked at.
    pub examined: usize,
    /// Paths they wrote outside their mounts.
    pub paths: usize,
    /// (label, tar archive) of those paths.
    pub archives: Vec<(String, Vec<u8>)>,
}

/// A running mesh, as suites see it. A backend provides its shared
/// [`MeshState`] and what differs (component control, admin addresses,
/// teardown); the accessors over the state are written once, here.
#[allow(async_fn_in_trait)]
pub trait Topology {
    fn backend(&self) -> &'static str;
    /// What every backend keeps alike.
    fn state(&self) -> &MeshState;
    fn state_mut(&mut self) -> &mut MeshState;
    fn trust_domain(&self) -> &str {
        &self.state().spec.trust_domain
    }
    /// Certificate TTL the agents ask for.
    fn ttl(&self) -> Duration {
        self.state().spec.ttl
    }
    fn pods(&self) -> &[Pod] {
        &self.state().pods
    }
    /// The agents' and ztunnels' CA-client retry schedule: first delay and cap.
    fn ca_client_backoff(&self) -> (Duration, Duration) {
        (
            meshid_common::identity::DEFAULT_INITIAL_BACKOFF,
            self.state()
                .spec
                .max_backoff
                .unwrap_or(meshid_common::identity::DEFAULT_MAX_BACKOFF),
        )
    }
    fn ambient(&self) -> &[Ambient] {
        &self.state().ambient
    }
    /// The root bundle the CA publishes (PEM).
    fn ca_root_pem(&self) -> Result<String, Error> {
        self.state().root_pem()
    }
    /// `https://host:port` of the CA's gRPC endpoint, as clients dial it.
    fn ca_address(&self) -> String {
        self.state().ca_address()
    }
    /// A fresh service-account token for `namespace/sa` bound to pod `pod`,
    /// which is registered on the fly when absent (a test client's own pod).
    async fn token_for(
        &mut self,
        namespace: &str,
        service_account: &str,
        pod: &str,
    ) -> Result<String, Error> {
        self.state_mut()
            .token_for(namespace, service_account, pod)
            .await
    }
    /// GET an admin endpoint of a component (`ca`, `<pod>/agent`, `<pod>/proxy`, `<node>/ztunnel`).
    async fn admin_get(&self, component: &str, path: &str) -> Result<Response, Error>;
    async fn stop(&mut self, component: &str) -> Result<(), Error>;
    async fn start(&mut self, component: &str) -> Result<(), Error>;
    async fn restart(&mut self, component: &str) -> Result<(), Error> {
        self.stop(component).await?;
        self.start(component).await
    }
    /// Freezes a component (SIGSTOP of its processes): its sockets stay open
    /// and connections to it hang rather than being refused. A backend that
    /// cannot freeze a component says so.
    async fn pause(&mut self, component: &str) -> Result<(), Error> {
        Err(self.unsupported("pause", component))
    }
    /// Thaws a component frozen by [`Topology::pause`] (SIGCONT).
    async fn resume(&mut self, component: &str) -> Result<(), Error> {
        Err(self.unsupported("resume", component))
    }
    /// The error of a step this backend cannot do: the case is skipped.
    fn unsupported(&self, step: &str, component: &str) -> Error {
        self.unsupported_because(step, component, "not implemented")
    }
    /// [`Topology::unsupported`] saying why.
    fn unsupported_because(&self, step: &str, component: &str, reason: &str) -> Error {
        Error::Unsupported {
            backend: self.backend(),
            step: step.into(),
            component: component.into(),
            reason: reason.into(),
        }
    }
    /// Replaces sidecar pod `pod`'s projected service-account token file
    /// (atomically, as the kubelet does) with `token`.
    async fn set_pod_token(&mut self, pod: &str, token: &str) -> Result<(), Error> {
        let dir = self
            .state()
            .dir
            .join("pods")
            .join(pod)
            .join("var/run/secrets/tokens");
        crate::cluster::write_ca_files(&dir, &[("istio-token", token.to_owned())])
    }
    /// The directory of sidecar pod `pod`'s agent sockets (SDS `socket`,
    /// `workload.sock`) as the harness reaches it.
    fn pod_uds_dir(&self, pod: &str) -> Result<std::path::PathBuf, Error> {
        Ok(self
            .state()
            .dir
            .join("pods")
            .join(pod)
            .join("var/run/secrets/workload-spiffe-uds"))
    }
    /// A token of sidecar pod `namespace/pod` that expired `ago`.
    fn expired_token_for(
        &self,
        namespace: &str,
        service_account: &str,
        pod: &str,
        ago: Duration,
    ) -> Result<String, Error> {
        self.state()
            .mint_expired(namespace, service_account, pod, ago)
    }
    /// Registers many test pods `namespace/<pod>` (service account `sa`) at
    /// once and returns a token for each, in order: what [`Topology::token_for`]
    /// does for one, with one registry write and one wait for the CA.
    async fn register_pods(
        &mut self,
        namespace: &str,
        pods: &[(String, String)],
    ) -> Result<Vec<String>, Error> {
        let state = self.state_mut();
        for (pod, sa) in pods {
            state.register(namespace, sa, pod);
        }
        state.save_registry()?;
        tokio::time::sleep(Duration::from_millis(1200)).await;
        pods.iter()
            .map(|(pod, sa)| state.mint(namespace, sa, pod))
            .collect()
    }
    /// Deletes a pod from the cluster's view (the registry): its token stops
    /// authenticating; its processes keep running with what they have.
    async fn delete_workload(&mut self, pod: &str) -> Result<(), Error> {
        let state = self.state_mut();
        crate::cluster::delete_workload(&mut state.registry, &state.registry_path, pod)
    }
    /// Replaces files of the CA's plugged-in certificate directory (`cacerts`:
    /// `ca-cert.pem`, `ca-key.pem`, `cert-chain.pem`, `root-cert.pem`), each
    /// atomically, as an operator updates the `cacerts` secret; a new root
    /// bundle goes to every pod and node.
    async fn update_ca_files(&mut self, files: &[(&str, String)]) -> Result<(), Error> {
        let state = self.state();
        let pods = state.pods.iter().map(|p| p.name.as_str());
        let nodes = state.spec.nodes.iter().map(|n| n.name.as_str());
        crate::cluster::update_ca_files(&state.dir, pods, nodes, files)
    }
    /// Sets a pod's inbound mode (PeerAuthentication) at runtime.
    async fn set_mode(&mut self, pod: &str, mode: Mode) -> Result<(), Error> {
        crate::cluster::write_policy(&self.state().dir, pod, mode)
    }
    /// The OpenBao server signing for the CA, in a `--signer vault` run.
    fn vault(&self) -> Option<&meshid_ca::vault::testing::DevBao> {
        self.state().vault.as_ref()
    }
    /// Copies the root bundle the CA published to every pod and node, as
    /// Istio's `istio-ca-root-cert` ConfigMap follows the CA's roots.
    async fn publish_ca_roots(&self) -> Result<(), Error> {
        let state = self.state();
        let roots = state.root_pem()?;
        let pods = state.pods.iter().map(|p| p.name.as_str());
        let nodes = state.spec.nodes.iter().map(|n| n.name.as_str());
        crate::cluster::publish_roots(&state.dir, pods, nodes, &roots)
    }
    /// Spans collected from every component.
    fn spans(&self) -> SpanStore {
        self.state().otlp.store.clone()
    }
    /// Every file the components wrote outside the run's directory, for the
    /// secrets scan, before teardown: (label, tar archive) pairs. The
    /// process backend's components write only under the run's directory
    /// (their `TMPDIR` too): nothing here.
    async fn written_files(&self) -> Result<WrittenFiles, Error> {
        Ok(WrittenFiles::default())
    }
    /// How to reach each part, for `--keep`.
    fn describe(&self) -> String;
    async fn teardown(&mut self);
}
