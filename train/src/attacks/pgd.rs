//! PGD-L∞ (Madry et al., 2018): repeated signed-gradient steps, each followed by projection
//! onto the ε-ball around the original image and the [0, 1] box, from a random start.
//!
//! The random start is drawn per image from that image's own seed, so an image's result does
//! not depend on the batch it was attacked in. The last iterate is returned (as torchattacks
//! does); the adaptive attack reuses [`projected_ascent`] with its own objective.

use burn::prelude::*;
use burn::tensor::TensorData;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{AttackError, Goal, Victim, check, values};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PgdParams {
    /// L∞ budget in [0, 1] pixel scale.
    pub epsilon: f32,
    /// Step size α per iteration.
    pub step_size: f32,
    pub steps: usize,
    /// Start from a uniform point of the ε-ball instead of the image.
    pub random_start: bool,
}

impl Default for PgdParams {
    /// ε = 0.1 with 40 steps of 0.01 (α·steps = 4ε, enough to cross the ball twice).
    fn default() -> Self {
        Self {
            epsilon: 0.1,
            step_size: 0.01,
            steps: 40,
            random_start: true,
        }
    }
}

impl PgdParams {
    pub fn validate(&self) -> Result<(), AttackError> {
        check(
            self.epsilon.is_finite() && self.epsilon > 0.0 && self.epsilon <= 1.0,
            "PGD epsilon must be in (0, 1]",
        )?;
        check(
            self.step_size.is_finite() && self.step_size > 0.0,
            "PGD step size must be positive",
        )?;
        check(self.steps > 0, "PGD needs at least one step")
    }
}

pub fn attack(
    victim: &Victim,
    pixels: &[f32],
    goal: Goal<'_>,
    seeds: &[u64],
    params: &PgdParams,
) -> Result<Vec<f32>, AttackError> {
    params.validate()?;
    projected_ascent(victim, pixels, seeds, params, |x| {
        let (grad, ()) = victim.gradient(x, |leaf| {
            (victim.ascent_loss(victim.forward(leaf).logits, goal), ())
        })?;
        Ok(grad)
    })
}

/// Uniform noise in [−ε, ε] for each image, from its seed.
pub fn random_start(seeds: &[u64], per_image: usize, epsilon: f32) -> Vec<f32> {
    let mut noise = Vec::with_capacity(seeds.len() * per_image);
    for &seed in seeds {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        noise.extend((0..per_image).map(|_| rng.random_range(-epsilon..=epsilon)));
    }
    noise
}

/// The PGD loop: `gradient(x)` gives the ascent direction's gradient at the current iterate
/// (a plain tensor); each step moves by α·sign(gradient) and projects.
pub(crate) fn projected_ascent(
    victim: &Victim,
    pixels: &[f32],
    seeds: &[u64],
    params: &PgdParams,
    mut gradient: impl FnMut(Tensor<4>) -> Result<Tensor<4>, AttackError>,
) -> Result<Vec<f32>, AttackError> {
    let x0 = victim.tensor(pixels);
    let lower = (x0.clone() - params.epsilon).clamp(0.0, 1.0);
    let upper = (x0.clone() + params.epsilon).clamp(0.0, 1.0);
    let mut x = if params.random_start {
        let per = victim.pixels_per_image();
        if seeds.len() * per != pixels.len() {
            return Err(AttackError::Shape(format!(
                "{} seeds for {} values",
                seeds.len(),
                pixels.len()
            )));
        }
        let noise = random_start(seeds, per, params.epsilon);
        let noise = Tensor::<4>::from_data(TensorData::new(noise, x0.dims()), &x0.device());
        (x0.clone() + noise).clamp(0.0, 1.0)
    } else {
        x0.clone()
    };
    for _ in 0..params.steps {
        let grad = gradient(x.clone())?;
        x = (x + grad.sign() * params.step_size)
            .max_pair(lower.clone())
            .min_pair(upper.clone());
    }
    Ok(values(x))
}
