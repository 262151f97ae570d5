//! Approvals through HTTP: the seed walk, rejections, quorum, four-eyes rules, agents, every
//! error case, the pending inbox, bulk decisions and concurrent decisions on one step.

use std::sync::Arc;

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{assert_error, spawn_app, Backend, TestApp, PROCUREMENT};

fn id(v: &Value) -> String {
    v["id"].as_str().unwrap_or_default().to_string()
}

async fn waiting_at(app: &TestApp, key: &str, instance: &str, step: usize) -> Value {
    app.wait_for(key, instance, &format!("waiting at step {step}"), |b| {
        b["status"] == "waiting" && b["current_step"]["index"] == step
    })
    .await
}

/// Approve or reject; a `Value::Null` body sends no body at all.
async fn decide(
    app: &TestApp,
    key: &str,
    instance: &str,
    step: &str,
    verb: &str,
    body: Value,
) -> (u16, Value) {
    let path = format!("/v1/workflows/instances/{instance}/steps/{step}/{verb}");
    let body = (!body.is_null()).then_some(body);
    let (s, b) = app.call(Method::POST, &path, Some(key), body).await;
    (s.as_u16(), b)
}

/// A $5,000 procurement, waiting for the CFO.
async fn large_procurement(app: &TestApp, requester: &str) -> (String, String) {
    let tid = id(&app.create_template(requester, PROCUREMENT).await);
    let iid = id(&app
        .start(
            requester,
            &tid,
            json!({"id": "tr_5000", "amount": 5000, "currency": "USD", "requester": "rita"}),
        )
        .await);
    waiting_at(app, requester, &iid, 1).await;
    (tid, iid)
}

async fn seed_walk_through_cfo_and_manager_to_the_action(backend: Backend) {
    let app = spawn_app(backend).await;
    let p = app.partner("acme").await;
    let (_, iid) = large_procurement(&app, &p.requester).await;

    let (s, b) = decide(
        &app,
        &p.cfo,
        &iid,
        "1",
        "approve",
        json!({"comment": "budget ok"}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["decision"], "approved");
    assert_eq!(b["instance"]["steps"][1]["status"], "completed");
    let at_manager = waiting_at(&app, &p.requester, &iid, 2).await;
    assert_eq!(at_manager["waiting_on"]["kind"], "approval");

    let (s, b) = decide(&app, &p.manager, &iid, "2", "approve", json!({})).await;
    assert_eq!(s, 200, "{b}");
    let done = app
        .wait_for(&p.requester, &iid, "completed", |b| {
            b["status"] == "completed"
        })
        .await;
    assert_eq!(done["steps"][3]["name"], "Execute Payment");
    assert_eq!(
        done["steps"][3]["output"]["response"]["body"]["status"],
        "executed"
    );
    let counts = app
        .sandbox
        .counts("tr_5000")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(counts.executions, 1);
    assert_eq!(
        done["steps"][1]["output"]["approvals"][0]["actor"]["id"],
        "carol"
    );
    assert_eq!(
        done["steps"][1]["output"]["approvals"][0]["comment"],
        "budget ok"
    );
    assert_eq!(
        done["steps"][2]["output"]["approvals"][0]["actor"]["id"],
        "frank"
    );

    let (_, ev) = app
        .get(
            &format!("/v1/workflows/instances/{iid}/events"),
            &p.requester,
        )
        .await;
    assert_eq!(ev["chain"]["verified"], true);
    let approvals: Vec<&Value> = ev["data"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|e| e["kind"] == "approval.approved")
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(approvals.len(), 2);
    assert_eq!(approvals[0]["actor"]["id"], "carol");
    assert_eq!(approvals[0]["reason"], "budget ok");
}

async fn rejection_at_each_stage(backend: Backend) {
    let app = spawn_app(backend).await;
    let p = app.partner("acme").await;
    let (tid, first) = large_procurement(&app, &p.requester).await;
    let (s, b) = decide(
        &app,
        &p.cfo,
        &first,
        "1",
        "reject",
        json!({"comment": "not this quarter"}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["decision"], "rejected");
    assert_eq!(b["instance"]["status"], "rejected");
    assert_eq!(b["instance"]["steps"][1]["status"], "rejected");
    assert!(b["instance"]["error"]
        .as_str()
        .unwrap_or_default()
        .contains("not this quarter"));

    let second = id(&app
        .start(&p.requester, &tid, json!({"id": "t2", "amount": 7000}))
        .await);
    waiting_at(&app, &p.requester, &second, 1).await;
    assert_eq!(
        decide(&app, &p.cfo, &second, "1", "approve", json!({}))
            .await
            .0,
        200
    );
    waiting_at(&app, &p.requester, &second, 2).await;
    let (s, b) = decide(&app, &p.manager, &second, "2", "reject", Value::Null).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["instance"]["status"], "rejected");
    // Nothing moves a rejected instance.
    let (s, b) = decide(&app, &p.manager, &second, "2", "approve", json!({})).await;
    assert_eq!(s, 409, "{b}");
}

async fn quorum_two_of_three(backend: Backend) {
    let app = spawn_app(backend).await;
    let p = app.partner("acme").await;
    let board: Vec<String> = vec![
        app.key("acme", "b1", "human", &["board"]).await,
        app.key("acme", "b2", "human", &["board"]).await,
        app.key("acme", "b3", "human", &["board"]).await,
    ];
    let doc = json!({"name": "Board", "trigger_type": "manual", "steps": [
        {"type": "approval", "name": "Board vote", "config": {"approvers": {"type": "role", "value": "board"}, "min_approvals": 2}}
    ]});
    let tid = id(&app.create_template(&p.requester, &doc.to_string()).await);
    let iid = id(&app.start(&p.requester, &tid, json!({"amount": 1})).await);
    waiting_at(&app, &p.requester, &iid, 0).await;
    let (s, b) = decide(&app, &board[0], &iid, "0", "approve", json!({})).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["instance"]["status"], "waiting");
    assert_eq!(b["instance"]["waiting_on"]["detail"]["approvals_needed"], 1);
    assert_eq!(
        b["instance"]["waiting_on"]["detail"]["decisions"][0]["actor"]["id"],
        "b1"
    );
    // b1 cannot count twice.
    let (s, b) = decide(&app, &board[0], &iid, "0", "approve", json!({})).await;
    assert_eq!(s, 409, "{b}");
    assert_error(&b, "already_decided");
    let (s, b) = decide(&app, &board[2], &iid, "0", "approve", json!({})).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["instance"]["status"], "completed");
}

