//! Links the functions a release binary runs together, at the head of its code.
//!
//! The agent and the shim run in every pod, and most of their resident set is
//! pages of their own code. The kernel maps a binary's code 64 KiB at a time
//! around each page a process touches (fault-around), so code that runs spread
//! thinly over the whole binary makes nearly all of it resident. A crate lists
//! the functions its binary runs under load in `link-order.txt` (`cargo xtask
//! link-order` writes it from a profile), and its build script calls [`link`],
//! which has the linker place them first:
//! - Rust functions, named with their symbol hash as `*`, through a linker
//!   script that gathers their sections into `.text.hot`. The hash changes
//!   with cargo's feature unification and with dependency updates, so a name
//!   without it stays valid across builds; where one name has several
//!   instances, all of them move.
//! - Everything else (aws-lc's C and assembly, std's v0 names) by exact name,
//!   through lld's symbol-ordering file, at the head of `.text`.
//!
//! Release builds for x86_64-unknown-linux-gnu with rustc 1.90 or newer only,
//! whose linker is rustc's own lld (older rustc links with the system's GNU
//! ld, which has no symbol-ordering file); not when another linker is
//! configured, and not when `MESHID_LINK_ORDER=0` (to measure without it).
//! The list is checked in every build, so a malformed line fails CI, which
//! builds no release.

use std::{env, fmt::Write as _, path::PathBuf};

/// The list's file name, beside the crate's Cargo.toml.
pub const ORDER_FILE: &str = "link-order.txt";

/// The build script's work: check the crate's `link-order.txt`, and in a
/// release build that can use it, pass the layout to the link of its bins.
/// Panics (failing the build) on a file that is missing or malformed.
pub fn link() {
    println!("cargo:rerun-if-changed={ORDER_FILE}");
    println!("cargo:rerun-if-env-changed=MESHID_LINK_ORDER");
    let var = |name: &str| env::var(name).unwrap_or_default();
    let crate_name = var("CARGO_PKG_NAME");
    let text = std::fs::read_to_string(ORDER_FILE)
        .unwrap_or_else(|err| panic!("cannot read {crate_name}'s {ORDER_FILE}: {err}"));
    let entries = parse(&text).unwrap_or_else(|err| panic!("{crate_name}'s {err}"));

    let release = var("PROFILE") == "release";
    let target = var("TARGET") == "x86_64-unknown-linux-gnu";
    let disabled = var("MESHID_LINK_ORDER") == "0";
    // Another linker (`target.*.linker`, `-C linker=`, `-fuse-ld=`) may not
    // know lld's flags or INSERT scripts.
    let other_linker = env::var_os("RUSTC_LINKER").is_some()
        || ["linker", "fuse-ld"]
            .iter()
            .any(|flag| var("CARGO_ENCODED_RUSTFLAGS").contains(flag));
    if !release || !target || disabled || other_linker || !rustc_links_with_lld() {
        return;
    }

    let (hashed, exact): (Vec<&str>, Vec<&str>) = entries.iter().partition(|e| e.contains('*'));
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let script = out.join("hot.ld");
    let ordering = out.join("symbol-order.txt");
    std::fs::write(&script, linker_script(&hashed)).expect("write hot.ld into OUT_DIR");
    std::fs::write(&ordering, exact.join("\n") + "\n").expect("write symbol-order.txt");
    println!("cargo:rustc-link-arg-bins=-Wl,-T,{}", script.display());
    println!(
        "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
        ordering.display()
    );
    // Names of another build's functions are expected; they are skipped.
    println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
}

/// Whether this rustc links x86_64-unknown-linux-gnu with its own lld, as
/// rustc does since 1.90.
fn rustc_links_with_lld() -> bool {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    match std::process::Command::new(rustc).arg("--version").output() {
        Ok(out) => version_at_least(&String::from_utf8_lossy(&out.stdout), (1, 90)),
        Err(_) => false,
    }
}

/// Whether `rustc --version` output ("rustc 1.95.0 (59807616e 2026-04-14)")
/// names `min` (major, minor) or newer.
fn version_at_least(version: &str, min: (u32, u32)) -> bool {
    let mut numbers = version
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .split(['.', '-'])
        .map(|n| n.parse::<u32>().ok());
    match (numbers.next().flatten(), numbers.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) >= min,
        _ => false,
    }
}

