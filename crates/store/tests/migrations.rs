//! Migrations that move data: a store written by an earlier schema reads back the same after
//! migrating. Each test migrates a fresh database up to a version with the repository's own
//! migration files, writes rows the way that version's code did, then lets `Store::migrate`
//! apply the rest.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use serde_json::json;
use sqlx::migrate::Migrator;
use workflow_core::audit::{chain_hash, GENESIS};
use workflow_core::instance::{ActorRef, ActorType};
use workflow_core::Timestamp;
use workflow_store::*;

mod common;

use common::TestResult;

/// A store whose schema stops at migration `version`.
async fn store_at(
    url: &str,
    version: i64,
) -> Result<Store, Box<dyn std::error::Error + Send + Sync>> {
    let store = Store::connect(url).await?;
    let dir = match store.backend() {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    };
    let path = format!("{}/../../migrations/{dir}", env!("CARGO_MANIFEST_DIR"));
    let mut migrator = Migrator::new(Path::new(&path)).await?;
    migrator.migrations = migrator
        .migrations
        .iter()
        .filter(|m| m.version <= version)
        .cloned()
        .collect::<Vec<_>>()
        .into();
    migrator.run(store.pool()).await?;
    Ok(store)
}

/// The events of a template's stream, chained as the store chains them.
fn chained_events(stream: &str) -> Vec<AuditRecord> {
    let docs = [
        (
            "template.created",
            json!(null),
            json!({"name": "Procurement", "steps": [{"type": "approval", "amount": 1000.5}]}),
            Some("first \"draft\"\nfrom the builder: é ✓"),
        ),
        (
            "template.activated",
            json!({"active": false}),
            json!({"active": true}),
            None,
        ),
        (
            "template.version_added",
            json!({"version": 1}),
            json!({"version": 2, "nested": {"z": [1, 2, {"a": null}], "b": -0.25}}),
            Some("renamed"),
        ),
    ];
    let mut prev = GENESIS.to_string();
    let mut events = Vec::new();
    for (i, (kind, before, after, reason)) in docs.into_iter().enumerate() {
        let mut event = AuditRecord {
            partner_id: "p1".into(),
            stream: stream.into(),
            seq: i as i64 + 1,
            at: Timestamp(1_700_000_000_000 + i as i64),
            actor: ActorRef {
                id: "user-1".into(),
                actor_type: ActorType::Human,
            },
            kind: kind.into(),
            before,
            after,
            reason: reason.map(str::to_string),
            prev_hash: prev.clone(),
            hash: String::new(),
        };
        event.hash = chain_hash(&prev, &event.content());
        prev = event.hash.clone();
        events.push(event);
    }
    events
}

/// Migration 0011: the audit trail's rows (one per event) become blocks (one per commit and
/// stream). Every event reads back as it was, the chain verifies, and the next append chains
/// onto the migrated head.
async fn audit_events_move_into_blocks(url: &str) -> TestResult {
    let store = store_at(url, 10).await?;
    sqlx::query(
        "INSERT INTO workflow_template_heads (id, partner_id, latest_version, active, created_at) \
         VALUES ('t1', 'p1', 1, 1, 1000)",
    )
    .execute(store.pool())
    .await?;
    sqlx::query(
        "INSERT INTO workflow_templates (id, version, partner_id, name, trigger_type, doc, \
         created_at, created_by) VALUES ('t1', 1, 'p1', 'Procurement', 'manual', '{}', 1000, 'user-1')",
    )
    .execute(store.pool())
    .await?;
    let events = chained_events("template:t1");
    for e in &events {
        sqlx::query(
            "INSERT INTO audit_events (stream, seq, partner_id, at, actor, kind, before_doc, \
             after_doc, reason, prev_hash, hash) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(e.stream.as_str())
        .bind(e.seq)
        .bind(e.partner_id.as_str())
        .bind(e.at.0)
        .bind(serde_json::to_string(&e.actor)?)
        .bind(e.kind.as_str())
        .bind(serde_json::to_string(&e.before)?)
        .bind(serde_json::to_string(&e.after)?)
        .bind(e.reason.as_deref())
        .bind(e.prev_hash.as_str())
        .bind(e.hash.as_str())
        .execute(store.pool())
        .await?;
    }

    store.migrate().await?;
    let read = store.list_audit("p1", "template:t1").await?;
    assert_eq!(read, events);
    assert_eq!(verify_audit_chain(&read), Ok(3));
    assert!(store.list_audit("p2", "template:t1").await?.is_empty());

    store
        .add_template_version(
            "p1",
            "t1",
            "Procurement v2",
            "manual",
            &json!({"v": 2}),
            "user-1",
            Timestamp(1_700_000_001_000),
            &AuditDraft {
                stream: "template:t1".into(),
                at: Timestamp(1_700_000_001_000),
                actor: events[0].actor.clone(),
                kind: "template.version_added".into(),
                before: json!({"version": 1}),
                after: json!({"version": 2}),
                reason: None,
            },
        )
        .await?;
    let read = store.list_audit("p1", "template:t1").await?;
    assert_eq!(read.len(), 4);
    assert_eq!(read[3].seq, 4);
    assert_eq!(read[3].prev_hash, events[2].hash);
    assert_eq!(verify_audit_chain(&read), Ok(4));
    store.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_audit_events_move_into_blocks() -> TestResult {
    let (_dir, url) = workflow_testkit::temp_sqlite()?;
    audit_events_move_into_blocks(&url).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_audit_events_move_into_blocks() -> TestResult {
    let url = workflow_testkit::postgres_url().await?;
    audit_events_move_into_blocks(&url).await
}
