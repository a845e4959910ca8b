//! The architecture description: enough to rebuild a network from its tensors alone.
//!
//! `csg-train` writes it into its checkpoints, `csg-export` infers it from official PyTorch
//! checkpoints and turns it into an ONNX graph, and the bundle metadata carries a copy so the
//! daemon can describe what it serves. Tensor names follow torchvision's conventions (see
//! [`Architecture::tensor_names`]) so that one exporter path serves both kinds of checkpoint.

use serde::{Deserialize, Serialize};

use crate::BundleError;

/// A CSG network: a convolutional backbone whose last stage is the gated layer, global average
/// pooling, and a linear classifier `fc`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Architecture {
    /// Input channels (1 for grayscale, 3 for RGB).
    pub in_channels: usize,
    /// Number of classes C.
    pub classes: usize,
    /// Batch-norm epsilon (PyTorch's and burn's default is 1e-5).
    #[serde(default = "default_bn_eps")]
    pub bn_eps: f64,
    pub backbone: Backbone,
}

fn default_bn_eps() -> f64 {
    1e-5
}

/// The convolutional part of the network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Backbone {
    /// Plain stages of conv3×3 (padding 1, no bias) → batch norm → ReLU, each optionally
    /// followed by a 2×2 max-pool. Tensors: `features.{i}.conv.weight`, `features.{i}.bn.*`.
    Cnn { stages: Vec<CnnStage> },
    /// A torchvision-style ResNet: stem, `layer1..layerN` of residual blocks, first block of
    /// every layer after the first striding by 2.
    ResNet {
        block: BlockKind,
        /// Blocks per layer, e.g. `[2, 2, 2, 2]` for ResNet-18.
        layers: Vec<usize>,
        /// Base width of each layer (output channels before the block expansion).
        widths: Vec<usize>,
        stem: Stem,
    },
}

/// One stage of [`Backbone::Cnn`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CnnStage {
    pub channels: usize,
    /// 2×2 max-pool after the ReLU. The stage's output (what GAP sees) is taken before it.
    pub pool: bool,
}

impl CnnStage {
    /// Parses stage widths written as the trainer's `--cnn` takes them: `"16p,64p,128"`, a
    /// trailing `p` pooling after the stage.
    pub fn parse_list(spec: &str) -> Result<Vec<CnnStage>, BundleError> {
        spec.split(',')
            .map(|s| {
                let s = s.trim();
                let (digits, pool) = match s.strip_suffix('p') {
                    Some(d) => (d, true),
                    None => (s, false),
                };
                let channels = digits.parse().map_err(|_| {
                    BundleError::Architecture(format!(
                        "CNN stage {s:?} is not a width like 64 or 64p"
                    ))
                })?;
                Ok(CnnStage { channels, pool })
            })
            .collect()
    }
}

