//! The SQL of notification deliveries and webhook secrets.
//!
//! A delivery row is inserted in the same transaction as the instance change that queues it
//! (with its bus message in the outbox). After that its `status` moves only here:
//!
//! ```text
//! queued ──claim──► sending ──record──► delivered | retrying | dead_lettered
//!   ▲                                         │            │
//!   └──────── requeue (next_check_at due) ◄───┘  redeliver ┘ (also from delivered)
//! ```
//!
//! `next_check_at` is when the pool must look at a row again: the next attempt of a `retrying`
//! row, the lease of a `queued`/`sending` row (a lost bus message or a worker that died
//! mid-attempt is re-queued when it passes), or, for a finished delivery a step waits on, until
//! that step has been told (`mark_delivery_settled`). [`Store::requeue_due_deliveries`] is the
//! one scan: PostgreSQL hands each due row to one scanner (`FOR UPDATE SKIP LOCKED`), SQLite
//! serialises them. Claiming is a compare-and-set on `status = 'queued'`, so a delivery is
//! attempted by one worker at a time however often its message arrives.
//!
//! Every query names the partner; only the scan spans partners.

use std::fmt;

use serde_json::Value;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};
use workflow_core::Timestamp;

use crate::queries::insert_outbox;
use crate::records::OutboxMessage;
use crate::{Backend, Store, StoreError};

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeliveryStatus {
    /// Its message is on the bus (or about to be).
    Queued,
    /// A worker claimed it and is making an attempt.
    Sending,
    /// The last attempt failed; the next one is due at `next_check_at`.
    Retrying,
    Delivered,
    /// Every attempt failed, or one failed for good. `redeliver` tries again.
    DeadLettered,
}

impl DeliveryStatus {
    pub const ALL: [DeliveryStatus; 5] = [
        DeliveryStatus::Queued,
        DeliveryStatus::Sending,
        DeliveryStatus::Retrying,
        DeliveryStatus::Delivered,
        DeliveryStatus::DeadLettered,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Queued => "queued",
            DeliveryStatus::Sending => "sending",
            DeliveryStatus::Retrying => "retrying",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::DeadLettered => "dead_lettered",
        }
    }

    pub fn parse(s: &str) -> Option<DeliveryStatus> {
        DeliveryStatus::ALL.into_iter().find(|d| d.as_str() == s)
    }

    /// Delivered or dead-lettered: no attempt is pending.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            DeliveryStatus::Delivered | DeliveryStatus::DeadLettered
        )
    }
}

/// A delivery to insert with a transition.
#[derive(Debug, Clone, PartialEq)]
pub struct NewDelivery {
    pub id: String,
    pub partner_id: String,
    pub instance_id: String,
    pub step_index: i64,
    pub purpose: String,
    pub channel: String,
    pub target: String,
    /// What is sent (the same on every attempt).
    pub request: Value,
    /// A step waits for its outcome.
    pub wait: bool,
    pub created_at: Timestamp,
    /// The lease of the first queueing: re-queued if nobody claimed it by then.
    pub check_at: Timestamp,
}

/// A stored delivery.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryRecord {
    pub id: String,
    pub partner_id: String,
    pub instance_id: String,
    pub step_index: i64,
    pub purpose: String,
    pub channel: String,
    pub target: String,
    pub request: Value,
    pub wait: bool,
    pub status: DeliveryStatus,
    /// Every attempt ever made (the delivery log's length).
    pub attempts: i64,
    /// Failed attempts since it was queued or redelivered: the position in the retry schedule.
    pub round_failures: i64,
    pub next_check_at: Option<Timestamp>,
    pub last_error: Option<String>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub delivered_at: Option<Timestamp>,
}

/// One attempt, as the delivery log keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryAttemptRecord {
    pub delivery_id: String,
    /// 1-based, in the order attempts were made (set by the store).
    pub seq: i64,
    pub attempted_at: Timestamp,
    /// The receiver's HTTP status, or the SMTP reply code.
    pub status_code: Option<i64>,
    pub latency_ms: i64,
    /// The start of the response, truncated.
    pub response_snippet: String,
    pub error: Option<String>,
    pub succeeded: bool,
}

/// What an attempt leads to, decided by the delivery pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptVerdict {
    Delivered,
    /// Try again at this time (the retry schedule).
    RetryAt(Timestamp),
    DeadLettered,
}

