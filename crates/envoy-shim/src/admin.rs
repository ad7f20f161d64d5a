//! The admin API on loopback: `/ready` (also `/healthz/ready`),
//! `/debug/certs`, `/metrics`, and `/policy` (GET the YAML in force, PUT a
//! new one).

use std::sync::Arc;

use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use meshid_common::cert::{CertInfo, unix_secs};
use meshid_common::serve::{AdminRouter, JSON, PROMETHEUS_TEXT, Reply, text};
use serde_json::json;

use crate::metrics::Metrics;
use crate::policy::{Policy, PolicyStore};
use crate::sds::{DEFAULT_SECRET, ROOTCA_SECRET, SdsClient};

/// Largest accepted request body (a policy file).
const MAX_BODY: usize = 64 * 1024;

#[derive(Debug)]
pub(crate) struct Admin {
    pub sds: SdsClient,
    pub policy: PolicyStore,
    pub metrics: Arc<Metrics>,
}

/// The admin pages, on the common router.
pub(crate) fn router(admin: Arc<Admin>) -> AdminRouter {
    let (ready, certs, metrics, policy) = (admin.clone(), admin.clone(), admin.clone(), admin);
    AdminRouter::new("meshid-envoy-shim", move || {
        let missing = ready.sds.missing();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "not ready: waiting for SDS secret(s) {}",
                missing.join(", ")
            ))
        }
    })
    .metrics(PROMETHEUS_TEXT, move || {
        if let Some(c) = metrics.sds.credentials().borrow().as_ref() {
            metrics
                .metrics
                .set_cert_expiry(DEFAULT_SECRET, c.svid.leaf().not_after);
        }
        metrics.metrics.encode()
    })
    // Compact, as it has always been (tests match on `"nacks":3`).
    .get("/debug/certs", JSON, move || certs_json(&certs).to_string())
    .route("/policy", move |req| {
        let admin = policy.clone();
        async move { policy_page(&admin, req).await }
    })
}

/// `/policy`: GET the YAML in force, PUT (or POST) a new one.
async fn policy_page(admin: &Admin, req: Request<Incoming>) -> Reply {
    match *req.method() {
        Method::GET => text(StatusCode::OK, admin.policy.current().to_yaml()),
        Method::PUT | Method::POST => {
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return text(StatusCode::BAD_REQUEST, format!("reading the body: {e}\n")),
            };
            let Ok(body) = std::str::from_utf8(&body) else {
                return text(StatusCode::BAD_REQUEST, "the policy must be UTF-8 YAML\n");
            };
            match Policy::from_yaml(body) {
                Ok(p) => {
                    admin.policy.set(p, "admin API");
                    text(StatusCode::OK, admin.policy.current().to_yaml())
                }
                Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
            }
        }
        _ => text(StatusCode::METHOD_NOT_ALLOWED, "GET, PUT or POST\n"),
    }
}

fn cert_json(info: &CertInfo) -> serde_json::Value {
    json!({
        "serial_number": info.serial,
        "subject": info.subject,
        "issuer": info.issuer,
        "spiffe_id": info.spiffe_id.as_ref().map(|i| i.as_str()),
        "valid_from": unix_secs(info.not_before),
        "expiration_time": unix_secs(info.not_after),
        "days_until_expiration": info.not_after.duration_since(std::time::SystemTime::now()).map(|d| d.as_secs() / 86_400).unwrap_or(0),
    })
}

/// What Envoy's `/certs` shows, for the secrets in use.
fn certs_json(admin: &Admin) -> serde_json::Value {
    let status = admin.sds.status();
    let creds = admin.sds.credentials().borrow().clone();
    let chain: Vec<_> = creds
        .as_ref()
        .map(|c| {
            c.svid
                .chain()
                .iter()
                .filter_map(|d| CertInfo::from_der(d).ok())
                .map(|i| cert_json(&i))
                .collect()
        })
        .unwrap_or_default();
    let roots: Vec<_> = creds
        .as_ref()
        .map(|c| c.bundle.infos().map(|i| cert_json(&i)).collect())
        .unwrap_or_default();
    json!({
        "ready": creds.is_some(),
        "spiffe_id": creds.as_ref().map(|c| c.svid.id().to_string()),
        DEFAULT_SECRET: { "sds": status.get(DEFAULT_SECRET), "cert_chain": chain },
        ROOTCA_SECRET: { "sds": status.get(ROOTCA_SECRET), "ca_cert": roots },
    })
}