async fn separation_of_duties_rules(backend: Backend) {
    let app = spawn_app(backend).await;
    let p = app.partner("acme").await;
    // Rule 1: the requester may hold the role, and still cannot approve its own request.
    let boss = app
        .key("acme", "boss", "human", &["cfo", "finance_manager"])
        .await;
    let tid = id(&app.create_template(&boss, PROCUREMENT).await);
    let own = id(&app
        .start(&boss, &tid, json!({"id": "t", "amount": 5000}))
        .await);
    waiting_at(&app, &boss, &own, 1).await;
    let (s, b) = decide(&app, &boss, &own, "1", "approve", json!({})).await;
    assert_eq!(s, 403, "{b}");
    assert_error(&b, "separation_of_duties");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("requester_cannot_approve"),
        "{b}"
    );

    // Rule 2: one actor cannot decide two approval steps of one instance.
    let other = id(&app
        .start(&p.requester, &tid, json!({"id": "t", "amount": 5000}))
        .await);
    waiting_at(&app, &p.requester, &other, 1).await;
    assert_eq!(
        decide(&app, &boss, &other, "1", "approve", json!({}))
            .await
            .0,
        200
    );
    waiting_at(&app, &p.requester, &other, 2).await;
    let (s, b) = decide(&app, &boss, &other, "2", "approve", json!({})).await;
    assert_eq!(s, 403, "{b}");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("one_step_per_actor"),
        "{b}"
    );

    // Switched off per template: the same actor may do both.
    let mut lax: Value = serde_json::from_str(PROCUREMENT).unwrap_or_default();
    lax["settings"] = json!({"separation_of_duties": false});
    let lax_id = id(&app.create_template(&boss, &lax.to_string()).await);
    let mine = id(&app
        .start(&boss, &lax_id, json!({"id": "t", "amount": 5000}))
        .await);
    waiting_at(&app, &boss, &mine, 1).await;
    assert_eq!(
        decide(&app, &boss, &mine, "1", "approve", json!({}))
            .await
            .0,
        200
    );
    waiting_at(&app, &boss, &mine, 2).await;
    assert_eq!(
        decide(&app, &boss, &mine, "2", "approve", json!({}))
            .await
            .0,
        200
    );
    app.wait_for(&boss, &mine, "completed", |b| b["status"] == "completed")
        .await;
}

