//! Fault tests of the distributed runtime: processes killed mid-run, orphaned outbox rows, a
//! poison message, a drain on SIGTERM. Every instance must complete, no transfer may execute
//! twice (counted at the PayOS sandbox, a real HTTP server), and only the poison message may
//! reach the dead-letter topic. Also: transfer events on Kafka start instances once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};
use workflow_bus::Bus;
use workflow_bus_kafka::{KafkaBus, KafkaConfig};
use workflow_codec::{DeadLetter, Message as _};
use workflow_core::validate::Limits;
use workflow_egress::payos_sandbox::Fault;
use workflow_engine::dead_letter::DEAD_LETTER_TOPIC;
use workflow_engine::messages::{LifecycleEvent, LifecycleEventKind, LIFECYCLE_TOPIC};
use workflow_engine::{Engine, SystemClock};

use crate::cluster::Cluster;
use crate::helpers::{Partner, TestApp, PROCUREMENT};

const SMALL: u32 = 30;

fn cluster(app: &mut TestApp) -> &mut Cluster {
    app.cluster
        .as_mut()
        .unwrap_or_else(|| panic!("a distributed app"))
}

async fn kafka(c: &Cluster) -> KafkaBus {
    let mut config = KafkaConfig::new(c.bootstrap.clone());
    config.client_id = "fault-tests".into();
    KafkaBus::new(config).unwrap_or_else(|e| panic!("kafka: {e}"))
}

/// Start `n` $500 procurements (condition → transfer) with idempotency keys, retrying each
/// start until the API accepts it (the API may be down meanwhile). Returns the instance ids.
async fn start_many(app: &TestApp, p: &Partner, tid: &str, tag: &str, n: u32) -> Vec<String> {
    start_many_at(
        app.client.clone(),
        app.base.clone(),
        p.requester.clone(),
        tid,
        tag,
        n,
    )
    .await
}

