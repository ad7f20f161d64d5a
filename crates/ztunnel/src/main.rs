//! `meshid-ztunnel`: parse the config, start the node proxy, stop on SIGTERM or Ctrl-C.

use anyhow::Context;
use clap::Parser;
use meshid_common::telemetry::{self, TelemetryConfig};
use meshid_ztunnel::App;
use meshid_ztunnel::config::{Cli, Config, ProcessEnv};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::run_with(&TelemetryConfig::from_env("meshid-ztunnel"), run(cli))
        .await
        .context("cannot set up logging")?
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    meshid_common::tls::install_crypto_provider();
    let config = Config::resolve(cli, &ProcessEnv)?;
    meshid_common::config::log_config("meshid-ztunnel", &config);
    let app = App::build(config).await?;
    meshid_common::signal::serve_until_shutdown(|| app.shutdown())
        .await
        .context("cannot watch for SIGTERM or Ctrl-C")
}
