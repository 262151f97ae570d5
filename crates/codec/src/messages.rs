//! Serde types mirroring the schemas, one per record and enum.
//!
//! Field names are the schemas' field names, which are the engine's JSON field names where the
//! engine has the message already (`crates/engine/src/messages.rs`). Differences the caller maps:
//! step indexes are `i32` (Avro `int`; the engine uses `usize`), times are Unix milliseconds
//! (`i64`, Avro `timestamp-millis`), and a [`StepMessage`] is a record whose `message` field is
//! the union (JSON `{"message": {"execute": {..}}}`, where the engine's JSON is internally
//! tagged).
//!
//! Enum variants must keep the order of the schema's symbols and union branches: union branches
//! are matched by position.

use serde::{Deserialize, Serialize};

use crate::error::CodecError;
use crate::registry::SchemaName;

/// A type that is the payload of one message schema.
pub trait Message: Serialize + serde::de::DeserializeOwned {
    /// The schema it is written with.
    const SCHEMA: SchemaName;

    /// Single-object encode with the current version of [`Self::SCHEMA`].
    fn to_avro(&self) -> Result<Vec<u8>, CodecError> {
        crate::encode(Self::SCHEMA, self)
    }

    /// Decode a message written with any known version of [`Self::SCHEMA`]; any other schema
    /// is a [`CodecError::SchemaMismatch`].
    fn from_avro(bytes: &[u8]) -> Result<Self, CodecError> {
        crate::decode_as(Self::SCHEMA, bytes)
    }
}

/// `StepType.avsc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepType {
    Approval,
    Condition,
    Action,
    Wait,
    Notification,
}

/// `TimerKind.avsc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimerKind {
    WaitElapsed,
    WaitTimeout,
    ApprovalTimeout,
    /// Appended after the first release: readers of the previous schema cannot read it.
    ApprovalReminder,
}

/// `Verdict.avsc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Approve,
    Reject,
}

/// `ActorType.avsc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActorType {
    Human,
    Agent,
    System,
}

/// `Actor.avsc` (the engine's `ActorRef`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    pub id: String,
    #[serde(rename = "type")]
    pub actor_type: ActorType,
}

/// `StepCommand.avsc`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepCommand {
    pub command_id: String,
    pub partner_id: String,
    pub instance_id: String,
    pub step_index: i32,
    pub step_type: StepType,
    pub issued_at: i64,
}

impl Message for StepCommand {
    const SCHEMA: SchemaName = SchemaName::StepCommand;
}

/// `TimerFired.avsc`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimerFired {
    pub timer_id: String,
    pub partner_id: String,
    pub instance_id: String,
    pub step_index: i32,
    pub step_type: StepType,
    pub timer: TimerKind,
    pub due_at: i64,
    pub fired_at: i64,
}

impl Message for TimerFired {
    const SCHEMA: SchemaName = SchemaName::TimerFired;
}

/// `StepMessage.avsc`: what travels on `workflow.steps.<type>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepMessage {
    pub message: StepMessageBody,
}

/// The `message` union of [`StepMessage`], in the schema's branch order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepMessageBody {
    /// Branch 0, `StepCommand`: execute a dispatched step.
    Execute(StepCommand),
    /// Branch 1, `TimerFired`: a timer of a waiting step fired.
    TimerFired(TimerFired),
}

impl Message for StepMessage {
    const SCHEMA: SchemaName = SchemaName::StepMessage;
}

impl From<StepCommand> for StepMessage {
    fn from(command: StepCommand) -> Self {
        StepMessage {
            message: StepMessageBody::Execute(command),
        }
    }
}

impl From<TimerFired> for StepMessage {
    fn from(fired: TimerFired) -> Self {
        StepMessage {
            message: StepMessageBody::TimerFired(fired),
        }
    }
}

/// `DecisionCommand.avsc`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionCommand {
    pub decision_id: String,
    pub partner_id: String,
    pub instance_id: String,
    pub step_index: i32,
    pub actor: Actor,
    pub roles: Vec<String>,
    pub verdict: Verdict,
    pub comment: Option<String>,
    pub issued_at: i64,
}

impl Message for DecisionCommand {
    const SCHEMA: SchemaName = SchemaName::DecisionCommand;
}

/// `TriggerCommand.avsc`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TriggerCommand {
    pub command_id: String,
    pub partner_id: String,
    pub template_id: String,
    /// The trigger payload: a JSON object, as a JSON string.
    pub trigger: String,
    pub idempotency_key: Option<String>,
    pub actor: Actor,
    pub issued_at: i64,
}

impl Message for TriggerCommand {
    const SCHEMA: SchemaName = SchemaName::TriggerCommand;
}

/// `TimerRequest.avsc`: the fields of a stored timer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimerRequest {
    pub id: String,
    pub partner_id: String,
    pub instance_id: String,
    pub step_index: i32,
    pub step_type: StepType,
    pub kind: TimerKind,
    pub due_at: i64,
}

impl Message for TimerRequest {
    const SCHEMA: SchemaName = SchemaName::TimerRequest;
}

/// `LifecycleEventKind`, defined inside `LifecycleEvent.avsc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LifecycleEventKind {
    InstanceStarted,
    StepCompleted,
    InstanceFinished,
}

/// `LifecycleEvent.avsc`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LifecycleEvent {
    pub event_id: String,
    pub partner_id: String,
    pub instance_id: String,
    pub template_id: String,
    pub template_version: i64,
    pub kind: LifecycleEventKind,
    pub step_index: Option<i32>,
    /// A step status (`step_completed`) or an instance status (`instance_finished`), snake_case.
    pub status: Option<String>,
    pub at: i64,
}

impl Message for LifecycleEvent {
    const SCHEMA: SchemaName = SchemaName::LifecycleEvent;

    /// Written by hand (`binary.rs`): the same bytes as [`crate::encode`], which took about
    /// 20 times as long for the message the engine sends most often.
    fn to_avro(&self) -> Result<Vec<u8>, CodecError> {
        let registered = crate::Registry::global()?.current(Self::SCHEMA);
        Ok(crate::framing::frame(
            registered.fingerprint,
            &crate::binary::lifecycle_event(self),
        ))
    }
}

/// `TransferEvent.avsc`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferEvent {
    pub event_id: String,
    pub partner_id: String,
    pub transfer_id: String,
    /// A decimal string in major units, e.g. `"5000.00"`.
    pub amount: String,
    pub currency: String,
    /// A JSON object, as a JSON string (`"{}"` when there is none).
    pub metadata: String,
    pub occurred_at: i64,
}

impl Message for TransferEvent {
    const SCHEMA: SchemaName = SchemaName::TransferEvent;
}

/// `DeadLetter.avsc`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    #[serde(with = "serde_bytes")]
    pub key: Option<Vec<u8>>,
    #[serde(with = "serde_bytes")]
    pub payload: Option<Vec<u8>>,
    pub reason: String,
    pub failed_at: i64,
}

impl Message for DeadLetter {
    const SCHEMA: SchemaName = SchemaName::DeadLetter;
}

/// `NotificationDelivery.avsc`: "attempt this delivery now".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotificationDelivery {
    pub delivery_id: String,
    pub partner_id: String,
    pub instance_id: String,
    pub issued_at: i64,
}

impl Message for NotificationDelivery {
    const SCHEMA: SchemaName = SchemaName::NotificationDelivery;
}
