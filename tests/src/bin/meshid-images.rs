//! Builds the images from the component binaries: by default (a debug
//! build) the docker backend's `meshid/mesh` and `meshid/envoy`, plus the
//! component images tagged `dev`; with `--release`, the release set alone
//! (`meshid/{ca,agent,ztunnel,envoy-shim}:<version>` and
//! `:<version>-<sha>`, each under 30 MB). Prints a size table.
//! `cargo xtask images [--release]` runs this after building the binaries.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use meshid_tests::backend::docker::image;

#[derive(Debug, Parser)]
#[command(
    name = "meshid-images",
    about = "Build meshid's component images, and the mesh and Envoy images of the e2e docker backend"
)]
struct Args {
    /// Directory holding the component binaries (default: next to this program).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Rebuild even when an image is up to date.
    #[arg(long)]
    force: bool,
    /// The binaries are a release build: build the release set only, tagged
    /// <version> and <version>-<git-sha>, and refuse an image of 30 MB or more.
    #[arg(long)]
    release: bool,
    /// Version the release images are tagged with.
    #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
    version: String,
    /// Git revision (short sha) for the tags and labels.
    #[arg(long, default_value = "unknown")]
    git_sha: String,
}

fn main() -> anyhow::Result<ExitCode> {
    let args = Args::parse();
    let bin_dir = match args.bin_dir {
        Some(d) => d,
        None => std::env::current_exe()?
            .parent()
            .map(PathBuf::from)
            .ok_or_else(|| anyhow::anyhow!("cannot tell where the binaries are; pass --bin-dir"))?,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        if !args.release {
            let built = image::ensure_all(&bin_dir, args.force).await?;
            for b in [&built.mesh, &built.envoy] {
                println!("{b}  (also {}:{})", b.repository, image::DEV_TAG);
            }
        }
        let components = image::ensure_components(
            &bin_dir,
            &args.version,
            &args.git_sha,
            args.release,
            args.force,
        )
        .await?;
        println!("\n{}", image::size_table(&components));
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}
