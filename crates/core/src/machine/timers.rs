//! Time in the state machine: wait steps, signals, approval deadlines and escalation.
//!
//! A step that must be woken later asks for a timer ([`Effect::ScheduleTimer`]); the scheduler
//! stores it with the transition and fires it when due as [`Command::TimerFired`]. A timer id
//! names the instance, the step, the kind and the escalation level, so a timer that no longer
//! matches the state (the step was decided, cancelled or escalated meanwhile) is recognised and
//! recorded as ignored: a decision and a timeout racing on one step have one outcome.
//!
//! [`Effect::ScheduleTimer`]: super::Effect::ScheduleTimer
//! [`Command::TimerFired`]: super::Command::TimerFired

use std::borrow::Cow;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::notify::{approval_notices, NotifyPurpose};
use super::{complete_and_follow, fail_step, finish, Effect, Event, MachineError, Transition};
use crate::expr::{ExprLimits, InstanceContext};
use crate::instance::{
    ActorRef, InstanceInfo, InstanceState, InstanceStatus, StepStatus, WaitingOn,
};
use crate::template::{
    ApprovalConfig, Route, StepKind, Template, TimeoutPolicy, WaitConfig, WaitStep,
};
use crate::time::Timestamp;
use crate::window::{BusinessWindow, Opening};

/// Why a timer exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimerKind {
    /// A wait step's time has come (duration, until, window opening).
    WaitElapsed,
    /// A wait step waited longer than its `timeout`.
    WaitTimeout,
    /// An approval's deadline passed without a decision.
    ApprovalTimeout,
    /// An approval's `remind_before` point: remind its approvers through `notify`.
    ApprovalReminder,
}

impl TimerKind {
    pub const ALL: [TimerKind; 4] = [
        TimerKind::WaitElapsed,
        TimerKind::WaitTimeout,
        TimerKind::ApprovalTimeout,
        TimerKind::ApprovalReminder,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TimerKind::WaitElapsed => "wait_elapsed",
            TimerKind::WaitTimeout => "wait_timeout",
            TimerKind::ApprovalTimeout => "approval_timeout",
            TimerKind::ApprovalReminder => "approval_reminder",
        }
    }

    pub fn parse(s: &str) -> Option<TimerKind> {
        TimerKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// A timer to store with the transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimerSpec {
    pub id: String,
    pub index: usize,
    pub kind: TimerKind,
    pub due: Timestamp,
}

/// The deterministic id of a timer: storing it twice is harmless.
pub fn timer_id(instance_id: &str, index: usize, kind: TimerKind, level: u32) -> String {
    format!("{instance_id}:{index}:{}:{level}", kind.as_str())
}

fn schedule(
    info: &InstanceInfo,
    index: usize,
    kind: TimerKind,
    level: u32,
    due: Timestamp,
    effects: &mut Vec<Effect>,
) -> String {
    let id = timer_id(&info.id, index, kind, level);
    effects.push(Effect::ScheduleTimer(TimerSpec {
        id: id.clone(),
        index,
        kind,
        due,
    }));
    id
}

/// The approval deadline timer of a step that just started waiting.
pub(crate) fn schedule_approval_deadline(
    info: &InstanceInfo,
    index: usize,
    due: Option<Timestamp>,
    effects: &mut Vec<Effect>,
) {
    if let Some(due) = due {
        schedule(info, index, TimerKind::ApprovalTimeout, 0, due, effects);
    }
}

/// The `remind_before` timer of an approval whose deadline is `due` (escalation `level`): none
/// without `notify.remind_before`, a deadline, or when the reminder point is already past.
pub(crate) fn schedule_approval_reminder(
    info: &InstanceInfo,
    cfg: &ApprovalConfig,
    index: usize,
    level: u32,
    due: Option<Timestamp>,
    now: Timestamp,
    effects: &mut Vec<Effect>,
) {
    let before = cfg.notify.as_ref().and_then(|n| n.remind_before_ms);
    if let (Some(due), Some(before)) = (due, before) {
        let at = due.plus_millis(-before);
        if at > now {
            schedule(info, index, TimerKind::ApprovalReminder, level, at, effects);
        }
    }
}

