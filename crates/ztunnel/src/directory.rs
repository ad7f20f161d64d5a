//! The ztunnel's view of the workload registry: every workload indexed by
//! address (to find a destination's node and identity) and by name (to find
//! a local source), and the set of identities running on this node (the
//! certificates to hold). Rebuilt each time the registry file changes.
//!
//! A ztunnel serves the workloads of its node whose `mode` is `ambient` or
//! unset; a pod in any other mode (`sidecar`, `none`, …) has its own proxy
//! or none, and gets no certificate or traffic from the ztunnel.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use meshid_common::SpiffeId;
use meshid_common::registry::{Registry, Workload};

/// One workload and its SPIFFE identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadInfo {
    pub workload: Workload,
    pub identity: SpiffeId,
    /// Served by the ztunnel of its node (mode `ambient` or unset).
    pub ambient: bool,
}

impl WorkloadInfo {
    /// `namespace/name`, as logs name a pod.
    pub fn name(&self) -> String {
        format!("{}/{}", self.workload.namespace, self.workload.name)
    }
}

/// An index over one version of the registry, from one node's point of view.
#[derive(Debug, Default)]
pub struct Directory {
    node: String,
    by_addr: HashMap<SocketAddr, Arc<WorkloadInfo>>,
    by_ip: HashMap<IpAddr, Arc<WorkloadInfo>>,
    by_name: HashMap<(String, String), Arc<WorkloadInfo>>,
    /// Served local workloads by IP: the source of a captured connection.
    local_by_ip: HashMap<IpAddr, Arc<WorkloadInfo>>,
    local_identities: HashSet<SpiffeId>,
    /// How many workloads (any node, any mode) have each IP.
    per_ip: HashMap<IpAddr, usize>,
    /// Every workload (any node, any mode) by IP, port or not.
    all_by_ip: HashMap<IpAddr, Vec<Arc<WorkloadInfo>>>,
}

