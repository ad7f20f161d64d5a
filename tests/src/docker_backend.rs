//! The `docker` backend: the process backend's topology (DESIGN §7), one
//! container per component through testcontainers, images built locally
//! ([`crate::docker::image`]), a user-defined bridge network per run.
//!
//! - The harness still plays the cluster (DESIGN §4): token-issuer key and
//!   JWKS, registry file and per-pod token files live in a host directory
//!   that is bind-mounted into the CA (`/cluster`, `/ca`) and into each pod
//!   (`/pod`, which also holds the SDS socket, as an emptyDir would).
//! - A pod is a sandbox container owning the pod's network namespace (it
//!   runs the echo app and relays loopback-only ports, see
//!   [`crate::docker::forward`]), plus agent and proxy containers joining
//!   that namespace, as a pod's containers share one in Kubernetes.
//! - An ambient node is a sandbox owning the node's network namespace plus
//!   the ztunnel in it (its own token, `/cluster` for the registry, HBONE on
//!   the node's address, the other nodes as `--peer`s); each ambient
//!   workload is one echo container whose address on the run's network is
//!   its pod address in the registry. The ztunnel's per-workload outbound
//!   listeners (process mode: no traffic capture) and admin are on the
//!   node's loopback, relayed by the sandbox.
//! - Agents reach the CA by its container name on the run's network and
//!   check its DNS SAN `istiod.istio-system.svc`; pods reach each other by
//!   container IP. The harness reaches everything through ports published on
//!   127.0.0.1 only.
//! - Components export spans to the harness's OTLP receiver, bound on the
//!   network's gateway (the host's address on it).
//! - Every container and the network carry the run's label; teardown (also
//!   on a failing suite, Ctrl-C or a panic, through `Drop`) removes them.
//!   testcontainers 0.28 has no Ryuk reaper: nothing is ever pulled.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use meshid_ca::token::{TokenAlgorithm, TokenClaims, TokenIssuer};
use meshid_common::SpiffeId;
use meshid_common::registry::{Node, Registry, Workload};
use testcontainers::bollard::models::HostConfig;
use testcontainers::core::{AccessMode, IntoContainerPort, Mount};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, ContainerRequest, GenericImage, ImageExt};

use crate::Error;
use crate::cluster::{
    outbound_target, plugged_ca_files, register_ambient_workload, register_node, write_ca_files,
    ztunnel_token,
};
use crate::docker::image::{self, Images};
use crate::docker::{cli, error};
use crate::http::{self, Response};
use crate::otlp::{OtlpReceiver, SpanStore};
use crate::process_backend::{EnvoyPod, MeshSpec, PodSpec, envoy_bootstrap};
use crate::topology::{Ambient, Mode, Pod, Proxy, Topology};

const NODE: &str = "node-sidecar";
/// The label every container and the network of a run carry.
const RUN_LABEL: &str = "io.meshid.e2e.run";

/// Ports inside the containers (each pod has its own network namespace, so
/// every pod uses the same ones, as in Kubernetes).
const CA_GRPC: u16 = 15012;
const CA_MONITORING: u16 = 15014;
const APP: u16 = 8080;
const INBOUND: u16 = 15006;
const OUTBOUND: u16 = 15001;
const PROXY_ADMIN: u16 = 15000;
const AGENT_ADMIN: u16 = 15020;
/// The sandbox relays `FORWARD_BASE + port` on the pod's address to `port` on its loopback.
const FORWARD_BASE: u16 = 10000;
/// A node's ztunnel (in its node's network namespace): HBONE on the node's
/// address, admin on loopback, and the k-th workload's outbound listener on
/// loopback at `ZTUNNEL_OUTBOUND_BASE + k`.
const HBONE: u16 = 15008;
const ZTUNNEL_ADMIN: u16 = 15000;
const ZTUNNEL_OUTBOUND_BASE: u16 = 15101;

/// Where the run directory appears inside containers.
const POD_DIR: &str = "/pod";
const SDS_SOCKET: &str = "/pod/var/run/secrets/workload-spiffe-uds/socket";

fn free_port() -> Result<u16, Error> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| Error::Setup(format!("no free port: {e}")))?;
    Ok(l.local_addr()
        .map_err(|e| Error::Setup(e.to_string()))?
        .port())
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
}

fn write(path: &Path, contents: &str) -> Result<(), Error> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::write(path, contents).map_err(|e| Error::io(path, e))
}

fn mkdir(path: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(path).map_err(|e| Error::io(path, e))
}

