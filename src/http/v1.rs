//! `POST /v1/detect` and `POST /v1/models/{name}/detect`, the classify-only twins
//! `POST /v1/classify` and `POST /v1/models/{name}/classify`, and the plumbing every model
//! route shares: resolving the model, the concurrency limit, the request timeout and the
//! metrics label.
//!
//! The request forms are those of [`super::input`]. One image (or a `[C, H, W]` tensor) is
//! answered with one result object; every batch form with `{"results": [...]}` in request
//! order. Images go through the model's batching queue; the verdicts are computed here (they
//! are cheap).
//!
//! Classify answers only the class and its probability: the same body handling, admission,
//! batching queue and session as detect, without the detector. It is for clients that only
//! want the prediction, and it is what the benchmarks compare detect against to isolate what
//! detection costs.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tokio::sync::OwnedSemaphorePermit;

use super::input::{self, Images};
use super::{ApiError, AppState, ModelLabel};
use crate::batch::Output;
use crate::detect::{Sample, Verdict};
use crate::registry::ServedModel;

/// What a model route answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// The verdict: class, detector score and components, `is_adversarial`.
    Detect,
    /// The class and its probability only; the detector is not run.
    Classify,
}

pub async fn detect_default(State(state): State<Arc<AppState>>, req: Request) -> Response {
    serve(state, None, req, Answer::Detect).await
}

pub async fn detect_named(
    State(state): State<Arc<AppState>>,
    name: Result<Path<String>, PathRejection>,
    req: Request,
) -> Response {
    named(state, name, req, Answer::Detect).await
}

pub async fn classify_default(State(state): State<Arc<AppState>>, req: Request) -> Response {
    serve(state, None, req, Answer::Classify).await
}

pub async fn classify_named(
    State(state): State<Arc<AppState>>,
    name: Result<Path<String>, PathRejection>,
    req: Request,
) -> Response {
    named(state, name, req, Answer::Classify).await
}

async fn named(
    state: Arc<AppState>,
    name: Result<Path<String>, PathRejection>,
    req: Request,
    answer: Answer,
) -> Response {
    match name {
        Ok(Path(name)) => serve(state, Some(name), req, answer).await,
        Err(e) => ApiError::malformed(format!("model name in path: {e}")).into_response(),
    }
}

async fn serve(
    state: Arc<AppState>,
    name: Option<String>,
    req: Request,
    answer: Answer,
) -> Response {
    with_model(state, name, |state, model| async move {
        handle(&state, &model, req, answer).await
    })
    .await
}

/// Resolves the model (`None`: the default one), then runs `handle` under the request
/// timeout; tags the response with the model for the metrics.
pub(super) async fn with_model<F, Fut>(
    state: Arc<AppState>,
    name: Option<String>,
    handle: F,
) -> Response
where
    F: FnOnce(Arc<AppState>, Arc<ServedModel>) -> Fut,
    Fut: Future<Output = Result<Response, ApiError>>,
{
    let model = match resolve(&state, name.as_deref()) {
        Ok(m) => Arc::clone(m),
        Err(e) => return e.into_response(),
    };
    let timeout_ms = state.settings.server.request_timeout_ms;
    let run = handle(Arc::clone(&state), Arc::clone(&model));
    let mut response = match tokio::time::timeout(Duration::from_millis(timeout_ms), run).await {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => e.into_response(),
        Err(_) => ApiError::timeout(timeout_ms).into_response(),
    };
    response
        .extensions_mut()
        .insert(ModelLabel(model.name.clone()));
    response
}

fn resolve<'a>(state: &'a AppState, name: Option<&str>) -> Result<&'a Arc<ServedModel>, ApiError> {
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
    found.ok_or_else(|| {
        ApiError::unknown_model(name.unwrap_or(registry.default_name()), &registry.names())
    })
}

/// A request admitted under `server.max_concurrent_requests`, counted in the in-flight gauge
/// until dropped (however the request ends, timeouts included).
pub(super) struct Admission {
    _permit: OwnedSemaphorePermit,
    gauge: prometheus::IntGauge,
}

