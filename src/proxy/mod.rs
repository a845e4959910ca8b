//! Sidecar mode: csgd in front of the user's own classifier. Clients talk to the proxy
//! listener; requests on guarded routes have their image(s) judged first and are then
//! forwarded, tagged or blocked as the route's policy says; every other request passes through
//! untouched and streamed.
//!
//! The pieces: [`route`] (which requests are guarded), [`extract`] (where the image sits),
//! [`policy`] (what to do with the verdict), [`forward`] (the pooled upstream client and the
//! header rules of a proxy). Judging reuses the API's body reading (`crate::http::input`) and
//! detection path (`crate::http::detection`), so guarded requests share its concurrency
//! limit, body limit, batching queue, request timeout and metrics.

pub mod extract;
pub mod forward;
pub mod policy;
pub mod route;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::config::{ConfigError, Policy};
use crate::http::{ApiError, AppState, detection, input};
use forward::Upstream;
use policy::{Decision, Judgement};
use route::Route;

/// The proxy's shared state.
pub struct Proxy {
    app: Arc<AppState>,
    routes: Vec<Route>,
    upstream: Upstream,
}

impl Proxy {
    /// Builds the proxy of `app`'s (validated) `[proxy]` section.
    pub fn new(app: Arc<AppState>) -> Result<Arc<Proxy>, ConfigError> {
        let config = &app.settings.proxy;
        let routes = config
            .routes
            .iter()
            .map(|r| Route::new(r, config.on_error))
            .collect();
        let upstream = Upstream::new(config, Arc::clone(&app.metrics))?;
        Ok(Arc::new(Proxy {
            routes,
            upstream,
            app,
        }))
    }

    pub fn upstream(&self) -> &str {
        self.upstream.origin()
    }
}

/// The proxy listener's router: everything goes to [`handle`].
pub fn router(proxy: Arc<Proxy>) -> Router {
    Router::new()
        .fallback(handle)
        // Guarded bodies are read under server.body_limit_bytes; others are not read at all.
        .layer(DefaultBodyLimit::disable())
        .layer(crate::http::error::catch_panic())
        .with_state(proxy)
}

async fn handle(State(proxy): State<Arc<Proxy>>, req: Request) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let (mut parts, body) = req.into_parts();
    if parts.method == Method::CONNECT {
        return ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "the csgd proxy forwards requests to one upstream; it does not tunnel (CONNECT)",
        )
        .into_response();
    }
    forward::strip_verdict_headers(&mut parts.headers);
    let path = parts.uri.path().to_owned();
    match proxy
        .routes
        .iter()
        .find(|r| r.matches(&parts.method, &path))
    {
        None => {
            proxy
                .upstream
                .forward(parts, body, peer, "", Default::default())
                .await
        }
        Some(route) => guard(&proxy, route, parts, body, peer).await,
    }
}

/// A guarded request: read it, judge it, then forward or answer as the policy says.
async fn guard(
    proxy: &Proxy,
    route: &Route,
    parts: Parts,
    body: Body,
    peer: Option<IpAddr>,
) -> Response {
    let label = route.pattern.as_str();
    let m = &proxy.app.metrics.proxy;
    let limit = proxy.app.settings.server.body_limit_bytes;
    let bytes = match input::read_body(body, limit, input::declared_length(&parts)).await {
        Ok(b) => b,
        Err(e) => {
            // A body csgd cannot read whole is never forwarded half-checked.
            m.blocked.with_label_values(&[label, "invalid"]).inc();
            m.unchecked.with_label_values(&[label, e.kind]).inc();
            return e.into_response();
        }
    };
    let judgement = judge(&proxy.app, route, &parts, bytes.clone()).await;
    let verdict = judgement.verdict();
    m.verdicts
        .with_label_values(&[label, route.policy.name(), verdict])
        .inc();
    if let Judgement::Invalid(e) | Judgement::Unchecked(e) = &judgement {
        m.unchecked.with_label_values(&[label, e.kind]).inc();
        tracing::debug!(
            route = label,
            kind = e.kind,
            "request not checked: {}",
            e.message
        );
    }
    match policy::decide(route.policy, route.on_error, &judgement) {
        Decision::Forward(tags) => {
            if route.policy != Policy::Shadow {
                m.tagged.with_label_values(&[label, verdict]).inc();
            }
            proxy
                .upstream
                .forward(parts, Body::from(bytes), peer, label, tags)
                .await
        }
        Decision::Answer { cause, response } => {
            m.blocked.with_label_values(&[label, cause]).inc();
            if cause == "adversarial" {
                tracing::info!(route = label, "blocked an adversarial request");
            }
            response
        }
    }
}

/// Runs the request's images through the route's model, under the API's limits and timeout.
async fn judge(app: &AppState, route: &Route, parts: &Parts, bytes: Bytes) -> Judgement {
    // A client mistake (4xx other than 429) is the request's fault; anything else means
    // csgd could not judge.
    let sort = |e: ApiError| {
        if e.status.is_client_error() && e.status != StatusCode::TOO_MANY_REQUESTS {
            Judgement::Invalid(e)
        } else {
            Judgement::Unchecked(e)
        }
    };
    let model = match detection::resolve(app, route.model.as_deref()) {
        Ok(m) => m,
        Err(e) => return Judgement::Unchecked(e),
    };
    let admitted = match detection::admit(app) {
        Ok(a) => a,
        Err(e) => return Judgement::Unchecked(e),
    };
    let server = &app.settings.server;
    let limits = extract::Limits {
        max_pixels: server.max_pixels,
        max_images: server.max_images_per_request,
        inline_decode_max_pixels: app.settings.threads.inline_decode_max_pixels,
    };
    let work = async {
        let tensors = extract::tensors(
            route.image,
            &route.field,
            parts,
            bytes,
            &model.meta.input,
            limits,
        )
        .await?;
        let outputs = detection::infer(app, &model, tensors).await?;
        outputs
            .iter()
            .map(|out| detection::verdict(app, &model, out))
            .collect::<Result<Vec<_>, _>>()
    };
    let timeout = Duration::from_millis(server.request_timeout_ms);
    let result = tokio::time::timeout(timeout, work).await;
    drop(admitted);
    match result {
        Err(_) => Judgement::Unchecked(ApiError::timeout(server.request_timeout_ms)),
        Ok(Err(e)) => sort(e),
        Ok(Ok(verdicts)) => {
            if verdicts.iter().any(|v| v.is_adversarial.is_none()) {
                return Judgement::Unchecked(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "uncalibrated",
                    format!(
                        "model {:?} is not calibrated (csgd calibrate), so it cannot judge",
                        model.name
                    ),
                ));
            }
            Judgement::Judged {
                model: model.name.clone(),
                verdicts,
            }
        }
    }
}
