//! `cargo xtask link-order`: write the hot-function lists of the binaries in
//! [`TARGETS`] (the agent and the shim), or check them.
//!
//! `crates/<name>/link-order.txt` names the functions each release binary
//! runs; their build scripts have the linker place them together (why:
//! the meshid-link-order crate). This task writes a list from a profile of the
//! release binary, built as the images build it, under its bench's load
//! (`--quick`):
//! - one run under `valgrind --tool=callgrind`, which sees every function
//!   that runs, start-up and shutdown included, on valgrind's CPU (no
//!   AVX-512, so aws-lc takes other assembly paths there);
//! - one run under `perf record` (cpu-clock samples), which sees the paths
//!   this machine's CPU takes, if perf is installed.
//!
//! `--check` builds the release binaries and tells how many entries still
//! name one of their functions, failing under 90 %.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use anyhow::{Context as _, bail};
use clap::Args;

/// A binary whose release link places the functions it runs first.
#[derive(Debug)]
struct Target {
    /// `cargo xtask link-order NAME`, and its crate's folder under crates/.
    name: &'static str,
    /// Its package and binary.
    package: &'static str,
    /// The bench whose load the profile runs, and the variable that has it
    /// run another build of the binary.
    bench: &'static str,
    bin_env: &'static str,
    /// That load, for the list's header.
    load: &'static str,
}

/// The binaries that run in every pod.
const TARGETS: &[Target] = &[
    Target {
        name: "envoy-shim",
        package: "meshid-envoy-shim",
        bench: "proxy",
        bin_env: "MESHID_SHIM_BIN",
        load: "the proxy bench's load\n# (two shims between a client and an echo server: requests of 1 KiB and 64 KiB,\n# bulk, new connections)",
    },
    Target {
        name: "agent",
        package: "meshid-agent",
        bench: "agent",
        bin_env: "MESHID_AGENT_BIN",
        load: "the agent bench's load\n# (starts to a first SDS answer, 1,000 SDS streams, rotations pushed to them)",
    },
];

impl Target {
    /// Its list, from the workspace root.
    fn file(&self) -> PathBuf {
        crate::workspace_root()
            .join("crates")
            .join(self.name)
            .join(meshid_link_order::ORDER_FILE)
    }
}

/// Below this share of entries naming a function of the build, `--check` fails.
const FRESH_PERCENT: usize = 90;

/// Flags of `cargo xtask link-order`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Args)]
pub struct LinkOrderArgs {
    /// The binary (`agent` or `envoy-shim`); both when absent.
    #[arg(value_name = "NAME")]
    pub name: Option<String>,

    /// Do not profile: build the release binaries and tell how much of each list names their functions.
    #[arg(long)]
    pub check: bool,
}

