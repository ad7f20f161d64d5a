//! The signing CA of cluster mode, from Secrets in the CA's namespace, as
//! istiod keeps it:
//! - a plugged-in CA in `cacerts` (keys `ca-cert.pem`, `ca-key.pem`,
//!   `cert-chain.pem`, `root-cert.pem`) wins when present, and is followed
//!   (watched) so that a rotated Secret rotates the signer under the same
//!   superset/subset rule as a rotated CA directory;
//! - else the self-signed root in `istio-ca-secret` (type `istio.io/ca-root`,
//!   keys `ca-cert.pem`, `ca-key.pem`, and `cert-chain.pem`, `key.pem`,
//!   `root-cert.pem` written empty, as istiod writes them). When it is
//!   absent a root is made in memory and CREATEd; a `409 AlreadyExists`
//!   means another replica won the race, so its Secret is read again and
//!   its root used: replicas starting together end with one root.
//!
//! Keys stay in memory and in the Secret: nothing is written to disk. A
//! Secret that is there but unusable (a missing key, a corrupt certificate,
//! a key that does not match) stops the start with an error naming the
//! Secret and what is wrong, rather than making a second root.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::signer::{
    CA_CERT_FILE, CA_KEY_FILE, CERT_CHAIN_FILE, ROOT_CERT_FILE, Signer, SignerOptions, SigningState,
};
use meshid_common::kube::{Change, Reflector};

/// istiod's type for `istio-ca-secret`.
pub const CA_SECRET_TYPE: &str = "istio.io/ca-root";
/// The key istiod also writes (empty) into `istio-ca-secret`.
const KEY_FILE: &str = "key.pem";
/// Attempts at read-or-create before giving up (each 409 means a winner exists).
const CREATE_ATTEMPTS: usize = 3;

/// Where the signing material came from, for logs and errors.
pub fn origin(namespace: &str, name: &str) -> PathBuf {
    PathBuf::from(format!("Secret {namespace}/{name}"))
}

fn secret_error(namespace: &str, name: &str, reason: impl std::fmt::Display) -> Error {
    Error::CaSecret {
        secret: format!("{namespace}/{name}"),
        reason: reason.to_string(),
    }
}

fn api_error(what: &str, e: kube::Error) -> Error {
    match e {
        kube::Error::Api(s) => {
            Error::Kube(format!("{what}: {} ({} {})", s.message, s.code, s.reason))
        }
        e => Error::KubeUnavailable(format!("{what}: {e}")),
    }
}

/// The text under `key`, if the Secret has it.
fn text<'a>(data: &'a BTreeMap<String, ByteString>, key: &str) -> Option<Result<&'a str, String>> {
    data.get(key)
        .map(|b| std::str::from_utf8(&b.0).map_err(|_| format!("{key} is not UTF-8 text")))
}

/// The plugged-in CA a `cacerts` Secret holds.
pub fn plugged_in(secret: &Secret, namespace: &str, name: &str) -> Result<SigningState> {
    let data = secret.data.clone().unwrap_or_default();
    let missing: Vec<&str> = [CA_CERT_FILE, CA_KEY_FILE, CERT_CHAIN_FILE, ROOT_CERT_FILE]
        .into_iter()
        .filter(|k| data.get(*k).is_none_or(|v| v.0.is_empty()))
        .collect();
    if !missing.is_empty() {
        return Err(secret_error(
            namespace,
            name,
            format!(
                "a plugged-in CA needs ca-cert.pem, ca-key.pem, cert-chain.pem and root-cert.pem; missing or empty: {}",
                missing.join(", ")
            ),
        ));
    }
    let origin = origin(namespace, name);
    let names = [CA_CERT_FILE, CA_KEY_FILE, CERT_CHAIN_FILE, ROOT_CERT_FILE]
        .map(|k| PathBuf::from(format!("{} key {k}", origin.display())));
    let mut texts = Vec::with_capacity(4);
    for k in [CA_CERT_FILE, CA_KEY_FILE, CERT_CHAIN_FILE, ROOT_CERT_FILE] {
        let t = text(&data, k)
            .expect("checked above")
            .map_err(|r| secret_error(namespace, name, r))?;
        texts.push(t);
    }
    let parts = [0, 1, 2, 3].map(|i| (names[i].as_path(), texts[i]));
    SigningState::plugged_in_from_pem(parts, &origin).map_err(|e| secret_error(namespace, name, e))
}

/// The self-signed root an `istio-ca-secret` holds.
pub fn self_signed(secret: &Secret, namespace: &str, name: &str) -> Result<SigningState> {
    let data = secret.data.clone().unwrap_or_default();
    let get = |k: &str| match text(&data, k) {
        Some(Ok(t)) if !t.trim().is_empty() => Ok(t),
        Some(Err(r)) => Err(secret_error(namespace, name, r)),
        _ => Err(secret_error(
            namespace,
            name,
            format!("the key {k} is missing or empty"),
        )),
    };
    let (cert, key) = (get(CA_CERT_FILE)?, get(CA_KEY_FILE)?);
    let origin = origin(namespace, name);
    SigningState::self_signed_from_pem(
        cert,
        key,
        &PathBuf::from(format!("{} key {CA_CERT_FILE}", origin.display())),
        &origin,
    )
    .map_err(|e| secret_error(namespace, name, e))
}

