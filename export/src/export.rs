//! Checkpoint → bundle: read, check, build the graph, fill the metadata, write atomically.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use csg_bundle::{
    Architecture, BundleMeta, GATE_TENSOR, Gate, InputSpec, SCHEMA, SourceInfo, onnx,
};
use sha2::{Digest, Sha256};

use crate::ExportError;
use crate::graph::{GraphOptions, build_model};
use crate::plan::Plan;
use crate::safetensors_ckpt::{looks_like_safetensors, read_csg};
use crate::tensors::TensorMap;
use crate::torch::{describe_head, looks_like_zip, read_torch};

/// The official CSG experiment's classes (PASCAL-Part animals), in its label order.
pub const OFFICIAL_CLASSES: [&str; 6] = ["bird", "cat", "dog", "cow", "horse", "sheep"];
/// The official experiment's input side.
pub const OFFICIAL_INPUT_SIZE: usize = 128;
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Which checkpoint reader to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// Decide from the file's first bytes.
    #[default]
    Auto,
    /// csg-train's safetensors checkpoint.
    CsgTrain,
    /// An official PyTorch `torch.save` archive.
    Pytorch,
}

impl Format {
    /// The name stored in [`SourceInfo::format`].
    pub fn name(self) -> &'static str {
        match self {
            Format::Auto => "auto",
            Format::CsgTrain => "csg-train",
            Format::Pytorch => "pytorch",
        }
    }
}

/// Which earlier stages get a GAP output (the gated stage always does, as `activations`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum StageSelection {
    #[default]
    All,
    None,
    /// 1-based stage numbers (stage 1 = torchvision's `layer1`, or the CNN's first stage).
    List(Vec<usize>),
}

/// Options of [`export`]; `None` means "from the checkpoint, else the official defaults".
#[derive(Debug, Clone, PartialEq)]
pub struct ExportOptions {
    pub format: Format,
    pub classes: Option<Vec<String>>,
    /// Square input side.
    pub input_size: Option<usize>,
    pub mean: Option<Vec<f32>>,
    pub std: Option<Vec<f32>>,
    /// Model name; defaults to the checkpoint's file stem.
    pub name: Option<String>,
    pub version: Option<String>,
    pub stages: StageSelection,
    /// Earlier stages whose feature map to export beside their GAP, from which the detector
    /// computes its `mean_std_occupancy` features; `None`: the stages the detector reads by
    /// default. A map leaves ONNX Runtime's blocked channel layout to become an output (9 %
    /// of the tiny model's forward pass for stage 2), so only those are exported by default.
    pub stage_maps: Option<StageSelection>,
    pub feature_map: bool,
    pub fold_bn: bool,
}

impl Default for ExportOptions {
    fn default() -> Self {
        Self {
            format: Format::Auto,
            classes: None,
            input_size: None,
            mean: None,
            std: None,
            name: None,
            version: None,
            stages: StageSelection::All,
            stage_maps: None,
            feature_map: false,
            fold_bn: true,
        }
    }
}

/// What [`export`] wrote.
#[derive(Debug, Clone)]
pub struct Exported {
    pub path: PathBuf,
    pub meta: BundleMeta,
    /// Size of the written file.
    pub bytes: u64,
    /// Things the user should know (defaults that were guessed).
    pub warnings: Vec<String>,
}

/// A checkpoint as read, before export.
struct Loaded {
    format: Format,
    arch: Architecture,
    tensors: TensorMap,
    classes: Option<Vec<String>>,
    input: Option<InputSpec>,
    training: Option<serde_json::Value>,
}

/// Detects a checkpoint's format from its first bytes.
pub fn detect_format(path: &Path) -> Result<Format, ExportError> {
    let mut head = Vec::with_capacity(16);
    File::open(path)
        .and_then(|f| f.take(16).read_to_end(&mut head))
        .map_err(ExportError::io(path))?;
    if looks_like_zip(&head) {
        Ok(Format::Pytorch)
    } else if looks_like_safetensors(&head) {
        Ok(Format::CsgTrain)
    } else {
        Err(ExportError::UnknownFormat {
            path: path.to_path_buf(),
            expected: "a PyTorch checkpoint (torch.save zip archive) or a csg-train \
                       .safetensors checkpoint",
            found: describe_head(&head),
        })
    }
}

