//! The `.avsc` files: they parse, follow the conventions, and are all compiled into the codec.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers fail loudly"
)]

mod common;

use std::collections::BTreeSet;
use std::fs;

use apache_avro::Schema;
use common::schemas_dir;
use serde_json::Value as Json;
use workflow_codec::*;

/// `(path relative to schemas/, text)` of every `.avsc` in a directory.
fn avsc_files(dir: &str) -> Vec<(String, String)> {
    let mut files: Vec<_> = fs::read_dir(schemas_dir().join(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "avsc"))
        .map(|p| {
            let rel = format!("{dir}{}", p.file_name().unwrap().to_string_lossy());
            (rel, fs::read_to_string(&p).unwrap())
        })
        .collect();
    files.sort();
    files
}

#[test]
fn every_avsc_parses_as_a_set() {
    for dir in ["", "previous/"] {
        let files = avsc_files(dir);
        assert!(
            files.len() >= SchemaName::ALL.len(),
            "schemas/{dir} is missing files"
        );
        let parsed = Schema::parse_list(files.iter().map(|(_, t)| t.as_str()))
            .unwrap_or_else(|e| panic!("schemas/{dir}*.avsc do not parse: {e}"));
        assert_eq!(parsed.len(), files.len());
        for (path, text) in &files {
            // One named type per file, named like the file, in our namespace.
            let json: Json = serde_json::from_str(text).unwrap();
            let stem = path.rsplit('/').next().unwrap().trim_end_matches(".avsc");
            assert_eq!(
                json["name"], stem,
                "{path}: the type is named like the file"
            );
            assert_eq!(
                json["namespace"], "com.payos.workflows",
                "{path}: namespace"
            );
            assert!(json["doc"].is_string(), "{path}: the type has a doc");
            if let Some(fields) = json["fields"].as_array() {
                for f in fields {
                    assert!(
                        f["doc"].is_string(),
                        "{path}: field {} has no doc",
                        f["name"]
                    );
                }
            }
        }
    }
}

#[test]
fn every_avsc_on_disk_is_compiled_in_and_the_same() {
    let on_disk: BTreeSet<(String, String)> =
        ["", "previous/"].into_iter().flat_map(avsc_files).collect();
    let embedded: BTreeSet<(String, String)> = Registry::files()
        .map(|f| (f.path.to_owned(), f.text.to_owned()))
        .collect();
    assert_eq!(
        on_disk, embedded,
        "add new .avsc files to the lists in crates/codec/src/registry.rs"
    );
}

#[test]
fn the_registry_has_every_message_schema() {
    let registry = Registry::global().unwrap();
    let mut fingerprints = BTreeSet::new();
    for name in SchemaName::ALL {
        let current = registry.current(name);
        assert_eq!(current.name, name);
        assert_eq!(current.generation, Generation::Current);
        assert_eq!(current.path, format!("{name}.avsc"));
        assert_eq!(
            current.schema.name().unwrap().fullname(None),
            format!("com.payos.workflows.{name}")
        );
        assert!(
            fingerprints.insert(current.fingerprint),
            "{name}: duplicate fingerprint"
        );
        assert_eq!(
            registry.by_fingerprint(current.fingerprint).unwrap().name,
            name
        );
        // Self-contained: it parses alone, without the other files.
        let alone = Schema::parse_str(&current.canonical_form)
            .unwrap_or_else(|e| panic!("{name} is not self-contained: {e}"));
        assert_eq!(
            registry::canonical_form(&alone).unwrap(),
            current.canonical_form
        );
        assert_eq!(
            registry::fingerprint(&current.canonical_form),
            current.fingerprint
        );

        assert_eq!(SchemaName::parse(name.as_str()), Some(name));
        assert_eq!(SchemaName::parse(&name.full_name()), Some(name));
    }
    assert_eq!(SchemaName::parse("com.payos.workflows.Actor"), None);
    assert_eq!(SchemaName::parse("com.other.StepCommand"), None);
}

/// The fingerprint is the spec's: CRC-64-AVRO of the Parsing Canonical Form, little-endian,
/// with Java's (the reference implementation's) canonical form of logical types: `"long"`.
#[test]
fn fingerprints_follow_the_spec_and_java() {
    // The spec's CRC-64-AVRO of `"int"`, as a signed 64-bit number.
    assert_eq!(
        registry::fingerprint(r#""int""#).as_i64(),
        8247732601305521295
    );
    // The same as apache-avro's Rabin digest where its canonical form is right (no logical type).
    let int = Schema::parse_str(r#""int""#).unwrap();
    assert_eq!(
        registry::fingerprint(r#""int""#).0.to_vec(),
        int.fingerprint::<apache_avro::rabin::Rabin>().bytes
    );

    let registry = Registry::global().unwrap();
    let step = registry.current(SchemaName::StepCommand);
    assert_eq!(
        step.canonical_form,
        concat!(
            r#"{"name":"com.payos.workflows.StepCommand","type":"record","fields":["#,
            r#"{"name":"command_id","type":"string"},{"name":"partner_id","type":"string"},"#,
            r#"{"name":"instance_id","type":"string"},{"name":"step_index","type":"int"},"#,
            r#"{"name":"step_type","type":{"name":"com.payos.workflows.StepType","type":"enum","#,
            r#""symbols":["approval","condition","action","wait","notification"]}},"#,
            r#"{"name":"issued_at","type":"long"}]}"#
        )
    );
    for current in SchemaName::ALL.map(|n| registry.current(n)) {
        assert!(
            !current.canonical_form.contains(r#"{"type":"long"}"#),
            "{}: logical types reduce to their primitive",
            current.name
        );
    }
}

/// The fingerprints of the current schemas, computed independently (Python avro 1.12.2's
/// canonical form with Java's rule for logical types, CRC-64-AVRO per the spec). A change here
/// means a schema changed on the wire: the golden fixtures fail too, and `schemas/README.md`
/// says what to do.
#[test]
fn fingerprints_are_pinned() {
    let registry = Registry::global().unwrap();
    let pinned = [
        (SchemaName::StepCommand, "a3eb49a761df49d2"),
        (SchemaName::TimerFired, "b3edd8b7e8f2438e"),
        (SchemaName::StepMessage, "df0599cb7286649f"),
        (SchemaName::DecisionCommand, "439431891f603a92"),
        (SchemaName::TriggerCommand, "f35c02a5980c1514"),
        (SchemaName::TimerRequest, "d4975ec5458e619e"),
        (SchemaName::LifecycleEvent, "9c4995445b7bf701"),
        (SchemaName::TransferEvent, "c0f779cd799544ed"),
        (SchemaName::DeadLetter, "9eb88a73f4063542"),
        (SchemaName::NotificationDelivery, "a74e8f70c6f4d545"),
    ];
    for (name, fp) in pinned {
        assert_eq!(registry.current(name).fingerprint.to_string(), fp, "{name}");
    }
}
