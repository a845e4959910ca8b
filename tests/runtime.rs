//! The blocking runtime API (`csgd::runtime::Model`) that `csgd serve` and `csgd calibrate`
//! share, against the test model.

mod common;

use csgd::config::RuntimeConfig;
use csgd::runtime::Model;
use ndarray::Array4;

fn cfg() -> RuntimeConfig {
    RuntimeConfig {
        ort_library: common::ort_library().display().to_string(),
        intra_op_threads: 1,
        ..RuntimeConfig::default()
    }
}

fn batch(images: &[Vec<u8>], model: &Model) -> Array4<f32> {
    let spec = &model.meta().input;
    let data: Vec<f32> = images
        .iter()
        .flat_map(|img| csgd::preprocess::normalise_gray_u8(img, spec))
        .collect();
    Array4::from_shape_vec((images.len(), spec.channels, spec.height, spec.width), data).unwrap()
}

fn argmax(row: ndarray::ArrayView1<f32>) -> usize {
    row.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i)
}

#[test]
fn runs_batches_and_returns_outputs_in_the_requested_order() {
    let mut model = Model::load(&common::model_path(), &cfg()).unwrap();
    assert_eq!(model.provider(), "cpu");
    let meta = model.meta().clone();
    assert_eq!(meta.classes.len(), 10);
    let k = meta.architecture.filters();
    let (images, labels) = common::fashion_test(200);
    let input = batch(&images, &model);

    let out = model.run(input.view(), &["logits", "activations"]).unwrap();
    assert_eq!(out[0].dim(), (200, 10));
    assert_eq!(out[1].dim(), (200, k));
    let reversed = model.run(input.view(), &["activations", "logits"]).unwrap();
    assert_eq!(reversed[0], out[1]);
    assert_eq!(reversed[1], out[0]);
    for stage in &meta.outputs.stages {
        let o = model.run(input.view(), &[stage.name.as_str()]).unwrap();
        assert_eq!(o[0].dim(), (200, stage.channels));
    }

    let correct = (0..200)
        .filter(|&i| argmax(out[0].row(i)) == usize::from(labels[i]))
        .count();
    let accuracy = correct as f64 / 200.0;
    assert!(accuracy >= common::min_accuracy(), "accuracy {accuracy}");

    // A batch gives each image what it gets alone.
    for i in [0, 57, 199] {
        let single = model
            .run(input.slice(ndarray::s![i..i + 1, .., .., ..]), &["logits"])
            .unwrap();
        let diff = (&single[0].row(0) - &out[0].row(i))
            .mapv(f32::abs)
            .fold(0f32, |a, &b| a.max(b));
        assert!(diff < 1e-4, "image {i}: {diff}");
    }
}

#[test]
fn bad_calls_are_errors_not_panics() {
    let mut model = Model::load(&common::model_path(), &cfg()).unwrap();
    let spec = model.meta().input.clone();
    let wrong = Array4::<f32>::zeros((1, spec.channels, spec.height + 1, spec.width));
    let e = model
        .run(wrong.view(), &["logits"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("shape"), "{e}");
    let empty = Array4::<f32>::zeros((0, spec.channels, spec.height, spec.width));
    assert!(model.run(empty.view(), &["logits"]).is_err());
    let ok = Array4::<f32>::zeros((2, spec.channels, spec.height, spec.width));
    let e = model.run(ok.view(), &["nope"]).unwrap_err().to_string();
    assert!(e.contains("nope"), "{e}");
    // Non-standard layout is accepted.
    let t = Array4::<f32>::zeros((spec.width, spec.height, spec.channels, 2));
    let permuted = t.view().permuted_axes([3, 2, 1, 0]);
    assert_eq!(model.run(permuted, &["logits"]).unwrap()[0].nrows(), 2);
}

#[test]
fn broken_bundles_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let e = Model::load(&dir.path().join("missing.onnx"), &cfg())
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.onnx"), "{e}");

    // Metadata removed.
    let mut proto = csg_bundle::onnx::read_model(&common::model_path()).unwrap();
    proto.metadata_props.clear();
    let plain = dir.path().join("plain.onnx");
    csg_bundle::onnx::write_model(&plain, &proto).unwrap();
    let e = Model::load(&plain, &cfg()).unwrap_err().to_string();
    assert!(e.contains("plain.onnx") && e.contains("metadata"), "{e}");

    // Unknown schema version; an output the graph lacks.
    let meta = csg_bundle::onnx::read_meta(&common::model_path()).unwrap();
    let mut m = meta.clone();
    m.schema = "csgd.bundle.v99".into();
    let path = dir.path().join("schema.onnx");
    csg_bundle::onnx::set_meta(&mut proto, &m);
    csg_bundle::onnx::write_model(&path, &proto).unwrap();
    let e = Model::load(&path, &cfg()).unwrap_err().to_string();
    assert!(e.contains("schema"), "{e}");

    let mut m = meta;
    m.outputs.logits = "not_there".into();
    let path = dir.path().join("outputs.onnx");
    csg_bundle::onnx::set_meta(&mut proto, &m);
    csg_bundle::onnx::write_model(&path, &proto).unwrap();
    let e = Model::load(&path, &cfg()).unwrap_err().to_string();
    assert!(e.contains("not_there") && e.contains("outputs.onnx"), "{e}");
}
