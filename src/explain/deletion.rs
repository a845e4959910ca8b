//! The deletion test's two steps: rank pixels by a map, and mask the top ones.
//!
//! A map that localises what the classifier uses should, when its highest-ranked pixels are
//! masked, lower the predicted class's probability more than masking as many random pixels.
//! Masking replaces a pixel, in every channel, by a fixed fill given in pixel space, so every
//! map is judged by the same perturbation.
//!
//! [`Fill::Black`] is the definition the README's table asserts on: Fashion-MNIST's
//! background is black, so black is "no evidence", and masking to it deletes ink. Masking to
//! the dataset mean ([`Fill::Mean`], reported beside it) does not delete: it leaves a grey
//! silhouette where the map points and, for random pixels, sprinkles grey over the black
//! background, which the classifier has never seen; it measures that artefact more than the
//! map.

use csg_bundle::InputSpec;

/// What a masked pixel becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// The bottom of the value range (black): no ink.
    Black,
    /// The dataset mean of each channel (the input spec's mean): 0 after normalisation.
    Mean,
}

impl Fill {
    /// The normalised value a masked pixel of channel `c` takes.
    pub fn value(self, spec: &InputSpec, c: usize) -> f32 {
        let mean = spec.mean.get(c).copied().unwrap_or(0.0);
        let std = spec.std.get(c).copied().unwrap_or(1.0);
        let pixel = match self {
            Fill::Mean => mean,
            Fill::Black => spec.value_range[0],
        };
        (pixel - mean) / std
    }
}

/// Indices of the `fraction` of pixels the map ranks highest (rounded to whole pixels).
/// Ties go to the lower index and non-finite values rank last, so the result depends on the
/// map alone.
pub fn top_pixels(map: &[f32], fraction: f64) -> Vec<usize> {
    let n = ((fraction.clamp(0.0, 1.0) * map.len() as f64).round() as usize).min(map.len());
    let key = |i: usize| {
        let v = map[i];
        if v.is_finite() { v } else { f32::NEG_INFINITY }
    };
    let mut order: Vec<usize> = (0..map.len()).collect();
    order.sort_by(|&a, &b| key(b).total_cmp(&key(a)).then(a.cmp(&b)));
    order.truncate(n);
    order
}

/// Masks `pixels` (indices into one H×W plane) of a normalised CHW image, in every channel.
pub fn mask(image: &mut [f32], pixels: &[usize], spec: &InputSpec, fill: Fill) {
    let plane = spec.height * spec.width;
    for c in 0..spec.channels {
        let value = fill.value(spec, c);
        for &p in pixels.iter().filter(|&&p| p < plane) {
            if let Some(v) = image.get_mut(c * plane + p) {
                *v = value;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(channels: usize) -> InputSpec {
        serde_json::from_value(serde_json::json!({
            "channels": channels, "height": 2, "width": 2, "layout": "NCHW",
            "value_range": [0.0, 1.0], "mean": vec![0.25; channels], "std": vec![0.5; channels]
        }))
        .unwrap()
    }

    #[test]
    fn top_pixels_ranks_by_value_with_ties_to_the_lower_index() {
        let map = [0.1, 0.9, 0.5, 0.9, f32::NAN, 0.0, 0.0, 0.3, 0.2, 0.4];
        assert_eq!(top_pixels(&map, 0.2), vec![1, 3]);
        assert_eq!(top_pixels(&map, 0.3), vec![1, 3, 2]);
        assert_eq!(top_pixels(&map, 1.0).last(), Some(&4));
        assert!(top_pixels(&map, 0.0).is_empty());
        assert_eq!(top_pixels(&[1.0; 5], 0.4), vec![0, 1]);
    }

    #[test]
    fn masking_sets_every_channel_to_the_fill() {
        let s = spec(2);
        assert_eq!(Fill::Mean.value(&s, 0), 0.0);
        assert_eq!(Fill::Black.value(&s, 1), -0.5);
        let mut img = vec![1.0; 8];
        mask(&mut img, &[0, 3, 99], &s, Fill::Black);
        assert_eq!(img, vec![-0.5, 1.0, 1.0, -0.5, -0.5, 1.0, 1.0, -0.5]);
        mask(&mut img, &[1], &s, Fill::Mean);
        assert_eq!(img[1], 0.0);
        assert_eq!(img[5], 0.0);
    }
}
