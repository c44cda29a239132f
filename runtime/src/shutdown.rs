//! SIGTERM and SIGINT as a cancellation token.
//!
//! The first signal cancels the root token: every subsystem drains within its bounded grace
//! period. A second signal exits at once, for an operator who does not want to wait.

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// Exit status after a second signal (128 + SIGINT, as shells report it).
const FORCED_EXIT_STATUS: i32 = 130;

/// Cancels `root` on the first SIGTERM or SIGINT; exits the process on the second.
pub fn cancel_on_signal(root: CancellationToken) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(
            signal = name,
            "shutting down gracefully; send it again to exit at once"
        );
        root.cancel();
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        tracing::warn!("second signal: exiting without finishing the drain");
        std::process::exit(FORCED_EXIT_STATUS);
    });
    Ok(())
}
