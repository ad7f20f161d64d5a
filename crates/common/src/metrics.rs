//! Metric types the components share beyond prometheus-client's own.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// A monotonic counter exported under its exact name, without the `_total`
/// suffix, as istiod and pilot-agent export theirs (dashboards query
/// `citadel_server_csr_count`, `istio_agent_num_outgoing_requests`).
#[derive(Clone, Debug, Default)]
pub struct IstioCounter(Arc<AtomicU64>);

impl IstioCounter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl TypedMetric for IstioCounter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for IstioCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        // A plain sample: the name stays as registered.
        encoder.encode_gauge(&self.get())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
}
