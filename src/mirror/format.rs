//! The mirror's file format, in one place for everyone who reads or writes it (the writer, the
//! reader for replication, query, export, pack): one SQLite file per namespace, tables under their
//! DAP names, dap's own tables beside them (bookkeeping, checkpoints, change index, data
//! dictionary), how each value is stored and read back, how a file is opened read-only and left
//! as it was found, and what in a file dap did not make.
//!
//! Types: integers and booleans (0/1) are INTEGER; floats REAL, except NaN, which a SQLite REAL
//! cannot hold (it would be NULL) and which is kept as the text `NaN`; a REAL has no negative
//! zero, so -0.0 reads back as 0.0 (the one value the mirror does not keep bit for bit);
//! decimals NUMERIC when a double holds every value of the column exactly (up to 15 digits), else
//! TEXT (SQLite's NUMERIC would round them to 15 digits);
//! timestamps fixed-width UTC text `YYYY-MM-DDTHH:MM:SS.ffffffZ` (sorts in time order, and
//! SQLite's date functions read it); dates, times, UUIDs, IPs, enums and text as TEXT; nested
//! objects and arrays as JSON text.

use std::path::{Path, PathBuf};

use rusqlite::ToSql;
use rusqlite::types::{ToSqlOutput, Value as Sql, ValueRef};
use rusqlite::{Connection, OpenFlags};

use crate::error::Retry;
use crate::schema::{ColumnType, TableDef};
use crate::sink::{Refusal, SinkError};
use crate::time;
use crate::value::Value;

/// The bookkeeping table of each file (the official client's `table_sync`).
pub const BOOKKEEPING: &str = "instructure_dap__table_sync";

/// Objects of an initdb job already loaded into staging (the per-object checkpoint).
pub const CHECKPOINTS: &str = "_dap_checkpoint";
/// The commits of each table since its epoch began: sequence number and DAP watermark.
pub const COMMITS: &str = "dap_replica__commits";
/// Per key of each table, the last commit that wrote or deleted it.
pub const CHANGES: &str = "dap_replica__changes";

/// The tables that keep history (`history.rs`): when it began and how long ended versions are
/// kept. Made when history is first turned on.
pub const HISTORY_SETTINGS: &str = "dap_replica__history";

/// Periods of append-only tables (web_logs) no sync could fetch, because DAP had dropped them
/// from its window first: one row per gap, its end NULL until the snapshot that followed it is
/// published. Made when the first gap is found.
pub const GAPS: &str = "dap_replica__gaps";

/// The gaps of the tables of `namespace` in a mirror file: `(table, after, before)`, oldest
/// first (none when the file has no gap table).
pub fn gaps(conn: &Connection, namespace: &str) -> rusqlite::Result<Vec<(String, String, Option<String>)>> {
    if !has_table_named(conn, GAPS)? {
        return Ok(Vec::new());
    }
    let mut stmt = conn.prepare(&format!(
        "SELECT source_table, after, before FROM {GAPS} WHERE source_namespace = ?1 ORDER BY source_table, after"
    ))?;
    stmt.query_map([namespace], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect()
}

/// The history table of `table`: every version of its rows (`history.rs`).
pub fn history_table(table: &str) -> String {
    crate::schema::versions::history_name(table)
}

/// The data dictionary: one row per table (data and internal ones), one per column of every
/// mirrored table, kept in the same transaction as the table's bookkeeping, so it follows schema
/// changes.
pub const DICTIONARY_TABLES: &str = "dap_tables";
pub const DICTIONARY_COLUMNS: &str = "dap_columns";

/// The tables dap keeps for itself in a mirror file, as `dap_tables` describes them.
pub const INTERNAL_TABLES: &[(&str, &str)] = &[
    (BOOKKEEPING, "internal: the replication state of each table (the official client's table_sync)"),
    (CHECKPOINTS, "internal: objects of an unfinished initdb already loaded"),
    (COMMITS, "internal: the commits of each table, for dap replicate"),
    (CHANGES, "internal: the last commit that changed each key, for dap replicate"),
    (DICTIONARY_TABLES, "data dictionary: every table of this file and what it holds"),
    (DICTIONARY_COLUMNS, "data dictionary: every column of every mirrored table, with its DAP description"),
];

pub fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

pub fn staging(table: &str) -> String {
    format!("_dap_staging__{table}")
}

/// The declared SQLite type of a column.
pub fn sql_type(ty: &ColumnType) -> &'static str {
    match ty {
        ColumnType::Int(_) | ColumnType::IntEnum(_) | ColumnType::Bool => "INTEGER",
        ColumnType::Float(_) => "REAL",
        ColumnType::Decimal { precision, .. } if *precision <= EXACT_DOUBLE_DIGITS => "NUMERIC",
        _ => "TEXT",
    }
}

