//! The one list/watch engine of cluster mode (cargo feature `kube`): a
//! [`Reflector`] follows one kind of object through the Kubernetes API as
//! client-go's reflector does, for the CA (pods, namespaces, Secrets,
//! ConfigMaps) and the ztunnel (pods, ambient namespaces) alike.
//!
//! It lists, reports the whole set ([`Change::Listed`]), then watches from
//! the list's `resourceVersion`, reporting each change. A watch that ends
//! (its `timeoutSeconds`, a closed connection) is resumed from the last
//! version seen, `BOOKMARK`s included; one the server has forgotten
//! (`410 Gone`, as a status or as an `ERROR` event) or that breaks is
//! replaced by a fresh list. Failures back off (capped, jittered: the
//! workspace's one [`Backoff`]), and the consumer keeps what it had
//! meanwhile. A watch that ends at once with no news counts as a failure, so
//! a server closing watches straight away is not hammered.
//!
//! Spans: `kube.list` for each list, `kube.watch` for each watch call, both
//! with the `what` given to [`Reflector::new`]; callers wrap the whole run in
//! their own (`ca.pod_cache`, `ztunnel.registry`).

use std::fmt::Debug;
use std::time::{Duration, Instant};

use ::kube::Api;
use ::kube::api::{ListParams, WatchEvent, WatchParams};
use futures::StreamExt;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::identity::Backoff;

/// How long one watch call lasts on the server's side before it is renewed.
pub const WATCH_TIMEOUT_SECS: u32 = 290;
/// The first retry delay after a failure; doubles up to [`RETRY_MAX`].
pub const RETRY_MIN: Duration = Duration::from_millis(200);
pub const RETRY_MAX: Duration = Duration::from_secs(30);
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

/// One list call's answer.
#[derive(Debug)]
pub struct Listed<K> {
    pub items: Vec<K>,
    /// Where a watch following this list starts.
    pub resource_version: String,
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
            .field("labels", &self.labels)
            .finish()
    }
}

/// Why one watch call ended.
enum WatchEnd {
    /// Its timeout, or the server closed it: resume from the last version.
    Closed {
        news: bool,
    },
    /// The version is forgotten: list again.
    Gone,
    Failed(Error),
}

/// The error of an API call about `what`.
pub fn api_error(what: &str, e: ::kube::Error) -> Error {
    match e {
        ::kube::Error::Api(s) => Error::KubeApi {
            what: what.to_owned(),
            code: s.code,
            reason: format!("{} ({} {})", s.message, s.code, s.reason),
        },
        e => Error::KubeApi {
            what: what.to_owned(),
            code: 0,
            reason: e.to_string(),
        },
    }
}

