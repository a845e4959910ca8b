//! The ONNX format's own model checker (Python `onnx`, when installed) accepts our exports.

mod common;

use std::path::Path;
use std::process::Command;

use csg_bundle::BlockKind;
use csg_export::{ExportOptions, export};

const CHECK: &str = "import onnx, sys; onnx.checker.check_model(sys.argv[1], full_check=True)";

fn onnx_available() -> bool {
    Command::new("python3")
        .args(["-c", "import onnx"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn check(path: &Path) {
    let out = Command::new("python3")
        .args(["-c", CHECK])
        .arg(path)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "onnx.checker rejected {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn onnx_checker_accepts_exports() {
    if !onnx_available() {
        println!(
            "SKIP onnx_checker_accepts_exports: python3 package `onnx` not importable (pip install onnx)"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let classes: Vec<String> = (0..4).map(|i| format!("c{i}")).collect();
    let net = common::ckpt::resnet(1, BlockKind::Basic, &[1, 1], &[4, 8], 4, true);
    let ckpt_path = dir.path().join("r.safetensors");
    common::ckpt::write(
        &ckpt_path,
        &net.arch,
        &net.weights,
        &classes,
        &common::ckpt::input_spec(3, 16),
    );
    for fold in [true, false] {
        let out = dir.path().join(format!("r-{fold}.onnx"));
        let options = ExportOptions {
            fold_bn: fold,
            feature_map: true,
            ..ExportOptions::default()
        };
        export(&ckpt_path, &out, &options).unwrap();
        check(&out);
    }
    if let Some(fixtures) = common::fixtures_dir("onnx_checker_accepts_exports (official)") {
        let out = dir.path().join("bottleneck.onnx");
        let options = ExportOptions {
            input_size: Some(64),
            feature_map: true,
            ..ExportOptions::default()
        };
        export(
            &fixtures.join("bottleneck-narrow-csg-official.pt"),
            &out,
            &options,
        )
        .unwrap();
        check(&out);
    }
}
