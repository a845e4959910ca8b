//! Conventions of csg-train checkpoints, shared by the trainer (writer) and the exporter
//! (reader): one `.safetensors` file with torchvision tensor names (see [`crate::arch`]) whose
//! header metadata holds these keys, and the training report beside it.

use std::path::{Path, PathBuf};

/// Header metadata key: the [`crate::Architecture`] as JSON.
pub const ARCH_KEY: &str = "csg.arch";
/// Header metadata key: the class names as a JSON array of strings, index = class id.
pub const CLASSES_KEY: &str = "csg.classes";
/// Header metadata key: the [`crate::InputSpec`] as JSON.
pub const INPUT_KEY: &str = "csg.input";

/// Where the training report of a checkpoint lives: `NAME.safetensors` → `NAME.report.json`.
pub fn report_path(checkpoint: &Path) -> PathBuf {
    checkpoint.with_extension("report.json")
}

#[cfg(test)]
mod tests {
    #[test]
    fn report_sits_beside_the_checkpoint() {
        let p = super::report_path(std::path::Path::new("models/fm-csg.safetensors"));
        assert_eq!(p, std::path::Path::new("models/fm-csg.report.json"));
    }
}
