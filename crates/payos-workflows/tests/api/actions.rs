//! Action steps against a real PayOS sandbox over HTTP: success, retries, exhausted retries for
//! each `on_failure`, fatal errors, the generic `http` action, and a worker that dies between
//! the call and recording it (the transfer still executes exactly once).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use workflow_egress::payos_sandbox::Fault;

use crate::helpers::{spawn_app, Backend, TestApp};

fn id(v: &Value) -> String {
    v["id"].as_str().unwrap_or_default().to_string()
}

fn pay(extra: Value) -> Value {
    let mut config =
        json!({"action": "execute_transfer", "params": {"transfer_id": "{{trigger.id}}"}});
    if let (Value::Object(c), Value::Object(e)) = (&mut config, extra) {
        c.extend(e);
    }
    json!({"name": "Pay", "trigger_type": "manual", "steps": [
        {"type": "action", "name": "Pay", "config": config},
        {"type": "approval", "name": "Review", "config": {"approvers": {"type": "role", "value": "cfo"}}},
        {"type": "condition", "name": "Done", "config": {"expression": "true"}}
    ]})
}

async fn run(app: &TestApp, key: &str, doc: Value, transfer: &str) -> String {
    let tid = id(&app.create_template(key, &doc.to_string()).await);
    id(&app.start(key, &tid, json!({"id": transfer})).await)
}

