//! The admin listener (localhost only): `/ready` (and Istio's
//! `/healthz/ready`), `/debug/certs` (every workload certificate with its
//! state), `/debug/workloads` (this node's workloads), `/debug/connections`
//! (recent connections with both identities) and `/metrics`.

use std::convert::Infallible;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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

    fn respond(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let reply = |status: StatusCode, ctype: &str, body: String| {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            *r.status_mut() = status;
            r.headers_mut()
                .insert(header::CONTENT_TYPE, ctype.parse().expect("static type"));
            r
        };
        if req.method() != Method::GET {
            return reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "GET only\n".into(),
            );
        }
        match req.uri().path() {
            "/ready" | "/healthz/ready" => match self.readiness() {
                Ok(()) => reply(StatusCode::OK, "text/plain", "ready\n".into()),
                Err(why) => reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("{why}\n"),
                ),
            },
            "/debug/certs" => {
                let body = serde_json::json!({
                    "node": self.node,
                    "certificates": self.certs.snapshot(),
                });
                reply(
                    StatusCode::OK,
                    "application/json",
                    serde_json::to_string_pretty(&body).unwrap_or_default(),
                )
            }
            "/debug/workloads" => {
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
                reply(
                    StatusCode::OK,
                    "application/json",
                    serde_json::to_string_pretty(&rows).unwrap_or_default(),
                )
            }
            "/debug/connections" => reply(
                StatusCode::OK,
                "application/json",
                serde_json::to_string_pretty(&self.connlog.recent()).unwrap_or_default(),
            ),
            "/metrics" | "/stats/prometheus" => reply(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                self.metrics.render(),
            ),
            _ => reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "try /ready, /debug/certs, /debug/workloads, /debug/connections or /metrics\n"
                    .into(),
            ),
        }
    }

    /// Serves until `cancel`.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        cancel: CancellationToken,
        tracker: TaskTracker,
    ) {
        loop {
            let (stream, _) = tokio::select! {
                _ = cancel.cancelled() => return,
                a = listener.accept() => match a {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "admin accept failed");
                        continue;
                    }
                },
            };
            let this = self.clone();
            tracker.spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let resp = this.respond(&req);
                    async move { Ok::<_, Infallible>(resp) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }
}
