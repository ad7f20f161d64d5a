//! The monitoring port (15014): `/ready` and `/metrics` over plain HTTP/1.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::signer::Signer;

/// What the endpoints report on.
#[derive(Debug)]
pub struct Monitor {
    pub signer: Arc<Signer>,
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
        let state = self.signer.current();
        if SystemTime::now() >= state.ca.info().not_after {
            return Err(format!(
                "the signing certificate {} has expired",
                state.ca.info().serial
            ));
        }
        Ok(())
    }

    pub fn set_serving(&self, on: bool) {
        self.serving.store(on, Ordering::Release);
    }
}

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts")
}

async fn handle(
    monitor: Arc<Monitor>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let text = "text/plain; charset=utf-8";
    Ok(match (req.method(), req.uri().path()) {
        (&Method::GET, "/ready") | (&Method::GET, "/healthz/ready") => match monitor.readiness() {
            Ok(()) => respond(StatusCode::OK, text, "ready\n".into()),
            Err(why) => respond(StatusCode::SERVICE_UNAVAILABLE, text, format!("{why}\n")),
        },
        (&Method::GET, "/metrics") => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            monitor.metrics.render(&monitor.signer),
        ),
        _ => respond(StatusCode::NOT_FOUND, text, "not found\n".into()),
    })
}

/// Serves until `cancel`.
pub async fn serve(listener: TcpListener, monitor: Arc<Monitor>, cancel: CancellationToken) {
    loop {
        let tcp = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    tracing::warn!(error = %e, "monitoring accept failed");
                    continue;
                }
            },
        };
        let monitor = monitor.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(monitor.clone(), req));
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = cancel.cancelled() => conn.as_mut().graceful_shutdown(),
            }
        });
    }
}
