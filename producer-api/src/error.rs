//! The API's one error type and its JSON shape:
//! `{"error": {"code", "message", "details": [{"path", "problem"}]}, "request_id"}`.
//!
//! Domain, engine and store errors are translated here, at the boundary. A 500 never carries
//! internals: the cause is logged with the request id, the body says only "internal error".

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;
use workflow_core::machine::MachineError;
use workflow_core::validate::{Problem, TemplateError};
use workflow_engine::EngineError;
use workflow_store::StoreError;

use crate::request_id;

/// One problem with the request, at a JSON path (`$.steps[1].config`) or a parameter name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Detail {
    pub path: String,
    pub problem: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
    pub details: Vec<Detail>,
}

/// The error response document.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorResponse {
    pub error: ErrorBody,
    pub request_id: String,
}

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub details: Vec<Detail>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            details: Vec::new(),
        }
    }

    pub fn with_detail(mut self, path: impl Into<String>, problem: impl Into<String>) -> ApiError {
        self.details.push(Detail {
            path: path.into(),
            problem: problem.into(),
        });
        self
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", message)
    }

    pub fn invalid(path: impl Into<String>, problem: impl Into<String>) -> ApiError {
        let problem = problem.into();
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            format!("the request is invalid: {problem}"),
        )
        .with_detail(path, problem)
    }

    pub fn problems(message: impl Into<String>, problems: Vec<Problem>) -> ApiError {
        ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: "validation_failed",
            message: message.into(),
            details: problems
                .into_iter()
                .map(|p| Detail {
                    path: p.path,
                    problem: p.problem,
                })
                .collect(),
        }
    }

    pub fn not_found(what: &str, id: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} `{id}` not found"),
        )
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, code, message)
    }

    fn internal() -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; quote the request id when reporting it",
        )
    }

    fn unavailable() -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the service is busy; retry the request",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorResponse {
            error: ErrorBody {
                code: self.code.to_string(),
                message: self.message,
                details: self.details,
            },
            request_id: request_id::current(),
        };
        (self.status, axum::Json(body)).into_response()
    }
}

impl From<TemplateError> for ApiError {
    fn from(e: TemplateError) -> ApiError {
        match e {
            TemplateError::Malformed {
                line,
                column,
                message,
            } => ApiError::bad_request(format!(
                "malformed JSON at line {line} column {column}: {message}"
            ))
            .with_detail(format!("line {line}, column {column}"), message),
            TemplateError::TooLarge { size, max } => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "validation_failed",
                format!("template is {size} bytes; the limit is {max}"),
            )
            .with_detail("$", format!("document is {size} bytes; the limit is {max}")),
            TemplateError::Invalid(problems) => {
                let n = problems.len();
                ApiError::problems(format!("the template has {n} problem(s)"), problems)
            }
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::NotFound { what, id } => ApiError::not_found(what, &id),
            StoreError::AlreadyExists { what, id } => {
                ApiError::conflict("already_exists", format!("{what} `{id}` already exists"))
            }
            StoreError::Conflict { what, id } => ApiError::conflict(
                "conflict",
                format!("{what} `{id}` was changed concurrently; retry"),
            ),
            // The engine re-reads the template on this; it reaches a caller only if the
            // template kept changing under every attempt.
            StoreError::TemplateChanged { id } => ApiError::conflict(
                "conflict",
                format!("template `{id}` was changed concurrently; retry"),
            ),
            e if e.is_retryable() => {
                tracing::warn!(error = %e, request_id = %request_id::current(), "store busy");
                ApiError::unavailable()
            }
            e => {
                tracing::error!(error = %e, request_id = %request_id::current(), "store failure");
                ApiError::internal()
            }
        }
    }
}

/// The HTTP status and code of a domain refusal, by its stable code (also as stored by the
/// approval pool for a decision it refused).
pub fn refusal(code: &str, message: String) -> ApiError {
    let (status, code) = match code {
        "step_not_found" => (StatusCode::NOT_FOUND, "step_not_found"),
        "not_found" => (StatusCode::NOT_FOUND, "not_found"),
        "not_eligible" => (StatusCode::FORBIDDEN, "not_eligible"),
        "separation_of_duties" => (StatusCode::FORBIDDEN, "separation_of_duties"),
        "agent_limit_exceeded" => (StatusCode::FORBIDDEN, "agent_limit_exceeded"),
        "comment_required" => {
            return ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "comment_required",
                message.clone(),
            )
            .with_detail("$.comment", message)
        }
        "not_an_approval_step" => (StatusCode::CONFLICT, "not_an_approval_step"),
        "step_not_waiting" => (StatusCode::CONFLICT, "step_not_waiting"),
        "already_decided" => (StatusCode::CONFLICT, "already_decided"),
        "not_waiting_for_signal" => (StatusCode::CONFLICT, "not_waiting_for_signal"),
        _ => (StatusCode::CONFLICT, "invalid_state"),
    };
    ApiError::new(status, code, message)
}

impl From<MachineError> for ApiError {
    fn from(e: MachineError) -> ApiError {
        refusal(e.code(), e.to_string())
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> ApiError {
        match e {
            EngineError::NotFound { what, id } => ApiError::not_found(what, &id),
            EngineError::TemplateInactive { .. } => {
                ApiError::conflict("template_inactive", e.to_string())
            }
            EngineError::IdempotencyMismatch { .. } => {
                ApiError::conflict("idempotency_key_reused", e.to_string())
                    .with_detail("$.idempotency_key", "already used for a different request")
            }
            EngineError::Machine(m) => m.into(),
            EngineError::Store(s) => s.into(),
            EngineError::Contended { .. } => {
                tracing::warn!(error = %e, "contended instance");
                ApiError::unavailable()
            }
            EngineError::Bus(_) => {
                tracing::warn!(error = %e, "command not published");
                ApiError::unavailable()
            }
            EngineError::CorruptTemplate { .. } => {
                tracing::error!(error = %e, request_id = %request_id::current(), "corrupt template");
                ApiError::internal()
            }
            EngineError::Message(_) => {
                tracing::error!(error = %e, request_id = %request_id::current(), "message encoding failed");
                ApiError::internal()
            }
        }
    }
}
