//! The deletion test of the localisation maps (README "Explanations").

use std::path::Path;

use csgd::detect::scores::top_class;
use csgd::detect::{Detector, ScoreKind};
use csgd::explain::deletion::{self, Fill};
use csgd::explain::{Explainer, MapKind};
use csgd::runtime::Model;
use ndarray::{ArrayD, ArrayView4};
use rand::{Rng, SeedableRng};

use super::common::{self, fashion_test};
use super::{cfg, std_model_path};

/// Softmax probability of `class` in each row of `[N, C]` logits.
fn probabilities(logits: &ArrayD<f32>, classes: &[usize]) -> Vec<f64> {
    classes
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            let row = logits.index_axis(ndarray::Axis(0), i);
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f64 = row.iter().map(|&v| f64::from(v - max).exp()).sum();
            f64::from(row[c] - max).exp() / sum
        })
        .collect()
}

pub fn run(model: &mut Model, inputs: &[Vec<f32>], outputs: &[&str]) -> Vec<ArrayD<f32>> {
    let s = model.meta().input.clone();
    let flat: Vec<f32> = inputs.concat();
    let view =
        ArrayView4::from_shape((inputs.len(), s.channels, s.height, s.width), &flat).unwrap();
    model.run_any(view, outputs).unwrap()
}

struct Row {
    model: &'static str,
    map: &'static str,
    /// Share of the masked pixels that were ink (not black) before masking.
    ink: f64,
    /// Per fill: mean drop of p(ĉ), its standard error, share of predictions changed.
    by_fill: Vec<(f64, f64, f64)>,
}

const FRACTION: f64 = 0.2;
const FILLS: [Fill; 2] = [Fill::Black, Fill::Mean];

/// Masks the top 20 % of pixels of each image by the gated map, the CAM, a random map and the
/// image's own intensity (a map that only says where the ink is, as a yardstick), and measures
/// how much the predicted class's probability drops.
fn deletion(path: &Path, label: &'static str, images: &[Vec<u8>]) -> Vec<Row> {
    let mut model = Model::load(path, &cfg()).unwrap();
    let meta = model.meta().clone();
    let spec = meta.input.clone();
    let detector = Detector::new(&meta, ScoreKind::Combined).unwrap();
    let explainer = Explainer::new(&meta, detector, path).unwrap();
    let fm_name = meta.outputs.feature_map.clone().unwrap();
    let inputs: Vec<Vec<f32>> = images
        .iter()
        .map(|i| csgd::preprocess::normalise_gray_u8(i, &spec))
        .collect();
    let mut classes = Vec::new();
    let mut maps: Vec<[Vec<f32>; 4]> = Vec::new();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    for chunk in inputs.chunks(250) {
        let out = run(&mut model, chunk, &["logits", &fm_name]);
        for i in 0..chunk.len() {
            let logits = out[0].index_axis(ndarray::Axis(0), i);
            let class = top_class(&logits.iter().copied().collect::<Vec<_>>()).0;
            let fm = out[1].index_axis(ndarray::Axis(0), i);
            let &[_, h, w] = fm.shape() else {
                panic!("feature map rank")
            };
            let fm: Vec<f32> = fm.iter().copied().collect();
            let m = explainer.maps(class, &fm, (h, w));
            let random: Vec<f32> = (0..spec.height * spec.width)
                .map(|_| rng.random())
                .collect();
            classes.push(class);
            maps.push([
                m.get(MapKind::Gated).values.clone(),
                m.get(MapKind::Cam).values.clone(),
                random,
                Vec::new(),
            ]);
        }
    }
    for (m, img) in maps.iter_mut().zip(images) {
        m[3] = img.iter().map(|&p| f32::from(p)).collect();
    }
    let before: Vec<f64> = inputs
        .chunks(250)
        .zip(classes.chunks(250))
        .flat_map(|(x, c)| probabilities(&run(&mut model, x, &["logits"])[0], c))
        .collect();
    let n = inputs.len() as f64;
    ["gated", "CAM", "random", "intensity"]
        .into_iter()
        .enumerate()
        .map(|(which, map)| {
            let by_fill = FILLS
                .iter()
                .map(|&fill| {
                    let masked: Vec<Vec<f32>> = inputs
                        .iter()
                        .zip(&maps)
                        .map(|(x, m)| {
                            let mut x = x.clone();
                            deletion::mask(
                                &mut x,
                                &deletion::top_pixels(&m[which], FRACTION),
                                &spec,
                                fill,
                            );
                            x
                        })
                        .collect();
                    let mut drops = Vec::new();
                    let mut flips = 0usize;
                    for (start, chunk) in masked.chunks(250).enumerate() {
                        let logits = &run(&mut model, chunk, &["logits"])[0];
                        let cs = &classes[start * 250..start * 250 + chunk.len()];
                        for (i, p) in probabilities(logits, cs).into_iter().enumerate() {
                            drops.push(before[start * 250 + i] - p);
                            let row = logits.index_axis(ndarray::Axis(0), i);
                            let now = top_class(&row.iter().copied().collect::<Vec<_>>()).0;
                            flips += usize::from(now != cs[i]);
                        }
                    }
                    let mean = drops.iter().sum::<f64>() / n;
                    let var = drops.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (n - 1.0);
                    (mean, (var / n).sqrt(), flips as f64 / n)
                })
                .collect();
            let ink = images
                .iter()
                .zip(&maps)
                .map(|(img, m)| {
                    let top = deletion::top_pixels(&m[which], FRACTION);
                    top.iter().filter(|&&p| img[p] > 0).count() as f64 / top.len() as f64
                })
                .sum::<f64>()
                / n;
            Row {
                model: label,
                map,
                ink,
                by_fill,
            }
        })
        .collect()
}

/// The deletion test (README "Explanations"): over the first 1,000 test images, masking (to
/// black) the 20 % of pixels the gated map ranks highest must lower the predicted class's
/// probability more than masking a random 20 %, for the CSG model. The table is printed for
/// both models and both fills.
#[test]
fn deletion_gated_map_beats_random_pixels() {
    let (images, _) = fashion_test(1000);
    let mut rows = deletion(&common::model_path(), "CSG", &images);
    rows.extend(deletion(&std_model_path(), "STD", &images));
    println!(
        "\ndeletion test: {} Fashion-MNIST test images, top {:.0} % of pixels masked; mean drop of p(predicted class) ± s.e. (share of predictions changed)",
        images.len(),
        FRACTION * 100.0
    );
    println!(
        "| model | map | masked pixels that were ink | masked to black (0) | masked to the mean (0.286) |"
    );
    println!("|---|---|---|---|---|");
    for r in &rows {
        let cell = |(m, se, f): (f64, f64, f64)| format!("{m:.3} ± {se:.3} ({:.1} %)", f * 100.0);
        println!(
            "| {} | {} | {:.0} % | {} | {} |",
            r.model,
            r.map,
            r.ink * 100.0,
            cell(r.by_fill[0]),
            cell(r.by_fill[1])
        );
    }
    let drop = |model: &str, map: &str| {
        rows.iter()
            .find(|r| r.model == model && r.map == map)
            .map(|r| r.by_fill[0].0)
            .unwrap()
    };
    let (gated, random) = (drop("CSG", "gated"), drop("CSG", "random"));
    assert!(
        gated > random,
        "CSG model, masked to black: the gated map's pixels lowered p(ĉ) by {gated:.4}, random pixels by {random:.4}"
    );
}
