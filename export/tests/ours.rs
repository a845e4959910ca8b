//! csg-train checkpoints → ONNX, checked in ONNX Runtime against an independent forward pass.

mod common;

use std::path::Path;

use common::ckpt::{self, Net, Rng};
use common::reference::{self, Forward};
use common::{Array, assert_close, run_model};
use csg_bundle::BlockKind;
use csg_export::{ExportOptions, StageSelection, export};
use ndarray::Array4;

const TOL: f32 = 1e-4;

fn to_array(a: ndarray::ArrayView<f32, ndarray::IxDyn>) -> Array {
    Array {
        shape: a.shape().to_vec(),
        data: a.iter().copied().collect(),
    }
}

/// Exports `net`, runs it on random input and compares every output with the reference.
fn check(net: &Net, size: usize, forward: impl Fn(Array4<f32>) -> Forward, fold: bool) {
    let dir = tempfile::tempdir().unwrap();
    let ckpt_path = dir.path().join("net.safetensors");
    let classes: Vec<String> = (0..net.arch.classes).map(|i| format!("c{i}")).collect();
    let channels = net.arch.in_channels;
    ckpt::write(
        &ckpt_path,
        &net.arch,
        &net.weights,
        &classes,
        &ckpt::input_spec(channels, size),
    );
    std::fs::write(
        dir.path().join("net.report.json"),
        r#"{"test_accuracy": 0.9, "density": 0.2}"#,
    )
    .unwrap();
    let out = dir.path().join("net.onnx");
    let options = ExportOptions {
        fold_bn: fold,
        feature_map: true,
        stage_maps: Some(StageSelection::All),
        ..ExportOptions::default()
    };
    let done = export(&ckpt_path, &out, &options).unwrap();
    let meta = &done.meta;
    assert_eq!(meta.source.format, "csg-train");
    assert_eq!(meta.source.sha256.len(), 64);
    assert_eq!(meta.classes, classes);
    assert_eq!(meta.training.as_ref().unwrap()["test_accuracy"], 0.9);
    assert_eq!(meta.gate.is_some(), net.weights.contains_key("lmask.mask"));
    assert!(meta.calibration.is_none());
    assert_eq!(csg_bundle::onnx::read_meta(&out).unwrap(), *meta);

    let mut rng = Rng::new(7);
    let n = 2;
    let input = Array {
        shape: vec![n, channels, size, size],
        data: rng.vec(n * channels * size * size, -2.0, 2.0),
    };
    let x = Array4::from_shape_vec((n, channels, size, size), input.data.clone()).unwrap();
    let want = forward(x);
    let got = run_model(&out, &input);

    assert_close(
        "logits",
        &got["logits"],
        &to_array(want.logits.view().into_dyn()),
        TOL,
    );
    assert_close(
        "activations",
        &got["activations"],
        &to_array(want.activations.view().into_dyn()),
        TOL,
    );
    assert_close(
        "feature_map",
        &got["feature_map"],
        &to_array(want.feature_map.view().into_dyn()),
        TOL,
    );
    let earlier = want.stages.len() - 1;
    assert_eq!(meta.outputs.stages.len(), earlier);
    for (i, stage) in want.stages.iter().take(earlier).enumerate() {
        let name = csg_export::stage_output_name(i);
        assert_eq!(meta.outputs.stages[i].name, name);
        assert_close(&name, &got[&name], &to_array(stage.view().into_dyn()), TOL);
        let map = csg_export::stage_map_name(i);
        assert_eq!(meta.outputs.stages[i].map.as_deref(), Some(map.as_str()));
        assert_close(
            &map,
            &got[&map],
            &to_array(want.maps[i].view().into_dyn()),
            TOL,
        );
    }
    assert_eq!(
        common::argmax_rows(&got["logits"]),
        common::argmax_rows(&to_array(want.logits.view().into_dyn()))
    );
}

