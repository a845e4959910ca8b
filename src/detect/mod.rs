//! The detector: compares an input's activations with its predicted class's gate pattern and
//! clean statistics, and turns the evidence into a verdict (REFERENCE §3).
//!
//! Everything here is pure: [`Detector::judge`] maps one image's model outputs plus the bundle's
//! calibration to a [`Verdict`]. Fitting the calibration lives in [`fit`]; the daemon only
//! evaluates.

pub mod calibration;
pub mod fit;
mod gaussian;
mod plan;
mod reduce;
pub mod scores;

use std::sync::Arc;

use csg_bundle::{BundleMeta, Gate, InputSpec};
use serde::{Deserialize, Serialize};

use ndarray::{Array2, ArrayView, RemoveAxis};

pub use csg_bundle::calibration::{Calibration, StageStats};
use csg_bundle::calibration::{GATED, StageFeatures};
use csg_bundle::mahalanobis::StageScorer;
use plan::{Decider, Plan, Source};
pub use reduce::{PixelHistogram, reduce_map};

/// Which score decides the verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ScoreKind {
    /// The per-stage Mahalanobis scores' and the logit margin's p-values, combined as the
    /// calibration says (harmonic mean by default, smallest p in older bundles).
    Combined,
    /// Mahalanobis distance on the predicted class's gated filters (the gated stage).
    GatedMahalanobis,
    /// −ln(top-1 − top-2 logit).
    Margin,
    /// 1 − max softmax.
    Msp,
    /// Share of activation off the class's gate pattern (the naive detector; weak).
    GateMismatch,
}

impl ScoreKind {
    pub fn name(self) -> &'static str {
        match self {
            ScoreKind::Combined => "combined",
            ScoreKind::GatedMahalanobis => "gated_mahalanobis",
            ScoreKind::Margin => "margin",
            ScoreKind::Msp => "msp",
            ScoreKind::GateMismatch => "gate_mismatch",
        }
    }

    pub const ALL: [ScoreKind; 5] = [
        ScoreKind::Combined,
        ScoreKind::GatedMahalanobis,
        ScoreKind::Margin,
        ScoreKind::Msp,
        ScoreKind::GateMismatch,
    ];
}

#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    #[error("calibration section does not fit this model: {0}")]
    Calibration(String),
    #[error("model output does not fit the detector: {0}")]
    Output(String),
}

/// One image's model outputs, as the detector needs them.
pub struct Sample<'a> {
    pub logits: &'a [f32],
    /// The outputs listed by [`Detector::stage_outputs`], in that order: a stage's GAP
    /// activations or, where the stage is calibrated with spatial statistics, those
    /// statistics of its feature map ([`Detector::reduce_maps`]), not the map itself.
    pub stages: Vec<&'a [f32]>,
    /// The input image's pixel histogram ([`Detector::input_histograms`]), where the
    /// calibration reads one.
    pub input: Option<&'a [f32]>,
}

/// One piece of evidence.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Component {
    /// Shared with the detector's recipe ([`plan`]), not copied per verdict.
    pub name: Arc<str>,
    pub score: f64,
    /// Against the clean score table; `None` when uncalibrated.
    pub p_value: Option<f64>,
}

/// A gated filter of the predicted class and how far it is from its clean mean.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FilterDeviation {
    pub filter: usize,
    pub gate: f32,
    pub activation: f32,
    pub clean_mean: f32,
    /// (activation − clean mean) / clean std of that filter.
    pub z: f32,
}

/// The answer for one image.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    pub class_id: usize,
    pub label: String,
    pub probability: f32,
    /// `None` when the model is uncalibrated: it predicts but cannot judge.
    pub is_adversarial: Option<bool>,
    /// The verdict score (`instance_score` in Alibi Detect's words).
    pub score: f64,
    pub score_name: &'static str,
    pub threshold: Option<f64>,
    pub components: Vec<Component>,
    pub top_filters: Vec<FilterDeviation>,
}

/// How many deviating filters a verdict lists.
const TOP_FILTERS: usize = 5;

