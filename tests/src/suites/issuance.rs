//! issuance: sidecar pods get their SVID over SDS; chains verify to the
//! published root; the leaf follows the X.509-SVID profile.

use std::time::{Duration, SystemTime};

use meshid_common::{TrustBundle, Usage};

use super::ensure;
use crate::case;
use crate::client::{Tester, mtls_echo};
use crate::report::Report;
use crate::topology::Topology;

const SUITE: &str = "issuance";

pub async fn run(mesh: &mut impl Topology, report: &mut Report) {
    case!(
        report,
        SUITE,
        "agent_reports_its_pod_identity",
        agent_reports_its_pod_identity(mesh)
    );
    case!(
        report,
        SUITE,
        "ca_signs_for_a_registered_pod",
        ca_signs_for_a_registered_pod(mesh)
    );
    case!(
        report,
        SUITE,
        "proxy_presents_the_pod_svid",
        proxy_presents_the_pod_svid(mesh)
    );
    case!(
        report,
        SUITE,
        "ambient_workloads_get_svids_through_ztunnel",
        ambient_workloads_get_svids(mesh)
    );
}

/// Each agent's `/debug/certs` names its pod's SPIFFE ID.
async fn agent_reports_its_pod_identity(mesh: &mut impl Topology) -> Result<(), String> {
    for pod in mesh.pods().to_vec() {
        let r = mesh
            .admin_get(&pod.agent, "/debug/certs")
            .await
            .map_err(|e| e.to_string())?;
        ensure(r.status == 200, || {
            format!("{}: /debug/certs answered {}", pod.agent, r.status)
        })?;
        ensure(r.body.contains(pod.id.as_str()), || {
            format!(
                "{}: /debug/certs does not name {}: {}",
                pod.agent, pod.id, r.body
            )
        })?;
    }
    Ok(())
}

/// The CA issues to a client that proves a registered pod's token, and the
/// answer verifies to the published root.
async fn ca_signs_for_a_registered_pod(mesh: &mut impl Topology) -> Result<(), String> {
    let tester =
        Tester::from_ca(mesh, "tester", "tester-issuance", Duration::from_secs(600)).await?;
    let published = TrustBundle::from_pem(&mesh.ca_root_pem().map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    ensure(published.is_superset_of(&tester.creds.bundle), || {
        "the CA answered with roots it does not publish".into()
    })?;
    published
        .verify(
            tester.creds.svid.chain(),
            Usage::ClientAuth,
            SystemTime::now(),
        )
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// A mesh peer dialling each pod sees that pod's SVID,
/// chained to the published root, with the profile's lifetime.
async fn proxy_presents_the_pod_svid(mesh: &mut impl Topology) -> Result<(), String> {
    let tester =
        Tester::from_ca(mesh, "tester", "tester-issuance", Duration::from_secs(600)).await?;
    let published = TrustBundle::from_pem(&mesh.ca_root_pem().map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    let ttl = mesh.ttl();
    for pod in mesh.pods().to_vec() {
        let ex = mtls_echo(pod.inbound, &tester, &pod.id, b"issuance\n")
            .await
            .map_err(|e| format!("{}: {e}", pod.name))?;
        ensure(ex.server_leaf.spiffe_id.as_ref() == Some(&pod.id), || {
            format!("{} presented {:?}", pod.name, ex.server_leaf.spiffe_id)
        })?;
        ensure(!ex.server_leaf.is_ca, || {
            format!("{}: the leaf is a CA", pod.name)
        })?;
        for usage in [Usage::ClientAuth, Usage::ServerAuth] {
            published
                .verify(&ex.server_chain, usage, SystemTime::now())
                .map_err(|e| format!("{}: {e}", pod.name))?;
        }
        // NotBefore is backdated two minutes; NotAfter is TTL after issuance.
        let life = ex.server_leaf.lifetime();
        let want = ttl + Duration::from_secs(120);
        ensure(life.abs_diff(want) <= Duration::from_secs(2), || {
            format!("{}: lifetime {life:?}, expected {want:?}", pod.name)
        })?;
    }
    Ok(())
}

/// (identity, state, serial) of every certificate a ztunnel holds.
pub(crate) async fn ztunnel_certs(
    mesh: &impl Topology,
    ztunnel: &str,
) -> Result<Vec<(String, String, String)>, String> {
    let r = mesh
        .admin_get(ztunnel, "/debug/certs")
        .await
        .map_err(|e| e.to_string())?;
    let v: serde_json::Value =
        serde_json::from_str(&r.body).map_err(|e| format!("{ztunnel} /debug/certs: {e}"))?;
    Ok(v["certificates"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|c| {
            let s = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
            (s("identity"), s("state"), s("serial"))
        })
        .collect())
}

/// Each ztunnel holds an available certificate for every workload of its
/// node, obtained by impersonation (the workloads have no agent).
async fn ambient_workloads_get_svids(mesh: &mut impl Topology) -> Result<(), String> {
    let ambient = mesh.ambient().to_vec();
    ensure(!ambient.is_empty(), || {
        format!(
            "the {} backend started no ambient workloads",
            mesh.backend()
        )
    })?;
    for a in &ambient {
        let certs = crate::client::eventually(
            Duration::from_secs(10),
            &format!("{} holds a cert for {}", a.ztunnel, a.id),
            || async {
                let certs = ztunnel_certs(mesh, &a.ztunnel).await?;
                if certs
                    .iter()
                    .any(|(id, state, _)| id == a.id.as_str() && state == "available")
                {
                    Ok(certs)
                } else {
                    Err(format!("{certs:?}"))
                }
            },
        )
        .await?;
        // A ztunnel holds only identities of its own node.
        for (id, _, _) in &certs {
            ensure(
                ambient
                    .iter()
                    .any(|w| w.node == a.node && w.id.as_str() == id),
                || {
                    format!(
                        "{} holds a certificate for {id}, which does not run on {}",
                        a.ztunnel, a.node
                    )
                },
            )?;
        }
    }
    Ok(())
}
