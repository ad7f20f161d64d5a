//! tracing: one issuance is one trace across components, correctly nested:
//! proxy `sds.fetch` → agent (`sds.subscribe` → `agent.csr`) → CA
//! (`ca.authenticate`, `ca.sign`), every parent present in the trace.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use super::ensure;
use crate::case;
use crate::client::eventually;
use crate::otlp::Span;
use crate::report::Report;
use crate::topology::Topology;

const SUITE: &str = "tracing";

pub async fn run(mesh: &mut impl Topology, report: &mut Report) {
    case!(
        report,
        SUITE,
        "sidecar_issuance_is_one_nested_trace",
        sidecar_issuance_is_one_trace(mesh)
    );
    case!(
        report,
        SUITE,
        "ambient_issuance_is_one_nested_trace",
        ambient_issuance_is_one_trace(mesh)
    );
}

/// The trace of the first sidecar issuance, for the waterfall.
pub fn issuance_trace(spans: &[Span]) -> Option<Vec<Span>> {
    let ca_sign: Vec<&Span> = spans
        .iter()
        .filter(|s| s.service == "meshid-ca" && s.name == "ca.sign")
        .collect();
    let mut best: Option<Vec<Span>> = None;
    for sign in ca_sign {
        let trace: Vec<Span> = spans
            .iter()
            .filter(|s| s.trace_id == sign.trace_id)
            .cloned()
            .collect();
        let services: HashSet<&str> = trace.iter().map(|s| s.service.as_str()).collect();
        if services.len() >= 3 {
            let mut t = trace;
            t.sort_by_key(|s| s.start_unix_nanos);
            if best
                .as_ref()
                .is_none_or(|b| t[0].start_unix_nanos < b[0].start_unix_nanos)
            {
                best = Some(t);
            }
        }
    }
    best
}

/// Whether `child` descends from a span of `service` (walking parents inside the trace).
fn descends_from(trace: &[Span], child: &Span, service: &str) -> bool {
    let by_id: HashMap<&str, &Span> = trace.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let mut cur = by_id.get(child.parent_span_id.as_str()).copied();
    let mut hops = 0;
    while let Some(s) = cur {
        if s.service == service {
            return true;
        }
        hops += 1;
        if hops > 64 {
            return false;
        }
        cur = by_id.get(s.parent_span_id.as_str()).copied();
    }
    false
}

async fn sidecar_issuance_is_one_trace(mesh: &mut impl Topology) -> Result<(), String> {
    let store = mesh.spans();
    // Exporters batch: give them a few seconds.
    let trace = eventually(
        Duration::from_secs(15),
        "an issuance trace spanning proxy, agent and CA",
        || {
            let spans = store.all();
            async move {
                issuance_trace(&spans).ok_or_else(|| {
                    let mut names: Vec<String> = spans
                        .iter()
                        .map(|s| format!("{}:{}", s.service, s.name))
                        .collect();
                    names.sort();
                    names.dedup();
                    format!(
                        "{} spans so far, none of a 3-component trace; seen: {}",
                        spans.len(),
                        names.join(", ")
                    )
                })
            }
        },
    )
    .await?;
    let services: HashSet<&str> = trace.iter().map(|s| s.service.as_str()).collect();
    for want in ["meshid-envoy-shim", "meshid-agent", "meshid-ca"] {
        ensure(services.contains(want), || {
            format!("the issuance trace has no {want} span (has {services:?})")
        })?;
    }
    let ids: HashSet<&str> = trace.iter().map(|s| s.span_id.as_str()).collect();
    let roots: Vec<&Span> = trace
        .iter()
        .filter(|s| !ids.contains(s.parent_span_id.as_str()))
        .collect();
    ensure(roots.len() == 1, || {
        format!(
            "the trace should have one root, has {}: {:?}",
            roots.len(),
            roots.iter().map(|s| &s.name).collect::<Vec<_>>()
        )
    })?;
    ensure(roots[0].service == "meshid-envoy-shim", || {
        format!(
            "the trace's root is {}:{}, not the proxy",
            roots[0].service, roots[0].name
        )
    })?;
    // The chain DESIGN §6 draws: the proxy's fetch, the agent's
    // subscription, its CSR.
    let by_id: HashMap<&str, &Span> = trace.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let parent_of = |s: &Span| by_id.get(s.parent_span_id.as_str()).copied();
    let csr = trace
        .iter()
        .find(|s| s.service == "meshid-agent" && s.name == "agent.csr")
        .ok_or("no agent.csr span")?;
    let subscribe = parent_of(csr)
        .filter(|p| p.service == "meshid-agent" && p.name == "sds.subscribe")
        .ok_or_else(|| {
            format!(
                "agent.csr's parent is {:?}, not the agent's sds.subscribe",
                parent_of(csr).map(|p| format!("{}:{}", p.service, p.name))
            )
        })?;
    ensure(
        parent_of(subscribe).is_some_and(|p| p.service == "meshid-envoy-shim"),
        || "sds.subscribe is not directly under the proxy's span".into(),
    )?;
    let sign = trace
        .iter()
        .find(|s| s.name == "ca.sign")
        .ok_or("no ca.sign span")?;
    ensure(descends_from(&trace, sign, "meshid-agent"), || {
        "ca.sign is not under an agent span".into()
    })?;
    ensure(descends_from(&trace, sign, "meshid-envoy-shim"), || {
        "ca.sign is not under the proxy's span".into()
    })?;
    Ok(())
}

/// A ztunnel's impersonated issuance is one trace: the ztunnel's fetch span
/// with the CA's `ca.sign` under it.
async fn ambient_issuance_is_one_trace(mesh: &mut impl Topology) -> Result<(), String> {
    ensure(!mesh.ambient().is_empty(), || {
        format!(
            "the {} backend started no ambient workloads",
            mesh.backend()
        )
    })?;
    let store = mesh.spans();
    eventually(
        Duration::from_secs(15),
        "a ca.sign span under a ztunnel span",
        || {
            let spans = store.all();
            async move {
                let found = spans
                    .iter()
                    .filter(|s| s.service == "meshid-ca" && s.name == "ca.sign")
                    .any(|sign| {
                        let trace: Vec<Span> = spans
                            .iter()
                            .filter(|s| s.trace_id == sign.trace_id)
                            .cloned()
                            .collect();
                        descends_from(&trace, sign, "meshid-ztunnel")
                    });
                if found {
                    Ok(())
                } else {
                    let z: Vec<&str> = spans
                        .iter()
                        .filter(|s| s.service == "meshid-ztunnel")
                        .map(|s| s.name.as_str())
                        .collect();
                    Err(format!("ztunnel spans seen: {z:?}"))
                }
            }
        },
    )
    .await
}
