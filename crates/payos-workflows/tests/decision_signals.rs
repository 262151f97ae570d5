//! An approve call waiting in the `api` process is woken by PostgreSQL `NOTIFY` when the
//! approval pool, in another process, records the outcome: two engines on two stores of one
//! database, the api's with the listener the distributed `api` runs
//! ([`payos_workflows::distributed::run_decision_listener`]), the pool's applying decisions.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use sqlx::Row;
use tokio_util::sync::CancellationToken;
use workflow_core::instance::{ActorRef, ActorType, Verdict};
use workflow_core::machine::Decider;
use workflow_core::validate::Limits;
use workflow_core::{InstanceStatus, Timestamp};
use workflow_engine::{
    DecisionCommand, DecisionResult, Engine, StepMessage, SystemClock, DECISION_TOPIC,
};
use workflow_store::records::{AuditDraft, PartnerRecord, TemplateRecord};
use workflow_store::Store;

/// The bound on "promptly": generous for a shared machine, yet well under the 250 ms safety
/// poll a waiting call falls back to while the listener is connected.
const PROMPT: Duration = Duration::from_millis(120);
/// How long a step of the setup may take.
const PATIENCE: Duration = Duration::from_secs(15);

fn actor(id: &str) -> ActorRef {
    ActorRef {
        id: id.into(),
        actor_type: ActorType::Human,
    }
}

async fn store(url: &str) -> Store {
    let store = Store::connect(url).await.expect("connect");
    store.migrate().await.expect("migrate");
    store
}

/// Partner `p` and template `t`: one approval step for the `cfo` role.
async fn seed(store: &Store) {
    let now = Timestamp(1);
    store
        .create_partner(&PartnerRecord {
            id: "p".into(),
            name: "p".into(),
            created_at: now,
        })
        .await
        .expect("partner");
    let doc = json!({
        "name": "One approval",
        "trigger_type": "manual",
        "steps": [{
            "type": "approval",
            "name": "CFO Approval",
            "config": {"approvers": {"type": "role", "value": "cfo"}, "timeout_hours": 48}
        }]
    });
    let audit = AuditDraft {
        stream: "template:t".into(),
        at: now,
        actor: actor("rita"),
        kind: "template.created".into(),
        before: json!(null),
        after: json!({}),
        reason: None,
    };
    let tpl = TemplateRecord {
        id: "t".into(),
        partner_id: "p".into(),
        version: 1,
        name: "One approval".into(),
        trigger_type: "manual".into(),
        active: true,
        doc,
        created_at: now,
        created_by: "rita".into(),
    };
    store.insert_template(&tpl, &audit).await.expect("template");
}

/// Play the relay and the step pools: run the queued step commands on `pool`, return the
/// decision commands queued meanwhile, and forget everything taken.
async fn drain(pool: &Engine) -> Vec<DecisionCommand> {
    let store = pool.store();
    let rows = store.fetch_outbox(0).await.expect("outbox");
    let mut decisions = Vec::new();
    for row in &rows {
        if row.topic == DECISION_TOPIC {
            decisions.push(DecisionCommand::decode(&row.payload).expect("decision command"));
        } else if row.topic.starts_with("workflow.steps.") {
            if let StepMessage::Execute(cmd) = StepMessage::decode(&row.payload).expect("step") {
                pool.execute_step(&cmd).await.expect("execute step");
            }
        }
    }
    let ids: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
    store.delete_outbox(&ids).await.expect("delete outbox");
    decisions
}

