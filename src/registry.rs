//! The served models: loading their sessions, warming them up, and the name → model table the
//! HTTP layer reads.
//!
//! Loading is split so that cheap checks (library, model files, metadata) fail before the
//! daemon binds a port ([`preflight`]), the slow part (sessions, a dummy batch through each)
//! runs on a blocking thread while `/health/live` already answers ([`load_sessions`]), and the
//! batching tasks start on the async runtime once everything works ([`start`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use csg_bundle::BundleMeta;
use ndarray::Array4;

use crate::batch::{Batcher, Limits, ModelRunner, Runner};
use crate::config::{ModelEntry, Provider, RuntimeConfig, SPIN_FROM_FORWARD, Settings, Spinning};
use crate::detect::{DetectError, Detector};
use crate::explain::{ExplainError, ExplainSession, Explainer};
use crate::metrics::{Metrics, VerdictMetrics};
use crate::runtime::{self, Model, RuntimeError};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("model {name:?}: {error}")]
    Runtime { name: String, error: RuntimeError },
    #[error("model {name:?}: {error}")]
    Detector { name: String, error: DetectError },
    #[error("model {name:?}: warm-up failed: {message}")]
    Warmup { name: String, message: String },
    #[error("model {name:?}: explanation session: {error}")]
    Explain { name: String, error: ExplainError },
    #[error(transparent)]
    Library(RuntimeError),
}

/// One model as served: its metadata, detector and batching queue.
#[derive(Debug)]
pub struct ServedModel {
    pub name: String,
    pub path: PathBuf,
    pub meta: BundleMeta,
    pub detector: Detector,
    pub provider: String,
    pub sessions: usize,
    pub spinning: SpinningChoice,
    /// Graph outputs fetched per image: `logits`, then the detector's stage outputs.
    pub outputs: Vec<String>,
    pub batcher: Batcher,
    pub verdict_metrics: VerdictMetrics,
    /// The explanation session, or why the model cannot be explained.
    pub explain: Result<ExplainSession, String>,
}

impl ServedModel {
    /// Label values of this model's `csgd_model_info` series: name, version, provider,
    /// verdict score, calibrated.
    pub fn info_labels(&self) -> [String; 5] {
        [
            self.name.clone(),
            self.meta.version.clone(),
            self.provider.clone(),
            self.detector.score_name().to_owned(),
            self.detector.is_calibrated().to_string(),
        ]
    }
}

/// The name → model table, complete once every model is warmed up.
#[derive(Debug)]
pub struct Registry {
    models: BTreeMap<String, Arc<ServedModel>>,
    default: String,
}

impl Registry {
    pub fn get(&self, name: &str) -> Option<&Arc<ServedModel>> {
        self.models.get(name)
    }

    pub fn default_model(&self) -> Option<&Arc<ServedModel>> {
        self.models.get(&self.default)
    }

    pub fn default_name(&self) -> &str {
        &self.default
    }

    pub fn names(&self) -> Vec<&str> {
        self.models.keys().map(String::as_str).collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<ServedModel>> {
        self.models.values()
    }
}

/// A model whose sessions are created and warmed up, not yet serving.
pub struct Loaded {
    entry: ModelEntry,
    path: PathBuf,
    meta: BundleMeta,
    detector: Detector,
    /// One runner per session, each warmed up.
    runners: Vec<ModelRunner>,
    spinning: SpinningChoice,
    explain: Result<ExplainSession, String>,
}

/// How a model's inference sessions were made as to `runtime.intra_op_spinning`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpinningChoice {
    /// As configured.
    pub mode: Spinning,
    /// Whether the sessions' intra-op threads spin.
    pub enabled: bool,
    /// Under `auto`: the forward pass of one image it was decided on.
    pub forward: Option<Duration>,
}

/// Forward passes timed for `runtime.intra_op_spinning = "auto"`; the median decides.
const FORWARD_PROBES: usize = 5;

/// The median time of [`FORWARD_PROBES`] one-image batches through `runner` (already warmed
/// up), the path requests take.
fn forward_time(runner: &mut ModelRunner, meta: &BundleMeta) -> Result<Duration, String> {
    let spec = &meta.input;
    let input = Array4::<f32>::zeros((1, spec.channels, spec.height, spec.width));
    let mut times = Vec::with_capacity(FORWARD_PROBES);
    for _ in 0..FORWARD_PROBES {
        let started = Instant::now();
        runner.run(input.view())?;
        times.push(started.elapsed());
    }
    times.sort_unstable();
    Ok(times[times.len() / 2])
}

