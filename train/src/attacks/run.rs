//! Runs an attack over dataset images and records what a client would send: 8-bit PNG files
//! and a manifest (`manifest.json`) with, per image, the source index, true label, target,
//! predictions before and after 8-bit quantisation, success re-checked after quantisation and
//! the perturbation's L2 and L∞ size in [0, 1] scale (of the quantised image).
//!
//! Everything random (PGD starts, random targets) is drawn per image from (seed, index), and
//! nothing time-dependent is recorded, so a manifest is reproducible from its seed.

use std::path::Path;

use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::detector::Judgement;
use super::{
    AttackConfig, AttackError, DetectorSurrogate, Goal, Victim, perturbation, quantise, to_unit,
};
use crate::data::Dataset;

/// Which class each image is pushed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetMode {
    Untargeted,
    /// One fixed class; images of that class are skipped.
    Class(usize),
    /// A class other than the true one, uniformly, from (seed, index).
    Random,
}

/// Everything that defines an attack run (recorded in the manifest).
#[derive(Debug, Clone)]
pub struct RunSpec {
    pub attack: AttackConfig,
    pub target: TargetMode,
    pub seed: u64,
    pub batch_size: usize,
    /// Recorded only.
    pub checkpoint: String,
    pub bundle: Option<String>,
    pub dataset: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub file: String,
    /// Index in the source dataset (Fashion-MNIST test split).
    pub index: usize,
    pub label: usize,
    pub target: Option<usize>,
    pub original_prediction: usize,
    pub prediction_before_quantisation: usize,
    /// Prediction of the 8-bit image (the PNG).
    pub prediction: usize,
    pub success_before_quantisation: bool,
    /// Goal met by the 8-bit image: prediction ≠ label, or = target.
    pub success: bool,
    /// ‖PNG/255 − original/255‖₂ and ‖·‖∞.
    pub l2: f32,
    pub linf: f32,
    /// Adaptive attack: the exact detector's verdict on the 8-bit image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detector: Option<Judgement>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub images: usize,
    pub clean_correct: usize,
    pub successes: usize,
    pub success_rate: f64,
    pub success_rate_before_quantisation: f64,
    /// Over the images the model classified correctly before the attack.
    pub success_rate_on_correct: f64,
    /// Over successful images the model classified correctly before the attack (an image
    /// misclassified to begin with "succeeds" without any perturbation).
    pub mean_l2: f64,
    pub mean_linf: f64,
    /// Adaptive attack: successful and not flagged by the detector, over all images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evasion_rate: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub attack: String,
    pub parameters: AttackConfig,
    pub targeted: bool,
    pub target_mode: TargetMode,
    pub seed: u64,
    pub checkpoint: String,
    pub bundle: Option<String>,
    pub dataset: String,
    /// Indices left out because their label is the fixed target.
    pub skipped: Vec<usize>,
    pub summary: Summary,
    pub images: Vec<Entry>,
}

/// A finished run: the manifest and each entry's 8-bit pixels (C·H·W, manifest order).
pub struct Outcome {
    pub manifest: Manifest,
    pub pixels: Vec<Vec<u8>>,
}

