//! The `csg-export` binary: export and inspect, including the gate heat-map.

mod common;

use std::path::Path;
use std::process::Command;

use common::ckpt;

fn csg_export(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_csg-export"))
        .args(args)
        .output()
        .expect("run csg-export");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn check_png(path: &Path) {
    let img = image::open(path).expect("PNG decodes");
    assert!(img.width() > 0 && img.height() > 0);
}

#[test]
fn export_then_inspect_a_csg_train_model() {
    let dir = tempfile::tempdir().unwrap();
    let net = ckpt::cnn(9, 3, true);
    let ckpt_path = dir.path().join("tiny.safetensors");
    let classes: Vec<String> = ["boot", "shirt", "bag"].map(String::from).to_vec();
    ckpt::write(
        &ckpt_path,
        &net.arch,
        &net.weights,
        &classes,
        &ckpt::input_spec(1, 12),
    );
    std::fs::write(
        dir.path().join("tiny.report.json"),
        r#"{"test_accuracy": 0.875}"#,
    )
    .unwrap();
    let onnx = dir.path().join("tiny.onnx");
    let (ok, stdout, stderr) = csg_export(&[
        "export",
        s(&ckpt_path),
        "-o",
        s(&onnx),
        "--stages",
        "1,2",
        "--feature-map",
        "--no-fold-bn",
        "--version",
        "3",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("cnn-4-6-8"), "{stdout}");

    let png = dir.path().join("gate.png");
    let (ok, stdout, stderr) = csg_export(&["inspect", s(&onnx), "--gate-png", s(&png)]);
    assert!(ok, "{stderr}");
    for word in [
        "boot, shirt, bag",
        "density",
        "K = 8",
        "uncalibrated",
        "test_accuracy 0.8750",
        "stage1_activations",
        "feature_map",
        "version 3",
        "filters/class",
    ] {
        assert!(
            stdout.contains(word),
            "inspect output lacks {word:?}:\n{stdout}"
        );
    }
    check_png(&png);

    let (ok, _, stderr) = csg_export(&["export", s(&ckpt_path), "-o", s(&onnx), "--stages", "3"]);
    assert!(!ok && stderr.contains("found 3"), "{stderr}");
}

#[test]
fn inspect_an_official_export() {
    let Some(dir) = common::fixtures_dir("inspect_an_official_export") else {
        return;
    };
    let out = tempfile::tempdir().unwrap();
    let onnx = out.path().join("r18.onnx");
    let ckpt = dir.join("resnet18-csg-official.pt");
    let (ok, stdout, stderr) = csg_export(&["export", s(&ckpt), "-o", s(&onnx)]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("K = 512"), "{stdout}");
    let png = out.path().join("gate.png");
    let (ok, stdout, stderr) = csg_export(&["inspect", s(&onnx), "--gate-png", s(&png)]);
    assert!(ok, "{stderr}");
    for word in [
        "bird, cat, dog, cow, horse, sheep",
        "density",
        "K = 512",
        "uncalibrated",
        "resnet-basic-2-2-2-2",
        "pytorch checkpoint resnet18-csg-official.pt",
    ] {
        assert!(
            stdout.contains(word),
            "inspect output lacks {word:?}:\n{stdout}"
        );
    }
    check_png(&png);

    // A baseline has no gate to draw, and says so.
    let bare = out.path().join("bare.onnx");
    let ckpt = dir.join("basic-narrow-std-bare.pt");
    let (ok, _, stderr) = csg_export(&["export", s(&ckpt), "-o", s(&bare), "--input-size", "32"]);
    assert!(ok, "{stderr}");
    let (ok, stdout, _) = csg_export(&["inspect", s(&bare)]);
    assert!(
        ok && stdout.contains("none (standard-trained baseline"),
        "{stdout}"
    );
    let (ok, _, stderr) = csg_export(&["inspect", s(&bare), "--gate-png", s(&png)]);
    assert!(!ok && stderr.contains("has no gate"), "{stderr}");
}
