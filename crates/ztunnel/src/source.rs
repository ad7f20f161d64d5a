//! Where workload certificates come from: a [`CertificateSource`] fetches one
//! SVID for one identity. The real one ([`CaSource`]) asks the Istio CA with
//! the ztunnel's own token and `ImpersonatedIdentity` metadata (DESIGN §2.1);
//! tests and benchmarks plug in [`PkiSource`], which signs with a throwaway
//! [`TestPki`].

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use meshid_common::ca_client::{CaClient, CaClientConfig, CallOptions, RootsFileCaClient};
use meshid_common::testing::TestPki;
use meshid_common::{KeyType, PrivateKey, SpiffeId, Svid, TrustBundle};

use crate::config::Config;
use crate::error::{Error, Result};

/// Fetches a certificate for one workload identity.
pub trait CertificateSource: Send + Sync + fmt::Debug + 'static {
    /// A fresh SVID for `id` and the trust bundle to check peers against.
    fn fetch<'a>(&'a self, id: &'a SpiffeId) -> BoxFuture<'a, Result<(Svid, TrustBundle)>>;
}

/// The Istio CA, called with the ztunnel's token on behalf of each workload.
pub struct CaSource {
    client: RootsFileCaClient,
    token_path: PathBuf,
    ttl: Duration,
    key_type: KeyType,
}

impl fmt::Debug for CaSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaSource")
            .field("ca", &self.client.config().address)
            .field("token_path", &self.token_path)
            .field("ttl", &self.ttl)
            .field("key_type", &self.key_type)
            .finish()
    }
}

impl CaSource {
    /// A client for the CA in `config` (connects lazily).
    pub fn new(config: &Config) -> Result<Self> {
        let root_pem = std::fs::read_to_string(&config.ca_root_ca).map_err(|source| Error::Io {
            what: "CA root certificates",
            path: config.ca_root_ca.clone(),
            source,
        })?;
        let mut ca = CaClientConfig::new(config.ca_address.clone(), root_pem);
        ca.server_name = config.ca_server_name.clone();
        ca.cluster_id = config.cluster_id.clone();
        ca.call_timeout = config.ca_timeout;
        ca.connect_timeout = config.connect_timeout;
        Ok(CaSource {
            // Followed, so a root rotation needs no restart of the node.
            client: RootsFileCaClient::new(&config.ca_root_ca, CaClient::new(ca)?),
            token_path: config.token_path.clone(),
            ttl: config.secret_ttl,
            key_type: config.key_type,
        })
    }

    fn token(&self) -> Result<String> {
        let token =
            std::fs::read_to_string(&self.token_path).map_err(|source| Error::TokenUnreadable {
                path: self.token_path.clone(),
                source,
            })?;
        let token = token.trim();
        if token.is_empty() {
            return Err(Error::TokenEmpty {
                path: self.token_path.clone(),
            });
        }
        Ok(token.to_owned())
    }
}

impl CertificateSource for CaSource {
    fn fetch<'a>(&'a self, id: &'a SpiffeId) -> BoxFuture<'a, Result<(Svid, TrustBundle)>> {
        Box::pin(async move {
            let token = self.token()?;
            let key = PrivateKey::generate(self.key_type)?;
            let options = CallOptions {
                token: Some(&token),
                impersonate: Some(id),
            };
            self.client
                .current()
                .sign(key, id, self.ttl, options)
                .await
                .map_err(|e| classify(id, e))
        })
    }
}

/// Splits CA errors into refusals (no point retrying soon), outages and bad answers.
fn classify(id: &SpiffeId, e: meshid_common::Error) -> Error {
    use meshid_common::Error as C;
    use tonic::Code;
    match e {
        C::Ca { code, message }
            if matches!(
                code,
                Code::Unauthenticated
                    | Code::PermissionDenied
                    | Code::InvalidArgument
                    | Code::FailedPrecondition
            ) =>
        {
            Error::CaRefused {
                id: id.clone(),
                code,
                message,
            }
        }
        C::Ca { code, message } => Error::CaUnavailable {
            id: id.clone(),
            message: format!("{code:?}: {message}"),
        },
        C::CaConnect { reason, .. } => Error::CaUnavailable {
            id: id.clone(),
            message: reason,
        },
        other => Error::BadCertificate {
            id: id.clone(),
            reason: other.to_string(),
        },
    }
}

/// What [`PkiSource`] does on the next fetches (tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PkiBehaviour {
    /// Sign what was asked.
    Sign,
    /// Fail as an unreachable CA would.
    Unavailable,
    /// Answer with a certificate for another identity (a misbehaving CA).
    WrongIdentity,
}

/// Signs workload certificates in-process with a [`TestPki`]: the fake CA
/// of tests and benchmarks. It counts calls and can be told to fail.
pub struct PkiSource {
    pki: Arc<TestPki>,
    ttl: std::sync::Mutex<Duration>,
    delay: std::sync::Mutex<Duration>,
    behaviour: std::sync::Mutex<PkiBehaviour>,
    calls: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    order: std::sync::Mutex<Vec<SpiffeId>>,
}

impl fmt::Debug for PkiSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PkiSource")
            .field("trust_domain", &self.pki.trust_domain)
            .field("calls", &self.calls())
            .finish()
    }
}

impl PkiSource {
    pub fn new(pki: Arc<TestPki>, ttl: Duration) -> Self {
        PkiSource {
            pki,
            ttl: std::sync::Mutex::new(ttl),
            delay: std::sync::Mutex::new(Duration::ZERO),
            behaviour: std::sync::Mutex::new(PkiBehaviour::Sign),
            calls: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            order: std::sync::Mutex::new(Vec::new()),
        }
    }

    pub fn pki(&self) -> &TestPki {
        &self.pki
    }

    /// Each fetch takes this long (a `tokio::time::sleep`, so paused-clock
    /// tests see it as virtual time).
    pub fn set_delay(&self, d: Duration) {
        *self.delay.lock().expect("lock") = d;
    }

    pub fn set_ttl(&self, d: Duration) {
        *self.ttl.lock().expect("lock") = d;
    }

    pub fn set_behaviour(&self, b: PkiBehaviour) {
        *self.behaviour.lock().expect("lock") = b;
    }

    /// Fetches started so far.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// The most fetches that were in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }

    /// Identities in the order their fetches started.
    pub fn order(&self) -> Vec<SpiffeId> {
        self.order.lock().expect("lock").clone()
    }
}

impl CertificateSource for PkiSource {
    fn fetch<'a>(&'a self, id: &'a SpiffeId) -> BoxFuture<'a, Result<(Svid, TrustBundle)>> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.order.lock().expect("lock").push(id.clone());
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_in_flight.fetch_max(now, Ordering::SeqCst);
            let delay = *self.delay.lock().expect("lock");
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            let ttl = *self.ttl.lock().expect("lock");
            let behaviour = *self.behaviour.lock().expect("lock");
            let issue = |id: &SpiffeId| -> Result<Svid> {
                Ok(self.pki.svid_at(id, ttl, SystemTime::now())?)
            };
            match behaviour {
                PkiBehaviour::Sign => Ok((issue(id)?, self.pki.bundle())),
                PkiBehaviour::Unavailable => Err(Error::CaUnavailable {
                    id: id.clone(),
                    message: "test CA is down".into(),
                }),
                PkiBehaviour::WrongIdentity => {
                    let other =
                        SpiffeId::for_service_account(id.trust_domain(), "impostor", "impostor")?;
                    Ok((issue(&other)?, self.pki.bundle()))
                }
            }
        })
    }
}
