//! `cargo xtask fuzz`: builds the libFuzzer targets of `fuzz/` with
//! cargo-fuzz and runs each for a bounded time, printing the executions per
//! target. `cargo xtask ci` runs the same thing with a short time per target
//! ([`CI_SECONDS`]).
//!
//! Only the stable toolchain is installed: cargo-fuzz passes nightly-only
//! flags (`-Zsanitizer`, `--cfg fuzzing` with `-Cpasses=sancov-module`), so
//! the build runs with `RUSTC_BOOTSTRAP=1`, which lets stable rustc accept
//! them. The build goes to `target/fuzz` (its own profile and flags: it
//! shares nothing with the debug build). New inputs libFuzzer finds go to
//! `target/fuzz/corpus/<target>`; the committed seeds in
//! `fuzz/corpus/<target>` and crash inputs kept in
//! `fuzz/regressions/<target>` are read, never written. A crash leaves its
//! input in `target/fuzz/artifacts/<target>/` and fails the run. In ci the
//! committed inputs are first replayed by the fuzz crate's plain tests.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use anyhow::{Context as _, bail};
use clap::Args;

use crate::{cargo, workspace_root};

/// The targets, as named in fuzz/Cargo.toml.
pub const TARGETS: &[&str] = &[
    "spiffe_id",
    "csr",
    "sds_request",
    "hbone_connect",
    "jwt_ca",
    "jwt_svid",
    "registry",
];

/// Seconds per target in `cargo xtask ci`.
pub const CI_SECONDS: u64 = 15;

/// Flags of `cargo xtask fuzz`.
#[derive(Clone, Debug, Args)]
pub struct FuzzArgs {
    /// Run only this target (default: all of them, one after the other).
    pub target: Option<String>,
    /// Seconds to fuzz each target.
    #[arg(long, default_value_t = 60)]
    pub time: u64,
    /// libFuzzer `-fork` workers per target (1: no fork mode).
    #[arg(long, default_value_t = 1)]
    pub jobs: u32,
    /// Build with AddressSanitizer (slower build and runs; meshid's crates
    /// forbid `unsafe`, so the default is none).
    #[arg(long)]
    pub asan: bool,
    /// Build only.
    #[arg(long)]
    pub build_only: bool,
}

/// How one target's run went.
#[derive(Clone, Debug, PartialEq)]
pub struct TargetRun {
    pub target: &'static str,
    pub executions: u64,
    pub seconds: f64,
    pub corpus: u64,
    pub crashed: bool,
}

