//! An independent forward pass in plain Rust (ndarray), written from the layer definitions
//! rather than from the exporter's plan: conv, batch norm, ReLU, max-pool, GAP, linear.

use std::collections::HashMap;

use ndarray::{Array1, Array2, Array4, Axis};

pub type Weights = HashMap<String, (Vec<usize>, Vec<f32>)>;

fn get4(w: &Weights, name: &str) -> Array4<f32> {
    let (shape, data) = w
        .get(name)
        .unwrap_or_else(|| panic!("reference needs {name}"));
    Array4::from_shape_vec((shape[0], shape[1], shape[2], shape[3]), data.clone()).expect("4-d")
}

fn get1(w: &Weights, name: &str) -> Array1<f32> {
    let (_, data) = w
        .get(name)
        .unwrap_or_else(|| panic!("reference needs {name}"));
    Array1::from(data.clone())
}

/// Cross-correlation with zero padding, as torch.nn.Conv2d (no bias).
pub fn conv2d(x: &Array4<f32>, w: &Array4<f32>, stride: usize, pad: usize) -> Array4<f32> {
    let (n, cin, h, wd) = x.dim();
    let (cout, cin_w, kh, kw) = w.dim();
    assert_eq!(cin, cin_w);
    let oh = (h + 2 * pad - kh) / stride + 1;
    let ow = (wd + 2 * pad - kw) / stride + 1;
    let mut y = Array4::<f32>::zeros((n, cout, oh, ow));
    for b in 0..n {
        for o in 0..cout {
            for i in 0..oh {
                for j in 0..ow {
                    let mut acc = 0.0f64;
                    for c in 0..cin {
                        for u in 0..kh {
                            for v in 0..kw {
                                let yy = (i * stride + u) as isize - pad as isize;
                                let xx = (j * stride + v) as isize - pad as isize;
                                if yy >= 0 && xx >= 0 && (yy as usize) < h && (xx as usize) < wd {
                                    acc += f64::from(x[[b, c, yy as usize, xx as usize]])
                                        * f64::from(w[[o, c, u, v]]);
                                }
                            }
                        }
                    }
                    y[[b, o, i, j]] = acc as f32;
                }
            }
        }
    }
    y
}

/// Eval-mode batch norm with running statistics.
pub fn batch_norm(x: &mut Array4<f32>, w: &Weights, prefix: &str, eps: f64) {
    let gamma = get1(w, &format!("{prefix}.weight"));
    let beta = get1(w, &format!("{prefix}.bias"));
    let mean = get1(w, &format!("{prefix}.running_mean"));
    let var = get1(w, &format!("{prefix}.running_var"));
    for (c, mut plane) in x.axis_iter_mut(Axis(1)).enumerate() {
        let inv = 1.0 / (f64::from(var[c]) + eps).sqrt();
        plane.mapv_inplace(|v| {
            ((f64::from(v) - f64::from(mean[c])) * inv * f64::from(gamma[c]) + f64::from(beta[c]))
                as f32
        });
    }
}

pub fn relu(x: &mut Array4<f32>) {
    x.mapv_inplace(|v| v.max(0.0));
}

/// Max-pool with implicit −∞ padding, floor mode.
pub fn max_pool(x: &Array4<f32>, k: usize, stride: usize, pad: usize) -> Array4<f32> {
    let (n, c, h, w) = x.dim();
    let oh = (h + 2 * pad - k) / stride + 1;
    let ow = (w + 2 * pad - k) / stride + 1;
    let mut y = Array4::<f32>::from_elem((n, c, oh, ow), f32::NEG_INFINITY);
    for b in 0..n {
        for ch in 0..c {
            for i in 0..oh {
                for j in 0..ow {
                    for u in 0..k {
                        for v in 0..k {
                            let yy = (i * stride + u) as isize - pad as isize;
                            let xx = (j * stride + v) as isize - pad as isize;
                            if yy >= 0 && xx >= 0 && (yy as usize) < h && (xx as usize) < w {
                                let cur = &mut y[[b, ch, i, j]];
                                *cur = cur.max(x[[b, ch, yy as usize, xx as usize]]);
                            }
                        }
                    }
                }
            }
        }
    }
    y
}

