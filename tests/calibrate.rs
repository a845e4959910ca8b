//! `csgd calibrate` and `csgd eval` as a user runs them: the binary on a copy of the shipped
//! model and the real Fashion-MNIST validation and test images.

mod common;

use std::process::Command;

fn csgd(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_csgd"))
        .args(args)
        .env("ORT_DYLIB_PATH", common::ort_library())
        .current_dir(common::repo())
        .output()
        .expect("csgd runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn calibration_is_written_and_holds_its_false_positive_rate_on_test_images() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m.onnx");
    std::fs::copy(common::model_path(), &model).unwrap();
    let model_arg = model.to_str().unwrap();

    let (ok, text) = csgd(&["calibrate", model_arg, "--fpr", "0.1", "--per-class"]);
    assert!(ok, "{text}");
    assert!(text.contains("threshold combined"), "{text}");
    let meta = csg_bundle::onnx::read_meta(&model).unwrap();
    let cal = meta.calibration.expect("calibrated");
    assert_eq!(cal.fpr, 0.1);
    assert_eq!((cal.fit_images, cal.table_images), (2500, 2500));
    // By default the gated stage's GAP alone, with the margin and the input histogram, the
    // p-values combined by their harmonic mean.
    use csg_bundle::calibration::{Combiner, StageFeatures};
    assert_eq!(cal.stages.len(), 1, "the gated stage");
    assert_eq!(cal.stages[0].features, StageFeatures::Mean);
    assert_eq!(cal.stages[0].output, "activations");
    assert_eq!(cal.combiner, Combiner::HarmonicMean);
    // The input's 32-bin pixel histogram is fitted and combined too, with a clean table.
    use csg_bundle::calibration::INPUT_HISTOGRAM;
    let input = cal.input.as_ref().expect("input statistics");
    assert_eq!((input.bins, input.means.len()), (32, 10));
    assert_eq!(input.precision.len(), 32 * 32);
    assert!(cal.combined_components.iter().any(|c| c == INPUT_HISTOGRAM));
    assert_eq!(cal.tables[INPUT_HISTOGRAM].len(), 2500);
    assert!(cal.thresholds["combined"].is_finite());
    let per_class = &cal.class_thresholds["combined"];
    assert_eq!(per_class.len(), 10);
    assert!(per_class.iter().any(Option::is_some));
    // Only the metadata changed: the file still serves.
    let (ok, text) = csgd(&["calibrate", model_arg, "--stages", "9"]);
    assert!(!ok && text.contains("stage 9"), "{text}");

    // Thresholds come from validation data; on unseen clean test images the share flagged
    // must stay near the target.
    let out = dir.path().join("eval");
    let run = format!("csg={model_arg}:");
    let (ok, text) = csgd(&[
        "eval",
        "--run",
        &run,
        "--clean-images",
        "3000",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
    let realised = results[0]["realised_fpr"]["combined"]["5%"]
        .as_f64()
        .unwrap();
    println!("clean test images flagged at the 5% validation threshold: {realised:.4}");
    assert!((0.02..=0.08).contains(&realised), "realised FPR {realised}");
    let accuracy = results[0]["clean_accuracy"].as_f64().unwrap();
    assert!(accuracy >= common::min_accuracy(), "accuracy {accuracy}");

    // Stage 2 on request, described by its map's spatial statistics; the gated stage stays
    // GAP-only.
    let (ok, text) = csgd(&["calibrate", model_arg, "--stages", "2"]);
    assert!(ok, "{text}");
    let cal = csg_bundle::onnx::read_meta(&model)
        .unwrap()
        .calibration
        .expect("calibrated");
    assert_eq!(cal.stages.len(), 2, "stage 2 and the gated stage");
    assert_eq!(cal.stages[0].features, StageFeatures::MeanStdOccupancy);
    assert_eq!(cal.stages[0].map_output.as_deref(), Some("stage2_map"));
    assert_eq!(cal.stages[0].means[0].len(), 3 * cal.stages[0].channels);
    assert_eq!(cal.stages[1].features, StageFeatures::Mean);
    assert!(
        cal.combined_components
            .iter()
            .any(|c| c == "stage2_mahalanobis")
    );

    // The earliest design stays available: stage 2's GAP, smallest p-value, no histogram.
    let (ok, text) = csgd(&[
        "calibrate",
        model_arg,
        "--stages",
        "2",
        "--no-spatial",
        "--combiner",
        "min-p",
        "--input-bins",
        "0",
    ]);
    assert!(ok, "{text}");
    let cal = csg_bundle::onnx::read_meta(&model)
        .unwrap()
        .calibration
        .expect("calibrated");
    assert_eq!(cal.stages[0].features, StageFeatures::Mean);
    assert_eq!(cal.stages[0].map_output, None);
    assert_eq!(cal.combiner, Combiner::MinP);
    assert!(cal.input.is_none());
    assert!(!cal.combined_components.iter().any(|c| c == INPUT_HISTOGRAM));
    let (ok, text) = csgd(&["calibrate", model_arg, "--input-bins", "300"]);
    assert!(!ok && text.contains("at most 256 bins"), "{text}");
}

#[test]
fn calibrating_a_missing_model_is_a_clear_error() {
    let (ok, text) = csgd(&["calibrate", "/nonexistent/model.onnx"]);
    assert!(!ok);
    assert!(text.contains("/nonexistent/model.onnx"), "{text}");
}
