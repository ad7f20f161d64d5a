//! The `kind` backend: the mesh of kind/overlays running in the kind cluster
//! `meshid` (`cargo xtask kind up`, `load`, `deploy` bring it up; `cargo
//! xtask e2e --backend kind` does all three and then runs this), driven with
//! kubectl only:
//!
//! - the cluster is real, so the harness does not play it: tokens come from
//!   `kubectl create token --audience istio-ca`, bound to their pod; the
//!   root bundle from the `istio-ca-root-cert` ConfigMap meshid-ca
//!   publishes; deleting a workload deletes its Deployment; new `cacerts`
//!   are applied to the `cacerts` Secret.
//! - the pods are the manifests' (sidecar-app, sidecar-envoy, ztunnel
//!   overlays), matched to the spec's pods by their `app` label; the
//!   harness reaches their ports, the CA's and the ztunnels' admin through
//!   `kubectl port-forward` on 127.0.0.1.
//! - spans: the meshid-telemetry ConfigMaps are pointed at the harness's
//!   OTLP receiver, bound on the kind network's gateway, and the workloads
//!   restarted to read it.
//!
//! What a cluster cannot do as the process backend does is refused with an
//! error saying so: stopping one container of a pod, and changing a pod's
//! inbound mode at runtime (the manifests give the shim a fixed `--mode`).
//!
//! Nothing here has run against a real cluster on the machines this project
//! is built on (no kind CLI, no node image): the command lines are unit-tested.

pub mod kubectl;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use meshid_common::SpiffeId;
use tokio::process::Child;

use self::kubectl::{AMBIENT_NAMESPACE, DEMO_NAMESPACE, SYSTEM_NAMESPACE};
use super::MeshState;
use crate::Error;
use crate::http::{self, Response};
use crate::otlp::OtlpReceiver;
use crate::spec::MeshSpec;
use crate::topology::{Ambient, Pod, Proxy, Topology};

/// Ports in the manifests' pods.
const CA_GRPC: u16 = 15012;
const CA_MONITORING: u16 = 15014;
const INBOUND: u16 = 15006;
const OUTBOUND: u16 = 15001;
const PROXY_ADMIN: u16 = 15000;
const AGENT_ADMIN: u16 = 15004;
const APP: u16 = 8080;
const ZTUNNEL_ADMIN: u16 = 15020;
/// Replicas of meshid-ca in the ca overlay.
const CA_REPLICAS: u32 = 2;
/// The namespaces whose pods export spans.
const TELEMETRY_NAMESPACES: &[&str] = &[SYSTEM_NAMESPACE, DEMO_NAMESPACE, AMBIENT_NAMESPACE];

/// The tools the backend runs, for the sentence when one is missing.
pub const TOOLS: &[&str] = &["kind", "kubectl", "docker"];

/// Where `program` is on `PATH`, if anywhere.
fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

/// A loopback port (a port-forward binds it next; [`crate::ports`]).
fn free_port() -> Result<SocketAddr, Error> {
    crate::ports::reserve()
}

/// One `kubectl port-forward` and the local addresses it serves, by remote port.
#[derive(Debug)]
struct Forward {
    argv: Vec<String>,
    ports: BTreeMap<u16, SocketAddr>,
    child: Child,
}

impl Forward {
    async fn start(namespace: &str, target: &str, remote: &[u16]) -> Result<Self, Error> {
        let ports: Vec<(SocketAddr, u16)> = remote
            .iter()
            .map(|r| Ok((free_port()?, *r)))
            .collect::<Result<_, Error>>()?;
        let argv = kubectl::port_forward(namespace, target, &ports);
        let child = kubectl::spawn(&argv)?;
        let fwd = Forward {
            ports: ports.iter().map(|(l, r)| (*r, *l)).collect(),
            argv,
            child,
        };
        fwd.wait_listening().await?;
        Ok(fwd)
    }

