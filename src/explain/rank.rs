//! Ranking the filters of *other* classes: which of them fired most, for an image predicted
//! as class ĉ.
//!
//! "Fired" is measured against clean images of ĉ (the z-score of the filter's activation
//! under ĉ's clean mean and the filter's pooled std), not in raw units: filters differ in
//! scale, and what an auditor needs is which foreign filters are unusually active for a ĉ
//! image. The predicted class's own filters are ranked by [`crate::detect::gated_deviations`].

use csg_bundle::Gate;
use csg_bundle::calibration::{GATED, StageStats};
use serde::Serialize;

use crate::detect::clean_stats;

/// A filter gated for other classes than the predicted one, and how it fired.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OtherFilter {
    pub filter: usize,
    /// The classes it is gated for (G ≥ 0.5), by label.
    pub classes: Vec<String>,
    /// Its largest gate value over those classes.
    pub gate: f32,
    pub activation: f32,
    /// Its clean mean on images of the predicted class.
    pub clean_mean: f32,
    /// (activation − clean mean) / clean std: how unusually it fired for the predicted class.
    pub z: f32,
}

/// The `top` filters gated for some class but not for `class`, highest z first.
pub fn other_filters(
    gate: &Gate,
    acts: &[f32],
    stats: Option<&StageStats>,
    class: usize,
    labels: &[String],
    top: usize,
) -> Vec<OtherFilter> {
    let mut out: Vec<OtherFilter> = (0..gate.filters.min(acts.len()))
        .filter(|&k| gate.get(k, class) < GATED)
        .filter_map(|k| {
            let owners: Vec<usize> = (0..gate.classes)
                .filter(|&c| gate.get(k, c) >= GATED)
                .collect();
            let strongest = owners.iter().map(|&c| gate.get(k, c)).fold(0.0, f32::max);
            if owners.is_empty() {
                return None;
            }
            let (mean, std) = clean_stats(stats, class, k);
            Some(OtherFilter {
                filter: k,
                classes: owners
                    .iter()
                    .map(|&c| labels.get(c).cloned().unwrap_or_else(|| c.to_string()))
                    .collect(),
                gate: strongest,
                activation: acts[k],
                clean_mean: mean,
                z: (acts[k] - mean) / std,
            })
        })
        .collect();
    out.sort_by(|a, b| b.z.total_cmp(&a.z).then(a.filter.cmp(&b.filter)));
    out.truncate(top);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 4 filters × 2 classes: filter 0 belongs to class 0, filters 1 and 2 to class 1, filter
    /// 3 to both.
    fn gate() -> Gate {
        Gate {
            filters: 4,
            classes: 2,
            values: vec![1.0, 0.1, 0.2, 1.0, 0.0, 0.6, 1.0, 1.0],
        }
    }

    fn labels() -> Vec<String> {
        vec!["a".into(), "b".into()]
    }

    #[test]
    fn ranks_foreign_filters_by_z_against_the_predicted_class() {
        let stats = StageStats {
            output: "activations".into(),
            map_output: None,
            stage: 3,
            channels: 4,
            features: Default::default(),
            means: vec![vec![1.0, 1.0, 1.0, 1.0], vec![0.0; 4]],
            std: vec![1.0, 1.0, 0.5, 1.0],
            metric: csg_bundle::calibration::StageMetric::Full {
                precision: vec![0.0; 16],
            },
        };
        let acts = [9.0, 2.0, 2.0, 9.0];
        let got = other_filters(&gate(), &acts, Some(&stats), 0, &labels(), 5);
        // Filters 0 and 3 are class a's; of 1 (z 1) and 2 (z 2), 2 fired more unusually.
        assert_eq!(got.iter().map(|f| f.filter).collect::<Vec<_>>(), vec![2, 1]);
        assert_eq!(got[0].classes, vec!["b".to_owned()]);
        assert!((got[0].z - 2.0).abs() < 1e-6 && (got[0].gate - 0.6).abs() < 1e-6);
        assert_eq!(
            other_filters(&gate(), &acts, Some(&stats), 0, &labels(), 1).len(),
            1
        );
    }

    #[test]
    fn without_statistics_z_is_the_activation_and_orphans_are_skipped() {
        let orphan = Gate {
            filters: 2,
            classes: 2,
            values: vec![1.0, 0.0, 0.0, 0.0],
        };
        assert!(other_filters(&orphan, &[1.0, 5.0], None, 0, &labels(), 5).is_empty());
        let got = other_filters(&gate(), &[0.0, 3.0, 4.0, 0.0], None, 0, &labels(), 5);
        assert_eq!(got[0].filter, 2);
        assert_eq!(got[0].z, 4.0);
        assert_eq!(got[0].clean_mean, 0.0);
    }
}
