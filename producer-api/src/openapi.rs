//! The OpenAPI document, generated from the handlers' annotations; served without credentials.

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::routes::{admin, analytics, approvals, instances, me, reports, templates, webhooks};

#[derive(OpenApi)]
#[openapi(
    info(title = "PayOS Workflow Engine", description = "Configure multi-step workflows (approvals, conditions, actions, waits, notifications) as JSON templates and run them."),
    paths(
        admin::create_partner,
        admin::create_api_key,
        templates::create,
        templates::list,
        templates::get_one,
        templates::get_version,
        templates::update,
        templates::deactivate,
        instances::create,
        instances::create_batch,
        instances::list,
        instances::get_one,
        instances::cancel,
        instances::events,
        instances::signal,
        approvals::approve,
        approvals::reject,
        approvals::pending,
        approvals::bulk,
        analytics::analytics,
        me::me,
        reports::instances,
        webhooks::get_secret,
        webhooks::rotate_secret,
        webhooks::list_deliveries,
        webhooks::get_delivery,
        webhooks::redeliver,
    ),
    components(schemas(crate::error::ErrorResponse)),
    modifiers(&Security)
)]
pub struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let bearer =
            || SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build());
        components.add_security_scheme("api_key", bearer());
        components.add_security_scheme("admin_token", bearer());
    }
}

pub async fn serve() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
