//! The detector as the adaptive attack sees it: the daemon's combined score, computed with
//! the shared score functions ([`csg_bundle::score`]), and a differentiable stand-in.
//!
//! The daemon flags an image when its combined score S exceeds the calibrated threshold T of
//! its predicted class ĉ. S combines the empirical p-values p_k of the components against their
//! sorted clean tables (per-stage log Mahalanobis distance to ĉ's clean mean, over ĉ's gated
//! filters at a gated stage, and the logit margin −ln(Z₁ − Z₂)): S = max_k −ln p_k (min-p) or
//! S = ln(mean_k 1/p_k) (harmonic mean, never above the min-p score). Either way S ≤ T holds
//! when every component's score is at most a cutoff q_k(ĉ), the table value at which −ln p_k
//! reaches T ([`cutoff`]): exactly for min-p, as a sufficient condition for the harmonic mean.
//! [`DetectorSurrogate::judge`] computes S exactly, as the daemon does; `surrogate` is its
//! differentiable stand-in, Σ_k τ·softplus((s_k − q_k(ĉ) + δ)/τ), zero-ish once every
//! component is δ under its cutoff.
//!
//! A stage calibrated with spatial statistics reads each channel's GAP, spatial std and share
//! of positions above zero. The share is a step function; the surrogate uses
//! mean(tanh(x / [`OCCUPANCY_TEMPERATURE`])) over positions instead, which has a gradient
//! wherever the ReLU passes one.
//!
//! The input's pixel histogram (where the calibration scores it) counts each pixel in one
//! bin, also a step function; the surrogate spreads each pixel over the two nearest bins by a
//! triangular kernel on bin centres ([`soft_histogram`]), so moving a pixel towards an
//! emptier bin has a gradient.

use burn::prelude::*;
use burn::tensor::TensorData;
use burn::tensor::activation::{softmax, softplus};
use csg_bundle::InputSpec;
use csg_bundle::calibration::{
    Calibration, Combiner, INPUT_HISTOGRAM, StageFeatures, StageMetric, StageStats,
};
use csg_bundle::mahalanobis::StageScorer;
use csg_bundle::score;
use serde::{Deserialize, Serialize};

use super::{AttackError, argmax, index_tensor, rows};
use crate::model::Forward;

/// Scale of the smooth stand-in for "above zero" in the spatial occupancy: post-ReLU
/// activations of the shipped models are of order 0.1–1, so tanh(x / 0.05) is near 1 for
/// all but the faintest responses.
pub const OCCUPANCY_TEMPERATURE: f32 = 0.05;

/// What a component measures.
enum Kind {
    /// A stage's log Mahalanobis distance. `metric` is the calibration's (for the exact score);
    /// `padded` holds per class a d×d precision, zero outside the class's filters at a gated
    /// stage, so that one batched matmul serves every class in the surrogate.
    Stage {
        stats: StageStats,
        /// The exact distance, as the daemon evaluates it.
        scorer: Box<StageScorer>,
        padded: Vec<f32>,
    },
    /// The input's pixel-histogram distance: a full metric, `padded` as for a stage.
    Input {
        means: Vec<Vec<f32>>,
        scorer: Box<StageScorer>,
        padded: Vec<f32>,
    },
    Margin,
    Msp,
}

struct Component {
    name: String,
    kind: Kind,
    table: Vec<f64>,
    /// Cutoff per class.
    cutoffs: Vec<f64>,
}

/// The detector as the attack sees it: the calibration's combined score, exactly (for
/// checking) and as a differentiable surrogate (for gradients).
pub struct DetectorSurrogate {
    components: Vec<Component>,
    combiner: Combiner,
    thresholds: Vec<f64>,
    classes: usize,
    /// How the model's input is normalised and its value range, for the pixel histogram.
    input: InputSpec,
}

/// The exact detector's view of one image.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Judgement {
    pub class: usize,
    pub score: f64,
    pub threshold: f64,
    pub flagged: bool,
}

/// Largest score s with −ln p(s) ≤ `threshold`, p(s) = (1 + #{t ≥ s}) / (n + 1) over the
/// ascending `table`: +∞ if every score passes, −∞ if none can.
pub fn cutoff(table: &[f64], threshold: f64) -> f64 {
    let n = table.len();
    let needed = ((-threshold).exp() * (n + 1) as f64 - 1.0 - 1e-9).ceil();
    if needed <= 0.0 {
        f64::INFINITY
    } else if needed > n as f64 {
        f64::NEG_INFINITY
    } else {
        table[n - needed as usize]
    }
}

