//! Kubernetes mode (feature `kube`): tokens are checked with a `TokenReview`
//! against the API server (in-cluster config or KUBECONFIG), and pods are
//! looked up in the API, so a token stops authenticating once its pod is
//! gone. The same [`KubeApi`] answers the node authorizer's questions.

use std::collections::BTreeMap;

use futures::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{ListParams, PostParams};
use meshid_common::SpiffeId;

use super::{AuthContext, AuthError, Authenticator, Caller, parse_service_account_subject};
use crate::config::Config;
use crate::directory::{PodDirectory, PodInfo};
use crate::error::{Error, Result};

const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const NODE_NAME: &str = "authentication.kubernetes.io/node-name";

/// A Kubernetes API client.
#[derive(Clone)]
pub struct KubeApi {
    client: kube::Client,
}

impl std::fmt::Debug for KubeApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeApi")
            .field("default_namespace", &self.client.default_namespace())
            .finish()
    }
}

impl KubeApi {
    /// In-cluster config, else KUBECONFIG.
    pub async fn connect(_config: &Config) -> Result<Self> {
        let client = kube::Client::try_default()
            .await
            .map_err(|e| Error::Kube(format!("no usable cluster config: {e}")))?;
        Ok(KubeApi { client })
    }

    pub fn from_client(client: kube::Client) -> Self {
        KubeApi { client }
    }

    fn pods(&self, namespace: &str) -> Api<Pod> {
        Api::namespaced(self.client.clone(), namespace)
    }

    async fn any_pod(&self, namespace: &str, fields: &str, service_account: &str) -> Result<bool> {
        let list = self
            .pods(namespace)
            .list(&ListParams::default().fields(fields))
            .await
            .map_err(|e| Error::Kube(format!("listing pods in {namespace}: {e}")))?;
        Ok(list.items.iter().any(|p| {
            is_running(p)
                && p.spec
                    .as_ref()
                    .and_then(|s| s.service_account_name.as_deref())
                    == Some(service_account)
        }))
    }
}

fn is_running(pod: &Pod) -> bool {
    let terminating = pod.metadata.deletion_timestamp.is_some();
    let finished = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Succeeded" || p == "Failed");
    !terminating && !finished
}

impl PodDirectory for KubeApi {
    fn live_pod<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        uid: &'a str,
    ) -> BoxFuture<'a, Result<Option<PodInfo>>> {
        Box::pin(async move {
            let pod = self
                .pods(namespace)
                .get_opt(name)
                .await
                .map_err(|e| Error::Kube(format!("reading pod {namespace}/{name}: {e}")))?;
            Ok(pod
                .filter(|p| p.metadata.uid.as_deref() == Some(uid) && is_running(p))
                .map(|p| {
                    let spec = p.spec.unwrap_or_default();
                    PodInfo {
                        namespace: namespace.to_owned(),
                        name: name.to_owned(),
                        service_account: spec
                            .service_account_name
                            .unwrap_or_else(|| "default".into()),
                        node: spec.node_name.unwrap_or_default(),
                        uid: uid.to_owned(),
                    }
                }))
        })
    }

    fn service_account_on_node<'a>(
        &'a self,
        namespace: &'a str,
        service_account: &'a str,
        node: &'a str,
    ) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            self.any_pod(namespace, &format!("spec.nodeName={node}"), service_account)
                .await
        })
    }

    fn service_account_alive<'a>(
        &'a self,
        namespace: &'a str,
        service_account: &'a str,
    ) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            self.any_pod(
                namespace,
                &format!("spec.serviceAccountName={service_account}"),
                service_account,
            )
            .await
        })
    }
}

/// Authenticates bearer tokens with a TokenReview.
#[derive(Debug)]
pub struct TokenReviewAuthenticator {
    api: KubeApi,
    trust_domain: String,
    audiences: Vec<String>,
}

impl TokenReviewAuthenticator {
    pub fn new(api: KubeApi, trust_domain: String, audiences: Vec<String>) -> Self {
        TokenReviewAuthenticator {
            api,
            trust_domain,
            audiences,
        }
    }

    async fn check(&self, token: &str) -> Result<Caller, AuthError> {
        let fail = |m: String| AuthError::TokenReview(m);
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(self.audiences.clone()),
            },
            ..Default::default()
        };
        let answer = Api::<TokenReview>::all(self.api.client.clone())
            .create(&PostParams::default(), &review)
            .await
            // The error carries the API's message, never the request body.
            .map_err(|e| fail(format!("the API server could not review the token: {e}")))?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(fail(format!(
                "the token is not authenticated: {}",
                status.error.as_deref().unwrap_or("no reason given")
            )));
        }
        if let Some(auds) = &status.audiences
            && !auds.iter().any(|a| self.audiences.contains(a))
        {
            return Err(fail(format!(
                "wrong audience: the token's audiences {auds:?} are not among {:?}",
                self.audiences
            )));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let (ns, sa) = parse_service_account_subject(&username)
            .ok_or_else(|| fail(format!("user {username:?} is not a service account")))?;
        let extra = user.extra.unwrap_or_default();
        let one =
            |m: &BTreeMap<String, Vec<String>>, k: &str| m.get(k).and_then(|v| v.first()).cloned();
        let (Some(pod), Some(uid)) = (one(&extra, POD_NAME), one(&extra, POD_UID)) else {
            return Err(fail("the token is not bound to a pod".into()));
        };
        let live = self
            .api
            .live_pod(ns, &pod, &uid)
            .await
            .map_err(|e| fail(format!("pod lookup failed: {e}")))?
            .ok_or_else(|| {
                fail(format!(
                    "pod {ns}/{pod} (uid {uid}) is not running: the token's pod is gone"
                ))
            })?;
        let node = one(&extra, NODE_NAME).unwrap_or(live.node);
        let id = SpiffeId::for_service_account(&self.trust_domain, ns, sa)
            .map_err(|e| fail(format!("the service account makes no valid SPIFFE ID: {e}")))?;
        Ok(Caller {
            id,
            namespace: ns.to_owned(),
            service_account: sa.to_owned(),
            node: (!node.is_empty()).then_some(node),
            pod: Some(pod),
            method: "token-review",
        })
    }
}

