//! The audit trail's hash chain: each event's hash covers its content and the previous hash.
//!
//! Events of one stream (an instance, a template) form a chain starting at [`GENESIS`]; changing,
//! removing or reordering any stored event breaks every hash after it, which [`verify_chain`]
//! reports.

use serde_json::Value;
use sha2::{Digest, Sha256};

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
    let doc = serde_json::json!({
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
    let mut canonical = String::new();
    write_canonical(&doc, &mut canonical);
    let mut hasher = Sha256::new();
    hasher.update(prev_hash.as_bytes());
    hasher.update(b"\n");
    hasher.update(canonical.as_bytes());
    hex::encode(hasher.finalize())
}

/// JSON with object keys sorted at every level, so the hash never depends on map order.
fn write_canonical(value: &Value, out: &mut String) {
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
                if let Some(v) = map.get(key) {
                    write_canonical(v, out);
                }
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
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
    use serde_json::json;

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
        let mut a = String::new();
        let mut b = String::new();
        write_canonical(&json!({"x": 1, "y": [true, {"b": 2, "a": 1}]}), &mut a);
        let v: Value =
            serde_json::from_str(r#"{"y":[true,{"a":1,"b":2}],"x":1}"#).unwrap_or(Value::Null);
        write_canonical(&v, &mut b);
        assert_eq!(a, b);
    }
}
