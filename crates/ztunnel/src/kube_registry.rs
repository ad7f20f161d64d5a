//! Workloads from the Kubernetes API (feature `kube`): in a cluster the
//! ztunnel lists and watches the ambient pods of every node (it serves its
//! own node's, and needs the others' identity and node to dial them) and the
//! namespaces labelled for ambient mode,
//! instead of following the registry file, and publishes the same
//! [`Registry`] on the same kind of [`watch`] channel as
//! [`meshid_common::registry::RegistryWatcher`], so the rest of the ztunnel
//! does not know where its workloads come from.
//!
//! A pod becomes a [`Workload`] (on the node it is scheduled to) when it is `Running`, has a
//! pod IP, and is in ambient mode: its own `istio.io/dataplane-mode` label
//! says `ambient`, or it has no such label and its namespace's says
//! `ambient` (a pod labelled anything else, e.g. `none`, opts out). Its
//! service account is `spec.serviceAccountName` (`default` when unset). A
//! pod that stops qualifying (deleted, finished, relabelled, its namespace
//! unlabelled) leaves the registry.
//!
//! Both are followed by the workspace's one list/watch engine,
//! [`meshid_common::kube::Reflector`] (the CA's cluster mode runs on it
//! too): each watch resumes from the last resource version it saw; when the
//! API server has forgotten that version (`410 Gone`) or the watch fails,
//! the objects are listed again, with a capped backoff between failures,
//! and the last good registry stays in force meanwhile. Needs RBAC `list`
//! and `watch` on pods and namespaces.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::Api;
use meshid_common::kube::{Change, Reflector};
use meshid_common::registry::{Registry, Workload};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::error::{Error, Result};

/// Istio's label that puts a pod, or every pod of a namespace, in ambient mode.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// The value of [`DATAPLANE_MODE_LABEL`] the ztunnel serves, and the `mode`
/// of every workload it publishes.
pub const AMBIENT: &str = "ambient";

fn dataplane_mode(meta: &kube::api::ObjectMeta) -> Option<&str> {
    meta.labels
        .as_ref()?
        .get(DATAPLANE_MODE_LABEL)
        .map(String::as_str)
}

/// A scheduled pod that runs with an IP, before its mode is known.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Candidate {
    workload: Workload,
    /// The pod's own `istio.io/dataplane-mode` label.
    label: Option<String>,
}

impl Candidate {
    fn of(pod: &Pod) -> Option<Self> {
        let meta = &pod.metadata;
        let spec = pod.spec.as_ref()?;
        let status = pod.status.as_ref()?;
        let node = spec.node_name.as_deref().filter(|n| !n.is_empty())?;
        if status.phase.as_deref() != Some("Running") {
            return None;
        }
        let ip = status
            .pod_ip
            .as_deref()
            .filter(|ip| ip.parse::<IpAddr>().is_ok())?;
        let nonempty = |s: &Option<String>| s.clone().filter(|s| !s.is_empty());
        Some(Candidate {
            workload: Workload {
                name: nonempty(&meta.name)?,
                namespace: nonempty(&meta.namespace)?,
                service_account: nonempty(&spec.service_account_name)
                    .unwrap_or_else(|| "default".into()),
                node: node.to_owned(),
                uid: nonempty(&meta.uid)?,
                address: Some(ip.to_owned()),
                mode: Some(AMBIENT.to_owned()),
            },
            label: dataplane_mode(meta).map(str::to_owned),
        })
    }

    fn ambient(&self, namespace_ambient: bool) -> bool {
        match self.label.as_deref() {
            Some(mode) => mode == AMBIENT,
            None => namespace_ambient,
        }
    }
}

/// The ambient workload `pod` is, if it is one; `namespace_ambient` says
/// whether the pod's namespace is labelled ambient.
pub fn workload_of(pod: &Pod, namespace_ambient: bool) -> Option<Workload> {
    Candidate::of(pod)
        .filter(|c| c.ambient(namespace_ambient))
        .map(|c| c.workload)
}

/// What the registry is made of.
#[derive(Debug, Default)]
struct State {
    /// Running pods with an IP, of every node, by `(namespace, name)`.
    pods: BTreeMap<(String, String), Candidate>,
    /// Namespaces labelled `istio.io/dataplane-mode=ambient`.
    ambient_namespaces: BTreeSet<String>,
}

