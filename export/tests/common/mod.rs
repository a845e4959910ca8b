//! Shared test helpers: locating fixtures and ONNX Runtime, reading .npy files, running a
//! model, comparing outputs.
#![allow(dead_code)]

pub mod ckpt;
pub mod reference;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;
use ort::session::Session;
use ort::value::Tensor as OrtTensor;

/// The workspace root (the parent of `export/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("export/ has a parent")
        .to_path_buf()
}

/// `$CSGD_FIXTURES`, else `<workspace>/../shared/fixtures`; `None` (with a skip line) when
/// the directory is missing.
pub fn fixtures_dir(test: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("CSGD_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("../shared/fixtures"));
    if dir.join("fixtures.json").is_file() {
        Some(dir)
    } else {
        println!(
            "SKIP {test}: no fixtures at {} (set CSGD_FIXTURES)",
            dir.display()
        );
        None
    }
}

/// The ONNX Runtime environment, loaded once from `$ORT_DYLIB_PATH` or
/// `<workspace>/.ort/libonnxruntime.so`. Panics with instructions when the library is missing:
/// the parity checks are the point of these tests and must not pass vacuously.
pub fn ort_env() -> &'static Environment {
    static ENV: OnceLock<Result<Environment, String>> = OnceLock::new();
    let env = ENV.get_or_init(|| {
        let path = std::env::var_os("ORT_DYLIB_PATH")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join(".ort/libonnxruntime.so"));
        let builder = ort::init_from(&path).map_err(|e| {
            format!(
                "cannot load ONNX Runtime from {} ({e}); run .ci/fetch-ort or set ORT_DYLIB_PATH",
                path.display()
            )
        })?;
        builder.build().map_err(|e| e.to_string())
    });
    match env {
        Ok(env) => env,
        Err(e) => panic!("{e}"),
    }
}

/// A float32 array.
#[derive(Debug, Clone)]
pub struct Array {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Reads a little-endian float32 C-order .npy file (format versions 1–3).
pub fn read_npy(path: &Path) -> Array {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..6], b"\x93NUMPY", "{} is not .npy", path.display());
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        _ => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
    };
    let header = std::str::from_utf8(&bytes[start..start + header_len]).expect("ascii header");
    assert!(
        header.contains("'<f4'"),
        "{}: not float32 LE: {header}",
        path.display()
    );
    assert!(header.contains("'fortran_order': False"), "{header}");
    let open = header.find("'shape': (").expect("shape") + "'shape': (".len();
    let close = open + header[open..].find(')').expect("shape end");
    let shape: Vec<usize> = header[open..close]
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().expect("dimension"))
        .collect();
    let data: Vec<f32> = bytes[start + header_len..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(data.len(), shape.iter().product::<usize>());
    Array { shape, data }
}

/// Runs `model` on `input` (fed as `image`) and returns every graph output by name.
pub fn run_model(model: &Path, input: &Array) -> HashMap<String, Array> {
    let mut session = Session::builder(ort_env())
        .and_then(|b| b.with_intra_threads(1).map_err(ort::Error::<()>::from))
        .and_then(|mut b| b.commit_from_file(model))
        .unwrap_or_else(|e| panic!("loading {} in ONNX Runtime: {e}", model.display()));
    let names: Vec<String> = session
        .outputs()
        .iter()
        .map(|o| o.name().to_owned())
        .collect();
    let shape: Vec<i64> = input.shape.iter().map(|&d| d as i64).collect();
    let tensor = OrtTensor::from_array((shape, input.data.clone())).expect("input tensor");
    let outputs = session
        .run(ort::inputs!["image" => tensor])
        .unwrap_or_else(|e| panic!("running {}: {e}", model.display()));
    names
        .into_iter()
        .map(|name| {
            let (shape, data) = outputs[name.as_str()]
                .try_extract_tensor::<f32>()
                .expect("f32 output");
            let array = Array {
                shape: shape.iter().map(|&d| d as usize).collect(),
                data: data.to_vec(),
            };
            (name, array)
        })
        .collect()
}

/// Max |a − b|, asserting equal shapes.
pub fn max_abs_diff(what: &str, got: &Array, want: &Array) -> f32 {
    assert_eq!(got.shape, want.shape, "{what}: shape");
    got.data
        .iter()
        .zip(&want.data)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

/// Row-wise argmax of a [N, C] array.
pub fn argmax_rows(a: &Array) -> Vec<usize> {
    let c = a.shape[1];
    a.data
        .chunks(c)
        .map(|row| {
            row.iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
                    if v > best.1 { (i, v) } else { best }
                })
                .0
        })
        .collect()
}

/// Asserts outputs match within `tol` and logits agree on the argmax.
pub fn assert_close(what: &str, got: &Array, want: &Array, tol: f32) -> f32 {
    let diff = max_abs_diff(what, got, want);
    assert!(diff <= tol, "{what}: max abs diff {diff} > {tol}");
    diff
}
