//! Trace context crosses HBONE: the CONNECT carries the `traceparent` of the
//! source side's `hbone.connect` span, and the destination ztunnel sees it.

use crate::support;

use std::time::Duration;

use meshid_common::registry::Registry;
use opentelemetry::trace::TracerProvider as _;
use support::*;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[tokio::test]
async fn the_connect_carries_the_source_spans_traceparent() {
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")))
        .try_init()
        .unwrap();
    let web = echo_server("127.0.0.1").await;
    let db = echo_server("127.0.0.2").await;
    let mut registry = Registry::default();
    registry.upsert_workload(pod("web-0", "web", "node-a", web));
    registry.upsert_workload(pod("db-0", "db", "node-b", db));
    let mesh = Mesh::start(registry, Vec::new(), Duration::from_secs(3600)).await;
    let route = mesh.route_a("web-0", db).await;
    assert_eq!(echo_through(route, b"traced").await.unwrap(), b"traced");
    wait_until("an inbound record", || {
        !mesh.b.recent_connections().is_empty()
    })
    .await;
    let seen = mesh.b.recent_connections();
    let tp = seen[0]
        .traceparent
        .as_deref()
        .expect("a traceparent header");
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{tp}");
    assert_eq!(parts[0], "00");
    assert_eq!(parts[1].len(), 32);
    assert_ne!(parts[1], "0".repeat(32));
}
