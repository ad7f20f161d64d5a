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

/// Records one case: passed, failed, or skipped when its error carries
/// [`crate::UNSUPPORTED`] (a step the backend cannot do), the reason kept.
pub(crate) fn record(
    report: &mut Report,
    suite: &str,
    case: &str,
    started: Instant,
    result: Result<(), String>,
) {
    let (outcome, message) = match result {
        Ok(()) => (Outcome::Passed, None),
        Err(e) => match e.find(crate::UNSUPPORTED) {
            Some(at) => (Outcome::Skipped, Some(e[at..].to_owned())),
            None => (Outcome::Failed, Some(e)),
        },
    };
    eprintln!(
        "  {suite}::{case} ... {}",
        match outcome {
            Outcome::Passed => "ok",
            Outcome::Failed => "FAILED",
            Outcome::Skipped => "skipped",
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

    #[test]
    fn an_unsupported_step_is_a_skip_with_its_reason_and_anything_else_a_failure() {
        let mut report = Report::default();
        let unsupported = Error::Unsupported {
            backend: "kind",
            step: "pause".into(),
            component: "ca".into(),
            reason: "no SIGSTOP through kubectl".into(),
        };
        // As the suites pass it on: prefixed, through to_string().
        let passed_on = format!("ca did not freeze: {unsupported}");
        record(&mut report, "s", "skipped", Instant::now(), Err(passed_on));
        record(
            &mut report,
            "s",
            "failed",
            Instant::now(),
            Err("pause ca: not supported by the kind backend".into()),
        );
        record(&mut report, "s", "passed", Instant::now(), Ok(()));
        let outcomes: Vec<Outcome> = report.cases.iter().map(|c| c.outcome).collect();
        assert_eq!(
            outcomes,
            [Outcome::Skipped, Outcome::Failed, Outcome::Passed]
        );
        assert_eq!(
            report.cases[0].message.as_deref(),
            Some("unsupported: pause ca on the kind backend: no SIGSTOP through kubectl")
        );
        assert_eq!(
            (report.passed(), report.failed(), report.skipped()),
            (1, 1, 1)
        );
    }
}
