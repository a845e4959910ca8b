//! FGSM (Goodfellow et al., 2015): one step of size ε along the sign of the loss gradient.
//!
//! Untargeted it ascends the cross entropy of the true class; targeted it descends that of the
//! target. The result is clipped to the [0, 1] box, so ‖δ‖∞ ≤ ε.

use serde::{Deserialize, Serialize};

use super::{AttackError, Goal, Victim, check, values};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FgsmParams {
    /// L∞ budget in [0, 1] pixel scale.
    pub epsilon: f32,
}

impl Default for FgsmParams {
    fn default() -> Self {
        Self { epsilon: 0.1 }
    }
}

impl FgsmParams {
    pub fn validate(&self) -> Result<(), AttackError> {
        check(
            self.epsilon.is_finite() && self.epsilon > 0.0 && self.epsilon <= 1.0,
            "FGSM epsilon must be in (0, 1]",
        )
    }
}

pub fn attack(
    victim: &Victim,
    pixels: &[f32],
    goal: Goal<'_>,
    params: &FgsmParams,
) -> Result<Vec<f32>, AttackError> {
    params.validate()?;
    let x = victim.tensor(pixels);
    let (grad, ()) = victim.gradient(x.clone(), |leaf| {
        (victim.ascent_loss(victim.forward(leaf).logits, goal), ())
    })?;
    let adv = (x + grad.sign() * params.epsilon).clamp(0.0, 1.0);
    Ok(values(adv))
}
