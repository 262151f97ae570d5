//! Authentication, the admin endpoints, the error shape on unknown routes, the OpenAPI document.

use reqwest::Method;
use serde_json::json;

use crate::helpers::{assert_error, spawn_app, Backend, ADMIN};

async fn keys_and_admin_token_are_required(backend: Backend) {
    let app = spawn_app(backend).await;
    let p = app.partner("acme").await;
    let (s, b) = app
        .call(Method::GET, "/v1/workflows/templates", None, None)
        .await;
    assert_eq!(s, 401);
    assert_error(&b, "unauthorized");
    let (s, _) = app
        .call(
            Method::GET,
            "/v1/workflows/templates",
            Some("wfk_not_a_key"),
            None,
        )
        .await;
    assert_eq!(s, 401);
    // A partner key is not the admin token, and the admin token is not a partner key.
    let (s, _) = app
        .call(
            Method::POST,
            "/v1/admin/partners",
            Some(&p.requester),
            Some(json!({"id": "x", "name": "x"})),
        )
        .await;
    assert_eq!(s, 401);
    let (s, _) = app
        .call(Method::GET, "/v1/workflows/templates", Some(ADMIN), None)
        .await;
    assert_eq!(s, 401);

    // A key says whom it acts for; without one, nobody.
    let (s, me) = app.get("/v1/workflows/me", &p.cfo).await;
    assert_eq!(s, 200, "{me}");
    assert_eq!(
        me,
        json!({"partner_id": "acme", "actor": {"id": "carol", "type": "human"}, "roles": ["cfo"]})
    );
    let (s, me) = app.get("/v1/workflows/me", &p.agent).await;
    assert_eq!(s, 200, "{me}");
    assert_eq!(me["actor"], json!({"id": "bot", "type": "agent"}));
    let (s, b) = app.call(Method::GET, "/v1/workflows/me", None, None).await;
    assert_eq!(s, 401);
    assert_error(&b, "unauthorized");

    // Admin input errors.
    let (s, b) = app
        .call(
            Method::POST,
            "/v1/admin/partners",
            Some(ADMIN),
            Some(json!({"id": "acme", "name": "again"})),
        )
        .await;
    assert_eq!(s, 409, "{b}");
    assert_error(&b, "already_exists");
    let (s, b) = app
        .call(
            Method::POST,
            "/v1/admin/partners",
            Some(ADMIN),
            Some(json!({"id": "Bad Id!", "name": "x"})),
        )
        .await;
    assert_eq!(s, 422, "{b}");
    assert_eq!(b["error"]["details"][0]["path"], "$.id");
    let (s, b) = app
        .call(
            Method::POST,
            "/v1/admin/api-keys",
            Some(ADMIN),
            Some(
                json!({"partner_id": "nobody", "actor": {"id": "a", "type": "human", "roles": []}}),
            ),
        )
        .await;
    assert_eq!(s, 404, "{b}");
    let (s, b) = app
        .call(
            Method::POST,
            "/v1/admin/api-keys",
            Some(ADMIN),
            Some(json!({"partner_id": "acme", "actor": {"id": "a", "type": "robot", "roles": []}})),
        )
        .await;
    assert_eq!(s, 422, "{b}");
    assert_eq!(b["error"]["details"][0]["path"], "$.actor.type");

    // Keys are stored hashed: the secret appears nowhere in the database.
    let (_, k) = app
        .call(Method::POST, "/v1/admin/api-keys", Some(ADMIN), Some(json!({"partner_id": "acme", "actor": {"id": "z", "type": "agent", "roles": ["cfo"]}})))
        .await;
    let secret = k["key"].as_str().unwrap_or_default().to_string();
    assert!(secret.starts_with("wfk_"));
    assert!(app
        .store
        .find_api_key(&secret)
        .await
        .ok()
        .flatten()
        .is_none());
    let hashed = producer_api::auth::hash_key(&secret);
    assert!(app
        .store
        .find_api_key(&hashed)
        .await
        .ok()
        .flatten()
        .is_some());
    let (s, _) = app
        .call(Method::GET, "/v1/workflows/templates", Some(&secret), None)
        .await;
    assert_eq!(s, 200);
}

async fn unknown_routes_and_openapi(backend: Backend) {
    let app = spawn_app(backend).await;
    let (s, b) = app.call(Method::GET, "/v1/nothing-here", None, None).await;
    assert_eq!(s, 404);
    assert_error(&b, "not_found");
    let (s, b) = app
        .call(Method::PATCH, "/v1/workflows/templates", None, None)
        .await;
    assert_eq!(s, 405);
    assert_error(&b, "method_not_allowed");
    let (s, doc) = app.call(Method::GET, "/openapi.json", None, None).await;
    assert_eq!(s, 200);
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")));
    for path in [
        "/v1/workflows/templates",
        "/v1/workflows/templates/{id}",
        "/v1/workflows/instances",
        "/v1/workflows/instances/{id}",
        "/v1/workflows/instances/{id}/cancel",
        "/v1/workflows/instances/{id}/events",
        "/v1/admin/partners",
        "/v1/admin/api-keys",
        "/v1/workflows/analytics",
        "/v1/workflows/me",
        "/v1/workflows/reports/instances",
    ] {
        assert!(doc["paths"][path].is_object(), "OpenAPI lacks {path}");
    }
    assert!(doc["components"]["schemas"]["InstanceView"].is_object());
}

/// Liveness needs only the process; readiness needs the database, and says so when it is gone.
async fn probes_follow_the_store(backend: Backend) {
    let app = spawn_app(backend).await;
    let (s, b) = app.call(Method::GET, "/readyz", None, None).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["status"], "ready");
    let (s, _) = app.call(Method::GET, "/healthz", None, None).await;
    assert_eq!(s, 200);

    // The store's connections gone (closing them is what a lost database looks like here).
    app.store.close().await;
    let (s, b) = app.call(Method::GET, "/readyz", None, None).await;
    assert_eq!(s, 503, "{b}");
    assert_error(&b, "not_ready");
    let (s, _) = app.call(Method::GET, "/healthz", None, None).await;
    assert_eq!(
        s, 200,
        "alive all the same: a restart would not bring the database back"
    );
}

crate::on_both_stores!(
    keys_and_admin_token_are_required,
    unknown_routes_and_openapi,
    probes_follow_the_store
);