/// `cargo xtask link-order`.
pub fn run(args: &LinkOrderArgs) -> anyhow::Result<ExitCode> {
    let targets = select(args.name.as_deref())?;
    let tools: &[&str] = if args.check {
        &["nm", "readelf"]
    } else {
        &["nm", "valgrind"]
    };
    let path = std::env::var_os("PATH");
    let what = if args.check {
        "cargo xtask link-order --check"
    } else {
        "cargo xtask link-order"
    };
    if let Some(sentence) = crate::kind::missing_tools(what, tools, path.as_deref()) {
        eprintln!("xtask: {sentence}");
        return Ok(ExitCode::from(crate::kind::MISSING_TOOL));
    }
    let bin_dir = build_release()?;
    if args.check {
        let mut code = ExitCode::SUCCESS;
        for target in targets {
            let file = target.file();
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            if !check(target, &text, &bin_dir.join(target.package))? {
                code = ExitCode::FAILURE;
            }
        }
        return Ok(code);
    }
    let perf = crate::kind::find_tool("perf", path.as_deref()).is_some();
    if !perf {
        eprintln!(
            "link-order: perf (Debian `linux-perf`) is not installed: only callgrind's run is \
             used, and this CPU's own assembly paths (AVX-512 under valgrind's) may be missed"
        );
    }
    for target in targets {
        write_list(target, &bin_dir, perf)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The targets named (all when `None`).
fn select(name: Option<&str>) -> anyhow::Result<Vec<&'static Target>> {
    crate::select_named(
        TARGETS,
        name,
        |t| t.name,
        ("binary", "binaries with a link order"),
    )
}

/// Profiles one release binary under its bench's load and writes its list.
fn write_list(target: &Target, bin_dir: &Path, perf: bool) -> anyhow::Result<()> {
    let work = std::env::temp_dir().join(format!(
        "meshid-link-order-{}-{}",
        target.name,
        std::process::id()
    ));
    std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    // `cargo bench` builds the binary again (with the bench's dev features)
    // over target/release: profile a copy of the one that ships.
    let shipped = bin_dir.join(target.package);
    let bin = work.join(target.package);
    std::fs::copy(&shipped, &bin).with_context(|| format!("cannot copy {}", shipped.display()))?;

    let mut ran = profile(target, &work, &bin, Profiler::Callgrind)?;
    eprintln!("link-order: {} functions ran under callgrind", ran.len());
    if perf {
        let sampled = profile(target, &work, &bin, Profiler::Perf)?;
        eprintln!("link-order: {} functions sampled by perf", sampled.len());
        ran.extend(sampled);
    }
    let symbols = text_symbols(&bin)?;
    let ran: BTreeSet<&String> = ran.iter().filter(|n| symbols.contains(*n)).collect();
    let entries: BTreeSet<String> = ran.iter().map(|n| meshid_link_order::entry(n)).collect();
    let file = target.file();
    std::fs::write(&file, render(target, &entries))
        .with_context(|| format!("cannot write {}", file.display()))?;
    std::fs::remove_dir_all(&work).ok();
    eprintln!(
        "link-order: wrote {} entries to {} ({} of the binary's {} functions ran)",
        entries.len(),
        file.display(),
        ran.len(),
        symbols.len()
    );
    Ok(())
}

/// Builds the release agent and shim as `cargo xtask images --release` does
/// (features unify across one cargo call) and returns their folder.
fn build_release() -> anyhow::Result<PathBuf> {
    let build = crate::images::RELEASE_BUILDS
        .iter()
        .find(|b| TARGETS.iter().all(|t| b.packages.contains(&t.package)))
        .context("the release set has no build of both the agent and the shim")?;
    crate::images::cargo_build(
        &crate::images::release_build_args(build),
        "release binaries",
    )?;
    Ok(crate::e2e::target_dir().join("release"))
}

#[derive(Clone, Copy, Debug)]
enum Profiler {
    Callgrind,
    Perf,
}

/// Runs the target's bench (`--quick`) with the binary under `profiler`
/// and returns the names of the functions that ran.
fn profile(
    target: &Target,
    work: &Path,
    bin: &Path,
    profiler: Profiler,
) -> anyhow::Result<BTreeSet<String>> {
    let (name, out_dir) = match profiler {
        Profiler::Callgrind => ("callgrind", work.join("callgrind")),
        Profiler::Perf => ("perf", work.join("perf")),
    };
    std::fs::create_dir_all(&out_dir)?;
    // The bench starts the binary from its variable; `exec` keeps the pid,
    // so the bench's SIGTERM at the end reaches the profiler, which stops
    // the binary and writes its data.
    let command = match profiler {
        Profiler::Callgrind => format!(
            "exec valgrind --tool=callgrind --demangle=no --dump-line=no \
             --callgrind-out-file={}/out.%p {} \"$@\"",
            out_dir.display(),
            bin.display()
        ),
        Profiler::Perf => format!(
            "exec perf record -q -e cpu-clock -F 10000 -o {}/perf.$$ {} \"$@\"",
            out_dir.display(),
            bin.display()
        ),
    };
    let wrapper = work.join(format!("{name}-{}.sh", target.name));
    std::fs::write(&wrapper, format!("#!/bin/sh\n{command}\n"))?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
    }
    let argv = [
        "bench",
        "-p",
        target.package,
        "--bench",
        target.bench,
        "--",
        "--quick",
    ];
    let log = work.join(format!("{name}-bench.log"));
    eprintln!(
        "link-order: {} with {} under {name} (log: {})",
        crate::display_cargo(&argv),
        target.package,
        log.display()
    );
    let log_file = std::fs::File::create(&log)?;
    let status = crate::cargo(argv)
        .env(target.bin_env, &wrapper)
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .status()
        .context("could not start cargo bench")?;
    if !status.success() {
        bail!(
            "the {} bench under {name} failed ({status}); see {}",
            target.bench,
            log.display()
        );
    }

    let mut names = BTreeSet::new();
    let mut files = 0;
    for dir_entry in std::fs::read_dir(&out_dir)? {
        let path = dir_entry?.path();
        files += 1;
        match profiler {
            Profiler::Callgrind => {
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                names.extend(callgrind_functions(&text));
            }
            Profiler::Perf => {
                let out = Command::new("perf")
                    .args([
                        "report",
                        "--stdio",
                        "--no-demangle",
                        "--sort",
                        "sym",
                        "-q",
                        "-i",
                    ])
                    .arg(&path)
                    .stderr(Stdio::null())
                    .output()
                    .context("could not run perf report")?;
                names.extend(perf_functions(&String::from_utf8_lossy(&out.stdout)));
            }
        }
    }
    if files == 0 || names.is_empty() {
        bail!(
            "{name} left {files} profile(s) and {} function names in {}: the binary did not \
             run under it; see {}",
            names.len(),
            out_dir.display(),
            log.display()
        );
    }
    Ok(names)
}

