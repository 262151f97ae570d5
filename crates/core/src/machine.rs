//! The instance state machine: one pure function from (state, command, now) to the next state,
//! the effects to carry out and the audit events to record.
//!
//! Workers load an instance, call [`apply`], and commit the returned state, effects (as outbox
//! messages) and events in one transaction. Nothing here does IO or reads a clock, so every
//! transition is unit- and property-tested.
//!
//! Invariants (checked by the property tests below):
//! - at most one execution exists per step index: no step runs twice;
//! - a terminal status is final: every command on a terminal instance is refused, state unchanged,
//!   with one exception that changes no status: the late outcome of an action call that was in
//!   flight when the instance was cancelled is recorded on its (cancelled) step, once, because
//!   money may have moved (see `action::apply_late_result`);
//! - a non-terminal instance is either `running` with its current step dispatched (pending or
//!   running) or `waiting` with `waiting_on` naming what it waits for.

use std::borrow::Cow;
use std::sync::Arc;

use serde_json::{json, Value};

use crate::expr::{ExprLimits, InstanceContext};
use crate::instance::{
    ActorRef, ActorType, InstanceInfo, InstanceState, InstanceStatus, StepExecution, StepStatus,
    Verdict, WaitingOn,
};

mod action;
mod decide;
mod notify;
mod timers;

use crate::render::render_compiled;
use crate::template::{
    ActionConfig, ApprovalConfig, Approver, ApproverEntry, ConditionConfig, NotificationConfig,
    Route, StepKind, StepType, Template, WaitStep,
};
use crate::time::Timestamp;
pub use action::ActionOutcome;
pub use decide::{check_decision, may_decide, Decider, Proposal};
pub use notify::{
    delivery_id, webhook_body, NotificationOutcome, NotificationSpec, NotifyPurpose,
    OutboundMessage, DEFAULT_STEP_EVENT,
};
pub use timers::{timer_id, TimerKind, TimerSpec};

/// What can happen to an instance.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// The pool for step `index`'s type picked up its command.
    ExecuteStep { index: usize },
    /// An approver approves or rejects approval step `index`.
    Decide {
        decision_id: String,
        index: usize,
        decider: Decider,
        verdict: Verdict,
        comment: Option<String>,
    },
    /// The scheduler fired a timer the instance asked for.
    TimerFired {
        timer_id: String,
        index: usize,
        kind: TimerKind,
    },
    /// A named signal arrived, for a wait step waiting on it.
    Signal {
        name: String,
        payload: Value,
        actor: ActorRef,
    },
    /// The action pool reports how step `index`'s call went. Shared: the pool keeps it to
    /// report again should the transition fail, and a transition retried after a lost race
    /// takes the command again; the one copy made is the step's output.
    ActionResult {
        index: usize,
        outcome: Arc<ActionOutcome>,
    },
    /// The delivery pool reports the outcome of the delivery notification step `index`
    /// waits on (`wait_for_delivery`).
    NotificationResult {
        index: usize,
        delivery_id: String,
        outcome: NotificationOutcome,
    },
    /// An actor cancels the instance.
    Cancel {
        actor: ActorRef,
        reason: Option<String>,
    },
}

/// Work the caller must carry out after committing the transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Send step `index` to the worker pool of its type.
    Dispatch { index: usize, step_type: StepType },
    /// Store a timer with this transition; the scheduler fires it when due.
    ScheduleTimer(TimerSpec),
    /// Call out for action step `index` with its rendered `input` (the action pool does it).
    PerformAction { index: usize, input: Arc<Value> },
    /// Queue a notification delivery with this transition (the delivery pool sends it).
    Notify(NotificationSpec),
}

/// An audit event produced by a transition.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub actor: ActorRef,
    pub kind: &'static str,
    pub before: Value,
    pub after: Value,
    pub reason: Option<String>,
}

/// The result of a successful [`apply`] or [`start`].
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub state: InstanceState,
    pub effects: Vec<Effect>,
    pub events: Vec<Event>,
}

