//! Per-stage Mahalanobis distances, prepared once per model and evaluated on every verdict.
//!
//! The calibration stores each stage's precision matrix P (the inverse of the shrunk
//! covariance). Evaluating vᵀPv directly reads all d² entries for every image, and at the
//! shipped model's d = 192 that read, not the arithmetic, was the largest cost of a verdict
//! (the matrix lives in L2, not L1). Its Cholesky factor L (P = L·Lᵀ, so vᵀPv = ‖Lᵀv‖²) has
//! half the entries, so the same distance costs half the reads and half the multiply-adds.

use multiversion::multiversion;
use nalgebra::DMatrix;

use crate::calibration::{StageMetric, StageStats};
use crate::score::{dense_quadratic, log_distance};

/// vᵀPv for one precision matrix P.
#[derive(Debug, Clone)]
enum Quadratic {
    /// Rows of the lower Cholesky factor L, packed: row j holds L[j][0..=j].
    Cholesky { lower: Vec<f32> },
    /// P itself, row-major, where it has no Cholesky factor in f64 (not positive definite
    /// after rounding to f32); scored as calibration always did.
    Dense(Vec<f32>),
    /// A stored matrix that is not `dim`×`dim` (validation refuses such a bundle before a
    /// detector is built): every distance is NaN rather than a panic.
    Malformed,
}

impl Quadratic {
    fn new(precision: &[f32], dim: usize) -> Self {
        if precision.len() != dim * dim {
            return Self::Malformed;
        }
        let p = DMatrix::from_fn(dim, dim, |r, c| {
            // Symmetrised: the stored matrix is symmetric only up to f32 rounding.
            0.5 * (f64::from(precision[r * dim + c]) + f64::from(precision[c * dim + r]))
        });
        match p.cholesky() {
            Some(chol) => {
                let l = chol.l();
                let lower = (0..dim)
                    .flat_map(|j| (0..=j).map(move |i| (j, i)))
                    .map(|(j, i)| l[(j, i)] as f32)
                    .collect();
                Self::Cholesky { lower }
            }
            None => Self::Dense(precision.to_vec()),
        }
    }

    /// ln √(vᵀPv), as [`crate::score::log_mahalanobis`] defines it.
    fn log_distance(&self, v: &[f32]) -> f64 {
        match self {
            Self::Cholesky { lower } => log_distance(factor_square_norm(lower, v)),
            Self::Dense(precision) => log_distance(dense_quadratic(v, precision)),
            Self::Malformed => f64::NAN,
        }
    }
}

/// ‖Lᵀv‖² for L's rows packed as in [`Quadratic::Cholesky`]. Lᵀv is accumulated column by
/// column (w[..=j] += v[j]·L[j][..=j]): each step is a plain multiply-add over a slice,
/// which vectorises without the horizontal sums that a row-by-row dot product ends in.
/// Compiled again for AVX2 and chosen at run time, so the binary still runs on any x86-64.
#[multiversion(targets("x86_64+avx2+fma"))]
fn factor_square_norm(lower: &[f32], v: &[f32]) -> f64 {
    let mut w = vec![0.0f32; v.len()];
    let mut rows = lower;
    for (j, &vj) in v.iter().enumerate() {
        let Some((row, rest)) = rows.split_at_checked(j + 1) else {
            break;
        };
        rows = rest;
        for (wi, &lji) in w[..=j].iter_mut().zip(row) {
            *wi += vj * lji;
        }
    }
    w.iter().map(|&x| f64::from(x) * f64::from(x)).sum()
}

/// How one stage's distance is evaluated: the whole feature vector, or the predicted
/// class's gated filters.
#[derive(Debug, Clone)]
enum Prepared {
    Full(Quadratic),
    Gated(Vec<(Vec<usize>, Quadratic)>),
}

/// One calibrated stage's class-conditional distance, ready to evaluate.
#[derive(Debug, Clone)]
pub struct StageScorer {
    means: Vec<Vec<f32>>,
    prepared: Prepared,
}

impl StageScorer {
    /// Factors the stage's precision matrices (once per model load).
    pub fn new(stats: &StageStats) -> Self {
        let prepared = match &stats.metric {
            StageMetric::Full { precision } => {
                Prepared::Full(Quadratic::new(precision, stats.dim()))
            }
            StageMetric::Gated { classes } => Prepared::Gated(
                classes
                    .iter()
                    .map(|g| {
                        (
                            g.filters.clone(),
                            Quadratic::new(&g.precision, g.filters.len()),
                        )
                    })
                    .collect(),
            ),
        };
        Self {
            means: stats.means.clone(),
            prepared,
        }
    }

