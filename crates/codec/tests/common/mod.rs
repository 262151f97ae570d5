//! Shared by the integration tests: sample messages, the schemas directory, and dispatch from a
//! schema name to its Rust type.

#![allow(dead_code, reason = "each test binary uses a different part")]

use std::path::PathBuf;

use serde_json::Value as Json;
use workflow_codec::*;

/// `schemas/` at the workspace root.
pub fn schemas_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../schemas")
}

/// Run `$body` with `$T` the Rust type of schema `$name`.
#[macro_export]
macro_rules! with_type {
    ($name:expr, $T:ident => $body:expr) => {
        match $name {
            SchemaName::StepMessage => {
                type $T = StepMessage;
                $body
            }
            SchemaName::StepCommand => {
                type $T = StepCommand;
                $body
            }
            SchemaName::TimerFired => {
                type $T = TimerFired;
                $body
            }
            SchemaName::DecisionCommand => {
                type $T = DecisionCommand;
                $body
            }
            SchemaName::TriggerCommand => {
                type $T = TriggerCommand;
                $body
            }
            SchemaName::TimerRequest => {
                type $T = TimerRequest;
                $body
            }
            SchemaName::LifecycleEvent => {
                type $T = LifecycleEvent;
                $body
            }
            SchemaName::TransferEvent => {
                type $T = TransferEvent;
                $body
            }
            SchemaName::DeadLetter => {
                type $T = DeadLetter;
                $body
            }
            SchemaName::NotificationDelivery => {
                type $T = NotificationDelivery;
                $body
            }
        }
    };
}

/// Decode `bytes` as schema `name`'s Rust type, shown as JSON.
pub fn decode_json(name: SchemaName, bytes: &[u8]) -> Result<Json, CodecError> {
    with_type!(name, T => {
        let v: T = decode_as(name, bytes)?;
        Ok(serde_json::to_value(v).expect("serialises"))
    })
}

/// Encode the JSON form of schema `name`'s Rust type.
pub fn encode_json(name: SchemaName, json: &Json) -> Vec<u8> {
    with_type!(name, T => {
        let v: T = serde_json::from_value(json.clone()).expect("the JSON is a valid value of the type");
        encode(name, &v).expect("encodes")
    })
}

pub fn step_command() -> StepCommand {
    StepCommand {
        command_id: "cmd_01J9Z6".into(),
        partner_id: "acme".into(),
        instance_id: "inst_7f3a".into(),
        step_index: 3,
        step_type: StepType::Action,
        issued_at: 1_717_243_200_123,
    }
}

pub fn timer_fired() -> TimerFired {
    TimerFired {
        timer_id: "inst_7f3a:1:approval_timeout:0".into(),
        partner_id: "acme".into(),
        instance_id: "inst_7f3a".into(),
        step_index: 1,
        step_type: StepType::Approval,
        timer: TimerKind::ApprovalTimeout,
        due_at: 1_717_416_000_000,
        fired_at: 1_717_416_000_250,
    }
}

pub fn decision() -> DecisionCommand {
    DecisionCommand {
        decision_id: "dec_42".into(),
        partner_id: "acme".into(),
        instance_id: "inst_7f3a".into(),
        step_index: 1,
        actor: Actor {
            id: "carol".into(),
            actor_type: ActorType::Human,
        },
        roles: vec!["cfo".into(), "approver".into()],
        verdict: Verdict::Approve,
        comment: Some("within budget ✓".into()),
        issued_at: 1_717_250_000_000,
    }
}

pub fn trigger() -> TriggerCommand {
    TriggerCommand {
        command_id: "trg_9".into(),
        partner_id: "acme".into(),
        template_id: "tpl_procurement".into(),
        trigger: r#"{"amount":5000,"currency":"USD","id":"tr_5000"}"#.into(),
        idempotency_key: Some("po-2024-0042".into()),
        actor: Actor {
            id: "requester".into(),
            actor_type: ActorType::Agent,
        },
        issued_at: 1_717_243_000_000,
    }
}

pub fn timer_request() -> TimerRequest {
    TimerRequest {
        id: "inst_7f3a:2:wait_elapsed:0".into(),
        partner_id: "acme".into(),
        instance_id: "inst_7f3a".into(),
        step_index: 2,
        step_type: StepType::Wait,
        kind: TimerKind::WaitElapsed,
        due_at: 1_717_300_000_000,
    }
}

pub fn lifecycle() -> LifecycleEvent {
    LifecycleEvent {
        event_id: "evt_3".into(),
        partner_id: "acme".into(),
        instance_id: "inst_7f3a".into(),
        template_id: "tpl_procurement".into(),
        template_version: 2,
        kind: LifecycleEventKind::StepCompleted,
        step_index: Some(0),
        status: Some("skipped".into()),
        at: 1_717_243_200_500,
    }
}

pub fn transfer() -> TransferEvent {
    TransferEvent {
        event_id: "tev_1".into(),
        partner_id: "acme".into(),
        transfer_id: "tr_5000".into(),
        amount: "5000.00".into(),
        currency: "USD".into(),
        metadata: r#"{"invoice":"INV-7"}"#.into(),
        occurred_at: 1_717_242_999_000,
    }
}

pub fn dead_letter() -> DeadLetter {
    DeadLetter {
        topic: "workflow.steps.action".into(),
        partition: 7,
        offset: 123_456_789_012,
        key: Some(b"inst_7f3a".to_vec()),
        payload: Some(vec![0x7b, 0x00, 0xff, 0xc3, 0x01]),
        reason: "bad marker".into(),
        failed_at: 1_717_243_201_000,
    }
}

pub fn notification_delivery() -> NotificationDelivery {
    NotificationDelivery {
        delivery_id: "dlv_0f1e2d3c4b5a69788796a5b4c3d2e1f0".into(),
        partner_id: "acme".into(),
        instance_id: "inst_7f3a".into(),
        issued_at: 1_717_243_200_750,
    }
}

/// The golden samples: (fixture stem, schema, value as JSON). The stem is the schema name,
/// optionally followed by `.<variant>`.
pub fn samples() -> Vec<(&'static str, SchemaName, Json)> {
    fn j<T: serde::Serialize>(v: T) -> Json {
        serde_json::to_value(v).expect("serialises")
    }
    vec![
        (
            "StepMessage",
            SchemaName::StepMessage,
            j(StepMessage::from(step_command())),
        ),
        (
            "StepMessage.timer_fired",
            SchemaName::StepMessage,
            j(StepMessage::from(timer_fired())),
        ),
        ("StepCommand", SchemaName::StepCommand, j(step_command())),
        ("TimerFired", SchemaName::TimerFired, j(timer_fired())),
        (
            "DecisionCommand",
            SchemaName::DecisionCommand,
            j(decision()),
        ),
        ("TriggerCommand", SchemaName::TriggerCommand, j(trigger())),
        ("TimerRequest", SchemaName::TimerRequest, j(timer_request())),
        ("LifecycleEvent", SchemaName::LifecycleEvent, j(lifecycle())),
        ("TransferEvent", SchemaName::TransferEvent, j(transfer())),
        ("DeadLetter", SchemaName::DeadLetter, j(dead_letter())),
        (
            "NotificationDelivery",
            SchemaName::NotificationDelivery,
            j(notification_delivery()),
        ),
    ]
}

/// The schema of a fixture, from its file stem (`StepMessage.timer_fired` → StepMessage).
pub fn schema_of_stem(stem: &str) -> Option<SchemaName> {
    SchemaName::parse(stem.split('.').next()?)
}
