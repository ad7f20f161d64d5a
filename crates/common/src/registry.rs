//! The workload registry: the file that stands in for the Kubernetes API
//! outside a cluster (DESIGN §4).
//!
//! The harness keeps it current (it writes the whole file atomically:
//! a temporary file in the same directory, then a rename); the CA reads it to
//! know which pods are alive and which service accounts run on which node;
//! each ztunnel reads it to know the workloads of its node and their
//! addresses. Deleting a workload here is what deleting a pod is in a cluster.
//!
//! ```json
//! { "workloads": [ { "name": "web-0", "namespace": "default", "service_account": "web",
//!                    "node": "node-a", "uid": "3f…", "address": "10.0.0.5:8080", "mode": "ambient" } ],
//!   "nodes": [ { "name": "node-a", "uid": "9c…" } ] }
//! ```
//!
//! [`RegistryWatcher`] polls the file's metadata and publishes each new good
//! version through a [`tokio::sync::watch`] channel; a version that does not
//! parse is logged and the last good one stays in force.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::spiffe::SpiffeId;

/// How often [`RegistryWatcher`] looks at the file.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(500);

/// One pod: who it runs as, where, and how to reach it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    /// Pod name, unique within its namespace.
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// Name of the node the pod runs on.
    pub node: String,
    /// The pod's UID; projected tokens carry it, so a token outlives its pod
    /// only until the pod leaves the registry.
    pub uid: String,
    /// `ip` or `ip:port` where the workload's application listens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// How the workload is meshed (e.g. `sidecar`, `ambient`); free-form.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

impl Workload {
    /// The IP of [`Workload::address`], with or without a port.
    pub fn ip(&self) -> Option<IpAddr> {
        let addr = self.address.as_deref()?;
        addr.parse::<IpAddr>()
            .ok()
            .or_else(|| addr.parse::<SocketAddr>().ok().map(|s| s.ip()))
    }

    /// The socket address when [`Workload::address`] carries a port.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        self.address.as_deref()?.parse().ok()
    }

    /// `spiffe://<td>/ns/<namespace>/sa/<service_account>`.
    pub fn identity(&self, trust_domain: &str) -> Result<SpiffeId> {
        SpiffeId::for_service_account(trust_domain, &self.namespace, &self.service_account)
    }

    fn problem(&self) -> Option<String> {
        let fields = [
            ("name", &self.name),
            ("namespace", &self.namespace),
            ("service_account", &self.service_account),
            ("node", &self.node),
            ("uid", &self.uid),
        ];
        if let Some((field, _)) = fields.iter().find(|(_, v)| v.is_empty()) {
            return Some(format!(
                "workload {}/{} has an empty {field}",
                self.namespace, self.name
            ));
        }
        if self.address.is_some() && self.ip().is_none() {
            return Some(format!(
                "workload {}/{} has address {:?}, expected ip or ip:port",
                self.namespace,
                self.name,
                self.address.as_deref().unwrap_or_default()
            ));
        }
        None
    }
}

/// A node of the (possibly simulated) cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    pub uid: String,
}

/// The whole registry file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registry {
    #[serde(default)]
    pub workloads: Vec<Workload>,
    #[serde(default)]
    pub nodes: Vec<Node>,
}

impl Registry {
    /// Parses and validates registry JSON; `origin` names the source in errors.
    pub fn parse(json: &str, origin: &str) -> Result<Self> {
        let bad = |reason: String| Error::Registry {
            path: origin.to_owned(),
            reason,
        };
        let registry: Registry = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
        let mut uids = HashSet::new();
        let mut names = HashSet::new();
        for w in &registry.workloads {
            if let Some(problem) = w.problem() {
                return Err(bad(problem));
            }
            if !uids.insert(w.uid.as_str()) {
                return Err(bad(format!("two workloads have uid {:?}", w.uid)));
            }
            if !names.insert((w.namespace.as_str(), w.name.as_str())) {
                return Err(bad(format!(
                    "workload {}/{} is listed twice",
                    w.namespace, w.name
                )));
            }
        }
        if let Some(n) = registry
            .nodes
            .iter()
            .find(|n| n.name.is_empty() || n.uid.is_empty())
        {
            return Err(bad(format!(
                "node {:?} has an empty name or uid ({:?})",
                n.name, n.uid
            )));
        }
        Ok(registry)
    }

