//! The certificate manager: one SVID per workload identity on this node.
//!
//! Each identity gets a worker task that fetches its certificate ahead of
//! traffic, renews it at half-life (± jitter, [`refresh_at`]), keeps the
//! valid certificate when a renewal fails and retries with capped exponential
//! backoff ([`backoff`]). A [`FetchLimiter`] lets at most N fetches run at
//! once; a connection waiting for a certificate ([`CertManager::wait_for`])
//! moves its identity to the front of the queue. Identities that leave the
//! node are dropped with their certificates ([`CertManager::set_identities`]).
//! Every returned leaf must carry exactly the identity asked for.
//!
//! Credentials are published per identity on a `watch` channel, so TLS
//! configs built on it (see [`crate::tls`]) pick up a renewal at the next
//! handshake while open connections carry on.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, SystemTime};

use meshid_common::cert::unix_secs;
use meshid_common::{Credentials, CredentialsRx, SpiffeId, Svid, TrustBundle};
use serde::Serialize;
use tokio::sync::{Notify, oneshot, watch};
use tokio::task::AbortHandle;
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::source::CertificateSource;

/// The shortest wait before a renewal, so a cert with a tiny or odd
/// lifetime cannot make a worker spin.
pub const MIN_REFRESH_DELAY: Duration = Duration::from_millis(100);

use meshid_common::refresh::{backoff_delay, draw_jitter, random_unit, refresh_at};

/// Where one identity's certificate stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CertState {
    /// No certificate yet and no failure yet.
    Initializing,
    /// A valid certificate is in use (renewals may be failing).
    Available,
    /// No valid certificate: the last fetch failed or the cert expired.
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

/// Renewal and retry settings.
#[derive(Clone, Debug)]
pub struct CertSettings {
    pub grace_period_ratio: f64,
    pub grace_period_ratio_jitter: f64,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub max_concurrent_fetches: usize,
    /// How long [`CertManager::wait_for`] waits.
    pub cert_wait: Duration,
}

impl Default for CertSettings {
    fn default() -> Self {
        use crate::config::*;
        CertSettings {
            grace_period_ratio: DEFAULT_GRACE_PERIOD_RATIO,
            grace_period_ratio_jitter: DEFAULT_GRACE_PERIOD_RATIO_JITTER,
            initial_backoff: DEFAULT_INITIAL_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
            max_concurrent_fetches: DEFAULT_MAX_CONCURRENT_FETCHES,
            cert_wait: DEFAULT_CERT_WAIT,
        }
    }
}

/// A slot to run one fetch; handed to the next waiter when dropped.
pub struct Permit {
    limiter: Option<Arc<FetchLimiter>>,
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Permit")
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(l) = self.limiter.take() {
            l.release();
        }
    }
}

#[derive(Default)]
struct LimiterState {
    free: usize,
    urgent: VecDeque<oneshot::Sender<Permit>>,
    normal: VecDeque<oneshot::Sender<Permit>>,
}

/// A counting semaphore with two queues: waiters marked urgent are served
/// before the others, in arrival order within each queue.
pub struct FetchLimiter {
    state: Mutex<LimiterState>,
}

impl fmt::Debug for FetchLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.state.lock().expect("limiter lock");
        f.debug_struct("FetchLimiter")
            .field("free", &st.free)
            .field("urgent", &st.urgent.len())
            .field("normal", &st.normal.len())
            .finish()
    }
}

impl FetchLimiter {
    pub fn new(permits: usize) -> Arc<Self> {
        Arc::new(FetchLimiter {
            state: Mutex::new(LimiterState {
                free: permits,
                ..Default::default()
            }),
        })
    }

    fn enqueue(
        self: &Arc<Self>,
        urgent: bool,
    ) -> std::result::Result<Permit, oneshot::Receiver<Permit>> {
        let mut st = self.state.lock().expect("limiter lock");
        if st.free > 0 {
            st.free -= 1;
            return Ok(Permit {
                limiter: Some(self.clone()),
            });
        }
        let (tx, rx) = oneshot::channel();
        if urgent {
            st.urgent.push_back(tx);
        } else {
            st.normal.push_back(tx);
        }
        Err(rx)
    }