impl DetectorSurrogate {
    /// Reads the combined score of `cal` for a model with `classes` classes, stages of
    /// `stage_channels` channels and input `input`.
    pub fn new(
        cal: &Calibration,
        classes: usize,
        stage_channels: &[usize],
        input: &InputSpec,
    ) -> Result<Self, AttackError> {
        let bad = |why: String| AttackError::Calibration(why);
        let global = cal.thresholds.get("combined").copied();
        let per_class = cal.class_thresholds.get("combined");
        let thresholds = (0..classes)
            .map(|c| {
                per_class
                    .and_then(|v| v.get(c).copied().flatten())
                    .or(global)
                    .ok_or_else(|| bad("no threshold for the combined score".into()))
            })
            .collect::<Result<Vec<f64>, _>>()?;
        let mut components = Vec::new();
        for name in &cal.combined_components {
            let table = cal
                .tables
                .get(name)
                .filter(|t| !t.is_empty())
                .ok_or_else(|| bad(format!("component {name} has no clean table")))?
                .clone();
            let kind = match name.as_str() {
                "margin" => Kind::Margin,
                "msp" => Kind::Msp,
                INPUT_HISTOGRAM => {
                    let stats = cal
                        .input
                        .as_ref()
                        .ok_or_else(|| bad(format!("{name} has no input statistics")))?;
                    if !stats.fits(classes) {
                        return Err(bad(format!("{name}: statistics have the wrong shape")));
                    }
                    Kind::Input {
                        means: stats.means.clone(),
                        scorer: Box::new(StageScorer::input(stats)),
                        padded: stats.precision.repeat(classes),
                    }
                }
                _ => {
                    let s = cal
                        .stages
                        .iter()
                        .find(|s| &s.component_name() == name)
                        .ok_or_else(|| bad(format!("component {name} is not supported")))?;
                    let d = s.dim();
                    if stage_channels.get(s.stage) != Some(&s.channels)
                        || s.means.len() != classes
                        || s.means.iter().any(|m| m.len() != d)
                    {
                        return Err(bad(format!("{name} does not fit the model's stages")));
                    }
                    let mut padded = vec![0.0f32; classes * d * d];
                    for c in 0..classes {
                        let (filters, p): (Vec<usize>, &[f32]) = match &s.metric {
                            StageMetric::Full { precision } => ((0..d).collect(), precision),
                            StageMetric::Gated { classes: per } => {
                                let g = per
                                    .get(c)
                                    .ok_or_else(|| bad(format!("{name}: class {c}")))?;
                                (g.filters.clone(), &g.precision)
                            }
                        };
                        let m = filters.len();
                        if p.len() != m * m || filters.iter().any(|&k| k >= d) {
                            return Err(bad(format!("{name}: precision has the wrong shape")));
                        }
                        for (a, &fa) in filters.iter().enumerate() {
                            for (b, &fb) in filters.iter().enumerate() {
                                padded[c * d * d + fa * d + fb] = p[a * m + b];
                            }
                        }
                    }
                    Kind::Stage {
                        stats: s.clone(),
                        scorer: Box::new(StageScorer::new(s)),
                        padded,
                    }
                }
            };
            let cutoffs = thresholds.iter().map(|&t| cutoff(&table, t)).collect();
            components.push(Component {
                name: name.clone(),
                kind,
                table,
                cutoffs,
            });
        }
        if components.is_empty() {
            return Err(bad("the combined score has no components".into()));
        }
        Ok(Self {
            components,
            combiner: cal.combiner,
            thresholds,
            classes,
            input: input.clone(),
        })
    }

    pub fn classes(&self) -> usize {
        self.classes
    }

    /// Component names and their per-class cutoffs.
    pub fn cutoffs(&self) -> Vec<(String, Vec<f64>)> {
        self.components
            .iter()
            .map(|c| (c.name.clone(), c.cutoffs.clone()))
            .collect()
    }

