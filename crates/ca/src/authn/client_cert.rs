//! A workload's current SVID, presented as the TLS client certificate,
//! authenticates its own identity (as istiod's client-cert authenticator).
//!
//! The TLS layer only proves possession of the key; the chain is checked
//! here against the current root bundle, so an expired or foreign
//! certificate just falls through to the token instead of breaking the
//! handshake. With a pod directory, the service account must still have a
//! live pod: a deleted workload cannot renew forever on its last certificate.

use std::sync::Arc;
use std::time::SystemTime;

use futures::future::BoxFuture;
use meshid_common::Usage;

use super::{AuthContext, AuthError, Authenticator, Caller};
use crate::directory::PodDirectory;
use crate::sign::CertSigner;

#[derive(Debug)]
pub struct ClientCertAuthenticator {
    signer: Arc<dyn CertSigner>,
    trust_domain: String,
    directory: Option<Arc<dyn PodDirectory>>,
}

impl ClientCertAuthenticator {
    pub fn new(
        signer: Arc<dyn CertSigner>,
        trust_domain: String,
        directory: Option<Arc<dyn PodDirectory>>,
    ) -> Self {
        ClientCertAuthenticator {
            signer,
            trust_domain,
            directory,
        }
    }

    async fn check(
        &self,
        chain: &[rustls_pki_types::CertificateDer<'static>],
    ) -> Result<Caller, AuthError> {
        let fail = |m: String| AuthError::ClientCert(m);
        let bundle = self.signer.roots().bundle.clone();
        let info = bundle
            .verify(chain, Usage::ClientAuth, SystemTime::now())
            .map_err(|e| fail(e.to_string()))?;
        let id = info
            .require_spiffe_id()
            .map_err(|e| fail(e.to_string()))?
            .clone();
        if !id.is_member_of(&self.trust_domain) {
            return Err(fail(format!(
                "{id} is not in trust domain {:?}",
                self.trust_domain
            )));
        }
        let Some((ns, sa)) = id.service_account() else {
            return Err(fail(format!("{id} is not a service account identity")));
        };
        if let Some(directory) = &self.directory {
            let alive = directory
                .service_account_alive(ns, sa)
                .await
                .map_err(|e| fail(format!("pod lookup failed: {e}")))?;
            if !alive {
                return Err(fail(format!("no live pod runs as {ns}/{sa}")));
            }
        }
        Ok(Caller {
            namespace: ns.to_owned(),
            service_account: sa.to_owned(),
            id,
            node: None,
            pod: None,
            method: "client-cert",
        })
    }
}

impl Authenticator for ClientCertAuthenticator {
    fn name(&self) -> &'static str {
        "client-cert"
    }

    fn authenticate<'a>(
        &'a self,
        ctx: AuthContext<'a>,
    ) -> BoxFuture<'a, Option<Result<Caller, AuthError>>> {
        Box::pin(async move {
            let chain = ctx.peer_certs?;
            Some(self.check(chain).await)
        })
    }
}
