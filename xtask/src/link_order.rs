//! `cargo xtask link-order`: write the shim's hot-function list, or check it.
//!
//! crates/envoy-shim/link-order.txt names the functions the release shim runs;
//! the shim's build script has the linker place them together (why: that
//! build.rs). This task writes the file from a profile of the release shim,
//! built as the images build it, under the proxy bench's load (`--quick`):
//! - one run under `valgrind --tool=callgrind`, which sees every function
//!   that runs, start-up and shutdown included, on valgrind's CPU (no
//!   AVX-512, so aws-lc takes other assembly paths there);
//! - one run under `perf record` (cpu-clock samples), which sees the paths
//!   this machine's CPU takes, if perf is installed.
//!
//! `--check` builds the release shim and tells how many entries still name
//! one of its functions, failing under 90 %.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use anyhow::{Context as _, bail};
use clap::Args;

/// The file, from the workspace root.
const ORDER_FILE: &str = "crates/envoy-shim/link-order.txt";

/// Below this share of entries naming a function of the build, `--check` fails.
const FRESH_PERCENT: usize = 90;

/// Flags of `cargo xtask link-order`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Args)]
pub struct LinkOrderArgs {
    /// Do not profile: build the release shim and tell how much of the file names its functions.
    #[arg(long)]
    pub check: bool,
}

