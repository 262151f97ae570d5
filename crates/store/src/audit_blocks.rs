//! How the audit trail is laid out in rows: one `audit_blocks` row per commit and stream.
//!
//! A transition appends one to five events to its instance's stream. Stored one row per event,
//! they were the largest share of the database's work per instance (a tuple, a key entry and a
//! decode each); a block holds the consecutive events one commit appends to one stream, as a
//! JSON array, with the stream's head after it (`last_seq`, `last_hash`) beside it for the next
//! append. Each event keeps its seq, its hash and the previous one, so the hash chain, and
//! every reader of [`AuditRecord`]s, are unchanged (migration 0011 moved the old rows over).

use serde::Deserialize;
use serde_json::Value;
use workflow_core::instance::ActorRef;
use workflow_core::Timestamp;

use crate::queries::{to_json, Chained};
use crate::records::AuditRecord;
use crate::StoreError;

/// One event as its block stores it; the JSON documents (`actor`, `before`, `after`) already
/// encoded, as every writer has them.
pub(crate) struct BlockEvent<'a> {
    pub(crate) seq: i64,
    pub(crate) at: i64,
    pub(crate) actor: &'a str,
    pub(crate) kind: &'a str,
    pub(crate) before: &'a str,
    pub(crate) after: &'a str,
    pub(crate) reason: Option<&'a str>,
    pub(crate) prev_hash: &'a str,
    pub(crate) hash: &'a str,
}

/// A block being assembled: one stream's consecutive events of one commit.
pub(crate) struct BlockText {
    pub(crate) first_seq: i64,
    pub(crate) last_seq: i64,
    pub(crate) last_hash: String,
    /// The `events` column: a JSON array.
    pub(crate) events: String,
}

impl BlockText {
    /// A block of `first` alone.
    pub(crate) fn new(first: &BlockEvent<'_>) -> BlockText {
        let mut block = BlockText {
            first_seq: first.seq,
            last_seq: first.seq,
            last_hash: String::new(),
            events: String::with_capacity(
                256 + first.before.len() + first.after.len() + first.actor.len(),
            ),
        };
        block.events.push('[');
        block.push_event(first);
        block
    }

    /// Append the stream's next event (`seq` = `last_seq + 1`).
    pub(crate) fn push(&mut self, event: &BlockEvent<'_>) {
        self.events.pop(); // the closing bracket
        self.events.push(',');
        self.push_event(event);
    }

    fn push_event(&mut self, e: &BlockEvent<'_>) {
        use std::fmt::Write as _;
        let out = &mut self.events;
        // `write!` into a String cannot fail.
        let _ = write!(out, "{{\"seq\":{},\"at\":{},\"actor\":", e.seq, e.at);
        out.push_str(e.actor);
        out.push_str(",\"kind\":");
        push_str_json(out, e.kind);
        out.push_str(",\"before\":");
        out.push_str(e.before);
        out.push_str(",\"after\":");
        out.push_str(e.after);
        out.push_str(",\"reason\":");
        match e.reason {
            Some(reason) => push_str_json(out, reason),
            None => out.push_str("null"),
        }
        out.push_str(",\"prev_hash\":");
        push_str_json(out, e.prev_hash);
        out.push_str(",\"hash\":");
        push_str_json(out, e.hash);
        out.push_str("}]");
        self.last_seq = e.seq;
        self.last_hash.clear();
        self.last_hash.push_str(e.hash);
    }
}

/// `s` as a JSON string.
fn push_str_json(out: &mut String, s: &str) {
    if s.bytes()
        .all(|b| b >= 0x20 && b != b'"' && b != b'\\' && b < 0x7f)
    {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        // Escapes: serde_json's own (a `&str` always encodes).
        out.push_str(&serde_json::to_string(s).unwrap_or_default());
    }
}

/// Group `events` (each with its grouping key: instance and stream) into blocks of
/// consecutive events with the same key, in order.
pub(crate) fn blocks<'e, K: PartialEq + Copy>(
    events: impl IntoIterator<Item = (K, BlockEvent<'e>)>,
) -> Vec<(K, BlockText)> {
    let mut out: Vec<(K, BlockText)> = Vec::new();
    for (key, event) in events {
        match out.last_mut() {
            Some((k, block)) if *k == key && block.last_seq + 1 == event.seq => block.push(&event),
            _ => out.push((key, BlockText::new(&event))),
        }
    }
    out
}

