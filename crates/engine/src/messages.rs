//! The commands that travel on the bus, and their topics.
//!
//! Encoded as JSON for now; the Avro schemas of the distributed runtime replace the codec, not
//! the types. Every command carries a unique `command_id` so consumers can recognise redeliveries.

use serde::{Deserialize, Serialize};
use workflow_core::instance::{ActorRef, Verdict};
use workflow_core::machine::TimerKind;
use workflow_core::StepType;

/// Step commands for pool `<type>` go to `workflow.steps.<type>`.
pub const STEP_TOPIC_PREFIX: &str = "workflow.steps.";

/// The topic a step type's pool consumes.
pub fn step_topic(step_type: StepType) -> String {
    format!("{STEP_TOPIC_PREFIX}{}", step_type.as_str())
}

/// "Execute step `step_index` of instance `instance_id`", keyed by the instance id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    pub fn encode(&self) -> Vec<u8> {
        StepMessage::Execute(self.clone()).encode()
    }
}

/// A timer the scheduler fired, delivered to the pool of its step's type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

/// What travels on a step topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "message", rename_all = "snake_case")]
pub enum StepMessage {
    /// Execute a dispatched step.
    Execute(StepCommand),
    /// A timer of a waiting step fired.
    TimerFired(TimerFired),
}

impl StepMessage {
    pub fn encode(&self) -> Vec<u8> {
        // Serialising structs of strings and integers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<StepMessage, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// Approval decisions travel on one topic, keyed by instance id, so the decisions of one
/// instance are applied one after another, in the order they were made.
pub const DECISION_TOPIC: &str = "workflow.approvals.decisions";

/// "Actor X approves (or rejects) step `step_index` of instance `instance_id`."
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<DecisionCommand, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_names_topics() {
        let cmd = StepCommand {
            command_id: "c1".into(),
            partner_id: "p".into(),
            instance_id: "i".into(),
            step_index: 3,
            step_type: StepType::Action,
            issued_at: 42,
        };
        assert_eq!(
            StepMessage::decode(&cmd.encode()).ok(),
            Some(StepMessage::Execute(cmd))
        );
        let fired = StepMessage::TimerFired(TimerFired {
            timer_id: "i:1:approval_timeout:0".into(),
            partner_id: "p".into(),
            instance_id: "i".into(),
            step_index: 1,
            step_type: StepType::Approval,
            timer: TimerKind::ApprovalTimeout,
            due_at: 5,
            fired_at: 6,
        });
        assert_eq!(StepMessage::decode(&fired.encode()).ok(), Some(fired));
        assert_eq!(step_topic(StepType::Action), "workflow.steps.action");
        assert!(StepMessage::decode(b"{not json").is_err());
        let d = DecisionCommand {
            decision_id: "d".into(),
            partner_id: "p".into(),
            instance_id: "i".into(),
            step_index: 1,
            actor: ActorRef {
                id: "carol".into(),
                actor_type: workflow_core::instance::ActorType::Human,
            },
            roles: vec!["cfo".into()],
            verdict: Verdict::Reject,
            comment: Some("no".into()),
            issued_at: 7,
        };
        assert_eq!(DecisionCommand::decode(&d.encode()).ok(), Some(d));
    }
}
