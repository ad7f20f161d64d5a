//! The ambient nodes on docker: each workload an echo container, each
//! node a sandbox with its ztunnel.

use std::net::Ipv4Addr;

use meshid_common::SpiffeId;
use testcontainers::ImageExt;
use testcontainers::core::{AccessMode, Mount};

use super::container::Probe;
use super::{APP, CA_GRPC, DockerMesh, HBONE, ZTUNNEL_ADMIN, ZTUNNEL_OUTBOUND_BASE};
use crate::Error;
use crate::backend::write;
use crate::cluster::{outbound_target, register_ambient_workload, register_node, ztunnel_token};
use crate::topology::Ambient;

impl DockerMesh {
    /// The ambient nodes, as the process backend has them: each workload a
    /// container whose address on the run's network is its pod address in
    /// the registry; each node a sandbox owning the node's network namespace
    /// (relaying the ztunnel's loopback admin and outbound listeners) and
    /// the ztunnel in it, with its own token, HBONE on the node's address
    /// and the other nodes as `--peer`s. Each workload's outbound listener
    /// leads to the first workload of the next node.
    pub(super) async fn start_nodes(&mut self) -> Result<(), Error> {
        let nodes = self.state.spec.nodes.clone();
        // The workloads first: their addresses go into the registry.
        let mut ambient = Vec::new();
        for node in &nodes {
            register_node(&mut self.state.registry, &node.name);
            for (name, sa) in &node.workloads {
                let sandbox = self
                    .start_sandbox(
                        &format!("{name}/app"),
                        &format!("{}-{name}", self.run),
                        Ipv4Addr::UNSPECIFIED,
                        &[],
                        &[APP],
                    )
                    .await?;
                register_ambient_workload(
                    &mut self.state.registry,
                    name,
                    sa,
                    &node.name,
                    sandbox.ip.to_string(),
                );
                self.pod_ips.insert(name.clone(), sandbox.ip);
                ambient.push(Ambient {
                    name: name.clone(),
                    namespace: "default".into(),
                    service_account: sa.clone(),
                    node: node.name.clone(),
                    id: SpiffeId::for_service_account(&self.state.spec.trust_domain, "default", sa)
                        .map_err(|e| Error::Setup(e.to_string()))?,
                    app: sandbox.host(APP),
                    outbound: None,
                    ztunnel: format!("{}/ztunnel", node.name),
                });
            }
        }
        self.state.save_registry()?;
        let root = self.state.root_pem()?;
        // The nodes' sandboxes next: every ztunnel names the others' addresses.
        let mut sandboxes = Vec::new();
        for node in &nodes {
            let node_dir = self.state.dir.join("nodes").join(&node.name);
            write(
                &node_dir.join("var/run/secrets/tokens/istio-token"),
                &ztunnel_token(&self.state.issuer, &node.name)?,
            )?;
            write(&node_dir.join("var/run/secrets/istio/root-cert.pem"), &root)?;
            let mut forwarded = vec![ZTUNNEL_ADMIN, APP];
            forwarded.extend((0..node.workloads.len()).map(|k| ZTUNNEL_OUTBOUND_BASE + k as u16));
            let sandbox = self
                .start_sandbox(
                    &format!("{}/sandbox", node.name),
                    &format!("{}-{}", self.run, node.name),
                    Ipv4Addr::LOCALHOST,
                    &forwarded,
                    &[],
                )
                .await?;
            self.node_ips.insert(node.name.clone(), sandbox.ip);
            sandboxes.push((node_dir, sandbox));
        }
        for (n, (node, (node_dir, sandbox))) in nodes.iter().zip(&sandboxes).enumerate() {
            let mut cmd = vec![
                "/usr/local/bin/meshid-ztunnel".to_string(),
                "--ca-address".into(),
                format!("https://{}:{CA_GRPC}", self.ca_container),
                "--trust-domain".into(),
                self.state.spec.trust_domain.clone(),
                "--node-name".into(),
                node.name.clone(),
                "--registry-file".into(),
                "/cluster/registry.json".into(),
                "--secret-ttl".into(),
                format!("{}s", self.state.spec.ttl.as_secs()),
                "--hbone-addr".into(),
                format!("0.0.0.0:{HBONE}"),
                "--admin-addr".into(),
                format!("127.0.0.1:{ZTUNNEL_ADMIN}"),
            ];
            cmd.extend(self.state.spec.backoff_args());
            for (other, (_, s)) in nodes.iter().zip(&sandboxes) {
                if other.name != node.name {
                    cmd.push("--peer".into());
                    cmd.push(format!("{}={}:{HBONE}", other.name, s.ip));
                }
            }
            let target = outbound_target(&nodes, n)
                .and_then(|t| ambient.iter().find(|a| a.name == t))
                .map(|t| (t.name.clone(), self.pod_ips[&t.name]));
            if let Some((target, ip)) = target {
                for (k, a) in ambient
                    .iter_mut()
                    .filter(|a| a.node == node.name)
                    .enumerate()
                {
                    let listen = ZTUNNEL_OUTBOUND_BASE + k as u16;
                    cmd.push("--outbound".into());
                    cmd.push(format!(
                        "{}/{}@127.0.0.1:{listen}={ip}:{APP}",
                        a.namespace, a.name
                    ));
                    a.outbound = Some((sandbox.host(listen), target.clone()));
                }
            }
            let component = format!("{}/ztunnel", node.name);
            let request = self
                .pod_request(
                    &self.images.mesh.reference,
                    &format!("{}-{}-ztunnel", self.run, node.name),
                    "meshid-ztunnel",
                    node_dir,
                    &sandbox.id,
                )
                .with_mount(
                    Mount::bind_mount(
                        self.state.dir.join("cluster").display().to_string(),
                        "/cluster",
                    )
                    .with_access_mode(AccessMode::ReadOnly),
                )
                .with_cmd(cmd);
            self.launch(
                &component,
                request,
                Probe::Ready(sandbox.host(ZTUNNEL_ADMIN)),
            )
            .await?;
        }
        self.state.ambient = ambient;
        Ok(())
    }
}
