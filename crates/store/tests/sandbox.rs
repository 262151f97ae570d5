//! The PayOS sandbox's ledger in the store, on SQLite and PostgreSQL: one recorded call per
//! idempotency key (also when calls race), kept across a re-opened store, listed in order.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::json;
use workflow_core::Timestamp;
use workflow_store::*;

mod common;

use common::TestResult;

crate::both_backends!(
url;
    a_key_records_once_and_survives_reopening,
    racing_calls_with_one_key_record_once,
    calls_are_listed_in_order_and_per_transfer,
);

fn call(key: &str, action: &str, transfer: &str, at: i64) -> SandboxTransferRecord {
    SandboxTransferRecord {
        idempotency_key: key.into(),
        action: action.into(),
        transfer_id: transfer.into(),
        request: json!({"amount": 12.5, "note": "ü"}),
        fingerprint: format!("fp-{key}"),
        status: 200,
        response: json!({"id": format!("sbx_{key}"), "status": "executed", "sandbox": true}),
        recorded_at: Timestamp(at),
    }
}

async fn a_key_records_once_and_survives_reopening(store: Store, url: &str) -> TestResult {
    assert_eq!(store.find_sandbox_transfer("wf_a").await?, None);
    let first = call("wf_a", "execute_transfer", "tr_1", 1_000);
    assert_eq!(
        store.record_sandbox_transfer(&first).await?,
        SandboxRecordOutcome::Inserted(first.clone())
    );
    // The same key again, even with another answer: the first one holds it.
    let mut again = call("wf_a", "execute_transfer", "tr_1", 2_000);
    again.response = json!({"id": "sbx_other"});
    assert_eq!(
        store.record_sandbox_transfer(&again).await?,
        SandboxRecordOutcome::Existing(first.clone())
    );
    assert_eq!(store.list_sandbox_transfers().await?, vec![first.clone()]);

    // A new process: the record is still there, and still holds the key.
    store.close().await;
    let reopened = Store::connect(url).await?;
    reopened.migrate().await?;
    assert_eq!(
        reopened.find_sandbox_transfer("wf_a").await?,
        Some(first.clone())
    );
    assert_eq!(
        reopened.record_sandbox_transfer(&again).await?,
        SandboxRecordOutcome::Existing(first.clone())
    );
    assert_eq!(reopened.list_sandbox_transfers_for("tr_1").await?.len(), 1);
    Ok(())
}

async fn racing_calls_with_one_key_record_once(store: Store, _url: &str) -> TestResult {
    let mut tasks = Vec::new();
    for i in 0..16 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = call("wf_race", "execute_transfer", "tr_race", 1_000 + i);
            c.response = json!({"id": format!("sbx_{i}")});
            store.record_sandbox_transfer(&c).await
        }));
    }
    let mut inserted = Vec::new();
    let mut existing = Vec::new();
    for t in tasks {
        match t.await?? {
            SandboxRecordOutcome::Inserted(c) => inserted.push(c),
            SandboxRecordOutcome::Existing(c) => existing.push(c),
        }
    }
    assert_eq!(inserted.len(), 1, "exactly one call records the key");
    assert_eq!(existing.len(), 15);
    // Every loser was handed the winner's record.
    assert!(existing.iter().all(|c| c == &inserted[0]));
    assert_eq!(store.list_sandbox_transfers_for("tr_race").await?, inserted);
    Ok(())
}

async fn calls_are_listed_in_order_and_per_transfer(store: Store, _url: &str) -> TestResult {
    let calls = [
        call("k1", "execute_transfer", "tr_b", 3_000),
        call("k2", "simulate_transfer", "tr_a", 1_000),
        call("k3", "cancel_transfer", "tr_a", 2_000),
    ];
    for c in &calls {
        assert!(matches!(
            store.record_sandbox_transfer(c).await?,
            SandboxRecordOutcome::Inserted(_)
        ));
    }
    // In recording order, not by time or key.
    assert_eq!(store.list_sandbox_transfers().await?, calls.to_vec());
    assert_eq!(
        store.list_sandbox_transfers_for("tr_a").await?,
        vec![calls[1].clone(), calls[2].clone()]
    );
    assert!(store
        .list_sandbox_transfers_for("tr_none")
        .await?
        .is_empty());
    Ok(())
}