/// Model paths are relative to the working directory.
fn model_path(entry: &ModelEntry) -> PathBuf {
    match std::env::current_dir() {
        Ok(cwd) => crate::config::resolve(&cwd, &entry.path),
        Err(_) => entry.path.clone(),
    }
}

/// Fast checks before binding: the ONNX Runtime library loads, every model file exists and
/// has valid bundle metadata, and its calibration (if any) fits the model.
pub fn preflight(settings: &Settings) -> Result<(), RegistryError> {
    runtime::environment(&settings.runtime).map_err(RegistryError::Library)?;
    for entry in &settings.models.list {
        let meta = runtime::read_bundle_meta(&model_path(entry)).map_err(|error| {
            RegistryError::Runtime {
                name: entry.name.clone(),
                error,
            }
        })?;
        Detector::new(&meta, entry.score).map_err(|error| RegistryError::Detector {
            name: entry.name.clone(),
            error,
        })?;
    }
    Ok(())
}

/// Creates every model's sessions and runs one dummy batch through each (blocking).
pub fn load_sessions(settings: &Settings) -> Result<Vec<Loaded>, RegistryError> {
    let mut loaded = Vec::new();
    for entry in &settings.models.list {
        let name = entry.name.clone();
        let path = model_path(entry);
        let runtime_err = |error| RegistryError::Runtime {
            name: name.clone(),
            error,
        };
        let meta = crate::runtime::read_bundle_meta(&path).map_err(runtime_err)?;
        let detector =
            Detector::new(&meta, entry.score).map_err(|error| RegistryError::Detector {
                name: name.clone(),
                error,
            })?;
        let (runners, spinning) =
            inference_runners(&name, &path, &meta, &detector, &settings.runtime)?;
        let Some(provider) = runners.first().map(|r| r.model().provider().to_owned()) else {
            return Err(RegistryError::Warmup {
                name,
                message: "no sessions (runtime.sessions_per_model)".into(),
            });
        };
        let explain = explain_session(&name, &path, &meta, &detector, settings)?;
        tracing::info!(
            model = %name,
            path = %path.display(),
            version = %meta.version,
            provider,
            sessions = runners.len(),
            calibrated = detector.is_calibrated(),
            score = detector.score_name(),
            explain = explain.is_ok(),
            intra_op_spinning = spinning.enabled,
            forward_ms = spinning.forward.map(|f| f.as_secs_f64() * 1e3),
            "model loaded and warmed up"
        );
        loaded.push(Loaded {
            entry: entry.clone(),
            path,
            meta,
            detector,
            runners,
            spinning,
            explain,
        });
    }
    Ok(loaded)
}

/// The model's inference sessions, each warmed up, whose intra-op threads spin or sleep as
/// `runtime.intra_op_spinning` says: under `auto` (on the CPU provider) as one image's
/// forward pass, timed here, is slower than [`SPIN_FROM_FORWARD`] or not.
fn inference_runners(
    name: &str,
    path: &Path,
    meta: &BundleMeta,
    detector: &Detector,
    runtime: &RuntimeConfig,
) -> Result<(Vec<ModelRunner>, SpinningChoice), RegistryError> {
    // The inference sessions compute only what the detector reads.
    let outputs = detector.fetched_outputs(&meta.outputs.logits);
    let names: Vec<&str> = outputs.iter().map(String::as_str).collect();
    let warmup_err = |message| RegistryError::Warmup {
        name: name.to_owned(),
        message,
    };
    let load = |spinning: Spinning| -> Result<Vec<ModelRunner>, RegistryError> {
        let runtime = RuntimeConfig {
            intra_op_spinning: spinning,
            ..runtime.clone()
        };
        let models = Model::load_sessions_for(path, &runtime, &names, runtime.sessions_per_model)
            .map_err(|error| RegistryError::Runtime {
            name: name.to_owned(),
            error,
        })?;
        let mut runners = Vec::new();
        for model in models {
            let mut runner = ModelRunner::new(model, detector);
            warm_up(&mut runner, meta, detector).map_err(warmup_err)?;
            runners.push(runner);
        }
        Ok(runners)
    };
    let mode = runtime.intra_op_spinning;
    if mode != Spinning::Auto || runtime.execution_providers.first() != Some(&Provider::Cpu) {
        let choice = SpinningChoice {
            mode,
            enabled: mode.at_creation(),
            forward: None,
        };
        return Ok((load(mode)?, choice));
    }
    // Created spinning, so that the time measured is the work's, not the wake-ups'; made
    // again with sleeping threads where the work is too small to pay for the spinning.
    let mut runners = load(Spinning::On)?;
    let forward = match runners.first_mut() {
        Some(runner) => forward_time(runner, meta).map_err(warmup_err)?,
        None => Duration::ZERO,
    };
    let enabled = forward >= SPIN_FROM_FORWARD;
    if !enabled {
        drop(runners);
        runners = load(Spinning::Off)?;
    }
    let choice = SpinningChoice {
        mode,
        enabled,
        forward: Some(forward),
    };
    Ok((runners, choice))
}

