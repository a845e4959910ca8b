//! ONNX Runtime: loading the library, creating sessions on the configured execution providers,
//! and running a bundle's graph.
//!
//! Everything here is blocking. The daemon runs each [`Model`] on a thread of its own (one
//! session per thread: `ort`'s `Session::run` takes `&mut self`), and `csgd calibrate` uses the
//! same type directly.
//!
//! The library is loaded dynamically (`ort`'s `load-dynamic`) with `ort::init_from`, which
//! returns an error where `ort::init` would panic, so a missing or incompatible library is a
//! start-up error that says where it looked and how to get one.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use csg_bundle::BundleMeta;
use ndarray::{Array2, ArrayD, ArrayView4, ArrayViewD, CowArray, Ix2};
use ort::ep::{self, ExecutionProviderDispatch};
use ort::session::{OutputSelector, RunOptions, Session};
use ort::value::{TensorElementType, TensorRef};

use crate::config::{Provider, RuntimeConfig};

/// Name of the graph input every bundle has (`[N, C, H, W]`, normalised as the metadata says).
pub const INPUT_NAME: &str = "image";

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(
        "cannot load the ONNX Runtime library {}: {message}. Set runtime.ort_library (or the \
         ORT_DYLIB_PATH environment variable) to a libonnxruntime.so of version 1.31 or newer, \
         or run `.ci/fetch-ort` to download one to .ort/",
        path.display()
    )]
    Library { path: PathBuf, message: String },
    #[error("model file {}: {message}", path.display())]
    ModelFile { path: PathBuf, message: String },
    /// Unreadable or invalid bundle metadata; the message names the file.
    #[error("{message}")]
    Bundle { path: PathBuf, message: String },
    #[error(
        "execution provider {provider:?} could not be used: {message} (set runtime.allow_fallback = true to continue without it)"
    )]
    Provider {
        provider: &'static str,
        message: String,
    },
    #[error("ONNX Runtime could not load {}: {message}", path.display())]
    Session { path: PathBuf, message: String },
    #[error("model {} does not match its bundle metadata: {message}", path.display())]
    Graph { path: PathBuf, message: String },
    #[error("invalid input: {0}")]
    Input(String),
    #[error("inference failed: {0}")]
    Inference(String),
}

/// The process-wide ONNX Runtime environment, created on first use. The library can only be
/// loaded once per process; later calls with another path reuse the first and say so.
static ENVIRONMENT: Mutex<Option<(PathBuf, ort::environment::Environment)>> = Mutex::new(None);

/// Loads the ONNX Runtime library (once per process) and returns the environment.
pub fn environment(cfg: &RuntimeConfig) -> Result<ort::environment::Environment, RuntimeError> {
    let path = absolute(&cfg.ort_library_path());
    let mut guard = ENVIRONMENT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((loaded, env)) = guard.as_ref() {
        if *loaded != path {
            tracing::warn!(
                loaded = %loaded.display(),
                requested = %path.display(),
                "ONNX Runtime is already loaded; keeping the first library"
            );
        }
        return Ok(env.clone());
    }
    let lib_err = |message: String| RuntimeError::Library {
        path: path.clone(),
        message,
    };
    if !path.is_file() {
        return Err(lib_err("no such file".into()));
    }
    let env = ort::init_from(&path)
        .map_err(|e| lib_err(e.to_string()))?
        .with_name("csgd")
        .with_telemetry(false)
        .build()
        .map_err(|e| lib_err(e.to_string()))?;
    tracing::info!(library = %path.display(), "ONNX Runtime loaded");
    *guard = Some((path, env.clone()));
    Ok(env)
}

fn absolute(path: &Path) -> PathBuf {
    if path.is_absolute() {
        return path.to_path_buf();
    }
    std::env::current_dir()
        .map(|cwd| cwd.join(path))
        .unwrap_or_else(|_| path.to_path_buf())
}

