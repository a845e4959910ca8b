//! Analysis probe, not part of csgd: would spatial statistics of a stage's feature map, beyond
//! its global average, make a better detector component? For each stage and each choice of
//! per-channel statistics (mean = GAP, std = spatial standard deviation, occ = share of
//! positions the ReLU lets through), it fits a class-conditional Gaussian with a tied, shrunk
//! covariance on half of the clean validation split (the half `csgd calibrate` fits on), takes
//! p-values against the other half, and puts the candidate in place of that stage's component
//! of csgd's combined score (smallest p-value), read per image from `csgd eval
//! --dump-components`. It prints AUROC and TPR at 5 % FPR per attack (the threshold is the clean
//! test images' 95th percentile, so TPRs are slightly optimistic and only for comparison).
//! It reads the Fashion-MNIST test set, so it fits 28×28 grayscale 10-class checkpoints only.
//!
//! ```sh
//! csgd eval --run csg=models/fashion-csg.onnx:eval/attacks/csg/fgsm,... --out /tmp/e --dump-components
//! cargo run --release -p csg-train --example probe_stats -- \
//!     models/fashion-csg.safetensors /tmp/e/csg-components.json eval/attacks/csg/fgsm ...
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use burn::prelude::*;
use burn::tensor::TensorData;
use csg_train::burn;
use csg_train::checkpoint;
use csg_train::data::{self, Dataset};
use csg_train::model::Network;

/// Covariance shrinkage towards a scaled identity (as `csgd calibrate`'s default).
const SHRINK: f64 = 0.01;
const BATCH: usize = 500;

/// Per-channel statistics of one stage for one image.
#[derive(Clone)]
struct StageStats {
    mean: Vec<f64>,
    std: Vec<f64>,
    occupancy: Vec<f64>,
}

/// Statistics of a set of images: predicted class, then per stage per image.
struct Probed {
    classes: Vec<usize>,
    stages: Vec<Vec<StageStats>>,
}

fn probe(net: &Network, pixels: &[f32], normalise: (f32, f32), device: &Device) -> Probed {
    let per = 28 * 28;
    let n = pixels.len() / per;
    let mut out = Probed {
        classes: Vec::with_capacity(n),
        stages: Vec::new(),
    };
    for start in (0..n).step_by(BATCH) {
        let end = (start + BATCH).min(n);
        let x: Vec<f32> = pixels[start * per..end * per]
            .iter()
            .map(|v| (v - normalise.0) / normalise.1)
            .collect();
        let x = Tensor::<4>::from_data(TensorData::new(x, [end - start, 1, 28, 28]), device);
        let logits: Vec<f32> = net.forward(x.clone()).logits.into_data().iter().collect();
        out.classes.extend(logits.chunks(10).map(argmax));
        let maps = net.stages(x);
        out.stages.resize(maps.len(), Vec::new());
        for (stage, map) in maps.into_iter().enumerate() {
            let [b, c, h, w] = map.dims();
            let values: Vec<f32> = map.into_data().iter().collect();
            for image in values.chunks(c * h * w).take(b) {
                let mut s = StageStats {
                    mean: Vec::with_capacity(c),
                    std: Vec::with_capacity(c),
                    occupancy: Vec::with_capacity(c),
                };
                for channel in image.chunks(h * w) {
                    let n = channel.len() as f64;
                    let m = channel.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
                    let q = channel.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / n;
                    s.mean.push(m);
                    s.std.push((q - m * m).max(0.0).sqrt());
                    s.occupancy
                        .push(channel.iter().filter(|&&v| v > 0.0).count() as f64 / n);
                }
                out.stages[stage].push(s);
            }
        }
    }
    out
}

fn argmax(row: &[f32]) -> usize {
    (0..row.len())
        .max_by(|&a, &b| row[a].total_cmp(&row[b]))
        .unwrap_or(0)
}

/// Gauss-Jordan inverse of a symmetric positive-definite matrix (small, shrunk: stable).
fn invert(mut a: Vec<Vec<f64>>) -> Vec<Vec<f64>> {
    let n = a.len();
    let mut inv: Vec<Vec<f64>> = (0..n)
        .map(|i| (0..n).map(|j| if i == j { 1.0 } else { 0.0 }).collect())
        .collect();
    for col in 0..n {
        let pivot = a[col][col];
        for j in 0..n {
            a[col][j] /= pivot;
            inv[col][j] /= pivot;
        }
        for r in 0..n {
            let f = a[r][col];
            if r != col && f != 0.0 {
                for j in 0..n {
                    a[r][j] -= f * a[col][j];
                    inv[r][j] -= f * inv[col][j];
                }
            }
        }
    }
    inv
}

/// Class-conditional Gaussian with a tied, shrunk covariance.
struct Gaussian {
    means: Vec<Vec<f64>>,
    precision: Vec<Vec<f64>>,
}

