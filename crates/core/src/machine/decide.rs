//! Approval decisions: who may decide, the four-eyes rules, agents' bounded authority, quorum.
//!
//! [`check_decision`] is the whole eligibility policy, used both to refuse a decision and to
//! list what an actor may decide now (the pending inbox); [`apply_decision`] records an accepted
//! decision and moves the step on when quorum (or the rejection threshold) is reached.

use std::borrow::Cow;
use std::sync::Arc;

use serde_json::{json, Value};

use super::{complete_and_follow, finish, Event, MachineError, Transition};
use crate::expr::{CompiledExpressions, ExprLimits, InstanceContext};
use crate::instance::{
    ActorRef, ActorType, Decision, InstanceInfo, InstanceState, InstanceStatus, StepStatus, Verdict,
};
use crate::template::{
    ApprovalConfig, Approver, ApproverEntry, Route, StepKind, Template, TimeoutPolicy,
};
use crate::time::Timestamp;

/// Who is deciding: the actor and the roles its API key carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decider {
    pub actor: ActorRef,
    pub roles: Vec<String>,
}

/// A decision as it arrives.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DecisionRequest {
    pub decision_id: String,
    pub index: usize,
    pub decider: Decider,
    pub verdict: Verdict,
    pub comment: Option<String>,
}

fn matches(entry: &ApproverEntry, decider: &Decider) -> bool {
    match &entry.who {
        Approver::Role(role) => decider.roles.iter().any(|r| r == role),
        Approver::User(id) => {
            decider.actor.actor_type == ActorType::Human && &decider.actor.id == id
        }
        Approver::Agent(id) => {
            decider.actor.actor_type == ActorType::Agent && &decider.actor.id == id
        }
    }
}

/// Whether an entry's bounds allow an agent to approve this instance; `Err` says why not.
fn within_bounds(
    entry: &ApproverEntry,
    ctx: &InstanceContext<'_>,
    limits: &ExprLimits,
    compiled: &CompiledExpressions,
) -> Result<(), String> {
    if let Some(max) = entry.max_amount {
        match ctx.trigger().get("amount").and_then(Value::as_f64) {
            Some(amount) if amount <= max => {}
            Some(amount) => return Err(format!("amount {amount} is over its limit of {max}")),
            None => return Err(format!("the trigger has no amount to check against {max}")),
        }
    }
    if let Some(src) = &entry.limit {
        let result = compiled
            .get_or_compile(src, limits)
            .and_then(|e| e.evaluate_in(ctx));
        match result {
            Ok(Value::Bool(true)) => {}
            Ok(_) => return Err(format!("its limit `{src}` does not hold")),
            Err(e) => return Err(format!("its limit `{src}` could not be checked: {e}")),
        }
    }
    Ok(())
}

/// The approval step `index` and its config, if the instance waits on it now.
fn waiting_approval<'t>(
    template: &'t Template,
    state: &InstanceState,
    index: usize,
) -> Result<&'t ApprovalConfig, MachineError> {
    if state.status.is_terminal() {
        return Err(MachineError::Terminal {
            status: state.status.as_str(),
        });
    }
    let step = template
        .steps
        .get(index)
        .ok_or(MachineError::NoSuchStep { index })?;
    let StepKind::Approval(cfg) = &step.kind else {
        return Err(MachineError::NotApproval { index });
    };
    let waiting = state.current_step == Some(index)
        && state.execution(index).map(|e| e.status) == Some(StepStatus::Waiting);
    if !waiting {
        return Err(MachineError::NotWaiting { index });
    }
    Ok(cfg)
}

