//! The `on_transfer` trigger in the embedded runtime: the transfer service's Avro events on
//! `payos.transfers.events` start the partner's matching templates, once per transfer; an
//! undecodable event is dead-lettered and the next one still starts its instance.
//!
//! Every event of a test is published with one key, so they share a partition and are handled
//! in order: once a later event's instance exists, every earlier event has been handled. That
//! is how "started nothing" is observed without sleeping.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use workflow_bus::Bus;
use workflow_engine::dead_letter::DEAD_LETTER_TOPIC;
use workflow_engine::messages::{decode_dead_letter, TransferEvent};

use crate::helpers::{spawn_app, Backend, TestApp, PROCUREMENT};

const TOPIC: &str = step_workers::transfers::TRANSFER_EVENTS_TOPIC;
/// One key for every event of a test: one partition, handled in order.
const KEY: &str = "acme-transfers";

fn event(transfer_id: &str, amount: &str, metadata: Value) -> TransferEvent {
    TransferEvent {
        event_id: format!("ev_{transfer_id}"),
        partner_id: "acme".into(),
        transfer_id: transfer_id.into(),
        amount: amount.into(),
        currency: "USD".into(),
        metadata: metadata.as_object().cloned().unwrap_or_default(),
        occurred_at: 1_700_000_000_000,
    }
}

async fn publish(app: &TestApp, bytes: Vec<u8>) {
    app.bus()
        .publish(TOPIC, KEY, bytes)
        .await
        .unwrap_or_else(|e| panic!("publish: {e}"));
}

async fn publish_event(app: &TestApp, e: &TransferEvent) {
    publish(app, e.encode().unwrap_or_else(|e| panic!("encode: {e}"))).await;
}

/// The partner's instances of `template_id`.
async fn instances_of(app: &TestApp, key: &str, template_id: &str) -> Vec<Value> {
    let (s, b) = app
        .get(
            &format!("/v1/workflows/instances?template_id={template_id}&limit=100"),
            key,
        )
        .await;
    assert_eq!(s, 200, "{b}");
    b["data"].as_array().cloned().unwrap_or_default()
}