/// One ONNX Runtime session of a model bundle, with the bundle's metadata.
pub struct Model {
    session: Session,
    meta: BundleMeta,
    provider: &'static str,
    path: PathBuf,
    outputs: Vec<String>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("path", &self.path)
            .field("name", &self.meta.name)
            .field("provider", &self.provider)
            .finish()
    }
}

impl Model {
    /// Reads the bundle metadata of `path`, creates a session on the first execution provider
    /// of `cfg` that works, and checks that the graph has the input and outputs the metadata
    /// names. The session has every output of the graph.
    pub fn load(path: &Path, cfg: &RuntimeConfig) -> Result<Model, RuntimeError> {
        Self::one(Self::load_graph(path, cfg, None, 1)?)
    }

    /// Like [`Model::load`], for a session that computes only `outputs`: the graph is cut down
    /// to them ([`csg_bundle::prune`]) before ONNX Runtime sees it, since it runs every node
    /// of a graph on every call, asked for or not. The daemon's inference sessions are made
    /// this way; explanations, which read the feature map, keep the whole graph. A model whose
    /// weights live in external files is loaded whole (`run` still checks what is asked).
    pub fn load_for(
        path: &Path,
        cfg: &RuntimeConfig,
        outputs: &[&str],
    ) -> Result<Model, RuntimeError> {
        Self::one(Self::load_graph(path, cfg, Some(outputs), 1)?)
    }

    /// `count` sessions as [`Model::load_for`] makes them, from one reading and one cut of
    /// the graph (the daemon's `runtime.sessions_per_model`).
    pub fn load_sessions_for(
        path: &Path,
        cfg: &RuntimeConfig,
        outputs: &[&str],
        count: usize,
    ) -> Result<Vec<Model>, RuntimeError> {
        Self::load_graph(path, cfg, Some(outputs), count)
    }

    fn one(mut models: Vec<Model>) -> Result<Model, RuntimeError> {
        models.pop().ok_or_else(|| RuntimeError::Provider {
            provider: "config",
            message: "no session was created".into(),
        })
    }

    fn load_graph(
        path: &Path,
        cfg: &RuntimeConfig,
        keep: Option<&[&str]>,
        count: usize,
    ) -> Result<Vec<Model>, RuntimeError> {
        cfg.validate().map_err(|e| RuntimeError::Provider {
            provider: "config",
            message: e.to_string(),
        })?;
        // `None` (also for weights in external files, which ONNX Runtime reads relative to
        // the file): the whole graph, from the file.
        let (meta, pruned) = match keep {
            None => (read_bundle_meta(path)?, None),
            Some(keep) => read_cut(path, keep)?,
        };
        let env = environment(cfg)?;
        let bytes = pruned.as_ref().map(|p| p.bytes.as_slice());
        let mut models = Vec::with_capacity(count);
        for _ in 0..count {
            let (session, provider) = create_session(&env, path, bytes, cfg)?;
            let outputs: Vec<String> = session
                .outputs()
                .iter()
                .map(|o| o.name().to_owned())
                .collect();
            let graph_outputs = pruned
                .as_ref()
                .map_or_else(|| outputs.clone(), |p| p.graph_outputs.clone());
            let model = Model {
                outputs,
                session,
                meta: meta.clone(),
                provider,
                path: path.to_path_buf(),
            };
            model.check_graph(&graph_outputs)?;
            tracing::debug!(model = %path.display(), provider, "session created");
            models.push(model);
        }
        Ok(models)
    }

    pub fn meta(&self) -> &BundleMeta {
        &self.meta
    }

