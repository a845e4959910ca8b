//! Adversarial attacks on a trained network, in [0, 1] pixel space (issue 5, "Attacks").
//!
//! Every attack takes a batch of images as `[N·C·H·W]` floats in [0, 1] and returns the
//! adversarial batch in the same layout, inside the [0, 1] box. The network sees them through
//! [`Victim`], which wraps it with the input normalisation and keeps it in inference mode
//! (batch norm on running statistics) while gradients flow to the *input*:
//!
//! - [`fgsm`]: one signed-gradient step of size ε (Goodfellow et al.).
//! - [`pgd`]: projected gradient descent in the L∞ ball, random start (Madry et al.).
//! - [`cw`]: Carlini–Wagner L2, tanh space, binary search over the constant c, confidence κ.
//! - [`deepfool`]: minimal L2 steps to the linearised boundary, projected into the box.
//! - [`adaptive`]: PGD against the classifier *and* the calibrated detector of a bundle
//!   ([`detector`]: that detector, exact and as a differentiable surrogate).
//!
//! [`run`] drives an attack over dataset images and writes 8-bit PNG files plus a manifest.

pub mod adaptive;
pub mod cw;
pub mod deepfool;
pub mod detector;
pub mod fgsm;
pub mod pgd;
pub mod run;
pub mod victim;

use burn::prelude::*;
use burn::tensor::{Int, TensorData};
use serde::{Deserialize, Serialize};

use crate::checkpoint::CheckpointError;

pub use adaptive::AdaptiveParams;
pub use cw::CwParams;
pub use deepfool::DeepFoolParams;
pub use detector::DetectorSurrogate;
pub use fgsm::FgsmParams;
pub use pgd::PgdParams;
pub use victim::Victim;

#[derive(Debug, thiserror::Error)]
pub enum AttackError {
    #[error("invalid attack parameter: {0}")]
    Parameter(String),
    #[error("class {class} is out of range for a model with {classes} classes")]
    Class { class: usize, classes: usize },
    #[error("the images do not fit the model's input: {0}")]
    Shape(String),
    #[error("the adaptive attack cannot use this calibration: {0}")]
    Calibration(String),
    #[error("the attack needs an autodiff device (csg_train::device())")]
    NotAutodiff,
    #[error("no gradient reached the input (the model is detached from it)")]
    NoGradient,
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Data(#[from] csg_bundle::dataset::DataError),
    #[error(transparent)]
    Bundle(#[from] csg_bundle::BundleError),
    #[error("{path}: {message}")]
    Io { path: String, message: String },
}

/// What an attack is after, per image of the batch.
#[derive(Debug, Clone, Copy)]
pub enum Goal<'a> {
    /// Leave each image's true class.
    Untargeted(&'a [usize]),
    /// Reach each image's target class.
    Targeted(&'a [usize]),
}

impl Goal<'_> {
    /// The class each image must leave (untargeted) or reach (targeted).
    pub fn classes(&self) -> &[usize] {
        match self {
            Goal::Untargeted(c) | Goal::Targeted(c) => c,
        }
    }

    pub fn is_targeted(&self) -> bool {
        matches!(self, Goal::Targeted(_))
    }

    /// Whether a prediction for image `i` meets the goal.
    pub fn reached(&self, i: usize, prediction: usize) -> bool {
        match self {
            Goal::Untargeted(c) => c.get(i).is_some_and(|&y| y != prediction),
            Goal::Targeted(c) => c.get(i).is_some_and(|&t| t == prediction),
        }
    }
}

/// Which attack, with its parameters (recorded verbatim in the manifest).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "attack", rename_all = "snake_case")]
pub enum AttackConfig {
    Fgsm(FgsmParams),
    Pgd(PgdParams),
    Cw(CwParams),
    Deepfool(DeepFoolParams),
    Adaptive(AdaptiveParams),
}

impl AttackConfig {
    pub fn name(&self) -> &'static str {
        match self {
            AttackConfig::Fgsm(_) => "fgsm",
            AttackConfig::Pgd(_) => "pgd",
            AttackConfig::Cw(_) => "cw",
            AttackConfig::Deepfool(_) => "deepfool",
            AttackConfig::Adaptive(_) => "adaptive",
        }
    }

    /// The L∞ budget of the attack, if it has one; quantisation keeps images inside it.
    pub fn linf_budget(&self) -> Option<f32> {
        match self {
            AttackConfig::Fgsm(p) => Some(p.epsilon),
            AttackConfig::Pgd(p) => Some(p.epsilon),
            AttackConfig::Adaptive(p) => Some(p.pgd.epsilon),
            AttackConfig::Cw(_) | AttackConfig::Deepfool(_) => None,
        }
    }

    pub fn validate(&self) -> Result<(), AttackError> {
        match self {
            AttackConfig::Fgsm(p) => p.validate(),
            AttackConfig::Pgd(p) => p.validate(),
            AttackConfig::Cw(p) => p.validate(),
            AttackConfig::Deepfool(p) => p.validate(),
            AttackConfig::Adaptive(p) => p.validate(),
        }
    }

    /// Runs the attack on one batch. `seeds` holds one seed per image (random starts), so
    /// results do not depend on how images are batched. `detector` is required by `adaptive`.
    pub fn attack(
        &self,
        victim: &Victim,
        pixels: &[f32],
        goal: Goal<'_>,
        seeds: &[u64],
        detector: Option<&DetectorSurrogate>,
    ) -> Result<Vec<f32>, AttackError> {
        victim.check_batch(pixels, goal)?;
        match self {
            AttackConfig::Fgsm(p) => fgsm::attack(victim, pixels, goal, p),
            AttackConfig::Pgd(p) => pgd::attack(victim, pixels, goal, seeds, p),
            AttackConfig::Cw(p) => cw::attack(victim, pixels, goal, p),
            AttackConfig::Deepfool(p) => deepfool::attack(victim, pixels, goal, p),
            AttackConfig::Adaptive(p) => {
                let detector = detector.ok_or_else(|| {
                    AttackError::Calibration("the adaptive attack needs a calibrated bundle".into())
                })?;
                adaptive::attack(victim, pixels, goal, seeds, detector, p)
            }
        }
    }
}

pub(crate) fn check(ok: bool, what: &str) -> Result<(), AttackError> {
    if ok {
        Ok(())
    } else {
        Err(AttackError::Parameter(what.to_string()))
    }
}

/// Host rows of a `[N, C]` tensor.
pub fn rows(t: Tensor<2>) -> Vec<Vec<f32>> {
    let [_, c] = t.dims();
    let v: Vec<f32> = t.into_data().iter::<f32>().collect();
    v.chunks(c.max(1)).map(<[f32]>::to_vec).collect()
}

/// Host values of any tensor.
pub fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

/// Index of the largest value (first on ties).
pub fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |b, (i, &v)| if v > b.1 { (i, v) } else { b },
        )
        .0
}

