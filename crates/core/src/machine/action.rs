//! Action steps: the machine asks the action pool to call out, and records what came back.
//!
//! Executing an action step marks it `running` and returns [`Effect::PerformAction`] with the
//! rendered input. The pool calls the PayOS API (or the `http` target) with an idempotency key
//! derived from the instance and step, retrying what is retryable, and reports the outcome as
//! [`Command::ActionResult`]. If the pool dies before reporting, the redelivered step command
//! finds the step still `running` and the pool calls again with the same key: the receiver
//! answers with its first result, so the operation happens once.
//!
//! Usually the transition that reaches the action starts it (`execute_inline`): the step is
//! committed `running` with its input in that transition, and its command only tells the pool
//! to make the call, exactly as a redelivered command would.
//!
//! [`Effect::PerformAction`]: super::Effect::PerformAction
//! [`Command::ActionResult`]: super::Command::ActionResult

use std::borrow::Cow;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{complete_and_follow, with_member, Event, MachineError, Transition};
use crate::instance::{ActorRef, InstanceState, InstanceStatus, RunMode, StepStatus, WaitingOn};
use crate::template::{ActionConfig, Route, StepKind, Template};
use crate::time::Timestamp;

/// What the action pool reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum ActionOutcome {
    /// The call succeeded; `output` becomes the step's output.
    Succeeded { output: Value, attempts: Vec<Value> },
    /// Every attempt failed, or one failed for good.
    Failed { error: String, attempts: Vec<Value> },
}

/// The PayOS operations a simulated instance must not perform for real.
const TRANSFER_ACTIONS: [&str; 2] = ["execute_transfer", "cancel_transfer"];

/// The call to make for this run mode: a simulated instance sends every transfer action to the
/// simulation endpoint instead, and its input says so (`simulated_action`).
pub(crate) fn for_mode(mut input: Arc<Value>, mode: RunMode) -> Arc<Value> {
    if mode != RunMode::Simulate {
        return input;
    }
    if let Value::Object(map) = Arc::make_mut(&mut input) {
        let action = map
            .get("action")
            .and_then(Value::as_str)
            .map(str::to_string);
        if let Some(action) = action.filter(|a| TRANSFER_ACTIONS.contains(&a.as_str())) {
            map.insert("action".into(), json!("simulate_transfer"));
            map.insert("simulated_action".into(), json!(action));
        }
    }
    input
}

/// The instance waits on its action pool while the call is in flight.
pub(crate) fn action_in_flight(cfg: &ActionConfig, index: usize, now: Timestamp) -> WaitingOn {
    WaitingOn {
        step_index: index,
        kind: "action".into(),
        description: format!("the action pool is running `{}`", cfg.action),
        since: now,
        due: None,
        detail: json!({"action": cfg.action, "max_attempts": cfg.max_attempts}),
    }
}

pub(crate) fn apply_result(
    template: &Template,
    state: Cow<'_, InstanceState>,
    index: usize,
    outcome: ActionOutcome,
    actor: ActorRef,
    now: Timestamp,
) -> Result<Transition, MachineError> {
    let Some(step) = template.steps.get(index) else {
        return Err(MachineError::NoSuchStep { index });
    };
    let StepKind::Action(cfg) = &step.kind else {
        return Err(MachineError::NotCurrent { index });
    };
    let running = state.current_step == Some(index)
        && state.execution(index).map(|e| e.status) == Some(StepStatus::Running);
    if !running {
        // A late or repeated report: the step already has its outcome.
        return Err(MachineError::AlreadyExecuted { index });
    }
    let mut next = state.into_owned();
    let mut effects = Vec::new();
    let mut events = Vec::new();
    match outcome {
        ActionOutcome::Succeeded { output, attempts } => {
            events.push(Event {
                actor: actor.clone(),
                kind: "action.succeeded",
                before: Value::Null,
                after: json!({"index": index, "action": cfg.action, "attempts": attempts.len()}),
                reason: None,
            });
            let output = with_member(
                with_member(json!({}), "response", output),
                "attempts",
                Value::Array(attempts),
            );
            complete_and_follow(
                template,
                &mut next,
                index,
                now,
                output,
                Route::Continue,
                &actor,
                &mut effects,
                &mut events,
            );
        }
        ActionOutcome::Failed { error, attempts } => {
            events.push(Event {
                actor: actor.clone(),
                kind: "action.failed",
                before: Value::Null,
                after: json!({"index": index, "action": cfg.action, "attempts": attempts.len(), "error": error}),
                reason: None,
            });
            super::end_step_by_route(
                template,
                &mut next,
                index,
                now,
                cfg.on_failure,
                format!("action `{}` failed: {error}", cfg.action),
                with_member(
                    json!({"failed": true, "error": error}),
                    "attempts",
                    Value::Array(attempts),
                ),
                &actor,
                &mut effects,
                &mut events,
            );
        }
    }
    Ok(Transition {
        state: next,
        effects,
        events,
    })
}

