//! What can go wrong encoding or decoding a message.

use crate::framing::Fingerprint;
use crate::registry::SchemaName;

/// Every failure of the codec. Decoding arbitrary bytes returns one of these, never panics.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Fewer bytes than the 10-byte single-object header.
    #[error("truncated message: {len} bytes, a single-object encoded message has at least 10")]
    Truncated { len: usize },

    /// The bytes do not start with the single-object marker `C3 01` (JSON, another framing such
    /// as the Confluent wire format, or garbage).
    #[error("not an Avro single-object message: starts with {found:02x?}, expected [c3, 01]")]
    BadMarker { found: Vec<u8> },

    /// The writer schema's fingerprint is none of the schemas this build knows (current or
    /// previous version): a newer producer, or a message that is not ours.
    #[error("unknown writer schema fingerprint {0}")]
    UnknownFingerprint(Fingerprint),

    /// The message was written with another schema than the one the caller expects.
    #[error("schema mismatch: expected a {expected} message, it is a {found}")]
    SchemaMismatch {
        expected: SchemaName,
        found: SchemaName,
    },

    /// The Avro body decoded but bytes were left over: the body does not match the schema its
    /// fingerprint names.
    #[error("{trailing} unexpected bytes after the {schema} body")]
    TrailingBytes { schema: SchemaName, trailing: usize },

    /// apache-avro refused to encode, decode, resolve or map the value.
    #[error("avro {operation} of {schema} failed: {source}")]
    Avro {
        schema: SchemaName,
        operation: Operation,
        #[source]
        source: apache_avro::Error,
    },

    /// The schemas compiled into this build do not parse: a bug caught by the crate's tests.
    #[error("invalid embedded schema {file}: {message}")]
    InvalidSchema { file: String, message: String },
}

/// Which step of the codec an [`CodecError::Avro`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Serialising the value with the writer schema.
    Encode,
    /// Reading the body with the writer schema (and resolving it to the reader schema).
    Decode,
    /// Mapping the decoded value onto the caller's type.
    Deserialize,
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Operation::Encode => "encoding",
            Operation::Decode => "decoding",
            Operation::Deserialize => "deserialisation",
        })
    }
}

impl CodecError {
    pub(crate) fn avro(
        schema: SchemaName,
        operation: Operation,
        source: apache_avro::Error,
    ) -> Self {
        CodecError::Avro {
            schema,
            operation,
            source,
        }
    }
}