impl Gaussian {
    fn fit(rows: &[Vec<f64>], labels: &[usize], classes: usize) -> Self {
        let d = rows[0].len();
        let mut means = vec![vec![0.0; d]; classes];
        let mut counts = vec![0usize; classes];
        for (row, &y) in rows.iter().zip(labels) {
            counts[y] += 1;
            for (m, v) in means[y].iter_mut().zip(row) {
                *m += v;
            }
        }
        for (m, &count) in means.iter_mut().zip(&counts) {
            m.iter_mut().for_each(|v| *v /= count.max(1) as f64);
        }
        let mut cov = vec![vec![0.0; d]; d];
        for (row, &y) in rows.iter().zip(labels) {
            let z: Vec<f64> = row.iter().zip(&means[y]).map(|(a, b)| a - b).collect();
            for (i, zi) in z.iter().enumerate() {
                for (j, zj) in z.iter().enumerate() {
                    cov[i][j] += zi * zj;
                }
            }
        }
        let n = rows.len() as f64;
        let scale = (0..d).map(|i| cov[i][i]).sum::<f64>() / n / d as f64;
        for (i, row) in cov.iter_mut().enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                *v = (1.0 - SHRINK) * *v / n + if i == j { SHRINK * scale } else { 0.0 };
            }
        }
        Self {
            means,
            precision: invert(cov),
        }
    }

    fn distance(&self, x: &[f64], class: usize) -> f64 {
        let z: Vec<f64> = x
            .iter()
            .zip(&self.means[class])
            .map(|(a, b)| a - b)
            .collect();
        self.precision
            .iter()
            .zip(&z)
            .map(|(row, zi)| zi * row.iter().zip(&z).map(|(p, zj)| p * zj).sum::<f64>())
            .sum()
    }
}

type Pick = fn(&StageStats) -> Vec<f64>;

const PICKS: [(&str, Pick); 5] = [
    ("mean", |s| s.mean.clone()),
    ("mean+std", |s| [&s.mean[..], &s.std].concat()),
    ("mean+occ", |s| [&s.mean[..], &s.occupancy].concat()),
    ("std+occ", |s| [&s.std[..], &s.occupancy].concat()),
    ("mean+std+occ", |s| {
        [&s.mean[..], &s.std, &s.occupancy].concat()
    }),
];

/// p-value of `score` against a sorted clean table (as csgd's).
fn p_value(sorted: &[f64], score: f64) -> f64 {
    let at_or_above = sorted.len() - sorted.partition_point(|&c| c < score);
    (1 + at_or_above) as f64 / (sorted.len() + 1) as f64
}

/// AUROC with ties counted half.
fn auroc(clean: &[f64], adversarial: &[f64]) -> f64 {
    let mut sorted = clean.to_vec();
    sorted.sort_by(f64::total_cmp);
    let wins: f64 = adversarial
        .iter()
        .map(|&a| {
            let below = sorted.partition_point(|&c| c < a);
            let ties = sorted.partition_point(|&c| c <= a) - below;
            below as f64 + ties as f64 / 2.0
        })
        .sum();
    wins / (sorted.len() * adversarial.len()) as f64
}

fn tpr_at_5(clean: &[f64], adversarial: &[f64]) -> f64 {
    let mut sorted = clean.to_vec();
    sorted.sort_by(f64::total_cmp);
    let threshold = sorted[(sorted.len() as f64 * 0.95) as usize];
    adversarial.iter().filter(|&&a| a > threshold).count() as f64 / adversarial.len() as f64
}

/// Per image, the p-values of the combined score's components (stage Mahalanobis, margin).
fn combined_components(images: &serde_json::Value) -> Result<Vec<BTreeMap<String, f64>>> {
    let images = images
        .as_array()
        .context("dump: expected an array of images")?;
    Ok(images
        .iter()
        .map(|image| {
            image["components"]
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(name, _)| name.ends_with("_mahalanobis") || *name == "margin")
                .filter_map(|(name, v)| Some((name.clone(), v[1].as_f64()?)))
                .collect()
        })
        .collect())
}