    /// The execution provider in use: the first configured one that registered.
    pub fn provider(&self) -> &str {
        self.provider
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The graph's output names.
    pub fn output_names(&self) -> &[String] {
        &self.outputs
    }

    /// Runs a batch `[N, C, H, W]` and returns the requested outputs, each flattened to
    /// `[N, D]` (a stage's `[N, C, h, w]` feature map becomes `[N, C·h·w]`, channel planes in
    /// order), in the order requested (e.g. `["logits", "stage2_activations", "activations"]`).
    pub fn run(
        &mut self,
        input: ArrayView4<f32>,
        outputs: &[&str],
    ) -> Result<Vec<Array2<f32>>, RuntimeError> {
        self.run_with(input, outputs, |i, view| {
            Ok(flatten(view, outputs[i])?.into_owned())
        })
    }

    /// Like [`Model::run`] for outputs of any rank (each `[N, …]`), such as the `[N, K, h, w]`
    /// feature map that explanations fetch.
    pub fn run_any(
        &mut self,
        input: ArrayView4<f32>,
        outputs: &[&str],
    ) -> Result<Vec<ArrayD<f32>>, RuntimeError> {
        self.run_with(input, outputs, |_, view| Ok(view.to_owned()))
    }

    /// Runs a batch and hands each requested output, in order, to `take` as a view of ONNX
    /// Runtime's own buffer (`[N, …]`, N checked), collecting what it returns. A caller
    /// that only needs a summary of a large output (a feature map's statistics) reads it
    /// there, without copying it first.
    pub fn run_with<T>(
        &mut self,
        input: ArrayView4<f32>,
        outputs: &[&str],
        mut take: impl FnMut(usize, ArrayViewD<'_, f32>) -> Result<T, RuntimeError>,
    ) -> Result<Vec<T>, RuntimeError> {
        let spec = &self.meta.input;
        let (n, c, h, w) = input.dim();
        if n == 0 || (c, h, w) != (spec.channels, spec.height, spec.width) {
            return Err(RuntimeError::Input(format!(
                "batch has shape [{n}, {c}, {h}, {w}]; the model takes [N ≥ 1, {}, {}, {}]",
                spec.channels, spec.height, spec.width
            )));
        }
        if outputs.is_empty() {
            return Ok(Vec::new());
        }
        let mut selector = OutputSelector::no_default();
        for name in outputs {
            if !self.outputs.iter().any(|o| o == name) {
                return Err(RuntimeError::Input(format!(
                    "the model has no output {name:?} (it has {:?})",
                    self.outputs
                )));
            }
            selector = selector.with(*name);
        }
        let options = RunOptions::new()
            .map_err(|e| RuntimeError::Inference(e.to_string()))?
            .with_outputs(selector);
        let contiguous = input.as_standard_layout();
        let tensor = TensorRef::from_array_view(contiguous.view())
            .map_err(|e| RuntimeError::Inference(e.to_string()))?;
        let results = self
            .session
            .run_with_options(ort::inputs![INPUT_NAME => tensor], &options)
            .map_err(|e| RuntimeError::Inference(e.to_string()))?;
        outputs
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let value = results.get(name).ok_or_else(|| {
                    RuntimeError::Inference(format!("ONNX Runtime returned no {name:?}"))
                })?;
                let view = value
                    .try_extract_array::<f32>()
                    .map_err(|e| RuntimeError::Inference(format!("output {name:?}: {e}")))?;
                if view.shape().first() != Some(&n) {
                    return Err(RuntimeError::Inference(format!(
                        "output {name:?} has shape {:?} for a batch of {n}",
                        view.shape()
                    )));
                }
                take(i, view)
            })
            .collect()
    }

