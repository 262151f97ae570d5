//! Notification delivery use cases: queue deliveries with the transition that causes them, hand
//! them to the delivery pool, record each attempt, re-queue what is due, redeliver, tell a step
//! that waits on a delivery how it ended, and the partners' webhook secrets.
//!
//! The machine returns [`Effect::Notify`]; [`queue`] turns each into a delivery row and its
//! [`NotificationDelivery`] message on [`NOTIFICATION_TOPIC`], which the engine commits in the
//! same transaction as the new state (transactional outbox). The pool then claims the delivery
//! ([`Engine::claim_delivery`]), makes one attempt, and records it
//! ([`Engine::record_delivery_attempt`]) with the verdict it chose from the retry schedule. A
//! retry is not a sleep in a worker: the row's `next_check_at` is the next attempt's time and
//! [`Engine::requeue_due_deliveries`] (run by the pool's scanner, on the engine's clock)
//! re-publishes it then, so retries survive restarts and work the same on both runtimes.
//!
//! This module never makes the call itself (the pool does, through the egress crate) and never
//! decides the retry schedule.

use std::sync::Mutex;

use serde_json::{json, Value};
use workflow_core::instance::InstanceInfo;
use workflow_core::machine::{
    webhook_body, Command, Effect, NotificationOutcome, OutboundMessage, Transition,
};
use workflow_core::Timestamp;
use workflow_store::records::OutboxMessage;
use workflow_store::{
    AttemptVerdict, DeliveryAttemptRecord, DeliveryRecord, NewDelivery, RedeliverOutcome,
    StoreError, WebhookSecretRecord,
};

use crate::error::EngineError;
use crate::messages::{MessageError, NotificationDelivery, NOTIFICATION_TOPIC};
use crate::service::{Engine, ExecuteOutcome};

/// How long a queued or claimed delivery may stay unattended before it is re-queued (a lost
/// message, a worker that died mid-attempt). Longer than any attempt can take.
pub const DELIVERY_LEASE_MS: i64 = 2 * 60_000;
/// How long after a finished delivery a step waiting on it is told again if telling it failed.
pub const SETTLE_RETRY_MS: i64 = 30_000;
/// How long the previous webhook secret keeps signing after a rotation.
pub const ROTATION_GRACE_MS: i64 = 24 * 3_600_000;

/// The bus message of a delivery, for the outbox.
pub fn delivery_message(
    partner_id: &str,
    instance_id: &str,
    delivery_id: &str,
    now: Timestamp,
) -> Result<OutboxMessage, MessageError> {
    let msg = NotificationDelivery {
        delivery_id: delivery_id.to_string(),
        partner_id: partner_id.to_string(),
        instance_id: instance_id.to_string(),
        issued_at: now.0,
    };
    Ok(OutboxMessage {
        // Unique per message; the delivery id names the delivery.
        id: format!("delivery:{delivery_id}:{}", uuid::Uuid::now_v7()),
        topic: NOTIFICATION_TOPIC.to_string(),
        key: instance_id.to_string(),
        payload: msg.encode()?,
    })
}

/// What is sent, as stored: a webhook keeps its exact body (the Standard Webhooks envelope,
/// serialised once, so every attempt signs and sends the same bytes).
fn request_of(message: &OutboundMessage, now: Timestamp) -> Value {
    match message {
        OutboundMessage::Webhook {
            url,
            event_type,
            data,
        } => {
            let body = webhook_body(event_type, data, now);
            json!({"url": url, "event_type": event_type, "body": body})
        }
        OutboundMessage::Email { to, subject, body } => {
            json!({"to": to, "subject": subject, "body": body})
        }
    }
}

