//! Avro binary written by hand for the message sent most often per instance: lifecycle events
//! (three to six per instance, one per milestone).
//!
//! apache-avro's serde writer looks every field up by name and resolves each union as it
//! goes: about 11,000 instructions for a lifecycle event of a few dozen bytes, 2.5 % of an
//! embedded run's (docs/benchmarks.md, round 16). Written here field by field, in the
//! schema's order, it is a few hundred. The bytes are the same: a test encodes a range of
//! events both ways and compares them, so a schema change this module does not follow fails
//! the build's tests rather than the readers.

use crate::messages::{LifecycleEvent, LifecycleEventKind};

/// `long` and `int`: zig-zag, then a little-endian base-128 varint.
fn long(out: &mut Vec<u8>, value: i64) {
    let mut n = ((value << 1) ^ (value >> 63)) as u64;
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// `string`: its length in bytes as a `long`, then its UTF-8.
fn string(out: &mut Vec<u8>, value: &str) {
    // A `str` is never longer than `isize::MAX` bytes, so this is exact.
    long(out, value.len() as i64);
    out.extend_from_slice(value.as_bytes());
}

/// `["null", T]`: the branch's index as a `long`, then the value, if any.
fn optional<T>(out: &mut Vec<u8>, value: Option<T>, write: impl FnOnce(&mut Vec<u8>, T)) {
    match value {
        None => long(out, 0),
        Some(v) => {
            long(out, 1);
            write(out, v);
        }
    }
}

/// The Avro body (no single-object header) of `LifecycleEvent.avsc`.
pub(crate) fn lifecycle_event(event: &LifecycleEvent) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        48 + event.event_id.len()
            + event.partner_id.len()
            + event.instance_id.len()
            + event.template_id.len()
            + event.status.as_ref().map_or(0, String::len),
    );
    string(&mut out, &event.event_id);
    string(&mut out, &event.partner_id);
    string(&mut out, &event.instance_id);
    string(&mut out, &event.template_id);
    long(&mut out, event.template_version);
    // The enum's symbols, in the schema's order.
    long(
        &mut out,
        match event.kind {
            LifecycleEventKind::InstanceStarted => 0,
            LifecycleEventKind::StepCompleted => 1,
            LifecycleEventKind::InstanceFinished => 2,
        },
    );
    optional(&mut out, event.step_index, |out, i| long(out, i64::from(i)));
    optional(&mut out, event.status.as_deref(), string);
    long(&mut out, event.at);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode, encode, Message, SchemaName};

    fn events() -> Vec<LifecycleEvent> {
        let long_text = "é".repeat(200);
        let kinds = [
            LifecycleEventKind::InstanceStarted,
            LifecycleEventKind::StepCompleted,
            LifecycleEventKind::InstanceFinished,
        ];
        let mut out = Vec::new();
        for (i, kind) in kinds.into_iter().enumerate() {
            for (j, (step_index, status)) in [
                (None, None),
                (Some(0), Some("completed".to_string())),
                (Some(i32::MAX), Some(long_text.clone())),
                (Some(-1), Some(String::new())),
                (Some(i32::MIN), None),
            ]
            .into_iter()
            .enumerate()
            {
                out.push(LifecycleEvent {
                    event_id: format!("evt-{i}-{step_index:?}"),
                    partner_id: if i == 0 {
                        String::new()
                    } else {
                        long_text.clone()
                    },
                    instance_id: "01a21dd1-0c69-70fd-ae4d-14a5476e180e".into(),
                    template_id: "tpl_procurement".into(),
                    template_version: [0, 1, 63, 64, -64, -65, i64::MAX, i64::MIN][(i * 5 + j) % 8],
                    kind,
                    step_index,
                    status,
                    at: [1_795_796_569_221, 0, -1, i64::MAX, i64::MIN][(i + j) % 5],
                });
            }
        }
        out
    }

    #[test]
    fn lifecycle_events_are_the_bytes_apache_avro_writes() {
        for event in events() {
            let by_hand = event.to_avro().expect("encodes");
            let by_serde = encode(SchemaName::LifecycleEvent, &event).expect("encodes");
            assert_eq!(by_hand, by_serde, "{event:?}");
            assert_eq!(decode::<LifecycleEvent>(&by_hand).expect("decodes"), event);
        }
    }

    #[test]
    fn varints_cross_their_byte_boundaries() {
        for (value, bytes) in [
            (0i64, vec![0x00]),
            (-1, vec![0x01]),
            (1, vec![0x02]),
            (63, vec![0x7e]),
            (-64, vec![0x7f]),
            (64, vec![0x80, 0x01]),
            (i64::MIN, vec![0xff; 9].into_iter().chain([0x01]).collect()),
        ] {
            let mut out = Vec::new();
            long(&mut out, value);
            assert_eq!(out, bytes, "{value}");
        }
    }
}
