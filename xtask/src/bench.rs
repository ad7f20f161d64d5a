//! `cargo xtask bench [NAME]`: run the benchmarks, all of them or the one named.
//!
//! Benchmarks are listed in [`BENCHES`]; adding one is adding a line there.

use std::process::ExitCode;

use anyhow::bail;
use clap::Args;

use crate::{cargo, display_cargo};

/// One benchmark target: what to call it here, and where cargo finds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Bench {
    /// The name given to `cargo xtask bench NAME`.
    name: &'static str,
    /// The package holding the bench target.
    package: &'static str,
    /// The `[[bench]]` target name in that package.
    target: &'static str,
    /// What it measures, for `--list`.
    about: &'static str,
}

/// Every benchmark, in the order `cargo xtask bench` runs them.
const BENCHES: &[Bench] = &[
    Bench {
        name: "crypto",
        package: "meshid-common",
        target: "crypto",
        about: "the key, CSR and certificate helpers of meshid-common",
    },
    Bench {
        name: "envoy-shim",
        package: "meshid-envoy-shim",
        target: "proxy",
        about: "direct TCP vs shim->shim vs Envoy->Envoy mTLS: req/resp p50/p99, bulk, conns/s, RSS",
    },
    Bench {
        name: "agent",
        package: "meshid-agent",
        target: "agent",
        about: "agent start -> first SDS response, RSS idle and with 1,000 SDS streams, rotation push to 1,000 streams",
    },
    Bench {
        name: "ztunnel",
        package: "meshid-ztunnel",
        target: "hbone",
        about: "direct TCP vs HBONE: throughput, p50/p99, conns/s; RSS and warm-up with 1,000 workload certs",
    },
    Bench {
        name: "ca",
        package: "meshid-ca",
        target: "issuance",
        about: "CA issuances/s over gRPC+TLS at 1/8/64 clients, p50/p99, vs the raw CSR+JWT+sign limit",
    },
];

/// Flags of `cargo xtask bench`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Args)]
pub struct BenchArgs {
    /// The benchmark to run (see --list); all of them when absent.
    #[arg(value_name = "NAME")]
    pub name: Option<String>,

    /// List the benchmarks and exit.
    #[arg(long)]
    pub list: bool,

    /// Arguments passed to the benchmark binary (after `--`), e.g. `-- --quick`.
    #[arg(last = true, value_name = "BENCH_ARGS")]
    pub bench_args: Vec<String>,
}

/// `cargo xtask bench`.
pub fn run(args: &BenchArgs) -> anyhow::Result<ExitCode> {
    if args.list {
        for bench in BENCHES {
            println!(
                "{:<10} {} --bench {}: {}",
                bench.name, bench.package, bench.target, bench.about
            );
        }
        return Ok(ExitCode::SUCCESS);
    }

    let mut failed = Vec::new();
    for bench in select(args.name.as_deref())? {
        let argv = command_line(bench, &args.bench_args);
        let line = display_cargo(&argv);
        eprintln!("==> bench {}: {line}", bench.name);
        let status = cargo(&argv)
            .status()
            .map_err(|err| anyhow::anyhow!("could not start `{line}`: {err}"))?;
        if !status.success() {
            eprintln!("bench {}: `{line}` ended with {status}", bench.name);
            failed.push(bench.name);
        }
    }
    if failed.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        bail!("these benchmarks failed: {}", failed.join(", "))
    }
}

/// The benchmarks to run for `cargo xtask bench [NAME]`.
fn select(name: Option<&str>) -> anyhow::Result<Vec<&'static Bench>> {
    crate::select_named(BENCHES, name, |b| b.name, ("benchmark", "benchmarks"))
}

/// The cargo arguments that run one benchmark.
fn command_line(bench: &Bench, extra: &[String]) -> Vec<String> {
    let mut argv: Vec<String> = ["bench", "-p", bench.package, "--bench", bench.target]
        .into_iter()
        .map(str::to_owned)
        .collect();
    if !extra.is_empty() {
        argv.push("--".to_owned());
        argv.extend(extra.iter().cloned());
    }
    argv
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crypto_runs_the_common_crate_bench() {
        let crypto = select(Some("crypto")).expect("crypto is listed");
        assert_eq!(
            display_cargo(&command_line(crypto[0], &[])),
            "cargo bench -p meshid-common --bench crypto"
        );
        assert_eq!(
            display_cargo(&command_line(crypto[0], &["--quick".to_owned()])),
            "cargo bench -p meshid-common --bench crypto -- --quick"
        );
    }

    #[test]
    fn unknown_name_lists_the_known_ones() {
        let err = select(Some("nope")).expect_err("nope is not a benchmark");
        assert!(err.to_string().contains("no benchmark named `nope`"));
        assert!(err.to_string().contains("crypto"));
    }

    #[test]
    fn names_are_unique() {
        let mut names: Vec<&str> = BENCHES.iter().map(|b| b.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), BENCHES.len());
    }
}
