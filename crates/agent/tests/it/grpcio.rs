//! Break 5: gRPC C-core clients (Python `grpcio`, Envoy's `google_grpc`)
//! choose their own `:authority` for a `unix:` target. pilot-agent's and
//! SPIRE's servers accept them; so must both of the agent's sockets. The
//! client is grpcio's default channel, run from a small Python script
//! (`py/grpcio_call.py`) that sends request bytes encoded here.
//!
//! grpcio comes from PyPI into `<target>/grpcio-<version>` (`cargo xtask
//! ci`'s `pip` step); without it the test fails and says what to install.

use std::path::{Path, PathBuf};

use meshid_common::proto::discovery::{DiscoveryRequest, DiscoveryResponse};
use meshid_common::proto::envoy_core::Node;
use meshid_common::proto::workload::{X509svidRequest, X509svidResponse};
use meshid_common::sds::{Decoded, SECRET_TYPE_URL, decode};
use prost::Message;

use crate::support::AgentBuilder;

/// The grpcio release the test uses (as `cargo xtask ci` installs it).
pub const GRPCIO_VERSION: &str = "1.85.1";

fn grpcio_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("MESHID_GRPCIO_DIR") {
        return PathBuf::from(dir);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    target.join(format!("grpcio-{GRPCIO_VERSION}"))
}

/// Runs the script; Ok(first response bytes) or Err(what grpcio said).
async fn grpcio_call(
    socket: &Path,
    kind: &str,
    method: &str,
    request: &[u8],
    metadata: &[&str],
) -> Result<Vec<u8>, String> {
    let dir = grpcio_dir();
    assert!(
        dir.join("grpc").is_dir(),
        "grpcio is not installed in {}: run `python3 -m pip install --target {} grpcio=={GRPCIO_VERSION}` \
         (cargo xtask ci does this in its pip step)",
        dir.display(),
        dir.display()
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/py/grpcio_call.py");
    let hex: String = request.iter().map(|b| format!("{b:02x}")).collect();
    let out = tokio::process::Command::new("python3")
        .arg(&script)
        .arg(socket)
        .arg(kind)
        .arg(method)
        .arg(hex)
        .args(metadata)
        .env("PYTHONPATH", &dir)
        .output()
        .await
        .expect("python3 runs (install python3)");
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(
        out.status.code(),
        Some(3),
        "grpcio cannot be imported from {}: {stdout}\n{stderr}",
        dir.display()
    );
    if out.status.success() {
        let bytes = (0..stdout.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&stdout[i..i + 2], 16).expect("hex from the script"))
            .collect();
        Ok(bytes)
    } else {
        Err(format!("{stdout}\n{stderr}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_default_channel_gets_an_svid_on_the_workload_api_socket() {
    let a = AgentBuilder::default().start().await;
    let serial = a.ready().await;
    let bytes = grpcio_call(
        &a.api_socket(),
        "unary_stream",
        "/SpiffeWorkloadAPI/FetchX509SVID",
        &X509svidRequest {}.encode_to_vec(),
        &["workload.spiffe.io=true"],
    )
    .await
    .unwrap_or_else(|e| panic!("grpcio on the Workload API socket: {e}"));
    let resp = X509svidResponse::decode(bytes.as_slice()).expect("an X509SVIDResponse");
    assert_eq!(resp.svids.len(), 1);
    assert_eq!(resp.svids[0].spiffe_id, a.id().to_string());
    let creds = a.app.credentials().borrow().clone().expect("credentials");
    assert_eq!(creds.svid.leaf().serial, serial);
    let leaf_der: &[u8] = creds.svid.chain()[0].as_ref();
    assert!(
        resp.svids[0].x509_svid.starts_with(leaf_der),
        "the DER chain starts with the agent's leaf"
    );
    assert!(!resp.svids[0].x509_svid_key.is_empty());
    a.app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_default_channel_gets_default_on_the_sds_socket() {
    let a = AgentBuilder::default().start().await;
    let serial = a.ready().await;
    let req = DiscoveryRequest {
        node: Some(Node {
            id: "grpcio~127.0.0.1~web.default~default.svc.cluster.local".into(),
            ..Node::default()
        }),
        resource_names: vec!["default".into()],
        type_url: SECRET_TYPE_URL.into(),
        ..DiscoveryRequest::default()
    };
    let bytes = grpcio_call(
        a.app.sds_socket(),
        "stream_stream",
        "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets",
        &req.encode_to_vec(),
        &[],
    )
    .await
    .unwrap_or_else(|e| panic!("grpcio on the SDS socket: {e}"));
    let resp = DiscoveryResponse::decode(bytes.as_slice()).expect("a DiscoveryResponse");
    match decode("default", resp).expect("the default secret") {
        Decoded::Svid(svid) => assert_eq!(svid.leaf().serial, serial),
        other => panic!("expected an SVID, got {other:?}"),
    }
    a.app.shutdown().await;
}