    /// Reads and validates the registry file at `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let json = std::fs::read_to_string(path).map_err(|e| Error::Registry {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::parse(&json, &path.display().to_string())
    }

    /// Pretty JSON, as written by [`Registry::write_atomic`].
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("the registry always serializes")
    }

    /// Writes the registry to `path` so that readers see the old file or the
    /// new one, never a partial one: a temporary file in the same directory,
    /// flushed, then renamed over `path`.
    pub fn write_atomic(&self, path: &Path) -> Result<()> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let fail = |e: std::io::Error| Error::Registry {
            path: path.display().to_string(),
            reason: e.to_string(),
        };
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "registry.json".into());
        let tmp = dir.join(format!(
            ".{file_name}.tmp.{}.{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(self.to_json().as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            fail(e)
        })
    }

    /// The pod with this UID, if it is alive.
    pub fn pod_by_uid(&self, uid: &str) -> Option<&Workload> {
        self.workloads.iter().find(|w| w.uid == uid)
    }

    /// The pod `namespace/name`.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<&Workload> {
        self.workloads
            .iter()
            .find(|w| w.namespace == namespace && w.name == name)
    }

    /// Every workload running on `node`.
    pub fn on_node<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Workload> + 'a {
        self.workloads.iter().filter(move |w| w.node == node)
    }

    /// Whether a pod of service account `namespace/service_account` runs on `node`.
    pub fn service_account_on_node(
        &self,
        namespace: &str,
        service_account: &str,
        node: &str,
    ) -> bool {
        self.on_node(node)
            .any(|w| w.namespace == namespace && w.service_account == service_account)
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Adds `workload`, replacing the one with the same namespace and name.
    pub fn upsert_workload(&mut self, workload: Workload) {
        match self
            .workloads
            .iter_mut()
            .find(|w| w.namespace == workload.namespace && w.name == workload.name)
        {
            Some(slot) => *slot = workload,
            None => self.workloads.push(workload),
        }
    }

    /// Removes pod `namespace/name`, returning it.
    pub fn remove_workload(&mut self, namespace: &str, name: &str) -> Option<Workload> {
        let at = self
            .workloads
            .iter()
            .position(|w| w.namespace == namespace && w.name == name)?;
        Some(self.workloads.remove(at))
    }

    /// Adds `node`, replacing the one with the same name.
    pub fn upsert_node(&mut self, node: Node) {
        match self.nodes.iter_mut().find(|n| n.name == node.name) {
            Some(slot) => *slot = node,
            None => self.nodes.push(node),
        }
    }
}

/// What identifies one version of the file on disk (a rename changes the inode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp_of(meta: std::fs::Metadata) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    Stamp {
        modified: meta.modified().ok(),
        len: meta.len(),
        inode: meta.ino(),
    }
}

async fn stamp(path: &Path) -> Option<Stamp> {
    tokio::fs::metadata(path).await.ok().map(stamp_of)
}

/// Follows the registry file and publishes each new good version.
///
/// A file missing at start reads as an empty registry (the harness may write
/// it later); a file that does not parse at start is an error. Afterwards a
/// bad or missing file is logged and the last good version stays. The polling
/// task ends when the watcher and every receiver are dropped.
#[derive(Debug, Clone)]
pub struct RegistryWatcher {
    path: PathBuf,
    rx: watch::Receiver<Arc<Registry>>,
}