/// The functions a callgrind output file names: those that ran (`fn=`) and
/// those called (`cfn=`), written `(id) name` the first time an id appears.
fn callgrind_functions(text: &str) -> impl Iterator<Item = String> + '_ {
    text.lines().filter_map(|line| {
        let rest = line
            .strip_prefix("fn=")
            .or_else(|| line.strip_prefix("cfn="))?;
        let name = match rest.strip_prefix('(') {
            Some(compressed) => compressed.split_once(") ")?.1,
            None => rest,
        };
        Some(name.trim().to_owned()).filter(|n| !n.is_empty())
    })
}

/// The user-space functions of a `perf report --sort sym` listing
/// (`  4.56%  [.] name`).
fn perf_functions(text: &str) -> impl Iterator<Item = String> + '_ {
    text.lines()
        .filter_map(|line| line.split_once("[.] "))
        .map(|(_, name)| name.trim().to_owned())
        .filter(|n| !n.is_empty() && !n.starts_with("0x"))
}

/// The code symbols a binary defines (`nm`: t, T, w, W).
fn text_symbols(bin: &Path) -> anyhow::Result<BTreeSet<String>> {
    let out = Command::new("nm")
        .arg("--defined-only")
        .arg(bin)
        .output()
        .context("could not run nm")?;
    anyhow::ensure!(out.status.success(), "nm {} failed", bin.display());
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            let (_addr, kind, name) = (parts.next()?, parts.next()?, parts.next()?);
            matches!(kind, "t" | "T" | "w" | "W").then(|| name.to_owned())
        })
        .collect())
}

/// The list: a header, then one entry per line, sorted.
fn render(target: &Target, entries: &BTreeSet<String>) -> String {
    let mut s = format!(
        "# The functions the release {} ran under {},\n\
         # which its build script has the linker place together (the meshid-link-order crate).\n\
         # A Rust symbol's hash is written `*`. Written by `cargo xtask link-order {}`;\n\
         # `cargo xtask link-order --check` tells how much of it a release build still names.\n",
        target.package, target.load, target.name
    );
    for e in entries {
        s.push_str(e);
        s.push('\n');
    }
    s
}

/// `--check` of one target: how many entries name a function of `bin`, and
/// the size of its `.text.hot`. False when the list is stale or unused.
fn check(target: &Target, text: &str, bin: &Path) -> anyhow::Result<bool> {
    let entries =
        meshid_link_order::parse(text).map_err(|e| anyhow::anyhow!("{}'s {e}", target.package))?;
    let symbols = text_symbols(bin)?;
    let (fresh, stale) = freshness(&entries, &symbols);
    let hot = hot_section_size(bin)?;
    let percent = if entries.is_empty() {
        0
    } else {
        fresh * 100 / entries.len()
    };
    println!(
        "{}: {fresh} of {} entries ({percent} %) name a function of {}; .text.hot holds {} KiB",
        target.file().display(),
        entries.len(),
        bin.display(),
        hot.map_or(0, |b| b / 1024)
    );
    for name in stale.iter().take(10) {
        println!("  not in this build: {name}");
    }
    if hot.is_none() {
        println!(
            "  the binary has no .text.hot section: it was linked without the list (another \
             target, rustc or linker, or MESHID_LINK_ORDER=0)"
        );
        return Ok(false);
    }
    if percent < FRESH_PERCENT {
        println!(
            "  under {FRESH_PERCENT} %: regenerate it with `cargo xtask link-order {}`",
            target.name
        );
        return Ok(false);
    }
    Ok(true)
}

/// How many entries name a symbol of `symbols`, and the ones that do not.
fn freshness<'a>(entries: &[&'a str], symbols: &BTreeSet<String>) -> (usize, Vec<&'a str>) {
    let hashed: BTreeSet<String> = symbols
        .iter()
        .map(|s| meshid_link_order::entry(s))
        .collect();
    let mut stale = Vec::new();
    for e in entries {
        let found = if e.ends_with("*E") {
            hashed.contains(*e)
        } else {
            symbols.contains(*e)
        };
        if !found {
            stale.push(*e);
        }
    }
    (entries.len() - stale.len(), stale)
}

/// The size of the binary's `.text.hot` section (`readelf -SW`), if it has one.
fn hot_section_size(bin: &Path) -> anyhow::Result<Option<u64>> {
    let out = Command::new("readelf")
        .arg("-SW")
        .arg(bin)
        .output()
        .context("could not run readelf")?;
    Ok(section_size(
        &String::from_utf8_lossy(&out.stdout),
        ".text.hot",
    ))
}

