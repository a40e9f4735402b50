//! Read-only SQL over the mirror folder, for analysts: every namespace file is attached under its
//! namespace name (`canvas.users`, `canvas_logs.web_logs`), writes are refused, and results come
//! out as an aligned table, CSV, JSON, JSON Lines or Markdown.

use std::io::Write;
use std::path::{Path, PathBuf};

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags};

use crate::sink::sqlite::{Reading, read_only_uri};

/// How query results are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns, for a terminal.
    Table,
    Csv,
    /// One JSON array of objects.
    Json,
    /// One JSON object per line.
    Jsonl,
    Markdown,
}

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("there is no mirror in {}: run `dap initdb --namespace canvas --table …` first (or point DAP_MIRROR_DIR / --dir at one)", .0.display())]
    NoMirror(PathBuf),
    #[error("dap query only reads: this statement would change the mirror. Run it with sqlite3 on a copy instead")]
    Writes,
    #[error("{0}")]
    Sql(#[from] rusqlite::Error),
    #[error("writing the result: {0}")]
    Output(#[from] std::io::Error),
    #[error("writing CSV: {0}")]
    Csv(#[from] csv::Error),
}

/// The namespace files of a mirror folder: `(namespace, file)` for each `*.db`, sorted.
pub fn namespace_files(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut out: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let path = e.path();
            let ns = path.file_name()?.to_str()?.strip_suffix(".db")?.to_string();
            (path.is_file() && !ns.is_empty()).then_some((ns, path))
        })
        .collect();
    out.sort();
    out
}

/// A read-only connection with every namespace of the mirror folder `dir` attached.
pub fn open_mirror(dir: &Path) -> Result<Connection, QueryError> {
    let files = namespace_files(dir);
    if files.is_empty() {
        return Err(QueryError::NoMirror(dir.to_path_buf()));
    }
    let conn = Connection::open_with_flags(
        ":memory:",
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_URI | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    for (ns, file) in &files {
        let attach = |reading| -> rusqlite::Result<()> {
            conn.execute("ATTACH DATABASE ?1 AS ?2", (read_only_uri(file, reading), ns))?;
            conn.query_row(&format!("SELECT count(*) FROM \"{ns}\".sqlite_master"), [], |r| r.get::<_, i64>(0))?;
            Ok(())
        };
        // A mirror on a medium nothing can write has no WAL index: it is read as immutable.
        if let Err(e) = attach(Reading::Shared) {
            if e.sqlite_error_code() != Some(rusqlite::ErrorCode::CannotOpen) {
                return Err(e.into());
            }
            let _ = conn.execute("DETACH DATABASE ?1", [ns]);
            attach(Reading::Immutable)?;
        }
    }
    conn.pragma_update(None, "query_only", true)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    Ok(conn)
}

/// One result cell as text, for the text formats (NULL is empty, blobs are hex).
fn cell_text(v: ValueRef<'_>) -> String {
    match v {
        ValueRef::Null => String::new(),
        ValueRef::Integer(i) => i.to_string(),
        ValueRef::Real(f) => f.to_string(),
        ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
        ValueRef::Blob(b) => blob_hex(b),
    }
}

/// A blob as lowercase hex, the way every output of a query shows one.
pub(crate) fn blob_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|x| format!("{x:02x}")).collect()
}

fn cell_json(v: ValueRef<'_>) -> serde_json::Value {
    match v {
        ValueRef::Null => serde_json::Value::Null,
        ValueRef::Integer(i) => i.into(),
        ValueRef::Real(f) => serde_json::Number::from_f64(f).map_or_else(|| f.to_string().into(), Into::into),
        other => cell_text(other).into(),
    }
}

/// Runs `sql` (one read-only statement) and writes its rows to `out`; returns the row count.
pub fn run(conn: &Connection, sql: &str, format: OutputFormat, out: &mut dyn Write) -> Result<u64, QueryError> {
    let mut stmt = conn.prepare(sql)?;
    if !stmt.readonly() {
        return Err(QueryError::Writes);
    }
    let names: Vec<String> = stmt.column_names().into_iter().map(String::from).collect();
    let mut rows = stmt.query([])?;
    let mut count = 0u64;
    match format {
        OutputFormat::Csv => {
            let mut w = csv::Writer::from_writer(out);
            w.write_record(&names)?;
            while let Some(row) = rows.next()? {
                w.write_record((0..names.len()).map(|i| row.get_ref(i).map(cell_text).unwrap_or_default()))?;
                count += 1;
            }
            w.flush()?;
        }
        OutputFormat::Json | OutputFormat::Jsonl => {
            let lines = format == OutputFormat::Jsonl;
            if !lines {
                out.write_all(b"[")?;
            }
            while let Some(row) = rows.next()? {
                let object: serde_json::Map<String, serde_json::Value> = names
                    .iter()
                    .enumerate()
                    .map(|(i, n)| (n.clone(), row.get_ref(i).map(cell_json).unwrap_or_default()))
                    .collect();
                let sep = match (lines, count) {
                    (true, _) => "",
                    (false, 0) => "\n  ",
                    (false, _) => ",\n  ",
                };
                write!(out, "{sep}{}", serde_json::Value::Object(object))?;
                if lines {
                    out.write_all(b"\n")?;
                }
                count += 1;
            }
            if !lines {
                out.write_all(if count == 0 { b"]\n" } else { b"\n]\n" })?;
            }
        }
        OutputFormat::Table | OutputFormat::Markdown => {
            let mut cells: Vec<Vec<String>> = Vec::new();
            while let Some(row) = rows.next()? {
                cells.push((0..names.len()).map(|i| row.get_ref(i).map(cell_text).unwrap_or_default()).collect());
            }
            count = cells.len() as u64;
            write_grid(&names, &cells, format == OutputFormat::Markdown, out)?;
        }
    }
    Ok(count)
}