/// [`blocks`] of events chained onto their streams (`queries::chain_audits`' output), each
/// keyed by `key` of its position in `chained`.
pub(crate) fn chained_blocks<K: PartialEq + Copy>(
    chained: &[Chained<'_>],
    key: impl Fn(usize) -> K,
) -> Result<Vec<(K, BlockText)>, StoreError> {
    let mut docs = Vec::with_capacity(chained.len());
    for (_, draft, ..) in chained {
        docs.push((
            to_json(&draft.actor)?,
            to_json(&draft.before)?,
            to_json(&draft.after)?,
        ));
    }
    Ok(blocks(chained.iter().zip(&docs).enumerate().map(
        |(i, ((_, draft, seq, prev_hash, hash), (actor, before, after)))| {
            (
                key(i),
                BlockEvent {
                    seq: *seq,
                    at: draft.at.0,
                    actor,
                    kind: &draft.kind,
                    before,
                    after,
                    reason: draft.reason.as_deref(),
                    prev_hash,
                    hash,
                },
            )
        },
    )))
}

/// An event as read back from a block.
#[derive(Deserialize)]
struct StoredEvent {
    seq: i64,
    at: i64,
    actor: ActorRef,
    kind: String,
    before: Value,
    after: Value,
    reason: Option<String>,
    prev_hash: String,
    hash: String,
}

/// The events of one stored block, in its order.
pub(crate) fn decode(
    partner_id: &str,
    stream: &str,
    events: &str,
) -> Result<Vec<AuditRecord>, StoreError> {
    let stored: Vec<StoredEvent> = serde_json::from_str(events).map_err(|e| {
        StoreError::corrupt(format!("an audit block of {stream} does not decode: {e}"))
    })?;
    Ok(stored
        .into_iter()
        .map(|e| AuditRecord {
            partner_id: partner_id.to_string(),
            stream: stream.to_string(),
            seq: e.seq,
            at: Timestamp(e.at),
            actor: e.actor,
            kind: e.kind,
            before: e.before,
            after: e.after,
            reason: e.reason,
            prev_hash: e.prev_hash,
            hash: e.hash,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event<'a>(
        seq: i64,
        hash: &'a str,
        prev: &'a str,
        reason: Option<&'a str>,
    ) -> BlockEvent<'a> {
        BlockEvent {
            seq,
            at: 1_700_000_000_000 + seq,
            actor: r#"{"type":"system","id":"engine"}"#,
            kind: "step.started",
            before: r#"{"status":"running"}"#,
            after: r#"{"status":"waiting","note":"a \"quoted\" word"}"#,
            reason,
            prev_hash: prev,
            hash,
        }
    }

    #[test]
    fn consecutive_events_of_one_key_share_a_block_and_read_back() {
        let events = vec![
            ("a", event(1, "h1", "genesis", None)),
            ("a", event(2, "h2", "h1", Some("line\nbreak \"quoted\""))),
            ("b", event(7, "h7", "h6", None)),
            ("a", event(3, "h3", "h2", None)),
        ];
        let blocks = blocks(events);
        let shape: Vec<_> = blocks
            .iter()
            .map(|(k, b)| (*k, b.first_seq, b.last_seq, b.last_hash.as_str()))
            .collect();
        assert_eq!(
            shape,
            vec![("a", 1, 2, "h2"), ("b", 7, 7, "h7"), ("a", 3, 3, "h3")]
        );
        let read = decode("prt_1", "instance:a", &blocks[0].1.events).expect("decodes");
        assert_eq!(read.len(), 2);
        assert_eq!(read[1].seq, 2);
        assert_eq!(read[1].prev_hash, "h1");
        assert_eq!(read[1].hash, "h2");
        assert_eq!(read[1].reason.as_deref(), Some("line\nbreak \"quoted\""));
        assert_eq!(
            read[1].after,
            json!({"status": "waiting", "note": "a \"quoted\" word"})
        );
        assert_eq!(read[0].actor.id, "engine");
        assert_eq!(read[0].partner_id, "prt_1");
        assert_eq!(read[0].stream, "instance:a");
    }

    #[test]
    fn a_block_never_holds_a_raw_control_character() {
        // The PostgreSQL writer joins blocks with U+001E (`pg_rows.rs`' `Documents`).
        let reason = "split\u{1e}here\u{0}and\ttab";
        let block = BlockText::new(&event(1, "h1", "genesis", Some(reason)));
        assert!(!block.events.chars().any(char::is_control));
        let read = decode("p", "s", &block.events).expect("decodes");
        assert_eq!(read[0].reason.as_deref(), Some(reason));
    }

    #[test]
    fn a_gap_in_seq_starts_a_new_block() {
        let blocks = blocks(vec![
            ("a", event(1, "h1", "genesis", None)),
            ("a", event(5, "h5", "h4", None)),
        ]);
        assert_eq!(blocks.len(), 2);
    }

    #[test]
    fn a_broken_block_is_corrupt_not_a_panic() {
        assert!(matches!(
            decode("p", "s", "[{\"seq\":1"),
            Err(StoreError::Corrupt { .. })
        ));
    }
}
