//! csg-export: turns a CSG-trained network into the single ONNX bundle the daemon serves.
//!
//! Two kinds of checkpoint are read without Python: csg-train's safetensors files
//! ([`safetensors_ckpt`]) and the official code's `torch.save` archives ([`torch`], with the
//! architecture inferred by [`infer`]). Both become torchvision-named tensors, checked against
//! the architecture's [`plan`], built into an ONNX graph ([`graph`]) and written with the
//! `csgd.bundle.v1` metadata ([`export()`]). [`inspect`] and [`heatmap`] describe a bundle.

pub mod error;
pub mod export;
pub mod graph;
pub mod heatmap;
pub mod infer;
pub mod inspect;
pub mod plan;
pub mod safetensors_ckpt;
pub mod tensors;
pub mod torch;

pub use error::ExportError;
pub use export::{
    ExportOptions, Exported, Format, IMAGENET_MEAN, IMAGENET_STD, OFFICIAL_CLASSES,
    OFFICIAL_INPUT_SIZE, StageSelection, detect_format, export,
};
pub use graph::{ACTIVATIONS, FEATURE_MAP, INPUT, LOGITS, stage_map_name, stage_output_name};
pub use heatmap::render_gate;
pub use inspect::summary;
pub use safetensors_ckpt::{ARCH_KEY, CLASSES_KEY, INPUT_KEY, report_path};
