//! The `on_transfer` trigger: starts workflows from the transfer service's events.
//!
//! A consumer group (`workflow-triggers`) on the transfer service's topic (default
//! `payos.transfers.events`). Each message is an Avro `TransferEvent`; for it, every active
//! template of the event's partner with trigger type `on_transfer` whose `trigger_config`
//! conditions hold for the transfer (`workflow_core::trigger::matches`) gets one instance, whose
//! trigger payload is the transfer ([`TransferEvent::trigger`]: `id`, `amount` as a number,
//! `currency`, `metadata`...).
//!
//! Each instance is started with the idempotency key `transfer:<transfer id>:<template id>`, so
//! a redelivered or replayed event (or another event about the same transfer) starts nothing
//! new, and a crash half-way through an event's templates is finished by its redelivery. The
//! message is committed only after every matching template has its instance. A message that
//! cannot be decoded, or whose instances cannot be started after retries, goes to the
//! dead-letter topic (`workflow_engine::dead_letter`) and the partition moves on.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use workflow_bus::{Bus, BusError, Message, Subscription};
use workflow_core::instance::{ActorRef, ActorType, RunMode};
use workflow_core::template::TriggerType;
use workflow_engine::dead_letter::send_to_dead_letter;
use workflow_engine::messages::TransferEvent;
use workflow_engine::{Engine, EngineError};
use workflow_store::records::TemplateFilter;

/// The transfer service's events topic, unless configured otherwise.
pub const TRANSFER_EVENTS_TOPIC: &str = "payos.transfers.events";

/// The consumer group of the trigger consumers.
pub const TRIGGER_GROUP: &str = "workflow-triggers";

/// The id the engine records as the starter of transfer-triggered instances (a system actor).
pub const TRANSFER_TRIGGER_ACTOR: &str = "on_transfer";

/// Templates read per page when looking for the ones an event starts.
const TEMPLATE_PAGE: u32 = 100;

/// How the trigger consumer runs.
#[derive(Debug, Clone)]
pub struct TransferTriggerConfig {
    /// The transfer service's events topic.
    pub topic: String,
    /// The consumer group.
    pub group: String,
    /// Members of the group in this process; partitions are shared among them.
    pub members: usize,
    /// Attempts at an event whose instances fail to start for a retryable reason (the store is
    /// busy...) before it is dead-lettered.
    pub max_attempts: u32,
}

impl Default for TransferTriggerConfig {
    fn default() -> Self {
        TransferTriggerConfig {
            topic: TRANSFER_EVENTS_TOPIC.to_string(),
            group: TRIGGER_GROUP.to_string(),
            members: 1,
            max_attempts: 10,
        }
    }
}

/// What one transfer event did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TriggerOutcome {
    /// Instances started now: (template id, instance id).
    pub started: Vec<(String, String)>,
    /// Matching templates whose instance for this transfer already existed.
    pub already_started: Vec<String>,
}

/// Why a transfer event started nothing, for good or for now.
#[derive(Debug, thiserror::Error)]
pub enum TriggerError {
    /// The store or the engine failed in a way worth retrying.
    #[error("starting the instances of transfer `{transfer_id}` failed: {source}")]
    Engine {
        transfer_id: String,
        #[source]
        source: EngineError,
    },
}

impl TriggerError {
    fn is_retryable(&self) -> bool {
        match self {
            TriggerError::Engine { source, .. } => source.is_retryable(),
        }
    }
}

/// Run the trigger consumer until cancelled.
pub async fn run_transfer_triggers(
    engine: Engine,
    bus: Arc<dyn Bus>,
    config: TransferTriggerConfig,
    cancel: CancellationToken,
) -> Result<(), BusError> {
    let mut members = JoinSet::new();
    for _ in 0..config.members.max(1) {
        let sub = bus.subscribe(&config.topic, &config.group).await?;
        members.spawn(member(
            engine.clone(),
            bus.clone(),
            sub,
            config.clone(),
            cancel.child_token(),
        ));
    }
    crate::pool::join_members(members, &cancel, &config.group).await;
    Ok(())
}

async fn member(
    engine: Engine,
    bus: Arc<dyn Bus>,
    mut sub: Box<dyn Subscription>,
    config: TransferTriggerConfig,
    cancel: CancellationToken,
) -> Option<Box<dyn Subscription>> {
    // Every way out is the whole consumer stopping: the subscription goes back to be released
    // with the others' (`join_members`), so no member's leaving moves a partition from under
    // another finishing its event.
    loop {
        let msg = tokio::select! {
            _ = cancel.cancelled() => return Some(sub),
            msg = sub.next() => msg,
        };
        let msg = match msg {
            Ok(Some(msg)) => msg,
            Ok(None) => return Some(sub),
            Err(e) => {
                tracing::warn!(error = %e, "bus receive failed");
                if !pause(&cancel, Duration::from_millis(100)).await {
                    return Some(sub);
                }
                continue;
            }
        };
        // Cancelled before the event is done with: leave it uncommitted, it is redelivered.
        if !handle(&engine, bus.as_ref(), &msg, &config, &cancel).await {
            return Some(sub);
        }
        if let Err(e) = sub.commit(&msg).await {
            tracing::warn!(error = %e, offset = msg.offset, "commit failed; the event will be redelivered");
        }
    }
}

