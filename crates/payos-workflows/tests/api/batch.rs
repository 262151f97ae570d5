//! POST /v1/workflows/instances/batch: many starts in one call, a result per item.

use serde_json::{json, Value};

use crate::helpers::{assert_error, paths, spawn_app, Backend, PROCUREMENT};

const BATCH: &str = "/v1/workflows/instances/batch";

/// The error paths of one item's result.
fn item_paths(result: &Value) -> Vec<String> {
    paths(&json!({"error": result["error"]}))
}

async fn each_item_succeeds_or_fails_on_its_own(backend: Backend) {
    let app = spawn_app(backend).await;
    let p = app.partner("acme").await;
    let tid = app.create_template(&p.requester, PROCUREMENT).await["id"].clone();
    let items = json!([
        {"template_id": tid, "trigger": {"id": "tr_1", "amount": 10}, "idempotency_key": "b-1"},
        {"template_id": tid, "trigger": {"id": "tr_2", "amount": 20}},
        {"template_id": "no-such-template", "trigger": {"id": "tr_3"}},
        {"template_id": tid, "trigger": [1, 2]},
        {"trigger": {"id": "tr_5"}},
        {"template_id": tid, "trigger": {}, "mode": "dry"},
        {"template_id": tid, "trigger": {}, "colour": "red"},
        {"template_id": tid, "trigger": {"id": "tr_1", "amount": 10}, "idempotency_key": "b-1"},
    ]);
    let (s, b) = app.post(BATCH, &p.requester, json!({"items": items})).await;
    assert_eq!(s, 200, "{b:#}");
    let results = b["results"].as_array().cloned().unwrap_or_default();
    assert_eq!(results.len(), 8, "{b:#}");
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r["index"], i, "results are in request order: {b:#}");
    }
    let status = |i: usize| results[i]["status"].as_u64().unwrap_or_default();

    // Item 0 and item 7 carry one key: one of them creates, the other replays the same instance.
    let mut first_and_replay = [status(0), status(7)];
    first_and_replay.sort();
    assert_eq!(first_and_replay, [200, 201], "{b:#}");
    assert_eq!(results[0]["instance"]["id"], results[7]["instance"]["id"]);
    assert_eq!(status(1), 201, "{b:#}");
    assert_eq!(results[1]["instance"]["template_id"], tid);
    assert!(results[1]["error"].is_null());

    // Each failure is the error the single endpoint gives, at the item's own path.
    assert_eq!(status(2), 404, "{b:#}");
    assert_eq!(results[2]["error"]["code"], "not_found");
    assert_eq!(item_paths(&results[2]), ["$.items[2].template_id"]);
    assert!(results[2]["instance"].is_null());
    assert_eq!(status(3), 422);
    assert_eq!(item_paths(&results[3]), ["$.items[3].trigger"]);
    assert_eq!(status(4), 422);
    assert_eq!(item_paths(&results[4]), ["$.items[4].template_id"]);
    assert_eq!(status(5), 422);
    assert_eq!(item_paths(&results[5]), ["$.items[5].mode"]);
    assert_eq!(status(6), 422);
    assert_eq!(results[6]["error"]["code"], "validation_failed");
    assert!(
        item_paths(&results[6])
            .first()
            .is_some_and(|p| p.starts_with("$.items[6]")),
        "{b:#}"
    );
    assert_eq!(
        (&b["created"], &b["replayed"], &b["failed"]),
        (&json!(2), &json!(1), &json!(5)),
        "{b:#}"
    );

    // Exactly the two created instances exist, and they run like any other.
    let (_, list) = app.get("/v1/workflows/instances", &p.requester).await;
    assert_eq!(list["data"].as_array().map(Vec::len), Some(2), "{list:#}");
    let id = results[1]["instance"]["id"].as_str().unwrap_or_default();
    app.wait_for(&p.requester, id, "completed", |i| {
        i["status"] == "completed"
    })
    .await;

    // The whole batch again: nothing new, every good item replays.
    let (s, again) = app
        .post(
            BATCH,
            &p.requester,
            json!({"items": [
                {"template_id": tid, "trigger": {"id": "tr_1", "amount": 10}, "idempotency_key": "b-1"},
            ]}),
        )
        .await;
    assert_eq!(s, 200, "{again:#}");
    assert_eq!(again["results"][0]["status"], 200);
    assert_eq!(
        again["results"][0]["instance"]["id"],
        results[0]["instance"]["id"]
    );
    // The same key for another request is that item's 409, not a silent merge.
    let (_, reused) = app
        .post(
            BATCH,
            &p.requester,
            json!({"items": [
                {"template_id": tid, "trigger": {"id": "other"}, "idempotency_key": "b-1"},
            ]}),
        )
        .await;
    assert_eq!(reused["results"][0]["status"], 409, "{reused:#}");
    assert_eq!(
        reused["results"][0]["error"]["code"],
        "idempotency_key_reused"
    );
    assert_eq!(
        item_paths(&reused["results"][0]),
        ["$.items[0].idempotency_key"]
    );
}

