//! Notifications in the state machine: notification steps, and the approvals' `notify`,
//! `remind_before` reminders and `on_timeout: notify` notices.
//!
//! The machine never delivers anything. It turns the step's rendered input into a
//! [`NotificationSpec`] (an [`Effect::Notify`]) whose delivery id is deterministic in (instance,
//! step, purpose, escalation level, channel); the engine stores the delivery in the same
//! transaction as the transition (a transactional outbox) and the delivery pool sends it. A
//! notification step completes as soon as its delivery is queued, unless it sets
//! `wait_for_delivery`: then it waits, and [`Command::NotificationResult`] completes it
//! (delivered) or follows its `on_failure` route (dead-lettered; `fail` by default).
//!
//! [`Effect::Notify`]: super::Effect::Notify
//! [`Command::NotificationResult`]: super::Command::NotificationResult

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::{complete_and_follow, end_step_by_route, fail_step, wait_on, Effect, Event};
use super::{MachineError, Transition};
use crate::instance::{ActorRef, InstanceInfo, InstanceState, StepStatus, WaitingOn};
use crate::template::{NotificationConfig, NotifyChannel, Route, StepKind, Template};
use crate::time::Timestamp;

/// Why a notification is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NotifyPurpose {
    /// A notification step.
    Step,
    /// An approval step started waiting (or was escalated to new approvers).
    ApprovalRequested,
    /// `remind_before` its deadline.
    ApprovalReminder,
    /// The deadline passed with `on_timeout: notify`.
    ApprovalOverdue,
}

impl NotifyPurpose {
    pub const ALL: [NotifyPurpose; 4] = [
        NotifyPurpose::Step,
        NotifyPurpose::ApprovalRequested,
        NotifyPurpose::ApprovalReminder,
        NotifyPurpose::ApprovalOverdue,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NotifyPurpose::Step => "step",
            NotifyPurpose::ApprovalRequested => "approval_requested",
            NotifyPurpose::ApprovalReminder => "approval_reminder",
            NotifyPurpose::ApprovalOverdue => "approval_overdue",
        }
    }

    pub fn parse(s: &str) -> Option<NotifyPurpose> {
        NotifyPurpose::ALL.into_iter().find(|p| p.as_str() == s)
    }

    /// The webhook `type` of an approval notice.
    fn approval_event(self) -> &'static str {
        match self {
            NotifyPurpose::Step | NotifyPurpose::ApprovalRequested => "workflow.approval.requested",
            NotifyPurpose::ApprovalReminder => "workflow.approval.reminder",
            NotifyPurpose::ApprovalOverdue => "workflow.approval.overdue",
        }
    }
}

/// The default webhook `type` of a notification step without `event`.
pub const DEFAULT_STEP_EVENT: &str = "workflow.notification";

/// What to send, rendered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "channel", rename_all = "snake_case")]
pub enum OutboundMessage {
    /// The body is the Standard Webhooks envelope `{"type": event_type, "timestamp", "data"}`.
    Webhook {
        url: String,
        event_type: String,
        data: Value,
    },
    Email {
        to: String,
        subject: String,
        body: String,
    },
}

impl OutboundMessage {
    pub fn channel(&self) -> &'static str {
        match self {
            OutboundMessage::Webhook { .. } => "webhook",
            OutboundMessage::Email { .. } => "email",
        }
    }

    /// The URL or the address.
    pub fn target(&self) -> &str {
        match self {
            OutboundMessage::Webhook { url, .. } => url,
            OutboundMessage::Email { to, .. } => to,
        }
    }
}

/// A delivery to queue with the transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotificationSpec {
    /// Deterministic (see [`delivery_id`]); also the webhook's `webhook-id`.
    pub delivery_id: String,
    pub index: usize,
    pub purpose: NotifyPurpose,
    pub message: OutboundMessage,
    /// The step waits for this delivery's outcome.
    pub wait: bool,
}

