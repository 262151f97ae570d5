//! The HTTP handlers, one module per resource.

pub mod admin;
pub mod analytics;
pub mod approvals;
pub mod dashboard;
pub mod health;
pub mod instances;
pub mod me;
pub mod reports;
pub mod templates;
pub mod webhooks;

use axum::http::StatusCode;

use crate::error::ApiError;

pub async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not support that method",
    )
}
