//! Inbound policy: the PeerAuthentication mode and an AuthorizationPolicy-like
//! allow-list, read from a small YAML file and reloaded when it changes.
//!
//! The file takes the `spec` of a PeerAuthentication, optionally wrapped in
//! the whole resource, plus an `allow` section:
//!
//! ```yaml
//! mtls:
//!   mode: STRICT          # STRICT | PERMISSIVE | DISABLE (UNSET = PERMISSIVE, as Istio)
//! allow:                  # optional; absent = any peer of the trust domain
//!   principals: ["cluster.local/ns/web/sa/frontend"]   # Istio form or spiffe:// IDs
//!   namespaces: ["monitoring"]
//! ```
//!
//! Policies travel in a watch channel; connections read the current one when
//! they are accepted, so a change applies to new connections only.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshid_common::{PeerMatcher, SpiffeId};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// PeerAuthentication's mutual TLS mode for the inbound listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Mode {
    /// mTLS only.
    Strict,
    /// mTLS and plaintext on the same port, told apart by the first bytes.
    Permissive,
    /// Plaintext only.
    Disable,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Strict => "STRICT",
            Mode::Permissive => "PERMISSIVE",
            Mode::Disable => "DISABLE",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Mode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_uppercase().as_str() {
            "STRICT" => Ok(Mode::Strict),
            "PERMISSIVE" | "UNSET" => Ok(Mode::Permissive),
            "DISABLE" => Ok(Mode::Disable),
            _ => Err(Error::Policy(format!(
                "unknown mTLS mode {s:?} (expected STRICT, PERMISSIVE or DISABLE)"
            ))),
        }
    }
}

/// Which authenticated peers may connect. Empty lists allow nobody.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowList {
    pub principals: Vec<SpiffeId>,
    pub namespaces: Vec<String>,
}

/// The inbound policy in force.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub mode: Mode,
    /// `None`: any SVID of the trust domain.
    pub allow: Option<AllowList>,
}

