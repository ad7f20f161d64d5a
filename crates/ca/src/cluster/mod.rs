//! Cluster mode (cargo feature `kube`, flag `--kube`): the CA as istiod's
//! Citadel runs it in a Kubernetes cluster. Tokens are checked with a
//! TokenReview ([`crate::authn::token_review`]); pods are looked up in a
//! watch cache ([`pods`]); the signing CA comes from Secrets in the CA's
//! namespace — a plugged-in `cacerts`, else the shared self-signed root in
//! `istio-ca-secret`, created once whatever the number of replicas
//! ([`secrets`]); and the root bundle is published to the
//! `istio-ca-root-cert` ConfigMap of every namespace ([`publish`]) by the one
//! replica holding a Lease ([`election`]). Every watch runs on the
//! workspace's one list/watch engine, [`meshid_common::kube::Reflector`],
//! which the ztunnel's cluster mode shares.
//!
//! The module is named `cluster`, not `kube`, so that `kube::` always means
//! the kube crate.

pub mod election;
pub mod pods;
pub mod publish;
pub mod secrets;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::signer::{Signer, SignerOptions};

/// In-cluster config, else KUBECONFIG.
pub async fn connect() -> Result<kube::Client> {
    kube::Client::try_default()
        .await
        .map_err(|e| Error::Kube(format!("no usable cluster config: {e}")))
}

/// A client for the API server at `url` (`http://127.0.0.1:port`), with no
/// kubeconfig and no credentials: for tests against a fake API server.
#[cfg(any(test, feature = "testing"))]
pub fn client_for_url(url: &str) -> Result<kube::Client> {
    meshid_common::kube::client_for_url(url).map_err(|e| Error::Config(e.to_string()))
}

/// The signer of cluster mode (see [`secrets`]), and a task following the
/// plugged-in CA's Secret for rotation.
pub async fn open_signer(
    client: &kube::Client,
    config: &Config,
    options: SignerOptions,
    cancel: CancellationToken,
) -> Result<(
    Arc<Signer>,
    impl std::future::Future<Output = ()> + Send + 'static,
)> {
    let loaded = secrets::load(
        client,
        &config.namespace,
        &config.cacerts_secret,
        &config.ca_secret,
        &options,
    )
    .await?;
    let signer = Arc::new(Signer::in_memory(options, loaded.state, &loaded.origin));
    let follow = secrets::follow_cacerts(
        client.clone(),
        config.namespace.clone(),
        config.cacerts_secret.clone(),
        signer.clone(),
        cancel,
    );
    Ok((signer, follow))
}
