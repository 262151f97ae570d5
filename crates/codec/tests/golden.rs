//! Golden fixtures: `schemas/fixtures/<Name>[.<variant>].bin` holds the single-object bytes of
//! `<Name>[.<variant>].json`. Decoding the `.bin` gives the `.json`, encoding the `.json` gives
//! the `.bin`, byte for byte: a change to a schema, to the framing or to apache-avro's encoding
//! shows up here.
//!
//! To rewrite them deliberately (after a schema change, see `schemas/README.md`):
//! `UPDATE_GOLDEN=1 cargo test -p workflow-codec --test golden`. The `.json` files are the
//! source: an existing one is kept (edit it by hand), a missing one is written from the sample
//! in `tests/common/mod.rs`; every `.bin` is re-encoded.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers fail loudly"
)]

mod common;

use std::fs;
use std::path::Path;

use common::*;
use serde_json::Value as Json;
use workflow_codec::*;

fn updating() -> bool {
    std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1")
}

fn pretty(json: &Json) -> String {
    serde_json::to_string_pretty(json).unwrap() + "\n"
}

#[test]
fn golden_fixtures_decode_and_encode_byte_for_byte() {
    let dir = schemas_dir().join("fixtures");
    if updating() {
        fs::create_dir_all(&dir).unwrap();
        for (stem, name, sample) in samples() {
            let json_path = dir.join(format!("{stem}.json"));
            let json: Json = match fs::read_to_string(&json_path) {
                Ok(text) => serde_json::from_str(&text).unwrap(),
                Err(_) => sample,
            };
            fs::write(&json_path, pretty(&json)).unwrap();
            fs::write(dir.join(format!("{stem}.bin")), encode_json(name, &json)).unwrap();
        }
    }

    let mut checked = Vec::new();
    for (stem, _, _) in samples() {
        assert!(
            dir.join(format!("{stem}.json")).exists() && dir.join(format!("{stem}.bin")).exists(),
            "missing fixture {stem}: run UPDATE_GOLDEN=1 cargo test -p workflow-codec --test golden"
        );
    }
    for entry in fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        let name = schema_of_stem(&stem)
            .unwrap_or_else(|| panic!("{}: no schema named like it", path.display()));
        check_fixture(&dir, &stem, name);
        checked.push(stem);
    }
    for name in SchemaName::ALL {
        assert!(
            checked.iter().any(|s| schema_of_stem(s) == Some(name)),
            "no golden fixture for {name}"
        );
    }
}

fn check_fixture(dir: &Path, stem: &str, name: SchemaName) {
    let json: Json =
        serde_json::from_str(&fs::read_to_string(dir.join(format!("{stem}.json"))).unwrap())
            .unwrap();
    let bin = fs::read(dir.join(format!("{stem}.bin")))
        .unwrap_or_else(|e| panic!("{stem}.bin: {e}; run with UPDATE_GOLDEN=1 to write it"));

    assert_eq!(
        writer_schema(&bin).unwrap().fingerprint,
        Registry::global().unwrap().current(name).fingerprint,
        "{stem}.bin was written with another version of {name}: \
         if the schema changed deliberately, see schemas/README.md"
    );
    assert_eq!(
        decode_json(name, &bin).unwrap_or_else(|e| panic!("{stem}.bin does not decode: {e}")),
        json,
        "decoding {stem}.bin does not give {stem}.json"
    );
    assert!(
        encode_json(name, &json) == bin,
        "encoding {stem}.json does not give {stem}.bin byte for byte"
    );
}
