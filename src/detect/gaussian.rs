//! The Gaussian statistics of one stage's clean features: class means and the precision of
//! their pooled, shrunk within-class covariance, which the Mahalanobis components read.

use nalgebra::DMatrix;

use super::DetectError;
use super::fit::StageData;

/// One stage's statistics as every full-metric component uses them: class means over the
/// correctly classified images `correct` and the precision of their pooled, shrunk
/// covariance (row-major). For analyses that try other per-image features the same way.
pub fn tied_gaussian(
    data: &StageData,
    labels: &[usize],
    correct: &[usize],
    classes: usize,
    shrinkage: f64,
) -> Result<(Vec<Vec<f32>>, Vec<f32>), DetectError> {
    let (means, cov) = class_means_and_covariance(data, labels, correct, classes);
    Ok((means, invert(shrink(cov, shrinkage), &data.name())?))
}

/// Per-class means over correctly classified images and the pooled within-class covariance.
pub(super) fn class_means_and_covariance(
    data: &StageData,
    labels: &[usize],
    correct: &[usize],
    classes: usize,
) -> (Vec<Vec<f32>>, DMatrix<f64>) {
    let d = data.channels;
    let mut sums = vec![vec![0.0f64; d]; classes];
    let mut counts = vec![0usize; classes];
    for &i in correct {
        counts[labels[i]] += 1;
        for (s, &v) in sums[labels[i]].iter_mut().zip(data.row(i)) {
            *s += f64::from(v);
        }
    }
    let means: Vec<Vec<f64>> = sums
        .iter()
        .zip(&counts)
        .map(|(s, &n)| s.iter().map(|v| v / n.max(1) as f64).collect())
        .collect();
    let mut cov = DMatrix::<f64>::zeros(d, d);
    let mut diff = vec![0.0f64; d];
    for &i in correct {
        for ((dst, &v), m) in diff.iter_mut().zip(data.row(i)).zip(&means[labels[i]]) {
            *dst = f64::from(v) - m;
        }
        for a in 0..d {
            let da = diff[a];
            for b in a..d {
                cov[(a, b)] += da * diff[b];
            }
        }
    }
    let n = correct.len().max(1) as f64;
    for a in 0..d {
        for b in a..d {
            let v = cov[(a, b)] / n;
            cov[(a, b)] = v;
            cov[(b, a)] = v;
        }
    }
    let means = means
        .into_iter()
        .map(|m| m.into_iter().map(|v| v as f32).collect())
        .collect();
    (means, cov)
}

/// (1 − α)·Σ + α·(trace/d)·I: keeps the inverse stable for filters that barely vary.
pub(super) fn shrink(cov: DMatrix<f64>, alpha: f64) -> DMatrix<f64> {
    let d = cov.nrows();
    let scale = cov.trace() / d.max(1) as f64;
    let scale = if scale > 0.0 { scale } else { 1e-6 };
    cov * (1.0 - alpha) + DMatrix::identity(d, d) * (alpha * scale)
}

/// The inverse of `what`'s (shrunk) covariance, row-major.
pub(super) fn invert(cov: DMatrix<f64>, what: &str) -> Result<Vec<f32>, DetectError> {
    let d = cov.nrows();
    if d == 0 {
        return Ok(Vec::new());
    }
    let inverse = cov
        .cholesky()
        .ok_or_else(|| {
            DetectError::Calibration(format!(
                "covariance of {what} is not positive definite even after shrinkage"
            ))
        })?
        .inverse();
    // Row-major; the matrix is symmetric, so the column-major buffer is the same.
    Ok(inverse.iter().map(|&v| v as f32).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covariance_and_shrinkage_by_hand() {
        // Two classes, one channel: class 0 values 1, 3 (mean 2), class 1 values 10, 14 (mean 12).
        let data = StageData {
            output: "a".into(),
            stage: 0,
            channels: 1,
            values: vec![1.0, 3.0, 10.0, 14.0],
            map: None,
        };
        let (means, cov) = class_means_and_covariance(&data, &[0, 0, 1, 1], &[0, 1, 2, 3], 2);
        assert_eq!(means, vec![vec![2.0], vec![12.0]]);
        // Pooled within-class variance: (1 + 1 + 4 + 4) / 4 = 2.5.
        assert!((cov[(0, 0)] - 2.5).abs() < 1e-12);
        let shrunk = shrink(cov, 0.5);
        assert!(
            (shrunk[(0, 0)] - 2.5).abs() < 1e-12,
            "a 1×1 matrix is its own trace/d"
        );
        let inv = invert(shrunk, "a test matrix").unwrap();
        assert!((inv[0] - 0.4).abs() < 1e-6);
    }
}