    /// The exact detector on one image's logits, per-stage features (each stage's GAP, or its
    /// spatial statistics where the calibration reads them) and its pixels in the input's
    /// value range (unnormalised), as the daemon judges the 8-bit image.
    pub fn judge(&self, logits: &[f32], stages: &[&[f32]], pixels: &[f32]) -> Judgement {
        let class = argmax(logits);
        let p_values: Vec<f64> = self
            .components
            .iter()
            .map(|comp| {
                let raw = match &comp.kind {
                    Kind::Margin => score::margin_score(logits),
                    Kind::Msp => score::msp_score(logits),
                    Kind::Stage { stats, scorer, .. } => stages
                        .get(stats.stage)
                        .filter(|features| features.len() == stats.dim())
                        .map_or(f64::INFINITY, |features| scorer.score(features, class)),
                    Kind::Input { means, scorer, .. } => self
                        .pixel_histogram(pixels, means.first().map_or(0, Vec::len))
                        .map_or(f64::INFINITY, |h| scorer.score(&h, class)),
                };
                score::p_value(&comp.table, raw)
            })
            .collect();
        let combined = score::combine(self.combiner, &p_values);
        let threshold = self.thresholds[class.min(self.classes - 1)];
        Judgement {
            class,
            score: combined,
            threshold,
            flagged: combined > threshold,
        }
    }

    /// The daemon's histogram of one image's pixels: normalised as the daemon's preprocessing
    /// does, then binned by [`score::pixel_histogram`] (which undoes the normalisation).
    fn pixel_histogram(&self, pixels: &[f32], bins: usize) -> Option<Vec<f32>> {
        let spec = &self.input;
        let plane = spec.height * spec.width;
        let normalised: Vec<f32> = pixels
            .chunks(plane.max(1))
            .zip(spec.mean.iter().zip(&spec.std))
            .flat_map(|(channel, (m, s))| channel.iter().map(move |v| (v - m) / s))
            .collect();
        score::pixel_histogram(&normalised, spec, bins)
    }

    /// Stages whose calibration reads spatial statistics.
    fn spatial_stages(&self) -> Vec<usize> {
        self.components
            .iter()
            .filter_map(|c| match &c.kind {
                Kind::Stage { stats, .. } if stats.features == StageFeatures::MeanStdOccupancy => {
                    Some(stats.stage)
                }
                _ => None,
            })
            .collect()
    }

    /// Judges every image of a (plain) forward pass of `pixels` (`[N, C·H·W]` row-major,
    /// unnormalised).
    pub fn judge_forward(&self, out: Forward, pixels: &[f32]) -> Vec<Judgement> {
        let logits = rows(out.logits);
        let spatial = self.spatial_stages();
        let mut stages: Vec<Vec<Vec<f32>>> = out.stage_activations.into_iter().map(rows).collect();
        for (s, map) in out.stage_maps.into_iter().enumerate() {
            if !spatial.contains(&s) {
                continue;
            }
            let [n, c, h, w] = map.dims();
            let values: Vec<f32> = map.into_data().iter().collect();
            for (i, image) in values.chunks(c * h * w).take(n).enumerate() {
                // The map's statistics replace the GAP (their means are the GAP), as in the
                // daemon. A map that does not split into `c` planes leaves no features, which
                // `judge` scores as infinitely far, like a missing stage.
                stages[s][i] = score::spatial_features(image, c).unwrap_or_default();
            }
        }
        let per = pixels.len() / logits.len().max(1);
        (0..logits.len())
            .map(|i| {
                let acts: Vec<&[f32]> = stages.iter().map(|s| s[i].as_slice()).collect();
                let image = pixels.get(i * per..(i + 1) * per).unwrap_or_default();
                self.judge(&logits[i], &acts, image)
            })
            .collect()
    }

