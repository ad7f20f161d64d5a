//! The `process` backend: every component a local process on loopback,
//! working directories and sockets in a temp dir, the harness playing the
//! Kubernetes cluster (DESIGN §4): it owns the token-issuer key and JWKS,
//! keeps the workload registry file, and writes each pod's projected token.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use meshid_ca::token::{TokenAlgorithm, TokenClaims, TokenIssuer};
use meshid_common::SpiffeId;
use meshid_common::registry::{Node, Registry, Workload};

use crate::cluster::{
    outbound_target, plugged_ca_files, register_ambient_workload, register_node, write_ca_files,
    ztunnel_token,
};

use crate::Error;
use crate::echo::Echo;
use crate::http::{self, Response};
use crate::otlp::{OtlpReceiver, SpanStore};
use crate::process::{Managed, Spec};
use crate::topology::{Ambient, Mode, Pod, Proxy, Topology};

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
}

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

const NODE: &str = "node-sidecar";

/// A free loopback port (bound and released; the component binds it next).
fn free_port() -> Result<SocketAddr, Error> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| Error::Setup(format!("no free port: {e}")))?;
    l.local_addr().map_err(|e| Error::Setup(e.to_string()))
}

fn write(path: &Path, contents: &str) -> Result<(), Error> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::write(path, contents).map_err(|e| Error::io(path, e))
}

/// A running process mesh.
#[derive(Debug)]
pub struct ProcessMesh {
    spec: MeshSpec,
    dir: PathBuf,
    issuer: TokenIssuer,
    registry: Registry,
    registry_path: PathBuf,
    ca_grpc: SocketAddr,
    ca_monitoring: SocketAddr,
    root_out: PathBuf,
    specs: BTreeMap<String, (Spec, SocketAddr)>,
    procs: BTreeMap<String, Managed>,
    pods: Vec<Pod>,
    ambient: Vec<Ambient>,
    apps: Vec<Echo>,
    otlp: OtlpReceiver,
}

