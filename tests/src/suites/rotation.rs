//! rotation: with a short TTL every agent rotates at about half-life, a
//! peer's next handshake sees the new serial, and traffic through the
//! rotation has no failed request.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use super::ensure;
use crate::case;
use crate::client::{Tester, mtls_echo};
use crate::report::Report;
use crate::topology::{Mode, Pod, Proxy, Topology};

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

/// Continuous traffic through every outbound route, from [`Traffic::start`]
/// until [`Traffic::finish`], counted per path.
pub(crate) struct Traffic {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<Counted>,
}

/// What a [`Traffic`] run came to: requests that went through, failures,
/// and both per path (`shim`, `envoy`, `ambient`).
pub(crate) struct Counted {
    ok: u32,
    failures: Vec<String>,
    /// path -> (went through, failed)
    paths: std::collections::BTreeMap<&'static str, (u32, u32)>,
}

/// A plaintext route into the mesh, what it leads to, and which path it
/// crosses: `shim` (shim sidecar to shim sidecar), `envoy` (the real Envoy
/// on either end) or `ambient` (ztunnel to ztunnel, HBONE).
type Route = (SocketAddr, String, &'static str);

fn pod_routes(mesh: &impl Topology) -> Vec<Route> {
    let pods = mesh.pods();
    let proxy_of = |name: &str| pods.iter().find(|p| p.name == name).map(|p| p.proxy);
    pods.iter()
        .filter_map(|p| {
            let (listen, to) = p.outbound.clone()?;
            let envoy = p.proxy == Proxy::Envoy || proxy_of(&to) == Some(Proxy::Envoy);
            Some((listen, to, if envoy { "envoy" } else { "shim" }))
        })
        .collect()
}

impl Traffic {
    /// Pod-to-pod traffic through every sidecar's outbound route.
    pub(crate) fn start(mesh: &impl Topology, payload: &'static [u8]) -> Result<Traffic, String> {
        Self::over(pod_routes(mesh), payload)
    }

    /// [`Traffic::start`] plus every ambient workload's route through its
    /// ztunnel.
    pub(crate) fn start_with_ambient(
        mesh: &impl Topology,
        payload: &'static [u8],
    ) -> Result<Traffic, String> {
        let mut routes = pod_routes(mesh);
        routes.extend(
            mesh.ambient()
                .iter()
                .filter_map(|a| a.outbound.clone())
                .map(|(listen, to)| (listen, to, "ambient")),
        );
        Self::over(routes, payload)
    }

    fn over(routes: Vec<Route>, payload: &'static [u8]) -> Result<Traffic, String> {
        ensure(!routes.is_empty(), || {
            "no pod-to-pod routes to carry traffic".into()
        })?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut counted = Counted {
                ok: 0,
                failures: Vec::new(),
                paths: routes.iter().map(|r| (r.2, (0, 0))).collect(),
            };
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                for (listen, to, path) in &routes {
                    let tally = counted.paths.entry(path).or_default();
                    match crate::client::plain_echo(*listen, payload).await {
                        Ok(()) => {
                            counted.ok += 1;
                            tally.0 += 1;
                        }
                        Err(e) => {
                            tally.1 += 1;
                            counted.failures.push(format!("{path} -> {to}: {e}"));
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            counted
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
        let Counted { ok, failures, .. } = self;
        ensure(failures.is_empty(), || {
            format!(
                "{} of {} requests failed during {during} ({}); first: {}",
                failures.len(),
                *ok as usize + failures.len(),
                self.per_path(),
                failures[0]
            )
        })?;
        ensure(*ok > 20, || {
            format!("only {ok} requests went through during {during}")
        })
    }

    /// [`Counted::check`], and each of `paths` carried more than 20 requests.
    pub(crate) fn check_paths(&self, during: &str, paths: &[&str]) -> Result<(), String> {
        self.check(during)?;
        for path in paths {
            let (ok, _) = self.paths.get(path).copied().unwrap_or_default();
            ensure(ok > 20, || {
                format!(
                    "the {path} path carried only {ok} requests during {during} ({})",
                    self.per_path()
                )
            })?;
        }
        Ok(())
    }

    /// `shim 0/240 failed, envoy 0/480 failed, ...`.
    pub(crate) fn per_path(&self) -> String {
        self.paths
            .iter()
            .map(|(path, (ok, failed))| format!("{path} {failed}/{} failed", ok + failed))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Istio's root rotation with plugged-in CAs, under continuous traffic on
/// three paths at once: a shim sidecar pair (STRICT), the real Envoy (fed
/// over SDS by its agent) and ambient workloads through their ztunnels
/// (HBONE). Bundle A → A+B → sign under B's intermediate → drop A. After
/// each step every component must show it: each agent's and ztunnel's
/// `/debug/certs` (roots held, issuer of the current leaf) and Envoy's admin
/// `/certs` (root serials, the leaf it serves); no request on any path may
/// fail. The time each step took to reach every component is printed.
async fn root_rotation(mesh: &mut impl Topology) -> Result<(), String> {
    use meshid_common::{CaOptions, CertInfo, CertificateAuthority};
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
    let serial_of = |pem: &str| {
        let bundle = meshid_common::TrustBundle::from_pem(pem).map_err(|e| e.to_string())?;
        let der = bundle.roots().first().ok_or("no certificate in the PEM")?;
        CertInfo::from_der(der)
            .map(|i| i.serial)
            .map_err(|e| e.to_string())
    };
    let (serial_a, serial_b) = (serial_of(&a)?, serial_of(&b.cert_pem())?);
    let envoy = mesh
        .pods()
        .iter()
        .find(|p| p.proxy == Proxy::Envoy)
        .cloned()
        .ok_or("no Envoy pod in the topology")?;
    ensure(!mesh.ambient().is_empty(), || {
        format!(
            "the {} backend started no ambient workloads",
            mesh.backend()
        )
    })?;
    // Envoy's `/certs` may list only the first root of a bundle, so its
    // trust is also checked by what it accepts: a client under B (after
    // step 1) and a client under A (refused after step 3).
    let both = format!("{a}{}", b.cert_pem());
    let both_bundle = meshid_common::TrustBundle::from_pem(&both).map_err(|e| e.to_string())?;
    let under_a = Tester::from_ca(mesh, "tester", "tester-rotation", Duration::from_secs(600))
        .await?
        .creds
        .svid;
    let under_a = Tester {
        creds: meshid_common::Credentials {
            svid: under_a,
            bundle: std::sync::Arc::new(both_bundle.clone()),
        },
    };
    let under_b = {
        let key = meshid_common::PrivateKey::generate(meshid_common::KeyType::EcdsaP256)
            .map_err(|e| e.to_string())?;
        let id = under_a.id().clone();
        let leaf = ib
            .issue_leaf(
                key.public_key_spki(),
                &id,
                Duration::from_secs(600),
                SystemTime::now(),
            )
            .map_err(|e| e.to_string())?;
        let svid = meshid_common::Svid::new(vec![leaf, ib.cert().clone()], key)
            .map_err(|e| e.to_string())?;
        Tester::from_parts(svid, both_bundle)
    };
    let traffic = Traffic::start_with_ambient(mesh, b"root rotation\n")?;
    let mut times: Vec<(&str, Duration)> = Vec::new();

    let steps = async {
        let began = Instant::now();
        mesh.update_ca_files(&[("root-cert.pem", both.clone())])
            .await
            .map_err(|e| e.to_string())?;
        let trusts_both = |roots: &[String], _: &str| {
            roots.len() == 2 && roots.iter().any(|r| r.contains("root B"))
        };
        all_agents(mesh, "trusts roots A and B", trusts_both).await?;
        all_ztunnels(mesh, "trusts roots A and B", trusts_both).await?;
        envoy_sees(mesh, &envoy, "lists only roots A and B", |roots, _| {
            roots.contains(&serial_a) && roots.iter().all(|r| *r == serial_a || *r == serial_b)
        })
        .await?;
        crate::client::eventually(
            mesh.ttl(),
            "Envoy accepts a client certificate under B",
            || mtls_echo(envoy.inbound, &under_b, &envoy.id, b"under B\n"),
        )
        .await?;
        times.push(("A+B in every bundle", began.elapsed()));

        let began = Instant::now();
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
        let signed_by_b = |_: &[String], issuer: &str| issuer.contains("intermediate B");
        all_agents(mesh, "holds a leaf signed under root B", signed_by_b).await?;
        all_ztunnels(mesh, "holds a leaf signed under root B", signed_by_b).await?;
        // Envoy serves the leaf its agent now holds (signed under B).
        let (leaf, _, _) = agent_cert(mesh, &envoy.agent).await?;
        envoy_sees(
            mesh,
            &envoy,
            "serves the leaf signed under B",
            |_, leaves| !leaves.is_empty() && leaves.iter().all(|l| *l == leaf),
        )
        .await?;
        times.push(("every leaf signed under B", began.elapsed()));

        let began = Instant::now();
        mesh.update_ca_files(&[("root-cert.pem", b.cert_pem())])
            .await
            .map_err(|e| e.to_string())?;
        let only_b = |roots: &[String], _: &str| roots.len() == 1 && roots[0].contains("root B");
        all_agents(mesh, "trusts root B only", only_b).await?;
        all_ztunnels(mesh, "trusts root B only", only_b).await?;
        envoy_sees(mesh, &envoy, "trusts root B only", |roots, _| {
            roots.len() == 1 && roots[0] == serial_b
        })
        .await?;
        crate::client::eventually(
            mesh.ttl(),
            "Envoy refuses a client certificate under A",
            || async {
                match mtls_echo(envoy.inbound, &under_a, &envoy.id, b"under A\n").await {
                    Ok(_) => Err("a client under the dropped root A got through".to_owned()),
                    Err(_) => Ok(()),
                }
            },
        )
        .await?;
        times.push(("A dropped everywhere", began.elapsed()));
        Ok::<(), String>(())
    }
    .await;
    let counted = traffic.finish().await?;
    println!(
        "    root rotation: {}; steps: {}",
        counted.per_path(),
        times
            .iter()
            .map(|(step, took)| format!("{step} {:.1} s", took.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ")
    );
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
    counted.check_paths("the root rotation", &["shim", "envoy", "ambient"])
}

/// Waits until every ambient workload's certificate on its ztunnel
/// satisfies `ok(roots, leaf_issuer)` (ztunnel `/debug/certs`).
async fn all_ztunnels(
    mesh: &impl Topology,
    what: &str,
    ok: impl Fn(&[String], &str) -> bool,
) -> Result<(), String> {
    for w in mesh.ambient().to_vec() {
        crate::client::eventually(
            mesh.ttl() + Duration::from_secs(10),
            &format!("{} for {}: {what}", w.ztunnel, w.id),
            || async {
                let r = mesh
                    .admin_get(&w.ztunnel, "/debug/certs")
                    .await
                    .map_err(|e| e.to_string())?;
                let v: serde_json::Value = serde_json::from_str(&r.body)
                    .map_err(|e| format!("{} /debug/certs: {e}", w.ztunnel))?;
                let cert = v["certificates"]
                    .as_array()
                    .and_then(|c| c.iter().find(|c| c["identity"] == w.id.as_str()))
                    .cloned()
                    .ok_or_else(|| format!("no certificate entry for {}", w.id))?;
                let roots: Vec<String> = cert["roots"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|r| r.as_str().map(str::to_owned))
                    .collect();
                let issuer = cert["issuer"].as_str().unwrap_or_default();
                if ok(&roots, issuer) {
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

/// Waits until the Envoy pod's admin `/certs` satisfies `ok(root serials,
/// leaf serials)`, for every TLS context that lists roots (inbound and
/// outbound each have one).
async fn envoy_sees(
    mesh: &impl Topology,
    pod: &Pod,
    what: &str,
    ok: impl Fn(&[String], &[String]) -> bool,
) -> Result<(), String> {
    crate::client::eventually(
        mesh.ttl() + Duration::from_secs(10),
        &format!("Envoy of {}: {what}", pod.name),
        || async {
            let r = mesh
                .admin_get(&pod.proxy_component, "/certs")
                .await
                .map_err(|e| e.to_string())?;
            let v: serde_json::Value =
                serde_json::from_str(&r.body).map_err(|e| format!("Envoy /certs: {e}"))?;
            let serials = |list: &serde_json::Value| -> Vec<String> {
                list.as_array()
                    .cloned()
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|c| c["serial_number"].as_str())
                    .map(|s| s.trim_start_matches('0').to_lowercase())
                    .collect()
            };
            let contexts: Vec<(Vec<String>, Vec<String>)> = v["certificates"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|c| (serials(&c["ca_cert"]), serials(&c["cert_chain"])))
                .filter(|(roots, _)| !roots.is_empty())
                .collect();
            let leaves: Vec<String> = contexts.iter().flat_map(|c| c.1.clone()).collect();
            if !contexts.is_empty() && contexts.iter().all(|(roots, _)| ok(roots, &leaves)) {
                Ok(())
            } else {
                Err(format!("(roots, leaves) per context: {contexts:?}"))
            }
        },
    )
    .await
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
