//! Authorization: which identity the caller may get. Its own, always; another
//! workload's through `ImpersonatedIdentity` only if the caller is a trusted
//! node account (`CA_TRUSTED_NODE_ACCOUNTS`) and a pod of that service
//! account runs on the caller's node (DESIGN §2.1).

use std::sync::Arc;

use meshid_common::SpiffeId;

use crate::authn::Caller;
use crate::config::NodeAccount;
use crate::directory::PodDirectory;
use crate::error::{Error, ImpersonationRefusal, Result};

/// The request-metadata key of impersonation.
pub use meshid_common::ca_client::IMPERSONATED_IDENTITY_KEY;

#[derive(Debug, Clone)]
pub struct Authorizer {
    trust_domain: String,
    /// Trust domains that mean this one (Istio's `trustDomainAliases`).
    aliases: Vec<String>,
    node_accounts: Vec<NodeAccount>,
    directory: Option<Arc<dyn PodDirectory>>,
}

impl Authorizer {
    pub fn new(
        trust_domain: String,
        node_accounts: Vec<NodeAccount>,
        directory: Option<Arc<dyn PodDirectory>>,
    ) -> Self {
        Authorizer {
            trust_domain,
            aliases: Vec::new(),
            node_accounts,
            directory,
        }
    }

    /// Trust domains accepted as this one (`--trust-domain-aliases`).
    pub fn with_trust_domain_aliases(mut self, aliases: Vec<String>) -> Self {
        self.aliases = aliases;
        self
    }

    /// `id` in the primary trust domain when it is in the primary one or in
    /// an alias (pilot-agent writes its own `TRUST_DOMAIN` into the CSR and
    /// into `ImpersonatedIdentity`); `None` for any other trust domain.
    pub fn in_primary_trust_domain(&self, id: &SpiffeId) -> Option<SpiffeId> {
        if id.is_member_of(&self.trust_domain) {
            return Some(id.clone());
        }
        if self.aliases.iter().any(|a| id.is_member_of(a)) {
            return id.with_trust_domain(&self.trust_domain).ok();
        }
        None
    }

    /// The identity to issue for `caller`, who may ask for `impersonate`.
    pub async fn authorize(&self, caller: &Caller, impersonate: Option<&str>) -> Result<SpiffeId> {
        let Some(target) = impersonate else {
            return Ok(caller.id.clone());
        };
        use ImpersonationRefusal as R;
        let refuse = |kind: ImpersonationRefusal, reason: String| Error::Impersonation {
            caller: caller.id.to_string(),
            target: target.to_owned(),
            reason,
            kind,
        };
        let id = SpiffeId::parse(target)
            .map_err(|e| refuse(R::InvalidTarget, format!("not a valid SPIFFE ID: {e}")))?;
        let Some(id) = self.in_primary_trust_domain(&id) else {
            return Err(refuse(
                R::InvalidTarget,
                format!(
                    "trust domain {:?} is not this CA's {:?} nor one of its aliases {:?}",
                    id.trust_domain(),
                    self.trust_domain,
                    self.aliases
                ),
            ));
        };
        let Some((ns, sa)) = id.service_account() else {
            return Err(refuse(
                R::InvalidTarget,
                "not a service account identity (spiffe://<td>/ns/<ns>/sa/<sa>)".into(),
            ));
        };
        let trusted = self.node_accounts.iter().any(|a| {
            a.namespace == caller.namespace && a.service_account == caller.service_account
        });
        if !trusted {
            return Err(refuse(
                R::NotANodeAccount,
                format!(
                    "{}/{} is not a trusted node account (CA_TRUSTED_NODE_ACCOUNTS)",
                    caller.namespace, caller.service_account
                ),
            ));
        }
        let Some(node) = caller.node.as_deref() else {
            return Err(refuse(
                R::NotAllowed,
                format!(
                    "the caller's node is unknown (authenticated by {}; a token bound to a pod is needed)",
                    caller.method
                ),
            ));
        };
        let Some(directory) = &self.directory else {
            return Err(refuse(
                R::NotAllowed,
                "no pod directory is configured".into(),
            ));
        };
        let on_node = directory
            .service_account_on_node(ns, sa, node)
            .await
            .map_err(|e| refuse(R::NotAllowed, format!("pod lookup failed: {e}")))?;
        if !on_node {
            return Err(refuse(
                R::NotAllowed,
                format!("no pod of service account {ns}/{sa} runs on node {node:?}"),
            ));
        }
        Ok(id)
    }
}