#[test]
fn cnn_matches_reference_folded_and_unfolded() {
    let net = ckpt::cnn(1, 3, true);
    for fold in [true, false] {
        check(
            &net,
            12,
            |x| reference::cnn(&net.weights, &[true, true, false], x, 1e-5),
            fold,
        );
    }
}

#[test]
fn small_resnet_basic_matches_reference() {
    let net = ckpt::resnet(2, BlockKind::Basic, &[1, 2], &[4, 8], 4, false);
    for fold in [true, false] {
        check(
            &net,
            10,
            |x| reference::resnet(&net.weights, &[1, 2], false, x, 1e-5),
            fold,
        );
    }
}

#[test]
fn small_resnet_bottleneck_matches_reference() {
    let net = ckpt::resnet(3, BlockKind::Bottleneck, &[1, 1], &[2, 4], 2, true);
    for fold in [true, false] {
        check(
            &net,
            8,
            |x| reference::resnet(&net.weights, &[1, 1], true, x, 1e-5),
            fold,
        );
    }
}

#[test]
fn stage_selection_and_overrides() {
    let net = ckpt::cnn(4, 3, true);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let classes: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
    ckpt::write(
        &path,
        &net.arch,
        &net.weights,
        &classes,
        &ckpt::input_spec(1, 12),
    );
    let out = dir.path().join("m.onnx");
    let options = ExportOptions {
        stages: StageSelection::List(vec![2]),
        classes: Some(["x", "y", "z"].map(String::from).to_vec()),
        name: Some("named".into()),
        version: Some("7".into()),
        input_size: Some(16),
        ..ExportOptions::default()
    };
    let meta = export(&path, &out, &options).unwrap().meta;
    assert_eq!(meta.name, "named");
    assert_eq!(meta.version, "7");
    assert_eq!(meta.classes, ["x", "y", "z"]);
    assert_eq!((meta.input.height, meta.input.width), (16, 16));
    assert!(meta.training.is_none());
    assert_eq!(meta.outputs.stages.len(), 1);
    assert_eq!(meta.outputs.stages[0].stage, 1);
    assert_eq!(meta.outputs.stages[0].name, "stage2_activations");
    let input = Array {
        shape: vec![1, 1, 16, 16],
        data: vec![0.5; 256],
    };
    let got = run_model(&out, &input);
    assert_eq!(got["stage2_activations"].shape, vec![1, 6]);
    assert!(!got.contains_key("stage1_activations") && !got.contains_key("feature_map"));
    // By default the detector's stage keeps its map: stage 2 of this 16×16 CNN, 6 channels
    // at 8×8 (after stage 1's pool).
    assert_eq!(meta.outputs.stages[0].map.as_deref(), Some("stage2_map"));
    assert_eq!(got["stage2_map"].shape, vec![1, 6, 8, 8]);
    // A map needs its stage's GAP too.
    let options = ExportOptions {
        stages: StageSelection::List(vec![2]),
        stage_maps: Some(StageSelection::List(vec![1])),
        ..ExportOptions::default()
    };
    let err = export(&path, &out, &options).unwrap_err().to_string();
    assert!(err.contains("--stages"), "{err}");

    // Calibration rewrites the metadata in place; the graph must still load and agree.
    let mut calibrated = meta.clone();
    calibrated.calibration = Some(csg_bundle::calibration::Calibration {
        thresholds: [("combined".to_string(), 4.2)].into(),
        ..Default::default()
    });
    csg_bundle::onnx::write_meta(&out, &calibrated).unwrap();
    assert_eq!(csg_bundle::onnx::read_meta(&out).unwrap(), calibrated);
    let again = run_model(&out, &input);
    assert_eq!(again["logits"].data, got["logits"].data);

    let bad = ExportOptions {
        classes: Some(vec!["only-one".into()]),
        ..ExportOptions::default()
    };
    let err = export(&path, &dir.path().join("bad.onnx"), &bad)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("expected 3 class names") && err.contains("found 1"),
        "{err}"
    );
    assert!(!Path::new(&dir.path().join("bad.onnx")).exists());
}
