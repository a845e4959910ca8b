//! From request bytes to the model's input tensor.
//!
//! Images (PNG, JPEG) are decoded with the `image` crate after their header has been checked
//! against the pixel limit, so a small file that declares a huge bitmap (a decompression bomb)
//! is refused before any memory is spent on it. They are then converted to the bundle's
//! [`InputSpec`]: grayscale or RGB, resized to H×W, scaled to `value_range`, normalised with
//! the per-channel mean and std, laid out CHW. Raw tensors (JSON arrays) are checked for shape
//! and finiteness and passed through, for clients that preprocess themselves.
//!
//! All functions are synchronous and CPU-bound; the HTTP layer runs them off its I/O threads,
//! except for images small enough that a hand-off would cost more than the work
//! (`threads.inline_decode_max_pixels`).

use std::io::Cursor;

use csg_bundle::InputSpec;
use image::codecs::png::PngDecoder;
use image::imageops::{self, FilterType};
use image::{DynamicImage, ImageFormat, ImageReader};
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PreprocessError {
    /// A media type this daemon does not decode (HTTP 415).
    #[error(
        "unsupported media type {0}: send image/png, image/jpeg, multipart/form-data or application/json"
    )]
    UnsupportedMediaType(String),
    /// The image header declares more pixels than allowed (HTTP 413).
    #[error(
        "image is {width}×{height} = {pixels} pixels, more than server.max_pixels = {max}; raise server.max_pixels to accept it"
    )]
    TooManyPixels {
        width: u32,
        height: u32,
        pixels: u64,
        max: u64,
    },
    /// The bytes are not a decodable image of the declared or sniffed format (HTTP 422).
    #[error("undecodable image: {0}")]
    Undecodable(String),
    /// An animated PNG (HTTP 422). Refused rather than judged on its default frame: a client
    /// behind the sidecar that shows or classifies another frame would see an image csgd never
    /// judged.
    #[error("animated PNG (APNG) is not supported: send a single still frame")]
    Animated,
    /// A tensor of the wrong shape or with non-finite values (HTTP 422).
    #[error("wrong tensor: {0}")]
    Shape(String),
}

/// Image formats this daemon decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Png,
    Jpeg,
}

impl Format {
    fn image_format(self) -> ImageFormat {
        match self {
            Format::Png => ImageFormat::Png,
            Format::Jpeg => ImageFormat::Jpeg,
        }
    }
}

/// The essence of a Content-Type header: lower-case type/subtype without parameters.
pub fn media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// Chooses the decoder: by the declared media type when it names an image format we decode,
/// by the bytes' signature when the type is absent or generic (`application/octet-stream`).
pub fn image_format(content_type: Option<&str>, bytes: &[u8]) -> Result<Format, PreprocessError> {
    let declared = content_type.map(media_type).filter(|t| !t.is_empty());
    match declared.as_deref() {
        Some("image/png") => Ok(Format::Png),
        Some("image/jpeg" | "image/jpg" | "image/pjpeg") => Ok(Format::Jpeg),
        None | Some("application/octet-stream") => match image::guess_format(bytes) {
            Ok(ImageFormat::Png) => Ok(Format::Png),
            Ok(ImageFormat::Jpeg) => Ok(Format::Jpeg),
            Ok(other) => Err(PreprocessError::UnsupportedMediaType(format!(
                "{} (sniffed)",
                other.to_mime_type()
            ))),
            Err(_) => Err(PreprocessError::UnsupportedMediaType(
                "(unrecognised bytes)".into(),
            )),
        },
        Some(other) => Err(PreprocessError::UnsupportedMediaType(other.to_owned())),
    }
}

