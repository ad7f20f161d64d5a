//! The monitoring port (15014): `/ready` and `/metrics` over plain HTTP/1.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use meshid_common::serve::{AdminRouter, PROMETHEUS_TEXT};

use crate::metrics::Metrics;
use crate::sign::CertSigner;

/// What the endpoints report on.
#[derive(Debug)]
pub struct Monitor {
    pub signer: Arc<dyn CertSigner>,
    pub metrics: Arc<Metrics>,
    /// Set once the gRPC server is accepting.
    pub serving: AtomicBool,
}

impl Monitor {
    /// `Ok` when the CA can issue; else why not.
    pub fn readiness(&self) -> Result<(), String> {
        if !self.serving.load(Ordering::Acquire) {
            return Err("the gRPC server is not serving yet".into());
        }
        let roots = self.signer.roots();
        if SystemTime::now() >= roots.signing_not_after {
            return Err(format!(
                "the signing certificate {} has expired",
                roots.signing_serial
            ));
        }
        Ok(())
    }

    pub fn set_serving(&self, on: bool) {
        self.serving.store(on, Ordering::Release);
    }
}

/// The monitoring router: `/ready` and `/metrics` (classic Prometheus text:
/// istiod's counter names have no `_total`).
pub fn router(monitor: Arc<Monitor>) -> AdminRouter {
    let ready = monitor.clone();
    AdminRouter::new("meshid-ca", move || ready.readiness()).metrics(PROMETHEUS_TEXT, move || {
        monitor.metrics.render(monitor.signer.as_ref())
    })
}
