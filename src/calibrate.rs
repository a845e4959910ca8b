//! `csgd calibrate`: runs a bundle on clean held-out images, fits the detector's clean
//! statistics and thresholds ([`crate::detect::fit`]) and writes them into the bundle.

use std::path::{Path, PathBuf};

use csg_bundle::dataset::{self, Dataset};
use csg_bundle::{BundleMeta, InputSpec};
use ndarray::Array4;

use crate::detect::fit::{self, CleanOutputs, FitOptions, StageRead};
use crate::detect::{Calibration, DetectError, PixelHistogram};
use crate::preprocess;
use crate::runtime::{Model, RuntimeError};

/// Largest image calibration decodes (the operator's own files, so generous).
const MAX_PIXELS: u64 = 64_000_000;

/// Where the clean images come from.
#[derive(Debug, Clone, PartialEq)]
pub enum CleanData {
    /// The Fashion-MNIST validation split the model was not trained on (from the IDX files).
    FashionMnist { dir: PathBuf },
    /// An image folder: `DIR/<class name>/*.png|jpg`, class names as in the bundle.
    Folder(PathBuf),
}

impl CleanData {
    /// `fashion-mnist` (optionally `fashion-mnist:DIR`) or a folder path.
    pub fn parse(text: &str) -> Self {
        match text.strip_prefix("fashion-mnist") {
            Some("") => CleanData::FashionMnist {
                dir: dataset::default_data_dir(),
            },
            Some(rest) if rest.starts_with(':') => CleanData::FashionMnist {
                dir: PathBuf::from(&rest[1..]),
            },
            _ => CleanData::Folder(PathBuf::from(text)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CalibrateError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Detect(#[from] DetectError),
    #[error(transparent)]
    Data(#[from] dataset::DataError),
    #[error(transparent)]
    Bundle(#[from] csg_bundle::BundleError),
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {message}")]
    Image { path: PathBuf, message: String },
}

/// Calibration settings from the command line.
#[derive(Debug, Clone)]
pub struct CalibrateOptions {
    pub data: CleanData,
    /// 1-based stages to use besides the gated (last) one; `None` = none.
    pub stages: Option<Vec<usize>>,
    /// Describe those stages by their spatial statistics too, where the model exports them.
    pub spatial: bool,
    /// Bins of the input's pixel histogram to fit statistics of (0: none).
    pub input_bins: usize,
    pub fit: FitOptions,
    pub batch_size: usize,
}

/// Labelled, preprocessed clean images: [N, C, H, W] and labels.
pub struct CleanImages {
    pub tensor: Array4<f32>,
    pub labels: Vec<usize>,
}

/// The seeded split the trainer used, from the bundle's training report when present.
fn split_of(meta: &BundleMeta) -> (usize, u64) {
    let report = meta.training.as_ref();
    let get = |key: &str| report.and_then(|r| r.get("split")).and_then(|s| s.get(key));
    let validation = get("validation")
        .and_then(|v| v.as_u64())
        .map_or(dataset::DEFAULT_VALIDATION, |v| v as usize);
    let seed = get("seed")
        .and_then(|v| v.as_u64())
        .unwrap_or(dataset::DEFAULT_SPLIT_SEED);
    (validation, seed)
}

fn load_images(meta: &BundleMeta, data: &CleanData) -> Result<CleanImages, CalibrateError> {
    let spec = &meta.input;
    match data {
        CleanData::FashionMnist { dir } => {
            if spec.channels != 1 || spec.height != 28 || spec.width != 28 {
                return Err(CalibrateError::Invalid(format!(
                    "Fashion-MNIST images are 1×28×28; this model takes {}×{}×{}: pass an image folder",
                    spec.channels, spec.height, spec.width
                )));
            }
            let (validation_size, seed) = split_of(meta);
            let (_, validation) = Dataset::load(dir, "train")?.split(validation_size, seed);
            Ok(fashion_tensor(&validation, spec))
        }
        CleanData::Folder(dir) => folder_images(dir, meta),
    }
}

/// Preprocesses a Fashion-MNIST split exactly as the daemon preprocesses a 28×28 PNG.
pub fn fashion_tensor(data: &Dataset, spec: &InputSpec) -> CleanImages {
    let n = data.len();
    let mut values = Vec::with_capacity(n * spec.len());
    for i in 0..n {
        values.extend(preprocess::normalise_gray_u8(data.image(i), spec));
    }
    CleanImages {
        tensor: Array4::from_shape_vec((n, 1, spec.height, spec.width), values)
            .expect("one image of the spec's size per label"),
        labels: data.labels.iter().map(|&l| usize::from(l)).collect(),
    }
}

fn folder_images(dir: &Path, meta: &BundleMeta) -> Result<CleanImages, CalibrateError> {
    let spec = &meta.input;
    let mut values = Vec::new();
    let mut labels = Vec::new();
    let read_dir = |path: &Path| {
        std::fs::read_dir(path).map_err(|e| CalibrateError::Image {
            path: path.to_owned(),
            message: format!("cannot list: {e}"),
        })
    };
    let mut class_dirs: Vec<PathBuf> = read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    class_dirs.sort();
    for class_dir in class_dirs {
        let name = class_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let Some(label) = meta.classes.iter().position(|c| *c == name) else {
            return Err(CalibrateError::Invalid(format!(
                "{}: folder {name:?} is not one of the model's classes {:?}",
                dir.display(),
                meta.classes
            )));
        };
        let mut files: Vec<PathBuf> = read_dir(&class_dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        for file in files {
            let bytes = std::fs::read(&file).map_err(|e| CalibrateError::Image {
                path: file.clone(),
                message: e.to_string(),
            })?;
            let tensor =
                preprocess::preprocess_image(&bytes, None, spec, MAX_PIXELS).map_err(|e| {
                    CalibrateError::Image {
                        path: file.clone(),
                        message: e.to_string(),
                    }
                })?;
            values.extend(tensor);
            labels.push(label);
        }
    }
    if labels.is_empty() {
        return Err(CalibrateError::Invalid(format!(
            "{}: no images found; expected DIR/<class name>/*.png",
            dir.display()
        )));
    }
    let n = labels.len();
    Ok(CleanImages {
        tensor: Array4::from_shape_vec((n, spec.channels, spec.height, spec.width), values)
            .map_err(|e| CalibrateError::Invalid(e.to_string()))?,
        labels,
    })
}

/// The stages to read: each chosen stage through its feature map when `spatial` and the model
/// exports it, else through its GAP; the gated stage's GAP last.
pub fn stage_outputs(
    meta: &BundleMeta,
    stages: Option<&[usize]>,
    spatial: bool,
) -> Result<Vec<StageRead>, CalibrateError> {
    let channels = meta.architecture.stage_channels();
    let last = channels.len() - 1;
    let wanted: Vec<usize> = match stages {
        Some(list) => list
            .iter()
            .map(|s| s.saturating_sub(1))
            .filter(|&s| s != last)
            .collect(),
        None => Vec::new(),
    };
    let mut out = Vec::new();
    for stage in wanted {
        let Some(output) = meta.outputs.stages.iter().find(|s| s.stage == stage) else {
            return Err(CalibrateError::Invalid(format!(
                "stage {} is not among the model's outputs ({:?}); re-export with it",
                stage + 1,
                meta.outputs
                    .stages
                    .iter()
                    .map(|s| &s.name)
                    .collect::<Vec<_>>()
            )));
        };
        out.push(StageRead {
            output: output.name.clone(),
            map: output.map.clone().filter(|_| spatial),
            stage,
            channels: channels[stage],
        });
    }
    out.push(StageRead {
        output: meta.outputs.activations.clone(),
        map: None,
        stage: last,
        channels: channels[last],
    });
    Ok(out)
}

/// The model outputs calibration fetches for `stages`: the logits, then each stage's output.
pub fn fetched_outputs(meta: &BundleMeta, stages: &[StageRead]) -> Vec<String> {
    std::iter::once(meta.outputs.logits.clone())
        .chain(stages.iter().map(|read| read.fetched().to_owned()))
        .collect()
}

/// Runs `model` over `images` and collects logits and stage activations.
fn run_model(
    model: &mut Model,
    images: &CleanImages,
    indices: &[usize],
    stages: &[StageRead],
    input_bins: usize,
    batch_size: usize,
) -> Result<CleanOutputs, CalibrateError> {
    let names = fetched_outputs(model.meta(), stages);
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut outputs = CleanOutputs {
        labels: indices.iter().map(|&i| images.labels[i]).collect(),
        bins: input_bins,
        ..CleanOutputs::for_stages(stages)
    };
    let histogram =
        (input_bins > 0).then(|| PixelHistogram::new(model.meta().input.clone(), input_bins));
    for chunk in indices.chunks(batch_size.max(1)) {
        let batch = images.tensor.select(ndarray::Axis(0), chunk);
        if let Some(histogram) = &histogram {
            outputs.histograms.extend(histogram.of_batch(batch.view())?);
        }
        let results = model.run(batch.view(), &name_refs)?;
        let mut results = results.into_iter();
        if let Some(logits) = results.next() {
            outputs.logits.extend(logits.iter());
        }
        for (stage, values) in outputs.stages.iter_mut().zip(results) {
            for row in values.rows() {
                let row = row.as_slice().ok_or_else(|| {
                    CalibrateError::Invalid(format!("output {} is not contiguous", stage.output))
                })?;
                stage.push_image(row)?;
            }
        }
    }
    Ok(outputs)
}

/// Fits the calibration of the bundle at `path` and writes it back atomically.
pub fn calibrate(
    path: &Path,
    model: &mut Model,
    options: &CalibrateOptions,
) -> Result<Calibration, CalibrateError> {
    let meta = model.meta().clone();
    if options.input_bins > csg_bundle::score::MAX_HISTOGRAM_BINS {
        return Err(CalibrateError::Invalid(format!(
            "the input histogram takes at most {} bins, not {}",
            csg_bundle::score::MAX_HISTOGRAM_BINS,
            options.input_bins
        )));
    }
    let stages = stage_outputs(&meta, options.stages.as_deref(), options.spatial)?;
    let images = load_images(&meta, &options.data)?;
    // Alternate images between the two halves: both see every class in proportion.
    let fit_idx: Vec<usize> = (0..images.labels.len()).step_by(2).collect();
    let table_idx: Vec<usize> = (1..images.labels.len()).step_by(2).collect();
    let run = |model: &mut Model, indices: &[usize]| {
        let bins = options.input_bins;
        run_model(model, &images, indices, &stages, bins, options.batch_size)
    };
    let fit_set = run(model, &fit_idx)?;
    let table_set = run(model, &table_idx)?;
    let calibration = fit::fit(&meta, &fit_set, &table_set, &options.fit)?;
    let mut meta = meta;
    meta.calibration = Some(calibration.clone());
    csg_bundle::onnx::write_meta(path, &meta)?;
    Ok(calibration)
}