/// Evaluates verdicts for one model.
#[derive(Debug, Clone)]
pub struct Detector {
    classes: Vec<String>,
    /// The learned gate, or the calibration's empirical gate for a standard model.
    gate: Option<Gate>,
    calibration: Option<Calibration>,
    score: ScoreKind,
    /// ONNX outputs of the stages the detector reads (the gated stage last).
    stage_outputs: Vec<String>,
    /// The calibrated stages' distances, factored once here rather than on every verdict.
    scorers: Vec<StageScorer>,
    /// Per entry of `stage_outputs`: the channels of a feature map the detector reduces to
    /// its spatial statistics.
    map_channels: Vec<Option<usize>>,
    /// The gate's column of each class, taken out once rather than per verdict.
    gate_columns: Vec<Vec<f32>>,
    /// Each class's gated filters (G ≥ [`GATED`]), the candidates for a verdict's top filters.
    gated_filters: Vec<Vec<usize>>,
    /// Every component a verdict computes, their tables and thresholds, worked out once.
    plan: Plan,
    /// The input's pixel histogram and its distance, where the calibration scores them.
    input: Option<(PixelHistogram, StageScorer)>,
}

impl Detector {
    /// Builds the detector of a bundle; `score` chooses what decides the verdict.
    pub fn new(meta: &BundleMeta, score: ScoreKind) -> Result<Self, DetectError> {
        let calibration = meta.calibration.clone();
        if let Some(c) = &calibration {
            calibration::validate(c, meta)?;
        }
        let gate = meta
            .gate
            .clone()
            .or_else(|| calibration.as_ref().and_then(|c| c.empirical_gate.clone()));
        let stage_outputs = match &calibration {
            Some(c) => c
                .stages
                .iter()
                .map(|s| s.fetched_output().to_owned())
                .collect(),
            None => vec![meta.outputs.activations.clone()],
        };
        Ok(Self::assemble(
            meta.classes.clone(),
            gate,
            calibration,
            score,
            stage_outputs,
            &meta.input,
        ))
    }

    /// A detector from validated parts; factors the calibrated stages' distances.
    pub(crate) fn assemble(
        classes: Vec<String>,
        gate: Option<Gate>,
        calibration: Option<Calibration>,
        score: ScoreKind,
        stage_outputs: Vec<String>,
        input_spec: &InputSpec,
    ) -> Self {
        let input = calibration
            .as_ref()
            .and_then(|c| c.input.as_ref())
            .map(|stats| {
                let histogram = PixelHistogram::new(input_spec.clone(), stats.bins);
                (histogram, StageScorer::input(stats))
            });
        let stages = calibration.iter().flat_map(|c| &c.stages);
        let scorers = stages.clone().map(StageScorer::new).collect();
        let map_channels = stage_outputs
            .iter()
            .map(|name| {
                stages
                    .clone()
                    .find(|s| {
                        s.features == StageFeatures::MeanStdOccupancy
                            && s.map_output.as_deref() == Some(name.as_str())
                    })
                    .map(|s| s.channels)
            })
            .collect();
        let gate_columns = gate
            .iter()
            .flat_map(|g| (0..g.classes).map(|c| g.column(c)))
            .collect();
        let gated_filters = gate
            .iter()
            .flat_map(|g| {
                (0..g.classes).map(|c| (0..g.filters).filter(|&k| g.get(k, c) >= GATED).collect())
            })
            .collect();
        let plan = Plan::new(calibration.as_ref(), gate.is_some(), score);
        Self {
            classes,
            gate,
            calibration,
            score,
            stage_outputs,
            scorers,
            map_channels,
            gate_columns,
            gated_filters,
            plan,
            input,
        }
    }

    /// Output names besides `logits` that [`Sample::stages`] must hold, in order.
    pub fn stage_outputs(&self) -> &[String] {
        &self.stage_outputs
    }

    /// Every output a verdict reads, in the order a [`Sample`] is built from: the model's
    /// logits output (`logits` names it), then [`Self::stage_outputs`]. What an inference
    /// session fetches per batch.
    pub fn fetched_outputs(&self, logits: &str) -> Vec<String> {
        std::iter::once(logits.to_owned())
            .chain(self.stage_outputs.iter().cloned())
            .collect()
    }

