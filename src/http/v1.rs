//! `POST /v1/detect` and `POST /v1/models/{name}/detect`.
//!
//! The request forms are those of [`super::input`]. One image (or a `[C, H, W]` tensor) is
//! answered with one result object; every batch form with `{"results": [...]}` in request
//! order. Resolving the model, the concurrency limit, the request timeout, the batching queue
//! and the verdicts (with their metrics) are the shared detection path, [`super::detection`];
//! this module only shapes v1's answers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::detection::{self, with_model};
use super::input::{self, Images};
use super::{ApiError, AppState};
use crate::batch::Output;
use crate::detect::Verdict;
use crate::registry::ServedModel;

pub async fn detect_default(State(state): State<Arc<AppState>>, req: Request) -> Response {
    with_model(state, None, |state, model| async move {
        handle(&state, &model, req).await
    })
    .await
}

pub async fn detect_named(
    State(state): State<Arc<AppState>>,
    name: Result<Path<String>, PathRejection>,
    req: Request,
) -> Response {
    match name {
        Ok(Path(name)) => {
            with_model(state, Some(name), |state, model| async move {
                handle(&state, &model, req).await
            })
            .await
        }
        Err(e) => ApiError::malformed(format!("model name in path: {e}")).into_response(),
    }
}

async fn handle(state: &AppState, model: &ServedModel, req: Request) -> Result<Response, ApiError> {
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
    let results: Vec<ImageResult> = outputs
        .iter()
        .map(|out| judge(state, model, out, preprocess, total_us))
        .collect::<Result<_, _>>()?;
    let response = if batched || results.len() != 1 {
        Json(serde_json::json!({ "results": results })).into_response()
    } else {
        Json(&results[0]).into_response()
    };
    Ok(response)
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
        timings: Timings {
            preprocess_us: preprocess.as_micros() as u64,
            queue_us: out.queue.as_micros() as u64,
            inference_us: out.inference.as_micros() as u64,
            batch_size: out.batch_size,
            total_us,
        },
        verdict,
    })
}
