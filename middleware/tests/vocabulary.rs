//! The metric table in docs/observability.md is the vocabulary: every
//! metric, in order, with its kind, labels and help, and nothing else.
#![allow(clippy::unwrap_used)] // test helpers: a failure is a failed test

use gratify::telemetry;

#[test]
fn the_documented_table_is_the_vocabulary() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/observability.md");
    let doc = std::fs::read_to_string(path).unwrap();
    let rows: Vec<(String, String, Vec<String>, String)> = doc
        .lines()
        .filter(|l| l.starts_with("| `gratify_") || l.starts_with("| `http."))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let labels = cells[3]
                .split(',')
                .map(|c| c.trim().trim_matches('`').to_owned())
                .filter(|c| !c.is_empty())
                .collect();
            (
                cells[1].trim_matches('`').to_owned(),
                cells[2].to_owned(),
                labels,
                cells[4].to_owned(),
            )
        })
        .collect();
    let defined: Vec<(String, String, Vec<String>, String)> = telemetry::ALL
        .iter()
        .map(|m| {
            (
                m.name.to_owned(),
                m.kind.as_str().to_owned(),
                m.labels.iter().map(|l| (*l).to_owned()).collect(),
                m.help.to_owned(),
            )
        })
        .collect();
    assert_eq!(rows, defined);
}
