//! The ztunnel's Prometheus metrics. Names follow Istio where it has them:
//! ztunnel's `istio_tcp_connections_opened/closed_total`,
//! `istio_tcp_sent/received_bytes_total` (per direction), pilot-agent's
//! `num_outgoing_requests` / `num_failed_outgoing_requests`
//! (`{request_type="csr"}`); the rest are ours, prefixed `ztunnel_`.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl EncodeLabelValue for Direction {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: Direction,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub request_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    pub code: String,
}

/// Every metric the ztunnel exports, registered once.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub connections_opened: Family<DirectionLabels, Counter>,
    pub connections_closed: Family<DirectionLabels, Counter>,
    pub bytes_sent: Family<DirectionLabels, Counter>,
    pub bytes_received: Family<DirectionLabels, Counter>,
    pub outgoing_requests: Family<RequestLabels, Counter>,
    pub failed_outgoing_requests: Family<RequestLabels, Counter>,
    /// Workload certificates per state (initializing / available / unavailable).
    pub workload_certs: Family<StateLabels, Gauge>,
    /// Answers of the HBONE server, by HTTP status.
    pub hbone_responses: Family<CodeLabels, Counter>,
    /// mTLS connections opened to peer ztunnels (the pool's misses).
    pub hbone_pool_connections: Counter,
    /// Outbound connections that could not be tunnelled.
    pub outbound_failures: Counter,
    /// TLS handshakes refused on the HBONE port, by reason
    /// ([`crate::error::Error::handshake_failure_reason`]).
    pub hbone_handshake_failures: Family<ReasonLabels, Counter>,
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
            registry: Registry::default(),
            connections_opened: Family::default(),
            connections_closed: Family::default(),
            bytes_sent: Family::default(),
            bytes_received: Family::default(),
            outgoing_requests: Family::default(),
            failed_outgoing_requests: Family::default(),
            workload_certs: Family::default(),
            hbone_responses: Family::default(),
            hbone_pool_connections: Counter::default(),
            outbound_failures: Counter::default(),
            hbone_handshake_failures: Family::default(),
        };
        registry.register(
            "istio_tcp_connections_opened",
            "Proxied TCP connections opened",
            m.connections_opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "Proxied TCP connections closed",
            m.connections_closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent towards the destination",
            m.bytes_sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from the destination",
            m.bytes_received.clone(),
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
            "ztunnel_workload_certs",
            "Workload certificates by state",
            m.workload_certs.clone(),
        );
        registry.register(
            "ztunnel_hbone_responses",
            "Answers of the HBONE server by HTTP status",
            m.hbone_responses.clone(),
        );
        registry.register(
            "ztunnel_hbone_pool_connections",
            "mTLS connections opened to peer ztunnels",
            m.hbone_pool_connections.clone(),
        );
        registry.register(
            "ztunnel_outbound_failures",
            "Outbound connections that could not be tunnelled",
            m.outbound_failures.clone(),
        );
        registry.register(
            "ztunnel_hbone_handshake_failures",
            "TLS handshakes refused on the HBONE port, by reason",
            m.hbone_handshake_failures.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn csr(&self) -> RequestLabels {
        RequestLabels {
            request_type: "csr".into(),
        }
    }

    /// HBONE handshakes refused for `reason`.
    pub fn hbone_handshake_failures_for(&self, reason: &str) -> u64 {
        self.hbone_handshake_failures
            .get(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .map_or(0, |c| c.get())
    }

    /// HBONE handshakes refused, whatever the reason.
    pub fn hbone_handshake_failures_total(&self) -> u64 {
        crate::error::HANDSHAKE_FAILURE_REASONS
            .iter()
            .map(|r| self.hbone_handshake_failures_for(r))
            .sum()
    }

    pub fn dir(direction: Direction) -> DirectionLabels {
        DirectionLabels { direction }
    }

    pub fn state(state: &str) -> StateLabels {
        StateLabels {
            state: state.to_owned(),
        }
    }

    /// The Prometheus text exposition (classic format, as promtool and
    /// Prometheus read it; the series keep ztunnel's `_total` names).
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        meshid_common::serve::prometheus_text(&out)
    }
}

/// The renewal engine reports each workload's CSRs and state changes here.
impl meshid_common::identity::RenewalEvents for Metrics {
    fn csr_sent(&self) {
        self.outgoing_requests.get_or_create(&self.csr()).inc();
    }

    fn csr_failed(&self) {
        self.failed_outgoing_requests
            .get_or_create(&self.csr())
            .inc();
    }

    fn state_changed(
        &self,
        from: Option<meshid_common::identity::CertState>,
        to: Option<meshid_common::identity::CertState>,
    ) {
        if let Some(f) = from {
            self.workload_certs
                .get_or_create(&Metrics::state(f.as_str()))
                .dec();
        }
        if let Some(t) = to {
            self.workload_certs
                .get_or_create(&Metrics::state(t.as_str()))
                .inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every metric with help text and a type promtool accepts.
    #[test]
    fn promtool_accepts_the_exposition() {
        let m = Metrics::new();
        m.connections_opened
            .get_or_create(&Metrics::dir(Direction::Inbound))
            .inc();
        m.outgoing_requests.get_or_create(&m.csr()).inc();
        m.workload_certs
            .get_or_create(&Metrics::state("available"))
            .set(3);
        meshid_common::testing::promtool::assert_clean_except(&m.render(), &[]);
    }

    #[test]
    fn names_render_as_istio_spells_them() {
        let m = Metrics::new();
        m.connections_opened
            .get_or_create(&Metrics::dir(Direction::Inbound))
            .inc();
        m.outgoing_requests.get_or_create(&m.csr()).inc();
        m.workload_certs
            .get_or_create(&Metrics::state("available"))
            .set(3);
        let text = m.render();
        assert!(
            text.contains("istio_tcp_connections_opened_total{direction=\"inbound\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("num_outgoing_requests_total{request_type=\"csr\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("ztunnel_workload_certs{state=\"available\"} 3"),
            "{text}"
        );
    }
}
