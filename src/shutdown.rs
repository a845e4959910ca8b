//! Graceful shutdown: SIGTERM or SIGINT stops the listeners from accepting, lets requests in
//! flight finish for up to `server.shutdown_grace_seconds`, then the process exits.
//!
//! [`Shutdown`] is a broadcast flag: the signal handler (or a fatal start-up error) trips it,
//! and every server and background task waits on it.

use tokio::sync::watch;

/// A one-way flag shared by everything that must stop together.
#[derive(Clone, Debug)]
pub struct Shutdown {
    tx: watch::Sender<bool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    pub fn new() -> Self {
        Self {
            tx: watch::channel(false).0,
        }
    }

    /// Trips the flag (idempotent).
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    pub fn is_triggered(&self) -> bool {
        *self.tx.borrow()
    }

    /// Resolves once the flag is tripped.
    pub fn wait(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.tx.subscribe();
        async move {
            // An error means the sender is gone, which also means: stop.
            let _ = rx.wait_for(|&stop| stop).await;
        }
    }
}

/// Resolves on the first SIGTERM or SIGINT, returning its name. If a handler cannot be
/// installed the other still works (and the failure is logged).
pub async fn signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot install a SIGTERM handler");
                None
            }
        };
        let sigterm = async {
            match term.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        let sigint = async {
            if let Err(e) = tokio::signal::ctrl_c().await {
                tracing::warn!(error = %e, "cannot install a SIGINT handler");
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            () = sigterm => "SIGTERM",
            () = sigint => "SIGINT",
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "SIGINT"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiters_wake_on_trigger() {
        let s = Shutdown::new();
        let w1 = tokio::spawn(s.wait());
        let late = s.clone();
        assert!(!s.is_triggered());
        s.trigger();
        w1.await.unwrap();
        // A waiter created after the trigger returns at once.
        late.wait().await;
        assert!(late.is_triggered());
    }
}
