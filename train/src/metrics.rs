//! Class-specificity of filters: MIS (REFERENCE §1).
//!
//! MIS = mean over filters k of max over classes c of I(a_k ; [y = c]), where a_k is filter k's
//! GAP activation. The estimator is the plug-in (histogram) estimate on equal-frequency bins:
//! a_k is cut at its empirical quantiles into at most `bins` bins (tied values share a bin, so
//! ReLU's many exact zeros form one bin), and the mutual information of the resulting discrete
//! joint distribution with the binary indicator is computed in nats. The plug-in estimate is
//! biased upward by about (bins − 1)/(2·n·ln 2)·ln 2 nats, negligible for n = 5,000 and 10 bins.

/// Default number of equal-frequency bins.
pub const MIS_BINS: usize = 10;

/// Per-filter, per-class mutual information and the MIS summary.
#[derive(Debug, Clone)]
pub struct Specificity {
    /// [K][C] mutual information in nats.
    pub mutual_information: Vec<Vec<f64>>,
    /// Mean over filters of the max over classes.
    pub mis: f64,
}

/// `activations` is row-major [N, K]; `labels` has N entries below `classes`.
pub fn class_specificity(
    activations: &[f32],
    filters: usize,
    labels: &[u8],
    classes: usize,
    bins: usize,
) -> Specificity {
    let n = labels.len();
    assert_eq!(activations.len(), n * filters, "activations must be [N, K]");
    let mut mi = vec![vec![0.0; classes]; filters];
    let mut column = vec![0.0f32; n];
    for (k, mi_k) in mi.iter_mut().enumerate() {
        for (i, slot) in column.iter_mut().enumerate() {
            *slot = activations[i * filters + k];
        }
        let binned = quantile_bins(&column, bins);
        let nb = binned.iter().copied().max().map_or(0, |m| m + 1);
        // counts[b][c]
        let mut counts = vec![vec![0usize; classes]; nb];
        for (&b, &y) in binned.iter().zip(labels) {
            counts[b][usize::from(y)] += 1;
        }
        let class_totals: Vec<usize> = (0..classes)
            .map(|c| counts.iter().map(|row| row[c]).sum())
            .collect();
        for (c, slot) in mi_k.iter_mut().enumerate() {
            *slot = binary_mi(&counts, c, class_totals[c], n);
        }
    }
    let mis = if filters == 0 {
        0.0
    } else {
        mi.iter()
            .map(|row| row.iter().copied().fold(0.0, f64::max))
            .sum::<f64>()
            / filters as f64
    };
    Specificity {
        mutual_information: mi,
        mis,
    }
}

/// I(B ; [Y = c]) in nats from bin×class counts.
fn binary_mi(counts: &[Vec<usize>], class: usize, in_class: usize, n: usize) -> f64 {
    let n_f = n as f64;
    let p_in = in_class as f64 / n_f;
    let mut mi = 0.0;
    for row in counts {
        let bin_total: usize = row.iter().sum();
        if bin_total == 0 {
            continue;
        }
        let p_bin = bin_total as f64 / n_f;
        let joint = [row[class], bin_total - row[class]];
        let marginal = [p_in, 1.0 - p_in];
        for (count, p_y) in joint.into_iter().zip(marginal) {
            if count > 0 {
                let p = count as f64 / n_f;
                mi += p * (p / (p_bin * p_y)).ln();
            }
        }
    }
    mi.max(0.0)
}

/// Assigns each value to one of at most `bins` equal-frequency bins; equal values share a bin.
fn quantile_bins(values: &[f32], bins: usize) -> Vec<usize> {
    let mut sorted: Vec<f32> = values.to_vec();
    sorted.sort_by(f32::total_cmp);
    let n = sorted.len();
    let mut edges: Vec<f32> = (1..bins)
        .map(|b| sorted[(b * n / bins).min(n.saturating_sub(1))])
        .collect();
    edges.dedup();
    values
        .iter()
        .map(|v| edges.partition_point(|e| e <= v))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filter_that_is_the_class_indicator_carries_its_entropy() {
        // 1,000 samples, 10 classes evenly; filter 0 fires exactly on class 3.
        let labels: Vec<u8> = (0..1000).map(|i| (i % 10) as u8).collect();
        let acts: Vec<f32> = labels
            .iter()
            .flat_map(|&y| [if y == 3 { 1.0 } else { 0.0 }, 0.5])
            .collect();
        let spec = class_specificity(&acts, 2, &labels, 10, MIS_BINS);
        let p: f64 = 0.1;
        let entropy = -(p * p.ln() + (1.0 - p) * (1.0 - p).ln());
        assert!((spec.mutual_information[0][3] - entropy).abs() < 1e-9);
        // Filter 1 is constant: no information about any class.
        assert!(spec.mutual_information[1].iter().all(|&v| v.abs() < 1e-12));
        assert!((spec.mis - entropy / 2.0).abs() < 1e-9);
    }

    #[test]
    fn independent_activations_score_near_zero() {
        // A deterministic pseudo-random sequence unrelated to the labels.
        let labels: Vec<u8> = (0..5000).map(|i| (i % 10) as u8).collect();
        let mut state = 12345u64;
        let acts: Vec<f32> = (0..5000)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 40) as f32
            })
            .collect();
        let spec = class_specificity(&acts, 1, &labels, 10, MIS_BINS);
        // Plug-in bias for 10 bins × 2 outcomes at n = 5,000 is ≈ 9/(2·5000) = 0.0009 nats.
        assert!(spec.mis < 0.005, "{}", spec.mis);
    }
}