/// Decimal digits that every double holds exactly: decimals with more would be rounded by
/// SQLite's NUMERIC affinity, so such columns are TEXT.
pub const EXACT_DOUBLE_DIGITS: u8 = 15;

/// Binds a value without copying its text.
pub struct Bind<'a>(pub &'a Value);

impl ToSql for Bind<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self.0 {
            Value::Str(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
            other => ToSqlOutput::Owned(to_sql(other)),
        })
    }
}

/// A value as SQLite stores it in the mirror.
pub fn to_sql(v: &Value) -> Sql {
    match v {
        Value::Null => Sql::Null,
        Value::Bool(b) => Sql::Integer(*b as i64),
        Value::Int(i) => Sql::Integer(*i),
        Value::Float(f) if f.is_nan() => Sql::Text("NaN".into()),
        Value::Float(f) => Sql::Real(*f),
        Value::Timestamp(us) => Sql::Text(time::format_fixed(*us)),
        Value::Str(s) => Sql::Text(s.clone()),
        other => Sql::Text(other.to_text().unwrap_or_default()),
    }
}

/// How a mirror file is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadMode {
    /// Alongside a writer: WAL readers see one consistent state per transaction. SQLite needs
    /// to create the WAL index (`-shm`) beside the file for that.
    Shared,
    /// On a medium nothing can write (a read-only mount or folder), where no `-shm` can be
    /// created: no locks, no WAL index.
    Immutable,
}

/// The `file:` URI that opens `path` read-only.
pub fn read_only_uri(path: &Path, reading: ReadMode) -> String {
    match reading {
        ReadMode::Shared => file_uri(path, "mode=ro"),
        ReadMode::Immutable => file_uri(path, "mode=ro&immutable=1"),
    }
}

/// The one place a SQLite `file:` URI is made: the absolute path (so that no leading `//` can be
/// read as an authority, and a Windows drive lands after `file:///`), with every character a URI
/// path must not hold raw percent-encoded, then `?params`.
pub fn file_uri(path: &Path, params: &str) -> String {
    /// Characters escaped in a `file:` URI path.
    const URI_PATH: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
        .add(b' ')
        .add(b'%')
        .add(b'?')
        .add(b'#')
        .add(b'"')
        .add(b'\'')
        .add(b'<')
        .add(b'>')
        .add(b'\\')
        .add(b'`')
        .add(b'{')
        .add(b'}')
        .add(b'|')
        .add(b'^')
        .add(b'[')
        .add(b']');
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let text = absolute.to_string_lossy();
    #[cfg(windows)]
    let text = text.replace('\\', "/");
    let encoded = percent_encoding::utf8_percent_encode(text.trim_start_matches('/'), URI_PATH);
    format!("file:///{encoded}?{params}")
}

