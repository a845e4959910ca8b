//! The `[proxy]` section: the sidecar listener that checks images on their way to an upstream
//! classifier (see `crate::proxy`).
//!
//! Kept apart from the other sections because it has its own small language (route patterns,
//! where the image sits, policies); [`ProxyConfig::validate`] checks all of it before anything
//! binds, naming the key (`proxy.routes[2].field`) like the rest of the configuration.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use axum::http::{Method, Uri};
use serde::{Deserialize, Serialize};

use super::{ConfigError, invalid, parse_addr};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// Off by default: csgd then binds no proxy port.
    pub enabled: bool,
    pub listen: String,
    /// `http://host:port[/prefix]`; empty is allowed only while the proxy is off.
    pub upstream: String,
    pub connect_timeout_ms: u64,
    /// From forwarding a request to the upstream's response headers.
    pub upstream_timeout_ms: u64,
    pub pool_idle_timeout_seconds: u64,
    pub pool_max_idle_per_host: usize,
    /// What guarded routes do when csgd cannot judge, unless a route says otherwise.
    pub on_error: FailurePolicy,
    pub routes: Vec<ProxyRoute>,
}

/// What to do with a request csgd could not judge (model error, overload, timeout, not
/// ready, uncalibrated model).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailurePolicy {
    /// Forward it, tagged `x-csgd-verdict: unchecked`.
    FailOpen,
    /// Answer 503 without forwarding.
    FailClosed,
}

impl FailurePolicy {
    pub fn name(self) -> &'static str {
        match self {
            FailurePolicy::FailOpen => "fail-open",
            FailurePolicy::FailClosed => "fail-closed",
        }
    }
}

/// What a guarded route does with the verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Adversarial images are answered 403 by csgd and never reach the upstream.
    Block,
    /// Everything judged is forwarded with `x-csgd-*` headers carrying the verdict.
    Tag,
    /// Everything is forwarded untouched; the verdict is only recorded (metrics, log).
    Shadow,
}

impl Policy {
    pub fn name(self) -> &'static str {
        match self {
            Policy::Block => "block",
            Policy::Tag => "tag",
            Policy::Shadow => "shadow",
        }
    }
}

/// Where the image sits in a guarded request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageSource {
    /// The whole body is one PNG or JPEG.
    Raw,
    /// `multipart/form-data`: the part named `field` (every part when `field` is empty).
    Multipart,
    /// A JSON body; `field` is a JSON Pointer to a base64 string or an array of them.
    Json,
    /// An Open Inference Protocol (v2) infer request; `field` names the input (empty: the
    /// only one). FP32 inputs in the model's shape or BYTES inputs holding encoded images.
    V2,
}

impl ImageSource {
    pub fn name(self) -> &'static str {
        match self {
            ImageSource::Raw => "raw",
            ImageSource::Multipart => "multipart",
            ImageSource::Json => "json",
            ImageSource::V2 => "v2",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyRoute {
    /// `/predict`; `*` matches one path segment, a final `**` any rest (`/v2/models/*/infer`).
    pub path: String,
    /// Methods guarded on that path; others pass through.
    #[serde(default = "default_methods")]
    pub methods: Vec<String>,
    pub image: ImageSource,
    #[serde(default)]
    pub field: String,
    /// The csgd model that judges; empty: `models.default`.
    #[serde(default)]
    pub model: String,
    pub policy: Policy,
    /// Overrides `proxy.on_error` for this route.
    #[serde(default)]
    pub on_error: Option<FailurePolicy>,
}

fn default_methods() -> Vec<String> {
    vec!["POST".into()]
}

/// Upper bound of the timeouts, so that a typo in units (seconds for milliseconds ×1000) is
/// caught rather than turned into an hour-long hang.
const MAX_TIMEOUT_MS: u64 = 3_600_000;

impl ProxyConfig {
    /// The proxy address (valid after [`ProxyConfig::validate`]).
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        parse_addr("proxy.listen", &self.listen)
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    pub fn upstream_timeout(&self) -> Duration {
        Duration::from_millis(self.upstream_timeout_ms)
    }

    pub fn pool_idle_timeout(&self) -> Duration {
        Duration::from_secs(self.pool_idle_timeout_seconds)
    }

    /// The upstream as a URI (valid after [`ProxyConfig::validate`] with the proxy on).
    pub fn upstream_uri(&self) -> Result<Uri, ConfigError> {
        let text = self.upstream.trim();
        let uri: Uri = text.parse().map_err(|_| {
            invalid(
                "proxy.upstream",
                format!("{text:?} is not a URL such as http://127.0.0.1:9000"),
            )
        })?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(invalid(
                    "proxy.upstream",
                    "https upstreams are not supported: the sidecar talks plain HTTP to a \
                     classifier beside it (use http://)",
                ));
            }
            _ => {
                return Err(invalid(
                    "proxy.upstream",
                    format!("{text:?} must start with http://"),
                ));
            }
        }
        if uri.authority().is_none_or(|a| a.host().is_empty()) {
            return Err(invalid("proxy.upstream", format!("{text:?} names no host")));
        }
        if uri.query().is_some() {
            return Err(invalid(
                "proxy.upstream",
                "must not have a query; requests keep their own",
            ));
        }
        Ok(uri)
    }

