//! Explanations: which class-specific filters fired, how unusually, and where.
//!
//! What CSG training gives beyond accuracy is that every filter belongs to one or a few
//! classes, so a verdict can be explained in terms a person can check. For one image an
//! [`Explanation`] holds the detector's verdict (the same as a detect call gives), the
//! predicted class's gated filters ranked by their deviation from clean statistics, the other
//! classes' filters that fired most ([`rank`]), and two localisation maps ([`maps`]): the
//! predicted class's gated feature maps weighted by the gate, and the class-activation map
//! from the classifier's weights ([`classifier`]) for comparison. [`render`] draws a map over
//! the input as PNG; [`deletion`] holds the masking used to test that the maps localise.
//!
//! Explanations need the gated stage's feature map, which only bundles exported with
//! `--feature-map` have; it is fetched from ONNX Runtime only here, on a session of its own
//! ([`ExplainSession`]). The batched detect path's sessions are cut down to the detector's
//! outputs ([`crate::runtime::Model::load_for`]), so they never compute it.

pub mod classifier;
pub mod deletion;
pub mod maps;
pub mod rank;
pub mod render;

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use csg_bundle::calibration::GATED;
use csg_bundle::{BundleMeta, InputSpec};
use ndarray::{Array1, Array2, ArrayD, ArrayView2, ArrayView4, Axis};
use serde::Serialize;

use crate::detect::{Detector, FilterDeviation, Sample, Verdict, gated_deviations};
use crate::runtime::{Model, RuntimeError};
use classifier::Classifier;
use maps::Map;
use rank::OtherFilter;

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    /// The model cannot be explained (says why and how to fix it).
    #[error("{0}")]
    Unavailable(String),
    #[error("cannot read the classifier weights for the class-activation map: {0}")]
    Classifier(String),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("unexpected model output: {0}")]
    Output(String),
    #[error("cannot encode the PNG: {0}")]
    Png(String),
}

/// How many other-class filters an explanation lists unless told otherwise.
pub const DEFAULT_OTHER_FILTERS: usize = 5;

/// The explanation of one image.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    #[serde(flatten)]
    pub verdict: Verdict,
    /// `learned` (CSG training) or `empirical` (a standard model's calibration stands in).
    pub gate: &'static str,
    /// Every gated filter (G ≥ 0.5) of the predicted class, largest |z| first.
    pub class_filters: Vec<FilterDeviation>,
    /// Filters of other classes that fired most unusually for the predicted class.
    pub other_filters: Vec<OtherFilter>,
    pub maps: LocalisationMaps,
}

/// The predicted class's maps, upsampled (bilinear) from the gated stage to the input size.
#[derive(Debug, Clone, Serialize)]
pub struct LocalisationMaps {
    /// [h, w] of the gated stage's feature maps.
    pub feature_size: [usize; 2],
    /// Σ_k G[k, ĉ]·F_k over ĉ's gated filters.
    pub gated: Map,
    /// Σ_k W[ĉ, k]·F_k over all filters (classifier weights W): the class-activation map.
    pub cam: Map,
}

/// Which map to draw or rank by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum MapKind {
    Gated,
    Cam,
}

impl MapKind {
    pub fn name(self) -> &'static str {
        match self {
            MapKind::Gated => "gated",
            MapKind::Cam => "cam",
        }
    }
}

impl LocalisationMaps {
    pub fn get(&self, kind: MapKind) -> &Map {
        match kind {
            MapKind::Gated => &self.gated,
            MapKind::Cam => &self.cam,
        }
    }
}

/// Everything needed to explain a model's outputs: its detector, gate and classifier.
pub struct Explainer {
    detector: Detector,
    classifier: Classifier,
    spec: InputSpec,
    learned_gate: bool,
    /// `logits`, the detector's stage outputs, then the feature map.
    outputs: Vec<String>,
}

impl std::fmt::Debug for Explainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Explainer")
            .field("outputs", &self.outputs)
            .finish_non_exhaustive()
    }
}

