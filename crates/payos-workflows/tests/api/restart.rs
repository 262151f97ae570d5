//! Restarting the embedded engine loses no work: commands the in-process bus held are re-sent
//! from the store, and the redelivery of a command already executed changes nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use payos_workflows::embedded::{Embedded, EmbeddedConfig};
use serde_json::json;
use workflow_core::instance::{ActorRef, ActorType};
use workflow_core::validate::Limits;
use workflow_core::InstanceStatus;
use workflow_engine::{Engine, SystemClock};
use workflow_store::records::{PartnerRecord, TemplateRecord};
use workflow_store::Store;

use crate::helpers::{Backend, ADMIN, PROCUREMENT};

async fn store(backend: Backend, dir: &tempfile::TempDir) -> Store {
    let url = match backend {
        Backend::Sqlite | Backend::SqliteStepwise => {
            format!("sqlite://{}?mode=rwc", dir.path().join("r.db").display())
        }
        Backend::Postgres => workflow_testkit::postgres_url()
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        Backend::Distributed | Backend::DistributedStepwise => {
            panic!("restarting the embedded runtime is embedded-only")
        }
    };
    let store = Store::connect(&url).await.unwrap_or_else(|e| panic!("{e}"));
    store.migrate().await.unwrap_or_else(|e| panic!("{e}"));
    store
}

async fn resume_after_a_restart_that_lost_the_bus(backend: Backend) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = store(backend, &dir).await;
    let now = workflow_core::Timestamp(1);
    store
        .create_partner(&PartnerRecord {
            id: "p".into(),
            name: "p".into(),
            created_at: now,
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let doc: serde_json::Value = serde_json::from_str(PROCUREMENT).unwrap_or_default();
    let audit = workflow_store::records::AuditDraft {
        stream: "template:t".into(),
        at: now,
        actor: ActorRef {
            id: "u".into(),
            actor_type: ActorType::Human,
        },
        kind: "template.created".into(),
        before: json!(null),
        after: json!({}),
        reason: None,
    };
    let tpl = TemplateRecord {
        id: "t".into(),
        partner_id: "p".into(),
        version: 1,
        name: "Procurement Approval".into(),
        trigger_type: "on_transfer".into(),
        active: true,
        doc,
        created_at: now,
        created_by: "u".into(),
    };
    store
        .insert_template(&tpl, &audit)
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    // "Before the crash": instances were created, their first commands left the outbox for the
    // in-process bus, and the process died before any worker ran them.
    let engine = Engine::new(store.clone(), Limits::default(), Arc::new(SystemClock));
    let actor = ActorRef {
        id: "u".into(),
        actor_type: ActorType::Human,
    };
    let mut ids = Vec::new();
    for amount in [500, 5000] {
        let out = engine
            .start_instance(
                "p",
                &actor,
                "t",
                json!({"id": "tr", "amount": amount}),
                None,
                Default::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        ids.push(out.instance.info.id.clone());
    }
    let sent = store
        .fetch_outbox(0)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // Each start wrote its step command (and its `instance_started` lifecycle event).
    let commands = sent
        .iter()
        .filter(|m| m.topic.starts_with("workflow.steps."));
    assert_eq!(commands.count(), 2);
    store
        .delete_outbox(&sent.iter().map(|m| m.id.clone()).collect::<Vec<_>>())
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    // The restart: the runtime resumes both from the store.
    let config = EmbeddedConfig {
        api: producer_api::ApiConfig::new(ADMIN.into()),
        limits: Limits::default(),
        partitions: 4,
        clock: Arc::new(SystemClock),
        actions: None,
        inline_steps: backend.inline_steps(),
    };
    let runtime = Embedded::start(store.clone(), config)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let deadline = Instant::now() + Duration::from_secs(15);
    let expected = [3usize, 1];
    for (id, step) in ids.iter().zip(expected) {
        loop {
            let rec = store.get_instance("p", id).await.ok().flatten();
            let state = rec.map(|r| r.state);
            // This runtime has no action executor: the $500 one stops with its action in
            // flight (running) at step 3, the $5,000 one waits for the CFO at step 1.
            if state.as_ref().is_some_and(|s| {
                s.status != InstanceStatus::Failed
                    && s.current_step == Some(step)
                    && s.execution(step).is_some_and(|e| e.started_at.is_some())
            }) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "instance {id} did not resume: {state:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Each step ran once: a resumed command that was already executed is skipped.
    let rec = store
        .get_instance("p", &ids[0])
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("gone"));
    assert_eq!(rec.state.steps.iter().filter(|s| s.index == 0).count(), 1);
    runtime.shutdown(Duration::from_secs(5)).await;
}

crate::on_both_stores!(resume_after_a_restart_that_lost_the_bus);