/// Why a command was refused. The state is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MachineError {
    #[error("instance is {status} and can no longer change")]
    Terminal { status: &'static str },
    #[error("step {index} is not the current step")]
    NotCurrent { index: usize },
    #[error("step {index} was already executed")]
    AlreadyExecuted { index: usize },
    #[error("step {index} does not exist in the template")]
    NoSuchStep { index: usize },
    #[error("step {index} is not an approval step")]
    NotApproval { index: usize },
    #[error("step {index} is not waiting for a decision")]
    NotWaiting { index: usize },
    #[error("actor `{actor}` already decided step {index}")]
    AlreadyDecided { index: usize, actor: String },
    #[error("actor `{actor}` is not an eligible approver of step {index}")]
    NotEligible { index: usize, actor: String },
    /// A four-eyes rule refused the decision; `rule` names it.
    #[error("separation of duties ({rule}): {message}")]
    SeparationOfDuties { rule: &'static str, message: String },
    #[error("agent `{actor}` may not approve this: {message}; a human must decide")]
    AgentLimit { actor: String, message: String },
    #[error("a rejection of step {index} needs a comment")]
    CommentRequired { index: usize },
    #[error("no step of this instance is waiting for signal `{name}`")]
    NotWaitingForSignal { name: String },
}

impl MachineError {
    /// A stable, machine-readable name for the refusal (the API's error code).
    pub fn code(&self) -> &'static str {
        match self {
            MachineError::Terminal { .. } => "invalid_state",
            MachineError::NotCurrent { .. } | MachineError::AlreadyExecuted { .. } => {
                "invalid_state"
            }
            MachineError::NoSuchStep { .. } => "step_not_found",
            MachineError::NotApproval { .. } => "not_an_approval_step",
            MachineError::NotWaiting { .. } => "step_not_waiting",
            MachineError::AlreadyDecided { .. } => "already_decided",
            MachineError::NotEligible { .. } => "not_eligible",
            MachineError::SeparationOfDuties { .. } => "separation_of_duties",
            MachineError::AgentLimit { .. } => "agent_limit_exceeded",
            MachineError::CommentRequired { .. } => "comment_required",
            MachineError::NotWaitingForSignal { .. } => "not_waiting_for_signal",
        }
    }
}

/// The actor the engine records for what its worker pools do.
pub fn pool_actor(step_type: StepType) -> ActorRef {
    ActorRef {
        id: format!("pool:{}", step_type.as_str()),
        actor_type: ActorType::System,
    }
}

/// The actor the engine records for what the scheduler does.
pub fn scheduler_actor() -> ActorRef {
    ActorRef {
        id: "scheduler".into(),
        actor_type: ActorType::System,
    }
}

/// The first transition of a new instance: dispatch step 0.
pub fn start(template: &Template, info: &InstanceInfo, now: Timestamp) -> Transition {
    let mut state = InstanceState {
        status: InstanceStatus::Running,
        current_step: None,
        waiting_on: None,
        steps: Vec::new(),
        error: None,
        finished_at: None,
    };
    let mut effects = Vec::new();
    let mut events = vec![Event {
        actor: info.created_by.clone(),
        kind: "instance.created",
        before: Value::Null,
        after: with_member(
            json!({"status": "running", "template_id": info.template_id,
                "template_version": info.template_version}),
            "trigger",
            Value::clone(&info.trigger),
        ),
        reason: None,
    }];
    if template.steps.is_empty() {
        // Validation forbids this; finishing at once keeps the invariants even so.
        complete(&mut state, now, &mut events, info.created_by.clone());
    } else {
        dispatch(template, &mut state, 0, now, &mut effects, &mut events);
    }
    Transition {
        state,
        effects,
        events,
    }
}

