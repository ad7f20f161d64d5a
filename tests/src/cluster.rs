//! What the harness does as "the cluster" on every backend: the CA's
//! plugged-in certificate files (the `cacerts` secret) and how they are
//! written; the ambient nodes' registry entries, ztunnel tokens and routes.

use std::path::Path;
use std::time::Duration;

use meshid_ca::token::{TokenClaims, TokenIssuer};
use meshid_common::registry::{Node, Registry, Workload};
use meshid_common::{CaOptions, CertificateAuthority};

use crate::Error;
use crate::spec::NodeSpec;
use crate::topology::Mode;

/// The ztunnel's own service account, trusted to impersonate (the CA's
/// `CA_TRUSTED_NODE_ACCOUNTS` default).
pub const ZTUNNEL_NAMESPACE: &str = "istio-system";
pub const ZTUNNEL_SERVICE_ACCOUNT: &str = "ztunnel";

/// Registers ambient node `node` and its ztunnel's pod (`ztunnel-<node>`).
pub fn register_node(registry: &mut Registry, node: &str) {
    registry.upsert_node(Node {
        name: node.into(),
        uid: format!("uid-{node}"),
    });
    registry.upsert_workload(Workload {
        name: format!("ztunnel-{node}"),
        namespace: ZTUNNEL_NAMESPACE.into(),
        service_account: ZTUNNEL_SERVICE_ACCOUNT.into(),
        node: node.into(),
        uid: format!("uid-ztunnel-{node}"),
        address: None,
        mode: Some("node-proxy".into()),
    });
}

/// Registers ambient workload `default/<name>` on `node` at `address` (its pod address).
pub fn register_ambient_workload(
    registry: &mut Registry,
    name: &str,
    service_account: &str,
    node: &str,
    address: String,
) {
    registry.upsert_workload(Workload {
        name: name.into(),
        namespace: "default".into(),
        service_account: service_account.into(),
        node: node.into(),
        uid: format!("uid-default-{name}"),
        address: Some(address),
        mode: Some("ambient".into()),
    });
}

/// The token of `node`'s ztunnel: its own service account, bound to its pod and node.
pub fn ztunnel_token(issuer: &TokenIssuer, node: &str) -> Result<String, Error> {
    let claims = TokenClaims::for_pod(
        ZTUNNEL_NAMESPACE,
        ZTUNNEL_SERVICE_ACCOUNT,
        &format!("ztunnel-{node}"),
        &format!("uid-ztunnel-{node}"),
        node,
        &format!("uid-{node}"),
    )
    .valid_for(Duration::from_secs(3600));
    issuer
        .mint(&claims)
        .map_err(|e| Error::Setup(format!("ztunnel token for {node}: {e}")))
}

/// Where the outbound routes of node `n`'s workloads lead: the first
/// workload of the next node (HBONE across nodes); none with a single node.
pub fn outbound_target(nodes: &[NodeSpec], n: usize) -> Option<&str> {
    let next = &nodes[(n + 1) % nodes.len()];
    (next.name != nodes[n].name)
        .then(|| next.workloads.first().map(|(name, _)| name.as_str()))
        .flatten()
}

/// Plugged-in CA material as Istio recommends (an offline root A and an
/// intermediate A that signs workloads), so the root-rotation case has a
/// root A to rotate away from.
pub fn plugged_ca_files(trust_domain: &str) -> Result<Vec<(&'static str, String)>, Error> {
    let setup = |e: meshid_common::Error| Error::Setup(format!("plugged-in CA: {e}"));
    let root = CertificateAuthority::self_signed_root(&CaOptions {
        common_name: Some("meshid e2e root A".into()),
        ..CaOptions::new(trust_domain, Duration::from_secs(86_400 * 30))
    })
    .map_err(setup)?;
    let inter = root
        .issue_intermediate(&CaOptions {
            common_name: Some("meshid e2e intermediate A".into()),
            ..CaOptions::new(trust_domain, Duration::from_secs(86_400 * 7))
        })
        .map_err(setup)?;
    Ok(vec![
        ("ca-cert.pem", inter.cert_pem()),
        ("ca-key.pem", inter.key().to_pkcs8_pem().to_string()),
        (
            "cert-chain.pem",
            format!("{}{}", inter.cert_pem(), root.cert_pem()),
        ),
        ("root-cert.pem", root.cert_pem()),
    ])
}