/// Decodes an image, refusing it before decoding if its header declares more than
/// `max_pixels` pixels.
pub fn decode_image(
    bytes: &[u8],
    format: Format,
    max_pixels: u64,
) -> Result<DynamicImage, PreprocessError> {
    let undecodable = |e: image::ImageError| PreprocessError::Undecodable(e.to_string());
    let (width, height) = dimensions(bytes, format).map_err(undecodable)?;
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_pixels {
        return Err(PreprocessError::TooManyPixels {
            width,
            height,
            pixels,
            max: max_pixels,
        });
    }
    if pixels == 0 {
        return Err(PreprocessError::Undecodable("image has no pixels".into()));
    }
    // Belt and braces: the decoder itself refuses to allocate beyond what the checked
    // dimensions need (4 channels of 16 bits, plus slack).
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(width);
    limits.max_image_height = Some(height);
    limits.max_alloc = Some(pixels.saturating_mul(8).saturating_add(1 << 20));
    match format {
        Format::Png => {
            let decoder =
                PngDecoder::with_limits(Cursor::new(bytes), limits).map_err(undecodable)?;
            if decoder.is_apng().map_err(undecodable)? {
                return Err(PreprocessError::Animated);
            }
            DynamicImage::from_decoder(decoder).map_err(undecodable)
        }
        Format::Jpeg => {
            let mut reader = ImageReader::with_format(Cursor::new(bytes), ImageFormat::Jpeg);
            reader.limits(limits);
            reader.decode().map_err(undecodable)
        }
    }
}

/// Converts a decoded image to the model's input: CHW f32, `spec.len()` values.
pub fn image_to_tensor(image: &DynamicImage, spec: &InputSpec) -> Vec<f32> {
    let (w, h) = (spec.width as u32, spec.height as u32);
    // Already the model's size and 8-bit gray: the exact path calibration uses.
    if spec.channels == 1
        && let DynamicImage::ImageLuma8(gray) = image
        && gray.dimensions() == (w, h)
    {
        return normalise_gray_u8(gray.as_raw(), spec);
    }
    // Otherwise work in f32 in [0, 1] (keeps 16-bit precision); the Triangle filter widens
    // with the scale factor, so large images are area-averaged rather than aliased.
    let plane = spec.height * spec.width;
    let mut out = vec![0f32; spec.len()];
    if spec.channels == 1 {
        let mut gray = image.to_luma32f();
        if gray.dimensions() != (w, h) {
            gray = imageops::resize(&gray, w, h, FilterType::Triangle);
        }
        for (dst, &v) in out.iter_mut().zip(gray.as_raw()) {
            *dst = normalise(v, spec, 0);
        }
    } else {
        let mut rgb = image.to_rgb32f();
        if rgb.dimensions() != (w, h) {
            rgb = imageops::resize(&rgb, w, h, FilterType::Triangle);
        }
        for (i, px) in rgb.pixels().enumerate() {
            for c in 0..spec.channels.min(3) {
                if let Some(dst) = out.get_mut(c * plane + i) {
                    *dst = normalise(px.0[c], spec, c);
                }
            }
        }
    }
    out
}

/// Scales a value in [0, 1] to `value_range` and normalises it with channel `c`'s mean/std.
fn normalise(unit: f32, spec: &InputSpec, c: usize) -> f32 {
    let [lo, hi] = spec.value_range;
    let mean = spec.mean.get(c).copied().unwrap_or(0.0);
    let std = spec.std.get(c).copied().unwrap_or(1.0);
    (lo + unit * (hi - lo) - mean) / std
}

/// Normalises 8-bit grayscale pixels already at the model's size (e.g. 28×28 IDX images) to
/// the model input: v/255 scaled to `value_range`, minus mean, over std. For a model with
/// several channels the gray value is repeated in each (with that channel's mean/std), so the
/// result has `spec.channels × pixels.len()` values, channel-major.
pub fn normalise_gray_u8(pixels: &[u8], spec: &InputSpec) -> Vec<f32> {
    let channels = spec.channels.max(1);
    let mut out = Vec::with_capacity(channels * pixels.len());
    for c in 0..channels {
        out.extend(
            pixels
                .iter()
                .map(|&p| normalise(f32::from(p) / 255.0, spec, c)),
        );
    }
    out
}