/// The decision command the call `waiting` queued, taken as the relay would hand it to the
/// pool.
async fn queued<T>(pool: &Engine, waiting: &tokio::task::JoinHandle<T>) -> DecisionCommand {
    loop {
        if let Some(cmd) = drain(pool).await.pop() {
            return cmd;
        }
        assert!(!waiting.is_finished(), "the call returned before queueing");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The CFO approving step 0 of `id` through `api`, in a task of its own.
fn cfo_approves(
    api: &Engine,
    id: &str,
) -> tokio::task::JoinHandle<Result<DecisionResult, workflow_engine::EngineError>> {
    let (api, id) = (api.clone(), id.to_string());
    tokio::spawn(async move {
        api.submit_decision("p", &id, 0, &cfo(), Verdict::Approve, None, PATIENCE)
            .await
    })
}

async fn listening_backends(store: &Store) -> i64 {
    sqlx::query(
        "SELECT count(*) AS n FROM pg_stat_activity \
         WHERE datname = current_database() AND query LIKE 'LISTEN %'",
    )
    .fetch_one(store.pool())
    .await
    .expect("pg_stat_activity")
    .try_get("n")
    .expect("count")
}

/// Two engines on one fresh database, seeded: the api's and the approval pool's, each with the
/// transition hints its distributed process keeps.
async fn engines() -> (String, Engine, Engine) {
    let url = workflow_testkit::postgres_url()
        .await
        .expect("PostgreSQL for tests");
    // Separate stores, separate engines, as in separate processes.
    let api = Engine::new(store(&url).await, Limits::default(), Arc::new(SystemClock))
        .with_transition_hints();
    let pool = Engine::new(store(&url).await, Limits::default(), Arc::new(SystemClock))
        .with_transition_hints();
    seed(api.store()).await;
    (url, api, pool)
}

fn cfo() -> Decider {
    Decider {
        actor: actor("carol"),
        roles: vec!["cfo".into()],
    }
}

/// Start an instance of `t` for 5,000 (over the approval threshold); its id.
async fn start(api: &Engine, transfer: &str) -> String {
    let started = api
        .start_instance(
            "p",
            &actor("rita"),
            "t",
            json!({"id": transfer, "amount": 5000}),
            None,
            Default::default(),
        )
        .await
        .expect("start");
    started.instance.info.id
}

/// Start an instance, let the pool bring it to its approval, approve it through `api` and
/// have `pool` apply the decision while the call waits. How long after the outcome was
/// recorded the call returned.
async fn approve_one(api: &Engine, pool: &Engine, round: usize) -> Duration {
    let cfo = cfo();
    let id = start(api, &format!("tr_{round}")).await;
    assert!(drain(pool).await.is_empty());

    let waiting = {
        let (api, id) = (api.clone(), id.clone());
        tokio::spawn(async move {
            let result = api
                .submit_decision("p", &id, 0, &cfo, Verdict::Approve, None, PATIENCE)
                .await;
            (result, Instant::now())
        })
    };
    let cmd = queued(pool, &waiting).await;
    // Let the call settle into its wait.
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert!(
        !waiting.is_finished(),
        "answered before the outcome existed"
    );

    pool.apply_decision(&cmd).await.expect("apply");
    let recorded = Instant::now();
    let (result, returned) = waiting.await.expect("waiting call");
    match result.expect("submit_decision") {
        DecisionResult::Accepted(rec) => {
            assert_eq!(rec.info.id, id);
            assert_eq!(rec.state.status, InstanceStatus::Completed);
        }
        other => panic!("round {round}: expected accepted, got {other:?}"),
    }
    returned.saturating_duration_since(recorded)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_approval_wakes_on_another_process_outcome() {
    let (url, api, pool) = engines().await;
    let token = CancellationToken::new();
    let listener = tokio::spawn(payos_workflows::distributed::run_decision_listener(
        api.clone(),
        url.clone(),
        token.clone(),
    ));
    let deadline = Instant::now() + PATIENCE;
    while !api.decisions_signalled() {
        assert!(Instant::now() < deadline, "the listener did not connect");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(listening_backends(api.store()).await, 1);

    // Several rounds: with only the 250 ms safety poll, a round could return in time by luck.
    for round in 0..3 {
        let took = approve_one(&api, &pool, round).await;
        assert!(
            took < PROMPT,
            "round {round}: the call returned {took:?} after the outcome was recorded"
        );
    }

    // A decision the pool refuses (the instance was cancelled while it was queued): the
    // signal says refused, and the call answers with the outcome's code, read back.
    let id = start(&api, "tr_refused").await;
    assert!(drain(&pool).await.is_empty());
    let waiting = cfo_approves(&api, &id);
    let cmd = queued(&pool, &waiting).await;
    api.cancel("p", &id, &actor("rita"), None)
        .await
        .expect("cancel");
    pool.apply_decision(&cmd).await.expect("apply");
    match waiting
        .await
        .expect("waiting call")
        .expect("submit_decision")
    {
        DecisionResult::Refused { code, .. } => assert!(!code.is_empty(), "a code"),
        other => panic!("expected refused, got {other:?}"),
    }

    token.cancel();
    listener.await.expect("listener task").expect("listener");
    assert!(!api.decisions_signalled());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_signal_the_waiting_call_still_finds_the_outcome() {
    let (_url, api, pool) = engines().await;
    // No listener: the call polls every 20 ms.
    let took = approve_one(&api, &pool, 0).await;
    assert!(took < PROMPT, "without a listener: {took:?}");
    // "Listening", but the notification never comes (lost while reconnecting): the safety
    // poll finds the outcome.
    api.set_decisions_signalled(true);
    let took = approve_one(&api, &pool, 1).await;
    assert!(took < PATIENCE, "with a lost notification: {took:?}");
}

/// The pool's hint for an instance (the record it committed last) goes stale when another
/// process changes the instance: here the api cancels it while a decision is queued. Applying
/// the decision from the stale hint is refused by the commit's version check; the pool then
/// reads the store and refuses the decision as the stored (cancelled) state does. Nothing is
/// written from the stale record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_transition_hint_loses_to_the_stored_state() {
    let (_url, api, pool) = engines().await;
    let cfo = cfo();
    let id = start(&api, "tr_stale").await;
    // The pool starts the approval (and keeps the record it committed).
    assert!(drain(&pool).await.is_empty());
    // Queued while the step waits; nobody applies it yet.
    let queued = api
        .submit_decision("p", &id, 0, &cfo, Verdict::Approve, None, Duration::ZERO)
        .await
        .expect("submit");
    assert!(
        matches!(queued, DecisionResult::Pending { .. }),
        "{queued:?}"
    );
    let cancelled = api
        .cancel("p", &id, &actor("rita"), Some("changed my mind".into()))
        .await
        .expect("cancel");
    assert_eq!(cancelled.state.status, InstanceStatus::Cancelled);

    let cmd = drain(&pool).await.pop().expect("the queued decision");
    pool.apply_decision(&cmd).await.expect("apply");
    let stored = api
        .store()
        .get_instance("p", &id)
        .await
        .expect("read")
        .expect("instance");
    assert_eq!(stored.state.status, InstanceStatus::Cancelled);
    assert_eq!(
        stored.version, cancelled.version,
        "nothing written after the cancel"
    );
    let outcome = api
        .store()
        .get_decision_outcome("p", &cmd.decision_id)
        .await
        .expect("outcome read")
        .expect("an outcome");
    assert!(
        !outcome.accepted,
        "refused as the stored state refuses: {outcome:?}"
    );
}

/// The api checks a decision against its hint of the instance (the record it created or last
/// read): a refusal by the hint reads the store first (the create's hint still shows the step
/// pending), and a hint gone stale (another process cancelled the instance) lets the decision
/// through to the approval pool, which refuses it as the stored state does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_checks_decisions_against_its_hints_and_the_pool_has_the_last_word() {
    let (_url, api, pool) = engines().await;
    let id = start(&api, "tr_hint").await;
    // The pool starts the approval: the api's hint (its create) still shows it pending.
    assert!(drain(&pool).await.is_empty());
    // Refused by the hint, then by the store (it waits, but not for an intern); the api now
    // holds the waiting record.
    let intern = Decider {
        actor: actor("ivan"),
        roles: vec!["intern".into()],
    };
    let refused = api
        .submit_decision("p", &id, 0, &intern, Verdict::Approve, None, PATIENCE)
        .await;
    assert!(
        matches!(&refused, Err(e) if e.to_string().contains("not an eligible")),
        "{refused:?}"
    );
    // Another process cancels it; the api's hint still shows the step waiting.
    pool.cancel("p", &id, &actor("rita"), None)
        .await
        .expect("cancel");
    // Not answered from the hint: queued for the pool.
    let waiting = cfo_approves(&api, &id);
    let cmd = queued(&pool, &waiting).await;
    pool.apply_decision(&cmd).await.expect("apply");
    match waiting
        .await
        .expect("waiting call")
        .expect("submit_decision")
    {
        DecisionResult::Refused { code, .. } => assert!(!code.is_empty()),
        other => panic!("a cancelled instance accepted a decision: {other:?}"),
    }
    let stored = api
        .store()
        .get_instance("p", &id)
        .await
        .expect("read")
        .expect("instance");
    assert_eq!(stored.state.status, InstanceStatus::Cancelled);
}

/// The distributed api publishes a decision straight onto Kafka (`Engine::with_command_bus`):
/// if no broker takes it, the call fails with a retryable error (the API answers 503) and
/// leaves nothing behind: no outbox row to be relayed later, no outcome, the step still
/// waiting for a decision that may be submitted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_no_broker_takes_is_refused_retryably_and_leaves_nothing() {
    let (_url, api, pool) = engines().await;
    let id = start(&api, "tr_no_broker").await;
    assert!(drain(&pool).await.is_empty());
    // A real Kafka client whose bootstrap address has no broker behind it.
    let mut config = workflow_bus_kafka::KafkaConfig::new("127.0.0.1:9");
    config.timeout = Duration::from_millis(500);
    let bus = workflow_bus_kafka::KafkaBus::new(config).expect("kafka client");
    let api = api.with_command_bus(Arc::new(bus));

    let refused = api
        .submit_decision("p", &id, 0, &cfo(), Verdict::Approve, None, PATIENCE)
        .await
        .expect_err("no broker took the decision");
    assert!(
        matches!(refused, workflow_engine::EngineError::Bus(_)),
        "{refused:?}"
    );
    assert!(refused.is_retryable(), "{refused:?}");

    let store = pool.store();
    assert!(store.fetch_outbox(0).await.expect("outbox").is_empty());
    let outcomes: i64 =
        sqlx::query("SELECT count(*) AS n FROM approval_decisions WHERE instance_id = $1")
            .bind(id.as_str())
            .fetch_one(store.pool())
            .await
            .expect("outcomes")
            .get("n");
    assert_eq!(outcomes, 0);
    let rec = store
        .get_instance("p", &id)
        .await
        .expect("read")
        .expect("instance");
    assert_eq!(rec.state.status, InstanceStatus::Waiting);
}