    /// Waits for a permit. When `upgrade`'s notify fires and its predicate
    /// holds (a stale notification is ignored), a waiter that was not urgent
    /// moves to the urgent queue.
    pub async fn acquire(
        self: &Arc<Self>,
        mut urgent: bool,
        upgrade: Option<(&Notify, &(dyn Fn() -> bool + Sync))>,
    ) -> Permit {
        let mut rx = match self.enqueue(urgent) {
            Ok(p) => return p,
            Err(rx) => rx,
        };
        loop {
            let upgraded = async {
                match upgrade {
                    Some((n, still_urgent)) if !urgent => loop {
                        n.notified().await;
                        if still_urgent() {
                            break;
                        }
                    },
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                got = &mut rx => match got {
                    Ok(p) => return p,
                    // The limiter dropped our sender without a permit: ask again.
                    Err(_) => match self.enqueue(urgent) {
                        Ok(p) => return p,
                        Err(r) => rx = r,
                    },
                },
                _ = upgraded => {
                    urgent = true;
                    let old = std::mem::replace(&mut rx, match self.enqueue(true) {
                        Ok(p) => return p,
                        Err(r) => r,
                    });
                    // A permit already sent to the old place is released by this drop.
                    drop(old);
                }
            }
        }
    }

    fn release(self: Arc<Self>) {
        let mut st = self.state.lock().expect("limiter lock");
        loop {
            let next = match st.urgent.pop_front() {
                Some(tx) => Some(tx),
                None => st.normal.pop_front(),
            };
            let Some(tx) = next else {
                st.free += 1;
                return;
            };
            let permit = Permit {
                limiter: Some(self.clone()),
            };
            match tx.send(permit) {
                Ok(()) => return,
                // That waiter left; disarm the permit and try the next one.
                Err(mut p) => p.limiter = None,
            }
        }
    }

    /// Free permits now (tests).
    pub fn available(&self) -> usize {
        self.state.lock().expect("limiter lock").free
    }
}

#[derive(Debug, Default)]
struct Status {
    /// Set when the identity leaves the node; the worker may still be
    /// finishing a step and must not touch the metrics after that.
    removed: bool,
    last_error: Option<String>,
    fetches: u64,
    failures: u64,
    next_refresh: Option<SystemTime>,
}

/// One identity on this node.
pub struct Entry {
    id: SpiffeId,
    sni: String,
    creds: watch::Sender<Option<Credentials>>,
    state: watch::Sender<CertState>,
    status: Mutex<Status>,
    waiters: AtomicUsize,
    urgent: Notify,
    /// Per-identity server config of the HBONE server, built on first use.
    pub(crate) server_config: OnceLock<Arc<rustls::ServerConfig>>,
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("id", &self.id.as_str())
            .field("state", &*self.state.borrow())
            .finish()
    }
}

impl Entry {
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// The identity's credentials channel (`None` until the first cert).
    pub fn credentials(&self) -> CredentialsRx {
        self.creds.subscribe()
    }

    pub fn state(&self) -> CertState {
        *self.state.borrow()
    }

    fn valid_creds(&self, now: SystemTime) -> Option<Credentials> {
        self.creds
            .borrow()
            .as_ref()
            .filter(|c| !c.svid.leaf().is_expired_at(now))
            .cloned()
    }
}

/// One row of `/debug/certs`.
#[derive(Clone, Debug, Serialize)]
pub struct CertSnapshot {
    pub identity: String,
    pub state: CertState,
    pub serial: Option<String>,
    pub not_before: Option<i64>,
    pub not_after: Option<i64>,
    pub next_refresh: Option<i64>,
    pub fetches: u64,
    pub failures: u64,
    pub last_error: Option<String>,
}

