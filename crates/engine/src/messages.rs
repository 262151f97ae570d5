//! The messages that travel on the bus, and their topics.
//!
//! Every payload is Avro, single-object encoded by `workflow-codec` with the schemas of
//! `schemas/*.avsc` (the bytes name their writer schema, so a message written with the previous
//! version of a schema still decodes). The engine keeps its own types (`usize` step indexes, the
//! domain's enums); this module is the one place that maps them to and from the codec's types,
//! for both runtimes: the in-process bus carries the same bytes as Kafka.
//!
//! Every command carries a unique id (`command_id`, `decision_id`, `event_id`) so consumers can
//! recognise redeliveries. Decoding never panics: bytes that are not such a message, or whose
//! fields do not fit the engine's types, are a [`MessageError`].

use serde_json::{Map, Number, Value};
use workflow_codec::{self as codec, Message as _};
use workflow_core::instance::{
    ActorRef, ActorType, InstanceInfo, InstanceState, StepStatus, Verdict,
};
use workflow_core::machine::TimerKind;
use workflow_core::StepType;

pub use workflow_codec::{DeadLetter, LifecycleEventKind};

/// Step commands for pool `<type>` go to `workflow.steps.<type>`.
pub const STEP_TOPIC_PREFIX: &str = "workflow.steps.";

/// Approval decisions travel on one topic, keyed by instance id, so the decisions of one
/// instance are applied one after another, in the order they were made.
pub const DECISION_TOPIC: &str = "workflow.approvals.decisions";

/// Instance milestones for other services ([`LifecycleEvent`]), keyed by instance id.
pub const LIFECYCLE_TOPIC: &str = "workflow.lifecycle";

/// The topic a step type's pool consumes.
pub fn step_topic(step_type: StepType) -> String {
    format!("{STEP_TOPIC_PREFIX}{}", step_type.as_str())
}

/// Why a message could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    /// The codec refused the message: not Avro single-object bytes, an unknown writer schema,
    /// another schema than expected, or a body that does not match its schema.
    #[error("{operation} a {what} message failed: {source}")]
    Codec {
        what: &'static str,
        operation: &'static str,
        #[source]
        source: codec::CodecError,
    },
    /// A field decoded but does not fit the engine's type (a negative step index...), or an
    /// engine value does not fit the schema (a step index beyond Avro's `int`).
    #[error("{what}: field `{field}` {problem}")]
    InvalidField {
        what: &'static str,
        field: &'static str,
        problem: String,
    },
}

impl MessageError {
    fn encoding(what: &'static str) -> impl FnOnce(codec::CodecError) -> MessageError {
        move |source| MessageError::Codec {
            what,
            operation: "encoding",
            source,
        }
    }

    fn decoding(what: &'static str) -> impl FnOnce(codec::CodecError) -> MessageError {
        move |source| MessageError::Codec {
            what,
            operation: "decoding",
            source,
        }
    }

    fn field(what: &'static str, field: &'static str, problem: impl Into<String>) -> MessageError {
        MessageError::InvalidField {
            what,
            field,
            problem: problem.into(),
        }
    }
}

/// "Execute step `step_index` of instance `instance_id`", keyed by the instance id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepCommand {
    pub command_id: String,
    pub partner_id: String,
    pub instance_id: String,
    pub step_index: usize,
    pub step_type: StepType,
    /// When the command was committed (ms); step latency is measured from here.
    pub issued_at: i64,
}

impl StepCommand {
    /// The [`StepMessage`] carrying this command, encoded.
    pub fn encode(&self) -> Result<Vec<u8>, MessageError> {
        StepMessage::Execute(self.clone()).encode()
    }

    fn to_codec(&self) -> Result<codec::StepCommand, MessageError> {
        Ok(codec::StepCommand {
            command_id: self.command_id.clone(),
            partner_id: self.partner_id.clone(),
            instance_id: self.instance_id.clone(),
            step_index: index_to_codec("StepCommand", self.step_index)?,
            step_type: step_type_to_codec(self.step_type),
            issued_at: self.issued_at,
        })
    }

    fn from_codec(c: codec::StepCommand) -> Result<StepCommand, MessageError> {
        Ok(StepCommand {
            step_index: index_from_codec("StepCommand", c.step_index)?,
            step_type: step_type_from_codec(c.step_type),
            command_id: c.command_id,
            partner_id: c.partner_id,
            instance_id: c.instance_id,
            issued_at: c.issued_at,
        })
    }
}