    /// Σ_k τ·softplus((s_k − q_k(ĉ) + δ)/τ) per image, `[N, 1]`, differentiable; `pixels`
    /// is the forward pass's input, unnormalised.
    pub(crate) fn surrogate(
        &self,
        pixels: &Tensor<4>,
        out: &Forward,
        towards: &[usize],
        temperature: f32,
        slack: f32,
    ) -> Tensor<2> {
        let n = towards.len();
        let tau = temperature;
        let device = out.logits.device();
        let index = index_tensor(towards, &device);
        let mut total = Tensor::<2>::zeros([n, 1], &device);
        for comp in &self.components {
            let (mut q, mut on) = (vec![0.0f32; n], vec![0.0f32; n]);
            for (i, &c) in towards.iter().enumerate() {
                let cut = comp.cutoffs[c];
                if cut.is_finite() {
                    q[i] = cut as f32;
                    on[i] = 1.0;
                }
            }
            let score = match &comp.kind {
                Kind::Stage { stats, padded, .. } => {
                    let Some(gap) = out.stage_activations.get(stats.stage) else {
                        continue;
                    };
                    let acts = match (stats.features, out.stage_maps.get(stats.stage)) {
                        (StageFeatures::Mean, _) => gap.clone(),
                        (StageFeatures::MeanStdOccupancy, Some(map)) => {
                            smooth_spatial_features(map.clone(), gap.clone())
                        }
                        (StageFeatures::MeanStdOccupancy, None) => continue,
                    };
                    self.log_distance(acts, &stats.means, padded, &index)
                }
                Kind::Input { means, padded, .. } => {
                    let bins = means.first().map_or(0, Vec::len);
                    let [lo, hi] = self.input.value_range;
                    let histogram = soft_histogram(pixels.clone(), bins, lo, hi);
                    self.log_distance(histogram, means, padded, &index)
                }
                Kind::Margin => {
                    let gap = out_margin(out, towards);
                    (softplus(gap / tau, 1.0) * tau + 1e-12).log().neg()
                }
                Kind::Msp => {
                    let one_hot = one_hot(towards, self.classes, &device);
                    (softmax(out.logits.clone(), 1) * one_hot).sum_dim(1).neg() + 1.0
                }
            };
            let q = Tensor::<2>::from_data(TensorData::new(q, [n, 1]), &device);
            let on = Tensor::<2>::from_data(TensorData::new(on, [n, 1]), &device);
            let hinge = softplus((score - q + slack) / tau, 1.0) * tau;
            total = total + hinge * on;
        }
        total
    }
}

impl DetectorSurrogate {
    /// ln of the Mahalanobis distance of each row of `features` (`[N, d]`) to its class's
    /// mean under its class's `padded` precision, `[N, 1]`, differentiable.
    fn log_distance(
        &self,
        features: Tensor<2>,
        means: &[Vec<f32>],
        padded: &[f32],
        index: &Tensor<1, Int>,
    ) -> Tensor<2> {
        let device = features.device();
        let [n, d] = features.dims();
        let flat: Vec<f32> = means.iter().flatten().copied().collect();
        let mu = Tensor::<2>::from_data(TensorData::new(flat, [self.classes, d]), &device)
            .select(0, index.clone());
        let p = Tensor::<3>::from_data(
            TensorData::new(padded.to_vec(), [self.classes, d, d]),
            &device,
        )
        .select(0, index.clone());
        let diff = features - mu;
        let quad = (diff.clone().reshape([n, 1, d]).matmul(p).reshape([n, d]) * diff).sum_dim(1);
        (quad.clamp_min(0.0) + 1e-12).log() * 0.5
    }
}

/// A differentiable stand-in for [`score::pixel_histogram`] of `[N, C, H, W]` pixels in
/// [lo, hi], `[N, bins]`: each pixel adds 1 − |u − centre_b| (u its position in bin units)
/// to the bins whose centres lie within one bin of it, so its weight is split between the two
/// nearest bins and moves continuously. Positions are clamped to the outer centres, where the
/// hard histogram's end bins take everything beyond.
pub fn soft_histogram(pixels: Tensor<4>, bins: usize, lo: f32, hi: f32) -> Tensor<2> {
    let [n, c, h, w] = pixels.dims();
    let device = pixels.device();
    let scale = bins as f32 / (hi - lo).max(f32::MIN_POSITIVE);
    let u = ((pixels - lo) * scale)
        .clamp(0.5, bins as f32 - 0.5)
        .reshape([n, c * h * w, 1]);
    let centres: Vec<f32> = (0..bins).map(|b| b as f32 + 0.5).collect();
    let centres = Tensor::<3>::from_data(TensorData::new(centres, [1, 1, bins]), &device);
    let weights = (u - centres).abs().neg().add_scalar(1.0).clamp_min(0.0);
    weights.mean_dim(1).reshape([n, bins])
}

