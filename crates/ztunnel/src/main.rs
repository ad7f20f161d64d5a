//! `meshid-ztunnel`: parse the config, start the node proxy, stop on SIGTERM or Ctrl-C.

use anyhow::Context;
use clap::Parser;
use meshid_common::telemetry::{self, TelemetryConfig};
use meshid_ztunnel::App;
use meshid_ztunnel::config::{Cli, Config, ProcessEnv};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let telemetry = telemetry::init(&TelemetryConfig::from_env("meshid-ztunnel"))
        .context("cannot set up logging")?;
    let result = run(cli).await;
    telemetry.shutdown().await;
    result
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    meshid_common::tls::install_crypto_provider();
    let config = Config::resolve(cli, &ProcessEnv)?;
    tracing::info!("configuration:\n{}", config.to_pretty_json());
    let app = App::build(config).await?;
    meshid_common::signal::shutdown()
        .await
        .context("cannot watch for SIGTERM or Ctrl-C")?;
    tracing::info!("shutting down");
    app.shutdown().await;
    Ok(())
}
