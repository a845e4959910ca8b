//! The calibration section of a bundle (`BundleMeta::calibration`): clean per-class
//! statistics, clean score tables and thresholds. `csgd calibrate` fits it; the daemon and the
//! trainer's adaptive attack read it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Gate;

/// Gate weight from which a filter counts as one of a class's gated filters.
pub const GATED: f32 = 0.5;

/// Version of this section's layout.
pub const CALIBRATION_VERSION: u32 = 1;

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
    /// Components the combined score takes the smallest p-value over.
    pub combined_components: Vec<String>,
    /// Sorted clean combined scores (the threshold is their quantile).
    pub combined_table: Vec<f64>,
    /// Global threshold per verdict score at `fpr`.
    pub thresholds: BTreeMap<String, f64>,
    /// Per predicted class thresholds, where the class had enough clean images.
    #[serde(default)]
    pub class_thresholds: BTreeMap<String, Vec<Option<f64>>>,
}

/// Clean statistics of one stage's GAP activations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageStats {
    /// ONNX output name.
    pub output: String,
    /// 0-based stage index.
    pub stage: usize,
    pub channels: usize,
    /// Class means [C][channels], over correctly classified clean images.
    pub means: Vec<Vec<f32>>,
    /// Per-filter pooled within-class std (for z-scores in explanations).
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
            tables: BTreeMap::new(),
            combined_components: Vec::new(),
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
}
