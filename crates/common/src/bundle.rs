//! Trust bundles (one or more roots) and chain verification against them.

use std::fmt;
use std::time::SystemTime;

use rustls_pki_types::{CertificateDer, UnixTime};

use crate::cert::{CertInfo, certs_to_pem, parse_pem_certs};
use crate::error::{Error, Result};

/// Which extended key usage a verified leaf must allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    /// The leaf authenticates a TLS client (an mTLS peer calling us).
    ClientAuth,
    /// The leaf authenticates a TLS server (a peer we call).
    ServerAuth,
}

/// The roots of a trust domain. May hold several, as during a root rotation.
#[derive(Clone, PartialEq, Eq)]
pub struct TrustBundle {
    roots: Vec<CertificateDer<'static>>,
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let serials: Vec<String> = self
            .roots
            .iter()
            .map(|r| {
                CertInfo::from_der(r)
                    .map(|i| i.serial)
                    .unwrap_or_else(|_| "?".into())
            })
            .collect();
        f.debug_struct("TrustBundle")
            .field("roots", &serials)
            .finish()
    }
}

impl TrustBundle {
    /// A bundle of the given roots; each must parse as a CA certificate.
    /// Duplicates are dropped, order is kept.
    pub fn new(roots: Vec<CertificateDer<'static>>) -> Result<Self> {
        if roots.is_empty() {
            return Err(Error::EmptyBundle);
        }
        let mut unique: Vec<CertificateDer<'static>> = Vec::with_capacity(roots.len());
        for root in roots {
            let info = CertInfo::from_der(&root)?;
            if !info.is_ca {
                return Err(Error::BadCertificate(format!(
                    "trust bundle entry {} ({}) is not a CA certificate",
                    info.serial, info.subject
                )));
            }
            webpki::anchor_from_trusted_cert(&root)
                .map_err(|e| Error::BadCertificate(format!("root {}: {e}", info.serial)))?;
            if !unique.contains(&root) {
                unique.push(root);
            }
        }
        Ok(TrustBundle { roots: unique })
    }

    /// Parses concatenated PEM roots.
    pub fn from_pem(pem: &str) -> Result<Self> {
        Self::new(parse_pem_certs(pem)?)
    }

