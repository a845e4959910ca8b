//! The networks, in burn, built from a [`csg_bundle::Architecture`].
//!
//! Field names are chosen so that burn's module paths, after [`crate::checkpoint`]'s small
//! remapping, are torchvision's tensor names: the exporter then reads our checkpoints and the
//! official PyTorch ones through one code path.

use burn::module::Param;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::Int;
use burn::tensor::activation::relu;
use csg_bundle::{Architecture, Backbone, BlockKind, Stem};

/// conv3×3 → BN → ReLU, one stage of the plain CNN.
#[derive(Module, Debug)]
pub struct ConvBn {
    conv: Conv2d,
    bn: BatchNorm,
}

/// The 1×1 strided projection of a residual block whose shape changes
/// (torchvision's `downsample.0` / `downsample.1`).
#[derive(Module, Debug)]
pub struct Downsample {
    conv: Conv2d,
    bn: BatchNorm,
}

/// torchvision's BasicBlock: two 3×3 convolutions and a shortcut.
#[derive(Module, Debug)]
pub struct BasicBlock {
    conv1: Conv2d,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    downsample: Option<Downsample>,
}

/// The gate G [K, C] (official name `lmask.mask`).
#[derive(Module, Debug)]
pub struct GateParam {
    pub mask: Param<Tensor<2>>,
}

/// A CSG network: backbone (CNN stages or ResNet stem + layers), GAP, `fc`, optional gate.
#[derive(Module, Debug)]
pub struct Network {
    /// Plain-CNN stages (empty for a ResNet).
    features: Vec<ConvBn>,
    /// ResNet stem (absent for a CNN).
    conv1: Option<Conv2d>,
    bn1: Option<BatchNorm>,
    /// ResNet layers, `layers[i]` is torchvision's `layer{i+1}`.
    layers: Vec<Vec<BasicBlock>>,
    pub fc: Linear,
    pub lmask: Option<GateParam>,
    #[module(skip)]
    arch: Architecture,
}

/// What one forward pass yields.
pub struct Forward {
    /// [N, C] standard-path logits.
    pub logits: Tensor<2>,
    /// Per-stage GAP of the post-ReLU stage output, [N, channels]; the last is the gated layer.
    pub stage_activations: Vec<Tensor<2>>,
    /// The post-ReLU stage outputs themselves, [N, channels, h, w] (what the GAPs average;
    /// the detector's spatial statistics read them).
    pub stage_maps: Vec<Tensor<4>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Architecture(#[from] csg_bundle::BundleError),
    #[error("the trainer builds ResNets from BasicBlocks only; {0:?} blocks are export-only")]
    UnsupportedBlock(BlockKind),
}

fn conv3x3(cin: usize, cout: usize, stride: usize, device: &Device) -> Conv2d {
    Conv2dConfig::new([cin, cout], [3, 3])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .with_bias(false)
        .init(device)
}

fn batch_norm(channels: usize, eps: f64, device: &Device) -> BatchNorm {
    BatchNormConfig::new(channels)
        .with_epsilon(eps)
        .init(device)
}

impl Network {
    /// A freshly initialised network; `gated` adds the gate at 0.5 everywhere (REFERENCE §1).
    pub fn new(arch: &Architecture, gated: bool, device: &Device) -> Result<Self, ModelError> {
        arch.validate()?;
        let eps = arch.bn_eps;
        let mut features = Vec::new();
        let mut conv1 = None;
        let mut bn1 = None;
        let mut layers = Vec::new();
        match &arch.backbone {
            Backbone::Cnn { stages } => {
                let mut cin = arch.in_channels;
                for stage in stages {
                    features.push(ConvBn {
                        conv: conv3x3(cin, stage.channels, 1, device),
                        bn: batch_norm(stage.channels, eps, device),
                    });
                    cin = stage.channels;
                }
            }
            Backbone::ResNet {
                block,
                layers: depths,
                widths,
                stem,
            } => {
                if *block != BlockKind::Basic {
                    return Err(ModelError::UnsupportedBlock(*block));
                }
                let width = stem.width();
                conv1 = Some(match stem {
                    Stem::ImageNet { .. } => Conv2dConfig::new([arch.in_channels, width], [7, 7])
                        .with_stride([2, 2])
                        .with_padding(PaddingConfig2d::Explicit(3, 3, 3, 3))
                        .with_bias(false)
                        .init(device),
                    Stem::Small { .. } => conv3x3(arch.in_channels, width, 1, device),
                });
                bn1 = Some(batch_norm(width, eps, device));
                let mut cin = width;
                for (i, (&depth, &cout)) in depths.iter().zip(widths).enumerate() {
                    let mut blocks = Vec::with_capacity(depth);
                    for b in 0..depth {
                        let stride = if i > 0 && b == 0 { 2 } else { 1 };
                        let downsample = (stride != 1 || cin != cout).then(|| Downsample {
                            conv: Conv2dConfig::new([cin, cout], [1, 1])
                                .with_stride([stride, stride])
                                .with_bias(false)
                                .init(device),
                            bn: batch_norm(cout, eps, device),
                        });
                        blocks.push(BasicBlock {
                            conv1: conv3x3(cin, cout, stride, device),
                            bn1: batch_norm(cout, eps, device),
                            conv2: conv3x3(cout, cout, 1, device),
                            bn2: batch_norm(cout, eps, device),
                            downsample,
                        });
                        cin = cout;
                    }
                    layers.push(blocks);
                }
            }
        }
        let k = arch.filters();
        let lmask = gated.then(|| GateParam {
            mask: Param::from_tensor(Tensor::full([k, arch.classes], 0.5, device)),
        });
        Ok(Self {
            features,
            conv1,
            bn1,
            layers,
            fc: LinearConfig::new(k, arch.classes).init(device),
            lmask,
            arch: arch.clone(),
        })
    }