    /// Per entry of [`Self::stage_outputs`]: `Some(channels)` where it is a feature map that
    /// [`Self::reduce_maps`] turns into spatial statistics.
    pub fn map_channels(&self) -> &[Option<usize>] {
        &self.map_channels
    }

    /// Turns a batch's fetched [`Self::stage_outputs`] (each `[N, D]`) into what
    /// [`Sample::stages`] holds: each feature map becomes its per-image spatial statistics
    /// ([`reduce_map`]). Run where the map was just computed (the inference thread), this
    /// reads it while it is still in cache and hands on 3C values per image instead of C·h·w.
    pub fn reduce_maps(&self, stage_outputs: &mut [Array2<f32>]) -> Result<(), DetectError> {
        for (array, channels) in stage_outputs.iter_mut().zip(&self.map_channels) {
            if let Some(channels) = *channels {
                *array = reduce_map(array.view(), channels)?;
            }
        }
        Ok(())
    }

    /// The pixel histogram the calibration reads, if it reads one.
    pub fn pixel_histogram(&self) -> Option<&PixelHistogram> {
        self.input.as_ref().map(|(h, _)| h)
    }

    /// [`PixelHistogram::of_batch`] where the calibration reads the input's histogram.
    pub fn input_histograms<D: RemoveAxis>(
        &self,
        images: ArrayView<f32, D>,
    ) -> Option<Result<Array2<f32>, DetectError>> {
        self.pixel_histogram().map(|h| h.of_batch(images))
    }