    pub fn to_pem(&self) -> String {
        certs_to_pem(&self.roots)
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The roots, parsed (each parsed when the bundle was made, so none is
    /// skipped), in bundle order: for logs, debug pages and metrics.
    pub fn infos(&self) -> impl Iterator<Item = CertInfo> + '_ {
        self.roots.iter().filter_map(|r| CertInfo::from_der(r).ok())
    }

    /// NotAfter of the root that expires first.
    pub fn earliest_expiry(&self) -> Option<SystemTime> {
        self.infos().map(|i| i.not_after).min()
    }

    /// DER roots concatenated, as the SPIFFE Workload API carries bundles.
    pub fn to_concatenated_der(&self) -> Vec<u8> {
        self.roots.iter().flat_map(|r| r.iter().copied()).collect()
    }

    pub fn contains(&self, root: &CertificateDer<'_>) -> bool {
        self.roots.iter().any(|r| r.as_ref() == root.as_ref())
    }

    /// Every root of `other` is in `self`.
    pub fn is_superset_of(&self, other: &TrustBundle) -> bool {
        other.roots.iter().all(|r| self.contains(r))
    }

    /// Verifies `chain` (leaf first, then intermediates in any order; roots
    /// in it are ignored as anchors) up to one of the roots at `now`, for
    /// `usage`. Returns the leaf's parsed contents.
    pub fn verify(
        &self,
        chain: &[CertificateDer<'_>],
        usage: Usage,
        now: SystemTime,
    ) -> Result<CertInfo> {
        let (leaf, intermediates) = chain.split_first().ok_or(Error::EmptyChain)?;
        let info = CertInfo::from_der(leaf)?;
        self.verify_webpki(leaf, intermediates, usage, now)
            .map_err(|e| Error::Untrusted {
                serial: info.serial.clone(),
                reason: describe_webpki_error(&e),
            })?;
        Ok(info)
    }

    /// The raw webpki verification, for callers (the TLS verifiers) that map
    /// the error themselves.
    pub(crate) fn verify_webpki(
        &self,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        usage: Usage,
        now: SystemTime,
    ) -> std::result::Result<(), webpki::Error> {
        let anchors: Vec<_> = self
            .roots
            .iter()
            .filter_map(|r| webpki::anchor_from_trusted_cert(r).ok())
            .collect();
        let ee = webpki::EndEntityCert::try_from(leaf)?;
        let usage = match usage {
            Usage::ClientAuth => webpki::KeyUsage::client_auth(),
            Usage::ServerAuth => webpki::KeyUsage::server_auth(),
        };
        let now = UnixTime::since_unix_epoch(
            now.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default(),
        );
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map(|_| ())
    }
}

/// A readable sentence for the webpki errors people actually meet.
pub(crate) fn describe_webpki_error(e: &webpki::Error) -> String {
    match e {
        webpki::Error::CertExpired { .. } => "certificate has expired".into(),
        webpki::Error::CertNotValidYet { .. } => "certificate is not valid yet".into(),
        webpki::Error::UnknownIssuer => "issued by a CA that is not in the trust bundle".into(),
        webpki::Error::RequiredEkuNotFoundContext(_) => {
            "certificate's extended key usage does not allow this use (clientAuth/serverAuth missing)".into()
        }
        webpki::Error::InvalidSignatureForPublicKey => "signature does not verify".into(),
        webpki::Error::CaUsedAsEndEntity => "a CA certificate was presented as a leaf".into(),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cert::{CaOptions, CertificateAuthority};
    use crate::keys::{KeyType, PrivateKey};
    use crate::spiffe::SpiffeId;
    use std::time::Duration;

    fn ca(org: &str) -> CertificateAuthority {
        CertificateAuthority::self_signed_root(&CaOptions::new(org, Duration::from_secs(86400)))
            .unwrap()
    }

    fn leaf(ca: &CertificateAuthority) -> Vec<CertificateDer<'static>> {
        let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let id = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap();
        let mut chain = vec![
            ca.issue_leaf(
                key.public_key_spki(),
                &id,
                Duration::from_secs(600),
                SystemTime::now(),
            )
            .unwrap(),
        ];
        chain.extend(ca.intermediates().iter().cloned());
        if !ca.is_self_signed() {
            chain.insert(1, ca.cert().clone());
        }
        chain
    }

    #[test]
    fn a_bundle_with_two_roots_verifies_leaves_of_both() {
        let (a, b) = (ca("a"), ca("b"));
        let bundle = TrustBundle::new(vec![a.cert().clone(), b.cert().clone()]).unwrap();
        for issuer in [&a, &b] {
            let info = bundle
                .verify(&leaf(issuer), Usage::ClientAuth, SystemTime::now())
                .unwrap();
            assert_eq!(
                info.spiffe_id.unwrap().as_str(),
                "spiffe://cluster.local/ns/a/sa/b"
            );
            bundle
                .verify(&leaf(issuer), Usage::ServerAuth, SystemTime::now())
                .unwrap();
        }
        let only_a = TrustBundle::new(vec![a.cert().clone()]).unwrap();
        let err = only_a
            .verify(&leaf(&b), Usage::ClientAuth, SystemTime::now())
            .unwrap_err();
        assert!(err.to_string().contains("not in the trust bundle"), "{err}");
        assert!(bundle.is_superset_of(&only_a));
        assert!(!only_a.is_superset_of(&bundle));
    }

    #[test]
    fn chains_through_an_intermediate() {
        let root = ca("root");
        let inter = root
            .issue_intermediate(&CaOptions::new("inter", Duration::from_secs(3600)))
            .unwrap();
        let bundle = TrustBundle::new(vec![root.cert().clone()]).unwrap();
        let chain = leaf(&inter);
        assert_eq!(chain.len(), 2);
        bundle
            .verify(&chain, Usage::ClientAuth, SystemTime::now())
            .unwrap();
        // Without the intermediate the leaf does not chain.
        assert!(
            bundle
                .verify(&chain[..1], Usage::ClientAuth, SystemTime::now())
                .is_err()
        );
    }

    #[test]
    fn expiry_is_reported() {
        let a = ca("a");
        let bundle = TrustBundle::new(vec![a.cert().clone()]).unwrap();
        let later = SystemTime::now() + Duration::from_secs(3600);
        let err = bundle
            .verify(&leaf(&a), Usage::ClientAuth, later)
            .unwrap_err();
        assert!(err.to_string().contains("expired"), "{err}");
    }

    #[test]
    fn infos_follow_the_bundle_and_the_earliest_expiry_is_the_shorter_root() {
        let long = ca("long");
        let short = CertificateAuthority::self_signed_root(&CaOptions::new(
            "short",
            Duration::from_secs(3600),
        ))
        .unwrap();
        let bundle = TrustBundle::new(vec![long.cert().clone(), short.cert().clone()]).unwrap();
        let infos: Vec<CertInfo> = bundle.infos().collect();
        assert_eq!(infos.len(), 2);
        assert_eq!(infos[0].serial, long.info().serial);
        assert_eq!(infos[1].serial, short.info().serial);
        assert_eq!(bundle.earliest_expiry(), Some(short.info().not_after));
    }

    #[test]
    fn bundle_pem_round_trip_and_dedup() {
        let (a, b) = (ca("a"), ca("b"));
        let bundle =
            TrustBundle::new(vec![a.cert().clone(), b.cert().clone(), a.cert().clone()]).unwrap();
        assert_eq!(bundle.roots().len(), 2);
        assert_eq!(TrustBundle::from_pem(&bundle.to_pem()).unwrap(), bundle);
        assert!(matches!(TrustBundle::new(vec![]), Err(Error::EmptyBundle)));
        let leaf_pem = crate::cert::cert_to_pem(&leaf(&a)[0]);
        assert!(
            TrustBundle::from_pem(&leaf_pem)
                .unwrap_err()
                .to_string()
                .contains("not a CA")
        );
    }
}
