//! The pod directory of cluster mode: every pod of the cluster followed by a
//! [`Reflector`] (one list, then a watch), so a CreateCertificate costs no
//! API call: [`PodCache`] answers the authenticators' and the node
//! authorizer's questions from memory.
//!
//! Before the first list has come back the cache knows nothing, and says so:
//! every lookup fails with [`Error::KubeUnavailable`] (gRPC `UNAVAILABLE`,
//! "the pod cache has not listed pods yet"), rather than answering "no such
//! pod" and refusing callers that are alive. A later list or watch failure
//! keeps the last known pods. A pod counts while it is neither terminating
//! (`deletionTimestamp`) nor finished (`Succeeded`/`Failed`), as istiod's
//! node authorizer counts it.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::directory::{PodDirectory, PodInfo};
use crate::error::{Error, Result};
use meshid_common::kube::{Change, Reflector};

#[derive(Debug, Default)]
struct State {
    synced: bool,
    /// Live pods by `(namespace, name)`.
    pods: HashMap<(String, String), PodInfo>,
}

/// Live pods of the cluster, kept current by a list + watch.
#[derive(Debug, Clone)]
pub struct PodCache {
    state: Arc<RwLock<State>>,
    synced: watch::Receiver<bool>,
}

fn live(pod: &Pod) -> Option<PodInfo> {
    let meta = &pod.metadata;
    if meta.deletion_timestamp.is_some() {
        return None;
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return None;
    }
    let spec = pod.spec.as_ref();
    Some(PodInfo {
        namespace: meta.namespace.clone()?,
        name: meta.name.clone()?,
        service_account: spec
            .and_then(|s| s.service_account_name.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into()),
        node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        uid: meta.uid.clone().unwrap_or_default(),
    })
}

fn key(pod: &Pod) -> Option<(String, String)> {
    Some((pod.metadata.namespace.clone()?, pod.metadata.name.clone()?))
}

impl PodCache {
    /// Starts following every pod of the cluster until `cancel`; returns at
    /// once (see the module docs for lookups before the first list).
    pub fn spawn(client: kube::Client, cancel: CancellationToken) -> Self {
        let state = Arc::new(RwLock::new(State::default()));
        let (tx, synced) = watch::channel(false);
        let reflector = Reflector::new(Api::<Pod>::all(client), "pods");
        let shared = state.clone();
        let run = reflector.run(
            move |change| {
                let mut s = shared.write().unwrap_or_else(|e| e.into_inner());
                match change {
                    Change::Listed(pods) => {
                        s.pods = pods
                            .iter()
                            .filter_map(|p| Some((key(p)?, live(p)?)))
                            .collect();
                        if !s.synced {
                            s.synced = true;
                            tracing::info!(pods = s.pods.len(), "pod cache listed");
                            tx.send_replace(true);
                        }
                    }
                    Change::Applied(pod) => {
                        if let Some(k) = key(&pod) {
                            match live(&pod) {
                                Some(info) => s.pods.insert(k, info),
                                None => s.pods.remove(&k),
                            };
                        }
                    }
                    Change::Deleted(pod) => {
                        if let Some(k) = key(&pod) {
                            s.pods.remove(&k);
                        }
                    }
                }
            },
            cancel,
        );
        tokio::spawn(run.instrument(tracing::info_span!("ca.pod_cache")));
        PodCache { state, synced }
    }

    /// Whether the first list has come back.
    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Waits up to `timeout` for the first list; true once it is in.
    pub async fn wait_synced(&self, timeout: Duration) -> bool {
        let mut rx = self.synced.clone();
        tokio::time::timeout(timeout, rx.wait_for(|s| *s))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    fn read<T>(&self, f: impl FnOnce(&State) -> T) -> Result<T> {
        let s = self.state.read().unwrap_or_else(|e| e.into_inner());
        if !s.synced {
            return Err(Error::KubeUnavailable(
                "the pod cache has not listed pods yet".into(),
            ));
        }
        Ok(f(&s))
    }
}

impl PodDirectory for PodCache {
    fn live_pod<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        uid: &'a str,
    ) -> BoxFuture<'a, Result<Option<PodInfo>>> {
        let found = self.read(|s| {
            s.pods
                .get(&(namespace.to_owned(), name.to_owned()))
                .filter(|p| p.uid == uid)
                .cloned()
        });
        Box::pin(std::future::ready(found))
    }

    fn service_account_on_node<'a>(
        &'a self,
        namespace: &'a str,
        service_account: &'a str,
        node: &'a str,
    ) -> BoxFuture<'a, Result<bool>> {
        let yes = self.read(|s| {
            s.pods.values().any(|p| {
                p.namespace == namespace && p.service_account == service_account && p.node == node
            })
        });
        Box::pin(std::future::ready(yes))
    }

    fn service_account_alive<'a>(
        &'a self,
        namespace: &'a str,
        service_account: &'a str,
    ) -> BoxFuture<'a, Result<bool>> {
        let yes = self.read(|s| {
            s.pods
                .values()
                .any(|p| p.namespace == namespace && p.service_account == service_account)
        });
        Box::pin(std::future::ready(yes))
    }
}
