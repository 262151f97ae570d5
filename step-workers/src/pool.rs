//! One pool: members of a consumer group executing step commands.

use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use workflow_bus::{Bus, Message, Subscription};
use workflow_core::StepType;
use workflow_engine::messages::step_topic;
use workflow_engine::{Engine, ExecuteOutcome, StepCommand};

/// How a pool runs.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub step_type: StepType,
    /// Members of the consumer group in this process; partitions are shared among them.
    pub members: usize,
    /// Attempts for a retryable failure before the command is given up (and logged).
    pub max_attempts: u32,
}

impl PoolConfig {
    pub fn new(step_type: StepType) -> PoolConfig {
        PoolConfig {
            step_type,
            members: 2,
            max_attempts: 10,
        }
    }
}

/// The consumer group of a step type's pool.
pub fn group_name(step_type: StepType) -> String {
    format!("pool-{}", step_type.as_str())
}

/// Run the pool until cancelled.
pub async fn run_pool(
    engine: Engine,
    bus: std::sync::Arc<dyn Bus>,
    config: PoolConfig,
    cancel: CancellationToken,
) -> Result<(), workflow_bus::BusError> {
    let topic = step_topic(config.step_type);
    let group = group_name(config.step_type);
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
            tracing::error!(error = %e, pool = config.step_type.as_str(), "pool member crashed");
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

/// Execute one message. Returns false when cancelled before it finished.
async fn handle(
    engine: &Engine,
    msg: &Message,
    config: &PoolConfig,
    cancel: &CancellationToken,
) -> bool {
    let cmd = match StepCommand::decode(&msg.payload) {
        Ok(cmd) => cmd,
        Err(e) => {
            // Not ours to fix by retrying; the distributed runtime sends these to a dead-letter topic.
            tracing::error!(error = %e, topic = %msg.topic, offset = msg.offset, "undecodable step command skipped");
            return true;
        }
    };
    let mut delay = Duration::from_millis(20);
    for attempt in 1..=config.max_attempts {
        match engine.execute_step(&cmd).await {
            Ok(ExecuteOutcome::Applied) => return true,
            Ok(ExecuteOutcome::Skipped(why)) => {
                tracing::debug!(instance = %cmd.instance_id, step = cmd.step_index, %why, "step command skipped");
                return true;
            }
            Err(e) if e.is_retryable() && attempt < config.max_attempts => {
                tracing::warn!(error = %e, attempt, instance = %cmd.instance_id, "retrying step");
                tokio::select! {
                    _ = cancel.cancelled() => return false,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                tracing::error!(error = %e, instance = %cmd.instance_id, step = cmd.step_index, "step failed permanently");
                return true;
            }
        }
    }
    true
}
