//! One identity kept fresh: the [`Worker`] both runs the renewal loop and is
//! the handle others read its credentials and status from.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, warn};

use super::limiter::FetchLimiter;
use super::source::{CertificateSource, SignRequest};
use super::token::TokenFile;
use super::{Backoff, Clock, MIN_REFRESH_DELAY, RenewalPolicy, Verdict, classify};
use crate::ca_client::validate_response;
use crate::cert::unix_secs;
use crate::error::{Error, Result};
use crate::keys::{KeyType, PrivateKey};
use crate::refresh::{draw_jitter, refresh_at};
use crate::spiffe::SpiffeId;
use crate::telemetry::set_remote_parent;
use crate::tls::{Credentials, CredentialsRx, Svid};

/// Where one identity's certificate stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CertState {
    /// No certificate yet and no failure yet.
    #[default]
    Initializing,
    /// A valid certificate is offered (renewals may be failing).
    Available,
    /// No valid certificate: the last request failed or the cert expired.
    Unavailable,
}

impl CertState {
    pub fn as_str(self) -> &'static str {
        match self {
            CertState::Initializing => "initializing",
            CertState::Available => "available",
            CertState::Unavailable => "unavailable",
        }
    }
}

/// A worker's state, for readiness, `/debug/certs` and tests.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Status {
    pub state: CertState,
    /// A valid certificate is offered and the CA is not refusing us.
    pub ready: bool,
    /// Why not ready (empty when ready).
    pub reason: String,
    /// The next renewal or retry.
    #[serde(skip)]
    pub next_refresh: Option<SystemTime>,
    pub last_error: Option<String>,
    /// How the last failure was classified (`None` after a success).
    pub verdict: Option<Verdict>,
    pub consecutive_failures: u32,
    /// The last answer was a refusal or a setup error ([`Verdict`] other
    /// than `Retry`): the worker is waiting at the backoff cap.
    pub refused: bool,
    /// Certificates accepted so far (the first one included).
    pub issued: u64,
    /// Failed requests so far.
    pub failures: u64,
    /// The identity is no longer managed (it left the node).
    #[serde(skip)]
    retired: bool,
}

/// When the first request goes out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FirstFetch {
    /// At once (the ztunnel fetches ahead of traffic).
    Now,
    /// When someone asks ([`Worker::request`]), so the first CSR continues
    /// that client's trace, or after this delay, whichever comes first.
    OnDemandOrAfter(Duration),
}

/// Makes the span of one CSR: the component names it (`agent.csr`,
/// `ztunnel.csr`); `current` is the serial of the certificate being renewed.
pub type SpanFn = fn(id: &SpiffeId, key_type: KeyType, current: Option<&str>) -> tracing::Span;

/// What a worker needs to know.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub id: SpiffeId,
    pub key_type: KeyType,
    pub ttl: Duration,
    pub policy: RenewalPolicy,
    /// Deadline of one request, whatever the source does.
    pub ca_timeout: Duration,
    /// Ask on behalf of `id` (node agents).
    pub on_behalf: bool,
    pub first_fetch: FirstFetch,
    pub span: SpanFn,
}

/// Counters a component keeps about its requests. All default to nothing.
pub trait RenewalEvents: Send + Sync + 'static {
    /// A CSR went out.
    fn csr_sent(&self) {}
    /// A CSR failed (no answer, a refusal or an unusable answer).
    fn csr_failed(&self) {}
    /// A certificate was accepted.
    fn issued(&self) {}
    /// An identity moved between states (`None`: it did not exist / left).
    fn state_changed(&self, _from: Option<CertState>, _to: Option<CertState>) {}
}

impl RenewalEvents for () {}

/// The parts a worker is built from, swappable in tests.
#[derive(Clone)]
pub struct WorkerParts {
    pub source: Arc<dyn CertificateSource>,
    pub token: TokenFile,
    pub clock: Clock,
    pub events: Arc<dyn RenewalEvents>,
    /// Shared by every worker of a node agent; `None` for a single identity.
    pub limiter: Option<Arc<FetchLimiter>>,
}

impl fmt::Debug for WorkerParts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerParts")
            .field("source", &self.source)
            .field("token", &self.token.path())
            .field("clock", &self.clock)
            .finish()
    }
}

