//! The attacks on real Fashion-MNIST test images against a small network trained here (once,
//! shared by the tests): each raises the loss within its budget, targeted attacks reach their
//! target on most images, the 8-bit PNG round trip holds and the manifest is reproducible.

mod common;

use std::collections::BTreeMap;
use std::sync::OnceLock;

use burn::module::Module;
use burn::prelude::*;
use burn::tensor::TensorData;
use common::{MEAN, STD, tiny_config, train_images};
use csg_bundle::calibration::{
    CALIBRATION_VERSION, Calibration, Combiner, GATED, GatedPrecision, INPUT_HISTOGRAM, InputStats,
    StageFeatures, StageMetric, StageStats,
};
use csg_train::attacks::adaptive::AdaptiveParams;
use csg_train::attacks::detector::DetectorSurrogate;
use csg_train::attacks::run::{self, RunSpec, TargetMode};
use csg_train::attacks::{
    self, AttackConfig, CwParams, DeepFoolParams, FgsmParams, Goal, PgdParams, Victim,
};
use csg_train::data::{self, Dataset};
use csg_train::model::Network;
use csg_train::trainer;
use csg_train::{checkpoint, device, fashion_input};

/// Test images attacked (the first of the test split the model gets right).
const IMAGES: usize = 16;

struct Fixture {
    model: Network,
    train: Dataset,
    test: Dataset,
    /// Indices of the first [`IMAGES`] correctly classified test images.
    indices: Vec<usize>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let test = Dataset::load(&data::default_data_dir(), "t10k").expect("test split");
        let train = train_images(4000);
        let config = tiny_config(true, 4, 5);
        let trained = trainer::train(&config, &train, &device(), false).expect("training");
        let model = trained.model;
        let victim = victim_of(&model);
        let candidates: Vec<usize> = (0..64).collect();
        let predictions = victim.predict(&pixels(&test, &candidates));
        let indices: Vec<usize> = candidates
            .into_iter()
            .filter(|&i| predictions[i] == usize::from(test.labels[i]))
            .take(IMAGES)
            .collect();
        assert_eq!(indices.len(), IMAGES, "the test model is too weak");
        Fixture {
            model,
            train,
            test,
            indices,
        }
    })
}

fn victim_of(model: &Network) -> Victim {
    Victim::new(model.clone(), &fashion_input(MEAN, STD), &device()).expect("victim")
}

fn pixels(data: &Dataset, indices: &[usize]) -> Vec<f32> {
    let bytes: Vec<u8> = indices
        .iter()
        .flat_map(|&i| data.image(i).iter().copied())
        .collect();
    attacks::to_unit(&bytes)
}

/// Bins of the test calibration's pixel histogram.
const BINS: usize = 32;

/// The daemon's pixel histogram of each image of unit `pixels`.
fn histograms(pixels: &[f32]) -> Vec<Vec<f32>> {
    let spec = fashion_input(MEAN, STD);
    pixels
        .chunks(784)
        .map(|image| {
            let normalised: Vec<f32> = image.iter().map(|v| (v - MEAN) / STD).collect();
            csg_bundle::score::pixel_histogram(&normalised, &spec, BINS).expect("28×28")
        })
        .collect()
}

fn surrogate(cal: &Calibration) -> DetectorSurrogate {
    DetectorSurrogate::new(cal, 10, &[8, 16, 32], &fashion_input(MEAN, STD)).expect("surrogate")
}

fn labels(data: &Dataset, indices: &[usize]) -> Vec<usize> {
    indices
        .iter()
        .map(|&i| usize::from(data.labels[i]))
        .collect()
}

/// Per-image cross entropy of `classes`.
fn losses(victim: &Victim, x: &[f32], classes: &[usize]) -> Vec<f32> {
    victim
        .logits(x)
        .iter()
        .zip(classes)
        .map(|(row, &c)| {
            let max = row.iter().copied().fold(f32::MIN, f32::max);
            let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f32>().ln();
            lse - row[c]
        })
        .collect()
}

fn mean(v: &[f32]) -> f32 {
    v.iter().sum::<f32>() / v.len().max(1) as f32
}

struct Checked {
    /// Images meeting the goal after 8-bit rounding.
    reached: usize,
    loss_before: f32,
    loss_after: f32,
    l2: Vec<f32>,
    /// The 8-bit adversarial images, as [0, 1] floats.
    quantised: Vec<f32>,
}

