//! The model-bundle metadata schema (`csgd.bundle.v1`).
//!
//! A bundle is one ONNX file. Its `metadata_props` hold a single entry, [`METADATA_KEY`], whose
//! value is this struct as JSON: everything the daemon needs besides the graph itself (the gate,
//! class names, preprocessing, which outputs mean what, calibration). Written by `csg-export`,
//! completed by `csgd calibrate`, read by `csgd serve`.

use serde::{Deserialize, Serialize};

use crate::calibration::Calibration;
use crate::{Architecture, BundleError};

/// Schema identifier; bump the suffix on any incompatible change.
pub const SCHEMA: &str = "csgd.bundle.v1";
/// The ONNX `metadata_props` key that holds the JSON.
pub const METADATA_KEY: &str = "csgd.bundle";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BundleMeta {
    /// Always [`SCHEMA`]; checked on read.
    pub schema: String,
    /// Model name (the daemon's default route name).
    pub name: String,
    /// Free-form model version.
    pub version: String,
    /// Class names, index = class id; length C.
    pub classes: Vec<String>,
    pub input: InputSpec,
    pub architecture: Architecture,
    /// The learned gate; `None` for a standard-trained baseline.
    pub gate: Option<Gate>,
    pub outputs: OutputNames,
    /// Where the weights came from.
    pub source: SourceInfo,
    /// The trainer's report (accuracy, density, MIS …) when known.
    #[serde(default)]
    pub training: Option<serde_json::Value>,
    /// Filled by `csgd calibrate`; `None` means the daemon can predict but not judge.
    #[serde(default)]
    pub calibration: Option<Calibration>,
}

/// How raw pixels become the network's input tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputSpec {
    /// Always "NCHW".
    pub layout: String,
    /// 1 (grayscale) or 3 (RGB).
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    /// Pixel range after scaling and before normalisation, e.g. [0, 1] for 8-bit / 255.
    pub value_range: [f32; 2],
    /// Per-channel mean subtracted after scaling (length = channels).
    pub mean: Vec<f32>,
    /// Per-channel std divided by after the mean (length = channels).
    pub std: Vec<f32>,
}

impl InputSpec {
    /// A one-channel NCHW spec: pixels scaled to [0, 1], then `(x − mean) / std`.
    pub fn grayscale(height: usize, width: usize, mean: f32, std: f32) -> Self {
        Self {
            layout: "NCHW".into(),
            channels: 1,
            height,
            width,
            value_range: [0.0, 1.0],
            mean: vec![mean],
            std: vec![std],
        }
    }

    /// Element count of one image.
    pub fn len(&self) -> usize {
        self.channels * self.height * self.width
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The gate matrix G ∈ [0,1]^{K×C}, row-major (row k = filter k).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gate {
    pub filters: usize,
    pub classes: usize,
    pub values: Vec<f32>,
}

impl Gate {
    pub fn get(&self, filter: usize, class: usize) -> f32 {
        self.values[filter * self.classes + class]
    }

    /// Column c: class c's gate pattern over the K filters.
    pub fn column(&self, class: usize) -> Vec<f32> {
        (0..self.filters).map(|k| self.get(k, class)).collect()
    }

    /// ‖G‖₁ / (K·C).
    pub fn density(&self) -> f64 {
        let sum: f64 = self.values.iter().map(|&v| f64::from(v.abs())).sum();
        sum / (self.filters * self.classes).max(1) as f64
    }

    /// Filters with G[k, c] = 1 (the projection's "owned" filters), per class.
    pub fn owned_filters_per_class(&self) -> Vec<usize> {
        (0..self.classes)
            .map(|c| {
                (0..self.filters)
                    .filter(|&k| self.get(k, c) >= 1.0 - 1e-6)
                    .count()
            })
            .collect()
    }
}

/// Names of the ONNX graph's outputs and what they hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputNames {
    /// [N, C] logits of the standard path.
    pub logits: String,
    /// [N, K] GAP of the gated (last) stage after its ReLU.
    pub activations: String,
    /// Earlier stages' GAP outputs, in stage order: (stage index, output name, channels).
    #[serde(default)]
    pub stages: Vec<StageOutput>,
    /// [N, K, h, w] of the gated stage, when exported.
    #[serde(default)]
    pub feature_map: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageOutput {
    /// 0-based stage index; the gated stage is the last.
    pub stage: usize,
    pub name: String,
    pub channels: usize,
    /// [N, channels, h, w] output of the stage's post-ReLU feature map itself, from which
    /// the detector computes per-channel spatial statistics
    /// ([`crate::score::spatial_features`]). Absent in bundles from older exporters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map: Option<String>,
}

/// Provenance of the exported weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceInfo {
    /// "csg-train" or "pytorch".
    pub format: String,
    /// File name of the checkpoint (no directory).
    pub file: String,
    /// SHA-256 of the checkpoint file, hex.
    pub sha256: String,
    /// Tool and version that wrote the bundle.
    pub exporter: String,
}

impl BundleMeta {
    /// Parses and validates the metadata JSON stored under [`METADATA_KEY`].
    pub fn from_json(text: &str) -> Result<Self, BundleError> {
        let meta: BundleMeta = serde_json::from_str(text)?;
        meta.validate()?;
        Ok(meta)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("metadata serialises")
    }

