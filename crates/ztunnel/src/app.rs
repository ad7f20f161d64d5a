//! A running ztunnel: [`App::build`] binds every listener, starts following
//! the registry and fetching certificates, and returns the bound addresses;
//! [`App::shutdown`] stops accepting and drains connections.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use meshid_common::registry::{Registry, RegistryWatcher};
use meshid_common::serve::Drain;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin::Admin;
use crate::certs::{CertManager, CertSettings};
use crate::config::{Config, DEFAULT_HBONE_PORT, OutboundRoute, RegistrySource};
use crate::connlog::{ConnLog, ConnRecord};
use crate::directory::Directory;
use crate::error::{Error, Result};
use crate::inbound::Inbound;
use crate::metrics::Metrics;
use crate::outbound::{Outbound, Route};
use crate::policy::Policies;
use crate::pool::Pool;
use meshid_common::identity::{CaSource, CertificateSource, Clock};

/// How long [`App::shutdown`] lets open connections finish.
pub const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// How often the HBONE pool lets go of closed and expiring connections.
pub const POOL_SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// A running ztunnel. Dropping it stops everything at once; [`App::shutdown`]
/// drains first.
#[derive(Debug)]
pub struct App {
    config: Config,
    hbone_addr: SocketAddr,
    plaintext_addr: Option<SocketAddr>,
    admin_addr: SocketAddr,
    capture_addr: Option<SocketAddr>,
    outbound_addrs: Vec<SocketAddr>,
    certs: CertManager,
    directory: watch::Receiver<Arc<Directory>>,
    metrics: Arc<Metrics>,
    outbound: Arc<Outbound>,
    admin: Arc<Admin>,
    drain: Drain,
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Listen { what, addr, source })
}

impl App {
    /// A ztunnel asking the CA of `config` for its workloads' certificates,
    /// following the registry of `config` (the file, or the Kubernetes API).
    pub async fn build(config: Config) -> Result<App> {
        let source = Arc::new(CaSource::new(&config.ca)?);
        Self::build_with_source(config, source).await
    }

    /// As [`App::build`], with another certificate source (tests, benches).
    pub async fn build_with_source(
        config: Config,
        source: Arc<dyn CertificateSource>,
    ) -> Result<App> {
        let registry = match config.registry_source {
            RegistrySource::File => {
                RegistryWatcher::spawn(&config.registry_file, config.registry_poll)?.subscribe()
            }
            #[cfg(feature = "kube")]
            RegistrySource::Kube => crate::kube_registry::KubeRegistry::connect(&config.node_name)
                .await?
                .subscribe(),
            #[cfg(not(feature = "kube"))]
            RegistrySource::Kube => {
                return Err(Error::Config(
                    "the Kubernetes registry needs a meshid-ztunnel built with feature `kube`"
                        .into(),
                ));
            }
        };
        Self::build_with_registry(config, source, registry).await
    }

    /// As [`App::build`], with a certificate source and a registry of the caller's.
    pub async fn build_with(
        config: Config,
        source: Arc<dyn CertificateSource>,
        registry: RegistryWatcher,
    ) -> Result<App> {
        Self::build_with_registry(config, source, registry.subscribe()).await
    }