impl State {
    fn registry(&self) -> Registry {
        Registry {
            workloads: self
                .pods
                .values()
                .filter(|c| c.ambient(self.ambient_namespaces.contains(&c.workload.namespace)))
                .map(|c| c.workload.clone())
                .collect(),
            nodes: Vec::new(),
        }
    }
}

fn pod_key(pod: &Pod) -> Option<(String, String)> {
    Some((pod.metadata.namespace.clone()?, pod.metadata.name.clone()?))
}

fn replace_pods(state: &mut State, pods: &[Pod]) {
    state.pods = pods
        .iter()
        .filter_map(|p| Some((pod_key(p)?, Candidate::of(p)?)))
        .collect();
}

fn apply_pod(state: &mut State, pod: &Pod, deleted: bool) {
    let Some(key) = pod_key(pod) else { return };
    match Candidate::of(pod).filter(|_| !deleted) {
        Some(c) => {
            state.pods.insert(key, c);
        }
        None => {
            state.pods.remove(&key);
        }
    }
}

fn namespace_ambient(ns: &Namespace) -> bool {
    dataplane_mode(&ns.metadata) == Some(AMBIENT)
}

fn replace_namespaces(state: &mut State, namespaces: &[Namespace]) {
    state.ambient_namespaces = namespaces
        .iter()
        .filter(|ns| namespace_ambient(ns))
        .filter_map(|ns| ns.metadata.name.clone())
        .collect();
}

fn apply_namespace(state: &mut State, ns: &Namespace, deleted: bool) {
    let Some(name) = ns.metadata.name.clone() else {
        return;
    };
    // A label-selected watch reports an object that stops matching as deleted.
    if !deleted && namespace_ambient(ns) {
        state.ambient_namespaces.insert(name);
    } else {
        state.ambient_namespaces.remove(&name);
    }
}

/// Follows the pods of every node (and the ambient namespaces) through the
/// API server and publishes the registry they make. The watching tasks end
/// when every receiver is gone.
#[derive(Debug, Clone)]
pub struct KubeRegistry {
    rx: watch::Receiver<Arc<Registry>>,
}

impl KubeRegistry {
    /// In-cluster config, else KUBECONFIG; then as [`KubeRegistry::spawn`].
    pub async fn connect(node: &str) -> Result<Self> {
        let client = kube::Client::try_default()
            .await
            .map_err(|e| Error::Kube(format!("no usable cluster config: {e}")))?;
        Self::spawn(client, node).await
    }

    /// Lists the pods and the ambient namespaces (an error if that fails:
    /// the ztunnel does not start blind) and starts watching them. Must be
    /// called inside a Tokio runtime.
    pub async fn spawn(client: kube::Client, node: &str) -> Result<Self> {
        let pods = Reflector::new(Api::<Pod>::all(client.clone()), "pods");
        let namespaces = Reflector::new(Api::<Namespace>::all(client), "ambient namespaces")
            .labels(format!("{DATAPLANE_MODE_LABEL}={AMBIENT}"));
        let blind =
            |e: meshid_common::Error| Error::Kube(format!("{e}, for the ztunnel of node {node}"));
        let first_pods = pods.list().await.map_err(blind)?;
        let first_namespaces = namespaces.list().await.map_err(blind)?;
        let state = Arc::new(Mutex::new(State::default()));
        let first = {
            let mut s = lock(&state);
            replace_pods(&mut s, &first_pods.items);
            replace_namespaces(&mut s, &first_namespaces.items);
            s.registry()
        };
        tracing::info!(
            node,
            workloads = first.workloads.len(),
            "ambient pods listed from the Kubernetes API"
        );
        let (tx, rx) = watch::channel(Arc::new(first));
        let tx = Arc::new(tx);
        let cancel = CancellationToken::new();
        tokio::spawn({
            let (tx, cancel) = (tx.clone(), cancel.clone());
            async move {
                tx.closed().await;
                cancel.cancel();
            }
        });
        let span = |what: &str| tracing::info_span!("ztunnel.registry", node, what);
        tokio::spawn(
            pods.run_from(
                first_pods.resource_version,
                publisher(&state, &tx, replace_pods, apply_pod),
                cancel.clone(),
            )
            .instrument(span("pods")),
        );
        tokio::spawn(
            namespaces
                .run_from(
                    first_namespaces.resource_version,
                    publisher(&state, &tx, replace_namespaces, apply_namespace),
                    cancel,
                )
                .instrument(span("namespaces")),
        );
        Ok(KubeRegistry { rx })
    }