/// Labels as an Int tensor (for `select`).
pub(crate) fn index_tensor(indices: &[usize], device: &Device) -> Tensor<1, Int> {
    let v: Vec<i64> = indices.iter().map(|&i| i as i64).collect();
    Tensor::from_data(TensorData::new(v, [indices.len()]), device)
}

/// What an 8-bit client would send: each value rounded to a multiple of 1/255. With an L∞
/// budget ε, values are also kept within ⌊255·ε⌋/255 of the original bytes, so rounding never
/// takes an image out of its ball (25.5/255 would otherwise round to 26/255 > 0.1).
pub fn quantise(adversarial: &[f32], original: &[u8], budget: Option<f32>) -> Vec<u8> {
    let steps = budget.map(|e| (255.0 * e + 1e-3).floor() as i32);
    adversarial
        .iter()
        .zip(original)
        .map(|(&x, &o)| {
            let mut q = (x.clamp(0.0, 1.0) * 255.0).round() as i32;
            if let Some(s) = steps {
                q = q.clamp(i32::from(o) - s, i32::from(o) + s);
            }
            q.clamp(0, 255) as u8
        })
        .collect()
}

/// Bytes → [0, 1] floats.
pub fn to_unit(bytes: &[u8]) -> Vec<f32> {
    bytes.iter().map(|&b| f32::from(b) / 255.0).collect()
}

/// Rounds [0, 1] floats to the nearest 1/255 (what an attack must survive).
pub fn round_to_bytes(x: &[f32]) -> Vec<f32> {
    x.iter()
        .map(|&v| (v.clamp(0.0, 1.0) * 255.0).round() / 255.0)
        .collect()
}

/// L2 and L∞ norms of `a − b`, per image of `per` values.
pub fn perturbation(a: &[f32], b: &[f32], per: usize) -> Vec<(f32, f32)> {
    a.chunks(per.max(1))
        .zip(b.chunks(per.max(1)))
        .map(|(x, y)| {
            let (mut l2, mut linf) = (0.0f32, 0.0f32);
            for (p, q) in x.iter().zip(y) {
                let d = (p - q).abs();
                l2 += d * d;
                linf = linf.max(d);
            }
            (l2.sqrt(), linf)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantisation_rounds_and_respects_the_budget() {
        // 0.1 above 100/255 is 125.5/255: plain rounding gives 126, the budget keeps 125.
        let original = [100u8, 0, 255];
        let adv = [100.0 / 255.0 + 0.1, 0.3, 1.2];
        assert_eq!(quantise(&adv, &original, Some(0.1)), vec![125, 25, 255]);
        assert_eq!(quantise(&adv, &original, None), vec![126, 77, 255]);
        assert_eq!(to_unit(&[0, 255]), vec![0.0, 1.0]);
    }

    #[test]
    fn perturbation_norms() {
        let n = perturbation(&[0.0, 0.3, 0.4, 1.0], &[0.0, 0.0, 0.0, 1.0], 2);
        assert!((n[0].0 - 0.3).abs() < 1e-6 && (n[0].1 - 0.3).abs() < 1e-6);
        assert!((n[1].0 - 0.4).abs() < 1e-6 && (n[1].1 - 0.4).abs() < 1e-6);
    }

    #[test]
    fn goals() {
        let labels = [1, 2];
        let g = Goal::Untargeted(&labels);
        assert!(g.reached(0, 3) && !g.reached(1, 2));
        let t = Goal::Targeted(&labels);
        assert!(t.reached(0, 1) && !t.reached(1, 0) && t.is_targeted());
        assert_eq!(argmax(&[0.0, 3.0, 3.0]), 1);
    }
}