/// Runs `config`, checks the box (and the L∞ budget where it has one) before and after
/// quantisation, and measures the goal's loss.
fn check_attack(config: &AttackConfig, goal_targets: Option<&[usize]>) -> Checked {
    let f = fixture();
    let victim = victim_of(&f.model);
    let x = pixels(&f.test, &f.indices);
    let y = labels(&f.test, &f.indices);
    let goal = match goal_targets {
        Some(t) => Goal::Targeted(t),
        None => Goal::Untargeted(&y),
    };
    let seeds: Vec<u64> = (0..IMAGES as u64).collect();
    let adv = config
        .attack(&victim, &x, goal, &seeds, None)
        .expect("attack");
    assert_eq!(adv.len(), x.len());
    assert!(
        adv.iter().all(|v| (0.0..=1.0).contains(v)),
        "outside the box"
    );
    let bytes: Vec<u8> = x.iter().map(|v| (v * 255.0).round() as u8).collect();
    let q = attacks::to_unit(&attacks::quantise(&adv, &bytes, config.linf_budget()));
    if let Some(eps) = config.linf_budget() {
        for (name, img) in [("float", &adv), ("8-bit", &q)] {
            let worst = attacks::perturbation(img, &x, 784)
                .iter()
                .fold(0.0f32, |m, n| m.max(n.1));
            assert!(worst <= eps + 1e-6, "{name} L∞ {worst} > ε {eps}");
        }
    }
    let predictions = victim.predict(&q);
    let reached = (0..IMAGES)
        .filter(|&i| goal.reached(i, predictions[i]))
        .count();
    let classes = goal.classes();
    Checked {
        reached,
        loss_before: mean(&losses(&victim, &x, classes)),
        loss_after: mean(&losses(&victim, &q, classes)),
        l2: attacks::perturbation(&q, &x, 784)
            .iter()
            .map(|n| n.0)
            .collect(),
        quantised: q,
    }
}

fn random_targets() -> Vec<usize> {
    let f = fixture();
    f.indices
        .iter()
        .map(|&i| run::random_target(3, i, usize::from(f.test.labels[i]), 10))
        .collect()
}

#[test]
fn attacked_model_matches_eval_mode() {
    let f = fixture();
    let victim = victim_of(&f.model);
    let x = pixels(&f.test, &f.indices);
    let eval = attacks::values(victim.forward(victim.tensor(&x)).logits);
    // Logits on the gradient path: tracked input through the frozen model.
    let (grad, tracked) = victim
        .gradient(victim.tensor(&x), |leaf| {
            let logits = victim.forward(leaf).logits;
            (logits.clone().sum(), attacks::values(logits.inner()))
        })
        .expect("gradient");
    let worst = eval
        .iter()
        .zip(&tracked)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        worst < 1e-5,
        "frozen-path logits differ from eval mode by {worst}"
    );
    assert!(
        attacks::values(grad).iter().any(|g| g.abs() > 0.0),
        "no input gradient"
    );
    // The trainer's own eval path agrees too.
    let inner = device().inner();
    let sub = f.test.select(&f.indices);
    let reference = trainer::evaluate(&f.model.valid(), &sub, MEAN, STD, 64, &inner);
    let worst = reference
        .logits
        .iter()
        .zip(&eval)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        worst < 1e-5,
        "victim and trainer::evaluate differ by {worst}"
    );
    // And the check means something: the unfrozen model on the autodiff device normalises
    // with batch statistics and gives other logits.
    let normalised = x.iter().map(|v| (v - MEAN) / STD).collect::<Vec<_>>();
    let batch = Tensor::<4>::from_data(TensorData::new(normalised, [IMAGES, 1, 28, 28]), &device());
    // (A private copy through a checkpoint: a training-mode forward updates running
    // statistics, which clones share.)
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let classes: Vec<String> = (0..10).map(|c| c.to_string()).collect();
    checkpoint::save(&f.model, &classes, &fashion_input(MEAN, STD), &path).unwrap();
    let (copy, _) = checkpoint::load(&path, &device()).unwrap();
    let training_mode = attacks::values(copy.forward(batch).logits.inner());
    let gap = training_mode
        .iter()
        .zip(&eval)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        gap > 1e-3,
        "training-mode logits equal eval-mode ones ({gap})"
    );
    // Attacking leaves the running statistics alone.
    let cfg = AttackConfig::Pgd(PgdParams {
        steps: 3,
        ..PgdParams::default()
    });
    let y = labels(&f.test, &f.indices);
    let seeds = vec![0; IMAGES];
    cfg.attack(&victim, &x, Goal::Untargeted(&y), &seeds, None)
        .expect("attack");
    assert_eq!(
        attacks::values(victim.forward(victim.tensor(&x)).logits),
        eval
    );
}