    /// One image's sample from its rows in the order an inference session hands them on:
    /// [`Self::fetched_outputs`], then the pixel histogram where the calibration reads one
    /// ([`Self::pixel_histogram`]).
    pub fn sample<'a>(&self, rows: &'a [Vec<f32>]) -> Result<Sample<'a>, DetectError> {
        let stages = self.stage_outputs.len();
        let extra = usize::from(self.input.is_some());
        if rows.len() != 1 + stages + extra {
            return Err(DetectError::Output(format!(
                "{} outputs per image, the detector reads {}",
                rows.len(),
                1 + stages + extra
            )));
        }
        Ok(Sample {
            logits: &rows[0],
            stages: rows[1..=stages].iter().map(Vec::as_slice).collect(),
            input: rows.get(1 + stages).map(Vec::as_slice),
        })
    }

    pub fn is_calibrated(&self) -> bool {
        self.calibration.is_some()
    }

    pub fn score_kind(&self) -> ScoreKind {
        self.score
    }

    pub fn calibration(&self) -> Option<&Calibration> {
        self.calibration.as_ref()
    }

    /// Name of the verdict score. Uncalibrated, only raw scores that need no clean statistics
    /// exist, so the verdict reports one of those (the margin unless msp or gate mismatch).
    pub fn score_name(&self) -> &'static str {
        score_name(self.calibration.is_some(), self.gate.is_some(), self.score)
    }

    /// Every raw score of one sample, keyed by component name (for calibration and eval).
    pub fn raw_scores(&self, sample: &Sample<'_>) -> Vec<(String, f64)> {
        let (class, probability) = scores::top_class(sample.logits);
        self.planned_scores(class, probability, Evidence::of(sample), |source| {
            self.sample_stage(sample, source)
        })
        .map(|(c, score)| (c.name.to_string(), score))
        .collect()
    }

    /// Every raw score from computed stage features (the calibration's own rows, one per
    /// calibrated stage), the gated stage's activations and the input's pixel histogram.
    pub(crate) fn scores_of(
        &self,
        logits: &[f32],
        features: &[Option<&[f32]>],
        gated: Option<&[f32]>,
        input: Option<&[f32]>,
    ) -> Vec<(String, f64)> {
        let (class, probability) = scores::top_class(logits);
        let evidence = Evidence {
            logits,
            gated,
            input,
        };
        self.planned_scores(class, probability, evidence, |source| match source {
            Source::Stage { index, .. } => features.get(index).copied().flatten(),
            _ => None,
        })
        .map(|(c, score)| (c.name.to_string(), score))
        .collect()
    }

    /// Each planned component with its raw score for an image predicted as `class` with
    /// `probability`; `stage` finds a stage component's features.
    fn planned_scores<'a>(
        &'a self,
        class: usize,
        probability: f32,
        evidence: Evidence<'a>,
        stage: impl Fn(Source) -> Option<&'a [f32]> + 'a,
    ) -> impl Iterator<Item = (&'a plan::Planned, f64)> + 'a {
        self.plan.components.iter().map(move |c| {
            let features = stage(c.source);
            let score = self.component_score(c.source, class, probability, features, &evidence);
            (c, score)
        })
    }

    /// A stage component's features in a sample: `None` where the sample does not hold what
    /// the calibration reads (never for samples built from [`Self::stage_outputs`]).
    fn sample_stage<'s>(&self, sample: &Sample<'s>, source: Source) -> Option<&'s [f32]> {
        match source {
            Source::Stage { index, dim } => {
                let features = sample.stages.get(index).copied()?;
                (features.len() == dim).then_some(features)
            }
            _ => None,
        }
    }

    /// One component's raw score for an image predicted as `class` with `probability`;
    /// `stage` holds a stage component's features. NaN where the evidence is missing.
    fn component_score(
        &self,
        source: Source,
        class: usize,
        probability: f32,
        stage: Option<&[f32]>,
        evidence: &Evidence<'_>,
    ) -> f64 {
        match source {
            Source::Stage { index, .. } => match (self.scorers.get(index), stage) {
                (Some(scorer), Some(features)) => scorer.score(features, class),
                _ => f64::NAN,
            },
            Source::Input => match (&self.input, evidence.input) {
                (Some((_, scorer)), Some(histogram)) => scorer.score(histogram, class),
                _ => f64::NAN,
            },
            Source::Margin => scores::margin_score(evidence.logits),
            // `scores::msp_score`, from the probability already computed.
            Source::Msp => 1.0 - f64::from(probability),
            Source::GateMismatch => match (self.gate_columns.get(class), evidence.gated) {
                (Some(column), Some(acts)) => scores::gate_mismatch(column, acts),
                _ => f64::NAN,
            },
        }
    }

    /// Raw scores with their p-values against the clean tables.
    pub(crate) fn components(&self, raw: &[(String, f64)]) -> Vec<Component> {
        raw.iter()
            .map(|(name, score)| Component {
                name: Arc::from(name.as_str()),
                score: *score,
                p_value: self
                    .calibration
                    .as_ref()
                    .and_then(|c| calibration::p_value(c, name, *score)),
            })
            .collect()
    }

    /// The verdict for one image: every planned component's score and p-value, in one pass
    /// and one allocation besides the answer's filters and label.
    pub fn judge(&self, sample: &Sample<'_>) -> Verdict {
        let (class_id, probability) = scores::top_class(sample.logits);
        let plan = &self.plan;
        let components: Vec<Component> = self
            .planned_scores(class_id, probability, Evidence::of(sample), |source| {
                self.sample_stage(sample, source)
            })
            .map(|(c, score)| Component {
                name: Arc::clone(&c.name),
                score,
                p_value: c.table.as_ref().map(|t| t.p_value(score)),
            })
            .collect();
        let score = match plan.decider {
            Decider::Combined => scores::combine_each(
                plan.combiner,
                plan.combined.iter().filter_map(|&i| components[i].p_value),
            ),
            Decider::Component(i) => components[i].score,
            Decider::Missing => f64::NAN,
        };
        let threshold = plan.threshold(class_id);
        Verdict {
            class_id,
            label: self.classes.get(class_id).cloned().unwrap_or_default(),
            probability,
            is_adversarial: threshold.map(|t| score > t),
            score,
            score_name: self.score_name(),
            threshold,
            components,
            top_filters: self.top_filters(sample, class_id),
        }
    }

    /// The first [`TOP_FILTERS`] of [`gated_deviations`], kept in order on the way rather than
    /// all collected and sorted.
    fn top_filters(&self, sample: &Sample<'_>, class: usize) -> Vec<FilterDeviation> {
        let (Some(gate), Some(acts), Some(gated)) = (
            &self.gate,
            sample.stages.last(),
            self.gated_filters.get(class),
        ) else {
            return Vec::new();
        };
        let stats = self.gated_stats();
        // The largest |z| so far, largest first; a filter goes after those with an equal
        // |z|, which came before it.
        let mut best = [(0.0f32, 0usize); TOP_FILTERS];
        let mut kept = 0;
        for &k in gated.iter().filter(|&&k| k < acts.len()) {
            let (mean, std) = clean_stats(stats, class, k);
            let size = ((acts[k] - mean) / std).abs();
            let at = best[..kept].partition_point(|&(s, _)| s.total_cmp(&size).is_ge());
            if at < TOP_FILTERS {
                best.copy_within(at..TOP_FILTERS - 1, at + 1);
                best[at] = (size, k);
                kept = (kept + 1).min(TOP_FILTERS);
            }
        }
        best[..kept]
            .iter()
            .map(|&(_, k)| deviation(gate, acts, stats, class, k))
            .collect()
    }

    /// The learned gate, or the calibration's empirical one for a standard model.
    pub fn gate(&self) -> Option<&Gate> {
        self.gate.as_ref()
    }

    /// Clean statistics of the gated (last) stage, when calibrated.
    pub fn gated_stats(&self) -> Option<&StageStats> {
        self.calibration.as_ref().and_then(|c| c.stages.last())
    }

    pub fn classes(&self) -> &[String] {
        &self.classes
    }
}