/// A timer the scheduler fired, delivered to the pool of its step's type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimerFired {
    pub timer_id: String,
    pub partner_id: String,
    pub instance_id: String,
    pub step_index: usize,
    pub step_type: StepType,
    pub timer: TimerKind,
    pub due_at: i64,
    pub fired_at: i64,
}

impl TimerFired {
    fn to_codec(&self) -> Result<codec::TimerFired, MessageError> {
        Ok(codec::TimerFired {
            timer_id: self.timer_id.clone(),
            partner_id: self.partner_id.clone(),
            instance_id: self.instance_id.clone(),
            step_index: index_to_codec("TimerFired", self.step_index)?,
            step_type: step_type_to_codec(self.step_type),
            timer: timer_kind_to_codec(self.timer),
            due_at: self.due_at,
            fired_at: self.fired_at,
        })
    }

    fn from_codec(c: codec::TimerFired) -> Result<TimerFired, MessageError> {
        Ok(TimerFired {
            step_index: index_from_codec("TimerFired", c.step_index)?,
            step_type: step_type_from_codec(c.step_type),
            timer: timer_kind_from_codec(c.timer),
            timer_id: c.timer_id,
            partner_id: c.partner_id,
            instance_id: c.instance_id,
            due_at: c.due_at,
            fired_at: c.fired_at,
        })
    }
}

/// What travels on a step topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepMessage {
    /// Execute a dispatched step.
    Execute(StepCommand),
    /// A timer of a waiting step fired.
    TimerFired(TimerFired),
}

impl StepMessage {
    /// Avro `StepMessage`, single-object encoded.
    pub fn encode(&self) -> Result<Vec<u8>, MessageError> {
        let body = match self {
            StepMessage::Execute(cmd) => codec::StepMessageBody::Execute(cmd.to_codec()?),
            StepMessage::TimerFired(fired) => codec::StepMessageBody::TimerFired(fired.to_codec()?),
        };
        codec::StepMessage { message: body }
            .to_avro()
            .map_err(MessageError::encoding("StepMessage"))
    }

    /// A `StepMessage` written with the current or the previous schema version.
    pub fn decode(bytes: &[u8]) -> Result<StepMessage, MessageError> {
        let msg =
            codec::StepMessage::from_avro(bytes).map_err(MessageError::decoding("StepMessage"))?;
        match msg.message {
            codec::StepMessageBody::Execute(cmd) => {
                StepCommand::from_codec(cmd).map(StepMessage::Execute)
            }
            codec::StepMessageBody::TimerFired(fired) => {
                TimerFired::from_codec(fired).map(StepMessage::TimerFired)
            }
        }
    }
}

/// "Actor X approves (or rejects) step `step_index` of instance `instance_id`."
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecisionCommand {
    pub decision_id: String,
    pub partner_id: String,
    pub instance_id: String,
    pub step_index: usize,
    pub actor: ActorRef,
    /// The roles of the actor's API key when it decided.
    pub roles: Vec<String>,
    pub verdict: Verdict,
    pub comment: Option<String>,
    pub issued_at: i64,
}

impl DecisionCommand {
    /// Avro `DecisionCommand`, single-object encoded.
    pub fn encode(&self) -> Result<Vec<u8>, MessageError> {
        codec::DecisionCommand {
            decision_id: self.decision_id.clone(),
            partner_id: self.partner_id.clone(),
            instance_id: self.instance_id.clone(),
            step_index: index_to_codec("DecisionCommand", self.step_index)?,
            actor: actor_to_codec(&self.actor),
            roles: self.roles.clone(),
            verdict: match self.verdict {
                Verdict::Approve => codec::Verdict::Approve,
                Verdict::Reject => codec::Verdict::Reject,
            },
            comment: self.comment.clone(),
            issued_at: self.issued_at,
        }
        .to_avro()
        .map_err(MessageError::encoding("DecisionCommand"))
    }

    /// A `DecisionCommand` written with the current or the previous schema version.
    pub fn decode(bytes: &[u8]) -> Result<DecisionCommand, MessageError> {
        let c = codec::DecisionCommand::from_avro(bytes)
            .map_err(MessageError::decoding("DecisionCommand"))?;
        Ok(DecisionCommand {
            step_index: index_from_codec("DecisionCommand", c.step_index)?,
            actor: actor_from_codec(c.actor),
            verdict: match c.verdict {
                codec::Verdict::Approve => Verdict::Approve,
                codec::Verdict::Reject => Verdict::Reject,
            },
            decision_id: c.decision_id,
            partner_id: c.partner_id,
            instance_id: c.instance_id,
            roles: c.roles,
            comment: c.comment,
            issued_at: c.issued_at,
        })
    }
}