/// Keeps one identity's credentials current. Share it in an `Arc`, spawn
/// [`Worker::run`], read it from anywhere.
pub struct Worker {
    cfg: WorkerConfig,
    parts: WorkerParts,
    creds: watch::Sender<Option<Credentials>>,
    status: watch::Sender<Status>,
    /// A client asked: the first request goes out now.
    demand: Notify,
    /// A connection waits: move ahead in the fetch limiter's queue.
    urgent: Notify,
    waiters: AtomicUsize,
    refresh_now: Notify,
    /// Trace context of the first client that asked, for the first CSR.
    parent: Mutex<Option<opentelemetry::Context>>,
    /// A fingerprint of the token the last CSR carried (never the token),
    /// so a refused worker can tell when the kubelet rotates the file.
    last_token: Mutex<Option<u64>>,
}

impl fmt::Debug for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("id", &self.cfg.id.as_str())
            .field("status", &*self.status.borrow())
            .finish()
    }
}

impl Worker {
    pub fn new(cfg: WorkerConfig, parts: WorkerParts) -> Arc<Self> {
        let status = Status {
            reason: "no certificate yet".into(),
            ..Status::default()
        };
        parts
            .events
            .state_changed(None, Some(CertState::Initializing));
        Arc::new(Worker {
            cfg,
            parts,
            creds: watch::channel(None).0,
            status: watch::channel(status).0,
            demand: Notify::new(),
            urgent: Notify::new(),
            waiters: AtomicUsize::new(0),
            refresh_now: Notify::new(),
            parent: Mutex::new(None),
            last_token: Mutex::new(None),
        })
    }

    pub fn id(&self) -> &SpiffeId {
        &self.cfg.id
    }