impl Authenticator for TokenReviewAuthenticator {
    fn name(&self) -> &'static str {
        "token-review"
    }

    fn reads_cluster_id(&self) -> bool {
        true
    }

    fn authenticate<'a>(
        &'a self,
        ctx: AuthContext<'a>,
    ) -> BoxFuture<'a, Option<Result<Caller, AuthError>>> {
        Box::pin(async move {
            let token = ctx.bearer?;
            Some(self.check(token).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;

    /// A fake API server: answers a TokenReview for the token "good" as
    /// default/web bound to pod web-0, and serves that pod and a pod list.
    async fn fake(
        req: http::Request<kube::client::Body>,
    ) -> std::result::Result<http::Response<http_body_util::Full<hyper::body::Bytes>>, Infallible>
    {
        let path = req.uri().path().to_owned();
        let query = req.uri().query().unwrap_or("").to_owned();
        let body = http_body_util::BodyExt::collect(req.into_body())
            .await
            .unwrap()
            .to_bytes();
        let pod = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-0", "namespace": "default", "uid": "uid-web-0"},
            "spec": {"serviceAccountName": "web", "nodeName": "node-a", "containers": []},
            "status": {"phase": "Running"}
        });
        let json = match path.as_str() {
            "/apis/authentication.k8s.io/v1/tokenreviews" => {
                let review: serde_json::Value = serde_json::from_slice(&body).unwrap();
                let good = review["spec"]["token"] == "good";
                serde_json::json!({
                    "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                    "spec": review["spec"],
                    "status": if good { serde_json::json!({
                        "authenticated": true,
                        "audiences": ["istio-ca"],
                        "user": {"username": "system:serviceaccount:default:web",
                                 "extra": {POD_NAME: ["web-0"], POD_UID: ["uid-web-0"], NODE_NAME: ["node-a"]}}
                    })} else { serde_json::json!({"authenticated": false, "error": "invalid bearer token"}) }
                })
            }
            "/api/v1/namespaces/default/pods/web-0" => pod.clone(),
            "/api/v1/namespaces/default/pods" => {
                let on_node_a = !query.contains("nodeName") || query.contains("node-a");
                serde_json::json!({
                    "apiVersion": "v1", "kind": "PodList", "metadata": {},
                    "items": if on_node_a { vec![pod] } else { vec![] }
                })
            }
            _ => {
                return Ok(http::Response::builder()
                    .status(404)
                    .body(http_body_util::Full::new(hyper::body::Bytes::from_static(b"{\"kind\":\"Status\",\"apiVersion\":\"v1\",\"status\":\"Failure\",\"code\":404,\"reason\":\"NotFound\",\"message\":\"not found\"}")))
                    .unwrap());
            }
        };
        Ok(http::Response::new(http_body_util::Full::new(
            hyper::body::Bytes::from(json.to_string()),
        )))
    }

    fn api() -> KubeApi {
        KubeApi::from_client(kube::Client::new(tower::service_fn(fake), "default"))
    }

    #[tokio::test]
    async fn token_review_authenticates_a_pod_bound_token() {
        let authn =
            TokenReviewAuthenticator::new(api(), "cluster.local".into(), vec!["istio-ca".into()]);
        let caller = authn.check("good").await.unwrap();
        assert_eq!(
            caller.id.as_str(),
            "spiffe://cluster.local/ns/default/sa/web"
        );
        assert_eq!(caller.node.as_deref(), Some("node-a"));
        let err = authn.check("bad-token-value").await.unwrap_err();
        assert!(err.to_string().contains("invalid bearer token"), "{err}");
        assert!(!err.to_string().contains("bad-token-value"));
    }

    #[tokio::test]
    async fn pod_lookups_through_the_api() {
        let api = api();
        assert!(
            api.live_pod("default", "web-0", "uid-web-0")
                .await
                .unwrap()
                .is_some()
        );
        assert!(
            api.live_pod("default", "web-0", "old-uid")
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            api.service_account_on_node("default", "web", "node-a")
                .await
                .unwrap()
        );
        assert!(
            !api.service_account_on_node("default", "web", "node-b")
                .await
                .unwrap()
        );
        assert!(api.service_account_alive("default", "web").await.unwrap());
    }
}