    /// Waits until the first local port accepts (kubectl binds them all at once).
    async fn wait_listening(&self) -> Result<(), Error> {
        let first = *self.ports.values().next().expect("at least one port");
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(first).await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(Error::Setup(format!(
            "kubectl {} did not listen on {first} within 10 s",
            self.argv.join(" ")
        )))
    }

    fn local(&self, remote: u16) -> Result<SocketAddr, Error> {
        self.ports
            .get(&remote)
            .copied()
            .ok_or_else(|| Error::Setup(format!("no port-forward to port {remote}")))
    }
}

/// A mesh running in the kind cluster.
#[derive(Debug)]
pub struct KindMesh {
    state: MeshState,
    /// Port-forwards by component (`ca`, `<pod>`, `<node>/ztunnel`, `<ambient>`).
    forwards: BTreeMap<String, Forward>,
    /// The cluster's pod name of each spec pod and ambient workload.
    pod_names: BTreeMap<String, String>,
}

impl KindMesh {
    /// Finds the deployed mesh, points its telemetry at the harness, and
    /// opens the port-forwards the suites use.
    pub async fn start(spec: MeshSpec) -> Result<Self, Error> {
        let missing: Vec<&str> = TOOLS.iter().copied().filter(|t| !on_path(t)).collect();
        if !missing.is_empty() {
            return Err(Error::Setup(format!(
                "the kind backend needs {} on PATH, and {} not found",
                missing.join(" and "),
                if missing.len() == 1 {
                    "it was"
                } else {
                    "they were"
                }
            )));
        }
        kubectl::output(
            &kubectl::rollout_status(SYSTEM_NAMESPACE, "deployment/meshid-ca"),
            None,
        )
        .await
        .map_err(|e| {
            Error::Setup(format!(
                "meshid-ca is not running in kind-meshid ({e}); run `cargo xtask kind up`, \
                 `cargo xtask kind load` and `cargo xtask kind deploy` first"
            ))
        })?;

        let gateway = kind_gateway().await?;
        let otlp =
            OtlpReceiver::start_forwarding_on(SocketAddr::new(gateway, 0), spec.extra_otlp.clone())
                .await
                .map_err(|e| Error::Setup(format!("OTLP receiver on {gateway}: {e}")))?;
        point_telemetry_at(&otlp.endpoint()).await?;

        let dir = std::env::temp_dir().join(format!("meshid-e2e-kind-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let ca =
            Forward::start(SYSTEM_NAMESPACE, "svc/meshid-ca", &[CA_GRPC, CA_MONITORING]).await?;
        let state = MeshState::new(
            spec,
            dir,
            otlp,
            ca.local(CA_GRPC)?,
            ca.local(CA_MONITORING)?,
        )?;
        let mut mesh = KindMesh {
            state,
            forwards: BTreeMap::from([("ca".to_owned(), ca)]),
            pod_names: BTreeMap::new(),
        };
        mesh.refresh_root().await?;
        mesh.open_pods().await?;
        mesh.open_ambient().await?;
        Ok(mesh)
    }

    /// Writes the root bundle of the `istio-ca-root-cert` ConfigMap where
    /// [`MeshState::root_pem`] reads it.
    async fn refresh_root(&self) -> Result<(), Error> {
        let pem = kubectl::output(&kubectl::root_configmap(DEMO_NAMESPACE), None).await?;
        if !pem.contains("BEGIN CERTIFICATE") {
            return Err(Error::Setup(format!(
                "the istio-ca-root-cert ConfigMap in {DEMO_NAMESPACE} holds no certificate"
            )));
        }
        super::write(&self.state.root_out, &pem)
    }

    async fn open_pods(&mut self) -> Result<(), Error> {
        let td = self.state.spec.trust_domain.clone();
        for p in self.state.spec.pods.clone() {
            let name = kubectl::output(&kubectl::pod_of_app(DEMO_NAMESPACE, &p.name), None)
                .await?
                .trim()
                .to_owned();
            if name.is_empty() {
                return Err(Error::Setup(format!(
                    "no running pod labelled app={} in {DEMO_NAMESPACE}",
                    p.name
                )));
            }
            // Only the Envoy pod has an outbound route in the manifests (to productpage).
            let outbound = p.proxy == Proxy::Envoy;
            let mut remote = vec![INBOUND, APP, PROXY_ADMIN, AGENT_ADMIN];
            if outbound {
                remote.push(OUTBOUND);
            }
            let fwd = Forward::start(DEMO_NAMESPACE, &format!("pod/{name}"), &remote).await?;
            let id = SpiffeId::for_service_account(&td, DEMO_NAMESPACE, &p.service_account)
                .map_err(|e| Error::Setup(e.to_string()))?;
            self.state.pods.push(Pod {
                name: p.name.clone(),
                namespace: DEMO_NAMESPACE.into(),
                service_account: p.service_account.clone(),
                id,
                proxy: p.proxy,
                mode: p.mode,
                inbound: fwd.local(INBOUND)?,
                outbound: if outbound {
                    Some((fwd.local(OUTBOUND)?, "productpage".to_owned()))
                } else {
                    None
                },
                app: fwd.local(APP)?,
                agent: format!("{}/agent", p.name),
                proxy_component: format!("{}/proxy", p.name),
            });
            self.pod_names.insert(p.name.clone(), name);
            self.forwards.insert(p.name, fwd);
        }
        Ok(())
    }

    /// The ambient sample workloads, on whichever node the scheduler chose,
    /// and each node's ztunnel.
    async fn open_ambient(&mut self) -> Result<(), Error> {
        let td = self.state.spec.trust_domain.clone();
        let ztunnels =
            kubectl::output(&kubectl::pods_and_nodes(SYSTEM_NAMESPACE, "ztunnel"), None).await?;
        for (pod, node) in parse_pods_and_nodes(&ztunnels) {
            let fwd =
                Forward::start(SYSTEM_NAMESPACE, &format!("pod/{pod}"), &[ZTUNNEL_ADMIN]).await?;
            self.forwards.insert(format!("{node}/ztunnel"), fwd);
        }
        for node in self.state.spec.nodes.clone() {
            for (name, sa) in &node.workloads {
                let found =
                    kubectl::output(&kubectl::pods_and_nodes(AMBIENT_NAMESPACE, name), None)
                        .await?;
                let Some((pod, on)) = parse_pods_and_nodes(&found).into_iter().next() else {
                    return Err(Error::Setup(format!(
                        "no running pod labelled app={name} in {AMBIENT_NAMESPACE}"
                    )));
                };
                let fwd = Forward::start(AMBIENT_NAMESPACE, &format!("pod/{pod}"), &[APP]).await?;
                self.state.ambient.push(Ambient {
                    name: name.clone(),
                    namespace: AMBIENT_NAMESPACE.into(),
                    service_account: sa.clone(),
                    node: on.clone(),
                    id: SpiffeId::for_service_account(&td, AMBIENT_NAMESPACE, sa)
                        .map_err(|e| Error::Setup(e.to_string()))?,
                    app: fwd.local(APP)?,
                    outbound: None,
                    ztunnel: format!("{on}/ztunnel"),
                });
                self.pod_names.insert(name.clone(), pod);
                self.forwards.insert(name.clone(), fwd);
            }
        }
        Ok(())
    }

    /// The local address of `component`'s admin (or the CA's monitoring).
    fn admin_addr(&self, component: &str) -> Result<SocketAddr, Error> {
        let unknown = || Error::Setup(format!("no component named {component:?}"));
        if component == "ca" {
            return self
                .forwards
                .get("ca")
                .ok_or_else(unknown)?
                .local(CA_MONITORING);
        }
        if let Some(pod) = component.strip_suffix("/agent") {
            return self
                .forwards
                .get(pod)
                .ok_or_else(unknown)?
                .local(AGENT_ADMIN);
        }
        if let Some(pod) = component.strip_suffix("/proxy") {
            return self
                .forwards
                .get(pod)
                .ok_or_else(unknown)?
                .local(PROXY_ADMIN);
        }
        self.forwards
            .get(component)
            .ok_or_else(unknown)?
            .local(ZTUNNEL_ADMIN)
    }
}

/// `name node` lines of [`kubectl::pods_and_nodes`].
pub fn parse_pods_and_nodes(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_owned(), it.next()?.to_owned()))
        })
        .collect()
}