/// A partner's webhook signing secrets.
#[derive(Clone, PartialEq)]
pub struct WebhookSecretRecord {
    pub partner_id: String,
    pub secret: String,
    /// The secret before the last rotation, still signing until `previous_expires_at`.
    pub previous_secret: Option<String>,
    pub previous_expires_at: Option<Timestamp>,
    pub created_at: Timestamp,
    pub rotated_at: Option<Timestamp>,
}

impl WebhookSecretRecord {
    /// The secrets that sign at `now`: the current one, and the previous one during its grace
    /// period.
    pub fn signing_secrets(&self, now: Timestamp) -> Vec<String> {
        let mut out = vec![self.secret.clone()];
        if let (Some(prev), Some(until)) = (&self.previous_secret, self.previous_expires_at) {
            if now < until {
                out.push(prev.clone());
            }
        }
        out
    }
}

impl fmt::Debug for WebhookSecretRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookSecretRecord")
            .field("partner_id", &self.partner_id)
            .field("secret", &"<redacted>")
            .field(
                "previous_secret",
                &self.previous_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("previous_expires_at", &self.previous_expires_at)
            .field("created_at", &self.created_at)
            .field("rotated_at", &self.rotated_at)
            .finish()
    }
}

/// What [`Store::redeliver`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum RedeliverOutcome {
    /// Queued again, its message in the outbox.
    Queued(DeliveryRecord),
    /// An attempt is pending or in flight: nothing changed.
    InProgress(DeliveryRecord),
}

const DELIVERY_COLS: &str = "id, partner_id, instance_id, step_index, purpose, channel, target, \
     request, wait, status, attempts, round_failures, next_check_at, last_error, created_at, \
     updated_at, delivered_at";

fn ts(r: &AnyRow, col: &str) -> Result<Option<Timestamp>, StoreError> {
    Ok(r.try_get::<Option<i64>, _>(col)?.map(Timestamp))
}

fn delivery_from_row(r: &AnyRow) -> Result<DeliveryRecord, StoreError> {
    let id: String = r.try_get("id")?;
    let status: String = r.try_get("status")?;
    let request: String = r.try_get("request")?;
    Ok(DeliveryRecord {
        status: DeliveryStatus::parse(&status).ok_or_else(|| {
            StoreError::corrupt(format!("delivery {id} has unknown status `{status}`"))
        })?,
        request: serde_json::from_str(&request).map_err(|e| {
            StoreError::corrupt(format!("delivery {id} request does not decode: {e}"))
        })?,
        partner_id: r.try_get("partner_id")?,
        instance_id: r.try_get("instance_id")?,
        step_index: r.try_get("step_index")?,
        purpose: r.try_get("purpose")?,
        channel: r.try_get("channel")?,
        target: r.try_get("target")?,
        wait: r.try_get::<i64, _>("wait")? != 0,
        attempts: r.try_get("attempts")?,
        round_failures: r.try_get("round_failures")?,
        next_check_at: ts(r, "next_check_at")?,
        last_error: r.try_get("last_error")?,
        created_at: Timestamp(r.try_get("created_at")?),
        updated_at: Timestamp(r.try_get("updated_at")?),
        delivered_at: ts(r, "delivered_at")?,
        id,
    })
}

fn attempt_from_row(r: &AnyRow) -> Result<DeliveryAttemptRecord, StoreError> {
    Ok(DeliveryAttemptRecord {
        delivery_id: r.try_get("delivery_id")?,
        seq: r.try_get("seq")?,
        attempted_at: Timestamp(r.try_get("attempted_at")?),
        status_code: r.try_get("status_code")?,
        latency_ms: r.try_get("latency_ms")?,
        response_snippet: r.try_get("response_snippet")?,
        error: r.try_get("error")?,
        succeeded: r.try_get::<i64, _>("succeeded")? != 0,
    })
}

fn secret_from_row(r: &AnyRow) -> Result<WebhookSecretRecord, StoreError> {
    Ok(WebhookSecretRecord {
        partner_id: r.try_get("partner_id")?,
        secret: r.try_get("secret")?,
        previous_secret: r.try_get("previous_secret")?,
        previous_expires_at: ts(r, "previous_expires_at")?,
        created_at: Timestamp(r.try_get("created_at")?),
        rotated_at: ts(r, "rotated_at")?,
    })
}

