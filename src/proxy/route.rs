//! Which requests the proxy guards: configured routes compiled to path patterns and methods.
//!
//! Paths are matched after normalisation (percent-decoding, `.`/`..` and repeated or trailing
//! slashes resolved), because upstream frameworks commonly do the same: matching the raw text
//! would let `/predict/`, `//predict` or `/%70redict` reach a guarded endpoint unchecked. The
//! request itself is forwarded as sent.

use axum::http::Method;

use crate::config::{FailurePolicy, ImageSource, Policy, ProxyRoute};

#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Literal(String),
    /// `*`: exactly one segment.
    One,
    /// `**` (last): any number of segments, including none.
    Rest,
}

/// A guarded route, ready to match.
#[derive(Debug, Clone)]
pub struct Route {
    /// The configured pattern, also the `route` label of the proxy metrics.
    pub pattern: String,
    segments: Vec<Segment>,
    methods: Vec<Method>,
    pub image: ImageSource,
    pub field: String,
    /// `None`: the default model.
    pub model: Option<String>,
    pub policy: Policy,
    pub on_error: FailurePolicy,
}

impl Route {
    /// Compiles a validated route; `on_error` is the section's default.
    pub fn new(config: &ProxyRoute, on_error: FailurePolicy) -> Route {
        let segments = split(&config.path)
            .map(|s| match s {
                "*" => Segment::One,
                "**" => Segment::Rest,
                lit => Segment::Literal(lit.to_owned()),
            })
            .collect();
        Route {
            pattern: config.path.clone(),
            segments,
            methods: config
                .methods
                .iter()
                .filter_map(|m| Method::from_bytes(m.as_bytes()).ok())
                .collect(),
            image: config.image,
            field: config.field.clone(),
            model: (!config.model.is_empty()).then(|| config.model.clone()),
            policy: config.policy,
            on_error: config.on_error.unwrap_or(on_error),
        }
    }

    /// Whether a request with this method and (raw) path is guarded by this route.
    pub fn matches(&self, method: &Method, path: &str) -> bool {
        self.methods.contains(method) && self.matches_path(&normalise(path))
    }

    fn matches_path(&self, normalised: &str) -> bool {
        let parts: Vec<&str> = split(normalised).collect();
        let mut i = 0;
        for seg in &self.segments {
            match seg {
                Segment::Rest => return true,
                Segment::One => {
                    if parts.get(i).is_none_or(|p| p.is_empty()) {
                        return false;
                    }
                }
                Segment::Literal(lit) => {
                    if parts.get(i) != Some(&lit.as_str()) {
                        return false;
                    }
                }
            }
            i += 1;
        }
        i == parts.len()
    }
}

/// The non-empty segments of a path.
fn split(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter(|s| !s.is_empty())
}

/// Percent-decodes, drops empty and `.` segments and resolves `..`; always starts with `/`.
pub fn normalise(path: &str) -> String {
    let decoded = percent_decode(path);
    let mut out: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    format!("/{}", out.join("/"))
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = bytes.get(i + 1..i + 3)
            && let Ok(hex) = std::str::from_utf8(hex)
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(path: &str, methods: &[&str]) -> Route {
        Route::new(
            &ProxyRoute {
                path: path.into(),
                methods: methods.iter().map(|m| m.to_string()).collect(),
                image: ImageSource::Raw,
                field: String::new(),
                model: String::new(),
                policy: Policy::Block,
                on_error: None,
            },
            FailurePolicy::FailClosed,
        )
    }

    #[test]
    fn literal_wildcard_and_rest() {
        let post = Method::POST;
        let r = route("/predict", &["POST"]);
        assert!(r.matches(&post, "/predict"));
        assert!(!r.matches(&Method::GET, "/predict"));
        assert!(!r.matches(&post, "/predict/more"));
        assert!(!r.matches(&post, "/predic"));
        let r = route("/v2/models/*/infer", &["POST"]);
        assert!(r.matches(&post, "/v2/models/resnet/infer"));
        assert!(!r.matches(&post, "/v2/models/infer"));
        assert!(!r.matches(&post, "/v2/models/a/b/infer"));
        let r = route("/api/**", &["POST", "PUT"]);
        assert!(r.matches(&post, "/api"));
        assert!(r.matches(&Method::PUT, "/api/a/b/c"));
        assert!(!r.matches(&post, "/apix"));
    }

    #[test]
    fn disguised_paths_are_still_guarded() {
        let r = route("/predict", &["POST"]);
        for p in [
            "/predict/",
            "//predict",
            "/%70redict",
            "/./predict",
            "/x/../predict",
            "/predict/.",
        ] {
            assert!(r.matches(&Method::POST, p), "{p}");
        }
        assert_eq!(normalise("/a%2Fb/%zz/../c"), "/a/b/c");
        assert_eq!(normalise(""), "/");
    }
}
