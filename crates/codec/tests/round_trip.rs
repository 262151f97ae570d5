//! Every message type survives encode → decode, and the codec's errors are the documented ones.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers fail loudly"
)]

mod common;

use common::*;
use workflow_codec::*;

fn round_trip<M: Message + PartialEq + std::fmt::Debug>(m: M) {
    let bytes = m.to_avro().expect("encodes");
    assert_eq!(&bytes[..2], &framing::MARKER);
    let registry = Registry::global().expect("registry");
    let current = registry.current(M::SCHEMA);
    assert_eq!(
        &bytes[2..10],
        &current.fingerprint.0,
        "header names the writer schema"
    );
    assert_eq!(writer_schema(&bytes).expect("known").name, M::SCHEMA);
    assert_eq!(M::from_avro(&bytes).expect("decodes"), m);
    assert_eq!(decode::<M>(&bytes).expect("decodes"), m);
}

#[test]
fn every_message_type_round_trips() {
    round_trip(StepMessage::from(step_command()));
    round_trip(StepMessage::from(timer_fired()));
    round_trip(step_command());
    round_trip(timer_fired());
    round_trip(decision());
    round_trip(DecisionCommand {
        comment: None,
        roles: vec![],
        verdict: Verdict::Reject,
        actor: Actor {
            id: "scheduler".into(),
            actor_type: ActorType::System,
        },
        ..decision()
    });
    round_trip(trigger());
    round_trip(TriggerCommand {
        idempotency_key: None,
        trigger: "{}".into(),
        ..trigger()
    });
    round_trip(timer_request());
    round_trip(lifecycle());
    round_trip(LifecycleEvent {
        kind: LifecycleEventKind::InstanceStarted,
        step_index: None,
        status: None,
        ..lifecycle()
    });
    round_trip(transfer());
    round_trip(dead_letter());
    round_trip(DeadLetter {
        key: None,
        payload: None,
        ..dead_letter()
    });
    round_trip(DeadLetter {
        key: Some(vec![]),
        payload: Some(vec![]),
        ..dead_letter()
    });
    round_trip(notification_delivery());
    round_trip(NotificationDelivery {
        delivery_id: String::new(),
        issued_at: 0,
        ..notification_delivery()
    });
}

#[test]
fn every_enum_symbol_round_trips() {
    for step_type in [
        StepType::Approval,
        StepType::Condition,
        StepType::Action,
        StepType::Wait,
        StepType::Notification,
    ] {
        round_trip(StepCommand {
            step_type,
            ..step_command()
        });
    }
    for timer in [
        TimerKind::WaitElapsed,
        TimerKind::WaitTimeout,
        TimerKind::ApprovalTimeout,
        TimerKind::ApprovalReminder,
    ] {
        round_trip(TimerFired {
            timer,
            ..timer_fired()
        });
    }
    for kind in [
        LifecycleEventKind::InstanceStarted,
        LifecycleEventKind::StepCompleted,
        LifecycleEventKind::InstanceFinished,
    ] {
        round_trip(LifecycleEvent {
            kind,
            ..lifecycle()
        });
    }
}

#[test]
fn extreme_values_round_trip() {
    round_trip(StepCommand {
        command_id: String::new(),
        step_index: i32::MAX,
        issued_at: i64::MIN,
        ..step_command()
    });
    round_trip(TimerFired {
        step_index: 0,
        due_at: i64::MAX,
        fired_at: 0,
        ..timer_fired()
    });
}

#[test]
fn decode_as_refuses_another_schema() {
    let bytes = step_command().to_avro().unwrap();
    match DecisionCommand::from_avro(&bytes) {
        Err(CodecError::SchemaMismatch { expected, found }) => {
            assert_eq!(expected, SchemaName::DecisionCommand);
            assert_eq!(found, SchemaName::StepCommand);
        }
        other => panic!("expected a schema mismatch, got {other:?}"),
    }
    // The generic decode reads what the header says, into any self-describing type.
    let json: serde_json::Value = decode(&bytes).unwrap();
    assert_eq!(json, serde_json::to_value(step_command()).unwrap());
    // Into the wrong Rust type it is a deserialisation error, not a panic.
    assert!(matches!(
        decode::<TransferEvent>(&bytes),
        Err(CodecError::Avro {
            operation: Operation::Deserialize,
            ..
        })
    ));
}

