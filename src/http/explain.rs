//! `POST /v1/explain` and `POST /v1/models/{name}/explain`: one image's explanation.
//!
//! The body is one image in any form detection takes. The answer is JSON (the verdict, the
//! ranked filters, both maps as numbers and, unless `png=false`, as inline PNG data URLs), or
//! with `Accept: image/png` the PNG of one map (`map=gated|cam`) alone. Query options:
//! `map`, `scale` (PNG upscaling factor), `png` (inline PNGs in JSON), `top` (other-class
//! filters listed). The body is read with [`super::input`]; resolving the model, admission,
//! the request timeout and the image count are the detection path's ([`super::detection`]).
//! The work runs on the model's explanation session, off the I/O threads; the detect routes
//! never touch it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::{Deserialize, Serialize};

use super::detection::{self, with_model};
use super::input::{self, Images};
use super::v1::ModelRef;
use super::{ApiError, AppState};
use crate::explain::render::{self, default_scale, max_scale};
use crate::explain::{DEFAULT_OTHER_FILTERS, ExplainError, Explanation, MapKind};
use crate::registry::ServedModel;

/// The query string.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExplainQuery {
    /// The map an `Accept: image/png` answer shows (default `gated`).
    map: Option<MapKind>,
    /// PNG upscaling factor (default: the shorter side reaches 224 pixels).
    scale: Option<u32>,
    /// Whether JSON carries the PNGs inline (default true).
    png: Option<bool>,
    /// How many other-class filters to list.
    top: Option<usize>,
}

type QueryResult = Result<Query<ExplainQuery>, QueryRejection>;

pub async fn explain_default(
    State(state): State<Arc<AppState>>,
    query: QueryResult,
    req: Request,
) -> Response {
    with_model(state, None, |state, model| async move {
        handle(&state, &model, query, req).await
    })
    .await
}

pub async fn explain_named(
    State(state): State<Arc<AppState>>,
    name: Result<Path<String>, PathRejection>,
    query: QueryResult,
    req: Request,
) -> Response {
    match name {
        Ok(Path(name)) => {
            with_model(state, Some(name), |state, model| async move {
                handle(&state, &model, query, req).await
            })
            .await
        }
        Err(e) => ApiError::malformed(format!("model name in path: {e}")).into_response(),
    }
}

/// Validated options.
#[derive(Clone, Copy)]
struct Options {
    map: MapKind,
    scale: u32,
    inline_png: bool,
    top: usize,
    as_png: bool,
}

fn options(
    query: QueryResult,
    model: &ServedModel,
    headers: &HeaderMap,
) -> Result<Options, ApiError> {
    let Query(q) = query.map_err(|e| bad_option(e.body_text()))?;
    let spec = &model.meta.input;
    let most = max_scale(spec);
    let scale = q.scale.unwrap_or_else(|| default_scale(spec));
    if !(1..=most).contains(&scale) {
        return Err(bad_option(format!(
            "scale must be 1 to {most} for this model's {}×{} input, got {scale}",
            spec.height, spec.width
        )));
    }
    let filters = model.meta.architecture.filters();
    let top = q.top.unwrap_or(DEFAULT_OTHER_FILTERS);
    if top > filters {
        return Err(bad_option(format!(
            "top must be 0 to {filters} (the model's filters), got {top}"
        )));
    }
    Ok(Options {
        map: q.map.unwrap_or(MapKind::Gated),
        scale,
        inline_png: q.png.unwrap_or(true),
        top,
        as_png: wants_png(headers),
    })
}

fn bad_option(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "bad_option", message)
}

/// True when the Accept header names `image/png` (or `image/*`) before any JSON or `*/*`
/// entry; quality values are not weighed. Without an Accept header the answer is JSON.
fn wants_png(headers: &HeaderMap) -> bool {
    let accept = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(crate::preprocess::media_type);
    for media in accept {
        match media.as_str() {
            "image/png" | "image/*" => return true,
            "application/json" | "application/*" | "*/*" => return false,
            _ => {}
        }
    }
    false
}

