//! The state of one workflow instance: where it is, what it waits on, what each step did.
//!
//! This is the whole of an instance's mutable state; the store persists it as a document and the
//! state machine ([`crate::machine`]) is the only code that changes it.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::template::StepType;
use crate::time::Timestamp;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceStatus {
    /// A step command is on its way or being executed.
    Running,
    /// Blocked on something named in `waiting_on`.
    Waiting,
    Completed,
    Rejected,
    Failed,
    Cancelled,
}

impl InstanceStatus {
    pub const ALL: [InstanceStatus; 6] = [
        InstanceStatus::Running,
        InstanceStatus::Waiting,
        InstanceStatus::Completed,
        InstanceStatus::Rejected,
        InstanceStatus::Failed,
        InstanceStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            InstanceStatus::Running => "running",
            InstanceStatus::Waiting => "waiting",
            InstanceStatus::Completed => "completed",
            InstanceStatus::Rejected => "rejected",
            InstanceStatus::Failed => "failed",
            InstanceStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<InstanceStatus> {
        InstanceStatus::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// A terminal status is final: no event changes it.
    pub fn is_terminal(self) -> bool {
        match self {
            InstanceStatus::Running | InstanceStatus::Waiting => false,
            InstanceStatus::Completed
            | InstanceStatus::Rejected
            | InstanceStatus::Failed
            | InstanceStatus::Cancelled => true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Dispatched to its worker pool, not yet picked up.
    Pending,
    /// Picked up; the worker is executing it.
    Running,
    /// Blocked on something named in the instance's `waiting_on`.
    Waiting,
    Completed,
    /// Passed over by a `skip_to` route; never executed.
    Skipped,
    Failed,
    Rejected,
    Cancelled,
}

impl StepStatus {
    pub const ALL: [StepStatus; 8] = [
        StepStatus::Pending,
        StepStatus::Running,
        StepStatus::Waiting,
        StepStatus::Completed,
        StepStatus::Skipped,
        StepStatus::Failed,
        StepStatus::Rejected,
        StepStatus::Cancelled,
    ];

    /// The serialised name (what the API and the store show).
    pub fn as_str(self) -> &'static str {
        match self {
            StepStatus::Pending => "pending",
            StepStatus::Running => "running",
            StepStatus::Waiting => "waiting",
            StepStatus::Completed => "completed",
            StepStatus::Skipped => "skipped",
            StepStatus::Failed => "failed",
            StepStatus::Rejected => "rejected",
            StepStatus::Cancelled => "cancelled",
        }
    }
}

/// Who did something: a human or an agent acting for a partner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActorRef {
    pub id: String,
    #[serde(rename = "type")]
    pub actor_type: ActorType,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActorType {
    Human,
    Agent,
    /// The engine itself (a worker, the scheduler).
    System,
}

impl ActorType {
    pub const ALL: [ActorType; 3] = [ActorType::Human, ActorType::Agent, ActorType::System];

    /// The serialised name (what the API and the store show).
    pub fn as_str(self) -> &'static str {
        match self {
            ActorType::Human => "human",
            ActorType::Agent => "agent",
            ActorType::System => "system",
        }
    }
}

/// One step's execution record. At most one exists per step index: no step runs twice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepExecution {
    pub index: usize,
    pub name: String,
    #[serde(rename = "type")]
    pub step_type: StepType,
    pub status: StepStatus,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
    pub actor: Option<ActorRef>,
    /// The step's config with its `{{ }}` placeholders rendered, as the step saw it. Input and
    /// output are shared, not copied, by every clone of the record (the instance cache, the
    /// store's step mirror, the API's answer) and by the effects and events that carry them.
    pub input: Option<Arc<Value>>,
    pub output: Option<Arc<Value>>,
    pub error: Option<String>,
    /// Approval decisions, in the order they were accepted (approval steps only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub decisions: Vec<Decision>,
    /// How many times an approval deadline handed the step to new approvers.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub escalations: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Approve or reject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Approve,
    Reject,
}

/// One accepted approval decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// Unique per request; a redelivered decision command is recognised by it.
    pub decision_id: String,
    pub actor: ActorRef,
    pub verdict: Verdict,
    pub comment: Option<String>,
    pub at: Timestamp,
}

/// "Where is this workflow, and who is blocking it?"
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WaitingOn {
    pub step_index: usize,
    /// What kind of thing it waits for: `approval`, `action`, `wait`, `notification`, or
    /// `dispatch` while the step's command is in flight.
    pub kind: String,
    /// One sentence for a human.
    pub description: String,
    pub since: Timestamp,
    pub due: Option<Timestamp>,
    /// Kind-specific detail, e.g. the approvers.
    pub detail: Value,
}

/// The mutable state of one instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceState {
    pub status: InstanceStatus,
    /// The step the instance is at; `None` once it is terminal.
    pub current_step: Option<usize>,
    pub waiting_on: Option<WaitingOn>,
    /// Executions in the order they were created (skipped steps included).
    pub steps: Vec<StepExecution>,
    /// Why the instance failed, was rejected or cancelled.
    pub error: Option<String>,
    pub finished_at: Option<Timestamp>,
}

impl InstanceState {
    pub fn execution(&self, index: usize) -> Option<&StepExecution> {
        self.steps.iter().find(|s| s.index == index)
    }

    pub fn execution_mut(&mut self, index: usize) -> Option<&mut StepExecution> {
        self.steps.iter_mut().find(|s| s.index == index)
    }
}

/// How an instance runs its PayOS operations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunMode {
    /// Transfers really execute.
    #[default]
    Live,
    /// Every transfer action goes to the simulation endpoint instead: try a template safely.
    Simulate,
}

impl RunMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RunMode::Live => "live",
            RunMode::Simulate => "simulate",
        }
    }

    pub fn parse(s: &str) -> Option<RunMode> {
        [RunMode::Live, RunMode::Simulate]
            .into_iter()
            .find(|m| m.as_str() == s)
    }
}

/// Facts about an instance that never change after creation; the `instance` root of the
/// expression context.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceInfo {
    pub id: String,
    pub partner_id: String,
    pub template_id: String,
    pub template_version: i64,
    pub created_at: Timestamp,
    pub created_by: ActorRef,
    /// Shared by every clone of the instance's record, as step inputs and outputs are.
    pub trigger: Arc<Value>,
    pub mode: RunMode,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `as_str` is what serde writes, for every variant of each enum that has both.
    #[test]
    fn names_are_the_serialised_names() {
        fn serialised<T: Serialize>(v: T) -> String {
            serde_json::to_value(v)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default()
        }
        for s in InstanceStatus::ALL {
            assert_eq!(s.as_str(), serialised(s));
        }
        for s in StepStatus::ALL {
            assert_eq!(s.as_str(), serialised(s));
        }
        for t in ActorType::ALL {
            assert_eq!(t.as_str(), serialised(t));
        }
    }
}
