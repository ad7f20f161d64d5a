//! Prometheus metrics with istiod's names (DESIGN §3), plus an issuance
//! latency histogram.
//!
//! istiod exports its counters without the OpenMetrics `_total` suffix
//! (`citadel_server_csr_count`), and dashboards query those names, so the
//! counters here are encoded as plain samples of a counter family and the
//! page is served as the classic Prometheus text format.

use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::error::Error;
use crate::sign::CertSigner;

pub use meshid_common::metrics::IstioCounter;

type ErrorLabels = Vec<(&'static str, &'static str)>;

/// Every metric of the CA.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub csr_count: IstioCounter,
    pub success_count: IstioCounter,
    pub authentication_failures: IstioCounter,
    csr_parsing_errors: IstioCounter,
    id_extraction_errors: IstioCounter,
    sign_errors: Family<ErrorLabels, IstioCounter>,
    root_expiry: Gauge<f64, AtomicU64>,
    root_expiry_timestamp: Gauge<f64, AtomicU64>,
    chain_expiry: Gauge<f64, AtomicU64>,
    chain_expiry_timestamp: Gauge<f64, AtomicU64>,
    latency: Histogram,
    jwt_svids: Family<ErrorLabels, prometheus_client::metrics::counter::Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let csr_count = IstioCounter::default();
        let success_count = IstioCounter::default();
        let authentication_failures = IstioCounter::default();
        let csr_parsing_errors = IstioCounter::default();
        let id_extraction_errors = IstioCounter::default();
        let chain_expiry_timestamp = Gauge::<f64, AtomicU64>::default();
        let sign_errors = Family::<ErrorLabels, IstioCounter>::default();
        let root_expiry = Gauge::<f64, AtomicU64>::default();
        let root_expiry_timestamp = Gauge::<f64, AtomicU64>::default();
        let chain_expiry = Gauge::<f64, AtomicU64>::default();
        let latency = Histogram::new([
            0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        ]);
        registry.register(
            "citadel_server_csr_count",
            "The number of CSRs received by Citadel server.",
            csr_count.clone(),
        );
        registry.register(
            "citadel_server_success_cert_issuance_count",
            "The number of certificates issuances that have succeeded.",
            success_count.clone(),
        );
        registry.register(
            "citadel_server_authentication_failure_count",
            "The number of authentication failures.",
            authentication_failures.clone(),
        );
        registry.register(
            "citadel_server_csr_parsing_err_count",
            "The number of errors occurred when parsing the CSR.",
            csr_parsing_errors.clone(),
        );
        registry.register(
            "citadel_server_id_extraction_err_count",
            "The number of errors occurred when extracting the ID from CSR.",
            id_extraction_errors.clone(),
        );
        registry.register(
            "citadel_server_csr_sign_err_count",
            "The number of errors occurred when signing the CSR.",
            sign_errors.clone(),
        );
        registry.register(
            "citadel_server_root_cert_expiry_seconds",
            "Seconds until the earliest root certificate expires; negative once it has.",
            root_expiry.clone(),
        );
        registry.register(
            "citadel_server_root_cert_expiry_timestamp",
            "The unix timestamp, in seconds, when the earliest root certificate expires.",
            root_expiry_timestamp.clone(),
        );
        registry.register(
            "citadel_server_cert_chain_expiry_seconds",
            "Seconds until the signing certificate expires; negative once it has.",
            chain_expiry.clone(),
        );
        registry.register(
            "citadel_server_cert_chain_expiry_timestamp",
            "The unix timestamp, in seconds, when the signing certificate expires.",
            chain_expiry_timestamp.clone(),
        );
        registry.register(
            "meshid_ca_issuance_duration_seconds",
            "Time to answer a CreateCertificate call, from receipt to response.",
            latency.clone(),
        );
        let jwt_svids =
            Family::<ErrorLabels, prometheus_client::metrics::counter::Counter>::default();
        registry.register(
            "meshid_ca_jwt_svids",
            "JWT-SVID requests by result: issued, or the refusal's error label.",
            jwt_svids.clone(),
        );
        Metrics {
            jwt_svids,
            registry,
            csr_count,
            success_count,
            authentication_failures,
            csr_parsing_errors,
            id_extraction_errors,
            sign_errors,
            root_expiry,
            root_expiry_timestamp,
            chain_expiry,
            chain_expiry_timestamp,
            latency,
        }
    }

    /// Counts a refused request where istiod counts it: authentication
    /// failures apart, CSR problems as parsing or ID-extraction errors, and
    /// every failure past authentication under its istiod error type.
    pub fn refused(&self, error: &Error) {
        match error {
            Error::Authentication { .. } | Error::Impersonation { .. } => {
                self.authentication_failures.inc()
            }
            Error::Csr(_) => self.csr_parsing_errors.inc(),
            Error::CsrIdentity { .. }
            | Error::CsrUriSans { .. }
            | Error::CsrTrustDomain { .. }
            | Error::CsrUri { .. } => self.id_extraction_errors.inc(),
            _ => {}
        }
        if let Some(label) = error.sign_error_type() {
            self.sign_errors
                .get_or_create(&vec![("error", label)])
                .inc();
        }
    }

    /// Counts a JWT-SVID request by result.
    pub fn jwt_svid(&self, result: &'static str) {
        self.jwt_svids
            .get_or_create(&vec![("result", result)])
            .inc();
    }

    pub fn observe_latency(&self, elapsed: Duration) {
        self.latency.observe(elapsed.as_secs_f64());
    }

    /// The text page, with gauges brought up to date from `signer`.
    pub fn render(&self, signer: &dyn CertSigner) -> String {
        let roots = signer.roots();
        let earliest = roots.earliest_root_expiry();
        let until = |t: SystemTime| match t.duration_since(SystemTime::now()) {
            Ok(d) => d.as_secs_f64(),
            Err(e) => -e.duration().as_secs_f64(),
        };
        self.root_expiry.set(until(earliest));
        self.root_expiry_timestamp
            .set(meshid_common::cert::unix_secs(earliest) as f64);
        self.chain_expiry.set(until(roots.signing_not_after));
        self.chain_expiry_timestamp
            .set(meshid_common::cert::unix_secs(roots.signing_not_after) as f64);
        let mut out = String::new();
        if prometheus_client::encoding::text::encode_registry(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// promtool's only remarks are on istiod's own names (its counters
    /// have no `_total`, `citadel_server_csr_count` ends in `_count`).
    #[test]
    fn promtool_accepts_the_exposition_but_istiods_names() {
        let m = Metrics::new();
        m.csr_count.inc();
        m.refused(&Error::TtlTooLong {
            requested_secs: 1,
            max_secs: 0,
        });
        m.observe_latency(Duration::from_millis(3));
        let mut out = String::new();
        prometheus_client::encoding::text::encode_registry(&mut out, &m.registry).unwrap();
        meshid_common::testing::promtool::assert_clean_except(
            &out,
            &[
                "citadel_server_csr_count",
                "citadel_server_success_cert_issuance_count",
                "citadel_server_authentication_failure_count",
                "citadel_server_csr_parsing_err_count",
                "citadel_server_id_extraction_err_count",
                "citadel_server_csr_sign_err_count",
            ],
        );
    }

    #[test]
    fn istiod_names_without_suffix() {
        let m = Metrics::new();
        m.csr_count.inc();
        m.refused(&Error::TtlTooLong {
            requested_secs: 1,
            max_secs: 0,
        });
        m.observe_latency(Duration::from_millis(3));
        let mut out = String::new();
        prometheus_client::encoding::text::encode_registry(&mut out, &m.registry).unwrap();
        assert!(out.contains("\ncitadel_server_csr_count 1\n"), "{out}");
        assert!(
            out.contains("citadel_server_csr_sign_err_count{error=\"TTL_ERROR\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("meshid_ca_issuance_duration_seconds_bucket"),
            "{out}"
        );
        assert!(!out.contains("_total"), "{out}");
    }
}
