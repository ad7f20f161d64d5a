//! The running CA: `App::build(config)` loads the signer, binds the gRPC and
//! monitoring ports, starts every background task and returns; tests run it
//! in-process on `127.0.0.1:0`, `main` waits for a signal and shuts it down.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use meshid_common::TrustBundle;
use meshid_common::registry::RegistryWatcher;
use meshid_common::serve::Drain;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::authn::client_cert::ClientCertAuthenticator;
use crate::authn::jwt::{JwksSource, JwtAuthenticator};
use crate::authn::{Authenticator, Authn};
use crate::authz::Authorizer;
use crate::config::Config;
use crate::directory::{PodDirectory, RegistryDirectory};
use crate::error::{Error, Result};
use crate::jwt_svid::{JwtAuthority, JwtSvidServer};
use crate::metrics::Metrics;
use crate::monitoring::{self, Monitor};
use crate::server::{CaCore, CaService, tls_incoming};
use crate::sign::CertSigner;
use crate::signer::{Signer, SignerOptions, write_atomic};
use crate::tls::{ServingCert, server_config};
use crate::vault::{SignerConfig, VaultSigner};

/// The Kubernetes client a test may hand in (none without the `kube` feature).
#[cfg(feature = "kube")]
type KubeClient = kube::Client;
#[cfg(not(feature = "kube"))]
type KubeClient = std::convert::Infallible;

/// How long shutdown lets running calls finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Longest a CreateCertificate call may take (a stuck API lookup included).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A running CA.
#[derive(Debug)]
pub struct App {
    grpc_addr: SocketAddr,
    monitoring_addr: SocketAddr,
    signer: Arc<dyn CertSigner>,
    builtin: Option<Arc<Signer>>,
    jwt_authority: Arc<JwtAuthority>,
    metrics: Arc<Metrics>,
    drain: Drain,
}

async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|source| Error::Bind {
        addr: addr.to_string(),
        source,
    })
}

impl App {
    /// Validates `config`, starts everything and returns once both ports are
    /// bound.
    pub async fn build(config: Config) -> Result<App> {
        Self::build_inner(config, None).await
    }

    /// As [`App::build`], talking to the Kubernetes API through `client`
    /// (tests point it at a fake API server) instead of the in-cluster
    /// config or KUBECONFIG.
    #[cfg(feature = "kube")]
    pub async fn build_with_kube(config: Config, client: kube::Client) -> Result<App> {
        Self::build_inner(config, Some(client)).await
    }

    async fn build_inner(config: Config, kube: Option<KubeClient>) -> Result<App> {
        config.validate()?;
        let drain = Drain::new();
        match Self::start(config, &drain, kube).await {
            Ok(app) => Ok(app),
            Err(e) => {
                // Stop whatever had started before the failure.
                drain.stop_now();
                Err(e)
            }
        }
    }

