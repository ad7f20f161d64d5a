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
//! Each watch resumes from the last resource version it saw; when the API
//! server has forgotten that version (`410 Gone`) or the watch fails, the
//! objects are listed again, with a capped backoff between failures, and the
//! last good registry stays in force meanwhile. Needs RBAC `list` and
//! `watch` on pods and namespaces.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::Api;
use kube::api::{ListParams, WatchEvent, WatchParams};
use meshid_common::registry::{Registry, Workload};
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use crate::error::{Error, Result};

/// Istio's label that puts a pod, or every pod of a namespace, in ambient mode.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// The value of [`DATAPLANE_MODE_LABEL`] the ztunnel serves, and the `mode`
/// of every workload it publishes.
pub const AMBIENT: &str = "ambient";
/// How long one watch call lasts on the server's side before it is renewed.
pub const WATCH_TIMEOUT_SECS: u32 = 290;
const INITIAL_RETRY: Duration = Duration::from_millis(500);
const MAX_RETRY: Duration = Duration::from_secs(30);
/// A watch that ends sooner than this without news counts as a failure
/// (backoff), so a server that closes watches at once is not hammered.
const MIN_WATCH_LIFE: Duration = Duration::from_secs(1);

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

/// Follows the pods of one node (and the ambient namespaces) through the API
/// server and publishes the registry they make. The watching tasks end when
/// every receiver is gone.
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

    /// Lists the pods of `node` and the ambient namespaces (an error if that
    /// fails: the ztunnel does not start blind) and starts watching them.
    /// Must be called inside a Tokio runtime.
    pub async fn spawn(client: kube::Client, node: &str) -> Result<Self> {
        let state = Arc::new(Mutex::new(State::default()));
        let pods = Follower {
            api: Api::<Pod>::all(client.clone()),
            what: "pods",
            node: node.to_owned(),
            fields: None,
            labels: None,
            state: state.clone(),
            replace: replace_pods,
            apply: apply_pod,
        };
        let namespaces = Follower {
            api: Api::<Namespace>::all(client),
            what: "namespaces",
            node: node.to_owned(),
            fields: None,
            labels: Some(format!("{DATAPLANE_MODE_LABEL}={AMBIENT}")),
            state: state.clone(),
            replace: replace_namespaces,
            apply: apply_namespace,
        };
        let pods_version = pods.list().await?;
        let namespaces_version = namespaces.list().await?;
        let first = lock(&state).registry();
        tracing::info!(
            node,
            workloads = first.workloads.len(),
            "ambient pods listed from the Kubernetes API"
        );
        let (tx, rx) = watch::channel(Arc::new(first));
        let tx = Arc::new(tx);
        tokio::spawn(pods.run(tx.clone(), pods_version));
        tokio::spawn(namespaces.run(tx, namespaces_version));
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

/// Why a watch stopped.
enum WatchEnd {
    /// The call timed out or the server closed it: resume from the last version.
    Closed {
        news: bool,
    },
    /// The resource version is too old: list again.
    Gone,
    Failed(Error),
}

/// Lists and watches one kind of object into the shared [`State`].
struct Follower<K> {
    api: Api<K>,
    what: &'static str,
    node: String,
    fields: Option<String>,
    labels: Option<String>,
    state: Arc<Mutex<State>>,
    replace: fn(&mut State, &[K]),
    apply: fn(&mut State, &K, bool),
}

impl<K> Follower<K>
where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    /// Publishes the registry if it changed; under the lock, so two
    /// followers cannot publish out of order.
    fn update(&self, tx: &watch::Sender<Arc<Registry>>, change: impl FnOnce(&mut State)) {
        let mut state = lock(&self.state);
        change(&mut state);
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
                "ambient pods of this node changed"
            );
        }
    }

    /// A fresh list of this kind's objects, and its resource version.
    async fn fetch(&self) -> Result<(String, Vec<K>)> {
        let mut params = ListParams::default();
        if let Some(f) = &self.fields {
            params = params.fields(f);
        }
        if let Some(l) = &self.labels {
            params = params.labels(l);
        }
        let list = self.api.list(&params).await.map_err(|e| {
            Error::Kube(format!(
                "listing {} for the ztunnel of node {}: {e}",
                self.what, self.node
            ))
        })?;
        Ok((
            list.metadata.resource_version.unwrap_or_default(),
            list.items,
        ))
    }

    /// The first list, before anything is published.
    async fn list(&self) -> Result<String> {
        let (version, items) = self.fetch().await?;
        (self.replace)(&mut lock(&self.state), &items);
        Ok(version)
    }

    async fn run(self, tx: Arc<watch::Sender<Arc<Registry>>>, mut version: String) {
        let mut retry = INITIAL_RETRY;
        loop {
            let started = Instant::now();
            let end = tokio::select! {
                end = self.watch(&tx, &mut version) => end,
                _ = tx.closed() => return,
            };
            let quick = started.elapsed() < MIN_WATCH_LIFE;
            match end {
                WatchEnd::Closed { news } if news || !quick => {
                    retry = INITIAL_RETRY;
                    continue;
                }
                WatchEnd::Closed { .. } => {
                    // Closed at once with nothing to say: wait, then resume.
                    if !pause(&tx, &mut retry).await {
                        return;
                    }
                    continue;
                }
                WatchEnd::Gone => {
                    tracing::debug!(what = self.what, "watch expired; listing again");
                    if quick && !pause(&tx, &mut retry).await {
                        return;
                    }
                }
                WatchEnd::Failed(e) => {
                    tracing::warn!(error = %e, retry_in = ?retry, "watch failed; keeping the last good registry");
                    if !pause(&tx, &mut retry).await {
                        return;
                    }
                }
            }
            // List again until it works; the last good registry stays meanwhile.
            loop {
                let listed = tokio::select! {
                    r = self.fetch() => r,
                    _ = tx.closed() => return,
                };
                match listed {
                    Ok((v, items)) => {
                        version = v;
                        self.update(&tx, |state| (self.replace)(state, &items));
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?retry, "cannot list; keeping the last good registry");
                        if !pause(&tx, &mut retry).await {
                            return;
                        }
                    }
                }
            }
        }
    }

    /// One watch call from `version`, applying events as they come.
    async fn watch(&self, tx: &watch::Sender<Arc<Registry>>, version: &mut String) -> WatchEnd {
        let mut params = WatchParams::default().timeout(WATCH_TIMEOUT_SECS);
        if let Some(f) = &self.fields {
            params = params.fields(f);
        }
        if let Some(l) = &self.labels {
            params = params.labels(l);
        }
        let fail = |how: String| {
            WatchEnd::Failed(Error::Kube(format!(
                "the watch of {} for the ztunnel of node {} {how}",
                self.what, self.node
            )))
        };
        let stream = match self.api.watch(&params, version).await {
            Ok(s) => s,
            Err(kube::Error::Api(status)) if status.code == 410 => return WatchEnd::Gone,
            Err(e) => return fail(format!("could not start: {e}")),
        };
        let mut stream = std::pin::pin!(stream);
        let mut news = false;
        while let Some(event) = stream.next().await {
            news = true;
            let (object, deleted) = match event {
                Ok(WatchEvent::Added(o) | WatchEvent::Modified(o)) => (o, false),
                Ok(WatchEvent::Deleted(o)) => (o, true),
                Ok(WatchEvent::Bookmark(b)) => {
                    *version = b.metadata.resource_version;
                    continue;
                }
                Ok(WatchEvent::Error(status)) if status.code == 410 => return WatchEnd::Gone,
                Ok(WatchEvent::Error(status)) => {
                    return fail(format!("failed: {} ({})", status.message, status.code));
                }
                Err(e) => return fail(format!("broke: {e}")),
            };
            if let Some(v) = &object.meta().resource_version {
                v.clone_into(version);
            }
            self.update(tx, |state| (self.apply)(state, &object, deleted));
        }
        WatchEnd::Closed { news }
    }
}