/// `cargo xtask link-order`.
pub fn run(args: &LinkOrderArgs) -> anyhow::Result<ExitCode> {
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
    let shim = build_release_shim()?;
    let file = crate::workspace_root().join(ORDER_FILE);
    if args.check {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        return check(&text, &shim);
    }

    let work = std::env::temp_dir().join(format!("meshid-link-order-{}", std::process::id()));
    std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    // `cargo bench` builds the shim again (with the bench's dev features)
    // over target/release: profile a copy of the one that ships.
    let bin = work.join("meshid-envoy-shim");
    std::fs::copy(&shim, &bin).with_context(|| format!("cannot copy {}", shim.display()))?;

    let mut ran = BTreeSet::new();
    let callgrind = profile(&work, &bin, Profiler::Callgrind)?;
    eprintln!(
        "link-order: {} functions ran under callgrind",
        callgrind.len()
    );
    ran.extend(callgrind);
    if crate::kind::find_tool("perf", path.as_deref()).is_some() {
        let perf = profile(&work, &bin, Profiler::Perf)?;
        eprintln!("link-order: {} functions sampled by perf", perf.len());
        ran.extend(perf);
    } else {
        eprintln!(
            "link-order: perf (Debian `linux-perf`) is not installed: only callgrind's run is \
             used, and this CPU's own assembly paths (AVX-512 under valgrind's) may be missed"
        );
    }

    let symbols = text_symbols(&bin)?;
    let entries: BTreeSet<String> = ran
        .iter()
        .filter(|name| symbols.contains(*name))
        .map(|name| entry(name))
        .collect();
    std::fs::write(&file, render(&entries))
        .with_context(|| format!("cannot write {}", file.display()))?;
    std::fs::remove_dir_all(&work).ok();
    eprintln!(
        "link-order: wrote {} entries to {ORDER_FILE} ({} of the binary's {} functions ran)",
        entries.len(),
        ran.iter().filter(|n| symbols.contains(*n)).count(),
        symbols.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// Builds the release agent and shim as `cargo xtask images --release` does
/// (features unify across one cargo call) and returns the shim's path.
fn build_release_shim() -> anyhow::Result<PathBuf> {
    let build = crate::images::RELEASE_BUILDS
        .iter()
        .find(|b| b.packages.contains(&"meshid-envoy-shim"))
        .context("the release set has no build of meshid-envoy-shim")?;
    crate::images::cargo_build(&crate::images::release_build_args(build), "release shim")?;
    Ok(crate::e2e::target_dir().join("release/meshid-envoy-shim"))
}

#[derive(Clone, Copy, Debug)]
enum Profiler {
    Callgrind,
    Perf,
}

/// Runs the proxy bench (`--quick`) with its two shims under `profiler` and
/// returns the names of the functions that ran.
fn profile(work: &Path, bin: &Path, profiler: Profiler) -> anyhow::Result<BTreeSet<String>> {
    let (name, out_dir) = match profiler {
        Profiler::Callgrind => ("callgrind", work.join("callgrind")),
        Profiler::Perf => ("perf", work.join("perf")),
    };
    std::fs::create_dir_all(&out_dir)?;
    // The bench starts the shim as MESHID_SHIM_BIN; `exec` keeps the pid,
    // so its SIGTERM at the end reaches the profiler, which stops the shim
    // and writes its data.
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
    let wrapper = work.join(format!("{name}-shim.sh"));
    std::fs::write(&wrapper, format!("#!/bin/sh\n{command}\n"))?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
    }
    let argv = [
        "bench",
        "-p",
        "meshid-envoy-shim",
        "--bench",
        "proxy",
        "--",
        "--quick",
    ];
    let log = work.join(format!("{name}-bench.log"));
    eprintln!(
        "link-order: {} with the shims under {name} (log: {})",
        crate::display_cargo(&argv),
        log.display()
    );
    let log_file = std::fs::File::create(&log)?;
    let status = crate::cargo(argv)
        .env("MESHID_SHIM_BIN", &wrapper)
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .status()
        .context("could not start cargo bench")?;
    if !status.success() {
        bail!(
            "the proxy bench under {name} failed ({status}); see {}",
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
    // The bench runs a client and a server shim.
    if files < 2 || names.is_empty() {
        bail!(
            "{name} left {files} profile(s) and {} function names in {}: the shims did not run \
             under it; see {}",
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

/// A symbol as the file names it: a legacy-mangled Rust symbol's hash (`17h`,
/// 16 hex digits, before the closing `E`) as `*`. Other names stay whole.
fn entry(symbol: &str) -> String {
    if let Some(head) = symbol.strip_suffix('E')
        && head.len() > 19
        && let Some((body, hash)) = head.split_at_checked(head.len() - 16)
        && body.ends_with("17h")
        && hash.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return format!("{body}*E");
    }
    symbol.to_owned()
}

/// The file: a header, then one entry per line, sorted.
fn render(entries: &BTreeSet<String>) -> String {
    let mut s = String::from(
        "# The functions the release meshid-envoy-shim ran under the proxy bench's load, which\n\
         # crates/envoy-shim/build.rs has the linker place together. A Rust symbol's hash is\n\
         # written `*`. Written by `cargo xtask link-order`; `cargo xtask link-order --check`\n\
         # tells how much of it the current release build still names.\n",
    );
    for e in entries {
        s.push_str(e);
        s.push('\n');
    }
    s
}

/// The entries of the file (its lines but comments and blank ones).
fn parse(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

/// `--check`: how many entries name a function of `shim`, and the size of
/// its `.text.hot`.
fn check(text: &str, shim: &Path) -> anyhow::Result<ExitCode> {
    let entries = parse(text);
    let symbols = text_symbols(shim)?;
    let (fresh, stale) = freshness(&entries, &symbols);
    let hot = hot_section_size(shim)?;
    let percent = if entries.is_empty() {
        0
    } else {
        fresh * 100 / entries.len()
    };
    println!(
        "{ORDER_FILE}: {fresh} of {} entries ({percent} %) name a function of {}; .text.hot holds \
         {} KiB",
        entries.len(),
        shim.display(),
        hot.map_or(0, |b| b / 1024)
    );
    for name in stale.iter().take(10) {
        println!("  not in this build: {name}");
    }
    if hot.is_none() {
        println!(
            "the binary has no .text.hot section: it was linked without the file (a debug build, \
             another target or linker, or MESHID_LINK_ORDER=0)"
        );
        return Ok(ExitCode::FAILURE);
    }
    if percent < FRESH_PERCENT {
        println!("under {FRESH_PERCENT} %: regenerate the file with `cargo xtask link-order`");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// How many entries name a symbol of `symbols`, and the ones that do not.
fn freshness<'a>(entries: &[&'a str], symbols: &BTreeSet<String>) -> (usize, Vec<&'a str>) {
    let hashed: BTreeSet<String> = symbols.iter().map(|s| entry(s)).collect();
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

    const HASHED: &str = "_ZN5tokio7runtime4task3raw4poll17h0a1b2c3d4e5f6789E";

    #[test]
    fn a_rust_symbol_is_named_without_its_hash() {
        assert_eq!(entry(HASHED), "_ZN5tokio7runtime4task3raw4poll17h*E");
        // C, assembly and v0 names stay whole; so does a name that only
        // looks like it ends in a hash.
        for name in [
            "aws_lc_0_47_0_aes_gcm_encrypt_avx512",
            "_RNvNtNtCs6d7GoaNTBIz_10std_detect6detect5cache21detect_and_initialize",
            "_ZN3foo17hnothexnothexnotE",
            "_ZN3foo16h0a1b2c3d4e5f6789E",
            "E",
        ] {
            assert_eq!(entry(name), name);
        }
    }

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
    fn the_committed_file_is_sorted_and_every_entry_is_a_symbol_name() {
        let text = std::fs::read_to_string(crate::workspace_root().join(ORDER_FILE)).unwrap();
        let entries = parse(&text);
        assert!(entries.len() > 500, "{} entries", entries.len());
        for e in &entries {
            assert!(
                e.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_$.*".contains(c)),
                "{e}"
            );
            assert!(!e.contains('*') || e.ends_with("17h*E"), "{e}");
        }
        let owned: BTreeSet<String> = entries.iter().map(|e| (*e).to_owned()).collect();
        assert_eq!(
            render(&owned),
            text,
            "not as `cargo xtask link-order` writes it"
        );
    }
}