/// Could `decider` ever decide step `index` of an instance of `template`: is the step an
/// approval whose approvers, or whose escalation's approvers, name it? Every decision
/// [`check_decision`] allows passes this too, so a listing may leave out the steps it refuses
/// without reading their instances' state (the pending inbox scans many of them).
pub fn may_decide(template: &Template, index: usize, decider: &Decider) -> bool {
    let Some(StepKind::Approval(cfg)) = template.steps.get(index).map(|s| &s.kind) else {
        return false;
    };
    let escalated: &[ApproverEntry] = match &cfg.on_timeout {
        TimeoutPolicy::Escalate { approvers, .. } => approvers,
        _ => &[],
    };
    cfg.approvers
        .iter()
        .chain(escalated)
        .any(|e| matches(e, decider))
}

/// A decision someone would like to make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proposal<'a> {
    pub index: usize,
    pub decider: &'a Decider,
    pub verdict: Verdict,
    pub comment: Option<&'a str>,
}

/// May the proposal's decider give its verdict on its step now? Changes nothing.
pub fn check_decision(
    template: &Template,
    info: &InstanceInfo,
    state: &InstanceState,
    proposal: &Proposal<'_>,
    limits: &ExprLimits,
) -> Result<(), MachineError> {
    let Proposal {
        index,
        decider,
        verdict,
        comment,
    } = *proposal;
    let cfg = waiting_approval(template, state, index)?;
    let actor = &decider.actor;
    let already = state
        .execution(index)
        .is_some_and(|e| e.decisions.iter().any(|d| d.actor.id == actor.id));
    if already {
        return Err(MachineError::AlreadyDecided {
            index,
            actor: actor.id.clone(),
        });
    }
    let matched: Vec<&ApproverEntry> = current_approvers(cfg, state, index)
        .iter()
        .filter(|e| matches(e, decider))
        .collect();
    if matched.is_empty() {
        return Err(MachineError::NotEligible {
            index,
            actor: actor.id.clone(),
        });
    }
    if template.settings.separation_of_duties {
        if verdict == Verdict::Approve && info.created_by.id == actor.id {
            return Err(MachineError::SeparationOfDuties {
                rule: "requester_cannot_approve",
                message: format!("`{}` started this instance and cannot approve it", actor.id),
            });
        }
        let other = state
            .steps
            .iter()
            .find(|e| e.index != index && e.decisions.iter().any(|d| d.actor.id == actor.id));
        if let Some(other) = other {
            return Err(MachineError::SeparationOfDuties {
                rule: "one_step_per_actor",
                message: format!(
                    "`{}` already decided step {} `{}` of this instance",
                    actor.id, other.index, other.name
                ),
            });
        }
    }
    if verdict == Verdict::Approve && actor.actor_type == ActorType::Agent {
        let ctx = InstanceContext::new(template, info, state);
        let mut refusals = Vec::new();
        let allowed =
            matched.iter().any(
                |e| match within_bounds(e, &ctx, limits, &template.compiled) {
                    Ok(()) => true,
                    Err(why) => {
                        refusals.push(why);
                        false
                    }
                },
            );
        if !allowed {
            return Err(MachineError::AgentLimit {
                actor: actor.id.clone(),
                message: refusals.join("; "),
            });
        }
    }
    if verdict == Verdict::Reject
        && cfg.require_comment_on_reject
        && comment.is_none_or(|c| c.trim().is_empty())
    {
        return Err(MachineError::CommentRequired { index });
    }
    Ok(())
}

/// Who may decide the step now: its approvers, or the escalation's once it escalated.
fn current_approvers<'c>(
    cfg: &'c ApprovalConfig,
    state: &InstanceState,
    index: usize,
) -> &'c [ApproverEntry] {
    let level = state.execution(index).map_or(0, |e| e.escalations);
    match &cfg.on_timeout {
        TimeoutPolicy::Escalate { approvers, .. } if level > 0 => approvers,
        _ => &cfg.approvers,
    }
}

/// The `waiting_on.detail` of an approval step with these decisions so far.
pub(crate) fn approval_detail(
    cfg: &ApprovalConfig,
    approvers: &[ApproverEntry],
    decisions: &[Decision],
) -> Value {
    let approvals = decisions
        .iter()
        .filter(|d| d.verdict == Verdict::Approve)
        .count();
    json!({
        "approvers": approvers.iter().map(ApproverEntry::to_json).collect::<Vec<_>>(),
        "min_approvals": cfg.min_approvals,
        "approvals_needed": (cfg.min_approvals as usize).saturating_sub(approvals),
        "decisions": decisions,
    })
}