async fn agents_decide_within_bounded_authority(backend: Backend) {
    let app = spawn_app(backend).await;
    let p = app.partner("acme").await;
    let doc = json!({"name": "Agent", "trigger_type": "manual", "steps": [
        {"type": "approval", "name": "Review", "config": {"approvers": [
            {"type": "agent", "value": "bot", "max_amount": 1000},
            {"type": "role", "value": "finance_manager", "limit": "trigger.amount <= 5000"}
        ]}}
    ]});
    let tid = id(&app.create_template(&p.requester, &doc.to_string()).await);
    let small = id(&app.start(&p.requester, &tid, json!({"amount": 800})).await);
    let large = id(&app.start(&p.requester, &tid, json!({"amount": 9000})).await);
    waiting_at(&app, &p.requester, &small, 0).await;
    waiting_at(&app, &p.requester, &large, 0).await;

    let (s, b) = decide(&app, &p.agent, &small, "0", "approve", json!({})).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["instance"]["status"], "completed");
    assert_eq!(
        b["instance"]["steps"][0]["output"]["approvals"][0]["actor"]["type"],
        "agent"
    );

    let (s, b) = decide(&app, &p.agent, &large, "0", "approve", json!({})).await;
    assert_eq!(s, 403, "{b}");
    assert_error(&b, "agent_limit_exceeded");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("human"),
        "{b}"
    );
    // The human with the role is not bound by the agents' limits.
    let (s, b) = decide(&app, &p.manager, &large, "0", "approve", json!({})).await;
    assert_eq!(s, 200, "{b}");

    // An agent may always reject.
    let third = id(&app.start(&p.requester, &tid, json!({"amount": 9000})).await);
    waiting_at(&app, &p.requester, &third, 0).await;
    let (s, b) = decide(
        &app,
        &p.agent,
        &third,
        "0",
        "reject",
        json!({"comment": "looks like fraud"}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["instance"]["status"], "rejected");
}

async fn every_decision_error_changes_nothing(backend: Backend) {
    let app = spawn_app(backend).await;
    let p = app.partner("acme").await;
    let (_, iid) = large_procurement(&app, &p.requester).await;
    let cases: Vec<(String, &str, &str, u16, &str)> = vec![
        ("missing".to_string(), "1", "approve", 404, "not_found"),
        (iid.clone(), "9", "approve", 404, "step_not_found"),
        (iid.clone(), "x", "approve", 404, "step_not_found"),
        (iid.clone(), "0", "approve", 409, "not_an_approval_step"),
        (iid.clone(), "2", "approve", 409, "step_not_waiting"),
        (iid.clone(), "1", "approve", 403, "not_eligible"),
    ];
    for (instance, step, verb, status, code) in cases {
        let key = if code == "not_eligible" {
            &p.manager
        } else {
            &p.cfo
        };
        let (s, b) = decide(&app, key, &instance, step, verb, json!({})).await;
        assert_eq!(s, status, "{instance} {step}: {b}");
        assert_error(&b, code);
    }
    let (s, b) = decide(
        &app,
        &p.cfo,
        &iid,
        "1",
        "approve",
        json!({"coment": "typo"}),
    )
    .await;
    assert_eq!(s, 422, "{b}");
    let (s, b) = decide(
        &app,
        &p.cfo,
        &iid,
        "1",
        "approve",
        json!({"comment": "x".repeat(3000)}),
    )
    .await;
    assert_eq!(s, 422, "{b}");
    // Another partner's approver sees a 404, not a 403.
    let other = app.partner("other").await;
    let (s, b) = decide(&app, &other.cfo, &iid, "1", "approve", json!({})).await;
    assert_eq!(s, 404, "{b}");

    // None of that changed the instance.
    let now = waiting_at(&app, &p.requester, &iid, 1).await;
    assert_eq!(now["waiting_on"]["detail"]["decisions"], json!([]));

    // A comment is required on rejection where the template says so.
    let doc = json!({"name": "C", "trigger_type": "manual", "steps": [
        {"type": "approval", "name": "A", "config": {"approvers": {"type": "role", "value": "cfo"}, "require_comment_on_reject": true}}
    ]});
    let tid = id(&app.create_template(&p.requester, &doc.to_string()).await);
    let c = id(&app.start(&p.requester, &tid, json!({})).await);
    waiting_at(&app, &p.requester, &c, 0).await;
    let (s, b) = decide(&app, &p.cfo, &c, "0", "reject", json!({})).await;
    assert_eq!(s, 422, "{b}");
    assert_error(&b, "comment_required");
    assert_eq!(b["error"]["details"][0]["path"], "$.comment");
    assert_eq!(
        decide(&app, &p.cfo, &c, "0", "reject", json!({"comment": "no"}))
            .await
            .0,
        200
    );
}

