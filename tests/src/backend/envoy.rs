//! The Envoy bootstrap of a sidecar pod with a real Envoy, on every backend.

use std::net::SocketAddr;
use std::path::Path;

use meshid_common::SpiffeId;

use crate::spec::PodSpec;

/// One Envoy pod's addresses.
pub(crate) struct EnvoyPod<'a> {
    pub(crate) pod: &'a PodSpec,
    pub(crate) trust_domain: &'a str,
    pub(crate) admin: SocketAddr,
    pub(crate) inbound: SocketAddr,
    pub(crate) app: SocketAddr,
    pub(crate) sds_socket: &'a Path,
    /// (listen, destination, expected server identity)
    pub(crate) outbound: Option<(SocketAddr, SocketAddr, &'a SpiffeId)>,
}

/// An Envoy bootstrap as Istio's sidecar has it for this pod: certificates
/// only over SDS from the agent's socket (`default`, `ROOTCA`), an inbound
/// listener requiring a client certificate of the trust domain in front of
/// the app, and an outbound listener doing mTLS to the previous pod with an
/// exact SAN check (secure naming).
pub(crate) fn envoy_bootstrap(e: &EnvoyPod<'_>) -> String {
    let sds = |name: &str| {
        format!(
            "{{name: {name}, sds_config: {{resource_api_version: V3, api_config_source: {{api_type: GRPC, transport_api_version: V3, grpc_services: [{{envoy_grpc: {{cluster_name: sds-grpc}}}}]}}}}}}"
        )
    };
    let tls_context = |san: &str, indent: &str| {
        format!(
            "{indent}common_tls_context:\n\
             {indent}  tls_certificate_sds_secret_configs: [{default}]\n\
             {indent}  combined_validation_context:\n\
             {indent}    default_validation_context: {{match_typed_subject_alt_names: [{{san_type: URI, matcher: {san}}}]}}\n\
             {indent}    validation_context_sds_secret_config: {rootca}\n",
            default = sds("default"),
            rootca = sds("ROOTCA"),
        )
    };
    let socket = |a: SocketAddr| {
        format!(
            "{{socket_address: {{address: \"{}\", port_value: {}}}}}",
            a.ip(),
            a.port()
        )
    };
    let endpoint = |name: &str, a: SocketAddr| {
        format!(
            "{{cluster_name: {name}, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {}}}}}]}}]}}",
            socket(a)
        )
    };
    let (out_listener, out_cluster) = match e.outbound {
        Some((listen, dest, peer)) => (
            format!(
                "  - name: outbound\n    address: {}\n    filter_chains:\n    - filters:\n      - name: envoy.filters.network.tcp_proxy\n        typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: outbound, cluster: outbound}}\n",
                socket(listen)
            ),
            format!(
                "  - name: outbound\n    type: STATIC\n    connect_timeout: 2s\n    load_assignment: {}\n    transport_socket:\n      name: envoy.transport_sockets.tls\n      typed_config:\n        \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext\n{}",
                endpoint("outbound", dest),
                tls_context(&format!("{{exact: \"{peer}\"}}"), "        ")
            ),
        ),
        None => (String::new(), String::new()),
    };
    format!(
        "node:\n  id: \"sidecar~127.0.0.1~{name}.{ns}~{ns}.svc.cluster.local\"\n  cluster: \"{name}.{ns}\"\n\
         admin:\n  address: {admin}\n\
         static_resources:\n  listeners:\n\
         \x20 - name: inbound\n    address: {inbound}\n    filter_chains:\n    - transport_socket:\n        name: envoy.transport_sockets.tls\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext\n          require_client_certificate: true\n{inbound_tls}      filters:\n      - name: envoy.filters.network.tcp_proxy\n        typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: inbound, cluster: app}}\n\
         {out_listener}\
         \x20 clusters:\n\
         \x20 - name: sds-grpc\n    type: STATIC\n    connect_timeout: 1s\n    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        explicit_http_config: {{http2_protocol_options: {{}}}}\n    load_assignment: {{cluster_name: sds-grpc, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{pipe: {{path: \"{sds}\"}}}}}}}}]}}]}}\n\
         \x20 - name: app\n    type: STATIC\n    connect_timeout: 2s\n    load_assignment: {app}\n\
         {out_cluster}",
        name = e.pod.name,
        ns = e.pod.namespace,
        admin = socket(e.admin),
        inbound = socket(e.inbound),
        inbound_tls = tls_context(
            &format!("{{prefix: \"spiffe://{}/\"}}", e.trust_domain),
            "          "
        ),
        sds = e.sds_socket.display(),
        app = endpoint("app", e.app),
    )
}