impl Explainer {
    /// Checks that the bundle at `path` can be explained and reads its classifier weights.
    pub fn new(meta: &BundleMeta, detector: Detector, path: &Path) -> Result<Self, ExplainError> {
        let Some(feature_map) = meta.outputs.feature_map.clone() else {
            return Err(ExplainError::Unavailable(format!(
                "model {:?} was exported without the feature_map output that explanations need; \
                 re-export it with `csg-export export --feature-map` and calibrate it again",
                meta.name
            )));
        };
        if detector.gate().is_none() {
            return Err(ExplainError::Unavailable(format!(
                "model {:?} has no learned gate and no calibration whose empirical gate could \
                 stand in for one; run `csgd calibrate` on it",
                meta.name
            )));
        }
        let classifier = Classifier::read(path, meta)?;
        let outputs = std::iter::once(meta.outputs.logits.clone())
            .chain(detector.stage_outputs().iter().cloned())
            .chain(std::iter::once(feature_map))
            .collect();
        Ok(Self {
            detector,
            classifier,
            spec: meta.input.clone(),
            learned_gate: meta.gate.is_some(),
            outputs,
        })
    }

    /// The graph outputs an explanation run fetches.
    pub fn outputs(&self) -> &[String] {
        &self.outputs
    }

    pub fn detector(&self) -> &Detector {
        &self.detector
    }

    pub fn input_spec(&self) -> &InputSpec {
        &self.spec
    }

    /// Runs one normalised CHW image on `model` and explains it, listing `top` other-class
    /// filters.
    pub fn run(
        &self,
        model: &mut Model,
        input: &[f32],
        top: usize,
    ) -> Result<Explanation, ExplainError> {
        let s = &self.spec;
        let view =
            ArrayView4::from_shape((1, s.channels, s.height, s.width), input).map_err(|_| {
                ExplainError::Output(format!(
                    "the input has {} values, the model takes {}",
                    input.len(),
                    s.len()
                ))
            })?;
        let names: Vec<&str> = self.outputs.iter().map(String::as_str).collect();
        let arrays = model.run_any(view, &names)?;
        self.explain(&arrays, input, 0, top)
    }

    /// Explains image `i` of a batch whose outputs are [`Explainer::outputs`], in that order;
    /// `image` is that image's normalised input.
    pub fn explain(
        &self,
        arrays: &[ArrayD<f32>],
        image: &[f32],
        i: usize,
        top: usize,
    ) -> Result<Explanation, ExplainError> {
        let (fm_array, rest) = arrays
            .split_last()
            .ok_or_else(|| ExplainError::Output("no outputs".into()))?;
        // Image i's outputs as one-row arrays; the detector reads a stage map's spatial
        // statistics, reduced as the daemon reduces them.
        let mut rows: Vec<Array2<f32>> = rest
            .iter()
            .map(|a| Ok(Array1::from(row(a, i)?).insert_axis(Axis(0))))
            .collect::<Result<_, ExplainError>>()?;
        if let Some(stages) = rows.get_mut(1..) {
            self.detector
                .reduce_maps(stages)
                .map_err(|e| ExplainError::Output(e.to_string()))?;
        }
        let rows: Vec<&[f32]> = rows
            .iter()
            .map(|a| {
                a.as_slice()
                    .ok_or_else(|| ExplainError::Output("an output row is not contiguous".into()))
            })
            .collect::<Result<_, _>>()?;
        let Some((logits, stages)) = rows.split_first() else {
            return Err(ExplainError::Output("no logits".into()));
        };
        let image = ArrayView2::from_shape((1, image.len()), image)
            .map_err(|e| ExplainError::Output(e.to_string()))?;
        let histogram = match self.detector.input_histograms(image) {
            Some(h) => Some(h.map_err(|e| ExplainError::Output(e.to_string()))?),
            None => None,
        };
        let sample = Sample {
            logits,
            stages: stages.to_vec(),
            input: histogram.as_ref().and_then(|h| h.as_slice()),
        };
        let verdict = self.detector.judge(&sample);
        let class = verdict.class_id;
        let (feature_map, size) = feature_map(fm_array, i, self.classifier.filters)?;
        let maps = self.maps(class, &feature_map, size);
        let acts = sample.stages.last().copied().unwrap_or(&[]);
        let stats = self.detector.gated_stats();
        let (class_filters, other_filters) = match self.detector.gate() {
            Some(gate) => (
                gated_deviations(gate, acts, stats, class),
                rank::other_filters(gate, acts, stats, class, self.detector.classes(), top),
            ),
            None => (Vec::new(), Vec::new()),
        };
        Ok(Explanation {
            verdict,
            gate: if self.learned_gate {
                "learned"
            } else {
                "empirical"
            },
            class_filters,
            other_filters,
            maps,
        })
    }

