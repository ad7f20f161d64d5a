//! Logs and traces for every meshid process.
//!
//! `RUST_LOG` filters (default `info`), `LOG_FORMAT=json` switches to JSON
//! lines, text lines are coloured only on a terminal (never in a pipe, a
//! file or `kubectl logs`, and never with `NO_COLOR` set), and when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set spans are exported over OTLP/gRPC
//! with `OTEL_SERVICE_NAME` (or the component's name). Trace
//! context travels as W3C `traceparent` in gRPC metadata and HTTP headers:
//! [`inject_grpc`] / [`extract_grpc`] and [`inject_http`] / [`extract_http`].

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::error::{Error, Result};

/// Where telemetry goes. Built from the environment by [`TelemetryConfig::from_env`],
/// or by hand in tests.
#[derive(Clone, Debug, Default)]
pub struct TelemetryConfig {
    pub service_name: String,
    /// `RUST_LOG` directives; `info` when empty.
    pub filter: String,
    pub json: bool,
    /// `NO_COLOR` is set (and not empty): no colour even on a terminal.
    pub no_color: bool,
    /// OTLP/gRPC collector, e.g. `http://127.0.0.1:4317`.
    pub otlp_endpoint: Option<String>,
}

impl TelemetryConfig {
    /// Reads `RUST_LOG`, `LOG_FORMAT`, `NO_COLOR`, `OTEL_EXPORTER_OTLP_ENDPOINT`
    /// and `OTEL_SERVICE_NAME` through `get` (pass `std::env::var` or a map).
    pub fn from_source(default_service: &str, get: impl Fn(&str) -> Option<String>) -> Self {
        TelemetryConfig {
            service_name: get("OTEL_SERVICE_NAME")
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| default_service.to_owned()),
            filter: get("RUST_LOG").unwrap_or_default(),
            json: get("LOG_FORMAT").is_some_and(|f| f.eq_ignore_ascii_case("json")),
            no_color: get("NO_COLOR").is_some_and(|v| !v.is_empty()),
            otlp_endpoint: get("OTEL_EXPORTER_OTLP_ENDPOINT").filter(|s| !s.is_empty()),
        }
    }

    pub fn from_env(default_service: &str) -> Self {
        Self::from_source(default_service, |k| std::env::var(k).ok())
    }
}

/// How long [`TelemetryGuard::shutdown`] waits for the last export.
pub const SHUTDOWN_FLUSH: std::time::Duration = std::time::Duration::from_secs(2);

/// Keeps the exporter alive. [`shutdown`](Self::shutdown) exports what is
/// buffered and stops it; binaries await it on their way out.
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Exports buffered spans now.
    pub fn flush(&self) {
        if let Some(p) = &self.provider {
            let _ = p.force_flush();
        }
    }

    /// Exports what is buffered and stops the exporter, waiting at most
    /// [`SHUTDOWN_FLUSH`]. The SDK's flush blocks until the export is done,
    /// and the export goes over a tonic channel driven by this runtime: the
    /// flush runs on a thread of its own so the runtime's threads stay free
    /// to send it (on a one-thread runtime, flushing in place waits on itself
    /// until the exporter times out), and a collector that does not answer
    /// delays the exit by the bound, not by the exporter's own timeout.
    pub async fn shutdown(mut self) {
        let Some(p) = self.provider.take() else {
            return;
        };
        let (done, flushed) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name("otlp-flush".into())
            .spawn(move || {
                let _ = p.force_flush();
                let _ = p.shutdown();
                let _ = done.send(());
            });
        if spawned.is_ok() && tokio::time::timeout(SHUTDOWN_FLUSH, flushed).await.is_err() {
            tracing::warn!(
                bound_ms = SHUTDOWN_FLUSH.as_millis() as u64,
                "the trace collector did not take the last spans in time; exiting without them"
            );
        }
    }
}

impl Drop for TelemetryGuard {
    /// Without [`shutdown`](Self::shutdown): flushes in place, except on a
    /// one-thread runtime, where that would wait on itself; there the spans
    /// still buffered are dropped.
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let one_thread = tokio::runtime::Handle::try_current()
                .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread);
            if !one_thread {
                let _ = p.force_flush();
                let _ = p.shutdown();
            }
        }
    }
}

/// Parses `RUST_LOG` (`info` when empty). `Targets` takes the
/// `target=level,level` directives without EnvFilter's span and field
/// matchers, and so without a regex engine in every binary (a quarter of a
/// megabyte of resident code in each sidecar).
pub fn log_filter(directives: &str) -> Result<Targets> {
    let directives = if directives.trim().is_empty() {
        "info"
    } else {
        directives
    };
    directives
        .parse()
        .map_err(|e| Error::Telemetry(format!("RUST_LOG {directives:?}: {e}")))
}

/// Installs the global subscriber and W3C propagator. Must run inside a
/// Tokio runtime when an OTLP endpoint is configured.
pub fn init(config: &TelemetryConfig) -> Result<TelemetryGuard> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let filter = log_filter(&config.filter)?;
    let fmt = if config.json {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .boxed()
    } else {
        // tracing-subscriber colours whenever its `ansi` feature is on, so
        // escape codes would reach log files and collectors.
        let color = !config.no_color && std::io::IsTerminal::is_terminal(&std::io::stdout());
        tracing_subscriber::fmt::layer()
            .with_target(false)
            .with_ansi(color)
            .boxed()
    };
    let (otel, provider) = match &config.otlp_endpoint {
        Some(endpoint) => {
            let provider = otlp_provider(&config.service_name, endpoint)?;
            let tracer = provider.tracer(config.service_name.clone());
            (
                Some(tracing_opentelemetry::layer().with_tracer(tracer)),
                Some(provider),
            )
        }
        None => (None, None),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|e| Error::Telemetry(e.to_string()))?;
    Ok(TelemetryGuard { provider })
}

