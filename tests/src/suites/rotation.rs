//! rotation: with a short TTL every agent rotates at about half-life, a
//! peer's next handshake sees the new serial, and traffic through the
//! rotation has no failed request.

use std::net::SocketAddr;
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
    case!(
        report,
        SUITE,
        "ztunnels_rotate_every_workload_cert",
        ztunnels_rotate(mesh)
    );
    if mesh.vault().is_none() {
        case!(
            report,
            SUITE,
            "root_rotation_without_failed_requests",
            root_rotation(mesh)
        );
    } else {
        // With `--signer vault` the roots live in Vault: the same rotation,
        // done the Vault way, and Vault going away for longer than a
        // rotation window.
        case!(
            report,
            SUITE,
            "vault_root_rotation_without_failed_requests",
            super::vault::root_rotation(mesh)
        );
        case!(
            report,
            SUITE,
            "vault_outage_longer_than_a_rotation_window_without_failed_requests",
            super::vault::outage(mesh)
        );
    }
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

/// The ROOTCA roots (subjects) and the leaf's issuer from an agent's `/debug/certs`.
async fn agent_trust(mesh: &impl Topology, agent: &str) -> Result<(Vec<String>, String), String> {
    let r = mesh
        .admin_get(agent, "/debug/certs")
        .await
        .map_err(|e| e.to_string())?;
    let v: serde_json::Value =
        serde_json::from_str(&r.body).map_err(|e| format!("{agent}: {e}"))?;
    let resources = v["resources"].as_array().cloned().unwrap_or_default();
    let roots = resources
        .iter()
        .find(|r| r["resource_name"] == "ROOTCA")
        .and_then(|r| r["roots"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .map(|r| r["subject"].as_str().unwrap_or_default().to_owned())
        .collect();
    let issuer = resources
        .iter()
        .find(|r| r["resource_name"] == "default")
        .and_then(|r| r["chain"][0]["issuer"].as_str())
        .unwrap_or_default()
        .to_owned();
    Ok((roots, issuer))
}

/// Waits until every agent satisfies `ok(roots, leaf_issuer)`.
pub(crate) async fn all_agents(
    mesh: &impl Topology,
    what: &str,
    ok: impl Fn(&[String], &str) -> bool,
) -> Result<(), String> {
    let agents: Vec<String> = mesh.pods().iter().map(|p| p.agent.clone()).collect();
    for agent in agents {
        crate::client::eventually(
            mesh.ttl() + Duration::from_secs(10),
            &format!("{agent}: {what}"),
            || async {
                let (roots, issuer) = agent_trust(mesh, &agent).await?;
                if ok(&roots, &issuer) {
                    Ok(())
                } else {
                    Err(format!("roots {roots:?}, leaf issued by {issuer:?}"))
                }
            },
        )
        .await?;
    }
    Ok(())
}

/// Continuous pod-to-pod traffic through every outbound route, from
/// [`Traffic::start`] until [`Traffic::finish`].
pub(crate) struct Traffic {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<Counted>,
}

/// What a [`Traffic`] run came to: requests that went through, failures.
pub(crate) struct Counted {
    ok: u32,
    failures: Vec<String>,
}

impl Traffic {
    pub(crate) fn start(mesh: &impl Topology, payload: &'static [u8]) -> Result<Traffic, String> {
        let routes: Vec<(SocketAddr, String)> = mesh
            .pods()
            .iter()
            .filter_map(|p| p.outbound.clone())
            .collect();
        ensure(!routes.is_empty(), || {
            "no pod-to-pod routes to carry traffic".into()
        })?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let (mut ok, mut failures) = (0u32, Vec::new());
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                for (listen, to) in &routes {
                    match crate::client::plain_echo(*listen, payload).await {
                        Ok(()) => ok += 1,
                        Err(e) => failures.push(format!("-> {to}: {e}")),
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Counted { ok, failures }
        });
        Ok(Traffic { stop, task })
    }

    /// A little more traffic after the last step, then stops and counts.
    pub(crate) async fn finish(self) -> Result<Counted, String> {
        tokio::time::sleep(Duration::from_secs(1)).await;
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task.await.map_err(|e| e.to_string())
    }
}

impl Counted {
    /// No request failed `during` the fault, and more than 20 went through.
    pub(crate) fn check(&self, during: &str) -> Result<(), String> {
        let Counted { ok, failures } = self;
        ensure(failures.is_empty(), || {
            format!(
                "{} of {} requests failed during {during}; first: {}",
                failures.len(),
                *ok as usize + failures.len(),
                failures[0]
            )
        })?;
        ensure(*ok > 20, || {
            format!("only {ok} requests went through during {during}")
        })
    }
}

/// Istio's root rotation with plugged-in CAs, under continuous pod-to-pod
/// traffic: bundle A → A+B → sign under B's intermediate → drop A. Every
/// agent must learn each step (ROOTCA push, leaf re-issued), and no request
/// through the outbound routes may fail.
async fn root_rotation(mesh: &mut impl Topology) -> Result<(), String> {
    use meshid_common::{CaOptions, CertificateAuthority};
    let td = mesh.trust_domain().to_owned();
    let a = mesh.ca_root_pem().map_err(|e| e.to_string())?;
    let b = CertificateAuthority::self_signed_root(&CaOptions {
        common_name: Some("meshid e2e root B".into()),
        ..CaOptions::new(&td, Duration::from_secs(86_400 * 30))
    })
    .map_err(|e| e.to_string())?;
    let ib = b
        .issue_intermediate(&CaOptions {
            common_name: Some("meshid e2e intermediate B".into()),
            ..CaOptions::new(&td, Duration::from_secs(86_400 * 7))
        })
        .map_err(|e| e.to_string())?;
    let traffic = Traffic::start(mesh, b"root rotation\n")?;

    let steps = async {
        let both = format!("{a}{}", b.cert_pem());
        mesh.update_ca_files(&[("root-cert.pem", both.clone())])
            .await
            .map_err(|e| e.to_string())?;
        all_agents(mesh, "trusts roots A and B", |roots, _| roots.len() == 2).await?;
        mesh.update_ca_files(&[
            ("ca-cert.pem", ib.cert_pem()),
            ("ca-key.pem", ib.key().to_pkcs8_pem().to_string()),
            (
                "cert-chain.pem",
                format!("{}{}", ib.cert_pem(), b.cert_pem()),
            ),
            ("root-cert.pem", both),
        ])
        .await
        .map_err(|e| e.to_string())?;
        all_agents(mesh, "holds a leaf signed under root B", |_, issuer| {
            issuer.contains("intermediate B")
        })
        .await?;
        mesh.update_ca_files(&[("root-cert.pem", b.cert_pem())])
            .await
            .map_err(|e| e.to_string())?;
        all_agents(mesh, "trusts root B only", |roots, _| {
            roots.len() == 1 && roots[0].contains("root B")
        })
        .await
    }
    .await;
    let counted = traffic.finish().await?;
    steps?;
    // An agent that has to reconnect after the rotation (a restart here) must
    // still reach the CA, whose serving certificate now chains to B only.
    let agent = mesh
        .pods()
        .first()
        .map(|p| p.agent.clone())
        .ok_or("no pod")?;
    mesh.restart(&agent)
        .await
        .map_err(|e| format!("{agent} did not come back after the root rotation: {e}"))?;
    counted.check("the root rotation")
}

/// Every ambient workload's certificate on its ztunnel gets a new serial
/// within a TTL, and cross-node traffic keeps working after it.
async fn ztunnels_rotate(mesh: &mut impl Topology) -> Result<(), String> {
    use crate::suites::issuance::ztunnel_certs;
    let ambient = mesh.ambient().to_vec();
    ensure(!ambient.is_empty(), || {
        format!(
            "the {} backend started no ambient workloads",
            mesh.backend()
        )
    })?;
    let mut before = std::collections::HashMap::new();
    for a in &ambient {
        let certs = ztunnel_certs(mesh, &a.ztunnel).await?;
        let serial = certs
            .iter()
            .find(|(id, _, _)| id == a.id.as_str())
            .map(|c| c.2.clone())
            .ok_or_else(|| format!("{} has no cert for {}", a.ztunnel, a.id))?;
        before.insert(a.id.to_string(), serial);
    }
    for a in &ambient {
        let old = before[a.id.as_str()].clone();
        crate::client::eventually(
            mesh.ttl() + Duration::from_secs(5),
            &format!("{} rotates {}", a.ztunnel, a.id),
            || async {
                let certs = ztunnel_certs(mesh, &a.ztunnel).await?;
                match certs.iter().find(|(id, _, _)| id == a.id.as_str()) {
                    Some((_, state, serial)) if *serial != old && state == "available" => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await?;
    }
    if let Some((listen, to)) = ambient.iter().find_map(|a| a.outbound.clone()) {
        crate::client::plain_echo(listen, b"after ztunnel rotation\n")
            .await
            .map_err(|e| format!("-> {to}: {e}"))?;
    }
    Ok(())
}