/// The gateway of the `kind` docker network: the host's address as the
/// nodes' pods reach it.
async fn kind_gateway() -> Result<IpAddr, Error> {
    let out = crate::backend::docker::cli::docker(
        "inspect the kind network",
        [
            "network",
            "inspect",
            "kind",
            "--format",
            "{{range .IPAM.Config}}{{.Gateway}} {{end}}",
        ],
    )
    .await?;
    out.split_whitespace()
        .filter_map(|s| s.parse::<IpAddr>().ok())
        .find(IpAddr::is_ipv4)
        .ok_or_else(|| Error::Setup(format!("the kind network has no IPv4 gateway ({out:?})")))
}

/// Points every meshid-telemetry ConfigMap at `endpoint` and restarts the
/// workloads so they read it.
async fn point_telemetry_at(endpoint: &str) -> Result<(), Error> {
    for ns in TELEMETRY_NAMESPACES {
        let yaml = kubectl::output(
            &kubectl::render_object(
                &["configmap"],
                ns,
                "meshid-telemetry",
                &[format!(
                    "--from-literal=OTEL_EXPORTER_OTLP_ENDPOINT={endpoint}"
                )],
            ),
            None,
        )
        .await?;
        kubectl::output(&kubectl::args(["apply", "-f", "-"]), Some(&yaml)).await?;
    }
    for (ns, kind) in [
        (SYSTEM_NAMESPACE, "deployment"),
        (SYSTEM_NAMESPACE, "daemonset"),
        (DEMO_NAMESPACE, "deployment"),
    ] {
        kubectl::output(&kubectl::rollout_restart(ns, kind), None).await?;
    }
    for (ns, what) in [
        (SYSTEM_NAMESPACE, "deployment/meshid-ca"),
        (SYSTEM_NAMESPACE, "daemonset/ztunnel"),
        (DEMO_NAMESPACE, "deployment/productpage"),
        (DEMO_NAMESPACE, "deployment/reviews"),
        (DEMO_NAMESPACE, "deployment/ratings"),
        (DEMO_NAMESPACE, "deployment/legacy"),
    ] {
        kubectl::output(&kubectl::rollout_status(ns, what), None).await?;
    }
    Ok(())
}