    /// Checks the section; `others` are the daemon's other addresses and `models` the served
    /// model names, which routes may refer to.
    pub fn validate(
        &self,
        others: &[(&str, SocketAddr)],
        models: &[&str],
    ) -> Result<(), ConfigError> {
        let listen = self.listen_addr()?;
        if self.enabled {
            for (key, addr) in others {
                if *addr == listen && listen.port() != 0 {
                    return Err(invalid("proxy.listen", format!("must differ from {key}")));
                }
            }
            self.upstream_uri()?;
        } else if !self.upstream.trim().is_empty() {
            self.upstream_uri()?;
        }
        for (key, value) in [
            ("proxy.connect_timeout_ms", self.connect_timeout_ms),
            ("proxy.upstream_timeout_ms", self.upstream_timeout_ms),
        ] {
            if !(1..=MAX_TIMEOUT_MS).contains(&value) {
                return Err(invalid(
                    key,
                    format!("must be 1 … {MAX_TIMEOUT_MS} (milliseconds)"),
                ));
            }
        }
        if self.pool_idle_timeout_seconds > 86_400 {
            return Err(invalid(
                "proxy.pool_idle_timeout_seconds",
                "must be ≤ 86400",
            ));
        }
        if self.pool_max_idle_per_host > 65_536 {
            return Err(invalid("proxy.pool_max_idle_per_host", "must be ≤ 65536"));
        }
        for (i, route) in self.routes.iter().enumerate() {
            route.validate(i, models)?;
        }
        Ok(())
    }
}

impl ProxyRoute {
    fn validate(&self, i: usize, models: &[&str]) -> Result<(), ConfigError> {
        let key = |k: &str| format!("proxy.routes[{i}].{k}");
        check_pattern(&self.path).map_err(|m| invalid(&key("path"), m))?;
        if self.methods.is_empty() {
            return Err(invalid(
                &key("methods"),
                "must list at least one method, e.g. [\"POST\"]",
            ));
        }
        let mut seen = HashSet::new();
        for m in &self.methods {
            let ok = !m.is_empty()
                && m.bytes().all(|b| b.is_ascii_uppercase())
                && Method::from_bytes(m.as_bytes()).is_ok();
            if !ok {
                return Err(invalid(
                    &key("methods"),
                    format!("{m:?} is not an HTTP method in capitals such as \"POST\""),
                ));
            }
            if !seen.insert(m.as_str()) {
                return Err(invalid(&key("methods"), format!("lists {m:?} twice")));
            }
        }
        match self.image {
            ImageSource::Json if !self.field.starts_with('/') => {
                return Err(invalid(
                    &key("field"),
                    format!(
                        "{:?} must be a JSON Pointer such as \"/image\" (where the base64 image sits)",
                        self.field
                    ),
                ));
            }
            ImageSource::Raw if !self.field.is_empty() => {
                return Err(invalid(&key("field"), "must be empty for image = \"raw\""));
            }
            _ => {}
        }
        if !self.model.is_empty() && !models.contains(&self.model.as_str()) {
            return Err(invalid(
                &key("model"),
                format!("{:?} is not among the served models {models:?}", self.model),
            ));
        }
        Ok(())
    }
}

/// A route pattern: absolute, no query, `*` only as a whole segment, `**` only last.
fn check_pattern(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("{path:?} must start with '/'"));
    }
    if path.contains(['?', '#']) || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{path:?} must be a plain path (no query, fragment or spaces)"
        ));
    }
    let segments: Vec<&str> = path[1..].split('/').collect();
    for (i, s) in segments.iter().enumerate() {
        if s.contains('*') && *s != "*" && *s != "**" {
            return Err(format!("{path:?}: '*' must be a whole segment"));
        }
        if *s == "**" && i + 1 != segments.len() {
            return Err(format!("{path:?}: '**' may only be the last segment"));
        }
    }
    Ok(())
}
