//! Instance reads on PostgreSQL, batched: the reads of one process that queue while a batch is
//! being read share the next statement.
//!
//! A distributed process reads instances by id from many tasks at once (each pool member
//! before its transition, the api after each accepted decision): 10,000 single-row
//! statements in a 4,000-instance bench, over half of all its statements, each a round trip
//! and a wake-up of a backend for one index probe. [`PgReader`] is one task per process that
//! takes every read queued so far and makes ONE statement of them (`id = ANY(...)` over the
//! primary key), with each instance's audit stream head, which the group commit wants
//! (`pg_commit.rs`). Nothing waits to fill a batch: a lone read is read at once, and reads
//! batch only when they arrive while a statement is in flight. If the batch fails, each of its
//! reads is made alone, so every caller gets its own answer or error.

use std::collections::HashMap;

use sqlx::{AnyPool, Row};
use tokio::sync::{mpsc, oneshot};

use crate::pg_commit::INSTANCE_STREAM_PREFIX;
use crate::queries::{instance_from_row, INSTANCE_COLS};
use crate::records::InstanceRecord;
use crate::StoreError;

/// Most reads in one statement.
const MAX_BATCH: usize = 64;

/// An instance as read, with its own audit stream's head (`None`: no events).
pub(crate) type Read = (InstanceRecord, Option<(i64, String)>);

/// What a queued read is answered: `None` when its batch failed and it must be read alone.
type Answer = Option<Option<Read>>;

/// The queue of the process's read task. Cheap to clone; the task ends when every clone is
/// dropped.
#[derive(Debug, Clone)]
pub(crate) struct PgReader {
    jobs: mpsc::UnboundedSender<(String, oneshot::Sender<Answer>)>,
}

impl PgReader {
    /// Start the task on the current tokio runtime; it reads through `pool`.
    pub(crate) fn start(pool: AnyPool) -> PgReader {
        let (jobs, queue) = mpsc::unbounded_channel();
        tokio::spawn(run(pool, queue));
        PgReader { jobs }
    }

    /// The instance `id` with its stream's head, through the next batch; `pool` reads it alone
    /// if the batch failed or the task is gone.
    pub(crate) async fn instance(
        &self,
        pool: &AnyPool,
        id: &str,
    ) -> Result<Option<Read>, StoreError> {
        let (reply, answer) = oneshot::channel();
        if self.jobs.send((id.to_string(), reply)).is_ok() {
            if let Ok(Some(read)) = answer.await {
                return Ok(read);
            }
        }
        Ok(read_many(pool, &[id]).await?.remove(id))
    }
}

async fn run(pool: AnyPool, mut queue: mpsc::UnboundedReceiver<(String, oneshot::Sender<Answer>)>) {
    while let Some(first) = queue.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let mut ids: Vec<&str> = batch.iter().map(|(id, _)| id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        let mut found = read_many(&pool, &ids).await.ok();
        let mut wanted: HashMap<String, usize> = HashMap::new();
        for (id, _) in &batch {
            *wanted.entry(id.clone()).or_default() += 1;
        }
        for (id, reply) in batch {
            let answer = found.as_mut().map(|f| {
                // The last caller for an id takes the record, the others get copies.
                let left = wanted.get_mut(&id).map(|n| {
                    *n -= 1;
                    *n
                });
                match left {
                    Some(0) | None => f.remove(&id),
                    Some(_) => f.get(&id).cloned(),
                }
            });
            // The caller may have gone away: nothing to tell.
            let _ = reply.send(answer);
        }
    }
}

/// The instances of `ids` that exist, each with its stream's head: one statement.
async fn read_many(pool: &AnyPool, ids: &[&str]) -> Result<HashMap<String, Read>, StoreError> {
    let ids_json = serde_json::to_string(ids)
        .map_err(|e| StoreError::corrupt(format!("cannot encode instance ids: {e}")))?;
    let rows = sqlx::query(read_sql())
        .bind(ids_json)
        .fetch_all(pool)
        .await?;
    let mut found = HashMap::with_capacity(rows.len());
    for row in rows {
        let rec = instance_from_row(&row)?;
        let seq = row.try_get::<Option<i64>, _>("head_seq")?;
        let hash = row.try_get::<Option<String>, _>("head_hash")?;
        found.insert(rec.info.id.clone(), (rec, seq.zip(hash)));
    }
    Ok(found)
}

