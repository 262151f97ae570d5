//! Arbitrary bytes never make the codec panic: they decode to an error (or, by chance, to a
//! valid message).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers fail loudly"
)]

mod common;

use common::*;
use proptest::prelude::*;
use workflow_codec::*;

/// Every known fingerprint, to get past the header into the Avro decoder.
fn fingerprints() -> Vec<Fingerprint> {
    let registry = Registry::global().unwrap();
    registry.schemas().map(|s| s.fingerprint).collect()
}

fn golden_messages() -> Vec<Vec<u8>> {
    samples()
        .into_iter()
        .map(|(_, name, json)| encode_json(name, &json))
        .collect()
}

/// Decode in every way a consumer might; none may panic.
fn decode_all_ways(bytes: &[u8]) {
    let _ = decode::<serde_json::Value>(bytes);
    let _ = writer_schema(bytes);
    for name in SchemaName::ALL {
        let _ = decode_json(name, bytes);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_are_an_error(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        decode_all_ways(&bytes);
        // Without the marker it is always an error.
        if bytes.len() < 2 || bytes[..2] != framing::MARKER {
            prop_assert!(decode::<serde_json::Value>(&bytes).is_err());
        }
    }

    #[test]
    fn random_bodies_behind_a_known_header_do_not_panic(
        which in any::<prop::sample::Index>(),
        body in proptest::collection::vec(any::<u8>(), 0..128),
    ) {
        let fps = fingerprints();
        let bytes = framing::frame(fps[which.index(fps.len())], &body);
        decode_all_ways(&bytes);
    }

    #[test]
    fn corrupted_messages_do_not_panic(
        which in any::<prop::sample::Index>(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let messages = golden_messages();
        let mut bytes = messages[which.index(messages.len())].clone();
        // Keep the header so the body reaches the decoder; corrupt the body.
        for (at, byte) in flips {
            let body_len = bytes.len() - framing::HEADER_LEN;
            bytes[framing::HEADER_LEN + at.index(body_len)] = byte;
        }
        decode_all_ways(&bytes);
        bytes.truncate(framing::HEADER_LEN + cut.index(bytes.len() - framing::HEADER_LEN));
        decode_all_ways(&bytes);
    }
}

/// Lengths that claim far more data than the message holds fail without allocating it for
/// long, and huge array counts are refused.
#[test]
fn huge_length_prefixes_are_errors() {
    let fp = Registry::global()
        .unwrap()
        .current(SchemaName::StepCommand)
        .fingerprint;
    // A string claiming i64::MAX/2 bytes.
    let mut body = vec![0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
    body.extend_from_slice(b"abc");
    assert!(decode::<StepCommand>(&framing::frame(fp, &body)).is_err());
    // A negative length.
    assert!(decode::<StepCommand>(&framing::frame(fp, &[0x01])).is_err());

    let fp = Registry::global()
        .unwrap()
        .current(SchemaName::DecisionCommand)
        .fingerprint;
    let mut body = Vec::new();
    for s in ["d", "p", "i"] {
        body.push((s.len() * 2) as u8);
        body.extend_from_slice(s.as_bytes());
    }
    body.push(2); // step_index 1
    body.extend_from_slice(&[2, b'a', 0]); // actor {id "a", type human}
    body.extend_from_slice(&[0xfe, 0xff, 0xff, 0xff, 0x0f]); // roles: 2^31-1 items
    assert!(decode::<DecisionCommand>(&framing::frame(fp, &body)).is_err());
}
