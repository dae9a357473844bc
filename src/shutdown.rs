//! How a Warren process is asked to stop: the first SIGINT or SIGTERM asks for a graceful stop,
//! a second one for an immediate one. Each binary decides what those mean for it.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Cancels `graceful` on the first signal and `immediate` on the second. Run it as a task.
pub async fn watch_signals(graceful: CancellationToken, immediate: CancellationToken) {
    let (Ok(mut terminate), Ok(mut interrupt)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        warn!("cannot install signal handlers; stop with SIGKILL");
        return;
    };
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    info!("signal received: stopping gracefully (send it again to stop at once)");
    graceful.cancel();
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    immediate.cancel();
}
