//! The e2e runner: `cargo xtask e2e` builds the binaries and runs this.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = meshid_tests::runner::Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshid-e2e: cannot start the runtime: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    std::process::ExitCode::from(rt.block_on(meshid_tests::runner::run(args)))
}