    async fn start(config: Config, drain: &Drain, kube: Option<KubeClient>) -> Result<App> {
        let cancel = drain.stopping().clone();
        let options = SignerOptions {
            dir: config.root_ca_dir.clone(),
            trust_domain: config.trust_domain.clone(),
            self_signed_ttl: config.self_signed_ca_cert_ttl,
        };
        #[cfg(feature = "kube")]
        let kube = match kube {
            Some(client) => Some(client),
            None if config.kube_enabled() => Some(crate::cluster::connect().await?),
            None => None,
        };
        // The built-in signer, when it is the one in use (tests look at its state).
        let mut builtin: Option<Arc<Signer>> = None;
        let signer: Arc<dyn CertSigner> = match &config.signer {
            SignerConfig::Builtin => {
                // Cluster mode: the signing CA lives in Secrets, not in the directory.
                #[cfg(feature = "kube")]
                let cluster_signer = match &kube {
                    Some(client) if config.kube => {
                        let (signer, follow) = crate::cluster::open_signer(
                            client,
                            &config,
                            options.clone(),
                            cancel.clone(),
                        )
                        .await?;
                        drain.spawn(follow);
                        Some(signer)
                    }
                    _ => None,
                };
                #[cfg(not(feature = "kube"))]
                let cluster_signer: Option<Arc<Signer>> = kube.map(|never| match never {});
                let signer = match cluster_signer {
                    Some(signer) => signer,
                    None => {
                        let opened = Arc::new(
                            tokio::task::spawn_blocking(move || Signer::open(options))
                                .await
                                .map_err(|e| {
                                    Error::Config(format!("signer start-up panicked: {e}"))
                                })??,
                        );
                        drain.spawn(
                            opened
                                .clone()
                                .watch(config.ca_dir_poll_interval, cancel.clone()),
                        );
                        opened
                    }
                };
                builtin = Some(signer.clone());
                signer
            }
            SignerConfig::Vault(vault) => {
                let vault = VaultSigner::connect((**vault).clone(), &config.trust_domain).await?;
                drain.spawn(vault.clone().follow_roots(cancel.clone()));
                vault
            }
        };
        if let Some(path) = config.root_cert_out.clone() {
            write_atomic(&path, &signer.roots().bundle_pem)?;
            drain.spawn(publish_roots(signer.clone(), path, cancel.clone()));
        }

        let directory: Option<Arc<dyn PodDirectory>> = match &config.registry_file {
            Some(path) => {
                let watcher = RegistryWatcher::spawn(path.clone(), config.file_poll_interval)
                    .map_err(Error::Registry)?;
                Some(Arc::new(RegistryDirectory::new(watcher)))
            }
            None => None,
        };
        // A pod watch cache answers lookups unless the registry file does.
        #[cfg(feature = "kube")]
        let directory: Option<Arc<dyn PodDirectory>> = match (&kube, directory) {
            (Some(client), None) => Some(Arc::new(crate::cluster::pods::PodCache::spawn(
                client.clone(),
                cancel.clone(),
            ))),
            (_, d) => d,
        };

        let mut chain: Vec<Arc<dyn Authenticator>> = vec![Arc::new(ClientCertAuthenticator::new(
            signer.clone(),
            config.trust_domain.clone(),
            directory.clone(),
        ))];
        let jwks = match (&config.jwks_file, &config.jwks_url) {
            (Some(path), _) => Some(JwksSource::watch_file(
                path.clone(),
                config.file_poll_interval,
                cancel.clone(),
            )?),
            (None, Some(url)) => {
                let roots = match &config.jwks_url_ca {
                    Some(path) => Some(root_store(path)?),
                    None => None,
                };
                Some(
                    JwksSource::watch_url(
                        url.clone(),
                        roots,
                        config.jwks_refresh_interval,
                        cancel.clone(),
                    )
                    .await?,
                )
            }
            (None, None) => None,
        };
        if let Some(jwks) = jwks {
            let directory = directory
                .clone()
                .ok_or_else(|| Error::Config("JWT authentication needs a pod directory".into()))?;
            chain.push(Arc::new(JwtAuthenticator::new(
                config.trust_domain.clone(),
                config.token_issuer.clone(),
                config.audiences(),
                jwks,
                directory,
            )));
        }
        #[cfg(feature = "kube")]
        if let (Some(client), Some(directory)) = (&kube, &directory) {
            chain.push(Arc::new(
                crate::authn::token_review::TokenReviewAuthenticator::new(
                    client.clone(),
                    directory.clone(),
                    config.trust_domain.clone(),
                    config.audiences(),
                ),
            ));
        }
        // Cluster mode: the Lease holder publishes the root to every namespace.
        #[cfg(feature = "kube")]
        if let Some(client) = kube.as_ref().filter(|_| config.kube) {
            let (leader, election) = crate::cluster::election::Election::new(
                &config.namespace,
                &config.leader_lease,
                &config.lease_holder,
            )
            .start(client.clone(), cancel.clone());
            drain.spawn(election);
            drain.spawn(
                crate::cluster::publish::Publisher {
                    client: client.clone(),
                    configmap: config.root_configmap.clone(),
                    signer: signer.clone(),
                    resync: crate::cluster::publish::RESYNC,
                }
                .run(leader, cancel.clone()),
            );
        }
        let authn = Authn::new(chain).with_clusters(
            std::iter::once(config.cluster_id.clone())
                .chain(config.cluster_aliases.iter().cloned())
                .collect(),
        );
        tracing::info!(authenticators = ?authn.names(), "authentication chain");

        let metrics = Arc::new(Metrics::new());
        let core = Arc::new(CaCore {
            trust_domain: config.trust_domain.clone(),
            cluster_id: config.cluster_id.clone(),
            default_ttl: config.default_workload_cert_ttl,
            max_ttl: config.max_workload_cert_ttl,
            authn,
            authz: Authorizer::new(
                config.trust_domain.clone(),
                config.node_accounts()?,
                directory.clone(),
            )
            .with_trust_domain_aliases(config.trust_domain_aliases.clone()),
            signer: signer.clone(),
            metrics: metrics.clone(),
        });

        let jwt_authority = Arc::new({
            let dir = config.root_ca_dir.clone();
            let td = config.trust_domain.clone();
            tokio::task::spawn_blocking(move || JwtAuthority::open(&dir, &td))
                .await
                .map_err(|e| Error::Config(format!("JWT key start-up panicked: {e}")))??
        });
        drain.spawn(jwt_authority.clone().follow(
            signer.clone(),
            config.root_ca_dir.clone(),
            cancel.clone(),
        ));
        let jwt_service = JwtSvidServer::new(core.clone(), jwt_authority.clone())
            .into_server(config.max_request_bytes);

        let serving = Arc::new(
            ServingCert::new(
                signer.as_ref(),
                config.serving_dns_names(),
                config.server_ips.clone(),
            )
            .await?,
        );
        drain.spawn(serving.clone().maintain(signer.clone(), cancel.clone()));
        let tls = Arc::new(server_config(serving)?);

        let grpc_listener = bind(config.grpc_addr).await?;
        let grpc_addr = grpc_listener.local_addr().map_err(|source| Error::Bind {
            addr: config.grpc_addr.to_string(),
            source,
        })?;
        let monitoring_listener = bind(config.monitoring_addr).await?;
        let monitoring_addr = monitoring_listener
            .local_addr()
            .map_err(|source| Error::Bind {
                addr: config.monitoring_addr.to_string(),
                source,
            })?;

        let monitor = Arc::new(Monitor {
            signer: signer.clone(),
            metrics: metrics.clone(),
            serving: AtomicBool::new(false),
        });
        monitoring::router(monitor.clone()).serve(monitoring_listener, drain);

        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<meshid_common::proto::istio_ca::istio_certificate_service_server::IstioCertificateServiceServer<CaService>>()
            .await;
        let incoming = tls_incoming(grpc_listener, tls, drain);
        let service = CaService::new(core).into_server(config.max_request_bytes);
        let grpc_cancel = cancel.clone();
        let grpc_monitor = monitor.clone();
        drain.spawn(async move {
            grpc_monitor.set_serving(true);
            let served = tonic::transport::Server::builder()
                .timeout(REQUEST_TIMEOUT)
                .add_service(health_service)
                .add_service(service)
                .add_service(jwt_service)
                .serve_with_incoming_shutdown(incoming, grpc_cancel.cancelled())
                .await;
            grpc_monitor.set_serving(false);
            if let Err(e) = served {
                tracing::error!(error = %e, "gRPC server stopped");
            }
        });

        tracing::info!(grpc.addr = %grpc_addr, monitoring.addr = %monitoring_addr, "meshid-ca serving");
        Ok(App {
            grpc_addr,
            monitoring_addr,
            signer,
            builtin,
            jwt_authority,
            metrics,
            drain: drain.clone(),
        })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    pub fn monitoring_addr(&self) -> SocketAddr {
        self.monitoring_addr
    }

    /// The roots clients should trust now.
    pub fn root_bundle(&self) -> TrustBundle {
        self.signer.roots().bundle.clone()
    }

    /// The built-in signer, unless Vault signs.
    pub fn builtin_signer(&self) -> Option<&Arc<Signer>> {
        self.builtin.as_ref()
    }

    /// The signer in use (built-in or Vault).
    pub fn signer(&self) -> &Arc<dyn CertSigner> {
        &self.signer
    }

    /// The trust domain's JWT-SVID signing keys.
    pub fn jwt_authority(&self) -> &Arc<JwtAuthority> {
        &self.jwt_authority
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Cancelled when the app shuts down.
    pub fn cancel_token(&self) -> CancellationToken {
        self.drain.stopping().clone()
    }

    /// Stops accepting, lets running calls finish (up to a grace period),
    /// then stops what is left.
    pub async fn shutdown(self) {
        self.drain.drain(SHUTDOWN_GRACE).await;
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.drain.stop_now();
    }
}

/// A rustls root store from a PEM file.
pub(crate) fn root_store(path: &std::path::Path) -> Result<rustls::RootCertStore> {
    let pem = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })?;
    let certs = meshid_common::cert::parse_pem_certs(&pem).map_err(|source| Error::CaMaterial {
        path: path.to_owned(),
        source,
    })?;
    let mut store = rustls::RootCertStore::empty();
    for cert in certs {
        store
            .add(cert)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    }
    Ok(store)
}

/// Rewrites the root bundle file whenever the roots change.
async fn publish_roots(
    signer: Arc<dyn CertSigner>,
    path: std::path::PathBuf,
    cancel: CancellationToken,
) {
    let mut rx = signer.subscribe();
    let mut last = signer.roots().bundle.clone();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = rx.changed() => if changed.is_err() { return },
        }
        let state = rx.borrow_and_update().clone();
        if state.bundle == last {
            continue;
        }
        last = state.bundle.clone();
        match write_atomic(&path, &state.bundle_pem) {
            Ok(()) => {
                tracing::info!(path = %path.display(), roots = last.roots().len(), "root bundle published")
            }
            Err(e) => tracing::error!(error = %e, "root bundle could not be written"),
        }
    }
}
