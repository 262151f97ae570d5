//! Avro single-object encoding: the only place that knows the byte layout of a message.
//!
//! ```text
//! C3 01 | 8-byte CRC-64-AVRO fingerprint of the writer schema (little-endian) | Avro binary body
//! ```
//!
//! See <https://avro.apache.org/docs/1.12.0/specification/#single-object-encoding>. The
//! fingerprint names the writer schema, so a reader can look it up and resolve it to its own.

use std::fmt;

use crate::error::CodecError;

/// The two-byte marker that starts every single-object encoded message.
pub const MARKER: [u8; 2] = [0xC3, 0x01];

/// Marker plus fingerprint: the bytes before the Avro body.
pub const HEADER_LEN: usize = 10;

/// The CRC-64-AVRO (Rabin) fingerprint of a schema's Parsing Canonical Form, as its 8 bytes
/// appear in a message (little-endian).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 8]);

impl Fingerprint {
    /// The fingerprint as the spec's signed 64-bit number (Java's `SchemaNormalization.parsingFingerprint64`).
    pub fn as_i64(self) -> i64 {
        i64::from_le_bytes(self.0)
    }
}

impl fmt::Display for Fingerprint {
    /// The 8 bytes as they appear on the wire, in hex: what a hexdump of a message shows.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Prefix `body` with the marker and `fingerprint`.
pub fn frame(fingerprint: Fingerprint, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&MARKER);
    out.extend_from_slice(&fingerprint.0);
    out.extend_from_slice(body);
    out
}

/// Split a message into the writer schema's fingerprint and the Avro body.
pub fn unframe(bytes: &[u8]) -> Result<(Fingerprint, &[u8]), CodecError> {
    let Some((header, body)) = bytes.split_first_chunk::<HEADER_LEN>() else {
        // Too short: a wrong first byte is the clearer diagnosis when there is one.
        return match bytes {
            [a, ..] if *a != MARKER[0] => Err(CodecError::BadMarker {
                found: bytes.iter().take(2).copied().collect(),
            }),
            [_, b, ..] if *b != MARKER[1] => Err(CodecError::BadMarker {
                found: bytes.iter().take(2).copied().collect(),
            }),
            _ => Err(CodecError::Truncated { len: bytes.len() }),
        };
    };
    let (marker, fingerprint) = header.split_at(2);
    if marker != MARKER {
        return Err(CodecError::BadMarker {
            found: marker.to_vec(),
        });
    }
    let mut fp = [0u8; 8];
    fp.copy_from_slice(fingerprint);
    Ok((Fingerprint(fp), body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_and_unframes() {
        let fp = Fingerprint([1, 2, 3, 4, 5, 6, 7, 8]);
        let bytes = frame(fp, b"body");
        assert_eq!(&bytes[..2], &MARKER);
        assert_eq!(unframe(&bytes).unwrap(), (fp, &b"body"[..]));
        assert_eq!(fp.to_string(), "0102030405060708");
        assert_eq!(fp.as_i64(), 0x0807060504030201);
    }

    #[test]
    fn rejects_short_and_foreign_bytes() {
        assert!(matches!(
            unframe(&[]),
            Err(CodecError::Truncated { len: 0 })
        ));
        assert!(matches!(
            unframe(&[0xC3, 0x01, 0]),
            Err(CodecError::Truncated { len: 3 })
        ));
        assert!(matches!(
            unframe(b"{\"json\":1}"),
            Err(CodecError::BadMarker { .. })
        ));
        assert!(matches!(
            unframe(&[0xC3]),
            Err(CodecError::Truncated { len: 1 })
        ));
        assert!(matches!(
            unframe(&[0xC3, 0x02]),
            Err(CodecError::BadMarker { .. })
        ));
    }
}
