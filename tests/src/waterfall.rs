//! Draws one trace as a terminal waterfall: component, span, start offset,
//! duration, and a bar placed on a shared time axis, children indented
//! under their parents.

use std::collections::HashMap;
use std::fmt::Write as _;

use crate::otlp::Span;

/// Renders `spans` (one trace) `width` characters wide for the bars.
pub fn render(spans: &[Span], width: usize) -> String {
    if spans.is_empty() {
        return "(no spans)\n".to_owned();
    }
    let t0 = spans.iter().map(|s| s.start_unix_nanos).min().unwrap_or(0);
    let t1 = spans
        .iter()
        .map(|s| s.end_unix_nanos)
        .max()
        .unwrap_or(t0)
        .max(t0 + 1);
    let total = (t1 - t0) as f64;
    let ids: HashMap<&str, &Span> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let depth = |s: &Span| {
        let mut d = 0;
        let mut cur = s;
        while let Some(parent) = ids.get(cur.parent_span_id.as_str()) {
            d += 1;
            cur = parent;
            if d > 32 {
                break;
            }
        }
        d
    };
    let ordered = tree_order(spans);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<18} {:<34} {:>9} {:>9}  timeline ({:.1} ms)",
        "component",
        "span",
        "start ms",
        "dur ms",
        total / 1e6
    );
    for s in ordered {
        let start = (s.start_unix_nanos - t0) as f64;
        let dur = s.end_unix_nanos.saturating_sub(s.start_unix_nanos) as f64;
        let from = ((start / total) * width as f64).floor() as usize;
        let len = (((dur / total) * width as f64).round() as usize).max(1);
        let from = from.min(width.saturating_sub(1));
        let len = len.min(width - from);
        let bar = format!(
            "{}{}{}",
            " ".repeat(from),
            "█".repeat(len),
            " ".repeat(width - from - len)
        );
        let name = format!("{}{}", "  ".repeat(depth(s)), s.name);
        let _ = writeln!(
            out,
            "{:<18} {:<34} {:>9.2} {:>9.2}  |{bar}|",
            truncate(&s.service, 18),
            truncate(&name, 34),
            start / 1e6,
            dur / 1e6
        );
    }
    out
}

/// Depth-first order: each span followed by its children by start time.
fn tree_order(spans: &[Span]) -> Vec<&Span> {
    let present: std::collections::HashSet<&str> =
        spans.iter().map(|s| s.span_id.as_str()).collect();
    let mut children: HashMap<&str, Vec<&Span>> = HashMap::new();
    let mut roots = Vec::new();
    for s in spans {
        if present.contains(s.parent_span_id.as_str()) {
            children
                .entry(s.parent_span_id.as_str())
                .or_default()
                .push(s);
        } else {
            roots.push(s);
        }
    }
    for list in children.values_mut() {
        list.sort_by_key(|s| s.start_unix_nanos);
    }
    roots.sort_by_key(|s| s.start_unix_nanos);
    let mut out = Vec::with_capacity(spans.len());
    let mut stack: Vec<&Span> = roots.into_iter().rev().collect();
    while let Some(s) = stack.pop() {
        out.push(s);
        if let Some(kids) = children.get(s.span_id.as_str()) {
            stack.extend(kids.iter().rev());
        }
    }
    out
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(max - 1).collect();
        t.push('…');
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(id: &str, parent: &str, name: &str, service: &str, start: u64, end: u64) -> Span {
        Span {
            trace_id: "t".into(),
            span_id: id.into(),
            parent_span_id: parent.into(),
            name: name.into(),
            service: service.into(),
            start_unix_nanos: start,
            end_unix_nanos: end,
            attributes: vec![],
        }
    }

    #[test]
    fn children_follow_parents_indented_with_bars_on_one_axis() {
        let spans = vec![
            span("c", "b", "ca.sign", "meshid-ca", 6_000_000, 8_000_000),
            span("a", "", "sds.fetch", "meshid-envoy-shim", 0, 10_000_000),
            span("b", "a", "agent.csr", "meshid-agent", 2_000_000, 9_000_000),
        ];
        let out = render(&spans, 10);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].contains("timeline (10.0 ms)"), "{out}");
        assert!(
            lines[1].contains("sds.fetch") && lines[1].contains("|██████████|"),
            "{out}"
        );
        assert!(
            lines[2].contains("  agent.csr") && lines[2].contains("|  ███████ |"),
            "{out}"
        );
        assert!(
            lines[3].contains("    ca.sign") && lines[3].contains("|      ██  |"),
            "{out}"
        );
    }

    #[test]
    fn an_empty_trace_says_so() {
        assert_eq!(render(&[], 20), "(no spans)\n");
    }
}
