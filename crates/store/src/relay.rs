//! The outbox relay's side of the store: one pass takes the oldest outbox rows, hands them to a
//! publisher, and deletes them only once they are published.
//!
//! On PostgreSQL several processes run a relay (each process of the distributed runtime does,
//! so losing one loses no relay). A pass runs in a transaction holding a transaction-scoped
//! advisory lock, so exactly one relay publishes at a time and rows leave in commit order,
//! keeping each instance's commands in order; the others find the lock taken and wait for their
//! next pass. A relay killed mid-pass releases the lock with its connection, and its rows are
//! published again by the next relay (at-least-once; consumers skip redelivered commands).
//! SQLite serves one process, so there the pass needs no lock.
//!
//! The event lane: messages for services outside the engine (lifecycle events) leave in larger
//! batches than commands. One process at a time leads the lane ([`Store::lead_event_lane`]):
//! on PostgreSQL it holds a session advisory lock on a connection of its own, so leadership is
//! sticky, and moves when the leader's connection closes (its process died). Its passes
//! ([`Store::event_pass`]) take the lane's rows in commit order; the sweep's passes
//! ([`Store::relay_pass`]) leave them alone, so the two never publish a row twice.

use std::future::Future;

use sqlx::Row;

use crate::records::OutboxMessage;
use crate::{Backend, Store, StoreError};

/// The advisory lock key of the relay ("relay" in ASCII).
const RELAY_LOCK: i64 = 0x72_65_6c_61_79;
/// The advisory lock key of the event lane ("events" in ASCII), held for a whole session.
const EVENT_LANE_LOCK: i64 = 0x65_76_65_6e_74_73;
/// Ids per DELETE statement.
const DELETE_CHUNK: usize = 500;

/// What a relay pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayPass {
    /// This many rows were published and deleted (0: the outbox was empty).
    Published(usize),
    /// Another process holds the relay lock.
    NotLeader,
}

/// The rows of the outbox not of the event lane's `$2` topics (a JSON array), oldest first:
/// the sweep's, once a second.
const SELECT_EXCEPT_PG: &str = "SELECT id, topic, msg_key, payload FROM outbox \
     WHERE topic NOT IN (SELECT json_array_elements_text($2::json)) ORDER BY seq ASC LIMIT $1";
const SELECT_EXCEPT_SQLITE: &str = "SELECT id, topic, msg_key, payload FROM outbox \
     WHERE topic NOT IN (SELECT value FROM json_each($2)) ORDER BY seq ASC LIMIT $1";
/// The rows of topic `$2`, oldest first (by the index `outbox_topic_seq`).
const SELECT_TOPIC: &str = "SELECT id, topic, msg_key, payload FROM outbox \
     WHERE topic = $2 ORDER BY seq ASC LIMIT $1";

/// The leadership of the event lane, held by one process at a time (see the module doc).
pub struct EventLaneLeader {
    /// PostgreSQL: the connection holding the lane's session lock, out of the pool (dropping
    /// it closes the session, which releases the lock). SQLite: none, one process serves it.
    conn: Option<sqlx::AnyConnection>,
}

impl std::fmt::Debug for EventLaneLeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLaneLeader")
            .field("own_connection", &self.conn.is_some())
            .finish()
    }
}

impl Store {
    /// Take up to `limit` of the oldest outbox rows that are not of the event lane's `lane`
    /// topics and hand them to `publish`, which returns the ids it published; those are
    /// deleted. When `publish` fails, nothing is deleted and its error is returned.
    pub async fn relay_pass<F, Fut, E>(
        &self,
        lane: &[&str],
        limit: u32,
        publish: F,
    ) -> Result<RelayPass, E>
    where
        F: FnOnce(Vec<OutboxMessage>) -> Fut,
        Fut: Future<Output = Result<Vec<String>, E>>,
        E: From<StoreError>,
    {
        let limit = i64::from(limit.max(1));
        let lane = topics_json(lane)?;
        match self.backend() {
            Backend::Sqlite => {
                let rows = fetch(self.pool(), SELECT_EXCEPT_SQLITE, limit, &lane).await?;
                if rows.is_empty() {
                    return Ok(RelayPass::Published(0));
                }
                let ids = publish(rows).await?;
                self.delete_published(&ids).await?;
                Ok(RelayPass::Published(ids.len()))
            }
            Backend::Postgres => {
                let mut tx = self.keyed_pool().begin().await.map_err(StoreError::from)?;
                let locked: i32 = sqlx::query(
                    "SELECT CASE WHEN pg_try_advisory_xact_lock($1) THEN 1 ELSE 0 END AS locked",
                )
                .bind(RELAY_LOCK)
                .fetch_one(&mut *tx)
                .await
                .and_then(|row| row.try_get("locked"))
                .map_err(StoreError::from)?;
                if locked == 0 {
                    return Ok(RelayPass::NotLeader);
                }
                let rows = fetch(&mut *tx, SELECT_EXCEPT_PG, limit, &lane).await?;
                if rows.is_empty() {
                    return Ok(RelayPass::Published(0));
                }
                let ids = publish(rows).await?;
                delete(&mut tx, &ids).await?;
                tx.commit().await.map_err(StoreError::from)?;
                Ok(RelayPass::Published(ids.len()))
            }
        }
    }

