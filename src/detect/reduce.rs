//! What the inference thread computes from a whole batch before judging its images: each
//! feature map's spatial statistics ([`reduce_map`]) and each input's pixel histogram
//! ([`PixelHistogram`]), taken while ONNX Runtime's buffers are still in cache.

use csg_bundle::InputSpec;
use ndarray::{Array2, ArrayView, ArrayView2, Axis, RemoveAxis};

use super::{DetectError, scores};

/// Each row's statistics ([`scores::spatial_features`]) of a `[N, C·h·w]` batch of feature
/// maps: `[N, 3C]` (means, stds, shares). Refused when a row does not split into `channels`
/// planes.
pub fn reduce_map(maps: ArrayView2<f32>, channels: usize) -> Result<Array2<f32>, DetectError> {
    per_image(maps, 3 * channels, |map, reduced| {
        scores::spatial_features_into(map, channels, reduced)
    })
    .ok_or_else(|| {
        DetectError::Output(format!(
            "a feature map of {} values per image does not split into {channels} channels",
            maps.ncols()
        ))
    })
}

/// `[N, width]`: each item of `batch` along its first axis, flattened, written into its row
/// by `into`. `None` where `into` refuses an item.
fn per_image<D: RemoveAxis>(
    batch: ArrayView<f32, D>,
    width: usize,
    mut into: impl FnMut(&[f32], &mut [f32]) -> bool,
) -> Option<Array2<f32>> {
    let mut out = Array2::zeros((batch.len_of(Axis(0)), width));
    for (item, mut row) in batch.outer_iter().zip(out.rows_mut()) {
        let item = item.as_standard_layout();
        let written = match (item.as_slice(), row.as_slice_mut()) {
            (Some(item), Some(row)) => into(item, row),
            _ => false,
        };
        if !written {
            return None;
        }
    }
    Some(out)
}

/// Turns model inputs into the pixel histograms ([`csg_bundle::score::pixel_histogram`]) a
/// calibration with input statistics reads.
#[derive(Debug, Clone)]
pub struct PixelHistogram {
    /// How the inputs were normalised (undone before binning).
    spec: InputSpec,
    bins: usize,
}

impl PixelHistogram {
    /// Histograms of `bins` bins of inputs normalised as `spec` says.
    pub fn new(spec: InputSpec, bins: usize) -> Self {
        Self { spec, bins }
    }

    pub fn bins(&self) -> usize {
        self.bins
    }

    /// Each image's histogram of a batch of model inputs (`[N, C, H, W]`, or flattened
    /// `[N, C·H·W]`), `[N, bins]`, as [`Sample::input`] holds it; refused where an image is
    /// not the model's input size.
    pub fn of_batch<D: RemoveAxis>(
        &self,
        images: ArrayView<f32, D>,
    ) -> Result<Array2<f32>, DetectError> {
        let per = images.len() / images.len_of(Axis(0)).max(1);
        per_image(images, self.bins, |image, row| {
            scores::pixel_histogram_into(image, &self.spec, row)
        })
        .ok_or_else(|| {
            DetectError::Output(format!(
                "an input of {per} values is not the model's {}",
                self.spec.len()
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reduced_batch_holds_each_image_s_spatial_features() {
        // Two images of three channels of five positions, with values on both sides of zero.
        let (channels, plane) = (3, 5);
        let values: Vec<f32> = (0..2 * channels * plane)
            .map(|i| ((i as f32) * 0.7).sin())
            .collect();
        let maps = Array2::from_shape_vec((2, channels * plane), values.clone()).unwrap();
        let reduced = reduce_map(maps.view(), channels).unwrap();
        assert_eq!(reduced.dim(), (2, 3 * channels));
        for (image, row) in values.chunks(channels * plane).zip(reduced.rows()) {
            let want = scores::spatial_features(image, channels).unwrap();
            assert_eq!(row.to_vec(), want);
        }
        // A column-major batch gives the same answer as the row-major one.
        let fortran = maps.t().as_standard_layout().t().to_owned();
        assert_eq!(reduce_map(fortran.view(), channels).unwrap(), reduced);
        // Maps that do not split into the channels are refused.
        assert!(reduce_map(maps.view(), 4).is_err());
        assert!(reduce_map(maps.view(), 0).is_err());
    }
}