/// Clean mean and std of filter `k` for images of `class`; without statistics (an
/// uncalibrated model), mean 0 and std 1, so z is the raw activation.
pub fn clean_stats(stats: Option<&StageStats>, class: usize, k: usize) -> (f32, f32) {
    stats
        .and_then(|s| Some((*s.means.get(class)?.get(k)?, s.std.get(k)?.max(1e-6))))
        .unwrap_or((0.0, 1.0))
}

/// Every gated filter of `class` (G ≥ 0.5) with its deviation from the class's clean mean,
/// largest |z| first.
pub fn gated_deviations(
    gate: &Gate,
    acts: &[f32],
    stats: Option<&StageStats>,
    class: usize,
) -> Vec<FilterDeviation> {
    let mut filters: Vec<FilterDeviation> = (0..gate.filters.min(acts.len()))
        .filter(|&k| gate.get(k, class) >= GATED)
        .map(|k| deviation(gate, acts, stats, class, k))
        .collect();
    filters.sort_by(larger_deviation);
    filters
}

/// Filter `k`'s deviation (`k` < `acts.len()`).
fn deviation(
    gate: &Gate,
    acts: &[f32],
    stats: Option<&StageStats>,
    class: usize,
    k: usize,
) -> FilterDeviation {
    let (mean, std) = clean_stats(stats, class, k);
    FilterDeviation {
        filter: k,
        gate: gate.get(k, class),
        activation: acts[k],
        clean_mean: mean,
        z: (acts[k] - mean) / std,
    }
}

/// Larger |z| first, then lower filter index.
fn larger_deviation(a: &FilterDeviation, b: &FilterDeviation) -> std::cmp::Ordering {
    b.z.abs()
        .total_cmp(&a.z.abs())
        .then(a.filter.cmp(&b.filter))
}

/// What a raw score is computed from, besides a stage's features.
struct Evidence<'a> {
    logits: &'a [f32],
    /// The gated (last) stage's activations.
    gated: Option<&'a [f32]>,
    input: Option<&'a [f32]>,
}

impl<'a> Evidence<'a> {
    fn of(sample: &Sample<'a>) -> Self {
        Self {
            logits: sample.logits,
            gated: sample.stages.last().copied(),
            input: sample.input,
        }
    }
}

/// Name of the verdict score. Uncalibrated, only raw scores that need no clean statistics
/// exist, so the verdict reports one of those (the margin unless msp or gate mismatch).
fn score_name(calibrated: bool, has_gate: bool, score: ScoreKind) -> &'static str {
    if calibrated {
        return score.name();
    }
    match score {
        ScoreKind::Msp => "msp",
        ScoreKind::GateMismatch if has_gate => "gate_mismatch",
        _ => "margin",
    }
}
