//! What a verdict computes, worked out once per detector: each component in answer order with
//! its clean score table, the components the combined score reads, and the verdict's threshold
//! per class. A verdict then finds nothing by name and allocates only its answer (the
//! name-keyed path it replaced spent a third of a verdict's time in allocations, string
//! compares and map lookups: `hot_path score/combined`, README, Detection).

use std::sync::Arc;

use csg_bundle::calibration::{Calibration, Combiner, INPUT_HISTOGRAM};

use super::ScoreKind;

/// Where a component's score comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Source {
    /// The calibrated stage `index` (of [`super::Sample::stages`]), whose features are `dim`
    /// values long.
    Stage {
        index: usize,
        dim: usize,
    },
    /// The input's pixel-histogram distance.
    Input,
    Margin,
    Msp,
    /// The gated (last) stage's activations against the class's gate column.
    GateMismatch,
}

/// One component of every verdict.
#[derive(Debug, Clone)]
pub(super) struct Planned {
    /// Shared by every verdict's answer rather than copied into each.
    pub name: Arc<str>,
    pub source: Source,
    /// Clean scores its p-value is read from; `None` when uncalibrated.
    pub table: Option<CleanTable>,
}

/// What decides the verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Decider {
    /// The combination of [`Plan::combined`]'s p-values.
    Combined,
    /// One component's raw score.
    Component(usize),
    /// A score this detector cannot compute (NaN).
    Missing,
}

/// A detector's verdict recipe.
#[derive(Debug, Clone)]
pub(super) struct Plan {
    pub components: Vec<Planned>,
    /// Indices into `components` of what the combined score reads, in the calibration's
    /// `combined_components` order: their p-values are summed in that order, so a verdict's
    /// combined score has the same bits as the one its threshold was fitted on.
    pub combined: Vec<usize>,
    pub combiner: Combiner,
    pub decider: Decider,
    /// Per predicted class: the verdict's threshold where the class has its own.
    class_thresholds: Vec<Option<f64>>,
    /// The threshold for every other class; `None` when uncalibrated.
    threshold: Option<f64>,
}

impl Plan {
    /// The recipe for `kind`: the calibration's stages in order, the input histogram where
    /// calibrated, the margin, msp, and the gate mismatch where there is a gate.
    pub fn new(calibration: Option<&Calibration>, has_gate: bool, kind: ScoreKind) -> Self {
        let mut sources: Vec<(String, Source)> = Vec::new();
        if let Some(cal) = calibration {
            for (index, stats) in cal.stages.iter().enumerate() {
                let dim = stats.dim();
                sources.push((stats.component_name(), Source::Stage { index, dim }));
            }
            if cal.input.is_some() {
                sources.push((INPUT_HISTOGRAM.to_owned(), Source::Input));
            }
        }
        sources.push(("margin".into(), Source::Margin));
        sources.push(("msp".into(), Source::Msp));
        if has_gate {
            sources.push(("gate_mismatch".into(), Source::GateMismatch));
        }
        let components: Vec<Planned> = sources
            .into_iter()
            .map(|(name, source)| Planned {
                table: calibration
                    .and_then(|c| c.tables.get(&name))
                    .map(|t| CleanTable::new(t.clone())),
                name: Arc::from(name),
                source,
            })
            .collect();
        let find = |name: &str| components.iter().position(|c| &*c.name == name);
        let Some(cal) = calibration else {
            // Uncalibrated, the verdict is the raw score [`super::score_name`] names.
            let name = super::score_name(false, has_gate, kind);
            let decider = find(name).map_or(Decider::Missing, Decider::Component);
            return Self {
                combined: Vec::new(),
                combiner: Combiner::default(),
                decider,
                class_thresholds: Vec::new(),
                threshold: None,
                components,
            };
        };
        let decider = match kind {
            ScoreKind::Combined => Decider::Combined,
            ScoreKind::GatedMahalanobis => cal
                .stages
                .last()
                .and_then(|s| find(&s.component_name()))
                .map_or(Decider::Missing, Decider::Component),
            other => find(other.name()).map_or(Decider::Missing, Decider::Component),
        };
        Self {
            combined: cal
                .combined_components
                .iter()
                .filter_map(|name| find(name))
                .collect(),
            combiner: cal.combiner,
            decider,
            class_thresholds: cal
                .class_thresholds
                .get(kind.name())
                .cloned()
                .unwrap_or_default(),
            threshold: cal.thresholds.get(kind.name()).copied(),
            components,
        }
    }

    /// The threshold for images predicted as `class`, as
    /// [`super::calibration::threshold`] gives it.
    pub fn threshold(&self, class: usize) -> Option<f64> {
        self.class_thresholds
            .get(class)
            .copied()
            .flatten()
            .or(self.threshold)
    }
}

/// A sorted table of clean scores, searched for p-values ([`super::scores::p_value`]) in two short
/// linear counts instead of one binary search: every [`STRIDE`]th score first, then the
/// stride the score falls in. The counts vectorise and have no chain of dependent loads; a
/// verdict's five binary searches over 2,500 scores were a sixth of its time.
#[derive(Debug, Clone)]
pub(super) struct CleanTable {
    sorted: Vec<f64>,
    /// `sorted[0]`, `sorted[STRIDE]`, `sorted[2·STRIDE]`, …
    marks: Vec<f64>,
}

/// Scores per stride of a [`CleanTable`].
const STRIDE: usize = 32;

impl CleanTable {
    pub fn new(sorted: Vec<f64>) -> Self {
        let marks = sorted.iter().step_by(STRIDE).copied().collect();
        Self { sorted, marks }
    }

    /// (1 + #{clean ≥ score}) / (n + 1), as [`super::scores::p_value`] defines it.
    pub fn p_value(&self, score: f64) -> f64 {
        // The clean scores below `score` are a prefix of the sorted table; the marks below it
        // say which stride that prefix ends in.
        let strides = self.marks.iter().filter(|&&m| m < score).count();
        let below = match strides.checked_sub(1) {
            None => 0,
            Some(last) => {
                let start = last * STRIDE;
                let stride = &self.sorted[start..(start + STRIDE).min(self.sorted.len())];
                start + stride.iter().filter(|&&c| c < score).count()
            }
        };
        let n = self.sorted.len();
        (1 + n - below) as f64 / (n + 1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::scores;

    #[test]
    fn a_clean_table_gives_the_defined_p_values() {
        // Tables shorter than, equal to and not a multiple of the stride, with ties that
        // straddle stride boundaries; scores on, between and beyond the table's values.
        for n in [0usize, 1, 5, STRIDE, STRIDE + 1, 3 * STRIDE, 100, 2500] {
            let mut sorted: Vec<f64> = (0..n).map(|i| ((i * 7) % 50) as f64 / 4.0).collect();
            sorted.sort_by(f64::total_cmp);
            let table = CleanTable::new(sorted.clone());
            let probes = (-4..60)
                .map(|i| f64::from(i) / 4.0)
                .chain((-4..60).map(|i| f64::from(i) / 4.0 + 0.1))
                .chain([f64::NEG_INFINITY, f64::INFINITY, f64::NAN, -0.0]);
            for score in probes {
                let want = scores::p_value(&sorted, score);
                assert_eq!(
                    table.p_value(score).to_bits(),
                    want.to_bits(),
                    "n {n} score {score}"
                );
            }
        }
    }
}
