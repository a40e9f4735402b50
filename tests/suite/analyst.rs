//! The analyst's toolkit over a real mirror: `dap query` across namespaces in every format
//! (compared with the same SQL through rusqlite), `dap export` read back by independent readers,
//! the data dictionary through a schema change, `dap pack` during a running sync and `dap unpack`
//! syncing on to the truth, coherent emulator data, and shell completions.

use crate::common;

use std::path::Path;
use std::process::Output;

use common::*;
use dap_replica::emulator::{ChangeCounts, Emulator, EmulatorConfig, SchemaChange};
use dap_replica::schema::ColumnType;
use rusqlite::types::Value as Sql;

const TABLES: &str = "users,courses,enrollments,submissions,assignments";

async fn dap(emu: &Emulator, dir: &Path, args: &[&str]) -> Output {
    run_ours_with(emu, dir, args, &[("DAP_MIRROR_DIR", dir.join("mirror").to_str().unwrap())]).await
}

async fn dap_ok(emu: &Emulator, dir: &Path, args: &[&str]) -> String {
    let out = dap(emu, dir, args).await;
    assert!(out.status.success(), "dap {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A mirror of a few canvas tables and web_logs, synced once.
async fn mirror(emu: &Emulator, dir: &Path) {
    dap_ok(emu, dir, &["initdb", "--namespace", "canvas", "--table", TABLES]).await;
    dap_ok(emu, dir, &["initdb", "--namespace", "canvas_logs", "--table", "web_logs"]).await;
}

/// The rows of `sql` over the mirror through rusqlite, every value as SQLite holds it.
fn rows_via_rusqlite(dir: &Path, sql: &str) -> (Vec<String>, Vec<Vec<Sql>>) {
    let conn = rusqlite::Connection::open_in_memory().unwrap();
    for ns in ["canvas", "canvas_logs"] {
        conn.execute("ATTACH DATABASE ?1 AS ?2", (dir.join(format!("mirror/{ns}.db")).to_str().unwrap(), ns)).unwrap();
    }
    let mut stmt = conn.prepare(sql).unwrap();
    let names = stmt.column_names().into_iter().map(String::from).collect::<Vec<_>>();
    let n = names.len();
    let rows = stmt
        .query_map([], |r| (0..n).map(|i| r.get::<_, Sql>(i)).collect::<Result<Vec<_>, _>>())
        .unwrap()
        .map(Result::unwrap)
        .collect();
    (names, rows)
}

fn as_text(v: &Sql) -> String {
    match v {
        Sql::Null => String::new(),
        Sql::Integer(i) => i.to_string(),
        Sql::Real(f) => f.to_string(),
        Sql::Text(t) => t.clone(),
        Sql::Blob(b) => b.iter().map(|x| format!("{x:02x}")).collect(),
    }
}

fn as_json(v: &Sql) -> serde_json::Value {
    match v {
        Sql::Null => serde_json::Value::Null,
        Sql::Integer(i) => (*i).into(),
        Sql::Real(f) => serde_json::Number::from_f64(*f).map(Into::into).unwrap_or_else(|| f.to_string().into()),
        other => as_text(other).into(),
    }
}

fn want_text(rows: &[Vec<Sql>]) -> Vec<Vec<String>> {
    rows.iter().map(|r| r.iter().map(as_text).collect()).collect()
}

/// A cell as a terminal must show it on one line: control characters (C0, DEL, C1, the bidi
/// overrides) as escapes, and `|` escaped in Markdown. Written here, not taken from dap.
fn shown(cell: &str, markdown: bool) -> String {
    let mut out = String::new();
    for c in cell.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\0'..='\u{1f}' | '\u{7f}' => out.push_str(&format!("\\x{:02x}", c as u32)),
            '\u{80}'..='\u{9f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' => {
                out.push_str(&format!("\\u{{{:x}}}", c as u32))
            }
            '|' if markdown => out.push_str("\\|"),
            c => out.push(c),
        }
    }
    out
}