#[test]
fn fgsm_raises_the_loss_within_epsilon() {
    let c = check_attack(&AttackConfig::Fgsm(FgsmParams::default()), None);
    assert!(
        c.loss_after > c.loss_before + 0.5,
        "{} -> {}",
        c.loss_before,
        c.loss_after
    );
    assert!(
        c.reached >= IMAGES / 2,
        "FGSM fooled {}/{IMAGES}",
        c.reached
    );
    let t = random_targets();
    let c = check_attack(&AttackConfig::Fgsm(FgsmParams::default()), Some(&t));
    assert!(
        c.loss_after < c.loss_before,
        "target loss {} -> {}",
        c.loss_before,
        c.loss_after
    );
}

#[test]
fn pgd_fools_most_images_and_reaches_targets() {
    let pgd = AttackConfig::Pgd(PgdParams::default());
    let c = check_attack(&pgd, None);
    assert!(
        c.loss_after > c.loss_before + 1.0,
        "{} -> {}",
        c.loss_before,
        c.loss_after
    );
    assert!(
        c.reached >= IMAGES * 7 / 8,
        "PGD fooled {}/{IMAGES}",
        c.reached
    );
    let t = random_targets();
    let c = check_attack(&pgd, Some(&t));
    assert!(
        c.loss_after < c.loss_before,
        "target loss {} -> {}",
        c.loss_before,
        c.loss_after
    );
    assert!(
        c.reached >= IMAGES * 3 / 4,
        "PGD reached {}/{IMAGES} targets",
        c.reached
    );
}

/// The test model's logits span only a few units, so a margin of κ = 20 takes larger steps
/// than the defaults (tuned on the shipped models) allow in few iterations.
fn small_cw(confidence: f32) -> CwParams {
    CwParams {
        search_steps: 5,
        max_iterations: 150,
        learning_rate: 0.1,
        confidence,
        ..CwParams::default()
    }
}

#[test]
fn carlini_wagner_finds_small_perturbations_at_both_confidences() {
    let f = fixture();
    let victim = victim_of(&f.model);
    let c0 = check_attack(&AttackConfig::Cw(small_cw(0.0)), None);
    assert!(
        c0.loss_after > c0.loss_before,
        "{} -> {}",
        c0.loss_before,
        c0.loss_after
    );
    assert!(
        c0.reached >= IMAGES * 3 / 4,
        "CW fooled {}/{IMAGES}",
        c0.reached
    );
    let c20 = check_attack(&AttackConfig::Cw(small_cw(20.0)), None);
    assert!(
        c20.reached >= IMAGES / 2,
        "CW κ=20 fooled {}/{IMAGES}",
        c20.reached
    );
    // High confidence costs a larger perturbation.
    assert!(mean(&c20.l2) > mean(&c0.l2), "{:?} vs {:?}", c20.l2, c0.l2);

    // κ = 20 examples clear the boundary by 20 logits after rounding.
    let y = labels(&f.test, &f.indices);
    let q = &c20.quantised;
    for (row, &label) in victim.logits(q).iter().zip(&y) {
        if attacks::argmax(row) != label {
            let other = row.iter().enumerate().filter(|&(j, _)| j != label);
            let best = other.fold(f32::MIN, |m, (_, &v)| m.max(v));
            assert!(
                best - row[label] >= 20.0 - 1e-3,
                "margin {}",
                best - row[label]
            );
        }
    }

    let t = random_targets();
    let ct = check_attack(&AttackConfig::Cw(small_cw(0.0)), Some(&t));
    assert!(
        ct.reached >= IMAGES * 3 / 4,
        "CW reached {}/{IMAGES} targets",
        ct.reached
    );
}

