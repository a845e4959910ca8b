//! `csgd serve`: start-up order, the listeners, and shutdown.
//!
//! 1. Cheap checks that can fail (ONNX Runtime library, model files and their metadata) run
//!    before anything binds, so a broken deployment fails fast with the reason.
//! 2. The listeners bind (API, optional metrics port, optional sidecar proxy); `/health/live`
//!    answers at once, `/health/ready` says 503 (and guarded proxy routes cannot judge yet).
//! 3. Sessions are created and warmed up with a dummy batch on a blocking thread; then the
//!    batching tasks start and the daemon reports ready.
//! 4. SIGHUP (or `POST /admin/reload`) reloads the model bundles beside the serving ones and
//!    swaps them in ([`crate::reload`]).
//! 5. On SIGTERM/SIGINT: not ready any more, the listeners stop accepting, requests in flight
//!    finish for up to the grace period, the process exits. A model that fails to load also
//!    shuts the daemon down, with an error.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::config::{ConfigError, Settings};
use crate::http::{self, AppState};
use crate::metrics::{Metrics, MetricsError};
use crate::proxy::{self, Proxy};
use crate::registry::{self, RegistryError};
use crate::shutdown::{self, Shutdown};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("cannot listen on {addr} ({key}): {error}")]
    Bind {
        addr: SocketAddr,
        key: &'static str,
        error: std::io::Error,
    },
    #[error("a start-up task failed: {0}")]
    Task(String),
}

/// Runs the daemon until a signal (Ok) or a fatal error.
pub async fn run(settings: Settings) -> Result<(), ServerError> {
    let signal = shutdown::signal();
    tokio::pin!(signal);

    let metrics = Arc::new(Metrics::new()?);
    let preflight_settings = settings.clone();
    tokio::task::spawn_blocking(move || registry::preflight(&preflight_settings))
        .await
        .map_err(|e| ServerError::Task(e.to_string()))??;

    let listen = settings.server.listen_addr()?;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|error| ServerError::Bind {
            addr: listen,
            key: "server.listen",
            error,
        })?;
    let metrics_listener = match settings.server.metrics_addr()? {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|error| ServerError::Bind {
                    addr,
                    key: "server.metrics_listen",
                    error,
                })?,
        ),
        None => None,
    };
    let proxy_listener = if settings.proxy.enabled {
        let addr = settings.proxy.listen_addr()?;
        Some(
            TcpListener::bind(addr)
                .await
                .map_err(|error| ServerError::Bind {
                    addr,
                    key: "proxy.listen",
                    error,
                })?,
        )
    } else {
        None
    };

    let grace = settings.server.shutdown_grace();
    let state = AppState::new(settings, Arc::clone(&metrics));
    let stop = Shutdown::new();
    let hangups = tokio::spawn(crate::reload::on_sighup(Arc::clone(&state)));

    let local = listener.local_addr().unwrap_or(listen);
    tracing::info!(addr = %local, "csgd listening on http://{local}");
    let mut servers = tokio::task::JoinSet::new();
    let limits = state.settings.server.connection_limits();
    let listeners =
        1 + usize::from(metrics_listener.is_some()) + usize::from(proxy_listener.is_some());
    crate::listener::check_open_files(limits.max_connections, listeners);
    let serve = |servers: &mut tokio::task::JoinSet<Result<(), ServerError>>,
                 listener: TcpListener,
                 app: axum::Router,
                 which: &'static str| {
        let open = metrics.connections.with_label_values(&[which]);
        let stopped = stop.wait();
        servers.spawn(async move {
            crate::listener::serve(listener, app, limits, open, stopped).await;
            Ok(())
        });
    };
    serve(
        &mut servers,
        listener,
        http::router(Arc::clone(&state)),
        "api",
    );
    if let Some(listener) = metrics_listener {
        let addr = listener.local_addr().ok();
        if let Some(addr) = addr {
            tracing::info!(%addr, "metrics on http://{addr}/metrics");
        }
        let app = http::metrics_router(Arc::clone(&state));
        serve(&mut servers, listener, app, "metrics");
    }
    if let Some(listener) = proxy_listener {
        let proxy = Proxy::new(Arc::clone(&state))?;
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, upstream = proxy.upstream(), routes = state.settings.proxy.routes.len(), "proxy listening on http://{addr}");
        }
        serve(&mut servers, listener, proxy::router(proxy), "proxy");
    }

    let loader = tokio::spawn(load(Arc::clone(&state), Arc::clone(&metrics)));
    tokio::pin!(loader);
    let mut loader_done = false;
    let mut failure: Option<ServerError> = None;

    // Wait for a signal, a failed load, or a server that stopped on its own.
    loop {
        tokio::select! {
            name = &mut signal => {
                tracing::info!(signal = name, grace_seconds = grace.as_secs(), in_flight = metrics.in_flight.get(), "shutting down: finishing requests in flight");
                break;
            }
            result = &mut loader, if !loader_done => {
                loader_done = true;
                match result {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => { failure = Some(e); break; }
                    Err(e) => { failure = Some(ServerError::Task(e.to_string())); break; }
                }
            }
            Some(result) = servers.join_next() => {
                failure = Some(match result {
                    Ok(Err(e)) => e,
                    Ok(Ok(())) => ServerError::Task("a server stopped unexpectedly".into()),
                    Err(e) => ServerError::Task(e.to_string()),
                });
                break;
            }
        }
    }

    state.set_ready(false);
    hangups.abort();
    stop.trigger();
    if !loader_done {
        loader.abort();
    }
    let drained = tokio::time::timeout(grace, async {
        while let Some(result) = servers.join_next().await {
            if let Ok(Err(e)) = result {
                tracing::warn!(error = %e, "server error while draining");
            }
        }
    })
    .await;
    match drained {
        Ok(()) => tracing::info!("all requests finished; bye"),
        Err(_) => tracing::warn!(
            in_flight = metrics.in_flight.get(),
            "grace period over (server.shutdown_grace_seconds); abandoning requests in flight"
        ),
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Creates and warms up every model's sessions, starts the batchers, reports ready.
async fn load(state: Arc<AppState>, metrics: Arc<Metrics>) -> Result<(), ServerError> {
    let settings = state.settings.clone();
    let loaded = tokio::task::spawn_blocking(move || registry::load_sessions(&settings))
        .await
        .map_err(|e| ServerError::Task(e.to_string()))??;
    let registry = registry::start(loaded, &state.settings, &metrics);
    if state.registry.swap(Some(Arc::new(registry))).is_some() {
        return Err(ServerError::Task("models loaded twice".into()));
    }
    state.set_ready(true);
    tracing::info!("ready");
    Ok(())
}
