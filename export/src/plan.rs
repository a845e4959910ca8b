//! The layer plan of an [`Architecture`]: every convolution with its tensor names, shapes,
//! stride and padding, in forward order.
//!
//! The tensor check and the graph builder both walk this one plan, so the names and shapes the
//! checkpoint is checked against are exactly those the graph consumes.

use csg_bundle::{Architecture, Backbone, BlockKind, GATE_TENSOR, Stem};

use crate::tensors::TensorSpec;

/// A convolution (no bias) followed by batch norm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvBn {
    /// Name of the convolution weight, e.g. `layer1.0.conv1.weight`.
    pub conv: String,
    /// Prefix of the batch-norm tensors, e.g. `layer1.0.bn1` (`.weight`, `.bias`, …).
    pub bn: String,
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub pad: usize,
}

impl ConvBn {
    fn new(conv: String, bn: String, io: (usize, usize), kernel: usize, stride: usize) -> Self {
        Self {
            conv,
            bn,
            in_channels: io.0,
            out_channels: io.1,
            kernel,
            stride,
            pad: kernel / 2,
        }
    }

    pub fn weight_shape(&self) -> [usize; 4] {
        [
            self.out_channels,
            self.in_channels,
            self.kernel,
            self.kernel,
        ]
    }

    /// Names of the batch-norm tensors: scale, bias, running mean, running variance.
    pub fn bn_names(&self) -> [String; 4] {
        ["weight", "bias", "running_mean", "running_var"].map(|s| format!("{}.{s}", self.bn))
    }

    fn specs(&self, out: &mut Vec<TensorSpec>) {
        out.push(TensorSpec::new(&self.conv, &self.weight_shape()));
        for name in self.bn_names() {
            out.push(TensorSpec::new(name, &[self.out_channels]));
        }
    }
}

/// A residual block: `convs` in sequence with ReLU between them, then the shortcut (identity
/// or `downsample`) is added and a ReLU applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    pub name: String,
    pub convs: Vec<ConvBn>,
    pub downsample: Option<ConvBn>,
}

/// One stage; its output (after the ReLU) is what GAP sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stage {
    /// conv → BN → ReLU, then a 2×2 max-pool applied after the stage output is taken.
    Cnn {
        unit: ConvBn,
        pool: bool,
    },
    Residual {
        blocks: Vec<Block>,
    },
}

/// The stem of a ResNet: conv → BN → ReLU, optionally a 3×3/2 max-pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StemPlan {
    pub unit: ConvBn,
    pub max_pool: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub stem: Option<StemPlan>,
    pub stages: Vec<Stage>,
    /// K, the gated stage's channels (the classifier's input).
    pub filters: usize,
    pub classes: usize,
}

impl Plan {
    pub fn new(arch: &Architecture) -> Self {
        let mut stages = Vec::new();
        let stem = match &arch.backbone {
            Backbone::Cnn { stages: cnn } => {
                let mut inputs = arch.in_channels;
                for (i, s) in cnn.iter().enumerate() {
                    let unit = ConvBn::new(
                        format!("features.{i}.conv.weight"),
                        format!("features.{i}.bn"),
                        (inputs, s.channels),
                        3,
                        1,
                    );
                    stages.push(Stage::Cnn { unit, pool: s.pool });
                    inputs = s.channels;
                }
                None
            }
            Backbone::ResNet {
                block,
                layers,
                widths,
                stem,
            } => {
                let (kernel, stride, max_pool) = match stem {
                    Stem::ImageNet { .. } => (7, 2, true),
                    Stem::Small { .. } => (3, 1, false),
                };
                let unit = ConvBn::new(
                    "conv1.weight".into(),
                    "bn1".into(),
                    (arch.in_channels, stem.width()),
                    kernel,
                    stride,
                );
                let mut inputs = stem.width();
                for (l, (&depth, &width)) in layers.iter().zip(widths).enumerate() {
                    let blocks = (0..depth)
                        .map(|b| {
                            let stride = if l > 0 && b == 0 { 2 } else { 1 };
                            let name = format!("layer{}.{b}", l + 1);
                            let unit = residual_block(&name, *block, inputs, width, stride);
                            inputs = width * block.expansion();
                            unit
                        })
                        .collect();
                    stages.push(Stage::Residual { blocks });
                }
                Some(StemPlan { unit, max_pool })
            }
        };
        Self {
            stem,
            stages,
            filters: arch.filters(),
            classes: arch.classes,
        }
    }

