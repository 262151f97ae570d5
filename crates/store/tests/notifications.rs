//! Notification deliveries and webhook secrets in the store, on SQLite and PostgreSQL: written
//! with the instance change or not at all, claimed by one worker, logged per attempt, re-queued
//! when due, redelivered, and isolated per partner.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::json;
use workflow_core::{InstanceStatus, Timestamp};
use workflow_store::*;

mod common;

use common::TestResult;

crate::both_backends!(
    a_create_writes_its_timers_and_deliveries_or_nothing,
    deliveries_commit_with_the_instance_or_not_at_all,
    a_delivery_is_claimed_once_and_every_attempt_is_logged,
    due_deliveries_are_requeued_with_their_message,
    redeliver_starts_a_new_round_of_a_finished_delivery,
    webhook_secrets_are_created_once_and_rotate_with_a_grace_period,
);

fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// A partner with one waiting instance; returns the instance.
async fn instance(store: &Store, partner: &str) -> InstanceRecord {
    let _ = store
        .create_partner(&PartnerRecord {
            id: partner.into(),
            name: partner.into(),
            created_at: Timestamp(1),
        })
        .await;
    let mut rec = workflow_store::fixtures::instance();
    rec.info.partner_id = partner.into();
    let created = store.create_instance(&rec, &[], &[]).await.unwrap();
    assert!(created.is_created());
    rec
}

fn delivery(rec: &InstanceRecord, id: &str, wait: bool) -> NewDelivery {
    NewDelivery {
        id: id.into(),
        partner_id: rec.info.partner_id.clone(),
        instance_id: rec.info.id.clone(),
        step_index: 0,
        purpose: "step".into(),
        channel: "webhook".into(),
        target: "http://127.0.0.1:9/hook".into(),
        request: json!({"url": "http://127.0.0.1:9/hook", "body": "{\"a\":1}"}),
        wait,
        created_at: Timestamp(20),
        check_at: Timestamp(20 + 60_000),
    }
}

fn outbox(id: &str) -> OutboxMessage {
    OutboxMessage {
        id: format!("{id}:{}", new_id()),
        topic: "workflow.notifications.deliveries".into(),
        key: "k".into(),
        payload: id.as_bytes().to_vec(),
    }
}

fn attempt(succeeded: bool, status: i64) -> DeliveryAttemptRecord {
    DeliveryAttemptRecord {
        delivery_id: String::new(),
        seq: 0,
        attempted_at: Timestamp(30),
        status_code: Some(status),
        latency_ms: 12,
        response_snippet: "ok".into(),
        error: (!succeeded).then(|| format!("receiver answered http status {status}")),
        succeeded,
    }
}

async fn commit(
    store: &Store,
    rec: &InstanceRecord,
    expected: i64,
    d: &[NewDelivery],
) -> Result<(), StoreError> {
    let mut next = rec.clone();
    next.state.status = InstanceStatus::Waiting;
    let messages: Vec<OutboxMessage> = d.iter().map(|d| outbox(&d.id)).collect();
    store
        .commit_instance_with_deliveries(&next, expected, &messages, &[], &[], d)
        .await
}

/// A create whose first steps ran inline (an approval with a deadline and notices) writes
/// their timer, delivery and message with the instance; a create answered by an existing
/// instance (its idempotency key taken) writes none of them.
async fn a_create_writes_its_timers_and_deliveries_or_nothing(store: Store) -> TestResult {
    let template = instance(&store, "acme").await;
    let fresh = |key: &str| {
        let mut rec = template.clone();
        rec.info.id = new_id();
        rec.idempotency_key = Some(key.to_string());
        rec
    };
    let timer = |rec: &InstanceRecord| TimerRecord {
        id: format!("{}:1:approval_timeout:0", rec.info.id),
        partner_id: "acme".into(),
        instance_id: rec.info.id.clone(),
        step_index: 1,
        step_type: "approval".into(),
        kind: "approval_timeout".into(),
        due_at: Timestamp(50_000),
    };
    let first = fresh("order-1");
    let d = delivery(&first, "dlv_create", false);
    let created = store
        .create_instance_with(&first, &[outbox(&d.id)], &[], &[timer(&first)], &[d])
        .await?;
    assert!(created.is_created());
    assert!(store.get_delivery("acme", "dlv_create").await?.is_some());
    assert_eq!(store.list_timers("acme", &first.info.id).await?.len(), 1);
    assert_eq!(store.next_timer_due().await?, Some(Timestamp(50_000)));
    assert_eq!(store.fetch_outbox(0).await?.len(), 1);

    // The same key again: the first instance answers, and nothing of this one is written.
    let again = fresh("order-1");
    let d = delivery(&again, "dlv_again", false);
    let outcome = store
        .create_instance_with(&again, &[outbox(&d.id)], &[], &[timer(&again)], &[d])
        .await?;
    assert!(!outcome.is_created());
    assert!(store.get_delivery("acme", "dlv_again").await?.is_none());
    assert!(store.list_timers("acme", &again.info.id).await?.is_empty());
    assert_eq!(store.fetch_outbox(0).await?.len(), 1);
    Ok(())
}

