//! Analysis probe, not part of csgd: would spatial statistics of a stage's feature map, beyond
//! its global average, make a better detector component? For each stage and each choice of
//! per-channel statistics (mean = GAP, std = spatial standard deviation, occ = share of
//! positions the ReLU lets through, var = mean absolute difference between neighbours, iso =
//! share of positions that fire alone among their 4-neighbours), it fits a class-conditional Gaussian with a tied, shrunk
//! covariance with `csgd calibrate`'s own code and data (the correctly classified images of
//! one half of the clean validation split), takes p-values against the other half, and puts
//! the candidate in place of that stage's component of csgd's combined score (the harmonic
//! mean p-value, as `csgd calibrate` combines by default), read per image from
//! `csgd eval --dump-components`. It prints AUROC and TPR at 5 % FPR per attack (the threshold is the clean
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
use csg_bundle::calibration::Combiner;
use csg_bundle::score::{combine as combine_p, log_mahalanobis, p_value, spatial_features};
use csg_train::burn;
use csg_train::checkpoint;
use csg_train::data::{self, Dataset};
use csg_train::model::Network;
use csgd::detect::fit::{FitOptions, StageData, quantile_threshold, tied_gaussian};
use csgd::eval::roc::{auroc, rate_above};

const BATCH: usize = 500;

/// The stage (0-based) whose map is also probed after a 2×2 max-pool, as a last pseudo-stage
/// that stands in for that stage's component: a quarter of the positions, so a quarter of
/// the map to hand out and reduce.
const POOLED_SOURCE: usize = 1;

/// 2×2 max-pool (stride 2) of every h×w plane in `values`.
fn max_pool_2x2(values: &[f32], h: usize, w: usize) -> Vec<f32> {
    let (ph, pw) = (h / 2, w / 2);
    let mut out = Vec::with_capacity(values.len() / 4);
    for plane in values.chunks_exact(h * w) {
        for y in 0..ph {
            for x in 0..pw {
                let at = |dy: usize, dx: usize| plane[(2 * y + dy) * w + 2 * x + dx];
                out.push(at(0, 0).max(at(0, 1)).max(at(1, 0)).max(at(1, 1)));
            }
        }
    }
    out
}

/// Per-channel statistics of one stage for one image.
#[derive(Clone)]
struct StageStats {
    mean: Vec<f32>,
    std: Vec<f32>,
    occupancy: Vec<f32>,
    /// Mean absolute difference between horizontal and vertical neighbours.
    variation: Vec<f32>,
    /// Share of positions that fire while none of their 4-neighbours does.
    isolated: Vec<f32>,
}

/// Texture statistics of each h×w plane of one image's map: (variation, isolated), per
/// channel. Noise-like perturbations switch on scattered positions; these ask whether that
/// shows more sharply than in the occupancy.
fn texture(image: &[f32], h: usize, w: usize) -> (Vec<f32>, Vec<f32>) {
    let pairs = (h * (w - 1) + (h - 1) * w).max(1) as f32;
    image
        .chunks_exact(h * w)
        .map(|plane| {
            let at = |y: usize, x: usize| plane[y * w + x];
            let mut variation = 0.0f32;
            let mut isolated = 0usize;
            for y in 0..h {
                for x in 0..w {
                    if x + 1 < w {
                        variation += (at(y, x + 1) - at(y, x)).abs();
                    }
                    if y + 1 < h {
                        variation += (at(y + 1, x) - at(y, x)).abs();
                    }
                    let quiet = |dy: isize, dx: isize| {
                        let (ny, nx) = (y as isize + dy, x as isize + dx);
                        ny < 0
                            || nx < 0
                            || ny >= h as isize
                            || nx >= w as isize
                            || at(ny as usize, nx as usize) <= 0.0
                    };
                    if at(y, x) > 0.0 && quiet(-1, 0) && quiet(1, 0) && quiet(0, -1) && quiet(0, 1)
                    {
                        isolated += 1;
                    }
                }
            }
            (variation / pairs, isolated as f32 / (h * w) as f32)
        })
        .unzip()
}

/// Statistics of a set of images: predicted class, then per stage per image.
struct Probed {
    classes: Vec<usize>,
    stages: Vec<Vec<StageStats>>,
}

fn probe(net: &Network, pixels: &[f32], normalise: (f32, f32), device: &Device) -> Result<Probed> {
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
        let forward = net.forward(x);
        let pooled_stage = forward.stage_maps.len();
        out.stages.resize(pooled_stage + 1, Vec::new());
        let logits: Vec<f32> = forward.logits.into_data().iter().collect();
        out.classes.extend(logits.chunks(10).map(argmax));
        let stages = forward
            .stage_activations
            .into_iter()
            .zip(forward.stage_maps);
        for (stage, (gap, map)) in stages.enumerate() {
            let [_, c, h, w] = map.dims();
            let means: Vec<f32> = gap.into_data().iter().collect();
            let values: Vec<f32> = map.into_data().iter().collect();
            if stage == POOLED_SOURCE {
                // The same map after a 2×2 max-pool (what the next stage reads).
                let pooled = max_pool_2x2(&values, h, w);
                let (ph, pw) = (h / 2, w / 2);
                for image in pooled.chunks(c * ph * pw) {
                    let spatial = spatial_features(image, c).context("pooled map shape")?;
                    let (mean, rest) = spatial.split_at(c);
                    let (std, occupancy) = rest.split_at(c);
                    let (variation, isolated) = texture(image, ph, pw);
                    out.stages[pooled_stage].push(StageStats {
                        mean: mean.to_vec(),
                        std: std.to_vec(),
                        occupancy: occupancy.to_vec(),
                        variation,
                        isolated,
                    });
                }
            }
            for (mean, image) in means.chunks(c).zip(values.chunks(c * h * w)) {
                // The daemon's own definition: every channel's mean, std, then share (the
                // probe keeps the model's GAP as the mean, as the stage's other outputs do).
                let spatial = spatial_features(image, c).context("stage map shape")?;
                let (std, occupancy) = spatial[c..].split_at(c);
                let (variation, isolated) = texture(image, h, w);
                out.stages[stage].push(StageStats {
                    mean: mean.to_vec(),
                    std: std.to_vec(),
                    occupancy: occupancy.to_vec(),
                    variation,
                    isolated,
                });
            }
        }
    }
    Ok(out)
}

