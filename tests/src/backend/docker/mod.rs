//! The `docker` backend: the process backend's topology (DESIGN §7), one
//! container per component through testcontainers, images built locally
//! ([`image`]), a user-defined bridge network per run.
//!
//! - The harness still plays the cluster (DESIGN §4): token-issuer key and
//!   JWKS, registry file and per-pod token files live in a host directory
//!   that is bind-mounted into the CA (`/cluster`, `/ca`) and into each pod
//!   (`/pod`, which also holds the SDS socket, as an emptyDir would).
//! - A pod is a sandbox container owning the pod's network namespace (it
//!   runs the echo app and relays loopback-only ports, see
//!   [`forward`]), plus agent and proxy containers joining
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
//!
//! The rooms: this module holds the mesh and its [`Topology`] side; `pod`
//! and `node` start sidecar pods and ambient nodes, `sandbox` the containers
//! owning a network namespace, `container` the probes, containers and the
//! run's network; [`image`] builds the images, [`forward`] is the sandbox's
//! port relay and [`cli`] the few `docker` CLI calls testcontainers does not
//! cover (image builds, networks, inspection).

pub mod cli;
mod container;
pub mod forward;
pub mod image;
mod node;
mod pod;
mod sandbox;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use testcontainers::core::{AccessMode, IntoContainerPort, Mount};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, ContainerRequest, GenericImage, ImageExt};

use self::container::{
    Component, Network, Probe, free_port, image_of, loopback, mkdir, publish_on_loopback,
};
use self::image::Images;
use super::MeshState;
use crate::Error;
use crate::cluster::{plugged_ca_files, write_ca_files};
use crate::http::{self, Response};
use crate::otlp::OtlpReceiver;
use crate::spec::MeshSpec;
use crate::topology::{Topology, WrittenFiles};

/// An [`Error::Docker`] for `action`.
pub(crate) fn error(action: impl Into<String>, message: impl std::fmt::Display) -> Error {
    Error::Docker {
        action: action.into(),
        message: message.to_string(),
    }
}

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