    /// ln Mahalanobis distance of `acts` to class `class`'s clean mean: infinite for a class
    /// the calibration does not know, NaN for features of the wrong length.
    pub fn score(&self, acts: &[f32], class: usize) -> f64 {
        let Some(mean) = self.means.get(class) else {
            return f64::INFINITY;
        };
        if acts.len() != mean.len() {
            return f64::NAN;
        }
        match &self.prepared {
            Prepared::Full(q) => {
                let diff: Vec<f32> = acts.iter().zip(mean).map(|(a, m)| a - m).collect();
                q.log_distance(&diff)
            }
            Prepared::Gated(classes) => match classes.get(class) {
                Some((filters, q)) => {
                    let diff: Option<Vec<f32>> = filters
                        .iter()
                        .map(|&k| Some(acts.get(k)? - mean.get(k)?))
                        .collect();
                    diff.map_or(f64::NAN, |d| q.log_distance(&d))
                }
                None => f64::INFINITY,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calibration::{GatedPrecision, StageFeatures};
    use crate::score::log_mahalanobis;

    /// A symmetric, diagonally dominant (so positive definite) d×d matrix.
    fn precision(d: usize) -> Vec<f32> {
        (0..d * d)
            .map(|i| {
                let (r, c) = (i / d, i % d);
                if r == c {
                    2.0 + (r as f32 * 0.3).sin()
                } else {
                    0.01 * ((r + c) as f32).cos()
                }
            })
            .collect()
    }

    fn stats(d: usize, metric: StageMetric) -> StageStats {
        StageStats {
            output: "s".into(),
            map_output: None,
            stage: 0,
            channels: d,
            features: StageFeatures::Mean,
            means: vec![
                (0..d).map(|i| (i as f32 * 0.11).cos()).collect(),
                vec![0.5; d],
            ],
            std: vec![1.0; d],
            metric,
        }
    }

    /// A stage over `d` features with the full metric `precision`, and its scorer.
    fn full(precision: &[f32], d: usize) -> (StageStats, StageScorer) {
        let s = stats(
            d,
            StageMetric::Full {
                precision: precision.to_vec(),
            },
        );
        let scorer = StageScorer::new(&s);
        (s, scorer)
    }

    #[test]
    fn the_factored_distance_equals_the_stored_definition() {
        // 67 dimensions: odd, so no row of the factor is a whole number of vector lanes.
        let d = 67;
        let p = precision(d);
        let (s, scorer) = full(&p, d);
        assert!(matches!(
            scorer.prepared,
            Prepared::Full(Quadratic::Cholesky { .. })
        ));
        let x: Vec<f32> = (0..d).map(|i| (i as f32 * 0.37).sin()).collect();
        for class in 0..2 {
            let want = log_mahalanobis(&x, &s.means[class], &p, None);
            let got = scorer.score(&x, class);
            assert!((got - want).abs() < 1e-5, "class {class}: {got} vs {want}");
        }
        assert_eq!(scorer.score(&x, 2), f64::INFINITY);
        assert!(scorer.score(&x[1..], 0).is_nan());
        // At the mean the distance is zero; its log stays finite.
        assert!(scorer.score(&s.means[1], 1).is_finite());
    }

    #[test]
    fn gated_distances_read_only_the_class_filters() {
        let d = 6;
        let filters = vec![1, 4];
        // Precision diag(1, 4) on filters 1 and 4: distance² = 3² + 4·1² = 13.
        let s = stats(
            d,
            StageMetric::Gated {
                classes: vec![
                    GatedPrecision {
                        filters: filters.clone(),
                        precision: vec![1.0, 0.0, 0.0, 4.0],
                    },
                    GatedPrecision {
                        filters: vec![9],
                        precision: vec![1.0],
                    },
                ],
            },
        );
        let scorer = StageScorer::new(&s);
        let mut x = s.means[0].clone();
        x[1] += 3.0;
        x[4] += 1.0;
        x[0] += 100.0; // not a gated filter of class 0
        assert!((scorer.score(&x, 0) - 0.5 * 13.0f64.ln()).abs() < 1e-6);
        // A filter index outside the features is NaN, not a panic.
        assert!(scorer.score(&x, 1).is_nan());
    }

    #[test]
    fn a_matrix_without_a_cholesky_factor_is_scored_as_stored() {
        // Indefinite: diag(1, −1). The dense form clamps a negative quadratic at zero.
        let p = vec![1.0, 0.0, 0.0, -1.0];
        let (s, scorer) = full(&p, 2);
        assert!(matches!(
            scorer.prepared,
            Prepared::Full(Quadratic::Dense(_))
        ));
        let x = [3.0, 0.5];
        let want = log_mahalanobis(&x, &s.means[0], &p, None);
        assert_eq!(scorer.score(&x, 0), want);
        // A matrix of the wrong size scores NaN instead of panicking.
        assert!(full(&[1.0; 3], 2).1.score(&x, 0).is_nan());
    }
}