/// A read-only connection to a mirror file, whose schema has been read (so a file that is no
/// database fails here). A file whose folder cannot be written is read as immutable.
pub fn open_read_only(path: &Path) -> rusqlite::Result<Connection> {
    let open = |reading| -> rusqlite::Result<Connection> {
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(read_only_uri(path, reading), flags)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get::<_, i64>(0))?;
        Ok(conn)
    };
    match open(ReadMode::Shared) {
        Err(e) if needs_immutable(&e) && path.is_file() => {
            refuse_unread_log(path)?;
            open(ReadMode::Immutable)
        }
        other => other,
    }
}

/// Before a file is read as immutable: such a read ignores its `-wal`, so when one with content
/// is beside it (a writer stopped before folding it in, and its WAL index is gone: a copy or a
/// backup without the `-shm`), every answer would silently miss committed changes. Refused,
/// naming both files and the way out.
pub fn refuse_unread_log(path: &Path) -> rusqlite::Result<()> {
    let wal = sibling(path, "-wal");
    if !std::fs::metadata(&wal).is_ok_and(|m| m.is_file() && m.len() > 0) {
        return Ok(());
    }
    Err(rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
        Some(format!(
            "{} holds changes not yet written into {}, and this folder cannot be written, so they cannot be read \
             (the file alone would give answers without them). Run any dap command on the folder once as a user who \
             may write it (the changes are then folded into the file), or copy the folder, with that file, somewhere \
             writable",
            wal.display(),
            path.display()
        )),
    ))
}

/// Whether a shared read failed only because no WAL index can be made beside the file (a
/// read-only folder or medium): then the file is read as immutable.
pub fn needs_immutable(e: &rusqlite::Error) -> bool {
    match e {
        rusqlite::Error::SqliteFailure(f, _) => {
            f.code == rusqlite::ErrorCode::CannotOpen
                || f.extended_code == rusqlite::ffi::SQLITE_READONLY_DIRECTORY
                || f.extended_code == rusqlite::ffi::SQLITE_READONLY_CANTINIT
        }
        _ => false,
    }
}

/// Leaves mirror files as a reader found them. A read-only connection to a WAL database makes
/// its `-wal` and `-shm` files when they are missing (no writer is connected) and, unable to
/// write, cannot remove them when it closes. Created before the reading connections and dropped
/// after them, this notes which files had neither, and then closes one reading read-write
/// connection on each of those: as the last connection, SQLite removes the two files itself
/// (and leaves them while any other connection, a writer's included, still uses them).
pub struct LeaveNoTrace {
    files: Vec<PathBuf>,
}

/// `path` with `suffix` appended to its file name (`canvas.db-wal`).
pub fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

impl LeaveNoTrace {
    pub fn note<'a>(files: impl IntoIterator<Item = &'a Path>) -> LeaveNoTrace {
        let untouched = |f: &Path| !sibling(f, "-wal").exists() && !sibling(f, "-shm").exists();
        LeaveNoTrace { files: files.into_iter().filter(|f| untouched(f)).map(Path::to_path_buf).collect() }
    }
}

impl Drop for LeaveNoTrace {
    fn drop(&mut self) {
        for file in &self.files {
            if !sibling(file, "-wal").exists() && !sibling(file, "-shm").exists() {
                continue;
            }
            let flags =
                OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_URI | OpenFlags::SQLITE_OPEN_NO_MUTEX;
            if let Ok(conn) = Connection::open_with_flags(file_uri(file, "mode=rw"), flags) {
                let _ = conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get::<_, i64>(0));
            }
        }
    }
}

