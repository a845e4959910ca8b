//! DeepFool (Moosavi-Dezfooli et al., 2016): the smallest L2 step to the linearised decision
//! boundary, repeated until the prediction changes.
//!
//! At the current x, for each candidate class k with f_k = Z_k − Z_r (r the class to leave, or
//! for a targeted attack the strongest rival of the target) and w_k = ∇f_k, the boundary of k
//! is |f_k| / ‖w_k‖ away; the closest k gives the step r = (|f_k| + 10⁻⁴) / ‖w_k‖² · w_k,
//! scaled by (1 + overshoot).
//!
//! Box handling. Every step is projected into [0, 1], and before a step the coordinates that
//! cannot move in the direction w_k asks (a pixel at 0 asked to fall, at 1 asked to rise) are
//! dropped from w_k. Without both the classic algorithm stalls on Fashion-MNIST's many
//! saturated pixels: the step keeps pushing them outside the box, clipping undoes it, and the
//! prediction never changes.
//!
//! Gradients of all candidate classes come from one backward pass over the batch replicated
//! once per class. With `quantise_aware` (default) an image counts as done only when its 8-bit
//! rounding meets the goal, since a boundary point can round back.

use serde::{Deserialize, Serialize};

use super::{AttackError, Goal, Victim, argmax, check, round_to_bytes, values};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeepFoolParams {
    pub max_iterations: usize,
    /// Relative overshoot of each step past the linearised boundary.
    pub overshoot: f32,
    /// Untargeted: classes considered per step, the class to leave included (top logits).
    pub candidates: usize,
    /// Judge success on the 8-bit rounded image.
    pub quantise_aware: bool,
}

impl Default for DeepFoolParams {
    fn default() -> Self {
        Self {
            max_iterations: 50,
            overshoot: 0.02,
            candidates: 10,
            quantise_aware: true,
        }
    }
}

impl DeepFoolParams {
    pub fn validate(&self) -> Result<(), AttackError> {
        check(
            self.max_iterations > 0,
            "DeepFool needs at least one iteration",
        )?;
        check(
            self.overshoot.is_finite() && self.overshoot >= 0.0,
            "DeepFool overshoot must be non-negative",
        )?;
        check(
            self.candidates >= 2,
            "DeepFool needs at least two candidate classes",
        )
    }
}

/// One step for one image: `grads[j]` is ∇Z of `classes[j]` (`classes[0]` the reference r),
/// `logits` the row at `x`. Returns `None` when no candidate can move.
fn step(
    x: &[f32],
    logits: &[f32],
    classes: &[usize],
    grads: &[&[f32]],
    overshoot: f32,
) -> Option<Vec<f32>> {
    let reference = classes[0];
    let mut best: Option<(f32, f32, Vec<f32>)> = None; // (distance, |f|, w)
    for (j, &k) in classes.iter().enumerate().skip(1) {
        let f = logits[k] - logits[reference];
        let mut w: Vec<f32> = grads[j].iter().zip(grads[0]).map(|(a, b)| a - b).collect();
        // Coordinates pinned by the box in the direction the step would take them.
        for (wi, &xi) in w.iter_mut().zip(x) {
            if (xi <= 0.0 && *wi < 0.0) || (xi >= 1.0 && *wi > 0.0) {
                *wi = 0.0;
            }
        }
        let norm = w.iter().map(|v| v * v).sum::<f32>().sqrt();
        if norm.is_nan() || norm <= 1e-12 {
            continue;
        }
        let distance = f.abs() / norm;
        if best.as_ref().is_none_or(|b| distance < b.0) {
            best = Some((distance, f.abs(), w));
        }
    }
    let (_, f, w) = best?;
    let norm2: f32 = w.iter().map(|v| v * v).sum();
    let scale = (f + 1e-4) / norm2 * (1.0 + overshoot);
    Some(
        x.iter()
            .zip(&w)
            .map(|(&xi, &wi)| (xi + scale * wi).clamp(0.0, 1.0))
            .collect(),
    )
}

