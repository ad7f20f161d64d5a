//! Suite results: the terminal table, JUnit XML and JSON under target/e2e/.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

/// How one case ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Passed,
    Failed,
    /// The backend cannot do a step the case needs ([`crate::Error::Unsupported`]):
    /// neither passed nor failed, with the reason as its message.
    Skipped,
}

/// One case's result.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CaseResult {
    pub suite: String,
    pub case: String,
    pub outcome: Outcome,
    #[serde(serialize_with = "secs")]
    pub duration: Duration,
    /// The failure, for a failed case; the reason, for a skipped one.
    pub message: Option<String>,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// Every case of a run.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Report {
    pub backend: String,
    pub cases: Vec<CaseResult>,
    #[serde(serialize_with = "secs")]
    pub wall_time: Duration,
}

impl Report {
    pub fn passed(&self) -> usize {
        self.cases
            .iter()
            .filter(|c| c.outcome == Outcome::Passed)
            .count()
    }

    pub fn failed(&self) -> usize {
        self.cases
            .iter()
            .filter(|c| c.outcome == Outcome::Failed)
            .count()
    }

    pub fn skipped(&self) -> usize {
        self.cases
            .iter()
            .filter(|c| c.outcome == Outcome::Skipped)
            .count()
    }

    /// The terminal table, with failures spelled out below it and the plain
    /// `e2e: N passed, N failed` line last.
    pub fn table(&self) -> String {
        let sw = self
            .cases
            .iter()
            .map(|c| c.suite.len())
            .max()
            .unwrap_or(5)
            .max(5);
        let cw = self
            .cases
            .iter()
            .map(|c| c.case.len())
            .max()
            .unwrap_or(4)
            .max(4);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<sw$}  {:<cw$}  {:<6}  {:>8}",
            "suite", "case", "result", "time s"
        );
        let _ = writeln!(out, "{}", "-".repeat(sw + cw + 22));
        for c in &self.cases {
            let result = match c.outcome {
                Outcome::Passed => "PASS",
                Outcome::Failed => "FAIL",
                Outcome::Skipped => "SKIP",
            };
            let _ = writeln!(
                out,
                "{:<sw$}  {:<cw$}  {:<6}  {:>8.2}",
                c.suite,
                c.case,
                result,
                c.duration.as_secs_f64()
            );
        }
        for c in self.cases.iter().filter(|c| c.outcome != Outcome::Passed) {
            let _ = writeln!(
                out,
                "\n{} {}::{}: {}",
                if c.outcome == Outcome::Failed {
                    "FAIL"
                } else {
                    "SKIP"
                },
                c.suite,
                c.case,
                c.message.as_deref().unwrap_or("")
            );
        }
        let _ = writeln!(
            out,
            "\nwall time {:.1} s ({} backend)",
            self.wall_time.as_secs_f64(),
            self.backend
        );
        if self.skipped() > 0 {
            let _ = writeln!(
                out,
                "e2e: {} passed, {} failed, {} skipped",
                self.passed(),
                self.failed(),
                self.skipped()
            );
        } else {
            let _ = writeln!(
                out,
                "e2e: {} passed, {} failed",
                self.passed(),
                self.failed()
            );
        }
        out
    }

    /// JUnit XML, one testsuite per suite.
    pub fn junit(&self) -> String {
        let mut suites: Vec<&str> = self.cases.iter().map(|c| c.suite.as_str()).collect();
        suites.dedup();
        let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        let _ = writeln!(
            out,
            "<testsuites name=\"meshid-e2e\" tests=\"{}\" failures=\"{}\" skipped=\"{}\" time=\"{:.3}\">",
            self.cases.len(),
            self.failed(),
            self.skipped(),
            self.wall_time.as_secs_f64()
        );
        for suite in suites {
            let cases: Vec<&CaseResult> = self.cases.iter().filter(|c| c.suite == suite).collect();
            let failures = cases
                .iter()
                .filter(|c| c.outcome == Outcome::Failed)
                .count();
            let skipped = cases
                .iter()
                .filter(|c| c.outcome == Outcome::Skipped)
                .count();
            let time: f64 = cases.iter().map(|c| c.duration.as_secs_f64()).sum();
            let _ = writeln!(
                out,
                "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failures}\" skipped=\"{skipped}\" time=\"{time:.3}\">",
                xml_escape(suite),
                cases.len()
            );
            for c in cases {
                let _ = write!(
                    out,
                    "    <testcase classname=\"{}\" name=\"{}\" time=\"{:.3}\"",
                    xml_escape(suite),
                    xml_escape(&c.case),
                    c.duration.as_secs_f64()
                );
                match (&c.outcome, &c.message) {
                    (Outcome::Failed, msg) => {
                        let msg = xml_escape(msg.as_deref().unwrap_or("failed"));
                        let _ = writeln!(
                            out,
                            ">\n      <failure message=\"{msg}\">{msg}</failure>\n    </testcase>"
                        );
                    }
                    (Outcome::Skipped, msg) => {
                        let msg = xml_escape(msg.as_deref().unwrap_or("skipped"));
                        let _ = writeln!(
                            out,
                            ">\n      <skipped message=\"{msg}\"/>\n    </testcase>"
                        );
                    }
                    (Outcome::Passed, _) => out.push_str("/>\n"),
                }
            }
            out.push_str("  </testsuite>\n");
        }
        out.push_str("</testsuites>\n");
        out
    }

    /// Writes `junit.xml` and `report.json` into `dir`.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("junit.xml"), self.junit())?;
        let json = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(dir.join("report.json"), json)
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        Report {
            backend: "process".into(),
            wall_time: Duration::from_secs(42),
            cases: vec![
                CaseResult {
                    suite: "issuance".into(),
                    case: "sidecar_gets_svid".into(),
                    outcome: Outcome::Passed,
                    duration: Duration::from_millis(1500),
                    message: None,
                },
                CaseResult {
                    suite: "mtls".into(),
                    case: "strict_refuses_plaintext".into(),
                    outcome: Outcome::Failed,
                    duration: Duration::from_millis(250),
                    message: Some("connection <accepted> & \"served\"".into()),
                },
            ],
        }
    }

    #[test]
    fn table_lists_cases_and_ends_with_the_count_line() {
        let t = report().table();
        assert!(t.contains("issuance  sidecar_gets_svid"), "{t}");
        assert!(
            t.contains("FAIL mtls::strict_refuses_plaintext: connection"),
            "{t}"
        );
        assert_eq!(t.lines().last(), Some("e2e: 1 passed, 1 failed"));
    }

    #[test]
    fn junit_escapes_and_counts() {
        let x = report().junit();
        assert!(
            x.contains("<testsuites name=\"meshid-e2e\" tests=\"2\" failures=\"1\""),
            "{x}"
        );
        assert!(
            x.contains("&lt;accepted&gt; &amp; &quot;served&quot;"),
            "{x}"
        );
        assert!(
            x.contains(
                "<testcase classname=\"issuance\" name=\"sidecar_gets_svid\" time=\"1.500\"/>"
            ),
            "{x}"
        );
    }

    #[test]
    fn a_skipped_case_is_counted_apart_with_its_reason() {
        let mut r = report();
        r.cases.push(CaseResult {
            suite: "reliability".into(),
            case: "frozen".into(),
            outcome: Outcome::Skipped,
            duration: Duration::ZERO,
            message: Some("unsupported: pause ca on the kind backend: no <SIGSTOP>".into()),
        });
        let t = r.table();
        assert!(t.contains("reliability  frozen"), "{t}");
        assert!(
            t.contains("SKIP reliability::frozen: unsupported: pause ca"),
            "{t}"
        );
        assert_eq!(t.lines().last(), Some("e2e: 1 passed, 1 failed, 1 skipped"));
        let x = r.junit();
        assert!(
            x.contains("tests=\"3\" failures=\"1\" skipped=\"1\""),
            "{x}"
        );
        assert!(
            x.contains("<skipped message=\"unsupported: pause ca on the kind backend: no &lt;SIGSTOP&gt;\"/>"),
            "{x}"
        );
    }

    #[test]
    fn json_has_seconds() {
        let dir = std::env::temp_dir().join(format!("meshid-report-{}", std::process::id()));
        report().write(&dir).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap())
                .unwrap();
        assert_eq!(v["cases"][0]["duration"], 1.5);
        assert_eq!(v["wall_time"], 42.0);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
