//! The daemon's configuration: typed sections, layered sources, validation.
//!
//! Sources, each overriding the one before: the embedded `config/default.toml` (which documents
//! every key), an optional file (`--config`), environment variables `CSGD_<SECTION>__<KEY>`,
//! then command-line flags. Layering is done by the `config` crate on untyped values, then the
//! result is deserialised into [`Settings`] (unknown keys are rejected, so a typo in a file is an
//! error rather than a silently ignored setting) and checked by [`Settings::validate`], which
//! names the offending key. All of this happens before anything binds a port or loads a model.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use config::{Config, Environment, File, FileFormat};
use serde::{Deserialize, Serialize};

use crate::detect::ScoreKind;

mod admin;
mod proxy;
mod runtime;
mod threads;
pub use admin::{AdminConfig, Secret};
pub use proxy::{FailurePolicy, ImageSource, Policy, ProxyConfig, ProxyRoute};
pub use runtime::{Provider, RuntimeConfig, SPIN_FROM_FORWARD, Spinning};
pub use threads::{ThreadsConfig, cores};

/// The documented defaults, compiled in.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

/// Prefix of the environment variables that override keys.
pub const ENV_PREFIX: &str = "CSGD";

/// Where the ONNX Runtime library is looked for when neither the config nor `ORT_DYLIB_PATH`
/// names one (what `.ci/fetch-ort` installs).
pub const DEFAULT_ORT_LIBRARY: &str = ".ort/libonnxruntime.so";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value that parsed but is not acceptable; `key` is the dotted config key.
    #[error("{key} {message}")]
    Invalid { key: String, message: String },
    /// The sources could not be read or merged, or a value has the wrong type.
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("config file {}: {message}", path.display())]
    File { path: PathBuf, message: String },
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        message: message.into(),
    }
}

/// Everything `csgd serve` is configured with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub server: ServerConfig,
    pub models: ModelsConfig,
    pub runtime: RuntimeConfig,
    pub batching: BatchingConfig,
    pub threads: ThreadsConfig,
    pub logging: LoggingConfig,
    pub proxy: ProxyConfig,
    pub admin: AdminConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: String,
    /// Empty: no separate metrics port.
    pub metrics_listen: String,
    pub body_limit_bytes: usize,
    pub max_pixels: u64,
    pub max_images_per_request: usize,
    pub request_timeout_ms: u64,
    pub max_concurrent_requests: usize,
    pub shutdown_grace_seconds: u64,
    pub max_connections: usize,
    pub header_read_timeout_ms: u64,
    pub max_header_bytes: usize,
}

impl ServerConfig {
    /// The API address (valid after [`Settings::validate`]).
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        parse_addr("server.listen", &self.listen)
    }

    /// The separate metrics address, if one is configured.
    pub fn metrics_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        if self.metrics_listen.trim().is_empty() {
            return Ok(None);
        }
        parse_addr("server.metrics_listen", &self.metrics_listen).map(Some)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// The limits of each listener's connections.
    pub fn connection_limits(&self) -> crate::listener::ConnectionLimits {
        crate::listener::ConnectionLimits {
            max_connections: self.max_connections,
            header_read_timeout: Duration::from_millis(self.header_read_timeout_ms),
            max_header_bytes: self.max_header_bytes,
        }
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_seconds)
    }
}

