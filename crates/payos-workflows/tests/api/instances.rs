//! Instances: idempotent creation, listing with filters and cursor, cancellation, bad input.

use serde_json::json;

use crate::helpers::{assert_error, paths, spawn_app, Backend, PROCUREMENT};

async fn idempotency_key_returns_the_same_instance(backend: Backend) {
    let app = spawn_app(backend).await;
    let p = app.partner("acme").await;
    let tid = app.create_template(&p.requester, PROCUREMENT).await["id"].clone();
    let body = json!({"template_id": tid, "trigger": {"id": "tr", "amount": 10}, "idempotency_key": "order-1"});
    let (s1, b1) = app
        .post("/v1/workflows/instances", &p.requester, body.clone())
        .await;
    let (s2, b2) = app
        .post("/v1/workflows/instances", &p.requester, body.clone())
        .await;
    assert_eq!((s1.as_u16(), s2.as_u16()), (201, 200), "{b1} {b2}");
    assert_eq!(b1["id"], b2["id"]);
    let (_, list) = app.get("/v1/workflows/instances", &p.requester).await;
    assert_eq!(
        list["data"].as_array().map(Vec::len),
        Some(1),
        "nothing created twice"
    );

    // The same key with a different request is refused, not silently merged.
    let other = json!({"template_id": tid, "trigger": {"id": "tr", "amount": 99}, "idempotency_key": "order-1"});
    let (s, b) = app
        .post("/v1/workflows/instances", &p.requester, other)
        .await;
    assert_eq!(s, 409, "{b}");
    assert_error(&b, "idempotency_key_reused");

    // Concurrent replays of one key still create one instance.
    let mut handles = Vec::new();
    let app = std::sync::Arc::new(app);
    for _ in 0..8 {
        let (app, key, tid) = (app.clone(), p.requester.clone(), tid.clone());
        handles.push(tokio::spawn(async move {
            app.post(
                "/v1/workflows/instances",
                &key,
                json!({"template_id": tid, "trigger": {"n": 1}, "idempotency_key": "race"}),
            )
            .await
        }));
    }
    let mut ids = std::collections::HashSet::new();
    let mut created = 0;
    for h in handles {
        let (s, b) = h.await.unwrap_or_else(|e| panic!("{e}"));
        assert!(s == 201 || s == 200, "{s} {b}");
        created += usize::from(s == 201);
        ids.insert(b["id"].as_str().unwrap_or_default().to_string());
    }
    assert_eq!(ids.len(), 1);
    assert_eq!(created, 1);

    // A replay answers with its instance even once the template was deactivated (the create
    // fails, then finds the key taken); a new key gets the create's error.
    let (s, b) = app
        .call(
            reqwest::Method::DELETE,
            &format!(
                "/v1/workflows/templates/{}",
                tid.as_str().unwrap_or_default()
            ),
            Some(&p.requester),
            None,
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = app
        .post("/v1/workflows/instances", &p.requester, body)
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["id"], b1["id"]);
    let (s, b) = app
        .post(
            "/v1/workflows/instances",
            &p.requester,
            json!({"template_id": tid, "trigger": {"id": "tr", "amount": 99}, "idempotency_key": "order-1"}),
        )
        .await;
    assert_eq!(s, 409, "{b}");
    assert_error(&b, "idempotency_key_reused");
    let (s, b) = app
        .post(
            "/v1/workflows/instances",
            &p.requester,
            json!({"template_id": tid, "trigger": {"id": "tr", "amount": 10}, "idempotency_key": "order-2"}),
        )
        .await;
    assert_eq!(s, 409, "{b}");
    assert_error(&b, "template_inactive");
}

