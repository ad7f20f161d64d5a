//! The `kind` backend: the mesh of kind/overlays running in the kind cluster
//! `meshid` (`cargo xtask kind up`, `load`, `deploy` bring it up; `cargo
//! xtask e2e --backend kind` does all three and then runs this), driven with
//! kubectl only:
//!
//! - the cluster is real, so the harness does not play it: tokens come from
//!   `kubectl create token --audience istio-ca`, always bound to a live pod
//!   (meshid-ca accepts no other): a sample pod's own, or a test client's
//!   pod created on the fly; the root bundle from the `istio-ca-root-cert`
//!   ConfigMap meshid-ca publishes; deleting a workload deletes its
//!   Deployment; new `cacerts` go into the `cacerts` Secret; a shim's
//!   inbound mode is PUT on its admin `/policy`; the agents' and ztunnels'
//!   `SECRET_TTL` is patched to the spec's TTL.
//! - the pods are the manifests' (sidecar-app, sidecar-envoy, ztunnel
//!   overlays), matched to the spec's pods by their `app` label and to the
//!   ambient workloads by service account; the harness reaches their ports,
//!   the CA's and the ztunnels' admin through `kubectl port-forward` on
//!   127.0.0.1.
//! - spans: the meshid-telemetry ConfigMaps are pointed at the harness's
//!   OTLP receiver, bound on the kind network's gateway, and the workloads
//!   restarted to read it.
//!
//! What a cluster cannot do as the process backend does is an
//! [`Error::Unsupported`] (the case is reported skipped, with the reason):
//! stopping, starting or freezing one container of a pod, writing a pod's
//! token file, an already-expired token, a load fleet of pods, the Envoy
//! pod's mode, the agents' Unix sockets. Ambient workloads get no outbound
//! listener (nothing leads their traffic into the ztunnel here), and the
//! ztunnels' HBONE address is not told (CONNECT targets are pod IPs).
//!
//! Nothing here has run against a real cluster on the machines this project
//! is built on (no kind CLI, no node image): the command lines are
//! unit-tested, and `tests/kind_fake.rs` runs the backend's paths against a
//! fake kubectl (`src/bin/fake-kubectl.rs`).

pub mod kubectl;

use std::collections::{BTreeMap, BTreeSet};
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
use crate::ports::reserve;
use crate::spec::MeshSpec;
use crate::topology::{Ambient, Mode, Pod, Proxy, Topology};

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

/// The image of the test clients' pods: the e2e image the sample apps run
/// (`cargo xtask kind load` puts it on the nodes).
const CLIENT_IMAGE: &str = "meshid/mesh:dev";
/// The Deployments of the sidecar sample pods (sidecar-app, sidecar-envoy).
const DEMO_DEPLOYMENTS: &[&str] = &["productpage", "reviews", "ratings", "legacy"];

/// The tools the backend runs, for the sentence when one is missing.
pub const TOOLS: &[&str] = &["kind", "kubectl", "docker"];

/// Whether `program` is on the tools' `PATH` ([`kubectl::search_path`]).
fn on_path(program: &str) -> bool {
    kubectl::search_path()
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
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
            .map(|r| Ok((reserve()?, *r)))
            .collect::<Result<_, Error>>()?;
        Self::open(namespace, target, ports).await
    }

    /// A port-forward on the given (local, remote) ports.
    async fn open(
        namespace: &str,
        target: &str,
        ports: Vec<(SocketAddr, u16)>,
    ) -> Result<Self, Error> {
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

/// Where a sample workload of the manifests runs.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Placed {
    namespace: &'static str,
    /// Its Deployment (what deleting the workload deletes).
    deployment: String,
    service_account: String,
    /// The cluster's name of its running pod (what its tokens are bound to).
    pod: String,
}