/// The per-image seed.
pub fn image_seed(seed: u64, index: usize) -> u64 {
    let mut rng =
        ChaCha8Rng::seed_from_u64(seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    rng.random()
}

/// A class other than `label`, uniformly, from (seed, index).
pub fn random_target(seed: u64, index: usize, label: usize, classes: usize) -> usize {
    let mut rng = ChaCha8Rng::seed_from_u64(image_seed(seed, index) ^ 0x7a46_e7c1);
    let t = rng.random_range(0..classes.saturating_sub(1).max(1));
    if t >= label { t + 1 } else { t }
}

/// Attacks `data`'s images at `indices` in batches.
pub fn run(
    victim: &Victim,
    data: &Dataset,
    indices: &[usize],
    spec: &RunSpec,
    detector: Option<&DetectorSurrogate>,
    progress: bool,
) -> Result<Outcome, AttackError> {
    spec.attack.validate()?;
    let classes = victim.classes();
    if spec.batch_size == 0 {
        return Err(AttackError::Parameter("batch size must be positive".into()));
    }
    if data.pixels() != victim.pixels_per_image() {
        return Err(AttackError::Shape(format!(
            "dataset images have {} values, the model takes {}",
            data.pixels(),
            victim.pixels_per_image()
        )));
    }
    if let TargetMode::Class(t) = spec.target
        && t >= classes
    {
        return Err(AttackError::Class { class: t, classes });
    }
    let mut jobs = Vec::new();
    let mut skipped = Vec::new();
    for &index in indices {
        if index >= data.len() {
            return Err(AttackError::Parameter(format!(
                "image index {index} is out of range ({} images)",
                data.len()
            )));
        }
        let label = usize::from(data.labels[index]);
        if label >= classes {
            return Err(AttackError::Class {
                class: label,
                classes,
            });
        }
        let target = match spec.target {
            TargetMode::Untargeted => None,
            TargetMode::Class(t) if t == label => {
                skipped.push(index);
                continue;
            }
            TargetMode::Class(t) => Some(t),
            TargetMode::Random => Some(random_target(spec.seed, index, label, classes)),
        };
        jobs.push((index, label, target));
    }

    let bar = if progress {
        ProgressBar::new(jobs.len() as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} images, {per_sec}, eta {eta} {msg}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    bar.set_message(spec.attack.name());
    let per = victim.pixels_per_image();
    let budget = spec.attack.linf_budget();
    let mut entries = Vec::with_capacity(jobs.len());
    let mut all_pixels = Vec::with_capacity(jobs.len());
    for chunk in jobs.chunks(spec.batch_size) {
        let bytes: Vec<u8> = chunk
            .iter()
            .flat_map(|&(i, _, _)| data.image(i).iter().copied())
            .collect();
        let clean = to_unit(&bytes);
        let labels: Vec<usize> = chunk.iter().map(|j| j.1).collect();
        let targets: Vec<usize> = chunk.iter().map(|j| j.2.unwrap_or(j.1)).collect();
        let goal = match spec.target {
            TargetMode::Untargeted => Goal::Untargeted(&labels),
            _ => Goal::Targeted(&targets),
        };
        let seeds: Vec<u64> = chunk.iter().map(|j| image_seed(spec.seed, j.0)).collect();
        let adversarial = spec.attack.attack(victim, &clean, goal, &seeds, detector)?;
        let quantised = quantise(&adversarial, &bytes, budget);
        let quantised_unit = to_unit(&quantised);
        let original = victim.predict(&clean);
        let before = victim.predict(&adversarial);
        let after_out = victim.forward(victim.tensor(&quantised_unit));
        let verdicts = match (&spec.attack, detector) {
            (AttackConfig::Adaptive(_), Some(d)) => {
                Some(d.judge_forward(after_out, &quantised_unit))
            }
            _ => {
                drop(after_out);
                None
            }
        };
        let after = victim.predict(&quantised_unit);
        let norms = perturbation(&quantised_unit, &clean, per);
        for (slot, &(index, label, target)) in chunk.iter().enumerate() {
            entries.push(Entry {
                file: format!("{index:05}.png"),
                index,
                label,
                target,
                original_prediction: original[slot],
                prediction_before_quantisation: before[slot],
                prediction: after[slot],
                success_before_quantisation: goal.reached(slot, before[slot]),
                success: goal.reached(slot, after[slot]),
                l2: norms[slot].0,
                linf: norms[slot].1,
                detector: verdicts.as_ref().map(|v| v[slot]),
            });
            all_pixels.push(quantised[slot * per..(slot + 1) * per].to_vec());
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();

    let summary = summarise(&entries);
    Ok(Outcome {
        manifest: Manifest {
            attack: spec.attack.name().into(),
            parameters: spec.attack.clone(),
            targeted: spec.target != TargetMode::Untargeted,
            target_mode: spec.target,
            seed: spec.seed,
            checkpoint: spec.checkpoint.clone(),
            bundle: spec.bundle.clone(),
            dataset: spec.dataset.clone(),
            skipped,
            summary,
            images: entries,
        },
        pixels: all_pixels,
    })
}

/// Rates and mean perturbation sizes of a run.
pub fn summarise(entries: &[Entry]) -> Summary {
    let n = entries.len();
    let rate = |k: usize, of: usize| if of == 0 { 0.0 } else { k as f64 / of as f64 };
    let correct: Vec<&Entry> = entries
        .iter()
        .filter(|e| e.original_prediction == e.label)
        .collect();
    let successful: Vec<&Entry> = entries.iter().filter(|e| e.success).collect();
    let measured: Vec<&&Entry> = successful
        .iter()
        .filter(|e| e.original_prediction == e.label)
        .collect();
    let mean = |f: fn(&Entry) -> f32| {
        if measured.is_empty() {
            0.0
        } else {
            measured.iter().map(|e| f64::from(f(e))).sum::<f64>() / measured.len() as f64
        }
    };
    let judged = entries.iter().any(|e| e.detector.is_some());
    Summary {
        images: n,
        clean_correct: correct.len(),
        successes: successful.len(),
        success_rate: rate(successful.len(), n),
        success_rate_before_quantisation: rate(
            entries
                .iter()
                .filter(|e| e.success_before_quantisation)
                .count(),
            n,
        ),
        success_rate_on_correct: rate(correct.iter().filter(|e| e.success).count(), correct.len()),
        mean_l2: mean(|e| e.l2),
        mean_linf: mean(|e| e.linf),
        evasion_rate: judged.then(|| {
            rate(
                entries
                    .iter()
                    .filter(|e| e.success && e.detector.is_some_and(|d| !d.flagged))
                    .count(),
                n,
            )
        }),
    }
}

impl Outcome {
    /// Writes every image as an 8-bit PNG and `manifest.json` into `dir`.
    pub fn write(&self, dir: &Path, shape: [usize; 3]) -> Result<(), AttackError> {
        let io = |path: &Path, e: &dyn std::fmt::Display| AttackError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(|e| io(dir, &e))?;
        for (entry, pixels) in self.manifest.images.iter().zip(&self.pixels) {
            let path = dir.join(&entry.file);
            write_png(&path, pixels, shape)?;
        }
        let path = dir.join("manifest.json");
        let text = serde_json::to_string_pretty(&self.manifest).map_err(|e| io(&path, &e))?;
        std::fs::write(&path, text + "\n").map_err(|e| io(&path, &e))
    }
}

/// Writes C·H·W bytes (C = 1 grayscale, C = 3 RGB) as an 8-bit PNG.
pub fn write_png(path: &Path, pixels: &[u8], shape: [usize; 3]) -> Result<(), AttackError> {
    let [c, h, w] = shape;
    let err = |message: String| AttackError::Io {
        path: path.display().to_string(),
        message,
    };
    if pixels.len() != c * h * w {
        return Err(err(format!(
            "{} bytes for a {c}×{h}×{w} image",
            pixels.len()
        )));
    }
    let (wu, hu) = (
        u32::try_from(w).map_err(|e| err(e.to_string()))?,
        u32::try_from(h).map_err(|e| err(e.to_string()))?,
    );
    let result = match c {
        1 => image::GrayImage::from_raw(wu, hu, pixels.to_vec())
            .ok_or_else(|| err("buffer size".into()))?
            .save_with_format(path, image::ImageFormat::Png),
        3 => {
            let plane = h * w;
            let hwc: Vec<u8> = (0..plane)
                .flat_map(|p| (0..3).map(move |ch| ch * plane + p))
                .map(|i| pixels[i])
                .collect();
            image::RgbImage::from_raw(wu, hu, hwc)
                .ok_or_else(|| err("buffer size".into()))?
                .save_with_format(path, image::ImageFormat::Png)
        }
        _ => return Err(err(format!("cannot write {c}-channel images"))),
    };
    result.map_err(|e| err(e.to_string()))
}

/// Reads a grayscale PNG back as bytes (row-major), as the daemon would decode it.
pub fn read_gray_png(path: &Path) -> Result<Vec<u8>, AttackError> {
    let img = image::open(path).map_err(|e| AttackError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    Ok(img.to_luma8().into_raw())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_targets_differ_from_the_label_and_are_reproducible() {
        for index in 0..200 {
            let label = index % 10;
            let t = random_target(7, index, label, 10);
            assert!(t < 10 && t != label);
            assert_eq!(t, random_target(7, index, label, 10));
        }
        let spread: std::collections::BTreeSet<usize> =
            (0..200).map(|i| random_target(1, i, 0, 10)).collect();
        assert_eq!(spread.len(), 9);
    }

    #[test]
    fn png_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.png");
        let pixels: Vec<u8> = (0..12).map(|v| v * 20).collect();
        write_png(&path, &pixels, [1, 3, 4]).unwrap();
        assert_eq!(read_gray_png(&path).unwrap(), pixels);
    }
}