fn argmax(row: &[f32]) -> usize {
    (0..row.len())
        .max_by(|&a, &b| row[a].total_cmp(&row[b]))
        .unwrap_or(0)
}

type Pick = fn(&StageStats) -> Vec<f32>;

const PICKS: [(&str, Pick); 8] = [
    ("mean", |s| s.mean.clone()),
    ("mean+std", |s| [&s.mean[..], &s.std].concat()),
    ("mean+occ", |s| [&s.mean[..], &s.occupancy].concat()),
    ("std+occ", |s| [&s.std[..], &s.occupancy].concat()),
    ("mean+std+occ", |s| {
        [&s.mean[..], &s.std, &s.occupancy].concat()
    }),
    ("mean+std+occ+var", |s| {
        [&s.mean[..], &s.std, &s.occupancy, &s.variation].concat()
    }),
    ("mean+std+occ+iso", |s| {
        [&s.mean[..], &s.std, &s.occupancy, &s.isolated].concat()
    }),
    ("mean+occ+var+iso", |s| {
        [&s.mean[..], &s.occupancy, &s.variation, &s.isolated].concat()
    }),
];

/// Share of `adversarial` flagged at the clean scores' 5 % threshold.
fn tpr_at_5(clean: &[f64], adversarial: &[f64]) -> f64 {
    rate_above(adversarial, quantile_threshold(clean.to_vec(), 0.05))
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

/// The combined score, the stage's own component replaced by `candidate`.
fn combine(components: &[BTreeMap<String, f64>], drop: &str, candidate: &[f64]) -> Vec<f64> {
    components
        .iter()
        .zip(candidate)
        .map(|(c, &p)| {
            let others = c.iter().filter(|(n, _)| *n != drop).map(|(_, &q)| q);
            let ps: Vec<f64> = others.chain([p]).collect();
            combine_p(Combiner::HarmonicMean, &ps)
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
    let val = probe(&net, &floats(&validation), normalise, &device)?;
    let clean = probe(&net, &floats(&test), normalise, &device)?;
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
        attacks.push((name, probe(&net, &pixels, normalise, &device)?, components));
    }

    // As `csgd calibrate`: fit on the even half of the validation split, with true labels and
    // only the correctly classified images; score tables from the odd half.
    let fit: Vec<usize> = (0..validation.len()).step_by(2).collect();
    let table: Vec<usize> = (1..validation.len()).step_by(2).collect();
    let labels: Vec<usize> = fit
        .iter()
        .map(|&i| usize::from(validation.labels[i]))
        .collect();
    let correct: Vec<usize> = (0..fit.len())
        .filter(|&j| val.classes[fit[j]] == labels[j])
        .collect();
    let shrinkage = FitOptions::default().shrinkage;
    let header: Vec<String> = attacks.iter().map(|(name, ..)| name.clone()).collect();
    println!(
        "| stage | statistics | alone: worst AUROC | combined: {} | worst |",
        header.join(" | ")
    );
    println!("|---|---|---|{}---|", "---|".repeat(header.len()));
    let shipped = |c: &BTreeMap<String, f64>| {
        combine_p(
            Combiner::HarmonicMean,
            &c.values().copied().collect::<Vec<_>>(),
        )
    };
    let base: Vec<f64> = clean_components.iter().map(shipped).collect();
    let mut row = vec![
        "—".to_string(),
        "csgd's combined".to_string(),
        "—".to_string(),
    ];
    let mut worst = 1.0f64;
    for (_, _, components) in &attacks {
        let adv: Vec<f64> = components.iter().map(shipped).collect();
        let a = auroc(&base, &adv);
        worst = worst.min(a);
        row.push(format!("{a:.3} / {:.2}", tpr_at_5(&base, &adv)));
    }
    println!("| {} | {worst:.3} |", row.join(" | "));
    for stage in 0..val.stages.len() {
        let pooled = stage + 1 == val.stages.len();
        let drop = format!(
            "stage{}_mahalanobis",
            if pooled { POOLED_SOURCE } else { stage } + 1
        );
        for (name, pick) in PICKS {
            let values: Vec<f32> = fit
                .iter()
                .flat_map(|&i| pick(&val.stages[stage][i]))
                .collect();
            let data = StageData {
                output: String::new(),
                stage,
                channels: values.len() / fit.len(),
                values,
                map: None,
            };
            let (means, precision) = tied_gaussian(&data, &labels, &correct, 10, shrinkage)?;
            let distances = |p: &Probed| -> Vec<f64> {
                p.stages[stage]
                    .iter()
                    .zip(&p.classes)
                    .map(|(s, &c)| log_mahalanobis(&pick(s), &means[c], &precision, None))
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
                if pooled {
                    format!("{} max-pooled", POOLED_SOURCE + 1)
                } else {
                    (stage + 1).to_string()
                },
                cells.join(" | ")
            );
        }
    }
    Ok(())
}