    pub fn architecture(&self) -> &Architecture {
        &self.arch
    }

    /// The backbone: every stage's post-ReLU output, the last being the gated feature map.
    pub fn stages(&self, input: Tensor<4>) -> Vec<Tensor<4>> {
        let mut outputs = Vec::new();
        match &self.arch.backbone {
            Backbone::Cnn { stages } => {
                let pool = MaxPool2dConfig::new([2, 2]).init();
                let mut x = input;
                for (layer, spec) in self.features.iter().zip(stages) {
                    let y = relu(layer.bn.forward(layer.conv.forward(x)));
                    x = if spec.pool {
                        pool.forward(y.clone())
                    } else {
                        y.clone()
                    };
                    outputs.push(y);
                }
            }
            Backbone::ResNet { stem, .. } => {
                let (Some(conv1), Some(bn1)) = (&self.conv1, &self.bn1) else {
                    return outputs;
                };
                let mut x = relu(bn1.forward(conv1.forward(input)));
                if let Stem::ImageNet { .. } = stem {
                    let pool: MaxPool2d = MaxPool2dConfig::new([3, 3])
                        .with_strides([2, 2])
                        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                        .init();
                    x = pool.forward(x);
                }
                for layer in &self.layers {
                    for block in layer {
                        x = block.forward(x);
                    }
                    outputs.push(x.clone());
                }
            }
        }
        outputs
    }

    /// The standard path (used for inference, always): logits and every stage's GAP.
    pub fn forward(&self, input: Tensor<4>) -> Forward {
        let stage_maps = self.stages(input);
        let stage_activations: Vec<Tensor<2>> =
            stage_maps.iter().cloned().map(global_average).collect();
        let last = stage_activations
            .last()
            .cloned()
            .expect("a validated architecture has at least one stage");
        Forward {
            logits: self.fc.forward(last),
            stage_activations,
            stage_maps,
        }
    }

    /// The CSG path: logits of `fc(GAP(f ⊙ G[:, y]))`. Because the gate is constant over
    /// space, GAP(f ⊙ g) = GAP(f) ⊙ g, so the gate multiplies the pooled activations.
    pub fn gated_logits(
        &self,
        activations: Tensor<2>,
        labels: Tensor<1, Int>,
    ) -> Option<Tensor<2>> {
        let gate = self.lmask.as_ref()?.mask.val();
        let columns = gate.transpose().select(0, labels);
        Some(self.fc.forward(activations * columns))
    }
}

impl BasicBlock {
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let shortcut = match &self.downsample {
            Some(d) => d.bn.forward(d.conv.forward(x.clone())),
            None => x.clone(),
        };
        let y = relu(self.bn1.forward(self.conv1.forward(x)));
        let y = self.bn2.forward(self.conv2.forward(y));
        relu(y + shortcut)
    }
}

/// [N, C, H, W] → [N, C] mean over space.
pub fn global_average(x: Tensor<4>) -> Tensor<2> {
    let [n, c, h, w] = x.dims();
    x.reshape([n, c, h * w]).mean_dim(2).reshape([n, c])
}
