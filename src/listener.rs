//! The accept loop of every listener (API, metrics port, sidecar proxy): hyper's HTTP/1
//! server with the limits a sidecar needs, which `axum::serve` does not set.
//!
//! - At most `server.max_connections` open connections. Beyond it new ones wait in the
//!   kernel's accept queue rather than each costing a task, buffers and a descriptor.
//! - `server.header_read_timeout_ms` for a request head: a client that sends its headers a
//!   byte at a time is cut off instead of holding a connection forever. hyper runs that clock
//!   while an idle keep-alive connection waits too, so it is also the idle timeout. (Slow
//!   bodies are bounded by `server.request_timeout_ms` on the detection routes.)
//! - `server.max_header_bytes` for a request head; a larger one is answered 431.
//! - On shutdown: the listener closes (new connections are refused), every connection
//!   finishes the request in flight and closes, and this returns once all are gone.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::connect_info::ConnectInfo;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

/// Per-connection limits, from `[server]`.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
}

/// Serves `app` on `listener` until `stop` resolves, then drains. Handlers see the client's
/// address as axum's `ConnectInfo<SocketAddr>` (the proxy passes it on in X-Forwarded-For).
/// `open` counts this listener's open connections.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    open: prometheus::IntGauge,
    stop: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut stop = std::pin::pin!(stop);
    loop {
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            () = &mut stop => break,
        };
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors, or a connection reset before it was accepted:
                    // nothing to do but wait a little and go on serving the others.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let _ = stream.set_nodelay(true);
        let service = app
            .clone()
            .map_request(move |mut request: hyper::Request<Incoming>| {
                request.extensions_mut().insert(ConnectInfo(remote));
                request
            });
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_buf_size(limits.max_header_bytes)
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
        let connection = graceful.watch(connection);
        let open = open.clone();
        open.inc();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%remote, error = %e, "connection closed with an error");
            }
            open.dec();
            drop(slot);
        });
    }
    // Closing the listener refuses new connections at once; those open finish their
    // request in flight (the caller bounds the wait with the grace period).
    drop(listener);
    graceful.shutdown().await;
}

/// The soft limit on open files of this process, if /proc says (Linux).
pub fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Connections fail with "too many open files" long before `max_connections` if the process
/// may not open that many descriptors; say so at start-up rather than under load.
pub fn check_open_files(max_connections: usize, listeners: usize) {
    // Each listener's connections count, plus the model files, logs and the runtime's own.
    let needed = (max_connections * listeners) as u64 + 64;
    if let Some(limit) = open_files_limit()
        && limit < needed
    {
        tracing::warn!(
            limit,
            needed,
            "the open-files limit (ulimit -n) is below server.max_connections × listeners; raise it (systemd: LimitNOFILE) or lower server.max_connections"
        );
    }
}