/// The entries of a list: its lines but comments (`#`) and blank ones, each
/// a symbol name a linker script can carry (letters, digits, `_`, `$`, `.`;
/// `*` only as a Rust hash, `17h*E` at the end).
pub fn parse(text: &str) -> Result<Vec<&str>, String> {
    let mut entries = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let chars_ok = line
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_$.*".contains(c));
        let star_ok = match line.find('*') {
            None => true,
            Some(at) => line.ends_with("17h*E") && at == line.len() - 2,
        };
        if !chars_ok || !star_ok {
            return Err(format!(
                "{ORDER_FILE} line {}: `{line}` is not a symbol name (letters, digits, `_`, `$`, \
                 `.`, and `*` only for a Rust symbol's hash); regenerate it with `cargo xtask \
                 link-order`",
                n + 1
            ));
        }
        entries.push(line);
    }
    Ok(entries)
}

/// A symbol as the list names it: a legacy-mangled Rust symbol's (`_ZN…`) hash (`17h`,
/// 16 hex digits, before the closing `E`) as `*`. Other names stay whole.
pub fn entry(symbol: &str) -> String {
    if let Some(head) = symbol.strip_suffix('E')
        && let Some((body, hash)) = head.split_at_checked(head.len().saturating_sub(16))
        && body.starts_with("_ZN")
        && body.ends_with("17h")
        && hash.len() == 16
        && hash.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return format!("{body}*E");
    }
    symbol.to_owned()
}

/// A script that only adds `.text.hot` before `.text` (INSERT keeps the
/// linker's own layout for everything else). LLVM puts a function it deems
/// cold in `.text.unlikely.<name>`, so both prefixes are matched.
fn linker_script(hashed: &[&str]) -> String {
    let mut s = String::from("SECTIONS\n{\n  .text.hot : {\n");
    for name in hashed {
        let _ = writeln!(s, "    *(.text.{name} .text.unlikely.{name})");
    }
    s.push_str("  }\n}\nINSERT BEFORE .text;\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rust_symbol_is_named_without_its_hash() {
        assert_eq!(
            entry("_ZN5tokio7runtime4task3raw4poll17h0a1b2c3d4e5f6789E"),
            "_ZN5tokio7runtime4task3raw4poll17h*E"
        );
        // C, assembly and v0 names stay whole; so do names that only look
        // like they end in a hash.
        for name in [
            "aws_lc_0_47_0_aes_gcm_encrypt_avx512",
            "_RNvNtNtCs6d7GoaNTBIz_10std_detect6detect5cache21detect_and_initialize",
            "_ZN3foo17hnothexnothexnotE",
            "_ZN3foo16h0a1b2c3d4e5f6789E",
            "17h0a1b2c3d4e5f6789E",
            "E",
            "",
        ] {
            assert_eq!(entry(name), name);
        }
    }

    #[test]
    fn a_list_holds_symbol_names_only() {
        let ok = "# header\n\n_ZN3foo3bar17h*E\naws_lc_0_47_0_SHA256\n  _RNvCs1_3std4main  \n";
        assert_eq!(
            parse(ok).unwrap(),
            [
                "_ZN3foo3bar17h*E",
                "aws_lc_0_47_0_SHA256",
                "_RNvCs1_3std4main"
            ]
        );
        for bad in [
            "foo bar",
            "foo)",
            "*(.text)",
            "_ZN3foo*3bar17h*E",
            "foo*",
            "a # comment",
        ] {
            let err = parse(bad).unwrap_err();
            assert!(
                err.contains("line 1") && err.contains("cargo xtask link-order"),
                "{err}"
            );
        }
    }

    #[test]
    fn the_script_only_inserts_the_hot_section() {
        let s = linker_script(&["_ZN3foo17h*E"]);
        assert_eq!(
            s,
            "SECTIONS\n{\n  .text.hot : {\n    *(.text._ZN3foo17h*E .text.unlikely._ZN3foo17h*E)\n  }\n}\nINSERT BEFORE .text;\n"
        );
    }

    #[test]
    fn lld_is_rustc_1_90_and_newer() {
        assert!(version_at_least(
            "rustc 1.95.0 (59807616e 2026-04-14)",
            (1, 90)
        ));
        assert!(version_at_least(
            "rustc 1.90.0-nightly (abc 2025-06-01)",
            (1, 90)
        ));
        assert!(version_at_least("rustc 2.0.0", (1, 90)));
        assert!(!version_at_least(
            "rustc 1.89.0 (29483883e 2025-08-04)",
            (1, 90)
        ));
        assert!(!version_at_least("", (1, 90)));
        assert!(!version_at_least("rustc x.y", (1, 90)));
    }
}