struct Managed {
    entry: Arc<Entry>,
    task: AbortHandle,
}

struct Inner {
    source: Arc<dyn CertificateSource>,
    settings: CertSettings,
    limiter: Arc<FetchLimiter>,
    metrics: Arc<Metrics>,
    entries: RwLock<HashMap<SpiffeId, Managed>>,
    by_sni: RwLock<HashMap<String, SpiffeId>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Ok(entries) = self.entries.get_mut() {
            for m in entries.values() {
                m.task.abort();
            }
        }
    }
}

/// The per-identity certificates of this node's workloads.
#[derive(Clone)]
pub struct CertManager {
    inner: Arc<Inner>,
}

impl fmt::Debug for CertManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertManager")
            .field("identities", &self.len())
            .field("limiter", &self.inner.limiter)
            .finish()
    }
}

impl CertManager {
    pub fn new(
        source: Arc<dyn CertificateSource>,
        settings: CertSettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        let limiter = FetchLimiter::new(settings.max_concurrent_fetches.max(1));
        CertManager {
            inner: Arc::new(Inner {
                source,
                settings,
                limiter,
                metrics,
                entries: RwLock::new(HashMap::new()),
                by_sni: RwLock::new(HashMap::new()),
            }),
        }
    }

    /// Makes `ids` the managed identities: new ones start fetching, the ones
    /// not listed are dropped with their certificates.
    pub fn set_identities(&self, ids: &HashSet<SpiffeId>) {
        let mut entries = self.inner.entries.write().expect("entries lock");
        let mut by_sni = self.inner.by_sni.write().expect("sni lock");
        let gone: Vec<SpiffeId> = entries
            .keys()
            .filter(|id| !ids.contains(*id))
            .cloned()
            .collect();
        for id in gone {
            if let Some(m) = entries.remove(&id) {
                m.task.abort();
                by_sni.remove(&m.entry.sni);
                let mut st = m.entry.status.lock().expect("status lock");
                st.removed = true;
                set_state_metric(&self.inner.metrics, Some(m.entry.state()), None);
                drop(st);
                tracing::info!(spiffe.id = %id, "identity left the node; certificate dropped");
            }
        }
        for id in ids {
            if entries.contains_key(id) {
                continue;
            }
            let sni = meshid_common::tls::sni_for(id).to_str().into_owned();
            let entry = Arc::new(Entry {
                id: id.clone(),
                sni: sni.clone(),
                creds: watch::channel(None).0,
                state: watch::channel(CertState::Initializing).0,
                status: Mutex::new(Status::default()),
                waiters: AtomicUsize::new(0),
                urgent: Notify::new(),
                server_config: OnceLock::new(),
            });
            set_state_metric(&self.inner.metrics, None, Some(CertState::Initializing));
            let worker = Worker {
                source: self.inner.source.clone(),
                settings: self.inner.settings.clone(),
                limiter: self.inner.limiter.clone(),
                metrics: self.inner.metrics.clone(),
                entry: entry.clone(),
            };
            let task = tokio::spawn(worker.run()).abort_handle();
            by_sni.insert(sni, id.clone());
            entries.insert(id.clone(), Managed { entry, task });
        }
    }

    /// The entry of a managed identity.
    pub fn entry(&self, id: &SpiffeId) -> Option<Arc<Entry>> {
        self.inner
            .entries
            .read()
            .expect("entries lock")
            .get(id)
            .map(|m| m.entry.clone())
    }

    /// The identity whose [`meshid_common::tls::sni_for`] is `sni`.
    pub fn identity_for_sni(&self, sni: &str) -> Option<SpiffeId> {
        self.inner
            .by_sni
            .read()
            .expect("sni lock")
            .get(&sni.to_ascii_lowercase())
            .cloned()
    }