fn decision_summary(decisions: &[Decision], verdict: Verdict) -> Vec<Value> {
    decisions
        .iter()
        .filter(|d| d.verdict == verdict)
        .map(|d| json!({"actor": d.actor, "comment": d.comment, "at": d.at}))
        .collect()
}

pub(crate) fn apply_decision(
    template: &Template,
    info: &InstanceInfo,
    state: Cow<'_, InstanceState>,
    req: DecisionRequest,
    now: Timestamp,
    limits: &ExprLimits,
) -> Result<Transition, MachineError> {
    let index = req.index;
    let proposal = Proposal {
        index,
        decider: &req.decider,
        verdict: req.verdict,
        comment: req.comment.as_deref(),
    };
    check_decision(template, info, &state, &proposal, limits)?;
    let cfg = waiting_approval(template, &state, index)?;
    let actor = req.decider.actor.clone();
    let mut next = state.into_owned();
    let mut effects = Vec::new();
    let mut events = Vec::new();

    let decision = Decision {
        decision_id: req.decision_id,
        actor: actor.clone(),
        verdict: req.verdict,
        comment: req.comment.clone(),
        at: now,
    };
    events.push(Event {
        actor: actor.clone(),
        kind: match req.verdict {
            Verdict::Approve => "approval.approved",
            Verdict::Reject => "approval.rejected",
        },
        before: json!({"index": index, "status": "waiting"}),
        after: json!({"index": index, "decision": decision}),
        reason: req.comment.clone(),
    });
    let decisions = match next.execution_mut(index) {
        Some(exec) => {
            exec.decisions.push(decision);
            exec.decisions.clone()
        }
        None => return Err(MachineError::NotWaiting { index }),
    };
    let approvals = decisions
        .iter()
        .filter(|d| d.verdict == Verdict::Approve)
        .count();
    let rejections = decisions.len() - approvals;
    let output = json!({
        "approvals": decision_summary(&decisions, Verdict::Approve),
        "rejections": decision_summary(&decisions, Verdict::Reject),
    });

    if rejections >= cfg.reject_policy.threshold() {
        let name = template.steps.get(index).map_or("", |s| s.name.as_str());
        let message = format!(
            "step {index} `{name}` was rejected by `{}`{}",
            actor.id,
            req.comment
                .as_deref()
                .map(|c| format!(": {c}"))
                .unwrap_or_default()
        );
        if let Some(exec) = next.execution_mut(index) {
            exec.status = StepStatus::Rejected;
            exec.finished_at = Some(now);
            exec.output = Some(Arc::new(json!({"decision": "rejected", "detail": output})));
        }
        finish(
            &mut next,
            InstanceStatus::Rejected,
            now,
            Some(message),
            actor,
            &mut events,
        );
    } else if approvals >= cfg.min_approvals as usize {
        let mut out = output;
        if let Value::Object(map) = &mut out {
            map.insert("decision".into(), json!("approved"));
        }
        complete_and_follow(
            template,
            &mut next,
            index,
            now,
            out,
            Route::Continue,
            &actor,
            &mut effects,
            &mut events,
        );
    } else {
        // A decision leaves the escalation level as it was.
        let detail = approval_detail(cfg, current_approvers(cfg, &next, index), &decisions);
        if let Some(waiting) = next.waiting_on.as_mut() {
            let escalations = waiting.detail.get("escalations").cloned();
            waiting.detail = detail;
            if let (Some(level), Value::Object(map)) = (escalations, &mut waiting.detail) {
                map.insert("escalations".into(), level);
            }
        }
    }
    Ok(Transition {
        state: next,
        effects,
        events,
    })
}
