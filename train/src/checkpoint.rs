//! Checkpoints: one safetensors file with torchvision tensor names, PyTorch orientation
//! (`fc.weight` is [C, K]) and the architecture, class names and input spec in the file's
//! metadata; the training report sits beside it as `NAME.report.json`.
//!
//! burn-store does the writing; we only map burn's module paths to torchvision's names.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::prelude::*;
use burn::store::{BurnToPyTorchAdapter, ModuleSnapshot, PyTorchToBurnAdapter, SafetensorsStore};
pub use csg_bundle::checkpoint::report_path;
use csg_bundle::checkpoint::{ARCH_KEY, CLASSES_KEY, INPUT_KEY};
use csg_bundle::{Architecture, InputSpec};

use crate::model::Network;

/// Everything a checkpoint describes besides its tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointInfo {
    pub architecture: Architecture,
    pub classes: Vec<String>,
    pub input: InputSpec,
    pub gated: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {message}")]
    Store { path: PathBuf, message: String },
    #[error("{path}: metadata key {key} is missing or invalid: {why}")]
    Metadata {
        path: PathBuf,
        key: &'static str,
        why: String,
    },
    #[error("{path}: {0}", path = .1.display())]
    Model(crate::model::ModelError, PathBuf),
}

/// burn path prefix → torchvision name prefix. Layers beyond 8 do not occur in practice.
fn save_renames() -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = (0..8)
        .map(|i| (format!(r"^layers\.{i}\."), format!("layer{}.", i + 1)))
        .collect();
    pairs.push((r"\.downsample\.conv\.".into(), ".downsample.0.".into()));
    pairs.push((r"\.downsample\.bn\.".into(), ".downsample.1.".into()));
    pairs
}

fn load_renames() -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = (0..8)
        .map(|i| (format!(r"^layer{}\.", i + 1), format!("layers.{i}.")))
        .collect();
    pairs.push((r"\.downsample\.0\.".into(), ".downsample.conv.".into()));
    pairs.push((r"\.downsample\.1\.".into(), ".downsample.bn.".into()));
    pairs
}

/// Keeps only float tensors a checkpoint needs (not burn's per-layer training flags).
fn is_weight(path: &str, _container: &str) -> bool {
    !path.ends_with(".training")
}

/// Writes `model` to `path` (atomically: burn-store writes a scratch file and renames).
pub fn save(
    model: &Network,
    classes: &[String],
    input: &InputSpec,
    path: &Path,
) -> Result<(), CheckpointError> {
    let mut store = SafetensorsStore::from_file(path)
        .with_to_adapter(BurnToPyTorchAdapter)
        .with_predicate(is_weight)
        .overwrite(true)
        .metadata(ARCH_KEY, json(model.architecture()))
        .metadata(CLASSES_KEY, json(classes))
        .metadata(INPUT_KEY, json(input));
    for (from, to) in save_renames() {
        store = store.with_key_remapping(from, to);
    }
    // `valid()` synchronises batch norm's running statistics, which otherwise lag one update.
    model
        .valid()
        .save_into(&mut store)
        .map_err(|e| CheckpointError::Store {
            path: path.to_owned(),
            message: e.to_string(),
        })
}

/// Reads the description stored in a checkpoint's metadata.
pub fn read_info(path: &Path) -> Result<CheckpointInfo, CheckpointError> {
    let bytes = std::fs::read(path).map_err(|e| CheckpointError::Store {
        path: path.to_owned(),
        message: format!("cannot read: {e}"),
    })?;
    let (_, header) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| CheckpointError::Store {
            path: path.to_owned(),
            message: format!("not a safetensors file: {e}"),
        })?;
    let meta = header.metadata().clone().unwrap_or_default();
    fn field<T: serde::de::DeserializeOwned>(
        meta: &std::collections::HashMap<String, String>,
        key: &'static str,
        path: &Path,
    ) -> Result<T, CheckpointError> {
        let text = meta.get(key).ok_or_else(|| CheckpointError::Metadata {
            path: path.to_owned(),
            key,
            why: "missing".into(),
        })?;
        serde_json::from_str(text).map_err(|e| CheckpointError::Metadata {
            path: path.to_owned(),
            key,
            why: e.to_string(),
        })
    }
    let gated = header.tensors().contains_key(csg_bundle::GATE_TENSOR);
    Ok(CheckpointInfo {
        architecture: field(&meta, ARCH_KEY, path)?,
        classes: field(&meta, CLASSES_KEY, path)?,
        input: field(&meta, INPUT_KEY, path)?,
        gated,
    })
}

/// Loads a checkpoint into a network on `device`.
pub fn load(path: &Path, device: &Device) -> Result<(Network, CheckpointInfo), CheckpointError> {
    let info = read_info(path)?;
    let mut model = Network::new(&info.architecture, info.gated, device)
        .map_err(|e| CheckpointError::Model(e, path.to_owned()))?;
    let mut store = SafetensorsStore::from_file(path)
        .with_from_adapter(PyTorchToBurnAdapter)
        .with_predicate(is_weight);
    for (from, to) in load_renames() {
        store = store.with_key_remapping(from, to);
    }
    let result = model
        .load_from(&mut store)
        .map_err(|e| CheckpointError::Store {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    if !result.missing.is_empty() || !result.errors.is_empty() {
        return Err(CheckpointError::Store {
            path: path.to_owned(),
            message: format!(
                "does not match its architecture: missing {:?}, errors {:?}",
                result.missing, result.errors
            ),
        });
    }
    Ok((model, info))
}

fn json<T: serde::Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string(value).expect("metadata types serialise")
}