async fn handle(
    state: &AppState,
    model: &Arc<ServedModel>,
    query: QueryResult,
    req: Request,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let options = options(query, model, req.headers())?;
    if let Err(why) = &model.explain {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_explainable",
            why.clone(),
        ));
    }
    let _admitted = detection::admit(state)?;
    let (parts, body) = req.into_parts();
    let Images {
        mut tensors,
        preprocess,
        ..
    } = input::read_images(state, model, parts, body).await?;
    detection::count_images(state, model, tensors.len())?;
    let Some(tensor) = tensors.pop().filter(|_| tensors.is_empty()) else {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_images",
            "an explanation takes one image per request; send batches to detect",
        ));
    };
    let served = Arc::clone(model);
    let (explanation, inference, pngs) = tokio::task::spawn_blocking(move || {
        let Ok(session) = &served.explain else {
            return Err(ApiError::internal("the explanation session went away"));
        };
        let (explanation, inference) = session.explain(&tensor, options.top).map_err(internal)?;
        let spec = session.explainer().input_spec();
        let draw =
            |kind| render::overlay_png(&tensor, spec, explanation.maps.get(kind), options.scale);
        let pngs = if options.as_png {
            vec![(options.map, draw(options.map).map_err(internal)?)]
        } else if options.inline_png {
            [MapKind::Gated, MapKind::Cam]
                .into_iter()
                .map(|kind| Ok((kind, draw(kind).map_err(internal)?)))
                .collect::<Result<_, ApiError>>()?
        } else {
            Vec::new()
        };
        Ok((explanation, inference, pngs))
    })
    .await
    .map_err(|e| ApiError::internal(format!("explanation task failed: {e}")))??;

    if options.as_png {
        let png = pngs
            .into_iter()
            .next()
            .map(|(_, bytes)| bytes)
            .unwrap_or_default();
        return Ok(([(header::CONTENT_TYPE, "image/png")], png).into_response());
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let png = (!pngs.is_empty()).then(|| {
        pngs.into_iter()
            .map(|(kind, bytes)| {
                (
                    kind.name(),
                    format!("data:image/png;base64,{}", b64.encode(bytes)),
                )
            })
            .collect()
    });
    Ok(Json(ExplainResult {
        calibrated: model.detector.is_calibrated(),
        png,
        model: ModelRef::of(model),
        timings: Timings {
            preprocess_us: micros(preprocess),
            inference_us: micros(inference),
            total_us: micros(started.elapsed()),
        },
        explanation,
    })
    .into_response())
}

fn internal(e: ExplainError) -> ApiError {
    ApiError::internal(e.to_string())
}

fn micros(d: Duration) -> u64 {
    d.as_micros() as u64
}

#[derive(Serialize)]
struct ExplainResult {
    #[serde(flatten)]
    explanation: Explanation,
    calibrated: bool,
    /// `{"gated": "data:image/png;base64,…", "cam": …}`: the input with each map overlaid.
    #[serde(skip_serializing_if = "Option::is_none")]
    png: Option<std::collections::BTreeMap<&'static str, String>>,
    model: ModelRef,
    timings: Timings,
}

#[derive(Serialize)]
struct Timings {
    preprocess_us: u64,
    /// The explanation run (ONNX Runtime with the feature map, maps and ranking), without
    /// the wait for the model's explanation session or the PNG encoding.
    inference_us: u64,
    total_us: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn accept(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(header::ACCEPT, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn png_only_when_asked_for_before_json() {
        assert!(!wants_png(&HeaderMap::new()));
        assert!(wants_png(&accept(&["image/png"])));
        assert!(wants_png(&accept(&["text/html, image/*;q=0.8"])));
        assert!(wants_png(&accept(&["Image/PNG", "application/json"])));
        assert!(!wants_png(&accept(&["application/json, image/png"])));
        assert!(!wants_png(&accept(&["*/*"])));
        assert!(!wants_png(&accept(&["text/plain"])));
    }
}
