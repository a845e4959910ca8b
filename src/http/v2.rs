//! The Open Inference Protocol (KServe v2) on the API listener, so that clients written for
//! Triton, KServe or MLServer can ask csgd without changes.
//!
//! Each model takes one input per request: FP32 already normalised, shaped `[N, C, H, W]` (or
//! `[C, H, W]`), or BYTES shaped `[N]` holding encoded PNG/JPEG images (raw bytes in the binary
//! extension; base64 strings in JSON, which cannot hold raw bytes). It answers four outputs:
//! `logits` (FP32 `[N, classes]`), `predicted_class` (INT64), `score` (FP64, the verdict score)
//! and `is_adversarial` (BOOL; absent for an uncalibrated model, which cannot judge). Inference
//! goes through the same queue, limits and metrics as `/v1` (see [`super::detection`]; bodies are read with [`super::input`]).
//! Errors use the protocol's `{"error": "..."}` body; shape and datatype mistakes are 400.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::error::ErrorKind;
use super::{ApiError, AppState, detection, input};
use crate::oip::{self, Input, Output, OutputData, TensorData};
use crate::preprocess::{self, Format};
use crate::registry::ServedModel;

/// Names of the outputs every model answers, in order.
pub const OUTPUTS: [&str; 4] = ["logits", "predicted_class", "score", "is_adversarial"];

pub fn routes() -> axum::Router<Arc<AppState>> {
    axum::Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2/models/{name}", get(model_metadata))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route("/v2/models/{name}/infer", post(infer))
        .route("/v2/models/{name}/versions/{version}", get(model_metadata))
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(model_ready),
        )
        .route("/v2/models/{name}/versions/{version}/infer", post(infer))
}

/// An [`ApiError`] in the protocol's shape: `{"error": "..."}`, with 400 for every malformed
/// or mis-shaped request (the protocol has no 415/422), the other statuses kept.
pub struct V2Error(pub ApiError);

impl From<ApiError> for V2Error {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl IntoResponse for V2Error {
    fn into_response(self) -> Response {
        let e = self.0;
        let status = match e.status {
            StatusCode::UNPROCESSABLE_ENTITY | StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                StatusCode::BAD_REQUEST
            }
            s => s,
        };
        if status.is_server_error() {
            tracing::error!(kind = e.kind, %status, "{}", e.message);
        }
        let mut response = (status, Json(json!({ "error": e.message }))).into_response();
        if status == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response.extensions_mut().insert(ErrorKind(e.kind));
        response
    }
}

fn bad(kind: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, kind, message)
}

/// `(name, version)` from either route form.
type ModelPath = Result<Path<Vec<(String, String)>>, PathRejection>;

fn model_and_version(path: ModelPath) -> Result<(String, Option<String>), ApiError> {
    let Ok(Path(params)) = path else {
        return Err(ApiError::malformed("invalid model name or version in path"));
    };
    let get = |key: &str| {
        params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    let name = get("name").ok_or_else(|| ApiError::malformed("no model name in path"))?;
    Ok((name, get("version")))
}

/// The model a path names, checking the version when one is given.
fn find_model(state: &AppState, path: ModelPath) -> Result<Arc<ServedModel>, ApiError> {
    let (name, version) = model_and_version(path)?;
    let model = detection::resolve(state, Some(&name))?;
    if let Some(v) = version
        && v != model.meta.version
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_model",
            format!(
                "model {name:?} has no version {v:?}; it serves version {:?}",
                model.meta.version
            ),
        ));
    }
    Ok(model)
}

async fn server_metadata() -> Json<Value> {
    Json(json!({
        "name": "csgd",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data"],
    }))
}

async fn live() -> Json<Value> {
    Json(json!({ "live": true }))
}

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if state.is_ready() {
        Json(json!({ "ready": true })).into_response()
    } else {
        V2Error(ApiError::not_ready()).into_response()
    }
}

async fn model_ready(State(state): State<Arc<AppState>>, path: ModelPath) -> Response {
    match find_model(&state, path) {
        Ok(model) => detection::labelled(
            Json(json!({ "name": model.name, "ready": true })).into_response(),
            &model,
        ),
        Err(e) => V2Error(e).into_response(),
    }
}

