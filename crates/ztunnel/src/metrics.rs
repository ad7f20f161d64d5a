//! The ztunnel's Prometheus metrics. Names follow Istio where it has them:
//! ztunnel's `istio_tcp_connections_opened/closed_total`,
//! `istio_tcp_sent/received_bytes_total` (with ztunnel's traffic labels), pilot-agent's
//! `num_outgoing_requests` / `num_failed_outgoing_requests`
//! (`{request_type="csr"}`); the rest are ours, prefixed `ztunnel_`.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use meshid_common::SpiffeId;
use meshid_common::registry::Workload;

use crate::directory::WorkloadInfo;

/// Which side of the connection counted it: istio/ztunnel's `reporter`
/// label. The source ztunnel (outbound) reports `source`, the destination
/// ztunnel (inbound) reports `destination`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Reporter {
    Source,
    Destination,
}

impl EncodeLabelValue for Reporter {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        })
    }
}

/// istio/ztunnel's `connection_security_policy`: `mutual_tls` for HBONE,
/// `unknown` for a plaintext connection.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum SecurityPolicy {
    MutualTls,
    Unknown,
}

impl EncodeLabelValue for SecurityPolicy {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(match self {
            SecurityPolicy::MutualTls => "mutual_tls",
            SecurityPolicy::Unknown => "unknown",
        })
    }
}

/// What istio/ztunnel writes for a label it has no value for.
pub const UNKNOWN: &str = "unknown";

/// The label set istio/ztunnel puts on its TCP metrics
/// (`CommonTrafficLabels`, without the optional locality labels), in its
/// order. Workloads are named by their owner (bounded cardinality: never a
/// pod name with its random suffix, never an address or a port); what we do
/// not know (services, clusters) is `unknown`, as ztunnel writes it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrafficLabels {
    pub reporter: Reporter,
    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
    pub destination_service: String,
    pub destination_service_namespace: String,
    pub destination_service_name: String,
    pub destination_workload: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_cluster: String,
    /// Always `tcp`: the ztunnel does not parse the application protocol.
    pub request_protocol: String,
    /// `-` when nothing went wrong, as ztunnel.
    pub response_flags: String,
    pub connection_security_policy: SecurityPolicy,
}

/// One side of a connection as the labels describe it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Peer<'a> {
    /// The workload, when the directory knows it.
    pub workload: Option<&'a Workload>,
    /// The SPIFFE ID proven by mTLS (or, for the destination, the one the
    /// workload runs as); `None` for a plaintext source.
    pub principal: Option<&'a SpiffeId>,
}

impl<'a> Peer<'a> {
    pub fn of(info: &'a WorkloadInfo) -> Self {
        Peer {
            workload: Some(&info.workload),
            principal: Some(&info.identity),
        }
    }
}

struct Side {
    workload: String,
    canonical_service: String,
    canonical_revision: String,
    namespace: String,
    principal: String,
}

impl Side {
    fn from(peer: Peer<'_>) -> Side {
        let unknown = || UNKNOWN.to_owned();
        let workload = peer.workload.map(|w| workload_name(&w.name).to_owned());
        let namespace = peer.workload.map(|w| w.namespace.clone()).or_else(|| {
            peer.principal
                .and_then(|p| p.namespace())
                .map(str::to_owned)
        });
        Side {
            canonical_service: workload.clone().unwrap_or_else(unknown),
            // Istio's canonical revision when a pod has no version label.
            canonical_revision: if workload.is_some() {
                "latest".to_owned()
            } else {
                unknown()
            },
            workload: workload.unwrap_or_else(unknown),
            namespace: namespace.unwrap_or_else(unknown),
            principal: peer
                .principal
                .map(|p| p.as_str().to_owned())
                .unwrap_or_else(unknown),
        }
    }
}

impl TrafficLabels {
    pub fn new(
        reporter: Reporter,
        source: Peer<'_>,
        destination: Peer<'_>,
        security: SecurityPolicy,
    ) -> Self {
        let src = Side::from(source);
        let dst = Side::from(destination);
        let unknown = || UNKNOWN.to_owned();
        TrafficLabels {
            reporter,
            source_app: src.canonical_service.clone(),
            source_version: src.canonical_revision.clone(),
            source_workload: src.workload,
            source_canonical_service: src.canonical_service,
            source_canonical_revision: src.canonical_revision,
            source_workload_namespace: src.namespace,
            source_principal: src.principal,
            source_cluster: unknown(),
            destination_service: unknown(),
            destination_service_namespace: unknown(),
            destination_service_name: unknown(),
            destination_app: dst.canonical_service.clone(),
            destination_version: dst.canonical_revision.clone(),
            destination_workload: dst.workload,
            destination_canonical_service: dst.canonical_service,
            destination_canonical_revision: dst.canonical_revision,
            destination_workload_namespace: dst.namespace,
            destination_principal: dst.principal,
            destination_cluster: unknown(),
            request_protocol: "tcp".to_owned(),
            response_flags: "-".to_owned(),
            connection_security_policy: security,
        }
    }
}

