//! One issuance is one trace: the SDS client's `traceparent` is continued
//! by the subscription's `sds.subscribe`, under it `agent.csr`, and sent on
//! to the CA.

use std::time::Duration;

use meshid_agent::App;
use meshid_agent::Clock;
use opentelemetry::trace::TracerProvider as _;
use tracing_subscriber::layer::SubscriberExt;

use crate::support::{AgentBuilder, FakeCaServer, fake_ca, init, request};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

#[tokio::test]
async fn the_sds_clients_trace_reaches_the_ca() {
    init();
    let recorder = meshid_common::testing::SpanRecorder::default();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_simple_exporter(recorder.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("agent-test")));
    // A current-thread test: every task of the agent runs on this thread.
    let _guard = tracing::subscriber::set_default(subscriber);

    let ca = fake_ca(Clock::System);
    let server = FakeCaServer::start(ca.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "t.jwt").unwrap();
    std::fs::write(dir.path().join("ca-root.pem"), &server.root_pem).unwrap();
    let builder = AgentBuilder {
        // Only the SDS request starts the first CSR.
        first_fetch_delay: Duration::from_secs(600),
        extra_args: vec!["--ca-address".into(), format!("https://{}", server.addr)],
        ..AgentBuilder::default()
    };
    let app = App::build(builder.config(dir.path())).await.unwrap();

    let channel = crate::support::uds_channel(app.sds_socket()).await;
    let mut client = meshid_common::proto::sds::secret_discovery_service_client::SecretDiscoveryServiceClient::with_interceptor(
        channel,
        |mut req: tonic::Request<()>| {
            req.metadata_mut().insert(
                "traceparent",
                format!("00-{TRACE_ID}-00f067aa0ba902b7-01").parse().unwrap(),
            );
            Ok(req)
        },
    );
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(request(Some("traced"), &["default"]))
        .await
        .unwrap();
    let mut stream = client
        .stream_secrets(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let resp = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(resp.resources.len(), 1);
    let calls = ca.calls();
    assert_eq!(calls.len(), 1);
    let tp = calls[0]
        .traceparent
        .clone()
        .expect("a traceparent at the CA");
    assert!(
        tp.starts_with(&format!("00-{TRACE_ID}-")),
        "the CA call continues the SDS client's trace: {tp}"
    );
    assert!(
        !tp.contains("00f067aa0ba902b7"),
        "a child span, not the client's own: {tp}"
    );
    // Nesting, by the spans that have ended (the stream's own span lasts as
    // long as the stream): client → sds.subscribe → agent.csr → the CA.
    let subscribe = recorder.named("sds.subscribe");
    let csr = recorder.named("agent.csr");
    assert_eq!(
        subscribe.parent_span_id.to_string(),
        "00f067aa0ba902b7",
        "sds.subscribe continues the client's span"
    );
    assert_eq!(
        csr.parent_span_id,
        subscribe.span_context.span_id(),
        "agent.csr is under sds.subscribe"
    );
    assert_eq!(csr.span_context.trace_id().to_string(), TRACE_ID);
    assert!(
        tp.contains(&csr.span_context.span_id().to_string()),
        "the CA's parent is agent.csr: {tp}"
    );
    drop(stream);
    drop(tx);
    app.shutdown().await;
}