#[test]
fn encoding_a_value_that_does_not_fit_the_schema_fails() {
    // A StepCommand is not a DecisionCommand (missing fields without defaults).
    assert!(matches!(
        encode(SchemaName::DecisionCommand, &step_command()),
        Err(CodecError::Avro {
            operation: Operation::Encode,
            schema: SchemaName::DecisionCommand,
            ..
        })
    ));
    // An unknown enum symbol.
    #[derive(serde::Serialize)]
    struct Bad {
        id: &'static str,
        #[serde(rename = "type")]
        actor_type: &'static str,
    }
    #[derive(serde::Serialize)]
    #[serde(rename_all = "snake_case")]
    enum NotAVerdict {
        Maybe,
    }
    #[derive(serde::Serialize)]
    struct BadDecision {
        decision_id: &'static str,
        partner_id: &'static str,
        instance_id: &'static str,
        step_index: i32,
        actor: Bad,
        roles: Vec<String>,
        verdict: NotAVerdict,
        comment: Option<String>,
        issued_at: i64,
    }
    let bad = BadDecision {
        decision_id: "d",
        partner_id: "p",
        instance_id: "i",
        step_index: 0,
        actor: Bad {
            id: "a",
            actor_type: "human",
        },
        roles: vec![],
        verdict: NotAVerdict::Maybe,
        comment: None,
        issued_at: 0,
    };
    assert!(encode(SchemaName::DecisionCommand, &bad).is_err());
}

#[test]
fn framing_errors_are_reported() {
    let good = step_command().to_avro().unwrap();

    assert!(matches!(
        decode::<StepCommand>(&[]),
        Err(CodecError::Truncated { len: 0 })
    ));
    assert!(matches!(
        decode::<StepCommand>(&good[..9]),
        Err(CodecError::Truncated { len: 9 })
    ));
    let json = serde_json::to_vec(&step_command()).unwrap();
    assert!(matches!(
        decode::<StepCommand>(&json),
        Err(CodecError::BadMarker { .. })
    ));

    let mut unknown = good.clone();
    unknown[2] ^= 0xff;
    match decode::<StepCommand>(&unknown) {
        Err(CodecError::UnknownFingerprint(fp)) => assert_eq!(&fp.0[..], &unknown[2..10]),
        other => panic!("expected an unknown fingerprint, got {other:?}"),
    }

    let mut trailing = good.clone();
    trailing.push(0);
    assert!(matches!(
        decode::<StepCommand>(&trailing),
        Err(CodecError::TrailingBytes {
            schema: SchemaName::StepCommand,
            trailing: 1
        })
    ));

    assert!(matches!(
        decode::<StepCommand>(&good[..good.len() - 1]),
        Err(CodecError::Avro {
            operation: Operation::Decode,
            ..
        })
    ));
}

#[test]
fn errors_read_well() {
    let e = decode::<StepCommand>(&[0xC3, 0x01]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "truncated message: 2 bytes, a single-object encoded message has at least 10"
    );
    // A short message that is obviously not ours says so rather than "truncated".
    let e = decode::<StepCommand>(b"{}").unwrap_err();
    assert!(matches!(e, CodecError::BadMarker { .. }), "{e}");
    let e = decode::<StepCommand>(b"{\"a\":1}xyz").unwrap_err();
    assert_eq!(
        e.to_string(),
        "not an Avro single-object message: starts with [7b, 22], expected [c3, 01]"
    );
    let e = decode::<StepCommand>(&[0xC3, 1, 1, 2, 3, 4, 5, 6, 7, 8]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "unknown writer schema fingerprint 0102030405060708"
    );
}