/// The line of a table (`--format table`, or Markdown) holding `cells`, each padded to its
/// column's width in terminal columns.
fn grid_line(cells: &[String], widths: &[usize], markdown: bool) -> String {
    assert_eq!(cells.len(), widths.len(), "a width per column");
    let padded: Vec<String> = cells
        .iter()
        .zip(widths)
        .map(|(c, w)| {
            let shown = shown(c, markdown);
            let used = unicode_width::UnicodeWidthStr::width(shown.as_str());
            assert!(used <= *w, "{shown:?} fits its column of {w}");
            format!("{shown}{}", " ".repeat(w - used))
        })
        .collect();
    if markdown { format!("| {} |", padded.join(" | ")) } else { padded.join("  ").trim_end().to_string() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_joins_namespaces_in_every_format_as_rusqlite_sees_them_and_refuses_writes() {
    let emu = emulator(EmulatorConfig { rows: 120, ..EmulatorConfig::default() }).await;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path();
    mirror(&emu, dir).await;
    let sql = "SELECT u.id, u.name, count(w.id) AS requests, max(w.timestamp) AS last_seen \
               FROM canvas.users u JOIN canvas_logs.web_logs w ON w.user_id = u.id \
               GROUP BY u.id ORDER BY requests DESC, u.id";
    let (names, expected) = rows_via_rusqlite(dir, sql);
    assert!(expected.len() > 20, "the join of users and web_logs finds most users: {}", expected.len());

    let csv_out = dap_ok(&emu, dir, &["query", sql, "--format", "csv"]).await;
    let mut reader = csv::Reader::from_reader(csv_out.as_bytes());
    assert_eq!(reader.headers().unwrap().iter().collect::<Vec<_>>(), names);
    let got: Vec<Vec<String>> = reader.records().map(|r| r.unwrap().iter().map(String::from).collect()).collect();
    let want: Vec<Vec<String>> = expected.iter().map(|r| r.iter().map(as_text).collect()).collect();
    assert_eq!(got, want, "csv");

    let want_json: Vec<serde_json::Value> = expected
        .iter()
        .map(|r| serde_json::Value::Object(names.iter().cloned().zip(r.iter().map(as_json)).collect()))
        .collect();
    let json: Vec<serde_json::Value> =
        serde_json::from_str(&dap_ok(&emu, dir, &["query", sql, "--format", "json"]).await).unwrap();
    assert_eq!(json, want_json, "json");
    let jsonl: Vec<serde_json::Value> = dap_ok(&emu, dir, &["query", sql, "--format", "jsonl"])
        .await
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(jsonl, want_json, "jsonl");
    for format in ["markdown", "table"] {
        // Wide enough for every cell (cutting long cells is checked in tests/safety.rs): every
        // line is exactly the cells as a terminal must show them, padded to the rule's widths.
        let text = dap_ok(&emu, dir, &["query", sql, "--format", format, "--max-width", "100000"]).await;
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), expected.len() + 2, "{format}: header, rule and one line per row");
        let markdown = format == "markdown";
        let rule = if markdown { lines[1].trim_matches('|').trim() } else { lines[1] };
        let widths: Vec<usize> = rule.split(if markdown { " | " } else { "  " }).map(str::len).collect();
        assert!(rule.chars().all(|c| c == '-' || c == ' ' || c == '|'), "{format} rule: {rule}");
        let header: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let body = want_text(&expected);
        assert!(
            body.iter().flatten().any(|c| c.contains("  ")) && body.iter().flatten().any(|c| c.contains('\n')),
            "some cells hold two spaces and line breaks (the old comparison skipped them)"
        );
        let rows = std::iter::once(&header).chain(&body);
        for (line, cells) in [lines[0]].iter().chain(&lines[2..]).zip(rows) {
            assert_eq!(*line, grid_line(cells, &widths, markdown), "{format}");
        }
    }

    // Writes are refused, and the mirror is unchanged.
    let before = std::fs::read(dir.join("mirror/canvas.db")).unwrap();
    for write in ["DELETE FROM canvas.users", "UPDATE canvas.users SET name = 'x'", "DROP TABLE canvas.users"] {
        let out = dap(&emu, dir, &["query", write]).await;
        assert!(!out.status.success(), "{write} ran");
        assert!(String::from_utf8_lossy(&out.stderr).contains("only reads"), "{write}");
    }
    assert_eq!(std::fs::read(dir.join("mirror/canvas.db")).unwrap(), before);
    let (_, still) = rows_via_rusqlite(dir, "SELECT count(*) FROM canvas.users");
    assert_eq!(still[0][0], Sql::Integer(emu.truth("canvas", "users").unwrap().len() as i64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_writes_tables_and_queries_that_independent_readers_read_back_with_types() {
    let emu = emulator(EmulatorConfig { rows: 80, ..EmulatorConfig::default() }).await;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path();
    mirror(&emu, dir).await;
    let (names, rows) = rows_via_rusqlite(dir, "SELECT * FROM canvas.submissions");
    let def = emu.table_def("canvas", "submissions").unwrap();
    let out = |f: &str| dir.join(format!("submissions.{f}"));

    // CSV and TSV parse back to the table's text forms, row for row.
    dap_ok(&emu, dir, &["export", "--table", "submissions", "--output", out("csv").to_str().unwrap()]).await;
    let mut reader = csv::Reader::from_path(out("csv")).unwrap();
    assert_eq!(reader.headers().unwrap().iter().collect::<Vec<_>>(), names);
    let csv_rows: Vec<Vec<String>> = reader.records().map(|r| r.unwrap().iter().map(String::from).collect()).collect();
    assert_eq!(csv_rows.len(), rows.len());
    let key_column: Vec<String> = rows.iter().map(|r| as_text(&r[0])).collect();
    assert_eq!(csv_rows.iter().map(|r| r[0].clone()).collect::<Vec<_>>(), key_column);
    dap_ok(&emu, dir, &["export", "--table", "submissions", "--output", out("tsv").to_str().unwrap()]).await;
    let tsv_rows = csv::ReaderBuilder::new().delimiter(b'\t').from_path(out("tsv")).unwrap().records().count();
    assert_eq!(tsv_rows, rows.len());

    // NULL and the empty string: alike by default, told apart with --null.
    let nulls = out("nulls.csv");
    let query = "SELECT NULL AS missing, '' AS empty, 'x' AS text";
    dap_ok(&emu, dir, &["export", "--query", query, "-o", nulls.to_str().unwrap()]).await;
    assert_eq!(std::fs::read_to_string(&nulls).unwrap(), "missing,empty,text\n,,x\n");
    dap_ok(&emu, dir, &["export", "--query", query, "--null", "\\N", "-o", nulls.to_str().unwrap()]).await;
    assert_eq!(std::fs::read_to_string(&nulls).unwrap(), "missing,empty,text\n\\N,,x\n");
    // A table of another namespace is named with the flag that finds it.
    let wrong = dap(&emu, dir, &["export", "--table", "web_logs", "-o", out("logs.csv").to_str().unwrap()]).await;
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(!wrong.status.success() && err.contains("canvas.web_logs is not in the mirror"), "{err}");
    assert!(err.contains("give --namespace canvas_logs"), "{err}");

    // JSON Lines: one object per row with every column, typed.
    dap_ok(&emu, dir, &["export", "--table", "submissions", "--format", "jsonl", "-o", out("jsonl").to_str().unwrap()])
        .await;
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(out("jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), rows.len());
    for (line, row) in lines.iter().zip(&rows) {
        assert_eq!(line[&names[0]], as_json(&row[0]));
        assert_eq!(line.as_object().unwrap().len(), names.len());
    }

    // Parquet, read by pyarrow (independent of our writer): the DAP types and every value.
    dap_ok(&emu, dir, &["export", "--table", "submissions", "--output", out("parquet").to_str().unwrap()]).await;
    let script = r#"
import json, sys
import pyarrow.parquet as pq
t = pq.read_table(sys.argv[1])
types = {f.name: str(f.type) for f in t.schema}
rows = t.to_pylist()
print(json.dumps({"types": types, "count": len(rows), "keys": [r["id"] for r in rows],
                  "submitted_at": [r["submitted_at"].isoformat() if r["submitted_at"] else None for r in rows]}))
"#;
    let py = std::process::Command::new(official_python())
        .args(["-c", script, out("parquet").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(py.status.success(), "{}", String::from_utf8_lossy(&py.stderr));
    let read: serde_json::Value = serde_json::from_slice(&py.stdout).unwrap();
    assert_eq!(read["count"], rows.len());
    assert_eq!(read["types"]["id"], "int64");
    assert_eq!(read["types"]["submitted_at"], "timestamp[us, tz=UTC]");
    assert_eq!(read["types"]["score"], "double");
    assert!(read["types"]["workflow_state"] == "string" || read["types"]["workflow_state"] == "large_string");
    let keys: Vec<i64> = serde_json::from_value(read["keys"].clone()).unwrap();
    assert_eq!(keys, rows.iter().map(|r| if let Sql::Integer(i) = r[0] { i } else { panic!() }).collect::<Vec<_>>());
    let at = names.iter().position(|n| n == "submitted_at").unwrap();
    for (got, row) in read["submitted_at"].as_array().unwrap().iter().zip(&rows) {
        match (&row[at], got) {
            (Sql::Null, serde_json::Value::Null) => {}
            (Sql::Text(mirror), serde_json::Value::String(py)) => {
                let a = chrono::DateTime::parse_from_rfc3339(mirror).unwrap();
                let b = chrono::DateTime::parse_from_rfc3339(py).unwrap();
                assert_eq!(a, b, "submitted_at");
            }
            other => panic!("submitted_at differs: {other:?}"),
        }
    }
    assert!(def.values.iter().any(|c| c.name == "submitted_at"));

    // A filter and a query.
    let filtered = out("graded.csv");
    dap_ok(
        &emu,
        dir,
        &["export", "--table", "submissions", "--where", "score >= 50", "--output", filtered.to_str().unwrap()],
    )
    .await;
    let (_, graded) = rows_via_rusqlite(dir, "SELECT id FROM canvas.submissions WHERE score >= 50");
    assert_eq!(csv::Reader::from_path(&filtered).unwrap().records().count(), graded.len());
    let joined = out("joined.parquet");
    let sql = "SELECT c.name, count(*) AS n, avg(s.score) AS average FROM canvas.submissions s \
               JOIN canvas.courses c ON c.id = s.course_id GROUP BY c.id";
    dap_ok(&emu, dir, &["export", "--query", sql, "--output", joined.to_str().unwrap()]).await;
    let (_, groups) = rows_via_rusqlite(dir, sql);
    let py = std::process::Command::new(official_python())
        .args([
            "-c",
            "import pyarrow.parquet as pq, sys; print(pq.read_table(sys.argv[1]).num_rows)",
            joined.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&py.stdout).trim(), groups.len().to_string());

    // An extension that names no format dap writes: a usage error, and no file (an .xlsx
    // holding CSV would mislead whoever opens it); with --format it is written.
    let sheet = out("graded.xlsx");
    let refused = dap(&emu, dir, &["export", "--table", "submissions", "--output", sheet.to_str().unwrap()]).await;
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{err}");
    assert!(err.contains(".xlsx") && err.contains("--format"), "{err}");
    assert!(!sheet.exists());
    let args = ["export", "--table", "submissions", "--format", "csv", "--output", sheet.to_str().unwrap()];
    dap_ok(&emu, dir, &args).await;
    let (_, all) = rows_via_rusqlite(dir, "SELECT id FROM canvas.submissions");
    assert_eq!(csv::Reader::from_path(&sheet).unwrap().records().count(), all.len());

    // A table that is not there: a clear error, and no file.
    let missing = out("missing.csv");
    let out = dap(&emu, dir, &["export", "--table", "nope", "--output", missing.to_str().unwrap()]).await;
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("canvas.nope is not in the mirror"));
    assert!(!missing.exists());
}

/// Tables of the canvas namespace that together hold every kind of column DAP sends.
fn tables_of_every_column_kind(emu: &Emulator) -> Vec<String> {
    let kind = |ty: &ColumnType| format!("{ty:?}").split(['(', ' ', '{']).next().unwrap().to_string();
    let kinds = |t: &str| -> std::collections::BTreeSet<String> {
        emu.table_def("canvas", t).unwrap().columns().map(|c| kind(&c.ty)).collect()
    };
    let all = emu.tables("canvas").unwrap();
    let wanted: std::collections::BTreeSet<String> = all.iter().flat_map(|t| kinds(t)).collect();
    let (mut chosen, mut covered) = (Vec::new(), std::collections::BTreeSet::new());
    for t in &all {
        if !kinds(t).is_subset(&covered) {
            covered.extend(kinds(t));
            chosen.push(t.clone());
        }
    }
    assert_eq!(covered, wanted);
    chosen
}

/// A cell of a text export (CSV, TSV, or pyarrow's rendering of Parquet) as the JSON the truth
/// compares: nested values parsed back from their JSON text, an empty CSV cell as NULL.
fn text_cell(ty: &ColumnType, text: Option<&str>) -> serde_json::Value {
    match (ty, text) {
        (_, None | Some("")) => serde_json::Value::Null,
        (ColumnType::Json | ColumnType::Array(_) | ColumnType::Object(_), Some(t)) => {
            serde_json::from_str(t).unwrap_or_else(|e| panic!("{t:?} is not JSON: {e}"))
        }
        (_, Some(t)) => t.into(),
    }
}

/// In CSV and TSV an empty string and NULL are the same empty cell (the formats have no NULL).
fn empty_text_as_null(
    rows: &[serde_json::Map<String, serde_json::Value>],
) -> Vec<serde_json::Map<String, serde_json::Value>> {
    let null_if_empty =
        |v: &serde_json::Value| if v.as_str() == Some("") { serde_json::Value::Null } else { v.clone() };
    rows.iter().map(|r| r.iter().map(|(k, v)| (k.clone(), null_if_empty(v))).collect()).collect()
}

/// Every export format, for tables that hold every kind of column, read back by a reader of its
/// own (the csv crate, serde_json, pyarrow) and compared cell by cell with the emulator's truth;
/// Parquet's logical types are those the DAP types call for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_hold_every_cell_of_every_column_kind_in_every_format() {
    let emu = emulator(EmulatorConfig { rows: 40, ..EmulatorConfig::default() }).await;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path();
    let tables = tables_of_every_column_kind(&emu);
    dap_ok(&emu, dir, &["initdb", "--namespace", "canvas", "--table", &tables.join(",")]).await;
    let limits = [truth::Limit::NoNegativeZero];
    let parquet_script = r#"
import base64, datetime, decimal, json, math, sys, uuid
import pyarrow.parquet as pq
t = pq.read_table(sys.argv[1])
def cell(v):
    if v is None: return None
    if isinstance(v, bool): return v
    if isinstance(v, float): return repr(v)
    if isinstance(v, (datetime.datetime, datetime.date, datetime.time)): return v.isoformat()
    if isinstance(v, decimal.Decimal): return str(v)
    if isinstance(v, bytes): return base64.b16encode(v).decode()
    return v
print(json.dumps({"types": {f.name: str(f.type) for f in t.schema},
                  "rows": [{k: cell(v) for k, v in r.items()} for r in t.to_pylist()]}))
"#;
    for table in &tables {
        let def = emu.table_def("canvas", table).unwrap();
        let truth = emu.truth("canvas", table).unwrap();
        let want = truth::row_lines(&def, &truth, &limits);
        let want_text = truth::row_lines(&def, &empty_text_as_null(&truth), &limits);
        let file = |ext: &str| dir.join(format!("{table}.{ext}"));
        let columns: Vec<&dap_replica::schema::Column> = def.columns().collect();
        for (ext, delimiter) in [("csv", b','), ("tsv", b'\t')] {
            dap_ok(&emu, dir, &["export", "--table", table, "--output", file(ext).to_str().unwrap()]).await;
            let mut reader = csv::ReaderBuilder::new().delimiter(delimiter).from_path(file(ext)).unwrap();
            let header: Vec<String> = reader.headers().unwrap().iter().map(String::from).collect();
            assert_eq!(header, columns.iter().map(|c| c.name.clone()).collect::<Vec<_>>(), "{table}.{ext}");
            let rows: Vec<serde_json::Map<String, serde_json::Value>> = reader
                .records()
                .map(|r| {
                    let r = r.unwrap();
                    columns.iter().zip(r.iter()).map(|(c, t)| (c.name.clone(), text_cell(&c.ty, Some(t)))).collect()
                })
                .collect();
            let got = truth::row_lines(&def, &rows, &limits);
            assert!(got == want_text, "{table}.{ext}\n{}", differences(&got, &want_text, ["the export", "the truth"]));
        }
        dap_ok(&emu, dir, &["export", "--table", table, "--output", file("jsonl").to_str().unwrap()]).await;
        let rows: Vec<serde_json::Map<String, serde_json::Value>> =
            std::fs::read_to_string(file("jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let got = truth::row_lines(&def, &rows, &limits);
        assert!(got == want, "{table}.jsonl\n{}", differences(&got, &want, ["the export", "the truth"]));

        dap_ok(&emu, dir, &["export", "--table", table, "--output", file("parquet").to_str().unwrap()]).await;
        let py = std::process::Command::new(official_python())
            .args(["-c", parquet_script, file("parquet").to_str().unwrap()])
            .output()
            .unwrap();
        assert!(py.status.success(), "{}", String::from_utf8_lossy(&py.stderr));
        let read: serde_json::Value = serde_json::from_slice(&py.stdout).unwrap();
        for c in &columns {
            let expected = match &c.ty {
                ColumnType::Int(16) => "int16".to_string(),
                ColumnType::Int(32) => "int32".into(),
                ColumnType::Int(_) | ColumnType::IntEnum(_) => "int64".into(),
                ColumnType::Float(32) => "float".into(),
                ColumnType::Float(_) => "double".into(),
                ColumnType::Decimal { precision, scale } if *precision <= 18 => {
                    format!("decimal128({precision}, {scale})")
                }
                ColumnType::Bool => "bool".into(),
                ColumnType::Timestamp => "timestamp[us, tz=UTC]".into(),
                ColumnType::Date => "date32[day]".into(),
                ColumnType::Time => "time64[us]".into(),
                _ => "string".into(),
            };
            assert_eq!(read["types"][&c.name], expected.as_str(), "{table}.{}: {:?}", c.name, c.ty);
        }
        let rows: Vec<serde_json::Map<String, serde_json::Value>> = read["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                columns
                    .iter()
                    .map(|c| {
                        let v = &r[&c.name];
                        let cell = match (&c.ty, v) {
                            (
                                ColumnType::Json | ColumnType::Array(_) | ColumnType::Object(_),
                                serde_json::Value::String(t),
                            ) => text_cell(&c.ty, Some(t)),
                            _ => v.clone(),
                        };
                        (c.name.clone(), cell)
                    })
                    .collect()
            })
            .collect();
        let got = truth::row_lines(&def, &rows, &limits);
        assert!(got == want, "{table}.parquet\n{}", differences(&got, &want, ["the export", "the truth"]));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_dictionary_describes_every_column_and_follows_schema_changes() {
    let emu = emulator(EmulatorConfig { rows: 30, ..EmulatorConfig::default() }).await;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path();
    mirror(&emu, dir).await;
    let dictionary = |table: &str| {
        let (_, rows) = rows_via_rusqlite(
            dir,
            &format!(
                "SELECT column_name, description, nullable, is_key FROM canvas.dap_columns WHERE table_name = '{table}' ORDER BY position"
            ),
        );
        rows
    };
    for table in TABLES.split(',') {
        let def = emu.table_def("canvas", table).unwrap();
        let rows = dictionary(table);
        let columns: Vec<String> = rows.iter().map(|r| as_text(&r[0])).collect();
        let want: Vec<String> = std::iter::once(&def.key).chain(&def.values).map(|c| c.name.clone()).collect();
        assert_eq!(columns, want, "{table}: every column, in order");
        for (row, column) in rows.iter().zip(std::iter::once(&def.key).chain(&def.values)) {
            assert_eq!(as_text(&row[1]), column.comment.clone().unwrap_or_default(), "{table}.{}", column.name);
        }
        assert_eq!(rows[0][3], Sql::Integer(1), "{table}: the key is marked");
        let (_, described) = rows_via_rusqlite(
            dir,
            &format!("SELECT kind, description FROM canvas.dap_tables WHERE table_name = '{table}'"),
        );
        assert_eq!(described[0][0], Sql::Text("data".into()));
    }
    let (_, internal) =
        rows_via_rusqlite(dir, "SELECT table_name FROM canvas.dap_tables WHERE kind = 'internal' ORDER BY 1");
    assert!(internal.iter().any(|r| as_text(&r[0]) == "instructure_dap__table_sync"), "{internal:?}");

    let (_, column) = emu.evolve("canvas", "users", SchemaChange::AddColumn).unwrap();
    emu.commit("canvas", "users", ChangeCounts { inserts: 2, ..Default::default() }).unwrap();
    dap_ok(&emu, dir, &["syncdb", "--namespace", "canvas", "--table", "users"]).await;
    let columns: Vec<String> = dictionary("users").iter().map(|r| as_text(&r[0])).collect();
    assert_eq!(columns.last(), Some(&column), "the new column is described after the sync");
    dap_ok(&emu, dir, &["dropdb", "--namespace", "canvas", "--table", "users"]).await;
    assert!(dictionary("users").is_empty(), "a dropped table leaves the dictionary");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pack_taken_during_a_sync_is_consistent_and_unpacks_into_a_mirror_that_syncs_to_the_truth() {
    let emu = emulator(EmulatorConfig { rows: 3000, part_rows: 200, ..EmulatorConfig::default() }).await;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path();
    mirror(&emu, dir).await;
    for t in TABLES.split(',') {
        emu.commit("canvas", t, ChangeCounts { inserts: 400, updates: 400, soft_deletes: 50, hard_deletes: 50 })
            .unwrap();
    }
    let count = |db: &Path, t: &str| -> usize {
        let conn = rusqlite::Connection::open(db).unwrap();
        conn.query_row(&format!("SELECT count(*) FROM \"{t}\""), [], |r| r.get::<_, i64>(0)).unwrap() as usize
    };
    // Every table's rows, every column, before the sync and in the truth after it.
    let lines = |rows: &[serde_json::Map<String, serde_json::Value>], t: &str| {
        common::truth::row_lines(&emu.table_def("canvas", t).unwrap(), rows, &[common::truth::Limit::NoNegativeZero])
    };
    let state = |db: &Path| -> Vec<Vec<String>> {
        TABLES
            .split(',')
            .map(|t| lines(&common::truth::sqlite_rows(db, &emu.table_def("canvas", t).unwrap()), t))
            .collect()
    };
    let before = state(&dir.join("mirror/canvas.db"));
    let after: Vec<Vec<String>> = TABLES.split(',').map(|t| lines(&emu.truth("canvas", t).unwrap(), t)).collect();
    // DAP holds back the query of submissions, so that a pack is taken, provably, while users
    // is synced and submissions is not yet: the sync is half done when the pack is made.
    let held = TABLES.split(',').position(|t| t == "submissions").unwrap();
    let slow = dap_replica::emulator::FaultSpec {
        delay_ms: Some(15_000),
        ..dap_replica::emulator::FaultSpec::new(dap_replica::emulator::FaultKind::Slow, 1)
    };
    emu.inject(slow.on(dap_replica::emulator::Endpoint::Query).for_table("submissions"));
    let mut sync = {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_dap"));
        cmd.current_dir(dir)
            .env("DAP_API_URL", emu.base_url())
            .env("DAP_CLIENT_ID", &emu.config().client_id)
            .env("DAP_CLIENT_SECRET", &emu.config().client_secret)
            .env("DAP_MIRROR_DIR", dir.join("mirror"))
            .env("DAP_JOB_RATE", "100000/1")
            .args(["--non-interactive", "syncdb", "--namespace", "canvas", "--table", "all"]);
        cmd.spawn().unwrap()
    };
    let users_synced = {
        let started = std::time::Instant::now();
        loop {
            if count(&dir.join("mirror/canvas.db"), "users") == after[0].len() {
                break true;
            }
            if started.elapsed() > std::time::Duration::from_secs(60) || sync.try_wait().unwrap().is_some() {
                break false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    assert!(users_synced, "users was synced while the sync still ran");
    let mut packs = Vec::new();
    for i in 0..3 {
        let pack = dir.join(format!("mirror-{i}.dap.zst"));
        dap_ok(&emu, dir, &["pack", "--output", pack.to_str().unwrap()]).await;
        packs.push(pack);
    }
    assert!(sync.try_wait().unwrap().is_none(), "the packs were taken while the sync ran");
    let status = sync.wait().await.unwrap();
    assert!(status.success());

    for (i, pack) in packs.iter().enumerate() {
        let restored = dir.join(format!("restored-{i}"));
        let unpack = dap(&emu, dir, &["unpack", pack.to_str().unwrap(), "--dir", restored.to_str().unwrap()]).await;
        assert!(unpack.status.success(), "{}", String::from_utf8_lossy(&unpack.stderr));
        // Consistent: a sound file in which every table is wholly before or wholly after its sync.
        let db = restored.join("canvas.db");
        let conn = rusqlite::Connection::open(&db).unwrap();
        let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
        assert_eq!(check, "ok");
        drop(conn);
        let packed = state(&db);
        for (j, t) in TABLES.split(',').enumerate() {
            assert!(
                packed[j] == before[j] || packed[j] == after[j],
                "pack {i}: {t} is neither its state before the sync nor after it\n{}",
                differences(&packed[j], &after[j], ["the pack", "the truth"])
            );
        }
        // Taken mid-sync: users already synced, submissions not yet.
        assert!(packed[0] == after[0] && packed[held] == before[held], "pack {i} holds the sync half done");
        // It syncs on to the truth.
        let env = [("DAP_MIRROR_DIR", restored.to_str().unwrap())];
        let out = run_ours_with(&emu, dir, &["syncdb", "--namespace", "canvas", "--table", "all"], &env).await;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        for t in TABLES.split(',') {
            assert_eq!(count(&db, t), emu.truth("canvas", t).unwrap().len(), "restored-{i}: {t}");
        }
        // Unpacking over it again is refused without --force, and accepted with it.
        let again = dap(&emu, dir, &["unpack", pack.to_str().unwrap(), "--dir", restored.to_str().unwrap()]).await;
        assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("--force"));
        let forced =
            dap(&emu, dir, &["unpack", pack.to_str().unwrap(), "--dir", restored.to_str().unwrap(), "--force"]).await;
        assert!(forced.status.success(), "{}", String::from_utf8_lossy(&forced.stderr));
    }

    // Not a pack: refused, nothing written.
    let bogus = dir.join("bogus.dap.zst");
    std::fs::write(&bogus, b"not a pack at all").unwrap();
    let target = dir.join("never");
    let out = dap(&emu, dir, &["unpack", bogus.to_str().unwrap(), "--dir", target.to_str().unwrap()]).await;
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not a dap pack"));
    assert!(std::fs::read_dir(&target).map(|d| d.count() == 0).unwrap_or(true));
}

#[tokio::test]
async fn emulator_data_joins_like_a_real_school_and_scores_average() {
    let emu = emulator(EmulatorConfig { rows: 400, ..EmulatorConfig::default() }).await;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path();
    mirror(&emu, dir).await;
    let (_, total) = rows_via_rusqlite(dir, "SELECT count(*) FROM canvas.enrollments");
    let (_, joined) = rows_via_rusqlite(
        dir,
        "SELECT count(*) FROM canvas.enrollments e JOIN canvas.users u ON u.id = e.user_id \
         JOIN canvas.courses c ON c.id = e.course_id",
    );
    let (Sql::Integer(total), Sql::Integer(joined)) = (&total[0][0], &joined[0][0]) else { panic!() };
    assert!(*joined * 2 > *total, "most enrollments join their user and course: {joined} of {total}");
    assert!(joined < total, "a few dangle, as in real exports");
    let (_, avg) = rows_via_rusqlite(dir, "SELECT avg(score), min(score), max(score) FROM canvas.submissions");
    match avg[0].as_slice() {
        [Sql::Real(avg), min, max] => {
            assert!(avg.is_finite() && (0.0..=100.0).contains(avg), "avg(score) {avg}");
            assert!(matches!(min, Sql::Real(m) if *m >= 0.0) && matches!(max, Sql::Real(m) if *m <= 100.0));
        }
        other => panic!("avg(score): {other:?}"),
    }
}

#[test]
fn completions_are_generated_for_each_shell() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef dap"),
        ("fish", "complete -c dap"),
        ("powershell", "Register-ArgumentCompleter"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_dap")).args(["completions", shell]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains(marker), "{shell}: {text:.200}");
        for command in ["initdb", "syncdb", "query", "export", "pack", "unpack", "replicate"] {
            assert!(text.contains(command), "{shell} completes {command}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_name_two_namespaces_have_is_refused_and_the_dictionary_answers_for_every_namespace() {
    let emu = emulator(EmulatorConfig { rows: 5, ..EmulatorConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    dap_ok(&emu, dir, &["initdb", "--namespace", "canvas", "--table", "accounts,courses"]).await;
    dap_ok(&emu, dir, &["initdb", "--namespace", "catalog", "--table", "accounts"]).await;
    // SQLite alone reads one of the two silently; dap names both.
    for sql in ["SELECT count(*) FROM accounts", "SELECT count(*) FROM canvas.courses JOIN \"Accounts\" ON 1"] {
        let out = dap(&emu, dir, &["query", sql]).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("canvas.accounts or catalog.accounts"), "{sql}: {err}");
        let out = dap(&emu, dir, &["export", "--query", sql, "-o", dir.join("x.csv").to_str().unwrap()]).await;
        assert!(!out.status.success() && !dir.join("x.csv").exists(), "export of {sql}");
    }
    // Qualified, unique, or inside a string: answered.
    for sql in [
        "SELECT count(*) FROM canvas.accounts",
        "SELECT count(*) FROM courses WHERE 'accounts' <> ''",
        "SELECT count(*) FROM catalog.accounts -- accounts",
    ] {
        dap_ok(&emu, dir, &["query", sql]).await;
    }
    // The dictionary's plain names answer for both namespaces.
    let out = dap_ok(
        &emu,
        dir,
        &[
            "query",
            "--format",
            "csv",
            "SELECT DISTINCT namespace FROM dap_columns WHERE table_name = 'accounts' ORDER BY 1",
        ],
    )
    .await;
    assert_eq!(out.lines().collect::<Vec<_>>(), ["namespace", "canvas", "catalog"], "{out}");
    let out =
        dap_ok(&emu, dir, &["query", "--format", "csv", "SELECT count(*) FROM dap_tables WHERE kind = 'data'"]).await;
    assert_eq!(out.lines().nth(1), Some("3"), "{out}");
}
