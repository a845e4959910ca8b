//! Request bodies to model inputs, for every front end that takes images: `/v1` detect and
//! explain, the Open Inference Protocol (`/v2`) and the sidecar proxy's guarded routes.
//!
//! Bodies are read under `server.body_limit_bytes` ([`read_body`]); encoded images are found
//! (multipart parts, base64 strings and data URLs) and preprocessed into the model's input on
//! the blocking pool. The `/v1` request forms, told apart by Content-Type ([`read_images`]):
//! - one image: `image/png`, `image/jpeg`, `application/octet-stream` or none (sniffed);
//! - a batch of images: `multipart/form-data` (one image per part), or `application/json`
//!   `{"images": ["<base64>", ...]}` (plain base64 or `data:image/png;base64,...`);
//! - a raw tensor: `application/json` `{"tensor": [...]}` shaped `[C, H, W]` or `[N, C, H, W]`,
//!   already normalised as the model's input spec says.
//!
//! The v2 tensors are read in [`super::v2`], the proxy's route-declared places in
//! `crate::proxy::extract`, both with the pieces here.

use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::header;
use axum::http::request::Parts;
use base64::Engine;
use http_body_util::BodyExt;
use serde_json::Value;

use super::{ApiError, AppState};
use crate::preprocess::{self, media_type};
use crate::registry::ServedModel;

/// An encoded image with its declared media type (None: sniff).
pub(crate) type Encoded = (Bytes, Option<String>);

/// A request's images, preprocessed into the model's input.
pub(super) struct Images {
    /// One normalised CHW tensor per image, in request order.
    pub tensors: Vec<Vec<f32>>,
    /// Whether the request was a batch form (answered with `{"results": [...]}`).
    pub batched: bool,
    /// Decoding and preprocessing of the whole request.
    pub preprocess: Duration,
}

/// The request after parsing, before preprocessing.
enum Inputs {
    /// Encoded images.
    Images(Vec<Encoded>),
    /// A JSON body (tensor or base64 images), parsed on the blocking pool.
    Json(Bytes),
}

