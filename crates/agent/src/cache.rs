//! The secret cache: one workload SVID and its trust bundle, kept fresh.
//!
//! [`SecretManager::run`] generates a key and CSR in memory, reads the token,
//! asks the [`CertificateSource`], checks the answer ([`check_answer`]) and
//! publishes [`Credentials`] on a `watch` channel that the SDS and Workload
//! API streams subscribe to. It renews at the [`refresh_at`] point; a failed
//! renewal keeps the current certificate and retries with capped exponential
//! backoff (straight to the cap when the CA refuses us). Once the current
//! certificate expires it is withdrawn (`None`) and the agent is not ready.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::FutureExt;
use futures::future::BoxFuture;
use meshid_common::cert::unix_secs;
use meshid_common::telemetry::set_remote_parent;
use meshid_common::{Credentials, CredentialsRx, KeyType, PrivateKey, SpiffeId};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::rotation::{Backoff, Clock, draw_jitter, refresh_at};
use crate::source::{CertificateSource, SignRequest, check_answer};
use crate::token::TokenFile;

/// Renewals are never scheduled closer together than this, whatever the
/// certificate's life: a CA that hands out nearly expired certificates must
/// not make the agent spin.
pub const MIN_REFRESH_DELAY: Duration = Duration::from_millis(500);

/// What the manager needs to know.
#[derive(Clone, Debug)]
pub struct ManagerConfig {
    pub id: SpiffeId,
    pub key_type: KeyType,
    pub ttl: Duration,
    pub grace_period_ratio: f64,
    pub grace_period_ratio_jitter: f64,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub ca_timeout: Duration,
    pub first_fetch_delay: Duration,
}

impl ManagerConfig {
    pub fn from_config(c: &Config) -> Result<Self> {
        Ok(ManagerConfig {
            id: c.spiffe_id()?,
            key_type: c.key_type,
            ttl: c.secret_ttl,
            grace_period_ratio: c.grace_period_ratio,
            grace_period_ratio_jitter: c.grace_period_ratio_jitter,
            initial_backoff: c.initial_backoff,
            max_backoff: c.max_backoff,
            ca_timeout: c.ca_timeout,
            first_fetch_delay: c.first_fetch_delay,
        })
    }
}

/// The manager's state, for readiness and `/debug/certs`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Status {
    /// A valid certificate is being offered and the CA is not refusing us.
    pub ready: bool,
    /// Why not ready (empty when ready).
    pub reason: String,
    /// The next renewal or retry.
    pub next_refresh: Option<SystemTime>,
    pub last_error: Option<String>,
    pub consecutive_failures: u32,
    /// The last CA answer was a refusal (`UNAUTHENTICATED`, `INVALID_ARGUMENT`…).
    pub refused: bool,
    /// Certificates accepted so far (the first one included).
    pub issued: u64,
}

/// Keeps the workload's credentials current. Share it in an `Arc` and spawn
/// [`SecretManager::run`].
pub struct SecretManager {
    cfg: ManagerConfig,
    source: Arc<dyn CertificateSource>,
    token: TokenFile,
    clock: Clock,
    metrics: Arc<Metrics>,
    creds: watch::Sender<Option<Credentials>>,
    status: watch::Sender<Status>,
    demand: Notify,
    refresh_now: Notify,
    /// Trace context of the first client that asked, for the first CSR.
    parent: Mutex<Option<opentelemetry::Context>>,
}

impl fmt::Debug for SecretManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretManager")
            .field("id", &self.cfg.id.as_str())
            .field("token", &self.token.path())
            .field("status", &*self.status.borrow())
            .finish()
    }
}

impl SecretManager {
    pub fn new(
        cfg: ManagerConfig,
        source: Arc<dyn CertificateSource>,
        token: TokenFile,
        clock: Clock,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let status = Status {
            reason: "no certificate yet".into(),
            ..Status::default()
        };
        Arc::new(SecretManager {
            cfg,
            source,
            token,
            clock,
            metrics,
            creds: watch::channel(None).0,
            status: watch::channel(status).0,
            demand: Notify::new(),
            refresh_now: Notify::new(),
            parent: Mutex::new(None),
        })
    }

    pub fn id(&self) -> &SpiffeId {
        &self.cfg.id
    }

    pub fn clock(&self) -> Clock {
        self.clock
    }

    /// Subscribes to the credentials (`None` until the first certificate and
    /// after an expiry).
    pub fn credentials(&self) -> CredentialsRx {
        self.creds.subscribe()
    }

    /// The current credentials.
    pub fn current(&self) -> Option<Credentials> {
        self.creds.borrow().clone()
    }

    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    pub fn status_rx(&self) -> watch::Receiver<Status> {
        self.status.subscribe()
    }

