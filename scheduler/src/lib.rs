//! The scheduler: durable timers for wait steps and approval deadlines.
//!
//! Timers are stored by the engine in the same transaction as the state change that needs them.
//! This loop fires every due timer once: it writes a [`StepMessage::TimerFired`] for the step's
//! pool to the outbox and marks the timer fired in one transaction (the relay then publishes it,
//! keyed by instance id). Several schedulers may run: PostgreSQL hands each due row to one of
//! them (`FOR UPDATE SKIP LOCKED`), SQLite serialises them. A scheduler killed mid-way fires
//! nothing twice, and the pool that receives a fired timer checks it against the state, so a
//! timer that lost a race to a decision is recorded as ignored.
//!
//! It must never change an instance itself: it only turns due timers into messages.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use workflow_core::machine::TimerKind;
use workflow_core::{StepType, Timestamp};
use workflow_engine::messages::{encode_dead_letter, step_topic, DeadLetter};
use workflow_engine::{Engine, StepMessage, TimerFired};
use workflow_store::records::{OutboxMessage, TimerRecord};
use workflow_store::StoreError;

/// Where a timer that cannot be decoded goes (it was written by this engine, so never expected).
pub const DEAD_LETTER_TOPIC: &str = workflow_engine::dead_letter::DEAD_LETTER_TOPIC;

/// How the scheduler runs.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Timers fired per transaction.
    pub batch: u32,
    /// Longest sleep between looks, so timers written by other processes are seen.
    pub max_idle: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            batch: 500,
            max_idle: Duration::from_millis(50),
        }
    }
}

/// The fired-timer message of a timer: a [`StepMessage::TimerFired`] on its step's topic, or,
/// for a stored timer that names no known step type or timer kind (never written by this
/// engine), an Avro `DeadLetter` on [`DEAD_LETTER_TOPIC`] saying which timer and why. Either
/// way the timer is marked fired: a timer that cannot be delivered must not block the others.
pub fn fired_message(t: &TimerRecord, now: Timestamp) -> OutboxMessage {
    let decoded = (
        StepType::parse(&t.step_type),
        TimerKind::parse(&t.kind),
        usize::try_from(t.step_index).ok(),
    );
    let delivered = match decoded {
        (Some(step_type), Some(timer), Some(step_index)) => StepMessage::TimerFired(TimerFired {
            timer_id: t.id.clone(),
            partner_id: t.partner_id.clone(),
            instance_id: t.instance_id.clone(),
            step_index,
            step_type,
            timer,
            due_at: t.due_at.0,
            fired_at: now.0,
        })
        .encode()
        .map(|payload| (step_topic(step_type), payload))
        .map_err(|e| e.to_string()),
        _ => Err("it names no known step type, timer kind or step index".to_string()),
    };
    let (topic, payload) = delivered.unwrap_or_else(|why| {
        let reason = format!(
            "undecodable timer `{}` (step_type `{}`, kind `{}`, step_index {}, due_at {}): {why}",
            t.id, t.step_type, t.kind, t.step_index, t.due_at.0
        );
        tracing::error!(timer = %t.id, %reason, "timer dead-lettered");
        let letter = DeadLetter {
            // Not consumed from a topic: it comes from the timers table.
            topic: "timers".to_string(),
            partition: -1,
            offset: -1,
            key: Some(t.instance_id.clone().into_bytes()),
            payload: None,
            reason: reason.clone(),
            failed_at: now.0,
        };
        // Encoding a record of strings and numbers fails only if the schemas are broken (the
        // codec's tests); the reason as text still tells an operator what happened.
        let payload = encode_dead_letter(&letter).unwrap_or_else(|_| reason.into_bytes());
        (DEAD_LETTER_TOPIC.to_string(), payload)
    });
    OutboxMessage {
        // Unique per firing; the timer id itself identifies the timer to the pool.
        id: format!("timer:{}", t.id),
        topic,
        key: t.instance_id.clone(),
        payload,
    }
}

/// Fire what is due now; returns how many fired.
pub async fn fire_due(engine: &Engine, batch: u32) -> Result<usize, StoreError> {
    let now = engine.clock().now();
    let fired = engine
        .store()
        .fire_due_timers(now, batch, |t| fired_message(t, now))
        .await?;
    if !fired.is_empty() {
        // The same rows the store just committed: this process's relay publishes them at once.
        let rows: Vec<OutboxMessage> = fired.iter().map(|t| fired_message(t, now)).collect();
        engine.outbox().committed(&rows);
        for t in &fired {
            tracing::debug!(timer = %t.id, lateness_ms = now.0 - t.due_at.0, "timer fired");
        }
    }
    Ok(fired.len())
}

/// Run until cancelled.
pub async fn run(engine: Engine, config: SchedulerConfig, cancel: CancellationToken) {
    let changed = engine.timers_changed();
    loop {
        let wait = match fire_due(&engine, config.batch).await {
            Ok(n) if n as u32 >= config.batch => continue,
            Ok(_) => match engine.store().next_timer_due().await {
                Ok(Some(due)) => {
                    let ms = (due.0 - engine.clock().now().0).max(0) as u64;
                    Duration::from_millis(ms).min(config.max_idle)
                }
                Ok(None) => config.max_idle,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the next timer");
                    config.max_idle
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "firing timers failed; retrying");
                config.max_idle
            }
        };
        // A timer this process stores wakes it only if due before this look.
        let next_look = engine
            .clock()
            .now()
            .0
            .saturating_add(wait.as_millis() as i64);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = changed.sooner_than(next_look) => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use workflow_engine::messages::decode_dead_letter;

    fn timer(step_type: &str, kind: &str) -> TimerRecord {
        TimerRecord {
            id: "i:1:approval_timeout:0".into(),
            partner_id: "p".into(),
            instance_id: "i".into(),
            step_index: 1,
            step_type: step_type.into(),
            kind: kind.into(),
            due_at: Timestamp(5),
        }
    }

    #[test]
    fn a_timer_fires_onto_its_step_topic() {
        let msg = fired_message(&timer("approval", "approval_timeout"), Timestamp(6));
        assert_eq!(msg.topic, "workflow.steps.approval");
        assert_eq!(msg.key, "i");
        match StepMessage::decode(&msg.payload) {
            Ok(StepMessage::TimerFired(f)) => {
                assert_eq!((f.step_index, f.due_at, f.fired_at), (1, 5, 6));
                assert_eq!(f.timer, TimerKind::ApprovalTimeout);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_undecodable_timer_becomes_an_avro_dead_letter() {
        let msg = fired_message(&timer("teleport", "approval_timeout"), Timestamp(6));
        assert_eq!(msg.topic, DEAD_LETTER_TOPIC);
        let letter = decode_dead_letter(&msg.payload).expect("an Avro DeadLetter");
        assert_eq!(letter.key.as_deref(), Some(&b"i"[..]));
        assert_eq!(letter.failed_at, 6);
        assert!(letter.reason.contains("teleport"), "{}", letter.reason);
        let msg = fired_message(&timer("wait", "never"), Timestamp(6));
        assert_eq!(msg.topic, DEAD_LETTER_TOPIC);
        assert!(decode_dead_letter(&msg.payload).is_ok());
    }
}