fn parse_instant(v: &Value) -> Option<Timestamp> {
    match v {
        Value::String(s) => chrono::DateTime::parse_from_rfc3339(s)
            .ok()
            .map(|d| Timestamp(d.timestamp_millis())),
        Value::Number(n) => n.as_i64().map(Timestamp),
        _ => None,
    }
}

/// When a wait step ends by itself (`until`, `None`: only a signal ends it), and how to
/// describe it. Worked out before the step starts: an `until` reads the instance's context.
pub(crate) struct WaitPlan {
    until: Option<Timestamp>,
    description: String,
    detail: Value,
}

/// The [`WaitPlan`] of a wait step starting at `now`; `Err` says why the step fails.
pub(crate) fn wait_plan(
    template: &Template,
    cfg: &WaitStep,
    ctx: &InstanceContext<'_>,
    now: Timestamp,
    limits: &ExprLimits,
) -> Result<WaitPlan, String> {
    let (until, description, detail) = match &cfg.mode {
        WaitConfig::Duration(ms) => (
            Some(now.plus_millis(*ms)),
            format!("waiting {ms} ms"),
            json!({"duration_ms": ms}),
        ),
        WaitConfig::Until(src) => {
            let at = template
                .compiled
                .get_or_compile(src, limits)
                .and_then(|e| e.evaluate_in(ctx))
                .map_err(|e| e.to_string())
                .and_then(|v| {
                    parse_instant(&v).ok_or_else(|| {
                        format!(
                            "`until` must give a timestamp (RFC 3339 or milliseconds), it gave {v}"
                        )
                    })
                })?;
            (
                Some(at),
                "waiting until a point in time".into(),
                json!({"until": src}),
            )
        }
        WaitConfig::Window(raw) => match BusinessWindow::parse(raw, "window") {
            Ok(window) => {
                let opens = match window.next_opening(now) {
                    Opening::OpenNow { .. } => now,
                    Opening::At(t) => t,
                };
                (
                    Some(opens),
                    "waiting for the business window to open".into(),
                    json!({"window": window.to_json()}),
                )
            }
            Err(problems) => {
                return Err(problems
                    .iter()
                    .map(|p| format!("{}: {}", p.path, p.problem))
                    .collect::<Vec<_>>()
                    .join("; "));
            }
        },
        WaitConfig::Signal(name) => (
            None,
            format!("waiting for signal `{name}`"),
            json!({"signal": name}),
        ),
    };
    Ok(WaitPlan {
        until,
        description,
        detail,
    })
}

/// Start a wait step (its execution is already `running`) as `plan` says, or fail it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn start_wait(
    template: &Template,
    info: &InstanceInfo,
    state: &mut InstanceState,
    index: usize,
    cfg: &WaitStep,
    plan: Result<WaitPlan, String>,
    now: Timestamp,
    actor: &ActorRef,
    effects: &mut Vec<Effect>,
    events: &mut Vec<Event>,
) {
    let WaitPlan {
        until,
        description,
        detail,
    } = match plan {
        Ok(plan) => plan,
        Err(message) => {
            fail_step(state, index, now, message, actor.clone(), events);
            return;
        }
    };
    if let Some(at) = until {
        if at <= now {
            // Already due (a past `until`, an open window): no timer, carry on.
            let output = json!({"waited_ms": 0});
            complete_and_follow(
                template,
                state,
                index,
                now,
                output,
                Route::Continue,
                actor,
                effects,
                events,
            );
            return;
        }
        schedule(info, index, TimerKind::WaitElapsed, 0, at, effects);
    }
    let timeout_due = cfg.timeout_ms.map(|ms| now.plus_millis(ms));
    if let Some(due) = timeout_due {
        schedule(info, index, TimerKind::WaitTimeout, 0, due, effects);
    }
    let due = match (until, timeout_due) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    super::wait_on(
        state,
        index,
        WaitingOn {
            step_index: index,
            kind: "wait".into(),
            description,
            since: now,
            due,
            detail,
        },
        actor,
        events,
    );
}

fn ignored(state: Cow<'_, InstanceState>, timer_id: &str, why: String) -> Transition {
    Transition {
        state: state.into_owned(),
        effects: Vec::new(),
        events: vec![Event {
            actor: super::scheduler_actor(),
            kind: "timer.ignored",
            before: Value::Null,
            after: json!({"timer_id": timer_id}),
            reason: Some(why),
        }],
    }
}

