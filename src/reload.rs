//! Hot reload: every configured model's bundle is loaded afresh from its path and warmed up
//! beside the serving one, then the registry is swapped whole. SIGHUP and
//! `POST /admin/reload` trigger it.
//!
//! Nothing serving changes until the new bundles have all loaded and answered a warm-up
//! batch, so a broken bundle (missing, truncated, inconsistent metadata) leaves the old ones
//! serving and the reason is returned and logged. Requests hold the model they resolved
//! ([`crate::http::detection`]), so those in flight finish on the model they started on; the
//! old model's batching queue stops once the last of them is answered.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::http::AppState;
use crate::registry::{self, Registry, RegistryError};

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("a reload is already in progress")]
    InProgress,
    #[error("the daemon is not serving (models still loading, or shutting down)")]
    NotServing,
    #[error("the serving models stay: {0}")]
    Load(#[from] RegistryError),
    #[error("the serving models stay: the loading task failed: {0}")]
    Task(String),
}

impl ReloadError {
    /// The `result` label of `csgd_reloads_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            ReloadError::InProgress => "in_progress",
            ReloadError::NotServing => "not_serving",
            ReloadError::Load(_) | ReloadError::Task(_) => "failed",
        }
    }
}

/// What a reload did.
#[derive(Debug, Serialize)]
pub struct Reloaded {
    pub models: Vec<ModelVersion>,
    /// Loading and warming up the new bundles; the swap itself is immediate.
    pub took_ms: u64,
}

#[derive(Debug, Serialize)]
pub struct ModelVersion {
    pub name: String,
    pub path: PathBuf,
    pub version: String,
    /// The `name` stored in the bundle (which export it is).
    pub bundle_name: String,
    /// The version that served before, if the model did.
    pub previous_version: Option<String>,
}

/// Reloads every model; `trigger` ("sighup", "admin") labels the metric and the log.
pub async fn reload(state: &Arc<AppState>, trigger: &'static str) -> Result<Reloaded, ReloadError> {
    let result = match state.reloading.try_lock() {
        Ok(_one_at_a_time) => load_and_swap(state).await,
        Err(_) => Err(ReloadError::InProgress),
    };
    let outcome = match &result {
        Ok(done) => {
            tracing::info!(trigger, took_ms = done.took_ms, models = ?done.models.iter().map(|m| (&m.name, &m.version)).collect::<Vec<_>>(), "models reloaded");
            "ok"
        }
        Err(e) => {
            tracing::error!(trigger, error = %e, "reload failed");
            e.kind()
        }
    };
    state
        .metrics
        .reloads
        .with_label_values(&[trigger, outcome])
        .inc();
    result
}

async fn load_and_swap(state: &Arc<AppState>) -> Result<Reloaded, ReloadError> {
    if !state.is_ready() {
        return Err(ReloadError::NotServing);
    }
    let started = Instant::now();
    let settings = state.settings.clone();
    // No `preflight` here: `load_sessions` reads and checks each bundle's metadata before
    // creating its sessions, and the library is already loaded.
    let loaded = tokio::task::spawn_blocking(move || registry::load_sessions(&settings))
        .await
        .map_err(|e| ReloadError::Task(e.to_string()))??;
    // A shutdown may have begun while the bundles loaded; it owns the registry now.
    if !state.is_ready() {
        return Err(ReloadError::NotServing);
    }
    let fresh = Arc::new(registry::start(loaded, &state.settings, &state.metrics));
    let previous = state.registry.swap(Some(Arc::clone(&fresh)));
    if let Some(old) = &previous {
        forget_info_series(state, old, &fresh);
    }
    let models = fresh
        .iter()
        .map(|m| ModelVersion {
            name: m.name.clone(),
            path: m.path.clone(),
            version: m.meta.version.clone(),
            bundle_name: m.meta.name.clone(),
            previous_version: previous
                .as_ref()
                .and_then(|old| old.get(&m.name))
                .map(|old| old.meta.version.clone()),
        })
        .collect();
    Ok(Reloaded {
        models,
        took_ms: started.elapsed().as_millis() as u64,
    })
}

/// Drops the `csgd_model_info` series of replaced models whose labels (version, provider,
/// score, calibration) changed, so the metric lists what serves now.
fn forget_info_series(state: &AppState, old: &Registry, fresh: &Registry) {
    for model in old.iter() {
        let labels = model.info_labels();
        let still = fresh.iter().any(|m| m.info_labels() == labels);
        if !still {
            let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
            let _ = state.metrics.model_info.remove_label_values(&labels);
        }
    }
}

/// Reloads on every SIGHUP for as long as the daemon runs. The handler is installed at once,
/// so that a SIGHUP before the models are ready is refused (logged) rather than killing the
/// process, which is what SIGHUP does by default.
pub async fn on_sighup(state: Arc<AppState>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot install a SIGHUP handler; reload with POST /admin/reload");
                return;
            }
        };
        while hangups.recv().await.is_some() {
            let state = Arc::clone(&state);
            tokio::spawn(async move {
                // The outcome is logged and counted by `reload`.
                let _ = reload(&state, "sighup").await;
            });
        }
    }
    #[cfg(not(unix))]
    let _ = state;
}
