//! Where the CA learns which pods are alive and where they run: the workload
//! registry file (local mode) or the Kubernetes API (kube mode), behind one
//! trait so authentication and authorization do not care which.

use futures::future::BoxFuture;
use meshid_common::registry::RegistryWatcher;

use crate::error::Result;

/// A live pod, as the directory knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub node: String,
    pub uid: String,
}

/// Pod and node lookups.
pub trait PodDirectory: Send + Sync + std::fmt::Debug {
    /// The pod `namespace/name` if it is alive and has this UID.
    fn live_pod<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        uid: &'a str,
    ) -> BoxFuture<'a, Result<Option<PodInfo>>>;

    /// Whether a pod of `namespace/service_account` runs on `node`.
    fn service_account_on_node<'a>(
        &'a self,
        namespace: &'a str,
        service_account: &'a str,
        node: &'a str,
    ) -> BoxFuture<'a, Result<bool>>;

    /// Whether any pod of `namespace/service_account` is alive.
    fn service_account_alive<'a>(
        &'a self,
        namespace: &'a str,
        service_account: &'a str,
    ) -> BoxFuture<'a, Result<bool>>;
}

/// The workload registry file kept by the harness.
#[derive(Debug, Clone)]
pub struct RegistryDirectory {
    watcher: RegistryWatcher,
}

impl RegistryDirectory {
    pub fn new(watcher: RegistryWatcher) -> Self {
        RegistryDirectory { watcher }
    }
}

impl PodDirectory for RegistryDirectory {
    fn live_pod<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        uid: &'a str,
    ) -> BoxFuture<'a, Result<Option<PodInfo>>> {
        let registry = self.watcher.current();
        let found = registry
            .pod_by_uid(uid)
            .filter(|w| w.namespace == namespace && w.name == name)
            .map(|w| PodInfo {
                namespace: w.namespace.clone(),
                name: w.name.clone(),
                service_account: w.service_account.clone(),
                node: w.node.clone(),
                uid: w.uid.clone(),
            });
        Box::pin(std::future::ready(Ok(found)))
    }

    fn service_account_on_node<'a>(
        &'a self,
        namespace: &'a str,
        service_account: &'a str,
        node: &'a str,
    ) -> BoxFuture<'a, Result<bool>> {
        let yes = self
            .watcher
            .current()
            .service_account_on_node(namespace, service_account, node);
        Box::pin(std::future::ready(Ok(yes)))
    }

    fn service_account_alive<'a>(
        &'a self,
        namespace: &'a str,
        service_account: &'a str,
    ) -> BoxFuture<'a, Result<bool>> {
        let yes = self
            .watcher
            .current()
            .workloads
            .iter()
            .any(|w| w.namespace == namespace && w.service_account == service_account);
        Box::pin(std::future::ready(Ok(yes)))
    }
}
