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
fn a_session_cut_to_the_detector_s_outputs_computes_the_same_values() {
    let path = common::model_path();
    let mut full = Model::load(&path, &cfg()).unwrap();
    let meta = full.meta().clone();
    let map = meta
        .outputs
        .stages
        .iter()
        .find_map(|s| s.map.clone())
        .expect("the shipped model exports a stage map");
    let stage = &meta.outputs.stages[0].name;
    // Asked for out of the graph's order: the session keeps the graph's order, and `run`
    // answers in the order asked.
    let keep = [map.as_str(), "logits", stage.as_str(), "activations"];
    let mut cut = Model::load_for(&path, &cfg(), &keep).unwrap();
    assert_eq!(cut.meta(), full.meta());
    let mut kept = cut.output_names().to_vec();
    kept.sort();
    let mut want: Vec<String> = keep.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(kept, want, "only the kept outputs are left");
    assert!(full.output_names().len() > keep.len());

    let (images, _) = common::fashion_test(40);
    let input = batch(&images, &full);
    assert_eq!(
        cut.run(input.view(), &keep).unwrap(),
        full.run(input.view(), &keep).unwrap()
    );
    // What was cut away is refused by name, as any missing output is.
    let fm = meta
        .outputs
        .feature_map
        .clone()
        .expect("feature map output");
    let e = cut
        .run(input.view(), &[fm.as_str()])
        .unwrap_err()
        .to_string();
    assert!(e.contains(&fm), "{e}");
    // Several sessions from one cut (the daemon's sessions_per_model) compute the same.
    let sessions = Model::load_sessions_for(&path, &cfg(), &keep, 2).unwrap();
    assert_eq!(sessions.len(), 2);
    let expected = cut.run(input.view(), &keep).unwrap();
    for mut session in sessions {
        assert_eq!(session.output_names(), cut.output_names());
        assert_eq!(session.run(input.view(), &keep).unwrap(), expected);
    }
    // Keeping an output the graph does not have is a load error that lists the real ones.
    let e = Model::load_for(&path, &cfg(), &["logits", "stage9_map"])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no output \"stage9_map\"") && e.contains("stage2_activations"),
        "{e}"
    );
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
