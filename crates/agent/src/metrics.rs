//! The agent's Prometheus metrics, with pilot-agent's names where it has
//! them: `cert_expiry_seconds{resource_name}`, `num_outgoing_requests`,
//! `num_failed_outgoing_requests` (both `{request_type="csr"}`), plus SDS and
//! Workload API stream and push counts.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabels {
    pub resource_name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub request_type: String,
}

/// Every metric the agent exports, registered once.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Seconds until the certificate behind each SDS resource expires
    /// (negative once expired). Updated at every scrape.
    pub cert_expiry_seconds: Family<ResourceLabels, Gauge<f64, AtomicU64>>,
    pub outgoing_requests: Family<RequestLabels, Counter>,
    pub failed_outgoing_requests: Family<RequestLabels, Counter>,
    /// Certificates accepted from the CA (first one included).
    pub certs_issued: Counter,
    /// SDS responses sent, per resource.
    pub sds_pushes: Family<ResourceLabels, Counter>,
    pub sds_nacks: Family<ResourceLabels, Counter>,
    pub sds_connected_streams: Gauge,
    pub workload_api_streams: Gauge,
    pub workload_api_pushes: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            cert_expiry_seconds: Family::default(),
            outgoing_requests: Family::default(),
            failed_outgoing_requests: Family::default(),
            certs_issued: Counter::default(),
            sds_pushes: Family::default(),
            sds_nacks: Family::default(),
            sds_connected_streams: Gauge::default(),
            workload_api_streams: Gauge::default(),
            workload_api_pushes: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "cert_expiry_seconds",
            "Seconds until the certificate of each SDS resource expires (negative once expired)",
            m.cert_expiry_seconds.clone(),
        );
        registry.register(
            "num_outgoing_requests",
            "Requests sent to the CA",
            m.outgoing_requests.clone(),
        );
        registry.register(
            "num_failed_outgoing_requests",
            "Requests to the CA that failed or whose answer was refused",
            m.failed_outgoing_requests.clone(),
        );
        registry.register(
            "meshid_agent_certs_issued",
            "Workload certificates accepted from the CA",
            m.certs_issued.clone(),
        );
        registry.register(
            "meshid_agent_sds_pushes",
            "SDS responses sent, per resource",
            m.sds_pushes.clone(),
        );
        registry.register(
            "meshid_agent_sds_nacks",
            "SDS responses rejected by the client, per resource",
            m.sds_nacks.clone(),
        );
        registry.register(
            "meshid_agent_sds_connected_streams",
            "Open SDS StreamSecrets streams",
            m.sds_connected_streams.clone(),
        );
        registry.register(
            "meshid_agent_workload_api_streams",
            "Open SPIFFE Workload API streams",
            m.workload_api_streams.clone(),
        );
        registry.register(
            "meshid_agent_workload_api_pushes",
            "SPIFFE Workload API messages sent",
            m.workload_api_pushes.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn resource(name: &str) -> ResourceLabels {
        ResourceLabels {
            resource_name: name.to_owned(),
        }
    }

    /// Every metric in the classic Prometheus text format (what
    /// pilot-agent serves, and what promtool checks).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        meshid_common::serve::prometheus_text(&out)
    }
}

fn csr_label() -> RequestLabels {
    RequestLabels {
        request_type: "csr".into(),
    }
}

/// The renewal engine reports its CSRs here, under pilot-agent's names.
impl meshid_common::identity::RenewalEvents for Metrics {
    fn csr_sent(&self) {
        self.outgoing_requests.get_or_create(&csr_label()).inc();
    }

    fn csr_failed(&self) {
        self.failed_outgoing_requests
            .get_or_create(&csr_label())
            .inc();
    }

    fn issued(&self) {
        self.certs_issued.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every metric with help text and a type promtool accepts.
    #[test]
    fn promtool_accepts_the_exposition() {
        use meshid_common::identity::RenewalEvents;
        let m = Metrics::new();
        m.csr_sent();
        m.csr_failed();
        m.cert_expiry_seconds
            .get_or_create(&Metrics::resource("default"))
            .set(12.5);
        meshid_common::testing::promtool::assert_clean_except(&m.encode(), &[]);
    }

    #[test]
    fn istio_names_appear_in_the_text() {
        use meshid_common::identity::RenewalEvents;
        let m = Metrics::new();
        m.csr_sent();
        m.csr_failed();
        m.cert_expiry_seconds
            .get_or_create(&Metrics::resource("default"))
            .set(12.5);
        m.sds_connected_streams.inc();
        let text = m.encode();
        for needle in [
            "num_outgoing_requests_total{request_type=\"csr\"} 1",
            "num_failed_outgoing_requests_total{request_type=\"csr\"} 1",
            "cert_expiry_seconds{resource_name=\"default\"} 12.5",
            "meshid_agent_sds_connected_streams 1",
        ] {
            assert!(text.contains(needle), "{needle} missing in\n{text}");
        }
    }
}
