//! The audit trail's hash chain: each event's hash covers its content and the previous hash.
//!
//! Events of one stream (an instance, a template) form a chain starting at [`GENESIS`]; changing,
//! removing or reordering any stored event breaks every hash after it, which [`verify_chain`]
//! reports.

use std::sync::OnceLock;

use serde_json::Value;

use crate::instance::ActorRef;
use crate::time::Timestamp;

/// The `prev_hash` of a stream's first event.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What an event's hash covers.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditContent<'a> {
    pub partner_id: &'a str,
    pub stream: &'a str,
    pub seq: i64,
    pub at: Timestamp,
    pub actor: &'a ActorRef,
    pub kind: &'a str,
    pub before: &'a Value,
    pub after: &'a Value,
    pub reason: Option<&'a str>,
}

/// SHA-256 (hex) over the previous hash and the canonical JSON of the content.
pub fn chain_hash(prev_hash: &str, content: &AuditContent<'_>) -> String {
    let mut canonical = Vec::with_capacity(512);
    write_content(content, &mut canonical);
    let mut hasher = ChainHasher::new(prev_hash);
    hasher.update(&canonical);
    hasher.finish_hex()
}

/// SHA-256 over `prev_hash`, a newline and what follows: the hash of one link of a chain,
/// for writers that assemble the canonical content in pieces. ring's SHA-256 (assembly) takes
/// about half the time of the portable code on CPUs without SHA extensions, and every commit
/// hashes each event it appends.
pub struct ChainHasher(ring::digest::Context);

impl ChainHasher {
    pub fn new(prev_hash: &str) -> ChainHasher {
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        context.update(prev_hash.as_bytes());
        context.update(b"\n");
        ChainHasher(context)
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// The hash, as lowercase hex. Into a buffer: `hex::encode` goes a char at a time, and
    /// every event a commit appends is hashed (about 2 % of an embedded run's instructions).
    pub fn finish_hex(self) -> String {
        let digest = self.0.finish();
        let mut out = [0u8; 64];
        // A SHA-256 digest is 32 bytes, half of `out`, and hex is ASCII: neither step fails.
        match hex::encode_to_slice(digest.as_ref(), &mut out).map(|()| std::str::from_utf8(&out)) {
            Ok(Ok(hex)) => hex.to_owned(),
            _ => hex::encode(digest),
        }
    }
}

/// The canonical JSON of the document `{"partner_id", "stream", "seq", "at", "actor": {"id",
/// "type"}, "kind", "before", "after", "reason"}`, written straight from the content: building
/// that document first deep-copied `before` and `after` for every event hashed. Its keys are
/// written here in sorted order, as [`write_canonical`] would sort them.
fn write_content(content: &AuditContent<'_>, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"actor\":{\"id\":");
    write_json(content.actor.id.as_str(), out);
    out.extend_from_slice(b",\"type\":");
    write_json(&content.actor.actor_type, out);
    out.extend_from_slice(b"},\"after\":");
    write_canonical(content.after, out);
    out.extend_from_slice(b",\"at\":");
    write_json(&content.at.0, out);
    out.extend_from_slice(b",\"before\":");
    write_canonical(content.before, out);
    out.extend_from_slice(b",\"kind\":");
    write_json(content.kind, out);
    out.extend_from_slice(b",\"partner_id\":");
    write_json(content.partner_id, out);
    out.extend_from_slice(b",\"reason\":");
    write_json(&content.reason, out);
    out.extend_from_slice(b",\"seq\":");
    write_json(&content.seq, out);
    out.extend_from_slice(b",\"stream\":");
    write_json(content.stream, out);
    out.push(b'}');
}

/// Compact JSON of a scalar (a string, number, bool, null or a unit enum), exactly as
/// `serde_json::Value`'s `to_string` writes it.
fn write_json<T: serde::Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) {
    // Serialising a scalar into a Vec cannot fail: no IO error, no non-string map key.
    let _ = serde_json::to_writer(out, value);
}

/// JSON with object keys sorted at every level, so the hash never depends on map order.
fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    write_sorted(value, maps_iterate_sorted(), out);
}

/// [`write_canonical`]; `in_order`: maps iterate in key order, no need to sort their keys.
fn write_sorted(value: &Value, in_order: bool, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            out.push(b'{');
            if in_order {
                for (i, (key, v)) in map.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write_json(key.as_str(), out);
                    out.push(b':');
                    write_sorted(v, in_order, out);
                }
            } else {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                for (i, key) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write_json(key.as_str(), out);
                    out.push(b':');
                    if let Some(v) = map.get(key) {
                        write_sorted(v, in_order, out);
                    }
                }
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_sorted(item, in_order, out);
            }
            out.push(b']');
        }
        scalar => write_json(scalar, out),
    }
}

