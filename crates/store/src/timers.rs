//! The SQL of durable timers: stored with the state change that needs them, fired once.
//!
//! Several schedulers may run: on PostgreSQL each claims due rows with `FOR UPDATE SKIP LOCKED`,
//! on SQLite the write transaction (`BEGIN IMMEDIATE`) serialises them. Firing marks the row and
//! writes the fired-timer message to the outbox in one transaction, so a timer fires once, and a
//! scheduler killed mid-way fires nothing twice (its transaction rolls back).

use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};
use workflow_core::Timestamp;

use crate::queries::insert_outbox;
use crate::records::{OutboxMessage, TimerRecord};
use crate::{Backend, Store, StoreError};

fn timer_from_row(r: &AnyRow) -> Result<TimerRecord, StoreError> {
    Ok(TimerRecord {
        id: r.try_get("id")?,
        partner_id: r.try_get("partner_id")?,
        instance_id: r.try_get("instance_id")?,
        step_index: r.try_get("step_index")?,
        step_type: r.try_get("step_type")?,
        kind: r.try_get("kind")?,
        due_at: Timestamp(r.try_get("due_at")?),
    })
}

pub(crate) async fn insert_timers(
    conn: &mut AnyConnection,
    timers: &[TimerRecord],
) -> Result<(), StoreError> {
    // One multi-row statement per 64 timers (7 parameters each): a round trip per statement
    // is made while the write lock is held. A multi-row upsert may not name a row twice.
    let mut seen = std::collections::HashSet::new();
    let unique: Vec<&TimerRecord> = timers.iter().filter(|t| seen.insert(&t.id)).collect();
    for chunk in unique.chunks(64) {
        let values: Vec<String> = (0..chunk.len())
            .map(|r| {
                let p: Vec<String> = (1..=7).map(|k| format!("${}", r * 7 + k)).collect();
                format!("({})", p.join(", "))
            })
            .collect();
        let sql = format!(
            "INSERT INTO timers (id, partner_id, instance_id, step_index, step_type, kind, due_at) \
             VALUES {} ON CONFLICT (id) DO NOTHING",
            values.join(", ")
        );
        let mut query = sqlx::query(&sql);
        for t in chunk {
            query = query
                .bind(t.id.as_str())
                .bind(t.partner_id.as_str())
                .bind(t.instance_id.as_str())
                .bind(t.step_index)
                .bind(t.step_type.as_str())
                .bind(t.kind.as_str())
                .bind(t.due_at.0);
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

impl Store {
    /// Fire up to `limit` timers due at `now`, oldest due first: for each, the message
    /// `message(timer)` goes to the outbox and the timer is marked fired, all in one transaction.
    pub async fn fire_due_timers(
        &self,
        now: Timestamp,
        limit: u32,
        message: impl Fn(&TimerRecord) -> OutboxMessage,
    ) -> Result<Vec<TimerRecord>, StoreError> {
        let mut tx = self.begin_write().await?;
        let lock = match self.backend() {
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
        };
        let sql = format!(
            "SELECT id, partner_id, instance_id, step_index, step_type, kind, due_at FROM timers \
             WHERE fired_at IS NULL AND due_at <= $1 ORDER BY due_at ASC LIMIT $2{lock}"
        );
        let rows = sqlx::query(&sql)
            .bind(now.0)
            .bind(i64::from(limit.max(1)))
            .fetch_all(&mut *tx)
            .await?;
        let timers = rows
            .iter()
            .map(timer_from_row)
            .collect::<Result<Vec<_>, StoreError>>()?;
        let messages: Vec<OutboxMessage> = timers.iter().map(&message).collect();
        insert_outbox(&mut tx, &messages).await?;
        for t in &timers {
            sqlx::query("UPDATE timers SET fired_at = $1 WHERE id = $2")
                .bind(now.0)
                .bind(t.id.as_str())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(timers)
    }

    /// When the earliest unfired timer is due, if any.
    pub async fn next_timer_due(&self) -> Result<Option<Timestamp>, StoreError> {
        let row = sqlx::query("SELECT MIN(due_at) AS due FROM timers WHERE fired_at IS NULL")
            .fetch_one(self.pool())
            .await?;
        Ok(row.try_get::<Option<i64>, _>("due")?.map(Timestamp))
    }

    /// Every timer of a partner as (due, fired) pairs: for benchmarks and inspection.
    pub async fn timer_firings(
        &self,
        partner_id: &str,
    ) -> Result<Vec<(Timestamp, Option<Timestamp>)>, StoreError> {
        let rows = sqlx::query("SELECT due_at, fired_at FROM timers WHERE partner_id = $1")
            .bind(partner_id)
            .fetch_all(self.pool())
            .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    Timestamp(r.try_get("due_at")?),
                    r.try_get::<Option<i64>, _>("fired_at")?.map(Timestamp),
                ))
            })
            .collect()
    }

    /// The timers of an instance (fired ones too), by due time: for tests and inspection.
    pub async fn list_timers(
        &self,
        partner_id: &str,
        instance_id: &str,
    ) -> Result<Vec<(TimerRecord, Option<Timestamp>)>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, partner_id, instance_id, step_index, step_type, kind, due_at, fired_at \
             FROM timers WHERE partner_id = $1 AND instance_id = $2 ORDER BY due_at ASC, id ASC",
        )
        .bind(partner_id)
        .bind(instance_id)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    timer_from_row(r)?,
                    r.try_get::<Option<i64>, _>("fired_at")?.map(Timestamp),
                ))
            })
            .collect()
    }
}
