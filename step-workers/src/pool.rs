//! One pool: members of a consumer group executing step commands.

use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use workflow_bus::{Bus, Message, Subscription};
use workflow_core::StepType;
use workflow_engine::messages::step_topic;
use workflow_engine::{DecisionCommand, Engine, ExecuteOutcome, StepMessage, DECISION_TOPIC};

use crate::action::ActionExecutor;

/// What a pool consumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolKind {
    /// Step commands of one step type.
    Steps(StepType),
    /// Approval decisions, applied in order per instance (part of the approval pool).
    ApprovalDecisions,
}

impl PoolKind {
    pub fn topic(self) -> String {
        match self {
            PoolKind::Steps(t) => step_topic(t),
            PoolKind::ApprovalDecisions => DECISION_TOPIC.to_string(),
        }
    }

    /// The consumer group.
    pub fn group(self) -> String {
        match self {
            PoolKind::Steps(t) => format!("pool-{}", t.as_str()),
            PoolKind::ApprovalDecisions => "pool-approval-decisions".to_string(),
        }
    }

    /// Every consumer a pool of this step type runs: the approval pool also applies decisions.
    pub fn for_step_type(step_type: StepType) -> Vec<PoolKind> {
        match step_type {
            StepType::Approval => vec![PoolKind::Steps(step_type), PoolKind::ApprovalDecisions],
            StepType::Condition | StepType::Action | StepType::Wait | StepType::Notification => {
                vec![PoolKind::Steps(step_type)]
            }
        }
    }
}

/// How a pool runs.
#[derive(Clone)]
pub struct PoolConfig {
    pub kind: PoolKind,
    /// Makes the calls of action steps (the action pool only). Without one, action steps stay
    /// in flight, visibly, until a pool that has one picks them up.
    pub actions: Option<std::sync::Arc<ActionExecutor>>,
    /// Members of the consumer group in this process; partitions are shared among them.
    pub members: usize,
    /// Attempts for a retryable failure before the command is given up (and logged).
    pub max_attempts: u32,
}

impl PoolConfig {
    pub fn new(kind: PoolKind) -> PoolConfig {
        PoolConfig {
            kind,
            actions: None,
            members: 2,
            max_attempts: 10,
        }
    }
}

/// Run the pool until cancelled.
pub async fn run_pool(
    engine: Engine,
    bus: std::sync::Arc<dyn Bus>,
    config: PoolConfig,
    cancel: CancellationToken,
) -> Result<(), workflow_bus::BusError> {
    let topic = config.kind.topic();
    let group = config.kind.group();
    let mut members = JoinSet::new();
    for _ in 0..config.members.max(1) {
        let sub = bus.subscribe(&topic, &group).await?;
        members.spawn(member(
            engine.clone(),
            sub,
            config.clone(),
            cancel.child_token(),
        ));
    }
    while let Some(res) = members.join_next().await {
        if let Err(e) = res {
            tracing::error!(error = %e, group = %config.kind.group(), "pool member crashed");
            cancel.cancel();
        }
    }
    Ok(())
}

async fn member(
    engine: Engine,
    mut sub: Box<dyn Subscription>,
    config: PoolConfig,
    cancel: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            _ = cancel.cancelled() => return,
            msg = sub.next() => msg,
        };
        let msg = match msg {
            Ok(Some(msg)) => msg,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "bus receive failed");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        // Cancellation between steps is fine; the uncommitted message is redelivered.
        if !handle(&engine, &msg, &config, &cancel).await {
            return;
        }
        if let Err(e) = sub.commit(&msg).await {
            tracing::warn!(error = %e, offset = msg.offset, "commit failed; message will be redelivered");
        }
    }
}

/// Handle one message. Returns false when cancelled before it finished.
async fn handle(
    engine: &Engine,
    msg: &Message,
    config: &PoolConfig,
    cancel: &CancellationToken,
) -> bool {
    match config.kind {
        PoolKind::Steps(_) => handle_step(engine, msg, config, cancel).await,
        PoolKind::ApprovalDecisions => handle_decision(engine, msg, config, cancel).await,
    }
}

async fn handle_decision(
    engine: &Engine,
    msg: &Message,
    config: &PoolConfig,
    cancel: &CancellationToken,
) -> bool {
    let cmd = match DecisionCommand::decode(&msg.payload) {
        Ok(cmd) => cmd,
        Err(e) => {
            tracing::error!(error = %e, topic = %msg.topic, offset = msg.offset, "undecodable decision skipped");
            return true;
        }
    };
    retrying(config, cancel, &cmd.instance_id, || {
        engine.apply_decision(&cmd)
    })
    .await
    .finished()
}

/// How a retried operation ended.
enum Attempted<T> {
    Done(T),
    /// Failed for good, or out of retries (logged); the message is done with.
    GaveUp,
    /// Cancelled while waiting to retry: leave the message uncommitted.
    Cancelled,
}

impl<T> Attempted<T> {
    /// Whether the message may be committed.
    fn finished(&self) -> bool {
        !matches!(self, Attempted::Cancelled)
    }
}

/// Run `op` until it succeeds, fails for good, or retries run out.
async fn retrying<T, F, Fut>(
    config: &PoolConfig,
    cancel: &CancellationToken,
    instance_id: &str,
    mut op: F,
) -> Attempted<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, workflow_engine::EngineError>>,
{
    let mut delay = Duration::from_millis(20);
    for attempt in 1..=config.max_attempts {
        match op().await {
            Ok(value) => return Attempted::Done(value),
            Err(e) if e.is_retryable() && attempt < config.max_attempts => {
                tracing::warn!(error = %e, attempt, instance = %instance_id, "retrying");
                tokio::select! {
                    _ = cancel.cancelled() => return Attempted::Cancelled,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                tracing::error!(error = %e, instance = %instance_id, "command failed permanently");
                return Attempted::GaveUp;
            }
        }
    }
    Attempted::GaveUp
}

async fn handle_step(
    engine: &Engine,
    msg: &Message,
    config: &PoolConfig,
    cancel: &CancellationToken,
) -> bool {
    let cmd = match StepMessage::decode(&msg.payload) {
        Ok(StepMessage::Execute(cmd)) => cmd,
        Ok(StepMessage::TimerFired(fired)) => {
            return retrying(config, cancel, &fired.instance_id, || {
                engine.fire_timer(&fired)
            })
            .await
            .finished();
        }
        Err(e) => {
            // Not ours to fix by retrying; the distributed runtime sends these to a dead-letter topic.
            tracing::error!(error = %e, topic = %msg.topic, offset = msg.offset, "undecodable step command skipped");
            return true;
        }
    };
    let executed = retrying(config, cancel, &cmd.instance_id, || {
        engine.execute_step(&cmd)
    })
    .await;
    let task = match executed {
        Attempted::Done(ExecuteOutcome::Perform(task)) => task,
        Attempted::Done(ExecuteOutcome::Skipped(why)) => {
            tracing::debug!(instance = %cmd.instance_id, step = cmd.step_index, %why, "step command skipped");
            return true;
        }
        other => return other.finished(),
    };
    let Some(executor) = &config.actions else {
        tracing::warn!(instance = %task.instance_id, step = task.step_index, "no action executor in this pool; the action stays in flight");
        return true;
    };
    let Some(outcome) = executor.perform(&task, cancel).await else {
        return false;
    };
    retrying(config, cancel, &task.instance_id, || {
        engine.record_action(&task, outcome.clone())
    })
    .await
    .finished()
}