async fn start_many_at(
    client: reqwest::Client,
    base: String,
    key: String,
    tid: &str,
    tag: &str,
    n: u32,
) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let body = json!({
            "template_id": tid,
            "idempotency_key": format!("{tag}-{i}"),
            "trigger": {"id": format!("{tag}-{i}"), "amount": 500, "currency": "USD",
                        "metadata": {"type": "procurement"}},
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let sent = client
                .post(format!("{base}/v1/workflows/instances"))
                .bearer_auth(&key)
                .json(&body)
                .send()
                .await;
            if let Ok(resp) = sent {
                let status = resp.status();
                let b: Value = resp.json().await.unwrap_or(Value::Null);
                if status == StatusCode::CREATED || status == StatusCode::OK {
                    ids.push(b["id"].as_str().unwrap_or_default().to_string());
                    break;
                }
                assert!(status.is_server_error(), "start {tag}-{i}: {status} {b}");
            }
            assert!(Instant::now() < deadline, "start {tag}-{i} never accepted");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    ids
}

/// Every instance completes and each transfer executed exactly once at the sandbox.
async fn all_complete_once(app: &TestApp, p: &Partner, ids: &[String], tag: &str) {
    for (i, id) in ids.iter().enumerate() {
        app.wait_for(&p.requester, id, "completed", |b| {
            b["status"] == "completed"
        })
        .await;
        let counts = app
            .sandbox
            .counts(&format!("{tag}-{i}"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(counts.executions, 1, "transfer {tag}-{i} executed once");
    }
}

/// A new consumer group on the cluster's `topic` (a logical name), reading from its start.
async fn inspect(c: &Cluster, topic: &str) -> Box<dyn workflow_bus::Subscription> {
    kafka(c)
        .await
        .subscribe(
            &format!("{}{topic}", c.prefix),
            &format!("inspect-{}", uuid::Uuid::now_v7().simple()),
        )
        .await
        .unwrap_or_else(|e| panic!("subscribe: {e}"))
}

/// The dead letters on the cluster's topic, read until nothing new comes for `quiet`.
async fn dead_letters(c: &Cluster, quiet: Duration) -> Vec<DeadLetter> {
    let mut sub = inspect(c, DEAD_LETTER_TOPIC).await;
    let mut letters = Vec::new();
    while let Ok(Ok(Some(msg))) = tokio::time::timeout(quiet, sub.next()).await {
        letters.push(DeadLetter::from_avro(&msg.payload).unwrap_or_else(|e| panic!("{e}")));
    }
    letters
}

async fn seed(app: &TestApp) -> (Partner, String) {
    let p = app.partner("acme").await;
    let tpl = app.create_template(&p.requester, PROCUREMENT).await;
    let tid = tpl["id"].as_str().unwrap_or_default().to_string();
    (p, tid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_action_worker_and_the_api_mid_run_loses_nothing_and_runs_nothing_twice() {
    let mut app = TestApp::distributed().await;
    let (p, tid) = seed(&app).await;

    // SIGKILL the action pool while transfers are being executed (the first calls are slow,
    // so the kill lands between a call and its recording), then bring it back.
    app.sandbox.inject(Fault::Delay { millis: 1500 }, 2);
    let first = start_many(&app, &p, &tid, "w", SMALL).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while app.sandbox.requests() < 2 {
        assert!(Instant::now() < deadline, "no transfer ever ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cluster(&mut app).kill("action").await;
    let more = start_many(&app, &p, &tid, "w2", 5).await;
    cluster(&mut app).spawn("action");
    all_complete_once(&app, &p, &first, "w").await;
    all_complete_once(&app, &p, &more, "w2").await;

    // SIGKILL the api (and the relay it runs) while clients keep starting instances: they
    // retry with their idempotency keys once it is back.
    let starting = {
        let (client, base, key, tid) = (
            app.client.clone(),
            app.base.clone(),
            p.requester.clone(),
            tid.clone(),
        );
        tokio::spawn(async move { start_many_at(client, base, key, &tid, "a", SMALL).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster(&mut app).kill("api").await;
    cluster(&mut app).spawn("api");
    app.cluster
        .as_ref()
        .unwrap_or_else(|| panic!("cluster"))
        .wait_for_api()
        .await;
    let during = starting.await.unwrap_or_else(|e| panic!("{e}"));
    all_complete_once(&app, &p, &during, "a").await;
    let (s, listed) = app
        .get("/v1/workflows/instances?limit=100", &p.requester)
        .await;
    assert_eq!(s, StatusCode::OK);
    let total = listed["data"].as_array().map_or(0, Vec::len);
    assert_eq!(
        total,
        (2 * SMALL + 5) as usize,
        "one instance per idempotency key"
    );

    let c = app.cluster.as_ref().unwrap_or_else(|| panic!("cluster"));
    let letters = dead_letters(c, Duration::from_secs(2)).await;
    assert!(letters.is_empty(), "dead letters: {letters:?}");

    // The lifecycle events leave through the outbox's event lane, led by one process (likely
    // the api, the first up): every instance's reach the topic, started before finished.
    let all: Vec<String> = [first, more, during].concat();
    lifecycle_of_all(c, &all).await;
}

/// Read the cluster's lifecycle topic until each of `ids` has an `InstanceFinished` (30 s at
/// most), checking that each instance's `InstanceStarted` came first.
async fn lifecycle_of_all(c: &Cluster, ids: &[String]) {
    use std::collections::HashMap;
    let mut sub = inspect(c, LIFECYCLE_TOPIC).await;
    let mut seen: HashMap<String, Vec<LifecycleEventKind>> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let finished = |seen: &HashMap<String, Vec<LifecycleEventKind>>| {
        ids.iter().all(|id| {
            seen.get(id)
                .is_some_and(|kinds| kinds.contains(&LifecycleEventKind::InstanceFinished))
        })
    };
    while !finished(&seen) {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, sub.next())
            .await
            .unwrap_or_else(|_| panic!("lifecycle events missing after 30 s"))
            .unwrap_or_else(|e| panic!("next: {e}"))
            .unwrap_or_else(|| panic!("bus closed"));
        let event = LifecycleEvent::decode(&msg.payload).unwrap_or_else(|e| panic!("{e}"));
        seen.entry(event.instance_id).or_default().push(event.kind);
    }
    for id in ids {
        let kinds = &seen[id];
        assert_eq!(
            kinds.first(),
            Some(&LifecycleEventKind::InstanceStarted),
            "{id}: {kinds:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_orphaned_by_a_dead_process_are_swept_and_sigterm_drains() {
    let app = TestApp::distributed().await;
    let (p, tid) = seed(&app).await;

    // A process that committed an instance and died before publishing: an engine in this
    // test, on the cluster's database, with no relay at all.
    let engine = Engine::new(app.store.clone(), Limits::default(), Arc::new(SystemClock));
    let requester = workflow_core::instance::ActorRef {
        id: "rita".into(),
        actor_type: workflow_core::instance::ActorType::Human,
    };
    let orphan = engine
        .start_instance(
            "acme",
            &requester,
            &tid,
            json!({"id": "orphan", "amount": 500, "currency": "USD", "metadata": {"type": "procurement"}}),
            Some("orphan".to_string()),
            workflow_core::instance::RunMode::Live,
        )
        .await
        .unwrap_or_else(|e| panic!("start: {e}"));
    assert!(
        !engine.outbox().is_empty(),
        "its command was never published"
    );
    let id = orphan.instance.info.id.clone();
    app.wait_for(&p.requester, &id, "completed by the sweep", |b| {
        b["status"] == "completed"
    })
    .await;
    let counts = app
        .sandbox
        .counts("orphan")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(counts.executions, 1);

    // SIGTERM: the action pool (every other step of the seed runs inline, in the transition
    // that reaches it) finishes what it holds, commits and exits 0.
    let mut app = app;
    let status = cluster(&mut app)
        .terminate("action", Duration::from_secs(30))
        .await;
    assert!(status.success(), "drained exit: {status:?}");
    // ...having committed everything it handled: its group is nothing behind (as `topics
    // --lag` reports it, for every group of the deployment).
    let c = app.cluster.as_ref().unwrap_or_else(|| panic!("cluster"));
    let env = [
        ("DATABASE_URL", c.database_url.clone()),
        ("KAFKA_BOOTSTRAP_SERVERS", c.bootstrap.clone()),
        ("WORKFLOWS_TOPIC_PREFIX", c.prefix.clone()),
    ];
    let settings = payos_workflows::config::Settings::resolve(None, &|name| {
        env.iter().find(|(n, _)| *n == name).map(|(_, v)| v.clone())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let lags = payos_workflows::distributed::lags(&settings)
        .await
        .unwrap_or_else(|e| panic!("lags: {e}"));
    assert!(lags.iter().all(|g| g.lag.is_some()), "{lags:?}");
    let action = lags
        .iter()
        .find(|g| g.group == format!("{}pool-action", c.prefix))
        .unwrap_or_else(|| panic!("no pool-action group: {lags:?}"));
    assert_eq!(action.topic, format!("{}workflow.steps.action", c.prefix));
    assert_eq!(
        action.lag,
        Some(0),
        "action commands handled but not committed"
    );
    let waiting = start_many(&app, &p, &tid, "t", 3).await;
    // Nobody consumes actions now; a new member picks the commands up where it left off.
    let (s, b) = app
        .get(
            &format!("/v1/workflows/instances/{}", waiting[0]),
            &p.requester,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_ne!(b["status"], "completed", "{b}");
    cluster(&mut app).spawn("action");
    all_complete_once(&app, &p, &waiting, "t").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_is_dead_lettered_and_the_rest_flow_on() {
    let app = TestApp::distributed().await;
    let (p, tid) = seed(&app).await;
    let c = app.cluster.as_ref().unwrap_or_else(|| panic!("cluster"));
    let bus = kafka(c).await;
    // The cluster starts once every group has settled: while members still join one by one,
    // each join is a rebalance, and a partition revoked between the dead-lettering and its
    // offset commit is read again by its next owner (at-least-once: the letter twice).
    let topic = format!("{}workflow.steps.condition", c.prefix);
    bus.publish(&topic, "poison-instance", b"\x00\x01 not avro".to_vec())
        .await
        .unwrap_or_else(|e| panic!("publish: {e}"));
    let ids = start_many(&app, &p, &tid, "p", 5).await;
    all_complete_once(&app, &p, &ids, "p").await;

    let letters = dead_letters(c, Duration::from_secs(3)).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert_eq!(letter.topic, "workflow.steps.condition");
    assert_eq!(letter.key.as_deref(), Some(&b"poison-instance"[..]));
    assert_eq!(letter.payload.as_deref(), Some(&b"\x00\x01 not avro"[..]));
    assert!(letter.reason.contains("undecodable"), "{}", letter.reason);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_event_on_kafka_starts_the_seed_template_once() {
    let app = TestApp::distributed().await;
    let (p, _tid) = seed(&app).await;
    let c = app.cluster.as_ref().unwrap_or_else(|| panic!("cluster"));
    let bus = kafka(c).await;
    let topic = format!("{}payos.transfers.events", c.prefix);
    let event = workflow_codec::TransferEvent {
        event_id: "evt-1".into(),
        partner_id: "acme".into(),
        transfer_id: "tr_kafka".into(),
        amount: "500.00".into(),
        currency: "USD".into(),
        metadata: r#"{"type":"procurement"}"#.into(),
        occurred_at: 1,
    }
    .to_avro()
    .unwrap_or_else(|e| panic!("{e}"));
    // The transfer service may deliver an event twice: one instance, one transfer.
    for _ in 0..2 {
        bus.publish(&topic, "tr_kafka", event.clone())
            .await
            .unwrap_or_else(|e| panic!("publish: {e}"));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let id = loop {
        let (s, b) = app.get("/v1/workflows/instances", &p.requester).await;
        assert_eq!(s, StatusCode::OK);
        if let Some(first) = b["data"].as_array().and_then(|a| a.first()) {
            break first["id"].as_str().unwrap_or_default().to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no instance started\n{}",
            c.tails()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    app.wait_for(&p.requester, &id, "completed", |b| {
        b["status"] == "completed"
    })
    .await;
    let counts = app
        .sandbox
        .counts("tr_kafka")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(counts.executions, 1);
    let (_, b) = app.get("/v1/workflows/instances", &p.requester).await;
    assert_eq!(b["data"].as_array().map(Vec::len), Some(1), "{b}");
}

/// The timeout policies on the real clock with short deadlines, while the scheduler is killed
/// and two schedulers then share the timers: every timer fires once, each policy has its effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_policies_fire_once_across_a_killed_scheduler_and_two_live_ones() {
    let mut app = TestApp::distributed().await;
    let p = app.partner("acme").await;
    // No scheduler while the instances start: their deadlines pass unseen.
    cluster(&mut app).kill("scheduler").await;

    let approval = |on_timeout: Value| {
        json!({"name": "Deadline", "trigger_type": "manual", "steps": [
            {"type": "approval", "name": "Sign-off", "config": {
                "approvers": {"type": "role", "value": "cfo"}, "timeout": "2s",
                "on_timeout": on_timeout}},
            {"type": "condition", "name": "Done", "config": {"expression": "true"}}
        ]})
    };
    let cases = [
        ("reject", approval(json!({"action": "reject"})), "rejected"),
        ("fail", approval(json!({"action": "fail"})), "failed"),
        (
            "approve",
            approval(json!({"action": "approve"})),
            "completed",
        ),
        (
            "escalate",
            approval(
                json!({"action": "escalate", "approvers": {"type": "role", "value": "ceo"},
                            "timeout": "2s", "max_escalations": 1}),
            ),
            "rejected",
        ),
        (
            "wait timeout",
            json!({"name": "Rate lock", "trigger_type": "manual", "steps": [
                {"type": "wait", "name": "Locked", "config": {"signal": "rate_locked", "timeout": "2s", "on_timeout": "continue"}},
                {"type": "condition", "name": "Done", "config": {"expression": "true"}}
            ]}),
            "completed",
        ),
    ];
    let mut started = Vec::new();
    for (name, doc, outcome) in &cases {
        let tpl = app.create_template(&p.requester, &doc.to_string()).await;
        let tid = tpl["id"].as_str().unwrap_or_default().to_string();
        let inst = app.start(&p.requester, &tid, json!({})).await;
        started.push((
            *name,
            inst["id"].as_str().unwrap_or_default().to_string(),
            *outcome,
        ));
    }
    let notify = approval(json!({"action": "notify"}));
    let tpl = app.create_template(&p.requester, &notify.to_string()).await;
    let tid = tpl["id"].as_str().unwrap_or_default().to_string();
    let overdue = app.start(&p.requester, &tid, json!({})).await;
    let overdue = overdue["id"].as_str().unwrap_or_default().to_string();

    // Each step is waiting (its timer stored); past every first deadline, nothing has fired:
    // the timers wait in the table.
    for (_, id, _) in &started {
        app.wait_for(&p.requester, id, "waiting", |b| b["status"] == "waiting")
            .await;
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for (name, id, _) in &started {
        let (_, b) = app
            .get(&format!("/v1/workflows/instances/{id}"), &p.requester)
            .await;
        assert_eq!(
            b["status"], "waiting",
            "{name} moved without a scheduler: {b:#}"
        );
    }

    // Two schedulers come up and share the due timers.
    cluster(&mut app).spawn("scheduler");
    cluster(&mut app).spawn("scheduler-2");
    for (name, id, outcome) in &started {
        let done = app
            .wait_for(&p.requester, id, outcome, |b| b["status"] == *outcome)
            .await;
        let (_, events) = app
            .get(
                &format!("/v1/workflows/instances/{id}/events"),
                &p.requester,
            )
            .await;
        let fired = events["data"].as_array().map_or(0, |a| {
            a.iter().filter(|e| e["kind"] == "timer.fired").count()
        });
        let expected = if *name == "escalate" { 2 } else { 1 };
        assert_eq!(
            fired, expected,
            "{name}: timer.fired events\n{events:#}\n{done:#}"
        );
    }
    let still = app
        .wait_for(&p.requester, &overdue, "overdue recorded", |b| {
            b["status"] == "waiting"
        })
        .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, events) = app
            .get(
                &format!("/v1/workflows/instances/{overdue}/events"),
                &p.requester,
            )
            .await;
        let kinds: Vec<&str> = events["data"]
            .as_array()
            .map(|a| a.iter().filter_map(|e| e["kind"].as_str()).collect())
            .unwrap_or_default();
        if kinds.contains(&"approval.overdue") {
            assert_eq!(
                kinds.iter().filter(|k| **k == "approval.overdue").count(),
                1
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no overdue event: {kinds:?}\n{still:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
