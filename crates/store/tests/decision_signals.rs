//! Decision outcomes announced over PostgreSQL `LISTEN/NOTIFY`: an outcome recorded through the
//! store reaches a [`DecisionListener`] with its decision id, only once committed (a duplicate,
//! a failed insert or a rolled-back one announces nothing), and the listener reconnects after
//! losing its connection. PostgreSQL only: SQLite has no notifications.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use sqlx::Row;
use workflow_core::Timestamp;
use workflow_store::*;

mod common;

use common::TestResult;

/// How long a signal may take: generous, the machine is shared.
const PATIENCE: Duration = Duration::from_secs(10);

fn outcome(id: &str) -> DecisionOutcome {
    DecisionOutcome {
        decision_id: id.into(),
        partner_id: "p1".into(),
        instance_id: "i1".into(),
        step_index: 1,
        accepted: true,
        code: None,
        message: None,
        decided_at: Timestamp(7),
    }
}

/// The signal of an outcome recorded for decision `id`.
fn decided(id: &str, accepted: bool) -> DecisionSignal {
    DecisionSignal::Decided {
        decision_id: id.into(),
        accepted: Some(accepted),
    }
}

async fn next(listener: &mut DecisionListener) -> DecisionSignal {
    tokio::time::timeout(PATIENCE, listener.next())
        .await
        .expect("no decision signal in time")
}

async fn connected(url: &str) -> Result<DecisionListener, StoreError> {
    let mut listener = DecisionListener::new(url)?;
    assert_eq!(next(&mut listener).await, DecisionSignal::Connected);
    assert!(listener.is_connected());
    Ok(listener)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_outcome_reaches_the_listener() -> TestResult {
    let db = common::postgres_db().await?;
    let mut listener = connected(&db.url).await?;
    db.store.record_decision_outcome(&outcome("d1")).await?;
    assert_eq!(next(&mut listener).await, decided("d1", true));
    // Recorded as before: the announcement changes nothing about the row.
    assert_eq!(
        db.store.get_decision_outcome("p1", "d1").await?,
        Some(outcome("d1"))
    );
    // A refusal says so: its waiter reads the outcome for the code and message.
    let mut refused = outcome("d2");
    refused.accepted = false;
    refused.code = Some("not_eligible".into());
    db.store.record_decision_outcome(&refused).await?;
    assert_eq!(next(&mut listener).await, decided("d2", false));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_committed_new_outcomes_are_announced() -> TestResult {
    let db = common::postgres_db().await?;
    let store = &db.store;
    // Fails the transaction of decision `doomed` at commit, after its statement (and the
    // `pg_notify` in it) ran: the insert is rolled back.
    sqlx::raw_sql(
        "CREATE FUNCTION doom() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF NEW.decision_id = 'doomed' THEN RAISE EXCEPTION 'doomed'; END IF; \
         RETURN NULL; END $$; \
         CREATE CONSTRAINT TRIGGER doom AFTER INSERT ON approval_decisions \
         DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION doom();",
    )
    .execute(store.pool())
    .await?;
    let mut listener = connected(&db.url).await?;

    store.record_decision_outcome(&outcome("d1")).await?;
    assert_eq!(next(&mut listener).await, decided("d1", true));

    // A redelivered command: nothing new is recorded, nothing is announced.
    let mut again = outcome("d1");
    again.accepted = false;
    store.record_decision_outcome(&again).await?;
    // A failed insert (PostgreSQL refuses NUL in text).
    let mut bad = outcome("bad");
    bad.message = Some("nul \0 byte".into());
    assert!(store.record_decision_outcome(&bad).await.is_err());
    // An insert rolled back at commit.
    assert!(store
        .record_decision_outcome(&outcome("doomed"))
        .await
        .is_err());
    assert_eq!(store.get_decision_outcome("p1", "doomed").await?, None);

    // Notifications arrive in commit order: had any of the above announced something, it
    // would come before this one.
    store.record_decision_outcome(&outcome("d2")).await?;
    assert_eq!(next(&mut listener).await, decided("d2", true));
    let quiet = tokio::time::timeout(Duration::from_millis(200), listener.next()).await;
    assert!(quiet.is_err(), "unexpected signal: {quiet:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_reconnects_after_losing_its_connection() -> TestResult {
    let db = common::postgres_db().await?;
    let mut listener = connected(&db.url).await?;
    // Kill the listener's backend, as a restart or a connection reaper would.
    let killed: i64 = sqlx::query(
        "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity \
         WHERE datname = current_database() AND query LIKE 'LISTEN %'",
    )
    .fetch_one(db.store.pool())
    .await?
    .try_get("n")?;
    assert_eq!(killed, 1);
    assert_eq!(next(&mut listener).await, DecisionSignal::Disconnected);
    assert!(!listener.is_connected());
    assert_eq!(next(&mut listener).await, DecisionSignal::Connected);

    db.store.record_decision_outcome(&outcome("d3")).await?;
    assert_eq!(next(&mut listener).await, decided("d3", true));
    Ok(())
}

#[tokio::test]
async fn only_postgres_urls_can_be_listened_to() {
    assert!(DecisionListener::new("sqlite::memory:").is_err());
    assert!(DecisionListener::new("mysql://u@h/db").is_err());
    assert!(DecisionListener::new("postgres://u@h/db").is_ok());
}