/// Execute, within transition `t`, each step it dispatched whose type is in `inline`, as the
/// step's pool would on receiving its command, and so on for the steps those dispatch: one
/// transition (one commit) instead of a command, a hop and a commit per step. For steps that
/// only change the state and ask for what the same commit records (timers, deliveries): a
/// condition, an approval starting to wait, a wait, a notification.
///
/// An action only STARTS here: it is marked running with its rendered input (the intent its
/// call needs recorded first), and its command is still sent, as [`Effect::Dispatch`] (not
/// [`Effect::PerformAction`]): the action pool, finding the step running, makes the call and
/// reports it (see `action.rs`). That saves the pool's own commit of the start.
///
/// A step just dispatched is always executable, so the error (the checks of
/// [`Command::ExecuteStep`]) is not expected; it refuses the whole transition.
pub fn execute_inline(
    template: &Template,
    info: &InstanceInfo,
    mut t: Transition,
    inline: &[StepType],
    now: Timestamp,
    limits: &ExprLimits,
) -> Result<Transition, MachineError> {
    // Actions started here: their commands stay in the effects, for the pool.
    let mut started = Vec::new();
    // A step executes at most once, so this ends; the bound only guards that invariant.
    for _ in 0..=template.steps.len() {
        let next = t.effects.iter().enumerate().find_map(|(pos, e)| match e {
            Effect::Dispatch { index, step_type }
                if inline.contains(step_type) && !started.contains(index) =>
            {
                Some((pos, *index))
            }
            _ => None,
        });
        let Some((pos, index)) = next else { break };
        let mut step = execute_step(template, info, Cow::Owned(t.state), index, now, limits)?;
        // The audit trail says how the step ran (and latency figures pair it differently:
        // no command travelled to start it).
        for event in &mut step.events {
            if event.kind == "step.started" {
                if let Value::Object(after) = &mut event.after {
                    after.insert("inline".to_string(), Value::Bool(true));
                }
            }
        }
        t.effects.remove(pos);
        for effect in step.effects {
            match effect {
                Effect::PerformAction { index, .. } => {
                    started.push(index);
                    t.effects.push(Effect::Dispatch {
                        index,
                        step_type: StepType::Action,
                    });
                }
                other => t.effects.push(other),
            }
        }
        t.events.extend(step.events);
        t.state = step.state;
    }
    Ok(t)
}

/// Apply one command. On error the caller's state is untouched.
pub fn apply(
    template: &Template,
    info: &InstanceInfo,
    state: &InstanceState,
    command: Command,
    now: Timestamp,
    limits: &ExprLimits,
) -> Result<Transition, MachineError> {
    apply_to(template, info, Cow::Borrowed(state), command, now, limits)
}

/// [`apply`], taking over `state` for the next state instead of copying it (a caller that
/// drops the state it loaded anyway saves a deep copy of every step's input and output). On
/// error the state is dropped.
pub fn apply_owned(
    template: &Template,
    info: &InstanceInfo,
    state: InstanceState,
    command: Command,
    now: Timestamp,
    limits: &ExprLimits,
) -> Result<Transition, MachineError> {
    apply_to(template, info, Cow::Owned(state), command, now, limits)
}

/// Each transition checks the command against `state`, then turns `state` into the next state
/// (`Cow::into_owned`: copied only when borrowed).
fn apply_to(
    template: &Template,
    info: &InstanceInfo,
    state: Cow<'_, InstanceState>,
    command: Command,
    now: Timestamp,
    limits: &ExprLimits,
) -> Result<Transition, MachineError> {
    if state.status.is_terminal() {
        if let Command::ActionResult { index, outcome } = command {
            return action::apply_late_result(
                template,
                state,
                index,
                Arc::unwrap_or_clone(outcome),
                pool_actor(StepType::Action),
            );
        }
        return Err(MachineError::Terminal {
            status: state.status.as_str(),
        });
    }
    match command {
        Command::ExecuteStep { index } => execute_step(template, info, state, index, now, limits),
        Command::Decide {
            decision_id,
            index,
            decider,
            verdict,
            comment,
        } => decide::apply_decision(
            template,
            info,
            state,
            decide::DecisionRequest {
                decision_id,
                index,
                decider,
                verdict,
                comment,
            },
            now,
            limits,
        ),
        Command::TimerFired {
            timer_id,
            index,
            kind,
        } => timers::apply_timer(template, info, state, &timer_id, index, kind, now),
        Command::Signal {
            name,
            payload,
            actor,
        } => timers::apply_signal(template, state, &name, payload, actor, now),
        Command::ActionResult { index, outcome } => action::apply_result(
            template,
            state,
            index,
            Arc::unwrap_or_clone(outcome),
            pool_actor(StepType::Action),
            now,
        ),
        Command::NotificationResult {
            index,
            delivery_id,
            outcome,
        } => notify::apply_result(
            template,
            state,
            index,
            &delivery_id,
            outcome,
            pool_actor(StepType::Notification),
            now,
        ),
        Command::Cancel { actor, reason } => Ok(cancel(state, actor, reason, now)),
    }
}

