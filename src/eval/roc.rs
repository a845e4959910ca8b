//! Detection figures: AUROC, TPR at a fixed FPR, ROC curves. Scores are "larger = more
//! adversarial"; negatives are clean images, positives adversarial ones.

/// Area under the ROC curve: the probability that a random positive scores above a random
/// negative, ties counting half (the Mann–Whitney U statistic).
pub fn auroc(negatives: &[f64], positives: &[f64]) -> f64 {
    if negatives.is_empty() || positives.is_empty() {
        return f64::NAN;
    }
    let mut neg: Vec<f64> = negatives.to_vec();
    neg.sort_by(f64::total_cmp);
    let mut wins = 0.0;
    for &p in positives {
        let below = neg.partition_point(|&n| n < p);
        let not_above = neg.partition_point(|&n| n <= p);
        wins += below as f64 + 0.5 * (not_above - below) as f64;
    }
    wins / (negatives.len() as f64 * positives.len() as f64)
}

/// Share of `scores` strictly above `threshold`.
pub fn rate_above(scores: &[f64], threshold: f64) -> f64 {
    if scores.is_empty() {
        return f64::NAN;
    }
    scores.iter().filter(|&&s| s > threshold).count() as f64 / scores.len() as f64
}

/// The ROC curve as (FPR, TPR) points, from (0, 0) to (1, 1), one point per distinct score.
pub fn roc_curve(negatives: &[f64], positives: &[f64]) -> Vec<(f64, f64)> {
    let mut all: Vec<(f64, bool)> = negatives
        .iter()
        .map(|&s| (s, false))
        .chain(positives.iter().map(|&s| (s, true)))
        .collect();
    all.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (n, p) = (negatives.len().max(1) as f64, positives.len().max(1) as f64);
    let (mut fp, mut tp) = (0usize, 0usize);
    let mut points = vec![(0.0, 0.0)];
    let mut i = 0;
    while i < all.len() {
        let score = all[i].0;
        while i < all.len() && all[i].0 == score {
            if all[i].1 {
                tp += 1;
            } else {
                fp += 1;
            }
            i += 1;
        }
        points.push((fp as f64 / n, tp as f64 / p));
    }
    points
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auroc_by_hand() {
        assert_eq!(auroc(&[1.0, 2.0], &[3.0, 4.0]), 1.0);
        assert_eq!(auroc(&[3.0, 4.0], &[1.0, 2.0]), 0.0);
        // Pairs: (1,2) win, (1,1) tie, (3,2) loss, (3,1) loss → (1 + 0.5) / 4.
        assert_eq!(auroc(&[1.0, 3.0], &[2.0, 1.0]), 0.375);
        assert!(auroc(&[], &[1.0]).is_nan());
    }

    #[test]
    fn rates_and_curve() {
        assert_eq!(rate_above(&[1.0, 2.0, 3.0, 4.0], 2.0), 0.5);
        let curve = roc_curve(&[1.0, 3.0], &[2.0, 4.0]);
        assert_eq!(
            curve,
            vec![(0.0, 0.0), (0.0, 0.5), (0.5, 0.5), (0.5, 1.0), (1.0, 1.0)]
        );
    }
}