/// −ln of the smallest p-value, the stage's own component replaced by `candidate`.
fn combine(components: &[BTreeMap<String, f64>], drop: &str, candidate: &[f64]) -> Vec<f64> {
    components
        .iter()
        .zip(candidate)
        .map(|(c, &p)| {
            let others = c.iter().filter(|(n, _)| *n != drop).map(|(_, &q)| q);
            -others.chain([p]).fold(1.0, f64::min).ln()
        })
        .collect()
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        bail!("usage: probe_stats CHECKPOINT COMPONENTS_JSON ATTACK_DIR...");
    }
    let device = Device::flex();
    let (net, info) = checkpoint::load(Path::new(&args[1]), &device)?;
    let normalise = (info.input.mean[0], info.input.std[0]);
    let dump: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&args[2])?)?;

    let dir = data::default_data_dir();
    let (_, validation) =
        Dataset::load(&dir, "train")?.split(data::DEFAULT_VALIDATION, data::DEFAULT_SPLIT_SEED);
    let test = Dataset::load(&dir, "t10k")?;
    let floats = |d: &Dataset| data::to_floats(d, &(0..d.len()).collect::<Vec<_>>(), None);
    let val = probe(&net, &floats(&validation), normalise, &device);
    let clean = probe(&net, &floats(&test), normalise, &device);
    let clean_components = combined_components(&dump["clean"])?;
    if clean_components.len() != clean.classes.len() {
        bail!(
            "the dump has {} clean images, the test set {}",
            clean_components.len(),
            clean.classes.len()
        );
    }
    let mut attacks = Vec::new();
    for dir in &args[3..] {
        let dir = Path::new(dir);
        let manifest: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json"))?)?;
        let mut pixels = Vec::new();
        for entry in manifest["images"].as_array().context("manifest images")? {
            if entry["success"].as_bool() == Some(true) {
                let file = dir.join(entry["file"].as_str().context("manifest file")?);
                let image = image::open(&file).with_context(|| file.display().to_string())?;
                pixels.extend(image.to_luma8().iter().map(|&b| f32::from(b) / 255.0));
            }
        }
        let name = dir
            .file_name()
            .context("attack dir")?
            .to_string_lossy()
            .into_owned();
        let components = combined_components(&dump["attacks"][&name])?;
        attacks.push((name, probe(&net, &pixels, normalise, &device), components));
    }

    let fit: Vec<usize> = (0..validation.len()).step_by(2).collect();
    let table: Vec<usize> = (1..validation.len()).step_by(2).collect();
    let header: Vec<String> = attacks.iter().map(|(name, ..)| name.clone()).collect();
    println!(
        "| stage | statistics | alone: worst AUROC | combined: {} | worst |",
        header.join(" | ")
    );
    println!("|---|---|---|{}---|", "---|".repeat(header.len()));
    let base: Vec<f64> = clean_components
        .iter()
        .map(|c| -c.values().fold(1.0, |a: f64, &b| a.min(b)).ln())
        .collect();
    let mut row = vec![
        "—".to_string(),
        "csgd's combined".to_string(),
        "—".to_string(),
    ];
    let mut worst = 1.0f64;
    for (_, _, components) in &attacks {
        let adv: Vec<f64> = components
            .iter()
            .map(|c| -c.values().fold(1.0, |a: f64, &b| a.min(b)).ln())
            .collect();
        let a = auroc(&base, &adv);
        worst = worst.min(a);
        row.push(format!("{a:.3} / {:.2}", tpr_at_5(&base, &adv)));
    }
    println!("| {} | {worst:.3} |", row.join(" | "));
    for stage in 0..val.stages.len() {
        let drop = format!("stage{}_mahalanobis", stage + 1);
        for (name, pick) in PICKS {
            let rows: Vec<Vec<f64>> = fit.iter().map(|&i| pick(&val.stages[stage][i])).collect();
            let labels: Vec<usize> = fit.iter().map(|&i| val.classes[i]).collect();
            let gaussian = Gaussian::fit(&rows, &labels, 10);
            let distances = |p: &Probed| -> Vec<f64> {
                p.stages[stage]
                    .iter()
                    .zip(&p.classes)
                    .map(|(s, &c)| gaussian.distance(&pick(s), c))
                    .collect()
            };
            let val_scores = distances(&val);
            let mut sorted: Vec<f64> = table.iter().map(|&i| val_scores[i]).collect();
            sorted.sort_by(f64::total_cmp);
            let p_values = |scores: &[f64]| -> Vec<f64> {
                scores.iter().map(|&s| p_value(&sorted, s)).collect()
            };
            let clean_alone = distances(&clean);
            let clean_combined = combine(&clean_components, &drop, &p_values(&clean_alone));
            let (mut worst_alone, mut worst_combined) = (1.0f64, 1.0f64);
            let mut cells = Vec::new();
            for (_, probed, components) in &attacks {
                let alone = distances(probed);
                worst_alone = worst_alone.min(auroc(&clean_alone, &alone));
                let combined = combine(components, &drop, &p_values(&alone));
                let a = auroc(&clean_combined, &combined);
                worst_combined = worst_combined.min(a);
                cells.push(format!(
                    "{a:.3} / {:.2}",
                    tpr_at_5(&clean_combined, &combined)
                ));
            }
            println!(
                "| {} | {name} | {worst_alone:.3} | {} | {worst_combined:.3} |",
                stage + 1,
                cells.join(" | ")
            );
        }
    }
    Ok(())
}