fn execute_step(
    template: &Template,
    info: &InstanceInfo,
    state: Cow<'_, InstanceState>,
    index: usize,
    now: Timestamp,
    limits: &ExprLimits,
) -> Result<Transition, MachineError> {
    let step = template
        .steps
        .get(index)
        .ok_or(MachineError::NoSuchStep { index })?;
    match state.execution(index).map(|e| e.status) {
        Some(StepStatus::Pending) => {}
        Some(_) => return Err(MachineError::AlreadyExecuted { index }),
        None => return Err(MachineError::NotCurrent { index }),
    }
    if state.current_step != Some(index) {
        return Err(MachineError::NotCurrent { index });
    }

    let actor = pool_actor(step.kind.step_type());
    let mut effects = Vec::new();
    let mut events = Vec::new();

    // Everything the step evaluates reads the instance as it was before the step started: it
    // is all evaluated first, then the state is taken over for the next one.
    let ctx = InstanceContext::new(template, info, &state);
    let base_path = format!("$.steps[{index}].config");
    let prepared = render_compiled(
        &step.raw_config,
        &base_path,
        &ctx,
        limits,
        &template.compiled,
    )
    .map(|input| {
        let kind = match &step.kind {
            StepKind::Condition(cfg) => {
                Started::Condition(cfg, condition_outcome(template, cfg, &ctx, limits))
            }
            StepKind::Approval(cfg) => Started::Approval(cfg),
            StepKind::Action(cfg) => Started::Action(cfg),
            StepKind::Wait(cfg) => {
                Started::Wait(cfg, timers::wait_plan(template, cfg, &ctx, now, limits))
            }
            StepKind::Notification(cfg) => Started::Notification(cfg),
        };
        (input, kind)
    });
    drop(ctx);
    let mut next = state.into_owned();
    let (input, started) = match prepared {
        Ok(prepared) => prepared,
        Err(e) => {
            fail_step(&mut next, index, now, e.to_string(), actor, &mut events);
            return Ok(Transition {
                state: next,
                effects,
                events,
            });
        }
    };
    events.push(Event {
        actor: actor.clone(),
        kind: "step.started",
        before: json!({"index": index, "status": "pending"}),
        after: with_member(
            json!({"index": index, "status": "running"}),
            "input",
            input.clone(),
        ),
        reason: None,
    });
    let input = Arc::new(input);
    if let Some(exec) = next.execution_mut(index) {
        exec.status = StepStatus::Running;
        exec.started_at = Some(now);
        exec.actor = Some(actor.clone());
        exec.input = Some(Arc::clone(&input));
    }

    match started {
        Started::Condition(cfg, outcome) => match outcome {
            Ok(result) => {
                let route = if result { cfg.if_true } else { cfg.if_false };
                let output = json!({"result": result, "route": route_text(route)});
                complete_and_follow(
                    template,
                    &mut next,
                    index,
                    now,
                    output,
                    route,
                    &actor,
                    &mut effects,
                    &mut events,
                );
            }
            Err(message) => fail_step(&mut next, index, now, message, actor, &mut events),
        },
        Started::Approval(cfg) => {
            let waiting = approval_wait(cfg, index, now);
            timers::schedule_approval_deadline(info, index, waiting.due, &mut effects);
            timers::schedule_approval_reminder(info, cfg, index, 0, waiting.due, now, &mut effects);
            wait_on(&mut next, index, waiting, &actor, &mut events);
            notify::approval_notices(
                template,
                info,
                &next,
                index,
                NotifyPurpose::ApprovalRequested,
                0,
                &actor,
                &mut effects,
                &mut events,
            );
        }
        Started::Action(cfg) => {
            next.status = InstanceStatus::Running;
            next.waiting_on = Some(action::action_in_flight(cfg, index, now));
            let input = action::for_mode(input, info.mode);
            if let Some(exec) = next.execution_mut(index) {
                exec.input = Some(Arc::clone(&input));
            }
            effects.push(Effect::PerformAction { index, input });
        }
        Started::Wait(cfg, plan) => timers::start_wait(
            template,
            info,
            &mut next,
            index,
            cfg,
            plan,
            now,
            &actor,
            &mut effects,
            &mut events,
        ),
        Started::Notification(cfg) => notify::start_notification(
            template,
            info,
            &mut next,
            index,
            cfg,
            &input,
            now,
            &actor,
            &mut effects,
            &mut events,
        ),
    }
    Ok(Transition {
        state: next,
        effects,
        events,
    })
}

