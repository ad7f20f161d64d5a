//! The end-to-end suites. Each case is an independent async function over a
//! [`Topology`]; [`run`] times each one and records it in the report.

pub mod badinput;
pub mod issuance;
pub mod mtls;
pub mod reliability;
pub mod revocation;
pub mod rotation;
pub mod tracing;
pub mod vault;

use std::time::Instant;

use crate::report::{CaseResult, Outcome, Report};

/// Suite names, in the order they run (revocation last: it deletes a pod).
pub const ALL: &[&str] = &[
    "issuance",
    "mtls",
    "rotation",
    "tracing",
    "reliability",
    "badinput",
    "revocation-by-ttl",
];

/// Records one case.
pub(crate) fn record(
    report: &mut Report,
    suite: &str,
    case: &str,
    started: Instant,
    result: Result<(), String>,
) {
    let (outcome, message) = match result {
        Ok(()) => (Outcome::Passed, None),
        Err(e) => (Outcome::Failed, Some(e)),
    };
    eprintln!(
        "  {suite}::{case} ... {}",
        if outcome == Outcome::Passed {
            "ok"
        } else {
            "FAILED"
        }
    );
    report.cases.push(CaseResult {
        suite: suite.into(),
        case: case.into(),
        outcome,
        duration: started.elapsed(),
        message,
    });
}

/// Runs `case` (an async expression yielding `Result<(), String>`) and records it.
#[macro_export]
macro_rules! case {
    ($report:expr, $suite:expr, $name:literal, $body:expr) => {{
        let started = std::time::Instant::now();
        let result: Result<(), String> = $body.await;
        $crate::suites::record($report, $suite, $name, started, result);
    }};
}

/// Fails with `msg` unless `cond`.
pub(crate) fn ensure(cond: bool, msg: impl FnOnce() -> String) -> Result<(), String> {
    if cond { Ok(()) } else { Err(msg()) }
}
