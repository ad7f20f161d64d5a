//! Root publication, istiod's namespace controller: the root bundle in the
//! `istio-ca-root-cert` ConfigMap (key `root-cert.pem`, label
//! `istio.io/config: "true"`) of every namespace, so pods mount the roots
//! they should trust. Only the leader writes ([`super::election`]): while it
//! leads it follows namespaces and those ConfigMaps (list + watch), creates
//! the missing ones, rewrites drifted ones, and rewrites all of them when
//! the signer's roots change; it stops the moment it stops leading.
//! Terminating namespaces are left alone (the API refuses creates there).
//! Every write is guarded (create → `409 AlreadyExists`, replace with the
//! `resourceVersion` read → `409 Conflict`); a lost race is settled by the
//! watch bringing the current object back, and a periodic resync retries
//! whatever failed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::sign::CertSigner;
use crate::signer::ROOT_CERT_FILE;
use meshid_common::kube::{Change, Reflector};

/// How often every namespace is checked again even without news.
pub const RESYNC: Duration = Duration::from_secs(60);

/// Writes the root ConfigMaps while this replica leads.
#[derive(Clone)]
pub struct Publisher {
    pub client: kube::Client,
    /// The ConfigMap's name (`istio-ca-root-cert`).
    pub configmap: String,
    pub signer: Arc<dyn CertSigner>,
    pub resync: Duration,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("configmap", &self.configmap)
            .field("resync", &self.resync)
            .finish()
    }
}

enum Msg {
    Namespaces(Change<Namespace>),
    Maps(Change<ConfigMap>),
}

/// Waits until `rx` says `want`; false if the sender is gone.
async fn until(rx: &mut watch::Receiver<bool>, want: bool) -> bool {
    loop {
        if *rx.borrow_and_update() == want {
            return true;
        }
        if rx.changed().await.is_err() {
            return false;
        }
    }
}

fn terminating(ns: &Namespace) -> bool {
    ns.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Terminating")
}