/// A binary's whole run: sets up logging and tracing from `config`, runs
/// `body`, then sends the last spans (see [`TelemetryGuard::shutdown`])
/// whatever `body` returned. Errs only if telemetry cannot be set up.
pub async fn run_with<T>(
    config: &TelemetryConfig,
    body: impl std::future::Future<Output = T>,
) -> Result<T> {
    let guard = init(config)?;
    let out = body.await;
    guard.shutdown().await;
    Ok(out)
}

/// A tracer provider exporting over OTLP/gRPC (batching) with the service name.
pub fn otlp_provider(service_name: &str, endpoint: &str) -> Result<SdkTracerProvider> {
    use opentelemetry_otlp::WithExportConfig;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| Error::Telemetry(format!("OTLP exporter for {endpoint}: {e}")))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service_name.to_owned())
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}

struct MetadataExtractor<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            http::header::HeaderName::from_bytes(key.as_bytes()),
            http::header::HeaderValue::from_str(&value),
        ) {
            self.0.insert(k, v);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Writes the current span's context into gRPC request metadata.
pub fn inject_grpc(metadata: &mut tonic::metadata::MetadataMap) {
    let cx = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&cx, &mut MetadataInjector(metadata));
}

/// Reads a caller's trace context from gRPC metadata.
pub fn extract_grpc(metadata: &tonic::metadata::MetadataMap) -> opentelemetry::Context {
    TraceContextPropagator::new().extract(&MetadataExtractor(metadata))
}

/// Writes the current span's context into HTTP headers.
pub fn inject_http(headers: &mut http::HeaderMap) {
    let cx = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
}

/// Reads a caller's trace context from HTTP headers.
pub fn extract_http(headers: &http::HeaderMap) -> opentelemetry::Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// Makes `span` a child of the remote context `cx` (no-op when `cx` is empty
/// or no OpenTelemetry layer is installed).
pub fn set_remote_parent(span: &tracing::Span, cx: opentelemetry::Context) {
    use opentelemetry::trace::TraceContextExt;
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// `span`'s OpenTelemetry context, to hand work done elsewhere (another
/// task, a queue) to it as parent.
pub fn context_of(span: &tracing::Span) -> opentelemetry::Context {
    span.context()
}

/// The current span's W3C `traceparent`, if it is being traced.
pub fn current_traceparent() -> Option<String> {
    let mut map = HashMap::new();
    TraceContextPropagator::new().inject_context(&tracing::Span::current().context(), &mut map);
    map.remove("traceparent")
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };

    fn remote_cx() -> opentelemetry::Context {
        let sc = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        opentelemetry::Context::new().with_remote_span_context(sc)
    }

    #[test]
    fn grpc_metadata_round_trip() {
        let mut md = tonic::metadata::MetadataMap::new();
        TraceContextPropagator::new().inject_context(&remote_cx(), &mut MetadataInjector(&mut md));
        assert_eq!(
            md.get("traceparent").unwrap().to_str().unwrap(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        let back = extract_grpc(&md);
        assert_eq!(
            back.span().span_context().trace_id(),
            remote_cx().span().span_context().trace_id()
        );
    }

    #[test]
    fn http_headers_round_trip() {
        let mut headers = http::HeaderMap::new();
        TraceContextPropagator::new()
            .inject_context(&remote_cx(), &mut HeaderInjector(&mut headers));
        let back = extract_http(&headers);
        assert_eq!(
            back.span().span_context().span_id(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap()
        );
        assert!(back.span().span_context().is_remote());
    }

    #[test]
    fn no_header_means_no_parent() {
        let cx = extract_http(&http::HeaderMap::new());
        assert!(!cx.span().span_context().is_valid());
    }

    #[test]
    fn log_filter_takes_targets_and_a_default_and_names_bad_input() {
        use tracing::Level;
        let f = log_filter("meshid_ca=debug,h2=warn,info").expect("valid");
        assert!(f.would_enable("meshid_ca::server", &Level::DEBUG));
        assert!(!f.would_enable("h2::codec", &Level::INFO));
        assert!(f.would_enable("tonic", &Level::INFO));
        assert!(!f.would_enable("tonic", &Level::DEBUG));
        let default = log_filter("").expect("empty is info");
        assert!(default.would_enable("anything", &Level::INFO));
        let err = log_filter("meshid_ca=loud")
            .expect_err("bad level")
            .to_string();
        assert!(
            err.contains("RUST_LOG") && err.contains("meshid_ca=loud"),
            "{err}"
        );
    }

    #[test]
    fn config_from_a_map() {
        let env: HashMap<&str, &str> = [
            ("LOG_FORMAT", "JSON"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317"),
            ("RUST_LOG", "debug"),
        ]
        .into();
        let cfg = TelemetryConfig::from_source("meshid-ca", |k| env.get(k).map(|v| v.to_string()));
        assert!(cfg.json);
        assert_eq!(cfg.service_name, "meshid-ca");
        assert_eq!(cfg.otlp_endpoint.as_deref(), Some("http://127.0.0.1:4317"));
        assert_eq!(cfg.filter, "debug");
        let empty = TelemetryConfig::from_source("x", |_| None);
        assert!(!empty.json && !empty.no_color && empty.otlp_endpoint.is_none());
        // no-color.org: set and not empty.
        for (v, no_color) in [("1", true), ("", false)] {
            let cfg = TelemetryConfig::from_source("x", |k| (k == "NO_COLOR").then(|| v.into()));
            assert_eq!(cfg.no_color, no_color, "NO_COLOR={v:?}");
        }
    }
}
