//! mtls: STRICT refuses plaintext and foreign-root clients and accepts mesh
//! peers; PERMISSIVE accepts both on one port; a pod switches from
//! PERMISSIVE to STRICT at runtime; pod-to-pod traffic uses secure naming.

use std::time::{Duration, SystemTime};

use meshid_common::cert::LeafSpec;
use meshid_common::testing::TestPki;

use super::ensure;
use crate::case;
use crate::client::{Tester, eventually, mtls_echo, plain_echo};
use crate::report::Report;
use crate::topology::{Mode, Pod, Topology};

const SUITE: &str = "mtls";

pub async fn run(mesh: &mut impl Topology, report: &mut Report) {
    case!(
        report,
        SUITE,
        "strict_accepts_a_mesh_peer",
        strict_accepts_a_mesh_peer(mesh)
    );
    case!(
        report,
        SUITE,
        "strict_refuses_plaintext",
        strict_refuses_plaintext(mesh)
    );
    case!(
        report,
        SUITE,
        "strict_refuses_a_foreign_root",
        strict_refuses_a_foreign_root(mesh)
    );
    case!(
        report,
        SUITE,
        "permissive_accepts_plaintext_and_mtls",
        permissive_accepts_both(mesh)
    );
    case!(
        report,
        SUITE,
        "permissive_to_strict_at_runtime",
        permissive_to_strict_at_runtime(mesh)
    );
    case!(
        report,
        SUITE,
        "pod_to_pod_with_secure_naming",
        pod_to_pod(mesh)
    );
    case!(
        report,
        SUITE,
        "ambient_traffic_is_hbone_with_the_source_identity",
        ambient_hbone(mesh)
    );
}

fn pod_in(mesh: &impl Topology, mode: Mode) -> Result<Pod, String> {
    mesh.pods()
        .iter()
        .find(|p| p.mode == mode)
        .cloned()
        .ok_or_else(|| format!("the topology has no {} pod", mode.as_str()))
}

async fn tester(mesh: &mut impl Topology) -> Result<Tester, String> {
    Tester::from_ca(mesh, "tester", "tester-mtls", Duration::from_secs(600)).await
}

async fn strict_accepts_a_mesh_peer(mesh: &mut impl Topology) -> Result<(), String> {
    let pod = pod_in(mesh, Mode::Strict)?;
    let t = tester(mesh).await?;
    mtls_echo(pod.inbound, &t, &pod.id, b"hello strict\n")
        .await
        .map(|_| ())
}

async fn strict_refuses_plaintext(mesh: &mut impl Topology) -> Result<(), String> {
    let pod = pod_in(mesh, Mode::Strict)?;
    ensure(
        plain_echo(pod.inbound, b"GET / HTTP/1.1\r\n\r\n")
            .await
            .is_err(),
        || format!("{} (STRICT) echoed plaintext", pod.name),
    )
}