/// `cargo xtask fuzz`.
pub fn run(args: &FuzzArgs) -> anyhow::Result<ExitCode> {
    let targets: Vec<&'static str> = match &args.target {
        None => TARGETS.to_vec(),
        Some(t) => match TARGETS.iter().find(|k| **k == t.as_str()) {
            Some(k) => vec![*k],
            None => bail!(
                "no fuzz target {t:?}; the targets are: {}",
                TARGETS.join(", ")
            ),
        },
    };
    let started = Instant::now();
    build(args.asan)?;
    eprintln!("fuzz: built in {:.0} s", started.elapsed().as_secs_f64());
    if args.build_only {
        return Ok(ExitCode::SUCCESS);
    }
    let mut runs = Vec::new();
    for target in targets {
        runs.push(run_target(target, args.time, args.jobs, args.asan)?);
    }
    println!("\n{}", table(&runs));
    Ok(if runs.iter().any(|r| r.crashed) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// The short run `cargo xtask ci` does: every target for [`CI_SECONDS`].
pub fn ci() -> anyhow::Result<Vec<TargetRun>> {
    replay()?;
    build(false)?;
    TARGETS
        .iter()
        .map(|t| run_target(t, CI_SECONDS, 1, false))
        .collect()
}

/// The fuzz crate's own tests, as a plain `cargo test` sharing the debug
/// build: every committed seed and kept crash input replayed through its
/// target without libFuzzer, and the seeds checked to reach past the first
/// check. Cheap, and it keeps the crate compiling.
fn replay() -> anyhow::Result<()> {
    let manifest = workspace_root().join("fuzz/Cargo.toml");
    eprintln!("fuzz: cargo test --manifest-path {}", manifest.display());
    let status = cargo(["test", "--manifest-path"])
        .arg(&manifest)
        .env("CARGO_TARGET_DIR", crate::e2e::target_dir())
        .stdin(Stdio::null())
        .status()
        .context("running the fuzz crate's tests")?;
    if !status.success() {
        bail!("the fuzz crate's tests (corpus replay) failed ({status})");
    }
    Ok(())
}

/// `target/fuzz`: the build, and the corpus and artifacts of every run.
fn fuzz_target_dir() -> PathBuf {
    crate::e2e::target_dir().join("fuzz")
}

/// Where the build goes: the ASan build has its own directory
/// (`target/fuzz-asan`), since other rustc flags would rebuild every crate
/// of the other build in place, both ways, each time one switches.
fn build_dir(asan: bool) -> PathBuf {
    if asan {
        crate::e2e::target_dir().join("fuzz-asan")
    } else {
        fuzz_target_dir()
    }
}

fn cargo_fuzz_installed() -> bool {
    cargo(["fuzz", "--version"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `cargo fuzz build` of every target (release, debug assertions on,
/// 16 codegen units: a faster build for a slightly slower fuzzer).
fn build(asan: bool) -> anyhow::Result<()> {
    if !cargo_fuzz_installed() {
        eprintln!(
            "fuzz: cargo-fuzz is missing; installing it (`cargo install cargo-fuzz --locked`)"
        );
        let status = cargo(["install", "cargo-fuzz", "--locked"])
            .status()
            .context("running cargo install cargo-fuzz")?;
        anyhow::ensure!(
            status.success(),
            "cargo install cargo-fuzz failed: {status}"
        );
    }
    let target_dir = build_dir(asan);
    let mut cmd = cargo([
        "fuzz",
        "build",
        "--fuzz-dir",
        "fuzz",
        "--features",
        "libfuzzer",
    ]);
    cmd.args(["--sanitizer", if asan { "address" } else { "none" }])
        .args(["--debug-assertions", "--codegen-units", "16"])
        .arg("--target-dir")
        .arg(&target_dir)
        // Nightly-only rustc flags on the stable toolchain (see the module doc).
        .env("RUSTC_BOOTSTRAP", "1");
    eprintln!(
        "fuzz: RUSTC_BOOTSTRAP=1 cargo fuzz build --fuzz-dir fuzz --features libfuzzer --sanitizer {} --debug-assertions --codegen-units 16 --target-dir {}",
        if asan { "address" } else { "none" },
        target_dir.display()
    );
    let status = cmd.status().context("running cargo fuzz build")?;
    anyhow::ensure!(status.success(), "cargo fuzz build failed: {status}");
    Ok(())
}

fn binary(target: &str, asan: bool) -> PathBuf {
    build_dir(asan)
        .join("x86_64-unknown-linux-gnu")
        .join("release")
        .join(target)
}

/// Runs one built target for `seconds` and reads its final stats.
fn run_target(
    target: &'static str,
    seconds: u64,
    jobs: u32,
    asan: bool,
) -> anyhow::Result<TargetRun> {
    let root = workspace_root();
    let work = fuzz_target_dir().join("corpus").join(target);
    let artifacts = fuzz_target_dir().join("artifacts").join(target);
    for dir in [&work, &artifacts] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut cmd = Command::new(binary(target, asan));
    cmd.current_dir(root)
        .arg(&work)
        .arg(root.join("fuzz/corpus").join(target));
    let regressions = root.join("fuzz/regressions").join(target);
    if regressions.is_dir() {
        cmd.arg(&regressions);
    }
    cmd.arg(format!("-max_total_time={seconds}"))
        .arg("-print_final_stats=1")
        .arg("-timeout=10")
        .arg("-rss_limit_mb=2048")
        .arg(format!("-artifact_prefix={}/", artifacts.display()));
    if jobs > 1 {
        cmd.arg(format!("-fork={jobs}"));
    }
    eprintln!("fuzz: {target} for {seconds} s");
    let started = Instant::now();
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", binary(target, asan).display()))?;
    let seconds = started.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let crashed = !out.status.success();
    if crashed {
        // The crash report is the end of libFuzzer's output.
        let tail: Vec<&str> = stderr.lines().rev().take(60).collect();
        for line in tail.into_iter().rev() {
            eprintln!("  {line}");
        }
        eprintln!(
            "fuzz: {target} FAILED ({}); the input is in {} — keep it in fuzz/regressions/{target}/ with the fix",
            out.status,
            artifacts.display()
        );
    }
    Ok(TargetRun {
        target,
        executions: final_stat(&stderr, "stat::number_of_executed_units").unwrap_or(0),
        seconds,
        corpus: corpus_size(&work),
        crashed,
    })
}

/// A `stat::name: value` line of `-print_final_stats=1`.
fn final_stat(stderr: &str, name: &str) -> Option<u64> {
    stderr.lines().rev().find_map(|line| {
        let (k, v) = line.rsplit_once(':')?;
        (k.trim() == name).then(|| v.trim().parse().ok()).flatten()
    })
}

fn corpus_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir).map_or(0, |d| d.count() as u64)
}

/// `target | result | executions | exec/s | corpus`.
pub fn table(runs: &[TargetRun]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<14} | result | executions | exec/s | seconds | corpus",
        "target"
    );
    let _ = writeln!(
        out,
        "{:-<14}-|--------|------------|--------|---------|-------",
        ""
    );
    for r in runs {
        let _ = writeln!(
            out,
            "{:<14} | {:<6} | {:>10} | {:>6.0} | {:>7.0} | {:>6}",
            r.target,
            if r.crashed { "CRASH" } else { "ok" },
            r.executions,
            r.executions as f64 / r.seconds.max(0.001),
            r.seconds,
            r.corpus
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_asan_build_has_its_own_directory() {
        assert_ne!(build_dir(true), build_dir(false));
        assert!(binary("csr", true).starts_with(build_dir(true)));
        assert!(binary("csr", false).starts_with(fuzz_target_dir()));
    }

    #[test]
    fn final_stats_are_read() {
        let stderr = "INFO: seed\n#2048 pulse\nDone 123456 runs in 20 second(s)\nstat::number_of_executed_units: 123456\nstat::average_exec_per_sec:     6172\nstat::new_units_added:          42\n";
        assert_eq!(
            final_stat(stderr, "stat::number_of_executed_units"),
            Some(123_456)
        );
        assert_eq!(final_stat(stderr, "stat::new_units_added"), Some(42));
        assert_eq!(final_stat("no stats", "stat::new_units_added"), None);
    }

    #[test]
    fn every_target_has_an_entry_and_seeds() {
        let root = workspace_root().join("fuzz");
        let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
        for t in TARGETS {
            assert!(
                root.join("fuzz_targets").join(format!("{t}.rs")).is_file(),
                "fuzz/fuzz_targets/{t}.rs"
            );
            assert!(
                manifest.contains(&format!("name = \"{t}\"")),
                "{t} in fuzz/Cargo.toml"
            );
            let seeds = corpus_size(&root.join("corpus").join(t));
            assert!(seeds >= 3, "fuzz/corpus/{t} holds {seeds} seeds");
        }
    }
}
