//! Kubernetes mode (feature `kube`): tokens are checked with a `TokenReview`
//! against the API server, and the pod the token is bound to must be alive
//! in the pod directory (in a cluster, the watch cache of
//! [`crate::cluster::pods`]), so a token stops authenticating once its pod
//! is gone.
//!
//! Failures, never a crash: a review the API server refuses (e.g. `403`:
//! the CA's service account may not create TokenReviews) or answers "not
//! authenticated" is `UNAUTHENTICATED` with the API's message; an API server
//! that cannot be reached (or answers 429/5xx), or a pod cache that has not
//! listed pods yet, is `UNAVAILABLE`, since the same call may work later.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::Api;
use kube::api::PostParams;
use meshid_common::SpiffeId;

use super::{AuthContext, AuthError, Authenticator, Caller, parse_service_account_subject};
use crate::directory::PodDirectory;
use crate::error::Error;

const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const NODE_NAME: &str = "authentication.kubernetes.io/node-name";

/// Why the API server did not review a token, as the caller should see it.
fn review_failure(e: kube::Error) -> AuthError {
    match e {
        kube::Error::Api(s) if s.code == 429 || s.code >= 500 => AuthError::Unavailable(format!(
            "the API server could not review the token now: {} ({} {})",
            s.message, s.code, s.reason
        )),
        // The error carries the API's message, never the request body.
        kube::Error::Api(s) => AuthError::TokenReview(format!(
            "the API server refused the review: {} ({} {})",
            s.message, s.code, s.reason
        )),
        e => AuthError::Unavailable(format!(
            "the API server could not be reached for a TokenReview: {e}"
        )),
    }
}

/// Authenticates bearer tokens with a TokenReview.
pub struct TokenReviewAuthenticator {
    client: kube::Client,
    directory: Arc<dyn PodDirectory>,
    trust_domain: String,
    audiences: Vec<String>,
}

impl std::fmt::Debug for TokenReviewAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewAuthenticator")
            .field("directory", &self.directory)
            .field("trust_domain", &self.trust_domain)
            .field("audiences", &self.audiences)
            .finish()
    }
}

impl TokenReviewAuthenticator {
    pub fn new(
        client: kube::Client,
        directory: Arc<dyn PodDirectory>,
        trust_domain: String,
        audiences: Vec<String>,
    ) -> Self {
        TokenReviewAuthenticator {
            client,
            directory,
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
        let answer = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(review_failure)?;
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
            .directory
            .live_pod(ns, &pod, &uid)
            .await
            .map_err(|e| match e {
                Error::KubeUnavailable(m) => AuthError::Unavailable(format!("pod lookup: {m}")),
                e => fail(format!("pod lookup failed: {e}")),
            })?
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
    use crate::cluster::client_for_url;
    use crate::cluster::pods::PodCache;
    use meshid_common::testing::kube::{FakeApiServer, FakeRequest, status};
    use serde_json::{Value, json};
    use std::time::Duration;

    /// Answers TokenReviews as the API server would: "good" is default/web
    /// bound to pod web-0 on node-a, anything else is not authenticated.
    fn review(req: &FakeRequest) -> Option<(u16, Value)> {
        if req.resource != "tokenreviews" {
            return None;
        }
        let good = req.body["spec"]["token"] == "good";
        let status = if good {
            json!({"authenticated": true, "audiences": ["istio-ca"],
                   "user": {"username": "system:serviceaccount:default:web",
                            "extra": {POD_NAME: ["web-0"], POD_UID: [WEB_UID], NODE_NAME: ["node-a"]}}})
        } else {
            json!({"authenticated": false, "error": "invalid bearer token"})
        };
        Some((
            201,
            json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                   "spec": req.body["spec"], "status": status}),
        ))
    }

    const WEB_UID: &str = "uid-web-0";

