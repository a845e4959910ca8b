//! Forwarding to the upstream: a pooled keep-alive client, the header rewriting a proxy must do,
//! and upstream faults turned into clear 502/504 answers instead of hangs.
//!
//! Hop-by-hop headers (RFC 9110 §7.6.1: `Connection` and the fields it names, `Keep-Alive`,
//! `Proxy-*`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade`) describe one connection and are
//! dropped in both directions; hyper frames each side itself. `Via` is added both ways and the
//! client's address appended to `X-Forwarded-For`. Everything else, `Host` included, passes
//! as sent, and bodies stream through without being buffered.

use std::error::Error as _;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::request::Parts;
use axum::http::{Request, StatusCode, Uri, Version};
use axum::response::{IntoResponse, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::{ConfigError, ProxyConfig};
use crate::http::ApiError;
use crate::metrics::Metrics;

/// Headers that concern one connection only (besides those named in `Connection`).
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    // Not in RFC 9110's list but sent by old clients with the same meaning.
    "proxy-connection",
];

/// Prefix of the verdict headers csgd adds; a client's own are removed so they cannot be
/// forged.
pub const VERDICT_PREFIX: &str = "x-csgd-";

const VIA: &str = "1.1 csgd";

/// The upstream and the pooled client that reaches it.
pub struct Upstream {
    client: Client<HttpConnector, Body>,
    /// `http://host:port`.
    origin: String,
    /// Path prefix put before every forwarded path (no trailing `/`).
    prefix: String,
    timeout: Duration,
    metrics: Arc<Metrics>,
}

impl Upstream {
    pub fn new(config: &ProxyConfig, metrics: Arc<Metrics>) -> Result<Upstream, ConfigError> {
        let uri = config.upstream_uri()?;
        let authority = uri.authority().map_or("", |a| a.as_str());
        let origin = format!("http://{authority}");
        let prefix = uri.path().trim_end_matches('/').to_owned();
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.connect_timeout()));
        connector.set_nodelay(true);
        let idle = config.pool_idle_timeout();
        let max_idle = if idle.is_zero() {
            0
        } else {
            config.pool_max_idle_per_host
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(idle)
            .pool_max_idle_per_host(max_idle)
            .build(connector);
        Ok(Upstream {
            client,
            origin,
            prefix,
            timeout: config.upstream_timeout(),
            metrics,
        })
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Sends the request on and returns the upstream's answer (streamed), or a 502/504 that
    /// says what went wrong. `route` labels the metrics; `extra` are csgd's verdict headers.
    pub async fn forward(
        &self,
        mut parts: Parts,
        body: Body,
        peer: Option<IpAddr>,
        route: &str,
        extra: HeaderMap,
    ) -> Response {
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let Ok(uri) = format!("{}{}{path}", self.origin, self.prefix).parse::<Uri>() else {
            return ApiError::malformed(format!("cannot forward the request target {path:?}"))
                .into_response();
        };
        parts.uri = uri;
        parts.version = Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers);
        append_forwarded_for(&mut parts.headers, peer);
        parts
            .headers
            .append(header::VIA, HeaderValue::from_static(VIA));
        for (name, value) in &extra {
            parts.headers.insert(name.clone(), value.clone());
        }
        let m = &self.metrics.proxy;
        m.forwarded.with_label_values(&[route]).inc();
        let started = Instant::now();
        let sent = self.client.request(Request::from_parts(parts, body));
        let result = tokio::time::timeout(self.timeout, sent).await;
        let error = match result {
            Ok(Ok(response)) => {
                m.upstream_duration
                    .with_label_values(&[route])
                    .observe(started.elapsed().as_secs_f64());
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                parts
                    .headers
                    .append(header::VIA, HeaderValue::from_static(VIA));
                return Response::from_parts(parts, Body::new(body));
            }
            Ok(Err(e)) => {
                let kind = classify(&e);
                let detail = error_chain(&e);
                let (kind_label, error) = match kind {
                    "connect" => (
                        "upstream_unavailable",
                        format!("cannot connect to the upstream {}: {detail}", self.origin),
                    ),
                    "reset" => (
                        "upstream_reset",
                        format!(
                            "the upstream {} closed the connection without answering: {detail}",
                            self.origin
                        ),
                    ),
                    _ => (
                        "upstream_error",
                        format!("the upstream {} failed: {detail}", self.origin),
                    ),
                };
                m.upstream_errors.with_label_values(&[route, kind]).inc();
                ApiError::new(StatusCode::BAD_GATEWAY, kind_label, error)
            }
            Err(_) => {
                m.upstream_errors
                    .with_label_values(&[route, "timeout"])
                    .inc();
                ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream_timeout",
                    format!(
                        "the upstream {} did not answer within proxy.upstream_timeout_ms = {}",
                        self.origin,
                        self.timeout.as_millis()
                    ),
                )
            }
        };
        tracing::warn!(kind = error.kind, route, "{}", error.message);
        error.into_response()
    }
}