    pub fn len(&self) -> usize {
        self.inner.entries.read().expect("entries lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn limiter(&self) -> &Arc<FetchLimiter> {
        &self.inner.limiter
    }

    /// The current valid credentials of `id`, without waiting.
    pub fn current(&self, id: &SpiffeId) -> Option<Credentials> {
        self.entry(id)?.valid_creds(SystemTime::now())
    }

    /// Valid credentials for `id`, waiting (with priority) for the first
    /// certificate up to the configured wait. Fails at once for an identity
    /// this node does not host, and when the fetch fails with no valid cert.
    pub async fn wait_for(&self, id: &SpiffeId) -> Result<(Arc<Entry>, Credentials)> {
        let entry = self.entry(id).ok_or_else(|| Error::NotHosted(id.clone()))?;
        if let Some(c) = entry.valid_creds(SystemTime::now()) {
            return Ok((entry, c));
        }
        struct Waiting<'a>(&'a Entry);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.waiters.fetch_sub(1, Ordering::SeqCst);
            }
        }
        entry.waiters.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&entry);
        entry.urgent.notify_one();
        let mut creds_rx = entry.creds.subscribe();
        let mut state_rx = entry.state.subscribe();
        let wait = self.inner.settings.cert_wait;
        let outcome = tokio::time::timeout(wait, async {
            loop {
                if let Some(c) = entry.valid_creds(SystemTime::now()) {
                    return Ok(c);
                }
                if *state_rx.borrow_and_update() == CertState::Unavailable {
                    let reason = entry
                        .status
                        .lock()
                        .expect("status lock")
                        .last_error
                        .clone()
                        .unwrap_or_else(|| "no valid certificate".into());
                    return Err(Error::CertUnavailable {
                        id: id.clone(),
                        reason,
                    });
                }
                tokio::select! {
                    r = creds_rx.changed() => if r.is_err() { break },
                    r = state_rx.changed() => if r.is_err() { break },
                }
            }
            Err(Error::NotHosted(id.clone()))
        })
        .await;
        match outcome {
            Ok(r) => r.map(|c| (entry.clone(), c)),
            Err(_) => Err(Error::Timeout {
                what: format!("waiting for the certificate of {id}"),
                after: wait,
            }),
        }
    }

    /// Every managed certificate and its state, sorted by identity.
    pub fn snapshot(&self) -> Vec<CertSnapshot> {
        let entries = self.inner.entries.read().expect("entries lock");
        let mut rows: Vec<CertSnapshot> = entries
            .values()
            .map(|m| {
                let e = &m.entry;
                let creds = e.creds.borrow().clone();
                let st = e.status.lock().expect("status lock");
                let leaf = creds.as_ref().map(|c| c.svid.leaf().clone());
                CertSnapshot {
                    identity: e.id.to_string(),
                    state: e.state(),
                    serial: leaf.as_ref().map(|l| l.serial.clone()),
                    not_before: leaf.as_ref().map(|l| unix_secs(l.not_before)),
                    not_after: leaf.as_ref().map(|l| unix_secs(l.not_after)),
                    next_refresh: st.next_refresh.map(unix_secs),
                    fetches: st.fetches,
                    failures: st.failures,
                    last_error: st.last_error.clone(),
                }
            })
            .collect();
        rows.sort_by(|a, b| a.identity.cmp(&b.identity));
        rows
    }

    /// How many identities are in each state.
    pub fn counts(&self) -> HashMap<CertState, usize> {
        let entries = self.inner.entries.read().expect("entries lock");
        let mut out = HashMap::new();
        for m in entries.values() {
            *out.entry(m.entry.state()).or_insert(0) += 1;
        }
        out
    }
}

fn set_state_metric(metrics: &Metrics, from: Option<CertState>, to: Option<CertState>) {
    if from == to {
        return;
    }
    if let Some(f) = from {
        metrics
            .workload_certs
            .get_or_create(&Metrics::state(f.as_str()))
            .dec();
    }
    if let Some(t) = to {
        metrics
            .workload_certs
            .get_or_create(&Metrics::state(t.as_str()))
            .inc();
    }
}