async fn deliveries_commit_with_the_instance_or_not_at_all(store: Store) -> TestResult {
    let rec = instance(&store, "acme").await;
    // A lost optimistic-concurrency race writes no delivery.
    let lost = commit(&store, &rec, 7, &[delivery(&rec, "dlv_lost", false)]).await;
    assert!(matches!(lost, Err(StoreError::Conflict { .. })), "{lost:?}");
    assert!(store.get_delivery("acme", "dlv_lost").await?.is_none());
    assert!(store.fetch_outbox(0).await?.is_empty());

    commit(&store, &rec, 1, &[delivery(&rec, "dlv_a", true)]).await?;
    let d = store.get_delivery("acme", "dlv_a").await?.expect("stored");
    assert_eq!(
        (d.status, d.attempts, d.wait),
        (DeliveryStatus::Queued, 0, true)
    );
    assert_eq!(d.request["body"], "{\"a\":1}");
    assert_eq!(
        store.fetch_outbox(0).await?.len(),
        1,
        "its message, same transaction"
    );
    assert_eq!(store.list_deliveries("acme", &rec.info.id).await?.len(), 1);
    // Another partner sees nothing of it.
    assert!(store.get_delivery("globex", "dlv_a").await?.is_none());
    assert!(store
        .list_deliveries("globex", &rec.info.id)
        .await?
        .is_empty());
    Ok(())
}

async fn a_delivery_is_claimed_once_and_every_attempt_is_logged(store: Store) -> TestResult {
    let rec = instance(&store, "acme").await;
    commit(&store, &rec, 1, &[delivery(&rec, "dlv_b", true)]).await?;
    let (now, lease) = (Timestamp(100), Timestamp(100 + 120_000));
    let claimed = store.claim_delivery("acme", "dlv_b", now, lease).await?;
    assert_eq!(claimed.map(|d| d.status), Some(DeliveryStatus::Sending));
    assert!(
        store
            .claim_delivery("acme", "dlv_b", now, lease)
            .await?
            .is_none(),
        "claimed once"
    );
    assert!(store
        .claim_delivery("globex", "dlv_b", now, lease)
        .await?
        .is_none());

    let retry_at = Timestamp(5_100);
    let d = store
        .record_delivery_attempt(
            "acme",
            "dlv_b",
            &attempt(false, 500),
            AttemptVerdict::RetryAt(retry_at),
            now,
            None,
        )
        .await?
        .expect("recorded");
    assert_eq!(
        (d.status, d.attempts, d.round_failures, d.next_check_at),
        (DeliveryStatus::Retrying, 1, 1, Some(retry_at))
    );
    // Not sending any more: a second report writes nothing.
    assert!(store
        .record_delivery_attempt(
            "acme",
            "dlv_b",
            &attempt(true, 200),
            AttemptVerdict::Delivered,
            now,
            None
        )
        .await?
        .is_none());

    let requeued = store
        .requeue_due_deliveries(retry_at, Timestamp(retry_at.0 + 120_000), 10, |d| {
            Ok(outbox(&d.id))
        })
        .await?;
    assert_eq!(requeued.len(), 1);
    store
        .claim_delivery("acme", "dlv_b", retry_at, Timestamp(retry_at.0 + 1))
        .await?
        .expect("claimed again");
    let settle = Timestamp(retry_at.0 + 60_000);
    let d = store
        .record_delivery_attempt(
            "acme",
            "dlv_b",
            &attempt(true, 204),
            AttemptVerdict::Delivered,
            retry_at,
            Some(settle),
        )
        .await?
        .expect("recorded");
    assert_eq!(
        (d.status, d.attempts, d.next_check_at),
        (DeliveryStatus::Delivered, 2, Some(settle))
    );
    assert_eq!(d.delivered_at, Some(retry_at));
    store.mark_delivery_settled("acme", "dlv_b").await?;
    assert_eq!(
        store
            .get_delivery("acme", "dlv_b")
            .await?
            .and_then(|d| d.next_check_at),
        None
    );

    let log = store.list_delivery_attempts("acme", "dlv_b").await?;
    assert_eq!(
        log.iter()
            .map(|a| (a.seq, a.status_code, a.succeeded))
            .collect::<Vec<_>>(),
        vec![(1, Some(500), false), (2, Some(204), true)]
    );
    assert_eq!(log[0].latency_ms, 12);
    assert!(store
        .list_delivery_attempts("globex", "dlv_b")
        .await?
        .is_empty());
    Ok(())
}

