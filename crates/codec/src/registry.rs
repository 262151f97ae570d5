//! Every schema this build knows, by name and by fingerprint.
//!
//! The `.avsc` files of `schemas/` (the current version) and `schemas/previous/` (the version
//! last released, which producers still running may write) are compiled in. Each directory is
//! parsed as one set, so a record may refer to a named type of another file of the same set
//! (`com.payos.workflows.StepType`); every message schema is then made self-contained
//! (denormalised), fingerprinted (CRC-64-AVRO of its Parsing Canonical Form) and registered.
//!
//! A message written with the current schema decodes directly; one written with the previous
//! schema is resolved to the current one (Avro schema resolution: fields the writer did not know
//! take their defaults, fields the reader does not know are skipped).

use std::collections::HashMap;
use std::fmt;
use std::sync::OnceLock;

use apache_avro::Schema;

use crate::error::CodecError;
use crate::framing::Fingerprint;

/// The Avro namespace of every schema.
pub const NAMESPACE: &str = "com.payos.workflows";

/// The message schemas: one per kind of Kafka message (the records they are made of, such as
/// `Actor`, and the shared enums are not messages of their own).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SchemaName {
    /// `StepMessage.avsc`: everything on `workflow.steps.<type>`.
    StepMessage,
    /// `StepCommand.avsc`: "execute this step" (inside a `StepMessage` on the step topics).
    StepCommand,
    /// `TimerFired.avsc`: a fired timer (inside a `StepMessage` on the step topics).
    TimerFired,
    /// `DecisionCommand.avsc`: on `workflow.approvals.decisions`.
    DecisionCommand,
    /// `TriggerCommand.avsc`: "start an instance".
    TriggerCommand,
    /// `TimerRequest.avsc`: "fire this timer then", for the scheduler.
    TimerRequest,
    /// `LifecycleEvent.avsc`: an instance's milestones.
    LifecycleEvent,
    /// `TransferEvent.avsc`: the transfer service's `on_transfer` event.
    TransferEvent,
    /// `DeadLetter.avsc`: a message a consumer gave up on.
    DeadLetter,
    /// `NotificationDelivery.avsc`: on `workflow.notifications.deliveries`.
    NotificationDelivery,
}

impl SchemaName {
    /// Every message schema.
    pub const ALL: [SchemaName; 10] = [
        SchemaName::StepMessage,
        SchemaName::StepCommand,
        SchemaName::TimerFired,
        SchemaName::DecisionCommand,
        SchemaName::TriggerCommand,
        SchemaName::TimerRequest,
        SchemaName::LifecycleEvent,
        SchemaName::TransferEvent,
        SchemaName::DeadLetter,
        SchemaName::NotificationDelivery,
    ];

    /// The record's name without namespace; also the file name (`<name>.avsc`).
    pub fn as_str(self) -> &'static str {
        match self {
            SchemaName::StepMessage => "StepMessage",
            SchemaName::StepCommand => "StepCommand",
            SchemaName::TimerFired => "TimerFired",
            SchemaName::DecisionCommand => "DecisionCommand",
            SchemaName::TriggerCommand => "TriggerCommand",
            SchemaName::TimerRequest => "TimerRequest",
            SchemaName::LifecycleEvent => "LifecycleEvent",
            SchemaName::TransferEvent => "TransferEvent",
            SchemaName::DeadLetter => "DeadLetter",
            SchemaName::NotificationDelivery => "NotificationDelivery",
        }
    }

    /// `com.payos.workflows.<name>`.
    pub fn full_name(self) -> String {
        format!("{NAMESPACE}.{}", self.as_str())
    }

    /// The message schema with this name (short, or fully qualified in our namespace).
    pub fn parse(name: &str) -> Option<SchemaName> {
        let short = match name.strip_prefix(NAMESPACE) {
            Some(rest) => rest.strip_prefix('.')?,
            None => name,
        };
        SchemaName::ALL.into_iter().find(|n| n.as_str() == short)
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for SchemaName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which version of a schema an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Generation {
    /// `schemas/<Name>.avsc`: what this build writes, and the reader schema of every decode.
    Current,
    /// `schemas/previous/<Name>.avsc`: the last released version, still readable.
    Previous,
}

impl Generation {
    /// The directory of this generation's files, relative to `schemas/` (`""` or `"previous/"`).
    pub fn dir(self) -> &'static str {
        match self {
            Generation::Current => "",
            Generation::Previous => "previous/",
        }
    }
}

/// One `.avsc` file compiled into the codec.
#[derive(Debug, Clone, Copy)]
pub struct SchemaFile {
    pub generation: Generation,
    /// Relative to `schemas/`, e.g. `previous/StepType.avsc`.
    pub path: &'static str,
    pub text: &'static str,
}