/// The deliveries a transition queues, with their messages appended to `outbox`: both are
/// committed with the transition.
pub(crate) fn queue(
    info: &InstanceInfo,
    t: &Transition,
    now: Timestamp,
    outbox: &mut Vec<OutboxMessage>,
) -> Result<Vec<NewDelivery>, EngineError> {
    let mut deliveries = Vec::new();
    for effect in &t.effects {
        let Effect::Notify(spec) = effect else {
            continue;
        };
        deliveries.push(NewDelivery {
            id: spec.delivery_id.clone(),
            partner_id: info.partner_id.clone(),
            instance_id: info.id.clone(),
            step_index: i64::try_from(spec.index).unwrap_or(i64::MAX),
            purpose: spec.purpose.as_str().to_string(),
            channel: spec.message.channel().to_string(),
            target: spec.message.target().to_string(),
            request: request_of(&spec.message, now),
            wait: spec.wait,
            created_at: now,
            check_at: now.plus_millis(DELIVERY_LEASE_MS),
        });
        outbox.push(delivery_message(
            &info.partner_id,
            &info.id,
            &spec.delivery_id,
            now,
        )?);
    }
    Ok(deliveries)
}

/// A delivery this worker claimed: attempt it, then report with
/// [`Engine::record_delivery_attempt`].
#[derive(Debug, Clone)]
pub struct DeliveryTask {
    pub delivery: DeliveryRecord,
    /// The webhook signing secrets at the time of the claim (two during a rotation); empty for
    /// email.
    pub secrets: Vec<String>,
}

/// What to do with a delivery message.
#[derive(Debug, Clone)]
pub enum DeliveryClaim {
    /// Make one attempt.
    Attempt(DeliveryTask),
    /// It is finished and a step waits on it: tell the step (see [`Engine::settle_delivery`]).
    Settle(DeliveryRecord),
    /// Nothing to do (another worker has it, it is finished, or it does not exist).
    Skip(String),
}

impl Engine {
    /// Claim the delivery a message names. `new_secret` makes the partner's webhook secret if it
    /// has none yet.
    pub async fn claim_delivery(
        &self,
        msg: &NotificationDelivery,
        new_secret: impl FnOnce() -> String,
    ) -> Result<DeliveryClaim, EngineError> {
        let now = self.clock().now();
        let claimed = self
            .store()
            .claim_delivery(
                &msg.partner_id,
                &msg.delivery_id,
                now,
                now.plus_millis(DELIVERY_LEASE_MS),
            )
            .await?;
        let Some(delivery) = claimed else {
            let current = self
                .store()
                .get_delivery(&msg.partner_id, &msg.delivery_id)
                .await?;
            return Ok(match current {
                Some(d) if d.status.is_final() && d.wait && d.next_check_at.is_some() => {
                    DeliveryClaim::Settle(d)
                }
                Some(d) => DeliveryClaim::Skip(format!("delivery is {}", d.status.as_str())),
                None => DeliveryClaim::Skip("no such delivery".into()),
            });
        };
        let secrets = if delivery.channel == "webhook" {
            self.store()
                .webhook_secret(&delivery.partner_id, new_secret, now)
                .await?
                .signing_secrets(now)
        } else {
            Vec::new()
        };
        Ok(DeliveryClaim::Attempt(DeliveryTask { delivery, secrets }))
    }

    /// Record one attempt of a claimed delivery and what it leads to; a finished delivery that
    /// a step waits on is then reported to the step. `None` when the claim was lost meanwhile
    /// (the lease passed): nothing was recorded.
    pub async fn record_delivery_attempt(
        &self,
        task: &DeliveryTask,
        attempt: &DeliveryAttemptRecord,
        verdict: AttemptVerdict,
    ) -> Result<Option<DeliveryRecord>, EngineError> {
        let now = self.clock().now();
        let d = &task.delivery;
        let settle_until = d.wait.then(|| now.plus_millis(SETTLE_RETRY_MS));
        let recorded = self
            .store()
            .record_delivery_attempt(&d.partner_id, &d.id, attempt, verdict, now, settle_until)
            .await?;
        if let Some(rec) = &recorded {
            if rec.status.is_final() && rec.wait {
                self.settle_delivery(rec).await?;
            }
        }
        Ok(recorded)
    }

