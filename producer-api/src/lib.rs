//! The workflow REST API (the design card's producer-api).
//!
//! Owns HTTP: authentication by API key, tenancy (every store call names the caller's partner),
//! request parsing into domain types, the one JSON error shape, and the OpenAPI document. It
//! never changes an instance itself: it calls the engine's use cases, which commit state and the
//! commands it causes together. No input reaches a panic or a 500 with internals.

pub mod auth;
pub mod error;
pub mod extract;
pub mod openapi;
pub mod request_id;
pub mod routes;
pub mod views;

use std::sync::Arc;

use axum::routing::{get, post};
use axum::Router;
use workflow_engine::Engine;

/// Settings of the API layer.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Bearer token for /v1/admin. Compared in constant time; never logged.
    pub admin_token: String,
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
    /// Largest page a list returns.
    pub max_page_size: u32,
    /// How long an approve/reject call waits for the approval pool's outcome before answering
    /// 202 (the decision stays queued and is applied in order).
    pub decision_wait: std::time::Duration,
    /// Most decisions one bulk call may carry.
    pub max_bulk_decisions: usize,
    /// Most start requests one `POST /v1/workflows/instances/batch` may carry.
    pub max_batch_triggers: usize,
    /// Where templates may send requests: outbound URLs are checked when a template is saved
    /// (and again, by the workers, when the address is resolved).
    pub egress: workflow_egress::EgressPolicy,
}

impl ApiConfig {
    pub fn new(admin_token: String) -> ApiConfig {
        ApiConfig {
            admin_token,
            max_body_bytes: 1024 * 1024,
            max_page_size: 100,
            decision_wait: std::time::Duration::from_secs(10),
            max_bulk_decisions: 500,
            max_batch_triggers: 500,
            egress: workflow_egress::EgressPolicy::strict(),
        }
    }
}

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub engine: Engine,
    pub config: Arc<ApiConfig>,
    /// API keys recently found in the store.
    pub keys: Arc<auth::KeyCache>,
}

/// The whole API as one router.
pub fn router(engine: Engine, config: ApiConfig) -> Router {
    let max_body = config.max_body_bytes;
    let state = AppState {
        engine,
        config: Arc::new(config),
        keys: Arc::new(auth::KeyCache::default()),
    };
    Router::new()
        .route("/openapi.json", get(openapi::serve))
        .route("/healthz", get(routes::health::live))
        .route("/readyz", get(routes::health::ready))
        .route("/v1/admin/partners", post(routes::admin::create_partner))
        .route("/v1/admin/api-keys", post(routes::admin::create_api_key))
        .route(
            "/v1/workflows/templates",
            post(routes::templates::create).get(routes::templates::list),
        )
        .route(
            "/v1/workflows/templates/{id}",
            get(routes::templates::get_one)
                .put(routes::templates::update)
                .delete(routes::templates::deactivate),
        )
        .route(
            "/v1/workflows/templates/{id}/versions/{version}",
            get(routes::templates::get_version),
        )
        .route(
            "/v1/workflows/instances",
            post(routes::instances::create).get(routes::instances::list),
        )
        .route(
            "/v1/workflows/instances/batch",
            post(routes::instances::create_batch),
        )
        .route(
            "/v1/workflows/instances/{id}",
            get(routes::instances::get_one),
        )
        .route(
            "/v1/workflows/instances/{id}/cancel",
            post(routes::instances::cancel),
        )
        .route(
            "/v1/workflows/instances/{id}/events",
            get(routes::instances::events),
        )
        .route(
            "/v1/workflows/instances/{id}/steps/{n}/approve",
            post(routes::approvals::approve),
        )
        .route(
            "/v1/workflows/instances/{id}/steps/{n}/reject",
            post(routes::approvals::reject),
        )
        .route(
            "/v1/workflows/instances/{id}/signals/{name}",
            post(routes::instances::signal),
        )
        .route("/v1/workflows/pending", get(routes::approvals::pending))
        .route("/v1/workflows/analytics", get(routes::analytics::analytics))
        .route("/v1/workflows/me", get(routes::me::me))
        .route(
            "/v1/workflows/reports/instances",
            get(routes::reports::instances),
        )
        .route(
            "/v1/workflows/approvals/bulk",
            post(routes::approvals::bulk),
        )
        .merge(routes::webhooks::routes())
        .merge(routes::dashboard::routes())
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn(request_id::middleware))
        .with_state(state)
}