async fn pending_lists_per_actor(backend: Backend) {
    let app = spawn_app(backend).await;
    let p = app.partner("acme").await;
    let other = app.partner("other").await;
    let (tid, iid) = large_procurement(&app, &p.requester).await;
    let small = id(&app
        .start(
            &p.requester,
            &tid,
            json!({"id": "s", "amount": 1500, "currency": "EUR"}),
        )
        .await);
    waiting_at(&app, &p.requester, &small, 1).await;
    let other_tid = id(&app.create_template(&other.requester, PROCUREMENT).await);
    let foreign = id(&app
        .start(
            &other.requester,
            &other_tid,
            json!({"id": "f", "amount": 5000}),
        )
        .await);
    waiting_at(&app, &other.requester, &foreign, 1).await;

    let pending = |key: String, query: &'static str| {
        let app = &app;
        async move {
            let (s, b) = app
                .get(&format!("/v1/workflows/pending{query}"), &key)
                .await;
            assert_eq!(s, 200, "{b}");
            b
        }
    };
    assert_eq!(pending(p.requester.clone(), "").await["data"], json!([]));
    assert_eq!(
        pending(p.manager.clone(), "").await["data"],
        json!([]),
        "the manager step is not waiting yet"
    );
    let cfo = pending(p.cfo.clone(), "").await;
    let items = cfo["data"].as_array().cloned().unwrap_or_default();
    assert_eq!(items.len(), 2, "{cfo:#}");
    assert_eq!(items[0]["instance_id"], json!(iid), "oldest first");
    assert_eq!(items[0]["step_name"], "CFO Approval");
    assert_eq!(items[0]["template_name"], "Procurement Approval");
    assert_eq!(items[0]["trigger"]["amount"], 5000);
    assert_eq!(items[0]["trigger"]["requester"], "rita");
    assert!(items[0]["due_at"].is_string());
    assert_eq!(items[1]["trigger"]["currency"], "EUR");

    // Filters and the cursor.
    assert_eq!(
        pending(p.cfo.clone(), "?min_amount=2000").await["data"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    assert_eq!(
        pending(p.cfo.clone(), "?max_amount=2000").await["data"][0]["instance_id"],
        json!(small)
    );
    assert_eq!(
        pending(p.cfo.clone(), "?older_than=1h").await["data"],
        json!([])
    );
    assert_eq!(
        pending(p.cfo.clone(), "?template_id=nope").await["data"],
        json!([])
    );
    let first = pending(p.cfo.clone(), "?limit=1").await;
    assert_eq!(first["data"][0]["instance_id"], json!(iid));
    let cursor = first["next_cursor"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let (_, second) = app
        .get(
            &format!("/v1/workflows/pending?limit=1&cursor={cursor}"),
            &p.cfo,
        )
        .await;
    assert_eq!(second["data"][0]["instance_id"], json!(small));
    let (s, b) = app
        .get("/v1/workflows/pending?min_amount=lots", &p.cfo)
        .await;
    assert_eq!(s, 422, "{b}");

    // Once the CFO decided, the item leaves the CFO's list and reaches the manager's.
    assert_eq!(
        decide(&app, &p.cfo, &iid, "1", "approve", json!({}))
            .await
            .0,
        200
    );
    waiting_at(&app, &p.requester, &iid, 2).await;
    let cfo = pending(p.cfo.clone(), "").await;
    assert_eq!(cfo["data"].as_array().map(Vec::len), Some(1));
    assert_eq!(cfo["data"][0]["instance_id"], json!(small));
    let manager = pending(p.manager.clone(), "").await;
    assert_eq!(manager["data"][0]["instance_id"], json!(iid));
    assert_eq!(manager["data"][0]["step_name"], "Manager Approval");
    // The agent with the role may approve only within a limit it does not have here: it sees the
    // item too (it may still decide: no limits on this template).
    let agent = pending(p.agent.clone(), "").await;
    assert_eq!(agent["data"][0]["may_approve"], true);
    // The other partner's CFO sees only its own.
    let theirs = pending(other.cfo.clone(), "").await;
    assert_eq!(theirs["data"].as_array().map(Vec::len), Some(1));
    assert_eq!(theirs["data"][0]["instance_id"], json!(foreign));
}

/// Every page of `key`'s inbox, `limit` at a time: the instance ids in order.
async fn whole_inbox(app: &TestApp, key: &str, limit: usize) -> Vec<String> {
    let mut ids = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            None => format!("/v1/workflows/pending?limit={limit}"),
            Some(c) => format!("/v1/workflows/pending?limit={limit}&cursor={c}"),
        };
        let (s, b) = app.get(&path, key).await;
        assert_eq!(s, 200, "{b}");
        let page = b["data"].as_array().cloned().unwrap_or_default();
        assert!(page.len() <= limit, "{b}");
        ids.extend(
            page.iter()
                .map(|item| item["instance_id"].as_str().unwrap_or_default().to_string()),
        );
        match b["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return ids,
        }
    }
}