    /// A client wants credentials: start the first CSR now instead of after
    /// the first-fetch delay, continuing `parent`'s trace.
    pub fn request(&self, parent: Option<opentelemetry::Context>) {
        if self.creds.borrow().is_none()
            && let Some(cx) = parent
            && let Ok(mut slot) = self.parent.lock()
            && slot.is_none()
        {
            *slot = Some(cx);
        }
        self.demand.notify_one();
    }

    /// Renews now instead of at the scheduled point (or retries now after
    /// a failure). For operators and benchmarks; the schedule resumes after.
    pub fn refresh_now(&self) {
        self.refresh_now.notify_one();
    }

    /// Renews until `cancel` fires.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        // The first use of the random generator seeds it, which takes tens
        // of milliseconds with aws-lc's CPU-jitter entropy: make the first
        // key now, before any client asks, so that the first answer does
        // not wait for it. An ECDSA key is made right here (the seeding
        // would block whoever comes first anyway, and no extra thread
        // stays around); an RSA key takes long enough to go to the
        // blocking pool.
        let mut first_key = Some(prepare_key(self.cfg.key_type));
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = self.demand.notified() => {}
            _ = tokio::time::sleep(self.cfg.first_fetch_delay) => {}
        }
        let mut backoff = Backoff::new(self.cfg.initial_backoff, self.cfg.max_backoff);
        loop {
            let key = match first_key.take() {
                Some(prepared) => prepared.await,
                None => None,
            };
            match self.renew(key).await {
                Ok(creds) => {
                    backoff.reset();
                    let at = self.accept(creds);
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep_until(self.clock.instant_at(at)) => {}
                        _ = self.refresh_now.notified() => {}
                    }
                }
                Err(e) => {
                    let delay = if e.is_refusal() {
                        backoff.at_cap()
                    } else {
                        backoff.next_delay()
                    };
                    self.failed(&e, delay);
                    if !self.wait_retry(delay, &cancel).await {
                        return;
                    }
                }
            }
        }
    }

    /// One CSR (span `agent.csr`), inside `agent.rotate` when a certificate
    /// is held; the first one continues the first client's trace instead.
    async fn renew(&self, key: Option<PrivateKey>) -> Result<Credentials> {
        match self.current() {
            Some(current) => {
                let span = info_span!(
                    "agent.rotate",
                    spiffe.id = self.cfg.id.as_str(),
                    cert.serial = %current.svid.leaf().serial,
                );
                self.csr(None, key).instrument(span).await
            }
            None => {
                let parent = self.parent.lock().ok().and_then(|mut p| p.take());
                self.csr(parent, key).await
            }
        }
    }

    /// One CSR with `key`, or a fresh key when none is given.
    async fn csr(
        &self,
        parent: Option<opentelemetry::Context>,
        key: Option<PrivateKey>,
    ) -> Result<Credentials> {
        let id = &self.cfg.id;
        let span = info_span!(
            "agent.csr",
            spiffe.id = id.as_str(),
            ttl_secs = self.cfg.ttl.as_secs(),
            key.type = self.cfg.key_type.as_str(),
        );
        if let Some(cx) = parent {
            set_remote_parent(&span, cx);
        }
        async {
            let token = self.token.read().await?;
            let key = match key {
                Some(key) => key,
                None => generate_key(self.cfg.key_type).await?,
            };
            let csr_pem = key.csr_for(id)?;
            let req = SignRequest {
                id: id.clone(),
                csr_pem,
                ttl: self.cfg.ttl,
                token,
            };
            self.metrics.csr_sent();
            let answer =
                match tokio::time::timeout(self.cfg.ca_timeout, self.source.sign(req)).await {
                    Ok(answer) => answer,
                    Err(_) => Err(Error::CaUnavailable {
                        id: id.clone(),
                        message: format!("no answer within {:?}", self.cfg.ca_timeout),
                    }),
                };
            let checked = answer.and_then(|chain| check_answer(id, key, &chain, self.clock.now()));
            if checked.is_err() {
                self.metrics.csr_failed();
            }
            let (svid, bundle) = checked?;
            Ok(Credentials {
                svid: Arc::new(svid),
                bundle: Arc::new(bundle),
            })
        }
        .instrument(span)
        .await
    }

    /// Publishes fresh credentials; returns when to renew them.
    fn accept(&self, creds: Credentials) -> SystemTime {
        let now = self.clock.now();
        let leaf = creds.svid.leaf().clone();
        // The life counts from when we got the certificate, not from its
        // backdated NotBefore (Istio does the same), so short TTLs renew
        // at the intended point.
        let start = leaf.not_before.max(now);
        let jitter = draw_jitter(self.cfg.grace_period_ratio_jitter);
        let at = refresh_at(start, leaf.not_after, self.cfg.grace_period_ratio, jitter)
            .max(now + MIN_REFRESH_DELAY);
        let roots_changed = self
            .creds
            .borrow()
            .as_ref()
            .is_some_and(|old| old.bundle != creds.bundle);
        self.creds.send_replace(Some(creds));
        self.metrics.certs_issued.inc();
        self.status.send_modify(|s| {
            s.ready = true;
            s.reason.clear();
            s.refused = false;
            s.consecutive_failures = 0;
            s.last_error = None;
            s.next_refresh = Some(at);
            s.issued += 1;
        });
        info!(
            spiffe.id = self.cfg.id.as_str(),
            cert.serial = %leaf.serial,
            cert.not_after = unix_secs(leaf.not_after),
            next_rotation = unix_secs(at),
            roots_changed,
            "workload certificate issued"
        );
        at
    }

    fn failed(&self, e: &Error, delay: Duration) {
        let now = self.clock.now();
        let valid = self
            .creds
            .borrow()
            .as_ref()
            .is_some_and(|c| !c.svid.leaf().is_expired_at(now));
        let refused = e.is_refusal();
        let retry_in_ms = delay.as_millis() as u64;
        if refused {
            error!(
                spiffe.id = self.cfg.id.as_str(),
                error = %e,
                retry_in_ms,
                keeping_current = valid,
                "THE CA REFUSES THIS AGENT: check the service-account token, the trust domain \
                 and the CA's authentication settings; retrying at the backoff cap"
            );
        } else {
            warn!(
                spiffe.id = self.cfg.id.as_str(),
                error = %e,
                retry_in_ms,
                keeping_current = valid,
                "certificate renewal failed; retrying"
            );
        }
        self.status.send_modify(|s| {
            s.ready = valid && !refused;
            s.reason = match (valid, refused) {
                (_, true) => format!("the CA refuses this agent: {e}"),
                (false, false) => format!("no valid certificate: {e}"),
                (true, false) => String::new(),
            };
            s.refused = refused;
            s.consecutive_failures += 1;
            s.last_error = Some(e.to_string());
            s.next_refresh = Some(now + delay);
        });
    }

    /// Sleeps `delay`, withdrawing the current certificate if it expires
    /// meanwhile. False when cancelled.
    async fn wait_retry(&self, delay: Duration, cancel: &CancellationToken) -> bool {
        let deadline = Instant::now() + delay;
        loop {
            let expiry = self
                .creds
                .borrow()
                .as_ref()
                .map(|c| c.svid.leaf().not_after);
            let expiry_at = expiry.map(|t| self.clock.instant_at(t + Duration::from_millis(1)));
            tokio::select! {
                _ = cancel.cancelled() => return false,
                _ = tokio::time::sleep_until(deadline) => return true,
                _ = self.refresh_now.notified() => return true,
                _ = sleep_until_opt(expiry_at) => self.withdraw(),
            }
        }
    }

    fn withdraw(&self) {
        let Some(old) = self.creds.send_replace(None) else {
            return;
        };
        error!(
            spiffe.id = self.cfg.id.as_str(),
            cert.serial = %old.svid.leaf().serial,
            cert.not_after = unix_secs(old.svid.leaf().not_after),
            "the workload certificate expired and could not be renewed; no longer offering it"
        );
        self.status.send_modify(|s| {
            s.ready = false;
            s.reason = format!(
                "certificate {} expired; renewal failing: {}",
                old.svid.leaf().serial,
                s.last_error.as_deref().unwrap_or("unknown")
            );
        });
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The first key, made now (ECDSA) or on the blocking pool (RSA).
fn prepare_key(key_type: KeyType) -> BoxFuture<'static, Option<PrivateKey>> {
    if key_type == KeyType::Rsa2048 {
        let task = tokio::task::spawn_blocking(move || PrivateKey::generate(key_type));
        async move { task.await.ok()?.ok() }.boxed()
    } else {
        futures::future::ready(PrivateKey::generate(key_type).ok()).boxed()
    }
}

/// RSA generation takes tens of milliseconds: keep it off the async threads.
async fn generate_key(key_type: KeyType) -> Result<PrivateKey> {
    if key_type == KeyType::Rsa2048 {
        tokio::task::spawn_blocking(move || PrivateKey::generate(key_type))
            .await
            .map_err(|e| {
                Error::Common(meshid_common::Error::KeyGeneration {
                    key_type: key_type.as_str(),
                    reason: e.to_string(),
                })
            })?
            .map_err(Error::from)
    } else {
        Ok(PrivateKey::generate(key_type)?)
    }
}