/// A session for explanations, when the bundle supports them. A bundle without the feature
/// map (or, for a standard model, without the calibration that supplies its gate) is served
/// without explanations and says why; a session that fails to load or warm up is an error.
fn explain_session(
    name: &str,
    path: &Path,
    meta: &BundleMeta,
    detector: &Detector,
    settings: &Settings,
) -> Result<Result<ExplainSession, String>, RegistryError> {
    let explain_err = |error| RegistryError::Explain {
        name: name.to_owned(),
        error,
    };
    let explainer = match Explainer::new(meta, detector.clone(), path) {
        Ok(e) => e,
        Err(ExplainError::Unavailable(why)) => {
            tracing::warn!(model = %name, "explanations unavailable: {why}");
            return Ok(Err(why));
        }
        Err(e) => return Err(explain_err(e)),
    };
    let model = Model::load(path, &settings.runtime).map_err(|error| RegistryError::Runtime {
        name: name.to_owned(),
        error,
    })?;
    ExplainSession::new(explainer, model)
        .map(Ok)
        .map_err(explain_err)
}

/// Runs a zero batch through `runner`, the path requests take, and checks every output's
/// width against the metadata, so that a graph whose outputs disagree with its bundle fails
/// here rather than on a request.
fn warm_up(runner: &mut ModelRunner, meta: &BundleMeta, detector: &Detector) -> Result<(), String> {
    let spec = &meta.input;
    let input = Array4::<f32>::zeros((1, spec.channels, spec.height, spec.width));
    let result = runner.run(input.view())?;
    let expected_width = |name: &str| -> Option<usize> {
        if name == meta.outputs.logits {
            Some(meta.classes.len())
        } else if name == meta.outputs.activations {
            Some(meta.architecture.filters())
        } else {
            meta.outputs
                .stages
                .iter()
                .find(|s| s.name == name)
                .map(|s| s.channels)
        }
    };
    for (name, array) in runner.outputs().iter().zip(&result) {
        if let Some(want) = expected_width(name)
            && array.ncols() != want
        {
            return Err(format!(
                "output {name:?} has {} values per image, the metadata implies {want}",
                array.ncols()
            ));
        }
    }
    let rows: Vec<Vec<f32>> = result.iter().map(|a| a.row(0).to_vec()).collect();
    let verdict = detector.judge(&detector.sample(&rows).map_err(|e| e.to_string())?);
    tracing::debug!(
        class = verdict.class_id,
        score = verdict.score,
        "warm-up verdict"
    );
    Ok(())
}

/// Starts each model's batching task and session threads (needs the tokio runtime).
pub fn start(loaded: Vec<Loaded>, settings: &Settings, metrics: &Arc<Metrics>) -> Registry {
    let limits = Limits {
        max_batch_size: settings.batching.max_batch_size,
        max_wait: settings.batching.max_wait(),
        queue_capacity: settings.batching.queue_capacity,
    };
    let mut models = BTreeMap::new();
    for l in loaded {
        let name = l.entry.name.clone();
        let provider = l
            .runners
            .first()
            .map_or("cpu", |r| r.model().provider())
            .to_owned();
        let sessions = l.runners.len();
        let outputs = l
            .runners
            .first()
            .map(|r| r.outputs().to_vec())
            .unwrap_or_default();
        let spec = &l.meta.input;
        let shape = [spec.channels, spec.height, spec.width];
        let batcher = Batcher::start(&name, l.runners, shape, limits, Arc::clone(metrics));
        let verdict_metrics =
            VerdictMetrics::new(metrics, &name, &l.meta.classes, l.detector.score_name());
        let model = ServedModel {
            name: name.clone(),
            path: l.path,
            meta: l.meta,
            detector: l.detector,
            provider,
            sessions,
            spinning: l.spinning,
            outputs,
            batcher,
            verdict_metrics,
            explain: l.explain,
        };
        let labels = model.info_labels();
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        metrics.model_info.with_label_values(&labels).set(1.0);
        metrics.queue_depth.with_label_values(&[&name]).set(0);
        models.insert(name, Arc::new(model));
    }
    Registry {
        models,
        default: settings.models.default_name().to_owned(),
    }
}
