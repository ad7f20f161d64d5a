//! Sandboxes: the containers owning a pod's or a node's network namespace
//! (running the echo app and relaying loopback-only ports), and the
//! containers that join them.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;

use testcontainers::core::{IntoContainerPort, Mount};
use testcontainers::{ContainerRequest, GenericImage, ImageExt};

use super::container::{Probe, free_port, loopback, publish_on_loopback};
use super::{APP, DockerMesh, FORWARD_BASE, POD_DIR, error};
use crate::Error;

/// A started sandbox (see [`DockerMesh::start_sandbox`]).
#[derive(Debug)]
pub(super) struct Sandbox {
    /// Its container id, whose network namespace others join.
    pub(super) id: String,
    /// Its address on the run's network.
    pub(super) ip: IpAddr,
    /// (port inside, where it is published on the host)
    pub(super) published: Vec<(u16, SocketAddr)>,
}

impl Sandbox {
    /// Where `port` inside the sandbox is published on the host.
    pub(super) fn host(&self, port: u16) -> SocketAddr {
        self.published
            .iter()
            .find(|(p, _)| *p == port)
            .map(|(_, h)| *h)
            .expect("every forwarded port is published")
    }
}

impl DockerMesh {
    /// A container joining `sandbox`'s network namespace, with the pod's directory at `/pod`.
    pub(super) fn pod_request(
        &self,
        image: &str,
        docker_name: &str,
        service: &str,
        pod_dir: &Path,
        sandbox_id: &str,
    ) -> ContainerRequest<GenericImage> {
        let netns = format!("container:{sandbox_id}");
        self.request(image, docker_name, service)
            .with_mount(Mount::bind_mount(pod_dir.display().to_string(), POD_DIR))
            .with_working_dir(POD_DIR)
            .with_host_config_modifier(move |hc| {
                hc.network_mode = Some(netns.clone());
                hc.publish_all_ports = Some(false);
                hc.port_bindings = None;
            })
    }

    /// Starts a sandbox: the container owning a network namespace on the
    /// run's network (a pod's or a node's; an ambient workload's is its app
    /// alone). It runs the echo app on `app_ip:APP` and relays
    /// `FORWARD_BASE + port` to each of the `forwarded` ports on its
    /// loopback; those relays and the `direct` ports are published on
    /// 127.0.0.1. `APP` must be among them: it is the readiness probe.
    pub(super) async fn start_sandbox(
        &mut self,
        component: &str,
        docker_name: &str,
        app_ip: Ipv4Addr,
        forwarded: &[u16],
        direct: &[u16],
    ) -> Result<Sandbox, Error> {
        let published: Vec<(u16, SocketAddr)> = forwarded
            .iter()
            .chain(direct)
            .map(|&p| free_port().map(|host| (p, loopback(host))))
            .collect::<Result<_, _>>()?;
        let mut cmd = vec![
            "/usr/local/bin/meshid-echo".to_string(),
            "--listen".into(),
            format!("{app_ip}:{APP}"),
        ];
        for port in forwarded {
            cmd.push("--forward".into());
            cmd.push(format!("0.0.0.0:{}=127.0.0.1:{port}", FORWARD_BASE + port));
        }
        let mut request = self
            .request(&self.images.mesh.reference, docker_name, "meshid-echo")
            .with_cmd(cmd)
            .with_network(&self.run);
        for (port, host) in &published {
            let inside = if forwarded.contains(port) {
                FORWARD_BASE + port
            } else {
                *port
            };
            request = request.with_mapped_port(host.port(), inside.tcp());
        }
        let request = request.with_host_config_modifier(publish_on_loopback);
        let mut sandbox = Sandbox {
            id: String::new(),
            ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            published,
        };
        let container = self
            .launch(component, request, Probe::Echo(sandbox.host(APP)))
            .await?;
        sandbox.id = container.id().to_owned();
        sandbox.ip = container
            .get_bridge_ip_address()
            .await
            .map_err(|e| error(format!("address of {docker_name}"), e))?;
        Ok(sandbox)
    }
}