/// Handle one message. Returns false when cancelled before it was done with.
async fn handle(
    engine: &Engine,
    bus: &dyn Bus,
    msg: &Message,
    config: &TransferTriggerConfig,
    cancel: &CancellationToken,
) -> bool {
    let event = match TransferEvent::decode(&msg.payload) {
        Ok(event) => event,
        Err(e) => {
            let reason = format!("undecodable transfer event: {e}");
            return dead_letter(engine, bus, msg, &reason, cancel).await;
        }
    };
    let mut delay = Duration::from_millis(20);
    let mut attempt = 1;
    loop {
        match start_for_transfer(engine, &event).await {
            Ok(outcome) => {
                tracing::info!(
                    transfer = %event.transfer_id,
                    partner = %event.partner_id,
                    started = outcome.started.len(),
                    already_started = outcome.already_started.len(),
                    "transfer event handled"
                );
                return true;
            }
            Err(e) if e.is_retryable() && attempt < config.max_attempts => {
                tracing::warn!(error = %e, attempt, "retrying a transfer event");
                if !pause(cancel, delay).await {
                    return false;
                }
                delay = (delay * 2).min(Duration::from_secs(2));
                attempt += 1;
            }
            Err(e) => {
                let reason = format!("gave up after {attempt} attempt(s): {e}");
                return dead_letter(engine, bus, msg, &reason, cancel).await;
            }
        }
    }
}

/// Put `msg` on the dead-letter topic, retrying the publish until it succeeds. Returns false
/// when cancelled first (the message stays uncommitted).
async fn dead_letter(
    engine: &Engine,
    bus: &dyn Bus,
    msg: &Message,
    reason: &str,
    cancel: &CancellationToken,
) -> bool {
    let mut delay = Duration::from_millis(50);
    loop {
        match send_to_dead_letter(bus, msg, reason, engine.clock().now().0).await {
            Ok(()) => return true,
            Err(e) => {
                tracing::warn!(error = %e, offset = msg.offset, "cannot dead-letter; retrying");
                if !pause(cancel, delay).await {
                    return false;
                }
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Sleep `delay` unless cancelled first (then false).
async fn pause(cancel: &CancellationToken, delay: Duration) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

/// The idempotency key of the instance `event`'s transfer starts for `template_id`.
pub fn idempotency_key(transfer_id: &str, template_id: &str) -> String {
    format!("transfer:{transfer_id}:{template_id}")
}

/// Start an instance of every active `on_transfer` template of the event's partner whose
/// conditions hold for the transfer. Safe to call again for the same event: instances that
/// exist already are reported, not started twice.
pub async fn start_for_transfer(
    engine: &Engine,
    event: &TransferEvent,
) -> Result<TriggerOutcome, TriggerError> {
    let failed = |source: EngineError| TriggerError::Engine {
        transfer_id: event.transfer_id.clone(),
        source,
    };
    let trigger = event.trigger();
    let actor = ActorRef {
        id: TRANSFER_TRIGGER_ACTOR.to_string(),
        actor_type: ActorType::System,
    };
    let mut outcome = TriggerOutcome::default();
    let mut before_id = None;
    loop {
        let filter = TemplateFilter {
            trigger_type: Some(TriggerType::OnTransfer.as_str().to_string()),
            active: Some(true),
            before_id: before_id.take(),
            limit: TEMPLATE_PAGE,
        };
        let page = engine
            .store()
            .list_templates(&event.partner_id, &filter)
            .await
            .map_err(|e| failed(e.into()))?;
        for rec in &page {
            let template = match engine.parsed(rec) {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!(error = %e, template = %rec.id, "skipping a template that no longer parses");
                    continue;
                }
            };
            if !workflow_core::trigger::matches(&template.trigger_conditions, &trigger) {
                continue;
            }
            let started = engine
                .start_instance(
                    &event.partner_id,
                    &actor,
                    &rec.id,
                    trigger.clone(),
                    Some(idempotency_key(&event.transfer_id, &rec.id)),
                    RunMode::Live,
                )
                .await;
            match started {
                Ok(s) if s.created => outcome.started.push((rec.id.clone(), s.instance.info.id)),
                Ok(_) => outcome.already_started.push(rec.id.clone()),
                // Another event about the same transfer started it already.
                Err(EngineError::IdempotencyMismatch { .. }) => {
                    outcome.already_started.push(rec.id.clone())
                }
                // Deactivated or deleted since the page was read: it starts nothing now.
                Err(EngineError::TemplateInactive { .. } | EngineError::NotFound { .. }) => {}
                Err(e) if e.is_retryable() => return Err(failed(e)),
                Err(e) => {
                    tracing::error!(error = %e, template = %rec.id, transfer = %event.transfer_id, "cannot start an instance for a transfer");
                }
            }
        }
        if page.len() < TEMPLATE_PAGE as usize {
            return Ok(outcome);
        }
        before_id = page.last().map(|t| t.id.clone());
    }
}
