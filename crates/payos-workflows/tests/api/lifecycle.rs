//! Lifecycle events on `workflow.lifecycle`: an instance's milestones, Avro, keyed by instance
//! id, in the order they happened.

use std::time::Duration;

use serde_json::json;
use workflow_bus::Bus;
use workflow_engine::messages::{LifecycleEvent, LifecycleEventKind, LIFECYCLE_TOPIC};

use crate::helpers::{spawn_app, Backend, PROCUREMENT};

async fn an_instance_reports_its_milestones_in_order(backend: Backend) {
    let app = spawn_app(backend).await;
    let p = app.partner("acme").await;
    let template = app.create_template(&p.requester, PROCUREMENT).await;
    // $500: step 0 routes skip_to:3, steps 1 and 2 are skipped, step 3 pays; completed.
    let started = app
        .start(
            &p.requester,
            template["id"].as_str().unwrap_or_default(),
            json!({"id": "tr_500", "amount": 500}),
        )
        .await;
    let id = started["id"].as_str().unwrap_or_default().to_string();
    app.wait_for(&p.requester, &id, "completed", |i| {
        i["status"] == "completed"
    })
    .await;

    // A new consumer group reads the topic from its start.
    let mut sub = app
        .bus()
        .subscribe(LIFECYCLE_TOPIC, "test-lifecycle")
        .await
        .unwrap_or_else(|e| panic!("subscribe: {e}"));
    let mut seen = Vec::new();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(15), sub.next())
            .await
            .unwrap_or_else(|_| panic!("no instance_finished; saw {seen:#?}"))
            .unwrap_or_else(|e| panic!("next: {e}"))
            .unwrap_or_else(|| panic!("bus closed"));
        let event = LifecycleEvent::decode(&msg.payload).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(msg.key, event.instance_id, "keyed by instance id");
        if event.instance_id != id {
            continue;
        }
        assert_eq!(event.partner_id, "acme");
        assert_eq!(
            event.template_id,
            template["id"].as_str().unwrap_or_default()
        );
        assert_eq!(event.template_version, 1);
        let last = event.kind == LifecycleEventKind::InstanceFinished;
        seen.push(event);
        if last {
            break;
        }
    }
    let summary: Vec<_> = seen
        .iter()
        .map(|e| (e.kind, e.step_index, e.status.as_deref()))
        .collect();
    use LifecycleEventKind::*;
    assert_eq!(
        summary,
        [
            (InstanceStarted, None, None),
            (StepCompleted, Some(0), Some("completed")),
            (StepCompleted, Some(1), Some("skipped")),
            (StepCompleted, Some(2), Some("skipped")),
            (StepCompleted, Some(3), Some("completed")),
            (InstanceFinished, None, Some("completed")),
        ]
    );
    let mut ids: Vec<_> = seen.iter().map(|e| e.event_id.clone()).collect();
    ids.dedup();
    assert_eq!(ids.len(), seen.len(), "each event has its own id");
    assert!(seen.windows(2).all(|w| w[0].at <= w[1].at));
}

async fn a_cancelled_instance_reports_it(backend: Backend) {
    let app = spawn_app(backend).await;
    let p = app.partner("acme").await;
    let template = app.create_template(&p.requester, PROCUREMENT).await;
    // $5,000 waits for the CFO; cancelling it cancels step 1 and finishes the instance.
    let started = app
        .start(
            &p.requester,
            template["id"].as_str().unwrap_or_default(),
            json!({"id": "tr_5000", "amount": 5000}),
        )
        .await;
    let id = started["id"].as_str().unwrap_or_default().to_string();
    app.wait_for(&p.requester, &id, "waiting", |i| i["status"] == "waiting")
        .await;
    let (s, b) = app
        .post(
            &format!("/v1/workflows/instances/{id}/cancel"),
            &p.requester,
            json!({"reason": "duplicate"}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let mut sub = app
        .bus()
        .subscribe(LIFECYCLE_TOPIC, "test-lifecycle")
        .await
        .unwrap_or_else(|e| panic!("subscribe: {e}"));
    let mut seen = Vec::new();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(15), sub.next())
            .await
            .unwrap_or_else(|_| panic!("no instance_finished; saw {seen:#?}"))
            .unwrap_or_else(|e| panic!("next: {e}"))
            .unwrap_or_else(|| panic!("bus closed"));
        let event = LifecycleEvent::decode(&msg.payload).unwrap_or_else(|e| panic!("{e}"));
        let last = event.kind == LifecycleEventKind::InstanceFinished;
        seen.push((event.kind, event.step_index, event.status));
        if last {
            break;
        }
    }
    use LifecycleEventKind::*;
    assert_eq!(
        seen,
        [
            (InstanceStarted, None, None),
            (StepCompleted, Some(0), Some("completed".to_string())),
            (StepCompleted, Some(1), Some("cancelled".to_string())),
            (InstanceFinished, None, Some("cancelled".to_string())),
        ]
    );
}

crate::on_both_stores!(
    an_instance_reports_its_milestones_in_order,
    a_cancelled_instance_reports_it,
);
