//! Fitting a [`Calibration`] from a model's outputs on clean, labelled images.
//!
//! The clean images are split in two: the first part fits per-class means and shrunk
//! covariances, the second gives the clean score tables (p-values) and thresholds, so no table
//! score was computed on an image its own statistics were fitted on.

use std::collections::BTreeMap;

use csg_bundle::{BundleMeta, Gate};

use csg_bundle::calibration::{
    CALIBRATION_VERSION, Calibration, Combiner, GATED, GatedPrecision, INPUT_HISTOGRAM, InputStats,
    StageFeatures, StageMetric, StageStats,
};

pub use super::gaussian::tied_gaussian;
use super::gaussian::{class_means_and_covariance, invert, shrink};
use super::{DetectError, Detector, ScoreKind, calibration, scores};

/// Model outputs on a set of labelled clean images.
#[derive(Debug, Clone, Default)]
pub struct CleanOutputs {
    pub labels: Vec<usize>,
    /// [N, C] row-major.
    pub logits: Vec<f32>,
    /// Per stage read by the detector, in [`Detector::stage_outputs`] order: its GAP, or its
    /// map's statistics where they are used; the gated stage last.
    pub stages: Vec<StageData>,
    /// Each image's pixel histogram ([`csg_bundle::score::pixel_histogram`]), [N, bins]
    /// row-major, where the calibration fits the input's statistics (`bins` > 0).
    pub histograms: Vec<f32>,
    pub bins: usize,
}

/// A stage calibration reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageRead {
    /// The stage's GAP output.
    pub output: String,
    /// Its feature map, read instead of the GAP where spatial statistics are used (their
    /// means are the GAP).
    pub map: Option<String>,
    /// 0-based stage it describes.
    pub stage: usize,
    /// The stage's channels.
    pub channels: usize,
}

impl StageRead {
    /// The model output fetched for this stage.
    pub fn fetched(&self) -> &str {
        self.map.as_deref().unwrap_or(&self.output)
    }
}

/// One stage's features over a set of images; a feature map is kept as its statistics
/// ([`csg_bundle::score::spatial_features`]), not whole.
#[derive(Debug, Clone, Default)]
pub struct StageData {
    /// The stage's GAP output.
    pub output: String,
    /// 0-based stage it describes.
    pub stage: usize,
    /// Values per image.
    pub channels: usize,
    /// [N, channels] row-major.
    pub values: Vec<f32>,
    /// The feature map and its channels, when the stage is read through its map (reduced to
    /// its statistics as it is pushed).
    pub map: Option<(String, usize)>,
}

impl StageData {
    /// What the rows describe, for messages: "stage 2".
    pub(super) fn name(&self) -> String {
        format!("stage {}", self.stage + 1)
    }

    /// Image `i`'s row.
    pub(super) fn row(&self, i: usize) -> &[f32] {
        &self.values[i * self.channels..(i + 1) * self.channels]
    }

    /// Appends one image's output (a feature map's spatial statistics for a map).
    pub fn push_image(&mut self, values: &[f32]) -> Result<(), DetectError> {
        let kept = match &self.map {
            Some((_, c)) => csg_bundle::score::spatial_features(values, *c),
            None => Some(values.to_vec()),
        };
        match kept {
            Some(v) if v.len() == self.channels => {
                self.values.extend(v);
                Ok(())
            }
            _ => Err(DetectError::Calibration(format!(
                "output {} gave {} values per image, expected {}",
                self.map.as_ref().map_or(&self.output, |(name, _)| name),
                values.len(),
                match &self.map {
                    Some((_, c)) => format!("a map of {c} channels"),
                    None => self.channels.to_string(),
                }
            ))),
        }
    }
}

impl CleanOutputs {
    /// No images yet, with one empty [`StageData`] per output read.
    pub fn for_stages(reads: &[StageRead]) -> Self {
        Self {
            labels: Vec::new(),
            logits: Vec::new(),
            histograms: Vec::new(),
            bins: 0,
            stages: reads
                .iter()
                .map(|read| StageData {
                    output: read.output.clone(),
                    stage: read.stage,
                    channels: match read.map {
                        Some(_) => StageFeatures::MeanStdOccupancy.width() * read.channels,
                        None => read.channels,
                    },
                    values: Vec::new(),
                    map: read.map.clone().map(|name| (name, read.channels)),
                })
                .collect(),
        }
    }

