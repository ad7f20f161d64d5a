//! The pieces a docker mesh is made of: how the harness probes a
//! component, one container and its logs, the run's network, and small
//! helpers for ports and images.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use testcontainers::bollard::models::HostConfig;
use testcontainers::{ContainerAsync, GenericImage};

use super::cli;
use crate::Error;
use crate::http::{self, Response};

/// A loopback port for a published container port (Docker binds it next;
/// [`crate::ports`]).
pub(super) fn free_port() -> Result<u16, Error> {
    Ok(crate::ports::reserve()?.port())
}

pub(super) fn loopback(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
}

pub(super) fn mkdir(path: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(path).map_err(|e| Error::io(path, e))
}

pub(super) fn image_of(reference: &str) -> GenericImage {
    let (name, tag) = reference.rsplit_once(':').unwrap_or((reference, "latest"));
    GenericImage::new(name, tag)
}

/// Publishes every mapped port on 127.0.0.1 only (testcontainers binds 0.0.0.0).
pub(super) fn publish_on_loopback(hc: &mut HostConfig) {
    if let Some(bindings) = hc.port_bindings.as_mut() {
        for list in bindings.values_mut().flatten() {
            for b in list.iter_mut() {
                b.host_ip = Some(Ipv4Addr::LOCALHOST.to_string());
            }
        }
    }
}

/// How the harness knows a component is ready.
#[derive(Clone, Copy, Debug)]
pub(super) enum Probe {
    /// `GET /ready` answers 200 at this (published) admin address.
    Ready(SocketAddr),
    /// The echo app answers at this (published) address.
    Echo(SocketAddr),
}

impl Probe {
    pub(super) fn addr(self) -> SocketAddr {
        match self {
            Probe::Ready(a) | Probe::Echo(a) => a,
        }
    }

    /// `Ok` when ready; otherwise what was seen.
    pub(super) async fn check(self) -> Result<(), String> {
        match self {
            Probe::Ready(addr) => match http::get(addr, "/ready", Duration::from_secs(2)).await {
                Ok(Response { status: 200, .. }) => Ok(()),
                Ok(r) => Err(format!("/ready answered {}: {}", r.status, r.body.trim())),
                Err(e) => Err(e.to_string()),
            },
            Probe::Echo(addr) => crate::client::plain_echo(addr, b"ready?\n").await,
        }
    }
}

/// One container of the mesh.
#[derive(Debug)]
pub(super) struct Component {
    /// `None` once removed.
    pub(super) container: Option<ContainerAsync<GenericImage>>,
    /// The container's name (`docker logs <name>`).
    pub(super) docker_name: String,
    pub(super) probe: Probe,
}

impl Component {
    pub(super) fn container(&self, name: &str) -> Result<&ContainerAsync<GenericImage>, Error> {
        self.container
            .as_ref()
            .ok_or_else(|| Error::Setup(format!("{name} has been removed")))
    }

    /// stdout so far, then stderr.
    pub(super) async fn logs(&self) -> String {
        let Some(c) = self.container.as_ref() else {
            return String::new();
        };
        let out = c.stdout_to_vec().await.unwrap_or_default();
        let err = c.stderr_to_vec().await.unwrap_or_default();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&err)
        )
    }

    pub(super) async fn log_tail(&self, lines: usize) -> String {
        let text = self.logs().await;
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// The run's network; removes it (after sweeping any container of the run
/// still on it) when dropped without a teardown.
#[derive(Debug)]
pub(super) struct Network {
    pub(super) name: String,
    pub(super) gateway: IpAddr,
    pub(super) label: String,
    pub(super) removed: bool,
}

impl Network {
    /// Sweeps the run's containers that are left and removes the network.
    fn remove_blocking(&mut self) {
        if !self.removed {
            cli::remove_labelled_containers_blocking(&self.label);
            cli::remove_network_blocking(&self.name);
            self.removed = true;
        }
    }

    pub(super) async fn remove(&mut self) {
        if self.removed {
            return;
        }
        self.removed = true;
        let (label, name) = (self.label.clone(), self.name.clone());
        let _ = tokio::task::spawn_blocking(move || {
            cli::remove_labelled_containers_blocking(&label);
            cli::remove_network_blocking(&name);
        })
        .await;
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        self.remove_blocking();
    }
}
