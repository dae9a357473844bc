//! The one timer helper every driver needs: sleep until the core's next deadline, or forever
//! when it has none (so a `select!` branch on it never fires).

use tokio::time::Instant;

/// Sleeps until `deadline`; never returns without one.
pub(crate) async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
