//! Inbound policy: which peers may reach a local workload, and whether it
//! also accepts plaintext (Istio's PeerAuthentication STRICT / PERMISSIVE and
//! an AuthorizationPolicy-like allow-list of identities and namespaces).
//!
//! Rules come from a JSON file (`--policy-file`) or from the config in
//! tests. A rule applies to every workload of its namespace, or to one pod
//! when `workload` is set; the pod rule wins over the namespace rule. A
//! workload without a rule is STRICT and accepts any peer of the trust domain.
//!
//! ```json
//! [ { "namespace": "default", "workload": "db-0", "mode": "STRICT",
//!     "allow": { "ids": ["spiffe://cluster.local/ns/default/sa/web"], "namespaces": ["ops"] } },
//!   { "namespace": "legacy", "mode": "PERMISSIVE" } ]
//! ```

use std::path::Path;

use meshid_common::registry::Workload;
use meshid_common::{PeerMatcher, SpiffeId};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// PeerAuthentication mode of a workload.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Mode {
    /// HBONE (mTLS) only.
    #[default]
    Strict,
    /// HBONE, and plaintext on the inbound plaintext port.
    Permissive,
}

/// Identities allowed to reach a workload.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allow {
    #[serde(default)]
    pub ids: Vec<SpiffeId>,
    #[serde(default)]
    pub namespaces: Vec<String>,
}

/// One rule of the policy file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRule {
    pub namespace: String,
    /// A pod name; the rule covers the whole namespace when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    #[serde(default)]
    pub mode: Mode,
    /// Absent: any peer of the trust domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<Allow>,
}

/// Follows the policy file: every `interval`, a changed file (length or
/// modification time) is re-read; a file that does not parse is logged and
/// the last good policy stays. Ends when every receiver is gone.
pub async fn watch_policy_file(
    path: std::path::PathBuf,
    interval: std::time::Duration,
    tx: tokio::sync::watch::Sender<std::sync::Arc<Policies>>,
) {
    let stamp = |p: &Path| {
        std::fs::metadata(p)
            .ok()
            .map(|m| (m.len(), m.modified().ok()))
    };
    // The first look always reloads: the file may have changed since the
    // config read it.
    let mut last = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = tx.closed() => return,
        }
        let now = stamp(&path);
        if now == last || now.is_none() {
            continue;
        }
        last = now;
        match load_policy_file(&path) {
            Ok(rules) => {
                tracing::info!(path = %path.display(), rules = rules.len(), "policy file reloaded");
                tx.send_replace(std::sync::Arc::new(Policies::new(rules)));
            }
            Err(e) => {
                tracing::error!(error = %e, "policy file rejected; keeping the last good policy")
            }
        }
    }
}

/// Reads and parses a policy file.
pub fn load_policy_file(path: &Path) -> Result<Vec<PolicyRule>> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        what: "policy file",
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_str(&text)
        .map_err(|e| Error::Config(format!("policy file {}: {e}", path.display())))
}

/// The policy in force for one workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Effective {
    pub mode: Mode,
    pub peers: PeerMatcher,
}

/// The rule set of a ztunnel.
#[derive(Clone, Debug, Default)]
pub struct Policies {
    rules: Vec<PolicyRule>,
}

impl Policies {
    pub fn new(rules: Vec<PolicyRule>) -> Self {
        Policies { rules }
    }

