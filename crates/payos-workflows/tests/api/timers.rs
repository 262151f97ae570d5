//! The scheduler through HTTP: wait steps, signals, approval deadlines and escalation, on an
//! injected clock (48 hours in milliseconds) and once on the real clock; timers survive a restart.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use workflow_core::Timestamp;
use workflow_engine::ManualClock;

use crate::helpers::{assert_error, spawn_app, spawn_app_with_clock, Backend, TestApp};

const HOUR: i64 = 3_600_000;

fn id(v: &Value) -> String {
    v["id"].as_str().unwrap_or_default().to_string()
}

/// Now, on a clock that starts at the real time (so RFC 3339 output is plausible).
fn manual_clock() -> Arc<ManualClock> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    Arc::new(ManualClock::new(Timestamp(now)))
}

fn clock_now(clock: &ManualClock) -> i64 {
    workflow_engine::Clock::now(clock).0
}

async fn start(app: &TestApp, key: &str, doc: Value, trigger: Value) -> String {
    let tid = id(&app.create_template(key, &doc.to_string()).await);
    id(&app.start(key, &tid, trigger).await)
}

async fn escalation_after_a_deadline_on_an_injected_clock(backend: Backend) {
    let clock = manual_clock();
    let app = spawn_app_with_clock(backend, clock.clone()).await;
    let p = app.partner("acme").await;
    let ceo = app.key("acme", "cyrus", "human", &["ceo"]).await;
    let doc = json!({"name": "Escalating", "trigger_type": "manual", "steps": [
        {"type": "approval", "name": "CFO sign-off", "config": {
            "approvers": {"type": "role", "value": "cfo"}, "timeout": "24h",
            "on_timeout": {"action": "escalate", "approvers": {"type": "role", "value": "ceo"}, "timeout": "24h", "max_escalations": 1}}}
    ]});
    let iid = start(&app, &p.requester, doc, json!({"amount": 20000})).await;
    let before = app
        .wait_for(&p.requester, &iid, "waiting for the cfo", |b| {
            b["status"] == "waiting" && b["current_step"]["index"] == 0
        })
        .await;
    assert!(before["waiting_on"]["due"].is_string());

    clock.advance(24 * HOUR + 1);
    let escalated = app
        .wait_for(&p.requester, &iid, "escalated", |b| {
            b["waiting_on"]["detail"]["escalations"] == 1
        })
        .await;
    assert!(
        escalated["waiting_on"]["description"]
            .as_str()
            .unwrap_or_default()
            .contains("role ceo"),
        "{escalated:#}"
    );
    // The CFO is no longer an approver; the CEO is.
    let path = format!("/v1/workflows/instances/{iid}/steps/0/approve");
    let (s, b) = app.post(&path, &p.cfo, json!({})).await;
    assert_eq!(s, 403, "{b}");
    assert_error(&b, "not_eligible");
    let (s, b) = app.post(&path, &ceo, json!({})).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["instance"]["status"], "completed");

    // Both timers fired once; the audit trail shows the escalation.
    let timers = app
        .store
        .list_timers("acme", &iid)
        .await
        .unwrap_or_default();
    assert_eq!(timers.len(), 2, "{timers:?}");
    assert!(timers[0].1.is_some(), "first deadline fired");
    let (_, ev) = app
        .get(
            &format!("/v1/workflows/instances/{iid}/events"),
            &p.requester,
        )
        .await;
    let kinds: Vec<String> = ev["data"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| e["kind"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default();
    assert!(kinds.iter().any(|k| k == "approval.escalated"), "{kinds:?}");
    assert_eq!(ev["chain"]["verified"], true);
}

async fn seed_deadline_rejects_and_a_late_decision_is_refused(backend: Backend) {
    let clock = manual_clock();
    let app = spawn_app_with_clock(backend, clock.clone()).await;
    let p = app.partner("acme").await;
    let doc: Value = serde_json::from_str(crate::helpers::PROCUREMENT).unwrap_or_default();
    let iid = start(&app, &p.requester, doc, json!({"id": "t", "amount": 5000})).await;
    // Waiting (not only dispatched): from then on the deadline timer exists.
    app.wait_for(&p.requester, &iid, "waiting for the cfo", |b| {
        b["status"] == "waiting" && b["current_step"]["index"] == 1
    })
    .await;
    // The seed's timeout_hours: 48, with no on_timeout: silence rejects. At 47 hours the timer
    // is not due: the scheduler leaves it alone.
    clock.advance(47 * HOUR);
    let timers = app
        .store
        .list_timers("acme", &iid)
        .await
        .unwrap_or_default();
    assert_eq!(timers.len(), 1, "{timers:?}");
    assert!(timers[0].0.due_at.0 > clock_now(&clock), "not due yet");
    assert_eq!(
        app.store.next_timer_due().await.ok().flatten(),
        Some(timers[0].0.due_at)
    );
    clock.advance(HOUR + 1);
    let done = app
        .wait_for(&p.requester, &iid, "rejected", |b| {
            b["status"] == "rejected"
        })
        .await;
    assert!(
        done["error"]
            .as_str()
            .unwrap_or_default()
            .contains("deadline"),
        "{done:#}"
    );
    let (s, b) = app
        .post(
            &format!("/v1/workflows/instances/{iid}/steps/1/approve"),
            &p.cfo,
            json!({}),
        )
        .await;
    assert_eq!(s, 409, "{b}");
}

async fn signals_and_real_clock_waits(backend: Backend) {
    let app = spawn_app(backend).await;
    let p = app.partner("acme").await;
    let doc = json!({"name": "Rate lock", "trigger_type": "manual", "steps": [
        {"type": "wait", "name": "Pause", "config": {"duration": "1s"}},
        {"type": "wait", "name": "Rate locked", "config": {"signal": "rate_locked", "timeout": "1h", "on_timeout": "fail"}},
        {"type": "condition", "name": "Good rate", "config": {"expression": "steps[\"Rate locked\"].output.rate < 1.1"}}
    ]});
    let started = Instant::now();
    let iid = start(&app, &p.requester, doc, json!({})).await;
    let paused = app
        .wait_for(&p.requester, &iid, "pausing", |b| {
            b["current_step"]["index"] == 0 && b["status"] == "waiting"
        })
        .await;
    assert_eq!(paused["waiting_on"]["kind"], "wait");
    // The real clock: a 1-second wait ends after at least a second, on its own.
    app.wait_for(&p.requester, &iid, "waiting for the signal", |b| {
        b["current_step"]["index"] == 1 && b["status"] == "waiting"
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "woke early: {:?}",
        started.elapsed()
    );

    let (s, b) = app
        .post(
            &format!("/v1/workflows/instances/{iid}/signals/other"),
            &p.requester,
            json!({}),
        )
        .await;
    assert_eq!(s, 409, "{b}");
    assert_error(&b, "not_waiting_for_signal");
    let (s, b) = app
        .post(
            &format!("/v1/workflows/instances/{iid}/signals/rate_locked"),
            &p.requester,
            json!({"rate": 1.08}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let done = app
        .wait_for(&p.requester, &iid, "completed", |b| {
            b["status"] == "completed"
        })
        .await;
    assert_eq!(done["steps"][1]["output"], json!({"rate": 1.08}));
    assert_eq!(done["steps"][2]["output"]["result"], true);
    let (s, _) = app
        .post(
            "/v1/workflows/instances/missing/signals/rate_locked",
            &p.requester,
            json!({}),
        )
        .await;
    assert_eq!(s, 404);
}

async fn timers_survive_a_restart(backend: Backend) {
    let clock = manual_clock();
    let mut app = spawn_app_with_clock(backend, clock.clone()).await;
    let p = app.partner("acme").await;
    let doc = json!({"name": "Nap", "trigger_type": "manual", "steps": [
        {"type": "wait", "name": "Nap", "config": {"duration": "2h"}}
    ]});
    let iid = start(&app, &p.requester, doc, json!({})).await;
    app.wait_for(&p.requester, &iid, "waiting", |b| b["status"] == "waiting")
        .await;
    let store = app.store.clone();
    // The whole engine stops (scheduler included) before the timer is due...
    app.stop().await;
    clock.advance(3 * HOUR);
    // ...and a new one on the same store fires it.
    let config = payos_workflows::embedded::EmbeddedConfig {
        api: producer_api::ApiConfig::new(crate::helpers::ADMIN.into()),
        limits: workflow_core::validate::Limits::default(),
        partitions: 4,
        clock: clock.clone(),
        actions: None,
        inline_steps: backend.inline_steps(),
    };
    let runtime = payos_workflows::embedded::Embedded::start(store.clone(), config)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let rec = store.get_instance("acme", &iid).await.ok().flatten();
        if rec
            .as_ref()
            .is_some_and(|r| r.state.status == workflow_core::InstanceStatus::Completed)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the timer never fired after the restart: {rec:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let timers = store.list_timers("acme", &iid).await.unwrap_or_default();
    assert_eq!(timers.len(), 1);
    runtime.shutdown(Duration::from_secs(5)).await;
}

crate::on_both_stores!(
    escalation_after_a_deadline_on_an_injected_clock,
    seed_deadline_rejects_and_a_late_decision_is_refused,
    signals_and_real_clock_waits,
    timers_survive_a_restart,
);

crate::on_distributed!(signals_and_real_clock_waits,);

crate::stepwise!(
    embedded: [
        escalation_after_a_deadline_on_an_injected_clock,
        seed_deadline_rejects_and_a_late_decision_is_refused,
        signals_and_real_clock_waits,
        timers_survive_a_restart,
    ],
    distributed: [signals_and_real_clock_waits],
);