async fn strict_refuses_a_foreign_root(mesh: &mut impl Topology) -> Result<(), String> {
    let pod = pod_in(mesh, Mode::Strict)?;
    // Another mesh with the same trust domain name and its own root.
    let evil = TestPki::new(mesh.trust_domain()).map_err(|e| e.to_string())?;
    let id = evil.id("e2e", "tester");
    let svid = evil
        .custom_svid(
            &LeafSpec::svid(&id, Duration::from_secs(600)),
            SystemTime::now(),
        )
        .map_err(|e| e.to_string())?;
    // It trusts the real root so that only the server's verdict on the client matters.
    let real =
        meshid_common::TrustBundle::from_pem(&mesh.ca_root_pem().map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    let t = Tester::from_parts(svid, real);
    ensure(
        mtls_echo(pod.inbound, &t, &pod.id, b"let me in\n")
            .await
            .is_err(),
        || {
            format!(
                "{} (STRICT) accepted a client from a foreign root",
                pod.name
            )
        },
    )
}

async fn permissive_accepts_both(mesh: &mut impl Topology) -> Result<(), String> {
    let pod = pod_in(mesh, Mode::Permissive)?;
    let t = tester(mesh).await?;
    plain_echo(pod.inbound, b"plain on permissive\n").await?;
    mtls_echo(pod.inbound, &t, &pod.id, b"mtls on permissive\n")
        .await
        .map(|_| ())
}

async fn permissive_to_strict_at_runtime(mesh: &mut impl Topology) -> Result<(), String> {
    let pod = pod_in(mesh, Mode::Permissive)?;
    let t = tester(mesh).await?;
    plain_echo(pod.inbound, b"before\n").await?;
    mesh.set_mode(&pod.name, Mode::Strict)
        .await
        .map_err(|e| e.to_string())?;
    let switched = eventually(
        Duration::from_secs(10),
        "plaintext refused after switching to STRICT",
        || async {
            match plain_echo(pod.inbound, b"after\n").await {
                Ok(()) => Err("plaintext still accepted".to_string()),
                Err(_) => Ok(()),
            }
        },
    )
    .await;
    let mtls = mtls_echo(pod.inbound, &t, &pod.id, b"mtls after switch\n").await;
    // Put the pod back so later suites see the topology as specified.
    mesh.set_mode(&pod.name, Mode::Permissive)
        .await
        .map_err(|e| e.to_string())?;
    eventually(
        Duration::from_secs(10),
        "plaintext accepted again after switching back",
        || plain_echo(pod.inbound, b"back\n"),
    )
    .await?;
    switched?;
    mtls.map(|_| ())
}

/// Plaintext into a pod's outbound listener reaches the next pod's app over
/// mTLS, the proxy checking that the server is the expected identity.
async fn pod_to_pod(mesh: &mut impl Topology) -> Result<(), String> {
    let from = mesh
        .pods()
        .iter()
        .find(|p| p.outbound.is_some() && p.proxy == crate::topology::Proxy::Shim)
        .cloned()
        .ok_or("no shim pod with an outbound route")?;
    let (listen, to) = from.outbound.clone().expect("checked");
    plain_echo(listen, b"pod to pod\n")
        .await
        .map_err(|e| format!("{} -> {to} through the outbound listener: {e}", from.name))
}

/// A workload on node-a dials a workload on node-b through its ztunnel: the
/// bytes arrive, and node-b's ztunnel saw the SOURCE workload's identity
/// (not its fellow ztunnel's) on an inbound HBONE connection.
async fn ambient_hbone(mesh: &mut impl Topology) -> Result<(), String> {
    let ambient = mesh.ambient().to_vec();
    ensure(!ambient.is_empty(), || {
        format!(
            "the {} backend started no ambient workloads",
            mesh.backend()
        )
    })?;
    // Workloads with no outbound listener: the backend leads no workload's
    // traffic into its ztunnel (kind: no traffic capture), a skip.
    let src = ambient
        .iter()
        .find(|a| a.outbound.is_some())
        .cloned()
        .ok_or_else(|| {
            mesh.unsupported_because(
                "ambient traffic",
                "through a ztunnel",
                "no ambient workload has an outbound listener on its ztunnel",
            )
            .to_string()
        })?;
    let (listen, to) = src.outbound.clone().expect("checked");
    let dst = ambient
        .iter()
        .find(|a| a.name == to)
        .cloned()
        .ok_or("unknown destination")?;
    ensure(dst.node != src.node, || {
        "the route does not cross nodes".into()
    })?;
    plain_echo(listen, b"ambient hello\n")
        .await
        .map_err(|e| format!("{} -> {}: {e}", src.name, dst.name))?;
    // The destination ztunnel records a connection when it closes.
    let inbound = eventually(
        Duration::from_secs(5),
        &format!("{} records the connection", dst.ztunnel),
        || async {
            let r = mesh
                .admin_get(&dst.ztunnel, "/debug/connections")
                .await
                .map_err(|e| e.to_string())?;
            let v: serde_json::Value = serde_json::from_str(&r.body).map_err(|e| e.to_string())?;
            v.as_array()
                .and_then(|seen| {
                    seen.iter()
                        .rev()
                        .find(|c| {
                            c["direction"] == "inbound" && c["dst_identity"] == dst.id.as_str()
                        })
                        .cloned()
                })
                .ok_or_else(|| format!("no inbound connection to {} yet: {}", dst.id, r.body))
        },
    )
    .await?;
    ensure(inbound["src_identity"] == src.id.as_str(), || {
        format!(
            "{} saw source {} instead of {}",
            dst.ztunnel, inbound["src_identity"], src.id
        )
    })?;
    // The CONNECT carried the source address (DESIGN §2.5 `forwarded: for=...`).
    ensure(
        inbound["forwarded"]
            .as_str()
            .is_some_and(|f| f.contains("for=")),
        || format!("the CONNECT had no forwarded header: {inbound}"),
    )
}