async fn due_deliveries_are_requeued_with_their_message(store: Store) -> TestResult {
    let rec = instance(&store, "acme").await;
    commit(&store, &rec, 1, &[delivery(&rec, "dlv_c", false)]).await?;
    let before = store.fetch_outbox(0).await?;
    store
        .delete_outbox(&before.iter().map(|m| m.id.clone()).collect::<Vec<_>>())
        .await?;
    // Nothing due before the lease (the message may still be on its way).
    assert!(store
        .requeue_due_deliveries(Timestamp(30), Timestamp(99), 10, |d| Ok(outbox(&d.id)))
        .await?
        .is_empty());
    // The lease passed unclaimed (a lost message): queued again, once, with a new message.
    let at = Timestamp(20 + 60_000);
    let again = store
        .requeue_due_deliveries(at, Timestamp(at.0 + 60_000), 10, |d| Ok(outbox(&d.id)))
        .await?;
    assert_eq!(
        again.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
        vec!["dlv_c"]
    );
    assert_eq!(store.fetch_outbox(0).await?.len(), 1);
    assert!(store
        .requeue_due_deliveries(at, Timestamp(at.0 + 60_000), 10, |d| Ok(outbox(&d.id)))
        .await?
        .is_empty());
    Ok(())
}

async fn redeliver_starts_a_new_round_of_a_finished_delivery(store: Store) -> TestResult {
    let rec = instance(&store, "acme").await;
    commit(&store, &rec, 1, &[delivery(&rec, "dlv_d", false)]).await?;
    let lease = Timestamp(1_000_000);
    let in_progress = store
        .redeliver("acme", "dlv_d", Timestamp(40), lease, |d| Ok(outbox(&d.id)))
        .await?;
    assert!(matches!(in_progress, RedeliverOutcome::InProgress(_)));
    store
        .claim_delivery("acme", "dlv_d", Timestamp(41), lease)
        .await?
        .expect("claim");
    store
        .record_delivery_attempt(
            "acme",
            "dlv_d",
            &attempt(false, 410),
            AttemptVerdict::DeadLettered,
            Timestamp(42),
            None,
        )
        .await?
        .expect("recorded");
    let missing = store
        .redeliver("globex", "dlv_d", Timestamp(43), lease, |d| {
            Ok(outbox(&d.id))
        })
        .await;
    assert!(
        matches!(missing, Err(StoreError::NotFound { .. })),
        "{missing:?}"
    );
    let outbox_before = store.fetch_outbox(0).await?.len();
    let RedeliverOutcome::Queued(d) = store
        .redeliver("acme", "dlv_d", Timestamp(43), lease, |d| Ok(outbox(&d.id)))
        .await?
    else {
        panic!("queued again")
    };
    assert_eq!(
        (d.status, d.round_failures, d.attempts),
        (DeliveryStatus::Queued, 0, 1)
    );
    assert_eq!(store.fetch_outbox(0).await?.len(), outbox_before + 1);
    Ok(())
}

async fn webhook_secrets_are_created_once_and_rotate_with_a_grace_period(
    store: Store,
) -> TestResult {
    let first = store
        .webhook_secret("acme", || "whsec_one".into(), Timestamp(1))
        .await?;
    assert_eq!(first.secret, "whsec_one");
    let again = store
        .webhook_secret("acme", || "whsec_other".into(), Timestamp(2))
        .await?;
    assert_eq!(again.secret, "whsec_one", "created on first use only");
    assert!(!format!("{again:?}").contains("whsec_one"), "Debug redacts");
    assert_eq!(
        again.signing_secrets(Timestamp(2)),
        vec!["whsec_one".to_string()]
    );

    let rotated = store
        .rotate_webhook_secret("acme", "whsec_two".into(), Timestamp(10), Timestamp(100))
        .await?;
    assert_eq!(
        (rotated.secret.as_str(), rotated.previous_secret.as_deref()),
        ("whsec_two", Some("whsec_one"))
    );
    assert_eq!(
        rotated.signing_secrets(Timestamp(99)),
        vec!["whsec_two".to_string(), "whsec_one".to_string()]
    );
    assert_eq!(
        rotated.signing_secrets(Timestamp(100)),
        vec!["whsec_two".to_string()]
    );
    // Partners do not share secrets; rotating a partner without one creates it.
    let other = store
        .rotate_webhook_secret("globex", "whsec_g".into(), Timestamp(10), Timestamp(100))
        .await?;
    assert_eq!(
        (other.secret.as_str(), other.previous_secret),
        ("whsec_g", None)
    );
    assert_eq!(
        store
            .webhook_secret("acme", || "x".into(), Timestamp(11))
            .await?
            .secret,
        "whsec_two"
    );
    Ok(())
}