async fn retries_then_success_executes_once(backend: Backend) {
    let app = spawn_app(backend).await;
    let p = app.partner("acme").await;
    app.sandbox.inject(
        Fault::Status {
            status: 503,
            retry_after_secs: None,
        },
        2,
    );
    let iid = run(
        &app,
        &p.requester,
        pay(json!({"max_attempts": 5})),
        "tr_retry",
    )
    .await;
    let b = app
        .wait_for(&p.requester, &iid, "past the action", |b| {
            b["current_step"]["index"] == 1
        })
        .await;
    let attempts = b["steps"][0]["output"]["attempts"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(attempts.len(), 3, "{b:#}");
    assert_eq!(attempts[0]["status"], 503);
    assert_eq!(attempts[0]["retryable"], true);
    assert_eq!(attempts[2]["status"], 200);
    assert_eq!(
        app.sandbox
            .counts("tr_retry")
            .await
            .map(|c| c.executions)
            .ok(),
        Some(1)
    );
}

async fn exhausted_retries_follow_on_failure(backend: Backend) {
    let app = spawn_app(backend).await;
    let p = app.partner("acme").await;
    let cases = [
        (json!({"max_attempts": 2}), "failed", None),
        (
            json!({"max_attempts": 2, "on_failure": "continue"}),
            "waiting",
            Some(1),
        ),
        (
            json!({"max_attempts": 2, "on_failure": "skip_to:2"}),
            "completed",
            None,
        ),
    ];
    for (n, (extra, status, step)) in cases.into_iter().enumerate() {
        app.sandbox.inject(
            Fault::Status {
                status: 500,
                retry_after_secs: None,
            },
            2,
        );
        let transfer = format!("tr_fail_{n}");
        let iid = run(&app, &p.requester, pay(extra.clone()), &transfer).await;
        let b = app
            .wait_for(&p.requester, &iid, status, |b| b["status"] == status)
            .await;
        assert_eq!(b["current_step"]["index"].as_u64(), step, "{extra}: {b:#}");
        let attempts = b["steps"][0]["output"]["attempts"].as_array().map(Vec::len);
        assert_eq!(attempts, Some(2), "{extra}: {b:#}");
        assert_eq!(
            app.sandbox
                .counts(&transfer)
                .await
                .map(|c| c.executions)
                .ok(),
            Some(0)
        );
        if status == "failed" {
            assert!(
                b["error"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("execute_transfer"),
                "{b:#}"
            );
        }
    }
}

async fn fatal_errors_are_not_retried_and_retry_after_is_honoured(backend: Backend) {
    let app = spawn_app(backend).await;
    let p = app.partner("acme").await;
    app.sandbox.inject(
        Fault::Status {
            status: 400,
            retry_after_secs: None,
        },
        1,
    );
    let iid = run(
        &app,
        &p.requester,
        pay(json!({"max_attempts": 5})),
        "tr_bad",
    )
    .await;
    let b = app
        .wait_for(&p.requester, &iid, "failed", |b| b["status"] == "failed")
        .await;
    assert_eq!(
        b["steps"][0]["output"]["attempts"].as_array().map(Vec::len),
        Some(1)
    );

    app.sandbox.inject(
        Fault::Status {
            status: 429,
            retry_after_secs: Some(1),
        },
        1,
    );
    let started = Instant::now();
    let iid = run(&app, &p.requester, pay(json!({})), "tr_429").await;
    app.wait_for(&p.requester, &iid, "past the action", |b| {
        b["current_step"]["index"] == 1
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "retried before Retry-After"
    );
}

async fn a_worker_dying_between_call_and_record_executes_once(backend: Backend) {
    // The engine alone (no pools): we play the action pool, and die at the worst moment.
    let app = spawn_app(backend).await;
    let p = app.partner("acme").await;
    let doc = json!({"name": "Manual pay", "trigger_type": "manual", "steps": [
        {"type": "wait", "name": "Hold", "config": {"signal": "go"}},
        {"type": "action", "name": "Pay", "config": {"action": "execute_transfer", "params": {"transfer_id": "{{trigger.id}}"}}}
    ]});
    // One instance per way the engine can start the action: in the action pool's own
    // transition; inline, in the signal's commit (the default), then read back from the store
    // (as a distributed pool does), or answered from the instance cache (embedded).
    let ways = ["pool start", "inline start", "inline start, cached"];
    let mut held = Vec::new();
    for (n, way) in ways.into_iter().enumerate() {
        let transfer = format!("tr_crash_{n}");
        let iid = run(&app, &p.requester, doc.clone(), &transfer).await;
        app.wait_for(&p.requester, &iid, "held", |b| b["status"] == "waiting")
            .await;
        held.push((way, iid, transfer));
    }
    let store = app.store.clone();
    // Stop the app's own pools so that only we act on step 1.
    let mut app = app;
    let sandbox = app.sandbox.clone();
    app.stop().await;
    let executor = executor_for(&app_sandbox_url(&sandbox).await);
    for (way, iid, transfer) in held {
        let mut engine = workflow_engine::Engine::new(
            store.clone(),
            workflow_core::validate::Limits::default(),
            Arc::new(workflow_engine::SystemClock),
        );
        if way != "pool start" {
            engine = engine.with_inline_steps(&workflow_engine::DEFAULT_INLINE_STEPS);
        }
        if way == "inline start, cached" {
            engine = engine.with_instance_cache();
        }
        die_between_call_and_record(&engine, &store, &sandbox, &executor, &iid, &transfer, way)
            .await;
    }
}

#[allow(clippy::too_many_arguments)]
async fn die_between_call_and_record(
    engine: &workflow_engine::Engine,
    store: &workflow_store::Store,
    sandbox: &workflow_egress::payos_sandbox::SandboxState,
    executor: &step_workers::ActionExecutor,
    iid: &str,
    transfer: &str,
    way: &str,
) {
    let actor = workflow_core::instance::ActorRef {
        id: "ops".into(),
        actor_type: workflow_core::instance::ActorType::Human,
    };
    let signalled = engine
        .signal("acme", iid, "go", json!({}), &actor)
        .await
        .unwrap_or_else(|e| panic!("{way}: {e}"));
    let pay = signalled.state.execution(1).map(|e| e.status);
    let expected = if way == "pool start" {
        workflow_core::StepStatus::Pending
    } else {
        // Started in the signal's commit: the intent is recorded before the pool calls.
        workflow_core::StepStatus::Running
    };
    assert_eq!(pay, Some(expected), "{way}");
    let cmd = workflow_engine::StepCommand {
        command_id: "c1".into(),
        partner_id: "acme".into(),
        instance_id: iid.to_string(),
        step_index: 1,
        step_type: workflow_core::StepType::Action,
        issued_at: 0,
    };
    let task = match engine.execute_step(&cmd).await {
        Ok(workflow_engine::ExecuteOutcome::Perform(task)) => task,
        other => panic!("{way}: expected an action to perform, got {other:?}"),
    };
    let cancel = tokio_util::sync::CancellationToken::new();
    // First life: the call goes through, then the worker dies before recording it.
    let first = executor.perform(&task, &cancel).await;
    assert!(
        matches!(
            first,
            Some(workflow_core::machine::ActionOutcome::Succeeded { .. })
        ),
        "{way}"
    );
    assert_eq!(
        sandbox.counts(transfer).await.map(|c| c.executions).ok(),
        Some(1),
        "{way}"
    );
    // Second life: the command is redelivered; the step is still in flight, so it calls again
    // with the same idempotency key, and the sandbox answers with its first result.
    let replays = sandbox.replays();
    let task = match engine.execute_step(&cmd).await {
        Ok(workflow_engine::ExecuteOutcome::Perform(task)) => task,
        other => panic!("{way}: expected the in-flight action again, got {other:?}"),
    };
    let second = executor
        .perform(&task, &cancel)
        .await
        .unwrap_or_else(|| panic!("{way}: cancelled"));
    engine
        .record_action(&task, second.into())
        .await
        .unwrap_or_else(|e| panic!("{way}: {e}"));
    assert_eq!(
        sandbox.counts(transfer).await.map(|c| c.executions).ok(),
        Some(1),
        "{way}: executed exactly once"
    );
    assert!(sandbox.replays() > replays, "{way}");
    let rec = store
        .get_instance("acme", iid)
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("{way}: gone"));
    assert_eq!(
        rec.state.status,
        workflow_core::InstanceStatus::Completed,
        "{way}"
    );
    // A third delivery finds the step done and skips it, calling nothing.
    assert!(
        matches!(
            engine.execute_step(&cmd).await,
            Ok(workflow_engine::ExecuteOutcome::Skipped(_))
        ),
        "{way}"
    );
    assert_eq!(
        sandbox.counts(transfer).await.map(|c| c.executions).ok(),
        Some(1),
        "{way}"
    );
}

/// Serve this sandbox state on a port of its own (the app's was stopped with it).
async fn app_sandbox_url(sandbox: &workflow_egress::payos_sandbox::SandboxState) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let router = workflow_egress::payos_sandbox::router(sandbox.clone());
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}")
}