impl Admission {
    /// Admits a request, or answers 429 at once when the limit is reached.
    pub(super) fn new(state: &AppState) -> Result<Self, ApiError> {
        let permit = Arc::clone(&state.limiter)
            .try_acquire_owned()
            .map_err(|_| {
                ApiError::overloaded(format!(
                    "more than {} detection requests in progress (server.max_concurrent_requests); retry later",
                    state.settings.server.max_concurrent_requests
                ))
            })?;
        state.metrics.in_flight.inc();
        Ok(Self {
            _permit: permit,
            gauge: state.metrics.in_flight.clone(),
        })
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

async fn handle(
    state: &AppState,
    model: &ServedModel,
    req: Request,
    answer: Answer,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let _admitted = Admission::new(state)?;

    let (parts, body) = req.into_parts();
    let Images {
        tensors,
        batched,
        preprocess,
    } = input::read_images(state, model, parts, body).await?;
    let n = tensors.len();
    let replies = model.batcher.submit(tensors)?;
    let mut outputs = Vec::with_capacity(n);
    for reply in replies {
        let output = reply
            .await
            .map_err(|_| ApiError::internal("the inference thread stopped"))??;
        outputs.push(output);
    }

    let total_us = started.elapsed().as_micros() as u64;
    match answer {
        Answer::Detect => {
            let results: Vec<ImageResult> = outputs
                .iter()
                .map(|out| judge(state, model, out, preprocess, total_us))
                .collect::<Result<_, _>>()?;
            Ok(respond(results, batched))
        }
        Answer::Classify => {
            let results: Vec<ClassResult> = outputs
                .iter()
                .map(|out| classify(model, out, preprocess, total_us))
                .collect::<Result<_, _>>()?;
            Ok(respond(results, batched))
        }
    }
}

/// One object for a single image, `{"results": [...]}` for every batch form.
fn respond<T: Serialize>(results: Vec<T>, batched: bool) -> Response {
    if batched || results.len() != 1 {
        Json(serde_json::json!({ "results": results })).into_response()
    } else {
        Json(&results[0]).into_response()
    }
}

/// The classify answer for one image.
#[derive(Serialize)]
struct ClassResult {
    class_id: usize,
    label: String,
    probability: f32,
    model: ModelRef,
    timings: Timings,
}

fn classify(
    model: &ServedModel,
    out: &Output,
    preprocess: Duration,
    total_us: u64,
) -> Result<ClassResult, ApiError> {
    let Some(logits) = out.outputs.first() else {
        return Err(ApiError::internal("inference returned no outputs"));
    };
    let (class_id, probability) = crate::detect::scores::top_class(logits);
    let label = model
        .meta
        .classes
        .get(class_id)
        .cloned()
        .unwrap_or_else(|| class_id.to_string());
    Ok(ClassResult {
        class_id,
        label,
        probability,
        model: ModelRef::of(model),
        timings: Timings::of(out, preprocess, total_us),
    })
}

/// The answer for one image.
#[derive(Serialize)]
struct ImageResult {
    #[serde(flatten)]
    verdict: Verdict,
    /// False when the bundle has no calibration: `is_adversarial` and `threshold` are null.
    calibrated: bool,
    model: ModelRef,
    timings: Timings,
}

#[derive(Serialize)]
pub(super) struct ModelRef {
    name: String,
    version: String,
}

impl ModelRef {
    pub(super) fn of(model: &ServedModel) -> Self {
        Self {
            name: model.name.clone(),
            version: model.meta.version.clone(),
        }
    }
}

#[derive(Serialize)]
struct Timings {
    /// Decoding and preprocessing of the whole request.
    preprocess_us: u64,
    /// Wait in the batching queue.
    queue_us: u64,
    /// The ONNX Runtime call this image was part of.
    inference_us: u64,
    /// Images in that call.
    batch_size: usize,
    /// From the start of the request to the answer.
    total_us: u64,
}

impl Timings {
    fn of(out: &Output, preprocess: Duration, total_us: u64) -> Self {
        Self {
            preprocess_us: preprocess.as_micros() as u64,
            queue_us: out.queue.as_micros() as u64,
            inference_us: out.inference.as_micros() as u64,
            batch_size: out.batch_size,
            total_us,
        }
    }
}

fn judge(
    state: &AppState,
    model: &ServedModel,
    out: &Output,
    preprocess: Duration,
    total_us: u64,
) -> Result<ImageResult, ApiError> {
    let Some((logits, stages)) = out.outputs.split_first() else {
        return Err(ApiError::internal("inference returned no outputs"));
    };
    let detector = &model.detector;
    let verdict = detector.judge(&Sample {
        logits,
        stages: stages.iter().map(Vec::as_slice).collect(),
    });
    let m = &state.metrics;
    let label = match verdict.is_adversarial {
        Some(true) => "adversarial",
        Some(false) => "clean",
        None => "unjudged",
    };
    m.verdicts
        .with_label_values(&[model.name.as_str(), verdict.label.as_str(), label])
        .inc();
    if verdict.score.is_finite() {
        m.scores
            .with_label_values(&[model.name.as_str(), verdict.score_name])
            .observe(verdict.score);
    }
    Ok(ImageResult {
        calibrated: detector.is_calibrated(),
        model: ModelRef::of(model),
        timings: Timings::of(out, preprocess, total_us),
        verdict,
    })
}
