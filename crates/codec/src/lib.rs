//! The Avro codec of every Kafka message of the workflow engine.
//!
//! The `.avsc` files in `schemas/` are the source of truth; they are compiled into this crate.
//! Every message is [Avro single-object encoded](framing): the marker `C3 01`, the 8-byte
//! CRC-64-AVRO fingerprint of the schema it was written with, then the Avro binary body. The
//! fingerprint identifies the writer schema in the [`Registry`] (current and previous version
//! of each schema), and a message written with the previous version is resolved to the current
//! one, so consumers read what producers still running an older release write.
//!
//! ```
//! use workflow_codec::{decode, encode, Message, SchemaName, StepCommand, StepMessage, StepType};
//!
//! let msg = StepMessage::from(StepCommand {
//!     command_id: "c1".into(),
//!     partner_id: "p".into(),
//!     instance_id: "i".into(),
//!     step_index: 3,
//!     step_type: StepType::Action,
//!     issued_at: 1_700_000_000_000,
//! });
//! let bytes = encode(SchemaName::StepMessage, &msg)?;
//! assert_eq!(&bytes[..2], &[0xC3, 0x01]);
//! assert_eq!(decode::<StepMessage>(&bytes)?, msg);
//! assert_eq!(StepMessage::from_avro(&msg.to_avro()?)?, msg);
//! # Ok::<(), workflow_codec::CodecError>(())
//! ```
//!
//! Decoding never panics: arbitrary bytes give a [`CodecError`].

mod binary;
pub mod error;
pub mod framing;
pub mod messages;
pub mod registry;

use std::sync::OnceLock;

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;
use serde::de::DeserializeOwned;
use serde::Serialize;

pub use error::{CodecError, Operation};
pub use framing::Fingerprint;
pub use messages::{
    Actor, ActorType, DeadLetter, DecisionCommand, LifecycleEvent, LifecycleEventKind, Message,
    NotificationDelivery, StepCommand, StepMessage, StepMessageBody, StepType, TimerFired,
    TimerKind, TimerRequest, TransferEvent, TriggerCommand, Verdict,
};
pub use registry::{Generation, RegisteredSchema, Registry, SchemaFile, SchemaName};

/// Single-object encode `value` with the current version of `schema`.
///
/// Fails (never panics) when `value` does not fit the schema: a missing field without default,
/// an unknown field, a wrong type, an unknown enum symbol.
pub fn encode<T: Serialize>(schema: SchemaName, value: &T) -> Result<Vec<u8>, CodecError> {
    let registered = Registry::global()?.current(schema);
    let body = datum_writer(schema)?
        .write_ser_to_vec(value)
        .map_err(|e| CodecError::avro(schema, Operation::Encode, e))?;
    Ok(framing::frame(registered.fingerprint, &body))
}

/// Each schema's datum writer, built once: building one resolves every name in its schema,
/// which was about a quarter of encoding a lifecycle event.
static WRITERS: [OnceLock<GenericDatumWriter<'static>>; SchemaName::ALL.len()] =
    [const { OnceLock::new() }; SchemaName::ALL.len()];

/// The current version of `schema`'s datum writer. Building one fails only for a schema that
/// does not resolve, which the crate's tests rule out.
fn datum_writer(schema: SchemaName) -> Result<&'static GenericDatumWriter<'static>, CodecError> {
    built_once(&WRITERS[schema.index()], || {
        GenericDatumWriter::builder(&Registry::global()?.current(schema).schema)
            .build()
            .map_err(|e| CodecError::avro(schema, Operation::Encode, e))
    })
}

/// The datum reader of every known writer schema (current and previous versions), resolving to
/// the current version, built once like [`WRITERS`]; indexed by [`Registry::slot`].
static READERS: [OnceLock<GenericDatumReader<'static>>; 2 * SchemaName::ALL.len()] =
    [const { OnceLock::new() }; 2 * SchemaName::ALL.len()];

/// The reader of messages written with `writer`, into the current version of its schema.
fn datum_reader(
    registry: &'static Registry,
    writer: &'static RegisteredSchema,
) -> Result<&'static GenericDatumReader<'static>, CodecError> {
    built_once(&READERS[registry.slot(writer)], || {
        let current = registry.current(writer.name);
        GenericDatumReader::builder(&writer.schema)
            .maybe_reader_schema(
                (current.fingerprint != writer.fingerprint).then_some(&current.schema),
            )
            .build()
            .map_err(|e| CodecError::avro(writer.name, Operation::Decode, e))
    })
}

/// `cell`'s value, built by `build` the first time. A failure is returned, not remembered;
/// two threads may build it at once, and either copy is kept (they are the same).
fn built_once<T>(
    cell: &'static OnceLock<T>,
    build: impl FnOnce() -> Result<T, CodecError>,
) -> Result<&'static T, CodecError> {
    if let Some(value) = cell.get() {
        return Ok(value);
    }
    let value = build()?;
    Ok(cell.get_or_init(|| value))
}

/// Decode a message written with any known schema (current or previous version), as the
/// current version of that schema, into `T`.
///
/// `T` may be the schema's type from [`messages`], or any self-describing type such as
/// `serde_json::Value`. To insist on one schema, use [`decode_as`] or [`Message::from_avro`].
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (name, value) = decode_value(bytes)?;
    apache_avro::from_value(&value).map_err(|e| CodecError::avro(name, Operation::Deserialize, e))
}

/// [`decode`], but a message written with another schema than `expected` is a
/// [`CodecError::SchemaMismatch`].
pub fn decode_as<T: DeserializeOwned>(expected: SchemaName, bytes: &[u8]) -> Result<T, CodecError> {
    let found = writer_schema(bytes)?.name;
    if found != expected {
        return Err(CodecError::SchemaMismatch { expected, found });
    }
    decode(bytes)
}

/// The schema a message was written with, from its header alone (for routing, metrics, dead
/// letters).
pub fn writer_schema(bytes: &[u8]) -> Result<&'static RegisteredSchema, CodecError> {
    let (fingerprint, _) = framing::unframe(bytes)?;
    Registry::global()?
        .by_fingerprint(fingerprint)
        .ok_or(CodecError::UnknownFingerprint(fingerprint))
}

/// Read the body with its writer schema, resolved to the current version when it is older.
fn decode_value(bytes: &[u8]) -> Result<(SchemaName, Value), CodecError> {
    let (fingerprint, mut body) = framing::unframe(bytes)?;
    let registry = Registry::global()?;
    let writer = registry
        .by_fingerprint(fingerprint)
        .ok_or(CodecError::UnknownFingerprint(fingerprint))?;
    let name = writer.name;
    let value = datum_reader(registry, writer)?
        .read_value(&mut body)
        .map_err(|e| CodecError::avro(name, Operation::Decode, e))?;
    if !body.is_empty() {
        return Err(CodecError::TrailingBytes {
            schema: name,
            trailing: body.len(),
        });
    }
    Ok((name, value))
}