#[test]
fn deepfool_crosses_the_boundary_with_small_steps() {
    let cfg = AttackConfig::Deepfool(DeepFoolParams::default());
    let c = check_attack(&cfg, None);
    assert!(
        c.loss_after > c.loss_before,
        "{} -> {}",
        c.loss_before,
        c.loss_after
    );
    assert!(
        c.reached >= IMAGES * 7 / 8,
        "DeepFool fooled {}/{IMAGES}",
        c.reached
    );
    let pgd = check_attack(&AttackConfig::Pgd(PgdParams::default()), None);
    assert!(
        mean(&c.l2) < mean(&pgd.l2),
        "DeepFool L2 {} vs PGD {}",
        mean(&c.l2),
        mean(&pgd.l2)
    );
    let t = random_targets();
    let ct = check_attack(&cfg, Some(&t));
    assert!(ct.loss_after < ct.loss_before);
    assert!(
        ct.reached >= IMAGES * 3 / 4,
        "DeepFool reached {}/{IMAGES} targets",
        ct.reached
    );
}

/// A small calibration in the daemon's format (REFERENCE §3): stage 1 and the gated last stage
/// (restricted to each class's gated filters), diagonal shrunk precision, plus the margin;
/// fitted on 1,000 training images, tables and the 5 % threshold on 1,000 others.
fn calibration(model: &Network, train: &Dataset) -> Calibration {
    let victim = victim_of(model);
    let gate = trainer::gate_of(model).expect("CSG model");
    let forward = |range: std::ops::Range<usize>| {
        let idx: Vec<usize> = range.collect();
        let out = victim.forward(victim.tensor(&pixels(train, &idx)));
        let stages: Vec<Vec<Vec<f32>>> = out
            .stage_activations
            .into_iter()
            .map(attacks::rows)
            .collect();
        let x = pixels(train, &idx);
        (attacks::rows(out.logits), stages, labels(train, &idx), x)
    };
    let (_, mut fit_stages, fit_labels, fit_pixels) = forward(0..1000);
    // The input's pixel histogram is fitted as a full-metric pseudo-stage (index 3).
    fit_stages.push(histograms(&fit_pixels));
    let mut stages = Vec::new();
    let mut input = None;
    for (stage, acts) in [
        (0usize, &fit_stages[0]),
        (2, &fit_stages[2]),
        (3, &fit_stages[3]),
    ] {
        let d = acts[0].len();
        let mut means = vec![vec![0.0f32; d]; 10];
        let mut counts = [0usize; 10];
        for (a, &y) in acts.iter().zip(&fit_labels) {
            counts[y] += 1;
            for (m, v) in means[y].iter_mut().zip(a) {
                *m += v;
            }
        }
        for (m, &n) in means.iter_mut().zip(&counts) {
            m.iter_mut().for_each(|v| *v /= n.max(1) as f32);
        }
        let mut var = vec![0.0f32; d];
        for (a, &y) in acts.iter().zip(&fit_labels) {
            for k in 0..d {
                var[k] += (a[k] - means[y][k]).powi(2) / acts.len() as f32;
            }
        }
        let avg = var.iter().sum::<f32>() / d as f32;
        let var: Vec<f32> = var.iter().map(|v| 0.99 * v + 0.01 * avg + 1e-6).collect();
        let diag = |filters: &[usize]| {
            let m = filters.len();
            let mut p = vec![0.0f32; m * m];
            for (i, &k) in filters.iter().enumerate() {
                p[i * m + i] = 1.0 / var[k];
            }
            p
        };
        let metric = if stage == 2 {
            StageMetric::Gated {
                classes: (0..10)
                    .map(|c| {
                        let filters: Vec<usize> =
                            (0..d).filter(|&k| gate.get(k, c) >= GATED).collect();
                        GatedPrecision {
                            precision: diag(&filters),
                            filters,
                        }
                    })
                    .collect(),
            }
        } else {
            StageMetric::Full {
                precision: diag(&(0..d).collect::<Vec<_>>()),
            }
        };
        if stage == 3 {
            let StageMetric::Full { precision } = metric else {
                unreachable!("the histogram has a full metric")
            };
            input = Some(InputStats {
                bins: d,
                means,
                std: var.iter().map(|v| v.sqrt()).collect(),
                precision,
            });
            continue;
        }
        stages.push(StageStats {
            output: format!("stage{}", stage + 1),
            map_output: None,
            stage,
            channels: d,
            features: StageFeatures::Mean,
            means,
            std: var.iter().map(|v| v.sqrt()).collect(),
            metric,
        });
    }
    let mut cal = Calibration {
        version: CALIBRATION_VERSION,
        fpr: 0.05,
        data: "test fixture".into(),
        fit_images: 1000,
        table_images: 1000,
        empirical_gate: None,
        combined_components: stages
            .iter()
            .map(StageStats::component_name)
            .chain(["margin".to_string(), INPUT_HISTOGRAM.to_string()])
            .collect(),
        combiner: Combiner::HarmonicMean,
        stages,
        input,
        tables: BTreeMap::new(),
        combined_table: Vec::new(),
        thresholds: BTreeMap::from([("combined".to_string(), f64::INFINITY)]),
        class_thresholds: BTreeMap::new(),
    };
    // Clean tables, via the surrogate's exact scorer with one table entry per component: fill
    // each table from the raw component scores of the table images.
    let (logits, table_stages, _, table_pixels) = forward(1000..2000);
    let table_histograms = histograms(&table_pixels);
    let mut tables: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for i in 0..logits.len() {
        let class = attacks::argmax(&logits[i]);
        if let Some(stats) = &cal.input {
            let all: Vec<usize> = (0..BINS).collect();
            let score = quad(
                &table_histograms[i],
                &stats.means[class],
                &stats.precision,
                &all,
            );
            tables
                .entry(INPUT_HISTOGRAM.into())
                .or_default()
                .push(score);
        }
        for s in &cal.stages {
            let a = &table_stages[s.stage][i];
            let score = match &s.metric {
                StageMetric::Full { precision } => quad(
                    a,
                    &s.means[class],
                    precision,
                    &(0..s.channels).collect::<Vec<_>>(),
                ),
                StageMetric::Gated { classes } => {
                    let g = &classes[class];
                    quad(a, &s.means[class], &g.precision, &g.filters)
                }
            };
            tables.entry(s.component_name()).or_default().push(score);
        }
        let mut sorted = logits[i].clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let gap = f64::from(sorted[0] - sorted[1]);
        tables
            .entry("margin".into())
            .or_default()
            .push(-(gap.max(0.0) + 1e-12).ln());
    }
    tables.values_mut().for_each(|t| t.sort_by(f64::total_cmp));
    cal.tables = tables;
    // Combined scores of the table images, then the 95 % quantile as the threshold.
    let provisional = surrogate(&cal);
    let mut combined: Vec<f64> = (0..logits.len())
        .map(|i| {
            let acts: Vec<&[f32]> = table_stages.iter().map(|s| s[i].as_slice()).collect();
            let image = &table_pixels[i * 784..(i + 1) * 784];
            provisional.judge(&logits[i], &acts, image).score
        })
        .collect();
    combined.sort_by(f64::total_cmp);
    let threshold = combined[(0.95 * combined.len() as f64) as usize];
    cal.thresholds.insert("combined".into(), threshold);
    cal.combined_table = combined;
    cal
}