/// A milestone of an instance, for services outside the engine, on [`LIFECYCLE_TOPIC`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LifecycleEvent {
    pub event_id: String,
    pub partner_id: String,
    pub instance_id: String,
    pub template_id: String,
    pub template_version: i64,
    pub kind: LifecycleEventKind,
    /// The step, for `step_completed`.
    pub step_index: Option<usize>,
    /// The final step status (`step_completed`) or instance status (`instance_finished`).
    pub status: Option<String>,
    pub at: i64,
}

impl LifecycleEvent {
    /// Avro `LifecycleEvent`, single-object encoded. Takes the event: its strings move into
    /// the codec's record instead of being copied (a commit encodes several events, each with
    /// five strings).
    pub fn into_avro(self) -> Result<Vec<u8>, MessageError> {
        codec::LifecycleEvent {
            step_index: self
                .step_index
                .map(|i| index_to_codec("LifecycleEvent", i))
                .transpose()?,
            event_id: self.event_id,
            partner_id: self.partner_id,
            instance_id: self.instance_id,
            template_id: self.template_id,
            template_version: self.template_version,
            kind: self.kind,
            status: self.status,
            at: self.at,
        }
        .to_avro()
        .map_err(MessageError::encoding("LifecycleEvent"))
    }

    /// A `LifecycleEvent` written with the current or the previous schema version.
    pub fn decode(bytes: &[u8]) -> Result<LifecycleEvent, MessageError> {
        let c = codec::LifecycleEvent::from_avro(bytes)
            .map_err(MessageError::decoding("LifecycleEvent"))?;
        Ok(LifecycleEvent {
            step_index: c
                .step_index
                .map(|i| index_from_codec("LifecycleEvent", i))
                .transpose()?,
            event_id: c.event_id,
            partner_id: c.partner_id,
            instance_id: c.instance_id,
            template_id: c.template_id,
            template_version: c.template_version,
            kind: c.kind,
            status: c.status,
            at: c.at,
        })
    }
}

/// The milestones a transition from `before` (`None`: the instance is new) to `after` reached,
/// in order: the instance started, each step that reached a final status (by index), the
/// instance reached a final status. Event ids are fresh UUIDv7s.
pub fn lifecycle_events(
    info: &InstanceInfo,
    before: Option<&InstanceState>,
    after: &InstanceState,
    at: i64,
) -> Vec<LifecycleEvent> {
    lifecycle_events_since(info, before.map(Reached::of).as_ref(), after, at)
}

/// What [`lifecycle_events`] reads of the state before a transition: each execution's status
/// and the instance's. Taken before the transition so that the state itself can become the
/// next state instead of being copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reached {
    /// (index, status) of each execution, in the state's order.
    steps: Vec<(usize, StepStatus)>,
    terminal: bool,
}

impl Reached {
    pub fn of(state: &InstanceState) -> Reached {
        Reached {
            steps: state.steps.iter().map(|e| (e.index, e.status)).collect(),
            terminal: state.status.is_terminal(),
        }
    }

    /// The status of step `index`'s execution, as [`InstanceState::execution`] finds it.
    fn status(&self, index: usize) -> Option<StepStatus> {
        self.steps
            .iter()
            .find(|(i, _)| *i == index)
            .map(|(_, status)| *status)
    }
}

/// [`lifecycle_events`] from what the state before the transition had reached.
pub fn lifecycle_events_since(
    info: &InstanceInfo,
    before: Option<&Reached>,
    after: &InstanceState,
    at: i64,
) -> Vec<LifecycleEvent> {
    let event = |kind, step_index, status: Option<&str>| LifecycleEvent {
        event_id: uuid::Uuid::now_v7().to_string(),
        partner_id: info.partner_id.clone(),
        instance_id: info.id.clone(),
        template_id: info.template_id.clone(),
        template_version: info.template_version,
        kind,
        step_index,
        status: status.map(str::to_string),
        at,
    };
    let mut events = Vec::new();
    if before.is_none() {
        events.push(event(LifecycleEventKind::InstanceStarted, None, None));
    }
    let was_final = |index: usize| {
        before
            .and_then(|b| b.status(index))
            .is_some_and(|status| final_step_status(status).is_some())
    };
    let mut finished: Vec<(usize, &'static str)> = after
        .steps
        .iter()
        .filter(|e| !was_final(e.index))
        .filter_map(|e| final_step_status(e.status).map(|s| (e.index, s)))
        .collect();
    finished.sort_by_key(|(index, _)| *index);
    for (index, status) in finished {
        events.push(event(
            LifecycleEventKind::StepCompleted,
            Some(index),
            Some(status),
        ));
    }
    let was_terminal = before.is_some_and(|b| b.terminal);
    if after.status.is_terminal() && !was_terminal {
        events.push(event(
            LifecycleEventKind::InstanceFinished,
            None,
            Some(after.status.as_str()),
        ));
    }
    events
}

/// The status name of a step that can no longer change, `None` while it still can.
fn final_step_status(status: StepStatus) -> Option<&'static str> {
    match status {
        StepStatus::Pending | StepStatus::Running | StepStatus::Waiting => None,
        StepStatus::Completed => Some("completed"),
        StepStatus::Skipped => Some("skipped"),
        StepStatus::Failed => Some("failed"),
        StepStatus::Rejected => Some("rejected"),
        StepStatus::Cancelled => Some("cancelled"),
    }
}

