//! The outbox table's rows: one message, or every message of one write packed into one row.
//!
//! A transition commonly causes several messages (the lifecycle events of the steps it
//! completed, the next step's command): seven per instance of the seed workload. Each was a
//! row inserted, indexed twice and deleted once published, about a third of the rows
//! PostgreSQL wrote per instance. The writes that know their messages belong together (a
//! group commit's commits, the SQLite writer's writes) now store them as one row:
//! - `messages` is how many the row holds; with more than one, `payload` packs them (see
//!   [`pack`]), and the row's `id`, `topic` and `msg_key` are those of its **last** message.
//! - The relay publishes a packed row's messages in order and deletes the row by its id. The
//!   fast path deletes by the ids of the messages it published, always a prefix of what this
//!   process committed, in order: the last message's id is among them only once all of the
//!   row's messages were published, so a row is never deleted with a message unpublished.
//! - Ids must still be unique: [`pack`] refuses a write whose messages repeat an id (the
//!   table's unique index sees only the last id of a packed row).

use std::collections::HashSet;

use crate::records::OutboxMessage;
use crate::StoreError;

/// The columns a reader selects.
pub(crate) const COLUMNS: &str = "id, topic, msg_key, payload, messages";

/// The first byte of a packed payload: its format.
const FORMAT: u8 = 1;

/// One row to insert.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct OutboxRow<'a> {
    pub(crate) id: &'a str,
    pub(crate) topic: &'a str,
    pub(crate) key: &'a str,
    pub(crate) payload: std::borrow::Cow<'a, [u8]>,
    /// How many messages the row holds.
    pub(crate) messages: i64,
}

/// The row holding `messages` (one write's, in order); `None` when there are none.
/// `AlreadyExists` when two of them share an id.
pub(crate) fn pack(messages: &[OutboxMessage]) -> Result<Option<OutboxRow<'_>>, StoreError> {
    let Some(last) = messages.last() else {
        return Ok(None);
    };
    if messages.len() == 1 {
        return Ok(Some(OutboxRow {
            id: &last.id,
            topic: &last.topic,
            key: &last.key,
            payload: std::borrow::Cow::Borrowed(&last.payload),
            messages: 1,
        }));
    }
    let mut ids = HashSet::with_capacity(messages.len());
    let mut size = 1;
    for m in messages {
        if !ids.insert(m.id.as_str()) {
            return Err(StoreError::AlreadyExists {
                what: "outbox message",
                id: m.id.clone(),
            });
        }
        size += 16 + m.id.len() + m.topic.len() + m.key.len() + m.payload.len();
    }
    let mut payload = Vec::with_capacity(size);
    payload.push(FORMAT);
    for m in messages {
        for field in [
            m.id.as_bytes(),
            m.topic.as_bytes(),
            m.key.as_bytes(),
            &m.payload,
        ] {
            let len = u32::try_from(field.len()).map_err(|_| {
                StoreError::corrupt(format!("outbox message {} is over 4 GiB", m.id))
            })?;
            payload.extend_from_slice(&len.to_be_bytes());
            payload.extend_from_slice(field);
        }
    }
    Ok(Some(OutboxRow {
        id: &last.id,
        topic: &last.topic,
        key: &last.key,
        payload: std::borrow::Cow::Owned(payload),
        messages: i64::try_from(messages.len()).unwrap_or(i64::MAX),
    }))
}

/// The messages of one stored row, in order.
pub(crate) fn unpack(
    id: String,
    topic: String,
    key: String,
    payload: Vec<u8>,
    messages: i64,
) -> Result<Vec<OutboxMessage>, StoreError> {
    if messages <= 1 {
        return Ok(vec![OutboxMessage {
            id,
            topic,
            key,
            payload,
        }]);
    }
    let corrupt = |why: &str| StoreError::corrupt(format!("outbox row {id}: {why}"));
    let Some((&FORMAT, mut rest)) = payload.split_first() else {
        return Err(corrupt("unknown packed format"));
    };
    let mut field = || -> Option<&[u8]> {
        let (len, tail) = rest.split_first_chunk::<4>()?;
        let len = usize::try_from(u32::from_be_bytes(*len)).ok()?;
        let (value, tail) = tail.split_at_checked(len)?;
        rest = tail;
        Some(value)
    };
    let text = |bytes: &[u8]| String::from_utf8(bytes.to_vec()).ok();
    let mut out = Vec::new();
    while out.len() < usize::try_from(messages).unwrap_or(usize::MAX) {
        let message = (|| {
            Some(OutboxMessage {
                id: text(field()?)?,
                topic: text(field()?)?,
                key: text(field()?)?,
                payload: field()?.to_vec(),
            })
        })()
        .ok_or_else(|| corrupt("a packed message is cut short"))?;
        out.push(message);
    }
    if !rest.is_empty() {
        return Err(corrupt("bytes after the last packed message"));
    }
    if out.last().map(|m| m.id.as_str()) != Some(id.as_str()) {
        return Err(corrupt("its id is not its last message's"));
    }
    Ok(out)
}