/// Removes the hop-by-hop headers, including every `Proxy-*` one and those `Connection` names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    let proxy: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("proxy-"))
        .cloned()
        .collect();
    for name in proxy {
        headers.remove(name);
    }
}

/// Removes `x-csgd-*` headers a client sent, so that only csgd's own reach the upstream.
pub fn strip_verdict_headers(headers: &mut HeaderMap) {
    let forged: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with(VERDICT_PREFIX))
        .cloned()
        .collect();
    for name in forged {
        headers.remove(name);
    }
}

/// Appends the client's address to `X-Forwarded-For` (joining earlier proxies' entries).
fn append_forwarded_for(headers: &mut HeaderMap, peer: Option<IpAddr>) {
    let Some(ip) = peer else { return };
    let xff = HeaderName::from_static("x-forwarded-for");
    let earlier: Vec<String> = headers
        .get_all(&xff)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::to_owned)
        .collect();
    let value = if earlier.is_empty() {
        ip.to_string()
    } else {
        format!("{}, {ip}", earlier.join(", "))
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(xff, v);
    }
}

/// The upstream error kind for the metrics: connect, reset, timeout or other.
fn classify(e: &hyper_util::client::legacy::Error) -> &'static str {
    if e.is_connect() {
        return "connect";
    }
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(h) = s.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() || h.is_canceled() {
                return "reset";
            }
            if h.is_timeout() {
                return "timeout";
            }
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            if matches!(
                io.kind(),
                ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
            ) {
                return "reset";
            }
        }
        source = s.source();
    }
    "other"
}

/// An error and its causes on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_headers_go_end_to_end_ones_stay() {
        let mut h = headers(&[
            ("connection", "keep-alive, X-Session"),
            ("connection", "x-other"),
            ("keep-alive", "timeout=5"),
            ("x-session", "1"),
            ("x-other", "2"),
            ("te", "trailers"),
            ("trailer", "x-sum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic x"),
            ("proxy-connection", "keep-alive"),
            ("proxy-whatever", "1"),
            ("host", "example"),
            ("content-type", "image/png"),
            ("x-request-id", "abc"),
        ]);
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-type", "host", "x-request-id"]);
    }

    #[test]
    fn forged_verdicts_are_removed_and_xff_appended() {
        let mut h = headers(&[
            ("x-csgd-verdict", "clean"),
            ("X-Csgd-Score", "0"),
            ("x-forwarded-for", "10.0.0.1"),
            ("x-csgdnot", "kept"),
        ]);
        strip_verdict_headers(&mut h);
        append_forwarded_for(&mut h, Some("127.0.0.1".parse().unwrap()));
        assert!(h.get("x-csgd-verdict").is_none() && h.get("x-csgd-score").is_none());
        assert_eq!(h["x-csgdnot"], "kept");
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, Some("::1".parse().unwrap()));
        assert_eq!(h["x-forwarded-for"], "::1");
    }
}