/// A value of a column of type `ty` as the mirror stores it, read back (the inverse of
/// [`to_sql`]).
pub fn from_sql(v: ValueRef<'_>, ty: &ColumnType) -> Result<Value, String> {
    Ok(match (v, ty) {
        (ValueRef::Null, _) => Value::Null,
        (ValueRef::Integer(i), ColumnType::Bool) => Value::Bool(i != 0),
        (ValueRef::Integer(i), ColumnType::Float(_)) => Value::Float(i as f64),
        (ValueRef::Real(f), ColumnType::Float(_)) => Value::Float(f),
        // A NUMERIC decimal of up to 15 digits comes back as the double nearest to it, which
        // prints back as exactly those digits.
        (ValueRef::Integer(i), ColumnType::Decimal { scale, .. }) => {
            crate::decode::tsv::parse(&i.to_string(), &ColumnType::Decimal { precision: 38, scale: *scale })?
        }
        (ValueRef::Real(f), ColumnType::Decimal { scale, .. }) => {
            let text = format!("{f:.*}", *scale as usize);
            crate::decode::tsv::parse(&text, &ColumnType::Decimal { precision: 38, scale: *scale })?
        }
        (ValueRef::Integer(i), _) => Value::Int(i),
        (ValueRef::Text(t), ty) => {
            let text = std::str::from_utf8(t).map_err(|e| e.to_string())?;
            match ty {
                ColumnType::Str { .. } | ColumnType::Enum(_) => Value::Str(text.to_string()),
                ty => crate::decode::tsv::parse(text, ty)?,
            }
        }
        (other, ty) => return Err(format!("{other:?} is no value of {}", ty.describe())),
    })
}

pub fn column_sql(c: &crate::schema::Column) -> String {
    format!("{} {}{}", quote(&c.name), sql_type(&c.ty), if c.required { " NOT NULL" } else { "" })
}

pub fn create_table_sql(name: &str, def: &TableDef) -> String {
    let columns: Vec<String> = def.columns().map(column_sql).collect();
    format!("CREATE TABLE {} ({}, PRIMARY KEY ({}))", quote(name), columns.join(", "), quote(&def.key.name))
}

/// The mirror's bookkeeping tables (created when missing).
pub fn bookkeeping_statements() -> Vec<String> {
    vec![
        format!(
            "CREATE TABLE IF NOT EXISTS {BOOKKEEPING} (
               id INTEGER PRIMARY KEY, source_namespace TEXT NOT NULL, source_table TEXT NOT NULL,
               timestamp TEXT NOT NULL, schema_version INTEGER NOT NULL, target_schema TEXT,
               target_table TEXT NOT NULL, schema_description_format TEXT NOT NULL, schema_description TEXT NOT NULL,
               UNIQUE (source_namespace, source_table))"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {CHECKPOINTS} (
               source_namespace TEXT NOT NULL, source_table TEXT NOT NULL, job_id TEXT NOT NULL, object TEXT NOT NULL,
               PRIMARY KEY (source_namespace, source_table, object))"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {COMMITS} (
               source_namespace TEXT NOT NULL, source_table TEXT NOT NULL, seq INTEGER NOT NULL, watermark TEXT NOT NULL,
               PRIMARY KEY (source_namespace, source_table, seq))"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {DICTIONARY_TABLES} (
               table_name TEXT PRIMARY KEY, kind TEXT NOT NULL, namespace TEXT, schema_version INTEGER,
               description TEXT)"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {DICTIONARY_COLUMNS} (
               table_name TEXT NOT NULL, position INTEGER NOT NULL, column_name TEXT NOT NULL, dap_type TEXT NOT NULL,
               sqlite_type TEXT NOT NULL, nullable INTEGER NOT NULL, is_key INTEGER NOT NULL, enum_values TEXT,
               description TEXT, PRIMARY KEY (table_name, position))"
        ),
        // The key keeps the table's key column's own type (no affinity), so it joins with it.
        format!(
            "CREATE TABLE IF NOT EXISTS {CHANGES} (
               source_namespace TEXT NOT NULL, source_table TEXT NOT NULL, key NOT NULL, seq INTEGER NOT NULL,
               PRIMARY KEY (source_namespace, source_table, key)) WITHOUT ROWID"
        ),
    ]
}

/// Whether an object of a mirror file is one dap would have made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserViews {
    /// Views are refused like any object dap does not make (a pack from someone else).
    Refuse,
    /// Views are accepted: they only read (`unpack --allow-views`, for a pack of your own).
    Accept,
}

