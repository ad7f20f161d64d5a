//! A reflector: one kind of object followed through the API server by list
//! and watch, as client-go's reflector does. It lists, reports the whole set,
//! then watches from the list's `resourceVersion`, reporting each change. A
//! watch that ends (timeout, closed connection) is resumed from the last
//! version seen; one the server has forgotten (`410 Gone`, as a status or an
//! `ERROR` event) or that breaks is replaced by a fresh list. Failures back
//! off (capped, jittered: the workspace's one [`Backoff`]), and the consumer
//! keeps what it had meanwhile.

use std::fmt::Debug;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::Api;
use kube::api::{ListParams, WatchEvent, WatchParams};
use meshid_common::identity::Backoff;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

/// How long one watch call lasts on the server's side before it is renewed.
pub const WATCH_TIMEOUT_SECS: u32 = 290;
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// A watch that ends sooner than this with no news counts as a failure.
const MIN_WATCH_LIFE: Duration = Duration::from_secs(1);

/// What a reflector reports.
#[derive(Debug)]
pub enum Change<K> {
    /// A full list: everything else is gone.
    Listed(Vec<K>),
    /// Added or modified.
    Applied(K),
    Deleted(K),
}

/// One kind of object to follow, with optional selectors.
#[derive(Clone)]
pub struct Reflector<K: Clone> {
    api: Api<K>,
    what: String,
    fields: Option<String>,
    labels: Option<String>,
}

impl<K: Clone> Debug for Reflector<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reflector")
            .field("what", &self.what)
            .field("fields", &self.fields)
            .finish()
    }
}

enum WatchEnd {
    Closed { news: bool },
    Gone,
    Failed(String),
}

impl<K> Reflector<K>
where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    /// `what` names the objects in logs ("pods", "Secret istio-system/cacerts").
    pub fn new(api: Api<K>, what: impl Into<String>) -> Self {
        Reflector {
            api,
            what: what.into(),
            fields: None,
            labels: None,
        }
    }

    pub fn fields(mut self, selector: impl Into<String>) -> Self {
        self.fields = Some(selector.into());
        self
    }

    pub fn labels(mut self, selector: impl Into<String>) -> Self {
        self.labels = Some(selector.into());
        self
    }

    /// Follows the objects until `cancel`, reporting to `on`.
    pub async fn run(self, mut on: impl FnMut(Change<K>) + Send, cancel: CancellationToken) {
        let mut backoff = Backoff::new(RETRY_MIN, RETRY_MAX);
        loop {
            let mut params = ListParams::default();
            if let Some(f) = &self.fields {
                params = params.fields(f);
            }
            if let Some(l) = &self.labels {
                params = params.labels(l);
            }
            let listed = tokio::select! {
                _ = cancel.cancelled() => return,
                l = self.api.list(&params) => l,
            };
            let mut version = match listed {
                Ok(list) => {
                    on(Change::Listed(list.items));
                    list.metadata.resource_version.unwrap_or_default()
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(what = %self.what, error = %e, retry_ms = delay.as_millis() as u64, "cannot list; keeping what was known");
                    if !sleep(delay, &cancel).await {
                        return;
                    }
                    continue;
                }
            };
            // Watch until the version is forgotten or the watch breaks.
            loop {
                let started = Instant::now();
                let end = tokio::select! {
                    _ = cancel.cancelled() => return,
                    end = self.watch(&mut version, &mut on) => end,
                };
                let quick = started.elapsed() < MIN_WATCH_LIFE;
                match end {
                    WatchEnd::Closed { news } => {
                        if news || !quick {
                            backoff.reset();
                        } else if !sleep(backoff.next_delay(), &cancel).await {
                            return;
                        }
                    }
                    WatchEnd::Gone => {
                        tracing::debug!(what = %self.what, "watch expired (410); listing again");
                        if quick && !sleep(backoff.next_delay(), &cancel).await {
                            return;
                        }
                        break;
                    }
                    WatchEnd::Failed(e) => {
                        let delay = backoff.next_delay();
                        tracing::warn!(what = %self.what, error = %e, retry_ms = delay.as_millis() as u64, "watch failed; listing again");
                        if !sleep(delay, &cancel).await {
                            return;
                        }
                        break;
                    }
                }
            }
        }
    }

    async fn watch(&self, version: &mut String, on: &mut impl FnMut(Change<K>)) -> WatchEnd {
        let mut params = WatchParams::default().timeout(WATCH_TIMEOUT_SECS);
        if let Some(f) = &self.fields {
            params = params.fields(f);
        }
        if let Some(l) = &self.labels {
            params = params.labels(l);
        }
        let stream = match self.api.watch(&params, version).await {
            Ok(s) => s,
            Err(kube::Error::Api(status)) if status.code == 410 => return WatchEnd::Gone,
            Err(e) => return WatchEnd::Failed(format!("could not start: {e}")),
        };
        let mut stream = std::pin::pin!(stream);
        let mut news = false;
        while let Some(event) = stream.next().await {
            news = true;
            let (object, deleted) = match event {
                Ok(WatchEvent::Added(o) | WatchEvent::Modified(o)) => (o, false),
                Ok(WatchEvent::Deleted(o)) => (o, true),
                Ok(WatchEvent::Bookmark(b)) => {
                    *version = b.metadata.resource_version;
                    continue;
                }
                Ok(WatchEvent::Error(status)) if status.code == 410 => return WatchEnd::Gone,
                Ok(WatchEvent::Error(status)) => {
                    return WatchEnd::Failed(format!("{} ({})", status.message, status.code));
                }
                Err(e) => return WatchEnd::Failed(format!("broke: {e}")),
            };
            if let Some(v) = &object.meta().resource_version {
                v.clone_into(version);
            }
            on(if deleted {
                Change::Deleted(object)
            } else {
                Change::Applied(object)
            });
        }
        WatchEnd::Closed { news }
    }
}

/// Sleeps `d`; false if cancelled first.
pub(crate) async fn sleep(d: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = cancel.cancelled() => false,
    }
}
