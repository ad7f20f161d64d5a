//! Prometheus metrics of the proxy, served on the admin `/metrics`.

use std::time::SystemTime;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnLabels {
    direction: &'static str,
    mode: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    direction: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    direction: &'static str,
    /// `received` from the downstream peer or `sent` to it.
    flow: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SdsLabels {
    resource_name: &'static str,
    /// `ack` or `nack`.
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResourceLabels {
    resource_name: &'static str,
}

/// Every metric the proxy keeps, and the registry that encodes them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    connections: Family<ConnLabels, Counter>,
    handshake_failures: Family<FailureLabels, Counter>,
    active: Family<DirectionLabels, Gauge>,
    bytes: Family<BytesLabels, Counter>,
    sds_responses: Family<SdsLabels, Counter>,
    policy_reloads: Family<ResultLabels, Counter>,
    cert_expiry: Family<ResourceLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let connections = Family::<ConnLabels, Counter>::default();
        registry.register(
            "meshid_shim_connections",
            "Connections handled, by direction, mode and result",
            connections.clone(),
        );
        let handshake_failures = Family::<FailureLabels, Counter>::default();
        registry.register(
            "meshid_shim_handshake_failures",
            "TLS handshakes that failed, by direction and reason",
            handshake_failures.clone(),
        );
        let active = Family::<DirectionLabels, Gauge>::default();
        registry.register(
            "meshid_shim_active_connections",
            "Connections open now",
            active.clone(),
        );
        let bytes = Family::<BytesLabels, Counter>::default();
        registry.register(
            "meshid_shim_bytes",
            "Bytes proxied, by direction and flow relative to the downstream peer",
            bytes.clone(),
        );
        let sds_responses = Family::<SdsLabels, Counter>::default();
        registry.register(
            "meshid_shim_sds_responses",
            "SDS responses ACKed or NACKed, by secret",
            sds_responses.clone(),
        );
        let policy_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "meshid_shim_policy_reloads",
            "Policy file reloads, by result",
            policy_reloads.clone(),
        );
        let cert_expiry = Family::<ResourceLabels, Gauge>::default();
        registry.register(
            "cert_expiry_seconds",
            "Seconds until the certificate of the secret expires",
            cert_expiry.clone(),
        );
        Metrics {
            registry,
            connections,
            handshake_failures,
            active,
            bytes,
            sds_responses,
            policy_reloads,
            cert_expiry,
        }
    }

    pub(crate) fn connection(
        &self,
        direction: &'static str,
        mode: &'static str,
        result: &'static str,
    ) {
        self.connections
            .get_or_create(&ConnLabels {
                direction,
                mode,
                result,
            })
            .inc();
    }

    pub(crate) fn handshake_failure(&self, direction: &'static str, reason: &'static str) {
        self.handshake_failures
            .get_or_create(&FailureLabels { direction, reason })
            .inc();
    }

    pub(crate) fn active(&self, direction: &'static str) -> Gauge {
        self.active
            .get_or_create(&DirectionLabels { direction })
            .clone()
    }

    pub(crate) fn bytes(&self, direction: &'static str, received: u64, sent: u64) {
        self.bytes
            .get_or_create(&BytesLabels {
                direction,
                flow: "received",
            })
            .inc_by(received);
        self.bytes
            .get_or_create(&BytesLabels {
                direction,
                flow: "sent",
            })
            .inc_by(sent);
    }

    pub(crate) fn sds_response(&self, resource_name: &'static str, ack: bool) {
        self.sds_responses
            .get_or_create(&SdsLabels {
                resource_name,
                result: if ack { "ack" } else { "nack" },
            })
            .inc();
    }

    pub(crate) fn policy_reload(&self, ok: bool) {
        self.policy_reloads
            .get_or_create(&ResultLabels {
                result: if ok { "ok" } else { "error" },
            })
            .inc();
    }

    pub(crate) fn set_cert_expiry(&self, resource_name: &'static str, not_after: SystemTime) {
        let secs = not_after
            .duration_since(SystemTime::now())
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        self.cert_expiry
            .get_or_create(&ResourceLabels { resource_name })
            .set(secs);
    }

    /// Every metric in the classic Prometheus text format (as promtool
    /// and Prometheus read it).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        meshid_common::serve::prometheus_text(&out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every metric with help text and a type promtool accepts.
    #[test]
    fn promtool_accepts_the_exposition() {
        let m = Metrics::new();
        m.handshake_failure("inbound", "no_client_cert");
        m.bytes("inbound", 10, 20);
        m.sds_response("default", true);
        m.policy_reload(true);
        m.set_cert_expiry("default", SystemTime::now());
        let _active = m.active("inbound");
        let text = m.encode();
        assert!(text.contains("meshid_shim_bytes_total"), "{text}");
        meshid_common::testing::promtool::assert_clean_except(&text, &[]);
    }
}
