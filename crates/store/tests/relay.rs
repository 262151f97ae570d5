//! The relay's side of the store: the sweep's passes and the event lane's passes take disjoint
//! rows, each in commit order, and on PostgreSQL one session at a time leads the event lane.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use serde_json::json;
use workflow_store::*;

mod common;

use common::TestResult;

crate::both_backends!(the_sweep_and_the_event_lane_take_disjoint_rows_in_order);

const LIFECYCLE: &str = "workflow.lifecycle";
const LANE: &[&str] = &[LIFECYCLE];

fn message(key: &str, topic: &str, n: usize) -> OutboxMessage {
    OutboxMessage {
        id: uuid::Uuid::now_v7().to_string(),
        topic: topic.into(),
        key: key.into(),
        payload: format!("{topic} {n}").into_bytes(),
    }
}

fn instance() -> InstanceRecord {
    let mut rec = workflow_store::fixtures::instance();
    rec.info.trigger = json!({"amount": 1}).into();
    rec.state.current_step = Some(0);
    rec
}

#[derive(Debug)]
enum PublishError {
    BusDown,
    Store,
}

impl From<StoreError> for PublishError {
    fn from(_: StoreError) -> PublishError {
        PublishError::Store
    }
}

/// Publishes everything it is handed, remembering what and in which order.
fn record(
    into: &mut Vec<String>,
) -> impl FnOnce(Vec<OutboxMessage>) -> std::future::Ready<Result<Vec<String>, StoreError>> + '_ {
    move |rows| {
        into.extend(
            rows.iter()
                .map(|r| String::from_utf8_lossy(&r.payload).into_owned()),
        );
        std::future::ready(Ok(rows.into_iter().map(|r| r.id).collect()))
    }
}

async fn the_sweep_and_the_event_lane_take_disjoint_rows_in_order(store: Store) -> TestResult {
    let rec = instance();
    let key = rec.info.id.clone();
    // Commands and events interleaved, as a transition writes them.
    let rows: Vec<OutboxMessage> = (0..6)
        .map(|n| {
            let topic = if n % 2 == 0 {
                "workflow.steps.action"
            } else {
                "workflow.lifecycle"
            };
            message(&key, topic, n)
        })
        .collect();
    store.create_instance(&rec, &rows, &[]).await?;

    let mut swept = Vec::new();
    let pass = store.relay_pass(LANE, 100, record(&mut swept)).await?;
    assert_eq!(pass, RelayPass::Published(3));
    assert_eq!(
        swept,
        [
            "workflow.steps.action 0",
            "workflow.steps.action 2",
            "workflow.steps.action 4"
        ]
    );

    let mut leader = store
        .lead_event_lane()
        .await?
        .expect("nobody else leads the lane");
    let mut events = Vec::new();
    // Two at a time: the oldest first, then the next.
    let first = store
        .event_pass(&mut leader, LIFECYCLE, 2, record(&mut events))
        .await?;
    let second = store
        .event_pass(&mut leader, LIFECYCLE, 2, record(&mut events))
        .await?;
    assert_eq!((first, second), (2, 1));
    assert_eq!(
        events,
        [
            "workflow.lifecycle 1",
            "workflow.lifecycle 3",
            "workflow.lifecycle 5"
        ]
    );
    assert!(store.fetch_outbox(0).await?.is_empty(), "all deleted");

    // A publish that fails deletes nothing: the rows are there for the next pass.
    let mut next = rec.clone();
    next.version = 2;
    store
        .commit_instance(&next, 1, &[message(&key, "workflow.lifecycle", 6)], &[])
        .await?;
    let failed = store
        .event_pass(&mut leader, LIFECYCLE, 10, |_rows| async {
            Err::<Vec<String>, _>(PublishError::BusDown)
        })
        .await;
    assert!(matches!(failed, Err(PublishError::BusDown)));
    assert_eq!(store.fetch_outbox(0).await?.len(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_postgres_session_leads_the_event_lane_until_it_ends() -> TestResult {
    let db = common::postgres_db().await?;
    let other = Store::connect(&db.url).await?;
    let leader = db.store.lead_event_lane().await?;
    assert!(leader.is_some(), "the first to ask leads");
    assert!(
        other.lead_event_lane().await?.is_none(),
        "a second process does not"
    );
    assert!(
        db.store.lead_event_lane().await?.is_none(),
        "nor a second session of the leader's process"
    );
    // The leader's session ends (its process died): the lead moves.
    drop(leader);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if other.lead_event_lane().await?.is_some() {
            return Ok(());
        }
        assert!(Instant::now() < deadline, "the lead never moved");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