/// `[gap, std, smooth occupancy]` of a `[N, C, h, w]` map, `[N, 3C]`, differentiable: the
/// std as [`score::spatial_stats`] computes it (sqrt of the clamped E[x²] − E[x]², nudged off
/// zero so its gradient stays finite), the occupancy as mean(tanh(x / OCCUPANCY_TEMPERATURE)).
fn smooth_spatial_features(map: Tensor<4>, gap: Tensor<2>) -> Tensor<2> {
    let [n, c, h, w] = map.dims();
    let flat = map.reshape([n, c, h * w]);
    let mean_square = flat.clone().powf_scalar(2.0).mean_dim(2).reshape([n, c]);
    let variance = (mean_square - gap.clone().powf_scalar(2.0)).clamp_min(0.0);
    let std = (variance + 1e-12).sqrt();
    let occupancy = (flat / OCCUPANCY_TEMPERATURE)
        .tanh()
        .mean_dim(2)
        .reshape([n, c]);
    Tensor::cat(vec![gap, std, occupancy], 1)
}

fn one_hot(classes: &[usize], c: usize, device: &Device) -> Tensor<2> {
    let mut v = vec![0.0f32; classes.len() * c];
    for (i, &k) in classes.iter().enumerate() {
        v[i * c + k.min(c - 1)] = 1.0;
    }
    Tensor::from_data(TensorData::new(v, [classes.len(), c]), device)
}

/// Z_ĉ − max_{j≠ĉ} Z_j, `[N, 1]`.
fn out_margin(out: &Forward, towards: &[usize]) -> Tensor<2> {
    let [_, c] = out.logits.dims();
    let oh = one_hot(towards, c, &out.logits.device());
    let own = (out.logits.clone() * oh.clone()).sum_dim(1);
    own - out.logits.clone().mask_fill(oh.bool(), -1.0e9).max_dim(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soft_histogram_is_the_hard_one_at_bin_centres_and_splits_between_them() {
        let device = crate::device();
        let spec = csg_bundle::InputSpec::grayscale(1, 4, 0.0, 1.0);
        let bins = 4;
        // Bin centres 0.125, 0.625 and both ends of the range (clamped onto the end centres).
        let at_centres = [0.125f32, 0.625, 0.0, 1.0];
        let soft = soft_histogram(
            Tensor::<4>::from_data(TensorData::new(at_centres.to_vec(), [1, 1, 1, 4]), &device),
            bins,
            0.0,
            1.0,
        );
        let soft: Vec<f32> = soft.into_data().iter().collect();
        let hard = score::pixel_histogram(&at_centres, &spec, bins).unwrap();
        for (s, h) in soft.iter().zip(&hard) {
            assert!((s - h).abs() < 1e-6, "{soft:?} vs {hard:?}");
        }
        // Halfway between the first two centres: half a pixel in each.
        let between =
            Tensor::<4>::from_data(TensorData::new(vec![0.25f32; 4], [1, 1, 1, 4]), &device);
        let soft: Vec<f32> = soft_histogram(between, bins, 0.0, 1.0)
            .into_data()
            .iter()
            .collect();
        assert!(
            (soft[0] - 0.5).abs() < 1e-6 && (soft[1] - 0.5).abs() < 1e-6,
            "{soft:?}"
        );
    }

    #[test]
    fn cutoff_is_the_last_score_that_stays_under_the_threshold() {
        let table = [1.0, 2.0, 3.0, 4.0];
        // p(s) = (1 + #{t ≥ s}) / 5. Threshold −ln(3/5): need #{t ≥ s} ≥ 2, so s ≤ 3.
        let t = -(3.0f64 / 5.0).ln();
        let q = cutoff(&table, t);
        assert_eq!(q, 3.0);
        assert!(-score::p_value(&table, q).ln() <= t);
        assert!(-score::p_value(&table, q + 1e-9).ln() > t);
        // Threshold 0 needs p = 1: only scores at or below the smallest clean one.
        assert_eq!(cutoff(&table, 0.0), 1.0);
        // The smallest p-value, 1/5, is still allowed: everything passes.
        assert_eq!(cutoff(&table, -(1.0f64 / 5.0).ln()), f64::INFINITY);
        assert_eq!(cutoff(&table, -1.0), f64::NEG_INFINITY);
    }
}
