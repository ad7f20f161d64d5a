//! Builds the docker backend's images from the binaries in target/debug
//! (`cargo xtask images` runs this after building them).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use meshid_tests::backend::docker::image;

#[derive(Debug, Parser)]
#[command(
    name = "meshid-images",
    about = "Build the meshid and Envoy images for the e2e docker backend"
)]
struct Args {
    /// Directory holding the component binaries (default: next to this program).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Rebuild even when an image is up to date.
    #[arg(long)]
    force: bool,
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
    let built = rt.block_on(image::ensure_all(&bin_dir, args.force))?;
    for b in [&built.mesh, &built.envoy] {
        println!("{b}  (also {}:{})", b.repository, image::DEV_TAG);
    }
    Ok(ExitCode::SUCCESS)
}