    /// Both maps of `class` from one image's feature map `[K, h, w]` (row-major).
    pub fn maps(
        &self,
        class: usize,
        feature_map: &[f32],
        (h, w): (usize, usize),
    ) -> LocalisationMaps {
        let gated: Vec<(usize, f32)> = self
            .detector
            .gate()
            .map(|g| {
                (0..g.filters)
                    .map(|k| (k, g.get(k, class)))
                    .filter(|&(_, v)| v >= GATED)
                    .collect()
            })
            .unwrap_or_default();
        let cam: Vec<(usize, f32)> = self
            .classifier
            .row(class)
            .iter()
            .copied()
            .enumerate()
            .collect();
        let input = (self.spec.height, self.spec.width);
        let up = |weights: &[(usize, f32)]| {
            maps::upsample(
                &maps::weighted_sum(feature_map, h * w, weights),
                (h, w),
                input,
            )
        };
        LocalisationMaps {
            feature_size: [h, w],
            gated: up(&gated),
            cam: up(&cam),
        }
    }
}

/// Image `i`'s values of an `[N, …]` output, flattened in order (a stage's feature map
/// `[N, C, h, w]` gives its C planes one after another).
fn row(array: &ArrayD<f32>, i: usize) -> Result<Vec<f32>, ExplainError> {
    match array.shape() {
        [n, _, ..] if i < *n => Ok(array
            .index_axis(ndarray::Axis(0), i)
            .iter()
            .copied()
            .collect()),
        shape => Err(ExplainError::Output(format!(
            "an output has shape {shape:?}, expected [N, …] with N > {i}"
        ))),
    }
}

/// Image `i`'s `[K, h, w]` slice of a `[N, K, h, w]` feature map, and (h, w).
fn feature_map(
    array: &ArrayD<f32>,
    i: usize,
    filters: usize,
) -> Result<(Vec<f32>, (usize, usize)), ExplainError> {
    match array.shape() {
        &[n, k, h, w] if i < n && k == filters => Ok((
            array
                .index_axis(ndarray::Axis(0), i)
                .iter()
                .copied()
                .collect(),
            (h, w),
        )),
        shape => Err(ExplainError::Output(format!(
            "the feature map has shape {shape:?}, expected [N, {filters}, h, w]"
        ))),
    }
}

/// A model's explanation session: one ONNX Runtime session of its own, so explanations never
/// change what the batched detect sessions fetch. Explanations of one model run one at a time.
pub struct ExplainSession {
    explainer: Explainer,
    model: Mutex<Model>,
}

impl std::fmt::Debug for ExplainSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExplainSession")
            .field("explainer", &self.explainer)
            .finish_non_exhaustive()
    }
}

impl ExplainSession {
    /// Takes a loaded session and checks it with a zero image.
    pub fn new(explainer: Explainer, mut model: Model) -> Result<Self, ExplainError> {
        let zeros = vec![0f32; explainer.spec.len()];
        explainer.run(&mut model, &zeros, 1)?;
        Ok(Self {
            explainer,
            model: Mutex::new(model),
        })
    }

    pub fn explainer(&self) -> &Explainer {
        &self.explainer
    }

    /// Explains one normalised CHW image (blocking); also returns the time spent in ONNX
    /// Runtime and the explanation's arithmetic, not counting the wait for the session.
    pub fn explain(
        &self,
        input: &[f32],
        top: usize,
    ) -> Result<(Explanation, Duration), ExplainError> {
        let mut model = self.model.lock().unwrap_or_else(|e| e.into_inner());
        let started = Instant::now();
        let explanation = self.explainer.run(&mut model, input, top)?;
        Ok((explanation, started.elapsed()))
    }
}
