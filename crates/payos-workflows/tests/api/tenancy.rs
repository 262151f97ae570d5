//! A partner never sees another partner's data: every endpoint answers 404 for foreign ids.

use reqwest::Method;
use serde_json::json;

use crate::helpers::{assert_error, spawn_app, Backend, PROCUREMENT};

async fn another_partners_data_is_a_404_everywhere(backend: Backend) {
    let app = spawn_app(backend).await;
    let a = app.partner("alpha").await;
    let b = app.partner("beta").await;
    let tid = app.create_template(&a.requester, PROCUREMENT).await["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let iid = app
        .start(&a.requester, &tid, json!({"id": "t", "amount": 5000}))
        .await["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    app.wait_for(&a.requester, &iid, "waiting", |x| x["status"] == "waiting")
        .await;

    let doc = PROCUREMENT.as_bytes().to_vec();
    let foreign: Vec<(Method, String, Option<serde_json::Value>)> = vec![
        (Method::GET, format!("/v1/workflows/templates/{tid}"), None),
        (
            Method::DELETE,
            format!("/v1/workflows/templates/{tid}"),
            None,
        ),
        (
            Method::POST,
            "/v1/workflows/instances".into(),
            Some(json!({"template_id": tid, "trigger": {}})),
        ),
        (Method::GET, format!("/v1/workflows/instances/{iid}"), None),
        (
            Method::POST,
            format!("/v1/workflows/instances/{iid}/cancel"),
            Some(json!({})),
        ),
        (
            Method::GET,
            format!("/v1/workflows/instances/{iid}/events"),
            None,
        ),
    ];
    for (method, path, body) in foreign {
        for key in [&b.requester, &b.cfo, &b.agent] {
            let (s, body_out) = app
                .call(method.clone(), &path, Some(key), body.clone())
                .await;
            assert_eq!(s, 404, "{method} {path}: {body_out}");
            assert_error(&body_out, "not_found");
        }
    }
    let (s, _) = app
        .call_raw(
            Method::PUT,
            &format!("/v1/workflows/templates/{tid}"),
            &b.requester,
            doc,
        )
        .await;
    assert_eq!(s, 404);

    // Lists are scoped: beta sees nothing of alpha's.
    let (_, t) = app.get("/v1/workflows/templates", &b.requester).await;
    assert_eq!(t["data"], json!([]));
    let (_, i) = app.get("/v1/workflows/instances", &b.requester).await;
    assert_eq!(i["data"], json!([]));
    // Nothing beta did changed alpha's data.
    let (_, x) = app
        .get(&format!("/v1/workflows/instances/{iid}"), &a.requester)
        .await;
    assert_eq!(x["status"], "waiting");
    let (_, t) = app
        .get(&format!("/v1/workflows/templates/{tid}"), &a.requester)
        .await;
    assert_eq!(
        (t["active"].clone(), t["version"].clone()),
        (json!(true), json!(1))
    );
}

crate::on_both_stores!(another_partners_data_is_a_404_everywhere);
