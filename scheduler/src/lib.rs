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
use workflow_engine::messages::step_topic;
use workflow_engine::{Engine, StepMessage, TimerFired};
use workflow_store::records::{OutboxMessage, TimerRecord};
use workflow_store::StoreError;

/// Where a timer that cannot be decoded goes (it was written by this engine, so never expected).
pub const DEAD_LETTER_TOPIC: &str = "workflow.dead-letters";

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

/// The fired-timer message of a timer.
pub fn fired_message(t: &TimerRecord, now: Timestamp) -> OutboxMessage {
    let decoded = (StepType::parse(&t.step_type), TimerKind::parse(&t.kind));
    let (topic, payload) = match decoded {
        (Some(step_type), Some(timer)) => {
            let msg = StepMessage::TimerFired(TimerFired {
                timer_id: t.id.clone(),
                partner_id: t.partner_id.clone(),
                instance_id: t.instance_id.clone(),
                step_index: usize::try_from(t.step_index).unwrap_or(usize::MAX),
                step_type,
                timer,
                due_at: t.due_at.0,
                fired_at: now.0,
            });
            (step_topic(step_type), msg.encode())
        }
        _ => (
            DEAD_LETTER_TOPIC.to_string(),
            format!(
                "{{\"reason\":\"undecodable timer\",\"timer_id\":{:?},\"step_type\":{:?},\"kind\":{:?}}}",
                t.id, t.step_type, t.kind
            )
            .into_bytes(),
        ),
    };
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
        engine.outbox_ready().notify_one();
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
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = changed.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
