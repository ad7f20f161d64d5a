//! The CA's spans continue the caller's W3C trace (DESIGN §6). A separate
//! test binary: it installs its own global subscriber with an OpenTelemetry
//! layer that records finished spans in memory.

use crate::support;

use meshid_common::testing::SpanRecorder;
use meshid_common::{KeyType, PrivateKey, SpiffeId};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use support::Fixture;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_spans_continue_the_callers_trace() {
    let recorder = SpanRecorder::default();
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

    let find = |name: &str| recorder.named(name);
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