/// A running docker mesh.
#[derive(Debug)]
pub struct DockerMesh {
    // Fields drop in order: containers go before their network.
    components: BTreeMap<String, Component>,
    network: Network,
    state: MeshState,
    run: String,
    ca_container: String,
    /// Each pod's address on the run's network (ambient workloads' too).
    pod_ips: BTreeMap<String, IpAddr>,
    /// Each ambient node's address on the run's network (its ztunnel's).
    node_ips: BTreeMap<String, IpAddr>,
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
        let state = MeshState::new(
            spec,
            dir,
            otlp,
            loopback(free_port()?),
            loopback(free_port()?),
        )?;
        write_ca_files(
            &state.dir.join("ca/cacerts"),
            &plugged_ca_files(&state.spec.trust_domain)?,
        )?;
        let mut mesh = DockerMesh {
            components: BTreeMap::new(),
            network,
            ca_container: format!("{run}-ca"),
            pod_ips: BTreeMap::new(),
            node_ips: BTreeMap::new(),
            images,
            run,
            state,
        };
        mesh.state.save_registry()?;
        mesh.start_ca().await?;
        for pod in mesh.state.spec.pods.clone() {
            mesh.start_pod(&pod).await?;
        }
        mesh.start_nodes().await?;
        let names: Vec<String> = mesh.components.keys().cloned().collect();
        for name in names {
            mesh.wait_ready(&name, Duration::from_secs(60)).await?;
        }
        Ok(mesh)
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
            .with_env_var("OTEL_EXPORTER_OTLP_ENDPOINT", self.state.otlp.endpoint())
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
                self.state.spec.trust_domain.clone(),
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
                self.state.issuer.issuer().to_string(),
                "--server-ip".into(),
                "127.0.0.1".into(),
            ])
            .with_network(&self.run)
            .with_mount(
                Mount::bind_mount(
                    self.state.dir.join("cluster").display().to_string(),
                    "/cluster",
                )
                .with_access_mode(AccessMode::ReadOnly),
            )
            .with_mount(Mount::bind_mount(
                self.state.dir.join("ca").display().to_string(),
                "/ca",
            ))
            .with_mapped_port(self.state.ca_grpc.port(), CA_GRPC.tcp())
            .with_mapped_port(self.state.ca_monitoring.port(), CA_MONITORING.tcp())
            .with_host_config_modifier(publish_on_loopback);
        self.launch("ca", request, Probe::Ready(self.state.ca_monitoring))
            .await?;
        self.wait_ready("ca", Duration::from_secs(30)).await
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
        &self.state.dir
    }

    /// The images this run used.
    pub fn images(&self) -> &Images {
        &self.images
    }

    /// Writes each container's output to `logs/<component>.log` in the run directory.
    async fn save_logs(&self) {
        let dir = self.state.dir.join("logs");
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

/// From `docker diff` output (`A /p`, `C /p`, `D /p` per line), the paths
/// whose copies hold every added or changed file once: an added directory
/// covers what is under it; a changed directory is only listed because of
/// what changed under it, which is listed too. Mount points (`mounts`) and
/// what is under them are host directories of the run: left out.
fn paths_to_copy(diff: &str, mounts: &[&str]) -> Vec<String> {
    let entries: Vec<(char, &str)> = diff
        .lines()
        .filter_map(|l| {
            let (kind, path) = l.trim().split_once(' ')?;
            Some((kind.chars().next()?, path.trim()))
        })
        .collect();
    let under = |child: &str, dir: &str| {
        child.len() > dir.len() && child.starts_with(dir) && child[dir.len()..].starts_with('/')
    };
    entries
        .iter()
        .filter(|(kind, _)| *kind == 'A' || *kind == 'C')
        .filter(|(kind, path)| {
            let covered = entries.iter().any(|(k, dir)| *k == 'A' && under(path, dir));
            let is_changed_dir = *kind == 'C' && entries.iter().any(|(_, c)| under(c, path));
            let mounted = mounts.iter().any(|m| path == m || under(path, m));
            !covered && !is_changed_dir && !mounted
        })
        .map(|(_, p)| (*p).to_owned())
        .collect()
}

impl Topology for DockerMesh {
    fn backend(&self) -> &'static str {
        "docker"
    }

    fn state(&self) -> &MeshState {
        &self.state
    }

    fn state_mut(&mut self) -> &mut MeshState {
        &mut self.state
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

    /// `docker pause` (the cgroup freezer: the container's sockets stay open).
    async fn pause(&mut self, component: &str) -> Result<(), Error> {
        let name = self.component(component)?.docker_name.clone();
        cli::docker("pause", ["pause", name.as_str()])
            .await
            .map(drop)
    }

    async fn resume(&mut self, component: &str) -> Result<(), Error> {
        let name = self.component(component)?.docker_name.clone();
        cli::docker("unpause", ["unpause", name.as_str()])
            .await
            .map(drop)
    }

    fn describe(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "run dir        {}", self.state.dir.display());
        let _ = writeln!(
            out,
            "network        {} (gateway {}; OTLP receiver {})",
            self.network.name,
            self.network.gateway,
            self.state.otlp.endpoint()
        );
        for b in [&self.images.mesh, &self.images.envoy] {
            let _ = writeln!(out, "image          {b}");
        }
        let _ = writeln!(
            out,
            "ca             grpc {}  monitoring http://{}  container {}",
            self.state.ca_address(),
            self.state.ca_monitoring,
            self.ca_container
        );
        let _ = writeln!(out, "root bundle    {}", self.state.root_out.display());
        let _ = writeln!(out, "registry       {}", self.state.registry_path.display());
        for p in &self.state.pods {
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
        for a in &self.state.ambient {
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
        for n in &self.state.spec.nodes {
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
            self.state.dir.join("logs").display()
        );
        let _ = writeln!(
            out,
            "clean up       docker rm -f $(docker ps -aq --filter label={RUN_LABEL}={}) && docker network rm {}",
            self.run, self.network.name
        );
        out
    }

    /// Each container's writable layer: the paths `docker diff` lists as
    /// added or changed, copied out with `docker cp <container>:<path> -`
    /// (a tar archive, kept in memory). Mounted directories are host
    /// directories of the run, scanned there; the image is build output.
    async fn written_files(&self) -> Result<WrittenFiles, Error> {
        let mut out = WrittenFiles::default();
        for c in self.components.values() {
            if c.container.is_none() {
                continue;
            }
            out.examined += 1;
            let name = c.docker_name.as_str();
            let diff = cli::docker(&format!("diff {name}"), ["diff", name]).await?;
            // `docker cp` of a mount point copies the mounted host directory.
            let mounts = cli::docker(
                &format!("inspect the mounts of {name}"),
                [
                    "inspect",
                    "--format",
                    "{{range .Mounts}}{{.Destination}}\n{{end}}",
                    name,
                ],
            )
            .await?;
            let mounts: Vec<&str> = mounts
                .lines()
                .map(str::trim)
                .filter(|m| !m.is_empty())
                .collect();
            for path in paths_to_copy(&diff, &mounts) {
                out.paths += 1;
                let action = format!("cp {name}:{path}");
                let from = format!("{name}:{path}");
                let copied = cli::run(&action, ["cp", from.as_str(), "-"]).await?;
                if !copied.status.success() {
                    let err = String::from_utf8_lossy(&copied.stderr);
                    // Removed between the diff and the copy (a socket, a temp file).
                    if err.contains("No such container:path") || err.contains("Could not find") {
                        continue;
                    }
                    return Err(error(action, err.trim().to_owned()));
                }
                // The archive names entries from the copied path's own name on.
                let parent = path.rsplit_once('/').map(|(p, _)| p).unwrap_or_default();
                out.archives
                    .push((format!("docker:{name}:{parent}/"), copied.stdout));
            }
        }
        Ok(out)
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

#[cfg(test)]
mod written_tests {
    use super::paths_to_copy;

    #[test]
    fn each_written_file_is_copied_once() {
        let diff = "C /tmp\nA /tmp/run\nA /tmp/run/a.log\nA /tmp/run/sub/b\nC /etc\nC /etc/hosts\nD /var/old\nA /tmpfile\n";
        assert_eq!(
            paths_to_copy(diff, &[]),
            ["/tmp/run", "/etc/hosts", "/tmpfile"]
        );
        assert!(paths_to_copy("", &[]).is_empty());
        // A mount point and what is under it are the host's.
        let diff = "A /ca\nA /ca/cacerts\nA /pod\nC /tmp\nA /tmp/x\n";
        assert_eq!(paths_to_copy(diff, &["/ca", "/pod"]), ["/tmp/x"]);
    }
}
