//! revocation-by-ttl: deleting a pod from the cluster makes its token stop
//! authenticating; its agent cannot renew; its last certificate works until
//! it expires and is refused after; every other pod is unaffected.

use std::time::{Duration, SystemTime};

use meshid_common::ca_client::{CaClient, CaClientConfig, CallOptions};
use meshid_common::{KeyType, PrivateKey};

use super::ensure;
use super::rotation::agent_cert;
use crate::case;
use crate::client::{Tester, eventually, mtls_echo};
use crate::report::Report;
use crate::topology::Topology;

const SUITE: &str = "revocation-by-ttl";
/// The pod this suite deletes.
pub const VICTIM: &str = "legacy";

pub async fn run(mesh: &mut impl Topology, report: &mut Report) {
    case!(
        report,
        SUITE,
        "deleted_pod_is_revoked_by_ttl",
        deleted_pod_is_revoked_by_ttl(mesh)
    );
}

/// One case, because its steps are one story in time: delete, the token is
/// refused, the last cert still works, then it expires and is refused,
/// while a neighbour keeps working throughout.
async fn deleted_pod_is_revoked_by_ttl(mesh: &mut impl Topology) -> Result<(), String> {
    let victim = mesh
        .pods()
        .iter()
        .find(|p| p.name == VICTIM)
        .cloned()
        .ok_or("no victim pod in the topology")?;
    let neighbour = mesh
        .pods()
        .iter()
        .find(|p| p.name != VICTIM)
        .cloned()
        .ok_or("no neighbour pod")?;
    let tester = Tester::from_ca(
        mesh,
        "tester",
        "tester-revocation",
        Duration::from_secs(600),
    )
    .await?;
    // The victim's own token, minted while its pod still exists.
    let token = mesh
        .token_for(&victim.namespace, &victim.service_account, &victim.name)
        .await
        .map_err(|e| e.to_string())?;
    let (_, _, not_after) = agent_cert(mesh, &victim.agent).await?;

    mesh.delete_workload(&victim.name)
        .await
        .map_err(|e| e.to_string())?;

    // 1. Its token no longer authenticates.
    let root = mesh.ca_root_pem().map_err(|e| e.to_string())?;
    let client =
        CaClient::new(CaClientConfig::new(mesh.ca_address(), root)).map_err(|e| e.to_string())?;
    let status = eventually(
        Duration::from_secs(5),
        "the deleted pod's token is refused",
        || async {
            let key = PrivateKey::generate(KeyType::EcdsaP256).map_err(|e| e.to_string())?;
            match client
                .sign(
                    key,
                    &victim.id,
                    Duration::from_secs(60),
                    CallOptions {
                        token: Some(&token),
                        impersonate: None,
                    },
                )
                .await
            {
                Ok(_) => Err("the CA still signs for the deleted pod".to_string()),
                Err(e) => Ok(e.to_string()),
            }
        },
    )
    .await?;
    ensure(
        status.contains("Unauthenticated") || status.to_lowercase().contains("unauthenticated"),
        || format!("the CA refused with the wrong status: {status}"),
    )?;

    // 2. Its last certificate keeps working until it expires (if there is time left to see it).
    let left = not_after - meshid_common::cert::unix_secs(SystemTime::now());
    if left > 2 {
        mtls_echo(victim.inbound, &tester, &victim.id, b"still valid\n")
            .await
            .map_err(|e| {
                format!("the victim's last certificate stopped working before it expired: {e}")
            })?;
    }

    // 3. After expiry it is refused (the agent cannot renew; whatever the proxy offers is expired or nothing).
    let wait = Duration::from_secs(left.max(0) as u64 + 2);
    tokio::time::sleep(wait).await;
    ensure(
        mtls_echo(victim.inbound, &tester, &victim.id, b"expired\n")
            .await
            .is_err(),
        || "the victim still completes mTLS after its certificate expired".into(),
    )?;
    let r = mesh
        .admin_get(&victim.agent, "/ready")
        .await
        .map_err(|e| e.to_string())?;
    ensure(r.status != 200, || {
        "the victim's agent reports ready without a valid certificate".into()
    })?;

    // 4. A neighbour is unaffected.
    mtls_echo(neighbour.inbound, &tester, &neighbour.id, b"neighbour\n")
        .await
        .map_err(|e| format!("neighbour {} was affected: {e}", neighbour.name))
        .map(|_| ())
}