/// The transfer service's event (`TransferEvent.avsc`), as the `on_transfer` trigger reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct TransferEvent {
    pub event_id: String,
    pub partner_id: String,
    pub transfer_id: String,
    /// The decimal string as sent (major units, e.g. `"5000.00"`): exact, never a float.
    pub amount: String,
    pub currency: String,
    /// The transfer's metadata: always a JSON object.
    pub metadata: Map<String, Value>,
    pub occurred_at: i64,
}

impl TransferEvent {
    /// Avro `TransferEvent`, single-object encoded (what the transfer service publishes; used
    /// by tests and tools).
    pub fn encode(&self) -> Result<Vec<u8>, MessageError> {
        let metadata = serde_json::to_string(&self.metadata)
            .map_err(|e| MessageError::field("TransferEvent", "metadata", e.to_string()))?;
        codec::TransferEvent {
            event_id: self.event_id.clone(),
            partner_id: self.partner_id.clone(),
            transfer_id: self.transfer_id.clone(),
            amount: self.amount.clone(),
            currency: self.currency.clone(),
            metadata,
            occurred_at: self.occurred_at,
        }
        .to_avro()
        .map_err(MessageError::encoding("TransferEvent"))
    }

    /// A `TransferEvent` written with the current or the previous schema version. Its amount
    /// must be a decimal number and its metadata a JSON object.
    pub fn decode(bytes: &[u8]) -> Result<TransferEvent, MessageError> {
        const WHAT: &str = "TransferEvent";
        let c = codec::TransferEvent::from_avro(bytes).map_err(MessageError::decoding(WHAT))?;
        if decimal_amount(&c.amount).is_none() {
            return Err(MessageError::field(
                WHAT,
                "amount",
                format!(
                    "is {:?}, not a decimal number such as \"5000.00\"",
                    c.amount
                ),
            ));
        }
        let metadata = match serde_json::from_str::<Value>(&c.metadata) {
            Ok(Value::Object(map)) => map,
            Ok(_) => {
                return Err(MessageError::field(
                    WHAT,
                    "metadata",
                    "is not a JSON object",
                ))
            }
            Err(e) => {
                return Err(MessageError::field(
                    WHAT,
                    "metadata",
                    format!("is not JSON: {e}"),
                ))
            }
        };
        Ok(TransferEvent {
            event_id: c.event_id,
            partner_id: c.partner_id,
            transfer_id: c.transfer_id,
            amount: c.amount,
            currency: c.currency,
            metadata,
            occurred_at: c.occurred_at,
        })
    }

    /// The trigger payload of the instances this event starts (`trigger` in expressions):
    /// `id` (the transfer id), `amount` as a JSON number (so `trigger.amount <= 1000` works),
    /// `amount_decimal` (the exact string), `currency`, `metadata`, `event_id`, `occurred_at`.
    pub fn trigger(&self) -> Value {
        let amount = decimal_amount(&self.amount)
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(self.amount.clone()));
        let mut trigger = Map::new();
        trigger.insert("id".into(), Value::String(self.transfer_id.clone()));
        trigger.insert("amount".into(), amount);
        trigger.insert("amount_decimal".into(), Value::String(self.amount.clone()));
        trigger.insert("currency".into(), Value::String(self.currency.clone()));
        trigger.insert("metadata".into(), Value::Object(self.metadata.clone()));
        trigger.insert("event_id".into(), Value::String(self.event_id.clone()));
        trigger.insert("occurred_at".into(), Value::from(self.occurred_at));
        Value::Object(trigger)
    }
}