impl<K> Reflector<K>
where
    K: ::kube::Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    /// `what` names the objects in logs and errors ("pods",
    /// "Secret istio-system/cacerts").
    pub fn new(api: Api<K>, what: impl Into<String>) -> Self {
        Reflector {
            api,
            what: what.into(),
            fields: None,
            labels: None,
        }
    }

    /// A field selector (`metadata.name=cacerts`) for the list and the watch.
    pub fn fields(mut self, selector: impl Into<String>) -> Self {
        self.fields = Some(selector.into());
        self
    }

    /// A label selector (`istio.io/dataplane-mode=ambient`); a watch reports
    /// an object that stops matching as deleted.
    pub fn labels(mut self, selector: impl Into<String>) -> Self {
        self.labels = Some(selector.into());
        self
    }

    /// What this reflector follows, as given to [`Reflector::new`].
    pub fn what(&self) -> &str {
        &self.what
    }

    /// One list call: for a consumer that must not start blind, the first
    /// list before [`Reflector::run_from`].
    pub async fn list(&self) -> Result<Listed<K>> {
        let mut params = ListParams::default();
        if let Some(f) = &self.fields {
            params = params.fields(f);
        }
        if let Some(l) = &self.labels {
            params = params.labels(l);
        }
        let list = self
            .api
            .list(&params)
            .instrument(tracing::info_span!("kube.list", what = %self.what))
            .await
            .map_err(|e| api_error(&format!("listing {}", self.what), e))?;
        Ok(Listed {
            items: list.items,
            resource_version: list.metadata.resource_version.unwrap_or_default(),
        })
    }

    /// Follows the objects until `cancel`, reporting to `on`: a list first,
    /// retried until it works.
    pub async fn run(self, on: impl FnMut(Change<K>) + Send, cancel: CancellationToken) {
        self.follow(None, on, cancel).await;
    }

    /// As [`Reflector::run`], after a list the caller made and consumed
    /// itself: starts with a watch from `resource_version`.
    pub async fn run_from(
        self,
        resource_version: String,
        on: impl FnMut(Change<K>) + Send,
        cancel: CancellationToken,
    ) {
        self.follow(Some(resource_version), on, cancel).await;
    }

    async fn follow(
        self,
        mut listed: Option<String>,
        mut on: impl FnMut(Change<K>) + Send,
        cancel: CancellationToken,
    ) {
        let mut backoff = Backoff::new(RETRY_MIN, RETRY_MAX);
        loop {
            let mut version = match listed.take() {
                Some(v) => v,
                None => {
                    let list = tokio::select! {
                        _ = cancel.cancelled() => return,
                        l = self.list() => l,
                    };
                    match list {
                        Ok(list) => {
                            on(Change::Listed(list.items));
                            list.resource_version
                        }
                        Err(e) => {
                            let delay = backoff.next_delay();
                            tracing::warn!(what = %self.what, error = %e, retry_ms = delay.as_millis() as u64, "cannot list; keeping what was known");
                            if !sleep(delay, &cancel).await {
                                return;
                            }
                            continue;
                        }
                    }
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
                        tracing::warn!(what = %self.what, error = %e, retry_ms = delay.as_millis() as u64, "watch failed; listing again, keeping what was known");
                        if !sleep(delay, &cancel).await {
                            return;
                        }
                        break;
                    }
                }
            }
        }
    }

    /// One watch call from `version`, reporting events as they come and
    /// moving `version` along.
    async fn watch(&self, version: &mut String, on: &mut impl FnMut(Change<K>)) -> WatchEnd {
        let span = tracing::info_span!("kube.watch", what = %self.what, from = %version);
        self.watch_once(version, on).instrument(span).await
    }

    async fn watch_once(&self, version: &mut String, on: &mut impl FnMut(Change<K>)) -> WatchEnd {
        let mut params = WatchParams::default().timeout(WATCH_TIMEOUT_SECS);
        if let Some(f) = &self.fields {
            params = params.fields(f);
        }
        if let Some(l) = &self.labels {
            params = params.labels(l);
        }
        let failed = |how: String| {
            WatchEnd::Failed(Error::KubeApi {
                what: format!("watching {}", self.what),
                code: 0,
                reason: how,
            })
        };
        let stream = match self.api.watch(&params, version).await {
            Ok(s) => s,
            Err(::kube::Error::Api(status)) if status.code == 410 => return WatchEnd::Gone,
            Err(e) => {
                return WatchEnd::Failed(api_error(&format!("watching {}", self.what), e));
            }
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
                    return failed(format!("{} ({})", status.message, status.code));
                }
                Err(e) => return failed(format!("the stream broke: {e}")),
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

/// Sleeps `d`; false if `cancel` came first.
pub async fn sleep(d: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = cancel.cancelled() => false,
    }
}

