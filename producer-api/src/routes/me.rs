//! /v1/workflows/me: who the calling key acts as (partner, actor, roles), so a client such as
//! the dashboard can say who is signed in and what they may decide.

use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::Caller;
use crate::views::ActorView;

#[derive(Debug, Serialize, ToSchema)]
pub struct MeView {
    pub partner_id: String,
    pub actor: ActorView,
    pub roles: Vec<String>,
}

/// The caller's partner, actor and roles.
#[utoipa::path(get, path = "/v1/workflows/me", tag = "auth",
    responses((status = 200, body = MeView), (status = 401, body = crate::error::ErrorResponse)),
    security(("api_key" = [])))]
pub async fn me(caller: Caller) -> Json<MeView> {
    Json(MeView {
        actor: ActorView::from(&caller.actor),
        partner_id: caller.partner_id,
        roles: caller.roles,
    })
}