async fn list_filters_and_cursor(backend: Backend) {
    let app = spawn_app(backend).await;
    let p = app.partner("acme").await;
    let proc_id = app.create_template(&p.requester, PROCUREMENT).await["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut ids = Vec::new();
    for amount in [1, 2, 3, 5000] {
        ids.push(
            app.start(&p.requester, &proc_id, json!({"id": "t", "amount": amount}))
                .await["id"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
    }
    let failing = app.start(&p.requester, &proc_id, json!({"id": "t"})).await["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    app.wait_for(&p.requester, &failing, "failed", |b| {
        b["status"] == "failed"
    })
    .await;
    // At most $1,000: the transfer runs and the instance completes; $5,000 waits for the CFO.
    for id in &ids[..3] {
        app.wait_for(&p.requester, id, "completed", |b| {
            b["status"] == "completed"
        })
        .await;
    }
    app.wait_for(&p.requester, &ids[3], "waiting", |b| {
        b["status"] == "waiting"
    })
    .await;

    let (_, b) = app
        .get("/v1/workflows/instances?status=failed", &p.requester)
        .await;
    assert_eq!(b["data"].as_array().map(Vec::len), Some(1));
    assert_eq!(b["data"][0]["id"], json!(failing));
    let (_, b) = app
        .get(
            &format!("/v1/workflows/instances?status=waiting&template_id={proc_id}"),
            &p.requester,
        )
        .await;
    assert_eq!(b["data"].as_array().map(Vec::len), Some(1));
    assert_eq!(b["data"][0]["id"], json!(ids[3]));
    let (_, b) = app
        .get("/v1/workflows/instances?status=completed", &p.requester)
        .await;
    assert_eq!(b["data"].as_array().map(Vec::len), Some(3));
    let (_, b) = app
        .get("/v1/workflows/instances?template_id=other", &p.requester)
        .await;
    assert_eq!(b["data"].as_array().map(Vec::len), Some(0));

    // Created range: everything was created after this morning and before tomorrow.
    let now = chrono::Utc::now();
    let from =
        (now - chrono::Duration::hours(1)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let to = (now + chrono::Duration::hours(1)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let (_, b) = app
        .get(
            &format!("/v1/workflows/instances?created_from={from}&created_to={to}"),
            &p.requester,
        )
        .await;
    assert_eq!(b["data"].as_array().map(Vec::len), Some(5), "{b}");
    let (_, b) = app
        .get(
            &format!("/v1/workflows/instances?created_from={to}"),
            &p.requester,
        )
        .await;
    assert_eq!(b["data"].as_array().map(Vec::len), Some(0));

    // Cursor: pages of two, newest first, each instance once.
    let mut seen = Vec::new();
    let mut path = "/v1/workflows/instances?limit=2".to_string();
    loop {
        let (s, b) = app.get(&path, &p.requester).await;
        assert_eq!(s, 200, "{b}");
        seen.extend(
            b["data"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(|x| x["id"].as_str().unwrap_or_default().to_string()),
        );
        match b["next_cursor"].as_str() {
            Some(c) => path = format!("/v1/workflows/instances?limit=2&cursor={c}"),
            None => break,
        }
    }
    let mut expected = ids.clone();
    expected.push(failing);
    expected.reverse();
    assert_eq!(seen, expected);

    for (query, path) in [
        ("status=done", "status"),
        ("created_from=yesterday", "created_from"),
        ("limit=-1", "limit"),
        ("sort=asc", "sort"),
    ] {
        let (s, b) = app
            .get(&format!("/v1/workflows/instances?{query}"), &p.requester)
            .await;
        assert_eq!(s, 422, "{query}: {b}");
        assert_eq!(paths(&b), vec![path.to_string()], "{query}");
    }
}

async fn cancel_and_its_errors(backend: Backend) {
    let app = spawn_app(backend).await;
    let p = app.partner("acme").await;
    let tid = app.create_template(&p.requester, PROCUREMENT).await["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let id = app
        .start(&p.requester, &tid, json!({"id": "t", "amount": 5000}))
        .await["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    app.wait_for(&p.requester, &id, "waiting", |b| b["status"] == "waiting")
        .await;

    let (s, b) = app
        .post(
            &format!("/v1/workflows/instances/{id}/cancel"),
            &p.requester,
            json!({"reson": "typo"}),
        )
        .await;
    assert_eq!(s, 422, "{b}");
    let (s, b) = app
        .call(
            reqwest::Method::POST,
            &format!("/v1/workflows/instances/{id}/cancel"),
            Some(&p.requester),
            None,
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["status"], "cancelled");
    assert_eq!(b["steps"][1]["status"], "cancelled");
    let (s, b) = app
        .post(
            &format!("/v1/workflows/instances/{id}/cancel"),
            &p.requester,
            json!({}),
        )
        .await;
    assert_eq!(s, 409, "{b}");
    assert_error(&b, "invalid_state");
    let (s, b) = app
        .post(
            "/v1/workflows/instances/nope/cancel",
            &p.requester,
            json!({}),
        )
        .await;
    assert_eq!(s, 404, "{b}");
}

async fn bad_instance_requests(backend: Backend) {
    let app = spawn_app(backend).await;
    let p = app.partner("acme").await;
    let tid = app.create_template(&p.requester, PROCUREMENT).await["id"].clone();
    let cases = [
        (json!({"trigger": {}}), 422, "$"),
        (
            json!({"template_id": tid, "trigger": [1, 2]}),
            422,
            "$.trigger",
        ),
        (
            json!({"template_id": tid, "trigger": {}, "idempotency_key": ""}),
            422,
            "$.idempotency_key",
        ),
        (
            json!({"template_id": tid, "trigger": {}, "extra": 1}),
            422,
            "$.extra",
        ),
        (
            json!({"template_id": 42, "trigger": {}}),
            422,
            "$.template_id",
        ),
        (
            json!({"template_id": "missing", "trigger": {}}),
            404,
            "$.template_id",
        ),
    ];
    for (body, status, path) in cases {
        let (s, b) = app
            .post("/v1/workflows/instances", &p.requester, body.clone())
            .await;
        assert_eq!(s.as_u16(), status, "{body}: {b}");
        assert!(
            paths(&b).iter().any(|p| p == path),
            "{body}: expected {path} in {:?}",
            paths(&b)
        );
    }
    let big = json!({"template_id": tid, "trigger": {"blob": "x".repeat(70_000)}});
    let (s, b) = app.post("/v1/workflows/instances", &p.requester, big).await;
    assert_eq!(s, 422, "{b}");
    let (s, b) = app
        .get("/v1/workflows/instances/not-an-instance", &p.requester)
        .await;
    assert_eq!(s, 404, "{b}");
    assert_error(&b, "not_found");
}

crate::on_both_stores!(
    idempotency_key_returns_the_same_instance,
    list_filters_and_cursor,
    cancel_and_its_errors,
    bad_instance_requests,
);

crate::on_distributed!(
    list_filters_and_cursor,
    bad_instance_requests,
    idempotency_key_returns_the_same_instance,
    cancel_and_its_errors,
);