/// The pixel count an encoded image's header declares, or `None` when the format or header
/// cannot be read (decoding it would then fail with the reason). Costs a header parse, not a
/// decode: callers use it to judge how much work a decode will be.
pub fn declared_pixels(bytes: &[u8], content_type: Option<&str>) -> Option<u64> {
    let format = image_format(content_type, bytes).ok()?;
    let (width, height) = dimensions(bytes, format).ok()?;
    Some(u64::from(width) * u64::from(height))
}

/// Width and height as the image's header declares them, read without decoding.
fn dimensions(bytes: &[u8], format: Format) -> Result<(u32, u32), image::ImageError> {
    ImageReader::with_format(Cursor::new(bytes), format.image_format()).into_dimensions()
}

/// Decodes and converts one image in one step.
pub fn preprocess_image(
    bytes: &[u8],
    content_type: Option<&str>,
    spec: &InputSpec,
    max_pixels: u64,
) -> Result<Vec<f32>, PreprocessError> {
    let format = image_format(content_type, bytes)?;
    let image = decode_image(bytes, format, max_pixels)?;
    Ok(image_to_tensor(&image, spec))
}

/// A raw tensor in the model's input shape, `[C, H, W]` (one image) or `[N, C, H, W]`.
/// Returns one CHW vector per image and whether the input was batched.
pub fn tensor_from_json(
    value: &Value,
    spec: &InputSpec,
) -> Result<(Vec<Vec<f32>>, bool), PreprocessError> {
    let mut shape = Vec::new();
    let mut cursor = value;
    while let Value::Array(items) = cursor {
        shape.push(items.len());
        match items.first() {
            Some(first) => cursor = first,
            None => break,
        }
        if shape.len() > 4 {
            break;
        }
    }
    let want = [spec.channels, spec.height, spec.width];
    let batched = match shape.len() {
        3 if shape[..] == want => false,
        4 if shape[1..] == want && shape[0] >= 1 => true,
        _ => {
            return Err(PreprocessError::Shape(format!(
                "shape {shape:?}; the model takes [{c}, {h}, {w}] or [N, {c}, {h}, {w}] (C, H, W = channels, height, width)",
                c = spec.channels,
                h = spec.height,
                w = spec.width
            )));
        }
    };
    let mut flat = Vec::with_capacity(shape.iter().product());
    flatten(value, &shape, 0, &mut flat)?;
    let per_image = spec.len();
    let images = flat.chunks(per_image).map(<[f32]>::to_vec).collect();
    Ok((images, batched))
}

/// Largest magnitude accepted in a raw tensor. Tensors arrive normalised (a pixel in [0, 1]
/// minus a mean, over a std: single digits); far larger values are a client bug or an attack
/// on the arithmetic (overflow to ∞ in the first layers, NaN logits), refused rather than
/// answered with a meaningless verdict.
pub const MAX_ABS_TENSOR_VALUE: f32 = 1e4;

/// Whether `x` may be fed to a model as a raw tensor value.
pub fn acceptable_tensor_value(x: f32) -> bool {
    x.is_finite() && x.abs() <= MAX_ABS_TENSOR_VALUE
}

