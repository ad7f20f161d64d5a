//! Compiles the wire protos with protox (pure Rust, no system protoc) and
//! generates prost messages plus tonic clients and servers.

use std::path::Path;

const PROTOS: &[&str] = &[
    "istio/v1/auth/ca.proto",
    "envoy/service/secret/v3/sds.proto",
    "envoy/extensions/transport_sockets/tls/v3/secret.proto",
    "spiffe/workload.proto",
    "meshid/v1/jwt_svid.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = Path::new("proto");
    println!("cargo:rerun-if-changed=build.rs");
    for entry in walk(root)? {
        println!("cargo:rerun-if-changed={}", entry.display());
    }
    let fds = protox::compile(PROTOS, [root])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}

fn walk(dir: &Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            out.extend(walk(&path)?);
        } else {
            out.push(path);
        }
    }
    Ok(out)
}
