//! Start-up failures of `csgd serve` are clear errors naming what is wrong, before anything
//! binds; and the configuration layers reach the real process.

mod common;

use std::process::Output;

use common::{base_args, csgd, model_path, ort_library};

fn run(args: &[String], env: &[(&str, &str)]) -> Output {
    let mut cmd = csgd();
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run csgd")
}

fn args(extra: &[&str]) -> Vec<String> {
    let mut a = base_args();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// Runs with a port nothing else uses and asserts a failure whose stderr contains `needles`.
fn fails(args: &[String], env: &[(&str, &str)], needles: &[&str]) -> String {
    let out = run(args, env);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "expected failure, got success:\n{stderr}"
    );
    for n in needles {
        assert!(stderr.contains(n), "stderr lacks {n:?}:\n{stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        !stderr.contains("listening on"),
        "bound before failing:\n{stderr}"
    );
    stderr
}

#[test]
fn invalid_config_values_name_their_key() {
    fails(
        &args(&["--set", "batching.max_batch_size=0"]),
        &[],
        &["batching.max_batch_size must be ≥ 1"],
    );
    fails(
        &args(&[]),
        &[("CSGD_SERVER__MAX_CONCURRENT_REQUESTS", "0")],
        &["server.max_concurrent_requests must be ≥ 1"],
    );
    let mut a = args(&[]);
    let i = a.iter().position(|x| x == "--listen").unwrap();
    a[i + 1] = "nowhere".into();
    fails(&a, &[], &["server.listen"]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[batching]\nmax_batch_sise = 4\n").unwrap();
    fails(
        &args(&["--config", file.to_str().unwrap()]),
        &[],
        &["max_batch_sise"],
    );
    fails(
        &args(&["--set", "admin.enabled=true"]),
        &[],
        &["admin.token must be at least 16 characters"],
    );
    if !cfg!(feature = "gpu") {
        fails(
            &args(&["--provider", "cuda"]),
            &[],
            &["runtime.execution_providers", "gpu"],
        );
    }
}

#[test]
fn config_layers_reach_the_process() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("csgd.toml");
    std::fs::write(
        &file,
        "[server]\nlisten = \"127.0.0.1:7001\"\nmax_pixels = 1234\n[batching]\nmax_batch_size = 3\n",
    )
    .unwrap();
    let out = run(
        &[
            "serve".into(),
            "--config".into(),
            file.display().to_string(),
            "--set".into(),
            "batching.max_wait_us=7".into(),
            "--print-config".into(),
        ],
        &[
            ("CSGD_SERVER__LISTEN", "127.0.0.1:7002"),
            ("CSGD_BATCHING__MAX_BATCH_SIZE", "5"),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["server"]["listen"], "127.0.0.1:7002");
    assert_eq!(s["server"]["max_pixels"], 1234);
    assert_eq!(s["batching"]["max_batch_size"], 5);
    assert_eq!(s["batching"]["max_wait_us"], 7);
    assert_eq!(s["models"]["list"][0]["name"], "fashion-csg");
}

#[test]
fn missing_or_broken_ort_library_is_a_clear_error() {
    let mut a = base_args();
    let i = a.iter().position(|x| x == "--ort-library").unwrap();
    a[i + 1] = "/nonexistent/libonnxruntime.so".into();
    fails(
        &a,
        &[],
        &[
            "/nonexistent/libonnxruntime.so",
            ".ci/fetch-ort",
            "runtime.ort_library",
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("libonnxruntime.so");
    std::fs::write(&fake, "not a library").unwrap();
    a[i + 1] = fake.display().to_string();
    fails(&a, &[], &[fake.to_str().unwrap(), ".ci/fetch-ort"]);
}

#[test]
fn missing_or_broken_models_are_clear_errors() {
    let lib = ort_library().display().to_string();
    let model_args = |path: &str| -> Vec<String> {
        vec![
            "serve".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--ort-library".into(),
            lib.clone(),
            "--model".into(),
            format!("m={path}"),
        ]
    };
    fails(
        &model_args("/nonexistent/model.onnx"),
        &[],
        &["/nonexistent/model.onnx", "\"m\""],
    );

    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(model_path()).unwrap();
    let truncated = dir.path().join("truncated.onnx");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    fails(
        &model_args(truncated.to_str().unwrap()),
        &[],
        &["truncated.onnx"],
    );

    let text = dir.path().join("text.onnx");
    std::fs::write(&text, "hello").unwrap();
    fails(&model_args(text.to_str().unwrap()), &[], &["text.onnx"]);

    // Valid ONNX, but metadata with an inconsistent gate.
    let mut model = csg_bundle::onnx::read_model(&model_path()).unwrap();
    let mut meta = csg_bundle::onnx::read_meta(&model_path()).unwrap();
    if let Some(gate) = meta.gate.as_mut() {
        gate.filters += 1;
        csg_bundle::onnx::set_meta(&mut model, &meta);
        let bad_gate = dir.path().join("bad-gate.onnx");
        csg_bundle::onnx::write_model(&bad_gate, &model).unwrap();
        fails(
            &model_args(bad_gate.to_str().unwrap()),
            &[],
            &["bad-gate.onnx", "gate is"],
        );
    }

    // Valid ONNX, metadata of a schema this build does not read.
    let mut meta = csg_bundle::onnx::read_meta(&model_path()).unwrap();
    meta.schema = "csgd.bundle.v9".into();
    csg_bundle::onnx::set_meta(&mut model, &meta);
    let future = dir.path().join("future-schema.onnx");
    csg_bundle::onnx::write_model(&future, &model).unwrap();
    fails(
        &model_args(future.to_str().unwrap()),
        &[],
        &["future-schema.onnx", "csgd.bundle.v9"],
    );
}