    /// The current registry.
    pub fn current(&self) -> Arc<Registry> {
        self.rx.borrow().clone()
    }

    /// A receiver that sees every new version.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Registry>> {
        self.rx.clone()
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What one reflector reports to: applies each change to the shared
/// [`State`] and publishes the registry if it changed, under the lock, so
/// two reflectors cannot publish out of order.
fn publisher<K>(
    state: &Arc<Mutex<State>>,
    tx: &Arc<watch::Sender<Arc<Registry>>>,
    replace: fn(&mut State, &[K]),
    apply: fn(&mut State, &K, bool),
) -> impl FnMut(Change<K>) + Send + 'static
where
    K: Send + 'static,
{
    let (state, tx) = (state.clone(), tx.clone());
    move |change| {
        let mut state = lock(&state);
        match change {
            Change::Listed(items) => replace(&mut state, &items),
            Change::Applied(o) => apply(&mut state, &o, false),
            Change::Deleted(o) => apply(&mut state, &o, true),
        }
        let registry = state.registry();
        let changed = tx.send_if_modified(|current| {
            if **current == registry {
                return false;
            }
            *current = Arc::new(registry);
            true
        });
        if changed {
            tracing::debug!(
                workloads = tx.borrow().workloads.len(),
                "ambient pods changed"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    //! Against the shared fake API server (`meshid_common::testing::kube`:
    //! real HTTP, the API's JSON, 410 on compaction, dropped watches).
    use super::*;
    use std::time::Duration;

    use meshid_common::kube::client_for_url;
    use meshid_common::testing::kube::{FakeApiServer, status};
    use serde_json::{Value, json};

    /// A running, ambient pod of `default` on `node` at `ip`.
    fn pod(name: &str, node: &str, ip: &str) -> Value {
        pod_in("default", name, node, ip, Some(AMBIENT))
    }

    /// A running pod of `namespace`, with `label` as its dataplane mode.
    fn pod_in(namespace: &str, name: &str, node: &str, ip: &str, label: Option<&str>) -> Value {
        let mut labels = json!({"app": name});
        if let Some(mode) = label {
            labels[DATAPLANE_MODE_LABEL] = json!(mode);
        }
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"serviceAccountName": "web", "nodeName": node, "containers": []},
            "status": {"phase": "Running", "podIP": ip}
        })
    }

    fn namespace(name: &str, ambient: bool) -> Value {
        let labels = if ambient {
            json!({DATAPLANE_MODE_LABEL: AMBIENT})
        } else {
            json!({})
        };
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": name, "labels": labels}})
    }

    fn uid(fake: &FakeApiServer, namespace: &str, name: &str) -> String {
        fake.get("api/v1", "pods", namespace, name).unwrap()["metadata"]["uid"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    async fn spawn(fake: &FakeApiServer) -> KubeRegistry {
        KubeRegistry::spawn(client_for_url(&fake.url()).unwrap(), "node-a")
            .await
            .unwrap()
    }

    fn pod_lists(fake: &FakeApiServer) -> usize {
        fake.count(|r| r.starts_with("GET /api/v1/pods?") && !r.contains("watch=true"))
    }

    fn pod_watches(fake: &FakeApiServer) -> usize {
        fake.count(|r| r.starts_with("GET /api/v1/pods?") && r.contains("watch=true"))
    }

    fn names(r: &Registry) -> Vec<&str> {
        r.workloads.iter().map(|w| w.name.as_str()).collect()
    }

    async fn until(
        rx: &mut watch::Receiver<Arc<Registry>>,
        what: &str,
        done: impl Fn(&Registry) -> bool,
    ) -> Arc<Registry> {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let r = rx.borrow_and_update().clone();
                if done(&r) {
                    return r;
                }
                rx.changed().await.expect("the registry task is alive");
            }
        })
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}: {:?}", names(&rx.borrow())))
    }

    async fn eventually(what: &str, done: impl Fn() -> bool) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while !done() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
    }

    #[tokio::test]
    async fn follows_the_ambient_running_pods_of_every_node() {
        let fake = FakeApiServer::start().await.unwrap();
        let mut default_sa = pod("db-0", "node-a", "10.0.0.6");
        default_sa["spec"]
            .as_object_mut()
            .unwrap()
            .remove("serviceAccountName");
        let mut sidecar = pod("plain-0", "node-a", "10.0.0.8");
        sidecar["metadata"]["labels"] = json!({"app": "plain"});
        let mut pending = pod("pending-0", "node-a", "10.0.0.9");
        pending["status"] = json!({"phase": "Pending"});
        for p in [
            pod("web-0", "node-a", "10.0.0.5"),
            default_sa,
            pod("far-0", "node-b", "10.0.1.5"),
            sidecar,
            pending.clone(),
        ] {
            fake.insert("pods", p);
        }

        let kube = spawn(&fake).await;
        let first = kube.current();
        assert_eq!(names(&first), ["db-0", "far-0", "web-0"], "initial list");
        // Another node's pod is known with its node, so this ztunnel can dial
        // it, and is not among the workloads this node serves.
        assert_eq!(first.pod("default", "far-0").unwrap().node, "node-b");
        assert_eq!(
            first
                .on_node("node-a")
                .map(|w| w.name.as_str())
                .collect::<Vec<_>>(),
            ["db-0", "web-0"]
        );
        let web = first.pod("default", "web-0").unwrap();
        assert_eq!(
            *web,
            Workload {
                name: "web-0".into(),
                namespace: "default".into(),
                service_account: "web".into(),
                node: "node-a".into(),
                uid: uid(&fake, "default", "web-0"),
                address: Some("10.0.0.5".into()),
                mode: Some("ambient".into()),
            }
        );
        assert_eq!(
            first.pod("default", "db-0").unwrap().service_account,
            "default"
        );
        let requests = fake.requests();
        let list = requests
            .iter()
            .find(|r| r.starts_with("GET /api/v1/pods?"))
            .unwrap();
        assert!(!list.contains("fieldSelector"), "{list}");

        let mut rx = kube.subscribe();
        fake.insert("pods", pod("api-0", "node-a", "10.0.0.7"));
        until(&mut rx, "api-0 to be added", |r| {
            r.pod("default", "api-0").is_some()
        })
        .await;

        // Another node's pod is added under its node, a non-ambient pod goes
        // by unseen, and the pending pod shows up once it runs with an IP
        // (an update).
        let mut sidecar = pod("plain-1", "node-a", "10.0.0.10");
        sidecar["metadata"]["labels"] = json!({DATAPLANE_MODE_LABEL: "none"});
        fake.insert("pods", pod("far-1", "node-b", "10.0.1.6"));
        fake.insert("pods", sidecar);
        pending["status"] = json!({"phase": "Running", "podIP": "10.0.0.9"});
        fake.insert("pods", pending);
        let r = until(&mut rx, "pending-0 to run", |r| {
            r.pod("default", "pending-0").is_some()
        })
        .await;
        assert_eq!(
            names(&r),
            ["api-0", "db-0", "far-0", "far-1", "pending-0", "web-0"]
        );
        // An update that moves the pod's IP.
        fake.insert("pods", pod("api-0", "node-a", "10.0.0.70"));
        until(&mut rx, "api-0's new IP", |r| {
            r.pod("default", "api-0").unwrap().address.as_deref() == Some("10.0.0.70")
        })
        .await;

        fake.delete("api/v1", "pods", "default", "web-0");
        let r = until(&mut rx, "web-0 to go", |r| {
            r.pod("default", "web-0").is_none()
        })
        .await;
        assert_eq!(names(&r), ["api-0", "db-0", "far-0", "far-1", "pending-0"]);

        let requests = fake.requests();
        let watch = requests
            .iter()
            .find(|r| r.starts_with("GET /api/v1/pods?") && r.contains("watch=true"))
            .unwrap();
        assert!(!watch.contains("fieldSelector"), "{watch}");
        // The watch starts where the list left off (5 pods inserted: version 5).
        assert!(watch.contains("resourceVersion=5"), "{watch}");
        assert_eq!(pod_lists(&fake), 1, "one list, then only the watch");
    }

    #[tokio::test]
    async fn a_namespace_label_puts_its_unlabelled_pods_in_ambient_mode() {
        let fake = FakeApiServer::start().await.unwrap();
        fake.insert("namespaces", namespace("mesh", true));
        fake.insert("namespaces", namespace("default", false));
        for p in [
            pod_in("mesh", "a-0", "node-a", "10.0.0.5", None),
            pod_in("mesh", "optout-0", "node-a", "10.0.0.6", Some("none")),
            pod_in("default", "b-0", "node-a", "10.0.0.7", None),
            pod_in("mesh", "far-0", "node-b", "10.0.1.5", None),
        ] {
            fake.insert("pods", p);
        }
        let kube = spawn(&fake).await;
        assert_eq!(names(&kube.current()), ["a-0", "far-0"]);
        let requests = fake.requests();
        let ns_list = requests
            .iter()
            .find(|r| r.starts_with("GET /api/v1/namespaces?"))
            .unwrap();
        assert!(
            ns_list.contains("labelSelector=istio.io/dataplane-mode=ambient"),
            "{ns_list}"
        );

        let mut rx = kube.subscribe();
        fake.insert("namespaces", namespace("default", true));
        let r = until(&mut rx, "default to join", |r| {
            r.pod("default", "b-0").is_some()
        })
        .await;
        assert_eq!(
            names(&r),
            ["b-0", "a-0", "far-0"],
            "sorted by namespace, then name"
        );
        fake.delete("api/v1", "namespaces", "", "mesh");
        let r = until(&mut rx, "mesh to leave", |r| r.pod("mesh", "a-0").is_none()).await;
        assert_eq!(names(&r), ["b-0"]);
    }

    /// A dropped watch is resumed from the last version (no new list).
    #[tokio::test]
    async fn a_dropped_watch_resumes_without_a_list() {
        let fake = FakeApiServer::start().await.unwrap();
        fake.insert("pods", pod("web-0", "node-a", "10.0.0.5"));
        let kube = spawn(&fake).await;
        eventually("the first watch", || pod_watches(&fake) == 1).await;
        fake.drop_watches();
        fake.insert("pods", pod("web-1", "node-a", "10.0.0.6"));
        let mut rx = kube.subscribe();
        let r = until(&mut rx, "web-1 through the resumed watch", |r| {
            r.pod("default", "web-1").is_some()
        })
        .await;
        assert_eq!(names(&r), ["web-0", "web-1"]);
        assert_eq!(pod_watches(&fake), 2);
        assert_eq!(
            pod_lists(&fake),
            1,
            "a dropped watch is resumed, not relisted"
        );
        let requests = fake.requests();
        let resumed = requests
            .iter()
            .rfind(|r| r.starts_with("GET /api/v1/pods?") && r.contains("watch=true"))
            .unwrap();
        assert!(resumed.contains("resourceVersion=1"), "{resumed}");
    }

    /// History compacted while the watch was away: the resume gets 410 Gone
    /// and a new list replaces the pods (a replacement made meanwhile).
    #[tokio::test]
    async fn an_expired_watch_lists_again() {
        let fake = FakeApiServer::start().await.unwrap();
        fake.insert("pods", pod("web-0", "node-a", "10.0.0.5"));
        let kube = spawn(&fake).await;
        assert_eq!(names(&kube.current()), ["web-0"]);
        eventually("the first watch", || pod_watches(&fake) == 1).await;

        fake.compact();
        fake.drop_watches();
        fake.delete("api/v1", "pods", "default", "web-0");
        fake.insert("pods", pod("web-1", "node-a", "10.0.0.6"));
        let mut rx = kube.subscribe();
        let r = until(&mut rx, "the relist", |r| {
            r.pod("default", "web-1").is_some() && r.pod("default", "web-0").is_none()
        })
        .await;
        assert_eq!(names(&r), ["web-1"]);
        assert_eq!(pod_lists(&fake), 2);
    }

    #[tokio::test]
    async fn a_refused_first_list_is_an_error() {
        let fake = FakeApiServer::start().await.unwrap();
        fake.react(|req| {
            (req.resource == "pods").then(|| {
                (
                    403,
                    status(
                        403,
                        "Forbidden",
                        "pods is forbidden: User \"system:serviceaccount:istio-system:ztunnel\" cannot list resource \"pods\"",
                    ),
                )
            })
        });
        let err = KubeRegistry::spawn(client_for_url(&fake.url()).unwrap(), "node-a")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("listing pods")
                && err.contains("forbidden")
                && err.contains("403")
                && err.contains("node-a"),
            "{err}"
        );
    }

    /// The watches end once nobody holds the registry.
    #[tokio::test]
    async fn the_watches_end_with_the_last_receiver() {
        let fake = FakeApiServer::start().await.unwrap();
        let kube = spawn(&fake).await;
        eventually("the first watch", || pod_watches(&fake) == 1).await;
        drop(kube);
        tokio::time::sleep(Duration::from_millis(100)).await;
        fake.drop_watches();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(pod_watches(&fake), 1, "{:?}", fake.requests());
    }
}