impl Topology for KindMesh {
    fn backend(&self) -> &'static str {
        "kind"
    }

    fn state(&self) -> &MeshState {
        &self.state
    }

    fn state_mut(&mut self) -> &mut MeshState {
        &mut self.state
    }

    async fn token_for(
        &mut self,
        namespace: &str,
        service_account: &str,
        pod: &str,
    ) -> Result<String, Error> {
        let bound = self.pod_names.get(pod).map(String::as_str);
        let token = kubectl::output(
            &kubectl::create_token(namespace, service_account, bound),
            None,
        )
        .await?;
        Ok(token.trim().to_owned())
    }

    async fn admin_get(&self, component: &str, path: &str) -> Result<Response, Error> {
        http::get(self.admin_addr(component)?, path, Duration::from_secs(5)).await
    }

    async fn stop(&mut self, component: &str) -> Result<(), Error> {
        if component != "ca" {
            return Err(Error::Setup(format!(
                "the kind backend cannot stop {component}: a container of a running pod \
                 cannot be stopped alone in Kubernetes"
            )));
        }
        kubectl::output(&kubectl::scale(SYSTEM_NAMESPACE, "meshid-ca", 0), None).await?;
        Ok(())
    }

    async fn start(&mut self, component: &str) -> Result<(), Error> {
        if component != "ca" {
            return Err(Error::Setup(format!(
                "the kind backend cannot start {component} alone"
            )));
        }
        kubectl::output(
            &kubectl::scale(SYSTEM_NAMESPACE, "meshid-ca", CA_REPLICAS),
            None,
        )
        .await?;
        kubectl::output(
            &kubectl::rollout_status(SYSTEM_NAMESPACE, "deployment/meshid-ca"),
            None,
        )
        .await?;
        // The Service's port-forward ended with its pods: open a new one on
        // the same local ports the state knows.
        let old = self
            .forwards
            .remove("ca")
            .ok_or_else(|| Error::Setup("no port-forward to the CA".into()))?;
        let ports: Vec<(SocketAddr, u16)> = old.ports.iter().map(|(r, l)| (*l, *r)).collect();
        drop(old);
        let argv = kubectl::port_forward(SYSTEM_NAMESPACE, "svc/meshid-ca", &ports);
        let fwd = Forward {
            child: kubectl::spawn(&argv)?,
            ports: ports.iter().map(|(l, r)| (*r, *l)).collect(),
            argv,
        };
        fwd.wait_listening().await?;
        self.forwards.insert("ca".into(), fwd);
        Ok(())
    }

    async fn delete_workload(&mut self, pod: &str) -> Result<(), Error> {
        let namespace = if self.state.ambient.iter().any(|a| a.name == pod) {
            AMBIENT_NAMESPACE
        } else {
            DEMO_NAMESPACE
        };
        kubectl::output(&kubectl::delete_deployment(namespace, pod), None).await?;
        Ok(())
    }

    async fn update_ca_files(&mut self, files: &[(&str, String)]) -> Result<(), Error> {
        let dir = self.state.dir.join("cacerts");
        crate::cluster::write_ca_files(&dir, files)?;
        let from: Vec<String> = files
            .iter()
            .map(|(name, _)| format!("--from-file={name}={}", dir.join(name).display()))
            .collect();
        let yaml = kubectl::output(
            &kubectl::render_object(&["secret", "generic"], SYSTEM_NAMESPACE, "cacerts", &from),
            None,
        )
        .await?;
        kubectl::output(&kubectl::args(["apply", "-f", "-"]), Some(&yaml)).await?;
        Ok(())
    }

    async fn set_mode(&mut self, pod: &str, _mode: crate::topology::Mode) -> Result<(), Error> {
        Err(Error::Setup(format!(
            "the kind backend cannot change {pod}'s inbound mode at runtime: the manifests \
             start each shim with a fixed --mode"
        )))
    }

    fn describe(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "cluster        kind-meshid (kubectl --context kind-meshid)"
        );
        let _ = writeln!(
            out,
            "ca             grpc {}  monitoring http://{}",
            self.state.ca_address(),
            self.state.ca_monitoring
        );
        for p in &self.state.pods {
            let _ = writeln!(
                out,
                "pod {:<10} {}  pod {}  inbound {}  app {}",
                p.name,
                p.id,
                self.pod_names
                    .get(&p.name)
                    .map(String::as_str)
                    .unwrap_or("?"),
                p.inbound,
                p.app
            );
        }
        for a in &self.state.ambient {
            let _ = writeln!(
                out,
                "ambient {:<10} {}  on {}  app {}",
                a.name, a.id, a.node, a.app
            );
        }
        let _ = writeln!(out, "OTLP receiver  {}", self.state.otlp.endpoint());
        out
    }

    async fn teardown(&mut self) {
        // The port-forwards end with their children; the cluster stays
        // (`cargo xtask kind down` deletes it).
        for (_, mut f) in std::mem::take(&mut self.forwards) {
            let _ = f.child.kill().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_and_nodes_are_read_from_kubectl_jsonpath_output() {
        let text = "ztunnel-abcde meshid-worker\nztunnel-fghij meshid-worker2\n\n";
        assert_eq!(
            parse_pods_and_nodes(text),
            [
                ("ztunnel-abcde".to_owned(), "meshid-worker".to_owned()),
                ("ztunnel-fghij".to_owned(), "meshid-worker2".to_owned()),
            ]
        );
        assert!(parse_pods_and_nodes("").is_empty());
        assert!(parse_pods_and_nodes("lonely\n").is_empty());
    }
}