/// Depth-first flattening that checks every sub-array has the shape of the first.
fn flatten(
    value: &Value,
    shape: &[usize],
    depth: usize,
    out: &mut Vec<f32>,
) -> Result<(), PreprocessError> {
    if depth == shape.len() {
        let x = value
            .as_f64()
            .ok_or_else(|| PreprocessError::Shape(format!("{value} is not a number")))?;
        let x = x as f32;
        if !acceptable_tensor_value(x) {
            return Err(PreprocessError::Shape(format!(
                "{value} is not a finite number within ±{MAX_ABS_TENSOR_VALUE} (tensors are normalised pixels)"
            )));
        }
        out.push(x);
        return Ok(());
    }
    match value {
        Value::Array(items) if items.len() == shape[depth] => {
            for item in items {
                flatten(item, shape, depth + 1, out)?;
            }
            Ok(())
        }
        Value::Array(items) => Err(PreprocessError::Shape(format!(
            "ragged tensor: an array of length {} at depth {depth} where {} was expected",
            items.len(),
            shape[depth]
        ))),
        other => Err(PreprocessError::Shape(format!(
            "expected an array at depth {depth}, found {}",
            kind(other)
        ))),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
#[path = "testing/png_bomb.rs"]
mod png_bomb;

#[cfg(test)]
mod tests {
    use super::png_bomb::png_bomb;
    use super::*;
    use image::{GrayImage, ImageBuffer, Luma, Rgb, RgbImage};
    use serde_json::json;

    fn gray_spec(h: usize, w: usize) -> InputSpec {
        InputSpec {
            layout: "NCHW".into(),
            channels: 1,
            height: h,
            width: w,
            value_range: [0.0, 1.0],
            mean: vec![0.5],
            std: vec![0.25],
        }
    }

    fn png(img: &DynamicImage) -> Vec<u8> {
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
            .unwrap();
        out
    }

    #[test]
    fn normalises_gray_bytes() {
        let spec = gray_spec(1, 3);
        let v = normalise_gray_u8(&[0, 255, 51], &spec);
        assert_eq!(v.len(), 3);
        assert!((v[0] - (-2.0)).abs() < 1e-6);
        assert!((v[1] - 2.0).abs() < 1e-6);
        assert!((v[2] - (0.2 - 0.5) / 0.25).abs() < 1e-6);
        let mut rgb = spec.clone();
        rgb.channels = 3;
        rgb.mean = vec![0.0, 0.5, 1.0];
        rgb.std = vec![1.0, 1.0, 1.0];
        let v = normalise_gray_u8(&[255], &rgb);
        assert_eq!(v, vec![1.0, 0.5, 0.0]);
    }

    #[test]
    fn png_at_model_size_matches_byte_path() {
        let spec = gray_spec(28, 28);
        let pixels: Vec<u8> = (0..28 * 28).map(|i| (i * 7 % 256) as u8).collect();
        let img = DynamicImage::ImageLuma8(GrayImage::from_raw(28, 28, pixels.clone()).unwrap());
        let t = preprocess_image(&png(&img), Some("image/png"), &spec, 1 << 20).unwrap();
        assert_eq!(t, normalise_gray_u8(&pixels, &spec));
        // Sniffed without a content type, and RGB of equal channels gives the same gray.
        let t2 = preprocess_image(&png(&img), None, &spec, 1 << 20).unwrap();
        assert_eq!(t, t2);
        let rgb = DynamicImage::ImageRgb8(RgbImage::from_fn(28, 28, |x, y| {
            let v = pixels[(y * 28 + x) as usize];
            Rgb([v, v, v])
        }));
        let t3 = preprocess_image(&png(&rgb), None, &spec, 1 << 20).unwrap();
        let max_diff = t
            .iter()
            .zip(&t3)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(max_diff < 0.03, "{max_diff}");
    }

    #[test]
    fn resizes_and_converts_to_rgb() {
        let mut spec = gray_spec(4, 4);
        spec.channels = 3;
        spec.mean = vec![0.0; 3];
        spec.std = vec![1.0; 3];
        spec.value_range = [0.0, 255.0];
        let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(40, 20, Rgb([255, 0, 128])));
        let mut jpeg = Vec::new();
        img.write_to(&mut Cursor::new(&mut jpeg), ImageFormat::Jpeg)
            .unwrap();
        let t = preprocess_image(&jpeg, Some("image/jpeg; q=1"), &spec, 1 << 20).unwrap();
        assert_eq!(t.len(), 3 * 16);
        let mean = |c: usize| t[c * 16..(c + 1) * 16].iter().sum::<f32>() / 16.0;
        assert!((mean(0) - 255.0).abs() < 8.0, "{}", mean(0));
        assert!(mean(1).abs() < 8.0);
        assert!((mean(2) - 128.0).abs() < 8.0);
        // Gray from a 16-bit PNG keeps its precision.
        let gray16: ImageBuffer<Luma<u16>, Vec<u16>> = ImageBuffer::from_pixel(8, 8, Luma([32768]));
        let g = preprocess_image(
            &png(&DynamicImage::ImageLuma16(gray16)),
            Some("image/png"),
            &gray_spec(4, 4),
            1 << 20,
        )
        .unwrap();
        assert!(
            g.iter()
                .all(|v| (v - (32768.0 / 65535.0 - 0.5) / 0.25).abs() < 1e-3)
        );
    }

    #[test]
    fn refuses_too_many_pixels_before_decoding() {
        let bomb = png_bomb(100_000, 100_000);
        let err = preprocess_image(&bomb, None, &gray_spec(28, 28), 16_000_000).unwrap_err();
        assert!(
            matches!(
                err,
                PreprocessError::TooManyPixels {
                    pixels: 10_000_000_000,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("server.max_pixels"));
    }

    #[test]
    fn refuses_animated_png_and_converts_cmyk_jpeg() {
        let animated = include_bytes!("../tests/data/hostile/animated.png");
        let err = preprocess_image(animated, None, &gray_spec(28, 28), 1 << 20).unwrap_err();
        assert_eq!(err, PreprocessError::Animated);
        let cmyk = include_bytes!("../tests/data/hostile/cmyk.jpg");
        let image = decode_image(cmyk, Format::Jpeg, 1 << 20).unwrap();
        assert_eq!((image.width(), image.height()), (28, 28));
    }

    #[test]
    fn media_types_and_garbage() {
        let spec = gray_spec(2, 2);
        let err = preprocess_image(b"hello", Some("text/plain"), &spec, 100).unwrap_err();
        assert!(matches!(err, PreprocessError::UnsupportedMediaType(_)));
        let err = preprocess_image(b"GIF89a....", None, &spec, 100).unwrap_err();
        assert!(
            matches!(err, PreprocessError::UnsupportedMediaType(_)),
            "{err:?}"
        );
        let err = preprocess_image(b"hello", None, &spec, 100).unwrap_err();
        assert!(matches!(err, PreprocessError::UnsupportedMediaType(_)));
        let err = preprocess_image(b"\x89PNG\r\n\x1a\ngarbage", Some("image/png"), &spec, 100)
            .unwrap_err();
        assert!(matches!(err, PreprocessError::Undecodable(_)), "{err:?}");
        let err = preprocess_image(b"", Some("image/jpeg"), &spec, 100).unwrap_err();
        assert!(matches!(err, PreprocessError::Undecodable(_)));
        assert_eq!(media_type(" Image/PNG ; charset=x"), "image/png");
    }

    #[test]
    fn tensors_are_checked() {
        let spec = gray_spec(2, 2);
        let (imgs, batched) = tensor_from_json(&json!([[[1, 2], [3, 4.5]]]), &spec).unwrap();
        assert!(!batched);
        assert_eq!(imgs, vec![vec![1.0, 2.0, 3.0, 4.5]]);
        let (imgs, batched) =
            tensor_from_json(&json!([[[[1, 2], [3, 4]]], [[[5, 6], [7, 8]]]]), &spec).unwrap();
        assert!(batched);
        assert_eq!(imgs.len(), 2);
        assert_eq!(imgs[1], vec![5.0, 6.0, 7.0, 8.0]);
        for bad in [
            json!([[1, 2], [3, 4]]),
            json!([[[1, 2], [3]]]),
            json!([[[1, 2], [3, "x"]]]),
            json!([[[1, 2], [3, null]]]),
            json!([[[1, 2], [3, 1e300]]]),
            json!([[[1, 2, 3], [3, 4, 5]]]),
            json!([]),
            json!([[[[[1]]]]]),
            json!(3),
            json!({"a": 1}),
        ] {
            let err = tensor_from_json(&bad, &spec).unwrap_err();
            assert!(matches!(err, PreprocessError::Shape(_)), "{bad}: {err:?}");
        }
    }
}