/// A section's size from `readelf -SW` output
/// (`[15] .text.hot PROGBITS <addr> <offset> <size> …`).
fn section_size(readelf: &str, section: &str) -> Option<u64> {
    readelf.lines().find_map(|line| {
        let (_, rest) = line.split_once(']')?;
        let mut fields = rest.split_whitespace();
        (fields.next()? == section).then_some(())?;
        let size = fields.nth(3)?;
        u64::from_str_radix(size, 16).ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callgrind_names_are_read_from_fn_and_cfn_lines() {
        let out = "version: 1\ncmd: shim\nob=(1) /bin/shim\nfn=(1) main\n0 3\n\
                   cfn=(2) _ZN3foo3bar17h0a1b2c3d4e5f6789E\ncalls=1 0\n0 5\nfn=(1)\n\
                   cfn=(2)\nfn=plain_name\n";
        let names: Vec<String> = callgrind_functions(out).collect();
        assert_eq!(
            names,
            ["main", "_ZN3foo3bar17h0a1b2c3d4e5f6789E", "plain_name"]
        );
    }

    #[test]
    fn perf_names_are_the_user_space_ones() {
        let out = "     8.11%  [k] _raw_spin_unlock_irqrestore\n\
                   \x20    4.56%  [.] aws_lc_0_47_0_aes_gcm_encrypt_avx512\n\
                   \x20    0.01%  [.] 0x00000000001b60e0\n";
        let names: Vec<String> = perf_functions(out).collect();
        assert_eq!(names, ["aws_lc_0_47_0_aes_gcm_encrypt_avx512"]);
    }

    #[test]
    fn freshness_matches_hashed_entries_by_name_and_others_exactly() {
        let symbols: BTreeSet<String> = [
            "_ZN5tokio7runtime4task3raw4poll17hffffffffffffffffE",
            "aws_lc_0_47_0_SHA256",
        ]
        .map(str::to_owned)
        .into();
        let entries = [
            "_ZN5tokio7runtime4task3raw4poll17h*E",
            "aws_lc_0_47_0_SHA256",
            "_ZN5tokio4gone17h*E",
            "aws_lc_0_47_0_gone",
        ];
        let (fresh, stale) = freshness(&entries, &symbols);
        assert_eq!(fresh, 2);
        assert_eq!(stale, ["_ZN5tokio4gone17h*E", "aws_lc_0_47_0_gone"]);
    }

    #[test]
    fn the_hot_section_size_is_read_from_readelf() {
        let out = "  [14] .eh_frame_hdr      PROGBITS        00000000001a0000 19f000 015000 00   A  0   0  4\n\
                   \x20 [15] .text.hot         PROGBITS        00000000001b60e0 1b50e0 151579 00  AX  0   0 16\n\
                   \x20 [16] .text             PROGBITS        0000000000307680 306680 3689d8 00  AX  0   0 64\n";
        assert_eq!(section_size(out, ".text.hot"), Some(0x151579));
        assert_eq!(section_size(out, ".text"), Some(0x3689d8));
        assert_eq!(section_size(out, ".text.cold"), None);
    }

    #[test]
    fn the_committed_lists_are_as_link_order_writes_them() {
        for target in TARGETS {
            let text = std::fs::read_to_string(target.file()).unwrap();
            let entries = meshid_link_order::parse(&text).unwrap();
            assert!(
                entries.len() > 500,
                "{}: {} entries",
                target.name,
                entries.len()
            );
            let owned: BTreeSet<String> = entries.iter().map(|e| (*e).to_owned()).collect();
            assert_eq!(render(target, &owned), text, "{}", target.name);
        }
    }

    #[test]
    fn each_target_is_a_crate_with_a_bench_and_a_build_script() {
        for target in TARGETS {
            let dir = crate::workspace_root().join("crates").join(target.name);
            let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
            assert!(manifest.contains(&format!("name = \"{}\"", target.package)));
            assert!(dir.join(format!("benches/{}.rs", target.bench)).exists());
            let bench =
                std::fs::read_to_string(dir.join(format!("benches/{}.rs", target.bench))).unwrap();
            assert!(
                bench.contains(target.bin_env),
                "{} reads {}",
                target.bench,
                target.bin_env
            );
            let build = std::fs::read_to_string(dir.join("build.rs")).unwrap();
            assert!(
                build.contains("meshid_link_order::link()"),
                "{}",
                target.name
            );
        }
        assert!(select(Some("ca")).is_err());
        assert_eq!(select(None).unwrap().len(), TARGETS.len());
    }
}