    /// The rule for `w`: its pod rule, else its namespace rule, else STRICT
    /// for the whole trust domain. A peer in one of `aliases` is judged as its
    /// `trust_domain` twin (istiod expands principals with the aliases).
    pub fn for_workload(&self, w: &Workload, trust_domain: &str, aliases: &[String]) -> Effective {
        let rule = self
            .rules
            .iter()
            .find(|r| r.namespace == w.namespace && r.workload.as_deref() == Some(&w.name))
            .or_else(|| {
                self.rules
                    .iter()
                    .find(|r| r.namespace == w.namespace && r.workload.is_none())
            });
        let Some(rule) = rule else {
            return Effective {
                mode: Mode::Strict,
                peers: PeerMatcher::TrustDomain(trust_domain.to_owned()).with_aliases(aliases),
            };
        };
        let peers = match &rule.allow {
            None => PeerMatcher::TrustDomain(trust_domain.to_owned()),
            Some(allow) => PeerMatcher::AllowList {
                trust_domain: trust_domain.to_owned(),
                ids: allow.ids.clone(),
                namespaces: allow.namespaces.clone(),
            },
        };
        Effective {
            mode: rule.mode,
            peers: peers.with_aliases(aliases),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str) -> Workload {
        Workload {
            name: name.into(),
            namespace: ns.into(),
            service_account: "sa".into(),
            node: "node-a".into(),
            uid: format!("{ns}-{name}"),
            address: None,
            mode: None,
        }
    }

    #[test]
    fn pod_rules_beat_namespace_rules_and_the_default_is_strict() {
        let rules: Vec<PolicyRule> = serde_json::from_str(
            r#"[ {"namespace": "default", "mode": "PERMISSIVE"},
                 {"namespace": "default", "workload": "db-0",
                  "allow": {"ids": ["spiffe://td/ns/default/sa/web"]}} ]"#,
        )
        .unwrap();
        let p = Policies::new(rules);
        let web = p.for_workload(&pod("default", "web-0"), "td", &[]);
        assert_eq!(web.mode, Mode::Permissive);
        assert_eq!(web.peers, PeerMatcher::TrustDomain("td".into()));
        let db = p.for_workload(&pod("default", "db-0"), "td", &[]);
        assert_eq!(db.mode, Mode::Strict);
        let web_id = SpiffeId::parse("spiffe://td/ns/default/sa/web").unwrap();
        let other = SpiffeId::parse("spiffe://td/ns/default/sa/other").unwrap();
        assert!(db.peers.check(&web_id).is_ok());
        assert!(db.peers.check(&other).is_err());
        let elsewhere = p.for_workload(&pod("ops", "x"), "td", &[]);
        assert_eq!(elsewhere.mode, Mode::Strict);
    }

    #[test]
    fn an_alias_domain_peer_is_judged_as_its_primary_twin() {
        let rules: Vec<PolicyRule> = serde_json::from_str(
            r#"[ {"namespace": "default", "workload": "db-0",
                  "allow": {"ids": ["spiffe://td/ns/default/sa/web"]}} ]"#,
        )
        .unwrap();
        let p = Policies::new(rules);
        let aliases = ["old.example".to_owned()];
        let id = |s: &str| SpiffeId::parse(s).unwrap();
        let db = p.for_workload(&pod("default", "db-0"), "td", &aliases);
        assert!(
            db.peers
                .check(&id("spiffe://old.example/ns/default/sa/web"))
                .is_ok()
        );
        assert!(
            db.peers
                .check(&id("spiffe://old.example/ns/default/sa/x"))
                .is_err()
        );
        let web = p.for_workload(&pod("default", "web-0"), "td", &aliases);
        assert!(
            web.peers
                .check(&id("spiffe://old.example/ns/a/sa/b"))
                .is_ok()
        );
        assert!(
            web.peers
                .check(&id("spiffe://evil.example/ns/a/sa/b"))
                .is_err()
        );
    }

    #[test]
    fn a_bad_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.json");
        std::fs::write(&path, "[{\"mode\": \"LOOSE\"}]").unwrap();
        let err = load_policy_file(&path).unwrap_err().to_string();
        assert!(err.contains("p.json"), "{err}");
    }

    #[tokio::test]
    async fn a_changed_file_is_reloaded_and_a_bad_one_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.json");
        std::fs::write(&path, "[]").unwrap();
        let (tx, mut rx) = tokio::sync::watch::channel(std::sync::Arc::new(Policies::default()));
        tokio::spawn(watch_policy_file(
            path.clone(),
            std::time::Duration::from_millis(20),
            tx,
        ));
        std::fs::write(&path, r#"[{"namespace": "default", "mode": "PERMISSIVE"}]"#).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), rx.changed())
            .await
            .unwrap()
            .unwrap();
        let web = pod("default", "web-0");
        assert_eq!(
            rx.borrow().for_workload(&web, "td", &[]).mode,
            Mode::Permissive
        );
        std::fs::write(&path, "not json at all").unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert_eq!(
            rx.borrow().for_workload(&web, "td", &[]).mode,
            Mode::Permissive
        );
    }
}