fn executor_for(base_url: &str) -> step_workers::ActionExecutor {
    let payos = workflow_egress::PayosClient::new(&workflow_egress::PayosConfig {
        base_url: base_url.into(),
        api_key: "test".into(),
        timeouts: workflow_egress::Timeouts::default(),
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let http = workflow_egress::EgressClient::new(
        workflow_egress::EgressPolicy::strict(),
        workflow_egress::Timeouts::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    step_workers::ActionExecutor::new(payos, http)
}

async fn the_http_action_calls_a_real_server_with_an_idempotency_key(backend: Backend) {
    let app = spawn_app(backend).await;
    let p = app.partner("acme").await;
    let hits = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let (h, s) = (hits.clone(), seen.clone());
    let router = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
            let (h, s) = (h.clone(), s.clone());
            async move {
                let n = h.fetch_add(1, Ordering::SeqCst);
                if let Ok(mut seen) = s.lock() {
                    seen.push(format!(
                        "{} {}",
                        headers
                            .get("idempotency-key")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or(""),
                        body
                    ));
                }
                if n == 0 {
                    (axum::http::StatusCode::BAD_GATEWAY, "try again".to_string())
                } else {
                    (axum::http::StatusCode::OK, r#"{"ok":true}"#.to_string())
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(async move { axum::serve(listener, router).await });
    let doc = json!({"name": "Hook", "trigger_type": "manual", "steps": [
        {"type": "action", "name": "Call", "config": {"action": "http", "params": {
            "method": "POST", "url": format!("http://{addr}/hook"),
            "headers": {"x-source": "workflows"}, "body": {"transfer": "{{trigger.id}}"}}}}
    ]});
    let iid = run(&app, &p.requester, doc, "tr_http").await;
    let b = app
        .wait_for(&p.requester, &iid, "completed", |b| {
            b["status"] == "completed"
        })
        .await;
    assert_eq!(
        b["steps"][0]["output"]["response"]["body"],
        json!({"ok": true})
    );
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    let seen = seen.lock().map(|s| s.clone()).unwrap_or_default();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        seen[0], seen[1],
        "the retry carries the same idempotency key and body"
    );
    assert!(
        seen[0].starts_with("wf_") && seen[0].contains(r#""transfer":"tr_http""#),
        "{seen:?}"
    );
}

async fn simulation_mode_sends_transfers_to_the_simulation_endpoint(backend: Backend) {
    let app = spawn_app(backend).await;
    let p = app.partner("acme").await;
    let tid = id(&app
        .create_template(&p.requester, crate::helpers::PROCUREMENT)
        .await);
    let (s, b) = app
        .post(
            "/v1/workflows/instances",
            &p.requester,
            json!({"template_id": tid, "trigger": {"id": "tr_sim", "amount": 300}, "mode": "simulate"}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["mode"], "simulate");
    let done = app
        .wait_for(&p.requester, &id(&b), "completed", |b| {
            b["status"] == "completed"
        })
        .await;
    assert_eq!(done["steps"][3]["input"]["action"], "simulate_transfer");
    assert_eq!(
        done["steps"][3]["input"]["simulated_action"],
        "execute_transfer"
    );
    let counts = app
        .sandbox
        .counts("tr_sim")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (counts.executions, counts.simulations),
        (0, 1),
        "nothing executed for real"
    );

    let (s, b) = app
        .post(
            "/v1/workflows/instances",
            &p.requester,
            json!({"template_id": tid, "trigger": {}, "mode": "dry"}),
        )
        .await;
    assert_eq!(s, 422, "{b}");
    assert_eq!(b["error"]["details"][0]["path"], "$.mode");
    // The same idempotency key in another mode is a different request.
    let body = |mode: &str| json!({"template_id": tid, "trigger": {"id": "k"}, "idempotency_key": "k1", "mode": mode});
    assert_eq!(
        app.post("/v1/workflows/instances", &p.requester, body("simulate"))
            .await
            .0,
        201
    );
    assert_eq!(
        app.post("/v1/workflows/instances", &p.requester, body("live"))
            .await
            .0,
        409
    );
}

/// Cancel while `execute_transfer` is in flight: the transfer executes anyway (the sandbox holds
/// the call), and its late result is recorded on the cancelled step with an audit event, not
/// dropped.
async fn a_transfer_finishing_after_cancel_is_recorded(backend: Backend) {
    let app = spawn_app(backend).await;
    let p = app.partner("acme").await;
    app.sandbox.inject(Fault::Delay { millis: 1500 }, 1);
    let before = app.sandbox.requests();
    let iid = run(&app, &p.requester, pay(json!({})), "tr_late").await;
    // The call has reached PayOS and is being held.
    let deadline = Instant::now() + app.patience;
    while app.sandbox.requests() == before {
        assert!(Instant::now() < deadline, "the action pool never called");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (s, b) = app
        .post(
            &format!("/v1/workflows/instances/{iid}/cancel"),
            &p.requester,
            json!({"reason": "customer withdrew"}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["status"], "cancelled");
    assert_eq!(b["steps"][0]["status"], "cancelled");
    assert!(
        b["steps"][0]["output"].is_null(),
        "cancelled before the call answered: {b:#}"
    );

    // The call answers after the cancel: the executed transfer shows on the cancelled step.
    let done = app
        .wait_for(&p.requester, &iid, "the late result recorded", |b| {
            !b["steps"][0]["output"].is_null()
        })
        .await;
    assert_eq!(done["status"], "cancelled", "{done:#}");
    assert_eq!(done["steps"][0]["status"], "cancelled", "{done:#}");
    let output = &done["steps"][0]["output"];
    assert_eq!(output["response"]["status"], 200, "{done:#}");
    assert_eq!(output["response"]["body"]["status"], "executed", "{done:#}");
    assert_eq!(output["response"]["body"]["transfer_id"], "tr_late");
    assert_eq!(output["completed_after_cancel"], true);
    assert_eq!(output["attempts"].as_array().map(Vec::len), Some(1));
    assert_eq!(
        done["steps"].as_array().map(Vec::len),
        Some(1),
        "nothing ran after the cancel: {done:#}"
    );
    assert_eq!(
        app.sandbox
            .counts("tr_late")
            .await
            .map(|c| c.executions)
            .ok(),
        Some(1)
    );

    let (s, ev) = app
        .get(
            &format!("/v1/workflows/instances/{iid}/events"),
            &p.requester,
        )
        .await;
    assert_eq!(s, 200, "{ev}");
    assert_eq!(ev["chain"]["verified"], true);
    let kinds: Vec<&str> = ev["data"]
        .as_array()
        .map(|a| a.iter().filter_map(|e| e["kind"].as_str()).collect())
        .unwrap_or_default();
    let cancelled = kinds.iter().position(|k| *k == "instance.cancelled");
    let late = kinds
        .iter()
        .position(|k| *k == "action.completed_after_cancel");
    assert!(
        matches!((cancelled, late), (Some(c), Some(l)) if c < l),
        "{kinds:?}"
    );
    let event = ev["data"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|e| e["kind"] == "action.completed_after_cancel")
        })
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        event["after"]["response"]["body"]["status"], "executed",
        "{event:#}"
    );
    assert_eq!(event["after"]["response"]["body"]["transfer_id"], "tr_late");
    assert_eq!(event["after"]["action"], "execute_transfer");
    assert_eq!(event["actor"]["id"], "pool:action");
    assert!(!kinds.contains(&"action.succeeded"), "{kinds:?}");
}

crate::on_both_stores!(
    a_transfer_finishing_after_cancel_is_recorded,
    simulation_mode_sends_transfers_to_the_simulation_endpoint,
    retries_then_success_executes_once,
    exhausted_retries_follow_on_failure,
    fatal_errors_are_not_retried_and_retry_after_is_honoured,
    a_worker_dying_between_call_and_record_executes_once,
    the_http_action_calls_a_real_server_with_an_idempotency_key,
);

crate::on_distributed!(
    fatal_errors_are_not_retried_and_retry_after_is_honoured,
    the_http_action_calls_a_real_server_with_an_idempotency_key,
    simulation_mode_sends_transfers_to_the_simulation_endpoint,
    retries_then_success_executes_once,
    exhausted_retries_follow_on_failure,
);
