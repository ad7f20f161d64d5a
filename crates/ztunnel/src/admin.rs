//! The admin listener (localhost only): `/ready` (and Istio's
//! `/healthz/ready`), `/debug/certs` (every workload certificate with its
//! state), `/debug/workloads` (this node's workloads), `/debug/connections`
//! (recent connections with both identities) and `/metrics`.

use std::sync::Arc;

use meshid_common::serve::{AdminRouter, PROMETHEUS_TEXT};
use serde::Serialize;
use tokio::sync::watch;

use crate::certs::{CertManager, CertState};
use crate::connlog::ConnLog;
use crate::directory::Directory;
use crate::metrics::Metrics;

/// What the admin pages read.
#[derive(Debug, Clone)]
pub struct Admin {
    pub node: String,
    pub certs: CertManager,
    pub directory: watch::Receiver<Arc<Directory>>,
    pub metrics: Arc<Metrics>,
    pub connlog: Arc<ConnLog>,
}

#[derive(Serialize)]
struct WorkloadRow {
    name: String,
    identity: String,
    address: Option<String>,
    cert_state: Option<CertState>,
}

impl Admin {
    /// Ready once every identity of this node has left `initializing`.
    pub fn readiness(&self) -> Result<(), String> {
        let counts = self.certs.counts();
        match counts.get(&CertState::Initializing) {
            Some(n) if *n > 0 => Err(format!("{n} workload certificate(s) still initializing")),
            _ => Ok(()),
        }
    }

    /// `/debug/workloads`: this node's workloads and their certificates.
    fn workloads(&self) -> Vec<WorkloadRow> {
        let dir = self.directory.borrow().clone();
        let mut rows: Vec<WorkloadRow> = dir
            .local_workloads()
            .map(|w| WorkloadRow {
                name: w.name(),
                identity: w.identity.to_string(),
                address: w.workload.address.clone(),
                cert_state: self.certs.entry(&w.identity).map(|e| e.state()),
            })
            .collect();
        rows.sort_by(|a, b| a.name.cmp(&b.name));
        rows
    }

    /// The admin pages, on the common router.
    pub fn router(self: Arc<Self>) -> AdminRouter {
        let (ready, certs, workloads, conns, metrics) =
            (self.clone(), self.clone(), self.clone(), self.clone(), self);
        AdminRouter::new("meshid-ztunnel", move || ready.readiness())
            .metrics(PROMETHEUS_TEXT, move || metrics.metrics.render())
            .json("/debug/certs", move || {
                serde_json::json!({
                    "node": certs.node,
                    "certificates": certs.certs.snapshot(),
                })
            })
            .json("/debug/workloads", move || workloads.workloads())
            .json("/debug/connections", move || conns.connlog.recent())
    }
}
