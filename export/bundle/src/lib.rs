//! Types shared by the three crates of csgd: the trainer writes them, the exporter turns them
//! into an ONNX bundle, and the daemon reads them back. One definition, so the three cannot
//! drift apart. [`onnx`] reads and writes the metadata inside an ONNX file; [`prune`] cuts a
//! bundle's graph down to the outputs one session reads.

pub mod arch;
pub mod calibration;
pub mod checkpoint;
pub mod dataset;
pub mod mahalanobis;
pub mod meta;
pub mod onnx;
pub mod prune;
pub mod score;

pub use arch::{Architecture, Backbone, BlockKind, CnnStage, GATE_TENSOR, Stem};
pub use meta::{
    BundleMeta, Gate, InputSpec, METADATA_KEY, OutputNames, SCHEMA, SourceInfo, StageOutput,
};

/// Errors in shared descriptions: inconsistent architecture or metadata.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("invalid architecture: {0}")]
    Architecture(String),
    #[error("invalid bundle metadata: {0}")]
    Metadata(String),
    #[error("bundle metadata is not valid JSON for schema {SCHEMA}: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{}: {source}", path.display())]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a readable ONNX model: {source}", path.display())]
    Protobuf {
        path: std::path::PathBuf,
        source: protobuf::Error,
    },
    #[error("{} has no bundle metadata: expected a metadata_props entry {key:?} (was it written by csg-export?)", path.display())]
    MissingMetadata {
        path: std::path::PathBuf,
        key: &'static str,
    },
}