/// The manifests' pod-to-pod routes: the shim of `productpage` dials the
/// pinned ClusterIP of `reviews` (kind/overlays/sidecar-app), the Envoy of
/// `ratings` dials `productpage` by DNS (sidecar-envoy); both on 15001.
const OUTBOUND_ROUTES: &[(&str, &str)] = &[("productpage", "reviews"), ("ratings", "productpage")];

/// A mesh running in the kind cluster.
#[derive(Debug)]
pub struct KindMesh {
    state: MeshState,
    /// Port-forwards by component (`ca`, `<pod>`, `<node>/ztunnel`, `<ambient>`).
    forwards: BTreeMap<String, Forward>,
    /// Each spec pod and ambient workload, by its spec name.
    placed: BTreeMap<String, Placed>,
    /// The test clients' pods created for [`Topology::token_for`] (namespace, pod).
    clients: BTreeSet<(String, String)>,
}

impl KindMesh {
    /// Finds the deployed mesh, points its telemetry at the harness, gives
    /// the agents and ztunnels the spec's certificate TTL, and opens the
    /// port-forwards the suites use.
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
        set_ttl(spec.ttl).await?;
        point_telemetry_at(&otlp.endpoint()).await?;

        let dir = std::env::temp_dir().join(format!("meshid-e2e-kind-{}", std::process::id()));
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
            placed: BTreeMap::new(),
            clients: BTreeSet::new(),
        };
        mesh.refresh_root().await?;
        mesh.open_pods().await?;
        mesh.open_ambient().await?;
        Ok(mesh)
    }

    /// Writes the root bundle of the `istio-ca-root-cert` ConfigMap where
    /// [`MeshState::root_pem`] reads it; returns it.
    async fn refresh_root(&self) -> Result<String, Error> {
        let pem = kubectl::output(&kubectl::root_configmap(DEMO_NAMESPACE), None).await?;
        if !pem.contains("BEGIN CERTIFICATE") {
            return Err(Error::Setup(format!(
                "the istio-ca-root-cert ConfigMap in {DEMO_NAMESPACE} holds no certificate"
            )));
        }
        super::write(&self.state.root_out, &pem)?;
        Ok(pem)
    }

    async fn open_pods(&mut self) -> Result<(), Error> {
        let td = self.state.spec.trust_domain.clone();
        for p in self.state.spec.pods.clone() {
            let found =
                kubectl::output(&kubectl::pods_and_nodes(DEMO_NAMESPACE, &p.name), None).await?;
            let Some((name, _)) = parse_pods_and_nodes(&found).into_iter().next() else {
                return Err(Error::Setup(format!(
                    "no running pod labelled app={} in {DEMO_NAMESPACE}",
                    p.name
                )));
            };
            let route = OUTBOUND_ROUTES
                .iter()
                .find(|(from, to)| {
                    *from == p.name && self.state.spec.pods.iter().any(|q| q.name == *to)
                })
                .map(|(_, to)| (*to).to_owned());
            let mut remote = vec![INBOUND, APP, PROXY_ADMIN, AGENT_ADMIN];
            if route.is_some() {
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
                outbound: match route {
                    Some(to) => Some((fwd.local(OUTBOUND)?, to)),
                    None => None,
                },
                app: fwd.local(APP)?,
                agent: format!("{}/agent", p.name),
                proxy_component: format!("{}/proxy", p.name),
            });
            self.placed.insert(
                p.name.clone(),
                Placed {
                    namespace: DEMO_NAMESPACE,
                    deployment: p.name.clone(),
                    service_account: p.service_account.clone(),
                    pod: name,
                },
            );
            self.forwards.insert(p.name, fwd);
        }
        Ok(())
    }

    /// The ambient sample workloads (found by service account: the spec
    /// names them `frontend-0`, the manifests' Deployments `frontend`), on
    /// the node their manifest pins them to, and each node's ztunnel. No
    /// workload gets an outbound listener: nothing leads a pod's traffic into
    /// the ztunnel in this cluster (see kind/README.md).
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
                let found = kubectl::output(
                    &kubectl::pods_of_service_account(AMBIENT_NAMESPACE, sa),
                    None,
                )
                .await?;
                let Some((pod, on)) = parse_pods_and_nodes(&found).into_iter().next() else {
                    return Err(Error::Setup(format!(
                        "no running pod of service account {AMBIENT_NAMESPACE}/{sa} \
                         (workload {name})"
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
                self.placed.insert(
                    name.clone(),
                    Placed {
                        namespace: AMBIENT_NAMESPACE,
                        deployment: sa.clone(),
                        service_account: sa.clone(),
                        pod,
                    },
                );
                self.forwards.insert(name.clone(), fwd);
            }
        }
        Ok(())
    }

    /// A test client's own pod `namespace/pod` of service account `sa`
    /// (the CA accepts only tokens bound to a live pod): created once,
    /// with its namespace and account, and waited for.
    async fn ensure_client(&mut self, namespace: &str, sa: &str, pod: &str) -> Result<(), Error> {
        let key = (namespace.to_owned(), pod.to_owned());
        if self.clients.contains(&key) {
            return Ok(());
        }
        let objects = client_objects(namespace, sa, pod).to_string();
        kubectl::output(&kubectl::apply_stdin(), Some(&objects)).await?;
        kubectl::output(&kubectl::wait_ready(namespace, pod), None).await?;
        // meshid-ca finds a token's pod in its watch cache: give it a beat.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        self.clients.insert(key);
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

/// The objects of a test client's pod, for `kubectl apply -f -`: its
/// namespace, service account, and an idle pod (the echo app of the e2e
/// image on its loopback) labelled [`kubectl::CLIENT_LABEL`].
fn client_objects(namespace: &str, sa: &str, pod: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": {"name": sa, "namespace": namespace},
                "automountServiceAccountToken": false
            },
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": pod,
                    "namespace": namespace,
                    "labels": {kubectl::CLIENT_LABEL: "true"}
                },
                "spec": {
                    "serviceAccountName": sa,
                    "automountServiceAccountToken": false,
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{
                        "name": "idle",
                        "image": CLIENT_IMAGE,
                        "imagePullPolicy": "IfNotPresent",
                        "command": ["/usr/local/bin/meshid-echo", "--listen", "127.0.0.1:8080"],
                        "securityContext": {
                            "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true,
                            "runAsNonRoot": true,
                            "runAsUser": 1337,
                            "capabilities": {"drop": ["ALL"]}
                        }
                    }]
                }
            }
        ]
    })
}