    /// As [`App::build_with`], following any publisher of registries (the
    /// file watcher, the Kubernetes API, a test's own channel).
    pub async fn build_with_registry(
        config: Config,
        source: Arc<dyn CertificateSource>,
        mut registry_rx: watch::Receiver<Arc<Registry>>,
    ) -> Result<App> {
        config.validate()?;
        let metrics = Arc::new(Metrics::new());
        let certs = CertManager::new(
            source,
            CertSettings {
                ca: config.ca.clone(),
                max_concurrent_fetches: config.max_concurrent_fetches,
                cert_wait: config.cert_wait,
                clock: Clock::System,
            },
            metrics.clone(),
        );
        let drain = Drain::new();
        let connlog = Arc::new(ConnLog::default());

        // The registry, indexed for this node; certificates follow it.
        let first = Directory::build(
            &registry_rx.borrow_and_update(),
            &config.node_name,
            &config.trust_domain,
        );
        certs.set_identities(first.local_identities());
        tracing::info!(
            node = %config.node_name,
            local_identities = first.local_identities().len(),
            "workload registry loaded"
        );
        let (dir_tx, directory) = watch::channel(Arc::new(first));
        {
            let certs = certs.clone();
            let cancel = drain.stopping().clone();
            let (node, td) = (config.node_name.clone(), config.trust_domain.clone());
            drain.spawn(async move {
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        r = registry_rx.changed() => if r.is_err() { return },
                    }
                    let dir = Directory::build(&registry_rx.borrow_and_update(), &node, &td);
                    let ids: HashSet<_> = dir.local_identities().clone();
                    certs.set_identities(&ids);
                    tracing::info!(local_identities = ids.len(), "workload registry changed");
                    dir_tx.send_replace(Arc::new(dir));
                }
            });
        }

        let (policies_tx, policies_rx) =
            watch::channel(Arc::new(Policies::new(config.policies.clone())));
        if let Some(path) = &config.policy_file {
            tokio::spawn(crate::policy::watch_policy_file(
                path.clone(),
                config.registry_poll,
                policies_tx,
            ));
        }
        let hbone = bind("HBONE", config.hbone_addr).await?;
        let hbone_addr = hbone.local_addr().map_err(|source| Error::Listen {
            what: "HBONE",
            addr: config.hbone_addr,
            source,
        })?;
        let inbound = Arc::new(Inbound {
            trust_domain: config.trust_domain.clone(),
            trust_domain_aliases: config.trust_domain_aliases.clone(),
            directory: directory.clone(),
            certs: certs.clone(),
            policies: policies_rx,
            metrics: metrics.clone(),
            connlog: connlog.clone(),
            connect_timeout: config.connect_timeout,
            node_hbone_ip: Some(hbone_addr.ip()).filter(|ip| !ip.is_unspecified()),
        });
        inbound.clone().serve_hbone(hbone, &drain);
        let plaintext_addr = match config.inbound_plaintext_addr {
            Some(addr) => {
                let l = bind("plaintext inbound", addr).await?;
                let bound = l.local_addr().ok();
                inbound.clone().serve_plaintext(l, &drain);
                bound
            }
            None => None,
        };

        let admin_listener = bind("admin", config.admin_addr).await?;
        let admin_addr = admin_listener.local_addr().unwrap_or(config.admin_addr);
        let admin = Arc::new(Admin {
            node: config.node_name.clone(),
            certs: certs.clone(),
            directory: directory.clone(),
            metrics: metrics.clone(),
            connlog: connlog.clone(),
        });
        admin.clone().router().serve(admin_listener, &drain);

        let outbound = Arc::new(Outbound {
            node: config.node_name.clone(),
            directory: directory.clone(),
            certs: certs.clone(),
            pool: Pool::new(config.connect_timeout, metrics.clone()),
            metrics: metrics.clone(),
            connlog: connlog.clone(),
            local_hbone: hbone_addr,
            peers: std::sync::RwLock::new(config.peers.clone()),
            default_hbone_port: DEFAULT_HBONE_PORT,
        });
        {
            let pool = outbound.pool.clone();
            let cancel = drain.stopping().clone();
            drain.spawn(async move {
                let mut tick = tokio::time::interval(POOL_SWEEP_INTERVAL);
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tick.tick() => {
                            let n = pool.sweep();
                            if n > 0 {
                                tracing::debug!(released = n, "HBONE pool swept");
                            }
                        }
                    }
                }
            });
        }
        let capture_addr = match config.outbound_capture_addr {
            Some(addr) => {
                let l = bind("outbound capture", addr).await?;
                let bound = l.local_addr().ok();
                outbound.clone().serve_captured(l, &drain);
                bound
            }
            None => None,
        };
        let mut app = App {
            config: config.clone(),
            hbone_addr,
            plaintext_addr,
            admin_addr,
            capture_addr,
            outbound_addrs: Vec::new(),
            certs,
            directory,
            metrics,
            outbound,
            admin,
            drain,
        };
        for route in &config.outbound {
            let bound = app.add_outbound(route).await?;
            app.outbound_addrs.push(bound);
        }
        tracing::info!(
            hbone = %hbone_addr,
            plaintext = ?plaintext_addr,
            admin = %admin_addr,
            capture = ?capture_addr,
            outbound = ?app.outbound_addrs,
            "ztunnel listening"
        );
        Ok(app)
    }

    /// Opens a process-mode outbound listener for `route` and returns its
    /// bound address (pass port 0 to pick one).
    pub async fn add_outbound(&self, route: &OutboundRoute) -> Result<SocketAddr> {
        let (namespace, pod) = route.source.split_once('/').ok_or_else(|| {
            Error::Config(format!(
                "outbound source {:?} is not NAMESPACE/POD",
                route.source
            ))
        })?;
        let listener = bind("outbound", route.listen).await?;
        let bound = listener.local_addr().map_err(|source| Error::Listen {
            what: "outbound",
            addr: route.listen,
            source,
        })?;
        let r = Route {
            namespace: namespace.to_owned(),
            pod: pod.to_owned(),
            destination: route.destination,
        };
        self.outbound.clone().serve(listener, r, &self.drain);
        Ok(bound)
    }

    /// Sets (or replaces) the HBONE address of `node`'s ztunnel.
    pub fn set_peer(&self, node: &str, addr: SocketAddr) {
        let mut peers = self.outbound.peers.write().expect("peers lock");
        peers.retain(|(n, _)| n != node);
        peers.push((node.to_owned(), addr));
    }

    /// The most recent proxied connections (as `/debug/connections`).
    pub fn recent_connections(&self) -> Vec<ConnRecord> {
        self.outbound.connlog.recent()
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn hbone_addr(&self) -> SocketAddr {
        self.hbone_addr
    }

    pub fn plaintext_addr(&self) -> Option<SocketAddr> {
        self.plaintext_addr
    }

    /// The transparent-capture listener, when `--capture` is on.
    pub fn capture_addr(&self) -> Option<SocketAddr> {
        self.capture_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Addresses of the outbound listeners of the config, in its order.
    pub fn outbound_addrs(&self) -> &[SocketAddr] {
        &self.outbound_addrs
    }

    pub fn certs(&self) -> &CertManager {
        &self.certs
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn directory(&self) -> Arc<Directory> {
        self.directory.borrow().clone()
    }

    /// The HBONE connection pool (tests check sharing).
    pub fn pool(&self) -> &Pool {
        &self.outbound.pool
    }

    /// Same answer as `/ready`.
    pub fn readiness(&self) -> std::result::Result<(), String> {
        self.admin.readiness()
    }

    /// Waits until every local identity has a certificate (or `timeout`).
    pub async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let counts = self.certs.counts();
            let available = counts
                .get(&crate::certs::CertState::Available)
                .copied()
                .unwrap_or(0);
            if available == self.certs.len() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!(
                        "warming up {} workload certificates ({available} available)",
                        self.certs.len()
                    ),
                    after: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops accepting, lets connections finish for [`DRAIN_GRACE`], then
    /// closes what is left.
    pub async fn shutdown(self) {
        self.drain.drain(DRAIN_GRACE).await;
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.drain.stop_now();
    }
}
