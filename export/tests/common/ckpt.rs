//! Builds small csg-train checkpoints (safetensors + metadata) with random weights.

use std::collections::HashMap;
use std::path::Path;

use csg_bundle::{Architecture, Backbone, BlockKind, CnnStage, InputSpec, Stem};
use safetensors::Dtype;
use safetensors::tensor::TensorView;

use super::reference::Weights;

/// xorshift64*: deterministic, dependency-free.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (v >> 40) as f32 / (1u64 << 24) as f32
    }

    pub fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.uniform()
    }

    pub fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.range(lo, hi)).collect()
    }
}

pub struct Net {
    pub arch: Architecture,
    pub weights: Weights,
}

fn conv(w: &mut Weights, rng: &mut Rng, name: &str, out: usize, inp: usize, k: usize) {
    let bound = (1.0 / (inp * k * k) as f32).sqrt() * 1.5;
    let shape = vec![out, inp, k, k];
    let n = out * inp * k * k;
    w.insert(name.into(), (shape, rng.vec(n, -bound, bound)));
}

fn bn(w: &mut Weights, rng: &mut Rng, prefix: &str, c: usize) {
    w.insert(format!("{prefix}.weight"), (vec![c], rng.vec(c, 0.5, 1.5)));
    w.insert(format!("{prefix}.bias"), (vec![c], rng.vec(c, -0.2, 0.2)));
    w.insert(
        format!("{prefix}.running_mean"),
        (vec![c], rng.vec(c, -0.3, 0.3)),
    );
    w.insert(
        format!("{prefix}.running_var"),
        (vec![c], rng.vec(c, 0.5, 2.0)),
    );
}

fn head(w: &mut Weights, rng: &mut Rng, k: usize, classes: usize, gated: bool) {
    w.insert(
        "fc.weight".into(),
        (vec![classes, k], rng.vec(classes * k, -0.5, 0.5)),
    );
    w.insert(
        "fc.bias".into(),
        (vec![classes], rng.vec(classes, -0.1, 0.1)),
    );
    if gated {
        // Each row's maximum is 1, as after the CSG projection.
        let mut g = rng.vec(k * classes, 0.0, 0.9);
        for (row, chunk) in g.chunks_mut(classes).enumerate() {
            chunk[row % classes] = 1.0;
        }
        w.insert("lmask.mask".into(), (vec![k, classes], g));
    }
}

/// A 3-stage CNN on 1-channel input: 4 (pool), 6 (pool), 8.
pub fn cnn(seed: u64, classes: usize, gated: bool) -> Net {
    let mut rng = Rng::new(seed);
    let mut w = Weights::new();
    let stages = [(4, true), (6, true), (8, false)];
    let mut inp = 1;
    for (i, &(c, _)) in stages.iter().enumerate() {
        conv(
            &mut w,
            &mut rng,
            &format!("features.{i}.conv.weight"),
            c,
            inp,
            3,
        );
        bn(&mut w, &mut rng, &format!("features.{i}.bn"), c);
        inp = c;
    }
    head(&mut w, &mut rng, inp, classes, gated);
    let arch = Architecture {
        in_channels: 1,
        classes,
        bn_eps: 1e-5,
        backbone: Backbone::Cnn {
            stages: stages
                .iter()
                .map(|&(channels, pool)| CnnStage { channels, pool })
                .collect(),
        },
    };
    Net { arch, weights: w }
}

/// A torchvision-named ResNet with the small stem.
pub fn resnet(
    seed: u64,
    block: BlockKind,
    layers: &[usize],
    widths: &[usize],
    classes: usize,
    gated: bool,
) -> Net {
    let mut rng = Rng::new(seed);
    let mut w = Weights::new();
    let stem = 4;
    conv(&mut w, &mut rng, "conv1.weight", stem, 3, 3);
    bn(&mut w, &mut rng, "bn1", stem);
    let exp = block.expansion();
    let mut inp = stem;
    for (l, (&depth, &width)) in layers.iter().zip(widths).enumerate() {
        for b in 0..depth {
            let p = format!("layer{}.{b}", l + 1);
            let stride = if l > 0 && b == 0 { 2 } else { 1 };
            let out = width * exp;
            let convs: Vec<(usize, usize, usize)> = match block {
                BlockKind::Basic => vec![(width, inp, 3), (width, width, 3)],
                BlockKind::Bottleneck => vec![(width, inp, 1), (width, width, 3), (out, width, 1)],
            };
            for (i, &(o, c, k)) in convs.iter().enumerate() {
                conv(
                    &mut w,
                    &mut rng,
                    &format!("{p}.conv{}.weight", i + 1),
                    o,
                    c,
                    k,
                );
                bn(&mut w, &mut rng, &format!("{p}.bn{}", i + 1), o);
            }
            if stride != 1 || inp != out {
                conv(
                    &mut w,
                    &mut rng,
                    &format!("{p}.downsample.0.weight"),
                    out,
                    inp,
                    1,
                );
                bn(&mut w, &mut rng, &format!("{p}.downsample.1"), out);
            }
            inp = out;
        }
    }
    head(&mut w, &mut rng, inp, classes, gated);
    let arch = Architecture {
        in_channels: 3,
        classes,
        bn_eps: 1e-5,
        backbone: Backbone::ResNet {
            block,
            layers: layers.to_vec(),
            widths: widths.to_vec(),
            stem: Stem::Small { width: stem },
        },
    };
    Net { arch, weights: w }
}

pub fn input_spec(channels: usize, size: usize) -> InputSpec {
    InputSpec {
        layout: "NCHW".into(),
        channels,
        height: size,
        width: size,
        value_range: [0.0, 1.0],
        mean: vec![0.5; channels],
        std: vec![0.25; channels],
    }
}

/// Writes `weights` as a csg-train checkpoint with its metadata.
pub fn write(
    path: &Path,
    arch: &Architecture,
    weights: &Weights,
    classes: &[String],
    input: &InputSpec,
) {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = weights
        .iter()
        .map(|(name, (shape, data))| {
            let raw = data.iter().flat_map(|v| v.to_le_bytes()).collect();
            (name.clone(), shape.clone(), raw)
        })
        .collect();
    let views: Vec<(String, TensorView)> = bytes
        .iter()
        .map(|(name, shape, raw)| {
            (
                name.clone(),
                TensorView::new(Dtype::F32, shape.clone(), raw).expect("view"),
            )
        })
        .collect();
    let meta = HashMap::from([
        (
            "csg.arch".to_owned(),
            serde_json::to_string(arch).expect("json"),
        ),
        (
            "csg.classes".to_owned(),
            serde_json::to_string(classes).expect("json"),
        ),
        (
            "csg.input".to_owned(),
            serde_json::to_string(input).expect("json"),
        ),
    ]);
    safetensors::serialize_to_file(views, Some(meta), path).expect("write safetensors");
}
