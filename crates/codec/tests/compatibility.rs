//! Backward compatibility: data written with the previous (last released) version of each
//! schema, `schemas/previous/<Name>.avsc`, must be readable with the current one. A schema change
//! that would break consumers reading what running producers write fails here.
//!
//! Three checks per schema: apache-avro's `SchemaCompatibility::can_read(previous, current)`
//! must be `Full`; values generated from the previous schema (every union branch, every enum
//! symbol position) are encoded with it and decoded by the codec into the current type; and the
//! golden bytes kept from the previous version (`schemas/previous/fixtures/*.bin`) decode.
//! The last tests show the check catching breaking changes, on deliberately broken copies.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers fail loudly"
)]

mod common;

use std::collections::HashMap;
use std::fs;

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::schema::Name;
use apache_avro::schema_compatibility::{Compatibility, SchemaCompatibility};
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::Schema;
use common::*;
use workflow_codec::*;

/// `Err(why)` unless every datum written with `writer` is readable with `reader`.
fn can_read(writer: &Schema, reader: &Schema) -> Result<(), String> {
    match SchemaCompatibility::can_read(writer, reader) {
        Ok(Compatibility::Full) => Ok(()),
        Ok(Compatibility::Partial) => Err("only partially compatible (enum symbols or union \
                                           branches the reader lacks)"
            .into()),
        Err(e) => Err(e.to_string()),
    }
}

/// Every named type defined in `schema`, for its references.
fn named_types(schema: &Schema, names: &mut HashMap<Name, Schema>) {
    match schema {
        Schema::Enum(e) => {
            names.insert(e.name.clone(), schema.clone());
        }
        Schema::Record(r) => {
            names.insert(r.name.clone(), schema.clone());
            r.fields.iter().for_each(|f| named_types(&f.schema, names));
        }
        Schema::Union(u) => u.variants().iter().for_each(|v| named_types(v, names)),
        Schema::Array(a) => named_types(&a.items, names),
        Schema::Map(m) => named_types(&m.types, names),
        _ => {}
    }
}

/// A datum of `schema`; `seed` picks union branches and enum symbols, so several seeds cover
/// every branch.
fn sample(schema: &Schema, seed: usize, names: &HashMap<Name, Schema>) -> Value {
    match schema {
        Schema::Null => Value::Null,
        Schema::Boolean => Value::Boolean(seed.is_multiple_of(2)),
        Schema::Int => Value::Int(seed as i32 + 1),
        Schema::Long => Value::Long(seed as i64 + 2),
        Schema::Float => Value::Float(1.5),
        Schema::Double => Value::Double(2.5),
        Schema::Bytes => Value::Bytes(vec![seed as u8, 0xff, 0]),
        Schema::String => Value::String(format!("s{seed}")),
        Schema::TimestampMillis => Value::TimestampMillis(1_717_243_200_000 + seed as i64),
        Schema::Array(a) => Value::Array(vec![sample(&a.items, seed, names); seed % 3]),
        Schema::Map(m) => Value::Map(HashMap::from([(
            "k".to_owned(),
            sample(&m.types, seed, names),
        )])),
        Schema::Union(u) => {
            let i = seed % u.variants().len();
            Value::Union(i as u32, Box::new(sample(&u.variants()[i], seed, names)))
        }
        Schema::Enum(e) => {
            let i = seed % e.symbols.len();
            Value::Enum(i as u32, e.symbols[i].clone())
        }
        Schema::Record(r) => Value::Record(
            r.fields
                .iter()
                .map(|f| (f.name.clone(), sample(&f.schema, seed, names)))
                .collect(),
        ),
        Schema::Ref { name } => {
            let named = names
                .get(name)
                .expect("refers to a type defined in the schema");
            sample(named, seed, names)
        }
        other => panic!("no sample for {other:?}: extend `sample`"),
    }
}

#[test]
fn current_schemas_read_the_previous_ones() {
    let registry = Registry::global().unwrap();
    for name in SchemaName::ALL {
        let previous = registry.previous(name);
        let current = registry.current(name);
        can_read(&previous.schema, &current.schema).unwrap_or_else(|why| {
            panic!(
                "schemas/{name}.avsc cannot read data written with schemas/{}: {why}\n\
                 see schemas/README.md, \"Changing a schema\"",
                previous.path
            )
        });
    }
}

#[test]
fn data_written_with_the_previous_schemas_decodes() {
    let registry = Registry::global().unwrap();
    for name in SchemaName::ALL {
        let previous = registry.previous(name);
        let current = registry.current(name);
        for seed in 0..6 {
            let mut names = HashMap::new();
            named_types(&previous.schema, &mut names);
            let value = sample(&previous.schema, seed, &names);
            let body = GenericDatumWriter::builder(&previous.schema)
                .build()
                .unwrap()
                .write_value_to_vec(value)
                .unwrap();
            // As a consumer meets it: framed with the previous fingerprint, through the codec.
            let bytes = framing::frame(previous.fingerprint, &body);
            decode_json(name, &bytes).unwrap_or_else(|e| {
                panic!(
                    "{name}: data written with {} (seed {seed}) does not decode: {e}",
                    previous.path
                )
            });
            // And resolved explicitly, even while the two versions are the same.
            let resolved = GenericDatumReader::builder(&previous.schema)
                .reader_schema(&current.schema)
                .build()
                .unwrap()
                .read_value(&mut &body[..])
                .unwrap_or_else(|e| panic!("{name}: resolution fails (seed {seed}): {e}"));
            with_type!(name, T => {
                apache_avro::from_value::<T>(&resolved)
                    .unwrap_or_else(|e| panic!("{name}: resolved value does not map (seed {seed}): {e}"));
            });
        }
    }
}