impl Default for Policy {
    /// Istio's behaviour with no PeerAuthentication: PERMISSIVE, no allow-list.
    fn default() -> Self {
        Policy::mode(Mode::Permissive)
    }
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mtls: Option<MtlsSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    allow: Option<AllowSpec>,
    /// Accepted for PeerAuthentication compatibility; the shim serves one workload.
    #[serde(default, skip_serializing)]
    #[allow(dead_code)]
    selector: Option<serde_yaml_ng::Value>,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct MtlsSpec {
    mode: String,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct AllowSpec {
    #[serde(default)]
    principals: Vec<String>,
    #[serde(default)]
    namespaces: Vec<String>,
}

impl Policy {
    pub fn mode(mode: Mode) -> Self {
        Policy { mode, allow: None }
    }

    /// Parses the YAML policy. Principals are Istio's `td/ns/N/sa/S` or full
    /// `spiffe://` IDs; both must be valid SPIFFE IDs.
    pub fn from_yaml(text: &str) -> Result<Self> {
        let value: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(text).map_err(|e| Error::Policy(e.to_string()))?;
        // A whole PeerAuthentication resource: use its spec.
        let value = match value.get("spec") {
            Some(spec) => spec.clone(),
            None if value.is_null() => serde_yaml_ng::Value::Mapping(Default::default()),
            None => value,
        };
        let spec: Spec =
            serde_yaml_ng::from_value(value).map_err(|e| Error::Policy(e.to_string()))?;
        let mode = match &spec.mtls {
            Some(m) => m.mode.parse()?,
            None => Mode::Permissive,
        };
        let allow = match spec.allow {
            None => None,
            Some(a) => {
                let principals = a
                    .principals
                    .iter()
                    .map(|p| parse_principal(p))
                    .collect::<Result<Vec<_>>>()?;
                for ns in &a.namespaces {
                    if ns.is_empty() || ns.contains('/') || ns.contains('*') {
                        return Err(Error::Policy(format!(
                            "namespace {ns:?} is not a plain namespace name"
                        )));
                    }
                }
                Some(AllowList {
                    principals,
                    namespaces: a.namespaces,
                })
            }
        };
        Ok(Policy { mode, allow })
    }

    /// The policy as YAML, in the shape [`Policy::from_yaml`] reads.
    pub fn to_yaml(&self) -> String {
        let spec = Spec {
            mtls: Some(MtlsSpec {
                mode: self.mode.as_str().to_owned(),
            }),
            allow: self.allow.as_ref().map(|a| AllowSpec {
                principals: a.principals.iter().map(|p| p.to_string()).collect(),
                namespaces: a.namespaces.clone(),
            }),
            selector: None,
        };
        meshid_common::config::to_yaml(&spec)
    }

    /// May this peer in? `peer` is `None` for a plaintext connection, which an
    /// allow-list never admits (as an Istio ALLOW policy on principals). A
    /// peer in one of `aliases` is matched as its `trust_domain` twin, as
    /// istiod expands principals with `trustDomainAliases`.
    pub fn authorize(
        &self,
        peer: Option<&SpiffeId>,
        trust_domain: &str,
        aliases: &[String],
    ) -> Result<(), String> {
        let Some(allow) = &self.allow else {
            return Ok(());
        };
        let Some(peer) = peer else {
            return Err(
                "plaintext connection has no peer identity and an allow-list is set".into(),
            );
        };
        PeerMatcher::AllowList {
            trust_domain: trust_domain.to_owned(),
            ids: allow.principals.clone(),
            namespaces: allow.namespaces.clone(),
        }
        .with_aliases(aliases)
        .check(peer)
        .map_err(|e| e.to_string())
    }
}

fn parse_principal(p: &str) -> Result<SpiffeId> {
    if p.contains('*') {
        return Err(Error::Policy(format!(
            "principal {p:?}: wildcards are not supported"
        )));
    }
    let full = if p.starts_with("spiffe://") {
        p.to_owned()
    } else {
        format!("spiffe://{p}")
    };
    SpiffeId::parse(&full).map_err(|e| Error::Policy(format!("principal {p:?}: {e}")))
}

/// The current policy: readers clone the `Arc` per connection.
pub type PolicyRx = watch::Receiver<Arc<Policy>>;

/// Owns the policy channel; the admin API and the file poller write to it.
#[derive(Debug, Clone)]
pub struct PolicyStore {
    tx: Arc<watch::Sender<Arc<Policy>>>,
}

impl PolicyStore {
    pub fn new(initial: Policy) -> Self {
        PolicyStore {
            tx: Arc::new(watch::Sender::new(Arc::new(initial))),
        }
    }

    pub fn subscribe(&self) -> PolicyRx {
        self.tx.subscribe()
    }

    pub fn current(&self) -> Arc<Policy> {
        self.tx.borrow().clone()
    }

    /// Replaces the policy; logs the change.
    pub fn set(&self, policy: Policy, source: &str) {
        let changed = *self.current() != policy;
        if changed {
            tracing::info!(
                policy.source = source,
                mode = %policy.mode,
                allow = ?policy.allow,
                "inbound policy changed; applies to new connections"
            );
        }
        self.tx.send_replace(Arc::new(policy));
    }

    /// Polls `path` every `interval` (by modification time and size) and
    /// applies a changed, valid file. An invalid file is logged and the
    /// previous policy stays.
    pub fn spawn_file_watch(
        &self,
        path: PathBuf,
        interval: Duration,
        metrics: Arc<Metrics>,
        cancel: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let store = self.clone();
        // Taken now, so a change right after this call is seen.
        let mut last = std::fs::metadata(&path)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())));
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(interval) => {}
                }
                let now = stamp(&path).await;
                if now == last {
                    continue;
                }
                last = now;
                match load_file(&path).await {
                    Ok(policy) => {
                        metrics.policy_reload(true);
                        store.set(policy, &path.display().to_string());
                    }
                    Err(e) => {
                        metrics.policy_reload(false);
                        tracing::error!(error = %e, "policy reload failed; keeping the previous policy");
                    }
                }
            }
        })
    }
}