/// A decimal string (`-?digits[.digits]`) as a JSON number: an integer when it has no fraction
/// (or only zeros after the point), else the nearest float. `None` for anything else (exponents,
/// `NaN`, `1e9`, empty, a lone point).
fn decimal_amount(s: &str) -> Option<Number> {
    let digits = s.strip_prefix('-').unwrap_or(s);
    let (int, frac) = match digits.split_once('.') {
        Some((int, frac)) => (int, Some(frac)),
        None => (digits, None),
    };
    let all_digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(int) || frac.is_some_and(|f| !all_digits(f)) {
        return None;
    }
    if frac.is_none_or(|f| f.bytes().all(|b| b == b'0')) {
        let whole = &s[..s.len() - frac.map_or(0, |f| f.len() + 1)];
        if let Ok(n) = whole.parse::<i64>() {
            return Some(Number::from(n));
        }
    }
    s.parse::<f64>().ok().and_then(Number::from_f64)
}

/// Avro `DeadLetter`, single-object encoded (for a dead letter that is not a consumed bus
/// message, such as a timer the scheduler cannot turn into a message).
pub fn encode_dead_letter(letter: &DeadLetter) -> Result<Vec<u8>, MessageError> {
    letter
        .to_avro()
        .map_err(MessageError::encoding("DeadLetter"))
}

/// A `DeadLetter` (from the dead-letter topic), written with the current or previous schema.
pub fn decode_dead_letter(bytes: &[u8]) -> Result<DeadLetter, MessageError> {
    DeadLetter::from_avro(bytes).map_err(MessageError::decoding("DeadLetter"))
}

/// Notification deliveries travel on one topic, keyed by instance id; the delivery pool (a
/// consumer group) claims each delivery in the store and makes one attempt per message.
pub const NOTIFICATION_TOPIC: &str = "workflow.notifications.deliveries";

/// "Attempt delivery `delivery_id` now": the content, the retry state and the log are in the
/// store (`notification_deliveries`); the message only says which one and that it is due.
/// Avro `NotificationDelivery` (`schemas/NotificationDelivery.avsc`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotificationDelivery {
    pub delivery_id: String,
    pub partner_id: String,
    pub instance_id: String,
    /// When the message was written (ms).
    pub issued_at: i64,
}

impl NotificationDelivery {
    /// Avro `NotificationDelivery`, single-object encoded.
    pub fn encode(&self) -> Result<Vec<u8>, MessageError> {
        codec::NotificationDelivery {
            delivery_id: self.delivery_id.clone(),
            partner_id: self.partner_id.clone(),
            instance_id: self.instance_id.clone(),
            issued_at: self.issued_at,
        }
        .to_avro()
        .map_err(MessageError::encoding("NotificationDelivery"))
    }

    /// A `NotificationDelivery` written with the current or the previous schema version.
    pub fn decode(bytes: &[u8]) -> Result<NotificationDelivery, MessageError> {
        let c = codec::NotificationDelivery::from_avro(bytes)
            .map_err(MessageError::decoding("NotificationDelivery"))?;
        Ok(NotificationDelivery {
            delivery_id: c.delivery_id,
            partner_id: c.partner_id,
            instance_id: c.instance_id,
            issued_at: c.issued_at,
        })
    }
}

fn index_to_codec(what: &'static str, index: usize) -> Result<i32, MessageError> {
    i32::try_from(index).map_err(|_| {
        MessageError::field(what, "step_index", format!("{index} exceeds an Avro int"))
    })
}

fn index_from_codec(what: &'static str, index: i32) -> Result<usize, MessageError> {
    usize::try_from(index)
        .map_err(|_| MessageError::field(what, "step_index", format!("{index} is negative")))
}

fn step_type_to_codec(t: StepType) -> codec::StepType {
    match t {
        StepType::Approval => codec::StepType::Approval,
        StepType::Condition => codec::StepType::Condition,
        StepType::Action => codec::StepType::Action,
        StepType::Wait => codec::StepType::Wait,
        StepType::Notification => codec::StepType::Notification,
    }
}

fn step_type_from_codec(t: codec::StepType) -> StepType {
    match t {
        codec::StepType::Approval => StepType::Approval,
        codec::StepType::Condition => StepType::Condition,
        codec::StepType::Action => StepType::Action,
        codec::StepType::Wait => StepType::Wait,
        codec::StepType::Notification => StepType::Notification,
    }
}

fn timer_kind_to_codec(k: TimerKind) -> codec::TimerKind {
    match k {
        TimerKind::WaitElapsed => codec::TimerKind::WaitElapsed,
        TimerKind::WaitTimeout => codec::TimerKind::WaitTimeout,
        TimerKind::ApprovalTimeout => codec::TimerKind::ApprovalTimeout,
        TimerKind::ApprovalReminder => codec::TimerKind::ApprovalReminder,
    }
}