/// A step's kind with what it evaluated before the step started.
enum Started<'t> {
    Condition(&'t ConditionConfig, Result<bool, String>),
    Approval(&'t ApprovalConfig),
    Action(&'t ActionConfig),
    Wait(&'t WaitStep, Result<timers::WaitPlan, String>),
    Notification(&'t NotificationConfig),
}

/// The value of a condition step's expression, which must be a boolean.
fn condition_outcome(
    template: &Template,
    cfg: &ConditionConfig,
    ctx: &InstanceContext<'_>,
    limits: &ExprLimits,
) -> Result<bool, String> {
    template
        .compiled
        .get_or_compile(&cfg.expression, limits)
        .and_then(|expr| expr.evaluate_in(ctx))
        .map_err(|e| e.to_string())
        .and_then(|value| match value {
            Value::Bool(b) => Ok(b),
            other => Err(format!(
                "expression must give true or false, it gave {other}"
            )),
        })
}

/// `object` with member `key` set to `value`, moved in. What `json!({..., key: value})` gives,
/// without the copy `json!` makes of a JSON value by serialising it.
pub(crate) fn with_member(mut object: Value, key: &str, value: Value) -> Value {
    if let Value::Object(map) = &mut object {
        map.insert(key.to_string(), value);
    }
    object
}

fn route_text(route: Route) -> String {
    match route {
        Route::Continue => "continue".into(),
        Route::SkipTo(n) => format!("skip_to:{n}"),
        Route::End => "end".into(),
        Route::Fail => "fail".into(),
    }
}

/// "waiting for approval from role cfo or user u1".
pub(crate) fn waiting_description(approvers: &[ApproverEntry]) -> String {
    format!("waiting for approval from {}", approvers_text(approvers))
}

fn approvers_text(approvers: &[ApproverEntry]) -> String {
    approvers
        .iter()
        .map(|a| match &a.who {
            Approver::Role(r) => format!("role {r}"),
            Approver::User(u) => format!("user {u}"),
            Approver::Agent(a) => format!("agent {a}"),
        })
        .collect::<Vec<_>>()
        .join(" or ")
}

fn approval_wait(cfg: &ApprovalConfig, index: usize, now: Timestamp) -> WaitingOn {
    WaitingOn {
        step_index: index,
        kind: "approval".into(),
        description: format!(
            "waiting for {} approval(s) from {}",
            cfg.min_approvals,
            approvers_text(&cfg.approvers)
        ),
        since: now,
        due: cfg.timeout_ms.map(|ms| now.plus_millis(ms)),
        detail: decide::approval_detail(cfg, &cfg.approvers, &[]),
    }
}

pub(crate) fn wait_on(
    state: &mut InstanceState,
    index: usize,
    waiting: WaitingOn,
    actor: &ActorRef,
    events: &mut Vec<Event>,
) {
    if let Some(exec) = state.execution_mut(index) {
        exec.status = StepStatus::Waiting;
    }
    events.push(Event {
        actor: actor.clone(),
        kind: "step.waiting",
        before: json!({"index": index, "status": "running"}),
        after: json!({"index": index, "status": "waiting", "waiting_on": waiting}),
        reason: None,
    });
    state.status = InstanceStatus::Waiting;
    state.waiting_on = Some(waiting);
}

fn complete_step(
    state: &mut InstanceState,
    index: usize,
    now: Timestamp,
    output: Value,
    actor: &ActorRef,
    events: &mut Vec<Event>,
) {
    if let Some(exec) = state.execution_mut(index) {
        exec.status = StepStatus::Completed;
        exec.finished_at = Some(now);
        exec.output = Some(Arc::new(output.clone()));
    }
    events.push(Event {
        actor: actor.clone(),
        kind: "step.completed",
        before: json!({"index": index, "status": "running"}),
        after: with_member(
            json!({"index": index, "status": "completed"}),
            "output",
            output,
        ),
        reason: None,
    });
}

pub(crate) fn fail_step(
    state: &mut InstanceState,
    index: usize,
    now: Timestamp,
    message: String,
    actor: ActorRef,
    events: &mut Vec<Event>,
) {
    let before_status = state
        .execution(index)
        .map(|e| e.status)
        .unwrap_or(StepStatus::Pending);
    if let Some(exec) = state.execution_mut(index) {
        exec.status = StepStatus::Failed;
        exec.finished_at = Some(now);
        exec.error = Some(message.clone());
    }
    events.push(Event {
        actor: actor.clone(),
        kind: "step.failed",
        before: json!({"index": index, "status": before_status}),
        after: json!({"index": index, "status": "failed", "error": message}),
        reason: None,
    });
    finish(
        state,
        InstanceStatus::Failed,
        now,
        Some(message),
        actor,
        events,
    );
}

/// End step `index` the way a failure policy says: `fail` fails the step and the instance with
/// `failure` (keeping `output` on the step); any other route completes the step with `output`
/// and follows the route.
#[allow(clippy::too_many_arguments)]
pub(crate) fn end_step_by_route(
    template: &Template,
    state: &mut InstanceState,
    index: usize,
    now: Timestamp,
    route: Route,
    failure: String,
    output: Value,
    actor: &ActorRef,
    effects: &mut Vec<Effect>,
    events: &mut Vec<Event>,
) {
    match route {
        Route::Fail => {
            if let Some(exec) = state.execution_mut(index) {
                exec.output = Some(Arc::new(output));
            }
            fail_step(state, index, now, failure, actor.clone(), events);
        }
        route => complete_and_follow(
            template, state, index, now, output, route, actor, effects, events,
        ),
    }
}

/// Complete step `index` with `output`, then go where `route` says.
#[allow(clippy::too_many_arguments)]
pub(crate) fn complete_and_follow(
    template: &Template,
    state: &mut InstanceState,
    index: usize,
    now: Timestamp,
    output: Value,
    route: Route,
    actor: &ActorRef,
    effects: &mut Vec<Effect>,
    events: &mut Vec<Event>,
) {
    complete_step(state, index, now, output, actor, events);
    follow_route(template, state, index, route, now, actor, effects, events);
}

#[allow(clippy::too_many_arguments)]
fn follow_route(
    template: &Template,
    state: &mut InstanceState,
    index: usize,
    route: Route,
    now: Timestamp,
    actor: &ActorRef,
    effects: &mut Vec<Effect>,
    events: &mut Vec<Event>,
) {
    let target = match route {
        Route::Continue => index + 1,
        Route::SkipTo(target) => target,
        Route::End => template.steps.len(),
        Route::Fail => {
            let name = template
                .steps
                .get(index)
                .map(|s| s.name.as_str())
                .unwrap_or("");
            let message = format!("condition step `{name}` routed the instance to fail");
            finish(
                state,
                InstanceStatus::Failed,
                now,
                Some(message),
                actor.clone(),
                events,
            );
            return;
        }
    };
    // Validation only allows forward jumps; clamp anyway so a bad template can never loop.
    let target = target.max(index + 1);
    for skipped in (index + 1)..target.min(template.steps.len()) {
        if let Some(step) = template.steps.get(skipped) {
            state.steps.push(StepExecution {
                index: skipped,
                name: step.name.clone(),
                step_type: step.kind.step_type(),
                status: StepStatus::Skipped,
                started_at: None,
                finished_at: Some(now),
                actor: None,
                input: None,
                output: None,
                error: None,
                decisions: Vec::new(),
                escalations: 0,
            });
            events.push(Event {
                actor: actor.clone(),
                kind: "step.skipped",
                before: Value::Null,
                after: json!({"index": skipped, "status": "skipped", "by_route": route_text(route)}),
                reason: None,
            });
        }
    }
    if target >= template.steps.len() {
        complete(state, now, events, actor.clone());
    } else {
        dispatch(template, state, target, now, effects, events);
    }
}

fn dispatch(
    template: &Template,
    state: &mut InstanceState,
    index: usize,
    now: Timestamp,
    effects: &mut Vec<Effect>,
    events: &mut Vec<Event>,
) {
    let Some(step) = template.steps.get(index) else {
        return;
    };
    let step_type = step.kind.step_type();
    state.steps.push(StepExecution {
        index,
        name: step.name.clone(),
        step_type,
        status: StepStatus::Pending,
        started_at: None,
        finished_at: None,
        actor: None,
        input: None,
        output: None,
        error: None,
        decisions: Vec::new(),
        escalations: 0,
    });
    state.status = InstanceStatus::Running;
    state.current_step = Some(index);
    state.waiting_on = Some(WaitingOn {
        step_index: index,
        kind: "dispatch".into(),
        description: format!(
            "step {index} `{}` is queued for the {} workers",
            step.name,
            step_type.as_str()
        ),
        since: now,
        due: None,
        detail: json!({"pool": step_type.as_str()}),
    });
    effects.push(Effect::Dispatch { index, step_type });
    events.push(Event {
        actor: pool_actor(step_type),
        kind: "step.dispatched",
        before: Value::Null,
        after: json!({"index": index, "name": step.name, "type": step_type}),
        reason: None,
    });
}

fn complete(state: &mut InstanceState, now: Timestamp, events: &mut Vec<Event>, actor: ActorRef) {
    finish(state, InstanceStatus::Completed, now, None, actor, events);
}

pub(crate) fn finish(
    state: &mut InstanceState,
    status: InstanceStatus,
    now: Timestamp,
    error: Option<String>,
    actor: ActorRef,
    events: &mut Vec<Event>,
) {
    let before = state.status;
    state.status = status;
    state.current_step = None;
    state.waiting_on = None;
    state.finished_at = Some(now);
    state.error = error.clone();
    let kind = match status {
        InstanceStatus::Completed => "instance.completed",
        InstanceStatus::Rejected => "instance.rejected",
        InstanceStatus::Failed => "instance.failed",
        InstanceStatus::Cancelled => "instance.cancelled",
        // Not terminal: finish is never called with these.
        InstanceStatus::Running | InstanceStatus::Waiting => "instance.changed",
    };
    events.push(Event {
        actor,
        kind,
        before: json!({"status": before}),
        after: json!({"status": status, "error": error}),
        reason: None,
    });
}

fn cancel(
    state: Cow<'_, InstanceState>,
    actor: ActorRef,
    reason: Option<String>,
    now: Timestamp,
) -> Transition {
    let mut next = state.into_owned();
    let mut events = Vec::new();
    for exec in next.steps.iter_mut() {
        match exec.status {
            StepStatus::Pending | StepStatus::Running | StepStatus::Waiting => {
                exec.status = StepStatus::Cancelled;
                exec.finished_at = Some(now);
            }
            StepStatus::Completed
            | StepStatus::Skipped
            | StepStatus::Failed
            | StepStatus::Rejected
            | StepStatus::Cancelled => {}
        }
    }
    finish(
        &mut next,
        InstanceStatus::Cancelled,
        now,
        Some(reason.clone().unwrap_or_else(|| "cancelled".into())),
        actor,
        &mut events,
    );
    if let Some(last) = events.last_mut() {
        last.reason = reason;
    }
    Transition {
        state: next,
        effects: Vec::new(),
        events,
    }
}

#[cfg(test)]
mod tests;
