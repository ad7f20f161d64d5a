//! The CA's spans continue the caller's W3C trace (DESIGN §6). A separate
//! test binary: it installs its own global subscriber with an OpenTelemetry
//! layer that records finished spans in memory.

mod support;

use std::sync::{Arc, Mutex};

use meshid_common::{KeyType, PrivateKey, SpiffeId};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use support::Fixture;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[derive(Clone, Debug, Default)]
struct Recorder(Arc<Mutex<Vec<SpanData>>>);

impl SpanExporter for Recorder {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        self.0.lock().unwrap().extend(batch);
        std::future::ready(Ok(()))
    }
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_spans_continue_the_callers_trace() {
    let recorder = Recorder::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(recorder.clone())
        .build();
    tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")))
        .with(
            "info"
                .parse::<tracing_subscriber::filter::Targets>()
                .expect("filter"),
        )
        .init();

    let fx = Fixture::start().await;
    let token = fx.token("default", "web-0");
    let csr = PrivateKey::generate(KeyType::EcdsaP256)
        .unwrap()
        .csr_for(&SpiffeId::for_service_account("cluster.local", "default", "web").unwrap())
        .unwrap();
    fx.call(&csr, 60, Some(&format!("Bearer {token}")), |r| {
        r.metadata_mut().insert(
            "traceparent",
            format!("00-{TRACE_ID}-{PARENT}-01").parse().unwrap(),
        );
    })
    .await
    .unwrap();
    let p = provider.clone();
    tokio::task::spawn_blocking(move || p.force_flush())
        .await
        .unwrap()
        .unwrap();

    let spans = recorder.0.lock().unwrap().clone();
    let find = |name: &str| {
        spans.iter().find(|s| s.name == name).unwrap_or_else(|| {
            panic!(
                "no span {name} in {:?}",
                spans.iter().map(|s| &s.name).collect::<Vec<_>>()
            )
        })
    };
    let root = find("ca.create_certificate");
    assert_eq!(root.span_context.trace_id().to_string(), TRACE_ID);
    assert_eq!(root.parent_span_id.to_string(), PARENT);
    for child in ["ca.authenticate", "ca.authorize", "ca.sign"] {
        let span = find(child);
        assert_eq!(
            span.span_context.trace_id().to_string(),
            TRACE_ID,
            "{child}"
        );
        assert_eq!(span.parent_span_id, root.span_context.span_id(), "{child}");
    }
}
