//! Lays out the release shim's hot code together (link-order.txt).
//!
//! The shim runs in every pod, and most of its resident set is pages of its
//! own code. The kernel maps a binary's code 64 KiB at a time around each
//! page the process touches (fault-around), so code that runs spread thinly
//! over the whole binary makes nearly all of it resident. link-order.txt
//! lists the functions that ran under load (`cargo xtask link-order` writes
//! it from a profile); this script has the linker place them first:
//! - Rust functions, written with their symbol hash as `*`, through a
//!   linker script that gathers their sections into `.text.hot`. The hash
//!   changes with cargo's feature unification and with every dependency
//!   update, so naming a function without it keeps the file valid across
//!   builds; where one name has several instances, all of them move.
//! - Everything else (aws-lc's C and assembly, std's v0 names) by exact
//!   name, through lld's symbol-ordering file, at the head of `.text`.
//!
//! Release builds for x86_64-unknown-linux-gnu only, whose linker is rustc's
//! lld; not when another linker is configured, and not when
//! `MESHID_LINK_ORDER=0` (to measure without it). The file is checked in
//! every build, so a malformed line fails CI, which builds no release.

use std::{env, fmt::Write as _, path::PathBuf};

const ORDER_FILE: &str = "link-order.txt";

fn main() {
    println!("cargo:rerun-if-changed={ORDER_FILE}");
    println!("cargo:rerun-if-env-changed=MESHID_LINK_ORDER");
    let text = std::fs::read_to_string(ORDER_FILE)
        .unwrap_or_else(|err| panic!("cannot read crates/envoy-shim/{ORDER_FILE}: {err}"));
    let (hashed, exact) = entries(&text);

    let var = |name: &str| env::var(name).unwrap_or_default();
    let release = var("PROFILE") == "release";
    let target = var("TARGET") == "x86_64-unknown-linux-gnu";
    let disabled = var("MESHID_LINK_ORDER") == "0";
    // Another linker (`target.*.linker`, `-C linker=`, `-fuse-ld=`) may not
    // know lld's flags or INSERT scripts.
    let other_linker = env::var_os("RUSTC_LINKER").is_some()
        || ["linker", "fuse-ld"]
            .iter()
            .any(|flag| var("CARGO_ENCODED_RUSTFLAGS").contains(flag));
    if !release || !target || disabled || other_linker {
        return;
    }

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

/// The entries of the file: Rust names with `*` for their hash, and exact
/// names. Panics on a line a linker script could not carry.
fn entries(text: &str) -> (Vec<&str>, Vec<&str>) {
    let (mut hashed, mut exact) = (Vec::new(), Vec::new());
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let ok = line
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_$.*".contains(c));
        assert!(
            ok,
            "crates/envoy-shim/{ORDER_FILE} line {}: `{line}` is not a symbol name \
             (letters, digits, `_`, `$`, `.`, `*`); regenerate it with `cargo xtask link-order`",
            n + 1
        );
        if line.contains('*') {
            hashed.push(line);
        } else {
            exact.push(line);
        }
    }
    (hashed, exact)
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
