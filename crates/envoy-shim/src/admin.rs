//! The admin API on loopback: `/ready` (also `/healthz/ready`),
//! `/debug/certs`, `/metrics`, and `/policy` (GET the YAML in force, PUT a
//! new one).

use std::convert::Infallible;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use meshid_common::cert::{CertInfo, unix_secs};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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

pub(crate) async fn serve(
    listener: TcpListener,
    admin: Arc<Admin>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let tcp = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let admin = admin.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(route(&admin, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service);
            tokio::select! {
                r = conn => if let Err(e) = r { tracing::debug!(error = %e, "admin connection"); },
                _ = shutdown.cancelled() => {}
            }
        });
    }
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body.into())))
        .expect("static response")
}

async fn route(admin: &Admin, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/ready" | "/healthz/ready") => {
            let missing = admin.sds.missing();
            if missing.is_empty() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "not ready: waiting for SDS secret(s) {}\n",
                        missing.join(", ")
                    ),
                )
            }
        }
        (&Method::GET, "/debug/certs") => Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(certs_json(admin).to_string())))
            .expect("static response"),
        (&Method::GET, "/metrics") => {
            if let Some(c) = admin.sds.credentials().borrow().as_ref() {
                admin
                    .metrics
                    .set_cert_expiry(DEFAULT_SECRET, c.svid.leaf().not_after);
            }
            Response::builder()
                .header(
                    "content-type",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )
                .body(Full::new(Bytes::from(admin.metrics.encode())))
                .expect("static response")
        }
        (&Method::GET, "/policy") => text(StatusCode::OK, admin.policy.current().to_yaml()),
        (&Method::PUT | &Method::POST, "/policy") => {
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
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /ready, /debug/certs, /metrics, /policy\n",
        ),
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
        .map(|c| {
            c.bundle
                .roots()
                .iter()
                .filter_map(|d| CertInfo::from_der(d).ok())
                .map(|i| cert_json(&i))
                .collect()
        })
        .unwrap_or_default();
    json!({
        "ready": creds.is_some(),
        "spiffe_id": creds.as_ref().map(|c| c.svid.id().to_string()),
        DEFAULT_SECRET: { "sds": status.get(DEFAULT_SECRET), "cert_chain": chain },
        ROOTCA_SECRET: { "sds": status.get(ROOTCA_SECRET), "ca_cert": roots },
    })
}