/// Insert deliveries inside the caller's transaction. A delivery id that exists already (the
/// same notification queued twice) is left as it is.
pub(crate) async fn insert_deliveries(
    conn: &mut AnyConnection,
    deliveries: &[NewDelivery],
) -> Result<(), StoreError> {
    for d in deliveries {
        let request = serde_json::to_string(&d.request)
            .map_err(|e| StoreError::corrupt(format!("cannot encode a delivery: {e}")))?;
        sqlx::query(
            "INSERT INTO notification_deliveries (id, partner_id, instance_id, step_index, purpose, \
             channel, target, request, wait, status, attempts, round_failures, next_check_at, \
             created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'queued', 0, 0, $10, $11, $11) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(d.id.as_str())
        .bind(d.partner_id.as_str())
        .bind(d.instance_id.as_str())
        .bind(d.step_index)
        .bind(d.purpose.as_str())
        .bind(d.channel.as_str())
        .bind(d.target.as_str())
        .bind(request)
        .bind(i64::from(d.wait))
        .bind(d.check_at.0)
        .bind(d.created_at.0)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

async fn delivery_in(
    conn: &mut AnyConnection,
    partner_id: &str,
    id: &str,
) -> Result<Option<DeliveryRecord>, StoreError> {
    let sql = format!(
        "SELECT {DELIVERY_COLS} FROM notification_deliveries WHERE partner_id = $1 AND id = $2"
    );
    let row = sqlx::query(&sql)
        .bind(partner_id)
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
    row.as_ref().map(delivery_from_row).transpose()
}

impl Store {
    /// One of the partner's deliveries.
    pub async fn get_delivery(
        &self,
        partner_id: &str,
        id: &str,
    ) -> Result<Option<DeliveryRecord>, StoreError> {
        let mut conn = self.pool().acquire().await?;
        delivery_in(&mut conn, partner_id, id).await
    }

    /// The deliveries of one of the partner's instances, oldest first.
    pub async fn list_deliveries(
        &self,
        partner_id: &str,
        instance_id: &str,
    ) -> Result<Vec<DeliveryRecord>, StoreError> {
        let sql = format!(
            "SELECT {DELIVERY_COLS} FROM notification_deliveries \
             WHERE partner_id = $1 AND instance_id = $2 ORDER BY created_at ASC, id ASC"
        );
        let rows = sqlx::query(&sql)
            .bind(partner_id)
            .bind(instance_id)
            .fetch_all(self.pool())
            .await?;
        rows.iter().map(delivery_from_row).collect()
    }

    /// The delivery log of one of the partner's deliveries, in order.
    pub async fn list_delivery_attempts(
        &self,
        partner_id: &str,
        delivery_id: &str,
    ) -> Result<Vec<DeliveryAttemptRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT delivery_id, seq, attempted_at, status_code, latency_ms, response_snippet, \
             error, succeeded FROM notification_attempts \
             WHERE partner_id = $1 AND delivery_id = $2 ORDER BY seq ASC",
        )
        .bind(partner_id)
        .bind(delivery_id)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(attempt_from_row).collect()
    }

    /// Claim a queued delivery for one attempt: `queued` becomes `sending` with a lease until
    /// `lease_until`. `None` when it is not queued (another worker has it, or it is finished).
    pub async fn claim_delivery(
        &self,
        partner_id: &str,
        id: &str,
        now: Timestamp,
        lease_until: Timestamp,
    ) -> Result<Option<DeliveryRecord>, StoreError> {
        let mut tx = self.begin_write().await?;
        let done = sqlx::query(
            "UPDATE notification_deliveries SET status = 'sending', next_check_at = $1, \
             updated_at = $2 WHERE partner_id = $3 AND id = $4 AND status = 'queued'",
        )
        .bind(lease_until.0)
        .bind(now.0)
        .bind(partner_id)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            tx.rollback().await?;
            return Ok(None);
        }
        let rec = delivery_in(&mut tx, partner_id, id).await?;
        tx.commit().await?;
        Ok(rec)
    }

    /// Record an attempt of a delivery this worker claimed, and where it leads, in one
    /// transaction. `settle_until`: for a finished delivery a step waits on, when to look again
    /// if the step was not told by then. `None` when the delivery is no longer `sending` (its
    /// lease passed and it was re-queued): nothing is written.
    pub async fn record_delivery_attempt(
        &self,
        partner_id: &str,
        id: &str,
        attempt: &DeliveryAttemptRecord,
        verdict: AttemptVerdict,
        now: Timestamp,
        settle_until: Option<Timestamp>,
    ) -> Result<Option<DeliveryRecord>, StoreError> {
        let mut tx = self.begin_write().await?;
        let (status, next_check, failed, delivered_at) = match verdict {
            AttemptVerdict::Delivered => {
                (DeliveryStatus::Delivered, settle_until, 0_i64, Some(now.0))
            }
            AttemptVerdict::RetryAt(at) => (DeliveryStatus::Retrying, Some(at), 1, None),
            AttemptVerdict::DeadLettered => (DeliveryStatus::DeadLettered, settle_until, 1, None),
        };
        let row = sqlx::query(
            "UPDATE notification_deliveries SET status = $1, next_check_at = $2, \
             attempts = attempts + 1, round_failures = round_failures + $3, last_error = $4, \
             delivered_at = COALESCE($5, delivered_at), updated_at = $6 \
             WHERE partner_id = $7 AND id = $8 AND status = 'sending' RETURNING attempts",
        )
        .bind(status.as_str())
        .bind(next_check.map(|t| t.0))
        .bind(failed)
        .bind(attempt.error.as_deref())
        .bind(delivered_at)
        .bind(now.0)
        .bind(partner_id)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            tx.rollback().await?;
            return Ok(None);
        };
        let seq: i64 = row.try_get("attempts")?;
        sqlx::query(
            "INSERT INTO notification_attempts (delivery_id, seq, partner_id, attempted_at, \
             status_code, latency_ms, response_snippet, error, succeeded) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(id)
        .bind(seq)
        .bind(partner_id)
        .bind(attempt.attempted_at.0)
        .bind(attempt.status_code)
        .bind(attempt.latency_ms)
        .bind(attempt.response_snippet.as_str())
        .bind(attempt.error.as_deref())
        .bind(i64::from(attempt.succeeded))
        .execute(&mut *tx)
        .await?;
        let rec = delivery_in(&mut tx, partner_id, id).await?;
        tx.commit().await?;
        Ok(rec)
    }

    /// The step waiting on a finished delivery has been told: stop looking at it.
    pub async fn mark_delivery_settled(
        &self,
        partner_id: &str,
        id: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE notification_deliveries SET next_check_at = NULL \
             WHERE partner_id = $1 AND id = $2 AND status IN ('delivered', 'dead_lettered')",
        )
        .bind(partner_id)
        .bind(id)
        .execute(self.write_pool())
        .await?;
        Ok(())
    }

    /// Re-publish up to `limit` deliveries whose `next_check_at` has come, oldest first, in one
    /// transaction: an unfinished one becomes `queued` again (a due retry, or a lost message or
    /// claim), a finished one a step waits on keeps its status; each gets a new lease
    /// (`lease_until`) and its message `message(delivery)` in the outbox.
    pub async fn requeue_due_deliveries(
        &self,
        now: Timestamp,
        lease_until: Timestamp,
        limit: u32,
        message: impl Fn(&DeliveryRecord) -> Result<OutboxMessage, StoreError>,
    ) -> Result<Vec<DeliveryRecord>, StoreError> {
        let mut tx = self.begin_write().await?;
        let lock = match self.backend() {
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
        };
        let sql = format!(
            "SELECT {DELIVERY_COLS} FROM notification_deliveries \
             WHERE next_check_at IS NOT NULL AND next_check_at <= $1 \
             ORDER BY next_check_at ASC LIMIT $2{lock}"
        );
        let rows = sqlx::query(&sql)
            .bind(now.0)
            .bind(i64::from(limit.max(1)))
            .fetch_all(&mut *tx)
            .await?;
        let mut due = rows
            .iter()
            .map(delivery_from_row)
            .collect::<Result<Vec<_>, StoreError>>()?;
        let mut messages = Vec::with_capacity(due.len());
        for d in &mut due {
            if !d.status.is_final() {
                d.status = DeliveryStatus::Queued;
            }
            d.next_check_at = Some(lease_until);
            d.updated_at = now;
            sqlx::query(
                "UPDATE notification_deliveries SET status = $1, next_check_at = $2, updated_at = $3 \
                 WHERE id = $4",
            )
            .bind(d.status.as_str())
            .bind(lease_until.0)
            .bind(now.0)
            .bind(d.id.as_str())
            .execute(&mut *tx)
            .await?;
            messages.push(message(d)?);
        }
        insert_outbox(&mut tx, &messages).await?;
        tx.commit().await?;
        Ok(due)
    }

    /// Try a finished delivery again: a new round of the retry schedule starts (the delivery log
    /// keeps the earlier attempts), its message goes to the outbox. `NotFound` if it is not the
    /// partner's.
    pub async fn redeliver(
        &self,
        partner_id: &str,
        id: &str,
        now: Timestamp,
        lease_until: Timestamp,
        message: impl FnOnce(&DeliveryRecord) -> Result<OutboxMessage, StoreError>,
    ) -> Result<RedeliverOutcome, StoreError> {
        let mut tx = self.begin_write().await?;
        let current =
            delivery_in(&mut tx, partner_id, id)
                .await?
                .ok_or_else(|| StoreError::NotFound {
                    what: "delivery",
                    id: id.to_string(),
                })?;
        if !current.status.is_final() {
            tx.rollback().await?;
            return Ok(RedeliverOutcome::InProgress(current));
        }
        sqlx::query(
            "UPDATE notification_deliveries SET status = 'queued', round_failures = 0, \
             next_check_at = $1, updated_at = $2 WHERE partner_id = $3 AND id = $4",
        )
        .bind(lease_until.0)
        .bind(now.0)
        .bind(partner_id)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        let rec =
            delivery_in(&mut tx, partner_id, id)
                .await?
                .ok_or_else(|| StoreError::NotFound {
                    what: "delivery",
                    id: id.to_string(),
                })?;
        insert_outbox(&mut tx, &[message(&rec)?]).await?;
        tx.commit().await?;
        Ok(RedeliverOutcome::Queued(rec))
    }

    /// The partner's webhook secrets, created with `new_secret()` on first use.
    pub async fn webhook_secret(
        &self,
        partner_id: &str,
        new_secret: impl FnOnce() -> String,
        now: Timestamp,
    ) -> Result<WebhookSecretRecord, StoreError> {
        if let Some(rec) = self.find_webhook_secret(partner_id).await? {
            return Ok(rec);
        }
        // Racing creators: the first insert wins, everyone reads it back.
        sqlx::query(
            "INSERT INTO webhook_secrets (partner_id, secret, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (partner_id) DO NOTHING",
        )
        .bind(partner_id)
        .bind(new_secret())
        .bind(now.0)
        .execute(self.write_pool())
        .await?;
        self.find_webhook_secret(partner_id)
            .await?
            .ok_or_else(|| StoreError::NotFound {
                what: "webhook secret of partner",
                id: partner_id.to_string(),
            })
    }

    async fn find_webhook_secret(
        &self,
        partner_id: &str,
    ) -> Result<Option<WebhookSecretRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT partner_id, secret, previous_secret, previous_expires_at, created_at, rotated_at \
             FROM webhook_secrets WHERE partner_id = $1",
        )
        .bind(partner_id)
        .fetch_optional(self.pool())
        .await?;
        row.as_ref().map(secret_from_row).transpose()
    }

    /// Rotate the partner's secret: `new_secret` signs from now on, the current one keeps
    /// signing as well until `grace_until`. Creates the secret first if the partner has none.
    pub async fn rotate_webhook_secret(
        &self,
        partner_id: &str,
        new_secret: String,
        now: Timestamp,
        grace_until: Timestamp,
    ) -> Result<WebhookSecretRecord, StoreError> {
        let mut tx = self.begin_write().await?;
        let done = sqlx::query(
            "UPDATE webhook_secrets SET previous_secret = secret, previous_expires_at = $1, \
             secret = $2, rotated_at = $3 WHERE partner_id = $4",
        )
        .bind(grace_until.0)
        .bind(new_secret.as_str())
        .bind(now.0)
        .bind(partner_id)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            sqlx::query(
                "INSERT INTO webhook_secrets (partner_id, secret, created_at, rotated_at) \
                 VALUES ($1, $2, $3, $3)",
            )
            .bind(partner_id)
            .bind(new_secret.as_str())
            .bind(now.0)
            .execute(&mut *tx)
            .await?;
        }
        let row = sqlx::query(
            "SELECT partner_id, secret, previous_secret, previous_expires_at, created_at, rotated_at \
             FROM webhook_secrets WHERE partner_id = $1",
        )
        .bind(partner_id)
        .fetch_one(&mut *tx)
        .await?;
        let rec = secret_from_row(&row)?;
        tx.commit().await?;
        Ok(rec)
    }
}
