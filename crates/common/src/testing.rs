//! Test fixtures for the whole workspace, compiled only for this crate's
//! tests or with the `testing` cargo feature (which other crates enable from
//! their `[dev-dependencies]`, never from a shipped binary): a throwaway PKI
//! (a root and optionally an intermediate that issue SVIDs on demand, nothing
//! on disk), a span recorder, the one real-Envoy launcher ([`envoy`]), a
//! fake Kubernetes API server speaking the real wire format ([`kube`]) and
//! loopback ports reserved for processes a test starts ([`ports`]).

pub mod envoy;
pub mod kube;
pub mod ports;
pub mod promtool;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::bundle::TrustBundle;
use crate::cert::{CaOptions, CertificateAuthority, LeafSpec};
use crate::error::Result;
use crate::keys::{KeyType, PrivateKey};
use crate::spiffe::SpiffeId;
use crate::tls::{Credentials, CredentialsRx, Svid};

/// A root CA (and optional intermediate) for one trust domain.
#[derive(Debug)]
pub struct TestPki {
    pub trust_domain: String,
    pub root: CertificateAuthority,
    /// Signs leaves when set (its cert goes into each chain); else the root signs.
    pub intermediate: Option<CertificateAuthority>,
}

impl TestPki {
    /// A self-signed root valid for a day.
    pub fn new(trust_domain: &str) -> Result<Self> {
        let root = CertificateAuthority::self_signed_root(&CaOptions::new(
            trust_domain,
            Duration::from_secs(86_400),
        ))?;
        Ok(TestPki {
            trust_domain: trust_domain.to_owned(),
            root,
            intermediate: None,
        })
    }

    /// Leaves are signed by a fresh intermediate under the root.
    pub fn with_intermediate(mut self) -> Result<Self> {
        self.intermediate = Some(self.root.issue_intermediate(&CaOptions {
            common_name: Some("meshid test intermediate".into()),
            ..CaOptions::new(&self.trust_domain, Duration::from_secs(43_200))
        })?);
        Ok(self)
    }

    pub fn signer(&self) -> &CertificateAuthority {
        self.intermediate.as_ref().unwrap_or(&self.root)
    }

    pub fn bundle(&self) -> TrustBundle {
        TrustBundle::new(vec![self.root.cert().clone()]).expect("a root makes a bundle")
    }

    /// `spiffe://<td>/ns/<ns>/sa/<sa>`.
    pub fn id(&self, ns: &str, sa: &str) -> SpiffeId {
        SpiffeId::for_service_account(&self.trust_domain, ns, sa).expect("test identity")
    }

    /// An SVID for `id` valid for `ttl` from `now`.
    pub fn svid_at(&self, id: &SpiffeId, ttl: Duration, now: SystemTime) -> Result<Svid> {
        self.custom_svid(&LeafSpec::svid(id, ttl), now)
    }

    /// An SVID for `ns/sa` valid for an hour.
    pub fn svid(&self, ns: &str, sa: &str) -> Result<Svid> {
        self.svid_at(
            &self.id(ns, sa),
            Duration::from_secs(3600),
            SystemTime::now(),
        )
    }

    /// A leaf as `spec` says with a fresh P-256 key. `Svid::new` insists on
    /// one SPIFFE ID, so off-profile certs come back as (chain, key) instead
    /// through [`TestPki::custom_chain`].
    pub fn custom_svid(&self, spec: &LeafSpec, now: SystemTime) -> Result<Svid> {
        let (chain, key) = self.custom_chain(spec, now)?;
        Svid::new(chain, key)
    }

    /// Chain (leaf + intermediates) and key for any leaf spec.
    pub fn custom_chain(
        &self,
        spec: &LeafSpec,
        now: SystemTime,
    ) -> Result<(Vec<rustls_pki_types::CertificateDer<'static>>, PrivateKey)> {
        let key = PrivateKey::generate(KeyType::EcdsaP256)?;
        let leaf = self
            .signer()
            .issue_custom(key.public_key_spki(), spec, now)?;
        let mut chain = vec![leaf];
        if let Some(inter) = &self.intermediate {
            chain.push(inter.cert().clone());
        }
        Ok((chain, key))
    }

    /// Credentials with this PKI's bundle.
    pub fn credentials(&self, svid: Svid) -> Credentials {
        Credentials {
            svid: Arc::new(svid),
            bundle: Arc::new(self.bundle()),
        }
    }

    /// A watch channel already holding credentials for `ns/sa`.
    pub fn channel(
        &self,
        ns: &str,
        sa: &str,
    ) -> Result<(watch::Sender<Option<Credentials>>, CredentialsRx)> {
        Ok(watch::channel(Some(self.credentials(self.svid(ns, sa)?))))
    }
}

/// Keeps the spans an OpenTelemetry pipeline exports, for tests that check
/// a trace's shape: `SdkTracerProvider::builder().with_simple_exporter(
/// recorder.clone())`.
#[derive(Clone, Debug, Default)]
pub struct SpanRecorder(std::sync::Arc<std::sync::Mutex<Vec<opentelemetry_sdk::trace::SpanData>>>);

impl SpanRecorder {
    /// Every span exported so far.
    pub fn spans(&self) -> Vec<opentelemetry_sdk::trace::SpanData> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The first exported span called `name`; panics, listing the names
    /// seen, when there is none.
    pub fn named(&self, name: &str) -> opentelemetry_sdk::trace::SpanData {
        let spans = self.spans();
        let found = spans.iter().find(|s| s.name == name).cloned();
        found.unwrap_or_else(|| {
            panic!(
                "no span {name} among {:?}",
                spans.iter().map(|s| &s.name).collect::<Vec<_>>()
            )
        })
    }
}

impl opentelemetry_sdk::trace::SpanExporter for SpanRecorder {
    fn export(
        &self,
        batch: Vec<opentelemetry_sdk::trace::SpanData>,
    ) -> impl std::future::Future<Output = opentelemetry_sdk::error::OTelSdkResult> + Send {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(batch);
        std::future::ready(Ok(()))
    }
}