impl ProcessMesh {
    /// Brings the whole mesh up and waits until every component is ready.
    pub async fn start(spec: MeshSpec) -> Result<Self, Error> {
        let dir = std::env::temp_dir().join(format!("meshid-e2e-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let otlp = OtlpReceiver::start_forwarding(spec.extra_otlp.clone())
            .await
            .map_err(|e| Error::Setup(format!("OTLP receiver: {e}")))?;
        let issuer = TokenIssuer::generate(TokenAlgorithm::Es256)
            .map_err(|e| Error::Setup(e.to_string()))?;
        let jwks = dir.join("cluster/jwks.json");
        write(&jwks, &issuer.jwks_json())?;
        let registry_path = dir.join("cluster/registry.json");
        let mut registry = Registry::default();
        registry.upsert_node(Node {
            name: NODE.into(),
            uid: format!("uid-{NODE}"),
        });
        let mut mesh = ProcessMesh {
            ca_grpc: free_port()?,
            ca_monitoring: free_port()?,
            root_out: dir.join("ca/root-cert.pem"),
            registry_path,
            registry,
            issuer,
            specs: BTreeMap::new(),
            procs: BTreeMap::new(),
            pods: Vec::new(),
            ambient: Vec::new(),
            apps: Vec::new(),
            otlp,
            dir,
            spec,
        };
        for pod in mesh.spec.pods.clone() {
            mesh.register(&pod.namespace, &pod.service_account, &pod.name)?;
        }
        let ambient_apps = mesh.register_ambient().await?;
        mesh.save_registry()?;
        mesh.start_ca().await?;
        for pod in mesh.spec.pods.clone() {
            mesh.start_pod(&pod).await?;
        }
        mesh.start_nodes(ambient_apps).await?;
        mesh.wait_all_ready(Duration::from_secs(60)).await?;
        Ok(mesh)
    }

    fn register(&mut self, namespace: &str, sa: &str, pod: &str) -> Result<(), Error> {
        self.registry.upsert_workload(Workload {
            name: pod.into(),
            namespace: namespace.into(),
            service_account: sa.into(),
            node: NODE.into(),
            uid: format!("uid-{namespace}-{pod}"),
            address: None,
            mode: Some("sidecar".into()),
        });
        Ok(())
    }

    /// Registers the ambient nodes, their ztunnels and workloads, and starts
    /// each workload's app on its own loopback address (its "pod IP"):
    /// 127.10.<node>.<n>.
    async fn register_ambient(&mut self) -> Result<Vec<Ambient>, Error> {
        let mut out = Vec::new();
        for (n, node) in self.spec.nodes.clone().iter().enumerate() {
            register_node(&mut self.registry, &node.name);
            for (k, (name, sa)) in node.workloads.iter().enumerate() {
                let ip = format!("127.10.{}.{}", n + 1, k + 1);
                let app = Echo::start(format!("{ip}:0").parse().expect("address"))
                    .await
                    .map_err(|e| Error::Setup(format!("ambient app {name} on {ip}: {e}")))?;
                let id = SpiffeId::for_service_account(&self.spec.trust_domain, "default", sa)
                    .map_err(|e| Error::Setup(e.to_string()))?;
                register_ambient_workload(
                    &mut self.registry,
                    name,
                    sa,
                    &node.name,
                    app.addr.to_string(),
                );
                out.push(Ambient {
                    name: name.clone(),
                    namespace: "default".into(),
                    service_account: sa.clone(),
                    node: node.name.clone(),
                    id,
                    app: app.addr,
                    outbound: None,
                    ztunnel: format!("{}/ztunnel", node.name),
                });
                self.apps.push(app);
            }
        }
        Ok(out)
    }

    /// One ztunnel per node. Each workload gets an outbound listener leading
    /// to the first workload of the next node (HBONE across nodes).
    async fn start_nodes(&mut self, mut ambient: Vec<Ambient>) -> Result<(), Error> {
        let nodes = self.spec.nodes.clone();
        let hbone: Vec<SocketAddr> = nodes
            .iter()
            .map(|_| free_port())
            .collect::<Result<_, _>>()?;
        let root =
            std::fs::read_to_string(&self.root_out).map_err(|e| Error::io(&self.root_out, e))?;
        for (n, node) in nodes.iter().enumerate() {
            let cwd = self.dir.join("nodes").join(&node.name);
            write(
                &cwd.join("var/run/secrets/tokens/istio-token"),
                &ztunnel_token(&self.issuer, &node.name)?,
            )?;
            write(&cwd.join("var/run/secrets/istio/root-cert.pem"), &root)?;
            let admin = free_port()?;
            let component = format!("{}/ztunnel", node.name);
            let target = outbound_target(&nodes, n)
                .and_then(|t| ambient.iter().find(|a| a.name == t))
                .cloned();
            let mut spec = Spec::new(&component, self.bin("meshid-ztunnel"), &cwd).args([
                "--ca-address".to_string(),
                self.ca_address(),
                "--trust-domain".into(),
                self.spec.trust_domain.clone(),
                "--node-name".into(),
                node.name.clone(),
                "--registry-file".into(),
                self.registry_path.display().to_string(),
                "--secret-ttl".into(),
                format!("{}s", self.spec.ttl.as_secs()),
                "--hbone-addr".into(),
                hbone[n].to_string(),
                "--inbound-plaintext-addr".into(),
                free_port()?.to_string(),
                "--admin-addr".into(),
                admin.to_string(),
            ]);
            for (m, other) in nodes.iter().enumerate() {
                if m != n {
                    spec = spec
                        .arg("--peer")
                        .arg(format!("{}={}", other.name, hbone[m]));
                }
            }
            if let Some(target) = target {
                for a in ambient.iter_mut().filter(|a| a.node == node.name) {
                    let listen = free_port()?;
                    spec = spec.arg("--outbound").arg(format!(
                        "{}/{}@{listen}={}",
                        a.namespace, a.name, target.app
                    ));
                    a.outbound = Some((listen, target.name.clone()));
                }
            }
            let spec = self.telemetry_env(spec, "meshid-ztunnel");
            self.launch(spec, admin)?;
        }
        self.ambient = ambient;
        Ok(())
    }

    fn save_registry(&self) -> Result<(), Error> {
        crate::cluster::save_registry(&self.registry, &self.registry_path)
    }

    fn mint(&self, namespace: &str, sa: &str, pod: &str) -> Result<String, Error> {
        let claims = TokenClaims::for_pod(
            namespace,
            sa,
            pod,
            &format!("uid-{namespace}-{pod}"),
            NODE,
            &format!("uid-{NODE}"),
        )
        .valid_for(Duration::from_secs(3600));
        self.issuer
            .mint(&claims)
            .map_err(|e| Error::Setup(format!("minting a token for {namespace}/{pod}: {e}")))
    }

    fn telemetry_env(&self, spec: Spec, service: &str) -> Spec {
        spec.env("OTEL_EXPORTER_OTLP_ENDPOINT", self.otlp.endpoint())
            .env("OTEL_SERVICE_NAME", service)
            .env(
                "RUST_LOG",
                std::env::var("MESHID_E2E_LOG").unwrap_or_else(|_| "info".into()),
            )
    }

    fn bin(&self, name: &str) -> PathBuf {
        self.spec.bin_dir.join(name)
    }

    async fn start_ca(&mut self) -> Result<(), Error> {
        let cwd = self.dir.join("ca");
        write_ca_files(
            &cwd.join("cacerts"),
            &plugged_ca_files(&self.spec.trust_domain)?,
        )?;
        let spec = Spec::new("ca", self.bin("meshid-ca"), &cwd).args([
            "--trust-domain".to_string(),
            self.spec.trust_domain.clone(),
            "--grpc-addr".into(),
            self.ca_grpc.to_string(),
            "--monitoring-addr".into(),
            self.ca_monitoring.to_string(),
            "--root-ca-dir".into(),
            cwd.join("cacerts").display().to_string(),
            "--root-cert-out".into(),
            self.root_out.display().to_string(),
            "--jwks-file".into(),
            self.dir.join("cluster/jwks.json").display().to_string(),
            "--registry-file".into(),
            self.registry_path.display().to_string(),
            "--token-issuer".into(),
            self.issuer.issuer().to_string(),
            "--server-ip".into(),
            "127.0.0.1".into(),
        ]);
        let spec = self.telemetry_env(spec, "meshid-ca");
        self.launch(spec, self.ca_monitoring)?;
        self.wait_ready("ca", Duration::from_secs(30)).await
    }

    async fn start_pod(&mut self, pod: &PodSpec) -> Result<(), Error> {
        let cwd = self.dir.join("pods").join(&pod.name);
        let id = SpiffeId::for_service_account(
            &self.spec.trust_domain,
            &pod.namespace,
            &pod.service_account,
        )
        .map_err(|e| Error::Setup(e.to_string()))?;
        write(
            &cwd.join("var/run/secrets/tokens/istio-token"),
            &self.mint(&pod.namespace, &pod.service_account, &pod.name)?,
        )?;
        let root =
            std::fs::read_to_string(&self.root_out).map_err(|e| Error::io(&self.root_out, e))?;
        write(&cwd.join("var/run/secrets/istio/root-cert.pem"), &root)?;
        let agent_admin = free_port()?;
        let agent = format!("{}/agent", pod.name);
        let spec = Spec::new(&agent, self.bin("meshid-agent"), &cwd).args([
            "--ca-address".to_string(),
            self.ca_address(),
            "--trust-domain".into(),
            self.spec.trust_domain.clone(),
            "--namespace".into(),
            pod.namespace.clone(),
            "--service-account".into(),
            pod.service_account.clone(),
            "--secret-ttl".into(),
            format!("{}s", self.spec.ttl.as_secs()),
            "--admin-addr".into(),
            agent_admin.to_string(),
            "--spiffe-endpoint-socket".into(),
            format!(
                "unix://{}",
                cwd.join("var/run/secrets/workload-spiffe-uds/workload.sock")
                    .display()
            ),
        ]);
        let spec = self.telemetry_env(spec, "meshid-agent");
        self.launch(spec, agent_admin)?;

        let app = Echo::start("127.0.0.1:0".parse().expect("addr"))
            .await
            .map_err(|e| Error::Setup(format!("echo app: {e}")))?;
        let app_addr = app.addr;
        self.apps.push(app);
        let inbound = free_port()?;
        let proxy_admin = free_port()?;
        let proxy_component = format!("{}/proxy", pod.name);
        // Each pod's outbound route goes to the pod started before it (whose
        // inbound address is known by now); the first pod has none.
        let outbound_target = self.pods.last().cloned();
        let outbound = match &outbound_target {
            Some(target) => Some((
                free_port()?,
                target.name.clone(),
                target.inbound,
                target.id.clone(),
            )),
            None => None,
        };
        crate::cluster::write_policy(&self.dir, &pod.name, pod.mode)?;
        match pod.proxy {
            Proxy::Shim => {
                let mut spec = Spec::new(&proxy_component, self.bin("meshid-envoy-shim"), &cwd)
                    .args([
                        "--inbound".to_string(),
                        inbound.to_string(),
                        "--app".into(),
                        app_addr.to_string(),
                        "--admin".into(),
                        proxy_admin.to_string(),
                        "--sds-socket".into(),
                        cwd.join("var/run/secrets/workload-spiffe-uds/socket")
                            .display()
                            .to_string(),
                        "--node-id".into(),
                        format!(
                            "sidecar~127.0.0.1~{}.{}~{}.svc.cluster.local",
                            pod.name, pod.namespace, pod.namespace
                        ),
                        "--cluster".into(),
                        format!("{}.{}", pod.name, pod.namespace),
                        "--trust-domain".into(),
                        self.spec.trust_domain.clone(),
                        "--policy".into(),
                        cwd.join("policy.yaml").display().to_string(),
                    ]);
                if let Some((listen, _, dest, peer)) = &outbound {
                    spec = spec
                        .arg("--outbound")
                        .arg(format!("{listen}={dest},{peer}"));
                }
                let spec = self.telemetry_env(spec, "meshid-envoy-shim");
                self.launch(spec, proxy_admin)?;
            }
            Proxy::Envoy => {
                let bin = meshid_common::testing::envoy::envoy_binary().map_err(|e| {
                    Error::Component {
                        name: proxy_component.clone(),
                        message: e,
                    }
                })?;
                let bootstrap = envoy_bootstrap(&EnvoyPod {
                    pod,
                    trust_domain: &self.spec.trust_domain,
                    admin: proxy_admin,
                    inbound,
                    app: app_addr,
                    sds_socket: &cwd.join("var/run/secrets/workload-spiffe-uds/socket"),
                    outbound: outbound
                        .as_ref()
                        .map(|(listen, _, dest, peer)| (*listen, *dest, peer)),
                });
                write(&cwd.join("envoy.yaml"), &bootstrap)?;
                let spec = Spec::new(&proxy_component, bin, &cwd).args([
                    "-c".to_string(),
                    cwd.join("envoy.yaml").display().to_string(),
                    "--disable-hot-restart".into(),
                    "--concurrency".into(),
                    "1".into(),
                    "--log-level".into(),
                    "warn".into(),
                ]);
                self.launch(spec, proxy_admin)?;
            }
        }
        self.pods.push(Pod {
            name: pod.name.clone(),
            namespace: pod.namespace.clone(),
            service_account: pod.service_account.clone(),
            id,
            proxy: pod.proxy,
            mode: pod.mode,
            inbound,
            outbound: outbound.map(|(listen, name, _, _)| (listen, name)),
            app: app_addr,
            agent,
            proxy_component,
        });
        Ok(())
    }

    fn launch(&mut self, spec: Spec, admin: SocketAddr) -> Result<(), Error> {
        let name = spec.name.clone();
        let proc = Managed::start(spec.clone(), &self.dir.join("logs"))?;
        self.specs.insert(name.clone(), (spec, admin));
        self.procs.insert(name, proc);
        Ok(())
    }

    fn admin_addr(&self, component: &str) -> Result<SocketAddr, Error> {
        self.specs
            .get(component)
            .map(|(_, a)| *a)
            .ok_or_else(|| Error::Setup(format!("no component named {component:?}")))
    }

    /// Polls `/ready` until 200; fails with the log tail if the process died or time ran out.
    pub async fn wait_ready(&mut self, component: &str, within: Duration) -> Result<(), Error> {
        let addr = self.admin_addr(component)?;
        let deadline = Instant::now() + within;
        loop {
            let last = match http::get(addr, "/ready", Duration::from_secs(2)).await {
                Ok(Response { status: 200, .. }) => return Ok(()),
                Ok(r) => format!("/ready answered {}: {}", r.status, r.body.trim()),
                Err(e) => e.to_string(),
            };
            let proc = self
                .procs
                .get_mut(component)
                .ok_or_else(|| Error::Setup(format!("{component} is not running")))?;
            if !proc.is_running() {
                return Err(Error::Component {
                    name: component.into(),
                    message: format!(
                        "exited before it was ready; log tail:\n{}",
                        proc.log_tail(30)
                    ),
                });
            }
            if Instant::now() > deadline {
                return Err(Error::Component {
                    name: component.into(),
                    message: format!(
                        "not ready after {within:?} ({last}); log tail:\n{}",
                        proc.log_tail(30)
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn wait_all_ready(&mut self, within: Duration) -> Result<(), Error> {
        let names: Vec<String> = self.procs.keys().cloned().collect();
        for name in names {
            self.wait_ready(&name, within).await?;
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Topology for ProcessMesh {
    fn backend(&self) -> &'static str {
        "process"
    }

    fn trust_domain(&self) -> &str {
        &self.spec.trust_domain
    }

    fn ttl(&self) -> Duration {
        self.spec.ttl
    }

    fn pods(&self) -> &[Pod] {
        &self.pods
    }

    fn ambient(&self) -> &[Ambient] {
        &self.ambient
    }

    fn ca_root_pem(&self) -> Result<String, Error> {
        std::fs::read_to_string(&self.root_out).map_err(|e| Error::io(&self.root_out, e))
    }

    fn ca_address(&self) -> String {
        format!("https://{}", self.ca_grpc)
    }

    async fn token_for(
        &mut self,
        namespace: &str,
        service_account: &str,
        pod: &str,
    ) -> Result<String, Error> {
        if self.registry.pod(namespace, pod).is_none() {
            self.register(namespace, service_account, pod)?;
            self.save_registry()?;
            // The CA polls the registry file; give it a beat to see the new pod.
            tokio::time::sleep(Duration::from_millis(1200)).await;
        }
        self.mint(namespace, service_account, pod)
    }

    async fn admin_get(&self, component: &str, path: &str) -> Result<Response, Error> {
        http::get(self.admin_addr(component)?, path, Duration::from_secs(5)).await
    }

    async fn stop(&mut self, component: &str) -> Result<(), Error> {
        let proc = self
            .procs
            .get_mut(component)
            .ok_or_else(|| Error::Setup(format!("no component named {component:?}")))?;
        proc.stop(Duration::from_secs(5)).await;
        Ok(())
    }

    async fn start(&mut self, component: &str) -> Result<(), Error> {
        let (spec, _) = self
            .specs
            .get(component)
            .cloned()
            .ok_or_else(|| Error::Setup(format!("no component named {component:?}")))?;
        let proc = Managed::start(spec, &self.dir.join("logs"))?;
        self.procs.insert(component.to_owned(), proc);
        self.wait_ready(component, Duration::from_secs(30)).await
    }

    async fn delete_workload(&mut self, pod: &str) -> Result<(), Error> {
        crate::cluster::delete_workload(&mut self.registry, &self.registry_path, pod)
    }

    async fn update_ca_files(&mut self, files: &[(&str, String)]) -> Result<(), Error> {
        let pods = self.pods.iter().map(|p| p.name.as_str());
        let nodes = self.spec.nodes.iter().map(|n| n.name.as_str());
        crate::cluster::update_ca_files(&self.dir, pods, nodes, files)
    }

    async fn set_mode(&mut self, pod: &str, mode: Mode) -> Result<(), Error> {
        crate::cluster::write_policy(&self.dir, pod, mode)
    }

    fn spans(&self) -> SpanStore {
        self.otlp.store.clone()
    }

    fn describe(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "run dir        {}", self.dir.display());
        let _ = writeln!(
            out,
            "ca             grpc {}  monitoring http://{}",
            self.ca_address(),
            self.ca_monitoring
        );
        let _ = writeln!(out, "root bundle    {}", self.root_out.display());
        let _ = writeln!(out, "registry       {}", self.registry_path.display());
        for a in &self.ambient {
            let _ = writeln!(
                out,
                "ambient {:<10} {}  on {}  app {}  outbound {}",
                a.name,
                a.id,
                a.node,
                a.app,
                a.outbound
                    .as_ref()
                    .map(|(l, to)| format!("{l} -> {to}"))
                    .unwrap_or_default()
            );
        }
        for n in &self.spec.nodes {
            let c = format!("{}/ztunnel", n.name);
            let _ = writeln!(
                out,
                "ztunnel {:<10} admin http://{}",
                n.name,
                self.admin_addr(&c)
                    .map(|a| a.to_string())
                    .unwrap_or_default()
            );
        }
        for p in &self.pods {
            let _ = writeln!(
                out,
                "pod {:<10} {}  inbound {}  agent admin http://{}  proxy admin http://{}",
                p.name,
                p.id,
                p.inbound,
                self.admin_addr(&p.agent)
                    .map(|a| a.to_string())
                    .unwrap_or_default(),
                self.admin_addr(&p.proxy_component)
                    .map(|a| a.to_string())
                    .unwrap_or_default()
            );
        }
        let _ = writeln!(out, "logs           {}", self.dir.join("logs").display());
        out
    }

    async fn teardown(&mut self) {
        // SIGTERM to every component at once, one shared grace period.
        futures::future::join_all(
            self.procs
                .values_mut()
                .map(|p| p.stop(Duration::from_secs(5))),
        )
        .await;
        self.apps.clear();
    }
}

/// One Envoy pod's addresses (shared with the docker backend).
pub(crate) struct EnvoyPod<'a> {
    pub(crate) pod: &'a PodSpec,
    pub(crate) trust_domain: &'a str,
    pub(crate) admin: SocketAddr,
    pub(crate) inbound: SocketAddr,
    pub(crate) app: SocketAddr,
    pub(crate) sds_socket: &'a Path,
    /// (listen, destination, expected server identity)
    pub(crate) outbound: Option<(SocketAddr, SocketAddr, &'a SpiffeId)>,
}

/// An Envoy bootstrap as Istio's sidecar has it for this pod: certificates
/// only over SDS from the agent's socket (`default`, `ROOTCA`), an inbound
/// listener requiring a client certificate of the trust domain in front of
/// the app, and an outbound listener doing mTLS to the previous pod with an
/// exact SAN check (secure naming).
pub(crate) fn envoy_bootstrap(e: &EnvoyPod<'_>) -> String {
    let sds = |name: &str| {
        format!(
            "{{name: {name}, sds_config: {{resource_api_version: V3, api_config_source: {{api_type: GRPC, transport_api_version: V3, grpc_services: [{{envoy_grpc: {{cluster_name: sds-grpc}}}}]}}}}}}"
        )
    };
    let tls_context = |san: &str, indent: &str| {
        format!(
            "{indent}common_tls_context:\n\
             {indent}  tls_certificate_sds_secret_configs: [{default}]\n\
             {indent}  combined_validation_context:\n\
             {indent}    default_validation_context: {{match_typed_subject_alt_names: [{{san_type: URI, matcher: {san}}}]}}\n\
             {indent}    validation_context_sds_secret_config: {rootca}\n",
            default = sds("default"),
            rootca = sds("ROOTCA"),
        )
    };
    let socket = |a: SocketAddr| {
        format!(
            "{{socket_address: {{address: \"{}\", port_value: {}}}}}",
            a.ip(),
            a.port()
        )
    };
    let endpoint = |name: &str, a: SocketAddr| {
        format!(
            "{{cluster_name: {name}, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {}}}}}]}}]}}",
            socket(a)
        )
    };
    let (out_listener, out_cluster) = match e.outbound {
        Some((listen, dest, peer)) => (
            format!(
                "  - name: outbound\n    address: {}\n    filter_chains:\n    - filters:\n      - name: envoy.filters.network.tcp_proxy\n        typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: outbound, cluster: outbound}}\n",
                socket(listen)
            ),
            format!(
                "  - name: outbound\n    type: STATIC\n    connect_timeout: 2s\n    load_assignment: {}\n    transport_socket:\n      name: envoy.transport_sockets.tls\n      typed_config:\n        \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext\n{}",
                endpoint("outbound", dest),
                tls_context(&format!("{{exact: \"{peer}\"}}"), "        ")
            ),
        ),
        None => (String::new(), String::new()),
    };
    format!(
        "node:\n  id: \"sidecar~127.0.0.1~{name}.{ns}~{ns}.svc.cluster.local\"\n  cluster: \"{name}.{ns}\"\n\
         admin:\n  address: {admin}\n\
         static_resources:\n  listeners:\n\
         \x20 - name: inbound\n    address: {inbound}\n    filter_chains:\n    - transport_socket:\n        name: envoy.transport_sockets.tls\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext\n          require_client_certificate: true\n{inbound_tls}      filters:\n      - name: envoy.filters.network.tcp_proxy\n        typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: inbound, cluster: app}}\n\
         {out_listener}\
         \x20 clusters:\n\
         \x20 - name: sds-grpc\n    type: STATIC\n    connect_timeout: 1s\n    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        explicit_http_config: {{http2_protocol_options: {{}}}}\n    load_assignment: {{cluster_name: sds-grpc, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{pipe: {{path: \"{sds}\"}}}}}}}}]}}]}}\n\
         \x20 - name: app\n    type: STATIC\n    connect_timeout: 2s\n    load_assignment: {app}\n\
         {out_cluster}",
        name = e.pod.name,
        ns = e.pod.namespace,
        admin = socket(e.admin),
        inbound = socket(e.inbound),
        inbound_tls = tls_context(
            &format!("{{prefix: \"spiffe://{}/\"}}", e.trust_domain),
            "          "
        ),
        sds = e.sds_socket.display(),
        app = endpoint("app", e.app),
    )
}