macro_rules! embed {
    ($generation:expr, $dir:literal; $($file:literal),* $(,)?) => {
        &[$(SchemaFile {
            generation: $generation,
            path: concat!($dir, $file),
            text: include_str!(concat!("../../../schemas/", $dir, $file)),
        }),*]
    };
}

const CURRENT_FILES: &[SchemaFile] = embed!(Generation::Current, "";
    "Actor.avsc", "ActorType.avsc", "StepType.avsc", "TimerKind.avsc", "Verdict.avsc",
    "StepCommand.avsc", "TimerFired.avsc", "StepMessage.avsc", "DecisionCommand.avsc",
    "TriggerCommand.avsc", "TimerRequest.avsc", "LifecycleEvent.avsc", "TransferEvent.avsc",
    "DeadLetter.avsc", "NotificationDelivery.avsc",
);
const PREVIOUS_FILES: &[SchemaFile] = embed!(Generation::Previous, "previous/";
    "Actor.avsc", "ActorType.avsc", "StepType.avsc", "TimerKind.avsc", "Verdict.avsc",
    "StepCommand.avsc", "TimerFired.avsc", "StepMessage.avsc", "DecisionCommand.avsc",
    "TriggerCommand.avsc", "TimerRequest.avsc", "LifecycleEvent.avsc", "TransferEvent.avsc",
    "DeadLetter.avsc", "NotificationDelivery.avsc",
);

/// One version of one message schema.
#[derive(Debug, Clone)]
pub struct RegisteredSchema {
    pub name: SchemaName,
    pub generation: Generation,
    /// CRC-64-AVRO of the Parsing Canonical Form: what messages written with it carry.
    pub fingerprint: Fingerprint,
    /// Its Parsing Canonical Form, per the spec (see [`canonical_form`]).
    pub canonical_form: String,
    /// Self-contained: every named type it uses is defined inside it.
    pub schema: Schema,
    /// The file it came from, relative to `schemas/`.
    pub path: &'static str,
}

/// The schemas by name and by fingerprint. Built once, on first use, from the embedded files.
#[derive(Debug)]
pub struct Registry {
    /// Indexed by `SchemaName::index`, complete by construction.
    current: Vec<RegisteredSchema>,
    previous: Vec<RegisteredSchema>,
    by_fingerprint: HashMap<Fingerprint, (Generation, usize)>,
}

static GLOBAL: OnceLock<Result<Registry, (String, String)>> = OnceLock::new();

impl Registry {
    /// The registry of the embedded schemas. Fails only if they do not parse (a bug the crate's
    /// tests catch), and then on every call.
    pub fn global() -> Result<&'static Registry, CodecError> {
        GLOBAL
            .get_or_init(|| {
                Registry::build().map_err(|e| match e {
                    CodecError::InvalidSchema { file, message } => (file, message),
                    other => ("schemas".to_owned(), other.to_string()),
                })
            })
            .as_ref()
            .map_err(|(file, message)| CodecError::InvalidSchema {
                file: file.clone(),
                message: message.clone(),
            })
    }

    /// Every embedded `.avsc` file, current ones first. A test checks them against the files
    /// on disk, so a new file cannot be forgotten here.
    pub fn files() -> impl Iterator<Item = &'static SchemaFile> {
        CURRENT_FILES.iter().chain(PREVIOUS_FILES)
    }

    fn build() -> Result<Registry, CodecError> {
        let current = load(CURRENT_FILES, Generation::Current)?;
        let previous = load(PREVIOUS_FILES, Generation::Previous)?;
        let mut by_fingerprint = HashMap::new();
        // Current first: an unchanged previous version shares its fingerprint and maps to it.
        for (i, s) in current.iter().enumerate() {
            by_fingerprint.insert(s.fingerprint, (Generation::Current, i));
        }
        for (i, s) in previous.iter().enumerate() {
            by_fingerprint
                .entry(s.fingerprint)
                .or_insert((Generation::Previous, i));
        }
        Ok(Registry {
            current,
            previous,
            by_fingerprint,
        })
    }

    /// The current version of `name`: what [`crate::encode`] writes and every decode reads into.
    pub fn current(&self, name: SchemaName) -> &RegisteredSchema {
        &self.current[name.index()]
    }

    /// The previous (last released) version of `name`; the same schema as the current one
    /// while it has not changed since.
    pub fn previous(&self, name: SchemaName) -> &RegisteredSchema {
        &self.previous[name.index()]
    }

    /// The schema a message with this fingerprint was written with, if this build knows it.
    pub fn by_fingerprint(&self, fingerprint: Fingerprint) -> Option<&RegisteredSchema> {
        let (generation, i) = *self.by_fingerprint.get(&fingerprint)?;
        match generation {
            Generation::Current => self.current.get(i),
            Generation::Previous => self.previous.get(i),
        }
    }

    /// A number below `2 * SchemaName::ALL.len()` that is `schema`'s alone among this
    /// registry's schemas (its generation and name), for per-schema tables.
    pub(crate) fn slot(&self, schema: &RegisteredSchema) -> usize {
        let generation = match schema.generation {
            Generation::Current => 0,
            Generation::Previous => 1,
        };
        generation * SchemaName::ALL.len() + schema.name.index()
    }

    /// Every known version of every message schema (distinct fingerprints).
    pub fn schemas(&self) -> impl Iterator<Item = &RegisteredSchema> {
        let mut v: Vec<_> = self.by_fingerprint.values().copied().collect();
        v.sort_by_key(|(g, i)| (*g == Generation::Previous, *i));
        v.into_iter().filter_map(|(g, i)| match g {
            Generation::Current => self.current.get(i),
            Generation::Previous => self.previous.get(i),
        })
    }
}