fn quad(a: &[f32], mean: &[f32], p: &[f32], filters: &[usize]) -> f64 {
    let m = filters.len();
    let diff: Vec<f64> = filters.iter().map(|&k| f64::from(a[k] - mean[k])).collect();
    let mut q = 0.0;
    for i in 0..m {
        for j in 0..m {
            q += diff[i] * f64::from(p[i * m + j]) * diff[j];
        }
    }
    0.5 * (q.max(0.0) + 1e-12).ln()
}

#[test]
fn adaptive_attack_evades_the_detector_more_than_pgd() {
    let f = fixture();
    let cal = calibration(&f.model, &f.train);
    let detector = surrogate(&cal);
    let victim = victim_of(&f.model);
    let x = pixels(&f.test, &f.indices);
    let y = labels(&f.test, &f.indices);
    let bytes: Vec<u8> = x.iter().map(|v| (v * 255.0).round() as u8).collect();
    let seeds: Vec<u64> = (0..IMAGES as u64).collect();
    let evading = |config: &AttackConfig| {
        let adv = config
            .attack(&victim, &x, Goal::Untargeted(&y), &seeds, Some(&detector))
            .expect("attack");
        let q = attacks::to_unit(&attacks::quantise(&adv, &bytes, config.linf_budget()));
        let worst = attacks::perturbation(&q, &x, 784)
            .iter()
            .fold(0.0f32, |m, n| m.max(n.1));
        assert!(worst <= 0.1 + 1e-6, "L∞ {worst}");
        let judged = detector.judge_forward(victim.forward(victim.tensor(&q)), &q);
        let fooled = judged
            .iter()
            .zip(&y)
            .filter(|(j, l)| j.class != **l)
            .count();
        let evaded = judged
            .iter()
            .zip(&y)
            .filter(|(j, l)| j.class != **l && !j.flagged)
            .count();
        (fooled, evaded)
    };
    let (pgd_fooled, pgd_evaded) = evading(&AttackConfig::Pgd(PgdParams::default()));
    let (fooled, evaded) = evading(&AttackConfig::Adaptive(AdaptiveParams::default()));
    eprintln!(
        "PGD fooled {pgd_fooled} evaded {pgd_evaded}; adaptive fooled {fooled} evaded {evaded}"
    );
    assert!(
        fooled >= IMAGES * 3 / 4,
        "adaptive fooled {fooled}/{IMAGES}"
    );
    assert!(
        evaded > pgd_evaded,
        "adaptive evaded {evaded}, PGD {pgd_evaded}"
    );
    assert!(evaded >= IMAGES / 2, "adaptive evaded {evaded}/{IMAGES}");
}