impl Directory {
    /// Indexes `registry` for `node`. Workloads whose identity does not
    /// make a valid SPIFFE ID are logged and left out.
    pub fn build(registry: &Registry, node: &str, trust_domain: &str) -> Self {
        let mut d = Directory {
            node: node.to_owned(),
            ..Default::default()
        };
        let mut shared_ips = HashSet::new();
        for w in &registry.workloads {
            let identity = match w.identity(trust_domain) {
                Ok(id) => id,
                Err(e) => {
                    tracing::warn!(workload = %format!("{}/{}", w.namespace, w.name), error = %e, "workload skipped");
                    continue;
                }
            };
            let ambient = w
                .mode
                .as_deref()
                .is_none_or(|m| m.eq_ignore_ascii_case("ambient"));
            let info = Arc::new(WorkloadInfo {
                workload: w.clone(),
                identity,
                ambient,
            });
            if w.node == node && ambient {
                d.local_identities.insert(info.identity.clone());
                // Two local workloads on one IP (process mode) cannot be
                // told apart by a captured connection's source: neither is.
                if let Some(ip) = w.ip()
                    && d.local_by_ip.insert(ip, info.clone()).is_some()
                {
                    shared_ips.insert(ip);
                }
            }
            if let Some(ip) = w.ip() {
                *d.per_ip.entry(ip).or_default() += 1;
                d.all_by_ip.entry(ip).or_default().push(info.clone());
            }
            if let Some(sa) = w.socket_addr() {
                d.by_addr.insert(sa, info.clone());
            } else if let Some(ip) = w.ip() {
                d.by_ip.insert(ip, info.clone());
            }
            d.by_name
                .insert((w.namespace.clone(), w.name.clone()), info);
        }
        for ip in shared_ips {
            d.local_by_ip.remove(&ip);
        }
        d
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// The workload listening at `addr`: the one registered with that exact
    /// `ip:port`, else the one registered with that IP and no port.
    pub fn lookup(&self, addr: SocketAddr) -> Option<&Arc<WorkloadInfo>> {
        self.by_addr
            .get(&addr)
            .or_else(|| self.by_ip.get(&addr.ip()))
    }

    /// The workload at `addr` if it runs on this node and this ztunnel serves it.
    pub fn local_at(&self, addr: SocketAddr) -> Option<&Arc<WorkloadInfo>> {
        self.lookup(addr)
            .filter(|w| w.workload.node == self.node && w.ambient)
    }

    /// Pod `namespace/name` if it runs on this node and this ztunnel serves it.
    pub fn local_by_name(&self, namespace: &str, name: &str) -> Option<&Arc<WorkloadInfo>> {
        self.by_name(namespace, name)
            .filter(|w| w.workload.node == self.node && w.ambient)
    }

    /// Pod `namespace/name`, wherever it runs.
    pub fn by_name(&self, namespace: &str, name: &str) -> Option<&Arc<WorkloadInfo>> {
        self.by_name.get(&(namespace.to_owned(), name.to_owned()))
    }

    /// The served local workload with IP `ip` (the source of a captured
    /// connection; in a cluster each pod has its own IP). `None` when no
    /// served workload, or more than one, has that IP.
    pub fn local_by_ip(&self, ip: IpAddr) -> Option<&Arc<WorkloadInfo>> {
        self.local_by_ip.get(&ip)
    }

    /// The one workload at `ip` that runs as `identity`, wherever it runs:
    /// the source of an inbound HBONE stream, from its `forwarded` address
    /// and the identity its certificate proved. `None` when none or several
    /// match.
    pub fn at_ip_as(&self, ip: IpAddr, identity: &SpiffeId) -> Option<&Arc<WorkloadInfo>> {
        let mut matching = self
            .all_by_ip
            .get(&ip)?
            .iter()
            .filter(|w| &w.identity == identity);
        let first = matching.next()?;
        matching.next().is_none().then_some(first)
    }

    /// Whether `ip` is the address of exactly one workload of the registry:
    /// then an HBONE server hosting it knows it by the dialled IP alone.
    pub fn alone_at_ip(&self, ip: IpAddr) -> bool {
        self.per_ip.get(&ip) == Some(&1)
    }

    /// Identities of the workloads running on this node.
    pub fn local_identities(&self) -> &HashSet<SpiffeId> {
        &self.local_identities
    }

    /// Local workloads this ztunnel serves, for the admin page.
    pub fn local_workloads(&self) -> impl Iterator<Item = &Arc<WorkloadInfo>> {
        self.by_name
            .values()
            .filter(move |w| w.workload.node == self.node && w.ambient)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, sa: &str, node: &str, addr: &str) -> Workload {
        Workload {
            name: name.into(),
            namespace: "default".into(),
            service_account: sa.into(),
            node: node.into(),
            uid: name.into(),
            address: Some(addr.into()),
            mode: Some("ambient".into()),
        }
    }

    #[test]
    fn lookups_by_address_port_first_then_ip() {
        let mut r = Registry::default();
        r.upsert_workload(pod("web-0", "web", "node-a", "127.0.0.1:9001"));
        r.upsert_workload(pod("db-0", "db", "node-b", "127.0.0.2:9002"));
        r.upsert_workload(pod("cache-0", "cache", "node-b", "10.0.0.9"));
        let mut sidecar = pod("legacy-0", "legacy", "node-a", "127.0.0.1:9003");
        sidecar.mode = Some("sidecar".into());
        r.upsert_workload(sidecar);
        let d = Directory::build(&r, "node-a", "cluster.local");
        let web = d.lookup("127.0.0.1:9001".parse().unwrap()).unwrap();
        assert_eq!(
            web.identity.as_str(),
            "spiffe://cluster.local/ns/default/sa/web"
        );
        assert!(d.lookup("127.0.0.1:9999".parse().unwrap()).is_none());
        assert_eq!(
            d.lookup("10.0.0.9:6379".parse().unwrap())
                .unwrap()
                .workload
                .name,
            "cache-0"
        );
        assert!(d.local_at("127.0.0.2:9002".parse().unwrap()).is_none());
        assert!(d.local_at("127.0.0.1:9001".parse().unwrap()).is_some());
        assert_eq!(
            d.local_identities().len(),
            1,
            "the sidecar pod is not served"
        );
        assert!(d.local_at("127.0.0.1:9003".parse().unwrap()).is_none());
        assert!(d.local_by_name("default", "legacy-0").is_none());
        assert!(d.local_by_name("default", "web-0").is_some());
        assert_eq!(
            d.local_by_ip("127.0.0.1".parse().unwrap())
                .unwrap()
                .workload
                .name,
            "web-0"
        );
        let mut shared = r.clone();
        shared.upsert_workload(pod("web-1", "web", "node-a", "127.0.0.1:9004"));
        let d2 = Directory::build(&shared, "node-a", "cluster.local");
        assert!(
            d2.local_by_ip("127.0.0.1".parse().unwrap()).is_none(),
            "ambiguous"
        );
        assert!(d.local_by_ip("127.0.0.2".parse().unwrap()).is_none());
        assert_eq!(
            d.by_name("default", "db-0").unwrap().workload.node,
            "node-b"
        );
        assert_eq!(d.local_workloads().count(), 1);
        assert!(d.alone_at_ip("127.0.0.2".parse().unwrap()));
        assert!(
            !d.alone_at_ip("127.0.0.1".parse().unwrap()),
            "web and legacy"
        );
        assert!(!d2.alone_at_ip("127.0.0.99".parse().unwrap()));
    }
}
