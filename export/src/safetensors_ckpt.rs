//! Reader for csg-train checkpoints: one `.safetensors` file whose header metadata describes
//! the network (`csg.arch`), its classes (`csg.classes`) and its input (`csg.input`), with the
//! training report beside it as `NAME.report.json`.

use std::path::Path;

use csg_bundle::{Architecture, InputSpec};
use safetensors::{Dtype, SafeTensors};

use crate::ExportError;
use crate::tensors::{Tensor, TensorMap, is_ignored};

pub use csg_bundle::checkpoint::{ARCH_KEY, CLASSES_KEY, INPUT_KEY, report_path};

/// Everything a csg-train checkpoint holds.
#[derive(Debug)]
pub struct CsgCheckpoint {
    pub arch: Architecture,
    pub classes: Vec<String>,
    pub input: InputSpec,
    pub tensors: TensorMap,
    /// The training report, when `NAME.report.json` exists.
    pub training: Option<serde_json::Value>,
}

/// Whether the first bytes look like a safetensors file: an 8-byte little-endian header length
/// followed by a JSON object.
pub fn looks_like_safetensors(head: &[u8]) -> bool {
    head.len() >= 9 && head[8] == b'{'
}

fn bad(path: &Path, detail: String) -> ExportError {
    ExportError::Safetensors {
        path: path.to_path_buf(),
        detail,
    }
}

/// Reads a csg-train checkpoint and its report.
pub fn read_csg(path: &Path) -> Result<CsgCheckpoint, ExportError> {
    let bytes = std::fs::read(path).map_err(ExportError::io(path))?;
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| {
        bad(
            path,
            format!("expected a safetensors checkpoint, found an unreadable header: {e}"),
        )
    })?;
    let meta = header.metadata().as_ref();
    let field =
        |key: &str| -> Result<&str, ExportError> {
            meta.and_then(|m| m.get(key)).map(String::as_str).ok_or_else(|| {
            bad(
                path,
                format!(
                    "expected header metadata {key} (a csg-train checkpoint), found keys {:?}",
                    meta.map(|m| {
                        let mut k: Vec<&String> = m.keys().collect();
                        k.sort();
                        k
                    })
                    .unwrap_or_default()
                ),
            )
        })
        };
    let json_err = |key: &str| {
        let key = key.to_owned();
        move |e: serde_json::Error| bad(path, format!("header metadata {key} is not valid: {e}"))
    };
    let arch: Architecture = serde_json::from_str(field(ARCH_KEY)?).map_err(json_err(ARCH_KEY))?;
    arch.validate()?;
    let classes: Vec<String> =
        serde_json::from_str(field(CLASSES_KEY)?).map_err(json_err(CLASSES_KEY))?;
    let input: InputSpec = serde_json::from_str(field(INPUT_KEY)?).map_err(json_err(INPUT_KEY))?;

    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(path, format!("cannot read the tensors: {e}")))?;
    let mut tensors = TensorMap::new();
    for (name, view) in st.iter() {
        if is_ignored(name) {
            continue;
        }
        if view.dtype() != Dtype::F32 {
            return Err(ExportError::Dtype {
                name: name.to_owned(),
                found: format!("{:?}", view.dtype()),
            });
        }
        let tensor = Tensor::from_le_bytes(view.shape().to_vec(), view.data())
            .ok_or_else(|| bad(path, format!("tensor {name} has the wrong byte length")))?;
        tensors.insert(name, tensor);
    }
    drop(st);
    drop(bytes);

    let report = report_path(path);
    let training = match std::fs::read_to_string(&report) {
        Ok(text) => Some(serde_json::from_str(&text).map_err(|e| {
            bad(
                &report,
                format!("expected the training report as JSON, found invalid JSON: {e}"),
            )
        })?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(ExportError::io(report)(e)),
    };
    Ok(CsgCheckpoint {
        arch,
        classes,
        input,
        tensors,
        training,
    })
}
