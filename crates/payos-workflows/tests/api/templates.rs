//! Template CRUD: versions, filters, pagination, deactivation.

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{assert_error, spawn_app, Backend, PROCUREMENT};

fn manual(name: &str) -> String {
    json!({
        "name": name,
        "trigger_type": "manual",
        "steps": [{"type": "condition", "name": "Big?", "config": {"expression": "trigger.amount > 100"}}]
    })
    .to_string()
}

async fn versions_filters_pagination_and_deactivation(backend: Backend) {
    let app = spawn_app(backend).await;
    let p = app.partner("acme").await;
    let proc_tpl = app.create_template(&p.requester, PROCUREMENT).await;
    let mut manual_ids = Vec::new();
    for i in 0..3 {
        manual_ids.push(
            app.create_template(&p.requester, &manual(&format!("m{i}")))
                .await["id"]
                .clone(),
        );
    }

    // Filters.
    let (s, b) = app
        .get(
            "/v1/workflows/templates?trigger_type=on_transfer",
            &p.requester,
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["data"].as_array().map(Vec::len), Some(1));
    assert_eq!(b["data"][0]["id"], proc_tpl["id"]);
    let (_, b) = app
        .get("/v1/workflows/templates?trigger_type=manual", &p.requester)
        .await;
    assert_eq!(b["data"].as_array().map(Vec::len), Some(3));

    // Cursor pagination, newest first, every template once.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/workflows/templates?limit=2&cursor={c}"),
            None => "/v1/workflows/templates?limit=2".to_string(),
        };
        let (s, b) = app.get(&path, &p.requester).await;
        assert_eq!(s, 200, "{b}");
        for t in b["data"].as_array().cloned().unwrap_or_default() {
            seen.push(t["id"].clone());
        }
        match b["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    let mut expected = manual_ids.clone();
    expected.reverse();
    expected.push(proc_tpl["id"].clone());
    assert_eq!(seen, expected);

    // PUT makes version 2; an instance started on v1 stays on v1.
    let tid = manual_ids[0].as_str().unwrap_or_default().to_string();
    let before = app.start(&p.requester, &tid, json!({"amount": 5})).await;
    let (s, b) = app
        .call_raw(
            Method::PUT,
            &format!("/v1/workflows/templates/{tid}"),
            &p.requester,
            manual("renamed").into_bytes(),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["version"], 2);
    assert_eq!(b["name"], "renamed");
    let (_, got) = app
        .get(&format!("/v1/workflows/templates/{tid}"), &p.requester)
        .await;
    let versions: Vec<Value> = got["versions"]
        .as_array()
        .map(|v| v.iter().map(|x| x["version"].clone()).collect())
        .unwrap_or_default();
    assert_eq!(versions, vec![json!(1), json!(2)]);
    assert_eq!(got["versions"][0]["definition"]["name"], "m0");
    // Each version on its own: what an instance on it ran.
    let (s, v1) = app
        .get(
            &format!("/v1/workflows/templates/{tid}/versions/1"),
            &p.requester,
        )
        .await;
    assert_eq!(s, 200, "{v1}");
    assert_eq!(v1["version"], 1);
    assert_eq!(v1["definition"], got["versions"][0]["definition"]);
    assert_eq!(v1["created_by"], got["versions"][0]["created_by"]);
    for (version, status) in [("3", 404), ("0", 422), ("two", 422)] {
        let (s, b) = app
            .get(
                &format!("/v1/workflows/templates/{tid}/versions/{version}"),
                &p.requester,
            )
            .await;
        assert_eq!(s.as_u16(), status, "version {version}: {b}");
    }
    let other = app.partner("globex").await;
    let (s, b) = app
        .get(
            &format!("/v1/workflows/templates/{tid}/versions/1"),
            &other.requester,
        )
        .await;
    assert_eq!(s, 404, "another partner's template: {b}");
    let after = app.start(&p.requester, &tid, json!({"amount": 5})).await;
    assert_eq!(before["template_version"], 1);
    assert_eq!(after["template_version"], 2);
    let (_, again) = app
        .get(
            &format!(
                "/v1/workflows/instances/{}",
                before["id"].as_str().unwrap_or_default()
            ),
            &p.requester,
        )
        .await;
    assert_eq!(again["template_version"], 1);

    // DELETE deactivates: no new instances, the listing filter sees it, running ones remain.
    let (s, b) = app
        .call(
            Method::DELETE,
            &format!("/v1/workflows/templates/{tid}"),
            Some(&p.requester),
            None,
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["active"], false);
    let (s, b) = app
        .post(
            "/v1/workflows/instances",
            &p.requester,
            json!({"template_id": tid, "trigger": {"amount": 1}}),
        )
        .await;
    assert_eq!(s, 409, "{b}");
    assert_error(&b, "template_inactive");
    let (_, b) = app
        .get("/v1/workflows/templates?active=false", &p.requester)
        .await;
    assert_eq!(b["data"].as_array().map(Vec::len), Some(1));
    assert_eq!(b["data"][0]["id"], json!(tid));
    let (_, b) = app
        .get("/v1/workflows/templates?active=true", &p.requester)
        .await;
    assert_eq!(b["data"].as_array().map(Vec::len), Some(3));
    let (s, _) = app
        .get(
            &format!(
                "/v1/workflows/instances/{}",
                after["id"].as_str().unwrap_or_default()
            ),
            &p.requester,
        )
        .await;
    assert_eq!(s, 200);
}

async fn bad_list_parameters_are_clear_errors(backend: Backend) {
    let app = spawn_app(backend).await;
    let p = app.partner("acme").await;
    for (query, path) in [
        ("trigger_type=weekly", "trigger_type"),
        ("active=maybe", "active"),
        ("limit=0", "limit"),
        ("limit=1000", "limit"),
        ("limit=x", "limit"),
        ("tigger_type=manual", "tigger_type"),
    ] {
        let (s, b) = app
            .get(&format!("/v1/workflows/templates?{query}"), &p.requester)
            .await;
        assert_eq!(s, 422, "{query}: {b}");
        assert_error(&b, "validation_failed");
        assert_eq!(b["error"]["details"][0]["path"], path, "{query}");
    }
    let (s, b) = app
        .get("/v1/workflows/templates/does-not-exist", &p.requester)
        .await;
    assert_eq!(s, 404);
    assert_error(&b, "not_found");
    let (s, b) = app
        .call(
            Method::DELETE,
            "/v1/workflows/templates/nope",
            Some(&p.requester),
            None,
        )
        .await;
    assert_eq!(s, 404, "{b}");
    let (s, b) = app
        .call_raw(
            Method::PUT,
            "/v1/workflows/templates/nope",
            &p.requester,
            manual("x").into_bytes(),
        )
        .await;
    assert_eq!(s, 404, "{b}");
}

crate::on_both_stores!(
    versions_filters_pagination_and_deactivation,
    bad_list_parameters_are_clear_errors,
);

// The api process remembers template heads: a new version and a deactivation must still be
// seen by the next start.
crate::on_distributed!(versions_filters_pagination_and_deactivation);