/// A report for an action step of an instance that was cancelled while the call was in flight.
///
/// The call may have moved money, so its outcome is not dropped: it is recorded on the step
/// (`output` with the response and every attempt, as a live report would be), the step and the
/// instance stay `cancelled`, and the audit trail gets `action.completed_after_cancel` (with the
/// response) or `action.failed_after_cancel`, so an operator sees what PayOS did. Only a step
/// whose call was started (`started_at` set: it was `running` when cancelled) qualifies, and
/// only once: a repeated report is refused by the recorded output.
pub(crate) fn apply_late_result(
    template: &Template,
    state: Cow<'_, InstanceState>,
    index: usize,
    outcome: ActionOutcome,
    actor: ActorRef,
) -> Result<Transition, MachineError> {
    let terminal = MachineError::Terminal {
        status: state.status.as_str(),
    };
    if state.status != InstanceStatus::Cancelled {
        return Err(terminal);
    }
    let Some(StepKind::Action(cfg)) = template.steps.get(index).map(|s| &s.kind) else {
        return Err(terminal);
    };
    let Some(exec) = state.execution(index) else {
        return Err(terminal);
    };
    if exec.status != StepStatus::Cancelled || exec.started_at.is_none() {
        // Cancelled before its call started: no call was made, nothing can report on it.
        return Err(terminal);
    }
    if exec.output.is_some() {
        return Err(MachineError::AlreadyExecuted { index });
    }
    let (kind, output, after) = match outcome {
        ActionOutcome::Succeeded { output, attempts } => (
            "action.completed_after_cancel",
            json!({"response": output, "attempts": attempts, "completed_after_cancel": true}),
            json!({"index": index, "action": cfg.action, "attempts": attempts.len(),
                "response": output, "status": "cancelled"}),
        ),
        ActionOutcome::Failed { error, attempts } => (
            "action.failed_after_cancel",
            json!({"failed": true, "error": error, "attempts": attempts,
                "completed_after_cancel": true}),
            json!({"index": index, "action": cfg.action, "attempts": attempts.len(),
                "error": error, "status": "cancelled"}),
        ),
    };
    let mut next = state.into_owned();
    if let Some(exec) = next.execution_mut(index) {
        exec.output = Some(Arc::new(output));
    }
    Ok(Transition {
        state: next,
        effects: Vec::new(),
        events: vec![Event {
            actor,
            kind,
            before: json!({"index": index, "status": "cancelled", "output": null}),
            after,
            reason: Some(format!(
                "the `{}` call was in flight when the instance was cancelled",
                cfg.action
            )),
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simulation_mode_routes_transfer_actions_to_the_simulation_endpoint() {
        let input = Arc::new(json!({"action": "execute_transfer", "params": {"transfer_id": "t"}}));
        let live = for_mode(Arc::clone(&input), RunMode::Live);
        assert!(
            Arc::ptr_eq(&live, &input),
            "a live input is shared, not copied"
        );
        assert_eq!(
            *for_mode(input, RunMode::Simulate),
            json!({"action": "simulate_transfer", "simulated_action": "execute_transfer", "params": {"transfer_id": "t"}})
        );
        let http = Arc::new(json!({"action": "http", "params": {"url": "https://x.test"}}));
        assert_eq!(
            for_mode(Arc::clone(&http), RunMode::Simulate),
            http,
            "only transfer actions are simulated"
        );
    }
}