async fn model_metadata(State(state): State<Arc<AppState>>, path: ModelPath) -> Response {
    let model = match find_model(&state, path) {
        Ok(m) => m,
        Err(e) => return V2Error(e).into_response(),
    };
    let spec = &model.meta.input;
    let detector = &model.detector;
    let mut outputs = vec![
        json!({"name": "logits", "datatype": "FP32", "shape": [-1, model.meta.classes.len()]}),
        json!({"name": "predicted_class", "datatype": "INT64", "shape": [-1]}),
        json!({"name": "score", "datatype": "FP64", "shape": [-1]}),
    ];
    if detector.is_calibrated() {
        outputs.push(json!({"name": "is_adversarial", "datatype": "BOOL", "shape": [-1]}));
    }
    let body = json!({
        "name": model.name,
        "versions": [model.meta.version],
        "platform": "onnxruntime_onnx",
        "inputs": [
            {"name": crate::runtime::INPUT_NAME, "datatype": "FP32",
             "shape": [-1, spec.channels, spec.height, spec.width]},
            {"name": "image_bytes", "datatype": "BYTES", "shape": [-1]},
        ],
        "outputs": outputs,
        "parameters": {
            "classes": model.meta.classes,
            "score": detector.score_name(),
            "calibrated": detector.is_calibrated(),
            "threshold": detector.calibration().and_then(|c| c.thresholds.get(detector.score_kind().name())),
            "input": spec,
        },
    });
    detection::labelled(Json(body).into_response(), &model)
}

async fn infer(State(state): State<Arc<AppState>>, path: ModelPath, req: Request) -> Response {
    let model = match find_model(&state, path) {
        Ok(m) => m,
        Err(e) => return V2Error(e).into_response(),
    };
    let run = handle_infer(&state, &model, req);
    detection::timed(&state, &model, run, |e| V2Error(e).into_response()).await
}

