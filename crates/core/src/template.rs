//! The typed workflow template: what a partner configures, after validation.
//!
//! Templates arrive as JSON and are turned into these types only by [`crate::validate`], which
//! reports every problem with its JSON path. Once a [`Template`] exists it is known to be valid:
//! step references are in range and go forwards, every expression and placeholder compiled.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::expr::CompiledExpressions;

/// The five step types of the spec. A new one is a compile error everywhere it matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepType {
    Approval,
    Condition,
    Action,
    Wait,
    Notification,
}

impl StepType {
    pub const ALL: [StepType; 5] = [
        StepType::Approval,
        StepType::Condition,
        StepType::Action,
        StepType::Wait,
        StepType::Notification,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StepType::Approval => "approval",
            StepType::Condition => "condition",
            StepType::Action => "action",
            StepType::Wait => "wait",
            StepType::Notification => "notification",
        }
    }

    pub fn parse(s: &str) -> Option<StepType> {
        StepType::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

/// How an instance of the template may be started. Any template can also be started by hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TriggerType {
    Manual,
    OnTransfer,
}

impl TriggerType {
    pub const ALL: [TriggerType; 2] = [TriggerType::Manual, TriggerType::OnTransfer];

    pub fn as_str(self) -> &'static str {
        match self {
            TriggerType::Manual => "manual",
            TriggerType::OnTransfer => "on_transfer",
        }
    }

    pub fn parse(s: &str) -> Option<TriggerType> {
        TriggerType::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

/// A comparison in a trigger condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TriggerOp {
    Eq,
    Ne,
    Gt,
    Gte,
    Lt,
    Lte,
    In,
    NotIn,
    Contains,
    Exists,
}

/// `{field, op, value}`: `field` is a dotted path into the trigger payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TriggerCondition {
    pub field: String,
    pub op: TriggerOp,
    /// Absent only for `exists`, where it defaults to `true`.
    pub value: Option<Value>,
}

/// Where a condition step sends the instance next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The next step by index, or completion after the last step.
    Continue,
    /// Jump forward to this 0-based step index; the steps in between are skipped.
    SkipTo(usize),
    /// Complete the instance now.
    End,
    /// Fail the instance now.
    Fail,
}

/// Who may decide an approval step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "value", rename_all = "snake_case")]
pub enum Approver {
    Role(String),
    User(String),
    Agent(String),
}

/// One entry of an approval step's `approvers`, with the authority it grants an agent.
#[derive(Debug, Clone, PartialEq)]
pub struct ApproverEntry {
    pub who: Approver,
    /// An agent matched by this entry may approve only when `trigger.amount` is at most this.
    pub max_amount: Option<f64>,
    /// An agent matched by this entry may approve only when this CEL expression is true.
    pub limit: Option<String>,
}

impl ApproverEntry {
    /// Any approver: no bounds on agents.
    pub fn plain(who: Approver) -> ApproverEntry {
        ApproverEntry {
            who,
            max_amount: None,
            limit: None,
        }
    }

    pub fn is_bounded(&self) -> bool {
        self.max_amount.is_some() || self.limit.is_some()
    }

    /// The entry as the API shows it.
    pub fn to_json(&self) -> Value {
        let mut v = serde_json::to_value(&self.who).unwrap_or(Value::Null);
        if let Value::Object(map) = &mut v {
            if let Some(max) = self.max_amount {
                map.insert("max_amount".into(), serde_json::json!(max));
            }
            if let Some(limit) = &self.limit {
                map.insert("limit".into(), Value::String(limit.clone()));
            }
        }
        v
    }
}

/// When rejections reject the step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectPolicy {
    /// The first rejection rejects the step (the default).
    Any,
    /// This many rejections are needed.
    MinRejections(u32),
}

