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
