//! The Class-Specific Gate: its sparsity hinge, the row projection, and the schedule that
//! alternates standard and gated steps (REFERENCE §1).

use burn::prelude::*;
use serde::Serialize;

/// Gate coefficients; defaults are the official code's values.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct GateConfig {
    /// Target density μ of ‖G‖₁ / (K·C).
    pub mu: f64,
    /// Weight λ2 of the L1 hinge.
    pub lambda: f64,
}

impl Default for GateConfig {
    fn default() -> Self {
        Self {
            mu: 0.2,
            lambda: 1e-3,
        }
    }
}

/// λ2 · max(‖G‖₁ − μ·K·C, 0), differentiable in G.
pub fn hinge(gate: Tensor<2>, config: GateConfig) -> Tensor<1> {
    let [k, c] = gate.dims();
    let budget = config.mu * (k * c) as f64;
    gate.abs()
        .sum()
        .sub_scalar(budget)
        .clamp_min(0.0)
        .mul_scalar(config.lambda)
}

/// Scalar form of [`hinge`], for reports and tests.
pub fn hinge_value(values: &[f32], filters: usize, classes: usize, config: GateConfig) -> f64 {
    let l1: f64 = values.iter().map(|v| f64::from(v.abs())).sum();
    config.lambda * (l1 - config.mu * (filters * classes) as f64).max(0.0)
}

/// Projects each row of a row-major [K, C] gate: `G[k,:] ← clamp(G[k,:] / max_c G[k,c], 0, 1)`,
/// so that every filter belongs fully (weight 1) to at least one class.
///
/// Guard (the official code has none): a row whose maximum is ≤ `1e-12` cannot be scaled up
/// to 1; it becomes one-hot at its largest entry (the first on ties), which keeps the
/// invariant rather than dividing by zero or leaving a filter that belongs to no class.
pub fn project_rows(values: &mut [f32], classes: usize) {
    for row in values.chunks_exact_mut(classes) {
        let (arg, max) =
            row.iter()
                .copied()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |best, (i, v)| {
                    if v > best.1 { (i, v) } else { best }
                });
        if max > 1e-12 {
            for v in row.iter_mut() {
                *v = (*v / max).clamp(0.0, 1.0);
            }
        } else {
            row.fill(0.0);
            row[arg] = 1.0;
        }
    }
}

/// When the gated (CSG) path trains.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Schedule {
    /// The official per-epoch schedule: standard epochs during `warmup`, then whole epochs of
    /// the gated path when `epoch % period == phase` (official: warm-up 10, period 3, phase 2).
    Epoch {
        warmup: usize,
        period: usize,
        phase: usize,
    },
    /// A gated step after every `every`-th standard step, from the first epoch.
    Interleave { every: usize },
    /// The paper's loss in every step: `CE(logits) + λ1·CE(logits_G) + hinge`, both paths
    /// from one forward pass of the backbone (they share it up to the gate), so a gated step
    /// costs almost nothing extra.
    Joint { weight: f64 },
}

/// What one step of training does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    Standard,
    /// A standard step followed by a gated step on the same batch.
    StandardThenGated,
    Gated,
    /// One step on the joint loss (see [`Schedule::Joint`]).
    Joint,
}

impl Schedule {
    pub const OFFICIAL: Schedule = Schedule::Epoch {
        warmup: 10,
        period: 3,
        phase: 2,
    };

    /// The kind of step `step` (0-based, within `epoch`) is.
    pub fn step_kind(self, epoch: usize, step: usize) -> StepKind {
        match self {
            Schedule::Epoch {
                warmup,
                period,
                phase,
            } => {
                if epoch >= warmup && period > 0 && epoch % period == phase {
                    StepKind::Gated
                } else {
                    StepKind::Standard
                }
            }
            Schedule::Interleave { every } => {
                if every > 0 && (step + 1).is_multiple_of(every) {
                    StepKind::StandardThenGated
                } else {
                    StepKind::Standard
                }
            }
            Schedule::Joint { .. } => StepKind::Joint,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn projection_sets_row_maxima_to_one_and_stays_in_range() {
        let mut g = vec![0.5, 0.25, 0.1, 2.0, -1.0, 1.0, 0.3, 0.3, 0.0];
        project_rows(&mut g, 3);
        assert_eq!(&g[0..3], &[1.0, 0.5, 0.2]);
        assert_eq!(&g[3..6], &[1.0, 0.0, 0.5]);
        assert_eq!(&g[6..9], &[1.0, 1.0, 0.0]);
        for row in g.chunks(3) {
            assert_eq!(row.iter().cloned().fold(f32::MIN, f32::max), 1.0);
            assert!(row.iter().all(|v| (0.0..=1.0).contains(v)));
        }
    }

    #[test]
    fn projection_guards_rows_without_a_positive_entry() {
        let mut g = vec![0.0, 0.0, 0.0, -0.5, -0.1, -0.3];
        project_rows(&mut g, 3);
        assert_eq!(g, vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0]);
        assert!(g.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn hinge_is_zero_under_budget_and_linear_above() {
        let config = GateConfig::default();
        // K·C = 10, budget μ·K·C = 2.
        assert_eq!(hinge_value(&[0.15; 10], 5, 2, config), 0.0);
        let over = hinge_value(&[0.5; 10], 5, 2, config);
        assert!((over - 1e-3 * 3.0).abs() < 1e-12);

        let device = Device::flex();
        let gate = Tensor::<2>::full([5, 2], 0.5, &device);
        let v: f32 = hinge(gate, config).into_scalar();
        assert!((f64::from(v) - over).abs() < 1e-7);
    }

    #[test]
    fn schedules() {
        let official = Schedule::OFFICIAL;
        assert_eq!(official.step_kind(2, 0), StepKind::Standard); // warm-up
        assert_eq!(official.step_kind(11, 5), StepKind::Gated);
        assert_eq!(official.step_kind(12, 5), StepKind::Standard);
        let inter = Schedule::Interleave { every: 2 };
        assert_eq!(inter.step_kind(0, 0), StepKind::Standard);
        assert_eq!(inter.step_kind(0, 1), StepKind::StandardThenGated);
        let joint = Schedule::Joint { weight: 1.0 };
        assert_eq!(joint.step_kind(0, 0), StepKind::Joint);
        assert_eq!(joint.step_kind(7, 3), StepKind::Joint);
    }
}
