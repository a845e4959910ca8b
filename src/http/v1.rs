//! `POST /v1/detect` and `POST /v1/models/{name}/detect`.
//!
//! Request forms, told apart by Content-Type:
//! - one image: `image/png`, `image/jpeg`, `application/octet-stream` or none (sniffed);
//! - a batch of images: `multipart/form-data` (one image per part), or `application/json`
//!   `{"images": ["<base64>", ...]}` (plain base64 or `data:image/png;base64,...`);
//! - a raw tensor: `application/json` `{"tensor": [...]}` shaped `[C, H, W]` or `[N, C, H, W]`,
//!   already normalised as the model's input spec says.
//!
//! One image (or a `[C, H, W]` tensor) is answered with one result object; every batch form
//! with `{"results": [...]}` in request order. The body is read under
//! `server.body_limit_bytes`; decoding and preprocessing run on the blocking pool; images go
//! through the model's batching queue; the verdicts are computed here (they are cheap).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;

use super::{ApiError, AppState, ModelLabel, detection};
use crate::batch::Output;
use crate::detect::Verdict;
use crate::preprocess::{self, media_type};
use crate::registry::ServedModel;

pub async fn detect_default(State(state): State<Arc<AppState>>, req: Request) -> Response {
    detect(state, None, req).await
}

pub async fn detect_named(
    State(state): State<Arc<AppState>>,
    name: Result<Path<String>, PathRejection>,
    req: Request,
) -> Response {
    match name {
        Ok(Path(name)) => detect(state, Some(name), req).await,
        Err(e) => ApiError::malformed(format!("model name in path: {e}")).into_response(),
    }
}

/// Resolves the model, then runs the request under the request timeout; tags the response
/// with the model for the metrics.
async fn detect(state: Arc<AppState>, name: Option<String>, req: Request) -> Response {
    let model = match detection::resolve(&state, name.as_deref()) {
        Ok(m) => Arc::clone(m),
        Err(e) => return e.into_response(),
    };
    let timeout_ms = state.settings.server.request_timeout_ms;
    let run = handle(&state, &model, req);
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

/// The request after parsing, before preprocessing.
enum Inputs {
    /// Encoded images with their declared media type (None: sniff).
    Images(Vec<(Bytes, Option<String>)>),
    /// A JSON body (tensor or base64 images), parsed on the blocking pool.
    Json(Bytes),
}

async fn handle(state: &AppState, model: &ServedModel, req: Request) -> Result<Response, ApiError> {
    let started = Instant::now();
    let server = &state.settings.server;
    let _admitted = detection::admit(state)?;

    let (parts, body) = req.into_parts();
    let declared_len = detection::declared_length(&parts);
    let bytes = detection::read_body(body, server.body_limit_bytes, declared_len).await?;
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let media = content_type.as_deref().map(media_type).unwrap_or_default();
    let max_images = server.max_images_per_request;
    let (inputs, mut batched) = match media.as_str() {
        "application/json" => (Inputs::Json(bytes), false),
        "multipart/form-data" => (
            Inputs::Images(detection::multipart_images(parts, bytes, max_images, None).await?),
            true,
        ),
        _ if bytes.is_empty() => {
            return Err(ApiError::malformed(
                "empty request body: send an image, a multipart batch or JSON",
            ));
        }
        _ => (Inputs::Images(vec![(bytes, content_type)]), false),
    };

    let spec = model.meta.input.clone();
    let max_pixels = server.max_pixels;
    let pre_started = Instant::now();
    let (tensors, json_batched) = detection::blocking(move || match inputs {
        Inputs::Images(images) => Ok((
            detection::preprocess_images(&images, &spec, max_pixels)?,
            false,
        )),
        Inputs::Json(bytes) => preprocess_json(&bytes, &spec, max_pixels, max_images),
    })
    .await?;
    batched |= json_batched;
    let preprocess = pre_started.elapsed();
    state
        .metrics
        .preprocess_duration
        .with_label_values(&[model.name.as_str()])
        .observe(preprocess.as_secs_f64());
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
struct ModelRef {
    name: String,
    version: String,
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
        model: ModelRef {
            name: model.name.clone(),
            version: model.meta.version.clone(),
        },
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

type Prepared = (Vec<Vec<f32>>, bool);

fn preprocess_json(
    bytes: &[u8],
    spec: &csg_bundle::InputSpec,
    max_pixels: u64,
    max_images: usize,
) -> Result<Prepared, ApiError> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::malformed(format!("invalid JSON: {e}")))?;
    let Value::Object(mut fields) = value else {
        return Err(ApiError::malformed(
            "expected a JSON object {\"tensor\": [...]} or {\"images\": [\"<base64>\", ...]}",
        ));
    };
    match (fields.remove("tensor"), fields.remove("images")) {
        (Some(tensor), None) => {
            Ok(preprocess::tensor_from_json(&tensor, spec).map_err(ApiError::from)?)
        }
        (None, Some(Value::Array(items))) => {
            if items.len() > max_images {
                return Err(detection::too_many_images(items.len(), max_images));
            }
            let n = items.len();
            let images = items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    detection::decode_base64_image(item).map_err(|e| e.for_image(i, n))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let tensors = detection::preprocess_images(&images, spec, max_pixels)?;
            Ok((tensors, true))
        }
        (None, Some(_)) => Err(ApiError::malformed(
            "\"images\" must be an array of base64-encoded PNG or JPEG files",
        )),
        (Some(_), Some(_)) => Err(ApiError::malformed(
            "send either \"tensor\" or \"images\", not both",
        )),
        (None, None) => Err(ApiError::malformed(
            "expected a JSON object {\"tensor\": [...]} or {\"images\": [\"<base64>\", ...]}",
        )),
    }
}