fn timer_kind_from_codec(k: codec::TimerKind) -> TimerKind {
    match k {
        codec::TimerKind::WaitElapsed => TimerKind::WaitElapsed,
        codec::TimerKind::WaitTimeout => TimerKind::WaitTimeout,
        codec::TimerKind::ApprovalTimeout => TimerKind::ApprovalTimeout,
        codec::TimerKind::ApprovalReminder => TimerKind::ApprovalReminder,
    }
}

fn actor_to_codec(a: &ActorRef) -> codec::Actor {
    codec::Actor {
        id: a.id.clone(),
        actor_type: match a.actor_type {
            ActorType::Human => codec::ActorType::Human,
            ActorType::Agent => codec::ActorType::Agent,
            ActorType::System => codec::ActorType::System,
        },
    }
}

fn actor_from_codec(a: codec::Actor) -> ActorRef {
    ActorRef {
        id: a.id,
        actor_type: match a.actor_type {
            codec::ActorType::Human => ActorType::Human,
            codec::ActorType::Agent => ActorType::Agent,
            codec::ActorType::System => ActorType::System,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schemas_dir() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas")
    }

    fn step_command() -> StepCommand {
        StepCommand {
            command_id: "c1".into(),
            partner_id: "p".into(),
            instance_id: "i".into(),
            step_index: 3,
            step_type: StepType::Action,
            issued_at: 42,
        }
    }

    #[test]
    fn step_messages_round_trip_as_avro() {
        let cmd = step_command();
        let bytes = cmd.encode().unwrap();
        assert_eq!(&bytes[..2], &[0xC3, 0x01], "single-object encoded");
        assert_eq!(
            StepMessage::decode(&bytes).unwrap(),
            StepMessage::Execute(cmd)
        );
        for timer in TimerKind::ALL {
            let fired = StepMessage::TimerFired(TimerFired {
                timer_id: "i:1:approval_timeout:0".into(),
                partner_id: "p".into(),
                instance_id: "i".into(),
                step_index: 1,
                step_type: StepType::Approval,
                timer,
                due_at: 5,
                fired_at: 6,
            });
            assert_eq!(
                StepMessage::decode(&fired.encode().unwrap()).unwrap(),
                fired
            );
        }
        for step_type in StepType::ALL {
            let cmd = StepCommand {
                step_type,
                ..step_command()
            };
            assert_eq!(
                StepMessage::decode(&cmd.encode().unwrap()).unwrap(),
                StepMessage::Execute(cmd)
            );
        }
        assert_eq!(step_topic(StepType::Action), "workflow.steps.action");
    }

    #[test]
    fn decisions_round_trip_as_avro() {
        for (actor_type, verdict, comment) in [
            (ActorType::Human, Verdict::Reject, Some("no".to_string())),
            (ActorType::Agent, Verdict::Approve, None),
            (ActorType::System, Verdict::Approve, Some(String::new())),
        ] {
            let d = DecisionCommand {
                decision_id: "d".into(),
                partner_id: "p".into(),
                instance_id: "i".into(),
                step_index: 1,
                actor: ActorRef {
                    id: "carol".into(),
                    actor_type,
                },
                roles: vec!["cfo".into(), "finance_manager".into()],
                verdict,
                comment,
                issued_at: 7,
            };
            assert_eq!(DecisionCommand::decode(&d.encode().unwrap()).unwrap(), d);
        }
    }

    #[test]
    fn garbage_and_foreign_messages_are_typed_errors() {
        // The JSON the engine used to write, random bytes, a truncated message.
        let old_json = br#"{"message":"execute","command_id":"c1","partner_id":"p","instance_id":"i","step_index":3,"step_type":"action","issued_at":42}"#;
        let good = step_command().encode().unwrap();
        let mut unknown = good.clone();
        unknown[2] ^= 0xFF;
        for bytes in [
            &old_json[..],
            b"",
            b"\xC3\x01",
            &good[..good.len() - 1],
            &unknown[..],
        ] {
            assert!(
                matches!(StepMessage::decode(bytes), Err(MessageError::Codec { .. })),
                "{bytes:?}"
            );
            assert!(DecisionCommand::decode(bytes).is_err());
        }
        // A decision on a step topic is refused, not misread.
        let decision = DecisionCommand {
            decision_id: "d".into(),
            partner_id: "p".into(),
            instance_id: "i".into(),
            step_index: 0,
            actor: ActorRef {
                id: "a".into(),
                actor_type: ActorType::Human,
            },
            roles: vec![],
            verdict: Verdict::Approve,
            comment: None,
            issued_at: 1,
        };
        let err = StepMessage::decode(&decision.encode().unwrap()).unwrap_err();
        assert!(err.to_string().contains("schema mismatch"), "{err}");
        // A negative step index decodes in Avro but is no engine index.
        let negative = codec::StepMessage::from(codec::StepCommand {
            command_id: "c".into(),
            partner_id: "p".into(),
            instance_id: "i".into(),
            step_index: -1,
            step_type: codec::StepType::Wait,
            issued_at: 0,
        })
        .to_avro()
        .unwrap();
        assert!(matches!(
            StepMessage::decode(&negative),
            Err(MessageError::InvalidField {
                field: "step_index",
                ..
            })
        ));
    }

    #[test]
    fn messages_written_with_the_previous_schema_still_decode() {
        let dir = schemas_dir().join("previous/fixtures");
        let read =
            |name: &str| std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        match StepMessage::decode(&read("StepMessage.bin")).unwrap() {
            StepMessage::Execute(cmd) => assert!(!cmd.command_id.is_empty()),
            other => panic!("expected an execute message, got {other:?}"),
        }
        assert!(matches!(
            StepMessage::decode(&read("StepMessage.timer_fired.bin")).unwrap(),
            StepMessage::TimerFired(_)
        ));
        let d = DecisionCommand::decode(&read("DecisionCommand.bin")).unwrap();
        assert!(!d.decision_id.is_empty());
        let l = LifecycleEvent::decode(&read("LifecycleEvent.bin")).unwrap();
        assert!(!l.event_id.is_empty());
        let t = TransferEvent::decode(&read("TransferEvent.bin")).unwrap();
        assert!(t.trigger()["amount"].is_number());
        let n = NotificationDelivery::decode(&read("NotificationDelivery.bin")).unwrap();
        assert!(n.delivery_id.starts_with("dlv_"));
    }

    #[test]
    fn notification_deliveries_round_trip_as_avro() {
        let d = NotificationDelivery {
            delivery_id: "dlv_0123".into(),
            partner_id: "p".into(),
            instance_id: "i".into(),
            issued_at: 1_717_243_200_750,
        };
        let bytes = d.encode().unwrap();
        assert_eq!(&bytes[..2], &[0xC3, 0x01], "single-object encoded");
        assert_eq!(NotificationDelivery::decode(&bytes).unwrap(), d);
        // The JSON this message used to be, and other schemas' messages, are refused.
        let json =
            br#"{"delivery_id":"dlv_0123","partner_id":"p","instance_id":"i","issued_at":1}"#;
        assert!(matches!(
            NotificationDelivery::decode(json),
            Err(MessageError::Codec { .. })
        ));
        let step = step_command().encode().unwrap();
        let err = NotificationDelivery::decode(&step).unwrap_err();
        assert!(err.to_string().contains("schema mismatch"), "{err}");
        assert!(StepMessage::decode(&bytes).is_err());
    }

    #[test]
    fn lifecycle_events_round_trip() {
        let e = LifecycleEvent {
            event_id: "e".into(),
            partner_id: "p".into(),
            instance_id: "i".into(),
            template_id: "t".into(),
            template_version: 2,
            kind: LifecycleEventKind::StepCompleted,
            step_index: Some(4),
            status: Some("skipped".into()),
            at: 9,
        };
        assert_eq!(
            LifecycleEvent::decode(&e.clone().into_avro().unwrap()).unwrap(),
            e
        );
    }

    #[test]
    fn lifecycle_events_follow_the_state() {
        use workflow_core::instance::{InstanceStatus, RunMode};
        let info = InstanceInfo {
            id: "i".into(),
            partner_id: "p".into(),
            template_id: "t".into(),
            template_version: 3,
            created_at: workflow_core::Timestamp(0),
            created_by: ActorRef {
                id: "rita".into(),
                actor_type: ActorType::Human,
            },
            trigger: serde_json::json!({}).into(),
            mode: RunMode::Live,
        };
        let state = |status: &str, steps: &[(usize, &str)]| -> InstanceState {
            let steps: Vec<Value> = steps
                .iter()
                .map(|(index, status)| {
                    serde_json::json!({"index": index, "name": "s", "type": "condition",
                        "status": status, "started_at": null, "finished_at": null, "actor": null,
                        "input": null, "output": null, "error": null})
                })
                .collect();
            serde_json::from_value(serde_json::json!({"status": status, "current_step": null,
                "waiting_on": null, "steps": steps, "error": null, "finished_at": null}))
            .unwrap()
        };
        let summary = |events: Vec<LifecycleEvent>| -> Vec<(LifecycleEventKind, Option<usize>, Option<String>)> {
            events
                .into_iter()
                .map(|e| {
                    assert_eq!((e.instance_id.as_str(), e.template_version, e.at), ("i", 3, 7));
                    (e.kind, e.step_index, e.status)
                })
                .collect()
        };
        use LifecycleEventKind::*;
        // Start: step 0 dispatched.
        let s0 = state("running", &[(0, "pending")]);
        assert_eq!(
            summary(lifecycle_events(&info, None, &s0, 7)),
            [(InstanceStarted, None, None)]
        );
        // Step 0 jumps to 3: 0 completed, 1 and 2 skipped (in index order).
        let s1 = state(
            "running",
            &[
                (0, "completed"),
                (2, "skipped"),
                (1, "skipped"),
                (3, "pending"),
            ],
        );
        assert_eq!(
            summary(lifecycle_events(&info, Some(&s0), &s1, 7)),
            [
                (StepCompleted, Some(0), Some("completed".into())),
                (StepCompleted, Some(1), Some("skipped".into())),
                (StepCompleted, Some(2), Some("skipped".into())),
            ]
        );
        // Nothing reached a final status: no event.
        let s2 = state(
            "waiting",
            &[
                (0, "completed"),
                (1, "skipped"),
                (2, "skipped"),
                (3, "waiting"),
            ],
        );
        assert!(lifecycle_events(&info, Some(&s1), &s2, 7).is_empty());
        // The last step fails the instance.
        let s3 = state(
            "failed",
            &[
                (0, "completed"),
                (1, "skipped"),
                (2, "skipped"),
                (3, "failed"),
            ],
        );
        assert_eq!(
            summary(lifecycle_events(&info, Some(&s2), &s3, 7)),
            [
                (StepCompleted, Some(3), Some("failed".into())),
                (InstanceFinished, None, Some("failed".into())),
            ]
        );
        assert_eq!(s3.status, InstanceStatus::Failed);
    }

    #[test]
    fn transfer_events_decode_into_a_trigger() {
        let metadata = serde_json::json!({"type": "procurement"});
        let event = TransferEvent {
            event_id: "ev1".into(),
            partner_id: "p".into(),
            transfer_id: "tr_1".into(),
            amount: "5000.00".into(),
            currency: "USD".into(),
            metadata: metadata.as_object().cloned().unwrap(),
            occurred_at: 11,
        };
        let back = TransferEvent::decode(&event.encode().unwrap()).unwrap();
        assert_eq!(back, event);
        let trigger = back.trigger();
        assert_eq!(trigger["id"], "tr_1");
        assert_eq!(trigger["amount"], serde_json::json!(5000));
        assert_eq!(trigger["amount_decimal"], "5000.00");
        assert_eq!(trigger["metadata"]["type"], "procurement");

        // Metadata that is not an object, an amount that is no decimal: typed errors.
        let raw = |amount: &str, metadata: &str| {
            codec::TransferEvent {
                event_id: "e".into(),
                partner_id: "p".into(),
                transfer_id: "t".into(),
                amount: amount.into(),
                currency: "USD".into(),
                metadata: metadata.into(),
                occurred_at: 0,
            }
            .to_avro()
            .unwrap()
        };
        for (amount, metadata, field) in [
            ("12", "[1]", "metadata"),
            ("12", "{not json", "metadata"),
            ("1e3", "{}", "amount"),
            ("", "{}", "amount"),
            ("12.", "{}", "amount"),
            ("NaN", "{}", "amount"),
        ] {
            match TransferEvent::decode(&raw(amount, metadata)) {
                Err(MessageError::InvalidField { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{amount:?} {metadata:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn decimal_amounts() {
        let n = |s: &str| decimal_amount(s).map(Value::Number);
        assert_eq!(n("1000"), Some(serde_json::json!(1000)));
        assert_eq!(n("1000.00"), Some(serde_json::json!(1000)));
        assert_eq!(n("-3.0"), Some(serde_json::json!(-3)));
        assert_eq!(n("999.99"), Some(serde_json::json!(999.99)));
        assert_eq!(n("0.5"), Some(serde_json::json!(0.5)));
        assert_eq!(n("99999999999999999999"), Some(serde_json::json!(1e20)));
        for bad in [
            "", "-", ".5", "5.", "1e3", "+1", "1,000", " 1", "inf", "NaN", "1.2.3",
        ] {
            assert_eq!(n(bad), None, "{bad:?}");
        }
    }
}