/// The `ImpersonatedIdentity` of a request's metadata struct, if any.
pub fn impersonated_identity(metadata: Option<&prost_types::Struct>) -> Result<Option<String>> {
    use prost_types::value::Kind;
    let Some(value) = metadata.and_then(|m| m.fields.get(IMPERSONATED_IDENTITY_KEY)) else {
        return Ok(None);
    };
    match &value.kind {
        Some(Kind::StringValue(s)) => Ok(Some(s.clone())),
        _ => Err(Error::Impersonation {
            caller: "the caller".into(),
            target: format!("{:?}", value.kind),
            reason: format!("{IMPERSONATED_IDENTITY_KEY} must be a string"),
            kind: ImpersonationRefusal::InvalidTarget,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::RegistryDirectory;
    use meshid_common::registry::{Registry, RegistryWatcher, Workload};

    fn caller(ns: &str, sa: &str, node: Option<&str>) -> Caller {
        Caller {
            id: SpiffeId::for_service_account("cluster.local", ns, sa).unwrap(),
            namespace: ns.into(),
            service_account: sa.into(),
            node: node.map(str::to_owned),
            pod: None,
            method: "jwt",
        }
    }

    fn authorizer() -> Authorizer {
        let mut r = Registry::default();
        r.upsert_workload(Workload {
            name: "web-0".into(),
            namespace: "default".into(),
            service_account: "web".into(),
            node: "node-a".into(),
            uid: "u1".into(),
            address: None,
            mode: None,
        });
        Authorizer::new(
            "cluster.local".into(),
            vec![NodeAccount {
                namespace: "istio-system".into(),
                service_account: "ztunnel".into(),
            }],
            Some(Arc::new(RegistryDirectory::new(RegistryWatcher::fixed(r)))),
        )
    }

    #[tokio::test]
    async fn own_identity_and_node_impersonation() {
        let a = authorizer();
        let web = caller("default", "web", Some("node-a"));
        assert_eq!(a.authorize(&web, None).await.unwrap(), web.id);
        let zt = caller("istio-system", "ztunnel", Some("node-a"));
        let target = "spiffe://cluster.local/ns/default/sa/web";
        assert_eq!(
            a.authorize(&zt, Some(target)).await.unwrap().as_str(),
            target
        );
    }

    #[tokio::test]
    async fn impersonation_in_an_alias_is_issued_in_the_primary_trust_domain() {
        let a = authorizer().with_trust_domain_aliases(vec!["old.td".into()]);
        let zt = caller("istio-system", "ztunnel", Some("node-a"));
        let got = a
            .authorize(&zt, Some("spiffe://old.td/ns/default/sa/web"))
            .await
            .unwrap();
        assert_eq!(got.as_str(), "spiffe://cluster.local/ns/default/sa/web");
        let err = a
            .authorize(&zt, Some("spiffe://other.td/ns/default/sa/web"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("aliases"), "{err}");
    }

    #[tokio::test]
    async fn refusals_say_why() {
        let a = authorizer();
        let target = "spiffe://cluster.local/ns/default/sa/web";
        let cases = [
            (
                caller("default", "web", Some("node-a")),
                target,
                "not a trusted node account",
            ),
            (
                caller("istio-system", "ztunnel", Some("node-b")),
                target,
                "node \"node-b\"",
            ),
            (
                caller("istio-system", "ztunnel", None),
                target,
                "node is unknown",
            ),
            (
                caller("istio-system", "ztunnel", Some("node-a")),
                "spiffe://x/ns//sa/y",
                "not a valid SPIFFE ID",
            ),
            (
                caller("istio-system", "ztunnel", Some("node-a")),
                "spiffe://other.td/ns/default/sa/web",
                "trust domain",
            ),
            (
                caller("istio-system", "ztunnel", Some("node-a")),
                "spiffe://cluster.local/web",
                "not a service account",
            ),
        ];
        for (c, t, want) in cases {
            let err = a.authorize(&c, Some(t)).await.unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated);
            assert!(err.to_string().contains(want), "{err} / wanted {want}");
        }
    }
}