/// How a delivery ended, reported by the delivery pool for a step that waits on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum NotificationOutcome {
    /// A 2xx answer (webhook) or an accepted message (email).
    Delivered { attempts: u32, status: Option<u16> },
    /// Dead-lettered: the last attempt failed, or one failed for good.
    DeadLettered { error: String, attempts: u32 },
}

/// The body of a webhook: the Standard Webhooks envelope `{"type", "timestamp", "data"}` with
/// the time the notification was queued, serialised once so every attempt sends these bytes.
pub fn webhook_body(event_type: &str, data: &Value, at: Timestamp) -> String {
    json!({"type": event_type, "timestamp": rfc3339(at), "data": data}).to_string()
}

/// The id of one delivery: `dlv_` and 32 hex digits of SHA-256 over (instance, step, purpose,
/// escalation level, channel). The same notification always gets the same id, so a receiver
/// deduplicates on it (it is the `webhook-id`), across retries and redeliveries.
pub fn delivery_id(
    instance_id: &str,
    index: usize,
    purpose: NotifyPurpose,
    level: u32,
    channel: &str,
) -> String {
    let digest = Sha256::digest(
        format!(
            "{instance_id}\n{index}\n{}\n{level}\n{channel}",
            purpose.as_str()
        )
        .as_bytes(),
    );
    let hex = hex::encode(digest);
    format!("dlv_{}", &hex[..32])
}

/// A rendered field as text: strings as they are, other values as compact JSON.
fn text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

fn http_url(v: Option<&Value>, field: &str) -> Result<String, String> {
    match v {
        Some(Value::String(u)) if u.starts_with("http://") || u.starts_with("https://") => {
            Ok(u.clone())
        }
        Some(other) => Err(format!(
            "`{field}` must render to an http:// or https:// URL, it gave {other}"
        )),
        None => Err(format!("`{field}` is missing")),
    }
}

fn nonempty(v: Option<&Value>, field: &str) -> Result<String, String> {
    match text(v) {
        Some(s) if !s.trim().is_empty() => Ok(s),
        _ => Err(format!("`{field}` rendered empty")),
    }
}

/// The message of a notification step, from its rendered input.
fn step_message(cfg: &NotificationConfig, input: &Value) -> Result<OutboundMessage, String> {
    match &cfg.channel {
        NotifyChannel::Webhook { .. } => Ok(OutboundMessage::Webhook {
            url: http_url(input.get("url"), "url")?,
            event_type: text(input.get("event")).unwrap_or_else(|| DEFAULT_STEP_EVENT.into()),
            data: input.get("payload").cloned().unwrap_or(Value::Null),
        }),
        NotifyChannel::Email { .. } => Ok(OutboundMessage::Email {
            to: nonempty(input.get("to"), "to")?,
            subject: nonempty(input.get("subject"), "subject")?,
            body: text(input.get("body")).unwrap_or_default(),
        }),
    }
}

/// Start notification step `index` (its execution is already `running`, with `input`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn start_notification(
    template: &Template,
    info: &InstanceInfo,
    state: &mut InstanceState,
    index: usize,
    cfg: &NotificationConfig,
    input: &Value,
    now: Timestamp,
    actor: &ActorRef,
    effects: &mut Vec<Effect>,
    events: &mut Vec<Event>,
) {
    let message = match step_message(cfg, input) {
        Ok(m) => m,
        Err(e) => {
            fail_step(state, index, now, e, actor.clone(), events);
            return;
        }
    };
    let id = delivery_id(&info.id, index, NotifyPurpose::Step, 0, message.channel());
    let (channel, target) = (message.channel(), message.target().to_string());
    events.push(Event {
        actor: actor.clone(),
        kind: "notification.queued",
        before: Value::Null,
        after: json!({"index": index, "delivery_id": id, "channel": channel, "target": target,
            "wait_for_delivery": cfg.wait_for_delivery}),
        reason: None,
    });
    effects.push(Effect::Notify(NotificationSpec {
        delivery_id: id.clone(),
        index,
        purpose: NotifyPurpose::Step,
        message,
        wait: cfg.wait_for_delivery,
    }));
    if cfg.wait_for_delivery {
        wait_on(
            state,
            index,
            WaitingOn {
                step_index: index,
                kind: "notification".into(),
                description: format!("waiting for the {channel} delivery to {target}"),
                since: now,
                due: None,
                detail: json!({"channel": channel, "target": target, "delivery_id": id}),
            },
            actor,
            events,
        );
    } else {
        let output =
            json!({"delivery_id": id, "channel": channel, "target": target, "status": "queued"});
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
    }
}