fn load(path: &Path, format: Format) -> Result<Loaded, ExportError> {
    let format = match format {
        Format::Auto => detect_format(path)?,
        f => f,
    };
    match format {
        Format::Pytorch => {
            let tensors = read_torch(path)?;
            let arch = crate::infer::infer_resnet(&tensors)?;
            Ok(Loaded {
                format,
                arch,
                tensors,
                classes: None,
                input: None,
                training: None,
            })
        }
        _ => {
            let ckpt = read_csg(path)?;
            Ok(Loaded {
                format: Format::CsgTrain,
                arch: ckpt.arch,
                tensors: ckpt.tensors,
                classes: Some(ckpt.classes),
                input: Some(ckpt.input),
                training: ckpt.training,
            })
        }
    }
}

/// Exports `checkpoint` to the ONNX bundle `output`. On error nothing is written.
pub fn export(
    checkpoint: &Path,
    output: &Path,
    options: &ExportOptions,
) -> Result<Exported, ExportError> {
    let loaded = load(checkpoint, options.format)?;
    let mut warnings = Vec::new();
    let arch = loaded.arch;
    let classes = resolve_classes(&arch, options, loaded.classes, &mut warnings)?;
    let input = resolve_input(&arch, options, loaded.input, &mut warnings)?;

    let mut tensors = loaded.tensors;
    let gated = tensors.contains(GATE_TENSOR);
    let plan = Plan::new(&arch);
    tensors.check(&plan.specs(gated), &arch.summary())?;
    let gate = if gated {
        let values = tensors
            .take(GATE_TENSOR, &[plan.filters, plan.classes])?
            .data;
        Some(Gate {
            filters: plan.filters,
            classes: plan.classes,
            values,
        })
    } else {
        None
    };
    let stages = select_stages(&options.stages, plan.stages.len(), "--stages")?;
    let stage_maps = match &options.stage_maps {
        Some(selection) => select_stages(selection, plan.stages.len(), "--stage-maps")?,
        None => arch
            .default_detector_stages()
            .into_iter()
            .filter(|s| stages.contains(s))
            .collect(),
    };
    if let Some(missing) = stage_maps.iter().find(|s| !stages.contains(s)) {
        return Err(ExportError::Options(format!(
            "--stage-maps {n} needs stage {n}'s GAP as well: add {n} to --stages",
            n = missing + 1
        )));
    }
    let graph_options = GraphOptions {
        fold_bn: options.fold_bn,
        stages,
        stage_maps,
        feature_map: options.feature_map,
        input_hw: (input.height, input.width),
    };
    let (mut model, outputs) = build_model(&arch, tensors, &graph_options)?;

    let file = checkpoint
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = match &options.name {
        Some(n) => n.clone(),
        None => checkpoint
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into()),
    };
    let meta = BundleMeta {
        schema: SCHEMA.into(),
        name,
        version: options.version.clone().unwrap_or_else(|| "1".into()),
        classes,
        input,
        architecture: arch,
        gate,
        outputs,
        source: SourceInfo {
            format: loaded.format.name().into(),
            file,
            sha256: sha256_file(checkpoint)?,
            exporter: format!("csg-export {}", env!("CARGO_PKG_VERSION")),
        },
        training: loaded.training,
        calibration: None,
    };
    meta.validate()?;
    onnx::set_meta(&mut model, &meta);
    onnx::write_model(output, &model)?;
    drop(model);
    let bytes = std::fs::metadata(output)
        .map_err(ExportError::io(output))?
        .len();
    Ok(Exported {
        path: output.to_path_buf(),
        meta,
        bytes,
        warnings,
    })
}

