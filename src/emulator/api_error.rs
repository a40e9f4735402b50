//! The DAP error envelope `{"error": {"type", "uuid", "message", …}}` with exactly the keys each
//! error kind has (the official client matches error bodies by shape).

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub error: Value,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            error: json!({"type": kind, "uuid": uuid::Uuid::new_v4().to_string(), "message": message.into()}),
        }
    }

    fn with(mut self, key: &str, value: Value) -> ApiError {
        self.error[key] = value;
        self
    }

    pub fn authentication(message: &str) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "AuthenticationError", message)
    }

    pub fn not_found(kind: &str, id: &str, message: String) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "NotFoundError", message).with("id", json!(id)).with("kind", json!(kind))
    }

    /// `location` points at the offending part of the request body (1-based line and column,
    /// 0-based character offset).
    pub fn validation(message: String, location: (usize, usize, usize)) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "ValidationError", message)
            .with("location", json!({"line": location.0, "column": location.1, "character": location.2}))
    }

    pub fn out_of_range(since: &str, until: Option<&str>) -> ApiError {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "OutOfRangeError",
            format!("the requested range starting at {since} is outside the retained history"),
        )
        .with("since", json!(since))
        .with("until", json!(until))
    }

    pub fn snapshot_required(since: &str, until: Option<&str>) -> ApiError {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "SnapshotRequiredError",
            "the table was reloaded since the given time; a new snapshot is required",
        )
        .with("since", json!(since))
        .with("until", json!(until))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({"error": self.error}))).into_response()
    }
}
