//! A running agent: the secret manager, the SDS and Workload API servers on
//! their Unix sockets, the admin listener and (opt-in) the certificate file
//! writer, all run on one [`Drain`] and stopped by it. `main` and the tests build
//! the same [`App`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use meshid_common::CredentialsRx;
use meshid_common::identity::{
    CaSource, Clock, FirstFetch, JwtSource, TokenFile, Worker, WorkerConfig, WorkerParts,
};
use meshid_common::serve::Drain;
use meshid_common::{KeyType, SpiffeId};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::admin::{self, AdminState};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::jwt::JwtSvids;
use crate::metrics::Metrics;
use crate::output;
use crate::sds::SdsServer;
use crate::uds::UdsListener;
use crate::workload::WorkloadApiServer;

/// How long shutdown waits for the servers to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Concurrent HTTP/2 streams per connection on the sockets.
const MAX_STREAMS_PER_CONNECTION: u32 = 2048;

/// Parts tests may swap.
#[derive(Clone)]
pub struct Parts {
    pub source: Arc<dyn JwtSource>,
    pub clock: Clock,
}

impl std::fmt::Debug for Parts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parts").field("clock", &self.clock).finish()
    }
}

/// A running agent.
#[derive(Debug)]
pub struct App {
    config: Config,
    admin_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    manager: Arc<Worker>,
    metrics: Arc<Metrics>,
    drain: Drain,
}

impl App {
    /// Starts an agent that asks the Istio CA of `config`.
    pub async fn build(config: Config) -> Result<App> {
        let source = Arc::new(CaSource::new(&config.ca)?);
        Self::build_with(
            config,
            Parts {
                source,
                clock: Clock::System,
            },
        )
        .await
    }

    /// Starts an agent with the given certificate source and clock.
    pub async fn build_with(config: Config, parts: Parts) -> Result<App> {
        config.validate()?;
        let metrics = Arc::new(Metrics::new());
        let jwt_source = parts.source.clone();
        let manager = Worker::new(
            WorkerConfig {
                id: config.spiffe_id()?,
                key_type: config.ca.key_type,
                ttl: config.ca.ttl,
                policy: config.ca.policy,
                ca_timeout: config.ca.ca_timeout,
                on_behalf: false,
                first_fetch: FirstFetch::OnDemandOrAfter(config.first_fetch_delay),
                span: csr_span,
            },
            WorkerParts {
                source: parts.source,
                token: TokenFile::new(&config.ca.token_path),
                clock: parts.clock,
                events: metrics.clone(),
                limiter: None,
            },
        );
        let drain = Drain::new();
        let cancel = drain.stopping().clone();

        let admin_listener = TcpListener::bind(config.admin_addr)
            .await
            .map_err(|source| Error::Listen {
                what: "the admin address",
                addr: config.admin_addr.to_string(),
                source,
            })?;
        let admin_addr = admin_listener
            .local_addr()
            .map_err(|source| Error::Listen {
                what: "the admin address",
                addr: config.admin_addr.to_string(),
                source,
            })?;

        let metrics_listener = match config.metrics_addr {
            Some(addr) => {
                let listen_error = |source| Error::Listen {
                    what: "the metrics address",
                    addr: addr.to_string(),
                    source,
                };
                let l = TcpListener::bind(addr).await.map_err(listen_error)?;
                let bound = l.local_addr().map_err(listen_error)?;
                Some((l, bound))
            }
            None => None,
        };
        let metrics_addr = metrics_listener.as_ref().map(|(_, a)| *a);

        let sds_listener = UdsListener::bind(&config.sds_socket, config.socket_group)?;
        let api_listener = UdsListener::bind(&config.workload_api_socket, config.socket_group)?;

        drain.spawn(manager.clone().run(cancel.clone()));
        admin::router(AdminState {
            manager: manager.clone(),
            metrics: metrics.clone(),
        })
        .serve(admin_listener, &drain);
        if let Some((listener, _)) = metrics_listener {
            admin::metrics_router(AdminState {
                manager: manager.clone(),
                metrics: metrics.clone(),
            })
            .serve(listener, &drain);
        }
        let sds = SdsServer::new(manager.clone(), metrics.clone(), cancel.clone())
            .with_file_allow(crate::sds_files::FileAllow::new(
                config.sds_file_allow.iter().cloned(),
            ))
            .into_service();
        drain.spawn(serve_uds(
            "SDS",
            sds_listener,
            tonic::service::Routes::new(sds),
            &drain,
        ));
        let jwt = JwtSvids::new(
            manager.id().clone(),
            jwt_source,
            TokenFile::new(&config.ca.token_path),
            manager.credentials(),
            cancel.clone(),
        );
        let api = WorkloadApiServer::new(manager.clone(), jwt, metrics.clone(), cancel.clone())
            .into_service();
        drain.spawn(serve_uds(
            "the SPIFFE Workload API",
            api_listener,
            tonic::service::Routes::new(api),
            &drain,
        ));
        if let Some(dir) = &config.output_certs {
            warn!(dir = %dir.display(), "--output-certs: the workload key will be written to disk (mode 0600)");
            drain.spawn(output::run(
                dir.clone(),
                manager.credentials(),
                cancel.clone(),
            ));
        }
        info!(
            spiffe.id = manager.id().as_str(),
            sds.socket = %config.sds_socket.display(),
            workload_api.socket = %config.workload_api_socket.display(),
            admin.addr = %admin_addr,
            "meshid-agent started"
        );
        Ok(App {
            config,
            admin_addr,
            metrics_addr,
            manager,
            metrics,
            drain,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn sds_socket(&self) -> &Path {
        &self.config.sds_socket
    }

    pub fn workload_api_socket(&self) -> &Path {
        &self.config.workload_api_socket
    }

    /// Where the scrape listener bound, when it is on.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Where the admin listener actually bound (port 0 resolved).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    pub fn manager(&self) -> &Arc<Worker> {
        &self.manager
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn credentials(&self) -> CredentialsRx {
        self.manager.credentials()
    }

    /// A token that stops the agent when cancelled.
    pub fn cancel_token(&self) -> CancellationToken {
        self.drain.stopping().clone()
    }

    /// Stops every task, waiting up to a grace period, and removes the sockets.
    pub async fn shutdown(self) {
        self.drain.drain(SHUTDOWN_GRACE).await;
        for path in [&self.config.sds_socket, &self.config.workload_api_socket] {
            let _ = std::fs::remove_file(path);
        }
        info!("meshid-agent stopped");
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.drain.stop_now();
    }
}

fn serve_uds(
    what: &'static str,
    listener: UdsListener,
    routes: tonic::service::Routes,
    drain: &Drain,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let path: PathBuf = listener.path().to_path_buf();
    let stop = drain.stopping().clone();
    let incoming = listener.incoming(what, drain);
    async move {
        let result = tonic::transport::Server::builder()
            .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
            .await;
        if let Err(e) = result {
            warn!(socket = %path.display(), error = %e, "{what} server stopped");
        }
    }
}

/// One CSR of the agent: `agent.csr`, naming the certificate it replaces.
fn csr_span(id: &SpiffeId, key_type: KeyType, current: Option<&str>) -> tracing::Span {
    tracing::info_span!(
        "agent.csr",
        spiffe.id = id.as_str(),
        key.type = key_type.as_str(),
        cert.replaces = current.unwrap_or(""),
    )
}
