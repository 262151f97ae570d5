//! GET /v1/workflows/analytics: counts, rates and bottlenecks over real instances.

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{assert_error, paths, spawn_app, Backend, PROCUREMENT};

fn id(v: &Value) -> String {
    v["id"].as_str().unwrap_or_default().to_string()
}

async fn analytics_count_outcomes_and_bottlenecks(backend: Backend) {
    let app = spawn_app(backend).await;
    let p = app.partner("acme").await;
    let tid = id(&app.create_template(&p.requester, PROCUREMENT).await);
    // One $500 that completes, one $5,000 left waiting for the CFO, one the CFO rejects.
    let small = id(&app
        .start(&p.requester, &tid, json!({"id": "tr_s", "amount": 500}))
        .await);
    let waiting = id(&app
        .start(&p.requester, &tid, json!({"id": "tr_w", "amount": 5000}))
        .await);
    let rejected = id(&app
        .start(&p.requester, &tid, json!({"id": "tr_r", "amount": 7000}))
        .await);
    app.wait_for(&p.requester, &small, "completed", |b| {
        b["status"] == "completed"
    })
    .await;
    for iid in [&waiting, &rejected] {
        app.wait_for(&p.requester, iid, "waiting for the CFO", |b| {
            b["status"] == "waiting" && b["current_step"]["index"] == 1
        })
        .await;
    }
    let (s, b) = app
        .call(
            Method::POST,
            &format!("/v1/workflows/instances/{rejected}/steps/1/reject"),
            Some(&p.cfo),
            Some(json!({"comment": "not this quarter"})),
        )
        .await;
    assert_eq!(s, 200, "{b}");

    let (s, a) = app.get("/v1/workflows/analytics", &p.requester).await;
    assert_eq!(s, 200, "{a}");
    let totals = &a["totals"];
    assert_eq!(totals["instances"], 3, "{a:#}");
    assert_eq!(
        totals["by_status"],
        json!({"running": 0, "waiting": 1, "completed": 1, "rejected": 1, "failed": 0, "cancelled": 0})
    );
    assert_eq!(totals["completion_rate"], 0.5);
    assert_eq!(totals["duration_ms"]["count"], 2, "the two that ended");
    assert!(totals["duration_ms"]["max"].as_i64().is_some(), "{a:#}");

    assert_eq!(a["templates"].as_array().map(Vec::len), Some(1), "{a:#}");
    assert_eq!(a["templates"][0]["template_id"], tid.as_str());
    assert_eq!(a["templates"][0]["name"], "Procurement Approval");
    assert_eq!(a["templates"][0]["instances"], 3);

    let step = |index: u64| -> Value {
        a["steps"]
            .as_array()
            .and_then(|s| s.iter().find(|x| x["step_index"] == index).cloned())
            .unwrap_or_else(|| panic!("no step {index} in {a:#}"))
    };
    let cfo = step(1);
    assert_eq!(cfo["name"], "CFO Approval");
    assert_eq!(cfo["step_type"], "approval");
    assert_eq!(cfo["by_status"]["waiting"], 1, "{cfo:#}");
    assert_eq!(cfo["by_status"]["rejected"], 1, "{cfo:#}");
    assert_eq!(cfo["waiting"]["count"], 1, "the bottleneck: {cfo:#}");
    assert!(cfo["waiting"]["oldest_since"].as_str().is_some(), "{cfo:#}");
    let payment = step(3);
    assert_eq!(payment["by_status"]["completed"], 1, "{payment:#}");
    assert_eq!(payment["duration_ms"]["count"], 1, "{payment:#}");
    assert_eq!(payment["waiting"]["count"], 0);

    // Filters: the template by id, and a creation range before any of them.
    let (s, f) = app
        .get(
            &format!("/v1/workflows/analytics?template_id={tid}"),
            &p.requester,
        )
        .await;
    assert_eq!(s, 200, "{f}");
    assert_eq!(f["totals"]["instances"], 3);
    assert_eq!(f["template_id"], tid.as_str());
    let (s, f) = app
        .get(
            "/v1/workflows/analytics?created_to=2000-01-01T00:00:00Z",
            &p.requester,
        )
        .await;
    assert_eq!(s, 200, "{f}");
    assert_eq!(f["totals"]["instances"], 0);
    assert_eq!(f["totals"]["completion_rate"], Value::Null);
    assert_eq!(f["templates"], json!([]));
    assert_eq!(f["created_to"], "2000-01-01T00:00:00.000Z");

    // Another partner sees none of it, and cannot name acme's template.
    let other = app.partner("globex").await;
    let (s, g) = app.get("/v1/workflows/analytics", &other.requester).await;
    assert_eq!(s, 200, "{g}");
    assert_eq!(g["totals"]["instances"], 0);
    assert_eq!(g["steps"], json!([]));
    let (s, g) = app
        .get(
            &format!("/v1/workflows/analytics?template_id={tid}"),
            &other.requester,
        )
        .await;
    assert_eq!(s, 404, "{g}");
    assert_error(&g, "not_found");

    // Bad parameters: a structured 422 naming the parameter; no key: 401.
    for (query, path) in [
        ("created_from=yesterday", "created_from"),
        ("status=completed", "status"),
    ] {
        let (s, b) = app
            .get(&format!("/v1/workflows/analytics?{query}"), &p.requester)
            .await;
        assert_eq!(s, 422, "{query}: {b}");
        assert_eq!(paths(&b), vec![path.to_string()], "{query}");
    }
    let (s, _) = app
        .call(Method::GET, "/v1/workflows/analytics", None, None)
        .await;
    assert_eq!(s, 401);
}

crate::on_both_stores!(analytics_count_outcomes_and_bottlenecks);
