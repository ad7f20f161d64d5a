//! A sidecar pod on docker: its sandbox (echo app, relays, published
//! ports), the agent and the proxy (the shim or a real Envoy) joining it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;

use testcontainers::ImageExt;

use super::container::{Probe, loopback, mkdir};
use super::{
    AGENT_ADMIN, APP, CA_GRPC, DockerMesh, INBOUND, OUTBOUND, POD_DIR, PROXY_ADMIN, SDS_SOCKET,
};
use crate::Error;
use crate::backend::envoy::{EnvoyPod, envoy_bootstrap};
use crate::backend::write;
use crate::spec::PodSpec;
use crate::topology::{Pod, Proxy};

impl DockerMesh {
    pub(super) async fn start_pod(&mut self, pod: &PodSpec) -> Result<(), Error> {
        let (pod_dir, id) = self.state.prepare_pod(pod)?;
        mkdir(&pod_dir.join("var/run/secrets/workload-spiffe-uds"))?;
        crate::cluster::write_policy(&self.state.dir, &pod.name, pod.mode)?;

        // The sandbox: echo app, relays, and the published ports of the whole pod.
        let sandbox_name = format!("{}-{}", self.run, pod.name);
        let sandbox = self
            .start_sandbox(
                &format!("{}/app", pod.name),
                &sandbox_name,
                Ipv4Addr::LOCALHOST,
                &[AGENT_ADMIN, PROXY_ADMIN, OUTBOUND, APP],
                &[INBOUND],
            )
            .await?;
        let host_port = |p: u16| sandbox.host(p);
        let inbound = host_port(INBOUND);
        let sandbox_id = sandbox.id.clone();
        let ip = sandbox.ip;
        self.pod_ips.insert(pod.name.clone(), ip);

        // The agent.
        let agent = format!("{}/agent", pod.name);
        let request = self
            .pod_request(
                &self.images.mesh.reference,
                &format!("{sandbox_name}-agent"),
                "meshid-agent",
                &pod_dir,
                &sandbox_id,
            )
            .with_cmd(
                [
                    "/usr/local/bin/meshid-agent".to_string(),
                    "--ca-address".into(),
                    format!("https://{}:{CA_GRPC}", self.ca_container),
                    "--trust-domain".into(),
                    self.state.spec.trust_domain.clone(),
                    "--namespace".into(),
                    pod.namespace.clone(),
                    "--service-account".into(),
                    pod.service_account.clone(),
                    "--secret-ttl".into(),
                    format!("{}s", self.state.spec.ttl.as_secs()),
                    "--admin-addr".into(),
                    format!("127.0.0.1:{AGENT_ADMIN}"),
                    "--spiffe-endpoint-socket".into(),
                    "unix:///pod/var/run/secrets/workload-spiffe-uds/workload.sock".into(),
                ]
                .into_iter()
                .chain(self.state.spec.backoff_args()),
            );
        self.launch(&agent, request, Probe::Ready(host_port(AGENT_ADMIN)))
            .await?;

        // The proxy. Its outbound route goes to the pod started before it.
        let target = self.state.pods.last().cloned();
        let outbound = match &target {
            Some(t) => {
                let ip = self.pod_ips.get(&t.name).copied().ok_or_else(|| {
                    Error::Setup(format!("pod {} has no address on the network", t.name))
                })?;
                Some((SocketAddr::new(ip, INBOUND), t.id.clone(), t.name.clone()))
            }
            None => None,
        };
        let proxy_component = format!("{}/proxy", pod.name);
        let proxy_name = format!("{sandbox_name}-proxy");
        let request = match pod.proxy {
            Proxy::Shim => {
                let mut cmd = vec![
                    "/usr/local/bin/meshid-envoy-shim".to_string(),
                    "--inbound".into(),
                    format!("0.0.0.0:{INBOUND}"),
                    "--app".into(),
                    format!("127.0.0.1:{APP}"),
                    "--admin".into(),
                    format!("127.0.0.1:{PROXY_ADMIN}"),
                    "--sds-socket".into(),
                    SDS_SOCKET.into(),
                    "--node-id".into(),
                    format!(
                        "sidecar~{ip}~{}.{}~{}.svc.cluster.local",
                        pod.name, pod.namespace, pod.namespace
                    ),
                    "--cluster".into(),
                    format!("{}.{}", pod.name, pod.namespace),
                    "--trust-domain".into(),
                    self.state.spec.trust_domain.clone(),
                    "--policy".into(),
                    format!("{POD_DIR}/policy.yaml"),
                ];
                if let Some((dest, peer, _)) = &outbound {
                    cmd.push("--outbound".into());
                    cmd.push(format!("127.0.0.1:{OUTBOUND}={dest},{peer}"));
                }
                self.pod_request(
                    &self.images.mesh.reference,
                    &proxy_name,
                    "meshid-envoy-shim",
                    &pod_dir,
                    &sandbox_id,
                )
                .with_cmd(cmd)
            }
            Proxy::Envoy => {
                let bootstrap = envoy_bootstrap(&EnvoyPod {
                    pod,
                    trust_domain: &self.state.spec.trust_domain,
                    admin: loopback(PROXY_ADMIN),
                    inbound: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), INBOUND),
                    app: loopback(APP),
                    sds_socket: Path::new(SDS_SOCKET),
                    outbound: outbound
                        .as_ref()
                        .map(|(dest, peer, _)| (loopback(OUTBOUND), *dest, peer)),
                });
                write(&pod_dir.join("envoy.yaml"), &bootstrap)?;
                self.pod_request(
                    &self.images.envoy.reference,
                    &proxy_name,
                    "envoy",
                    &pod_dir,
                    &sandbox_id,
                )
                .with_cmd([
                    "-c",
                    "/pod/envoy.yaml",
                    "--disable-hot-restart",
                    "--concurrency",
                    "1",
                    "--log-level",
                    "warn",
                ])
            }
        };
        self.launch(
            &proxy_component,
            request,
            Probe::Ready(host_port(PROXY_ADMIN)),
        )
        .await?;

        self.state.pods.push(Pod {
            name: pod.name.clone(),
            namespace: pod.namespace.clone(),
            service_account: pod.service_account.clone(),
            id,
            proxy: pod.proxy,
            mode: pod.mode,
            inbound,
            outbound: outbound.map(|(_, _, name)| (host_port(OUTBOUND), name)),
            app: host_port(APP),
            agent,
            proxy_component,
        });
        Ok(())
    }
}