/// Parse one generation's files as a set, and register each message schema, self-contained.
fn load(
    files: &'static [SchemaFile],
    generation: Generation,
) -> Result<Vec<RegisteredSchema>, CodecError> {
    let invalid = |file: &str, message: String| CodecError::InvalidSchema {
        file: file.to_owned(),
        message,
    };
    let schemata = Schema::parse_list(files.iter().map(|f| f.text)).map_err(|e| {
        invalid(
            &format!("schemas/{}*.avsc", generation.dir()),
            e.to_string(),
        )
    })?;
    SchemaName::ALL
        .into_iter()
        .map(|name| {
            let path = files
                .iter()
                .find(|f| f.path.strip_prefix(generation.dir()) == Some(&format!("{name}.avsc")))
                .map(|f| f.path)
                .ok_or_else(|| {
                    invalid(
                        &format!("{}{name}.avsc", generation.dir()),
                        "missing".into(),
                    )
                })?;
            let full_name = name.full_name();
            let mut schema = schemata
                .iter()
                .find(|s| s.name().is_some_and(|n| n.fullname(None) == full_name))
                .cloned()
                .ok_or_else(|| invalid(path, format!("does not define {full_name}")))?;
            schema
                .denormalize(&schemata)
                .map_err(|e| invalid(path, e.to_string()))?;
            let canonical_form =
                canonical_form(&schema).map_err(|e| invalid(path, e.to_string()))?;
            let fingerprint = fingerprint(&canonical_form);
            Ok(RegisteredSchema {
                name,
                generation,
                fingerprint,
                canonical_form,
                schema,
                path,
            })
        })
        .collect()
}

/// The [Parsing Canonical Form] of a self-contained schema, as the spec (and the Java, Python
/// and Go implementations) define it.
///
/// apache-avro 0.22's `Schema::canonical_form` strips `logicalType` but leaves
/// `{"type":"long","logicalType":"timestamp-millis"}` as `{"type":"long"}` instead of reducing it
/// to `"long"` ([PRIMITIVE] rule), so its fingerprints of schemas with logical types differ from
/// every other implementation's. Parsing that form again (it has no logical types left) and
/// taking the canonical form of the result gives the spec's form.
///
/// [Parsing Canonical Form]: https://avro.apache.org/docs/1.12.0/specification/#parsing-canonical-form-for-schemas
pub fn canonical_form(schema: &Schema) -> Result<String, apache_avro::Error> {
    Ok(Schema::parse_str(&schema.canonical_form())?.canonical_form())
}

/// CRC-64-AVRO (Rabin) of a Parsing Canonical Form, little-endian as in a message header: the
/// spec's reference algorithm.
pub fn fingerprint(canonical_form: &str) -> Fingerprint {
    let mut fp = CRC64_EMPTY;
    for &b in canonical_form.as_bytes() {
        fp = (fp >> 8) ^ CRC64_TABLE[((fp ^ u64::from(b)) & 0xff) as usize];
    }
    Fingerprint(fp.to_le_bytes())
}

const CRC64_EMPTY: u64 = 0xc15d_213a_a4d7_a795;

const CRC64_TABLE: [u64; 256] = {
    let mut table = [0u64; 256];
    let mut i = 0;
    while i < 256 {
        let mut fp = i as u64;
        let mut j = 0;
        while j < 8 {
            fp = (fp >> 1) ^ (CRC64_EMPTY & (fp & 1).wrapping_neg());
            j += 1;
        }
        table[i] = fp;
        i += 1;
    }
    table
};
