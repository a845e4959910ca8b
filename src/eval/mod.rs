//! `csgd eval`: clean Fashion-MNIST test images and each attack's successful adversarial
//! images through the daemon's own code path (PNG decoding, preprocessing, ONNX Runtime,
//! [`Detector`]), for every score, with thresholds from the clean validation data only.

pub mod plot;
pub mod report;
pub mod roc;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use csg_bundle::calibration::Calibration;
use csg_bundle::dataset::{self, Dataset};
use ndarray::Array4;
use serde::{Deserialize, Serialize};

use crate::calibrate::{self, CalibrateError};
use crate::detect::fit::quantile_threshold;
use crate::detect::{Detector, ScoreKind, calibration};
use crate::preprocess;
use crate::runtime::{Model, RuntimeError};

/// One model to evaluate and the attack runs made against it.
#[derive(Debug, Clone)]
pub struct EvalModel {
    /// Short name in the tables, e.g. `csg` or `std`.
    pub label: String,
    pub bundle: PathBuf,
    /// Directories written by `csg-train attack`, each with a `manifest.json`.
    pub attacks: Vec<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub models: Vec<EvalModel>,
    /// How many clean test images (from the start of the 10,000).
    pub clean_images: usize,
    pub batch_size: usize,
    /// FPRs at which TPR is reported (thresholds from the clean validation tables).
    pub fprs: Vec<f64>,
    /// Where to write every image's components (`LABEL-components.json`), for analysis.
    pub dump_dir: Option<PathBuf>,
}

/// Every component of one image: predicted class and, by name, (raw score, p-value).
#[derive(Debug, Clone, Serialize)]
pub struct ImageComponents {
    pub class: usize,
    pub components: BTreeMap<String, (f64, Option<f64>)>,
}