    /// The graph must take `image` as f32 `[N, C, H, W]` matching the input spec (a dynamic
    /// dimension matches anything) and produce every output the metadata names
    /// (`graph_outputs`: the file's, before any cut).
    fn check_graph(&self, graph_outputs: &[String]) -> Result<(), RuntimeError> {
        let bad = |message: String| RuntimeError::Graph {
            path: self.path.clone(),
            message,
        };
        let inputs = self.session.inputs();
        let Some(input) = inputs.iter().find(|i| i.name() == INPUT_NAME) else {
            return Err(bad(format!(
                "the graph has no input {INPUT_NAME:?} (inputs: {:?})",
                inputs.iter().map(|i| i.name()).collect::<Vec<_>>()
            )));
        };
        if input.dtype().tensor_type() != Some(TensorElementType::Float32) {
            return Err(bad(format!("input {INPUT_NAME:?} is not a float32 tensor")));
        }
        let spec = &self.meta.input;
        let want = [
            -1,
            spec.channels as i64,
            spec.height as i64,
            spec.width as i64,
        ];
        let dims: Vec<i64> = input
            .dtype()
            .tensor_shape()
            .map(|s| s.to_vec())
            .unwrap_or_default();
        let fits = dims.len() == 4 && dims.iter().zip(want).skip(1).all(|(&d, w)| d < 0 || d == w);
        if !fits {
            return Err(bad(format!(
                "input {INPUT_NAME:?} has shape {dims:?}; the metadata's input spec says [N, {}, {}, {}]",
                spec.channels, spec.height, spec.width
            )));
        }
        let o = &self.meta.outputs;
        let named = [&o.logits, &o.activations]
            .into_iter()
            .chain(o.stages.iter().map(|s| &s.name));
        for name in named {
            if !graph_outputs.iter().any(|x| x == name) {
                return Err(bad(format!(
                    "the metadata names output {name:?}, the graph has {graph_outputs:?}"
                )));
            }
        }
        Ok(())
    }
}

/// Reads and validates a bundle's metadata, with errors that name the file and the problem.
pub fn read_bundle_meta(path: &Path) -> Result<BundleMeta, RuntimeError> {
    check_model_file(path)?;
    csg_bundle::onnx::read_meta(path).map_err(|e| bundle_error(path, e))
}

/// A bundle's metadata and its graph cut down to `keep` ([`csg_bundle::prune::pruned`]), from
/// one parse of the file: the metadata alone is a scan of the whole file too.
fn read_cut(
    path: &Path,
    keep: &[&str],
) -> Result<(BundleMeta, Option<csg_bundle::prune::Pruned>), RuntimeError> {
    check_model_file(path)?;
    let model = csg_bundle::onnx::read_model(path).map_err(|e| bundle_error(path, e))?;
    let meta = csg_bundle::onnx::meta_of_model(&model, path).map_err(|e| bundle_error(path, e))?;
    let pruned = csg_bundle::prune::pruned(model, keep).map_err(|e| RuntimeError::Graph {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    Ok((meta, pruned))
}

/// A model path that is not a readable file, as an error naming it.
fn check_model_file(path: &Path) -> Result<(), RuntimeError> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => {}
        Ok(_) => {
            return Err(RuntimeError::ModelFile {
                path: path.to_path_buf(),
                message: "is not a file".into(),
            });
        }
        Err(e) => {
            return Err(RuntimeError::ModelFile {
                path: path.to_path_buf(),
                message: format!("{e} (export one with `csg-export export`)"),
            });
        }
    }
    Ok(())
}

/// A bundle that cannot be read, as an error whose message names the file.
fn bundle_error(path: &Path, e: csg_bundle::BundleError) -> RuntimeError {
    let text = e.to_string();
    let message = if text.contains(&path.display().to_string()) {
        text
    } else {
        format!("model {}: {text}", path.display())
    };
    RuntimeError::Bundle {
        path: path.to_path_buf(),
        message,
    }
}

fn dispatch(provider: Provider, cfg: &RuntimeConfig) -> ExecutionProviderDispatch {
    match provider {
        Provider::Cpu => ep::CPU::default().with_arena_allocator(true).build(),
        #[cfg(feature = "gpu")]
        Provider::Cuda => ep::CUDA::default().with_device_id(cfg.device_id).build(),
        #[cfg(feature = "gpu")]
        Provider::Tensorrt => {
            let mut trt = ep::TensorRT::default()
                .with_device_id(cfg.device_id)
                .with_fp16(cfg.trt_fp16);
            if !cfg.trt_engine_cache.trim().is_empty() {
                trt = trt
                    .with_engine_cache(true)
                    .with_engine_cache_path(cfg.trt_engine_cache.trim());
            }
            trt.build()
        }
        // Rejected by `RuntimeConfig::validate` on builds without the `gpu` feature.
        #[cfg(not(feature = "gpu"))]
        Provider::Cuda | Provider::Tensorrt => {
            let _ = cfg;
            ep::CPU::default().build()
        }
    }
    .error_on_failure()
}

