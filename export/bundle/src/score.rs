//! Score functions shared by the daemon's detector and the trainer's adaptive attack: pure,
//! each a number that is larger for more suspicious inputs. One definition, so the attack
//! optimises against exactly what the daemon computes.
//!
//! REFERENCE §3 measured them: the gate-mismatch share is weak (kept for comparison), the
//! class-conditional Mahalanobis distance on the predicted class's gated filters exposes
//! FGSM/PGD, and the logit margin exposes minimal-perturbation attacks (CW, DeepFool).

use crate::InputSpec;
use crate::calibration::Combiner;

/// Index of the largest logit (first on ties) and its softmax probability.
pub fn top_class(logits: &[f32]) -> (usize, f32) {
    let (best, max) =
        logits
            .iter()
            .copied()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |b, (i, v)| if v > b.1 { (i, v) } else { b },
            );
    let sum: f32 = logits.iter().map(|&v| (v - max).exp()).sum();
    (best, 1.0 / sum)
}

/// −ln(top-1 logit − top-2 logit): large when the input sits near a decision boundary.
/// Softmax saturates there; the raw margin does not (REFERENCE §3).
pub fn margin_score(logits: &[f32]) -> f64 {
    let (mut first, mut second) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &v in logits {
        if v > first {
            second = first;
            first = v;
        } else if v > second {
            second = v;
        }
    }
    let gap = f64::from(first - second).max(0.0);
    -(gap + 1e-12).ln()
}

/// 1 − max softmax probability.
pub fn msp_score(logits: &[f32]) -> f64 {
    1.0 - f64::from(top_class(logits).1)
}

/// 1 − ρ with ρ = Σ g·a / Σ a over the activations above zero: the share of activation
/// outside the class's gate pattern. Both sums run in four f64 lanes, so they vectorise (one
/// running sum each was a tenth of a verdict's time); compiled again for AVX2, where the four
/// lanes are one register.
#[multiversion::multiversion(targets("x86_64+avx2+fma"))]
pub fn gate_mismatch(gate_column: &[f32], activations: &[f32]) -> f64 {
    const LANES: usize = 4;
    let shared = gate_column.len().min(activations.len());
    let (gated, rest) = activations.split_at(shared);
    let (mut total, mut on_gate) = ([0.0f64; LANES], [0.0f64; LANES]);
    let (a_lanes, g_lanes) = (gated.chunks_exact(LANES), gate_column.chunks_exact(LANES));
    let (a_tail, g_tail) = (a_lanes.remainder(), g_lanes.remainder());
    for (a, g) in a_lanes.zip(g_lanes) {
        for lane in 0..LANES {
            let a = f64::from(a[lane].max(0.0));
            total[lane] += a;
            on_gate[lane] += f64::from(g[lane]) * a;
        }
    }
    for (&a, &g) in a_tail.iter().zip(g_tail) {
        let a = f64::from(a.max(0.0));
        total[0] += a;
        on_gate[0] += f64::from(g) * a;
    }
    total[0] += rest.iter().map(|&a| f64::from(a.max(0.0))).sum::<f64>();
    let total: f64 = total.iter().sum();
    if total <= 0.0 {
        return 1.0;
    }
    1.0 - on_gate.iter().sum::<f64>() / total
}

/// ln of the Mahalanobis distance of `x` to `mean` under the row-major precision matrix,
/// restricted to `indices` (all of them when `None`); `precision` is |indices|×|indices|.
///
/// The definition, evaluated from the precision matrix as stored. Verdicts evaluate the same
/// distance through [`crate::mahalanobis::StageScorer`], which factors the matrix once. The
/// row products run in f32 lanes that vectorise (see [`dot`]), each row's product is
/// accumulated in f64; the relative error, about 1e-6, is far below the spacing of the clean
/// score tables it is compared with.
pub fn log_mahalanobis(
    x: &[f32],
    mean: &[f32],
    precision: &[f32],
    indices: Option<&[usize]>,
) -> f64 {
    let diff: Vec<f32> = match indices {
        Some(idx) => idx.iter().map(|&i| x[i] - mean[i]).collect(),
        None => x.iter().zip(mean).map(|(a, m)| a - m).collect(),
    };
    log_distance(dense_quadratic(&diff, precision))
}