impl RegistryWatcher {
    /// Loads `path` and starts polling it every `interval`. Must be called
    /// inside a Tokio runtime.
    pub fn spawn(path: impl Into<PathBuf>, interval: Duration) -> Result<Self> {
        let path = path.into();
        // Stamp first: a change after this point is seen by the next poll.
        let first_stamp = std::fs::metadata(&path).ok().map(stamp_of);
        let initial = match std::fs::metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::warn!(path = %path.display(), "workload registry does not exist yet; starting empty");
                Registry::default()
            }
            _ => Registry::load(&path)?,
        };
        let (tx, rx) = watch::channel(Arc::new(initial));
        tokio::spawn(poll(path.clone(), interval, tx, first_stamp));
        Ok(RegistryWatcher { path, rx })
    }

    /// A watcher over a fixed registry (tests, tools): it never changes, so
    /// `changed()` on its receivers returns an error at once.
    pub fn fixed(registry: Registry) -> Self {
        let (_, rx) = watch::channel(Arc::new(registry));
        RegistryWatcher {
            path: PathBuf::new(),
            rx,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
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

async fn poll(
    path: PathBuf,
    interval: Duration,
    tx: watch::Sender<Arc<Registry>>,
    mut last: Option<Stamp>,
) {
    let mut missing_logged = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = tx.closed() => return,
        }
        let now = stamp(&path).await;
        if now == last {
            continue;
        }
        last = now;
        if now.is_none() {
            if !missing_logged {
                tracing::warn!(path = %path.display(), "workload registry disappeared; keeping the last good version");
                missing_logged = true;
            }
            continue;
        }
        missing_logged = false;
        match Registry::load(&path) {
            Ok(registry) => {
                if **tx.borrow() != registry {
                    tracing::debug!(
                        path = %path.display(),
                        workloads = registry.workloads.len(),
                        nodes = registry.nodes.len(),
                        "workload registry changed"
                    );
                    tx.send_replace(Arc::new(registry));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "workload registry rejected; keeping the last good version");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ns: &str, sa: &str, node: &str, uid: &str) -> Workload {
        Workload {
            name: name.into(),
            namespace: ns.into(),
            service_account: sa.into(),
            node: node.into(),
            uid: uid.into(),
            address: None,
            mode: None,
        }
    }

    fn sample() -> Registry {
        let mut r = Registry::default();
        let mut web = pod("web-0", "default", "web", "node-a", "u1");
        web.address = Some("10.0.0.5:8080".into());
        r.upsert_workload(web);
        r.upsert_workload(pod("db-0", "data", "db", "node-b", "u2"));
        r.upsert_node(Node {
            name: "node-a".into(),
            uid: "n1".into(),
        });
        r
    }

    #[test]
    fn lookups_answer_the_ca_and_ztunnel_questions() {
        let r = sample();
        assert_eq!(r.pod_by_uid("u1").unwrap().name, "web-0");
        assert!(r.pod_by_uid("nope").is_none());
        assert!(r.service_account_on_node("default", "web", "node-a"));
        assert!(!r.service_account_on_node("default", "web", "node-b"));
        assert!(!r.service_account_on_node("data", "db", "node-a"));
        let mine: Vec<_> = r.on_node("node-a").map(|w| w.name.as_str()).collect();
        assert_eq!(mine, ["web-0"]);
        let web = r.pod("default", "web-0").unwrap();
        assert_eq!(web.socket_addr(), Some("10.0.0.5:8080".parse().unwrap()));
        assert_eq!(web.ip(), Some("10.0.0.5".parse().unwrap()));
        assert_eq!(
            web.identity("cluster.local").unwrap().as_str(),
            "spiffe://cluster.local/ns/default/sa/web"
        );
        assert_eq!(r.node("node-a").unwrap().uid, "n1");
    }

    #[test]
    fn json_round_trip_and_optional_fields() {
        let r = sample();
        assert_eq!(Registry::parse(&r.to_json(), "mem").unwrap(), r);
        let minimal = r#"{"workloads":[{"name":"a","namespace":"n","service_account":"s","node":"k","uid":"1","address":"10.1.1.1"}]}"#;
        let parsed = Registry::parse(minimal, "mem").unwrap();
        assert!(parsed.nodes.is_empty());
        assert_eq!(parsed.workloads[0].ip(), Some("10.1.1.1".parse().unwrap()));
        assert_eq!(parsed.workloads[0].socket_addr(), None);
        assert!(
            !r.to_json().contains("\"mode\""),
            "absent options are omitted"
        );
    }

    #[test]
    fn invalid_registries_say_what_is_wrong() {
        let err = Registry::parse("{not json", "reg.json").unwrap_err();
        assert!(err.to_string().contains("reg.json"), "{err}");
        let mut r = sample();
        r.workloads[0].uid = "u2".into();
        let err = Registry::parse(&r.to_json(), "mem").unwrap_err();
        assert!(err.to_string().contains("uid \"u2\""), "{err}");
        let mut r = sample();
        r.workloads[0].node.clear();
        let err = Registry::parse(&r.to_json(), "mem").unwrap_err();
        assert!(err.to_string().contains("empty node"), "{err}");
        let mut r = sample();
        r.workloads[0].address = Some("not-an-ip".into());
        let err = Registry::parse(&r.to_json(), "mem").unwrap_err();
        assert!(err.to_string().contains("not-an-ip"), "{err}");
    }

    #[test]
    fn upsert_and_remove() {
        let mut r = sample();
        let mut moved = pod("web-0", "default", "web", "node-b", "u3");
        moved.mode = Some("ambient".into());
        r.upsert_workload(moved);
        assert_eq!(r.workloads.len(), 2);
        assert!(r.service_account_on_node("default", "web", "node-b"));
        assert_eq!(r.remove_workload("default", "web-0").unwrap().uid, "u3");
        assert!(r.remove_workload("default", "web-0").is_none());
    }

    #[tokio::test]
    async fn watcher_follows_atomic_writes_and_keeps_the_last_good_version() {
        let dir = std::env::temp_dir().join(format!("meshid-registry-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("registry.json");
        let _ = std::fs::remove_file(&path);

        let watcher = RegistryWatcher::spawn(&path, Duration::from_millis(20)).unwrap();
        assert!(
            watcher.current().workloads.is_empty(),
            "missing file = empty"
        );
        let mut rx = watcher.subscribe();

        let r = sample();
        r.write_atomic(&path).unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .expect("change seen")
            .unwrap();
        assert_eq!(*watcher.current(), r);

        std::fs::write(&path, "{ broken").unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(
            *watcher.current(),
            r,
            "a bad file keeps the last good version"
        );

        let mut smaller = r.clone();
        smaller.remove_workload("default", "web-0");
        smaller.write_atomic(&path).unwrap();
        tokio::time::timeout(Duration::from_secs(5), async {
            while watcher.current().pod_by_uid("u1").is_some() {
                rx.changed().await.unwrap();
            }
        })
        .await
        .expect("the deletion is seen");
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp."))
            .collect();
        assert!(leftovers.is_empty(), "no temporary files left behind");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_broken_file_at_start_is_an_error() {
        let dir = std::env::temp_dir().join(format!("meshid-registry-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("registry.json");
        std::fs::write(&path, r#"{"workloads": 5}"#).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let err = rt
            .block_on(async { RegistryWatcher::spawn(&path, DEFAULT_POLL_INTERVAL) })
            .unwrap_err();
        assert!(err.to_string().contains("registry.json"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