/// Writes CA files atomically (temp file + rename), keys with mode 0600.
pub fn write_ca_files(dir: &Path, files: &[(&str, String)]) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    for (name, contents) in files {
        let path = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, contents).map_err(|e| Error::io(&tmp, e))?;
        if name.contains("key") {
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| Error::io(&tmp, e))?;
        }
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
    }
    Ok(())
}

/// Publishes the CA's root bundle to every pod and node of a run directory,
/// as istiod does with its `istio-ca-root-cert` ConfigMap (mounted where
/// `CA_ROOT_CA` points): `<dir>/{pods,nodes}/<name>/var/run/secrets/istio/root-cert.pem`.
pub fn publish_roots<'a>(
    dir: &Path,
    pods: impl IntoIterator<Item = &'a str>,
    nodes: impl IntoIterator<Item = &'a str>,
    roots: &str,
) -> Result<(), Error> {
    let targets = pods
        .into_iter()
        .map(|p| dir.join("pods").join(p))
        .chain(nodes.into_iter().map(|n| dir.join("nodes").join(n)));
    for base in targets {
        let path = base.join("var/run/secrets/istio/root-cert.pem");
        std::fs::write(&path, roots).map_err(|e| Error::io(&path, e))?;
    }
    Ok(())
}

/// Removes pod `pod` from the registry and saves it (atomically): deleting a
/// pod, as far as the CA and the ztunnels can tell.
pub fn delete_workload(registry: &mut Registry, path: &Path, pod: &str) -> Result<(), Error> {
    let ns = registry
        .workloads
        .iter()
        .find(|w| w.name == pod)
        .map(|w| w.namespace.clone())
        .ok_or_else(|| Error::Setup(format!("no workload named {pod:?}")))?;
    registry.remove_workload(&ns, pod);
    save_registry(registry, path)
}

/// Writes the registry file atomically.
pub fn save_registry(registry: &Registry, path: &Path) -> Result<(), Error> {
    registry
        .write_atomic(path)
        .map_err(|e| Error::Setup(format!("registry: {e}")))
}

/// Updates the CA's `cacerts` under `<dir>/ca/cacerts` (mounted into the CA
/// on every backend) and, when the root bundle changes, publishes it to every
/// pod and node.
pub fn update_ca_files<'a>(
    dir: &Path,
    pods: impl IntoIterator<Item = &'a str>,
    nodes: impl IntoIterator<Item = &'a str>,
    files: &[(&str, String)],
) -> Result<(), Error> {
    write_ca_files(&dir.join("ca/cacerts"), files)?;
    if let Some((_, roots)) = files.iter().find(|(n, _)| *n == "root-cert.pem") {
        publish_roots(dir, pods, nodes, roots)?;
    }
    Ok(())
}

/// Writes pod `pod`'s PeerAuthentication-shaped policy file
/// (`<dir>/pods/<pod>/policy.yaml`), which its proxy reloads on change.
pub fn write_policy(dir: &Path, pod: &str, mode: Mode) -> Result<(), Error> {
    let path = dir.join("pods").join(pod).join("policy.yaml");
    std::fs::write(&path, policy_yaml(mode)).map_err(|e| Error::io(&path, e))
}

/// A PeerAuthentication-shaped policy of one mode, as the shim reads it
/// (its policy file, or `PUT /policy` on its admin port).
pub fn policy_yaml(mode: Mode) -> String {
    format!("mtls:\n  mode: {}\n", mode.as_str())
}
