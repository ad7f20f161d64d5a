//! The node's certificates: one worker of the shared renewal engine
//! (`meshid_common::identity`) per workload identity on this node, asking
//! the CA on the workloads' behalf with the ztunnel's own token. Workers
//! share one [`FetchLimiter`], so at most N requests are in flight and a
//! connection waiting for a certificate ([`CertManager::wait_for`]) goes
//! first. Identities that leave the node are dropped with their
//! certificates ([`CertManager::set_identities`]).
//!
//! Credentials are published per identity on a `watch` channel, so TLS
//! configs built on it (see [`crate::tls`]) pick up a renewal at the next
//! handshake while open connections carry on.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use meshid_common::cert::unix_secs;
pub use meshid_common::identity::CertState;
use meshid_common::identity::{
    CaClientSettings, CertificateSource, Clock, FetchLimiter, FirstFetch, TokenFile, Worker,
    WorkerConfig, WorkerParts,
};
use meshid_common::{Credentials, CredentialsRx, KeyType, SpiffeId};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// What the manager needs besides the CA client settings.
#[derive(Clone, Debug)]
pub struct CertSettings {
    /// TTL, key type, renewal policy, CA deadline and the node token.
    pub ca: CaClientSettings,
    pub max_concurrent_fetches: usize,
    /// How long [`CertManager::wait_for`] waits.
    pub cert_wait: Duration,
    pub clock: Clock,
}

impl Default for CertSettings {
    fn default() -> Self {
        CertSettings {
            ca: CaClientSettings::default(),
            max_concurrent_fetches: crate::config::DEFAULT_MAX_CONCURRENT_FETCHES,
            cert_wait: crate::config::DEFAULT_CERT_WAIT,
            clock: Clock::System,
        }
    }
}

/// One identity on this node.
pub struct Entry {
    worker: Arc<Worker>,
    sni: String,
    /// Per-identity server config of the HBONE server, built on first use.
    pub(crate) server_config: OnceLock<Arc<rustls::ServerConfig>>,
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("id", &self.worker.id().as_str())
            .field("state", &self.state())
            .finish()
    }
}

impl Entry {
    pub fn id(&self) -> &SpiffeId {
        self.worker.id()
    }

    /// The identity's credentials channel (`None` until the first cert and
    /// after an expiry).
    pub fn credentials(&self) -> CredentialsRx {
        self.worker.credentials()
    }

    pub fn state(&self) -> CertState {
        self.worker.state()
    }

    pub fn worker(&self) -> &Arc<Worker> {
        &self.worker
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
    /// The current leaf's issuer (DN): which CA signed it, e.g. across a
    /// root rotation.
    pub issuer: Option<String>,
    /// Subjects of the roots the current certificate is verified against
    /// (the trust bundle that came with it).
    pub roots: Vec<String>,
    pub next_refresh: Option<i64>,
    pub fetches: u64,
    pub failures: u64,
    pub last_error: Option<String>,
}

struct Managed {
    entry: Arc<Entry>,
    stop: CancellationToken,
}

struct Inner {
    source: Arc<dyn CertificateSource>,
    settings: CertSettings,
    limiter: Arc<FetchLimiter>,
    metrics: Arc<Metrics>,
    entries: RwLock<HashMap<SpiffeId, Managed>>,
    by_sni: RwLock<HashMap<String, SpiffeId>>,
    /// Parent of every worker's token: dropping the manager stops them all.
    stop: CancellationToken,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.cancel();
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

/// One certificate request of the ztunnel, on behalf of a workload.
fn csr_span(id: &SpiffeId, key_type: KeyType, current: Option<&str>) -> tracing::Span {
    tracing::info_span!(
        "ztunnel.cert_fetch",
        spiffe.id = id.as_str(),
        key.type = key_type.as_str(),
        cert.replaces = current.unwrap_or(""),
    )
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
                stop: CancellationToken::new(),
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
                m.stop.cancel();
                m.entry.worker.retire();
                by_sni.remove(&m.entry.sni);
                tracing::info!(spiffe.id = %id, "identity left the node; certificate dropped");
            }
        }
        let s = &self.inner.settings;
        for id in ids {
            if entries.contains_key(id) {
                continue;
            }
            let worker = Worker::new(
                WorkerConfig {
                    id: id.clone(),
                    key_type: s.ca.key_type,
                    ttl: s.ca.ttl,
                    policy: s.ca.policy,
                    ca_timeout: s.ca.ca_timeout,
                    on_behalf: true,
                    first_fetch: FirstFetch::Now,
                    span: csr_span,
                },
                WorkerParts {
                    source: self.inner.source.clone(),
                    token: TokenFile::new(&s.ca.token_path),
                    clock: s.clock,
                    events: self.inner.metrics.clone(),
                    limiter: Some(self.inner.limiter.clone()),
                },
            );
            let stop = self.inner.stop.child_token();
            tokio::spawn(worker.clone().run(stop.clone()));
            let sni = meshid_common::tls::sni_for(id).to_str().into_owned();
            by_sni.insert(sni.clone(), id.clone());
            let entry = Arc::new(Entry {
                worker,
                sni,
                server_config: OnceLock::new(),
            });
            entries.insert(id.clone(), Managed { entry, stop });
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
        self.entry(id)?.worker.current_valid()
    }