    pub fn clock(&self) -> Clock {
        self.parts.clock
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

    /// The current credentials if they are valid now.
    pub fn current_valid(&self) -> Option<Credentials> {
        let now = self.parts.clock.now();
        self.creds
            .borrow()
            .as_ref()
            .filter(|c| !c.svid.leaf().is_expired_at(now))
            .cloned()
    }

    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    pub fn status_rx(&self) -> watch::Receiver<Status> {
        self.status.subscribe()
    }

    pub fn state(&self) -> CertState {
        self.status.borrow().state
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

    /// Valid credentials, waiting up to `wait` for the first certificate
    /// (with priority in the fetch limiter). Fails at once when the last
    /// request failed and no valid certificate is held.
    pub async fn wait_valid(&self, wait: Duration) -> Result<Credentials> {
        if let Some(c) = self.current_valid() {
            return Ok(c);
        }
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.waiters);
        self.urgent.notify_one();
        self.demand.notify_one();
        let mut creds_rx = self.creds.subscribe();
        let mut status_rx = self.status.subscribe();
        let unavailable = |reason: String| Error::CertificateUnavailable {
            id: self.cfg.id.to_string(),
            reason,
        };
        let outcome = tokio::time::timeout(wait, async {
            loop {
                if let Some(c) = self.current_valid() {
                    return Ok(c);
                }
                {
                    let st = status_rx.borrow_and_update();
                    if st.retired {
                        return Err(unavailable("the identity is no longer managed".into()));
                    }
                    if st.state == CertState::Unavailable {
                        return Err(unavailable(
                            st.last_error
                                .clone()
                                .unwrap_or_else(|| "no valid certificate".into()),
                        ));
                    }
                }
                tokio::select! {
                    r = creds_rx.changed() => if r.is_err() { break },
                    r = status_rx.changed() => if r.is_err() { break },
                }
            }
            Err(unavailable("the worker stopped".into()))
        })
        .await;
        outcome.unwrap_or_else(|_| {
            Err(Error::CertificateWait {
                id: self.cfg.id.to_string(),
                after: wait,
            })
        })
    }

    /// The identity is no longer managed: its state leaves the counts. The
    /// caller stops the task.
    pub fn retire(&self) {
        let events = &self.parts.events;
        self.status.send_modify(|s| {
            if !s.retired {
                s.retired = true;
                events.state_changed(Some(s.state), None);
            }
        });
        self.creds.send_replace(None);
    }

    /// Renews until `cancel` fires.
    ///
    /// Cancellation is one `select!` around the whole loop rather than one
    /// per await: every `select!` is its own poll and drop code in this
    /// state machine, which all of it lands in one function of each binary
    /// (issue 11's size budget). Dropping the loop at any await is what the
    /// per-await selects did.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => {}
            _ = self.renew_forever() => {}
        }
    }

    async fn renew_forever(&self) {
        // The first use of the random generator seeds it, which takes tens
        // of milliseconds with aws-lc's CPU-jitter entropy: make the first
        // key now, before any client asks, so that the first answer does
        // not wait for it (RSA goes to the blocking pool).
        let mut first_key = Some(prepare_key(self.cfg.key_type));
        if let FirstFetch::OnDemandOrAfter(delay) = self.cfg.first_fetch {
            tokio::select! {
                _ = self.demand.notified() => {}
                _ = tokio::time::sleep(delay) => {}
            }
        }
        let mut backoff =
            Backoff::new(self.cfg.policy.initial_backoff, self.cfg.policy.max_backoff);
        loop {
            let key = match first_key.take() {
                Some(prepared) => prepared.await,
                None => None,
            };
            let permit = match &self.parts.limiter {
                Some(limiter) => {
                    let waiting = || self.waiters.load(Ordering::SeqCst) > 0;
                    Some(
                        limiter
                            .acquire(waiting(), Some((&self.urgent, &waiting)))
                            .await,
                    )
                }
                None => None,
            };
            let result = self.renew(key).await;
            drop(permit);
            match result {
                Ok(creds) => {
                    backoff.reset();
                    let at = self.accept(creds);
                    tokio::select! {
                        _ = tokio::time::sleep_until(self.parts.clock.instant_at(at)) => {}
                        _ = self.refresh_now.notified() => {}
                    }
                }
                Err(e) => {
                    let verdict = classify(&e);
                    let delay = match verdict {
                        Verdict::Retry => backoff.next_delay(),
                        Verdict::Refused | Verdict::Fatal => backoff.at_cap(),
                    };
                    self.failed(&e, verdict, delay);
                    // A refusal may be the token's fault (expired, wrong
                    // audience): a new token is worth a try at once.
                    let watch_token = verdict == Verdict::Refused;
                    self.wait_retry(delay, watch_token).await;
                }
            }
        }
    }

    /// One CSR with `key` (or a fresh key), in the component's span; the
    /// first one continues the first client's trace.
    async fn renew(&self, key: Option<PrivateKey>) -> Result<Credentials> {
        let current = self.current().map(|c| c.svid.leaf().serial.clone());
        let span = (self.cfg.span)(&self.cfg.id, self.cfg.key_type, current.as_deref());
        if current.is_none()
            && let Some(cx) = self.parent.lock().ok().and_then(|mut p| p.take())
        {
            set_remote_parent(&span, cx);
        }
        self.csr(key).instrument(span).await
    }

    async fn csr(&self, key: Option<PrivateKey>) -> Result<Credentials> {
        let id = &self.cfg.id;
        let token = self.parts.token.read()?;
        if let Ok(mut last) = self.last_token.lock() {
            *last = Some(fingerprint(token.expose()));
        }
        let key = match key {
            Some(key) => key,
            None => generate_key(self.cfg.key_type).await?,
        };
        let req = SignRequest {
            id: id.clone(),
            csr_pem: key.csr_for(id)?,
            ttl: self.cfg.ttl,
            token,
            on_behalf: self.cfg.on_behalf,
        };
        self.parts.events.csr_sent();
        let answer =
            match tokio::time::timeout(self.cfg.ca_timeout, self.parts.source.sign(req)).await {
                Ok(answer) => answer,
                Err(_) => Err(Error::Ca {
                    code: tonic::Code::DeadlineExceeded,
                    message: format!("no answer within {:?}", self.cfg.ca_timeout),
                }),
            };
        let checked = answer.and_then(|chain| {
            let (mut certs, bundle) = validate_response(&chain, &key, id, self.parts.clock.now())?;
            // Roots never travel in the SVID chain itself.
            certs.retain(|d| !bundle.contains(d));
            Ok(Credentials {
                svid: Arc::new(Svid::new(certs, key)?),
                bundle: Arc::new(bundle),
            })
        });
        if checked.is_err() {
            self.parts.events.csr_failed();
        }
        checked
    }

    fn set_state(&self, s: &mut Status, to: CertState) {
        if !s.retired && s.state != to {
            self.parts.events.state_changed(Some(s.state), Some(to));
            s.state = to;
        }
    }

    /// Publishes fresh credentials; returns when to renew them.
    fn accept(&self, creds: Credentials) -> SystemTime {
        let now = self.parts.clock.now();
        let leaf = creds.svid.leaf().clone();
        // The life counts from when we got the certificate, not from its
        // backdated NotBefore (Istio does the same), so short TTLs renew
        // at the intended point.
        let start = leaf.not_before.max(now);
        let policy = &self.cfg.policy;
        let jitter = draw_jitter(policy.grace_period_ratio_jitter);
        let at = refresh_at(start, leaf.not_after, policy.grace_period_ratio, jitter)
            .max(now + MIN_REFRESH_DELAY);
        let roots_changed = self
            .creds
            .borrow()
            .as_ref()
            .is_some_and(|old| old.bundle != creds.bundle);
        self.creds.send_replace(Some(creds));
        self.parts.events.issued();
        self.status.send_modify(|s| {
            self.set_state(s, CertState::Available);
            s.ready = true;
            s.reason.clear();
            s.refused = false;
            s.verdict = None;
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

    fn failed(&self, e: &Error, verdict: Verdict, delay: Duration) {
        let now = self.parts.clock.now();
        let valid = self.current_valid().is_some();
        let retry_in_ms = delay.as_millis() as u64;
        let id = self.cfg.id.as_str();
        // One `error!` for both setup verdicts (each event is its own
        // callsite and field-recording code), the text chosen at run time.
        match verdict {
            Verdict::Retry => warn!(
                spiffe.id = id,
                error = %e,
                retry_in_ms,
                keeping_current = valid,
                "certificate request failed; retrying"
            ),
            Verdict::Refused | Verdict::Fatal => error!(
                spiffe.id = id,
                error = %e,
                retry_in_ms,
                keeping_current = valid,
                "{}",
                if verdict == Verdict::Refused {
                    "THE CA REFUSES THIS REQUEST: check the service-account token, the trust \
                     domain and the CA's authentication settings; retrying at the backoff cap"
                } else {
                    "certificate requests cannot succeed with this setup (CA address, roots or \
                     key type); retrying at the backoff cap"
                }
            ),
        }
        let refused = verdict != Verdict::Retry;
        self.status.send_modify(|s| {
            let to = if valid {
                CertState::Available
            } else {
                CertState::Unavailable
            };
            self.set_state(s, to);
            s.ready = valid && !refused;
            s.reason = match (valid, refused) {
                (_, true) => format!("the CA refuses this request: {e}"),
                (false, false) => format!("no valid certificate: {e}"),
                (true, false) => String::new(),
            };
            s.refused = refused;
            s.verdict = Some(verdict);
            s.consecutive_failures += 1;
            s.failures += 1;
            s.last_error = Some(e.to_string());
            s.next_refresh = Some(now + delay);
        });
    }

    /// Sleeps `delay`, withdrawing the current certificate if it expires
    /// meanwhile; with `watch_token`, ends early once the token file holds
    /// a different token than the refused request carried.
    async fn wait_retry(&self, delay: Duration, watch_token: bool) {
        let deadline = Instant::now() + delay;
        let mut token_check = tokio::time::interval(TOKEN_CHECK_INTERVAL);
        token_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        token_check.reset();
        loop {
            let expiry = self
                .creds
                .borrow()
                .as_ref()
                .map(|c| c.svid.leaf().not_after);
            let expiry_at =
                expiry.map(|t| self.parts.clock.instant_at(t + Duration::from_millis(1)));
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return,
                _ = self.refresh_now.notified() => return,
                _ = sleep_until_opt(expiry_at) => self.withdraw(),
                _ = token_check.tick(), if watch_token => {
                    if self.token_changed() {
                        info!(
                            spiffe.id = self.cfg.id.as_str(),
                            "the service-account token changed; retrying the refused request now"
                        );
                        return;
                    }
                }
            }
        }
    }

    /// The token file now holds another token than the last CSR carried.
    fn token_changed(&self) -> bool {
        let Ok(token) = self.parts.token.read() else {
            return false;
        };
        let last = self.last_token.lock().ok().and_then(|l| *l);
        last.is_some_and(|l| l != fingerprint(token.expose()))
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
            self.set_state(s, CertState::Unavailable);
            s.ready = false;
            s.reason = format!(
                "certificate {} expired; renewal failing: {}",
                old.svid.leaf().serial,
                s.last_error.as_deref().unwrap_or("unknown")
            );
        });
    }
}

/// How often a refused worker looks at its token file.
const TOKEN_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// A fingerprint of a token, to notice a new one without keeping it.
fn fingerprint(token: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    token.hash(&mut h);
    h.finish()
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
            .map_err(|e| Error::KeyGeneration {
                key_type: key_type.as_str(),
                reason: e.to_string(),
            })?
    } else {
        PrivateKey::generate(key_type)
    }
}
