//! The agent's Prometheus metrics. What pilot-agent also counts carries the
//! name pilot-agent's series have on its merged `/stats/prometheus` page,
//! which Istio's dashboards and alerts query:
//! `istio_agent_cert_expiry_seconds{resource_name}`,
//! `istio_agent_num_outgoing_requests{request_type="csr"}` and
//! `istio_agent_num_failed_outgoing_requests{request_type="csr"}` (Istio
//! exports its counters without the `_total` suffix). The SDS and Workload
//! API stream and push counts are ours, prefixed `meshid_agent_`.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

pub use meshid_common::metrics::IstioCounter;

/// pilot-agent's counters, which promtool remarks on only for their
/// missing `_total`.
pub const ISTIO_COUNTERS: [&str; 2] = [
    "istio_agent_num_outgoing_requests",
    "istio_agent_num_failed_outgoing_requests",
];

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
    /// pilot-agent's names, encoded as they are (no `_total` rewriting).
    istio: Registry,
    /// Seconds until the certificate behind each SDS resource expires
    /// (negative once expired). Updated at every scrape.
    pub cert_expiry_seconds: Family<ResourceLabels, Gauge<f64, AtomicU64>>,
    pub outgoing_requests: Family<RequestLabels, IstioCounter>,
    pub failed_outgoing_requests: Family<RequestLabels, IstioCounter>,
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
        let mut istio = Registry::default();
        let m = Metrics {
            istio: Registry::default(),
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
        istio.register(
            "istio_agent_cert_expiry_seconds",
            "Seconds left before the certificate behind each SDS resource expires; negative once it has",
            m.cert_expiry_seconds.clone(),
        );
        istio.register(
            ISTIO_COUNTERS[0],
            "Requests the agent sent to the CA, by request type",
            m.outgoing_requests.clone(),
        );
        istio.register(
            ISTIO_COUNTERS[1],
            "Requests to the CA that failed or whose answer was refused, by request type",
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
        Metrics {
            registry,
            istio,
            ..m
        }
    }

    pub fn resource(name: &str) -> ResourceLabels {
        ResourceLabels {
            resource_name: name.to_owned(),
        }
    }

    /// Every metric in the classic Prometheus text format (what
    /// pilot-agent serves, and what promtool checks).
    pub fn encode(&self) -> String {
        let mut ours = String::new();
        let mut istio = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut ours, &self.registry);
        let _ = prometheus_client::encoding::text::encode_registry(&mut istio, &self.istio);
        istio + &meshid_common::serve::prometheus_text(&ours)
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

    fn sample() -> Metrics {
        use meshid_common::identity::RenewalEvents;
        let m = Metrics::new();
        m.csr_sent();
        m.csr_failed();
        m.cert_expiry_seconds
            .get_or_create(&Metrics::resource("default"))
            .set(12.5);
        m.sds_connected_streams.inc();
        m.sds_pushes
            .get_or_create(&Metrics::resource("default"))
            .inc();
        m
    }

    /// Every metric with help text and a type promtool accepts; its only
    /// remark is pilot-agent's counters' missing `_total`.
    #[test]
    fn promtool_accepts_the_exposition_but_pilot_agents_names() {
        meshid_common::testing::promtool::assert_clean_except(&sample().encode(), &ISTIO_COUNTERS);
    }

    /// The names pilot-agent's series have on its merged
    /// `:15020/stats/prometheus`, which Istio's dashboards query.
    #[test]
    fn pilot_agent_names_appear_in_the_text() {
        let text = sample().encode();
        for needle in [
            "\nistio_agent_num_outgoing_requests{request_type=\"csr\"} 1\n",
            "\nistio_agent_num_failed_outgoing_requests{request_type=\"csr\"} 1\n",
            "# TYPE istio_agent_num_outgoing_requests counter\n",
            "\nistio_agent_cert_expiry_seconds{resource_name=\"default\"} 12.5\n",
            "# TYPE istio_agent_cert_expiry_seconds gauge\n",
            "\nmeshid_agent_sds_connected_streams 1\n",
            "\nmeshid_agent_sds_pushes_total{resource_name=\"default\"} 1\n",
        ] {
            assert!(text.contains(needle), "{needle:?} missing in\n{text}");
        }
        assert!(
            !text.contains("istio_agent_num_outgoing_requests_total"),
            "{text}"
        );
        assert!(!text.contains("# EOF"), "{text}");
    }
}
