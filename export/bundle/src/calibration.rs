//! The calibration section of a bundle (`BundleMeta::calibration`): clean per-class
//! statistics, clean score tables and thresholds. `csgd calibrate` fits it; the daemon and the
//! trainer's adaptive attack read it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Gate;

/// Gate weight from which a filter counts as one of a class's gated filters.
pub const GATED: f32 = 0.5;

/// Version of this section's layout. Version 2 added per-stage [`StageFeatures`] and the
/// [`Combiner`]; version 3 the input's pixel histogram ([`InputStats`]). A build that only
/// knew an older version would misread the newer one (it would combine a component it
/// cannot compute), so it must refuse.
pub const CALIBRATION_VERSION: u32 = 3;

/// Component name of the input's pixel-histogram distance ([`InputStats`]).
pub const INPUT_HISTOGRAM: &str = "input_histogram";

/// Oldest layout this build still reads: a version-1 section is a version-2 one with GAP
/// features everywhere and the smallest-p combination.
pub const OLDEST_CALIBRATION_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    pub version: u32,
    /// Target false-positive rate the thresholds were set for.
    pub fpr: f64,
    /// What clean data it was fitted on, in words.
    pub data: String,
    /// Images used for the statistics and for the score tables (disjoint halves).
    pub fit_images: usize,
    pub table_images: usize,
    /// For a model without a learned gate: each class's top filters by clean mean activation.
    #[serde(default)]
    pub empirical_gate: Option<Gate>,
    /// Per-stage statistics, in the order of the model outputs the detector reads; the gated
    /// stage is last.
    pub stages: Vec<StageStats>,
    /// Sorted clean scores of every component, by component name.
    pub tables: BTreeMap<String, Vec<f64>>,
    /// Statistics of the input image's pixel histogram, where the calibration fitted them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<InputStats>,
    /// Components the combined score combines the p-values of.
    pub combined_components: Vec<String>,
    /// How it combines them.
    #[serde(default)]
    pub combiner: Combiner,
    /// Sorted clean combined scores (the threshold is their quantile).
    pub combined_table: Vec<f64>,
    /// Global threshold per verdict score at `fpr`.
    pub thresholds: BTreeMap<String, f64>,
    /// Per predicted class thresholds, where the class had enough clean images.
    #[serde(default)]
    pub class_thresholds: BTreeMap<String, Vec<Option<f64>>>,
}

/// How the combined score merges its components' p-values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Combiner {
    /// −ln of the smallest p-value.
    #[default]
    MinP,
    /// −ln of the harmonic mean p-value, ln(mean of 1/p) (Wilson 2019): led by the smallest
    /// p-value like min-p, but two moderately small ones add up, so a clean image needs one
    /// really small p-value to be flagged, which spends less of the false-positive budget on
    /// the component (the margin) whose clean tail is widest.
    HarmonicMean,
}

/// What a stage's per-image feature vector holds, each block `channels` long.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageFeatures {
    /// The GAP of each channel.
    #[default]
    Mean,
    /// Statistics of the stage's feature map ([`crate::StageOutput::map`]): each channel's
    /// mean (its GAP), standard deviation over positions and share of positions above zero
    /// ([`crate::score::spatial_features`]), all computed from the map, so the stage's GAP
    /// output is not read. Noise-like
    /// perturbations (FGSM) change how a filter's response is spread and how often it fires
    /// more than its average.
    MeanStdOccupancy,
}

impl StageFeatures {
    /// Values per channel.
    pub fn width(self) -> usize {
        match self {
            Self::Mean => 1,
            Self::MeanStdOccupancy => 3,
        }
    }
}

/// Clean statistics of the input image's pixel histogram: the share of its values (every
/// channel pooled, before normalisation) in each of `bins` equal bins over the input's value
/// range ([`crate::score::pixel_histogram`]), scored like a full-metric stage, as the
/// Mahalanobis distance to the predicted class's clean mean.
///
/// Not CSG evidence: it catches L∞ attacks that spread faint noise over every pixel, which
/// on images with flat backgrounds (Fashion-MNIST's exact zeros) fills bins that clean images
/// of the class leave empty. An attacker who knows it keeps the background clean.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputStats {
    pub bins: usize,
    /// Class means [C][bins], over correctly classified clean images.
    pub means: Vec<Vec<f32>>,
    /// Per-bin pooled within-class std, [bins].
    pub std: Vec<f32>,
    /// The pooled, shrunk within-class covariance's inverse, bins × bins, row-major.
    pub precision: Vec<f32>,
}

impl InputStats {
    /// Whether the statistics have the shapes a model of `classes` classes needs: 1 to
    /// [`crate::score::MAX_HISTOGRAM_BINS`] bins, a mean per class and a std of that many
    /// values, a bins × bins precision.
    pub fn fits(&self, classes: usize) -> bool {
        let d = self.bins;
        (1..=crate::score::MAX_HISTOGRAM_BINS).contains(&d)
            && self.means.len() == classes
            && self.means.iter().all(|m| m.len() == d)
            && self.std.len() == d
            && self.precision.len() == d * d
    }
}

/// Clean statistics of one stage's per-image features.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageStats {
    /// ONNX output name of the stage's GAP, read when `features` is [`StageFeatures::Mean`].
    pub output: String,
    /// ONNX output name of its feature map, read instead of the GAP when `features` needs
    /// spatial statistics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map_output: Option<String>,
    /// 0-based stage index.
    pub stage: usize,
    /// The stage's channels (filters).
    pub channels: usize,
    #[serde(default)]
    pub features: StageFeatures,
    /// Class means [C][dim], over correctly classified clean images.
    pub means: Vec<Vec<f32>>,
    /// Per-feature pooled within-class std (for z-scores in explanations), [dim].
    pub std: Vec<f32>,
    pub metric: StageMetric,
}

/// How a stage's distance is measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StageMetric {
    /// All channels, one shared (shrunk) precision matrix, row-major.
    Full { precision: Vec<f32> },
    /// Only the predicted class's gated filters: per class, the filter indices and the inverse
    /// of the shrunk covariance restricted to them.
    Gated { classes: Vec<GatedPrecision> },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GatedPrecision {
    pub filters: Vec<usize>,
    pub precision: Vec<f32>,
}

impl Default for Calibration {
    /// An empty section of the current version (no statistics: judges nothing).
    fn default() -> Self {
        Self {
            version: CALIBRATION_VERSION,
            fpr: 0.05,
            data: String::new(),
            fit_images: 0,
            table_images: 0,
            empirical_gate: None,
            stages: Vec::new(),
            input: None,
            tables: BTreeMap::new(),
            combined_components: Vec::new(),
            combiner: Combiner::default(),
            combined_table: Vec::new(),
            thresholds: BTreeMap::new(),
            class_thresholds: BTreeMap::new(),
        }
    }
}

impl StageStats {
    /// Component name, e.g. `stage2_mahalanobis` (1-based like the output names).
    pub fn component_name(&self) -> String {
        format!("stage{}_mahalanobis", self.stage + 1)
    }

    /// Length of the feature vector: channels × values per channel.
    pub fn dim(&self) -> usize {
        self.channels * self.features.width()
    }

    /// The model output its features are computed from: the feature map where spatial
    /// statistics are read (its means are the GAP), else the GAP.
    pub fn fetched_output(&self) -> &str {
        match (&self.map_output, self.features) {
            (Some(map), StageFeatures::MeanStdOccupancy) => map,
            _ => &self.output,
        }
    }
}
