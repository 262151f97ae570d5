//! Operator endpoints: partners and their API keys. Guarded by the admin token.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use workflow_store::records::{ApiKeyRecord, PartnerRecord};

use crate::auth::{generate_key, hash_key, parse_actor_type, Admin};
use crate::error::ApiError;
use crate::extract::JsonBody;
use crate::views::{rfc3339, ActorView};
use crate::AppState;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatePartner {
    /// 1 to 64 characters: lowercase letters, digits, `-` and `_`.
    pub id: String,
    pub name: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PartnerView {
    pub id: String,
    pub name: String,
    pub created_at: String,
}

fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

#[utoipa::path(post, path = "/v1/admin/partners", tag = "admin",
    request_body = CreatePartner,
    responses((status = 201, body = PartnerView), (status = 409, body = crate::error::ErrorResponse)),
    security(("admin_token" = [])))]
pub async fn create_partner(
    _admin: Admin,
    State(state): State<AppState>,
    JsonBody(body): JsonBody<CreatePartner>,
) -> Result<(StatusCode, Json<PartnerView>), ApiError> {
    if !valid_id(&body.id) {
        return Err(ApiError::invalid(
            "$.id",
            "must be 1 to 64 characters of a-z, 0-9, - and _",
        ));
    }
    let name = body.name.trim();
    if name.is_empty() || name.len() > 200 {
        return Err(ApiError::invalid("$.name", "must be 1 to 200 characters"));
    }
    let rec = PartnerRecord {
        id: body.id,
        name: name.to_string(),
        created_at: state.engine.clock().now(),
    };
    state.engine.store().create_partner(&rec).await?;
    Ok((
        StatusCode::CREATED,
        Json(PartnerView {
            id: rec.id,
            name: rec.name,
            created_at: rfc3339(rec.created_at),
        }),
    ))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ActorSpec {
    pub id: String,
    /// `human` or `agent`.
    #[serde(rename = "type")]
    pub actor_type: String,
    #[serde(default)]
    pub roles: Vec<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApiKey {
    pub partner_id: String,
    pub actor: ActorSpec,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ApiKeyView {
    /// The secret. Shown only here, once; the server keeps only its hash.
    pub key: String,
    pub key_id: String,
    pub partner_id: String,
    pub actor: ActorView,
    pub roles: Vec<String>,
    pub created_at: String,
}

#[utoipa::path(post, path = "/v1/admin/api-keys", tag = "admin",
    request_body = CreateApiKey,
    responses((status = 201, body = ApiKeyView), (status = 404, body = crate::error::ErrorResponse)),
    security(("admin_token" = [])))]
pub async fn create_api_key(
    _admin: Admin,
    State(state): State<AppState>,
    JsonBody(body): JsonBody<CreateApiKey>,
) -> Result<(StatusCode, Json<ApiKeyView>), ApiError> {
    let actor_type = parse_actor_type(&body.actor.actor_type)
        .ok_or_else(|| ApiError::invalid("$.actor.type", "must be `human` or `agent`"))?;
    let actor_id = body.actor.id.trim().to_string();
    if actor_id.is_empty() || actor_id.len() > 128 {
        return Err(ApiError::invalid(
            "$.actor.id",
            "must be 1 to 128 characters",
        ));
    }
    for (i, role) in body.actor.roles.iter().enumerate() {
        if role.trim().is_empty() || role.len() > 64 {
            return Err(ApiError::invalid(
                format!("$.actor.roles[{i}]"),
                "must be 1 to 64 characters",
            ));
        }
    }
    let key = generate_key();
    let rec = ApiKeyRecord {
        id: format!("key_{}", uuid::Uuid::now_v7().simple()),
        partner_id: body.partner_id,
        actor_id,
        actor_type,
        roles: body.actor.roles,
        created_at: state.engine.clock().now(),
    };
    state
        .engine
        .store()
        .create_api_key(&hash_key(&key), &rec)
        .await?;
    let actor = workflow_core::instance::ActorRef {
        id: rec.actor_id.clone(),
        actor_type,
    };
    Ok((
        StatusCode::CREATED,
        Json(ApiKeyView {
            key,
            key_id: rec.id,
            partner_id: rec.partner_id,
            actor: ActorView::from(&actor),
            roles: rec.roles,
            created_at: rfc3339(rec.created_at),
        }),
    ))
}
