//! The admin listener (127.0.0.1:15000 by default): `/ready`, `/debug/certs`
//! (what `istioctl proxy-config secret` shows: identity, serial, validity,
//! chain subjects, next rotation) and `/metrics`.

use std::sync::Arc;
use std::time::SystemTime;

use meshid_common::CertInfo;
use meshid_common::cert::unix_secs;
use meshid_common::serve::{AdminRouter, PROMETHEUS_TEXT};
use serde_json::{Value, json};

use crate::metrics::Metrics;
use crate::sds::{ROOT_RESOURCE, WORKLOAD_RESOURCE};
use meshid_common::identity::Worker;

/// What the admin handlers read.
#[derive(Clone, Debug)]
pub struct AdminState {
    pub manager: Arc<Worker>,
    pub metrics: Arc<Metrics>,
}

/// The admin pages, on the common router: readiness, metrics and
/// `/debug/certs`.
pub fn router(state: AdminState) -> AdminRouter {
    let certs = state.manager.clone();
    metrics_router(state).json("/debug/certs", move || debug_certs(&certs))
}

/// The scrape listener's pages, as pilot-agent's status port serves them
/// to Prometheus: readiness and the metrics (`/stats/prometheus`,
/// `/metrics`), nothing that describes the certificates.
pub fn metrics_router(state: AdminState) -> AdminRouter {
    let ready = state.manager.clone();
    AdminRouter::new("meshid-agent", move || {
        let status = ready.status();
        if status.ready {
            Ok(())
        } else {
            Err(format!("not ready: {}", status.reason))
        }
    })
    .metrics(PROMETHEUS_TEXT, move || {
        update_expiry(&state);
        state.metrics.encode()
    })
}

fn update_expiry(state: &AdminState) {
    let now = state.manager.clock().now();
    let left = |t: SystemTime| match t.duration_since(now) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    };
    if let Some(creds) = state.manager.current() {
        state
            .metrics
            .cert_expiry_seconds
            .get_or_create(&Metrics::resource(WORKLOAD_RESOURCE))
            .set(left(creds.svid.leaf().not_after));
        let roots_expiry = creds.bundle.earliest_expiry();
        if let Some(t) = roots_expiry {
            state
                .metrics
                .cert_expiry_seconds
                .get_or_create(&Metrics::resource(ROOT_RESOURCE))
                .set(left(t));
        }
    }
}

fn cert_json(info: &CertInfo) -> Value {
    json!({
        "serial": info.serial,
        "subject": info.subject,
        "issuer": info.issuer,
        "spiffe_id": info.spiffe_id.as_ref().map(|i| i.as_str()),
        "not_before": rfc3339(info.not_before),
        "not_after": rfc3339(info.not_after),
    })
}

/// The `/debug/certs` document.
pub fn debug_certs(manager: &Worker) -> Value {
    let status = manager.status();
    let now = manager.clock().now();
    let creds = manager.current();
    let mut resources = Vec::new();
    if let Some(c) = &creds {
        let leaf = c.svid.leaf();
        let chain: Vec<Value> = c
            .svid
            .chain()
            .iter()
            .filter_map(|d| CertInfo::from_der(d).ok())
            .map(|i| cert_json(&i))
            .collect();
        resources.push(json!({
            "resource_name": WORKLOAD_RESOURCE,
            "identity": c.svid.id().as_str(),
            "serial": leaf.serial,
            "not_before": rfc3339(leaf.not_before),
            "not_after": rfc3339(leaf.not_after),
            "expires_in_seconds": leaf.not_after.duration_since(now).map(|d| d.as_secs()).unwrap_or(0),
            "chain_subjects": chain.iter().map(|c| c["subject"].clone()).collect::<Vec<_>>(),
            "chain": chain,
        }));
        let roots: Vec<Value> = c.bundle.infos().map(|i| cert_json(&i)).collect();
        resources.push(json!({
            "resource_name": ROOT_RESOURCE,
            "roots": roots,
        }));
    }
    json!({
        "identity": manager.id().as_str(),
        "ready": status.ready,
        "reason": status.reason,
        "serial": creds.as_ref().map(|c| c.svid.leaf().serial.clone()),
        "not_before": creds.as_ref().map(|c| rfc3339(c.svid.leaf().not_before)),
        "not_after": creds.as_ref().map(|c| rfc3339(c.svid.leaf().not_after)),
        "next_rotation": status.next_refresh.map(rfc3339),
        "next_rotation_unix": status.next_refresh.map(unix_secs),
        "last_error": status.last_error,
        "consecutive_failures": status.consecutive_failures,
        "certificates_issued": status.issued,
        "resources": resources,
    })
}

/// `2026-11-23T17:14:28Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = unix_secs(t);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_795_446_868)),
            "2026-11-23T15:14:28Z"
        );
    }
}