/// Whether serde_json's maps iterate in key order: they are `BTreeMap`s unless its
/// `preserve_order` feature is on somewhere in the build (then they keep insertion order and
/// keys are sorted here). Found out once, by trying.
fn maps_iterate_sorted() -> bool {
    static SORTED: OnceLock<bool> = OnceLock::new();
    *SORTED.get_or_init(|| {
        let mut map = serde_json::Map::new();
        map.insert("b".to_string(), Value::Null);
        map.insert("a".to_string(), Value::Null);
        map.keys().map(String::as_str).eq(["a", "b"])
    })
}

/// A stored event as the verifier sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ChainLink<'a> {
    pub content: AuditContent<'a>,
    pub prev_hash: &'a str,
    pub hash: &'a str,
}

/// Why a chain does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("event seq {seq} should be {expected}: the chain has a gap or is out of order")]
    Sequence { seq: i64, expected: i64 },
    #[error(
        "event seq {seq} names prev_hash {found}, but the previous event's hash is {expected}"
    )]
    Link {
        seq: i64,
        found: String,
        expected: String,
    },
    #[error("event seq {seq} has hash {found}, but its content hashes to {expected}")]
    Content {
        seq: i64,
        found: String,
        expected: String,
    },
}

/// Check a stream's events, in order from its first (seq 1). Returns how many verified.
pub fn verify_chain(links: &[ChainLink<'_>]) -> Result<usize, ChainError> {
    let mut prev = GENESIS.to_string();
    for (i, link) in links.iter().enumerate() {
        let expected_seq = i as i64 + 1;
        if link.content.seq != expected_seq {
            return Err(ChainError::Sequence {
                seq: link.content.seq,
                expected: expected_seq,
            });
        }
        if link.prev_hash != prev {
            return Err(ChainError::Link {
                seq: link.content.seq,
                found: link.prev_hash.to_string(),
                expected: prev,
            });
        }
        let computed = chain_hash(link.prev_hash, &link.content);
        if computed != link.hash {
            return Err(ChainError::Content {
                seq: link.content.seq,
                found: link.hash.to_string(),
                expected: computed,
            });
        }
        prev = computed;
    }
    Ok(links.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::ActorType;
    use proptest::prelude::*;
    use serde_json::json;
    use sha2::{Digest, Sha256};

    fn actor() -> ActorRef {
        ActorRef {
            id: "u1".into(),
            actor_type: ActorType::Human,
        }
    }

    #[test]
    fn a_chain_verifies_and_tampering_is_found() {
        let actor = actor();
        let befores = [json!(null), json!({"status": "running"})];
        let afters = [json!({"status": "running"}), json!({"b": 1, "a": 2})];
        let mut hashes = Vec::new();
        let mut prev = GENESIS.to_string();
        for i in 0..2 {
            let content = AuditContent {
                partner_id: "p1",
                stream: "instance:x",
                seq: i as i64 + 1,
                at: Timestamp(1000 + i as i64),
                actor: &actor,
                kind: "k",
                before: &befores[i],
                after: &afters[i],
                reason: None,
            };
            let h = chain_hash(&prev, &content);
            hashes.push((prev.clone(), h.clone()));
            prev = h;
        }
        let links: Vec<ChainLink<'_>> = (0..2)
            .map(|i| ChainLink {
                content: AuditContent {
                    partner_id: "p1",
                    stream: "instance:x",
                    seq: i as i64 + 1,
                    at: Timestamp(1000 + i as i64),
                    actor: &actor,
                    kind: "k",
                    before: &befores[i],
                    after: &afters[i],
                    reason: None,
                },
                prev_hash: &hashes[i].0,
                hash: &hashes[i].1,
            })
            .collect();
        assert_eq!(verify_chain(&links), Ok(2));

        let tampered = json!({"b": 1, "a": 3});
        let mut bad = links.clone();
        bad[1].content.after = &tampered;
        assert!(matches!(
            verify_chain(&bad),
            Err(ChainError::Content { seq: 2, .. })
        ));

        let mut reordered = links.clone();
        reordered.swap(0, 1);
        assert!(matches!(
            verify_chain(&reordered),
            Err(ChainError::Sequence { .. })
        ));
    }

    #[test]
    fn canonical_form_ignores_key_order() {
        let mut a = Vec::new();
        let mut b = Vec::new();
        write_canonical(&json!({"x": 1, "y": [true, {"b": 2, "a": 1}]}), &mut a);
        let v: Value =
            serde_json::from_str(r#"{"y":[true,{"a":1,"b":2}],"x":1}"#).unwrap_or(Value::Null);
        write_canonical(&v, &mut b);
        assert_eq!(a, b);
        assert_eq!(
            String::from_utf8(a.clone()).unwrap(),
            r#"{"x":1,"y":[true,{"a":1,"b":2}]}"#
        );
        assert!(maps_iterate_sorted());
        // Keys sorted here, as with maps that keep insertion order.
        let mut c = Vec::new();
        write_sorted(&v, false, &mut c);
        assert_eq!(a, c);
    }

    /// The hash as first written (a JSON document built, then written with sorted keys): stored
    /// chains were hashed this way, so [`chain_hash`] must give the same bytes.
    fn reference_chain_hash(prev_hash: &str, content: &AuditContent<'_>) -> String {
        fn canonical(value: &Value, out: &mut String) {
            match value {
                Value::Object(map) => {
                    let mut keys: Vec<&String> = map.keys().collect();
                    keys.sort();
                    out.push('{');
                    for (i, key) in keys.into_iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        out.push_str(&Value::String(key.clone()).to_string());
                        out.push(':');
                        canonical(&map[key.as_str()], out);
                    }
                    out.push('}');
                }
                Value::Array(items) => {
                    out.push('[');
                    for (i, item) in items.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        canonical(item, out);
                    }
                    out.push(']');
                }
                scalar => out.push_str(&scalar.to_string()),
            }
        }
        let doc = json!({
            "partner_id": content.partner_id,
            "stream": content.stream,
            "seq": content.seq,
            "at": content.at.0,
            "actor": {"id": content.actor.id, "type": content.actor.actor_type},
            "kind": content.kind,
            "before": content.before,
            "after": content.after,
            "reason": content.reason,
        });
        let mut text = String::new();
        canonical(&doc, &mut text);
        let mut hasher = Sha256::new();
        hasher.update(prev_hash.as_bytes());
        hasher.update(b"\n");
        hasher.update(text.as_bytes());
        hex::encode(hasher.finalize())
    }

    #[test]
    fn hash_is_unchanged() {
        let actor = ActorRef {
            id: "agent \"q\"\u{e9}\n".into(),
            actor_type: ActorType::Agent,
        };
        let before = json!({"index": 3, "status": "running", "z": [1.5, -2, 1e300, null]});
        let after = json!({"b": {"y": "\u{1f600}\t<>&", "x": false}, "a": u64::MAX, "": {}});
        let content = AuditContent {
            partner_id: "p\\1",
            stream: "instance:x",
            seq: 42,
            at: Timestamp(-5),
            actor: &actor,
            kind: "step.started",
            before: &before,
            after: &after,
            reason: Some("why \"not\"\u{7f}\u{1}"),
        };
        assert_eq!(
            chain_hash(GENESIS, &content),
            reference_chain_hash(GENESIS, &content)
        );
        let content = AuditContent {
            reason: None,
            before: &Value::Null,
            ..content
        };
        assert_eq!(
            chain_hash("ab", &content),
            reference_chain_hash("ab", &content)
        );
        // Pinned: a chain stored before the canonical writer was rewritten.
        let actor = ActorRef {
            id: "u1".into(),
            actor_type: ActorType::Human,
        };
        let before = json!(null);
        let after = json!({"status": "running", "template_id": "t", "trigger": {"amount": 500}});
        let content = AuditContent {
            partner_id: "p1",
            stream: "instance:x",
            seq: 1,
            at: Timestamp(1000),
            actor: &actor,
            kind: "instance.created",
            before: &before,
            after: &after,
            reason: None,
        };
        assert_eq!(chain_hash(GENESIS, &content), PINNED_HASH);
    }

    const PINNED_HASH: &str = "f42e60406cd5ceb9517189f1ce7c180fad4a97c20ce30a5285e8e5f4d238a51d";

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<u64>().prop_map(|n| json!(n)),
            any::<f64>().prop_map(|f| json!(f)),
            ".{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map(".{0,8}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn hash_matches_the_reference(
            before in json_value(),
            after in json_value(),
            id in ".{0,10}",
            kind in ".{0,10}",
            reason in proptest::option::of(".{0,10}"),
            seq in any::<i64>(),
            at in any::<i64>(),
        ) {
            let actor = ActorRef { id, actor_type: ActorType::System };
            let content = AuditContent {
                partner_id: "p",
                stream: "instance:s",
                seq,
                at: Timestamp(at),
                actor: &actor,
                kind: &kind,
                before: &before,
                after: &after,
                reason: reason.as_deref(),
            };
            prop_assert_eq!(
                chain_hash(GENESIS, &content),
                reference_chain_hash(GENESIS, &content)
            );
        }
    }
}