/// Columns padded to their widest cell; Markdown escapes `|` and marks the header.
fn write_grid(names: &[String], cells: &[Vec<String>], markdown: bool, out: &mut dyn Write) -> std::io::Result<()> {
    let shown = |s: &str| -> String {
        let one_line = s.replace(['\n', '\r'], " ");
        if markdown { one_line.replace('|', "\\|") } else { one_line }
    };
    let header: Vec<String> = names.iter().map(|n| shown(n)).collect();
    let body: Vec<Vec<String>> = cells.iter().map(|r| r.iter().map(|c| shown(c)).collect()).collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            let widest = body.iter().map(|r| r[i].chars().count()).chain([header[i].chars().count()]).max();
            widest.unwrap_or(0).max(if markdown { 3 } else { 1 })
        })
        .collect();
    let line = |row: &[String], out: &mut dyn Write| -> std::io::Result<()> {
        let padded: Vec<String> =
            row.iter().zip(&widths).map(|(c, w)| format!("{c}{}", " ".repeat(w - c.chars().count()))).collect();
        if markdown {
            writeln!(out, "| {} |", padded.join(" | "))
        } else {
            writeln!(out, "{}", padded.join("  ").trim_end())
        }
    };
    line(&header, out)?;
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    if markdown {
        writeln!(out, "| {} |", rule.join(" | "))?;
    } else {
        writeln!(out, "{}", rule.join("  "))?;
    }
    for row in &body {
        line(row, out)?;
    }
    Ok(())
}

/// The `sqlite3` arguments that open the mirror the way [`open_mirror`] does, for an interactive
/// shell.
pub fn shell_args(dir: &Path) -> Result<Vec<String>, QueryError> {
    let files = namespace_files(dir);
    if files.is_empty() {
        return Err(QueryError::NoMirror(dir.to_path_buf()));
    }
    let mut args = vec!["-readonly".to_string(), ":memory:".to_string()];
    for (ns, file) in files {
        let path = file.to_string_lossy().replace('\'', "''");
        args.push("-cmd".into());
        args.push(format!("ATTACH DATABASE '{path}' AS \"{ns}\""));
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mirror() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (ns, sql) in [
            (
                "canvas",
                "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT); INSERT INTO users VALUES (1, 'Ada, \"the\" first'), (2, NULL);",
            ),
            (
                "canvas_logs",
                "CREATE TABLE web_logs (id TEXT PRIMARY KEY, user_id INTEGER, score REAL); INSERT INTO web_logs VALUES ('a', 1, 0.5), ('b', 1, 2.0), ('c', 3, NULL);",
            ),
        ] {
            Connection::open(dir.path().join(format!("{ns}.db"))).unwrap().execute_batch(sql).unwrap();
        }
        dir
    }

    #[test]
    fn joins_across_namespaces_in_every_format() {
        let dir = mirror();
        let conn = open_mirror(dir.path()).unwrap();
        let sql = "SELECT u.id, u.name, count(*) AS hits FROM canvas.users u JOIN canvas_logs.web_logs w ON w.user_id = u.id GROUP BY u.id";
        let render = |f| {
            let mut out = Vec::new();
            assert_eq!(run(&conn, sql, f, &mut out).unwrap(), 1);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(render(OutputFormat::Csv), "id,name,hits\n1,\"Ada, \"\"the\"\" first\",2\n");
        assert_eq!(render(OutputFormat::Jsonl), "{\"id\":1,\"name\":\"Ada, \\\"the\\\" first\",\"hits\":2}\n");
        assert_eq!(render(OutputFormat::Json), "[\n  {\"id\":1,\"name\":\"Ada, \\\"the\\\" first\",\"hits\":2}\n]\n");
        assert_eq!(
            render(OutputFormat::Markdown),
            "| id  | name             | hits |\n| --- | ---------------- | ---- |\n| 1   | Ada, \"the\" first | 2    |\n"
        );
        assert_eq!(
            render(OutputFormat::Table),
            "id  name              hits\n--  ----------------  ----\n1   Ada, \"the\" first  2\n"
        );
    }

    #[test]
    fn writes_are_refused_and_change_nothing() {
        let dir = mirror();
        let conn = open_mirror(dir.path()).unwrap();
        for sql in ["DELETE FROM canvas.users", "CREATE TABLE canvas.x (a)", "DROP TABLE canvas_logs.web_logs"] {
            assert!(run(&conn, sql, OutputFormat::Csv, &mut Vec::new()).is_err(), "{sql} ran");
        }
        let n: i64 = conn.query_row("SELECT count(*) FROM canvas.users", [], |r| r.get(0)).unwrap();
        assert_eq!(n, 2);
    }
}