async fn stamp(path: &std::path::Path) -> Option<(SystemTime, u64)> {
    let meta = tokio::fs::metadata(path).await.ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Reads and parses a policy file.
pub async fn load_file(path: &std::path::Path) -> Result<Policy> {
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| Error::PolicyFile {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    Policy::from_yaml(&text).map_err(|e| Error::PolicyFile {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    #[test]
    fn bare_spec_with_allow_list() {
        let p = Policy::from_yaml(
            "mtls: {mode: STRICT}\nallow:\n  principals: [cluster.local/ns/a/sa/x, 'spiffe://cluster.local/ns/b/sa/y']\n  namespaces: [mon]\n",
        )
        .unwrap();
        assert_eq!(p.mode, Mode::Strict);
        let allow = p.allow.clone().unwrap();
        assert_eq!(
            allow.principals,
            vec![
                id("spiffe://cluster.local/ns/a/sa/x"),
                id("spiffe://cluster.local/ns/b/sa/y")
            ]
        );
        assert!(
            p.authorize(
                Some(&id("spiffe://cluster.local/ns/a/sa/x")),
                "cluster.local",
                &[]
            )
            .is_ok()
        );
        assert!(
            p.authorize(
                Some(&id("spiffe://cluster.local/ns/mon/sa/z")),
                "cluster.local",
                &[]
            )
            .is_ok()
        );
        let err = p
            .authorize(
                Some(&id("spiffe://cluster.local/ns/a/sa/z")),
                "cluster.local",
                &[],
            )
            .unwrap_err();
        assert!(err.contains("spiffe://cluster.local/ns/a/sa/z"), "{err}");
        assert!(p.authorize(None, "cluster.local", &[]).is_err());
        // Round trip through YAML.
        assert_eq!(Policy::from_yaml(&p.to_yaml()).unwrap(), p);
    }

    /// `to_yaml` (the admin page, `PUT /policy` round trips) reads back as
    /// the same policy in every shape: each mode, principals without
    /// namespaces, namespaces without principals, an empty allow-list.
    #[test]
    fn every_policy_shape_reads_back_from_its_yaml() {
        let allow = |principals: &[&str], namespaces: &[&str]| AllowList {
            principals: principals.iter().map(|p| id(p)).collect(),
            namespaces: namespaces.iter().map(|n| n.to_string()).collect(),
        };
        let mut shapes: Vec<Policy> = [Mode::Strict, Mode::Permissive, Mode::Disable]
            .into_iter()
            .map(Policy::mode)
            .collect();
        for a in [
            allow(&["spiffe://cluster.local/ns/a/sa/x"], &[]),
            allow(&[], &["web", "db"]),
            allow(&[], &[]),
        ] {
            shapes.push(Policy {
                mode: Mode::Strict,
                allow: Some(a),
            });
        }
        for p in shapes {
            let yaml = p.to_yaml();
            assert_eq!(Policy::from_yaml(&yaml).unwrap(), p, "{yaml}");
        }
    }

    #[test]
    fn whole_peer_authentication_resource() {
        let p = Policy::from_yaml(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: web}\nspec:\n  selector: {matchLabels: {app: web}}\n  mtls:\n    mode: DISABLE\n",
        )
        .unwrap();
        assert_eq!(p, Policy::mode(Mode::Disable));
        assert!(p.authorize(None, "td", &[]).is_ok());
    }

    #[test]
    fn defaults_and_errors() {
        assert_eq!(Policy::from_yaml("").unwrap(), Policy::default());
        assert_eq!(
            Policy::from_yaml("mtls: {mode: UNSET}").unwrap().mode,
            Mode::Permissive
        );
        for bad in [
            "mtls: {mode: LOOSE}",
            "mtls: {mode: STRICT, extra: 1}",
            "mtsl: {mode: STRICT}",
            "allow: {principals: ['*']}",
            "allow: {principals: ['not a spiffe id/..']}",
            "allow: {namespaces: ['a/b']}",
            "[1, 2",
        ] {
            assert!(Policy::from_yaml(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn file_watch_applies_changes_and_keeps_the_last_good_policy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.yaml");
        std::fs::write(&path, "mtls: {mode: PERMISSIVE}\n").unwrap();
        let store = PolicyStore::new(load_file(&path).await.unwrap());
        let mut rx = store.subscribe();
        let cancel = CancellationToken::new();
        let task = store.spawn_file_watch(
            path.clone(),
            Duration::from_millis(20),
            Arc::new(Metrics::new()),
            cancel.clone(),
        );
        std::fs::write(&path, "mtls: {mode: STRICT}\n").unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(store.current().mode, Mode::Strict);
        std::fs::write(&path, "mtls: {mode: WHAT}\n# longer so the size changes\n").unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(store.current().mode, Mode::Strict);
        cancel.cancel();
        task.await.unwrap();
    }
}