    /// Lead the event lane if no other process does: `None` when another holds it.
    pub async fn lead_event_lane(&self) -> Result<Option<EventLaneLeader>, StoreError> {
        match self.backend() {
            Backend::Sqlite => Ok(Some(EventLaneLeader { conn: None })),
            Backend::Postgres => {
                let mut conn = self.keyed_pool().acquire().await?;
                let locked: i32 = sqlx::query(
                    "SELECT CASE WHEN pg_try_advisory_lock($1) THEN 1 ELSE 0 END AS locked",
                )
                .bind(EVENT_LANE_LOCK)
                .fetch_one(&mut *conn)
                .await
                .and_then(|row| row.try_get("locked"))?;
                if locked == 0 {
                    return Ok(None);
                }
                // Out of the pool: the lock lives as long as this session, never lent out.
                Ok(Some(EventLaneLeader {
                    conn: Some(conn.detach()),
                }))
            }
        }
    }

    /// As the event lane's leader, take up to `limit` of the oldest rows of `topic` and hand
    /// them to `publish`, which returns the ids it published; those are deleted. On an error
    /// of the store the caller must drop `leader` (its session may be gone).
    pub async fn event_pass<F, Fut, E>(
        &self,
        leader: &mut EventLaneLeader,
        topic: &str,
        limit: u32,
        publish: F,
    ) -> Result<usize, E>
    where
        F: FnOnce(Vec<OutboxMessage>) -> Fut,
        Fut: Future<Output = Result<Vec<String>, E>>,
        E: From<StoreError>,
    {
        let limit = i64::from(limit.max(1));
        let Some(conn) = leader.conn.as_mut() else {
            let rows = fetch(self.pool(), SELECT_TOPIC, limit, topic).await?;
            if rows.is_empty() {
                return Ok(0);
            }
            let ids = publish(rows).await?;
            self.delete_published(&ids).await?;
            return Ok(ids.len());
        };
        // The lock makes this session the only one taking these rows: no transaction needed.
        let rows = fetch(&mut *conn, SELECT_TOPIC, limit, topic).await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let ids = publish(rows).await?;
        delete(conn, &ids).await?;
        Ok(ids.len())
    }
}

fn topics_json(topics: &[&str]) -> Result<String, StoreError> {
    serde_json::to_string(topics)
        .map_err(|e| StoreError::corrupt(format!("cannot encode outbox topics: {e}")))
}

impl Store {
    /// Forget outbox rows that were published. Unknown ids are ignored.
    pub async fn delete_published(&self, ids: &[String]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        if self.committer.is_some() {
            // A SQLite file: with the instance writes, in the committer's next transaction.
            // A write on another connection also makes the committer's connection drop its
            // whole page cache (and its memory map) at its next transaction.
            return self.delete_outbox(ids).await;
        }
        let mut conn = self.keyed_pool().acquire().await?;
        delete(&mut conn, ids).await
    }
}

/// The rows `sql` selects, given the `limit` (`$1`) and a topic filter (`$2`).
async fn fetch<'e, X>(
    exec: X,
    sql: &str,
    limit: i64,
    filter: &str,
) -> Result<Vec<OutboxMessage>, StoreError>
where
    X: sqlx::Executor<'e, Database = sqlx::Any>,
{
    let rows = sqlx::query(sql)
        .bind(limit)
        .bind(filter)
        .fetch_all(exec)
        .await?;
    rows.iter()
        .map(|row| {
            Ok(OutboxMessage {
                id: row.try_get("id")?,
                topic: row.try_get("topic")?,
                key: row.try_get("msg_key")?,
                payload: row.try_get("payload")?,
            })
        })
        .collect()
}

async fn delete(conn: &mut sqlx::AnyConnection, ids: &[String]) -> Result<(), StoreError> {
    if Backend::from_connection(conn) == Backend::Postgres {
        // The ids as one JSON array: one statement text for any count (a text per count was
        // planned afresh each time, and crowded the connection's statement cache).
        let ids = serde_json::to_string(ids)
            .map_err(|e| StoreError::corrupt(format!("cannot encode outbox ids: {e}")))?;
        sqlx::query(
            "DELETE FROM outbox WHERE id = ANY(ARRAY(SELECT json_array_elements_text($1::json)))",
        )
        .bind(ids)
        .execute(&mut *conn)
        .await?;
        return Ok(());
    }
    for chunk in ids.chunks(DELETE_CHUNK) {
        let placeholders: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
        let sql = format!(
            "DELETE FROM outbox WHERE id IN ({})",
            placeholders.join(", ")
        );
        let mut query = sqlx::query(&sql);
        for id in chunk {
            query = query.bind(id.as_str());
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}
