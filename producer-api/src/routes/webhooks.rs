//! Notification deliveries and webhook secrets: a partner reads and rotates its Standard
//! Webhooks signing secret, lists an instance's deliveries with every attempt, reads one
//! delivery, and redelivers a finished one.
//!
//! Tenancy as everywhere: another partner's instance or delivery is a 404. Secrets are shown to
//! human callers only (an agent key gets 403 `not_eligible`).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use utoipa::ToSchema;
use workflow_core::instance::ActorType;
use workflow_egress::webhook::generate_secret;
use workflow_engine::notify::ROTATION_GRACE_MS;
use workflow_store::{
    DeliveryAttemptRecord, DeliveryRecord, RedeliverOutcome, WebhookSecretRecord,
};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::views::rfc3339;
use crate::AppState;

/// The routes of this module, merged into the API's router.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/workflows/webhooks/secret", get(get_secret))
        .route("/v1/workflows/webhooks/secret/rotate", post(rotate_secret))
        .route(
            "/v1/workflows/instances/{id}/deliveries",
            get(list_deliveries),
        )
        .route("/v1/workflows/deliveries/{id}", get(get_delivery))
        .route("/v1/workflows/deliveries/{id}/redeliver", post(redeliver))
}

/// The partner's webhook signing secrets.
#[derive(Debug, Serialize, ToSchema)]
pub struct SecretView {
    /// `whsec_` + base64 of the key: verify `webhook-signature` with it.
    pub secret: String,
    /// After a rotation, the previous secret: it also signs until `previous_expires_at`.
    pub previous_secret: Option<String>,
    pub previous_expires_at: Option<String>,
    pub created_at: String,
    pub rotated_at: Option<String>,
    /// How long the previous secret keeps signing after a rotation, in seconds.
    pub rotation_grace_seconds: i64,
}

impl SecretView {
    fn new(rec: &WebhookSecretRecord) -> SecretView {
        SecretView {
            secret: rec.secret.clone(),
            previous_secret: rec.previous_secret.clone(),
            previous_expires_at: rec.previous_expires_at.map(rfc3339),
            created_at: rfc3339(rec.created_at),
            rotated_at: rec.rotated_at.map(rfc3339),
            rotation_grace_seconds: ROTATION_GRACE_MS / 1000,
        }
    }
}

/// One attempt of a delivery.
#[derive(Debug, Serialize, ToSchema)]
pub struct AttemptView {
    /// 1-based.
    pub seq: i64,
    pub attempted_at: String,
    /// The receiver's HTTP status (webhook) or SMTP reply code (email), if it answered.
    pub status_code: Option<i64>,
    pub latency_ms: i64,
    /// The start of the response, truncated (512 bytes).
    pub response_snippet: String,
    pub error: Option<String>,
    pub succeeded: bool,
}

impl AttemptView {
    fn new(a: &DeliveryAttemptRecord) -> AttemptView {
        AttemptView {
            seq: a.seq,
            attempted_at: rfc3339(a.attempted_at),
            status_code: a.status_code,
            latency_ms: a.latency_ms,
            response_snippet: a.response_snippet.clone(),
            error: a.error.clone(),
            succeeded: a.succeeded,
        }
    }
}

/// A notification delivery and its delivery log.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryView {
    /// Also the `webhook-id` header: stable across retries and redeliveries.
    pub id: String,
    pub instance_id: String,
    pub step_index: i64,
    /// `step`, `approval_requested`, `approval_reminder` or `approval_overdue`.
    pub purpose: String,
    /// `webhook` or `email`.
    pub channel: String,
    /// The URL or the address.
    pub target: String,
    /// `queued`, `sending`, `retrying`, `delivered` or `dead_lettered`.
    pub status: String,
    /// The webhook's event type (`type` of the envelope).
    pub event_type: Option<String>,
    /// Whether a step waits for this delivery.
    pub wait_for_delivery: bool,
    /// When the next attempt is due (while `retrying`).
    pub next_attempt_at: Option<String>,
    pub last_error: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    pub delivered_at: Option<String>,
    pub attempt_count: i64,
    pub attempts: Vec<AttemptView>,
}

impl DeliveryView {
    fn new(d: &DeliveryRecord, attempts: &[DeliveryAttemptRecord]) -> DeliveryView {
        DeliveryView {
            id: d.id.clone(),
            instance_id: d.instance_id.clone(),
            step_index: d.step_index,
            purpose: d.purpose.clone(),
            channel: d.channel.clone(),
            target: d.target.clone(),
            status: d.status.as_str().to_string(),
            event_type: d
                .request
                .get("event_type")
                .and_then(|v| v.as_str())
                .map(str::to_string),
            wait_for_delivery: d.wait,
            next_attempt_at: (d.status == workflow_store::DeliveryStatus::Retrying)
                .then_some(d.next_check_at)
                .flatten()
                .map(rfc3339),
            last_error: d.last_error.clone(),
            created_at: rfc3339(d.created_at),
            updated_at: rfc3339(d.updated_at),
            delivered_at: d.delivered_at.map(rfc3339),
            attempt_count: d.attempts,
            attempts: attempts.iter().map(AttemptView::new).collect(),
        }
    }
}

