//! Per-stage Mahalanobis distances, prepared once per model and evaluated on every verdict.
//!
//! The calibration stores each stage's precision matrix P (the inverse of the shrunk
//! covariance). Evaluating vᵀPv directly reads all d² entries for every image, and at the
//! shipped model's d = 192 that read, not the arithmetic, was the largest cost of a verdict
//! (the matrix lives in L2, not L1). Its Cholesky factor L (P = L·Lᵀ, so vᵀPv = ‖Lᵀv‖²) has
//! half the entries, so the same distance costs half the reads and half the multiply-adds.
//! The factor is stored in column panels ([`Panels`]) so that Lᵀv accumulates in registers.

use multiversion::multiversion;
use nalgebra::DMatrix;

use crate::calibration::{InputStats, StageMetric, StageStats};
use crate::score::{dense_quadratic, log_distance};

/// vᵀPv for one precision matrix P.
#[derive(Debug, Clone)]
enum Quadratic {
    /// The lower Cholesky factor L, in column panels.
    Cholesky(Panels),
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
                Self::Cholesky(Panels::new(dim, |j, i| l[(j, i)] as f32))
            }
            None => Self::Dense(precision.to_vec()),
        }
    }

    /// ln √(vᵀPv), as [`crate::score::log_mahalanobis`] defines it.
    fn log_distance(&self, v: &[f32]) -> f64 {
        match self {
            Self::Cholesky(panels) => log_distance(panels.square_norm(v)),
            Self::Dense(precision) => log_distance(dense_quadratic(v, precision)),
            Self::Malformed => f64::NAN,
        }
    }
}

/// Columns of the factor per panel: four AVX2 registers of accumulators. The kernel is bound
/// by reading the factor from L2, so wider panels (64 measured the same) only add padding.
const PANEL: usize = 32;

/// A d×d lower-triangular factor L stored for computing ‖Lᵀv‖², column panel after column
/// panel. Panel p covers columns [32p, 32p + 32) and holds, for every row j ≥ 32p, those 32
/// entries of row j (zero above the diagonal and past column d).
///
/// (Lᵀv)ᵢ = Σⱼ L[j][i]·v[j], so a panel's 32 outputs accumulate over its rows in registers
/// and its rows are read once, in order. The packed column-wise form it replaced stored and
/// reloaded its partial sums on every row: at d = 192 it took 2.4 µs, the panels 1.1 µs.
#[derive(Debug, Clone)]
struct Panels {
    dim: usize,
    values: Vec<f32>,
}

impl Panels {
    /// From `l(j, i)`, read for i ≤ j < `dim` only.
    fn new(dim: usize, l: impl Fn(usize, usize) -> f32) -> Self {
        let mut values = Vec::new();
        for first in (0..dim).step_by(PANEL) {
            for j in first..dim {
                values.extend((first..first + PANEL).map(|i| if i <= j { l(j, i) } else { 0.0 }));
            }
        }
        Self { dim, values }
    }

    /// ‖Lᵀv‖², or NaN when `v` is not `dim` long. Every output adds its terms in row order,
    /// like the column-wise form, plus exact zeros for the padding, so both give the same
    /// bits on finite input.
    fn square_norm(&self, v: &[f32]) -> f64 {
        if v.len() != self.dim {
            return f64::NAN;
        }
        panels_square_norm(&self.values, v)
    }
}

/// The kernel of [`Panels::square_norm`], compiled again for AVX2 and chosen at run time, so
/// the binary still runs on any x86-64.
#[multiversion(targets("x86_64+avx2+fma"))]
fn panels_square_norm(values: &[f32], v: &[f32]) -> f64 {
    let mut total = 0.0f64;
    let mut rest = values;
    for first in (0..v.len()).step_by(PANEL) {
        let rows = &v[first..];
        let Some((panel, next)) = rest.split_at_checked(rows.len() * PANEL) else {
            return f64::NAN;
        };
        rest = next;
        let mut acc = [0.0f32; PANEL];
        for (row, &vj) in panel.chunks_exact(PANEL).zip(rows) {
            for (a, &l) in acc.iter_mut().zip(row) {
                *a += vj * l;
            }
        }
        for &x in &acc[..rows.len().min(PANEL)] {
            total += f64::from(x) * f64::from(x);
        }
    }
    total
}

/// Feature vectors up to this long are centred in a buffer on the stack rather than in a new
/// vector per verdict.
const STACK_DIM: usize = 256;

/// `len` values of scratch space: the stack's where they fit, else `heap`'s.
fn scratch<'a>(
    stack: &'a mut [f32; STACK_DIM],
    heap: &'a mut Vec<f32>,
    len: usize,
) -> &'a mut [f32] {
    if len <= STACK_DIM {
        &mut stack[..len]
    } else {
        heap.resize(len, 0.0);
        heap
    }
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
            StageMetric::Full { precision } => return Self::full(&stats.means, precision),
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

    /// One shared `d`×`d` precision over features of the class means' length `d`.
    pub fn full(means: &[Vec<f32>], precision: &[f32]) -> Self {
        let dim = means.first().map_or(0, Vec::len);
        Self {
            means: means.to_vec(),
            prepared: Prepared::Full(Quadratic::new(precision, dim)),
        }
    }

    /// The distance of the input's pixel histogram.
    pub fn input(stats: &InputStats) -> Self {
        Self::full(&stats.means, &stats.precision)
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
        let mut stack = [0.0f32; STACK_DIM];
        let mut heap = Vec::new();
        match &self.prepared {
            Prepared::Full(q) => {
                let diff = scratch(&mut stack, &mut heap, mean.len());
                for ((d, a), m) in diff.iter_mut().zip(acts).zip(mean) {
                    *d = a - m;
                }
                q.log_distance(diff)
            }
            Prepared::Gated(classes) => match classes.get(class) {
                Some((filters, q)) => {
                    let diff = scratch(&mut stack, &mut heap, filters.len());
                    for (d, &k) in diff.iter_mut().zip(filters) {
                        match (acts.get(k), mean.get(k)) {
                            (Some(a), Some(m)) => *d = a - m,
                            _ => return f64::NAN,
                        }
                    }
                    q.log_distance(diff)
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
            Prepared::Full(Quadratic::Cholesky(_))
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

    /// ‖Lᵀv‖² as the packed column-wise form computed it: w[..=j] += v[j]·L[j][..=j].
    fn column_wise(l: &DMatrix<f64>, v: &[f32]) -> f64 {
        let mut w = vec![0.0f32; v.len()];
        for (j, &vj) in v.iter().enumerate() {
            for (i, wi) in w[..=j].iter_mut().enumerate() {
                *wi += vj * l[(j, i)] as f32;
            }
        }
        w.iter().map(|&x| f64::from(x) * f64::from(x)).sum()
    }

    #[test]
    fn panels_give_the_column_wise_bits() {
        // Sizes below, at and across panel edges, and the shipped stage's 192.
        for d in [1, 5, 31, 32, 33, 67, 192] {
            let p = DMatrix::from_fn(d, d, |r, c| f64::from(precision(d)[r * d + c]));
            let l = p.cholesky().expect("positive definite").l();
            let panels = Panels::new(d, |j, i| l[(j, i)] as f32);
            let v: Vec<f32> = (0..d).map(|i| (i as f32 * 0.73).sin() * 3.0).collect();
            assert_eq!(panels.square_norm(&v), column_wise(&l, &v), "d = {d}");
            assert!(panels.square_norm(&v[1..]).is_nan());
        }
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