/// Creates a session on the configured providers. Each provider is registered explicitly so
/// that a failure is seen (ONNX Runtime's default is to fall back to CPU silently): without
/// `allow_fallback` it is an error naming the provider; with it, the provider is dropped and
/// the rest are tried. A GPU provider that registers but cannot create the session is handled
/// the same way. `bytes`, where given, is the graph to load instead of the file's (a cut-down
/// one). Returns the session and the first provider that registered.
fn create_session(
    env: &ort::environment::Environment,
    path: &Path,
    bytes: Option<&[u8]>,
    cfg: &RuntimeConfig,
) -> Result<(Session, &'static str), RuntimeError> {
    let session_err = |message: String| RuntimeError::Session {
        path: path.to_path_buf(),
        message,
    };
    let mut candidates = cfg.execution_providers.clone();
    loop {
        let mut builder = Session::builder(env)
            .and_then(|b| {
                b.with_intra_threads(cfg.intra_threads())
                    .map_err(Into::into)
            })
            .and_then(|b| b.with_inter_threads(1).map_err(Into::into))
            .and_then(|b| {
                b.with_intra_op_spinning(cfg.intra_op_spinning.at_creation())
                    .map_err(Into::into)
            })
            .map_err(|e: ort::Error| session_err(e.to_string()))?;
        let mut registered: Vec<Provider> = Vec::new();
        let mut failed = None;
        for &p in &candidates {
            match dispatch(p, cfg).register(&mut builder) {
                Ok(()) => registered.push(p),
                Err(e) => {
                    failed = Some((p, e.to_string()));
                    break;
                }
            }
        }
        if let Some((p, message)) = failed {
            if !cfg.allow_fallback {
                return Err(RuntimeError::Provider {
                    provider: p.name(),
                    message,
                });
            }
            tracing::warn!(provider = p.name(), %message, "execution provider unavailable; falling back");
            candidates.retain(|&c| c != p);
            continue;
        }
        let committed = match bytes {
            Some(bytes) => builder.commit_from_memory(bytes),
            None => builder.commit_from_file(path),
        };
        match committed {
            Ok(session) => {
                let in_use = registered.first().map_or("cpu", |p| p.name());
                return Ok((session, in_use));
            }
            Err(e) => {
                let gpu = registered.iter().copied().find(|&p| p != Provider::Cpu);
                match gpu {
                    Some(p) if cfg.allow_fallback => {
                        tracing::warn!(provider = p.name(), error = %e, "session creation failed on provider; falling back");
                        candidates.retain(|&c| c != p);
                    }
                    _ => return Err(session_err(e.to_string())),
                }
            }
        }
    }
}

/// An `[N, …]` output as `[N, D]` (D the product of the rest), without copying when it is
/// already in standard layout (ONNX Runtime's outputs are).
pub fn flatten<'a>(
    view: ArrayViewD<'a, f32>,
    name: &str,
) -> Result<CowArray<'a, f32, Ix2>, RuntimeError> {
    let shape = view.shape().to_vec();
    let bad = || {
        RuntimeError::Inference(format!(
            "output {name:?} has shape {shape:?}, expected [N, …] with N ≥ 1"
        ))
    };
    if shape.len() < 2 {
        return Err(bad());
    }
    let rows = shape[0];
    let width = shape[1..].iter().product::<usize>();
    if view.is_standard_layout() {
        let flat = view
            .into_shape_with_order((rows, width))
            .map_err(|_| bad())?;
        Ok(CowArray::from(flat))
    } else {
        let owned = view.as_standard_layout().into_owned();
        let flat = owned
            .into_shape_with_order((rows, width))
            .map_err(|_| bad())?;
        Ok(CowArray::from(flat))
    }
}