fn parse_addr(key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.trim().parse().map_err(|_| {
        invalid(
            key,
            format!("must be an IP address and port such as 127.0.0.1:8080, not {value:?}"),
        )
    })
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelsConfig {
    /// Name of the model behind `/v1/detect`; empty means the first of `list`.
    #[serde(default)]
    pub default: String,
    pub list: Vec<ModelEntry>,
}

impl ModelsConfig {
    /// The default model's name (valid after [`Settings::validate`]).
    pub fn default_name(&self) -> &str {
        if self.default.is_empty() {
            self.list.first().map_or("", |m| m.name.as_str())
        } else {
            &self.default
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    pub name: String,
    pub path: PathBuf,
    #[serde(default = "default_score")]
    pub score: ScoreKind,
}

fn default_score() -> ScoreKind {
    ScoreKind::Combined
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchingConfig {
    /// Most images in one ONNX Runtime call.
    pub max_batch_size: usize,
    /// How long a batch's first image waits for company while a session is idle; a batch
    /// keeps filling anyway while every session is busy (`batch::gather`).
    pub max_wait_us: u64,
    /// Images that may wait in a model's queue before requests are answered 429.
    pub queue_capacity: usize,
}

impl BatchingConfig {
    pub fn max_wait(&self) -> Duration {
        Duration::from_micros(self.max_wait_us)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggingConfig {
    pub format: LogFormat,
    pub level: String,
}

/// Command-line overrides, the last layer. `None`/empty leaves the lower layers' value.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--config FILE`: read between the defaults and the environment.
    pub config_file: Option<PathBuf>,
    /// `--set KEY=VALUE`, applied first among the flags, so the dedicated flags win.
    pub set: Vec<(String, String)>,
    pub listen: Option<String>,
    pub metrics_listen: Option<String>,
    /// `--model NAME=PATH`: replaces the model list.
    pub models: Vec<(String, PathBuf)>,
    pub default_model: Option<String>,
    /// `--score`: the score of every model given with `--model` (and of the list otherwise).
    pub score: Option<ScoreKind>,
    pub ort_library: Option<PathBuf>,
    pub providers: Vec<Provider>,
    pub log_format: Option<LogFormat>,
    pub log_level: Option<String>,
}

impl Settings {
    /// Merges the embedded defaults, `overrides.config_file`, the `CSGD_*` variables among
    /// `env` and the flags, then validates. Pass `std::env::vars()` as `env`; tests pass their
    /// own.
    pub fn load(
        overrides: &Overrides,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        let mut builder =
            Config::builder().add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml));
        if let Some(path) = &overrides.config_file {
            if !path.is_file() {
                return Err(ConfigError::File {
                    path: path.clone(),
                    message: "no such file".into(),
                });
            }
            builder = builder.add_source(File::from(path.as_path()).format(FileFormat::Toml));
        }
        builder = builder.add_source(env_source(env));
        for (key, value) in &overrides.set {
            builder = builder.set_override(key.as_str(), value.as_str())?;
        }
        let merged = builder.build()?;
        let mut settings: Settings = merged.try_deserialize()?;
        settings.apply(overrides);
        settings.validate()?;
        Ok(settings)
    }

    /// The embedded defaults alone (no file, environment or flags).
    pub fn defaults() -> Result<Settings, ConfigError> {
        Self::load(&Overrides::default(), std::iter::empty())
    }

    fn apply(&mut self, o: &Overrides) {
        if let Some(v) = &o.listen {
            self.server.listen = v.clone();
        }
        if let Some(v) = &o.metrics_listen {
            self.server.metrics_listen = v.clone();
        }
        if !o.models.is_empty() {
            self.models.list = o
                .models
                .iter()
                .map(|(name, path)| ModelEntry {
                    name: name.clone(),
                    path: path.clone(),
                    score: ScoreKind::Combined,
                })
                .collect();
            // The default named in a file refers to the list just replaced.
            self.models.default = String::new();
        }
        if let Some(v) = &o.default_model {
            self.models.default = v.clone();
        }
        if let Some(score) = o.score {
            for m in &mut self.models.list {
                m.score = score;
            }
        }
        if let Some(v) = &o.ort_library {
            self.runtime.ort_library = v.display().to_string();
        }
        if !o.providers.is_empty() {
            self.runtime.execution_providers = o.providers.clone();
        }
        if let Some(v) = o.log_format {
            self.logging.format = v;
        }
        if let Some(v) = &o.log_level {
            self.logging.level = v.clone();
        }
    }

    /// Rejects every value the daemon could not run with, naming its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        let listen = s.listen_addr()?;
        if let Some(metrics) = s.metrics_addr()?
            && metrics == listen
            && listen.port() != 0
        {
            return Err(invalid(
                "server.metrics_listen",
                "must differ from server.listen (leave it empty to serve /metrics on the main port)",
            ));
        }
        let at_least_one = [
            ("server.body_limit_bytes", s.body_limit_bytes as u64),
            ("server.max_pixels", s.max_pixels),
            (
                "server.max_images_per_request",
                s.max_images_per_request as u64,
            ),
            ("server.request_timeout_ms", s.request_timeout_ms),
            ("server.max_connections", s.max_connections as u64),
            ("server.header_read_timeout_ms", s.header_read_timeout_ms),
            (
                "server.max_concurrent_requests",
                s.max_concurrent_requests as u64,
            ),
            (
                "batching.max_batch_size",
                self.batching.max_batch_size as u64,
            ),
            (
                "batching.queue_capacity",
                self.batching.queue_capacity as u64,
            ),
        ];
        for (key, value) in at_least_one {
            if value < 1 {
                return Err(invalid(key, "must be ≥ 1"));
            }
        }
        // Limits of tokio's semaphore-based channels and of sane operation.
        const MAX_PERMITS: usize = 1 << 28;
        if s.max_concurrent_requests > MAX_PERMITS {
            return Err(invalid(
                "server.max_concurrent_requests",
                format!("must be ≤ {MAX_PERMITS}"),
            ));
        }
        if self.batching.queue_capacity > MAX_PERMITS {
            return Err(invalid(
                "batching.queue_capacity",
                format!("must be ≤ {MAX_PERMITS}"),
            ));
        }
        // hyper's floor for its read buffer (it panics below it).
        if !(8192..=16 << 20).contains(&s.max_header_bytes) {
            return Err(invalid(
                "server.max_header_bytes",
                "must be between 8192 and 16777216",
            ));
        }
        if s.max_connections > MAX_PERMITS {
            return Err(invalid(
                "server.max_connections",
                format!("must be ≤ {MAX_PERMITS}"),
            ));
        }
        if self.batching.max_batch_size > 65_536 {
            return Err(invalid("batching.max_batch_size", "must be ≤ 65536"));
        }
        if self.batching.max_wait_us > 10_000_000 {
            return Err(invalid(
                "batching.max_wait_us",
                "must be ≤ 10000000 (10 s); it is a wait per batch, in microseconds",
            ));
        }
        if s.max_images_per_request > self.batching.queue_capacity {
            return Err(invalid(
                "server.max_images_per_request",
                format!(
                    "({}) must not exceed batching.queue_capacity ({}): such a request could never be queued",
                    s.max_images_per_request, self.batching.queue_capacity
                ),
            ));
        }
        self.validate_models()?;
        let mut others = vec![("server.listen", listen)];
        if let Some(metrics) = s.metrics_addr()? {
            others.push(("server.metrics_listen", metrics));
        }
        let names: Vec<&str> = self.models.list.iter().map(|m| m.name.as_str()).collect();
        self.proxy.validate(&others, &names)?;
        self.runtime.validate()?;
        self.threads.validate()?;
        self.admin.validate()?;
        if !valid_log_filter(&self.logging.level) {
            return Err(invalid(
                "logging.level",
                format!(
                    "{:?} is not a level (error, warn, info, debug, trace) or filter directive",
                    self.logging.level
                ),
            ));
        }
        Ok(())
    }

    fn validate_models(&self) -> Result<(), ConfigError> {
        let list = &self.models.list;
        if list.is_empty() {
            return Err(invalid(
                "models.list",
                "must name at least one model (or pass --model NAME=PATH)",
            ));
        }
        let mut names = HashSet::new();
        for (i, m) in list.iter().enumerate() {
            let ok = !m.name.is_empty()
                && m.name.len() <= 128
                && m.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            if !ok {
                return Err(invalid(
                    &format!("models.list[{i}].name"),
                    format!(
                        "{:?} must be 1-128 letters, digits, '.', '_' or '-' (it is a URL segment)",
                        m.name
                    ),
                ));
            }
            if !names.insert(m.name.as_str()) {
                return Err(invalid(
                    &format!("models.list[{i}].name"),
                    format!("{:?} is used by two models", m.name),
                ));
            }
            if m.path.as_os_str().is_empty() {
                return Err(invalid(
                    &format!("models.list[{i}].path"),
                    "must not be empty",
                ));
            }
        }
        let default = self.models.default_name();
        if !names.contains(default) {
            return Err(invalid(
                "models.default",
                format!(
                    "{default:?} is not among the served models {:?}",
                    list.iter().map(|m| m.name.as_str()).collect::<Vec<_>>()
                ),
            ));
        }
        Ok(())
    }
}

/// A level (`info`) or comma-separated directives of the form `target=level`. tracing's own
/// parser also takes a bare word as a target name, which hides typos such as `infp`.
fn valid_log_filter(filter: &str) -> bool {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let is_level = |s: &str| LEVELS.contains(&s.trim().to_ascii_lowercase().as_str());
    !filter.trim().is_empty()
        && tracing_subscriber::EnvFilter::try_new(filter).is_ok()
        && filter.split(',').all(|d| {
            let d = d.trim();
            match d.rsplit_once('=') {
                Some((_, level)) => is_level(level),
                None => is_level(d),
            }
        })
}

/// The `CSGD_SECTION__KEY` variables among `env`. Only names with a section separator are
/// taken, so that unrelated variables sharing the prefix (`CSGD_TEST_MODEL`) do not turn into
/// unknown top-level keys.
fn env_source(env: impl IntoIterator<Item = (String, String)>) -> Environment {
    let prefix = format!("{ENV_PREFIX}_");
    let vars: BTreeMap<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(&prefix) && k[prefix.len()..].contains("__"))
        .collect();
    Environment::with_prefix(ENV_PREFIX)
        .prefix_separator("_")
        .separator("__")
        .try_parsing(true)
        .list_separator(",")
        .with_list_parse_key("runtime.execution_providers")
        .source(Some(vars.into_iter().collect()))
}

/// Parses a `NAME=PATH` flag value.
pub fn parse_model_flag(value: &str) -> Result<(String, PathBuf), String> {
    match value.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => {
            Ok((name.to_owned(), PathBuf::from(path)))
        }
        _ => Err(format!("expected NAME=PATH, got {value:?}")),
    }
}

/// Parses a `KEY=VALUE` flag value.
pub fn parse_set_flag(value: &str) -> Result<(String, String), String> {
    match value.split_once('=') {
        Some((key, v)) if !key.is_empty() => Ok((key.to_owned(), v.to_owned())),
        _ => Err(format!("expected section.key=value, got {value:?}")),
    }
}

/// Resolves a possibly relative model path against `base` (the working directory).
pub fn resolve(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

#[cfg(test)]
mod tests;
