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
        let _telemetry =
            telemetry::init(&telemetry::TelemetryConfig::from_env("meshid-envoy-shim"))
                .context("telemetry")?;
        tls::install_crypto_provider();
        tracing::info!(
            config = %serde_yaml_ng::to_string(&config).unwrap_or_default(),
            "meshid-envoy-shim configuration"
        );
        let app = App::build(config).await.context("starting the proxy")?;
        shutdown_signal().await?;
        app.shutdown().await;
        Ok(())
    })
}

async fn shutdown_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for ctrl-c")?,
        _ = term.recv() => {}
    }
    tracing::info!("shutdown signal received");
    Ok(())
}