impl Architecture {
    /// A plain CNN with batch norm (ε = 1e-5) on `in_channels` planes for `classes` classes.
    pub fn cnn(in_channels: usize, classes: usize, stages: Vec<CnnStage>) -> Self {
        Self {
            in_channels,
            classes,
            bn_eps: 1e-5,
            backbone: Backbone::Cnn { stages },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockKind {
    /// Two 3×3 convolutions (ResNet-18/34); expansion 1.
    Basic,
    /// 1×1, 3×3 (strided), 1×1 convolutions (ResNet-50/101/152); expansion 4.
    Bottleneck,
}

impl BlockKind {
    pub fn expansion(self) -> usize {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

/// The ResNet stem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Stem {
    /// torchvision: conv 7×7 stride 2 padding 3 → BN → ReLU → max-pool 3×3 stride 2 padding 1.
    ImageNet { width: usize },
    /// For small inputs (28×28, 32×32): conv 3×3 stride 1 padding 1 → BN → ReLU.
    Small { width: usize },
}

impl Stem {
    pub fn width(self) -> usize {
        match self {
            Stem::ImageNet { width } | Stem::Small { width } => width,
        }
    }
}

impl Architecture {
    /// 0-based earlier stages whose GAP and feature map the exporter writes by default: the
    /// second, in a network of three or more stages, for a detector that reads an early
    /// stage (`csgd calibrate --stages 2`; REFERENCE §3: an early stage's statistics add what
    /// the gated stage misses, more stages did not help). The default detector reads none
    /// since the input's pixel histogram does that job better (README, Detection); a
    /// serving session cuts the unread outputs away, so exporting them costs nothing.
    pub fn default_detector_stages(&self) -> Vec<usize> {
        if self.stage_channels().len() >= 3 {
            vec![1]
        } else {
            Vec::new()
        }
    }

    /// Output channels of every stage, in order; the last one is K, the gated layer's width.
    pub fn stage_channels(&self) -> Vec<usize> {
        match &self.backbone {
            Backbone::Cnn { stages } => stages.iter().map(|s| s.channels).collect(),
            Backbone::ResNet { block, widths, .. } => {
                widths.iter().map(|w| w * block.expansion()).collect()
            }
        }
    }

    /// K: the number of filters of the gated (last) stage.
    pub fn filters(&self) -> usize {
        self.stage_channels().last().copied().unwrap_or(0)
    }

    /// Checks the description is internally consistent.
    pub fn validate(&self) -> Result<(), BundleError> {
        let bad = |why: String| Err(BundleError::Architecture(why));
        if self.in_channels == 0 || self.classes < 2 {
            return bad(format!(
                "need ≥1 input channel and ≥2 classes, got {} and {}",
                self.in_channels, self.classes
            ));
        }
        if !(self.bn_eps > 0.0 && self.bn_eps.is_finite()) {
            return bad(format!("bn_eps must be positive, got {}", self.bn_eps));
        }
        match &self.backbone {
            Backbone::Cnn { stages } => {
                if stages.is_empty() || stages.iter().any(|s| s.channels == 0) {
                    return bad("a CNN needs at least one stage, all with channels > 0".into());
                }
            }
            Backbone::ResNet {
                layers,
                widths,
                stem,
                ..
            } => {
                if layers.is_empty() || layers.len() != widths.len() {
                    return bad(format!(
                        "ResNet layers ({}) and widths ({}) must be non-empty and of equal length",
                        layers.len(),
                        widths.len()
                    ));
                }
                if layers.contains(&0) || widths.contains(&0) || stem.width() == 0 {
                    return bad("ResNet layers, widths and stem width must all be > 0".into());
                }
            }
        }
        Ok(())
    }

    /// Spatial size of each stage's output for a square input of side `input`.
    pub fn stage_sizes(&self, input: usize) -> Vec<usize> {
        match &self.backbone {
            Backbone::Cnn { stages } => {
                let mut size = input;
                let mut out = Vec::with_capacity(stages.len());
                for stage in stages {
                    out.push(size);
                    if stage.pool {
                        size /= 2;
                    }
                }
                out
            }
            Backbone::ResNet { layers, stem, .. } => {
                let mut size = match stem {
                    // conv 7×7/2 pad 3, then max-pool 3×3/2 pad 1.
                    Stem::ImageNet { .. } => (((input + 6 - 7) / 2 + 1) + 2 - 3) / 2 + 1,
                    Stem::Small { .. } => input,
                };
                (0..layers.len())
                    .map(|i| {
                        if i > 0 {
                            size = (size + 2 - 3) / 2 + 1;
                        }
                        size
                    })
                    .collect()
            }
        }
    }

    /// A short human-readable name, e.g. `cnn-32-64-128-128` or `resnet-basic-2-2-2-2`.
    pub fn summary(&self) -> String {
        match &self.backbone {
            Backbone::Cnn { stages } => {
                let widths: Vec<String> = stages.iter().map(|s| s.channels.to_string()).collect();
                format!("cnn-{}", widths.join("-"))
            }
            Backbone::ResNet { block, layers, .. } => {
                let depths: Vec<String> = layers.iter().map(|d| d.to_string()).collect();
                let kind = match block {
                    BlockKind::Basic => "basic",
                    BlockKind::Bottleneck => "bottleneck",
                };
                format!("resnet-{kind}-{}", depths.join("-"))
            }
        }
    }
}

/// Name of the gate tensor [K, C] in checkpoints (the official code's `lmask.mask`).
pub const GATE_TENSOR: &str = "lmask.mask";

#[cfg(test)]
mod tests {
    use super::*;

    fn resnet18() -> Architecture {
        Architecture {
            in_channels: 3,
            classes: 6,
            bn_eps: 1e-5,
            backbone: Backbone::ResNet {
                block: BlockKind::Basic,
                layers: vec![2, 2, 2, 2],
                widths: vec![64, 128, 256, 512],
                stem: Stem::ImageNet { width: 64 },
            },
        }
    }

    #[test]
    fn resnet18_sizes_match_torchvision() {
        // torchvision's ResNet-18 on 128×128 ends in a 4×4 map of 512 channels.
        let arch = resnet18();
        assert_eq!(arch.stage_sizes(128), vec![32, 16, 8, 4]);
        assert_eq!(arch.filters(), 512);
        assert!(arch.validate().is_ok());
    }

    #[test]
    fn cnn_sizes_skip_the_pool_of_the_stage_itself() {
        let arch = Architecture::cnn(
            1,
            10,
            CnnStage::parse_list("32p,64p,128").expect("valid widths"),
        );
        assert_eq!(arch.stage_sizes(28), vec![28, 14, 7]);
        assert_eq!(arch.summary(), "cnn-32-64-128");
    }

    #[test]
    fn cnn_widths_parse_and_bad_ones_are_named() {
        let stages = CnnStage::parse_list("16p, 64p,128").expect("valid");
        assert_eq!(stages.len(), 3);
        assert!(stages[0].pool && stages[1].pool && !stages[2].pool);
        assert_eq!(stages[2].channels, 128);
        let err = CnnStage::parse_list("16p,x64").unwrap_err().to_string();
        assert!(err.contains("\"x64\""), "{err}");
    }

    #[test]
    fn json_round_trip_and_validation() {
        let arch = resnet18();
        let text = serde_json::to_string(&arch).unwrap();
        let back: Architecture = serde_json::from_str(&text).unwrap();
        assert_eq!(arch, back);

        let mut broken = arch;
        if let Backbone::ResNet { widths, .. } = &mut broken.backbone {
            widths.pop();
        }
        assert!(broken.validate().is_err());
    }
}