pub fn attack(
    victim: &Victim,
    pixels: &[f32],
    goal: Goal<'_>,
    params: &DeepFoolParams,
) -> Result<Vec<f32>, AttackError> {
    params.validate()?;
    let per = victim.pixels_per_image();
    let classes_n = victim.classes();
    let goals = goal.classes();
    let mut x = pixels.to_vec();
    let mut active: Vec<usize> = (0..goals.len()).collect();
    for _ in 0..params.max_iterations {
        let current: Vec<f32> = active
            .iter()
            .flat_map(|&i| x[i * per..(i + 1) * per].iter().copied())
            .collect();
        if current.is_empty() {
            break;
        }
        let judged = if params.quantise_aware {
            victim.predict(&round_to_bytes(&current))
        } else {
            victim.predict(&current)
        };
        let logits = victim.logits(&current);
        // Keep the images still short of their goal, with their class lists.
        let mut still = Vec::new();
        let mut lists: Vec<Vec<usize>> = Vec::new();
        for (slot, &i) in active.iter().enumerate() {
            if goal.reached(i, judged[slot]) {
                continue;
            }
            let row = &logits[slot];
            let list = if goal.is_targeted() {
                let target = goals[i];
                let rival = argmax(
                    &row.iter()
                        .enumerate()
                        .map(|(j, &v)| if j == target { f32::NEG_INFINITY } else { v })
                        .collect::<Vec<_>>(),
                );
                vec![rival, target]
            } else {
                let own = goals[i];
                let mut others: Vec<usize> = (0..classes_n).filter(|&j| j != own).collect();
                others.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
                others.truncate(params.candidates.min(classes_n) - 1);
                std::iter::once(own).chain(others).collect()
            };
            still.push((slot, i));
            lists.push(list);
        }
        if still.is_empty() {
            break;
        }
        // One backward pass: copy j of the batch carries class lists[·][j].
        let copies = lists.iter().map(Vec::len).max().unwrap_or(0);
        let a = still.len();
        let mut batch = Vec::with_capacity(copies * a * per);
        let mut picks = Vec::with_capacity(copies * a);
        for j in 0..copies {
            for (&(_, i), list) in still.iter().zip(&lists) {
                batch.extend_from_slice(&x[i * per..(i + 1) * per]);
                picks.push(list.get(j).copied().unwrap_or(list[0]));
            }
        }
        let leaf = victim.tensor(&batch);
        let (grad, ()) = victim.gradient(leaf, |tracked| {
            let logits = victim.forward(tracked).logits;
            let device = logits.device();
            let mask = victim.one_hot(&picks, &device);
            ((logits * mask).sum(), ())
        })?;
        let grad = values(grad);
        let mut next_active = Vec::with_capacity(a);
        for (s, ((slot, i), list)) in still.iter().zip(&lists).enumerate() {
            let grads: Vec<&[f32]> = (0..list.len())
                .map(|j| {
                    let start = (j * a + s) * per;
                    &grad[start..start + per]
                })
                .collect();
            let xi = &x[i * per..(i + 1) * per];
            if let Some(moved) = step(xi, &logits[*slot], list, &grads, params.overshoot) {
                x[i * per..(i + 1) * per].copy_from_slice(&moved);
                next_active.push(*i);
            }
        }
        active = next_active;
    }
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::step;

    #[test]
    fn steps_onto_the_linear_boundary_and_respects_the_box() {
        // Linear model Z_0 = 0, Z_1 = x0 + x1 − 1 at x = (0.2, 0.2): f = −0.6, w = (1, 1).
        let x = [0.2, 0.2];
        let logits = [0.0, -0.6];
        let g0 = [0.0, 0.0];
        let g1 = [1.0, 1.0];
        let moved = step(&x, &logits, &[0, 1], &[&g0, &g1], 0.0).unwrap();
        let f = moved[0] + moved[1] - 1.0;
        assert!(
            f > 0.0 && f < 1e-3,
            "lands just past the boundary: {moved:?}"
        );
        // A pixel pinned at 1 cannot rise: the whole step goes to the free one.
        let x = [1.0, 0.2];
        let logits = [0.0, -0.2];
        let moved = step(&x, &logits, &[0, 1], &[&g0, &g1], 0.0).unwrap();
        assert_eq!(moved[0], 1.0);
        assert!((moved[1] - 0.4).abs() < 1e-3, "{moved:?}");
        // Nothing can move: no step.
        assert!(step(&[1.0, 1.0], &logits, &[0, 1], &[&g0, &g1], 0.0).is_none());
    }
}