#[test]
fn golden_bytes_of_the_previous_version_decode() {
    let dir = schemas_dir().join("previous/fixtures");
    let mut seen = 0;
    for entry in fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "bin") {
            continue;
        }
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        let name =
            schema_of_stem(&stem).unwrap_or_else(|| panic!("{}: unknown schema", path.display()));
        let bytes = fs::read(&path).unwrap();
        decode_json(name, &bytes)
            .unwrap_or_else(|e| panic!("previous/fixtures/{stem}.bin does not decode: {e}"));
        seen += 1;
    }
    assert!(
        seen >= SchemaName::ALL.len(),
        "schemas/previous/fixtures has too few .bin files"
    );
}

// --- The check catches breaking changes --------------------------------------------------------

/// The current files, with `edit` applied to the JSON of `file`; returns `name`, self-contained.
fn edited(file: &str, name: SchemaName, edit: impl Fn(&mut serde_json::Value)) -> Schema {
    let texts: Vec<String> = Registry::files()
        .filter(|f| f.generation == Generation::Current)
        .map(|f| {
            if f.path == file {
                let mut json: serde_json::Value = serde_json::from_str(f.text).unwrap();
                edit(&mut json);
                json.to_string()
            } else {
                f.text.to_owned()
            }
        })
        .collect();
    let set = Schema::parse_list(&texts).unwrap();
    let mut schema = set
        .iter()
        .find(|s| s.name().unwrap().fullname(None) == name.full_name())
        .unwrap()
        .clone();
    schema.denormalize(&set).unwrap();
    schema
}

fn current(name: SchemaName) -> Schema {
    Registry::global().unwrap().current(name).schema.clone()
}

#[test]
fn adding_a_field_without_default_is_caught() {
    let next = edited("StepCommand.avsc", SchemaName::StepCommand, |j| {
        j["fields"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"name": "attempt", "type": "int", "doc": "."}));
    });
    assert!(can_read(&current(SchemaName::StepCommand), &next).is_err());
}

#[test]
fn adding_a_field_with_default_is_fine_and_old_data_gets_the_default() {
    let next = edited("StepCommand.avsc", SchemaName::StepCommand, |j| {
        j["fields"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"name": "attempt", "type": "int", "default": 1, "doc": "."}));
    });
    let old = current(SchemaName::StepCommand);
    can_read(&old, &next).unwrap();

    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct StepCommandV2 {
        command_id: String,
        step_type: StepType,
        attempt: i32,
    }
    let body = step_command().to_avro().unwrap()[framing::HEADER_LEN..].to_vec();
    let value = GenericDatumReader::builder(&old)
        .reader_schema(&next)
        .build()
        .unwrap()
        .read_value(&mut &body[..])
        .unwrap();
    assert_eq!(
        apache_avro::from_value::<StepCommandV2>(&value).unwrap(),
        StepCommandV2 {
            command_id: step_command().command_id,
            step_type: StepType::Action,
            attempt: 1
        }
    );
}

#[test]
fn removing_an_enum_symbol_is_caught() {
    let next = edited("StepType.avsc", SchemaName::StepMessage, |j| {
        j["symbols"].as_array_mut().unwrap().pop();
    });
    assert!(can_read(&current(SchemaName::StepMessage), &next).is_err());
}

#[test]
fn adding_an_enum_symbol_reads_old_data() {
    let next = edited("TimerKind.avsc", SchemaName::TimerFired, |j| {
        j["symbols"]
            .as_array_mut()
            .unwrap()
            .push("signal_timeout".into());
    });
    can_read(&current(SchemaName::TimerFired), &next).unwrap();
    // (An old reader cannot read the new symbol: deploy consumers first.)
    assert!(can_read(&next, &current(SchemaName::TimerFired)).is_err());
}

#[test]
fn changing_a_type_or_renaming_a_field_is_caught() {
    let retyped = edited("TimerRequest.avsc", SchemaName::TimerRequest, |j| {
        j["fields"][0]["type"] = "int".into();
    });
    assert!(can_read(&current(SchemaName::TimerRequest), &retyped).is_err());
    let renamed = edited("TimerRequest.avsc", SchemaName::TimerRequest, |j| {
        j["fields"][0]["name"] = "timer_id".into();
    });
    assert!(can_read(&current(SchemaName::TimerRequest), &renamed).is_err());
    // A rename that keeps the old name as an alias reads old data.
    let aliased = edited("TimerRequest.avsc", SchemaName::TimerRequest, |j| {
        j["fields"][0]["name"] = "timer_id".into();
        j["fields"][0]["aliases"] = serde_json::json!(["id"]);
    });
    can_read(&current(SchemaName::TimerRequest), &aliased).unwrap();
}

#[test]
fn removing_a_union_branch_is_caught() {
    let next = edited("StepMessage.avsc", SchemaName::StepMessage, |j| {
        j["fields"][0]["type"] = serde_json::json!(["com.payos.workflows.StepCommand"]);
    });
    assert!(can_read(&current(SchemaName::StepMessage), &next).is_err());
}