async fn handle_infer(
    state: &AppState,
    model: &ServedModel,
    req: Request,
) -> Result<Response, ApiError> {
    let server = &state.settings.server;
    let _admitted = detection::admit(state)?;
    let (parts, body) = req.into_parts();
    let declared = input::declared_length(&parts);
    let bytes = input::read_body(body, server.body_limit_bytes, declared).await?;
    let json_len = oip::header_length(
        parts
            .headers
            .get(oip::HEADER_LENGTH)
            .map(HeaderValue::as_bytes),
        bytes.len(),
    )
    .map_err(|e| bad("malformed", e.0))?;
    let spec = model.meta.input.clone();
    let (max_pixels, max_images) = (server.max_pixels, server.max_images_per_request);
    let (request, tensors) = input::blocking(move || {
        let request = oip::parse_request(&bytes, json_len).map_err(|e| bad("malformed", e.0))?;
        let input = request.input("").map_err(|e| bad("malformed", e.0))?;
        let tensors = input_tensors(input, &spec, max_pixels, max_images)?;
        Ok((request, tensors))
    })
    .await?;
    let calibrated = model.detector.is_calibrated();
    if let Some(asked) = &request.outputs {
        for o in asked {
            if !OUTPUTS.contains(&o.name.as_str()) {
                return Err(bad(
                    "unknown_output",
                    format!("unknown output {:?}; the model answers {OUTPUTS:?}", o.name),
                ));
            }
            if o.name == "is_adversarial" && !calibrated {
                return Err(bad(
                    "uncalibrated",
                    "is_adversarial: the model is not calibrated (csgd calibrate), so it cannot judge",
                ));
            }
        }
    }
    let results = detection::infer(state, model, tensors).await?;
    let n = results.len();
    let classes = model.meta.classes.len();
    let mut logits = Vec::with_capacity(n * classes);
    let (mut class, mut score, mut flag) = (Vec::new(), Vec::new(), Vec::new());
    for out in &results {
        let verdict = detection::verdict(state, model, out)?;
        let row = out.outputs.first().map_or(&[][..], Vec::as_slice);
        if row.len() != classes {
            return Err(ApiError::internal(format!(
                "logits have {} values, the model has {classes} classes",
                row.len()
            )));
        }
        logits.extend_from_slice(row);
        class.push(verdict.class_id as i64);
        score.push(verdict.score);
        flag.push(verdict.is_adversarial.unwrap_or(false));
    }
    let mut all = vec![
        Output {
            name: "logits".into(),
            shape: vec![n, classes],
            data: OutputData::Fp32(logits),
        },
        Output {
            name: "predicted_class".into(),
            shape: vec![n],
            data: OutputData::Int64(class),
        },
        Output {
            name: "score".into(),
            shape: vec![n],
            data: OutputData::Fp64(score),
        },
    ];
    if calibrated {
        all.push(Output {
            name: "is_adversarial".into(),
            shape: vec![n],
            data: OutputData::Bool(flag),
        });
    }
    if let Some(asked) = &request.outputs {
        all.retain(|o| asked.iter().any(|a| a.name == o.name));
    }
    let encoded = oip::encode_response(
        &model.name,
        &model.meta.version,
        request.id.as_ref(),
        &all,
        |name| request.wants_binary(name),
    );
    let mut response = encoded.body.into_response();
    let headers = response.headers_mut();
    match encoded.header_length {
        Some(n) => {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            headers.insert(oip::HEADER_LENGTH, HeaderValue::from(n));
        }
        None => {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
    }
    Ok(response)
}

/// One CHW tensor per image of a v2 input (blocking: decodes images). Shared with the proxy's
/// v2 guard.
pub(crate) fn input_tensors(
    input: &Input,
    spec: &csg_bundle::InputSpec,
    max_pixels: u64,
    max_images: usize,
) -> Result<Vec<Vec<f32>>, ApiError> {
    let name = &input.name;
    let (c, h, w) = (spec.channels, spec.height, spec.width);
    match &input.data {
        TensorData::Fp32(values) => {
            let n = match input.shape.as_slice() {
                [n, cc, hh, ww] if [*cc, *hh, *ww] == [c, h, w] && *n >= 1 => *n,
                [cc, hh, ww] if [*cc, *hh, *ww] == [c, h, w] => 1,
                shape => {
                    return Err(bad(
                        "wrong_shape",
                        format!(
                            "input {name:?} has shape {shape:?}; the model takes FP32 [N, {c}, {h}, {w}] (or BYTES [N] of encoded images)"
                        ),
                    ));
                }
            };
            if n > max_images {
                return Err(input::too_many_images(n, max_images));
            }
            if let Some(x) = values
                .iter()
                .find(|x| !crate::preprocess::acceptable_tensor_value(**x))
            {
                return Err(bad(
                    "wrong_shape",
                    format!(
                        "input {name:?} holds {x}, not a finite number within ±{} (tensors are normalised pixels)",
                        crate::preprocess::MAX_ABS_TENSOR_VALUE
                    ),
                ));
            }
            Ok(values.chunks(spec.len()).map(<[f32]>::to_vec).collect())
        }
        TensorData::Bytes(items) => {
            match input.shape.as_slice() {
                [_] | [_, 1] => {}
                shape => {
                    return Err(bad(
                        "wrong_shape",
                        format!(
                            "input {name:?} has shape {shape:?}; BYTES inputs hold one encoded image per element, shape [N] or [N, 1]"
                        ),
                    ));
                }
            }
            if items.len() > max_images {
                return Err(input::too_many_images(items.len(), max_images));
            }
            let n = items.len();
            items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    let image = encoded_image(item).map_err(|e| e.for_image(i, n))?;
                    preprocess::preprocess_image(&image, None, spec, max_pixels)
                        .map_err(|e| ApiError::from(e).for_image(i, n))
                })
                .collect()
        }
    }
}

/// A BYTES element: the image itself (binary extension) or its base64 text (JSON).
fn encoded_image(item: &[u8]) -> Result<Vec<u8>, ApiError> {
    if preprocess::image_format(None, item).is_ok_and(|f| matches!(f, Format::Png | Format::Jpeg)) {
        return Ok(item.to_vec());
    }
    let text = std::str::from_utf8(item).map_err(|_| {
        bad(
            "undecodable_image",
            "a BYTES element is neither a PNG/JPEG image nor base64 text",
        )
    })?;
    Ok(input::decode_base64_text(text)?.0.to_vec())
}
