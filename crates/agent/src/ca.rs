//! The production [`CertificateSource`]: the Istio CA through the shared
//! client of `meshid_common::ca_client` (TLS verified against `CA_ROOT_CA`,
//! `authorization: Bearer`, `clusterid`, W3C trace context).

use futures::FutureExt;
use futures::future::BoxFuture;
use meshid_common::ca_client::{CaClient, CaClientConfig, CallOptions, RootsFileCaClient};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::source::{CertificateSource, SignRequest};

/// The Istio CA at `CA_ADDRESS`, trusted through the roots in `CA_ROOT_CA`
/// (re-read before each CSR, so a rotated root needs no restart).
#[derive(Debug)]
pub struct IstioCa {
    client: RootsFileCaClient,
}

impl IstioCa {
    /// Reads `CA_ROOT_CA` and prepares a lazily connecting client: the CA
    /// may come up after the agent. The file is followed: new roots written
    /// there are trusted from the next CSR on.
    pub fn from_config(config: &Config) -> Result<Self> {
        let root_pem = std::fs::read_to_string(&config.ca_root_ca).map_err(|source| Error::Io {
            what: "cannot read CA_ROOT_CA",
            path: config.ca_root_ca.clone(),
            source,
        })?;
        let mut ca = CaClientConfig::new(config.ca_address.clone(), root_pem);
        ca.server_name = config.ca_server_name.clone();
        ca.cluster_id = Some(config.cluster_id.clone());
        ca.call_timeout = config.ca_timeout;
        Ok(IstioCa {
            client: RootsFileCaClient::new(&config.ca_root_ca, CaClient::new(ca)?),
        })
    }
}

impl CertificateSource for IstioCa {
    fn sign(&self, req: SignRequest) -> BoxFuture<'_, Result<Vec<String>>> {
        async move {
            let options = CallOptions {
                token: Some(req.token.expose()),
                impersonate: None,
            };
            self.client
                .current()
                .create_certificate(&req.csr_pem, req.ttl, options)
                .await
                .map_err(|e| match e {
                    meshid_common::Error::Ca { code, message } => {
                        Error::from_ca_status(&req.id, &tonic::Status::new(code, message))
                    }
                    other => Error::CaUnavailable {
                        id: req.id.clone(),
                        message: other.to_string(),
                    },
                })
        }
        .boxed()
    }
}