async fn the_batch_size_is_bounded(backend: Backend) {
    let app = spawn_app(backend).await;
    let p = app.partner("acme").await;
    let tid = app.create_template(&p.requester, PROCUREMENT).await["id"].clone();
    // One over the default limit (500): refused whole, nothing started.
    let items: Vec<Value> = (0..501)
        .map(|i| json!({"template_id": tid, "trigger": {"id": format!("tr_{i}")}}))
        .collect();
    let (s, b) = app.post(BATCH, &p.requester, json!({"items": items})).await;
    assert_eq!(s, 422, "{b:#}");
    assert_error(&b, "validation_failed");
    assert_eq!(paths(&b), ["$.items"]);
    assert!(b["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .contains("500"));
    let (s, b) = app.post(BATCH, &p.requester, json!({"items": []})).await;
    assert_eq!(s, 422, "{b:#}");
    assert_eq!(paths(&b), ["$.items"]);
    let (s, b) = app.post(BATCH, &p.requester, json!({"starts": []})).await;
    assert_eq!(s, 422, "{b:#}");
    let (_, list) = app.get("/v1/workflows/instances", &p.requester).await;
    assert_eq!(list["data"].as_array().map(Vec::len), Some(0));

    // Exactly the limit is fine.
    let items: Vec<Value> = (0..500)
        .map(|i| json!({"template_id": tid, "trigger": {"id": format!("tr_{i}"), "amount": 1}}))
        .collect();
    let (s, b) = app.post(BATCH, &p.requester, json!({"items": items})).await;
    assert_eq!(s, 200, "{b:#}");
    assert_eq!(b["created"], 500, "{}", b["failed"]);
    // Without credentials: 401 like every route.
    let (s, _) = app
        .call(
            reqwest::Method::POST,
            BATCH,
            None,
            Some(json!({"items": []})),
        )
        .await;
    assert_eq!(s, 401);
}

async fn another_partners_template_is_not_found(backend: Backend) {
    let app = spawn_app(backend).await;
    let acme = app.partner("acme").await;
    let globex = app.partner("globex").await;
    let tid = app.create_template(&acme.requester, PROCUREMENT).await["id"].clone();
    let (s, b) = app
        .post(
            BATCH,
            &globex.requester,
            json!({"items": [{"template_id": tid, "trigger": {"id": "x"}}]}),
        )
        .await;
    assert_eq!(s, 200, "{b:#}");
    assert_eq!(b["results"][0]["status"], 404, "{b:#}");
    assert_eq!(b["failed"], 1);
}

crate::on_both_stores!(
    each_item_succeeds_or_fails_on_its_own,
    the_batch_size_is_bounded,
    another_partners_template_is_not_found,
);
