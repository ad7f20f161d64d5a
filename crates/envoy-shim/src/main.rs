//! meshid-envoy-shim: parse flags, start the proxy, wait for SIGTERM or
//! ctrl-c, drain.

use anyhow::Context;
use clap::Parser;
use meshid_common::{telemetry, tls};
use meshid_envoy_shim::{App, Cli};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let threads = cli.concurrency;
    let config = cli
        .into_config(|k| std::env::var(k).ok())
        .context("configuration")?;
    // One thread: a current-thread runtime (no work stealing, no handoffs).
    let mut rt = match threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n.max(1));
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let rt = rt.enable_all().build().context("tokio runtime")?;
    rt.block_on(async move {
        telemetry::run_with(
            &telemetry::TelemetryConfig::from_env("meshid-envoy-shim"),
            run(config),
        )
        .await
        .context("telemetry")?
    })
}

async fn run(config: meshid_envoy_shim::Config) -> anyhow::Result<()> {
    tls::install_crypto_provider();
    meshid_common::config::log_config("meshid-envoy-shim", &config);
    let app = App::build(config).await.context("starting the proxy")?;
    meshid_common::signal::serve_until_shutdown(|| app.shutdown())
        .await
        .context("cannot watch for SIGTERM or Ctrl-C")
}
