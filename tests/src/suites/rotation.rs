//! rotation: with a short TTL every agent rotates at about half-life, a
//! peer's next handshake sees the new serial, and traffic through the
//! rotation has no failed request.

use std::time::{Duration, Instant, SystemTime};

use super::ensure;
use crate::case;
use crate::client::{Tester, mtls_echo};
use crate::report::Report;
use crate::topology::{Mode, Pod, Topology};

const SUITE: &str = "rotation";

pub async fn run(mesh: &mut impl Topology, report: &mut Report) {
    case!(
        report,
        SUITE,
        "every_agent_rotates_near_half_life",
        every_agent_rotates(mesh)
    );
    case!(
        report,
        SUITE,
        "traffic_through_a_rotation_never_fails",
        traffic_through_rotation(mesh)
    );
    case!(
        report,
        SUITE,
        "envoy_takes_the_rotated_cert_without_restart",
        envoy_takes_rotation(mesh)
    );
}

/// (serial, not_before unix secs, not_after unix secs) from an agent's `/debug/certs`.
pub(crate) async fn agent_cert(
    mesh: &impl Topology,
    agent: &str,
) -> Result<(String, i64, i64), String> {
    let r = mesh
        .admin_get(agent, "/debug/certs")
        .await
        .map_err(|e| e.to_string())?;
    let v: serde_json::Value = serde_json::from_str(&r.body)
        .map_err(|e| format!("{agent} /debug/certs is not JSON: {e}"))?;
    let serial = v["serial"]
        .as_str()
        .ok_or_else(|| format!("{agent} holds no certificate: {}", v["reason"]))?;
    let secs = |key: &str| {
        let text = v[key]
            .as_str()
            .ok_or_else(|| format!("{agent} /debug/certs has no {key}"))?;
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
            .map(|t| t.unix_timestamp())
            .map_err(|e| format!("{agent} /debug/certs {key} {text:?}: {e}"))
    };
    Ok((serial.to_owned(), secs("not_before")?, secs("not_after")?))
}

fn now_unix() -> i64 {
    meshid_common::cert::unix_secs(SystemTime::now())
}

/// Watches every agent until its serial changes, and checks when: between
/// 35 % and 75 % of the certificate's life (0.5 ± jitter, plus polling and
/// the two-minute backdating taken out).
async fn every_agent_rotates(mesh: &mut impl Topology) -> Result<(), String> {
    let ttl = mesh.ttl();
    let pods: Vec<Pod> = mesh.pods().to_vec();
    let mut first = Vec::new();
    for p in &pods {
        first.push(agent_cert(mesh, &p.agent).await?);
    }
    let deadline = Instant::now() + ttl + Duration::from_secs(5);
    let mut seen: Vec<Option<i64>> = vec![None; pods.len()];
    while seen.iter().any(Option::is_none) && Instant::now() < deadline {
        for (i, p) in pods.iter().enumerate() {
            if seen[i].is_none() {
                let (serial, _, _) = agent_cert(mesh, &p.agent).await?;
                if serial != first[i].0 {
                    seen[i] = Some(now_unix());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for (i, p) in pods.iter().enumerate() {
        let at = seen[i].ok_or_else(|| {
            format!(
                "{} did not rotate within {:?}",
                p.agent,
                ttl + Duration::from_secs(5)
            )
        })?;
        // Issued at not_before + 120 s (backdating); life = ttl.
        let issued = first[i].1 + 120;
        let frac = (at - issued) as f64 / ttl.as_secs_f64();
        ensure((0.35..=0.75).contains(&frac), || {
            format!(
                "{} rotated at {:.0} % of its life, expected about 50 %",
                p.agent,
                frac * 100.0
            )
        })?;
    }
    Ok(())
}

/// New mTLS connections every 100 ms to a STRICT pod across a whole
/// rotation: none fails, and the server's serial changes along the way.
async fn traffic_through_rotation(mesh: &mut impl Topology) -> Result<(), String> {
    let pod = mesh
        .pods()
        .iter()
        .find(|p| p.mode == Mode::Strict)
        .cloned()
        .ok_or("no STRICT pod")?;
    let tester =
        Tester::from_ca(mesh, "tester", "tester-rotation", Duration::from_secs(600)).await?;
    let (start_serial, _, _) = agent_cert(mesh, &pod.agent).await?;
    let deadline = Instant::now() + mesh.ttl() + Duration::from_secs(5);
    let (mut ok, mut failed, mut serials) = (0u32, Vec::new(), vec![start_serial.clone()]);
    // Run until two server serials past the start have been seen, or the deadline.
    while Instant::now() < deadline {
        match mtls_echo(pod.inbound, &tester, &pod.id, b"through rotation\n").await {
            Ok(ex) => {
                ok += 1;
                if serials.last() != Some(&ex.server_leaf.serial) {
                    serials.push(ex.server_leaf.serial.clone());
                }
                if serials.len() >= 2 && serials[0] != ex.server_leaf.serial && ok > 20 {
                    break;
                }
            }
            Err(e) => failed.push(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure(failed.is_empty(), || {
        format!(
            "{} of {} requests failed during rotation; first: {}",
            failed.len(),
            ok as usize + failed.len(),
            failed[0]
        )
    })?;
    ensure(serials.len() >= 2, || {
        format!(
            "{} kept serial {start_serial} for the whole window",
            pod.name
        )
    })
}

/// A real Envoy fed by an agent: after the agent rotates, Envoy's admin
/// `/certs` lists the new serial and a peer's handshake sees it, with the
/// same Envoy process throughout.
async fn envoy_takes_rotation(mesh: &mut impl Topology) -> Result<(), String> {
    let pod = mesh
        .pods()
        .iter()
        .find(|p| p.proxy == crate::topology::Proxy::Envoy)
        .cloned()
        .ok_or("no Envoy pod in the topology")?;
    let tester =
        Tester::from_ca(mesh, "tester", "tester-rotation", Duration::from_secs(600)).await?;
    let (before, _, _) = agent_cert(mesh, &pod.agent).await?;
    let rotated = crate::client::eventually(
        mesh.ttl() + Duration::from_secs(5),
        "the Envoy pod's agent rotates",
        || async {
            let (now, _, _) = agent_cert(mesh, &pod.agent).await?;
            if now != before {
                Ok(now)
            } else {
                Err(format!("still {before}"))
            }
        },
    )
    .await?;
    crate::client::eventually(
        Duration::from_secs(5),
        "Envoy's /certs shows the rotated serial",
        || async {
            let r = mesh
                .admin_get(&pod.proxy_component, "/certs")
                .await
                .map_err(|e| e.to_string())?;
            if r.body.to_lowercase().contains(&rotated) {
                Ok(())
            } else {
                Err(format!("/certs does not list {rotated}"))
            }
        },
    )
    .await?;
    let ex = mtls_echo(pod.inbound, &tester, &pod.id, b"envoy after rotation\n").await?;
    ensure(ex.server_leaf.serial != before, || {
        format!("Envoy still presents the old serial {before}")
    })
}
