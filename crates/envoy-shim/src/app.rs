//! [`App::build`]: binds every listener, starts SDS, the policy watcher and
//! the admin API, and returns the running proxy with its bound addresses.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use meshid_common::CredentialsRx;
use meshid_common::serve::Drain;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, broadcast};

use crate::admin::{self, Admin};
use crate::config::Config;
use crate::conn::{AccessEvent, AccessLog};
use crate::error::{Error, Result};
use crate::inbound::{self, Inbound};
use crate::metrics::Metrics;
use crate::outbound::{self, Outbound};
use crate::policy::{self, Policy, PolicyStore};
use crate::sds::{SdsClient, SdsConfig};

/// A running shim. Dropping it stops everything at once; [`App::shutdown`]
/// drains first.
#[derive(Debug)]
pub struct App {
    inbound_addr: SocketAddr,
    outbound_addrs: Vec<SocketAddr>,
    admin_addr: SocketAddr,
    sds: SdsClient,
    policy: PolicyStore,
    log: AccessLog,
    metrics: Arc<Metrics>,
    /// Stops accepting, then (after the grace period) cuts open
    /// connections; SDS, the policy watcher and admin run until then.
    drain: Drain,
    grace: Duration,
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { what, addr, source })
}

impl App {
    /// Validates `config`, binds the listeners and starts serving. Inbound
    /// and outbound refuse connections until SDS has delivered both secrets.
    pub async fn build(config: Config) -> Result<App> {
        config.validate()?;
        let metrics = Arc::new(Metrics::new());
        let log = AccessLog::new(metrics.clone());
        let drain = Drain::new();
        let abort = drain.aborting().clone();

        let initial = match &config.policy_file {
            Some(path) => policy::load_file(path).await?,
            None => Policy::mode(config.default_mode),
        };
        let policy = PolicyStore::new(initial);

        let inbound_l = bind("inbound", config.inbound_addr).await?;
        let admin_l = bind("admin", config.admin_addr).await?;
        let mut outbound_l = Vec::new();
        for route in &config.outbound {
            outbound_l.push(bind("outbound", route.listen).await?);
        }
        let inbound_addr = inbound_l.local_addr().map_err(|source| Error::Bind {
            what: "inbound",
            addr: config.inbound_addr,
            source,
        })?;
        let admin_addr = admin_l.local_addr().map_err(|source| Error::Bind {
            what: "admin",
            addr: config.admin_addr,
            source,
        })?;
        let outbound_addrs: Vec<SocketAddr> = outbound_l
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect();

        let sds = SdsClient::spawn(
            SdsConfig {
                socket: config.sds_socket.clone(),
                node_id: config.node_id.clone(),
                cluster: config.node_cluster.clone(),
                backoff_min: config.sds_backoff_min,
                backoff_max: config.sds_backoff_max,
            },
            metrics.clone(),
            abort.clone(),
        );
        let creds: CredentialsRx = sds.credentials();
        if let Some(path) = &config.policy_file {
            policy.spawn_file_watch(
                path.clone(),
                config.policy_poll,
                metrics.clone(),
                abort.clone(),
            );
        }

        let limit = Arc::new(Semaphore::new(config.max_connections));
        let inbound = Arc::new(Inbound {
            app_addr: config.app_addr,
            trust_domain: config.trust_domain.clone(),
            trust_domain_aliases: config.trust_domain_aliases.clone(),
            creds: creds.clone(),
            policy: policy.subscribe(),
            acceptor: inbound::acceptor(
                creds.clone(),
                &config.trust_domain,
                &config.trust_domain_aliases,
            )?,
            handshake_timeout: config.handshake_timeout,
            connect_timeout: config.connect_timeout,
            limit: limit.clone(),
            log: log.clone(),
            abort: abort.clone(),
        });
        inbound::serve(inbound_l, inbound, &drain);
        for (route, listener) in config.outbound.iter().zip(outbound_l) {
            let ctx = Arc::new(Outbound {
                dest: route.dest,
                tls: outbound::connector(
                    route,
                    &creds,
                    &config.trust_domain,
                    &config.trust_domain_aliases,
                )?,
                creds: creds.clone(),
                handshake_timeout: config.handshake_timeout,
                connect_timeout: config.connect_timeout,
                limit: limit.clone(),
                log: log.clone(),
                abort: abort.clone(),
            });
            outbound::serve(listener, ctx, &drain);
        }
        let admin = Arc::new(Admin {
            sds: sds.clone(),
            policy: policy.clone(),
            metrics: metrics.clone(),
        });
        // The admin API stays up while connections drain.
        admin::router(admin).serve(admin_l, &drain);

        tracing::info!(
            inbound = %inbound_addr,
            app = %config.app_addr,
            outbound = ?config
                .outbound
                .iter()
                .zip(&outbound_addrs)
                .map(|(r, bound)| format!(
                    "{bound}->{} ({})",
                    r.dest,
                    r.peer.as_ref().map(|p| p.as_str()).unwrap_or("plaintext")
                ))
                .collect::<Vec<_>>(),
            admin = %admin_addr,
            sds = %config.sds_socket.display(),
            mode = %policy.current().mode,
            "meshid-envoy-shim started; not ready until SDS delivers default and ROOTCA"
        );
        Ok(App {
            inbound_addr,
            outbound_addrs,
            admin_addr,
            sds,
            policy,
            log,
            metrics,
            drain,
            grace: config.drain_grace,
        })
    }

    pub fn inbound_addr(&self) -> SocketAddr {
        self.inbound_addr
    }

    /// One per configured outbound route, in order.
    pub fn outbound_addrs(&self) -> &[SocketAddr] {
        &self.outbound_addrs
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The credentials channel fed by SDS.
    pub fn credentials(&self) -> CredentialsRx {
        self.sds.credentials()
    }

    pub fn sds(&self) -> &SdsClient {
        &self.sds
    }

    pub fn policy(&self) -> &PolicyStore {
        &self.policy
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Every access event from now on.
    pub fn access_log(&self) -> broadcast::Receiver<AccessEvent> {
        self.log.subscribe()
    }

    /// Waits until both SDS secrets have arrived.
    pub async fn ready(&self, timeout: Duration) -> bool {
        let mut rx = self.credentials();
        tokio::time::timeout(timeout, rx.wait_for(|c| c.is_some()))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Stops accepting, lets open connections finish for the grace period,
    /// then cuts what is left.
    pub async fn shutdown(self) {
        self.drain.drain(self.grace).await;
        tracing::info!("shut down");
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.drain.stop_now();
    }
}