struct Worker {
    source: Arc<dyn CertificateSource>,
    settings: CertSettings,
    limiter: Arc<FetchLimiter>,
    metrics: Arc<Metrics>,
    entry: Arc<Entry>,
}

impl Worker {
    fn set_state(&self, to: CertState) {
        let st = self.entry.status.lock().expect("status lock");
        if st.removed {
            return;
        }
        let from = self.entry.state();
        if from != to {
            set_state_metric(&self.metrics, Some(from), Some(to));
            self.entry.state.send_replace(to);
        }
    }

    async fn run(self) {
        let id = self.entry.id.clone();
        let mut attempt: u32 = 0;
        loop {
            let urgent = self.entry.waiters.load(Ordering::SeqCst) > 0;
            let has_waiters = || self.entry.waiters.load(Ordering::SeqCst) > 0;
            let permit = self
                .limiter
                .acquire(urgent, Some((&self.entry.urgent, &has_waiters)))
                .await;
            let span = tracing::info_span!(
                "ztunnel.cert_fetch",
                spiffe.id = %id,
                attempt,
                urgent = self.entry.waiters.load(Ordering::SeqCst) > 0,
            );
            self.metrics
                .outgoing_requests
                .get_or_create(&self.metrics.csr())
                .inc();
            let result = self
                .source
                .fetch(&id)
                .instrument(span.clone())
                .await
                .and_then(|(svid, bundle)| check_issued(&id, svid, bundle));
            drop(permit);
            let received = SystemTime::now();
            let delay = match result {
                Ok((svid, bundle)) => {
                    attempt = 0;
                    let leaf = svid.leaf().clone();
                    let start = leaf.not_before.max(received);
                    let jitter = draw_jitter(self.settings.grace_period_ratio_jitter);
                    let at = refresh_at(
                        start,
                        leaf.not_after,
                        self.settings.grace_period_ratio,
                        jitter,
                    );
                    {
                        let mut st = self.entry.status.lock().expect("status lock");
                        st.fetches += 1;
                        st.last_error = None;
                        st.next_refresh = Some(at);
                    }
                    span.in_scope(|| {
                        tracing::info!(
                            cert.serial = %leaf.serial,
                            cert.not_after = unix_secs(leaf.not_after),
                            refresh_in_ms = at.duration_since(received).unwrap_or_default().as_millis() as u64,
                            "workload certificate issued"
                        )
                    });
                    self.entry.creds.send_replace(Some(Credentials {
                        svid: Arc::new(svid),
                        bundle: Arc::new(bundle),
                    }));
                    self.set_state(CertState::Available);
                    at.duration_since(received)
                        .unwrap_or_default()
                        .max(MIN_REFRESH_DELAY)
                }
                Err(e) => {
                    self.metrics
                        .failed_outgoing_requests
                        .get_or_create(&self.metrics.csr())
                        .inc();
                    let wait = backoff_delay(
                        attempt,
                        self.settings.initial_backoff,
                        self.settings.max_backoff,
                        random_unit(),
                    );
                    attempt = attempt.saturating_add(1);
                    let valid = self.entry.valid_creds(received);
                    span.in_scope(|| {
                        tracing::warn!(
                            error = %e,
                            retry_in_ms = wait.as_millis() as u64,
                            keeping_valid_cert = valid.is_some(),
                            "workload certificate fetch failed"
                        )
                    });
                    {
                        let mut st = self.entry.status.lock().expect("status lock");
                        st.failures += 1;
                        st.last_error = Some(e.to_string());
                        st.next_refresh = Some(received + wait);
                    }
                    match valid {
                        Some(c) => {
                            // Retry no later than expiry, to flip the state then.
                            self.set_state(CertState::Available);
                            wait.min(c.svid.expires_in(received).max(MIN_REFRESH_DELAY))
                        }
                        None => {
                            self.set_state(CertState::Unavailable);
                            wait
                        }
                    }
                }
            };
            tokio::time::sleep(delay).await;
            if self.entry.valid_creds(SystemTime::now()).is_none()
                && self.entry.creds.borrow().is_some()
            {
                self.set_state(CertState::Unavailable);
            }
        }
    }
}