/// Reads, decodes and preprocesses a `/v1` request's images for `model`, and records the
/// preprocessing time in the metrics. The image count is checked (and counted) on the
/// detection path, [`super::detection`].
pub(super) async fn read_images(
    state: &AppState,
    model: &ServedModel,
    parts: Parts,
    body: Body,
) -> Result<Images, ApiError> {
    let server = &state.settings.server;
    let bytes = read_body(body, server.body_limit_bytes, declared_length(&parts)).await?;
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let media = content_type.as_deref().map(media_type).unwrap_or_default();
    let max_images = server.max_images_per_request;
    let (inputs, mut batched) = match media.as_str() {
        "application/json" => (Inputs::Json(bytes), false),
        "multipart/form-data" => (
            Inputs::Images(multipart_images(parts, bytes, max_images, None).await?),
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
    let (tensors, json_batched) = match inputs {
        Inputs::Images(images) => {
            let inline_max = state.settings.threads.inline_decode_max_pixels;
            (
                preprocess_encoded(images, spec, max_pixels, inline_max).await?,
                false,
            )
        }
        Inputs::Json(bytes) => {
            blocking(move || preprocess_json(&bytes, &spec, max_pixels, max_images)).await?
        }
    };
    batched |= json_batched;
    let preprocess = pre_started.elapsed();
    state
        .metrics
        .preprocess_duration
        .with_label_values(&[model.name.as_str()])
        .observe(preprocess.as_secs_f64());
    Ok(Images {
        tensors,
        batched,
        preprocess,
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
) -> Result<Vec<Encoded>, ApiError> {
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

/// Runs CPU-bound request work (decoding, preprocessing, parsing) on the blocking pool, off
/// the I/O threads.
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::internal(format!("preprocessing task failed: {e}")))?
}

/// Decodes and preprocesses encoded images: right here when they are small enough
/// ([`decodes_inline`]), on the blocking pool otherwise.
pub(crate) async fn preprocess_encoded(
    images: Vec<Encoded>,
    spec: csg_bundle::InputSpec,
    max_pixels: u64,
    inline_max_pixels: u64,
) -> Result<Vec<Vec<f32>>, ApiError> {
    if decodes_inline(&images, &spec, inline_max_pixels) {
        preprocess_images(&images, &spec, max_pixels)
    } else {
        blocking(move || preprocess_images(&images, &spec, max_pixels)).await
    }
}

/// Whether decoding `images` is cheaper than handing them to the blocking pool: every
/// header readable, and the pixels decoded from and resized to (the image's or the model
/// input's, whichever is more), summed over the images, at most `max_pixels`
/// (`threads.inline_decode_max_pixels`; 0: never).
pub(crate) fn decodes_inline(
    images: &[Encoded],
    spec: &csg_bundle::InputSpec,
    max_pixels: u64,
) -> bool {
    if max_pixels == 0 {
        return false;
    }
    let input = (spec.height * spec.width) as u64;
    let mut total = 0u64;
    for (bytes, content_type) in images {
        let Some(pixels) = preprocess::declared_pixels(bytes, content_type.as_deref()) else {
            return false;
        };
        total = total.saturating_add(pixels.max(input));
        if total > max_pixels {
            return false;
        }
    }
    true
}

/// Decodes and preprocesses encoded images (blocking: call from the blocking pool, or
/// through [`preprocess_encoded`]).
pub(crate) fn preprocess_images(
    images: &[Encoded],
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

/// Base64 strings (or data URLs), each decoded and preprocessed (blocking).
pub(crate) fn preprocess_base64<'a>(
    items: impl ExactSizeIterator<Item = &'a Value>,
    spec: &csg_bundle::InputSpec,
    max_pixels: u64,
    max_images: usize,
) -> Result<Vec<Vec<f32>>, ApiError> {
    let n = items.len();
    if n > max_images {
        return Err(too_many_images(n, max_images));
    }
    let images = items
        .enumerate()
        .map(|(i, item)| decode_base64_image(item).map_err(|e| e.for_image(i, n)))
        .collect::<Result<Vec<_>, _>>()?;
    preprocess_images(&images, spec, max_pixels)
}

/// The tensors of a `/v1` JSON body, and whether it was a batch form.
fn preprocess_json(
    bytes: &[u8],
    spec: &csg_bundle::InputSpec,
    max_pixels: u64,
    max_images: usize,
) -> Result<(Vec<Vec<f32>>, bool), ApiError> {
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
        (None, Some(Value::Array(items))) => Ok((
            preprocess_base64(items.iter(), spec, max_pixels, max_images)?,
            true,
        )),
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

/// Base64 text, or a `data:<type>;base64,<text>` URL whose type is then the declared one.
pub(crate) fn decode_base64_image(item: &Value) -> Result<Encoded, ApiError> {
    let Value::String(text) = item else {
        return Err(ApiError::malformed(
            "each image must be a base64 string (or a data:<type>;base64,... URL)",
        ));
    };
    decode_base64_text(text)
}

/// [`decode_base64_image`] of a string.
pub(crate) fn decode_base64_text(text: &str) -> Result<Encoded, ApiError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn spec(side: usize) -> csg_bundle::InputSpec {
        csg_bundle::InputSpec {
            layout: "NCHW".into(),
            channels: 1,
            height: side,
            width: side,
            value_range: [0.0, 1.0],
            mean: vec![0.0],
            std: vec![1.0],
        }
    }

    fn png(width: u32, height: u32) -> Encoded {
        let image = image::DynamicImage::ImageLuma8(image::GrayImage::new(width, height));
        let mut out = Cursor::new(Vec::new());
        image.write_to(&mut out, image::ImageFormat::Png).unwrap();
        (Bytes::from(out.into_inner()), Some("image/png".into()))
    }

    #[test]
    fn small_requests_decode_inline_and_the_rest_on_the_pool() {
        let tiny = spec(28);
        // 28×28 images for a 28×28 model: five fit in 4,096 pixels, six do not.
        assert!(decodes_inline(&[png(28, 28)], &tiny, 4096));
        assert!(decodes_inline(&vec![png(28, 28); 5], &tiny, 4096));
        assert!(!decodes_inline(&vec![png(28, 28); 6], &tiny, 4096));
        // The image's own size counts when it is larger than the model's input...
        assert!(decodes_inline(&[png(64, 64)], &tiny, 4096));
        assert!(!decodes_inline(&[png(65, 64)], &tiny, 4096));
        // ...and the model's input when the image is smaller (the resize writes it).
        assert!(!decodes_inline(&[png(28, 28)], &spec(128), 4096));
        // 0 turns it off; an unreadable header goes to the pool, which reports it.
        assert!(!decodes_inline(&[png(28, 28)], &tiny, 0));
        let garbage = (Bytes::from_static(b"not an image"), None);
        assert!(!decodes_inline(&[garbage], &tiny, 4096));
    }
}