impl RejectPolicy {
    pub fn threshold(self) -> usize {
        match self {
            RejectPolicy::Any => 1,
            RejectPolicy::MinRejections(n) => n.max(1) as usize,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ApprovalConfig {
    /// Any of these may decide.
    pub approvers: Vec<ApproverEntry>,
    /// Quorum: how many approvals, by distinct actors, move the step on.
    pub min_approvals: u32,
    /// Deadline after the step starts, in milliseconds, from `timeout_hours` or `timeout`.
    pub timeout_ms: Option<i64>,
    pub reject_policy: RejectPolicy,
    /// A rejection without a comment is refused.
    pub require_comment_on_reject: bool,
    /// What happens when the deadline passes without a decision.
    pub on_timeout: TimeoutPolicy,
    /// Notifications to the approvers (on start, as a reminder, when overdue).
    pub notify: Option<ApprovalNotify>,
}

/// An approval's `on_timeout`. Without one, a step with a deadline is rejected when it passes:
/// money does not move on silence.
#[derive(Debug, Clone, PartialEq)]
pub enum TimeoutPolicy {
    /// Hand the step to new approvers with a new deadline, at most `max_escalations` times;
    /// past that, reject.
    Escalate {
        approvers: Vec<ApproverEntry>,
        timeout_ms: i64,
        max_escalations: u32,
    },
    Reject,
    Fail,
    /// Record that the deadline passed, notify through the step's `notify` channels (if
    /// any), and keep waiting.
    Notify,
    /// Approve on the approvers' behalf (only when the template says so explicitly).
    Approve,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ConditionConfig {
    /// CEL source; compiled (and checked for known roots) at validation.
    pub expression: String,
    pub if_true: Route,
    pub if_false: Route,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ActionConfig {
    /// The registered action's name, e.g. `execute_transfer`.
    pub action: String,
    /// Calls before giving up on retryable failures (timeouts, 5xx, 429).
    pub max_attempts: u32,
    /// Where the instance goes when the action fails for good: `fail` (the default),
    /// `continue` or `skip_to:N`.
    pub on_failure: Route,
}

impl ActionConfig {
    /// Three attempts, then fail.
    pub fn new(action: impl Into<String>) -> ActionConfig {
        ActionConfig {
            action: action.into(),
            max_attempts: 3,
            on_failure: Route::Fail,
        }
    }
}

/// A wait step: what it waits for, and what happens if that takes longer than `timeout_ms`.
#[derive(Debug, Clone, PartialEq)]
pub struct WaitStep {
    pub mode: WaitConfig,
    pub timeout_ms: Option<i64>,
    /// `continue`, `fail` (the default) or `skip_to:N`.
    pub on_timeout: Route,
}

impl WaitStep {
    /// A wait without a timeout.
    pub fn new(mode: WaitConfig) -> WaitStep {
        WaitStep {
            mode,
            timeout_ms: None,
            on_timeout: Route::Fail,
        }
    }
}

/// What a wait step waits for.
#[derive(Debug, Clone, PartialEq)]
pub enum WaitConfig {
    /// Milliseconds to pause.
    Duration(i64),
    /// CEL expression giving a timestamp.
    Until(String),
    /// A business window, kept as configured until the scheduler issue types it.
    Window(Value),
    /// Wait for a named signal.
    Signal(String),
}

/// Where a notification goes, as configured (placeholders unrendered: the content sent is the
/// step's rendered input).
#[derive(Debug, Clone, PartialEq)]
pub enum NotifyChannel {
    /// A Standard Webhooks POST to `url`; `event` is the envelope's `type`.
    Webhook { url: String, event: Option<String> },
    /// A plain-text email through the configured SMTP relay.
    Email { to: String, subject: String },
}

impl NotifyChannel {
    pub fn name(&self) -> &'static str {
        match self {
            NotifyChannel::Webhook { .. } => "webhook",
            NotifyChannel::Email { .. } => "email",
        }
    }
}

/// A notification step.
#[derive(Debug, Clone, PartialEq)]
pub struct NotificationConfig {
    pub channel: NotifyChannel,
    /// False (the default): the step completes once the delivery is durably queued. True: it
    /// waits until the delivery succeeds, or follows `on_failure` when it is dead-lettered.
    pub wait_for_delivery: bool,
    /// With `wait_for_delivery`: `fail` (the default), `continue` or `skip_to:N`.
    pub on_failure: Route,
}

impl NotificationConfig {
    /// Fire-and-forget on `channel`.
    pub fn new(channel: NotifyChannel) -> NotificationConfig {
        NotificationConfig {
            channel,
            wait_for_delivery: false,
            on_failure: Route::Fail,
        }
    }
}

/// An approval step's `notify` (and `remind_before`): who hears about the approval when it
/// starts waiting, before its deadline, and when the deadline passes with `on_timeout: notify`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApprovalNotify {
    /// One or two channels (`webhook`, `email`).
    pub channels: Vec<NotifyChannel>,
    /// Send a reminder this long before the deadline (needs a timeout longer than it).
    pub remind_before_ms: Option<i64>,
}

/// The typed configuration of a step.
#[derive(Debug, Clone, PartialEq)]
pub enum StepKind {
    Approval(ApprovalConfig),
    Condition(ConditionConfig),
    Action(ActionConfig),
    Wait(WaitStep),
    Notification(NotificationConfig),
}

impl StepKind {
    pub fn step_type(&self) -> StepType {
        match self {
            StepKind::Approval(_) => StepType::Approval,
            StepKind::Condition(_) => StepType::Condition,
            StepKind::Action(_) => StepType::Action,
            StepKind::Wait(_) => StepType::Wait,
            StepKind::Notification(_) => StepType::Notification,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub name: String,
    pub kind: StepKind,
    /// The step's `config` exactly as written; `{{ }}` placeholders in it are rendered when the
    /// step starts and the result is recorded as the step's input.
    pub raw_config: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TemplateSettings {
    /// Four-eyes rules for approvals; on unless the template switches them off.
    pub separation_of_duties: bool,
}

impl Default for TemplateSettings {
    fn default() -> Self {
        TemplateSettings {
            separation_of_duties: true,
        }
    }
}

/// A validated workflow template. Build it with [`crate::validate::parse_template`].
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    pub name: String,
    pub description: Option<String>,
    pub trigger_type: TriggerType,
    pub trigger_conditions: Vec<TriggerCondition>,
    pub steps: Vec<Step>,
    pub settings: TemplateSettings,
    /// Every expression and placeholder of the template, compiled by the validation (see
    /// [`CompiledExpressions`] for why). A template built by hand may leave it empty
    /// (`Default::default()`): expressions missing from it are compiled when evaluated.
    pub compiled: CompiledExpressions,
}
