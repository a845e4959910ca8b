//! [`Victim`]: the attacked network in inference mode, with gradients to its input.

use burn::module::Module;
use burn::prelude::*;
use burn::tensor::TensorData;
use burn::tensor::activation::log_softmax;
use csg_bundle::InputSpec;

use super::{AttackError, Goal, argmax, rows};
use crate::model::{Forward, Network};

/// The attacked network: the model plus its input normalisation, in inference mode.
///
/// Two copies of the weights: `frozen` lives on the autodiff device with every parameter
/// frozen (`Module::freeze`: no parameter gradients, batch norm's training flag off, so it
/// normalises with running statistics even though its input is tracked), and `eval` is the
/// plain `valid()` copy for gradient-free predictions. The test
/// `attacked_model_matches_eval_mode` checks that both give the same logits.
pub struct Victim {
    frozen: Network,
    eval: Network,
    mean: Vec<f32>,
    std: Vec<f32>,
    shape: [usize; 3],
    classes: usize,
    device: Device,
}

impl Victim {
    /// Wraps `model`, which must live on the autodiff `device` (e.g. loaded there by
    /// [`crate::checkpoint::load`]).
    pub fn new(model: Network, input: &InputSpec, device: &Device) -> Result<Self, AttackError> {
        if !device.is_autodiff() {
            return Err(AttackError::NotAutodiff);
        }
        let channels = input.channels;
        if input.mean.len() != channels || input.std.len() != channels {
            return Err(AttackError::Shape(format!(
                "{channels} channels but {} means and {} stds",
                input.mean.len(),
                input.std.len()
            )));
        }
        if model.architecture().in_channels != channels {
            return Err(AttackError::Shape(format!(
                "the model takes {} channels, the input spec {channels}",
                model.architecture().in_channels
            )));
        }
        let classes = model.architecture().classes;
        let eval = model.valid();
        Ok(Self {
            frozen: model.freeze(),
            eval,
            mean: input.mean.clone(),
            std: input.std.clone(),
            shape: [channels, input.height, input.width],
            classes,
            device: device.clone(),
        })
    }

    /// Loads a checkpoint on `device` (autodiff) and wraps it.
    pub fn load(path: &std::path::Path, device: &Device) -> Result<Self, AttackError> {
        let (model, info) = crate::checkpoint::load(path, device)?;
        Self::new(model, &info.input, device)
    }

    pub fn classes(&self) -> usize {
        self.classes
    }

    /// Values per image (C·H·W).
    pub fn pixels_per_image(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn network(&self) -> &Network {
        &self.eval
    }

    /// The plain (non-autodiff) device of gradient-free work.
    pub fn plain_device(&self) -> Device {
        self.device.clone().inner()
    }

    pub(crate) fn check_batch(&self, pixels: &[f32], goal: Goal<'_>) -> Result<(), AttackError> {
        let per = self.pixels_per_image();
        let n = goal.classes().len();
        if pixels.len() != n * per {
            return Err(AttackError::Shape(format!(
                "{} values for {n} images of {per}",
                pixels.len()
            )));
        }
        if let Some(&class) = goal.classes().iter().find(|&&c| c >= self.classes) {
            return Err(AttackError::Class {
                class,
                classes: self.classes,
            });
        }
        Ok(())
    }

    /// `[N, C, H, W]` tensor of `pixels` on the plain device.
    pub fn tensor(&self, pixels: &[f32]) -> Tensor<4> {
        let [c, h, w] = self.shape;
        let n = pixels.len() / (c * h * w).max(1);
        Tensor::from_data(
            TensorData::new(pixels.to_vec(), [n, c, h, w]),
            &self.plain_device(),
        )
    }

    /// The network's outputs for [0, 1] images. A tracked input (autodiff device) goes through
    /// the frozen copy, so gradients reach it; a plain one through the eval copy.
    pub fn forward(&self, x: Tensor<4>) -> Forward {
        let device = x.device();
        let c = self.shape[0];
        let mean =
            Tensor::<4>::from_data(TensorData::new(self.mean.clone(), [1, c, 1, 1]), &device);
        let std = Tensor::<4>::from_data(TensorData::new(self.std.clone(), [1, c, 1, 1]), &device);
        let normalised = (x - mean) / std;
        if device.is_autodiff() {
            self.frozen.forward(normalised)
        } else {
            self.eval.forward(normalised)
        }
    }

    /// Logits of [0, 1] images as host rows, without gradients.
    pub fn logits(&self, pixels: &[f32]) -> Vec<Vec<f32>> {
        let logits = self.forward(self.tensor(pixels)).logits;
        rows(logits)
    }

    /// Predicted class of each image.
    pub fn predict(&self, pixels: &[f32]) -> Vec<usize> {
        self.logits(pixels).iter().map(|r| argmax(r)).collect()
    }

    /// The gradient of `objective` with respect to the leaf tensor `leaf` (plain), plus what
    /// the objective chose to return besides its scalar. The closure receives `leaf` tracked on
    /// the autodiff device and builds the scalar from it (usually via [`Victim::forward`]).
    pub fn gradient<R>(
        &self,
        leaf: Tensor<4>,
        objective: impl FnOnce(Tensor<4>) -> (Tensor<1>, R),
    ) -> Result<(Tensor<4>, R), AttackError> {
        let tracked = Tensor::<4>::from_data(leaf.into_data(), &self.device).require_grad();
        let (loss, extra) = objective(tracked.clone());
        let grads = loss.backward();
        let grad = tracked.grad(&grads).ok_or(AttackError::NoGradient)?;
        Ok((grad.inner(), extra))
    }

    /// One-hot `[N, C]` rows of `classes` on `device`.
    pub(crate) fn one_hot(&self, classes: &[usize], device: &Device) -> Tensor<2> {
        let c = self.classes;
        let mut v = vec![0.0f32; classes.len() * c];
        for (i, &k) in classes.iter().enumerate() {
            if k < c {
                v[i * c + k] = 1.0;
            }
        }
        Tensor::from_data(TensorData::new(v, [classes.len(), c]), device)
    }

    /// Per-image cross entropy `[N, 1]` of `logits` against `classes`.
    pub(crate) fn cross_entropy(&self, logits: Tensor<2>, classes: &[usize]) -> Tensor<2> {
        let one_hot = self.one_hot(classes, &logits.device());
        (log_softmax(logits, 1) * one_hot).sum_dim(1).neg()
    }

    /// Per-image `Z_c − max_{j≠c} Z_j` `[N, 1]`: positive while class `c` wins.
    pub(crate) fn margin(&self, logits: Tensor<2>, classes: &[usize]) -> Tensor<2> {
        let one_hot = self.one_hot(classes, &logits.device());
        let own = (logits.clone() * one_hot.clone()).sum_dim(1);
        let others = logits.mask_fill(one_hot.bool(), -1.0e9).max_dim(1);
        own - others
    }

    /// The loss an L∞ attack ascends: cross entropy of the true class (untargeted) or minus
    /// that of the target (targeted), summed over the batch (images do not interact).
    pub(crate) fn ascent_loss(&self, logits: Tensor<2>, goal: Goal<'_>) -> Tensor<1> {
        let ce = self.cross_entropy(logits, goal.classes()).sum();
        if goal.is_targeted() { ce.neg() } else { ce }
    }
}
