//! Where certificates come from, and what the agent checks before it uses
//! one. [`CertificateSource`] is the seam between the secret cache and the
//! CA: production uses the Istio CA client, tests plug in fakes. Whatever a
//! source returns goes through [`check_answer`]: a chain of at least two
//! elements, a leaf for our identity and our key, verifying to the returned
//! roots (the checks of `meshid_common::ca_client`). Anything else is refused
//! and the current certificate kept.

use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use meshid_common::ca_client::validate_response;
use meshid_common::{PrivateKey, SpiffeId, Svid, TrustBundle};

use crate::error::{Error, Result};
use crate::token::Token;

/// One certificate request, as the agent hands it to a source.
#[derive(Debug)]
pub struct SignRequest {
    /// The identity the CSR asks for (and the agent expects back).
    pub id: SpiffeId,
    /// PEM CSR built from the in-memory key.
    pub csr_pem: String,
    /// Requested validity (`validity_duration`).
    pub ttl: Duration,
    /// The service-account token read for this request.
    pub token: Token,
}

/// Something that signs CSRs: the Istio CA over gRPC, or a fake in tests.
pub trait CertificateSource: Send + Sync + 'static {
    /// Sends the request and returns `cert_chain` as the CA answered it: the
    /// leaf PEM first, then one intermediate per element, the last element
    /// the PEM root bundle. Implementations continue the current span's
    /// trace towards the CA. Map CA statuses with
    /// [`Error::from_ca_status`] so refusals are told from outages.
    fn sign(&self, req: SignRequest) -> BoxFuture<'_, Result<Vec<String>>>;
}

/// Checks a CA answer for `id` and `key` at `now` (with the shared
/// [`validate_response`]) and turns it into an SVID and the trust bundle it
/// chains to. Every refusal is an [`Error::BadAnswer`] naming the identity.
pub fn check_answer(
    id: &SpiffeId,
    key: PrivateKey,
    chain: &[String],
    now: SystemTime,
) -> Result<(Svid, TrustBundle)> {
    let bad = |e: meshid_common::Error| Error::BadAnswer {
        id: id.clone(),
        reason: match e {
            meshid_common::Error::CaResponse(reason) => reason,
            other => other.to_string(),
        },
    };
    let (mut certs, bundle) = validate_response(chain, &key, id, now).map_err(bad)?;
    // Roots never travel in the SVID chain itself.
    certs.retain(|d| !bundle.contains(d));
    let svid = Svid::new(certs, key).map_err(bad)?;
    Ok((svid, bundle))
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshid_common::cert::{LeafSpec, certs_to_pem};
    use meshid_common::testing::TestPki;
    use meshid_common::{KeyType, cert::cert_to_pem};

    fn pki() -> TestPki {
        TestPki::new("cluster.local")
            .unwrap()
            .with_intermediate()
            .unwrap()
    }

    /// What an Istio CA answers: leaf, intermediate, root bundle.
    fn answer(pki: &TestPki, key: &PrivateKey, id: &SpiffeId) -> Vec<String> {
        let leaf = pki
            .signer()
            .issue_leaf(
                key.public_key_spki(),
                id,
                Duration::from_secs(3600),
                SystemTime::now(),
            )
            .unwrap();
        vec![
            cert_to_pem(&leaf),
            pki.signer().cert_pem(),
            pki.bundle().to_pem(),
        ]
    }

    #[test]
    fn a_good_answer_gives_svid_and_bundle() {
        let pki = pki();
        let id = pki.id("default", "web");
        let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let chain = answer(&pki, &key, &id);
        let (svid, bundle) = check_answer(&id, key, &chain, SystemTime::now()).unwrap();
        assert_eq!(svid.id(), &id);
        assert_eq!(svid.chain().len(), 2, "leaf + intermediate, no root");
        assert_eq!(bundle, pki.bundle());
    }

    #[test]
    fn malformed_answers_are_refused_with_a_reason() {
        let pki = pki();
        let id = pki.id("default", "web");
        let now = SystemTime::now();
        let check = |chain: &[String], key: PrivateKey| {
            check_answer(&id, key, chain, now).unwrap_err().to_string()
        };
        let key = || PrivateKey::generate(KeyType::EcdsaP256).unwrap();

        let k = key();
        let good = answer(&pki, &k, &id);
        let err = check(&good[..1], k);
        assert!(err.contains("1 element"), "{err}");

        let k = key();
        let other = answer(&pki, &k, &pki.id("default", "db"));
        let err = check(&other, k);
        assert!(
            err.contains("sa/db") && err.contains("we asked for"),
            "{err}"
        );

        let err = check(&answer(&pki, &key(), &id), key());
        assert!(
            err.contains("public key") && err.contains(id.as_str()),
            "{err}"
        );

        let k = key();
        let mut foreign = answer(&pki, &k, &id);
        *foreign.last_mut().unwrap() = TestPki::new("cluster.local").unwrap().bundle().to_pem();
        let err = check(&foreign, k);
        assert!(err.contains("ClientAuth"), "{err}");

        let k = key();
        let mut garbage = answer(&pki, &k, &id);
        garbage[0] = "not pem".into();
        let err = check(&garbage, k);
        assert!(err.contains("chain element 0"), "{err}");

        let k = key();
        let mut two_leaves = answer(&pki, &k, &id);
        two_leaves[0] = format!("{}{}", two_leaves[0], two_leaves[1]);
        let err = check(&two_leaves, k);
        assert!(err.contains("holds 2 certificates"), "{err}");

        // An expired leaf does not verify.
        let k = key();
        let spec = LeafSpec::svid(&id, Duration::from_secs(60));
        let old = pki
            .signer()
            .issue_custom(k.public_key_spki(), &spec, now - Duration::from_secs(3600))
            .unwrap();
        let chain = vec![
            cert_to_pem(&old),
            certs_to_pem(pki.signer().intermediates()) + &pki.signer().cert_pem(),
            pki.bundle().to_pem(),
        ];
        let err = check(&chain, k);
        assert!(err.contains("ClientAuth"), "{err}");
    }
}