/// A timer fired. One that no longer matches the state is recorded as ignored.
pub(crate) fn apply_timer(
    template: &Template,
    info: &InstanceInfo,
    state: Cow<'_, InstanceState>,
    timer_id: &str,
    index: usize,
    kind: TimerKind,
    now: Timestamp,
) -> Result<Transition, MachineError> {
    let Some(step) = template.steps.get(index) else {
        return Err(MachineError::NoSuchStep { index });
    };
    let waiting = state.current_step == Some(index)
        && state.execution(index).map(|e| e.status) == Some(StepStatus::Waiting);
    let level = state.execution(index).map_or(0, |e| e.escalations);
    if !waiting || timer_id != timer_id_for(info, index, kind, level) {
        return Ok(ignored(
            state,
            timer_id,
            format!("step {index} is no longer waiting on this timer"),
        ));
    }
    let actor = super::scheduler_actor();
    let mut next = state.into_owned();
    let mut effects = Vec::new();
    let mut events = vec![Event {
        actor: actor.clone(),
        kind: "timer.fired",
        before: Value::Null,
        after: json!({"timer_id": timer_id, "kind": kind}),
        reason: None,
    }];
    match (&step.kind, kind) {
        (StepKind::Wait(_), TimerKind::WaitElapsed) => {
            let since = next.waiting_on.as_ref().map_or(now, |w| w.since);
            let output = json!({"waited_ms": now.0 - since.0});
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
        (StepKind::Wait(cfg), TimerKind::WaitTimeout) => super::end_step_by_route(
            template,
            &mut next,
            index,
            now,
            cfg.on_timeout,
            format!("step {index} `{}` timed out", step.name),
            json!({"timed_out": true}),
            &actor,
            &mut effects,
            &mut events,
        ),
        (StepKind::Approval(cfg), TimerKind::ApprovalTimeout) => {
            approval_timeout(
                template,
                info,
                &mut next,
                index,
                cfg,
                level,
                now,
                &mut effects,
                &mut events,
            );
        }
        (StepKind::Approval(_), TimerKind::ApprovalReminder) => {
            events.push(Event {
                actor: actor.clone(),
                kind: "approval.reminder",
                before: Value::Null,
                after: json!({"index": index, "escalations": level,
                    "due": next.waiting_on.as_ref().and_then(|w| w.due)}),
                reason: Some("remind_before the deadline".into()),
            });
            approval_notices(
                template,
                info,
                &next,
                index,
                NotifyPurpose::ApprovalReminder,
                level,
                &actor,
                &mut effects,
                &mut events,
            );
        }
        // `next` is still the state as it was: nothing changed it yet.
        _ => {
            return Ok(ignored(
                Cow::Owned(next),
                timer_id,
                format!("step {index} has no {} timer", kind.as_str()),
            ));
        }
    }
    Ok(Transition {
        state: next,
        effects,
        events,
    })
}

fn timer_id_for(info: &InstanceInfo, index: usize, kind: TimerKind, level: u32) -> String {
    match kind {
        // Wait timers are never re-armed.
        TimerKind::WaitElapsed | TimerKind::WaitTimeout => timer_id(&info.id, index, kind, 0),
        TimerKind::ApprovalTimeout | TimerKind::ApprovalReminder => {
            timer_id(&info.id, index, kind, level)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn approval_timeout(
    template: &Template,
    info: &InstanceInfo,
    state: &mut InstanceState,
    index: usize,
    cfg: &ApprovalConfig,
    level: u32,
    now: Timestamp,
    effects: &mut Vec<Effect>,
    events: &mut Vec<Event>,
) {
    let policy = &cfg.on_timeout;
    let actor = super::scheduler_actor();
    let name = template
        .steps
        .get(index)
        .map_or("", |s| s.name.as_str())
        .to_string();
    let reject = |state: &mut InstanceState, events: &mut Vec<Event>, why: String| {
        if let Some(exec) = state.execution_mut(index) {
            exec.status = StepStatus::Rejected;
            exec.finished_at = Some(now);
            exec.output = Some(Arc::new(json!({"decision": "timed_out"})));
        }
        finish(
            state,
            InstanceStatus::Rejected,
            now,
            Some(why),
            actor.clone(),
            events,
        );
    };
    match policy {
        TimeoutPolicy::Reject => reject(
            state,
            events,
            format!("step {index} `{name}` got no decision before its deadline"),
        ),
        TimeoutPolicy::Fail => fail_step(
            state,
            index,
            now,
            format!("step {index} `{name}` got no decision before its deadline"),
            actor,
            events,
        ),
        TimeoutPolicy::Approve => {
            let output =
                json!({"decision": "approved", "by": "timeout", "approvals": [], "rejections": []});
            complete_and_follow(
                template,
                state,
                index,
                now,
                output,
                Route::Continue,
                &actor,
                effects,
                events,
            );
        }
        TimeoutPolicy::Notify => {
            events.push(Event {
                actor: actor.clone(),
                kind: "approval.overdue",
                before: Value::Null,
                after: json!({"index": index, "name": name}),
                reason: Some("deadline passed; still waiting".into()),
            });
            approval_notices(
                template,
                info,
                state,
                index,
                NotifyPurpose::ApprovalOverdue,
                level,
                &actor,
                effects,
                events,
            );
        }
        TimeoutPolicy::Escalate {
            approvers,
            timeout_ms,
            max_escalations,
        } => {
            if level >= *max_escalations {
                reject(
                    state,
                    events,
                    format!("step {index} `{name}` got no decision after {level} escalation(s)"),
                );
                return;
            }
            let level = level + 1;
            let due = now.plus_millis(*timeout_ms);
            if let Some(exec) = state.execution_mut(index) {
                exec.escalations = level;
            }
            schedule(info, index, TimerKind::ApprovalTimeout, level, due, effects);
            schedule_approval_reminder(info, cfg, index, level, Some(due), now, effects);
            if let Some(w) = state.waiting_on.as_mut() {
                w.description = format!(
                    "escalated ({level}/{max_escalations}): {}",
                    super::waiting_description(approvers)
                );
                w.due = Some(due);
                if let Value::Object(detail) = &mut w.detail {
                    detail.insert(
                        "approvers".into(),
                        Value::Array(approvers.iter().map(|a| a.to_json()).collect()),
                    );
                    detail.insert("escalations".into(), json!(level));
                }
            }
            events.push(Event {
                actor: actor.clone(),
                kind: "approval.escalated",
                before: json!({"index": index, "escalations": level - 1}),
                after: json!({"index": index, "escalations": level,
                    "approvers": approvers.iter().map(|a| a.to_json()).collect::<Vec<_>>(), "due": due}),
                reason: Some("deadline passed without a decision".into()),
            });
            // The new approvers hear about it like the first ones did.
            approval_notices(
                template,
                info,
                state,
                index,
                NotifyPurpose::ApprovalRequested,
                level,
                &actor,
                effects,
                events,
            );
        }
    }
}

/// A named signal arrived for the instance; its payload becomes the wait step's output.
pub(crate) fn apply_signal(
    template: &Template,
    state: Cow<'_, InstanceState>,
    name: &str,
    payload: Value,
    actor: ActorRef,
    now: Timestamp,
) -> Result<Transition, MachineError> {
    let index = state
        .current_step
        .ok_or(MachineError::NotWaitingForSignal {
            name: name.to_string(),
        })?;
    let waits_for_it = matches!(
        template.steps.get(index).map(|s| &s.kind),
        Some(StepKind::Wait(WaitStep { mode: WaitConfig::Signal(n), .. })) if n == name
    ) && state.execution(index).map(|e| e.status) == Some(StepStatus::Waiting);
    if !waits_for_it {
        return Err(MachineError::NotWaitingForSignal {
            name: name.to_string(),
        });
    }
    let mut next = state.into_owned();
    let mut effects = Vec::new();
    let mut events = vec![Event {
        actor: actor.clone(),
        kind: "signal.received",
        before: Value::Null,
        after: json!({"index": index, "signal": name, "payload": payload}),
        reason: None,
    }];
    complete_and_follow(
        template,
        &mut next,
        index,
        now,
        payload,
        Route::Continue,
        &actor,
        &mut effects,
        &mut events,
    );
    Ok(Transition {
        state: next,
        effects,
        events,
    })
}
