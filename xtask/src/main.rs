//! Project tasks for meshid, run as `cargo xtask <task>` (the alias lives in `.cargo/config.toml`).
//!
//! One module per task: [`ci`] runs what CI runs, [`e2e`] runs the end-to-end suites against a
//! topology, [`bench`] runs the benchmarks. Everything here is plain `std::process::Command`.

mod bench;
mod ci;
mod e2e;
mod fuzz;
mod images;
mod kind;
mod link_order;

use std::{
    ffi::OsString,
    path::Path,
    process::{Command, ExitCode},
};

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "meshid project tasks",
    long_about = "meshid project tasks: `ci` runs the checks CI runs, `e2e` runs the end-to-end \
                  suites against a topology, `bench` runs the benchmarks."
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Run what CI runs (fmt, clippy, tests, doctests, e2e) and print a summary table.
    Ci(ci::CiArgs),
    /// Run the end-to-end suites against a process, docker or kind topology.
    E2e(e2e::E2eArgs),
    /// Run the benchmarks: all of them, or the one named.
    Bench(bench::BenchArgs),
    /// Build the images: the e2e docker backend's (debug), or the release set (--release).
    Images(images::ImagesArgs),
    /// meshid in a kind cluster: up, load, deploy, down; validate the manifests offline.
    Kind(kind::KindArgs),
    /// Profile the release agent and shim under load and write the hot-function lists their
    /// links use (crates/{agent,envoy-shim}/link-order.txt); `--check` tells how much of each
    /// a build still names.
    LinkOrder(link_order::LinkOrderArgs),
    /// Build the cargo-fuzz targets of fuzz/ and run each (or the one named) for --time seconds.
    Fuzz(fuzz::FuzzArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.task {
        Task::Ci(args) => ci::run(args),
        Task::E2e(args) => e2e::main(args),
        Task::Bench(args) => bench::run(args),
        Task::Images(args) => images::run(args),
        Task::Kind(args) => kind::run(args),
        Task::Fuzz(args) => fuzz::run(args),
        Task::LinkOrder(args) => link_order::run(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root: xtask sits one level below it.
pub(crate) fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the xtask manifest directory has a parent (the workspace root)")
}

/// A `cargo` command run from the workspace root: `$CARGO` when set (cargo sets it for
/// `cargo xtask`, so the same toolchain is used), else `cargo` from `PATH`.
pub(crate) fn cargo<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: Into<OsString>,
{
    let program = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut cmd = Command::new(program);
    cmd.current_dir(workspace_root());
    cmd.args(args.into_iter().map(Into::into));
    cmd
}

/// The entries of a task's table that `name` picks: all of them when `None`,
/// else the one so named, or an error listing the names (`what`: the entries,
/// plural, as the error calls them).
pub(crate) fn select_named<T>(
    table: &'static [T],
    name: Option<&str>,
    name_of: fn(&T) -> &'static str,
    what: (&str, &str),
) -> anyhow::Result<Vec<&'static T>> {
    let Some(name) = name else {
        return Ok(table.iter().collect());
    };
    match table.iter().find(|t| name_of(t) == name) {
        Some(t) => Ok(vec![t]),
        None => {
            let known: Vec<&str> = table.iter().map(name_of).collect();
            anyhow::bail!(
                "there is no {} named `{name}`; the {} are: {}",
                what.0,
                what.1,
                known.join(", ")
            )
        }
    }
}

/// How a cargo invocation reads in logs: `cargo` plus its arguments (not `$CARGO`'s full path).
pub(crate) fn display_cargo<S: AsRef<str>>(args: &[S]) -> String {
    let mut line = String::from("cargo");
    for arg in args {
        line.push(' ');
        line.push_str(arg.as_ref());
    }
    line
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn cargo_command_line_reads_as_typed() {
        assert_eq!(
            display_cargo(&["fmt", "--all", "--", "--check"]),
            "cargo fmt --all -- --check"
        );
    }
}