/// More waiting steps than the inbox reads per statement (200): an actor whose one step waits
/// behind 200 that are not its own still finds it, and paging visits every waiting step once.
async fn the_inbox_scans_past_steps_that_are_not_the_callers(backend: Backend) {
    let app = spawn_app(backend).await;
    let p = app.partner("acme").await;
    let tid = id(&app.create_template(&p.requester, PROCUREMENT).await);
    let items: Vec<Value> = (0..201)
        .map(|i| json!({"template_id": tid, "trigger": {"id": format!("tr_{i}"), "amount": 5000 + i}}))
        .collect();
    let (s, b) = app
        .post(
            "/v1/workflows/instances/batch",
            &p.requester,
            json!({"items": items}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let created: Vec<String> = b["results"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|r| r["instance"]["id"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(created.len(), 201, "{b:#}");
    for iid in &created {
        waiting_at(&app, &p.requester, iid, 1).await;
    }
    // The first one moves on to the manager: its step waits behind the other 200 CFO steps.
    assert_eq!(
        decide(&app, &p.cfo, &created[0], "1", "approve", json!({}))
            .await
            .0,
        200
    );
    waiting_at(&app, &p.requester, &created[0], 2).await;

    assert_eq!(
        whole_inbox(&app, &p.manager, 100).await,
        [created[0].clone()]
    );
    let cfo = whole_inbox(&app, &p.cfo, 70).await;
    assert_eq!(cfo.len(), 200);
    let mut expected = created[1..].to_vec();
    expected.sort();
    let mut seen = cfo.clone();
    seen.sort();
    seen.dedup();
    assert_eq!(seen, expected, "each waiting CFO step once");
    assert!(whole_inbox(&app, &p.requester, 100).await.is_empty());
}

async fn bulk_with_mixed_results(backend: Backend) {
    let app = spawn_app(backend).await;
    let p = app.partner("acme").await;
    let tid = id(&app.create_template(&p.requester, PROCUREMENT).await);
    let mut ids = Vec::new();
    for n in 0..3 {
        let i = id(&app
            .start(
                &p.requester,
                &tid,
                json!({"id": format!("t{n}"), "amount": 5000 + n}),
            )
            .await);
        waiting_at(&app, &p.requester, &i, 1).await;
        ids.push(i);
    }
    let body = json!({"decisions": [
        {"instance_id": ids[0], "step": 1, "decision": "approve", "comment": "ok"},
        {"instance_id": ids[1], "step": 1, "decision": "reject"},
        {"instance_id": ids[2], "step": 2, "decision": "approve"},
        {"instance_id": "missing", "step": 1, "decision": "approve"},
        {"instance_id": ids[2], "step": 1, "decision": "maybe"},
    ]});
    let (s, b) = app.post("/v1/workflows/approvals/bulk", &p.cfo, body).await;
    assert_eq!(s, 200, "{b}");
    let statuses: Vec<u64> = b["results"]
        .as_array()
        .map(|r| {
            r.iter()
                .map(|x| x["status"].as_u64().unwrap_or(0))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(statuses, vec![200, 200, 409, 404, 422], "{b:#}");
    assert_eq!(b["succeeded"], 2);
    assert_eq!(b["failed"], 3);
    assert_eq!(b["results"][1]["instance_status"], "rejected");
    assert_eq!(b["results"][2]["error"]["code"], "step_not_waiting");
    waiting_at(&app, &p.requester, &ids[0], 2).await;
    let (_, third) = app
        .get(&format!("/v1/workflows/instances/{}", ids[2]), &p.requester)
        .await;
    assert_eq!(
        third["current_step"]["index"], 1,
        "a failed item changed nothing"
    );

    let (s, _) = app
        .post(
            "/v1/workflows/approvals/bulk",
            &p.cfo,
            json!({"decisions": []}),
        )
        .await;
    assert_eq!(s, 422);
    let many: Vec<Value> = (0..501)
        .map(|_| json!({"instance_id": "x", "step": 1, "decision": "approve"}))
        .collect();
    let (s, b) = app
        .post(
            "/v1/workflows/approvals/bulk",
            &p.cfo,
            json!({"decisions": many}),
        )
        .await;
    assert_eq!(s, 422, "{b}");
    assert_eq!(b["error"]["details"][0]["path"], "$.decisions");
}

async fn fifty_parallel_decisions_give_exactly_one(backend: Backend) {
    let app = Arc::new(spawn_app(backend).await);
    let p = app.partner("acme").await;
    let mut keys = Vec::new();
    for n in 0..50 {
        keys.push(
            app.key("acme", &format!("approver{n}"), "human", &["cfo"])
                .await,
        );
    }
    let (_, iid) = large_procurement(&app, &p.requester).await;
    let mut tasks = tokio::task::JoinSet::new();
    for key in keys {
        let (app, iid) = (app.clone(), iid.clone());
        tasks.spawn(async move { decide(&app, &key, &iid, "1", "approve", json!({})).await });
    }
    let mut accepted = 0;
    while let Some(r) = tasks.join_next().await {
        let (s, b) = r.unwrap_or_else(|e| panic!("{e}"));
        match s {
            200 => accepted += 1,
            409 => assert!(
                b["error"]["code"] == "step_not_waiting" || b["error"]["code"] == "invalid_state",
                "{b}"
            ),
            other => panic!("unexpected {other}: {b}"),
        }
    }
    assert_eq!(accepted, 1);
    let now = waiting_at(&app, &p.requester, &iid, 2).await;
    assert_eq!(
        now["steps"][1]["output"]["approvals"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );

    // An approval racing a cancel: one consistent outcome either way.
    let tid = id(&app.create_template(&p.requester, PROCUREMENT).await);
    let race = id(&app
        .start(&p.requester, &tid, json!({"id": "r", "amount": 5000}))
        .await);
    waiting_at(&app, &p.requester, &race, 1).await;
    let cancel_path = format!("/v1/workflows/instances/{race}/cancel");
    let (a, c) = tokio::join!(
        decide(&app, &p.cfo, &race, "1", "approve", json!({})),
        app.call(
            Method::POST,
            &cancel_path,
            Some(&p.requester),
            Some(json!({}))
        )
    );
    let (_, fin) = app
        .get(&format!("/v1/workflows/instances/{race}"), &p.requester)
        .await;
    assert_eq!(c.0, 200, "cancel of a waiting instance succeeds: {}", c.1);
    assert_eq!(fin["status"], "cancelled");
    match a.0 {
        // Approved first, then cancelled at the manager step.
        200 => assert_eq!(fin["steps"][1]["status"], "completed"),
        409 => assert_eq!(fin["steps"][1]["status"], "cancelled"),
        other => panic!("unexpected {other}: {}", a.1),
    }
}

crate::on_both_stores!(
    seed_walk_through_cfo_and_manager_to_the_action,
    rejection_at_each_stage,
    quorum_two_of_three,
    separation_of_duties_rules,
    agents_decide_within_bounded_authority,
    every_decision_error_changes_nothing,
    pending_lists_per_actor,
    the_inbox_scans_past_steps_that_are_not_the_callers,
    bulk_with_mixed_results,
    fifty_parallel_decisions_give_exactly_one,
);

crate::on_distributed!(
    separation_of_duties_rules,
    agents_decide_within_bounded_authority,
    every_decision_error_changes_nothing,
    pending_lists_per_actor,
    the_inbox_scans_past_steps_that_are_not_the_callers,
    bulk_with_mixed_results,
    seed_walk_through_cfo_and_manager_to_the_action,
    rejection_at_each_stage,
    quorum_two_of_three,
    fifty_parallel_decisions_give_exactly_one,
);
