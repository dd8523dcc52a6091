//! The API's errors: one enum, each variant one status code, every body `{error, detail}` (plus
//! `errors`, one line each, when a policy or subject is refused). An internal error's cause (a
//! database message, say) is logged, never sent: the client gets a fixed message and an error id
//! that the log line carries too.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("a bearer token is required")]
    Unauthorized,
    #[error("this needs the `{0}` role")]
    Forbidden(&'static str),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    /// Refused by the policy checks; each error names file, line, column and field.
    #[error("{detail}")]
    Invalid { detail: String, errors: Vec<String> },
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Internal(String),
    /// A limit on what one caller may hold open (watch streams).
    #[error("{0}")]
    TooMany(String),
}

/// What every error response carries.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// A stable code: unauthorized, forbidden, not_found, bad_request, invalid, conflict,
    /// internal, too_many.
    pub error: &'static str,
    pub detail: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
    /// Internal errors only: the id of the log line that holds the cause.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_id: Option<String>,
}

/// Policy errors listed in an answer at most.
const MAX_ERRORS_LISTED: usize = 1_000;

/// What a client is told about an internal error, whatever its cause.
pub const INTERNAL_MESSAGE: &str = "internal error: nothing more is said here; the operator finds the cause in the control plane's log under this error id";

impl ApiError {
    /// The HTTP status of this error, whichever front end (API or console) answers it.
    pub fn status(&self) -> StatusCode {
        self.parts().0
    }

    /// What a client may be told: an internal error's cause goes to the log only, under an id
    /// that the answer names (returned with the message).
    pub fn public_detail(&self) -> (String, Option<String>) {
        match self {
            Self::Internal(cause) => {
                let id = uuid::Uuid::new_v4().simple().to_string();
                tracing::error!(error_id = %id, cause = %cause, "request failed");
                (INTERNAL_MESSAGE.to_string(), Some(id))
            }
            _ => (self.to_string(), None),
        }
    }

    fn parts(&self) -> (StatusCode, &'static str) {
        match self {
            Self::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Self::Invalid { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "invalid"),
            Self::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            Self::TooMany(_) => (StatusCode::TOO_MANY_REQUESTS, "too_many"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.parts();
        let (detail, error_id) = self.public_detail();
        let errors = match &self {
            // The first ones: a crafted document can hold tens of thousands (`detail` counts them).
            Self::Invalid { errors, .. } => {
                errors.iter().take(MAX_ERRORS_LISTED).cloned().collect()
            }
            _ => Vec::new(),
        };
        let body = ErrorBody {
            error: code,
            detail,
            errors,
            error_id,
        };
        let mut resp = (status, axum::Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}