/// The per-image dump of one model's evaluation.
#[derive(Debug, Default, Serialize)]
struct ComponentDump {
    clean_labels: Vec<usize>,
    clean: Vec<ImageComponents>,
    attacks: BTreeMap<String, Vec<ImageComponents>>,
}

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Calibrate(#[from] CalibrateError),
    #[error(transparent)]
    Data(#[from] dataset::DataError),
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{0} is not calibrated; run `csgd calibrate` on it first")]
    Uncalibrated(PathBuf),
    #[error(transparent)]
    Detect(#[from] crate::detect::DetectError),
}

/// The part of `csg-train attack`'s manifest the evaluation reads (it ignores the rest).
#[derive(Debug, Clone, Deserialize)]
struct Manifest {
    attack: String,
    #[serde(default)]
    targeted: bool,
    summary: ManifestSummary,
    images: Vec<ManifestEntry>,
}

#[derive(Debug, Clone, Deserialize)]
struct ManifestSummary {
    images: usize,
    success_rate: f64,
    mean_l2: f64,
    mean_linf: f64,
}

#[derive(Debug, Clone, Deserialize)]
struct ManifestEntry {
    file: String,
    success: bool,
}

/// Detection figures of one score against one attack.
#[derive(Debug, Clone, Serialize)]
pub struct ScoreResult {
    pub score: &'static str,
    pub auroc: f64,
    /// TPR at each requested FPR (thresholds from clean validation data).
    pub tpr: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AttackResult {
    pub attack: String,
    pub targeted: bool,
    pub attempted: usize,
    pub success_rate: f64,
    pub mean_l2: f64,
    pub mean_linf: f64,
    /// Successful adversarial images scored.
    pub adversarial: usize,
    pub scores: Vec<ScoreResult>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelResult {
    pub label: String,
    pub bundle: String,
    pub gate: &'static str,
    pub clean_images: usize,
    pub clean_accuracy: f64,
    /// Share of clean test images flagged at each requested FPR's threshold.
    pub realised_fpr: BTreeMap<String, BTreeMap<String, f64>>,
    pub attacks: Vec<AttackResult>,
    /// Worst AUROC per score over the non-adaptive attacks.
    pub worst_auroc: BTreeMap<String, f64>,
}

/// Every verdict score by score name, one value per image.
type ScoreLists = BTreeMap<&'static str, Vec<f64>>;

/// What [`score_images`] returns for a set of images.
struct Scored {
    predicted: Vec<usize>,
    scores: ScoreLists,
    images: Vec<ImageComponents>,
}

/// Predicted classes and every verdict score of every image in `tensor`.
fn score_images(
    model: &mut Model,
    detector: &Detector,
    tensor: &Array4<f32>,
    batch_size: usize,
) -> Result<Scored, EvalError> {
    let Some(cal) = detector.calibration() else {
        return Err(EvalError::Uncalibrated(model.path().to_owned()));
    };
    let names = detector.fetched_outputs(&model.meta().outputs.logits);
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut predicted = Vec::new();
    let mut scores = ScoreLists::new();
    let mut images = Vec::new();
    let n = tensor.shape()[0];
    let indices: Vec<usize> = (0..n).collect();
    for chunk in indices.chunks(batch_size.max(1)) {
        let batch = tensor.select(ndarray::Axis(0), chunk);
        let mut outputs = model.run(batch.view(), &refs)?;
        detector.reduce_maps(&mut outputs[1..])?;
        if let Some(histograms) = detector.input_histograms(batch.view()) {
            outputs.push(histograms?);
        }
        for row in 0..chunk.len() {
            let rows: Vec<Vec<f32>> = outputs.iter().map(|o| o.row(row).to_vec()).collect();
            let verdict = detector.judge(&detector.sample(&rows)?);
            predicted.push(verdict.class_id);
            for kind in ScoreKind::ALL {
                let score = calibration::verdict_score(cal, kind, &verdict.components);
                scores.entry(kind.name()).or_default().push(score);
            }
            images.push(ImageComponents {
                class: verdict.class_id,
                components: verdict
                    .components
                    .into_iter()
                    .map(|c| (c.name.to_string(), (c.score, c.p_value)))
                    .collect(),
            });
        }
    }
    Ok(Scored {
        predicted,
        scores,
        images,
    })
}

/// The clean validation scores behind each verdict score's threshold.
fn validation_table(cal: &Calibration, kind: ScoreKind) -> Option<&[f64]> {
    match kind {
        ScoreKind::Combined => Some(&cal.combined_table),
        ScoreKind::GatedMahalanobis => cal
            .stages
            .last()
            .and_then(|s| cal.tables.get(&s.component_name()))
            .map(Vec::as_slice),
        other => cal.tables.get(other.name()).map(Vec::as_slice),
    }
}

fn load_png_folder(dir: &Path, model: &Model) -> Result<(Manifest, Array4<f32>), EvalError> {
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path).map_err(|e| EvalError::File {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let manifest: Manifest = serde_json::from_str(&text).map_err(|e| EvalError::File {
        path: path.clone(),
        message: format!("not an attack manifest: {e}"),
    })?;
    let spec = &model.meta().input;
    let mut values = Vec::new();
    let mut count = 0;
    for entry in manifest.images.iter().filter(|e| e.success) {
        let file = dir.join(&entry.file);
        let bytes = std::fs::read(&file).map_err(|e| EvalError::File {
            path: file.clone(),
            message: e.to_string(),
        })?;
        let tensor = preprocess::preprocess_image(&bytes, Some("image/png"), spec, u64::MAX)
            .map_err(|e| EvalError::File {
                path: file.clone(),
                message: e.to_string(),
            })?;
        values.extend(tensor);
        count += 1;
    }
    let tensor = Array4::from_shape_vec((count, spec.channels, spec.height, spec.width), values)
        .map_err(|e| EvalError::File {
            path,
            message: e.to_string(),
        })?;
    Ok((manifest, tensor))
}

fn fpr_key(fpr: f64) -> String {
    format!("{}%", fpr * 100.0)
}

/// Evaluates one model; also returns the clean and per-attack score lists for plotting.
pub fn evaluate_model(
    spec: &EvalModel,
    model: &mut Model,
    options: &EvalOptions,
) -> Result<(ModelResult, plot::Curves), EvalError> {
    let meta = model.meta().clone();
    let detector = Detector::new(&meta, ScoreKind::Combined)?;
    let Some(cal) = detector.calibration().cloned() else {
        return Err(EvalError::Uncalibrated(spec.bundle.clone()));
    };
    let test = Dataset::load(&dataset::default_data_dir(), "t10k")?;
    let n = options.clean_images.min(test.len());
    let test = test.select(&(0..n).collect::<Vec<_>>());
    let clean = calibrate::fashion_tensor(&test, &meta.input);
    let Scored {
        predicted,
        scores: clean_scores,
        images: clean_images,
    } = score_images(model, &detector, &clean.tensor, options.batch_size)?;
    let mut dump = ComponentDump {
        clean_labels: clean.labels.clone(),
        clean: clean_images,
        ..ComponentDump::default()
    };
    let correct = predicted
        .iter()
        .zip(&clean.labels)
        .filter(|(p, y)| p == y)
        .count();

    let mut thresholds: BTreeMap<(&'static str, String), f64> = BTreeMap::new();
    for kind in ScoreKind::ALL {
        for &fpr in &options.fprs {
            if let Some(table) = validation_table(&cal, kind) {
                let t = quantile_threshold(table.to_vec(), fpr);
                thresholds.insert((kind.name(), fpr_key(fpr)), t);
            }
        }
    }
    let mut realised_fpr: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
    for ((score, fpr), t) in &thresholds {
        let rate = roc::rate_above(&clean_scores[score], *t);
        realised_fpr
            .entry(score.to_string())
            .or_default()
            .insert(fpr.clone(), rate);
    }

    let mut attacks = Vec::new();
    let mut curves = plot::Curves::default();
    for dir in &spec.attacks {
        let (manifest, tensor) = load_png_folder(dir, model)?;
        // The run's directory name says more than the attack's family (cw-k0 vs cw-k20).
        let name = dir.file_name().map_or(manifest.attack.clone(), |n| {
            n.to_string_lossy().into_owned()
        });
        let Scored {
            scores: adv_scores,
            images,
            ..
        } = score_images(model, &detector, &tensor, options.batch_size)?;
        dump.attacks.insert(name.clone(), images);
        let scores = ScoreKind::ALL
            .iter()
            .map(|&kind| {
                let (neg, pos) = (&clean_scores[kind.name()], &adv_scores[kind.name()]);
                let tpr = options
                    .fprs
                    .iter()
                    .filter_map(|&fpr| {
                        thresholds
                            .get(&(kind.name(), fpr_key(fpr)))
                            .map(|t| (fpr_key(fpr), roc::rate_above(pos, *t)))
                    })
                    .collect();
                ScoreResult {
                    score: kind.name(),
                    auroc: roc::auroc(neg, pos),
                    tpr,
                }
            })
            .collect();
        curves
            .attacks
            .push((name.clone(), adv_scores[ScoreKind::Combined.name()].clone()));
        attacks.push(AttackResult {
            attack: name,
            targeted: manifest.targeted,
            attempted: manifest.summary.images,
            success_rate: manifest.summary.success_rate,
            mean_l2: manifest.summary.mean_l2,
            mean_linf: manifest.summary.mean_linf,
            adversarial: tensor.shape()[0],
            scores,
        });
    }
    curves.clean = clean_scores[ScoreKind::Combined.name()].clone();
    if let Some(dir) = &options.dump_dir {
        let path = dir.join(format!("{}-components.json", spec.label));
        let text = serde_json::to_string(&dump).map_err(|e| EvalError::File {
            path: path.clone(),
            message: e.to_string(),
        })?;
        std::fs::write(&path, text).map_err(|e| EvalError::File {
            path,
            message: e.to_string(),
        })?;
    }

    let mut worst_auroc = BTreeMap::new();
    for kind in ScoreKind::ALL {
        let worst = attacks
            .iter()
            .filter(|a| !a.attack.starts_with("adaptive"))
            .flat_map(|a| a.scores.iter().filter(|s| s.score == kind.name()))
            .map(|s| s.auroc)
            .fold(f64::INFINITY, f64::min);
        if worst.is_finite() {
            worst_auroc.insert(kind.name().to_string(), worst);
        }
    }
    Ok((
        ModelResult {
            label: spec.label.clone(),
            bundle: spec.bundle.display().to_string(),
            gate: if meta.gate.is_some() {
                "learned"
            } else {
                "empirical"
            },
            clean_images: n,
            clean_accuracy: correct as f64 / n.max(1) as f64,
            realised_fpr,
            attacks,
            worst_auroc,
        },
        curves,
    ))
}