/// The messages of stored rows (selected as [`COLUMNS`]), in order.
pub(crate) fn messages_of(rows: &[sqlx::any::AnyRow]) -> Result<Vec<OutboxMessage>, StoreError> {
    use sqlx::Row;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        out.extend(unpack(
            row.try_get("id")?,
            row.try_get("topic")?,
            row.try_get("msg_key")?,
            row.try_get("payload")?,
            row.try_get("messages")?,
        )?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(id: &str, topic: &str, payload: &[u8]) -> OutboxMessage {
        OutboxMessage {
            id: id.into(),
            topic: topic.into(),
            key: "instance-1".into(),
            payload: payload.to_vec(),
        }
    }

    fn stored(row: OutboxRow<'_>) -> Result<Vec<OutboxMessage>, StoreError> {
        unpack(
            row.id.into(),
            row.topic.into(),
            row.key.into(),
            row.payload.into_owned(),
            row.messages,
        )
    }

    #[test]
    fn one_message_is_a_plain_row() -> Result<(), StoreError> {
        let m = [message("a", "workflow.lifecycle", b"\x01\x02")];
        let row = pack(&m)?.ok_or_else(|| StoreError::corrupt("no row"))?;
        assert_eq!((row.id, row.messages), ("a", 1));
        assert_eq!(row.payload.as_ref(), b"\x01\x02");
        assert_eq!(stored(row)?, m);
        assert_eq!(pack(&[])?, None);
        Ok(())
    }

    #[test]
    fn several_messages_round_trip_in_order_under_the_last_id() -> Result<(), StoreError> {
        let m = [
            message("a", "workflow.lifecycle", b"first"),
            message("b", "workflow.lifecycle", b""),
            message("c", "workflow.steps.action", &[0, 255, 7]),
        ];
        let row = pack(&m)?.ok_or_else(|| StoreError::corrupt("no row"))?;
        assert_eq!(
            (row.id, row.topic, row.key, row.messages),
            ("c", "workflow.steps.action", "instance-1", 3)
        );
        assert_eq!(stored(row)?, m);
        Ok(())
    }

    #[test]
    fn a_repeated_id_is_refused() {
        let m = [message("a", "t", b"1"), message("a", "t", b"2")];
        assert!(matches!(
            pack(&m),
            Err(StoreError::AlreadyExists {
                what: "outbox message",
                ..
            })
        ));
    }

    #[test]
    fn a_damaged_packed_row_is_corrupt_not_a_panic() -> Result<(), StoreError> {
        let m = [message("a", "t", b"12345"), message("b", "t", b"678")];
        let row = pack(&m)?.ok_or_else(|| StoreError::corrupt("no row"))?;
        let payload = row.payload.into_owned();
        let unpacked = |payload: Vec<u8>, count: i64, id: &str| {
            unpack(id.into(), "t".into(), "instance-1".into(), payload, count)
        };
        // Cut anywhere, or one message too many or too few, or another id, or another format.
        for cut in 0..payload.len() {
            assert!(
                unpacked(payload[..cut].to_vec(), 2, "b").is_err(),
                "cut {cut}"
            );
        }
        assert!(unpacked(payload.clone(), 3, "b").is_err());
        assert!(
            unpacked(payload.clone(), 1, "b")?.len() == 1,
            "one message: a plain row"
        );
        let mut longer = payload.clone();
        longer.push(0);
        assert!(unpacked(longer, 2, "b").is_err());
        assert!(unpacked(payload.clone(), 2, "a").is_err());
        let mut format = payload;
        format[0] = 2;
        assert!(unpacked(format, 2, "b").is_err());
        Ok(())
    }
}