    /// Tell the step waiting on a finished delivery how it ended, then stop watching it. A step
    /// that moved on already (cancelled, told before) changes nothing.
    pub async fn settle_delivery(&self, d: &DeliveryRecord) -> Result<(), EngineError> {
        let attempts = u32::try_from(d.attempts).unwrap_or(u32::MAX);
        let outcome = if d.status == workflow_store::DeliveryStatus::Delivered {
            let log = self
                .store()
                .list_delivery_attempts(&d.partner_id, &d.id)
                .await?;
            let status = log
                .last()
                .and_then(|a| a.status_code)
                .and_then(|s| u16::try_from(s).ok());
            NotificationOutcome::Delivered { attempts, status }
        } else {
            NotificationOutcome::DeadLettered {
                error: d
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "not delivered".into()),
                attempts,
            }
        };
        let command = Command::NotificationResult {
            index: usize::try_from(d.step_index).unwrap_or(usize::MAX),
            delivery_id: d.id.clone(),
            outcome,
        };
        match self
            .pool_transition(&d.partner_id, &d.instance_id, command)
            .await?
        {
            ExecuteOutcome::Skipped(why) => {
                tracing::debug!(delivery = %d.id, %why, "delivery outcome not applied");
            }
            ExecuteOutcome::Applied | ExecuteOutcome::Perform(_) => {}
        }
        self.store()
            .mark_delivery_settled(&d.partner_id, &d.id)
            .await?;
        Ok(())
    }

    /// Re-publish the deliveries whose time has come (due retries, expired leases, steps not
    /// yet told); returns how many.
    pub async fn requeue_due_deliveries(&self, limit: u32) -> Result<usize, EngineError> {
        let now = self.clock().now();
        let messages = Mutex::new(Vec::new());
        let due =
            self.store()
                .requeue_due_deliveries(now, now.plus_millis(DELIVERY_LEASE_MS), limit, |d| {
                    let m = delivery_message(&d.partner_id, &d.instance_id, &d.id, now).map_err(
                        |e| StoreError::Corrupt {
                            message: e.to_string(),
                        },
                    )?;
                    messages
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push(m.clone());
                    Ok(m)
                })
                .await?;
        let messages = messages
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.outbox().committed(&messages);
        Ok(due.len())
    }

    /// Try a finished delivery again (a new round of the retry schedule, the same
    /// `webhook-id`). `NotFound` for another partner's delivery.
    pub async fn redeliver(
        &self,
        partner_id: &str,
        delivery_id: &str,
    ) -> Result<RedeliverOutcome, EngineError> {
        let now = self.clock().now();
        let mut sent = None;
        let outcome =
            self.store()
                .redeliver(
                    partner_id,
                    delivery_id,
                    now,
                    now.plus_millis(DELIVERY_LEASE_MS),
                    |d| {
                        let m = delivery_message(&d.partner_id, &d.instance_id, &d.id, now)
                            .map_err(|e| StoreError::Corrupt {
                                message: e.to_string(),
                            })?;
                        sent = Some(m.clone());
                        Ok(m)
                    },
                )
                .await
                .map_err(|e| match e {
                    StoreError::NotFound { .. } => EngineError::NotFound {
                        what: "delivery",
                        id: delivery_id.to_string(),
                    },
                    e => e.into(),
                })?;
        if let Some(m) = sent {
            self.outbox().committed(&[m]);
        }
        Ok(outcome)
    }

    /// The partner's webhook secrets, made with `new_secret` on first use.
    pub async fn webhook_secret(
        &self,
        partner_id: &str,
        new_secret: impl FnOnce() -> String,
    ) -> Result<WebhookSecretRecord, EngineError> {
        Ok(self
            .store()
            .webhook_secret(partner_id, new_secret, self.clock().now())
            .await?)
    }

    /// Rotate the partner's webhook secret to `new_secret`; the current one keeps signing for
    /// [`ROTATION_GRACE_MS`].
    pub async fn rotate_webhook_secret(
        &self,
        partner_id: &str,
        new_secret: String,
    ) -> Result<WebhookSecretRecord, EngineError> {
        let now = self.clock().now();
        Ok(self
            .store()
            .rotate_webhook_secret(
                partner_id,
                new_secret,
                now,
                now.plus_millis(ROTATION_GRACE_MS),
            )
            .await?)
    }
}