/// An instance's deliveries.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryList {
    pub data: Vec<DeliveryView>,
}

fn humans_only(caller: &Caller) -> Result<(), ApiError> {
    if caller.actor.actor_type == ActorType::Human {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "not_eligible",
            "webhook secrets are shown to human callers only",
        ))
    }
}

/// The partner's webhook signing secret (created on first use).
#[utoipa::path(get, path = "/v1/workflows/webhooks/secret", tag = "webhooks",
    responses((status = 200, body = SecretView), (status = 403, body = crate::error::ErrorResponse)),
    security(("api_key" = [])))]
pub async fn get_secret(
    caller: Caller,
    State(state): State<AppState>,
) -> Result<Json<SecretView>, ApiError> {
    humans_only(&caller)?;
    let rec = state
        .engine
        .webhook_secret(&caller.partner_id, generate_secret)
        .await?;
    Ok(Json(SecretView::new(&rec)))
}

/// Rotate the signing secret: the new one signs from now on; the previous one also signs for
/// the grace period (the `webhook-signature` header then carries two signatures).
#[utoipa::path(post, path = "/v1/workflows/webhooks/secret/rotate", tag = "webhooks",
    responses((status = 200, body = SecretView), (status = 403, body = crate::error::ErrorResponse)),
    security(("api_key" = [])))]
pub async fn rotate_secret(
    caller: Caller,
    State(state): State<AppState>,
) -> Result<Json<SecretView>, ApiError> {
    humans_only(&caller)?;
    let rec = state
        .engine
        .rotate_webhook_secret(&caller.partner_id, generate_secret())
        .await?;
    Ok(Json(SecretView::new(&rec)))
}

async fn with_attempts(state: &AppState, d: &DeliveryRecord) -> Result<DeliveryView, ApiError> {
    let attempts = state
        .engine
        .store()
        .list_delivery_attempts(&d.partner_id, &d.id)
        .await?;
    Ok(DeliveryView::new(d, &attempts))
}

/// The notification deliveries of an instance, oldest first, each with its attempts.
#[utoipa::path(get, path = "/v1/workflows/instances/{id}/deliveries", tag = "webhooks",
    params(("id" = String, Path)),
    responses((status = 200, body = DeliveryList), (status = 404, body = crate::error::ErrorResponse)),
    security(("api_key" = [])))]
pub async fn list_deliveries(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<DeliveryList>, ApiError> {
    let store = state.engine.store();
    if store.get_instance(&caller.partner_id, &id).await?.is_none() {
        return Err(ApiError::not_found("instance", &id));
    }
    let deliveries = store.list_deliveries(&caller.partner_id, &id).await?;
    let mut data = Vec::with_capacity(deliveries.len());
    for d in &deliveries {
        data.push(with_attempts(&state, d).await?);
    }
    Ok(Json(DeliveryList { data }))
}

/// One delivery with its attempts.
#[utoipa::path(get, path = "/v1/workflows/deliveries/{id}", tag = "webhooks",
    params(("id" = String, Path)),
    responses((status = 200, body = DeliveryView), (status = 404, body = crate::error::ErrorResponse)),
    security(("api_key" = [])))]
pub async fn get_delivery(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<DeliveryView>, ApiError> {
    let d = state
        .engine
        .store()
        .get_delivery(&caller.partner_id, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("delivery", &id))?;
    Ok(Json(with_attempts(&state, &d).await?))
}

/// Try a delivered or dead-lettered delivery again: a new round of the retry schedule, the
/// same `webhook-id`. 409 `delivery_in_progress` while an attempt is pending.
#[utoipa::path(post, path = "/v1/workflows/deliveries/{id}/redeliver", tag = "webhooks",
    params(("id" = String, Path)),
    responses((status = 202, description = "queued again", body = DeliveryView),
        (status = 404, body = crate::error::ErrorResponse), (status = 409, body = crate::error::ErrorResponse)),
    security(("api_key" = [])))]
pub async fn redeliver(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<DeliveryView>), ApiError> {
    match state.engine.redeliver(&caller.partner_id, &id).await? {
        RedeliverOutcome::Queued(d) => {
            Ok((StatusCode::ACCEPTED, Json(with_attempts(&state, &d).await?)))
        }
        RedeliverOutcome::InProgress(d) => Err(ApiError::conflict(
            "delivery_in_progress",
            format!(
                "delivery `{id}` is {}; redeliver it once it is delivered or dead-lettered",
                d.status.as_str()
            ),
        )),
    }
}