fn spec(attack: AttackConfig, target: TargetMode, seed: u64) -> RunSpec {
    RunSpec {
        attack,
        target,
        seed,
        batch_size: 5,
        checkpoint: "test-model".into(),
        bundle: None,
        dataset: "fashion-mnist t10k".into(),
    }
}

#[test]
fn pngs_round_trip_and_the_manifest_is_reproducible() {
    let f = fixture();
    let victim = victim_of(&f.model);
    let pgd = AttackConfig::Pgd(PgdParams {
        steps: 10,
        step_size: 0.03,
        ..PgdParams::default()
    });
    let indices = &f.indices[..8];
    let a = run::run(
        &victim,
        &f.test,
        indices,
        &spec(pgd.clone(), TargetMode::Random, 11),
        None,
        false,
    )
    .expect("run");
    let dir = tempfile::tempdir().unwrap();
    a.write(dir.path(), [1, 28, 28]).expect("write");
    let text = std::fs::read_to_string(dir.path().join("manifest.json")).unwrap();
    let manifest: run::Manifest = serde_json::from_str(&text).expect("manifest parses");
    // (serde_json's default float parsing may move an f64 by one ulp: compare the entries,
    // which are f32, and the summary's text.)
    assert_eq!(manifest.images, a.manifest.images);
    assert_eq!(manifest.parameters, a.manifest.parameters);
    assert_eq!(
        text.trim_end(),
        serde_json::to_string_pretty(&a.manifest).unwrap()
    );
    assert_eq!(manifest.images.len(), 8);
    assert!(manifest.targeted);
    for (entry, pixels) in manifest.images.iter().zip(&a.pixels) {
        let png = run::read_gray_png(&dir.path().join(&entry.file)).expect("png");
        assert_eq!(&png, pixels, "{}", entry.file);
        assert_eq!(entry.label, usize::from(f.test.labels[entry.index]));
        let target = entry.target.expect("targeted");
        assert_ne!(target, entry.label);
        // What a client sends is what the manifest judged.
        let prediction = victim.predict(&attacks::to_unit(&png))[0];
        assert_eq!(prediction, entry.prediction);
        assert_eq!(entry.success, prediction == target);
        assert!(entry.linf <= 0.1 + 1e-6);
    }
    // Same seed, same manifest (and images) byte for byte; the batch size does not matter.
    let mut other_batching = spec(pgd.clone(), TargetMode::Random, 11);
    other_batching.batch_size = 3;
    let b = run::run(&victim, &f.test, indices, &other_batching, None, false).expect("run");
    assert_eq!(
        serde_json::to_string(&b.manifest).unwrap(),
        serde_json::to_string(&a.manifest).unwrap()
    );
    assert_eq!(b.pixels, a.pixels);
    // Another seed, other random starts and targets.
    let c = run::run(
        &victim,
        &f.test,
        indices,
        &spec(pgd, TargetMode::Random, 12),
        None,
        false,
    )
    .expect("run");
    assert_ne!(c.pixels, a.pixels);

    // A fixed target skips the images already of that class.
    let fixed = run::run(
        &victim,
        &f.test,
        indices,
        &spec(
            AttackConfig::Fgsm(FgsmParams::default()),
            TargetMode::Class(9),
            0,
        ),
        None,
        false,
    )
    .expect("run");
    let nines = indices.iter().filter(|&&i| f.test.labels[i] == 9).count();
    assert_eq!(fixed.manifest.skipped.len(), nines);
    assert_eq!(fixed.manifest.images.len(), 8 - nines);
}
