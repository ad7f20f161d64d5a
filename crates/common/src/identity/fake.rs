//! A CA for tests and benchmarks (feature `testing`): signs CSRs in-process
//! with a [`TestPki`], answers the way it is told (good, malformed, for
//! another identity or key, a gRPC error), and records every call. One fake
//! for the agent's, the ztunnel's and the shim's tests.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;

use super::Clock;
use super::source::{CertificateSource, JwtSource, SignRequest};
use crate::TrustBundle;
use crate::cert::cert_to_pem;
use crate::error::{Error, Result};
use crate::keys::{KeyType, PrivateKey, parse_csr_pem};
use crate::spiffe::SpiffeId;
use crate::testing::TestPki;

/// How the fake CA answers the next requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    Good,
    /// Only the leaf: no root bundle.
    OneElement,
    /// A leaf for `spiffe://<td>/ns/other/sa/impostor`.
    OtherIdentity,
    /// A leaf over a key that is not the CSR's.
    OtherKey,
    /// A gRPC error with this code.
    Fail(tonic::Code),
}

/// One request the fake CA saw.
#[derive(Clone, Debug)]
pub struct Call {
    pub at: tokio::time::Instant,
    pub id: Option<SpiffeId>,
    pub token: String,
    pub ttl: Duration,
    pub on_behalf: bool,
    pub cluster_id: Option<String>,
    pub traceparent: Option<String>,
}

struct State {
    pki: Arc<TestPki>,
    answer: Answer,
    ttl: Option<Duration>,
    delay: Duration,
    calls: Vec<Call>,
}

/// A CA that signs with a [`TestPki`] at the time of its clock.
pub struct TestCa {
    state: Mutex<State>,
    clock: Clock,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa")
            .field("calls", &self.calls().len())
            .finish()
    }
}

impl TestCa {
    /// A fake CA over `pki`.
    pub fn new(pki: Arc<TestPki>, clock: Clock) -> Arc<Self> {
        Arc::new(TestCa {
            state: Mutex::new(State {
                pki,
                answer: Answer::Good,
                ttl: None,
                delay: Duration::ZERO,
                calls: Vec::new(),
            }),
            clock,
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn set_answer(&self, answer: Answer) {
        self.state().answer = answer;
    }

    /// Issue for this long whatever the request asks (`None`: as asked).
    pub fn set_ttl(&self, ttl: Option<Duration>) {
        self.state().ttl = ttl;
    }

    /// Each request takes this long (a `tokio::time::sleep`, so paused-clock
    /// tests see it as virtual time).
    pub fn set_delay(&self, delay: Duration) {
        self.state().delay = delay;
    }

    /// Replaces the PKI with a new one of the same shape (a root rotation
    /// without overlap); returns the new roots.
    pub fn new_root(&self) -> TrustBundle {
        let mut state = self.state();
        let td = state.pki.trust_domain.clone();
        let mut pki = TestPki::new(&td).expect("test PKI");
        if state.pki.intermediate.is_some() {
            pki = pki.with_intermediate().expect("test PKI");
        }
        let bundle = pki.bundle();
        state.pki = Arc::new(pki);
        bundle
    }

    pub fn pki(&self) -> Arc<TestPki> {
        self.state().pki.clone()
    }

    pub fn bundle(&self) -> TrustBundle {
        self.pki().bundle()
    }

    /// Every request so far.
    pub fn calls(&self) -> Vec<Call> {
        self.state().calls.clone()
    }

    /// Identities in the order their requests arrived.
    pub fn order(&self) -> Vec<SpiffeId> {
        self.state()
            .calls
            .iter()
            .filter_map(|c| c.id.clone())
            .collect()
    }

    /// The most requests that were in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }

    /// Records a call that came another way (a gRPC server around this CA).
    pub fn record(&self, call: Call) {
        self.state().calls.push(call);
    }

    /// The answer to a CSR, as the Istio CA's `cert_chain`, for the
    /// identity the CSR names.
    pub fn answer(&self, csr_pem: &str, ttl: Duration) -> Result<Vec<String>, tonic::Status> {
        let (pki, answer, fixed_ttl) = {
            let s = self.state();
            (s.pki.clone(), s.answer.clone(), s.ttl)
        };
        let ttl = fixed_ttl.unwrap_or(ttl);
        let csr =
            parse_csr_pem(csr_pem).map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        let id = csr
            .uri_sans
            .first()
            .and_then(|u| SpiffeId::parse(u).ok())
            .ok_or_else(|| tonic::Status::invalid_argument("the CSR names no SPIFFE ID"))?;
        let now = self.clock.now();
        let issue = |spki: &[u8], id: &SpiffeId| {
            let leaf = pki
                .signer()
                .issue_leaf(spki, id, ttl, now)
                .map_err(|e| tonic::Status::internal(e.to_string()))?;
            let mut chain = vec![cert_to_pem(&leaf)];
            if let Some(inter) = &pki.intermediate {
                chain.push(inter.cert_pem());
            }
            chain.push(pki.bundle().to_pem());
            Ok::<_, tonic::Status>(chain)
        };
        match answer {
            Answer::Good => issue(&csr.public_key_spki, &id),
            Answer::OneElement => Ok(issue(&csr.public_key_spki, &id)?[..1].to_vec()),
            Answer::OtherIdentity => {
                let other = SpiffeId::for_service_account(id.trust_domain(), "other", "impostor")
                    .map_err(|e| tonic::Status::internal(e.to_string()))?;
                issue(&csr.public_key_spki, &other)
            }
            Answer::OtherKey => {
                let other = PrivateKey::generate(KeyType::EcdsaP256)
                    .map_err(|e| tonic::Status::internal(e.to_string()))?;
                issue(other.public_key_spki(), &id)
            }
            Answer::Fail(code) => Err(tonic::Status::new(code, "the test CA says no")),
        }
    }
}

impl CertificateSource for TestCa {
    fn sign(&self, req: SignRequest) -> BoxFuture<'_, Result<Vec<String>>> {
        Box::pin(async move {
            self.record(Call {
                at: tokio::time::Instant::now(),
                id: Some(req.id.clone()),
                token: req.token.expose().to_owned(),
                ttl: req.ttl,
                on_behalf: req.on_behalf,
                cluster_id: None,
                traceparent: crate::telemetry::current_traceparent(),
            });
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_in_flight.fetch_max(now, Ordering::SeqCst);
            let delay = self.state().delay;
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            self.answer(&req.csr_pem, req.ttl)
                .map_err(|s| Error::from_ca_status(&s))
        })
    }
}

/// No JWT-SVIDs: both calls answer `UNIMPLEMENTED`.
impl JwtSource for TestCa {}