    /// Every tensor the network needs, with its shape; the gate `[K, C]` when `gated`.
    pub fn specs(&self, gated: bool) -> Vec<TensorSpec> {
        let mut out = Vec::new();
        if let Some(stem) = &self.stem {
            stem.unit.specs(&mut out);
        }
        for stage in &self.stages {
            match stage {
                Stage::Cnn { unit, .. } => unit.specs(&mut out),
                Stage::Residual { blocks } => {
                    for block in blocks {
                        block.convs.iter().for_each(|c| c.specs(&mut out));
                        if let Some(d) = &block.downsample {
                            d.specs(&mut out);
                        }
                    }
                }
            }
        }
        out.push(TensorSpec::new("fc.weight", &[self.classes, self.filters]));
        out.push(TensorSpec::new("fc.bias", &[self.classes]));
        if gated {
            out.push(TensorSpec::new(GATE_TENSOR, &[self.filters, self.classes]));
        }
        out
    }
}

/// torchvision's BasicBlock / Bottleneck (v1.5: the stride sits on the 3×3 convolution), with a
/// 1×1 strided downsample whenever the shape changes.
fn residual_block(
    name: &str,
    kind: BlockKind,
    inputs: usize,
    width: usize,
    stride: usize,
) -> Block {
    let unit = |i: usize, io: (usize, usize), kernel: usize, stride: usize| {
        ConvBn::new(
            format!("{name}.conv{i}.weight"),
            format!("{name}.bn{i}"),
            io,
            kernel,
            stride,
        )
    };
    let outputs = width * kind.expansion();
    let convs = match kind {
        BlockKind::Basic => vec![
            unit(1, (inputs, width), 3, stride),
            unit(2, (width, width), 3, 1),
        ],
        BlockKind::Bottleneck => vec![
            unit(1, (inputs, width), 1, 1),
            unit(2, (width, width), 3, stride),
            unit(3, (width, outputs), 1, 1),
        ],
    };
    let downsample = (stride != 1 || inputs != outputs).then(|| {
        ConvBn::new(
            format!("{name}.downsample.0.weight"),
            format!("{name}.downsample.1"),
            (inputs, outputs),
            1,
            stride,
        )
    });
    Block {
        name: name.to_owned(),
        convs,
        downsample,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resnet(block: BlockKind, layers: Vec<usize>, widths: Vec<usize>) -> Architecture {
        Architecture {
            in_channels: 3,
            classes: 6,
            bn_eps: 1e-5,
            backbone: Backbone::ResNet {
                block,
                layers,
                widths,
                stem: Stem::ImageNet { width: 64 },
            },
        }
    }

    #[test]
    fn resnet18_has_torchvisions_tensor_count() {
        // torchvision resnet18: 122 entries minus 20 num_batches_tracked = 102 tensors.
        let arch = resnet(BlockKind::Basic, vec![2, 2, 2, 2], vec![64, 128, 256, 512]);
        let specs = Plan::new(&arch).specs(false);
        assert_eq!(specs.len(), 102);
        assert!(
            specs
                .iter()
                .any(|s| s.name == "layer2.0.downsample.0.weight")
        );
        assert!(
            !specs
                .iter()
                .any(|s| s.name == "layer1.0.downsample.0.weight")
        );
    }

    #[test]
    fn resnet50_downsamples_every_first_block() {
        // torchvision resnet50: 320 entries minus 53 num_batches_tracked = 267 tensors.
        let arch = resnet(
            BlockKind::Bottleneck,
            vec![3, 4, 6, 3],
            vec![64, 128, 256, 512],
        );
        let plan = Plan::new(&arch);
        assert_eq!(plan.specs(false).len(), 267);
        assert_eq!(plan.filters, 2048);
        let Stage::Residual { blocks } = &plan.stages[0] else {
            panic!("residual stage expected")
        };
        assert!(blocks[0].downsample.is_some() && blocks[1].downsample.is_none());
        assert_eq!(blocks[0].convs[2].weight_shape(), [256, 64, 1, 1]);
    }
}