    /// Valid credentials for `id`, waiting (with priority) for the first
    /// certificate up to the configured wait. Fails at once for an identity
    /// this node does not host, and when the fetch fails with no valid cert.
    pub async fn wait_for(&self, id: &SpiffeId) -> Result<(Arc<Entry>, Credentials)> {
        let entry = self.entry(id).ok_or_else(|| Error::NotHosted(id.clone()))?;
        let wait = self.inner.settings.cert_wait;
        match entry.worker.wait_valid(wait).await {
            Ok(c) => Ok((entry, c)),
            Err(meshid_common::Error::CertificateWait { after, .. }) => Err(Error::Timeout {
                what: format!("waiting for the certificate of {id}"),
                after,
            }),
            Err(e) => Err(Error::CertUnavailable {
                id: id.clone(),
                reason: match e {
                    meshid_common::Error::CertificateUnavailable { reason, .. } => reason,
                    other => other.to_string(),
                },
            }),
        }
    }

    /// Every managed certificate and its state, sorted by identity.
    pub fn snapshot(&self) -> Vec<CertSnapshot> {
        let entries = self.inner.entries.read().expect("entries lock");
        let mut rows: Vec<CertSnapshot> = entries
            .values()
            .map(|m| {
                let w = &m.entry.worker;
                let current = w.current();
                let leaf = current.as_ref().map(|c| c.svid.leaf().clone());
                let roots = current
                    .as_ref()
                    .map(|c| c.bundle.infos().map(|i| i.subject).collect())
                    .unwrap_or_default();
                let st = w.status();
                CertSnapshot {
                    identity: w.id().to_string(),
                    state: st.state,
                    serial: leaf.as_ref().map(|l| l.serial.clone()),
                    not_before: leaf.as_ref().map(|l| unix_secs(l.not_before)),
                    not_after: leaf.as_ref().map(|l| unix_secs(l.not_after)),
                    issuer: leaf.as_ref().map(|l| l.issuer.clone()),
                    roots,
                    next_refresh: st.next_refresh.map(unix_secs),
                    fetches: st.issued,
                    failures: st.failures,
                    last_error: st.last_error,
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

#[cfg(test)]
mod tests {
    use super::*;
    use meshid_common::identity::fake::TestCa;
    use meshid_common::testing::TestPki;

    /// What the engine does not know: the node's bookkeeping of identities
    /// and its metrics. (Renewal, backoff and the limiter are tested once,
    /// in `meshid_common::identity`.)
    #[tokio::test(start_paused = true)]
    async fn identities_that_leave_are_dropped_and_counted_out() {
        meshid_common::tls::install_crypto_provider();
        let dir = std::env::temp_dir().join(format!("meshid-zt-certs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("token"), "node.jwt").unwrap();
        let pki = Arc::new(TestPki::new("cluster.local").unwrap());
        let ca = TestCa::new(pki.clone(), Clock::tokio());
        let metrics = Arc::new(Metrics::new());
        let mut settings = CertSettings::default();
        settings.ca.token_path = dir.join("token");
        settings.clock = Clock::tokio();
        let m = CertManager::new(ca.clone(), settings, metrics.clone());
        let (a, b) = (pki.id("default", "a"), pki.id("default", "b"));
        m.set_identities(&[a.clone(), b.clone()].into());
        m.wait_for(&b).await.unwrap();
        m.wait_for(&a).await.unwrap();
        assert!(
            ca.calls()
                .iter()
                .all(|c| c.on_behalf && c.token == "node.jwt")
        );
        let sni = meshid_common::tls::sni_for(&b).to_str().into_owned();
        assert_eq!(m.identity_for_sni(&sni), Some(b.clone()));
        let text = metrics.render();
        assert!(text.contains("state=\"available\"} 2"), "{text}");

        m.set_identities(&[a.clone()].into());
        assert!(m.current(&b).is_none());
        assert!(m.identity_for_sni(&sni).is_none());
        assert!(matches!(m.wait_for(&b).await, Err(Error::NotHosted(_))));
        assert_eq!((m.len(), m.snapshot().len()), (1, 1));
        // The row shows which CA signed the leaf and the roots it is checked
        // against (what an operator follows through a root rotation).
        let (row, creds) = (&m.snapshot()[0], m.current(&a).unwrap());
        assert_eq!(
            row.issuer.as_deref(),
            Some(creds.svid.leaf().issuer.as_str())
        );
        assert!(!creds.svid.leaf().issuer.is_empty());
        assert_eq!(row.roots.len(), creds.bundle.roots().len());
        assert!(!row.roots.is_empty() && row.roots.iter().all(|r| !r.is_empty()));
        let text = metrics.render();
        assert!(text.contains("state=\"available\"} 1"), "{text}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