    /// Checks that every stage holds a row per image.
    fn check_rows(&self) -> Result<(), DetectError> {
        let n = self.len();
        for data in &self.stages {
            if data.values.len() != n * data.channels {
                return Err(DetectError::Calibration(format!(
                    "output {} holds {} values for {n} images of {} each",
                    data.output,
                    data.values.len(),
                    data.channels
                )));
            }
        }
        if self.bins > 0 && self.histograms.len() != n * self.bins {
            return Err(DetectError::Calibration(format!(
                "{} pixel-histogram values for {n} images of {} bins",
                self.histograms.len(),
                self.bins
            )));
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    fn classes(&self) -> usize {
        self.logits.len() / self.len().max(1)
    }

    fn histogram(&self, i: usize) -> Option<&[f32]> {
        (self.bins > 0).then(|| &self.histograms[i * self.bins..(i + 1) * self.bins])
    }

    fn predicted(&self, i: usize) -> usize {
        let c = self.classes();
        scores::top_class(&self.logits[i * c..(i + 1) * c]).0
    }
}

/// Calibration options.
#[derive(Debug, Clone)]
pub struct FitOptions {
    /// Target false-positive rate.
    pub fpr: f64,
    /// Shrinkage of each covariance toward (trace/d)·I.
    pub shrinkage: f64,
    /// Also set thresholds per predicted class, where a class has enough table images.
    pub per_class: bool,
    /// Share of filters each class gets in an empirical gate (standard models).
    pub empirical_share: f64,
    /// How the combined score merges its components' p-values.
    pub combiner: Combiner,
    /// Description of the data, stored in the section.
    pub data: String,
}

impl Default for FitOptions {
    fn default() -> Self {
        Self {
            fpr: 0.05,
            shrinkage: 0.01,
            per_class: false,
            empirical_share: 0.2,
            combiner: Combiner::HarmonicMean,
            data: String::new(),
        }
    }
}

/// Fits the calibration of `meta`'s model from outputs on two disjoint clean sets.
pub fn fit(
    meta: &BundleMeta,
    fit_set: &CleanOutputs,
    table_set: &CleanOutputs,
    options: &FitOptions,
) -> Result<Calibration, DetectError> {
    let bad = |why: String| Err(DetectError::Calibration(why));
    if !(options.fpr > 0.0 && options.fpr < 1.0) {
        return bad(format!(
            "target FPR must lie in (0, 1), got {}",
            options.fpr
        ));
    }
    fit_set.check_rows()?;
    table_set.check_rows()?;
    let classes = meta.classes.len();
    let correct: Vec<usize> = (0..fit_set.len())
        .filter(|&i| fit_set.predicted(i) == fit_set.labels[i])
        .collect();
    for c in 0..classes {
        if !correct.iter().any(|&i| fit_set.labels[i] == c) {
            return bad(format!(
                "no correctly classified clean image of class {c} ({}) to fit its statistics",
                meta.classes[c]
            ));
        }
    }
    let Some(gated_stage) = fit_set.stages.last() else {
        return bad("no stage outputs to fit".into());
    };
    let empirical_gate = match &meta.gate {
        Some(_) => None,
        None => Some(empirical_gate(
            gated_stage,
            fit_set,
            &correct,
            classes,
            options,
        )),
    };
    let gate = meta.gate.as_ref().or(empirical_gate.as_ref()).cloned();

    let features = &fit_set.stages;
    let last = features.len() - 1;
    if features[last].map.is_some() {
        return bad("the gated (last) stage is read by its GAP alone".into());
    }
    let mut stages = Vec::new();
    for (s, data) in features.iter().enumerate() {
        let map_output = data.map.as_ref().map(|(name, _)| name.clone());
        let (means, cov) = class_means_and_covariance(data, &fit_set.labels, &correct, classes);
        let d = data.channels;
        let kind = match map_output {
            Some(_) => StageFeatures::MeanStdOccupancy,
            None => StageFeatures::Mean,
        };
        if d % kind.width() != 0 {
            return bad(format!(
                "stage {} has {d} feature values, not {} per channel",
                data.stage + 1,
                kind.width()
            ));
        }
        let cov = shrink(cov, options.shrinkage);
        let std = (0..d).map(|k| cov[(k, k)].sqrt() as f32).collect();
        let metric = match (&gate, s == last) {
            (Some(gate), true) => StageMetric::Gated {
                classes: (0..classes)
                    .map(|c| {
                        let filters: Vec<usize> =
                            (0..d).filter(|&k| gate.get(k, c) >= GATED).collect();
                        let sub = cov.select_rows(&filters).select_columns(&filters);
                        Ok(GatedPrecision {
                            precision: invert(sub, &data.name())?,
                            filters,
                        })
                    })
                    .collect::<Result<_, DetectError>>()?,
            },
            _ => StageMetric::Full {
                precision: invert(cov, &data.name())?,
            },
        };
        stages.push(StageStats {
            output: data.output.clone(),
            map_output,
            stage: data.stage,
            channels: d / kind.width(),
            features: kind,
            means,
            std,
            metric,
        });
    }

    let input = match fit_set.bins {
        0 => None,
        bins => {
            let data = StageData {
                output: "the input's pixel histogram".into(),
                channels: bins,
                values: fit_set.histograms.clone(),
                ..StageData::default()
            };
            let (means, cov) =
                class_means_and_covariance(&data, &fit_set.labels, &correct, classes);
            let cov = shrink(cov, options.shrinkage);
            Some(InputStats {
                bins,
                means,
                std: (0..bins).map(|k| cov[(k, k)].sqrt() as f32).collect(),
                precision: invert(cov, "the input's pixel histogram")?,
            })
        }
    };
    if table_set.bins != fit_set.bins {
        return bad(format!(
            "pixel histograms of {} bins to fit, of {} for the tables",
            fit_set.bins, table_set.bins
        ));
    }
    let mut calibration = Calibration {
        version: CALIBRATION_VERSION,
        fpr: options.fpr,
        data: options.data.clone(),
        fit_images: fit_set.len(),
        table_images: table_set.len(),
        empirical_gate,
        combined_components: stages
            .iter()
            .map(StageStats::component_name)
            .chain(["margin".to_string()])
            .chain(input.as_ref().map(|_| INPUT_HISTOGRAM.to_string()))
            .collect(),
        input,
        combiner: options.combiner,
        stages,
        tables: BTreeMap::new(),
        combined_table: Vec::new(),
        thresholds: BTreeMap::new(),
        class_thresholds: BTreeMap::new(),
    };

    // Score tables from the second set.
    let assemble = |calibration: &Calibration| {
        Detector::assemble(
            meta.classes.clone(),
            gate.clone(),
            Some(calibration.clone()),
            ScoreKind::Combined,
            Vec::new(),
            &meta.input,
        )
    };
    let detector = assemble(&calibration);
    let c = table_set.classes();
    let raw: Vec<Vec<(String, f64)>> = (0..table_set.len())
        .map(|i| {
            let rows: Vec<Option<&[f32]>> = table_set
                .stages
                .iter()
                .map(|data| Some(data.row(i)))
                .collect();
            let gated = table_set.stages.last().map(|data| data.row(i));
            detector.scores_of(
                &table_set.logits[i * c..(i + 1) * c],
                &rows,
                gated,
                table_set.histogram(i),
            )
        })
        .collect();
    let mut tables: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for row in &raw {
        for (name, score) in row {
            tables.entry(name.clone()).or_default().push(*score);
        }
    }
    for table in tables.values_mut() {
        table.sort_by(f64::total_cmp);
    }
    calibration.tables = tables;
    // Rebuilt with the tables, which the p-values read.
    let detector = assemble(&calibration);

    // Every verdict score on the table set, then thresholds at the target FPR.
    let predicted: Vec<usize> = (0..table_set.len())
        .map(|i| table_set.predicted(i))
        .collect();
    let mut verdict_scores: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
    for row in &raw {
        let components = detector.components(row);
        for kind in ScoreKind::ALL {
            let score = calibration::verdict_score(&calibration, kind, &components);
            if score.is_finite() {
                verdict_scores.entry(kind.name()).or_default().push(score);
            }
        }
    }
    let mut combined = verdict_scores
        .get(ScoreKind::Combined.name())
        .cloned()
        .unwrap_or_default();
    combined.sort_by(f64::total_cmp);
    calibration.combined_table = combined;
    let min_per_class = (10.0 / options.fpr).ceil() as usize;
    for (name, values) in &verdict_scores {
        calibration.thresholds.insert(
            name.to_string(),
            quantile_threshold(values.clone(), options.fpr),
        );
        if options.per_class {
            let per: Vec<Option<f64>> = (0..classes)
                .map(|c| {
                    let mine: Vec<f64> = values
                        .iter()
                        .zip(&predicted)
                        .filter(|(_, p)| **p == c)
                        .map(|(v, _)| *v)
                        .collect();
                    (mine.len() >= min_per_class).then(|| quantile_threshold(mine, options.fpr))
                })
                .collect();
            calibration.class_thresholds.insert(name.to_string(), per);
        }
    }
    Ok(calibration)
}

/// The smallest t with #{v > t} ≤ fpr·n: flags at most the target share of clean scores.
pub fn quantile_threshold(mut values: Vec<f64>, fpr: f64) -> f64 {
    if values.is_empty() {
        return f64::INFINITY;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let allowed = (fpr * n as f64).floor() as usize;
    values[n - 1 - allowed.min(n - 1)]
}

/// Each class's top filters by clean mean activation, as a binary gate.
fn empirical_gate(
    stage: &StageData,
    outputs: &CleanOutputs,
    correct: &[usize],
    classes: usize,
    options: &FitOptions,
) -> Gate {
    let d = stage.channels;
    let (means, _) = class_means_and_covariance(stage, &outputs.labels, correct, classes);
    let top = ((options.empirical_share * d as f64).round() as usize).clamp(1, d);
    let mut values = vec![0.0f32; d * classes];
    for (c, mean) in means.iter().enumerate() {
        let mut order: Vec<usize> = (0..d).collect();
        order.sort_by(|&a, &b| mean[b].total_cmp(&mean[a]));
        for &k in &order[..top] {
            values[k * classes + c] = 1.0;
        }
    }
    Gate {
        filters: d,
        classes,
        values,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threshold_flags_at_most_the_target_share() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        let t = quantile_threshold(values.clone(), 0.05);
        assert_eq!(t, 95.0);
        assert_eq!(values.iter().filter(|&&v| v > t).count(), 5);
        assert_eq!(quantile_threshold(vec![1.0], 0.05), 1.0);
    }

    #[test]
    fn a_map_is_kept_as_its_statistics_and_short_rows_are_refused() {
        // 2 channels of 2 positions: each channel's mean, then std, then share above zero.
        let read = StageRead {
            output: "gap".into(),
            map: Some("map".into()),
            stage: 1,
            channels: 2,
        };
        assert_eq!(read.fetched(), "map");
        let mut outputs = CleanOutputs {
            labels: vec![0],
            logits: vec![1.0, 0.0],
            ..CleanOutputs::for_stages(&[read])
        };
        let map = &mut outputs.stages[0];
        assert_eq!(map.channels, 6);
        map.push_image(&[0.0, 2.0, 3.0, 3.0]).unwrap();
        assert_eq!(map.values, vec![1.0, 3.0, 1.0, 0.0, 0.5, 1.0]);
        let err = map.push_image(&[1.0, 2.0, 3.0]).unwrap_err().to_string();
        assert!(err.contains("output map gave 3 values"), "{err}");
        assert!(outputs.check_rows().is_ok());
        outputs.stages[0].values.pop();
        assert!(outputs.check_rows().is_err());
    }

    #[test]
    fn empirical_gate_picks_each_class_top_filters() {
        // Three filters, two classes; class 0 fires filter 2 most, class 1 filter 0.
        let stage = StageData {
            output: "a".into(),
            stage: 0,
            channels: 3,
            values: vec![0.0, 1.0, 5.0, 6.0, 1.0, 0.0],
            map: None,
        };
        let outputs = CleanOutputs {
            labels: vec![0, 1],
            logits: vec![1.0, 0.0, 0.0, 1.0],
            stages: vec![stage.clone()],
            ..CleanOutputs::default()
        };
        let options = FitOptions {
            empirical_share: 0.34,
            ..FitOptions::default()
        };
        let gate = empirical_gate(&stage, &outputs, &[0, 1], 2, &options);
        assert_eq!(gate.column(0), vec![0.0, 0.0, 1.0]);
        assert_eq!(gate.column(1), vec![1.0, 0.0, 0.0]);
    }
}