    /// Checks every cross-field invariant the daemon relies on.
    pub fn validate(&self) -> Result<(), BundleError> {
        let bad = |why: String| Err(BundleError::Metadata(why));
        if self.schema != SCHEMA {
            return bad(format!(
                "schema is {:?}, this build reads {SCHEMA:?}",
                self.schema
            ));
        }
        self.architecture.validate()?;
        let classes = self.architecture.classes;
        let filters = self.architecture.filters();
        if self.classes.len() != classes {
            return bad(format!(
                "{} class names for a {classes}-class network",
                self.classes.len()
            ));
        }
        let input = &self.input;
        if input.layout != "NCHW" {
            return bad(format!("input layout {:?} is not NCHW", input.layout));
        }
        if input.channels != self.architecture.in_channels {
            return bad(format!(
                "input has {} channels, the network {}",
                input.channels, self.architecture.in_channels
            ));
        }
        if input.mean.len() != input.channels || input.std.len() != input.channels {
            return bad("input mean and std need one value per channel".into());
        }
        if input.std.iter().any(|s| !(*s > 0.0 && s.is_finite())) {
            return bad("input std values must be positive".into());
        }
        if input.height == 0 || input.width == 0 {
            return bad("input height and width must be positive".into());
        }
        if let Some(gate) = &self.gate {
            if gate.filters != filters || gate.classes != classes {
                return bad(format!(
                    "gate is {}×{}, the network has K={filters} filters and C={classes} classes",
                    gate.filters, gate.classes
                ));
            }
            if gate.values.len() != filters * classes {
                return bad(format!(
                    "gate holds {} values, expected {}",
                    gate.values.len(),
                    filters * classes
                ));
            }
            if gate.values.iter().any(|v| !(0.0..=1.0).contains(v)) {
                return bad("gate values must lie in [0, 1]".into());
            }
        }
        let stage_channels = self.architecture.stage_channels();
        for stage in &self.outputs.stages {
            match stage_channels.get(stage.stage) {
                Some(&c) if c == stage.channels => {}
                _ => {
                    return bad(format!(
                        "output {:?} claims stage {} with {} channels; the network's stages have {:?}",
                        stage.name, stage.stage, stage.channels, stage_channels
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{Backbone, CnnStage};

    pub(crate) fn sample() -> BundleMeta {
        BundleMeta {
            schema: SCHEMA.into(),
            name: "m".into(),
            version: "1".into(),
            classes: vec!["a".into(), "b".into()],
            input: InputSpec {
                layout: "NCHW".into(),
                channels: 1,
                height: 8,
                width: 8,
                value_range: [0.0, 1.0],
                mean: vec![0.5],
                std: vec![0.25],
            },
            architecture: Architecture {
                in_channels: 1,
                classes: 2,
                bn_eps: 1e-5,
                backbone: Backbone::Cnn {
                    stages: vec![CnnStage {
                        channels: 3,
                        pool: false,
                    }],
                },
            },
            gate: Some(Gate {
                filters: 3,
                classes: 2,
                values: vec![1.0, 0.0, 0.5, 1.0, 1.0, 1.0],
            }),
            outputs: OutputNames {
                logits: "logits".into(),
                activations: "activations".into(),
                stages: vec![],
                feature_map: None,
            },
            source: SourceInfo {
                format: "csg-train".into(),
                file: "m.safetensors".into(),
                sha256: "00".into(),
                exporter: "test".into(),
            },
            training: None,
            calibration: None,
        }
    }

    #[test]
    fn round_trips_and_validates() {
        let meta = sample();
        let back = BundleMeta::from_json(&meta.to_json()).unwrap();
        assert_eq!(back, meta);
        let gate = back.gate.unwrap();
        assert_eq!(gate.column(0), vec![1.0, 0.5, 1.0]);
        assert_eq!(gate.owned_filters_per_class(), vec![2, 2]);
        assert!((gate.density() - 4.5 / 6.0).abs() < 1e-9);
    }

    #[test]
    fn rejects_inconsistent_gate_and_schema() {
        let mut meta = sample();
        meta.gate.as_mut().unwrap().filters = 4;
        let err = meta.validate().unwrap_err().to_string();
        assert!(err.contains("gate is 4×2"), "{err}");

        let mut meta = sample();
        meta.schema = "csgd.bundle.v0".into();
        assert!(meta.validate().unwrap_err().to_string().contains("schema"));
    }
}
