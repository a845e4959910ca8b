//! `POST /v1/detect` and `POST /v1/models/{name}/detect`, and their classify-only twins
//! `POST /v1/classify` and `POST /v1/models/{name}/classify`.
//!
//! The request forms are those of [`super::input`]. One image (or a `[C, H, W]` tensor) is
//! answered with one result object; every batch form with `{"results": [...]}` in request
//! order. Resolving the model, the concurrency limit, the request timeout, the batching queue
//! and the verdicts (with their metrics) are the shared detection path, [`super::detection`];
//! this module only shapes v1's answers.
//!
//! Classify answers only the class and its probability: the same body handling, admission,
//! batching queue and session as detect, without the detector. It is for clients that only
//! want the prediction, and it is what the benchmarks compare detect against to isolate what
//! detection costs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::detection::{self, with_model};
use super::input::{self, Images};
use super::{ApiError, AppState};
use crate::batch::Output;
use crate::detect::Verdict;
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

async fn handle(
    state: &AppState,
    model: &ServedModel,
    req: Request,
    answer: Answer,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let _admitted = detection::admit(state)?;

    let (parts, body) = req.into_parts();
    let Images {
        tensors,
        batched,
        preprocess,
    } = input::read_images(state, model, parts, body).await?;
    let outputs = detection::infer(state, model, tensors).await?;

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
    #[derive(Serialize)]
    struct Batch<T> {
        results: Vec<T>,
    }
    // Sized for a detect answer (about 1 KB an image), so the buffer is not regrown and
    // copied as the answer is written (`Json` starts at 128 bytes).
    let mut body = Vec::with_capacity(1536 * results.len().max(1));
    let written = if batched || results.len() != 1 {
        serde_json::to_writer(&mut body, &Batch { results })
    } else {
        serde_json::to_writer(&mut body, &results[0])
    };
    match written {
        Ok(()) => ([(CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => ApiError::internal(format!("encoding the answer: {e}")).into_response(),
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
    let verdict = detection::verdict(state, model, out)?;
    let detector = &model.detector;
    Ok(ImageResult {
        calibrated: detector.is_calibrated(),
        model: ModelRef::of(model),
        timings: Timings::of(out, preprocess, total_us),
        verdict,
    })
}
