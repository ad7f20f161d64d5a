//! An in-process OTLP/gRPC trace receiver: components export to it, suites
//! read the spans back to check that one issuance is one trace.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

/// One finished span, flattened from OTLP.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Span {
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub name: String,
    /// `service.name` of the exporting process.
    pub service: String,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    /// String attributes, for assertions such as `spiffe.id`.
    pub attributes: Vec<(String, String)>,
}

impl Span {
    pub fn duration(&self) -> Duration {
        Duration::from_nanos(self.end_unix_nanos.saturating_sub(self.start_unix_nanos))
    }

    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// The spans received so far.
#[derive(Clone, Debug, Default)]
pub struct SpanStore {
    spans: Arc<Mutex<Vec<Span>>>,
}

impl SpanStore {
    pub fn all(&self) -> Vec<Span> {
        self.spans.lock().expect("span store").clone()
    }

    /// Every span of one trace, in start order.
    pub fn trace(&self, trace_id: &str) -> Vec<Span> {
        let mut spans: Vec<Span> = self
            .all()
            .into_iter()
            .filter(|s| s.trace_id == trace_id)
            .collect();
        spans.sort_by_key(|s| s.start_unix_nanos);
        spans
    }

    /// Adds spans (what the receiver does; public for tests of the checks).
    pub fn push(&self, spans: impl IntoIterator<Item = Span>) {
        self.spans.lock().expect("span store").extend(spans);
    }
}

struct Receiver {
    store: SpanStore,
    /// Exports are also sent here (e.g. a Jaeger collector), best effort.
    forward: Option<tokio::sync::mpsc::Sender<ExportTraceServiceRequest>>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn string_value(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> Option<String> {
    match v.as_ref()?.value.as_ref()? {
        Value::StringValue(s) => Some(s.clone()),
        Value::IntValue(i) => Some(i.to_string()),
        Value::BoolValue(b) => Some(b.to_string()),
        Value::DoubleValue(d) => Some(d.to_string()),
        _ => None,
    }
}

/// Flattens one export request.
pub fn flatten(req: ExportTraceServiceRequest) -> Vec<Span> {
    let mut out = Vec::new();
    for rs in req.resource_spans {
        let service = rs
            .resource
            .as_ref()
            .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
            .and_then(|kv| string_value(&kv.value))
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                out.push(Span {
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: hex(&s.parent_span_id),
                    name: s.name,
                    service: service.clone(),
                    start_unix_nanos: s.start_time_unix_nano,
                    end_unix_nanos: s.end_time_unix_nano,
                    attributes: s
                        .attributes
                        .iter()
                        .filter_map(|kv| string_value(&kv.value).map(|v| (kv.key.clone(), v)))
                        .collect(),
                });
            }
        }
    }
    out
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let req = request.into_inner();
        if let Some(tx) = &self.forward {
            let _ = tx.try_send(req.clone());
        }
        self.store.push(flatten(req));
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// A running receiver; stops when dropped.
#[derive(Debug)]
pub struct OtlpReceiver {
    pub addr: SocketAddr,
    pub store: SpanStore,
    task: tokio::task::JoinHandle<()>,
}

impl OtlpReceiver {
    /// Listens on 127.0.0.1 on a free port.
    pub async fn start() -> std::io::Result<Self> {
        Self::start_forwarding(None).await
    }

    /// Like [`OtlpReceiver::start`], also forwarding every export to the
    /// OTLP/gRPC collector at `forward` (e.g. `http://127.0.0.1:4317`).
    pub async fn start_forwarding(forward: Option<String>) -> std::io::Result<Self> {
        Self::start_forwarding_on(SocketAddr::from(([127, 0, 0, 1], 0)), forward).await
    }

    /// Like [`OtlpReceiver::start_forwarding`], listening on `bind` (the docker
    /// backend binds its network's gateway so that containers can export).
    pub async fn start_forwarding_on(
        bind: SocketAddr,
        forward: Option<String>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let store = SpanStore::default();
        let forward = match forward {
            Some(endpoint) => {
                let channel = tonic::transport::Endpoint::from_shared(endpoint.clone())
                    .map_err(|e| std::io::Error::other(format!("--otlp-endpoint {endpoint}: {e}")))?
                    .connect_lazy();
                let (tx, mut rx) = tokio::sync::mpsc::channel::<ExportTraceServiceRequest>(1024);
                tokio::spawn(async move {
                    let mut client = TraceServiceClient::new(channel);
                    let mut warned = false;
                    while let Some(req) = rx.recv().await {
                        if let Err(e) = client.export(req).await
                            && !warned
                        {
                            eprintln!(
                                "e2e: forwarding spans to {endpoint} failed: {}",
                                e.message()
                            );
                            warned = true;
                        }
                    }
                });
                Some(tx)
            }
            None => None,
        };
        let svc = TraceServiceServer::new(Receiver {
            store: store.clone(),
            forward,
        });
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await;
        });
        Ok(OtlpReceiver { addr, store, task })
    }

    /// `http://<address>:<port>`, for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{Span as _, TraceContextExt, Tracer, TracerProvider};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spans_exported_by_a_component_arrive_with_their_service_and_parent() {
        let receiver = OtlpReceiver::start().await.unwrap();
        let provider =
            meshid_common::telemetry::otlp_provider("meshid-test", &receiver.endpoint()).unwrap();
        let tracer = provider.tracer("t");
        let parent = tracer.start("agent.csr");
        let cx = opentelemetry::Context::current_with_span(parent);
        let mut child = tracer.start_with_context("ca.sign", &cx);
        child.end();
        cx.span().end();
        let p = provider.clone();
        tokio::task::spawn_blocking(move || p.force_flush())
            .await
            .unwrap()
            .unwrap();
        let spans = receiver.store.all();
        assert_eq!(spans.len(), 2, "{spans:?}");
        let sign = spans.iter().find(|s| s.name == "ca.sign").unwrap();
        let csr = spans.iter().find(|s| s.name == "agent.csr").unwrap();
        assert_eq!(sign.parent_span_id, csr.span_id);
        assert_eq!(sign.trace_id, csr.trace_id);
        assert_eq!(csr.service, "meshid-test");
        assert_eq!(receiver.store.trace(&csr.trace_id).len(), 2);
        let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
    }

    /// `--otlp-endpoint`: what the harness's receiver gets also reaches a
    /// second collector (Jaeger in real use), spans and service intact.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn exports_are_forwarded_to_the_given_endpoint() {
        let jaeger = OtlpReceiver::start().await.unwrap();
        let receiver = OtlpReceiver::start_forwarding(Some(jaeger.endpoint()))
            .await
            .unwrap();
        let provider =
            meshid_common::telemetry::otlp_provider("meshid-test", &receiver.endpoint()).unwrap();
        let tracer = provider.tracer("t");
        let parent = tracer.start("ztunnel.fetch");
        let cx = opentelemetry::Context::current_with_span(parent);
        tracer.start_with_context("ca.sign", &cx).end();
        cx.span().end();
        let p = provider.clone();
        tokio::task::spawn_blocking(move || p.force_flush())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(receiver.store.all().len(), 2);
        // Forwarding is asynchronous: wait for the second collector.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while jaeger.store.all().len() < 2 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut forwarded = jaeger.store.all();
        let mut received = receiver.store.all();
        forwarded.sort_by(|a, b| a.span_id.cmp(&b.span_id));
        received.sort_by(|a, b| a.span_id.cmp(&b.span_id));
        assert_eq!(forwarded, received);
        assert!(forwarded.iter().all(|s| s.service == "meshid-test"));
        let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
    }
}
