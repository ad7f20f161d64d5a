//! meshid-ca: parse the configuration, start the CA, wait for a signal.

use anyhow::Context;
use meshid_ca::{App, Config};
use meshid_common::telemetry::{self, TelemetryConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::from_args(std::env::args_os()).unwrap_or_else(|e| e.exit());
    telemetry::run_with(&TelemetryConfig::from_env("meshid-ca"), run(config))
        .await
        .context("telemetry set-up")?
}

async fn run(config: Config) -> anyhow::Result<()> {
    meshid_common::tls::install_crypto_provider();
    config.validate().context("invalid configuration")?;
    tracing::info!("meshid-ca configuration:\n{}", config.describe());
    let app = App::build(config).await.context("meshid-ca start-up")?;
    meshid_common::signal::serve_until_shutdown(|| app.shutdown())
        .await
        .context("cannot watch for SIGTERM or Ctrl-C")
}