/// By primary key (`= ANY` of the ids: an index scan, whatever the batch's size), each row
/// with the head of its stream (a backward probe of the stream's key). One text for every
/// batch size.
fn read_sql() -> &'static str {
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "SELECT {INSTANCE_COLS}, h.seq AS head_seq, h.hash AS head_hash \
             FROM workflow_instances w LEFT JOIN LATERAL (SELECT b.last_seq AS seq, \
             b.last_hash AS hash FROM audit_blocks b \
             WHERE b.stream = '{INSTANCE_STREAM_PREFIX}' || w.id \
             AND b.partner_id = w.partner_id ORDER BY b.first_seq DESC LIMIT 1) AS h ON true \
             WHERE w.id = ANY(ARRAY(SELECT json_array_elements_text($1::json)))"
        )
    });
    SQL.as_str()
}

#[cfg(test)]
mod tests {
    //! The batch path, called directly: through `Store::get_instance` a failed batch would be
    //! masked by the reads made alone.

    use serde_json::json;
    use workflow_core::Timestamp;

    use super::*;
    use crate::records::AuditDraft;
    use crate::Store;

    fn instance(n: u64) -> InstanceRecord {
        let mut rec = crate::fixtures::instance();
        rec.info.trigger = json!({ "n": n }).into();
        rec
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_reads_each_get_their_own_instance_and_head(
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let store = Store::connect(&workflow_testkit::postgres_url().await?).await?;
        store.migrate().await?;
        // Even-numbered instances have two events, odd ones none.
        let mut recs = Vec::new();
        for n in 0..10 {
            let rec = instance(n);
            let stream = format!("{INSTANCE_STREAM_PREFIX}{}", rec.info.id);
            let audit: Vec<AuditDraft> = (0..if n % 2 == 0 { 2 } else { 0 })
                .map(|k| AuditDraft {
                    stream: stream.clone(),
                    at: Timestamp(2_000),
                    actor: rec.info.created_by.clone(),
                    kind: "instance.created".into(),
                    before: serde_json::Value::Null,
                    after: json!({ "k": k }),
                    reason: None,
                })
                .collect();
            store.create_instance(&rec, &[], &audit).await?;
            recs.push(rec);
        }
        let reader = PgReader::start(store.pool().clone());
        // Each instance read five times at once (the same id twice in a batch too), and ids
        // that do not exist.
        let mut reads = tokio::task::JoinSet::new();
        for round in 0..5 {
            for (n, rec) in recs.iter().enumerate() {
                let (reader, pool, id) =
                    (reader.clone(), store.pool().clone(), rec.info.id.clone());
                reads.spawn(async move { (Some(n), reader.instance(&pool, &id).await) });
            }
            let (reader, pool) = (reader.clone(), store.pool().clone());
            reads.spawn(async move {
                (
                    None,
                    reader.instance(&pool, &format!("missing-{round}")).await,
                )
            });
        }
        let mut answered = 0;
        while let Some(done) = reads.join_next().await {
            let (n, read) = done?;
            let read = read?;
            match n {
                None => assert!(read.is_none(), "{read:?}"),
                Some(n) => {
                    let (rec, head) = read.ok_or("an existing instance is found")?;
                    assert_eq!(rec.info.id, recs[n].info.id);
                    assert_eq!(*rec.info.trigger, json!({ "n": n }));
                    assert_eq!(head.map(|(seq, _)| seq), (n % 2 == 0).then_some(2), "{n}");
                }
            }
            answered += 1;
        }
        assert_eq!(answered, 55);
        Ok(())
    }
}