/// Global average pooling: [N, C, h, w] → [N, C].
pub fn gap(x: &Array4<f32>) -> Array2<f32> {
    let (n, c, h, w) = x.dim();
    let mut y = Array2::<f32>::zeros((n, c));
    for b in 0..n {
        for ch in 0..c {
            let s: f64 = x
                .slice(ndarray::s![b, ch, .., ..])
                .iter()
                .map(|&v| f64::from(v))
                .sum();
            y[[b, ch]] = (s / (h * w) as f64) as f32;
        }
    }
    y
}

/// `a · Wᵀ + b` with W in PyTorch's [out, in] orientation.
pub fn linear(a: &Array2<f32>, w: &Weights) -> Array2<f32> {
    let (shape, data) = &w["fc.weight"];
    let weight = Array2::from_shape_vec((shape[0], shape[1]), data.clone()).expect("2-d");
    let bias = get1(w, "fc.bias");
    a.dot(&weight.t()) + &bias
}

/// Outputs of a forward pass: logits, last-stage GAP, all stages' GAPs, last feature map.
pub struct Forward {
    pub logits: Array2<f32>,
    pub activations: Array2<f32>,
    pub stages: Vec<Array2<f32>>,
    /// Every stage's post-ReLU feature map.
    pub maps: Vec<Array4<f32>>,
    pub feature_map: Array4<f32>,
}

fn finish(
    w: &Weights,
    stages: Vec<Array2<f32>>,
    maps: Vec<Array4<f32>>,
    feature_map: Array4<f32>,
) -> Forward {
    let activations = gap(&feature_map);
    Forward {
        logits: linear(&activations, w),
        activations,
        stages,
        maps,
        feature_map,
    }
}

/// CNN: per stage conv3×3/1 pad 1 → BN → ReLU (stage output) → optional 2×2 max-pool.
pub fn cnn(w: &Weights, pools: &[bool], x: Array4<f32>, eps: f64) -> Forward {
    let mut x = x;
    let mut stages = Vec::new();
    let mut maps = Vec::new();
    let mut last = x.clone();
    for (i, &pool) in pools.iter().enumerate() {
        let mut y = conv2d(&x, &get4(w, &format!("features.{i}.conv.weight")), 1, 1);
        batch_norm(&mut y, w, &format!("features.{i}.bn"), eps);
        relu(&mut y);
        stages.push(gap(&y));
        maps.push(y.clone());
        x = if pool {
            max_pool(&y, 2, 2, 0)
        } else {
            y.clone()
        };
        last = y;
    }
    finish(w, stages, maps, last)
}

/// torchvision ResNet with the small stem (conv3×3/1 → BN → ReLU, no max-pool) or the
/// ImageNet stem (conv7×7/2 → BN → ReLU → max-pool 3×3/2 pad 1).
pub fn resnet(
    w: &Weights,
    depths: &[usize],
    bottleneck: bool,
    x: Array4<f32>,
    eps: f64,
) -> Forward {
    let stem = get4(w, "conv1.weight");
    let imagenet = stem.dim().2 == 7;
    let mut x = conv2d(&x, &stem, if imagenet { 2 } else { 1 }, stem.dim().2 / 2);
    batch_norm(&mut x, w, "bn1", eps);
    relu(&mut x);
    if imagenet {
        x = max_pool(&x, 3, 2, 1);
    }
    let mut stages = Vec::new();
    let mut maps = Vec::new();
    for (l, &depth) in depths.iter().enumerate() {
        for b in 0..depth {
            let p = format!("layer{}.{b}", l + 1);
            let stride = if l > 0 && b == 0 { 2 } else { 1 };
            let convs: Vec<(usize, usize)> = if bottleneck {
                vec![(1, 1), (stride, 3), (1, 1)]
            } else {
                vec![(stride, 3), (1, 3)]
            };
            let mut y = x.clone();
            for (i, &(s, k)) in convs.iter().enumerate() {
                y = conv2d(&y, &get4(w, &format!("{p}.conv{}.weight", i + 1)), s, k / 2);
                batch_norm(&mut y, w, &format!("{p}.bn{}", i + 1), eps);
                if i + 1 < convs.len() {
                    relu(&mut y);
                }
            }
            let shortcut = if w.contains_key(&format!("{p}.downsample.0.weight")) {
                let mut s = conv2d(&x, &get4(w, &format!("{p}.downsample.0.weight")), stride, 0);
                batch_norm(&mut s, w, &format!("{p}.downsample.1"), eps);
                s
            } else {
                x.clone()
            };
            y += &shortcut;
            relu(&mut y);
            x = y;
        }
        stages.push(gap(&x));
        maps.push(x.clone());
    }
    finish(w, stages, maps, x)
}
