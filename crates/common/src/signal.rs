//! How every meshid process learns it should stop.

/// Resolves on SIGTERM (Kubernetes, `timeout`, CI cancellation) or SIGINT
/// (Ctrl-C), whichever comes first. Errs only if neither can be watched.
pub async fn shutdown() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => Ok(()),
        r = tokio::signal::ctrl_c() => r,
    }
}

/// A component's life after start: waits for [`shutdown`], says so in the
/// log, then runs `stop` (the component's drain). Errs only if the signals
/// cannot be watched, before anything was stopped.
pub async fn serve_until_shutdown<F>(stop: impl FnOnce() -> F) -> std::io::Result<()>
where
    F: std::future::Future<Output = ()>,
{
    shutdown().await?;
    tracing::info!("shutting down");
    stop().await;
    Ok(())
}
