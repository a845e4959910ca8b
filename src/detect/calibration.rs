//! Evaluating a bundle's calibration section ([`csg_bundle::calibration`]): per-stage
//! distances, p-values, verdict scores and thresholds.

use csg_bundle::BundleMeta;
use csg_bundle::calibration::{CALIBRATION_VERSION, Calibration, StageMetric};

use super::scores;
use super::{Component, DetectError, ScoreKind};
pub use csg_bundle::score::stage_score;

/// Checks the section against the model it is stored in.
pub fn validate(cal: &Calibration, meta: &BundleMeta) -> Result<(), DetectError> {
    let bad = |why: String| Err(DetectError::Calibration(why));
    if cal.version != CALIBRATION_VERSION {
        return bad(format!(
            "version {} (this build reads {CALIBRATION_VERSION})",
            cal.version
        ));
    }
    let classes = meta.classes.len();
    let channels = meta.architecture.stage_channels();
    for stage in &cal.stages {
        if channels.get(stage.stage) != Some(&stage.channels) {
            return bad(format!(
                "stage {} has {} channels here, the model's stages have {channels:?}",
                stage.stage, stage.channels
            ));
        }
        if stage.means.len() != classes
            || stage.means.iter().any(|m| m.len() != stage.channels)
            || stage.std.len() != stage.channels
        {
            return bad(format!(
                "stage {} statistics have the wrong shape",
                stage.stage
            ));
        }
        let d = stage.channels;
        let ok = match &stage.metric {
            StageMetric::Full { precision } => precision.len() == d * d,
            StageMetric::Gated { classes: per } => {
                per.len() == classes
                    && per.iter().all(|g| {
                        g.filters.iter().all(|&k| k < d)
                            && g.precision.len() == g.filters.len() * g.filters.len()
                    })
            }
        };
        if !ok {
            return bad(format!(
                "stage {} precision has the wrong shape",
                stage.stage
            ));
        }
    }
    if cal.stages.is_empty() {
        return bad("no stage statistics".into());
    }
    Ok(())
}

/// p-value of a component's score, if the component has a clean table.
pub fn p_value(cal: &Calibration, component: &str, score: f64) -> Option<f64> {
    cal.tables
        .get(component)
        .map(|table| scores::p_value(table, score))
}

/// The verdict score of `kind` from computed components.
pub fn verdict_score(cal: &Calibration, kind: ScoreKind, components: &[Component]) -> f64 {
    let find = |name: &str| components.iter().find(|c| c.name == name);
    match kind {
        ScoreKind::Combined => {
            let ps: Vec<f64> = cal
                .combined_components
                .iter()
                .filter_map(|name| find(name).and_then(|c| c.p_value))
                .collect();
            scores::min_p_combination(&ps)
        }
        ScoreKind::GatedMahalanobis => cal
            .stages
            .last()
            .and_then(|s| find(&s.component_name()))
            .map_or(f64::NAN, |c| c.score),
        other => find(other.name()).map_or(f64::NAN, |c| c.score),
    }
}

/// Threshold for `kind`, per class where calibrated per class, else global.
pub fn threshold(cal: &Calibration, kind: ScoreKind, class: usize) -> Option<f64> {
    cal.class_thresholds
        .get(kind.name())
        .and_then(|per| per.get(class).copied().flatten())
        .or_else(|| cal.thresholds.get(kind.name()).copied())
}
