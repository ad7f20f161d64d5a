//! The rotation suite's cases for `--signer vault` (run from
//! [`super::rotation`]): a Vault root rotation (`pki/root/rotate` + default
//! issuer change + old issuer deleted) under traffic, and an OpenBao outage
//! (sealed) longer than a rotation window, both with zero failed requests.

use std::time::{Duration, Instant};

use super::ensure;
use super::rotation::{Traffic, agent_cert, all_agents};
use crate::topology::Topology;

/// Waits until the CA's published bundle holds `n` roots, then hands it to
/// every pod and node (the `istio-ca-root-cert` ConfigMap).
async fn published_roots(mesh: &impl Topology, n: usize) -> Result<(), String> {
    crate::client::eventually(
        Duration::from_secs(15),
        &format!("the CA publishes {n} roots"),
        || async {
            let pem = mesh.ca_root_pem().map_err(|e| e.to_string())?;
            let bundle = meshid_common::TrustBundle::from_pem(&pem).map_err(|e| e.to_string())?;
            if bundle.roots().len() == n {
                Ok(())
            } else {
                Err(format!("{} roots", bundle.roots().len()))
            }
        },
    )
    .await?;
    mesh.publish_ca_roots().await.map_err(|e| e.to_string())
}

/// Vault's root rotation under continuous pod-to-pod traffic, in the order
/// that never breaks a handshake: a second root issuer is added (both roots
/// published, every agent learns them), then made the default (every agent
/// gets a leaf under it), then the old issuer is deleted (every agent ends
/// up trusting the new root only). No request may fail. (Switching the
/// default in the same step as adding the root fails handshakes: a peer
/// with a new leaf meets one that has not learnt the new root yet.)
pub async fn root_rotation(mesh: &mut impl Topology) -> Result<(), String> {
    const NEW_ROOT: &str = "meshid e2e vault root 2";
    let traffic = Traffic::start(mesh, b"vault root rotation\n")?;
    let steps = async {
        let bao = mesh.vault().ok_or("no Vault in this run")?;
        let old = bao.default_issuer().await?;
        let new = bao.add_root(NEW_ROOT).await?;
        published_roots(mesh, 2).await?;
        all_agents(mesh, "trusts both Vault roots", |roots, _| roots.len() == 2).await?;
        bao.set_default_issuer(&new).await?;
        all_agents(
            mesh,
            "holds a leaf under the new Vault root",
            |_, issuer| issuer.contains(NEW_ROOT),
        )
        .await?;
        bao.delete_issuer(&old).await?;
        published_roots(mesh, 1).await?;
        all_agents(mesh, "trusts the new Vault root only", |roots, _| {
            roots.len() == 1 && roots[0].contains(NEW_ROOT)
        })
        .await
    }
    .await;
    let counted = traffic.finish().await?;
    steps?;
    // An agent that reconnects now must still reach the CA, whose serving
    // certificate Vault re-issued under the new root.
    let agent = mesh
        .pods()
        .first()
        .map(|p| p.agent.clone())
        .ok_or("no pod")?;
    mesh.restart(&agent)
        .await
        .map_err(|e| format!("{agent} did not come back after the Vault root rotation: {e}"))?;
    counted.check("the Vault root rotation")
}

/// OpenBao sealed for longer than a rotation window (the agents' renewal
/// point is half the TTL) under traffic: the agents cannot renew, keep their
/// valid certificates and retry; once Vault is back they renew before
/// expiry. No request may fail.
pub async fn outage(mesh: &mut impl Topology) -> Result<(), String> {
    let ttl = mesh.ttl();
    // Every agent starts the outage with a fresh certificate (a restart
    // issues one; all stopped first, then all started, so their certificates
    // are a few seconds apart at most), so the outage can pass the rotation
    // point and still end well before expiry.
    let agents: Vec<String> = mesh.pods().iter().map(|p| p.agent.clone()).collect();
    for agent in &agents {
        mesh.stop(agent)
            .await
            .map_err(|e| format!("{agent}: {e}"))?;
    }
    for agent in &agents {
        mesh.start(agent)
            .await
            .map_err(|e| format!("{agent}: {e}"))?;
    }
    let mut before = Vec::new();
    for agent in &agents {
        before.push(agent_cert(mesh, agent).await?.0);
    }
    let window = ttl / 2;
    // Longer than the window, short enough that the agents' retries (500 ms
    // doubling) land before expiry.
    let outage = window + (ttl / 20).max(Duration::from_secs(1));
    let traffic = Traffic::start(mesh, b"vault outage\n")?;
    let steps = async {
        let bao = mesh.vault().ok_or("no Vault in this run")?;
        bao.seal().await?;
        let sealed = Instant::now();
        eprintln!(
            "e2e: OpenBao sealed for {:.1} s (rotation window {:.1} s, TTL {:.1} s)",
            outage.as_secs_f64(),
            window.as_secs_f64(),
            ttl.as_secs_f64()
        );
        tokio::time::sleep(outage).await;
        // Nobody could renew: every agent still holds the serial it had.
        let mut stuck = 0;
        for (agent, serial) in agents.iter().zip(&before) {
            if agent_cert(mesh, agent).await?.0 == *serial {
                stuck += 1;
            }
        }
        bao.unseal().await?;
        let down = sealed.elapsed();
        ensure(stuck == agents.len(), || {
            format!(
                "{} of {} agents renewed while Vault was sealed",
                agents.len() - stuck,
                agents.len()
            )
        })?;
        for (agent, serial) in agents.iter().zip(&before) {
            crate::client::eventually(ttl, &format!("{agent} renews after the outage"), || async {
                let now = agent_cert(mesh, agent).await?.0;
                if now != *serial {
                    Ok(())
                } else {
                    Err(format!("still {now}"))
                }
            })
            .await?;
        }
        Ok::<Duration, String>(down)
    }
    .await;
    let counted = traffic.finish().await?;
    if steps.is_err()
        && let Some(bao) = mesh.vault()
    {
        let _ = bao.unseal().await;
    }
    let down = steps?;
    ensure(down > window, || {
        format!("the outage ({down:?}) was not longer than a rotation window ({window:?})")
    })?;
    counted.check(&format!("a {down:?} Vault outage"))
}
