//! The explanation as a picture: the input as the model saw it, with a map overlaid in the
//! viridis colour map (perceptually uniform and readable by colour-blind people; the same
//! map `csg-export inspect` draws the gate in), encoded as PNG.

use std::io::Cursor;

use csg_bundle::InputSpec;
use image::{DynamicImage, ImageFormat, Rgb, RgbImage};
use plotters::style::colors::colormaps::ViridisRGB;

use super::ExplainError;
use super::maps::Map;

/// Weight of the heat-map against the image.
const ALPHA: f32 = 0.5;
/// The default upscaling aims for at least this many pixels on the shorter side…
const TARGET_SIDE: usize = 224;
/// …and no option may produce more than this on the longer side.
const MAX_SIDE: usize = 2048;
const MAX_SCALE: u32 = 16;

/// The upscaling factor used when the caller names none: each input pixel becomes a
/// `scale × scale` block, so a 28×28 input is drawn at 224×224.
pub fn default_scale(spec: &InputSpec) -> u32 {
    let short = spec.height.min(spec.width).max(1);
    (TARGET_SIDE.div_ceil(short) as u32).clamp(1, max_scale(spec))
}

/// The largest factor allowed for this input size.
pub fn max_scale(spec: &InputSpec) -> u32 {
    let long = spec.height.max(spec.width).max(1);
    ((MAX_SIDE / long) as u32).clamp(1, MAX_SCALE)
}

/// Viridis colour of a value in [0, 1] (non-finite values take the bottom colour).
pub fn colour(t: f32) -> [u8; 3] {
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let c = ViridisRGB::get_color(t);
    [c.0, c.1, c.2]
}

/// The normalised CHW input back in [0, 1] pixel space, as RGB (gray repeated).
fn input_rgb(input: &[f32], spec: &InputSpec) -> Option<RgbImage> {
    let plane = spec.height * spec.width;
    if input.len() != spec.channels * plane || spec.channels == 0 {
        return None;
    }
    let [lo, hi] = spec.value_range;
    let unit = |c: usize, i: usize| {
        let mean = spec.mean.get(c).copied().unwrap_or(0.0);
        let std = spec.std.get(c).copied().unwrap_or(1.0);
        let v = (input[c * plane + i] * std + mean - lo) / (hi - lo);
        (v.clamp(0.0, 1.0) * 255.0).round() as u8
    };
    let pixels = (0..plane)
        .flat_map(|i| [0, 1, 2].map(|c| unit(c.min(spec.channels - 1), i)))
        .collect();
    RgbImage::from_raw(spec.width as u32, spec.height as u32, pixels)
}

/// Draws `map` (the input's size) over `input` (normalised CHW) and scales the result by
/// `scale` with nearest-neighbour, so every block shows one of the map's numbers.
pub fn overlay(
    input: &[f32],
    spec: &InputSpec,
    map: &Map,
    scale: u32,
) -> Result<RgbImage, ExplainError> {
    if (map.height, map.width) != (spec.height, spec.width) {
        return Err(ExplainError::Output(format!(
            "a {}×{} map cannot be drawn over a {}×{} input",
            map.height, map.width, spec.height, spec.width
        )));
    }
    let mut img = input_rgb(input, spec).ok_or_else(|| {
        ExplainError::Output(format!(
            "the input has {} values, the model takes {}",
            input.len(),
            spec.len()
        ))
    })?;
    for (px, t) in img.pixels_mut().zip(map.normalised()) {
        let heat = colour(t);
        let Rgb(base) = *px;
        *px = Rgb([0, 1, 2].map(|c| {
            (f32::from(base[c]) * (1.0 - ALPHA) + f32::from(heat[c]) * ALPHA).round() as u8
        }));
    }
    let scale = scale.clamp(1, max_scale(spec));
    if scale > 1 {
        // Integer block scaling; `imageops::resize` with `Nearest` gives the same pixels but
        // its general resampler took ~3 ms for 28 → 224 here, most of an explanation's cost.
        let (w, h) = img.dimensions();
        img = RgbImage::from_fn(w * scale, h * scale, |x, y| {
            *img.get_pixel(x / scale, y / scale)
        });
    }
    Ok(img)
}

/// [`overlay`], encoded as PNG.
pub fn overlay_png(
    input: &[f32],
    spec: &InputSpec,
    map: &Map,
    scale: u32,
) -> Result<Vec<u8>, ExplainError> {
    let img = overlay(input, spec, map, scale)?;
    let mut out = Vec::new();
    DynamicImage::ImageRgb8(img)
        .write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
        .map_err(|e| ExplainError::Png(e.to_string()))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(h: usize, w: usize) -> InputSpec {
        serde_json::from_value(serde_json::json!({
            "channels": 1, "height": h, "width": w, "layout": "NCHW",
            "value_range": [0.0, 1.0], "mean": [0.5], "std": [0.5]
        }))
        .unwrap()
    }

    #[test]
    fn colour_map_runs_from_purple_to_yellow() {
        assert_eq!(colour(0.0), [68, 1, 84]);
        assert_eq!(colour(1.0), [254, 232, 37]);
        assert_eq!(colour(f32::NAN), colour(0.0));
        assert_eq!(colour(7.0), colour(1.0));
        // Brightness grows along the map.
        let luma =
            |c: [u8; 3]| 0.3 * f32::from(c[0]) + 0.59 * f32::from(c[1]) + 0.11 * f32::from(c[2]);
        let steps: Vec<f32> = (0..=10).map(|i| luma(colour(i as f32 / 10.0))).collect();
        assert!(steps.windows(2).all(|p| p[1] > p[0]), "{steps:?}");
    }

    #[test]
    fn overlay_blends_the_input_and_scales_by_blocks() {
        let s = spec(2, 2);
        // Normalised −1 is black, +1 white.
        let input = [-1.0, 1.0, -1.0, 1.0];
        let map = Map::new(2, 2, vec![0.0, 0.0, 1.0, 1.0]);
        let img = overlay(&input, &s, &map, 3).unwrap();
        assert_eq!(img.dimensions(), (6, 6));
        // Top-left: black blended with the bottom colour; bottom-right: white with the top one.
        assert_eq!(img.get_pixel(0, 0).0, [34, 1, 42]);
        assert_eq!(img.get_pixel(5, 5).0, [255, 244, 146]);
        assert_eq!(img.get_pixel(2, 2), img.get_pixel(0, 0));
        let png = overlay_png(&input, &s, &map, 1).unwrap();
        let back = image::load_from_memory(&png).unwrap();
        assert_eq!((back.width(), back.height()), (2, 2));
        assert!(overlay(&input, &s, &Map::new(1, 4, vec![0.0; 4]), 1).is_err());
        assert!(overlay(&input[..3], &s, &map, 1).is_err());
    }

    #[test]
    fn scales_aim_for_224_pixels_and_stay_bounded() {
        assert_eq!(default_scale(&spec(28, 28)), 8);
        assert_eq!(default_scale(&spec(128, 128)), 2);
        assert_eq!(default_scale(&spec(512, 512)), 1);
        assert_eq!(max_scale(&spec(28, 28)), 16);
        assert_eq!(max_scale(&spec(1024, 300)), 2);
        assert_eq!(max_scale(&spec(4096, 4096)), 1);
    }
}
