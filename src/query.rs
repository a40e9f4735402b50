//! Read-only SQL over the mirror folder, for analysts: every namespace file is attached under its
//! namespace name (`canvas.users`, `canvas_logs.web_logs`), writes are refused, and results come
//! out as an aligned table, CSV, JSON, JSON Lines or Markdown.

use std::io::Write;
use std::path::{Path, PathBuf};

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags};

use crate::mirror::folder::namespace_files;
use crate::mirror::format::{LeaveNoTrace, ReadMode, read_only_uri};

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
    #[error(transparent)]
    Folder(#[from] crate::mirror::folder::FolderError),
    #[error("dap query only reads: this statement would change the mirror. Run it with sqlite3 on a copy instead")]
    Writes,
    /// SQLite's error, said once: its code text (the error's own source) is left out on purpose.
    #[error("{}", sql_message(.0))]
    Sql(rusqlite::Error),
    #[error("writing the result: {0}")]
    Output(#[from] std::io::Error),
    #[error("writing CSV: {0}")]
    Csv(#[from] csv::Error),
    #[error(transparent)]
    Interrupted(#[from] crate::interrupt::Interrupted),
    #[error(transparent)]
    AsOf(#[from] crate::as_of::AsOfError),
    #[error("{table} is a table of {}: SQLite would read one of them silently; write {} instead", .namespaces.join(" and "), .namespaces.iter().map(|ns| format!("{ns}.{table}")).collect::<Vec<_>>().join(" or "))]
    Ambiguous { table: String, namespaces: Vec<String> },
}

/// SQLite's words about a query, without its generic code text, and what to do about the
/// mistakes people make most.
fn sql_message(e: &rusqlite::Error) -> String {
    let hint = |message: &str| {
        if message.starts_with("no such table") {
            "; `dap status` lists the mirrored tables (write namespace.table, e.g. canvas.users)"
        } else if message.starts_with("no such column") {
            "; `SELECT column_name FROM dap_columns WHERE table_name = '…'` lists a table's columns"
        } else if message.contains("syntax error") {
            " (the SQL is SQLite's dialect)"
        } else {
            ""
        }
    };
    match e {
        rusqlite::Error::MultipleStatement => {
            "dap query runs one statement at a time: give each statement its own `dap query`".into()
        }
        rusqlite::Error::SqlInputError { msg, offset, .. } => {
            format!("{msg} (at character {} of the SQL){}", offset + 1, hint(msg))
        }
        rusqlite::Error::SqliteFailure(_, Some(message)) => format!("{message}{}", hint(message)),
        other => other.to_string(),
    }
}

impl From<rusqlite::Error> for QueryError {
    fn from(e: rusqlite::Error) -> QueryError {
        QueryError::Sql(e)
    }
}

impl QueryError {
    /// SQLite's "interrupted" after Ctrl-C is the interruption, not an SQL error.
    fn from_sql(e: rusqlite::Error) -> QueryError {
        if crate::interrupt::is_sqlite_interrupt(&e) {
            QueryError::Interrupted(crate::interrupt::Interrupted)
        } else {
            QueryError::Sql(e)
        }
    }
}

/// A double-quoted SQL identifier.
fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A read-only connection to a mirror folder, which leaves no file behind when dropped.
pub struct MirrorReader {
    conn: Connection,
    _tidy: LeaveNoTrace,
}

impl std::ops::Deref for MirrorReader {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.conn
    }
}

/// A read-only connection with every namespace of the mirror folder `dir` attached.
pub fn open_mirror(dir: &Path) -> Result<MirrorReader, QueryError> {
    let files = namespace_files(dir)?;
    if files.is_empty() {
        return Err(QueryError::NoMirror(dir.to_path_buf()));
    }
    let tidy = LeaveNoTrace::note(files.iter().map(|(_, f)| f.as_path()));
    let conn = Connection::open_with_flags(
        ":memory:",
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_URI | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    for (ns, file) in &files {
        let attach = |reading| -> rusqlite::Result<()> {
            conn.execute("ATTACH DATABASE ?1 AS ?2", (read_only_uri(file, reading), ns))?;
            conn.query_row(&format!("SELECT count(*) FROM {}.sqlite_master", quoted(ns)), [], |r| r.get::<_, i64>(0))?;
            Ok(())
        };
        // A mirror on a medium nothing can write has no WAL index: it is read as immutable.
        if let Err(e) = attach(ReadMode::Shared) {
            if !crate::mirror::format::needs_immutable(&e) {
                return Err(e.into());
            }
            let _ = conn.execute("DETACH DATABASE ?1", [ns]);
            crate::mirror::format::refuse_unread_log(file)?;
            attach(ReadMode::Immutable)?;
        }
    }
    dictionary_of_every_namespace(&conn, &files)?;
    conn.pragma_update(None, "query_only", true)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    Ok(MirrorReader { conn, _tidy: tidy })
}

/// With several namespaces, the plain names of the data dictionary (`dap_tables`,
/// `dap_columns`) answer for all of them: views over every file's, with its namespace.
fn dictionary_of_every_namespace(conn: &Connection, files: &[(String, PathBuf)]) -> rusqlite::Result<()> {
    use crate::mirror::format::{DICTIONARY_COLUMNS, DICTIONARY_TABLES};
    if files.len() < 2 {
        return Ok(());
    }
    for (dictionary, namespace_column) in [(DICTIONARY_TABLES, false), (DICTIONARY_COLUMNS, true)] {
        let mut parts = Vec::new();
        for (ns, _) in files {
            let has: bool = conn.query_row(
                &format!("SELECT count(*) > 0 FROM {}.sqlite_master WHERE type = 'table' AND name = ?1", quoted(ns)),
                [dictionary],
                |r| r.get(0),
            )?;
            if has {
                let namespace =
                    if namespace_column { format!("{} AS namespace, ", literal(ns)) } else { String::new() };
                parts.push(format!("SELECT {namespace}* FROM {}.{dictionary}", quoted(ns)));
            }
        }
        if parts.len() > 1 {
            conn.execute_batch(&format!("CREATE TEMP VIEW {dictionary} AS {}", parts.join(" UNION ALL ")))?;
        }
    }
    Ok(())
}

/// A SQL string literal.
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Refuses a plain table name that two namespaces have: SQLite would read the first attached.
pub fn check_plain_names(conn: &Connection, sql: &str) -> Result<(), QueryError> {
    let names = crate::sql_names::names(conn, sql)?;
    for (_, meanings) in names.plain {
        if meanings.len() > 1 {
            return Err(QueryError::Ambiguous {
                table: meanings[0].1.clone(),
                namespaces: meanings.into_iter().map(|(ns, _)| ns).collect(),
            });
        }
    }
    Ok(())
}

/// A blob as lowercase hex, the way every output of a query shows one.
pub(crate) fn blob_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|x| format!("{x:02x}")).collect()
}

/// How wide a table's columns may be, in terminal columns; longer cells are cut with `…`.
pub const DEFAULT_MAX_WIDTH: usize = 60;
/// Rows a table or Markdown result reads before it fixes its column widths and starts printing:
/// the rest streams through, so that memory stays bounded whatever the result's size.
const SAMPLE_ROWS: usize = 1_000;

/// Runs `sql` (one read-only statement) and writes its rows to `out`; returns the row count.
/// `max_width` caps a table's or Markdown's columns.
pub fn run(
    conn: &Connection,
    sql: &str,
    format: OutputFormat,
    max_width: usize,
    out: &mut dyn Write,
) -> Result<u64, QueryError> {
    crate::interrupt::watch(conn);
    check_plain_names(conn, sql)?;
    let mut stmt = conn.prepare(sql).map_err(QueryError::from_sql)?;
    if !stmt.readonly() {
        return Err(QueryError::Writes);
    }
    let names: Vec<String> = stmt.column_names().into_iter().map(String::from).collect();
    let columns = names.len();
    let mut rows = stmt.query([]).map_err(QueryError::from_sql)?;
    // The next row, or the end; Ctrl-C stops here.
    let mut next = move || -> Result<Option<Vec<ValueRefOwned>>, QueryError> {
        crate::interrupt::check()?;
        let Some(row) = rows.next().map_err(QueryError::from_sql)? else { return Ok(None) };
        let cells = (0..columns).map(|i| row.get_ref(i).map(ValueRefOwned::from));
        cells.collect::<Result<_, _>>().map(Some).map_err(QueryError::from_sql)
    };
    let mut count = 0u64;
    match format {
        OutputFormat::Csv => {
            let mut w = csv::Writer::from_writer(out);
            w.write_record(&names)?;
            while let Some(row) = next()? {
                w.write_record(row.iter().map(ValueRefOwned::text))?;
                count += 1;
            }
            w.flush()?;
        }
        OutputFormat::Json | OutputFormat::Jsonl => {
            let lines = format == OutputFormat::Jsonl;
            if !lines {
                out.write_all(b"[")?;
            }
            while let Some(row) = next()? {
                let object: serde_json::Map<String, serde_json::Value> =
                    names.iter().zip(&row).map(|(n, v)| (n.clone(), v.json())).collect();
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
            let markdown = format == OutputFormat::Markdown;
            let mut sample: Vec<Vec<String>> = Vec::new();
            while sample.len() < SAMPLE_ROWS {
                let Some(row) = next()? else { break };
                sample.push(row.iter().map(ValueRefOwned::text).collect());
            }
            let grid = Grid::new(&names, &sample, markdown, max_width);
            grid.header(out)?;
            for row in &sample {
                grid.row(row, out)?;
            }
            count = sample.len() as u64;
            drop(sample);
            while let Some(row) = next()? {
                grid.row(&row.iter().map(ValueRefOwned::text).collect::<Vec<_>>(), out)?;
                count += 1;
            }
        }
    }
    Ok(count)
}

/// A cell as read, owning its bytes (a row's references live only until the next row).
enum ValueRefOwned {
    Null,
    Integer(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

impl From<ValueRef<'_>> for ValueRefOwned {
    fn from(v: ValueRef<'_>) -> Self {
        match v {
            ValueRef::Null => ValueRefOwned::Null,
            ValueRef::Integer(i) => ValueRefOwned::Integer(i),
            ValueRef::Real(f) => ValueRefOwned::Real(f),
            ValueRef::Text(t) => ValueRefOwned::Text(String::from_utf8_lossy(t).into_owned()),
            ValueRef::Blob(b) => ValueRefOwned::Blob(b.to_vec()),
        }
    }
}

impl ValueRefOwned {
    /// The cell as text, for the text formats (NULL is empty, blobs are hex).
    fn text(&self) -> String {
        match self {
            ValueRefOwned::Null => String::new(),
            ValueRefOwned::Integer(i) => i.to_string(),
            ValueRefOwned::Real(f) => f.to_string(),
            ValueRefOwned::Text(t) => t.clone(),
            ValueRefOwned::Blob(b) => blob_hex(b),
        }
    }

    fn json(&self) -> serde_json::Value {
        match self {
            ValueRefOwned::Null => serde_json::Value::Null,
            ValueRefOwned::Integer(i) => (*i).into(),
            ValueRefOwned::Real(f) => serde_json::Number::from_f64(*f).map_or_else(|| f.to_string().into(), Into::into),
            other => other.text().into(),
        }
    }
}

/// A table or Markdown layout: column widths fixed from a sample of rows (in terminal columns,
/// so that wide characters line up), each cell on one line with its control characters shown as
/// escapes, cut with `…` beyond the width.
struct Grid {
    widths: Vec<usize>,
    markdown: bool,
    names: Vec<String>,
}

impl Grid {
    fn new(names: &[String], sample: &[Vec<String>], markdown: bool, max_width: usize) -> Grid {
        let max_width = max_width.max(4);
        let widths = (0..names.len())
            .map(|i| {
                let widest = sample
                    .iter()
                    .map(|r| display_width(&Self::shown(&r[i], markdown)))
                    .chain([display_width(&Self::shown(&names[i], markdown))])
                    .max()
                    .unwrap_or(0);
                widest.clamp(if markdown { 3 } else { 1 }, max_width)
            })
            .collect();
        Grid { widths, markdown, names: names.to_vec() }
    }

    /// A cell as it is printed: one line, control characters escaped, `|` escaped in Markdown.
    fn shown(cell: &str, markdown: bool) -> String {
        let safe = crate::term::safe(cell);
        if markdown { safe.replace('|', "\\|") } else { safe.into_owned() }
    }

    fn line(&self, row: &[String], out: &mut dyn Write) -> std::io::Result<()> {
        let padded: Vec<String> = row
            .iter()
            .zip(&self.widths)
            .map(|(c, w)| {
                let shown = Self::shown(c, self.markdown);
                let cell = fit(&shown, *w);
                let pad = w.saturating_sub(display_width(&cell));
                format!("{cell}{}", " ".repeat(pad))
            })
            .collect();
        if self.markdown {
            writeln!(out, "| {} |", padded.join(" | "))
        } else {
            writeln!(out, "{}", padded.join("  ").trim_end())
        }
    }

    fn header(&self, out: &mut dyn Write) -> std::io::Result<()> {
        self.line(&self.names, out)?;
        let rule: Vec<String> = self.widths.iter().map(|w| "-".repeat(*w)).collect();
        if self.markdown { writeln!(out, "| {} |", rule.join(" | ")) } else { writeln!(out, "{}", rule.join("  ")) }
    }

    fn row(&self, row: &[String], out: &mut dyn Write) -> std::io::Result<()> {
        self.line(row, out)
    }
}

/// Terminal columns `s` takes (a CJK character two, a combining mark none).
pub fn display_width(s: &str) -> usize {
    unicode_width::UnicodeWidthStr::width(s)
}

/// `s` cut to `width` terminal columns, ending in `…` when cut.
pub fn fit(s: &str, width: usize) -> std::borrow::Cow<'_, str> {
    if display_width(s) <= width {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::new();
    let mut used = 0;
    for c in s.chars() {
        let w = unicode_width::UnicodeWidthChar::width(c).unwrap_or(0);
        if used + w > width.saturating_sub(1) {
            break;
        }
        out.push(c);
        used += w;
    }
    out.push('…');
    std::borrow::Cow::Owned(out)
}

/// The `sqlite3` arguments that open the mirror the way [`open_mirror`] does, for an interactive
/// shell: every file read-only through its escaped `file:` URI, under its (checked) namespace name.
pub fn shell_args(dir: &Path) -> Result<Vec<String>, QueryError> {
    let files = namespace_files(dir)?;
    if files.is_empty() {
        return Err(QueryError::NoMirror(dir.to_path_buf()));
    }
    let mut args = vec!["-readonly".to_string(), ":memory:".to_string()];
    for (ns, file) in files {
        let uri = read_only_uri(&file, ReadMode::Shared).replace('\'', "''");
        args.push("-cmd".into());
        args.push(format!("ATTACH DATABASE '{uri}' AS {}", quoted(&ns)));
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
            assert_eq!(run(&conn, sql, f, DEFAULT_MAX_WIDTH, &mut out).unwrap(), 1);
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
            assert!(run(&conn, sql, OutputFormat::Csv, DEFAULT_MAX_WIDTH, &mut Vec::new()).is_err(), "{sql} ran");
        }
        let n: i64 = conn.query_row("SELECT count(*) FROM canvas.users", [], |r| r.get(0)).unwrap();
        assert_eq!(n, 2);
    }

    /// SQLite's mistakes read as what to do, without "Error code 1: SQL error or missing database".
    #[test]
    fn sql_mistakes_say_what_to_do() {
        let dir = mirror();
        let conn = open_mirror(dir.path()).unwrap();
        let said =
            |sql: &str| run(&conn, sql, OutputFormat::Csv, DEFAULT_MAX_WIDTH, &mut Vec::new()).unwrap_err().to_string();
        let missing = said("SELECT * FROM canvas.nope");
        assert!(missing.starts_with("no such table: canvas.nope; `dap status` lists"), "{missing}");
        let column = said("SELECT shoe FROM canvas.users");
        assert!(column.contains("lists a table's columns"), "{column}");
        assert!(said("SELEC 1").ends_with("(the SQL is SQLite's dialect)"));
        assert!(said("SELECT 1; SELECT 2").contains("one statement at a time"));
        // As the command line reports it, with the error's sources.
        let reported = |sql: &str| {
            let e = run(&conn, sql, OutputFormat::Csv, DEFAULT_MAX_WIDTH, &mut Vec::new()).unwrap_err();
            crate::cli::report(&anyhow::Error::from(e))
        };
        for sql in ["SELECT * FROM canvas.nope", "SELEC 1", "SELECT shoe FROM canvas.users"] {
            assert!(!reported(sql).contains("Error code"), "{}", reported(sql));
        }
    }
}
