//! The shipped models: their ONNX bundles, run by ONNX Runtime on real Fashion-MNIST test
//! images, reproduce the trainer's own forward pass of the checkpoints they were exported from.

mod common;

use csg_train::burn::module::Module;
use csg_train::data::{self, Dataset};
use csg_train::{checkpoint, trainer};

const IMAGES: usize = 1000;

fn check(name: &str) {
    let models = common::workspace_root().join("models");
    let ckpt = models.join(format!("{name}.safetensors"));
    let onnx = models.join(format!("{name}.onnx"));
    assert!(onnx.is_file(), "{} is missing", onnx.display());

    let device = csg_train::device().inner();
    let (model, info) = checkpoint::load(&ckpt, &device).unwrap();
    let test = Dataset::load(&data::default_data_dir(), "t10k").unwrap();
    let test = test.select(&(0..IMAGES).collect::<Vec<_>>());
    let (mean, std) = (info.input.mean[0], info.input.std[0]);
    let burn_out = trainer::evaluate(&model.valid(), &test, mean, std, 250, &device);

    let input: Vec<f32> = data::to_floats(&test, &(0..IMAGES).collect::<Vec<_>>(), None)
        .into_iter()
        .map(|v| (v - mean) / std)
        .collect();
    let input = common::Array {
        shape: vec![IMAGES, 1, 28, 28],
        data: input,
    };
    let ort_out = common::run_model(&onnx, &input);
    let k = info.architecture.filters();
    let want_logits = common::Array {
        shape: vec![IMAGES, 10],
        data: burn_out.logits.clone(),
    };
    let want_acts = common::Array {
        shape: vec![IMAGES, k],
        data: burn_out.activations.clone(),
    };
    let dl = common::assert_close("logits", &ort_out["logits"], &want_logits, 1e-4);
    let da = common::assert_close("activations", &ort_out["activations"], &want_acts, 1e-4);
    assert_eq!(
        common::argmax_rows(&ort_out["logits"]),
        burn_out.predictions,
        "{name}: ONNX Runtime and burn disagree on a predicted class"
    );
    println!("{name}: {IMAGES} test images, max |Δlogits| {dl:.2e}, max |Δactivations| {da:.2e}");
}

#[test]
fn shipped_csg_model_matches_the_trainer() {
    check("fashion-csg");
}

#[test]
fn shipped_std_model_matches_the_trainer() {
    check("fashion-std");
}
