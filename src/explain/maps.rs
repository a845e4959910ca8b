//! Localisation maps: a weighted sum of the gated stage's feature maps, upsampled to the input.
//!
//! The CSG paper localises a class with the feature maps of the filters assigned to it
//! (REFERENCE §1); we weight each by its gate value. The class-activation map (CAM) weights
//! every filter by the classifier's weight for the class instead, for comparison. Both are
//! linear in the feature map, so one function computes either.

use image::imageops::{self, FilterType};
use image::{ImageBuffer, Luma};
use serde::Serialize;
use serde::ser::{SerializeStruct, Serializer};

/// A map over the input's pixels (row-major), in the units of the weighted feature maps.
/// Serialised as `{height, width, min, max, values: [[row], …]}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Map {
    pub height: usize,
    pub width: usize,
    pub min: f32,
    pub max: f32,
    pub values: Vec<f32>,
}

impl Serialize for Map {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let rows: Vec<&[f32]> = self.values.chunks(self.width.max(1)).collect();
        let mut m = s.serialize_struct("Map", 5)?;
        m.serialize_field("height", &self.height)?;
        m.serialize_field("width", &self.width)?;
        m.serialize_field("min", &self.min)?;
        m.serialize_field("max", &self.max)?;
        m.serialize_field("values", &rows)?;
        m.end()
    }
}

impl Map {
    /// Builds a map from row-major values, with its range.
    pub fn new(height: usize, width: usize, values: Vec<f32>) -> Map {
        let (min, max) = range(&values);
        Map {
            height,
            width,
            min,
            max,
            values,
        }
    }

    /// Values scaled to [0, 1] by the map's own range (all 0 for a flat map), for display.
    pub fn normalised(&self) -> Vec<f32> {
        let span = self.max - self.min;
        self.values
            .iter()
            .map(|&v| {
                if span > 0.0 && v.is_finite() {
                    ((v - self.min) / span).clamp(0.0, 1.0)
                } else {
                    0.0
                }
            })
            .collect()
    }
}

/// Smallest and largest finite value (0, 0 when there is none).
fn range(values: &[f32]) -> (f32, f32) {
    let finite = values.iter().copied().filter(|v| v.is_finite());
    let (lo, hi) = finite.fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if lo > hi { (0.0, 0.0) } else { (lo, hi) }
}

/// Σ_k w_k · F_k over the `(filter, weight)` pairs, for a feature map `[K, h, w]` (row-major,
/// one image). Filters beyond K are ignored.
pub fn weighted_sum(feature_map: &[f32], plane: usize, weights: &[(usize, f32)]) -> Vec<f32> {
    let mut out = vec![0f32; plane];
    for &(k, weight) in weights {
        let Some(channel) = feature_map.get(k * plane..(k + 1) * plane) else {
            continue;
        };
        for (o, &v) in out.iter_mut().zip(channel) {
            *o += weight * v;
        }
    }
    out
}

/// Bilinear upsampling of an `h × w` map to `height × width` (pixel centres aligned, edges
/// repeated), keeping the map's units.
///
/// `image`'s resampler clamps float pixels to [0, 1], so the map is scaled into that range,
/// resized and scaled back; bilinear weights are convex, so nothing is clipped on the way.
pub fn upsample(map: &[f32], (h, w): (usize, usize), (height, width): (usize, usize)) -> Map {
    let clean: Vec<f32> = map
        .iter()
        .map(|&v| if v.is_finite() { v } else { 0.0 })
        .collect();
    let (lo, hi) = range(&clean);
    let span = hi - lo;
    let too_big = u32::try_from(w.max(h).max(width).max(height)).is_err();
    let unit: Vec<f32> = clean
        .iter()
        .map(|&v| if span > 0.0 { (v - lo) / span } else { 0.0 })
        .collect();
    let source = if too_big || h * w != clean.len() {
        None
    } else {
        ImageBuffer::<Luma<f32>, Vec<f32>>::from_raw(w as u32, h as u32, unit)
    };
    let values = match source {
        Some(img) if span > 0.0 => {
            let big = imageops::resize(&img, width as u32, height as u32, FilterType::Triangle);
            big.into_raw().into_iter().map(|t| lo + t * span).collect()
        }
        // A flat map stays flat; a malformed one (never built by this module) becomes flat.
        _ => vec![if span > 0.0 { 0.0 } else { lo }; height * width],
    };
    Map::new(height, width, values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_sum_adds_the_weighted_channels() {
        // Two 1×2 channels.
        let fm = [1.0, 2.0, 10.0, 20.0];
        assert_eq!(weighted_sum(&fm, 2, &[(0, 1.0), (1, 0.5)]), vec![6.0, 12.0]);
        assert_eq!(
            weighted_sum(&fm, 2, &[(1, -1.0), (7, 3.0)]),
            vec![-10.0, -20.0]
        );
        assert_eq!(weighted_sum(&fm, 2, &[]), vec![0.0, 0.0]);
    }

    #[test]
    fn upsampling_keeps_units_range_and_location() {
        // One hot cell at the top left of a 2×2 map with negative values elsewhere.
        let map = upsample(&[3.0, -1.0, -1.0, -1.0], (2, 2), (8, 8));
        assert_eq!((map.height, map.width, map.values.len()), (8, 8, 64));
        assert!(
            (map.max - 3.0).abs() < 1e-5 && (map.min + 1.0).abs() < 1e-5,
            "{map:?}"
        );
        // Edges repeat the border cells; the peak stays in the top-left quarter.
        assert!((map.values[0] - 3.0).abs() < 1e-5);
        assert!((map.values[63] + 1.0).abs() < 1e-5);
        let argmax = (0..64).max_by(|&a, &b| map.values[a].total_cmp(&map.values[b]));
        let peak = argmax.unwrap();
        assert!(peak / 8 < 4 && peak % 8 < 4, "peak at {peak}");
        // Monotone along the first row, from the hot cell outwards.
        assert!(map.values[..8].windows(2).all(|p| p[0] >= p[1]));
    }

    #[test]
    fn flat_and_non_finite_maps_stay_flat() {
        let flat = upsample(&[2.0; 4], (2, 2), (4, 4));
        assert!(flat.values.iter().all(|&v| v == 2.0));
        assert_eq!(flat.normalised(), vec![0.0; 16]);
        let odd = upsample(&[f32::NAN, 1.0, 1.0, 1.0], (2, 2), (4, 4));
        assert!(odd.values.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn normalised_spans_zero_to_one_and_rows_serialise_by_width() {
        let m = Map::new(2, 3, vec![1.0, 2.0, 3.0, 4.0, 5.0, 5.0]);
        let n = m.normalised();
        assert_eq!(n[0], 0.0);
        assert_eq!(n[5], 1.0);
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(
            json["values"],
            serde_json::json!([[1.0, 2.0, 3.0], [4.0, 5.0, 5.0]])
        );
        assert_eq!(json["min"], 1.0);
    }
}