impl Publisher {
    /// Publishes during every term of leadership `leader` reports, until `cancel`.
    pub async fn run(self, mut leader: watch::Receiver<bool>, cancel: CancellationToken) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                up = until(&mut leader, true) => if !up { return },
            }
            tracing::info!(configmap = %self.configmap, "leading: publishing the root bundle to every namespace");
            let term = cancel.child_token();
            tokio::select! {
                _ = self.publish(term.clone()) => {}
                _ = until(&mut leader, false) => {}
                _ = cancel.cancelled() => {}
            }
            term.cancel();
            tracing::info!(configmap = %self.configmap, "no longer leading: root publication stopped");
        }
    }

    async fn publish(&self, term: CancellationToken) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let ns_tx = tx.clone();
        tokio::spawn(
            Reflector::new(Api::<Namespace>::all(self.client.clone()), "namespaces").run(
                move |c| {
                    let _ = ns_tx.send(Msg::Namespaces(c));
                },
                term.clone(),
            ),
        );
        tokio::spawn(
            Reflector::new(
                Api::<ConfigMap>::all(self.client.clone()),
                format!("ConfigMaps {}", self.configmap),
            )
            .fields(format!("metadata.name={}", self.configmap))
            .run(
                move |c| {
                    let _ = tx.send(Msg::Maps(c));
                },
                term.clone(),
            ),
        );
        let mut roots = self.signer.subscribe();
        let mut resync = tokio::time::interval(self.resync);
        let mut namespaces = BTreeSet::new();
        let mut maps: HashMap<String, ConfigMap> = HashMap::new();
        let mut dirty = BTreeSet::new();
        loop {
            tokio::select! {
                _ = term.cancelled() => return,
                msg = rx.recv() => match msg {
                    None => return,
                    Some(Msg::Namespaces(c)) => on_namespaces(c, &mut namespaces, &mut dirty),
                    Some(Msg::Maps(c)) => on_maps(c, &mut maps, &mut dirty),
                },
                changed = roots.changed() => {
                    if changed.is_err() { return }
                    dirty.extend(namespaces.iter().cloned());
                }
                _ = resync.tick() => dirty.extend(namespaces.iter().cloned()),
            }
            let desired = self.signer.roots().bundle_pem.clone();
            for ns in std::mem::take(&mut dirty) {
                if term.is_cancelled() {
                    return;
                }
                if namespaces.contains(&ns) {
                    self.reconcile(&ns, &desired, &mut maps).await;
                }
            }
        }
    }

    async fn reconcile(&self, ns: &str, desired: &str, maps: &mut HashMap<String, ConfigMap>) {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
        let name = &self.configmap;
        let written = match maps.get(ns) {
            Some(cm)
                if cm
                    .data
                    .as_ref()
                    .and_then(|d| d.get(ROOT_CERT_FILE))
                    .is_some_and(|v| v == desired) =>
            {
                return;
            }
            Some(cm) => {
                let mut cm = cm.clone();
                cm.data
                    .get_or_insert_with(BTreeMap::new)
                    .insert(ROOT_CERT_FILE.to_owned(), desired.to_owned());
                api.replace(name, &PostParams::default(), &cm).await
            }
            None => {
                let cm = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        namespace: Some(ns.to_owned()),
                        labels: Some(BTreeMap::from([(
                            "istio.io/config".to_owned(),
                            "true".to_owned(),
                        )])),
                        ..Default::default()
                    },
                    data: Some(BTreeMap::from([(
                        ROOT_CERT_FILE.to_owned(),
                        desired.to_owned(),
                    )])),
                    ..Default::default()
                };
                api.create(&PostParams::default(), &cm).await
            }
        };
        match written {
            Ok(cm) => {
                tracing::info!(namespace = ns, configmap = %name, "root bundle published");
                maps.insert(ns.to_owned(), cm);
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                // Someone wrote first: take the current one, fix it next round.
                tracing::debug!(namespace = ns, configmap = %name, "write raced; reading again");
                if let Ok(Some(cm)) = api.get_opt(name).await {
                    maps.insert(ns.to_owned(), cm);
                }
            }
            Err(e) => {
                tracing::warn!(namespace = ns, configmap = %name, error = %e, "root bundle not published; retrying at the next resync")
            }
        }
    }
}

fn on_namespaces(c: Change<Namespace>, set: &mut BTreeSet<String>, dirty: &mut BTreeSet<String>) {
    match c {
        Change::Listed(all) => {
            *set = all
                .iter()
                .filter(|n| !terminating(n))
                .filter_map(|n| n.metadata.name.clone())
                .collect();
            dirty.extend(set.iter().cloned());
        }
        Change::Applied(n) => {
            let Some(name) = n.metadata.name.clone() else {
                return;
            };
            if terminating(&n) {
                set.remove(&name);
            } else {
                set.insert(name.clone());
                dirty.insert(name);
            }
        }
        Change::Deleted(n) => {
            if let Some(name) = &n.metadata.name {
                set.remove(name);
            }
        }
    }
}

fn on_maps(
    c: Change<ConfigMap>,
    maps: &mut HashMap<String, ConfigMap>,
    dirty: &mut BTreeSet<String>,
) {
    let ns_of = |cm: &ConfigMap| cm.metadata.namespace.clone();
    match c {
        Change::Listed(all) => {
            dirty.extend(maps.keys().cloned());
            *maps = all
                .into_iter()
                .filter_map(|cm| Some((ns_of(&cm)?, cm)))
                .collect();
            dirty.extend(maps.keys().cloned());
        }
        Change::Applied(cm) => {
            if let Some(ns) = ns_of(&cm) {
                dirty.insert(ns.clone());
                maps.insert(ns, cm);
            }
        }
        Change::Deleted(cm) => {
            if let Some(ns) = ns_of(&cm) {
                maps.remove(&ns);
                dirty.insert(ns);
            }
        }
    }
}
