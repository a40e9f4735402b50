//! Every output format carries the whole value domain: snapshots of tables that together use
//! every column type, downloaded in JSON Lines, CSV (both NULL conventions) and Parquet, read
//! by independent readers (serde_json, an RFC 4180 reader that keeps quoting, pyarrow), equal
//! the emulator's truth value for value, the domain edges included.

use crate::common;

use std::path::Path;

use common::truth::assert_same_rows;
use common::*;
use dap_replica::emulator::{CsvNull, Emulator, EmulatorConfig};
use dap_replica::schema::{ColumnType, TableDef};
use serde_json::{Map, Value as Json};

/// Together: nested objects, arrays, decimals, dates, times, UUIDs, IPs, integer enums, floats
/// with their specials, bounded and truncatable text, booleans, enums.
const TABLES: &[(&str, &str)] = &[
    ("canvas", "assignments"),
    ("canvas", "submissions"),
    ("canvas", "calendar_events"),
    ("canvas", "late_policies"),
    ("canvas", "learning_outcomes"),
    ("canvas_logs", "web_logs"),
];

/// The downloaded object files of one snapshot.
async fn snapshot(emu: &Emulator, dir: &Path, ns: &str, table: &str, format: &str) -> Vec<std::path::PathBuf> {
    let out = dir.join(format!("{table}-{format}"));
    ours_ok(
        emu,
        dir,
        &[
            "snapshot",
            "--namespace",
            ns,
            "--table",
            table,
            "--format",
            format,
            "--output-directory",
            out.to_str().unwrap(),
        ],
    )
    .await;
    files_under(&out).into_iter().map(|f| out.join(f)).collect()
}

/// One RFC 4180 record stream into fields, each with whether it was quoted.
fn csv_records(text: &str) -> Vec<Vec<(String, bool)>> {
    let (mut rows, mut row, mut field, mut quoted, mut in_quotes) =
        (Vec::new(), Vec::new(), String::new(), false, false);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, in_quotes) {
            ('"', true) if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            ('"', true) => in_quotes = false,
            ('"', false) => {
                in_quotes = true;
                quoted = true;
            }
            (',', false) => row.push((std::mem::take(&mut field), std::mem::replace(&mut quoted, false))),
            ('\n', false) => {
                row.push((std::mem::take(&mut field), std::mem::replace(&mut quoted, false)));
                rows.push(std::mem::take(&mut row));
            }
            (c, _) => field.push(c),
        }
    }
    assert!(!in_quotes && field.is_empty() && row.is_empty(), "the CSV ends with a complete record");
    rows
}

/// A CSV cell as a typed JSON value of the column's type.
fn csv_value(ty: &ColumnType, (text, quoted): &(String, bool), null: CsvNull) -> Json {
    let is_null = !quoted && (null == CsvNull::Literal && text == "NULL" || null == CsvNull::Empty && text.is_empty());
    if is_null {
        return Json::Null;
    }
    match ty {
        ColumnType::Array(_) | ColumnType::Object(_) | ColumnType::Json => serde_json::from_str(text).unwrap(),
        ColumnType::Bool => Json::Bool(text == "true"),
        _ => Json::String(text.clone()),
    }
}

fn rows_from_csv(def: &TableDef, files: &[std::path::PathBuf], null: CsvNull) -> Vec<Map<String, Json>> {
    let mut rows = Vec::new();
    for f in files {
        let records = csv_records(&String::from_utf8(object_content(f)).unwrap());
        let header: Vec<String> = records[0].iter().map(|(h, _)| h.clone()).collect();
        for r in &records[1..] {
            let mut m = Map::new();
            for (label, cell) in header.iter().zip(r) {
                let name = label.split_once('.').unwrap().1;
                if let Some(c) = def.columns().find(|c| c.name == name) {
                    m.insert(c.name.clone(), csv_value(&c.ty, cell, null));
                }
            }
            rows.push(m);
        }
    }
    rows
}

fn rows_from_jsonl(def: &TableDef, files: &[std::path::PathBuf]) -> Vec<Map<String, Json>> {
    let mut rows = Vec::new();
    for f in files {
        for line in String::from_utf8(object_content(f)).unwrap().lines() {
            let record: Json = serde_json::from_str(line).unwrap();
            let mut m = Map::new();
            for c in def.columns() {
                let v =
                    record["key"].get(&c.name).or_else(|| record["value"].get(&c.name)).cloned().unwrap_or(Json::Null);
                m.insert(c.name.clone(), v);
            }
            rows.push(m);
        }
    }
    rows
}

/// Parquet read by pyarrow: each row's key and value members as JSON (timestamps, dates and
/// decimals as their text, non-finite floats as NaN/Infinity strings).
fn rows_from_parquet(def: &TableDef, files: &[std::path::PathBuf]) -> Vec<Map<String, Json>> {
    let script = r#"
import json, math, sys, pyarrow.parquet as pq
def plain(v):
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [plain(x) for x in v]
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    return v.isoformat() if hasattr(v, "isoformat") else str(v)
for path in sys.argv[1:]:
    for rec in pq.read_table(path).to_pylist():
        print(json.dumps(plain(rec)))
"#;
    let out = std::process::Command::new(official_python()).arg("-c").arg(script).args(files).output().unwrap();
    assert!(out.status.success(), "pyarrow: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let record: Json = serde_json::from_str(l).unwrap();
            def.columns()
                .map(|c| {
                    let v = record["key"]
                        .get(&c.name)
                        .or_else(|| record["value"].get(&c.name))
                        .cloned()
                        .unwrap_or(Json::Null);
                    // Nested objects and arrays travel as JSON text in Parquet.
                    let v = match (&c.ty, v) {
                        (ColumnType::Array(_) | ColumnType::Object(_) | ColumnType::Json, Json::String(s)) => {
                            serde_json::from_str(&s).unwrap()
                        }
                        (_, v) => v,
                    };
                    (c.name.clone(), v)
                })
                .collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_format_carries_every_value_and_its_edges() {
    for null in [CsvNull::Literal, CsvNull::Empty] {
        let emu = emulator(EmulatorConfig {
            rows: 40,
            part_rows: 15,
            csv_null: null,
            default_mode: dap_replica::emulator::Mode::Condensed,
            web_logs_duplicate_rate: 0.0,
            ..EmulatorConfig::default()
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        for (ns, table) in TABLES {
            let def = emu.table_def(ns, table).unwrap();
            let truth = emu.truth(ns, table).unwrap();
            let csv = snapshot(&emu, dir.path(), ns, table, "csv").await;
            assert_same_rows(&def, &rows_from_csv(&def, &csv, null), &truth, &format!("CSV ({null:?} NULLs)"));
            if null == CsvNull::Literal {
                let jsonl = snapshot(&emu, dir.path(), ns, table, "jsonl").await;
                assert_same_rows(&def, &rows_from_jsonl(&def, &jsonl), &truth, "JSON Lines");
                let parquet = snapshot(&emu, dir.path(), ns, table, "parquet").await;
                assert_same_rows(&def, &rows_from_parquet(&def, &parquet), &truth, "Parquet");
            }
        }
    }
}
