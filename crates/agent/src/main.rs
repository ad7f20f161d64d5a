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
    // Spans of the last moments (the streams that just closed) go out too.
    telemetry::run_with(&TelemetryConfig::from_env("meshid-agent"), run(cli))
        .await
        .context("cannot set up logging")?
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    meshid_common::tls::install_crypto_provider();
    let config = Config::resolve(cli, &ProcessEnv)?;
    meshid_common::config::log_config("meshid-agent", &config);
    let app = App::build(config).await?;
    meshid_common::signal::serve_until_shutdown(|| app.shutdown())
        .await
        .context("cannot watch for SIGTERM or Ctrl-C")
}
