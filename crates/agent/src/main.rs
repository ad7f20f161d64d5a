//! `meshid-agent`: parse the config, start the agent, stop on SIGTERM or Ctrl-C.

use anyhow::Context;
use clap::Parser;
use meshid_agent::App;
use meshid_agent::config::{Cli, Config, ProcessEnv};
use meshid_common::telemetry::{self, TelemetryConfig};

/// One thread: an agent serves one pod (a few SDS and Workload API streams
/// and a CSR now and then), so a single-threaded runtime keeps it small;
/// RSA key generation goes to the blocking pool.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let telemetry = telemetry::init(&TelemetryConfig::from_env("meshid-agent"))
        .context("cannot set up logging")?;
    let result = run(cli).await;
    // Spans of the last moments (the streams that just closed) go out too.
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
