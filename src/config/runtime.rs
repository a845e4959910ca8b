//! The `[runtime]` section: how ONNX Runtime runs the models (library, execution providers,
//! intra-op threads and their spinning, sessions per model). Also what `csgd calibrate` and
//! the benchmarks configure sessions with, hence its own [`Default`].

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, DEFAULT_ORT_LIBRARY, cores, invalid};

/// An ONNX Runtime execution provider. All three parse in every build so that a config
/// naming a GPU provider on a CPU-only build is rejected with a reason, not a parse error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Cpu,
    Cuda,
    Tensorrt,
}

impl Provider {
    pub fn name(self) -> &'static str {
        match self {
            Provider::Cpu => "cpu",
            Provider::Cuda => "cuda",
            Provider::Tensorrt => "tensorrt",
        }
    }

    /// Whether this build can register the provider at all.
    pub fn compiled_in(self) -> bool {
        match self {
            Provider::Cpu => true,
            Provider::Cuda | Provider::Tensorrt => cfg!(feature = "gpu"),
        }
    }
}

/// Whether ONNX Runtime's idle intra-op threads busy-wait (spin) for the next piece of work
/// instead of sleeping (`runtime.intra_op_spinning`).
///
/// Neither is right for every model, as measured on two cores (README, Performance): for the
/// tiny Fashion-MNIST model, spinning threads took a fifth of the CPU from decoding and HTTP
/// and made the tail at half load several times longer; for a ResNet-18 at 128×128, threads
/// that sleep between the operators of one call are woken late, and one image took 8 ms
/// instead of 4 ms at low load. `auto` measures the model's forward pass at load and spins
/// only where one image takes at least [`SPIN_FROM_FORWARD`]: there the spinning is a small
/// share of real work. Written `"auto"`, `"on"`/`true` or `"off"`/`false`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Spinning {
    Off,
    On,
    Auto,
}

/// Under [`Spinning::Auto`], a model whose forward pass of one image takes at least this long
/// gets spinning threads (measured at load: the tiny model 0.11–0.15 ms, ResNet-18 at 128×128
/// 5.0 ms).
pub const SPIN_FROM_FORWARD: Duration = Duration::from_millis(1);

impl Spinning {
    /// What a session is created with before (or without) `auto`'s measurement: off.
    pub fn at_creation(self) -> bool {
        self == Spinning::On
    }
}

impl From<bool> for Spinning {
    fn from(on: bool) -> Self {
        if on { Spinning::On } else { Spinning::Off }
    }
}

impl<'de> Deserialize<'de> for Spinning {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Flag(bool),
            Word(String),
        }
        match Written::deserialize(d)? {
            Written::Flag(on) => Ok(Spinning::from(on)),
            Written::Word(word) => match word.trim().to_ascii_lowercase().as_str() {
                "on" | "true" => Ok(Spinning::On),
                "off" | "false" => Ok(Spinning::Off),
                "auto" => Ok(Spinning::Auto),
                other => Err(serde::de::Error::custom(format!(
                    "intra_op_spinning must be \"auto\", \"on\" or \"off\" (or true/false), not {other:?}"
                ))),
            },
        }
    }
}

/// How models are run. Also used by `csgd calibrate`, hence its own [`Default`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Empty: `ORT_DYLIB_PATH`, else [`DEFAULT_ORT_LIBRARY`].
    pub ort_library: String,
    pub execution_providers: Vec<Provider>,
    pub allow_fallback: bool,
    pub device_id: i32,
    pub trt_fp16: bool,
    /// Empty: no engine cache.
    pub trt_engine_cache: String,
    /// 0: cores / sessions_per_model.
    pub intra_op_threads: usize,
    /// Whether idle intra-op threads busy-wait for work; `auto` by default (see [`Spinning`]).
    pub intra_op_spinning: Spinning,
    pub sessions_per_model: usize,
}

impl Default for RuntimeConfig {
    /// The values of `config/default.toml` (a unit test keeps the two equal).
    fn default() -> Self {
        Self {
            ort_library: String::new(),
            execution_providers: vec![Provider::Cpu],
            allow_fallback: false,
            device_id: 0,
            trt_fp16: false,
            trt_engine_cache: String::new(),
            intra_op_threads: 0,
            intra_op_spinning: Spinning::Auto,
            sessions_per_model: 1,
        }
    }
}

impl RuntimeConfig {
    /// The ONNX Runtime library to load: the configured path, else `ORT_DYLIB_PATH`, else
    /// [`DEFAULT_ORT_LIBRARY`] relative to the working directory.
    pub fn ort_library_path(&self) -> PathBuf {
        if !self.ort_library.trim().is_empty() {
            return PathBuf::from(self.ort_library.trim());
        }
        match std::env::var_os("ORT_DYLIB_PATH") {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => PathBuf::from(DEFAULT_ORT_LIBRARY),
        }
    }

    /// Intra-op threads per session, resolving 0 from the core count.
    pub fn intra_threads(&self) -> usize {
        if self.intra_op_threads > 0 {
            return self.intra_op_threads;
        }
        (cores() / self.sessions_per_model.max(1)).max(1)
    }

    /// Checks this section; shared with `csgd calibrate`, which has no other sections.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.execution_providers.is_empty() {
            return Err(invalid(
                "runtime.execution_providers",
                "must list at least one provider, e.g. [\"cpu\"]",
            ));
        }
        let mut seen = HashSet::new();
        for p in &self.execution_providers {
            if !seen.insert(*p) {
                return Err(invalid(
                    "runtime.execution_providers",
                    format!("lists {:?} twice", p.name()),
                ));
            }
            if !p.compiled_in() {
                return Err(invalid(
                    "runtime.execution_providers",
                    format!(
                        "names {:?}, which this build cannot use: rebuild with `--features gpu` \
                         (and the onnxruntime-gpu library), or list only \"cpu\"",
                        p.name()
                    ),
                ));
            }
        }
        if self.device_id < 0 {
            return Err(invalid("runtime.device_id", "must be ≥ 0"));
        }
        if self.sessions_per_model == 0 {
            return Err(invalid("runtime.sessions_per_model", "must be ≥ 1"));
        }
        if self.sessions_per_model > 256 {
            return Err(invalid("runtime.sessions_per_model", "must be ≤ 256"));
        }
        if self.intra_op_threads > 1024 {
            return Err(invalid("runtime.intra_op_threads", "must be ≤ 1024"));
        }
        Ok(())
    }
}
