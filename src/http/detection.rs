//! The detection path shared by every front end: `/v1` detect and explain, the Open Inference
//! Protocol (`/v2`) and the sidecar proxy's guarded routes.
//!
//! One place resolves the model, admits a request (concurrency limit, in-flight gauge), checks
//! and counts its images, runs them through the model's batching queue and judges the outputs,
//! recording the same metrics whoever asked. The front ends only differ in how they parse
//! requests (with [`super::input`]) and shape answers.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::response::{IntoResponse, Response};
use tokio::sync::OwnedSemaphorePermit;

use super::input::too_many_images;
use super::{ApiError, AppState, ModelLabel};
use crate::batch::Output;
use crate::detect::Verdict;
use crate::registry::ServedModel;

/// The model a request names (or the default), once the daemon is ready and not draining.
///
/// The caller holds the model for the whole request: a hot reload that swaps the registry
/// meanwhile does not change the model a request started on.
pub(crate) fn resolve(state: &AppState, name: Option<&str>) -> Result<Arc<ServedModel>, ApiError> {
    let registry = state.registry()?;
    if !state.is_ready() {
        return Err(ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the daemon is shutting down; retry on another instance",
        ));
    }
    let found = match name {
        Some(name) => registry.get(name),
        None => registry.default_model(),
    };
    found.cloned().ok_or_else(|| {
        ApiError::unknown_model(name.unwrap_or(registry.default_name()), &registry.names())
    })
}

/// Resolves the model (`None`: the default one), then runs `handle` under the request
/// timeout; tags the response with the model for the metrics. The `/v1` model routes' frame.
pub(crate) async fn with_model<F, Fut>(
    state: Arc<AppState>,
    name: Option<String>,
    handle: F,
) -> Response
where
    F: FnOnce(Arc<AppState>, Arc<ServedModel>) -> Fut,
    Fut: Future<Output = Result<Response, ApiError>>,
{
    let model = match resolve(&state, name.as_deref()) {
        Ok(m) => m,
        Err(e) => return e.into_response(),
    };
    let run = handle(Arc::clone(&state), Arc::clone(&model));
    timed(&state, &model, run, ApiError::into_response).await
}

/// Runs a model route's work under `server.request_timeout_ms`; its error (or the timeout)
/// is answered in the front end's shape by `error`, and the response tagged with the model.
pub(crate) async fn timed(
    state: &AppState,
    model: &ServedModel,
    run: impl Future<Output = Result<Response, ApiError>>,
    error: impl FnOnce(ApiError) -> Response,
) -> Response {
    let timeout_ms = state.settings.server.request_timeout_ms;
    let response = match tokio::time::timeout(Duration::from_millis(timeout_ms), run).await {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => error(e),
        Err(_) => error(ApiError::timeout(timeout_ms)),
    };
    labelled(response, model)
}

/// Tags a response with the model it concerns, for the metrics.
pub(crate) fn labelled(mut response: Response, model: &ServedModel) -> Response {
    response
        .extensions_mut()
        .insert(ModelLabel(model.name.clone()));
    response
}

/// Held while a detection request is processed: a slot of `server.max_concurrent_requests`
/// and a count in the in-flight gauge, both given back however the request ends (including
/// timeouts, which drop the future holding it).
pub(crate) struct Admitted {
    _permit: OwnedSemaphorePermit,
    gauge: prometheus::IntGauge,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Takes a concurrency slot, or answers 429 at once (waiting would only pile up latency).
pub(crate) fn admit(state: &AppState) -> Result<Admitted, ApiError> {
    let permit = Arc::clone(&state.limiter)
        .try_acquire_owned()
        .map_err(|_| {
            ApiError::overloaded(format!(
                "more than {} detection requests in progress (server.max_concurrent_requests); retry later",
                state.settings.server.max_concurrent_requests
            ))
        })?;
    let gauge = state.metrics.in_flight.clone();
    gauge.inc();
    Ok(Admitted {
        _permit: permit,
        gauge,
    })
}

/// Checks a request's image count (at least one, at most `server.max_images_per_request`)
/// and counts it in the images-per-request metric.
pub(crate) fn count_images(
    state: &AppState,
    model: &ServedModel,
    n: usize,
) -> Result<(), ApiError> {
    if n == 0 {
        return Err(ApiError::malformed("the request holds no image"));
    }
    let max_images = state.settings.server.max_images_per_request;
    if n > max_images {
        return Err(too_many_images(n, max_images));
    }
    state
        .metrics
        .images
        .with_label_values(&[model.name.as_str()])
        .observe(n as f64);
    Ok(())
}

/// Checks the image count, queues the tensors on the model and waits for every output.
pub(crate) async fn infer(
    state: &AppState,
    model: &ServedModel,
    tensors: Vec<Vec<f32>>,
) -> Result<Vec<Output>, ApiError> {
    let n = tensors.len();
    count_images(state, model, n)?;
    let replies = model.batcher.submit(tensors)?;
    let mut outputs = Vec::with_capacity(n);
    for reply in replies {
        let output = reply
            .await
            .map_err(|_| ApiError::internal("the inference thread stopped"))??;
        outputs.push(output);
    }
    Ok(outputs)
}

/// The verdict on one image's outputs, counted in the verdict and score metrics.
pub(crate) fn verdict(
    state: &AppState,
    model: &ServedModel,
    out: &Output,
) -> Result<Verdict, ApiError> {
    let sample = model
        .detector
        .sample(&out.outputs)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let verdict = model.detector.judge(&sample);
    model.verdict_metrics.record(
        &state.metrics,
        verdict.class_id,
        verdict.is_adversarial,
        verdict.score,
    );
    Ok(verdict)
}