fn image_of(reference: &str) -> GenericImage {
    let (name, tag) = reference.rsplit_once(':').unwrap_or((reference, "latest"));
    GenericImage::new(name, tag)
}

/// Publishes every mapped port on 127.0.0.1 only (testcontainers binds 0.0.0.0).
fn publish_on_loopback(hc: &mut HostConfig) {
    if let Some(bindings) = hc.port_bindings.as_mut() {
        for list in bindings.values_mut().flatten() {
            for b in list.iter_mut() {
                b.host_ip = Some(Ipv4Addr::LOCALHOST.to_string());
            }
        }
    }
}

/// How the harness knows a component is ready.
#[derive(Clone, Copy, Debug)]
enum Probe {
    /// `GET /ready` answers 200 at this (published) admin address.
    Ready(SocketAddr),
    /// The echo app answers at this (published) address.
    Echo(SocketAddr),
}

impl Probe {
    fn addr(self) -> SocketAddr {
        match self {
            Probe::Ready(a) | Probe::Echo(a) => a,
        }
    }

    /// `Ok` when ready; otherwise what was seen.
    async fn check(self) -> Result<(), String> {
        match self {
            Probe::Ready(addr) => match http::get(addr, "/ready", Duration::from_secs(2)).await {
                Ok(Response { status: 200, .. }) => Ok(()),
                Ok(r) => Err(format!("/ready answered {}: {}", r.status, r.body.trim())),
                Err(e) => Err(e.to_string()),
            },
            Probe::Echo(addr) => crate::client::plain_echo(addr, b"ready?\n").await,
        }
    }
}

/// A started sandbox (see [`DockerMesh::start_sandbox`]).
#[derive(Debug)]
struct Sandbox {
    /// Its container id, whose network namespace others join.
    id: String,
    /// Its address on the run's network.
    ip: IpAddr,
    /// (port inside, where it is published on the host)
    published: Vec<(u16, SocketAddr)>,
}

impl Sandbox {
    /// Where `port` inside the sandbox is published on the host.
    fn host(&self, port: u16) -> SocketAddr {
        self.published
            .iter()
            .find(|(p, _)| *p == port)
            .map(|(_, h)| *h)
            .expect("every forwarded port is published")
    }
}

/// One container of the mesh.
#[derive(Debug)]
struct Component {
    /// `None` once removed.
    container: Option<ContainerAsync<GenericImage>>,
    /// The container's name (`docker logs <name>`).
    docker_name: String,
    probe: Probe,
}

impl Component {
    fn container(&self, name: &str) -> Result<&ContainerAsync<GenericImage>, Error> {
        self.container
            .as_ref()
            .ok_or_else(|| Error::Setup(format!("{name} has been removed")))
    }

