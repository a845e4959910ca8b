//! The detection path shared by every front end: `/v1` detect, the Open Inference Protocol
//! (`/v2`) and the sidecar proxy's guarded routes.
//!
//! One place admits a request (concurrency limit, in-flight gauge), reads bodies under the
//! configured limit, turns encoded images into tensors, runs them through the model's batching
//! queue and judges the outputs, recording the same metrics whoever asked. The front ends only
//! differ in how they parse requests and shape answers.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::header;
use axum::http::request::Parts;
use base64::Engine;
use http_body_util::BodyExt;
use serde_json::Value;
use tokio::sync::OwnedSemaphorePermit;

use super::{ApiError, AppState};
use crate::batch::Output;
use crate::detect::{Sample, Verdict};
use crate::preprocess;
use crate::registry::ServedModel;

/// The model a request names (or the default), once the daemon is ready and not draining.
pub(crate) fn resolve<'a>(
    state: &'a AppState,
    name: Option<&str>,
) -> Result<&'a Arc<ServedModel>, ApiError> {
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

/// The Content-Length a request declares, if any.
pub(crate) fn declared_length(parts: &Parts) -> Option<u64> {
    parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// How much of an oversized body is still read (and thrown away) before answering 413. A
/// server that answers while the client is still sending and then closes the connection makes
/// the kernel reset it, and many clients then lose the answer; draining a bounded amount lets
/// them read the 413. Bodies beyond this are cut off.
const DRAIN_BYTES: u64 = 8 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(2);

/// Reads the body under `limit` bytes (`declared`: its Content-Length, if any).
pub(crate) async fn read_body(
    mut body: Body,
    limit: usize,
    declared: Option<u64>,
) -> Result<Bytes, ApiError> {
    if let Some(n) = declared
        && n > limit as u64
    {
        if n <= limit as u64 + DRAIN_BYTES {
            drain(body).await;
        }
        return Err(ApiError::body_too_large(limit));
    }
    let mut collected = Vec::with_capacity(declared.unwrap_or(0) as usize);
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|e| ApiError::malformed(format!("could not read the request body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            if collected.len() + data.len() > limit {
                drain(body).await;
                return Err(ApiError::body_too_large(limit));
            }
            collected.extend_from_slice(&data);
        }
    }
    Ok(Bytes::from(collected))
}

/// Reads and discards up to [`DRAIN_BYTES`] of what is left, for at most [`DRAIN_TIME`].
async fn drain(mut body: Body) {
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        let mut seen = 0u64;
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                seen += data.len() as u64;
                if seen > DRAIN_BYTES {
                    break;
                }
            }
        }
    })
    .await;
}

pub(crate) fn too_many_images(n: usize, max: usize) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::PAYLOAD_TOO_LARGE,
        "too_many_images",
        format!(
            "the request holds {n} images, more than server.max_images_per_request = {max}; split it or raise that key"
        ),
    )
}

/// The parts of a multipart body with their declared types; only parts named `field` when
/// one is given.
pub(crate) async fn multipart_images(
    parts: Parts,
    bytes: Bytes,
    max_images: usize,
    field: Option<&str>,
) -> Result<Vec<(Bytes, Option<String>)>, ApiError> {
    // The original parts keep the body-limit extension, so axum adds no limit of its own.
    let req = Request::from_parts(parts, Body::from(bytes));
    let mut multipart = Multipart::from_request(req, &())
        .await
        .map_err(|e| ApiError::malformed(format!("multipart body: {e}")))?;
    let mut images = Vec::new();
    while let Some(part) = multipart
        .next_field()
        .await
        .map_err(|e| ApiError::malformed(format!("multipart body: {e}")))?
    {
        if let Some(wanted) = field
            && part.name() != Some(wanted)
        {
            continue;
        }
        let content_type = part.content_type().map(str::to_owned);
        let data = part
            .bytes()
            .await
            .map_err(|e| ApiError::malformed(format!("multipart part: {e}")))?;
        if images.len() == max_images {
            return Err(too_many_images(images.len() + 1, max_images));
        }
        images.push((data, content_type));
    }
    Ok(images)
}

/// Decodes and preprocesses encoded images (blocking: call from the blocking pool).
pub(crate) fn preprocess_images(
    images: &[(Bytes, Option<String>)],
    spec: &csg_bundle::InputSpec,
    max_pixels: u64,
) -> Result<Vec<Vec<f32>>, ApiError> {
    let n = images.len();
    images
        .iter()
        .enumerate()
        .map(|(i, (bytes, content_type))| {
            preprocess::preprocess_image(bytes, content_type.as_deref(), spec, max_pixels)
                .map_err(|e| ApiError::from(e).for_image(i, n))
        })
        .collect()
}

/// Runs CPU-bound request work on the blocking pool, off the I/O threads.
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::internal(format!("preprocessing task failed: {e}")))?
}

/// Base64 text, or a `data:<type>;base64,<text>` URL whose type is then the declared one.
pub(crate) fn decode_base64_image(item: &Value) -> Result<(Bytes, Option<String>), ApiError> {
    let Value::String(text) = item else {
        return Err(ApiError::malformed(
            "each image must be a base64 string (or a data:<type>;base64,... URL)",
        ));
    };
    decode_base64_text(text)
}

/// [`decode_base64_image`] of a string.
pub(crate) fn decode_base64_text(text: &str) -> Result<(Bytes, Option<String>), ApiError> {
    let (content_type, data) = match text.strip_prefix("data:") {
        Some(rest) => match rest.split_once(',') {
            Some((header, data)) if header.ends_with(";base64") => {
                (Some(header.trim_end_matches(";base64").to_owned()), data)
            }
            _ => {
                return Err(ApiError::malformed(
                    "a data URL image must be data:<type>;base64,<data>",
                ));
            }
        },
        None => (None, text),
    };
    let data: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.as_bytes())
        .map_err(|e| ApiError::malformed(format!("invalid base64: {e}")))?;
    Ok((Bytes::from(bytes), content_type.filter(|t| !t.is_empty())))
}

/// Checks the image count, queues the tensors on the model and waits for every output.
pub(crate) async fn infer(
    state: &AppState,
    model: &ServedModel,
    tensors: Vec<Vec<f32>>,
) -> Result<Vec<Output>, ApiError> {
    let n = tensors.len();
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
    let Some((logits, stages)) = out.outputs.split_first() else {
        return Err(ApiError::internal("inference returned no outputs"));
    };
    let verdict = model.detector.judge(&Sample {
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
    Ok(verdict)
}