/// The delivery pool reports the outcome of a delivery that notification step `index` waits on.
pub(crate) fn apply_result(
    template: &Template,
    state: Cow<'_, InstanceState>,
    index: usize,
    delivery: &str,
    outcome: NotificationOutcome,
    actor: ActorRef,
    now: Timestamp,
) -> Result<Transition, MachineError> {
    let Some(step) = template.steps.get(index) else {
        return Err(MachineError::NoSuchStep { index });
    };
    let StepKind::Notification(cfg) = &step.kind else {
        return Err(MachineError::NotCurrent { index });
    };
    let waiting_on_it = state.current_step == Some(index)
        && state.execution(index).map(|e| e.status) == Some(StepStatus::Waiting)
        && state
            .waiting_on
            .as_ref()
            .and_then(|w| w.detail.get("delivery_id"))
            .and_then(Value::as_str)
            == Some(delivery);
    if !waiting_on_it {
        // A late or repeated report: the step already has its outcome.
        return Err(MachineError::AlreadyExecuted { index });
    }
    let mut next = state.into_owned();
    let mut effects = Vec::new();
    let mut events = Vec::new();
    match outcome {
        NotificationOutcome::Delivered { attempts, status } => {
            events.push(Event {
                actor: actor.clone(),
                kind: "notification.delivered",
                before: Value::Null,
                after: json!({"index": index, "delivery_id": delivery, "attempts": attempts, "status": status}),
                reason: None,
            });
            let output = json!({"delivery_id": delivery, "status": "delivered",
                "attempts": attempts, "response_status": status});
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
        NotificationOutcome::DeadLettered { error, attempts } => {
            events.push(Event {
                actor: actor.clone(),
                kind: "notification.dead_lettered",
                before: Value::Null,
                after: json!({"index": index, "delivery_id": delivery, "attempts": attempts, "error": error}),
                reason: None,
            });
            end_step_by_route(
                template,
                &mut next,
                index,
                now,
                cfg.on_failure,
                format!(
                    "notification `{}` was not delivered after {attempts} attempt(s): {error}",
                    step.name
                ),
                json!({"delivery_id": delivery, "status": "dead_lettered", "attempts": attempts, "error": error}),
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

fn rfc3339(t: Timestamp) -> Value {
    t.rfc3339().map_or(Value::Null, Value::String)
}

/// Notices to an approval step's approvers through its `notify` channels, from the step's
/// rendered input (`input.notify`): when it starts waiting (and on escalation), as a reminder,
/// or when it is overdue. Nothing when the step has no `notify`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn approval_notices(
    template: &Template,
    info: &InstanceInfo,
    state: &InstanceState,
    index: usize,
    purpose: NotifyPurpose,
    level: u32,
    actor: &ActorRef,
    effects: &mut Vec<Effect>,
    events: &mut Vec<Event>,
) {
    let Some(step) = template.steps.get(index) else {
        return;
    };
    let StepKind::Approval(cfg) = &step.kind else {
        return;
    };
    let Some(notify) = &cfg.notify else {
        return;
    };
    let rendered = state
        .execution(index)
        .and_then(|e| e.input.as_ref())
        .and_then(|i| i.get("notify"))
        .cloned()
        .unwrap_or(Value::Null);
    let waiting = state.waiting_on.as_ref();
    let approvers = waiting
        .and_then(|w| w.detail.get("approvers"))
        .cloned()
        .unwrap_or(Value::Null);
    let due = waiting.and_then(|w| w.due);
    let mut data = Map::new();
    data.insert("notice".into(), json!(purpose.as_str()));
    data.insert("instance_id".into(), json!(info.id));
    data.insert("template_id".into(), json!(info.template_id));
    data.insert("step_index".into(), json!(index));
    data.insert("step_name".into(), json!(step.name));
    data.insert("approvers".into(), approvers);
    data.insert("due".into(), due.map_or(Value::Null, rfc3339));
    data.insert("escalations".into(), json!(level));
    for channel in &notify.channels {
        let message = match channel {
            NotifyChannel::Webhook { .. } => {
                let cfg = rendered.get("webhook").cloned().unwrap_or(Value::Null);
                let mut data = data.clone();
                if let Some(payload) = cfg.get("payload") {
                    data.insert("payload".into(), payload.clone());
                }
                http_url(cfg.get("url"), "notify.webhook.url").map(|url| OutboundMessage::Webhook {
                    url,
                    event_type: purpose.approval_event().into(),
                    data: Value::Object(data),
                })
            }
            NotifyChannel::Email { .. } => {
                let cfg = rendered.get("email").cloned().unwrap_or(Value::Null);
                let prefix = match purpose {
                    NotifyPurpose::ApprovalReminder => "Reminder: ",
                    NotifyPurpose::ApprovalOverdue => "Overdue: ",
                    NotifyPurpose::Step | NotifyPurpose::ApprovalRequested => "",
                };
                let due_text = due
                    .map(rfc3339)
                    .and_then(|v| v.as_str().map(|s| format!(" before {s}")))
                    .unwrap_or_default();
                let default_body = format!(
                    "Instance {} is waiting for approval at step {index} `{}`{due_text}.",
                    info.id, step.name
                );
                nonempty(cfg.get("to"), "notify.email.to").and_then(|to| {
                    Ok(OutboundMessage::Email {
                        to,
                        subject: format!(
                            "{prefix}{}",
                            nonempty(cfg.get("subject"), "notify.email.subject")?
                        ),
                        body: text(cfg.get("body")).unwrap_or(default_body),
                    })
                })
            }
        };
        match message {
            Ok(message) => {
                let id = delivery_id(&info.id, index, purpose, level, message.channel());
                events.push(Event {
                    actor: actor.clone(),
                    kind: "notification.queued",
                    before: Value::Null,
                    after: json!({"index": index, "delivery_id": id, "purpose": purpose,
                        "channel": message.channel(), "target": message.target()}),
                    reason: None,
                });
                effects.push(Effect::Notify(NotificationSpec {
                    delivery_id: id,
                    index,
                    purpose,
                    message,
                    wait: false,
                }));
            }
            // A notice that cannot be addressed must not block the approval: record why.
            Err(why) => events.push(Event {
                actor: actor.clone(),
                kind: "notification.skipped",
                before: Value::Null,
                after: json!({"index": index, "purpose": purpose, "channel": channel.name()}),
                reason: Some(why),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_ids_are_deterministic_and_distinct() {
        let a = delivery_id("i", 1, NotifyPurpose::Step, 0, "webhook");
        assert_eq!(a, delivery_id("i", 1, NotifyPurpose::Step, 0, "webhook"));
        assert!(a.starts_with("dlv_") && a.len() == 36, "{a}");
        for other in [
            delivery_id("j", 1, NotifyPurpose::Step, 0, "webhook"),
            delivery_id("i", 2, NotifyPurpose::Step, 0, "webhook"),
            delivery_id("i", 1, NotifyPurpose::ApprovalReminder, 0, "webhook"),
            delivery_id("i", 1, NotifyPurpose::Step, 1, "webhook"),
            delivery_id("i", 1, NotifyPurpose::Step, 0, "email"),
        ] {
            assert_ne!(a, other);
        }
    }

    #[test]
    fn purposes_round_trip() {
        for p in NotifyPurpose::ALL {
            assert_eq!(NotifyPurpose::parse(p.as_str()), Some(p));
        }
        assert_eq!(NotifyPurpose::parse("nope"), None);
    }
}