/// A client for the API server at `url` (`http://127.0.0.1:port`), with no
/// kubeconfig and no credentials: for tests against
/// [`crate::testing::kube::FakeApiServer`].
#[cfg(any(test, feature = "testing"))]
pub fn client_for_url(url: &str) -> Result<::kube::Client> {
    let fail = |reason: String| Error::KubeApi {
        what: format!("a client for {url}"),
        code: 0,
        reason,
    };
    let uri: http::Uri = url.parse().map_err(|e| fail(format!("{e}")))?;
    let mut config = ::kube::Config::new(uri);
    // Tests cut connections on purpose: fail fast rather than retry.
    config.connect_timeout = Some(Duration::from_secs(2));
    config.read_timeout = None;
    ::kube::Client::try_from(config).map_err(|e| fail(e.to_string()))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    use k8s_openapi::api::core::v1::ConfigMap;
    use serde_json::json;

    use super::*;
    use crate::testing::kube::{FakeApiServer, status};

    const NS: &str = "default";

    fn cm(name: &str, value: &str) -> serde_json::Value {
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": name, "namespace": NS, "labels": {"app": "x"}},
               "data": {"v": value}})
    }

    /// What a consumer built from the changes: name → value, and how many
    /// full lists it was handed.
    #[derive(Default)]
    struct Seen {
        objects: BTreeMap<String, String>,
        lists: usize,
    }

    fn start(fake: &FakeApiServer, cancel: &CancellationToken) -> Arc<Mutex<Seen>> {
        let api: Api<ConfigMap> = Api::namespaced(client_for_url(&fake.url()).unwrap(), NS);
        let seen = Arc::new(Mutex::new(Seen::default()));
        let shared = seen.clone();
        let name = |c: &ConfigMap| c.metadata.name.clone().unwrap_or_default();
        let value = |c: &ConfigMap| {
            c.data
                .as_ref()
                .and_then(|d| d.get("v").cloned())
                .unwrap_or_default()
        };
        tokio::spawn(Reflector::new(api, "configmaps").labels("app=x").run(
            move |change| {
                let mut s = shared.lock().unwrap();
                match change {
                    Change::Listed(all) => {
                        s.lists += 1;
                        s.objects = all.iter().map(|c| (name(c), value(c))).collect();
                    }
                    Change::Applied(c) => {
                        s.objects.insert(name(&c), value(&c));
                    }
                    Change::Deleted(c) => {
                        s.objects.remove(&name(&c));
                    }
                }
            },
            cancel.clone(),
        ));
        seen
    }

    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let start = Instant::now();
        while !done() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn snapshot(seen: &Mutex<Seen>) -> Vec<(String, String)> {
        let s = seen.lock().unwrap();
        s.objects
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// List, then add/update/delete through the watch; a dropped watch is
    /// resumed from the last version with no new list; a bookmark moves the
    /// version along; a compaction (410 Gone) makes a new list.
    #[tokio::test]
    async fn lists_watches_resumes_and_relists_on_410() {
        let fake = FakeApiServer::start().await.unwrap();
        fake.insert("configmaps", cm("a", "1"));
        let cancel = CancellationToken::new();
        let seen = start(&fake, &cancel);
        let watches = || fake.count(|r| r.contains("/configmaps?") && r.contains("watch=true"));
        let lists = || fake.count(|r| r.contains("/configmaps?") && !r.contains("watch=true"));
        until("the first watch", || watches() == 1).await;
        assert_eq!(snapshot(&seen), pairs(&[("a", "1")]));
        let list = fake.requests()[0].clone();
        assert!(list.contains("labelSelector=app=x"), "{list}");

        fake.insert("configmaps", cm("b", "1"));
        fake.insert("configmaps", cm("a", "2"));
        fake.delete("api/v1", "configmaps", NS, "b");
        until("a=2, b gone", || snapshot(&seen) == pairs(&[("a", "2")])).await;

        // Writes the selector hides, a bookmark, then a cut: the resumed
        // watch starts at the bookmark's version (6), later than any object
        // the consumer saw (4).
        let mut other = cm("other", "1");
        other["metadata"]["labels"] = json!({});
        fake.insert("configmaps", other);
        fake.delete("api/v1", "configmaps", NS, "other");
        fake.bookmark();
        tokio::time::sleep(Duration::from_millis(200)).await;
        fake.drop_watches();
        until("the resumed watch", || watches() == 2).await;
        let resumed = fake
            .requests()
            .into_iter()
            .rfind(|r| r.contains("watch=true"))
            .unwrap();
        assert!(resumed.contains("allowWatchBookmarks=true"), "{resumed}");
        assert!(
            resumed.contains("resourceVersion=6"),
            "the bookmark's version (6): {resumed}"
        );
        fake.insert("configmaps", cm("c", "1"));
        until("c through the resumed watch", || {
            snapshot(&seen) == pairs(&[("a", "2"), ("c", "1")])
        })
        .await;
        assert_eq!(lists(), 1, "a dropped watch is resumed, not relisted");
        assert_eq!(seen.lock().unwrap().lists, 1);

        // History compacted while the watch is away: the resume gets 410 and
        // a new list replaces everything (a change made meanwhile included).
        fake.compact();
        fake.drop_watches();
        fake.delete("api/v1", "configmaps", NS, "a");
        until("the relist", || snapshot(&seen) == pairs(&[("c", "1")])).await;
        assert_eq!(lists(), 2);
        assert_eq!(seen.lock().unwrap().lists, 2);

        cancel.cancel();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let before = fake.requests().len();
        fake.drop_watches();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(fake.requests().len(), before, "calls after cancel");
    }

    /// A refused list is a clear error; the running reflector keeps trying
    /// with backoff and reports once the API answers.
    #[tokio::test]
    async fn a_refused_list_is_a_clear_error_and_is_retried() {
        let fake = FakeApiServer::start().await.unwrap();
        fake.insert("configmaps", cm("a", "1"));
        let refuse = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let refusing = refuse.clone();
        fake.react(move |req| {
            (refusing.load(std::sync::atomic::Ordering::SeqCst) && req.resource == "configmaps")
                .then(|| {
                    (
                        403,
                        status(403, "Forbidden", "configmaps is forbidden: no RBAC"),
                    )
                })
        });
        let api: Api<ConfigMap> = Api::namespaced(client_for_url(&fake.url()).unwrap(), NS);
        let err = Reflector::new(api, "configmaps of default")
            .list()
            .await
            .unwrap_err();
        assert!(matches!(err, Error::KubeApi { code: 403, .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("listing configmaps of default") && text.contains("forbidden"),
            "{text}"
        );

        let cancel = CancellationToken::new();
        let seen = start(&fake, &cancel);
        until("two refused lists", || {
            fake.count(|r| r.contains("/configmaps?")) >= 2
        })
        .await;
        assert_eq!(seen.lock().unwrap().lists, 0);
        refuse.store(false, std::sync::atomic::Ordering::SeqCst);
        until("the list once allowed", || {
            snapshot(&seen) == pairs(&[("a", "1")])
        })
        .await;
        cancel.cancel();
    }
}