    /// stdout so far, then stderr.
    async fn logs(&self) -> String {
        let Some(c) = self.container.as_ref() else {
            return String::new();
        };
        let out = c.stdout_to_vec().await.unwrap_or_default();
        let err = c.stderr_to_vec().await.unwrap_or_default();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&err)
        )
    }

    async fn log_tail(&self, lines: usize) -> String {
        let text = self.logs().await;
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// The run's network; removes it (after sweeping any container of the run
/// still on it) when dropped without a teardown.
#[derive(Debug)]
struct Network {
    name: String,
    gateway: IpAddr,
    label: String,
    removed: bool,
}

impl Network {
    /// Sweeps the run's containers that are left and removes the network.
    fn remove_blocking(&mut self) {
        if !self.removed {
            cli::remove_labelled_containers_blocking(&self.label);
            cli::remove_network_blocking(&self.name);
            self.removed = true;
        }
    }

    async fn remove(&mut self) {
        if self.removed {
            return;
        }
        self.removed = true;
        let (label, name) = (self.label.clone(), self.name.clone());
        let _ = tokio::task::spawn_blocking(move || {
            cli::remove_labelled_containers_blocking(&label);
            cli::remove_network_blocking(&name);
        })
        .await;
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        self.remove_blocking();
    }
}

/// A running docker mesh.
#[derive(Debug)]
pub struct DockerMesh {
    // Fields drop in order: containers go before their network.
    components: BTreeMap<String, Component>,
    network: Network,
    spec: MeshSpec,
    run: String,
    dir: PathBuf,
    issuer: TokenIssuer,
    registry: Registry,
    registry_path: PathBuf,
    root_out: PathBuf,
    ca_container: String,
    ca_grpc: SocketAddr,
    ca_monitoring: SocketAddr,
    pods: Vec<Pod>,
    /// Each pod's address on the run's network (ambient workloads' too).
    pod_ips: BTreeMap<String, IpAddr>,
    /// Each ambient node's address on the run's network (its ztunnel's).
    node_ips: BTreeMap<String, IpAddr>,
    ambient: Vec<Ambient>,
    otlp: OtlpReceiver,
    images: Images,
}

impl DockerMesh {
    /// Builds the images if a binary changed, then brings the whole mesh up
    /// and waits until every component is ready.
    pub async fn start(spec: MeshSpec) -> Result<Self, Error> {
        let images = image::ensure_all(&spec.bin_dir, false).await?;
        for b in [&images.mesh, &images.envoy] {
            eprintln!("e2e: image {b}");
        }
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() & 0xffff)
            .unwrap_or_default();
        let run = format!("meshid-e2e-{}-{nonce:04x}", std::process::id());
        let dir = std::env::temp_dir().join(&run);
        mkdir(&dir)?;
        let label = format!("{RUN_LABEL}={run}");
        let gateway = cli::create_network(&run, &label).await?;
        let network = Network {
            name: run.clone(),
            gateway,
            label,
            removed: false,
        };
        let otlp =
            OtlpReceiver::start_forwarding_on(SocketAddr::new(gateway, 0), spec.extra_otlp.clone())
                .await
                .map_err(|e| Error::Setup(format!("OTLP receiver on {gateway}: {e}")))?;
        let issuer = TokenIssuer::generate(TokenAlgorithm::Es256)
            .map_err(|e| Error::Setup(e.to_string()))?;
        write(&dir.join("cluster/jwks.json"), &issuer.jwks_json())?;
        write_ca_files(
            &dir.join("ca/cacerts"),
            &plugged_ca_files(&spec.trust_domain)?,
        )?;
        let mut registry = Registry::default();
        registry.upsert_node(Node {
            name: NODE.into(),
            uid: format!("uid-{NODE}"),
        });
        let mut mesh = DockerMesh {
            components: BTreeMap::new(),
            network,
            registry_path: dir.join("cluster/registry.json"),
            root_out: dir.join("ca/root-cert.pem"),
            ca_container: format!("{run}-ca"),
            ca_grpc: loopback(free_port()?),
            ca_monitoring: loopback(free_port()?),
            registry,
            issuer,
            pods: Vec::new(),
            pod_ips: BTreeMap::new(),
            node_ips: BTreeMap::new(),
            ambient: Vec::new(),
            otlp,
            images,
            run,
            dir,
            spec,
        };
        for pod in mesh.spec.pods.clone() {
            mesh.register(&pod.namespace, &pod.service_account, &pod.name);
        }
        mesh.save_registry()?;
        mesh.start_ca().await?;
        for pod in mesh.spec.pods.clone() {
            mesh.start_pod(&pod).await?;
        }
        mesh.start_nodes().await?;
        let names: Vec<String> = mesh.components.keys().cloned().collect();
        for name in names {
            mesh.wait_ready(&name, Duration::from_secs(60)).await?;
        }
        Ok(mesh)
    }

    fn register(&mut self, namespace: &str, sa: &str, pod: &str) {
        self.registry.upsert_workload(Workload {
            name: pod.into(),
            namespace: namespace.into(),
            service_account: sa.into(),
            node: NODE.into(),
            uid: format!("uid-{namespace}-{pod}"),
            address: None,
            mode: Some("sidecar".into()),
        });
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

    /// What every container of the run has: name, label, telemetry settings.
    fn request(
        &self,
        image: &str,
        docker_name: &str,
        service: &str,
    ) -> ContainerRequest<GenericImage> {
        image_of(image)
            .with_container_name(docker_name)
            .with_label(RUN_LABEL, &self.run)
            .with_env_var("OTEL_EXPORTER_OTLP_ENDPOINT", self.otlp.endpoint())
            .with_env_var("OTEL_SERVICE_NAME", service)
            .with_env_var("NO_COLOR", "1")
            .with_env_var(
                "RUST_LOG",
                std::env::var("MESHID_E2E_LOG").unwrap_or_else(|_| "info".into()),
            )
            .with_startup_timeout(Duration::from_secs(60))
    }

    async fn launch(
        &mut self,
        component: &str,
        request: ContainerRequest<GenericImage>,
        probe: Probe,
    ) -> Result<&ContainerAsync<GenericImage>, Error> {
        let docker_name = request
            .container_name()
            .clone()
            .unwrap_or_else(|| component.to_owned());
        let container = request
            .start()
            .await
            .map_err(|e| error(format!("start {component} ({docker_name})"), e))?;
        let entry = self
            .components
            .entry(component.to_owned())
            .or_insert(Component {
                container: None,
                docker_name,
                probe,
            });
        Ok(entry.container.insert(container))
    }

    async fn start_ca(&mut self) -> Result<(), Error> {
        let request = self
            .request(&self.images.mesh.reference, &self.ca_container, "meshid-ca")
            .with_cmd([
                "/usr/local/bin/meshid-ca".to_string(),
                "--trust-domain".into(),
                self.spec.trust_domain.clone(),
                "--grpc-addr".into(),
                format!("0.0.0.0:{CA_GRPC}"),
                "--monitoring-addr".into(),
                format!("0.0.0.0:{CA_MONITORING}"),
                "--root-ca-dir".into(),
                "/ca/cacerts".into(),
                "--root-cert-out".into(),
                "/ca/root-cert.pem".into(),
                "--jwks-file".into(),
                "/cluster/jwks.json".into(),
                "--registry-file".into(),
                "/cluster/registry.json".into(),
                "--token-issuer".into(),
                self.issuer.issuer().to_string(),
                "--server-ip".into(),
                "127.0.0.1".into(),
            ])
            .with_network(&self.run)
            .with_mount(
                Mount::bind_mount(self.dir.join("cluster").display().to_string(), "/cluster")
                    .with_access_mode(AccessMode::ReadOnly),
            )
            .with_mount(Mount::bind_mount(
                self.dir.join("ca").display().to_string(),
                "/ca",
            ))
            .with_mapped_port(self.ca_grpc.port(), CA_GRPC.tcp())
            .with_mapped_port(self.ca_monitoring.port(), CA_MONITORING.tcp())
            .with_host_config_modifier(publish_on_loopback);
        self.launch("ca", request, Probe::Ready(self.ca_monitoring))
            .await?;
        self.wait_ready("ca", Duration::from_secs(30)).await
    }

    /// A container joining `sandbox`'s network namespace, with the pod's directory at `/pod`.
    fn pod_request(
        &self,
        image: &str,
        docker_name: &str,
        service: &str,
        pod_dir: &Path,
        sandbox_id: &str,
    ) -> ContainerRequest<GenericImage> {
        let netns = format!("container:{sandbox_id}");
        self.request(image, docker_name, service)
            .with_mount(Mount::bind_mount(pod_dir.display().to_string(), POD_DIR))
            .with_working_dir(POD_DIR)
            .with_host_config_modifier(move |hc| {
                hc.network_mode = Some(netns.clone());
                hc.publish_all_ports = Some(false);
                hc.port_bindings = None;
            })
    }

    /// Starts a sandbox: the container owning a network namespace on the
    /// run's network (a pod's or a node's; an ambient workload's is its app
    /// alone). It runs the echo app on `app_ip:APP` and relays
    /// `FORWARD_BASE + port` to each of the `forwarded` ports on its
    /// loopback; those relays and the `direct` ports are published on
    /// 127.0.0.1. `APP` must be among them: it is the readiness probe.
    async fn start_sandbox(
        &mut self,
        component: &str,
        docker_name: &str,
        app_ip: Ipv4Addr,
        forwarded: &[u16],
        direct: &[u16],
    ) -> Result<Sandbox, Error> {
        let published: Vec<(u16, SocketAddr)> = forwarded
            .iter()
            .chain(direct)
            .map(|&p| free_port().map(|host| (p, loopback(host))))
            .collect::<Result<_, _>>()?;
        let mut cmd = vec![
            "/usr/local/bin/meshid-echo".to_string(),
            "--listen".into(),
            format!("{app_ip}:{APP}"),
        ];
        for port in forwarded {
            cmd.push("--forward".into());
            cmd.push(format!("0.0.0.0:{}=127.0.0.1:{port}", FORWARD_BASE + port));
        }
        let mut request = self
            .request(&self.images.mesh.reference, docker_name, "meshid-echo")
            .with_cmd(cmd)
            .with_network(&self.run);
        for (port, host) in &published {
            let inside = if forwarded.contains(port) {
                FORWARD_BASE + port
            } else {
                *port
            };
            request = request.with_mapped_port(host.port(), inside.tcp());
        }
        let request = request.with_host_config_modifier(publish_on_loopback);
        let mut sandbox = Sandbox {
            id: String::new(),
            ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            published,
        };
        let container = self
            .launch(component, request, Probe::Echo(sandbox.host(APP)))
            .await?;
        sandbox.id = container.id().to_owned();
        sandbox.ip = container
            .get_bridge_ip_address()
            .await
            .map_err(|e| error(format!("address of {docker_name}"), e))?;
        Ok(sandbox)
    }

    async fn start_pod(&mut self, pod: &PodSpec) -> Result<(), Error> {
        let pod_dir = self.dir.join("pods").join(&pod.name);
        let id = SpiffeId::for_service_account(
            &self.spec.trust_domain,
            &pod.namespace,
            &pod.service_account,
        )
        .map_err(|e| Error::Setup(e.to_string()))?;
        write(
            &pod_dir.join("var/run/secrets/tokens/istio-token"),
            &self.mint(&pod.namespace, &pod.service_account, &pod.name)?,
        )?;
        let root =
            std::fs::read_to_string(&self.root_out).map_err(|e| Error::io(&self.root_out, e))?;
        write(&pod_dir.join("var/run/secrets/istio/root-cert.pem"), &root)?;
        mkdir(&pod_dir.join("var/run/secrets/workload-spiffe-uds"))?;
        crate::cluster::write_policy(&self.dir, &pod.name, pod.mode)?;

        // The sandbox: echo app, relays, and the published ports of the whole pod.
        let sandbox_name = format!("{}-{}", self.run, pod.name);
        let sandbox = self
            .start_sandbox(
                &format!("{}/app", pod.name),
                &sandbox_name,
                Ipv4Addr::LOCALHOST,
                &[AGENT_ADMIN, PROXY_ADMIN, OUTBOUND, APP],
                &[INBOUND],
            )
            .await?;
        let host_port = |p: u16| sandbox.host(p);
        let inbound = host_port(INBOUND);
        let sandbox_id = sandbox.id.clone();
        let ip = sandbox.ip;
        self.pod_ips.insert(pod.name.clone(), ip);

        // The agent.
        let agent = format!("{}/agent", pod.name);
        let request = self
            .pod_request(
                &self.images.mesh.reference,
                &format!("{sandbox_name}-agent"),
                "meshid-agent",
                &pod_dir,
                &sandbox_id,
            )
            .with_cmd([
                "/usr/local/bin/meshid-agent".to_string(),
                "--ca-address".into(),
                format!("https://{}:{CA_GRPC}", self.ca_container),
                "--trust-domain".into(),
                self.spec.trust_domain.clone(),
                "--namespace".into(),
                pod.namespace.clone(),
                "--service-account".into(),
                pod.service_account.clone(),
                "--secret-ttl".into(),
                format!("{}s", self.spec.ttl.as_secs()),
                "--admin-addr".into(),
                format!("127.0.0.1:{AGENT_ADMIN}"),
                "--spiffe-endpoint-socket".into(),
                "unix:///pod/var/run/secrets/workload-spiffe-uds/workload.sock".into(),
            ]);
        self.launch(&agent, request, Probe::Ready(host_port(AGENT_ADMIN)))
            .await?;

        // The proxy. Its outbound route goes to the pod started before it.
        let target = self.pods.last().cloned();
        let outbound = match &target {
            Some(t) => {
                let ip = self.pod_ips.get(&t.name).copied().ok_or_else(|| {
                    Error::Setup(format!("pod {} has no address on the network", t.name))
                })?;
                Some((SocketAddr::new(ip, INBOUND), t.id.clone(), t.name.clone()))
            }
            None => None,
        };
        let proxy_component = format!("{}/proxy", pod.name);
        let proxy_name = format!("{sandbox_name}-proxy");
        let request = match pod.proxy {
            Proxy::Shim => {
                let mut cmd = vec![
                    "/usr/local/bin/meshid-envoy-shim".to_string(),
                    "--inbound".into(),
                    format!("0.0.0.0:{INBOUND}"),
                    "--app".into(),
                    format!("127.0.0.1:{APP}"),
                    "--admin".into(),
                    format!("127.0.0.1:{PROXY_ADMIN}"),
                    "--sds-socket".into(),
                    SDS_SOCKET.into(),
                    "--node-id".into(),
                    format!(
                        "sidecar~{ip}~{}.{}~{}.svc.cluster.local",
                        pod.name, pod.namespace, pod.namespace
                    ),
                    "--cluster".into(),
                    format!("{}.{}", pod.name, pod.namespace),
                    "--trust-domain".into(),
                    self.spec.trust_domain.clone(),
                    "--policy".into(),
                    format!("{POD_DIR}/policy.yaml"),
                ];
                if let Some((dest, peer, _)) = &outbound {
                    cmd.push("--outbound".into());
                    cmd.push(format!("127.0.0.1:{OUTBOUND}={dest},{peer}"));
                }
                self.pod_request(
                    &self.images.mesh.reference,
                    &proxy_name,
                    "meshid-envoy-shim",
                    &pod_dir,
                    &sandbox_id,
                )
                .with_cmd(cmd)
            }
            Proxy::Envoy => {
                let bootstrap = envoy_bootstrap(&EnvoyPod {
                    pod,
                    trust_domain: &self.spec.trust_domain,
                    admin: loopback(PROXY_ADMIN),
                    inbound: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), INBOUND),
                    app: loopback(APP),
                    sds_socket: Path::new(SDS_SOCKET),
                    outbound: outbound
                        .as_ref()
                        .map(|(dest, peer, _)| (loopback(OUTBOUND), *dest, peer)),
                });
                write(&pod_dir.join("envoy.yaml"), &bootstrap)?;
                self.pod_request(
                    &self.images.envoy.reference,
                    &proxy_name,
                    "envoy",
                    &pod_dir,
                    &sandbox_id,
                )
                .with_cmd([
                    "-c",
                    "/pod/envoy.yaml",
                    "--disable-hot-restart",
                    "--concurrency",
                    "1",
                    "--log-level",
                    "warn",
                ])
            }
        };
        self.launch(
            &proxy_component,
            request,
            Probe::Ready(host_port(PROXY_ADMIN)),
        )
        .await?;

        self.pods.push(Pod {
            name: pod.name.clone(),
            namespace: pod.namespace.clone(),
            service_account: pod.service_account.clone(),
            id,
            proxy: pod.proxy,
            mode: pod.mode,
            inbound,
            outbound: outbound.map(|(_, _, name)| (host_port(OUTBOUND), name)),
            app: host_port(APP),
            agent,
            proxy_component,
        });
        Ok(())
    }

    /// The ambient nodes, as the process backend has them: each workload a
    /// container whose address on the run's network is its pod address in
    /// the registry; each node a sandbox owning the node's network namespace
    /// (relaying the ztunnel's loopback admin and outbound listeners) and
    /// the ztunnel in it, with its own token, HBONE on the node's address
    /// and the other nodes as `--peer`s. Each workload's outbound listener
    /// leads to the first workload of the next node.
    async fn start_nodes(&mut self) -> Result<(), Error> {
        let nodes = self.spec.nodes.clone();
        // The workloads first: their addresses go into the registry.
        let mut ambient = Vec::new();
        for node in &nodes {
            register_node(&mut self.registry, &node.name);
            for (name, sa) in &node.workloads {
                let sandbox = self
                    .start_sandbox(
                        &format!("{name}/app"),
                        &format!("{}-{name}", self.run),
                        Ipv4Addr::UNSPECIFIED,
                        &[],
                        &[APP],
                    )
                    .await?;
                register_ambient_workload(
                    &mut self.registry,
                    name,
                    sa,
                    &node.name,
                    sandbox.ip.to_string(),
                );
                self.pod_ips.insert(name.clone(), sandbox.ip);
                ambient.push(Ambient {
                    name: name.clone(),
                    namespace: "default".into(),
                    service_account: sa.clone(),
                    node: node.name.clone(),
                    id: SpiffeId::for_service_account(&self.spec.trust_domain, "default", sa)
                        .map_err(|e| Error::Setup(e.to_string()))?,
                    app: sandbox.host(APP),
                    outbound: None,
                    ztunnel: format!("{}/ztunnel", node.name),
                });
            }
        }
        self.save_registry()?;
        let root =
            std::fs::read_to_string(&self.root_out).map_err(|e| Error::io(&self.root_out, e))?;
        // The nodes' sandboxes next: every ztunnel names the others' addresses.
        let mut sandboxes = Vec::new();
        for node in &nodes {
            let node_dir = self.dir.join("nodes").join(&node.name);
            write(
                &node_dir.join("var/run/secrets/tokens/istio-token"),
                &ztunnel_token(&self.issuer, &node.name)?,
            )?;
            write(&node_dir.join("var/run/secrets/istio/root-cert.pem"), &root)?;
            let mut forwarded = vec![ZTUNNEL_ADMIN, APP];
            forwarded.extend((0..node.workloads.len()).map(|k| ZTUNNEL_OUTBOUND_BASE + k as u16));
            let sandbox = self
                .start_sandbox(
                    &format!("{}/sandbox", node.name),
                    &format!("{}-{}", self.run, node.name),
                    Ipv4Addr::LOCALHOST,
                    &forwarded,
                    &[],
                )
                .await?;
            self.node_ips.insert(node.name.clone(), sandbox.ip);
            sandboxes.push((node_dir, sandbox));
        }
        for (n, (node, (node_dir, sandbox))) in nodes.iter().zip(&sandboxes).enumerate() {
            let mut cmd = vec![
                "/usr/local/bin/meshid-ztunnel".to_string(),
                "--ca-address".into(),
                format!("https://{}:{CA_GRPC}", self.ca_container),
                "--trust-domain".into(),
                self.spec.trust_domain.clone(),
                "--node-name".into(),
                node.name.clone(),
                "--registry-file".into(),
                "/cluster/registry.json".into(),
                "--secret-ttl".into(),
                format!("{}s", self.spec.ttl.as_secs()),
                "--hbone-addr".into(),
                format!("0.0.0.0:{HBONE}"),
                "--admin-addr".into(),
                format!("127.0.0.1:{ZTUNNEL_ADMIN}"),
            ];
            for (other, (_, s)) in nodes.iter().zip(&sandboxes) {
                if other.name != node.name {
                    cmd.push("--peer".into());
                    cmd.push(format!("{}={}:{HBONE}", other.name, s.ip));
                }
            }
            let target = outbound_target(&nodes, n)
                .and_then(|t| ambient.iter().find(|a| a.name == t))
                .map(|t| (t.name.clone(), self.pod_ips[&t.name]));
            if let Some((target, ip)) = target {
                for (k, a) in ambient
                    .iter_mut()
                    .filter(|a| a.node == node.name)
                    .enumerate()
                {
                    let listen = ZTUNNEL_OUTBOUND_BASE + k as u16;
                    cmd.push("--outbound".into());
                    cmd.push(format!(
                        "{}/{}@127.0.0.1:{listen}={ip}:{APP}",
                        a.namespace, a.name
                    ));
                    a.outbound = Some((sandbox.host(listen), target.clone()));
                }
            }
            let component = format!("{}/ztunnel", node.name);
            let request = self
                .pod_request(
                    &self.images.mesh.reference,
                    &format!("{}-{}-ztunnel", self.run, node.name),
                    "meshid-ztunnel",
                    node_dir,
                    &sandbox.id,
                )
                .with_mount(
                    Mount::bind_mount(self.dir.join("cluster").display().to_string(), "/cluster")
                        .with_access_mode(AccessMode::ReadOnly),
                )
                .with_cmd(cmd);
            self.launch(
                &component,
                request,
                Probe::Ready(sandbox.host(ZTUNNEL_ADMIN)),
            )
            .await?;
        }
        self.ambient = ambient;
        Ok(())
    }

    fn component(&self, name: &str) -> Result<&Component, Error> {
        self.components
            .get(name)
            .ok_or_else(|| Error::Setup(format!("no component named {name:?}")))
    }

    /// Polls the component's probe until it passes; fails with the
    /// container's log tail if it exited or time ran out.
    pub async fn wait_ready(&self, name: &str, within: Duration) -> Result<(), Error> {
        let component = self.component(name)?;
        let deadline = Instant::now() + within;
        let mut polls = 0u32;
        loop {
            let last = match component.probe.check().await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            polls += 1;
            // Asking Docker costs more than a probe: every tenth poll.
            if polls.is_multiple_of(10) {
                let running = component
                    .container(name)?
                    .is_running()
                    .await
                    .map_err(|e| error(format!("inspect {}", component.docker_name), e))?;
                if !running {
                    return Err(Error::Component {
                        name: name.into(),
                        message: format!(
                            "container {} exited before it was ready; log tail:\n{}",
                            component.docker_name,
                            component.log_tail(30).await
                        ),
                    });
                }
            }
            if Instant::now() > deadline {
                return Err(Error::Component {
                    name: name.into(),
                    message: format!(
                        "not ready after {within:?} ({last}); log tail of {}:\n{}",
                        component.docker_name,
                        component.log_tail(30).await
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The host directory of this run (cluster files, pods' files, logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The images this run used.
    pub fn images(&self) -> &Images {
        &self.images
    }

    /// Writes each container's output to `logs/<component>.log` in the run directory.
    async fn save_logs(&self) {
        let dir = self.dir.join("logs");
        if std::fs::create_dir_all(&dir).is_err() {
            return;
        }
        for (name, c) in &self.components {
            let _ = std::fs::write(
                dir.join(format!("{}.log", name.replace('/', "_"))),
                c.logs().await,
            );
        }
    }
}

impl Topology for DockerMesh {
    fn backend(&self) -> &'static str {
        "docker"
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
            self.register(namespace, service_account, pod);
            self.save_registry()?;
            // The CA polls the registry file; give it a beat to see the new pod.
            tokio::time::sleep(Duration::from_millis(1200)).await;
        }
        self.mint(namespace, service_account, pod)
    }

    async fn admin_get(&self, component: &str, path: &str) -> Result<Response, Error> {
        let probe = self.component(component)?.probe;
        http::get(probe.addr(), path, Duration::from_secs(5)).await
    }

    async fn stop(&mut self, component: &str) -> Result<(), Error> {
        let c = self.component(component)?;
        c.container(component)?
            .stop_with_timeout(Some(5))
            .await
            .map_err(|e| error(format!("stop {}", c.docker_name), e))
    }

    async fn start(&mut self, component: &str) -> Result<(), Error> {
        let c = self.component(component)?;
        c.container(component)?
            .start()
            .await
            .map_err(|e| error(format!("start {}", c.docker_name), e))?;
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
            "network        {} (gateway {}; OTLP receiver {})",
            self.network.name,
            self.network.gateway,
            self.otlp.endpoint()
        );
        for b in [&self.images.mesh, &self.images.envoy] {
            let _ = writeln!(out, "image          {b}");
        }
        let _ = writeln!(
            out,
            "ca             grpc {}  monitoring http://{}  container {}",
            self.ca_address(),
            self.ca_monitoring,
            self.ca_container
        );
        let _ = writeln!(out, "root bundle    {}", self.root_out.display());
        let _ = writeln!(out, "registry       {}", self.registry_path.display());
        for p in &self.pods {
            let addr = |c: &str| {
                self.components
                    .get(c)
                    .map(|c| c.probe.addr().to_string())
                    .unwrap_or_default()
            };
            let _ = writeln!(
                out,
                "pod {:<10} {}  ip {}  inbound {}  app {}{}  agent admin http://{}  proxy admin http://{}  containers {}-{}{{,-agent,-proxy}}",
                p.name,
                p.id,
                self.pod_ips
                    .get(&p.name)
                    .map(|ip| ip.to_string())
                    .unwrap_or_default(),
                p.inbound,
                p.app,
                p.outbound
                    .as_ref()
                    .map(|(a, to)| format!("  outbound {a} (to {to})"))
                    .unwrap_or_default(),
                addr(&p.agent),
                addr(&p.proxy_component),
                self.run,
                p.name,
            );
        }
        for a in &self.ambient {
            let _ = writeln!(
                out,
                "ambient {:<10} {}  on {}  ip {}  app {}{}  container {}-{}",
                a.name,
                a.id,
                a.node,
                self.pod_ips
                    .get(&a.name)
                    .map(|ip| ip.to_string())
                    .unwrap_or_default(),
                a.app,
                a.outbound
                    .as_ref()
                    .map(|(l, to)| format!("  outbound {l} (to {to})"))
                    .unwrap_or_default(),
                self.run,
                a.name,
            );
        }
        for n in &self.spec.nodes {
            let _ = writeln!(
                out,
                "ztunnel {:<10} ip {}  hbone :{HBONE}  admin http://{}  containers {}-{}{{,-ztunnel}}",
                n.name,
                self.node_ips
                    .get(&n.name)
                    .map(|ip| ip.to_string())
                    .unwrap_or_default(),
                self.components
                    .get(&format!("{}/ztunnel", n.name))
                    .map(|c| c.probe.addr().to_string())
                    .unwrap_or_default(),
                self.run,
                n.name,
            );
        }
        let _ = writeln!(
            out,
            "logs           docker logs <container>; saved to {} at teardown",
            self.dir.join("logs").display()
        );
        let _ = writeln!(
            out,
            "clean up       docker rm -f $(docker ps -aq --filter label={RUN_LABEL}={}) && docker network rm {}",
            self.run, self.network.name
        );
        out
    }

    async fn teardown(&mut self) {
        self.save_logs().await;
        // Proxies, agents and ztunnels before the sandboxes whose namespaces
        // they share; the CA last.
        let mut order: Vec<String> = self.components.keys().cloned().collect();
        order.sort_by_key(|name| {
            if name == "ca" {
                2
            } else if name.ends_with("/app") || name.ends_with("/sandbox") {
                1
            } else {
                0
            }
        });
        for name in order {
            if let Some(c) = self
                .components
                .get_mut(&name)
                .and_then(|c| c.container.take())
            {
                let _ = c.rm().await;
            }
        }
        self.network.remove().await;
    }
}