    fn pod() -> Value {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "web-0", "namespace": "default"},
               "spec": {"serviceAccountName": "web", "nodeName": "node-a", "containers": []},
               "status": {"phase": "Running"}})
    }

    /// A fake API server with pod web-0 (its uid made `WEB_UID`) and the
    /// TokenReview hook; the authenticator over a synced pod cache.
    async fn setup() -> (FakeApiServer, TokenReviewAuthenticator) {
        let fake = FakeApiServer::start().await.unwrap();
        let stored = fake.insert("pods", pod());
        // The fake stamps its own uid: the review names that one.
        let uid = stored["metadata"]["uid"].as_str().unwrap().to_owned();
        fake.react(move |req| {
            review(req).map(|(code, mut body)| {
                if body["status"]["authenticated"] == true {
                    body["status"]["user"]["extra"][POD_UID] = json!([uid.clone()]);
                }
                (code, body)
            })
        });
        let client = client_for_url(&fake.url()).unwrap();
        let cache = PodCache::spawn(client.clone(), Default::default());
        assert!(cache.wait_synced(Duration::from_secs(10)).await);
        let authn = TokenReviewAuthenticator::new(
            client,
            Arc::new(cache),
            "cluster.local".into(),
            vec!["istio-ca".into()],
        );
        (fake, authn)
    }

    #[tokio::test]
    async fn token_review_authenticates_a_pod_bound_token() {
        let (fake, authn) = setup().await;
        let caller = authn.check("good").await.unwrap();
        assert_eq!(
            caller.id.as_str(),
            "spiffe://cluster.local/ns/default/sa/web"
        );
        assert_eq!(caller.node.as_deref(), Some("node-a"));
        let err = authn.check("bad-token-value").await.unwrap_err();
        assert!(matches!(err, AuthError::TokenReview(_)), "{err}");
        assert!(err.to_string().contains("invalid bearer token"), "{err}");
        assert!(!err.to_string().contains("bad-token-value"));
        // The review went to the real path, with the audiences.
        assert_eq!(
            fake.count(|r| r.starts_with("POST /apis/authentication.k8s.io/v1/tokenreviews")),
            2
        );

        // The pod is deleted: the cache sees it through the watch, and the
        // same token no longer authenticates.
        assert!(fake.delete("api/v1", "pods", "default", "web-0"));
        tokio::time::timeout(Duration::from_secs(10), async {
            while authn.check("good").await.is_ok() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the deletion reaches the cache");
        let err = authn.check("good").await.unwrap_err();
        assert!(err.to_string().contains("the token's pod is gone"), "{err}");
    }

    #[tokio::test]
    async fn a_refused_review_is_unauthenticated_with_the_apis_message() {
        let (fake, authn) = setup().await;
        fake.clear_hooks();
        fake.react(|req| {
            (req.resource == "tokenreviews").then(|| {
                (403, status(403, "Forbidden",
                    "tokenreviews.authentication.k8s.io is forbidden: User \"system:serviceaccount:istio-system:meshid-ca\" cannot create resource \"tokenreviews\""))
            })
        });
        let err = authn.check("good").await.unwrap_err();
        assert!(matches!(err, AuthError::TokenReview(_)), "{err:?}");
        assert!(err.to_string().contains("forbidden"), "{err}");
        assert!(err.to_string().contains("403"), "{err}");
        let status = Error::Authentication { reasons: vec![err] }.to_status("rid-1");
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
    }

    #[tokio::test]
    async fn an_unreachable_api_server_is_unavailable_with_a_message() {
        let (fake, authn) = setup().await;
        fake.shutdown();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let err = authn.check("good").await.unwrap_err();
        assert!(matches!(err, AuthError::Unavailable(_)), "{err:?}");
        assert!(err.to_string().contains("could not be reached"), "{err}");
        let status = Error::Authentication { reasons: vec![err] }.to_status("rid-1");
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(
            status.message().contains(
                "token could not be checked now: the cluster API is unavailable (request id rid-1)"
            ),
            "{}",
            status.message()
        );
    }

    #[tokio::test]
    async fn before_the_first_pod_list_lookups_are_unavailable() {
        let fake = FakeApiServer::start().await.unwrap();
        // Lists are refused: the cache never syncs.
        fake.react(|req| {
            (req.resource == "pods").then(|| (403, status(403, "Forbidden", "pods is forbidden")))
        });
        let client = client_for_url(&fake.url()).unwrap();
        let cache = PodCache::spawn(client, Default::default());
        assert!(!cache.wait_synced(Duration::from_millis(300)).await);
        let err = cache.live_pod("default", "web-0", "x").await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
        assert!(err.to_string().contains("not listed pods yet"), "{err}");
    }
}