/// Sleeps `retry` and doubles it (capped); false if every receiver left meanwhile.
async fn pause(tx: &watch::Sender<Arc<Registry>>, retry: &mut Duration) -> bool {
    let keep_going = tokio::select! {
        _ = tokio::time::sleep(*retry) => true,
        _ = tx.closed() => false,
    };
    *retry = (*retry * 2).min(MAX_RETRY);
    keep_going
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::convert::Infallible;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use http_body_util::combinators::UnsyncBoxBody;
    use http_body_util::{BodyExt, Full, StreamBody};
    use hyper::body::{Bytes, Frame};
    use serde_json::{Value, json};
    use tokio::sync::mpsc;

    type Body = UnsyncBoxBody<Bytes, Infallible>;

    /// A fake API server: lists `pods` and `namespaces`, and streams each
    /// watch call the events sent on the next of that kind's `*_watches` (a
    /// watch with none left hangs).
    #[derive(Default)]
    struct Fake {
        pods: Mutex<Vec<Value>>,
        namespaces: Mutex<Vec<Value>>,
        pod_watches: Mutex<VecDeque<mpsc::UnboundedReceiver<Value>>>,
        namespace_watches: Mutex<VecDeque<mpsc::UnboundedReceiver<Value>>>,
        /// `path?query` of every request, `%3D` decoded.
        requests: Mutex<Vec<String>>,
        pod_lists: AtomicUsize,
        refuse_lists: AtomicBool,
    }

    impl Fake {
        fn answer(&self, req: &http::Request<kube::client::Body>) -> http::Response<Body> {
            let path = req.uri().path();
            let query = req.uri().query().unwrap_or("").replace("%3D", "=");
            self.requests
                .lock()
                .unwrap()
                .push(format!("{path}?{query}"));
            let (items, watches) = match path {
                "/api/v1/pods" => (&self.pods, &self.pod_watches),
                "/api/v1/namespaces" => (&self.namespaces, &self.namespace_watches),
                _ => (&self.pods, &self.pod_watches),
            };
            let known = path == "/api/v1/pods" || path == "/api/v1/namespaces";
            if !known || self.refuse_lists.load(Ordering::SeqCst) {
                let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                    "code": 403, "reason": "Forbidden", "message": "pods is forbidden"});
                return http::Response::builder()
                    .status(403)
                    .body(Full::new(Bytes::from(status.to_string())).boxed_unsync())
                    .unwrap();
            }
            if query.contains("watch=true") {
                let body = match watches.lock().unwrap().pop_front() {
                    Some(rx) => StreamBody::new(futures::stream::unfold(rx, |mut rx| async move {
                        let event = rx.recv().await?;
                        Some((Ok(Frame::data(Bytes::from(format!("{event}\n")))), rx))
                    }))
                    .boxed_unsync(),
                    None => StreamBody::new(futures::stream::pending::<
                        Result<Frame<Bytes>, Infallible>,
                    >())
                    .boxed_unsync(),
                };
                return http::Response::new(body);
            }
            let n = if path == "/api/v1/pods" {
                self.pod_lists.fetch_add(1, Ordering::SeqCst)
            } else {
                0
            };
            let list = json!({
                "apiVersion": "v1", "kind": "List",
                "metadata": {"resourceVersion": format!("{}", 100 + n)},
                "items": *items.lock().unwrap(),
            });
            http::Response::new(Full::new(Bytes::from(list.to_string())).boxed_unsync())
        }
    }

    fn client(fake: &Arc<Fake>) -> kube::Client {
        let fake = fake.clone();
        let service = tower::service_fn(move |req: http::Request<kube::client::Body>| {
            let answer = fake.answer(&req);
            async move { Ok::<_, Infallible>(answer) }
        });
        kube::Client::new(service, "default")
    }

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
            "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{name}"),
                         "resourceVersion": "7", "labels": labels},
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
               "metadata": {"name": name, "resourceVersion": "8", "labels": labels}})
    }

    fn request(fake: &Fake, what: impl Fn(&str) -> bool) -> String {
        let requests = fake.requests.lock().unwrap();
        requests
            .iter()
            .find(|r| what(r))
            .unwrap_or_else(|| panic!("no such request among {requests:?}"))
            .clone()
    }

    fn event(kind: &str, object: Value) -> Value {
        json!({"type": kind, "object": object})
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

    #[tokio::test]
    async fn follows_the_ambient_running_pods_of_every_node() {
        let fake = Arc::new(Fake::default());
        let mut default_sa = pod("db-0", "node-a", "10.0.0.6");
        default_sa["spec"]
            .as_object_mut()
            .unwrap()
            .remove("serviceAccountName");
        let mut sidecar = pod("plain-0", "node-a", "10.0.0.8");
        sidecar["metadata"]["labels"] = json!({"app": "plain"});
        let mut pending = pod("pending-0", "node-a", "10.0.0.9");
        pending["status"] = json!({"phase": "Pending"});
        *fake.pods.lock().unwrap() = vec![
            pod("web-0", "node-a", "10.0.0.5"),
            default_sa,
            pod("far-0", "node-b", "10.0.1.5"),
            sidecar,
            pending.clone(),
        ];
        let (events, rx) = mpsc::unbounded_channel();
        fake.pod_watches.lock().unwrap().push_back(rx);

        let kube = KubeRegistry::spawn(client(&fake), "node-a").await.unwrap();
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
                uid: "uid-web-0".into(),
                address: Some("10.0.0.5".into()),
                mode: Some("ambient".into()),
            }
        );
        assert_eq!(
            first.pod("default", "db-0").unwrap().service_account,
            "default"
        );
        let list_query = request(&fake, |r| r.starts_with("/api/v1/pods?"));
        assert!(!list_query.contains("fieldSelector"), "{list_query}");

        let mut rx = kube.subscribe();
        events
            .send(event("ADDED", pod("api-0", "node-a", "10.0.0.7")))
            .unwrap();
        until(&mut rx, "api-0 to be added", |r| {
            r.pod("default", "api-0").is_some()
        })
        .await;

        // Another node's pod is added under its node, a non-ambient pod goes
        // by unseen, and the pending pod shows up once it runs with an IP.
        let mut sidecar = pod("plain-1", "node-a", "10.0.0.10");
        sidecar["metadata"]["labels"] = json!({DATAPLANE_MODE_LABEL: "none"});
        events
            .send(event("ADDED", pod("far-1", "node-b", "10.0.1.6")))
            .unwrap();
        events.send(event("ADDED", sidecar)).unwrap();
        pending["status"] = json!({"phase": "Running", "podIP": "10.0.0.9"});
        events.send(event("MODIFIED", pending)).unwrap();
        until(&mut rx, "pending-0 to run", |r| {
            r.pod("default", "pending-0").is_some()
        })
        .await;
        let r = until(&mut rx, "far-1 to be known", |r| {
            r.pod("default", "far-1").is_some()
        })
        .await;
        assert_eq!(
            names(&r),
            ["api-0", "db-0", "far-0", "far-1", "pending-0", "web-0"]
        );

        events
            .send(event("DELETED", pod("web-0", "node-a", "10.0.0.5")))
            .unwrap();
        let r = until(&mut rx, "web-0 to go", |r| {
            r.pod("default", "web-0").is_none()
        })
        .await;
        assert_eq!(names(&r), ["api-0", "db-0", "far-0", "far-1", "pending-0"]);

        let watch_query = request(&fake, |r| {
            r.starts_with("/api/v1/pods?") && r.contains("watch")
        });
        assert!(!watch_query.contains("fieldSelector"), "{watch_query}");
        for want in ["watch=true", "resourceVersion=100"] {
            assert!(watch_query.contains(want), "{want} in {watch_query}");
        }
        assert_eq!(
            fake.pod_lists.load(Ordering::SeqCst),
            1,
            "one list, then only the watch"
        );
    }

    #[tokio::test]
    async fn a_namespace_label_puts_its_unlabelled_pods_in_ambient_mode() {
        let fake = Arc::new(Fake::default());
        *fake.namespaces.lock().unwrap() = vec![namespace("mesh", true)];
        *fake.pods.lock().unwrap() = vec![
            pod_in("mesh", "a-0", "node-a", "10.0.0.5", None),
            pod_in("mesh", "optout-0", "node-a", "10.0.0.6", Some("none")),
            pod_in("default", "b-0", "node-a", "10.0.0.7", None),
            pod_in("mesh", "far-0", "node-b", "10.0.1.5", None),
        ];
        let (ns_events, rx) = mpsc::unbounded_channel();
        fake.namespace_watches.lock().unwrap().push_back(rx);
        let kube = KubeRegistry::spawn(client(&fake), "node-a").await.unwrap();
        assert_eq!(names(&kube.current()), ["a-0", "far-0"]);
        let ns_query = request(&fake, |r| r.starts_with("/api/v1/namespaces?"));
        assert!(
            ns_query.contains("labelSelector=istio.io/dataplane-mode=ambient")
                || ns_query.contains("labelSelector=istio.io%2Fdataplane-mode=ambient"),
            "{ns_query}"
        );

        let mut rx = kube.subscribe();
        ns_events
            .send(event("ADDED", namespace("default", true)))
            .unwrap();
        let r = until(&mut rx, "default to join", |r| {
            r.pod("default", "b-0").is_some()
        })
        .await;
        assert_eq!(
            names(&r),
            ["b-0", "a-0", "far-0"],
            "sorted by namespace, then name"
        );
        // The label removed: a label-selected watch reports it as deleted.
        ns_events
            .send(event("DELETED", namespace("mesh", false)))
            .unwrap();
        let r = until(&mut rx, "mesh to leave", |r| r.pod("mesh", "a-0").is_none()).await;
        assert_eq!(names(&r), ["b-0"]);
    }

    #[tokio::test]
    async fn an_expired_watch_lists_again() {
        let fake = Arc::new(Fake::default());
        *fake.pods.lock().unwrap() = vec![pod("web-0", "node-a", "10.0.0.5")];
        let (events, rx) = mpsc::unbounded_channel();
        fake.pod_watches.lock().unwrap().push_back(rx);
        let kube = KubeRegistry::spawn(client(&fake), "node-a").await.unwrap();
        assert_eq!(names(&kube.current()), ["web-0"]);

        // The pod was replaced while the watch was away.
        *fake.pods.lock().unwrap() = vec![pod("web-1", "node-a", "10.0.0.6")];
        let gone = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                          "code": 410, "reason": "Expired", "message": "too old resource version"});
        events.send(event("ERROR", gone)).unwrap();
        let mut rx = kube.subscribe();
        let r = until(&mut rx, "the relist", |r| {
            r.pod("default", "web-1").is_some()
        })
        .await;
        assert_eq!(names(&r), ["web-1"]);
        assert_eq!(fake.pod_lists.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_refused_first_list_is_an_error() {
        let fake = Arc::new(Fake::default());
        fake.refuse_lists.store(true, Ordering::SeqCst);
        let err = KubeRegistry::spawn(client(&fake), "node-a")
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("node-a") && err.contains("forbidden"), "{err}");
    }
}
