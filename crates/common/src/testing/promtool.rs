//! `promtool check metrics` on a component's exposition text, for the tests
//! that keep every `/metrics` page well-formed (help text, types, names).
//! promtool comes from Debian's `prometheus` package (`.ci/run` installs it).

use std::io::Write;
use std::process::{Command, Stdio};

/// promtool's remarks on `exposition`, one per line (empty when clean).
///
/// Panics, saying what to install, when promtool is not on `PATH`: a check
/// that cannot run must fail, never pass.
pub fn check_metrics(exposition: &str) -> Vec<String> {
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => panic!(
            "promtool is needed to check the metrics exposition and could not be run ({e}): \
             install it with `apt-get install -y prometheus` (.ci/run does this in CI)"
        ),
    };
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(exposition.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let remarks: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    assert!(
        out.status.success() || !remarks.is_empty(),
        "promtool failed without saying why: {:?}",
        out.status
    );
    remarks
}

/// Asserts promtool's only remarks on `exposition` are about the metric
/// names in `legacy` (names kept as istiod or pilot-agent spell them, such as
/// counters without `_total`).
#[track_caller]
pub fn assert_clean_except(exposition: &str, legacy: &[&str]) {
    let remarks = check_metrics(exposition);
    let unexpected: Vec<&String> = remarks
        .iter()
        .filter(|r| !legacy.iter().any(|name| r.starts_with(&format!("{name} "))))
        .collect();
    assert!(
        unexpected.is_empty(),
        "promtool check metrics: {unexpected:#?}\n--- exposition:\n{exposition}"
    );
}