/// vᵀPv for a row-major d×d precision matrix P.
pub(crate) fn dense_quadratic(v: &[f32], precision: &[f32]) -> f64 {
    precision
        .chunks_exact(v.len().max(1))
        .zip(v)
        .map(|(row, &x)| f64::from(x) * f64::from(dot(row, v)))
        .sum()
}

/// ln √q, finite at q = 0.
pub(crate) fn log_distance(quad: f64) -> f64 {
    0.5 * (quad.max(0.0) + 1e-12).ln()
}

/// Σ a[i]·b[i] with eight independent partial sums: a single running sum is one long chain
/// of dependent additions that the compiler may not reorder (floating point), which made
/// scoring several times slower than the lanes the CPU has.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 8;
    let mut acc = [0.0f32; LANES];
    let (a_lanes, b_lanes) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = a_lanes
        .remainder()
        .iter()
        .zip(b_lanes.remainder())
        .map(|(p, q)| p * q)
        .sum();
    for (p, q) in a_lanes.zip(b_lanes) {
        for lane in 0..LANES {
            acc[lane] += p[lane] * q[lane];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Empirical p-value of `score` against a sorted table of clean scores:
/// (1 + #{clean ≥ score}) / (n + 1). Never 0, so −ln p is finite.
pub fn p_value(sorted_clean: &[f64], score: f64) -> f64 {
    let below = sorted_clean.partition_point(|&c| c < score);
    let at_or_above = sorted_clean.len() - below;
    (1 + at_or_above) as f64 / (sorted_clean.len() + 1) as f64
}

/// The smallest p-value's −ln (each attack family lights up one component; Fisher's sum
/// diluted that signal in REFERENCE §3).
pub fn min_p_combination(p_values: &[f64]) -> f64 {
    combine_each(Combiner::MinP, p_values.iter().copied())
}

/// −ln of the harmonic mean of the p-values: ln(Σ 1/p / n). Equal to −ln p for one
/// component; 0 for none.
pub fn harmonic_mean_combination(p_values: &[f64]) -> f64 {
    combine_each(Combiner::HarmonicMean, p_values.iter().copied())
}

/// The combined score of component p-values under `combiner`.
pub fn combine(combiner: Combiner, p_values: &[f64]) -> f64 {
    combine_each(combiner, p_values.iter().copied())
}

/// [`combine`] over p-values as they come, in that order (sums depend on it), without
/// collecting them first.
pub fn combine_each(combiner: Combiner, p_values: impl IntoIterator<Item = f64>) -> f64 {
    let p_values = p_values.into_iter();
    match combiner {
        Combiner::MinP => p_values.map(|p| -p.ln()).fold(0.0, f64::max),
        Combiner::HarmonicMean => {
            let (n, sum) = p_values.fold((0usize, 0.0f64), |(n, sum), p| (n + 1, sum + 1.0 / p));
            if n == 0 {
                return 0.0;
            }
            (sum / n as f64).ln()
        }
    }
}

/// One channel's statistics, from its values over positions: (mean, standard deviation,
/// share of values above zero). The variance is E[x²] − E[x]², clamped at zero. The mean is
/// the channel's GAP, so a stage read through its map needs no GAP output from the model.
///
/// Computed by csgd rather than in the ONNX graph: ONNX Runtime keeps convolution outputs in
/// a blocked channel layout, and the comparison and cast the share needs made it convert the
/// map back and run unvectorised kernels, 17 % of the tiny model's forward pass (and squares
/// or soft occupancies through blocked-layout convolutions cost as much as handing the map
/// out, README, Detection). Sums run in eight f32 lanes (a channel has at most a few thousand
/// positions, within f32's precision), so they vectorise; always inlined, so that the AVX2
/// build of [`spatial_features_into`] vectorises them too (35 % faster). One pass feeding
/// three accumulators came out three times slower than three passes.
#[inline(always)]
pub fn spatial_stats(channel: &[f32]) -> (f32, f32, f32) {
    let sum = lane_sum(channel, |v| v);
    let square = lane_sum(channel, |v| v * v);
    let above = lane_sum(channel, |v| if v > 0.0 { 1.0 } else { 0.0 });
    let n = channel.len().max(1) as f64;
    let mean = f64::from(sum) / n;
    let variance = (f64::from(square) / n - mean * mean).max(0.0);
    (
        mean as f32,
        variance.sqrt() as f32,
        (f64::from(above) / n) as f32,
    )
}

/// Σ f(v) over `values` in eight f32 lanes. One pass per statistic: a single loop feeding
/// three accumulators came out of the compiler as shuffles of scalar loads, three times as
/// slow.
#[inline(always)]
fn lane_sum(values: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    const LANES: usize = 8;
    let mut acc = [0.0f32; LANES];
    let lanes = values.chunks_exact(LANES);
    let tail: f32 = lanes.remainder().iter().map(|&v| f(v)).sum();
    for chunk in lanes {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a += f(v);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The features of one image's `[channels, h, w]` feature map that
/// [`StageFeatures::MeanStdOccupancy`](crate::calibration::StageFeatures) reads: every
/// channel's mean (its GAP), then every channel's standard deviation, then every channel's
/// share of positions above zero. `None` when the map does not split into `channels` equal
/// planes.
pub fn spatial_features(map: &[f32], channels: usize) -> Option<Vec<f32>> {
    let mut out = vec![0.0; 3 * channels];
    spatial_features_into(map, channels, &mut out).then_some(out)
}

/// [`spatial_features`] written into `out` (`3 × channels` long), for callers that reduce a
/// whole batch into one array. `false`, leaving `out` untouched, when the map does not split
/// into `channels` equal planes or `out` has the wrong length.
///
/// Compiled again for AVX2 and chosen at run time: the eight-lane sums then take one vector
/// register instead of two. Rust does not reassociate or fuse float arithmetic, so both
/// versions give the same bits.
#[multiversion::multiversion(targets("x86_64+avx2+fma"))]
pub fn spatial_features_into(map: &[f32], channels: usize, out: &mut [f32]) -> bool {
    if channels == 0
        || map.is_empty()
        || !map.len().is_multiple_of(channels)
        || out.len() != 3 * channels
    {
        return false;
    }
    let (mean, rest) = out.split_at_mut(channels);
    let (std, share) = rest.split_at_mut(channels);
    let planes = map.chunks_exact(map.len() / channels);
    for (((plane, m), s), o) in planes.zip(mean).zip(std).zip(share) {
        (*m, *s, *o) = spatial_stats(plane);
    }
    true
}

/// The input's pixel histogram ([`InputStats`](crate::calibration::InputStats)): the share
/// of one normalised image's values in each of `out.len()` equal bins over `spec`'s value
/// range, every channel pooled. Each value's bin is found at pixel scale (v·std + mean of its
/// channel, folded into one multiply-add per value); values on or outside the range's ends
/// count in the end bins. `false`, leaving `out` untouched, when the image is not `spec`'s
/// size or there are no bins.
///
/// Works in blocks of 256 values: one pass finds each value's bin (vectorised; compiled again
/// for AVX2 and chosen at run time), a second counts them into four interleaved histograms,
/// summed at the end. A flat background puts long runs of pixels in one bin, and a single
/// counter then makes every increment wait for the previous one: 4.4 µs per 28×28 image with
/// one counter and the bin found per value, 1.6 µs like this (`hot_path score/pixel_histograms`,
/// same sitting), and 0.5 µs once the bin pass converted without Rust's checked `as`, whose
/// NaN and overflow cases kept it scalar.
#[multiversion::multiversion(targets("x86_64+avx2+fma"))]
pub fn pixel_histogram_into(image: &[f32], spec: &InputSpec, out: &mut [f32]) -> bool {
    const WAYS: usize = 4;
    const BLOCK: usize = 256;
    let plane = spec.height * spec.width;
    if out.is_empty()
        || out.len() > MAX_HISTOGRAM_BINS
        || image.is_empty()
        || image.len() != spec.len()
        || spec.mean.len() != spec.channels
        || spec.std.len() != spec.channels
    {
        return false;
    }
    let bins = out.len();
    let [lo, hi] = spec.value_range;
    let per_unit = bins as f32 / (hi - lo).max(f32::MIN_POSITIVE);
    let last = (bins - 1) as f32;
    let mut counts = [[0u32; MAX_HISTOGRAM_BINS]; WAYS];
    let mut index = [0i32; BLOCK];
    for ((channel, mean), std) in image.chunks_exact(plane).zip(&spec.mean).zip(&spec.std) {
        // Bin position (v·std + mean − lo)·per_unit as one multiply-add, kept in [0, last]
        // (NaN goes to 0); the conversion truncates, the floor of a non-negative.
        let (scale, offset) = (std * per_unit, (mean - lo) * per_unit);
        for block in channel.chunks(BLOCK) {
            let index = &mut index[..block.len()];
            for (i, &v) in index.iter_mut().zip(block) {
                let position = (v * scale + offset).max(0.0).min(last);
                // SAFETY: `max` returns 0 for NaN, so `position` is finite and in
                // [0, last] ⊂ [0, 255], which i32 represents. The checked `as` kept the
                // conversion scalar (its NaN and overflow cases); this one vectorises.
                *i = unsafe { position.to_int_unchecked::<i32>() };
            }
            let quads = index.chunks_exact(WAYS);
            for &i in quads.remainder() {
                counts[0][i as usize] += 1;
            }
            for quad in quads {
                for (way, &i) in counts.iter_mut().zip(quad) {
                    way[i as usize] += 1;
                }
            }
        }
    }
    let n = image.len() as f32;
    for (b, o) in out.iter_mut().enumerate() {
        let total: u32 = counts.iter().map(|way| way[b]).sum();
        *o = total as f32 / n;
    }
    true
}

/// Most bins a pixel histogram may have (a bin index fits a byte).
pub const MAX_HISTOGRAM_BINS: usize = 256;

/// [`pixel_histogram_into`] with `bins` bins; `None` where it gives `false`.
pub fn pixel_histogram(image: &[f32], spec: &InputSpec, bins: usize) -> Option<Vec<f32>> {
    let mut out = vec![0.0; bins];
    pixel_histogram_into(image, spec, &mut out).then_some(out)
}

#[cfg(test)]
mod tests {
    use crate::InputSpec;

    #[test]
    fn pixel_histogram_counts_each_value_in_its_bin_at_pixel_scale() {
        // Normalised with mean 0.5, std 0.25: pixel p is stored as (p − 0.5) / 0.25.
        let spec = InputSpec::grayscale(2, 3, 0.5, 0.25);
        let pixels = [0.0f32, 0.0, 0.2, 0.26, 0.99, 1.0];
        let image: Vec<f32> = pixels.iter().map(|p| (p - 0.5) / 0.25).collect();
        // Four bins of width 0.25: two zeros and 0.2 in the first, 0.26 in the second,
        // 0.99 and the range's end (1.0) in the last.
        let h = pixel_histogram(&image, &spec, 4).unwrap();
        assert_eq!(h, vec![0.5, 1.0 / 6.0, 0.0, 2.0 / 6.0]);
        // Out of range both ways lands in the end bins; shares always sum to one.
        let wild = [-9.0f32, 9.0, f32::NAN, 0.0, 0.0, 0.0];
        let h = pixel_histogram(&wild, &spec, 4).unwrap();
        assert_eq!(h.iter().sum::<f32>(), 1.0);
        assert_eq!((h[0], h[3]), (2.0 / 6.0, 1.0 / 6.0));
        // Wrong size, no bins or more than a byte can index.
        assert!(pixel_histogram(&image[..5], &spec, 4).is_none());
        assert!(pixel_histogram(&image, &spec, 0).is_none());
        assert!(pixel_histogram(&image, &spec, MAX_HISTOGRAM_BINS + 1).is_none());
    }

    #[test]
    fn pixel_histogram_pools_channels_with_their_own_normalisation() {
        let spec = InputSpec {
            layout: "NCHW".into(),
            channels: 2,
            height: 1,
            width: 2,
            value_range: [0.0, 1.0],
            mean: vec![0.0, 1.0],
            std: vec![1.0, 2.0],
        };
        // Channel 0 holds pixels 0.1 and 0.9; channel 1 stores (p − 1) / 2 for 0.1 and 0.6.
        let image = [0.1f32, 0.9, (0.1 - 1.0) / 2.0, (0.6 - 1.0) / 2.0];
        let h = pixel_histogram(&image, &spec, 2).unwrap();
        assert_eq!(h, vec![0.5, 0.5]);
    }

    use super::*;

    #[test]
    fn top_class_and_probability() {
        let (c, p) = top_class(&[0.0, 2.0_f32.ln(), 0.0]);
        assert_eq!(c, 1);
        assert!((p - 0.5).abs() < 1e-6);
    }

    #[test]
    fn margin_grows_as_the_top_two_logits_meet() {
        let far = margin_score(&[5.0, 1.0, 0.0]);
        let near = margin_score(&[5.0, 4.9, 0.0]);
        assert!((far - -(4.0f64).ln()).abs() < 1e-9);
        assert!(near > far);
        assert!(margin_score(&[1.0, 1.0]).is_finite());
    }

    #[test]
    fn msp_score_is_one_minus_the_max_probability() {
        assert!((msp_score(&[0.0, 0.0]) - 0.5).abs() < 1e-6);
    }

    #[test]
    fn gate_mismatch_is_the_share_off_the_gate() {
        assert!((gate_mismatch(&[1.0, 0.0, 0.5], &[2.0, 2.0, 4.0]) - 0.5).abs() < 1e-12);
        assert_eq!(gate_mismatch(&[1.0], &[0.0]), 1.0);
        // Longer than the lanes, with negative activations (ignored) and activations past
        // the gate column's end (counted in the total only): the plain sums' answer.
        let acts: Vec<f32> = (0..39).map(|i| ((i as f32) * 0.7).sin() * 3.0).collect();
        let gate: Vec<f32> = (0..37)
            .map(|i| if i % 3 == 0 { 1.0 } else { 0.25 })
            .collect();
        let positive = |a: f32| f64::from(a.max(0.0));
        let total: f64 = acts.iter().map(|&a| positive(a)).sum();
        let on: f64 = gate
            .iter()
            .zip(&acts)
            .map(|(&g, &a)| f64::from(g) * positive(a))
            .sum();
        assert!((gate_mismatch(&gate, &acts) - (1.0 - on / total)).abs() < 1e-12);
    }

    #[test]
    fn mahalanobis_matches_hand_computation() {
        // Precision diag(1, 4): distance² = 3² + 4·1² = 13.
        let d = log_mahalanobis(
            &[4.0, 2.0, 9.0],
            &[1.0, 1.0, 0.0],
            &[1.0, 0.0, 0.0, 4.0],
            Some(&[0, 1]),
        );
        assert!((d - 0.5 * 13.0f64.ln()).abs() < 1e-9);
        let full = log_mahalanobis(&[1.0, 1.0], &[0.0, 0.0], &[2.0, 1.0, 1.0, 2.0], None);
        assert!((full - 0.5 * 6.0f64.ln()).abs() < 1e-9);
    }

    #[test]
    fn mahalanobis_agrees_with_the_plain_sum_on_odd_sizes() {
        // 67 dimensions: eight full lanes and a remainder of three.
        let d = 67;
        let x: Vec<f32> = (0..d).map(|i| (i as f32 * 0.37).sin()).collect();
        let mean: Vec<f32> = (0..d).map(|i| (i as f32 * 0.11).cos() * 0.5).collect();
        let precision: Vec<f32> = (0..d * d)
            .map(|i| {
                let (r, c) = (i / d, i % d);
                if r == c {
                    2.0
                } else {
                    0.01 * ((r + c) as f32).sin()
                }
            })
            .collect();
        let diff: Vec<f64> = x.iter().zip(&mean).map(|(a, m)| f64::from(a - m)).collect();
        let mut quad = 0.0;
        for r in 0..d {
            for c in 0..d {
                quad += diff[r] * f64::from(precision[r * d + c]) * diff[c];
            }
        }
        let got = log_mahalanobis(&x, &mean, &precision, None);
        // f32 row products: agreement to about 1e-6 relative.
        assert!(
            (got - 0.5 * quad.ln()).abs() < 1e-5,
            "{got} vs {}",
            0.5 * quad.ln()
        );
    }

    #[test]
    fn p_values_count_clean_scores_at_or_above() {
        let table = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(p_value(&table, 0.0), 1.0);
        assert_eq!(p_value(&table, 3.0), 3.0 / 5.0);
        assert_eq!(p_value(&table, 10.0), 1.0 / 5.0);
        assert!((min_p_combination(&[0.5, 0.01]) - -(0.01f64).ln()).abs() < 1e-12);
    }

    #[test]
    fn harmonic_mean_combination_matches_hand_computation() {
        // Harmonic mean of 0.5 and 0.01 is 2 / (2 + 100); its −ln is ln(51).
        let hmp = harmonic_mean_combination(&[0.5, 0.01]);
        assert!((hmp - 51.0f64.ln()).abs() < 1e-12);
        // One component: the same as min-p. Two equal small p-values add up to no more
        // than one of them alone, unlike Fisher's sum.
        assert!((harmonic_mean_combination(&[0.02]) - min_p_combination(&[0.02])).abs() < 1e-12);
        assert!((harmonic_mean_combination(&[0.02, 0.02]) - -(0.02f64).ln()).abs() < 1e-12);
        assert_eq!(harmonic_mean_combination(&[]), 0.0);
        assert_eq!(
            combine(Combiner::MinP, &[0.5, 0.01]),
            min_p_combination(&[0.5, 0.01])
        );
        assert_eq!(combine(Combiner::HarmonicMean, &[0.5, 0.01]), hmp);
    }

    #[test]
    fn spatial_stats_of_a_constructed_channel() {
        // Values 0, 0, 2, 2: mean 1, E[x²] 2, variance 1; half the positions fire.
        assert_eq!(spatial_stats(&[0.0, 0.0, 2.0, 2.0]), (1.0, 1.0, 0.5));
        assert_eq!(spatial_stats(&[3.0, 3.0]), (3.0, 0.0, 1.0));
        assert_eq!(spatial_stats(&[0.0; 4]), (0.0, 0.0, 0.0));
        // Long enough for the lanes and a tail: values 0, 1, …, 20 (mean 10, E[x²] 410/3,
        // variance 110/3), all but the first above zero.
        let ramp: Vec<f32> = (0..21).map(|v| v as f32).collect();
        let (mean, std, share) = spatial_stats(&ramp);
        assert_eq!(mean, 10.0);
        assert!(
            (f64::from(std) - (110.0f64 / 3.0).sqrt()).abs() < 1e-5,
            "{std}"
        );
        assert!((f64::from(share) - 20.0 / 21.0).abs() < 1e-7);
    }

    #[test]
    fn spatial_features_put_means_then_stds_then_shares() {
        // Two channels of four positions: (0, 0, 2, 2) and (3, 3, 3, 3).
        let map = [0.0, 0.0, 2.0, 2.0, 3.0, 3.0, 3.0, 3.0];
        let want = [1.0, 3.0, 1.0, 0.0, 0.5, 1.0];
        assert_eq!(spatial_features(&map, 2), Some(want.to_vec()));
        assert_eq!(spatial_features(&map, 3), None);
        assert_eq!(spatial_features(&[], 2), None);
        assert_eq!(spatial_features(&map, 0), None);
        // Written in place: the same values, and nothing written into a buffer of the wrong
        // length.
        let mut out = [9.0; 6];
        assert!(spatial_features_into(&map, 2, &mut out));
        assert_eq!(out, want);
        let mut short = [9.0; 4];
        assert!(!spatial_features_into(&map, 2, &mut short));
        assert_eq!(short, [9.0; 4]);
    }
}