/// What in a mirror file dap did not make and would not trust: triggers (they run on every
/// sync), virtual tables, views (unless accepted), tables that are neither dap's own nor a
/// replicated table with its bookkeeping row, and columns of a replicated table with
/// constraints, defaults or generated values (dap's columns have none). Indexes on dap's tables
/// are accepted: a user's indexes survive syncs by design, and an index runs no code of its own.
/// Each finding names the object.
pub fn foreign_objects(conn: &Connection, views: UserViews) -> rusqlite::Result<Vec<String>> {
    let replicated: Vec<String> = if has_table_named(conn, BOOKKEEPING)? {
        let mut stmt = conn.prepare(&format!("SELECT source_table FROM {BOOKKEEPING}"))?;
        stmt.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?
    } else {
        Vec::new()
    };
    let ours = |name: &str| {
        INTERNAL_TABLES.iter().any(|(t, _)| *t == name)
            || name == HISTORY_SETTINGS
            || name == GAPS
            || name == super::retention::ARCHIVED
            || name == super::runs::RUNS
            || replicated.iter().any(|t| {
                t == name
                    || staging(t) == name
                    || history_table(t) == name
                    || super::history::ended_table(t) == name
                    || super::history::since_table(t) == name
            })
            || ["sqlite_sequence", "sqlite_stat1", "sqlite_stat4"].contains(&name)
    };
    let mut stmt = conn.prepare("SELECT type, name, tbl_name, coalesce(sql, '') FROM sqlite_master")?;
    let objects: Vec<(String, String, String, String)> =
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?.collect::<Result<_, _>>()?;
    let mut found = Vec::new();
    for (kind, name, table, sql) in objects {
        let shown = crate::term::safe(&name).into_owned();
        let words = sql_words(&sql);
        match kind.as_str() {
            "trigger" => found.push(format!("trigger {shown} (it would run on every sync)")),
            "view" if views == UserViews::Accept => {}
            // A history's view, exactly as dap makes it from the file's own tables.
            "view"
                if replicated.iter().any(|t| {
                    history_table(t) == name
                        && super::history::view_sql_in(conn, "main", t).ok().flatten().is_some_and(|ours| ours == sql)
                }) => {}
            "view" => found.push(format!("view {shown}")),
            "table" if words.get(1).is_some_and(|w| w == "VIRTUAL") => found.push(format!("virtual table {shown}")),
            "table" if !ours(&name) => found.push(format!("table {shown}, which no bookkeeping row describes")),
            "table" => {
                let risky = ["CHECK", "REFERENCES", "DEFAULT", "GENERATED", "AS", "COLLATE", "ON"];
                if let Some(word) = words.iter().find(|w| risky.contains(&w.as_str())) {
                    found.push(format!("table {shown} declares {word}, which dap never does"));
                }
            }
            "index" if !ours(&table) => found.push(format!("index {shown} on {}", crate::term::safe(&table))),
            "index" => {}
            other => found.push(format!("{} {shown}", crate::term::safe(other))),
        }
    }
    Ok(found)
}

