//! API errors: JSON `{error, kind}` with the status that fits.
//!
//! Client mistakes are 4xx with a message that says what to change (for limits, which config
//! key to raise); only faults of the daemon itself are 5xx. The `kind` is stable for clients
//! and is also the `cause` label of the failure counter, which the metrics middleware reads
//! from the response's extensions.

use std::any::Any;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tower_http::catch_panic::CatchPanicLayer;

use crate::batch::BatchError;
use crate::preprocess::PreprocessError;

/// Error kind of a response, for the failure counter.
#[derive(Debug, Clone, Copy)]
pub struct ErrorKind(pub &'static str);

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
        }
    }

    pub fn malformed(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "malformed", message)
    }

    pub fn unknown_model(name: &str, served: &[&str]) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "unknown_model",
            format!("no model named {name:?}; served models: {served:?}"),
        )
    }

    pub fn not_found(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "no route {path:?}; see GET /v1/models, POST /v1/detect, POST /v1/models/{{name}}/detect, POST /v1/models/{{name}}/explain, POST /v2/models/{{name}}/infer"
            ),
        )
    }

    pub fn body_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!(
                "request body exceeds {limit} bytes; raise server.body_limit_bytes to accept it"
            ),
        )
    }

    pub fn overloaded(message: impl Into<String>) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, "overloaded", message)
    }

    pub fn not_ready() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "models are still loading; see GET /health/ready",
        )
    }

    pub fn timeout(ms: u64) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "timeout",
            format!("request took longer than server.request_timeout_ms = {ms}"),
        )
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    /// Prefixes the message with which image of a batch it concerns.
    pub fn for_image(mut self, index: usize, of: usize) -> Self {
        if of > 1 {
            self.message = format!("image {index}: {}", self.message);
        }
        self
    }
}

/// Catches a handler's panic and answers 500 `internal` in the API's JSON form, so that the
/// client gets an answer and [`super::track`] counts it, instead of a reset connection. No
/// panic should be reachable from input (the fuzz targets look for one); this is the net under
/// a bug, and the reason panics unwind rather than abort.
pub fn catch_panic() -> CatchPanicLayer<PanicResponder> {
    CatchPanicLayer::custom(panic_response as PanicResponder)
}

/// What [`catch_panic`] calls with the panic's payload.
pub type PanicResponder = fn(Box<dyn Any + Send + 'static>) -> Response;

fn panic_response(panic: Box<dyn Any + Send + 'static>) -> Response {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    ApiError::internal(format!("csgd bug: the request handler panicked ({what})")).into_response()
}

impl From<PreprocessError> for ApiError {
    fn from(e: PreprocessError) -> Self {
        let (status, kind) = match &e {
            PreprocessError::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            PreprocessError::TooManyPixels { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "too_many_pixels")
            }
            PreprocessError::Undecodable(_) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "undecodable_image")
            }
            PreprocessError::Animated => (StatusCode::UNPROCESSABLE_ENTITY, "animated_image"),
            PreprocessError::Shape(_) => (StatusCode::UNPROCESSABLE_ENTITY, "wrong_shape"),
        };
        Self::new(status, kind, e.to_string())
    }
}

impl From<BatchError> for ApiError {
    fn from(e: BatchError) -> Self {
        match &e {
            BatchError::QueueFull { .. } => Self::overloaded(e.to_string()),
            BatchError::Closed(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                e.to_string(),
            ),
            BatchError::WrongLength { .. } => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "wrong_shape",
                e.to_string(),
            ),
            BatchError::Inference(_) => Self::internal(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(kind = self.kind, status = %self.status, "{}", self.message);
        } else {
            tracing::debug!(kind = self.kind, status = %self.status, "{}", self.message);
        }
        let mut response = (
            self.status,
            Json(json!({ "error": self.message, "kind": self.kind })),
        )
            .into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response.extensions_mut().insert(ErrorKind(self.kind));
        response
    }
}

#[cfg(test)]
mod tests {
    use axum::Router;
    use axum::body::Body;
    use axum::http::Request;
    use axum::routing::get;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;

    #[tokio::test]
    async fn a_panicking_handler_answers_500_json() {
        async fn boom() -> &'static str {
            panic!("index out of bounds")
        }
        let app = Router::new().route("/boom", get(boom)).layer(catch_panic());
        let request = Request::get("/boom").body(Body::empty()).unwrap();
        let response = app.oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["kind"], "internal");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("index out of bounds"),
            "{body}"
        );
    }
}
