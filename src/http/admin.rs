//! Operator routes, mounted only when `admin.enabled`: `POST /admin/reload` reloads every
//! model ([`crate::reload`]). Each call needs `Authorization: Bearer <admin.token>`.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::{ApiError, AppState};
use crate::reload::{self, ReloadError};

pub async fn reload(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorise(&state, &headers) {
        let challenge = e.status == StatusCode::UNAUTHORIZED;
        let mut response = e.into_response();
        if challenge {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        return response;
    }
    match reload::reload(&state, "admin").await {
        Ok(done) => Json(done).into_response(),
        Err(e) => {
            let (status, kind) = match &e {
                ReloadError::InProgress => (StatusCode::CONFLICT, "reload_in_progress"),
                ReloadError::NotServing => (StatusCode::SERVICE_UNAVAILABLE, "not_ready"),
                ReloadError::Load(_) | ReloadError::Task(_) => {
                    (StatusCode::INTERNAL_SERVER_ERROR, "reload_failed")
                }
            };
            ApiError::new(status, kind, e.to_string()).into_response()
        }
    }
}

/// Checks the bearer token in constant time (a byte-by-byte comparison that stops at the first
/// difference would let a caller find the token one byte at a time from response timings).
fn authorise(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let expected = state.settings.admin.token.expose().trim().as_bytes();
    match given {
        Some(token) if bool::from(token.as_bytes().ct_eq(expected)) => Ok(()),
        Some(_) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the admin token does not match admin.token",
        )),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "admin routes need the header `Authorization: Bearer <admin.token>`",
        )),
    }
}
