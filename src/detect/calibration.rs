//! Evaluating a bundle's calibration section ([`csg_bundle::calibration`]): per-stage
//! distances, p-values, verdict scores and thresholds.

use csg_bundle::BundleMeta;
use csg_bundle::calibration::{
    CALIBRATION_VERSION, Calibration, OLDEST_CALIBRATION_VERSION, StageFeatures, StageMetric,
};

use super::scores;
use super::{Component, DetectError, ScoreKind};

/// Checks the section against the model it is stored in.
pub fn validate(cal: &Calibration, meta: &BundleMeta) -> Result<(), DetectError> {
    let bad = |why: String| Err(DetectError::Calibration(why));
    if !(OLDEST_CALIBRATION_VERSION..=CALIBRATION_VERSION).contains(&cal.version) {
        return bad(format!(
            "version {} (this build reads {OLDEST_CALIBRATION_VERSION} to {CALIBRATION_VERSION})",
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
        let d = stage.dim();
        if stage.features == StageFeatures::MeanStdOccupancy {
            let declared = meta
                .outputs
                .stages
                .iter()
                .any(|o| o.stage == stage.stage && o.map == stage.map_output);
            if stage.map_output.is_none() || !declared {
                return bad(format!(
                    "stage {} uses spatial statistics, but the model declares no feature map \
                     output {:?} for them",
                    stage.stage + 1,
                    stage.map_output.as_deref().unwrap_or("")
                ));
            }
        }
        if stage.means.len() != classes
            || stage.means.iter().any(|m| m.len() != d)
            || stage.std.len() != d
        {
            return bad(format!(
                "stage {} statistics have the wrong shape",
                stage.stage
            ));
        }
        let ok = match &stage.metric {
            StageMetric::Full { precision } => precision.len() == d * d,
            StageMetric::Gated { classes: per } => {
                stage.features == StageFeatures::Mean
                    && per.len() == classes
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
    if let Some(input) = cal.input.as_ref().filter(|input| !input.fits(classes)) {
        return bad(format!(
            "the input histogram's statistics ({} bins) have the wrong shape",
            input.bins
        ));
    }
    match cal.stages.last() {
        None => return bad("no stage statistics".into()),
        // The detector reads the gated activations (gate mismatch, top filters) there.
        Some(last) if last.features != StageFeatures::Mean => {
            return bad("the gated (last) stage must be read by its GAP alone".into());
        }
        Some(_) => {}
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
    let find = |name: &str| components.iter().find(|c| &*c.name == name);
    match kind {
        ScoreKind::Combined => {
            let ps: Vec<f64> = cal
                .combined_components
                .iter()
                .filter_map(|name| find(name).and_then(|c| c.p_value))
                .collect();
            scores::combine(cal.combiner, &ps)
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use csg_bundle::calibration::{Combiner, INPUT_HISTOGRAM};

    use super::*;
    use crate::detect::{Detector, Sample, ScoreKind};

    fn shipped() -> BundleMeta {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/fashion-csg.onnx");
        csg_bundle::onnx::read_meta(&path).expect("the shipped model's metadata")
    }

    /// The shipped bundle as `csgd calibrate --stages 2` writes it: a stage-2 component read
    /// through the map's spatial statistics before the gated stage (constructed statistics:
    /// class means of distinct values, an identity precision, a table of clean scores).
    fn with_stage_two(mut meta: BundleMeta) -> BundleMeta {
        let output = meta.outputs.stages.iter().find(|s| s.stage == 1).cloned();
        let output = output.expect("the shipped model exports stage 2");
        let c = output.channels;
        let d = 3 * c;
        let stats = csg_bundle::calibration::StageStats {
            output: output.name.clone(),
            map_output: output.map.clone(),
            stage: 1,
            channels: c,
            features: StageFeatures::MeanStdOccupancy,
            means: (0..meta.classes.len())
                .map(|class| (0..d).map(|k| (class * d + k) as f32 * 1e-3).collect())
                .collect(),
            std: vec![1.0; d],
            metric: StageMetric::Full {
                precision: (0..d * d)
                    .map(|i| if i / d == i % d { 1.0 } else { 0.0 })
                    .collect(),
            },
        };
        let cal = meta.calibration.as_mut().expect("calibrated");
        let name = stats.component_name();
        cal.tables.insert(
            name.clone(),
            (0..100).map(|i| f64::from(i) / 50.0).collect(),
        );
        cal.combined_components.push(name);
        cal.stages.insert(0, stats);
        meta
    }

    #[test]
    fn a_detector_reads_stage_two_with_its_map_statistics() {
        let meta = with_stage_two(shipped());
        let cal = meta.calibration.clone().expect("calibrated");
        assert_eq!(cal.combiner, Combiner::HarmonicMean);
        let detector = Detector::new(&meta, ScoreKind::Combined).unwrap();
        // Stage 2 is read through its map alone: its means are the GAP, so the model's GAP
        // output of that stage is not fetched.
        assert_eq!(detector.stage_outputs(), ["stage2_map", "activations"]);
        // A constructed 14×14 map: channel k is k/10 on its left half, 0 elsewhere.
        let stage2 = &cal.stages[0];
        let c = stage2.channels;
        let map: Vec<f32> = (0..c * 196)
            .map(|i| {
                let (k, pos) = (i / 196, i % 196);
                if pos % 14 < 7 { k as f32 / 10.0 } else { 0.0 }
            })
            .collect();
        let gated = cal.stages[1].means[0].clone();
        let mut logits = vec![0.0f32; 10];
        logits[3] = 5.0;
        // The map reaches the detector as its statistics, reduced per image.
        assert_eq!(detector.map_channels(), [Some(c), None]);
        let mut outputs = vec![
            ndarray::Array2::from_shape_vec((1, c * 196), map.clone()).unwrap(),
            ndarray::Array2::from_shape_vec((1, gated.len()), gated.clone()).unwrap(),
        ];
        detector.reduce_maps(&mut outputs).unwrap();
        let reduced = outputs[0].row(0).to_vec();
        // Stage 2 is scored on the map's mean (k/20), std (k/20) and share above zero (one
        // half, none for channel 0).
        let half: Vec<f32> = (0..c).map(|k| k as f32 / 20.0).collect();
        let share: Vec<f32> = (0..c).map(|k| if k == 0 { 0.0 } else { 0.5 }).collect();
        let features = [half.clone(), half, share].concat();
        assert_eq!(reduced.len(), features.len());
        for (got, want) in reduced.iter().zip(&features) {
            assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        }
        let sample = Sample {
            logits: &logits,
            stages: vec![&reduced, &gated],
            input: None,
        };
        // The dense definition, from the stored precision; the detector uses its factor.
        let StageMetric::Full { precision } = &stage2.metric else {
            panic!("stage 2 has a full metric");
        };
        let want = csg_bundle::score::log_mahalanobis(&features, &stage2.means[3], precision, None);
        let raw = detector.raw_scores(&sample);
        let got = raw
            .iter()
            .find(|(n, _)| n == "stage2_mahalanobis")
            .unwrap()
            .1;
        assert!((got - want).abs() < 1e-4, "{got} vs {want}");
        // A sample without the map's statistics, or with the unreduced map, cannot be
        // scored: NaN, not a panic or a guess.
        for stages in [vec![], vec![&map[..], &gated[..]]] {
            let short = Sample {
                logits: &logits,
                stages,
                input: None,
            };
            let raw = detector.raw_scores(&short);
            assert!(
                raw.iter()
                    .any(|(n, s)| n == "stage2_mahalanobis" && s.is_nan())
            );
        }
        // A map that does not split into the stage's channels is refused with a reason.
        let mut odd = vec![ndarray::Array2::<f32>::zeros((1, c * 196 + 1))];
        let err = detector.reduce_maps(&mut odd).unwrap_err().to_string();
        assert!(err.contains("channels"), "{err}");
    }

    #[test]
    fn the_shipped_detector_scores_the_input_s_pixel_histogram() {
        let meta = shipped();
        let cal = meta.calibration.clone().expect("calibrated");
        let stats = cal
            .input
            .clone()
            .expect("the shipped calibration reads the input");
        assert!(cal.combined_components.iter().any(|c| c == INPUT_HISTOGRAM));
        let detector = Detector::new(&meta, ScoreKind::Combined).unwrap();
        assert_eq!(
            detector.pixel_histogram().map(|h| h.bins()),
            Some(stats.bins)
        );
        // A black image with a faint (0.1) pixel every fourth position, as FGSM's noise on a
        // background; normalised as the daemon's preprocessing does.
        let spec = &meta.input;
        let pixels: Vec<f32> = (0..spec.len())
            .map(|i| if i % 4 == 0 { 0.1 } else { 0.0 })
            .collect();
        let image: Vec<f32> = pixels
            .iter()
            .map(|p| (p - spec.mean[0]) / spec.std[0])
            .collect();
        let batch = ndarray::Array2::from_shape_vec((1, image.len()), image).unwrap();
        let histogram = detector.input_histograms(batch.view()).unwrap().unwrap();
        let histogram = histogram.row(0).to_vec();
        // A quarter of the pixels in 0.1's bin, the rest in the first.
        let faint = (0.1 * stats.bins as f32) as usize;
        assert_eq!((histogram[0], histogram[faint]), (0.75, 0.25));
        let mut logits = vec![0.0f32; 10];
        logits[3] = 5.0;
        // The shipped detector reads the gated stage's GAP alone, then the histogram.
        assert_eq!(detector.stage_outputs(), ["activations"]);
        let gated = cal.stages[0].means[3].clone();
        let rows = vec![logits.clone(), gated, histogram.clone()];
        let sample = detector.sample(&rows).unwrap();
        let raw = detector.raw_scores(&sample);
        let got = raw.iter().find(|(n, _)| n == INPUT_HISTOGRAM).unwrap().1;
        let want =
            csg_bundle::score::log_mahalanobis(&histogram, &stats.means[3], &stats.precision, None);
        assert!((got - want).abs() < 1e-4, "{got} vs {want}");
        // Far from a clean image of the class: in the clean table's top 1 %, where the class
        // mean itself is at distance 0.
        let p = p_value(&cal, INPUT_HISTOGRAM, got).unwrap();
        assert!(p < 0.01, "p {p}");
        let clean_rows = vec![rows[0].clone(), rows[1].clone(), stats.means[3].clone()];
        let clean = detector.raw_scores(&detector.sample(&clean_rows).unwrap());
        let at_mean = clean.iter().find(|(n, _)| n == INPUT_HISTOGRAM).unwrap().1;
        assert!(at_mean < got - 5.0, "{at_mean} vs {got}");
        // Rows that do not follow the detector's layout are refused.
        assert!(detector.sample(&rows[..2]).is_err());
        // An image of the wrong size gives no histogram.
        let short = ndarray::Array2::<f32>::zeros((1, 10));
        assert!(detector.input_histograms(short.view()).unwrap().is_err());
    }

    #[test]
    fn a_verdict_lists_the_five_gated_filters_furthest_from_their_clean_means() {
        let meta = shipped();
        let detector = Detector::new(&meta, ScoreKind::Combined).unwrap();
        let gate = detector.gate().unwrap().clone();
        let stats = detector.gated_stats().unwrap().clone();
        for class in [0, 3, 9] {
            let mut logits = vec![0.0f32; 10];
            logits[class] = 4.0;
            // Scattered activations, then every filter at its clean mean (all z tied at 0,
            // so the order falls back to the filter index).
            let scattered: Vec<f32> = (0..gate.filters)
                .map(|k| ((k * 37 % 101) as f32) / 25.0)
                .collect();
            let at_mean = stats.means[class].clone();
            for acts in [scattered, at_mean] {
                let sample = Sample {
                    logits: &logits,
                    stages: vec![&acts],
                    input: None,
                };
                let verdict = detector.judge(&sample);
                let all = crate::detect::gated_deviations(&gate, &acts, Some(&stats), class);
                assert!(
                    all.len() > 5,
                    "class {class} has {} gated filters",
                    all.len()
                );
                assert_eq!(verdict.top_filters, all[..5], "class {class}");
            }
        }
    }

    /// The verdict's prepared recipe (plan, p-value tables, thresholds per class) against the
    /// calibration's definitions by component name, which calibration and eval use.
    #[test]
    fn a_verdict_agrees_with_the_calibration_s_definitions() {
        for meta in [shipped(), with_stage_two(shipped())] {
            let cal = meta.calibration.clone().expect("calibrated");
            let bins = cal.input.as_ref().map_or(0, |i| i.bins);
            for kind in ScoreKind::ALL {
                let detector = Detector::new(&meta, kind).unwrap();
                for (i, class) in [0usize, 3, 7, 9].into_iter().enumerate() {
                    // Logits from confident to near a tie; each stage's class mean pulled
                    // further away each round, and a histogram with more faint pixels.
                    let mut logits: Vec<f32> = (0..10).map(|k| (k as f32 * 0.3).sin()).collect();
                    logits[class] += 4.0 / (i + 1) as f32;
                    let shift = i as f32 * 0.05;
                    let stages: Vec<Vec<f32>> = cal
                        .stages
                        .iter()
                        .map(|s| {
                            let mean = &s.means[class];
                            let wave = |k: usize| shift * ((k * 13 % 7) as f32 - 3.0);
                            mean.iter().enumerate().map(|(k, m)| m + wave(k)).collect()
                        })
                        .collect();
                    let mut histogram = vec![0.0f32; bins];
                    if bins > 0 {
                        histogram[0] = 1.0 - shift;
                        histogram[bins / 8] = shift;
                    }
                    let sample = Sample {
                        logits: &logits,
                        stages: stages.iter().map(Vec::as_slice).collect(),
                        input: (bins > 0).then_some(histogram.as_slice()),
                    };
                    let verdict = detector.judge(&sample);
                    let components = detector.components(&detector.raw_scores(&sample));
                    assert_eq!(verdict.components, components);
                    for c in &verdict.components {
                        assert!(c.score.is_finite(), "{kind:?} {c:?}");
                        assert_eq!(c.p_value, p_value(&cal, &c.name, c.score));
                    }
                    let want = verdict_score(&cal, kind, &components);
                    assert_eq!(
                        verdict.score.to_bits(),
                        want.to_bits(),
                        "{kind:?} class {class}"
                    );
                    assert_eq!(verdict.threshold, threshold(&cal, kind, verdict.class_id));
                    assert_eq!(verdict.class_id, class);
                }
            }
        }
        // Uncalibrated, the verdict is the raw score its name says, with no threshold.
        let mut meta = shipped();
        meta.calibration = None;
        for kind in [ScoreKind::Combined, ScoreKind::Msp, ScoreKind::GateMismatch] {
            let detector = Detector::new(&meta, kind).unwrap();
            let logits: Vec<f32> = (0..10).map(|k| (k as f32 * 0.7).cos()).collect();
            let acts: Vec<f32> = (0..128).map(|k| (k % 5) as f32).collect();
            let sample = Sample {
                logits: &logits,
                stages: vec![&acts],
                input: None,
            };
            let verdict = detector.judge(&sample);
            let name = detector.score_name();
            let raw = detector.raw_scores(&sample);
            let want = raw.iter().find(|(n, _)| n == name).unwrap().1;
            assert_eq!((verdict.score, verdict.threshold), (want, None), "{kind:?}");
            assert!(verdict.components.iter().all(|c| c.p_value.is_none()));
        }
    }

    #[test]
    fn validation_refuses_spatial_features_the_model_cannot_produce() {
        let meta = with_stage_two(shipped());
        let cal = meta.calibration.clone().expect("calibrated");
        assert!(validate(&cal, &meta).is_ok());

        let mut missing = cal.clone();
        missing.stages[0].map_output = Some("stage2_nowhere".into());
        let err = validate(&missing, &meta).unwrap_err().to_string();
        assert!(err.contains("stage2_nowhere"), "{err}");

        let mut gated = cal.clone();
        let last = gated.stages.len() - 1;
        gated.stages[last].features = StageFeatures::MeanStdOccupancy;
        assert!(validate(&gated, &meta).is_err());

        let mut bins = cal.clone();
        if let Some(input) = &mut bins.input {
            input.precision.pop();
        }
        let err = validate(&bins, &meta).unwrap_err().to_string();
        assert!(err.contains("input histogram"), "{err}");

        let mut future = cal.clone();
        future.version = CALIBRATION_VERSION + 1;
        assert!(
            validate(&future, &meta)
                .unwrap_err()
                .to_string()
                .contains("version")
        );

        // A version-1 section (GAP features, min-p) is still read.
        let mut old = cal;
        old.version = OLDEST_CALIBRATION_VERSION;
        old.stages[0].features = StageFeatures::Mean;
        old.stages[0].map_output = None;
        let c = old.stages[0].channels;
        for mean in &mut old.stages[0].means {
            mean.truncate(c);
        }
        old.stages[0].std.truncate(c);
        old.stages[0].metric = csg_bundle::calibration::StageMetric::Full {
            precision: vec![0.0; c * c],
        };
        assert!(validate(&old, &meta).is_ok());
    }
}
