//! meshid-ca: parse the configuration, start the CA, wait for a signal.

use anyhow::Context;
use clap::Parser;
use meshid_ca::App;
use meshid_ca::config::{Cli, Config, ProcessEnv};
use meshid_common::telemetry::{self, TelemetryConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::run_with(&TelemetryConfig::from_env("meshid-ca"), run(cli))
        .await
        .context("telemetry set-up")?
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    meshid_common::tls::install_crypto_provider();
    let config = Config::resolve(cli, &ProcessEnv).context("invalid configuration")?;
    config.validate().context("invalid configuration")?;
    meshid_common::config::log_config("meshid-ca", &config);
    let app = App::build(config).await.context("meshid-ca start-up")?;
    meshid_common::signal::serve_until_shutdown(|| app.shutdown())
        .await
        .context("cannot watch for SIGTERM or Ctrl-C")
}