/// Wait until an instance of `template_id` was started for `transfer_id`, and return it.
async fn wait_for_transfer(
    app: &TestApp,
    key: &str,
    template_id: &str,
    transfer_id: &str,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let found = instances_of(app, key, template_id)
            .await
            .into_iter()
            .find(|i| i["trigger"]["id"] == transfer_id);
        if let Some(instance) = found {
            return instance;
        }
        assert!(
            Instant::now() < deadline,
            "no instance of {template_id} for transfer {transfer_id}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const PAYROLL: &str = r#"{
  "name": "Payroll check",
  "trigger_type": "on_transfer",
  "trigger_config": {"conditions": [{"field": "metadata.type", "op": "eq", "value": "payroll"}]},
  "steps": [{"type": "approval", "name": "HR", "config": {"approvers": {"type": "role", "value": "cfo"}}}]
}"#;

const MANUAL: &str = r#"{
  "name": "Manual only",
  "trigger_type": "manual",
  "steps": [{"type": "approval", "name": "HR", "config": {"approvers": {"type": "role", "value": "cfo"}}}]
}"#;

async fn a_transfer_event_starts_the_matching_templates_once(backend: Backend) {
    let app = spawn_app(backend).await;
    let p = app.partner("acme").await;
    let procurement = app.create_template(&p.requester, PROCUREMENT).await["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let payroll = app.create_template(&p.requester, PAYROLL).await["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let manual = app.create_template(&p.requester, MANUAL).await["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();

    // Not a procurement: starts nothing. Then a $500 procurement: starts "Procurement
    // Approval" only, which needs no approval and executes the transfer.
    publish_event(
        &app,
        &event("tr_travel", "80.00", json!({"type": "travel"})),
    )
    .await;
    let small = event(
        "tr_500",
        "500.00",
        json!({"type": "procurement", "po": "PO-1"}),
    );
    publish_event(&app, &small).await;
    let instance = wait_for_transfer(&app, &p.requester, &procurement, "tr_500").await;
    assert_eq!(instance["trigger"]["amount"], json!(500), "{instance:#}");
    assert_eq!(instance["trigger"]["amount_decimal"], "500.00");
    assert_eq!(instance["trigger"]["metadata"]["po"], "PO-1");
    assert_eq!(instance["trigger"]["currency"], "USD");
    assert_eq!(instance["created_by"]["type"], "system");
    assert_eq!(
        instance["idempotency_key"],
        format!("transfer:tr_500:{procurement}")
    );
    let id = instance["id"].as_str().unwrap_or_default();
    let done = app
        .wait_for(&p.requester, id, "completed", |i| {
            i["status"] == "completed"
        })
        .await;
    assert_eq!(done["steps"][1]["status"], "skipped", "{done:#}");
    assert!(instances_of(&app, &p.requester, &payroll).await.is_empty());
    assert!(instances_of(&app, &p.requester, &manual).await.is_empty());
    let all = instances_of(&app, &p.requester, &procurement).await;
    assert_eq!(all.len(), 1, "the travel transfer started nothing: {all:?}");

    // The same event again (a redelivery, a replay): nothing new. A $5,000 procurement after
    // it waits for the CFO.
    publish_event(&app, &small).await;
    publish_event(
        &app,
        &event("tr_5000", "5000.00", json!({"type": "procurement"})),
    )
    .await;
    let large = wait_for_transfer(&app, &p.requester, &procurement, "tr_5000").await;
    let large_id = large["id"].as_str().unwrap_or_default();
    app.wait_for(&p.requester, large_id, "waiting on the CFO", |i| {
        i["status"] == "waiting" && i["current_step"]["index"] == 1
    })
    .await;
    let all = instances_of(&app, &p.requester, &procurement).await;
    assert_eq!(all.len(), 2, "the replay started nothing: {all:?}");
    let calls = app.sandbox.ledger().calls_for("tr_500").await;
    assert_eq!(calls.map(|c| c.len()).ok(), Some(1), "tr_500 executed once");

    // A payroll transfer starts the payroll template, not the procurement one.
    publish_event(&app, &event("tr_pay", "12000", json!({"type": "payroll"}))).await;
    wait_for_transfer(&app, &p.requester, &payroll, "tr_pay").await;
    assert_eq!(
        instances_of(&app, &p.requester, &procurement).await.len(),
        2
    );
}

async fn an_undecodable_event_is_dead_lettered_and_the_next_one_runs(backend: Backend) {
    let app = spawn_app(backend).await;
    let p = app.partner("acme").await;
    let procurement = app.create_template(&p.requester, PROCUREMENT).await["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut letters = app
        .bus()
        .subscribe(DEAD_LETTER_TOPIC, "test-inspect")
        .await
        .unwrap_or_else(|e| panic!("subscribe: {e}"));

    // Garbage and JSON (the old encoding) are both dead-lettered, byte for byte; the event
    // after them still starts its instance.
    let garbage = b"\x00\x01not avro".to_vec();
    let json_event = br#"{"transfer_id":"tr_json","amount":"5"}"#.to_vec();
    publish(&app, garbage.clone()).await;
    publish(&app, json_event.clone()).await;
    publish_event(
        &app,
        &event("tr_ok", "10.00", json!({"type": "procurement"})),
    )
    .await;
    wait_for_transfer(&app, &p.requester, &procurement, "tr_ok").await;

    let mut got = Vec::new();
    for _ in 0..2 {
        let msg = tokio::time::timeout(Duration::from_secs(15), letters.next())
            .await
            .unwrap_or_else(|_| panic!("no dead letter; got {got:?}"))
            .unwrap_or_else(|e| panic!("next: {e}"))
            .unwrap_or_else(|| panic!("bus closed"));
        assert_eq!(msg.key, KEY);
        let letter = decode_dead_letter(&msg.payload).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(letter.topic, TOPIC);
        assert_eq!(letter.key.as_deref(), Some(KEY.as_bytes()));
        assert!(
            letter.reason.contains("undecodable transfer event"),
            "{}",
            letter.reason
        );
        got.push(letter.payload.unwrap_or_default());
    }
    assert_eq!(got, [garbage, json_event]);
    assert_eq!(
        instances_of(&app, &p.requester, &procurement).await.len(),
        1
    );
}

crate::on_both_stores!(
    a_transfer_event_starts_the_matching_templates_once,
    an_undecodable_event_is_dead_lettered_and_the_next_one_runs,
);

/// The same consumer on a real Kafka broker (workflow-testkit starts one unless
/// `KAFKA_BOOTSTRAP_SERVERS` is set): garbage is dead-lettered, the event after it starts its
/// instance, and its replay starts nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kafka_transfer_events_start_instances_once() {
    use std::sync::Arc;
    use workflow_bus_kafka::{KafkaBus, KafkaConfig};
    use workflow_core::instance::{ActorRef, ActorType};
    use workflow_engine::{Engine, SystemClock};
    use workflow_store::records::{AuditDraft, PartnerRecord, TemplateRecord};
    use workflow_testkit::{kafka_bootstrap, unique_topic};

    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("k.db").display());
    let store = workflow_store::Store::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    store.migrate().await.unwrap_or_else(|e| panic!("{e}"));
    let now = workflow_core::Timestamp(1);
    store
        .create_partner(&PartnerRecord {
            id: "acme".into(),
            name: "acme".into(),
            created_at: now,
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let template = TemplateRecord {
        id: "tpl-procurement".into(),
        partner_id: "acme".into(),
        version: 1,
        name: "Procurement Approval".into(),
        trigger_type: "on_transfer".into(),
        active: true,
        doc: serde_json::from_str(PROCUREMENT).unwrap_or_default(),
        created_at: now,
        created_by: "u".into(),
    };
    let audit = AuditDraft {
        stream: "template:tpl-procurement".into(),
        at: now,
        actor: ActorRef {
            id: "u".into(),
            actor_type: ActorType::Human,
        },
        kind: "template.created".into(),
        before: Value::Null,
        after: json!({}),
        reason: None,
    };
    store
        .insert_template(&template, &audit)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let engine = Engine::new(
        store.clone(),
        workflow_core::validate::Limits::default(),
        Arc::new(SystemClock),
    );

    let bootstrap = kafka_bootstrap()
        .await
        .unwrap_or_else(|e| panic!("Kafka for tests: {e}"));
    let mut kafka = KafkaConfig::new(bootstrap)
        .with("session.timeout.ms", "4000")
        .with("heartbeat.interval.ms", "250")
        .with("partition.assignment.strategy", "range");
    kafka.partitions = 2;
    let bus: Arc<dyn Bus> = Arc::new(KafkaBus::new(kafka).unwrap_or_else(|e| panic!("{e}")));
    let topic = unique_topic("transfers");
    let config = step_workers::TransferTriggerConfig {
        topic: topic.clone(),
        group: unique_topic("workflow-triggers"),
        ..Default::default()
    };

    let garbage = b"\x00garbage".to_vec();
    let good = event("tr_kafka", "700.00", json!({"type": "procurement"}));
    let encode = |e: &TransferEvent| e.encode().unwrap_or_else(|e| panic!("{e}"));
    for payload in [garbage.clone(), encode(&good)] {
        bus.publish(&topic, KEY, payload)
            .await
            .unwrap_or_else(|e| panic!("publish: {e}"));
    }
    let cancel = tokio_util::sync::CancellationToken::new();
    let consumer = tokio::spawn(step_workers::run_transfer_triggers(
        engine.clone(),
        bus.clone(),
        config,
        cancel.clone(),
    ));

    let started = |transfer: &str| {
        let (store, key) = (
            store.clone(),
            step_workers::transfers::idempotency_key(transfer, "tpl-procurement"),
        );
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let found = store
                    .get_instance_by_key("acme", &key)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                if let Some(instance) = found {
                    return instance;
                }
                assert!(Instant::now() < deadline, "no instance for {key}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let first = started("tr_kafka").await;
    assert_eq!(first.info.trigger["amount"], json!(700));

    // The replay, then another transfer on the same partition: once that one started, the
    // replay was handled, and it started nothing.
    for payload in [
        encode(&good),
        encode(&event("tr_after", "1.00", json!({"type": "procurement"}))),
    ] {
        bus.publish(&topic, KEY, payload)
            .await
            .unwrap_or_else(|e| panic!("publish: {e}"));
    }
    started("tr_after").await;
    let all = store
        .list_instances("acme", &Default::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(all.len(), 2, "{all:?}");
    assert_eq!(started("tr_kafka").await.info.id, first.info.id);

    // The garbage is on the dead-letter topic (shared by every test: find ours by its topic).
    let mut letters = bus
        .subscribe(DEAD_LETTER_TOPIC, &unique_topic("inspect"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, letters.next())
            .await
            .unwrap_or_else(|_| panic!("no dead letter for {topic}"))
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("bus closed"));
        let Ok(letter) = decode_dead_letter(&msg.payload) else {
            continue;
        };
        if letter.topic == topic {
            assert_eq!(letter.payload, Some(garbage));
            assert!(letter.reason.contains("undecodable"), "{}", letter.reason);
            break;
        }
    }
    cancel.cancel();
    drop(letters);
    let _ = tokio::time::timeout(Duration::from_secs(30), consumer).await;
}
