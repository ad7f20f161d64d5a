//! The signer seam: the CA authenticates and authorizes, a [`CertSigner`]
//! signs. The built-in [`Signer`] (own key, plugged-in or self-signed) is
//! one implementation; [`crate::vault::VaultSigner`] (Vault / OpenBao PKI,
//! the CA as a registration authority) is the other.
//!
//! A signer is handed an identity the CA has already decided on, the CSR it
//! came in (signature checked) and the TTL; it answers with the chain in our
//! wire order (leaf, intermediates, root bundle last, DESIGN §2.1). It also
//! publishes the trust bundle it issues under, through a `watch`, so the
//! root file, the client-certificate authenticator, the JWT-SVID key and the
//! CA's serving certificate follow root rotation whichever signer is in use.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use meshid_common::{PrivateKey, SpiffeId, TrustBundle};
use rustls_pki_types::CertificateDer;
use tokio::sync::watch;

use crate::error::Result;
use crate::signer::{Issued, Signer, SigningState};

/// One leaf to sign, for an identity the CA already authorized.
#[derive(Clone, Copy, Debug)]
pub struct SignRequest<'a> {
    /// The identity the leaf must carry, and only it.
    pub id: &'a SpiffeId,
    /// The workload's CSR as it came (its signature is checked).
    pub csr_pem: &'a str,
    /// The CSR's DER SubjectPublicKeyInfo.
    pub public_key_spki: &'a [u8],
    pub ttl: Duration,
}

/// What a signer publishes: the roots clients should trust and the state of
/// the certificate that signs leaves.
#[derive(Clone, Debug, PartialEq)]
pub struct Roots {
    pub bundle: TrustBundle,
    pub bundle_pem: String,
    /// Serial and NotAfter of the certificate that issues leaves now.
    pub signing_serial: String,
    pub signing_not_after: SystemTime,
    /// Bumped whenever the roots or the issuing certificate change.
    pub generation: u64,
}

impl Roots {
    fn of(state: &SigningState) -> Self {
        let info = state.ca.info();
        Roots {
            bundle: state.bundle.clone(),
            bundle_pem: state.bundle_pem().to_owned(),
            signing_serial: info.serial.clone(),
            signing_not_after: info.not_after,
            generation: state.generation,
        }
    }

    /// NotAfter of the root that expires first.
    pub fn earliest_root_expiry(&self) -> SystemTime {
        self.bundle
            .earliest_expiry()
            .unwrap_or(SystemTime::UNIX_EPOCH)
    }
}

/// Signs workload leaves and the CA's own serving certificate.
pub trait CertSigner: Send + Sync + fmt::Debug {
    /// `builtin` or `vault`, for logs and `/ready`.
    fn kind(&self) -> &'static str;

    /// A workload leaf for `request.id`, checked against DESIGN §2.2, and
    /// the chain to send back.
    fn sign<'a>(&'a self, request: SignRequest<'a>) -> BoxFuture<'a, Result<Issued>>;

    /// The CA's serving certificate for `key` (an external signer needs a
    /// CSR, so the key itself): the leaf, then the intermediates up to (not
    /// including) a root of [`Self::roots`].
    fn issue_serving<'a>(
        &'a self,
        key: &'a PrivateKey,
        dns_names: &'a [String],
        ips: &'a [IpAddr],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Vec<CertificateDer<'static>>>>;

    /// The roots now.
    fn roots(&self) -> Arc<Roots>;

    /// Sees every change of [`Self::roots`].
    fn subscribe(&self) -> watch::Receiver<Arc<Roots>>;
}

impl CertSigner for Signer {
    fn kind(&self) -> &'static str {
        "builtin"
    }

    fn sign<'a>(&'a self, request: SignRequest<'a>) -> BoxFuture<'a, Result<Issued>> {
        // Local signing is a few hundred microseconds of CPU: done in place.
        let issued = Signer::sign(self, request.public_key_spki, request.id, request.ttl);
        Box::pin(std::future::ready(issued))
    }

    fn issue_serving<'a>(
        &'a self,
        key: &'a PrivateKey,
        dns_names: &'a [String],
        ips: &'a [IpAddr],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Vec<CertificateDer<'static>>>> {
        let state = self.current();
        let issued = state
            .ca
            .issue_server_cert(
                key.public_key_spki(),
                dns_names,
                ips,
                ttl,
                SystemTime::now(),
            )
            .map(|leaf| {
                let mut chain = vec![leaf];
                chain.extend(state.intermediates.iter().cloned());
                chain
            })
            .map_err(|e| crate::Error::Tls(format!("serving certificate: {e}")));
        Box::pin(std::future::ready(issued))
    }

    fn roots(&self) -> Arc<Roots> {
        Arc::new(Roots::of(&self.current()))
    }

    fn subscribe(&self) -> watch::Receiver<Arc<Roots>> {
        // The signing state's channel, seen as roots: a forwarding task that
        // ends when either side is gone.
        let mut states = Signer::subscribe(self);
        let first = Arc::new(Roots::of(&states.borrow_and_update()));
        let (tx, rx) = watch::channel(first);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tx.closed() => return,
                    changed = states.changed() => if changed.is_err() { return },
                }
                let roots = Roots::of(&states.borrow_and_update());
                tx.send_if_modified(|current| {
                    if **current == roots {
                        return false;
                    }
                    *current = Arc::new(roots);
                    true
                });
            }
        });
        rx
    }
}
