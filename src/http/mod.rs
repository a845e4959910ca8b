//! The HTTP API: router, shared state, and the small endpoints (models, health, metrics).
//! Detection itself is in [`v1`] and, in the Open Inference Protocol, [`v2`]; explanations are
//! in [`explain`]. All of them (and the sidecar proxy) read request bodies with `input` and
//! go through `detection` (model, admission, queue, verdict metrics). Errors are in [`error`].
//!
//! Every response passes through [`track`], which counts it by model, route template and
//! status, times it, and counts failures by their error kind, so no handler can forget to.

pub mod admin;
pub(crate) mod detection;
pub mod error;
pub mod explain;
pub(crate) mod input;
pub mod v1;
pub mod v2;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use arc_swap::ArcSwapOption;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Request, State};
use axum::http::{StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use crate::config::Settings;
use crate::metrics::Metrics;
use crate::registry::{Registry, ServedModel};
pub use error::ApiError;

/// State shared by all handlers.
pub struct AppState {
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
    /// Set once every model is loaded and warmed up; replaced whole by a hot reload
    /// ([`crate::reload`]), while requests keep the models they resolved.
    pub registry: ArcSwapOption<Registry>,
    /// Held by the reload in progress: one at a time.
    pub reloading: tokio::sync::Mutex<()>,
    /// True between warm-up and the start of shutdown.
    pub ready: AtomicBool,
    /// Detection requests in progress (server.max_concurrent_requests).
    pub limiter: Arc<Semaphore>,
}

impl AppState {
    pub fn new(settings: Settings, metrics: Arc<Metrics>) -> Arc<AppState> {
        let permits = settings.server.max_concurrent_requests;
        Arc::new(AppState {
            settings,
            metrics,
            registry: ArcSwapOption::empty(),
            reloading: tokio::sync::Mutex::new(()),
            ready: AtomicBool::new(false),
            limiter: Arc::new(Semaphore::new(permits)),
        })
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && self.registry.load().is_some()
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
        self.metrics.ready.set(i64::from(ready));
    }

    fn registry(&self) -> Result<Arc<Registry>, ApiError> {
        self.registry.load_full().ok_or_else(ApiError::not_ready)
    }
}

/// The model a response concerns (a configured name, never a client-supplied unknown one),
/// for the metrics labels.
#[derive(Debug, Clone)]
pub struct ModelLabel(pub String);

/// The API router (also serves /metrics and /health/*).
pub fn router(state: Arc<AppState>) -> Router {
    // Off by default: without `admin.enabled` the route does not exist (404).
    let admin = if state.settings.admin.enabled {
        Router::new().route("/admin/reload", post(admin::reload))
    } else {
        Router::new()
    };
    Router::new()
        .route("/v1/detect", post(v1::detect_default))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{name}", get(model_info))
        .route("/v1/models/{name}/detect", post(v1::detect_named))
        .route("/v1/classify", post(v1::classify_default))
        .route("/v1/models/{name}/classify", post(v1::classify_named))
        .route("/v1/explain", post(explain::explain_default))
        .route("/v1/models/{name}/explain", post(explain::explain_named))
        .merge(v2::routes())
        .merge(ops_routes())
        .merge(admin)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Bodies are read under our own limit, which answers with the key to raise.
        .layer(DefaultBodyLimit::disable())
        // Inside `track`, so a caught panic is counted as the 500 it answers.
        .layer(error::catch_panic())
        .layer(middleware::from_fn_with_state(Arc::clone(&state), track))
        .with_state(state)
}

/// The router of the separate metrics port: /metrics and /health/* only.
pub fn metrics_router(state: Arc<AppState>) -> Router {
    ops_routes()
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

fn ops_routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
}

async fn track(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let method = req.method().clone();
    let started = Instant::now();
    let response = next.run(req).await;
    let elapsed = started.elapsed();
    let model = response
        .extensions()
        .get::<ModelLabel>()
        .map_or("", |m| m.0.as_str());
    let status = response.status();
    let m = &state.metrics;
    m.requests
        .with_label_values(&[model, route.as_str(), status.as_str()])
        .inc();
    m.request_duration
        .with_label_values(&[model, route.as_str()])
        .observe(elapsed.as_secs_f64());
    if let Some(kind) = response.extensions().get::<error::ErrorKind>() {
        m.failures.with_label_values(&[model, kind.0]).inc();
    }
    tracing::debug!(%method, route, status = status.as_u16(), model, micros = elapsed.as_micros() as u64, "request");
    response
}

async fn live() -> Json<Value> {
    Json(json!({ "status": "live" }))
}

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if state.is_ready() {
        Json(json!({ "status": "ready" })).into_response()
    } else {
        ApiError::not_ready().into_response()
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    match state.metrics.render() {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => ApiError::internal(e.to_string()).into_response(),
    }
}

async fn list_models(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let registry = state.registry()?;
    Ok(Json(json!({
        "default": registry.default_name(),
        "models": registry.iter().map(|m| describe(m)).collect::<Vec<_>>(),
    })))
}

async fn model_info(
    State(state): State<Arc<AppState>>,
    name: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Response {
    let Ok(Path(name)) = name else {
        return ApiError::malformed("invalid model name in path").into_response();
    };
    let registry = match state.registry() {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    match registry.get(&name) {
        Some(model) => {
            let mut response = Json(describe(model)).into_response();
            response
                .extensions_mut()
                .insert(ModelLabel(model.name.clone()));
            response
        }
        None => ApiError::unknown_model(&name, &registry.names()).into_response(),
    }
}

/// What `GET /v1/models[/{name}]` says about a model.
fn describe(model: &ServedModel) -> Value {
    let meta = &model.meta;
    let detector = &model.detector;
    let calibration = detector.calibration().map(|c| {
        json!({
            "fpr": c.fpr,
            "data": c.data,
            "fit_images": c.fit_images,
            "table_images": c.table_images,
            "threshold": c.thresholds.get(detector.score_kind().name()),
            "per_class_thresholds": c.class_thresholds.contains_key(detector.score_kind().name()),
        })
    });
    json!({
        "name": model.name,
        "version": meta.version,
        "bundle_name": meta.name,
        "path": model.path,
        "classes": meta.classes,
        "input": meta.input,
        "architecture": meta.architecture.summary(),
        "gate": meta.gate.as_ref().map(|g| json!({"filters": g.filters, "classes": g.classes, "density": g.density()})),
        "provider": model.provider,
        "sessions": model.sessions,
        "intra_op_spinning": {
            "mode": model.spinning.mode,
            "enabled": model.spinning.enabled,
            "forward_ms": model.spinning.forward.map(|f| f.as_secs_f64() * 1e3),
        },
        "outputs": model.outputs,
        "calibrated": detector.is_calibrated(),
        "score": detector.score_name(),
        "calibration": calibration,
        "explain": match &model.explain {
            Ok(_) => json!({ "available": true }),
            Err(why) => json!({ "available": false, "reason": why }),
        },
    })
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::not_found(uri.path())
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route (detection is POST, the rest GET)",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use tower::ServiceExt;

    async fn call(app: &Router, method: &str, path: &str) -> (StatusCode, Value) {
        let req = axum::http::Request::builder()
            .method(method)
            .uri(path)
            .header(header::CONTENT_TYPE, "image/png")
            .body(Body::from("x"))
            .unwrap();
        let response = app.clone().oneshot(req).await.unwrap();
        let status = response.status();
        let bytes = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap()
            .to_bytes();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, body)
    }

    #[tokio::test]
    async fn not_ready_until_models_are_loaded() {
        let settings = Settings::defaults().unwrap();
        let metrics = Arc::new(Metrics::new().unwrap());
        let state = AppState::new(settings, Arc::clone(&metrics));
        let app = router(Arc::clone(&state));
        assert_eq!(call(&app, "GET", "/health/live").await.0, StatusCode::OK);
        for (method, path) in [
            ("GET", "/health/ready"),
            ("GET", "/v1/models"),
            ("GET", "/v1/models/fashion-csg"),
            ("POST", "/v1/detect"),
            ("POST", "/v1/models/fashion-csg/detect"),
            ("POST", "/v1/classify"),
            ("POST", "/v1/models/fashion-csg/classify"),
            ("POST", "/v1/explain"),
            ("POST", "/v1/models/fashion-csg/explain"),
        ] {
            let (status, body) = call(&app, method, path).await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{method} {path}");
            assert_eq!(body["kind"], "not_ready", "{method} {path}");
        }
        let (status, body) = call(&app, "DELETE", "/v1/models").await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(body["kind"], "method_not_allowed");
        let text = metrics.render().unwrap();
        assert!(
            text.contains("route=\"/health/ready\",status=\"503\""),
            "{text}"
        );
        assert!(
            text.contains("csgd_request_failures_total{cause=\"not_ready\""),
            "{text}"
        );
    }
}
