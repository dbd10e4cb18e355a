//! Shipped SQL scripts are never edited: a database that ran one must get
//! the same objects from every later package. `sql/frozen.sha256` holds the
//! checksum of each (in `sha256sum` format), and this test fails when a
//! script changes, disappears, or ships without an entry. Adding a release's
//! scripts means adding their lines; changing a line means editing history.

use std::collections::BTreeMap;
use std::path::Path;

use sha2::{Digest, Sha256};

fn sql_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/sql"))
}

/// `name -> checksum` from the manifest.
fn manifest() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(sql_dir().join("frozen.sha256")).expect("sql/frozen.sha256");
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let (sum, name) = line
                .split_once("  ")
                .expect("sha256sum format: <sum>  <file>");
            (name.to_owned(), sum.to_owned())
        })
        .collect()
}

#[test]
fn every_shipped_script_is_listed_and_unchanged() {
    let listed = manifest();
    let mut shipped = Vec::new();
    for entry in std::fs::read_dir(sql_dir()).expect("sql/") {
        let name = entry.expect("a directory entry").file_name();
        let name = name.to_string_lossy().into_owned();
        if name.starts_with("makima_keys--") && name.ends_with(".sql") {
            shipped.push(name);
        }
    }
    assert!(!shipped.is_empty(), "no shipped scripts found in sql/");
    for name in &shipped {
        let sum = listed
            .get(name)
            .unwrap_or_else(|| panic!("sql/{name} is not in sql/frozen.sha256"));
        let bytes = std::fs::read(sql_dir().join(name)).expect("a shipped script");
        let actual = hex::encode(Sha256::digest(&bytes));
        assert_eq!(&actual, sum, "sql/{name} changed after it shipped");
    }
    for name in listed.keys() {
        assert!(
            shipped.contains(name),
            "sql/{name} is listed in sql/frozen.sha256 but missing"
        );
    }
}

/// An upgrade script runs the same schema block as a fresh install, so that
/// both end with the same table: the block in the shipped script is the
/// editable source's, byte for byte.
#[test]
fn upgrade_scripts_run_the_install_schema_blocks_verbatim() {
    for (script, source, start) in [
        (
            "makima_keys--0.1.0--0.2.0.sql",
            "src/schema_0_2_0.sql",
            "DO $schema_0_2_0$",
        ),
        (
            "makima_keys--0.2.1--0.3.0.sql",
            "src/schema_0_3_0.sql",
            "DO $schema_0_3_0$",
        ),
        (
            "makima_keys--0.3.0--0.4.0.sql",
            "src/schema_0_4_0.sql",
            "DO $schema_0_4_0$",
        ),
    ] {
        let source = std::fs::read_to_string(sql_dir().join(source)).expect("a schema source");
        let block = &source[source.find(start).expect("the block's start")..];
        let shipped = std::fs::read_to_string(sql_dir().join(script)).expect("a shipped script");
        assert!(
            shipped.contains(block),
            "{script} does not run {start} as the install does"
        );
    }
}