/// The leaf must carry exactly one URI SAN, the identity asked for, and not
/// be expired.
fn check_issued(id: &SpiffeId, svid: Svid, bundle: TrustBundle) -> Result<(Svid, TrustBundle)> {
    let leaf = svid.leaf();
    let bad = |reason: String| Error::BadCertificate {
        id: id.clone(),
        reason,
    };
    if leaf.uri_sans.len() != 1 {
        return Err(bad(format!(
            "leaf {} has {} URI SANs, expected exactly one",
            leaf.serial,
            leaf.uri_sans.len()
        )));
    }
    if svid.id() != id {
        return Err(bad(format!(
            "leaf {} is for {}, asked for {id}",
            leaf.serial,
            svid.id()
        )));
    }
    if leaf.is_expired_at(SystemTime::now()) {
        return Err(bad(format!("leaf {} is already expired", leaf.serial)));
    }
    Ok((svid, bundle))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{PkiBehaviour, PkiSource};
    use meshid_common::testing::TestPki;

    fn setup(ttl: Duration, settings: CertSettings) -> (Arc<PkiSource>, CertManager) {
        meshid_common::tls::install_crypto_provider();
        let pki = Arc::new(TestPki::new("cluster.local").unwrap());
        let source = Arc::new(PkiSource::new(pki, ttl));
        let m = CertManager::new(source.clone(), settings, Arc::new(Metrics::new()));
        (source, m)
    }

    fn ids(pki: &TestPki, n: usize) -> Vec<SpiffeId> {
        (0..n)
            .map(|i| pki.id("default", &format!("sa-{i}")))
            .collect()
    }

    async fn settle() {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn certs_are_fetched_ahead_of_traffic_and_renewed_at_half_life() {
        let (source, m) = setup(Duration::from_secs(100), CertSettings::default());
        let id = source.pki().id("default", "web");
        m.set_identities(&[id.clone()].into());
        settle().await;
        assert_eq!(source.calls(), 1);
        let first = m.current(&id).expect("fetched without any connection");
        assert_eq!(m.entry(&id).unwrap().state(), CertState::Available);
        // Half of 100 s, ± 1 s jitter.
        tokio::time::sleep(Duration::from_secs(48)).await;
        settle().await;
        assert_eq!(source.calls(), 1, "not renewed before 49 s");
        tokio::time::sleep(Duration::from_secs(4)).await;
        settle().await;
        assert_eq!(source.calls(), 2, "renewed by 52 s");
        let second = m.current(&id).unwrap();
        assert_ne!(first.svid.leaf().serial, second.svid.leaf().serial);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_renewal_keeps_the_cert_and_backs_off_with_a_cap() {
        let settings = CertSettings {
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(8),
            ..CertSettings::default()
        };
        let (source, m) = setup(Duration::from_secs(3600), settings);
        let id = source.pki().id("default", "web");
        m.set_identities(&[id.clone()].into());
        settle().await;
        let good = m.current(&id).unwrap().svid.leaf().serial.clone();
        source.set_behaviour(PkiBehaviour::Unavailable);
        // Renewal at 1800 s ± 36 s fails; retries at most 8 s apart afterwards.
        tokio::time::sleep(Duration::from_secs(1900)).await;
        settle().await;
        let calls_at_1900 = source.calls();
        assert!(calls_at_1900 >= 4, "retries started: {calls_at_1900}");
        let e = m.entry(&id).unwrap();
        assert_eq!(e.state(), CertState::Available, "valid cert kept");
        assert_eq!(m.current(&id).unwrap().svid.leaf().serial, good);
        tokio::time::sleep(Duration::from_secs(80)).await;
        settle().await;
        let more = source.calls() - calls_at_1900;
        assert!(
            (10..=20).contains(&more),
            "capped at 8 s (4..8 s with spread): {more}"
        );
        let snap = m.snapshot();
        assert!(snap[0].last_error.as_deref().unwrap().contains("down"));
        source.set_behaviour(PkiBehaviour::Sign);
        tokio::time::sleep(Duration::from_secs(9)).await;
        settle().await;
        assert_ne!(m.current(&id).unwrap().svid.leaf().serial, good);
        assert!(m.snapshot()[0].last_error.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn no_more_than_the_limit_fetch_at_once_and_a_waiting_connection_goes_first() {
        let settings = CertSettings {
            max_concurrent_fetches: 8,
            ..CertSettings::default()
        };
        let (source, m) = setup(Duration::from_secs(3600), settings);
        source.set_delay(Duration::from_millis(100));
        let all = ids(source.pki(), 100);
        m.set_identities(&all.iter().cloned().collect());
        settle().await;
        let last = all[99].clone();
        let waiter = {
            let m = m.clone();
            let last = last.clone();
            tokio::spawn(async move { m.wait_for(&last).await.map(|_| ()) })
        };
        tokio::time::sleep(Duration::from_millis(350)).await;
        settle().await;
        assert!(
            waiter.is_finished(),
            "the waiting identity was served early"
        );
        waiter.await.unwrap().unwrap();
        let order = source.order();
        let pos = order.iter().position(|i| *i == last).unwrap();
        assert!(pos < 24, "fetched in the first batches, at {pos}");
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(source.max_in_flight(), 8);
        assert_eq!(m.counts().get(&CertState::Available), Some(&100));
        assert_eq!(m.limiter().available(), 8, "every permit came back");
    }

    #[tokio::test(start_paused = true)]
    async fn identities_that_leave_are_dropped_and_unknown_ones_are_refused() {
        let (source, m) = setup(Duration::from_secs(3600), CertSettings::default());
        let [a, b]: [SpiffeId; 2] = ids(source.pki(), 2).try_into().unwrap();
        m.set_identities(&[a.clone(), b.clone()].into());
        settle().await;
        assert!(m.current(&b).is_some());
        let sni = meshid_common::tls::sni_for(&b).to_str().into_owned();
        assert_eq!(m.identity_for_sni(&sni), Some(b.clone()));
        m.set_identities(&[a.clone()].into());
        assert!(m.current(&b).is_none());
        assert!(m.identity_for_sni(&sni).is_none());
        assert!(matches!(m.wait_for(&b).await, Err(Error::NotHosted(_))));
        assert_eq!(m.len(), 1);
        assert_eq!(m.snapshot().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_leaf_for_another_identity_is_refused() {
        let (source, m) = setup(Duration::from_secs(3600), CertSettings::default());
        source.set_behaviour(PkiBehaviour::WrongIdentity);
        let id = source.pki().id("default", "web");
        m.set_identities(&[id.clone()].into());
        settle().await;
        assert!(m.current(&id).is_none());
        assert_eq!(m.entry(&id).unwrap().state(), CertState::Unavailable);
        let err = m.wait_for(&id).await.unwrap_err().to_string();
        assert!(
            err.contains("asked for") && err.contains("impostor"),
            "{err}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_cert_makes_the_identity_unavailable() {
        let settings = CertSettings {
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(2),
            ..CertSettings::default()
        };
        let (source, m) = setup(Duration::from_secs(4), settings);
        let id = source.pki().id("default", "web");
        m.set_identities(&[id.clone()].into());
        settle().await;
        assert_eq!(m.entry(&id).unwrap().state(), CertState::Available);
        source.set_behaviour(PkiBehaviour::Unavailable);
        // Virtual time moves the workers; certificate validity follows the
        // real clock, so wait for real.
        let deadline = std::time::Instant::now() + Duration::from_secs(8);
        while m.entry(&id).unwrap().state() != CertState::Unavailable {
            assert!(std::time::Instant::now() < deadline, "still available");
            tokio::time::sleep(Duration::from_millis(500)).await;
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(m.current(&id).is_none());
    }
}