/// What the CA signs with at start, and where it came from.
#[derive(Debug)]
pub struct Loaded {
    pub state: SigningState,
    pub origin: PathBuf,
}

/// The CA's signing state at start: the plugged-in `cacerts_name` if it
/// exists, else the root in `ca_secret_name`, made and stored if absent.
pub async fn load(
    client: &kube::Client,
    namespace: &str,
    cacerts_name: &str,
    ca_secret_name: &str,
    options: &SignerOptions,
) -> Result<Loaded> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let cacerts = api
        .get_opt(cacerts_name)
        .await
        .map_err(|e| api_error(&format!("reading Secret {namespace}/{cacerts_name}"), e))?;
    if let Some(secret) = cacerts {
        let state = plugged_in(&secret, namespace, cacerts_name)?;
        return Ok(Loaded {
            state,
            origin: origin(namespace, cacerts_name),
        });
    }
    let state = self_signed_root(&api, namespace, ca_secret_name, options).await?;
    Ok(Loaded {
        state,
        origin: origin(namespace, ca_secret_name),
    })
}

/// Reads the root from `name`, or makes one and creates the Secret; on a
/// lost create race, uses the winner's.
pub async fn self_signed_root(
    api: &Api<Secret>,
    namespace: &str,
    name: &str,
    options: &SignerOptions,
) -> Result<SigningState> {
    for _ in 0..CREATE_ATTEMPTS {
        let existing = api
            .get_opt(name)
            .await
            .map_err(|e| api_error(&format!("reading Secret {namespace}/{name}"), e))?;
        if let Some(secret) = existing {
            let state = self_signed(&secret, namespace, name)?;
            tracing::info!(secret = %format!("{namespace}/{name}"), "self-signed root read from its Secret");
            return Ok(state);
        }
        let origin = origin(namespace, name);
        let (state, cert_pem, key_pem) = {
            let options = options.clone();
            let origin = origin.clone();
            tokio::task::spawn_blocking(move || {
                SigningState::generate_self_signed(&options, &origin)
            })
            .await
            .map_err(|e| Error::Config(format!("root generation panicked: {e}")))??
        };
        let bytes = |s: &str| ByteString(s.as_bytes().to_vec());
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(namespace.to_owned()),
                ..Default::default()
            },
            type_: Some(CA_SECRET_TYPE.to_owned()),
            data: Some(BTreeMap::from([
                (CA_CERT_FILE.to_owned(), bytes(&cert_pem)),
                (CA_KEY_FILE.to_owned(), bytes(key_pem.as_str())),
                (CERT_CHAIN_FILE.to_owned(), bytes("")),
                (KEY_FILE.to_owned(), bytes("")),
                (ROOT_CERT_FILE.to_owned(), bytes("")),
            ])),
            ..Default::default()
        };
        match api.create(&PostParams::default(), &secret).await {
            Ok(_) => {
                tracing::info!(secret = %format!("{namespace}/{name}"), "made a new self-signed root and stored it in its Secret");
                return Ok(state);
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                // Another replica created it first: its root is the mesh's.
                tracing::info!(secret = %format!("{namespace}/{name}"), "another replica stored a root first; using that one");
                continue;
            }
            Err(e) => {
                return Err(api_error(&format!("creating Secret {namespace}/{name}"), e));
            }
        }
    }
    Err(Error::Kube(format!(
        "Secret {namespace}/{name}: created by another replica yet not readable after {CREATE_ATTEMPTS} attempts"
    )))
}

/// Follows the `cacerts` Secret and rotates `signer` to what it holds
/// (under the superset/subset rule). A deleted Secret or an unusable update
/// keeps the CA in use, with an error in the log.
pub async fn follow_cacerts(
    client: kube::Client,
    namespace: String,
    name: String,
    signer: Arc<Signer>,
    cancel: CancellationToken,
) {
    let api: Api<Secret> = Api::namespaced(client, &namespace);
    let reflector = Reflector::new(api, format!("Secret {namespace}/{name}"))
        .fields(format!("metadata.name={name}"));
    let apply = |secret: &Secret| {
        let origin = origin(&namespace, &name);
        match plugged_in(secret, &namespace, &name).and_then(|s| signer.rotate(s, &origin)) {
            Ok(true) => {
                tracing::info!(secret = %origin.display(), "signing CA rotated from its Secret")
            }
            Ok(false) => {}
            Err(e) => {
                tracing::error!(error = %e, "plugged-in CA change not applied; keeping the CA in use")
            }
        }
    };
    reflector
        .run(
            |change| match change {
                Change::Listed(secrets) => secrets.iter().for_each(&apply),
                Change::Applied(secret) => apply(&secret),
                Change::Deleted(_) => tracing::warn!(
                    secret = %format!("{namespace}/{name}"),
                    "the plugged-in CA Secret was deleted; keeping the CA in use"
                ),
            },
            cancel,
        )
        .await;
}