fn resolve_classes(
    arch: &Architecture,
    options: &ExportOptions,
    from_checkpoint: Option<Vec<String>>,
    warnings: &mut Vec<String>,
) -> Result<Vec<String>, ExportError> {
    let classes = match (&options.classes, from_checkpoint) {
        (Some(given), _) => given.clone(),
        (None, Some(stored)) => stored,
        (None, None) if arch.classes == OFFICIAL_CLASSES.len() => {
            OFFICIAL_CLASSES.iter().map(|s| (*s).to_owned()).collect()
        }
        (None, None) => {
            warnings.push(format!(
                "the checkpoint has {} classes and no names; using class0…class{} (set --classes)",
                arch.classes,
                arch.classes - 1
            ));
            (0..arch.classes).map(|i| format!("class{i}")).collect()
        }
    };
    if classes.len() != arch.classes {
        return Err(ExportError::Options(format!(
            "expected {} class names (the classifier has {} outputs), found {}: {}",
            arch.classes,
            arch.classes,
            classes.len(),
            classes.join(",")
        )));
    }
    Ok(classes)
}

fn resolve_input(
    arch: &Architecture,
    options: &ExportOptions,
    from_checkpoint: Option<InputSpec>,
    warnings: &mut Vec<String>,
) -> Result<InputSpec, ExportError> {
    let channels = arch.in_channels;
    let mut input = match from_checkpoint {
        Some(spec) => spec,
        None => {
            let (mean, std) = if channels == 3 {
                (IMAGENET_MEAN.to_vec(), IMAGENET_STD.to_vec())
            } else {
                if options.mean.is_none() || options.std.is_none() {
                    warnings.push(format!(
                        "{channels}-channel input: ImageNet statistics do not apply; using \
                         mean 0, std 1 (set --mean and --std)"
                    ));
                }
                (vec![0.0; channels], vec![1.0; channels])
            };
            InputSpec {
                layout: "NCHW".into(),
                channels,
                height: OFFICIAL_INPUT_SIZE,
                width: OFFICIAL_INPUT_SIZE,
                value_range: [0.0, 1.0],
                mean,
                std,
            }
        }
    };
    if let Some(size) = options.input_size {
        if size == 0 {
            return Err(ExportError::Options(
                "expected a positive --input-size, found 0".into(),
            ));
        }
        input.height = size;
        input.width = size;
    }
    for (what, given, target) in [
        ("--mean", &options.mean, &mut input.mean),
        ("--std", &options.std, &mut input.std),
    ] {
        if let Some(values) = given {
            if values.len() != channels {
                return Err(ExportError::Options(format!(
                    "expected {channels} {what} values (one per input channel), found {}",
                    values.len()
                )));
            }
            *target = values.clone();
        }
    }
    Ok(input)
}

/// Turns a stage selection (of the command-line option `flag`) into 0-based indices of
/// earlier stages.
fn select_stages(
    selection: &StageSelection,
    stages: usize,
    flag: &str,
) -> Result<Vec<usize>, ExportError> {
    let earlier = stages.saturating_sub(1);
    match selection {
        StageSelection::All => Ok((0..earlier).collect()),
        StageSelection::None => Ok(Vec::new()),
        StageSelection::List(list) => {
            let mut out = Vec::with_capacity(list.len());
            for &n in list {
                if n == 0 || n > earlier {
                    return Err(ExportError::Options(format!(
                        "expected {flag} numbers in 1..={earlier} (stage {stages} is the gated \
                         stage, always exported as `activations`), found {n}"
                    )));
                }
                out.push(n - 1);
            }
            out.sort_unstable();
            out.dedup();
            Ok(out)
        }
    }
}

/// SHA-256 of a file, hex; streamed.
pub fn sha256_file(path: &Path) -> Result<String, ExportError> {
    let mut file = File::open(path).map_err(ExportError::io(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(ExportError::io(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_selection_is_one_based_and_excludes_the_gated_stage() {
        assert_eq!(
            select_stages(&StageSelection::All, 4, "--stages").unwrap(),
            vec![0, 1, 2]
        );
        assert!(
            select_stages(&StageSelection::None, 4, "--stages")
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            select_stages(&StageSelection::List(vec![3, 1, 1]), 4, "--stages").unwrap(),
            vec![0, 2]
        );
        let err = select_stages(&StageSelection::List(vec![4]), 4, "--stages").unwrap_err();
        assert!(err.to_string().contains("found 4"), "{err}");
    }
}