/// The keywords of a statement, upper-cased, without its quoted names and string literals (so a
/// column named "check" is no CHECK constraint).
pub fn sql_words(sql: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        let closing = match c {
            '"' => Some('"'),
            '\'' => Some('\''),
            '`' => Some('`'),
            '[' => Some(']'),
            _ => None,
        };
        if let Some(end) = closing {
            // Skip to the closing quote; a doubled quote is an escaped one.
            while let Some(q) = chars.next() {
                if q == end && !(end != ']' && chars.peek() == Some(&end)) {
                    break;
                }
                if q == end {
                    chars.next();
                }
            }
            continue;
        }
        if c.is_alphanumeric() || c == '_' {
            word.push(c.to_ascii_uppercase());
        } else if !word.is_empty() {
            words.push(std::mem::take(&mut word));
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

/// Whether the file attached as `schema` has a table `name`.
pub fn has_table_in(conn: &Connection, schema: &str, name: &str) -> rusqlite::Result<bool> {
    conn.query_row(
        &format!("SELECT count(*) > 0 FROM {}.sqlite_master WHERE type = 'table' AND name = ?1", quote(schema)),
        [name],
        |r| r.get(0),
    )
}

pub fn has_table_named(conn: &Connection, name: &str) -> rusqlite::Result<bool> {
    conn.query_row("SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = ?1", [name], |r| r.get(0))
}

/// The DDL initdb runs for a table in an empty mirror file.
pub fn table_statements(def: &TableDef) -> Vec<String> {
    vec![create_table_sql(&def.name, def)]
}

/// The first bytes of every SQLite database file.
pub const SQLITE_HEADER: &[u8; 16] = b"SQLite format 3\0";

/// What a person does about a damaged mirror file.
pub const REBUILD: &str =
    "move it aside and rebuild the mirror with `dap initdb --namespace NS --table all` (or unpack a `dap pack` of it)";

/// Refuses, before anything is written, a file that is there but is not a SQLite database (an
/// empty file is one: SQLite makes it a database on first write), or one cut short of the size
/// its header gives (an interrupted copy): SQLite would only notice at the first missing page.
pub fn refuse_foreign_file(path: &Path) -> Result<(), SinkError> {
    let Ok(mut file) = std::fs::File::open(path) else { return Ok(()) };
    let mut header = [0u8; 100];
    let read = std::io::Read::read(&mut file, &mut header).unwrap_or(0);
    let refuse =
        |what: String| SinkError::refused(&path.display().to_string(), Refusal::Damaged, format!("{what}; {REBUILD}"));
    if read == 0 {
        return Ok(());
    }
    if read < SQLITE_HEADER.len() || header[..16] != *SQLITE_HEADER {
        return Err(refuse(
            "not a database: the file lacks SQLite's header, so it is no mirror (nothing was changed)".into(),
        ));
    }
    let expected = header_size(&header);
    let actual = file.metadata().map(|m| m.len()).unwrap_or(u64::MAX);
    if expected.is_some_and(|expected| actual < expected) && !has_recovery_file(path) {
        return Err(refuse(format!(
            "the file is cut short: {actual} bytes of the {} its header gives (an interrupted copy?), so nothing was changed",
            expected.unwrap_or_default()
        )));
    }
    Ok(())
}

/// The file size a SQLite header states (page size × page count), when the header vouches for
/// it: SQLite trusts the page count only if the change counter matches "version valid for".
pub fn header_size(header: &[u8; 100]) -> Option<u64> {
    let be32 = |at: usize| u32::from_be_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]]);
    let page_size = match u16::from_be_bytes([header[16], header[17]]) {
        1 => 65_536,
        n => u64::from(n),
    };
    (be32(24) == be32(92) && be32(28) > 0).then(|| page_size * u64::from(be32(28)))
}

/// Whether a write-ahead log or rollback journal beside the file may still complete it (after a
/// crash mid-checkpoint the file can be shorter than its header until SQLite recovers it).
pub fn has_recovery_file(path: &Path) -> bool {
    ["-wal", "-journal"].iter().any(|suffix| std::fs::metadata(sibling(path, suffix)).is_ok_and(|m| m.len() > 0))
}

/// Refuses a table whose pages SQLite finds damaged: `PRAGMA quick_check` of the table and its
/// indexes (about 0.7 s per GB read), on a connection of its own so that other tables' writes go on.
pub fn check_table(path: &Path, table: &str) -> Result<(), SinkError> {
    let shown = path.display().to_string();
    let fail = |e| database_error(&shown, &format!("checking {table}"), e);
    let conn = open_read_only(path).map_err(fail)?;
    let problems: Vec<String> = conn
        .prepare(&format!("PRAGMA quick_check({})", quote(table)))
        .and_then(|mut stmt| stmt.query_map([], |r| r.get::<_, String>(0))?.collect())
        .map_err(fail)?;
    if problems == ["ok"] {
        return Ok(());
    }
    let first = problems.iter().flat_map(|p| p.lines()).find(|l| !l.starts_with("***")).unwrap_or_default();
    Err(SinkError::refused(
        &shown,
        Refusal::Damaged,
        format!("{table} is damaged in this file ({first}), so nothing was changed; {REBUILD}"),
    ))
}

