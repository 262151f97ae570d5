//! The dead-letter topic: where a consumer puts a message it cannot process (undecodable, or
//! failing for good), with the reason, so its partition moves on and the message can be
//! inspected and replayed byte for byte.

use workflow_bus::{Bus, BusError, Message};
use workflow_codec::{DeadLetter, Message as _};

/// The one dead-letter topic of the engine, keyed like the original message.
pub const DEAD_LETTER_TOPIC: &str = "workflow.dead-letters";

/// The Avro `DeadLetter` record of `msg`.
pub fn dead_letter(msg: &Message, reason: &str, now_ms: i64) -> DeadLetter {
    DeadLetter {
        topic: msg.topic.clone(),
        partition: i32::try_from(msg.partition).unwrap_or(i32::MAX),
        offset: i64::try_from(msg.offset).unwrap_or(i64::MAX),
        key: Some(msg.key.as_bytes().to_vec()),
        payload: Some(msg.payload.to_vec()),
        reason: reason.to_string(),
        failed_at: now_ms,
    }
}

/// Publish `msg` to [`DEAD_LETTER_TOPIC`] with `reason`, keyed by its original key.
pub async fn send_to_dead_letter(
    bus: &dyn Bus,
    msg: &Message,
    reason: &str,
    now_ms: i64,
) -> Result<(), BusError> {
    let record = dead_letter(msg, reason, now_ms);
    let payload = record.to_avro().map_err(|e| BusError::Backend {
        reason: format!("cannot encode a dead letter: {e}"),
    })?;
    tracing::error!(topic = %msg.topic, partition = msg.partition, offset = msg.offset, %reason, "message dead-lettered");
    bus.publish(DEAD_LETTER_TOPIC, &msg.key, payload).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use workflow_bus::{Bytes, InProcessBus};

    #[tokio::test]
    async fn a_dead_letter_carries_the_message_and_the_reason() {
        let bus = InProcessBus::new(4);
        let mut sub = bus
            .subscribe(DEAD_LETTER_TOPIC, "inspect")
            .await
            .expect("subscribe");
        let poison = Message {
            topic: "workflow.steps.action".into(),
            partition: 2,
            offset: 41,
            key: "inst-1".into(),
            payload: Bytes::from_static(b"\x00garbage"),
        };
        send_to_dead_letter(&bus, &poison, "undecodable", 7)
            .await
            .expect("publish");
        let got = sub.next().await.expect("next").expect("a message");
        assert_eq!(got.key, "inst-1");
        let letter = DeadLetter::from_avro(&got.payload).expect("decodes");
        assert_eq!(letter, dead_letter(&poison, "undecodable", 7));
        assert_eq!(letter.payload.as_deref(), Some(&b"\x00garbage"[..]));
        assert_eq!(letter.offset, 41);
    }
}