/// The workload a pod belongs to, as Istio names it for a Deployment's pod:
/// `<deployment>-<replicaset hash>-<5 characters>` → `<deployment>`. Other
/// names are kept whole (the registry carries no owner references).
pub fn workload_name(pod: &str) -> &str {
    let is_token = |s: &str, min: usize, max: usize| {
        (min..=max).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    };
    let mut parts = pod.rsplitn(3, '-');
    let (Some(suffix), Some(hash), Some(base)) = (parts.next(), parts.next(), parts.next()) else {
        return pod;
    };
    if is_token(suffix, 5, 5) && is_token(hash, 5, 10) && !base.is_empty() {
        base
    } else {
        pod
    }
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
    pub connections_opened: Family<TrafficLabels, Counter>,
    pub connections_closed: Family<TrafficLabels, Counter>,
    pub bytes_sent: Family<TrafficLabels, Counter>,
    pub bytes_received: Family<TrafficLabels, Counter>,
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
            "TCP connections opened, per source and destination workload",
            m.connections_opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed, per source and destination workload",
            m.connections_closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes the destination sent back to the source (the response side), as Istio counts istio_tcp_sent_bytes",
            m.bytes_sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes the source sent to the destination (the request side), as Istio counts istio_tcp_received_bytes",
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

    /// Counts a proxied connection as opened.
    pub fn connection_opened(&self, labels: &TrafficLabels) {
        self.connections_opened.get_or_create(labels).inc();
    }

    /// Counts a proxied connection as closed, with the bytes the source sent
    /// (`request_bytes`, Istio's received bytes) and the bytes that went back
    /// to it (`response_bytes`, Istio's sent bytes).
    pub fn connection_closed(
        &self,
        labels: &TrafficLabels,
        request_bytes: u64,
        response_bytes: u64,
    ) {
        self.connections_closed.get_or_create(labels).inc();
        self.bytes_received
            .get_or_create(labels)
            .inc_by(request_bytes);
        self.bytes_sent.get_or_create(labels).inc_by(response_bytes);
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

    fn info(name: &str, ns: &str, sa: &str) -> WorkloadInfo {
        WorkloadInfo {
            workload: Workload {
                name: name.into(),
                namespace: ns.into(),
                service_account: sa.into(),
                node: "node-a".into(),
                uid: "uid".into(),
                address: Some("10.0.0.1".into()),
                mode: None,
            },
            identity: SpiffeId::for_service_account("cluster.local", ns, sa).unwrap(),
            ambient: true,
        }
    }

    fn sample() -> Metrics {
        let m = Metrics::new();
        let client = info("sleep-7b9c8f6d5-x2k4q", "default", "sleep");
        let server = info("httpbin-0", "web", "httpbin");
        let labels = TrafficLabels::new(
            Reporter::Source,
            Peer::of(&client),
            Peer::of(&server),
            SecurityPolicy::MutualTls,
        );
        m.connection_opened(&labels);
        m.connection_closed(&labels, 5, 7);
        let plaintext = TrafficLabels::new(
            Reporter::Destination,
            Peer::default(),
            Peer::of(&server),
            SecurityPolicy::Unknown,
        );
        m.connection_opened(&plaintext);
        m.outgoing_requests.get_or_create(&m.csr()).inc();
        m.workload_certs
            .get_or_create(&Metrics::state("available"))
            .set(3);
        m
    }

    /// Every metric with help text and a type promtool accepts.
    #[test]
    fn promtool_accepts_the_exposition() {
        meshid_common::testing::promtool::assert_clean_except(&sample().render(), &[]);
    }

    #[test]
    fn names_render_as_istio_spells_them() {
        let text = sample().render();
        let source = concat!(
            "{reporter=\"source\",",
            "source_workload=\"sleep\",source_canonical_service=\"sleep\",",
            "source_canonical_revision=\"latest\",source_workload_namespace=\"default\",",
            "source_principal=\"spiffe://cluster.local/ns/default/sa/sleep\",",
            "source_app=\"sleep\",source_version=\"latest\",source_cluster=\"unknown\",",
            "destination_service=\"unknown\",destination_service_namespace=\"unknown\",",
            "destination_service_name=\"unknown\",",
            "destination_workload=\"httpbin-0\",destination_canonical_service=\"httpbin-0\",",
            "destination_canonical_revision=\"latest\",destination_workload_namespace=\"web\",",
            "destination_principal=\"spiffe://cluster.local/ns/web/sa/httpbin\",",
            "destination_app=\"httpbin-0\",destination_version=\"latest\",",
            "destination_cluster=\"unknown\",",
            "request_protocol=\"tcp\",response_flags=\"-\",",
            "connection_security_policy=\"mutual_tls\"}"
        );
        for line in [
            format!("istio_tcp_connections_opened_total{source} 1"),
            format!("istio_tcp_connections_closed_total{source} 1"),
            format!("istio_tcp_received_bytes_total{source} 5"),
            format!("istio_tcp_sent_bytes_total{source} 7"),
        ] {
            assert!(text.contains(&line), "{line} missing in\n{text}");
        }
        assert!(
            text.contains(concat!(
                "istio_tcp_connections_opened_total{reporter=\"destination\",",
                "source_workload=\"unknown\",source_canonical_service=\"unknown\",",
                "source_canonical_revision=\"unknown\",source_workload_namespace=\"unknown\",",
                "source_principal=\"unknown\","
            )),
            "{text}"
        );
        assert!(
            text.contains("connection_security_policy=\"unknown\"} 1"),
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

    #[test]
    fn workloads_are_named_by_their_deployment_not_their_pod() {
        assert_eq!(workload_name("sleep-7b9c8f6d5-x2k4q"), "sleep");
        assert_eq!(workload_name("my-app-v1-5d8f7c9b4d-abcde"), "my-app-v1");
        // Not a Deployment's pod: kept whole.
        assert_eq!(workload_name("httpbin-0"), "httpbin-0");
        assert_eq!(workload_name("client"), "client");
        assert_eq!(workload_name("a-b"), "a-b");
        assert_eq!(workload_name("-abcdef-abcde"), "-abcdef-abcde");
        assert_eq!(workload_name("web-ABCDEF-abcde"), "web-ABCDEF-abcde");
    }
}