/// A SQLite error as a [`SinkError`]: a busy or locked database may clear, anything else not.
pub fn database_error(target: &str, action: &str, e: rusqlite::Error) -> SinkError {
    use rusqlite::ErrorCode;
    let retry = match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => Retry::MayHelp,
        _ => Retry::Useless,
    };
    // What to do about the failures a person can mend, after SQLite's own words.
    let hint: std::borrow::Cow<str> = match e.sqlite_error_code() {
        Some(ErrorCode::DiskFull) => {
            "; the disk holding the mirror is full: free space there (or move the mirror), then run the command again; the table keeps its previous state".into()
        }
        Some(ErrorCode::ReadOnly | ErrorCode::PermissionDenied | ErrorCode::CannotOpen) => {
            "; the file or its folder cannot be written: check their owner and permissions (the folder must be writable too, for the journal)".into()
        }
        Some(ErrorCode::SystemIoFailure) => "; the disk reported an I/O error: check it, then run the command again".into(),
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => {
            format!("; the mirror file is damaged: {REBUILD}").into()
        }
        _ => "".into(),
    };
    SinkError::Database {
        target: target.to_string(),
        action: action.to_string(),
        detail: format!("{e}{hint}"),
        retry,
        source: Some(Box::new(e)),
    }
}

pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Whether the file at `path` starts as a SQLite database does (an empty or unreadable file
/// does not).
pub fn sqlite_header(path: &Path) -> std::io::Result<bool> {
    let mut header = [0u8; 16];
    let mut file = std::fs::File::open(path)?;
    let read = std::io::Read::read(&mut file, &mut header)?;
    Ok(read == 16 && header == *b"SQLite format 3\0")
}

/// [`sqlite_header`], with an unreadable file as not one.
pub fn looks_like_sqlite(path: &Path) -> bool {
    sqlite_header(path).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_uri_opens_every_path_people_have() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["plain", "with space", "100% #1 ?x", "quo\"te's", "ünïcødé", "back\\slash", "[brackets]"] {
            let folder = dir.path().join(name);
            std::fs::create_dir_all(&folder).unwrap();
            let file = folder.join(format!("{name}.db"));
            Connection::open(&file).unwrap().execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (7)").unwrap();
            // The path as `sqlite:////…` hands it on: a leading `//` must not become an authority.
            let doubled = PathBuf::from(format!("/{}", file.display()));
            for path in [&file, &doubled] {
                let conn = open_read_only(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert_eq!(conn.query_row("SELECT x FROM t", [], |r| r.get::<_, i64>(0)).unwrap(), 7);
                check_table(path, "t").unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            }
        }
        let relative = file_uri(Path::new("canvas.db"), "mode=ro");
        assert!(relative.starts_with("file:///") && relative.ends_with("/canvas.db?mode=ro"), "{relative}");
    }

    #[test]
    fn a_full_disk_says_what_to_do() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("PRAGMA max_page_count = 2; CREATE TABLE t (x TEXT)").unwrap();
        let full = (0..1000)
            .map(|_| conn.execute("INSERT INTO t VALUES (?1)", [&"x".repeat(1000)]))
            .find_map(Result::err)
            .expect("the database fills up");
        let text = database_error("/data/canvas.db", "writing users", full).to_string();
        assert!(text.starts_with("/data/canvas.db: writing users: database or disk is full"), "{text}");
        assert!(text.contains("free space") && text.contains("keeps its previous state"), "{text}");
    }
}
