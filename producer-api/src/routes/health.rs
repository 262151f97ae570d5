//! Probes: liveness (`/healthz`: the process serves) and readiness (`/readyz`: it can reach its
//! database), so an orchestrator restarts a stuck process but only takes one whose database is
//! unreachable out of the load balancer (restarting it would not bring the database back).

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::AppState;

/// How long the readiness query may take; a probe's own timeout is usually 1-3 s.
const READY_TIMEOUT: Duration = Duration::from_millis(1500);

pub async fn live() -> &'static str {
    "ok"
}

/// 200 `{"status": "ready"}` while the store answers a query in time, else 503 `not_ready`.
/// The cause is logged, not returned: the probe needs no authentication.
pub async fn ready(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let problem = match tokio::time::timeout(READY_TIMEOUT, state.engine.store().ping()).await {
        Ok(Ok(())) => return Ok(Json(json!({ "status": "ready" }))),
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no answer within {READY_TIMEOUT:?}"),
    };
    tracing::warn!(%problem, "not ready: the database does not answer");
    Err(ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "not_ready",
        "the database does not answer",
    ))
}