/// The `cacerts` Secret holding `current` (its `data`, base64) with `files`
/// replaced, as JSON for `kubectl apply -f -`.
fn cacerts_secret(
    current: &serde_json::Map<String, serde_json::Value>,
    files: &[(&str, String)],
) -> serde_json::Value {
    use base64::Engine as _;
    let mut data = current.clone();
    for (name, contents) in files {
        data.insert(
            (*name).to_owned(),
            base64::engine::general_purpose::STANDARD
                .encode(contents)
                .into(),
        );
    }
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {"name": "cacerts", "namespace": SYSTEM_NAMESPACE},
        "data": data
    })
}

/// `(name, node)` of the live pods in [`kubectl::POD_LINES`] output: a line
/// with a third field (a `deletionTimestamp`) is a terminating pod, skipped.
pub fn parse_pods_and_nodes(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| match l.split_whitespace().collect::<Vec<_>>()[..] {
            [name, node] => Some((name.to_owned(), node.to_owned())),
            _ => None,
        })
        .collect()
}

/// The gateway of the `kind` docker network: the host's address as the
/// nodes' pods reach it.
async fn kind_gateway() -> Result<IpAddr, Error> {
    let action = "docker network inspect kind";
    let out = kubectl::command("docker")
        .args([
            "network",
            "inspect",
            "kind",
            "--format",
            "{{range .IPAM.Config}}{{.Gateway}} {{end}}",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| Error::Setup(format!("{action}: cannot run docker: {e}")))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(Error::Setup(format!(
            "{action} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    text.split_whitespace()
        .filter_map(|s| s.parse::<IpAddr>().ok())
        .find(IpAddr::is_ipv4)
        .ok_or_else(|| Error::Setup(format!("the kind network has no IPv4 gateway ({text:?})")))
}

/// Gives every sample pod's agent and every ztunnel the spec's certificate
/// TTL (their `SECRET_TTL`; the manifests leave the 24 h default), as the
/// process backend passes it on their command lines. The pods restart with
/// it ([`point_telemetry_at`] waits for the rollouts).
async fn set_ttl(ttl: Duration) -> Result<(), Error> {
    let env = serde_json::json!([{"name": "SECRET_TTL", "value": format!("{}s", ttl.as_secs())}]);
    let agent = serde_json::json!({"spec": {"template": {"spec": {
        "initContainers": [{"name": "meshid-agent", "env": env}]
    }}}});
    for d in DEMO_DEPLOYMENTS {
        kubectl::output(
            &kubectl::patch(
                DEMO_NAMESPACE,
                &format!("deployment/{d}"),
                &agent.to_string(),
            ),
            None,
        )
        .await?;
    }
    let ztunnel = serde_json::json!({"spec": {"template": {"spec": {
        "containers": [{"name": "ztunnel", "env": env}]
    }}}});
    kubectl::output(
        &kubectl::patch(SYSTEM_NAMESPACE, "daemonset/ztunnel", &ztunnel.to_string()),
        None,
    )
    .await?;
    Ok(())
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
        kubectl::output(&kubectl::apply_stdin(), Some(&yaml)).await?;
    }
    for (ns, kind) in [
        (SYSTEM_NAMESPACE, "deployment"),
        (SYSTEM_NAMESPACE, "daemonset"),
        (DEMO_NAMESPACE, "deployment"),
    ] {
        kubectl::output(&kubectl::rollout_restart(ns, kind), None).await?;
    }
    for (ns, what) in [
        (SYSTEM_NAMESPACE, "deployment/meshid-ca".to_owned()),
        (SYSTEM_NAMESPACE, "daemonset/ztunnel".to_owned()),
    ]
    .into_iter()
    .chain(
        DEMO_DEPLOYMENTS
            .iter()
            .map(|d| (DEMO_NAMESPACE, format!("deployment/{d}"))),
    ) {
        kubectl::output(&kubectl::rollout_status(ns, &what), None).await?;
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

    /// A token from the API server (`kubectl create token`, audience
    /// istio-ca), bound to a live pod, since meshid-ca accepts no other:
    /// - a sample pod or ambient workload of the manifests: for the
    ///   namespace and account its manifest gives it, bound to its running
    ///   pod. The process backend's namespace `default` is taken to mean
    ///   the manifests' (`meshid-demo`, `meshid-ambient`); another namespace,
    ///   or another account, is an error (that pod has no such token);
    /// - any other pod (a test client's own): the pod is created first in
    ///   `namespace` with account `service_account` (the process backend
    ///   registers it), then the token is bound to it.
    async fn token_for(
        &mut self,
        namespace: &str,
        service_account: &str,
        pod: &str,
    ) -> Result<String, Error> {
        let argv = match self.placed.get(pod) {
            Some(w) => {
                if namespace != w.namespace && namespace != "default" {
                    return Err(Error::Setup(format!(
                        "token_for {namespace}/{pod}: {pod} runs in namespace {} in the cluster",
                        w.namespace
                    )));
                }
                if service_account != w.service_account {
                    return Err(Error::Setup(format!(
                        "token_for {namespace}/{pod} as {service_account}: {pod} runs as \
                         service account {}/{}",
                        w.namespace, w.service_account
                    )));
                }
                kubectl::create_token(w.namespace, service_account, Some(&w.pod))
            }
            None => {
                self.ensure_client(namespace, service_account, pod).await?;
                kubectl::create_token(namespace, service_account, Some(pod))
            }
        };
        let token = kubectl::output(&argv, None).await?;
        Ok(token.trim().to_owned())
    }

    async fn admin_get(&self, component: &str, path: &str) -> Result<Response, Error> {
        http::get(self.admin_addr(component)?, path, Duration::from_secs(5)).await
    }

    async fn stop(&mut self, component: &str) -> Result<(), Error> {
        if component != "ca" {
            return Err(self.unsupported_because(
                "stop",
                component,
                "Kubernetes stops no single container of a running pod; only the CA (a \
                 Deployment of its own) is scaled to 0 and back",
            ));
        }
        kubectl::output(&kubectl::scale(SYSTEM_NAMESPACE, "meshid-ca", 0), None).await?;
        Ok(())
    }

    async fn start(&mut self, component: &str) -> Result<(), Error> {
        if component != "ca" {
            return Err(self.unsupported_because(
                "start",
                component,
                "Kubernetes starts no single container of a running pod; only the CA (a \
                 Deployment of its own) is scaled to 0 and back",
            ));
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
        let mut old = old;
        let _ = old.child.kill().await;
        drop(old);
        let fwd = Forward::open(SYSTEM_NAMESPACE, "svc/meshid-ca", ports).await?;
        self.forwards.insert("ca".into(), fwd);
        Ok(())
    }

    async fn pause(&mut self, component: &str) -> Result<(), Error> {
        Err(self.unsupported_because(
            "pause",
            component,
            "the Kubernetes API cannot freeze a container (no SIGSTOP through kubectl)",
        ))
    }

    async fn resume(&mut self, component: &str) -> Result<(), Error> {
        Err(self.unsupported_because(
            "resume",
            component,
            "the Kubernetes API cannot freeze a container (no SIGSTOP through kubectl)",
        ))
    }

    async fn set_pod_token(&mut self, pod: &str, _token: &str) -> Result<(), Error> {
        Err(self.unsupported_because(
            "set_pod_token",
            pod,
            "the kubelet owns the pod's projected token file; the harness cannot write it",
        ))
    }

    fn pod_uds_dir(&self, pod: &str) -> Result<std::path::PathBuf, Error> {
        Err(self.unsupported_because(
            "the agent's Unix sockets of",
            pod,
            "they live in the pod's memory volume; a port-forward carries TCP only",
        ))
    }

    fn expired_token_for(
        &self,
        namespace: &str,
        _service_account: &str,
        pod: &str,
        _ago: Duration,
    ) -> Result<String, Error> {
        Err(self.unsupported_because(
            "expired_token_for",
            &format!("{namespace}/{pod}"),
            "the API server issues no token that has already expired (a TokenRequest \
             lives 10 minutes at least)",
        ))
    }

    async fn register_pods(
        &mut self,
        namespace: &str,
        pods: &[(String, String)],
    ) -> Result<Vec<String>, Error> {
        Err(self.unsupported_because(
            "register_pods",
            namespace,
            &format!(
                "a fleet of {} workloads would be as many pods in the cluster; not done",
                pods.len()
            ),
        ))
    }

    /// Deletes the workload's Deployment: its pod is deleted (the API sets
    /// its `deletionTimestamp`), so meshid-ca, which counts a terminating
    /// pod as gone, refuses its token at once, as the process backend's
    /// registry removal does. The pod's containers keep serving what they
    /// hold while it terminates: the `legacy` pod's manifest holds its app
    /// container in a `preStop` sleep for that (kind/overlays/sidecar-app).
    async fn delete_workload(&mut self, pod: &str) -> Result<(), Error> {
        let w = self
            .placed
            .get(pod)
            .ok_or_else(|| Error::Setup(format!("no workload named {pod:?}")))?;
        kubectl::output(
            &kubectl::delete_deployment(w.namespace, &w.deployment),
            None,
        )
        .await?;
        Ok(())
    }

    /// Writes `files` into the `cacerts` Secret (meshid-ca watches it),
    /// keeping its other keys, through standard input only; then waits up
    /// to 30 s for a new root to reach `istio-ca-root-cert`.
    async fn update_ca_files(&mut self, files: &[(&str, String)]) -> Result<(), Error> {
        let current =
            kubectl::output(&kubectl::get_secret_json(SYSTEM_NAMESPACE, "cacerts"), None).await?;
        let data = if current.trim().is_empty() {
            serde_json::Map::new()
        } else {
            let v: serde_json::Value = serde_json::from_str(&current).map_err(|e| {
                Error::Setup(format!(
                    "the cacerts Secret kubectl printed is not JSON: {e}"
                ))
            })?;
            v.get("data")
                .and_then(|d| d.as_object())
                .cloned()
                .unwrap_or_default()
        };
        let before = self.state.root_pem().unwrap_or_default();
        let secret = cacerts_secret(&data, files).to_string();
        kubectl::output(&kubectl::apply_stdin(), Some(&secret)).await?;
        if files.iter().any(|(name, _)| *name == "root-cert.pem") {
            for _ in 0..30 {
                if self.refresh_root().await? != before {
                    break;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        Ok(())
    }

    /// meshid-ca publishes `istio-ca-root-cert` itself and the kubelet
    /// refreshes the pods' copies; the harness reads the ConfigMap again.
    async fn publish_ca_roots(&self) -> Result<(), Error> {
        self.refresh_root().await.map(|_| ())
    }

    /// PUTs the policy on the shim's admin `/policy` (through the pod's
    /// port-forward): the shim switches at once, as it does when the process
    /// backend rewrites its policy file. Held until the pod restarts (its
    /// manifest's `--mode` then applies again). The Envoy pod cannot.
    async fn set_mode(&mut self, pod: &str, mode: Mode) -> Result<(), Error> {
        let p = self
            .state
            .pods
            .iter()
            .find(|p| p.name == pod)
            .ok_or_else(|| Error::Setup(format!("no pod named {pod:?}")))?;
        if p.proxy == Proxy::Envoy {
            return Err(self.unsupported_because(
                "set_mode",
                pod,
                "its proxy is a real Envoy whose inbound mode is fixed in its bootstrap ConfigMap",
            ));
        }
        let component = p.proxy_component.clone();
        let addr = self.admin_addr(&component)?;
        let body = crate::cluster::policy_yaml(mode);
        let r = http::request(addr, "PUT", "/policy", &body, Duration::from_secs(5)).await?;
        if r.status != 200 || !r.body.contains(mode.as_str()) {
            return Err(Error::Component {
                name: component,
                message: format!(
                    "PUT /policy {:?} answered {}: {}",
                    body,
                    r.status,
                    r.body.trim()
                ),
            });
        }
        Ok(())
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
                self.placed
                    .get(&p.name)
                    .map(|w| w.pod.as_str())
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

    /// Ends the port-forwards and deletes the test clients' pods; the
    /// cluster and the manifests' workloads stay (`cargo xtask kind down`).
    async fn teardown(&mut self) {
        for (_, mut f) in std::mem::take(&mut self.forwards) {
            let _ = f.child.kill().await;
        }
        let namespaces: BTreeSet<String> = std::mem::take(&mut self.clients)
            .into_iter()
            .map(|(ns, _)| ns)
            .collect();
        for ns in namespaces {
            if let Err(e) = kubectl::output(&kubectl::delete_clients(&ns), None).await {
                eprintln!("e2e: deleting the test clients' pods in {ns}: {e}");
            }
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
        // A terminating pod (its deletionTimestamp third) is not live.
        assert_eq!(
            parse_pods_and_nodes(
                "legacy-old meshid-worker 2026-12-02T09:00:00Z\nlegacy-new meshid-worker2 \n"
            ),
            [("legacy-new".to_owned(), "meshid-worker2".to_owned())]
        );
    }
}
