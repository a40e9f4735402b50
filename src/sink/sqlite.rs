//! The SQLite mirror: one file per namespace, tables under their DAP names, and the bookkeeping
//! table `instructure_dap__table_sync` inside the same file, written in the same transaction as
//! the data it describes (so a copied file can be synced anywhere).
//!
//! Types: integers and booleans (0/1) are INTEGER; floats REAL, except NaN, which a SQLite REAL
//! cannot hold (it would be NULL) and which is kept as the text `NaN`; a REAL has no negative
//! zero, so -0.0 reads back as 0.0 (the one value the mirror does not keep bit for bit);
//! decimals NUMERIC when a double holds every value of the column exactly (up to 15 digits), else
//! TEXT (SQLite's NUMERIC would round them to 15 digits);
//! timestamps fixed-width UTC text `YYYY-MM-DDTHH:MM:SS.ffffffZ` (sorts in time order, and
//! SQLite's date functions read it); dates, times, UUIDs, IPs, enums and text as TEXT; nested
//! objects and arrays as JSON text.
//!
//! The change index (for outward replication, `source/mirror.rs`): each sync records, in its own
//! transaction, a commit (its sequence number and DAP watermark) and, per key it wrote or deleted,
//! the last commit that touched it. One row per key the table has had, however long its history.
//! A publish (initdb, a re-snapshot) starts a new epoch: the index restarts at commit 0, whose
//! watermark is the snapshot's.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::ToSql;
use rusqlite::types::{ToSqlOutput, Value as Sql, ValueRef};
use rusqlite::{Connection, OpenFlags, params};

use super::{Access, Bookkeeping, Feed, Piece, Retry, Sink, SinkError};
use crate::decode::Record;
use crate::schema::delta::{Change, SchemaDelta};
use crate::schema::{ColumnType, TableDef};
use crate::state::WriterLock;
use crate::time;
use crate::value::Value;

const BOOKKEEPING: &str = "instructure_dap__table_sync";
/// Objects of an initdb job already loaded into staging (the per-object checkpoint).
const CHECKPOINTS: &str = "_dap_checkpoint";
/// The commits of each table since its epoch began: sequence number and DAP watermark.
pub const COMMITS: &str = "dap_replica__commits";
/// Per key of each table, the last commit that wrote or deleted it.
pub const CHANGES: &str = "dap_replica__changes";

/// The data dictionary: one row per table (data and internal ones), one per column of every
/// mirrored table, kept in the same transaction as the table's bookkeeping, so it follows schema
/// changes.
pub const DICTIONARY_TABLES: &str = "dap_tables";
pub const DICTIONARY_COLUMNS: &str = "dap_columns";

/// The tables dap keeps for itself in a mirror file, as `dap_tables` describes them.
const INTERNAL_TABLES: &[(&str, &str)] = &[
    (BOOKKEEPING, "internal: the replication state of each table (the official client's table_sync)"),
    (CHECKPOINTS, "internal: objects of an unfinished initdb already loaded"),
    (COMMITS, "internal: the commits of each table, for dap replicate"),
    (CHANGES, "internal: the last commit that changed each key, for dap replicate"),
    (DICTIONARY_TABLES, "data dictionary: every table of this file and what it holds"),
    (DICTIONARY_COLUMNS, "data dictionary: every column of every mirrored table, with its DAP description"),
];

/// The mirror file of one namespace. Writes go through one connection (SQLite has one writer
/// per file), used on blocking threads; a write access also holds the file's writer lock.
pub struct SqliteSink {
    path: PathBuf,
    writer: Arc<Mutex<Writer>>,
    _lock: Option<WriterLock>,
    /// A reading access leaves no `-wal`/`-shm` behind (dropped after the connection).
    _tidy: Option<LeaveNoTrace>,
}

/// The connection and the statements built on it.
struct Writer {
    path: PathBuf,
    conn: Connection,
}

fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn staging(table: &str) -> String {
    format!("_dap_staging__{table}")
}

/// The declared SQLite type of a column.
fn sql_type(ty: &ColumnType) -> &'static str {
    match ty {
        ColumnType::Int(_) | ColumnType::IntEnum(_) | ColumnType::Bool => "INTEGER",
        ColumnType::Float(_) => "REAL",
        ColumnType::Decimal { precision, .. } if *precision <= EXACT_DOUBLE_DIGITS => "NUMERIC",
        _ => "TEXT",
    }
}

/// Decimal digits that every double holds exactly: decimals with more would be rounded by
/// SQLite's NUMERIC affinity, so such columns are TEXT.
const EXACT_DOUBLE_DIGITS: u8 = 15;

/// Binds a value without copying its text.
struct Bind<'a>(&'a Value);

impl ToSql for Bind<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self.0 {
            Value::Str(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
            other => ToSqlOutput::Owned(to_sql(other)),
        })
    }
}

/// A value as SQLite stores it in the mirror.
fn to_sql(v: &Value) -> Sql {
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
pub enum Reading {
    /// Alongside a writer: WAL readers see one consistent state per transaction. SQLite needs
    /// to create the WAL index (`-shm`) beside the file for that.
    Shared,
    /// On a medium nothing can write (a read-only mount or folder), where no `-shm` can be
    /// created: no locks, no WAL index.
    Immutable,
}

/// The `file:` URI that opens `path` read-only.
pub fn read_only_uri(path: &Path, reading: Reading) -> String {
    match reading {
        Reading::Shared => file_uri(path, "mode=ro"),
        Reading::Immutable => file_uri(path, "mode=ro&immutable=1"),
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
    match open(Reading::Shared) {
        Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::CannotOpen) && path.is_file() => {
            open(Reading::Immutable)
        }
        other => other,
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

fn column_sql(c: &crate::schema::Column) -> String {
    format!("{} {}{}", quote(&c.name), sql_type(&c.ty), if c.required { " NOT NULL" } else { "" })
}

fn create_table_sql(name: &str, def: &TableDef) -> String {
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
            || replicated.iter().any(|t| t == name || staging(t) == name)
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
fn sql_words(sql: &str) -> Vec<String> {
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

fn has_table_named(conn: &Connection, name: &str) -> rusqlite::Result<bool> {
    conn.query_row("SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = ?1", [name], |r| r.get(0))
}

/// The DDL initdb runs for a table in an empty mirror file.
pub fn table_statements(def: &TableDef) -> Vec<String> {
    vec![create_table_sql(&def.name, def)]
}

/// The first bytes of every SQLite database file.
const SQLITE_HEADER: &[u8; 16] = b"SQLite format 3\0";

/// What a person does about a damaged mirror file.
const REBUILD: &str =
    "move it aside and rebuild the mirror with `dap initdb --namespace NS --table all` (or unpack a `dap pack` of it)";

/// Refuses, before anything is written, a file that is there but is not a SQLite database (an
/// empty file is one: SQLite makes it a database on first write), or one cut short of the size
/// its header gives (an interrupted copy): SQLite would only notice at the first missing page.
fn refuse_foreign_file(path: &Path) -> Result<(), SinkError> {
    let Ok(mut file) = std::fs::File::open(path) else { return Ok(()) };
    let mut header = [0u8; 100];
    let read = std::io::Read::read(&mut file, &mut header).unwrap_or(0);
    let refuse = |what: String| SinkError::refused(&path.display().to_string(), format!("{what}; {REBUILD}"));
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
fn header_size(header: &[u8; 100]) -> Option<u64> {
    let be32 = |at: usize| u32::from_be_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]]);
    let page_size = match u16::from_be_bytes([header[16], header[17]]) {
        1 => 65_536,
        n => u64::from(n),
    };
    (be32(24) == be32(92) && be32(28) > 0).then(|| page_size * u64::from(be32(28)))
}

/// Whether a write-ahead log or rollback journal beside the file may still complete it (after a
/// crash mid-checkpoint the file can be shorter than its header until SQLite recovers it).
fn has_recovery_file(path: &Path) -> bool {
    ["-wal", "-journal"].iter().any(|suffix| std::fs::metadata(sibling(path, suffix)).is_ok_and(|m| m.len() > 0))
}

/// Refuses a table whose pages SQLite finds damaged: `PRAGMA quick_check` of the table and its
/// indexes (about 0.7 s per GB read), on a connection of its own so that other tables' writes go on.
fn check_table(path: &Path, table: &str) -> Result<(), SinkError> {
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
        format!("{table} is damaged in this file ({first}), so nothing was changed; {REBUILD}"),
    ))
}

impl SqliteSink {
    /// Opens the mirror file at `path`. A write access creates it (and its folder) when missing
    /// and takes its writer lock; a read access never creates anything.
    pub fn open(path: &Path, access: Access) -> Result<SqliteSink, SinkError> {
        let shown = path.display().to_string();
        let fail = |action: &str, e: rusqlite::Error| database_error(&shown, action, e);
        if path.is_dir() {
            return Err(SinkError::refused(
                &shown,
                "this is a folder, not a database file; name the file in it (e.g. sqlite:///PATH/canvas.db)",
            ));
        }
        refuse_foreign_file(path)?;
        let tidy = (access == Access::Read).then(|| LeaveNoTrace::note([path]));
        let (conn, lock) = match access {
            Access::Write => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|e| {
                        SinkError::refused(&dir.display().to_string(), format!("cannot create the folder: {e}"))
                    })?;
                }
                let lock = WriterLock::acquire(path).map_err(|e| SinkError::refused(&shown, e.to_string()))?;
                (Connection::open(path).map_err(|e| fail("opening", e))?, Some(lock))
            }
            Access::Read => {
                if !path.is_file() {
                    return Err(SinkError::refused(&shown, "there is no mirror here yet; start with `dap initdb`"));
                }
                (open_read_only(path).map_err(|e| fail("reading the database", e))?, None)
            }
        };
        conn.execute_batch("PRAGMA busy_timeout = 5000;").map_err(|e| fail("opening", e))?;
        // Reading the schema fails at once on a file that is not a SQLite database.
        conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get::<_, i64>(0))
            .map_err(|e| fail("reading the database", e))?;
        if access == Access::Write {
            conn.execute_batch(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA legacy_alter_table = ON;",
            )
            .and_then(|()| conn.execute_batch(&bookkeeping_statements().join(";\n")))
            .map_err(|e| fail("preparing the bookkeeping tables", e))?;
        }
        Ok(SqliteSink {
            path: path.to_path_buf(),
            writer: Arc::new(Mutex::new(Writer { path: path.to_path_buf(), conn })),
            _lock: lock,
            _tidy: tidy,
        })
    }

    /// Runs `work` with the connection on a blocking thread; an error rolls back what it left
    /// open, so the previous consistent state stays.
    async fn with<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Writer) -> Result<T, SinkError> + Send + 'static,
    ) -> Result<T, SinkError> {
        let writer = self.writer.clone();
        tokio::task::spawn_blocking(move || {
            let mut w = writer.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let result = work(&mut w);
            if result.is_err() && !w.conn.is_autocommit() {
                let _ = w.conn.execute_batch("ROLLBACK");
            }
            result
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    }
}

/// A SQLite error as a [`SinkError`]: a busy or locked database may clear, anything else not.
fn database_error(target: &str, action: &str, e: rusqlite::Error) -> SinkError {
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

impl Writer {
    fn fail(&self, what: &str, e: rusqlite::Error) -> SinkError {
        database_error(&self.path.display().to_string(), what, e)
    }

    fn refuse(&self, detail: String) -> SinkError {
        SinkError::refused(&self.path.display().to_string(), detail)
    }

    fn has_table(&self, name: &str) -> Result<bool, SinkError> {
        self.conn
            .query_row("SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = ?1", [name], |r| {
                r.get(0)
            })
            .map_err(|e| self.fail("reading the schema", e))
    }

    fn create_table(&self, name: &str, def: &TableDef) -> Result<(), SinkError> {
        self.conn.execute_batch(&create_table_sql(name, def)).map_err(|e| self.fail(&format!("creating {name}"), e))
    }

    /// `INSERT … ON CONFLICT DO UPDATE` of every column: whole-row upserts. A row that arrives
    /// unchanged (DAP delivers the boundary of two syncs twice) is not written again, so it
    /// counts as no change.
    fn upsert_sql(table: &str, def: &TableDef) -> String {
        let names: Vec<String> = def.columns().map(|c| quote(&c.name)).collect();
        let marks = vec!["?"; names.len()].join(", ");
        let updates: Vec<String> = def.values.iter().map(|c| format!("{0} = excluded.{0}", quote(&c.name))).collect();
        let differs: Vec<String> =
            def.values.iter().map(|c| format!("{0} IS NOT excluded.{0}", quote(&c.name))).collect();
        let action = if updates.is_empty() {
            "NOTHING".to_string()
        } else {
            format!("UPDATE SET {} WHERE {}", updates.join(", "), differs.join(" OR "))
        };
        format!(
            "INSERT INTO {} ({}) VALUES ({marks}) ON CONFLICT ({}) DO {action}",
            quote(table),
            names.join(", "),
            quote(&def.key.name)
        )
    }

    /// Writes records; returns how many changed a row (an unchanged row or an absent key's
    /// delete changes none), and appends the keys they changed to `changed`.
    fn write_rows(
        &self,
        table: &str,
        def: &TableDef,
        rows: &[Record],
        changed: &mut Vec<Value>,
    ) -> Result<(), SinkError> {
        let mut upsert = self
            .conn
            .prepare_cached(&Self::upsert_sql(table, def))
            .map_err(|e| self.fail("preparing the upsert", e))?;
        let mut delete = self
            .conn
            .prepare_cached(&format!("DELETE FROM {} WHERE {} = ?", quote(table), quote(&def.key.name)))
            .map_err(|e| self.fail("preparing the delete", e))?;
        for r in rows {
            let n = if r.action == Some('D') {
                delete.execute([to_sql(&r.key)]).map_err(|e| self.fail(&format!("deleting from {table}"), e))?
            } else {
                let params = std::iter::once(Bind(&r.key)).chain(r.values.iter().map(Bind));
                upsert.execute(rusqlite::params_from_iter(params)).map_err(|e| {
                    self.fail(&format!("writing {table} key {}", r.key.to_text().unwrap_or_default()), e)
                })?
            };
            if n > 0 {
                changed.push(r.key.clone());
            }
        }
        Ok(())
    }

    /// Starts a table's change index over (a publish): commit 0 at the snapshot's watermark.
    fn start_epoch(&self, b: &Bookkeeping) -> Result<(), SinkError> {
        let fail = |e| self.fail("starting the change index", e);
        for t in [COMMITS, CHANGES] {
            self.conn
                .execute(
                    &format!("DELETE FROM {t} WHERE source_namespace = ?1 AND source_table = ?2"),
                    params![b.namespace, b.table],
                )
                .map_err(fail)?;
        }
        self.conn
            .execute(
                &format!(
                    "INSERT INTO {COMMITS} (source_namespace, source_table, seq, watermark) VALUES (?1, ?2, 0, ?3)"
                ),
                params![b.namespace, b.table, time::format_fixed(b.watermark)],
            )
            .map_err(fail)?;
        Ok(())
    }

    /// Records a sync in the change index: a new commit at its watermark, and the keys it wrote
    /// or deleted.
    fn record_commit(&self, b: &Bookkeeping, keys: &[Value]) -> Result<(), SinkError> {
        let fail = |e| self.fail("recording the change index", e);
        let seq: i64 = self
            .conn
            .query_row(
                &format!(
                    "SELECT COALESCE(MAX(seq), 0) + 1 FROM {COMMITS} WHERE source_namespace = ?1 AND source_table = ?2"
                ),
                params![b.namespace, b.table],
                |r| r.get(0),
            )
            .map_err(fail)?;
        self.conn
            .execute(
                &format!(
                    "INSERT INTO {COMMITS} (source_namespace, source_table, seq, watermark) VALUES (?1, ?2, ?3, ?4)"
                ),
                params![b.namespace, b.table, seq, time::format_fixed(b.watermark)],
            )
            .map_err(fail)?;
        let mut upsert = self
            .conn
            .prepare_cached(&format!(
                "INSERT INTO {CHANGES} (source_namespace, source_table, key, seq) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (source_namespace, source_table, key) DO UPDATE SET seq = excluded.seq"
            ))
            .map_err(fail)?;
        for k in keys {
            upsert.execute(params![b.namespace, b.table, Bind(k), seq]).map_err(fail)?;
        }
        Ok(())
    }

    /// The `CREATE INDEX` statements users made on a table (kept across swaps and rebuilds).
    fn user_indexes(&self, table: &str) -> Result<Vec<String>, SinkError> {
        let mut stmt = self
            .conn
            .prepare("SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = ?1 AND sql IS NOT NULL")
            .map_err(|e| self.fail("reading indexes", e))?;
        let rows = stmt.query_map([table], |r| r.get::<_, String>(0)).map_err(|e| self.fail("reading indexes", e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.fail("reading indexes", e))
    }

    /// Replaces `table` with `replacement` (already filled), keeping its user indexes. Views
    /// refer to tables by name, so they keep working (renames do not rewrite them: legacy mode).
    fn swap_in(&self, table: &str, replacement: &str) -> Result<(), SinkError> {
        let indexes = self.user_indexes(table)?;
        self.conn
            .execute_batch(&format!(
                "DROP TABLE IF EXISTS {0}; ALTER TABLE {1} RENAME TO {0};",
                quote(table),
                quote(replacement)
            ))
            .map_err(|e| self.fail(&format!("swapping in {table}"), e))?;
        for sql in indexes {
            self.conn.execute_batch(&sql).map_err(|e| self.fail(&format!("recreating an index on {table}"), e))?;
        }
        Ok(())
    }

    /// Declared types of the table's columns.
    fn column_types(&self, table: &str) -> Result<Vec<(String, String)>, SinkError> {
        let mut stmt = self
            .conn
            .prepare(&format!("SELECT name, type FROM pragma_table_info({})", quote_literal(table)))
            .map_err(|e| self.fail("reading columns", e))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(|e| self.fail("reading columns", e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.fail("reading columns", e))
    }

    /// Rebuilds a table for `def` (new declared types or constraints): a new table with the
    /// schema's columns (plus any column the schema no longer names, or a user added), filled
    /// from the old one, swapped in with the user's indexes.
    fn rebuild(&self, def: &TableDef) -> Result<(), SinkError> {
        let existing = self.column_types(&def.name)?;
        let temp = format!("_dap_rebuild__{}", def.name);
        let mut columns: Vec<String> = def.columns().map(column_sql).collect();
        columns.extend(
            existing
                .iter()
                .filter(|(n, _)| !def.columns().any(|c| &c.name == n))
                .map(|(n, t)| format!("{} {t}", quote(n))),
        );
        let copied: Vec<String> = existing.iter().map(|(n, _)| quote(n)).collect();
        self.conn
            .execute_batch(&format!(
                "DROP TABLE IF EXISTS {0}; CREATE TABLE {0} ({1}, PRIMARY KEY ({2})); INSERT INTO {0} ({3}) SELECT {3} FROM {4};",
                quote(&temp),
                columns.join(", "),
                quote(&def.key.name),
                copied.join(", "),
                quote(&def.name)
            ))
            .map_err(|e| self.fail(&format!("rebuilding {} for its new schema", def.name), e))?;
        self.swap_in(&def.name, &temp)
    }

    /// Applies a schema delta inside the open transaction: new columns in place; anything that
    /// changes a declared type or a NOT NULL constraint rebuilds the table (SQLite cannot alter
    /// them).
    fn apply_delta(&self, def: &TableDef, delta: &SchemaDelta) -> Result<(), SinkError> {
        let mut rebuild = false;
        for change in &delta.changes {
            match change {
                Change::Add(c) => {
                    self.conn
                        .execute_batch(&format!(
                            "ALTER TABLE {} ADD COLUMN {} {}",
                            quote(&def.name),
                            quote(&c.name),
                            sql_type(&c.ty)
                        ))
                        .map_err(|e| self.fail(&format!("adding column {} to {}", c.name, def.name), e))?;
                }
                Change::Widen { column, from } => rebuild |= sql_type(from) != sql_type(&column.ty),
                Change::DropNotNull(_) => rebuild = true,
                Change::Retype { .. } => rebuild = true,
                Change::SetNotNull(name) => {
                    let nulls: i64 = self
                        .conn
                        .query_row(
                            &format!("SELECT count(*) FROM {} WHERE {} IS NULL", quote(&def.name), quote(name)),
                            [],
                            |r| r.get(0),
                        )
                        .map_err(|e| self.fail(&format!("checking {name} for NULLs"), e))?;
                    if nulls > 0 {
                        return Err(SinkError::required_over_nulls(
                            &self.path.display().to_string(),
                            def,
                            name,
                            Some(nulls as u64),
                        ));
                    }
                    rebuild = true;
                }
            }
        }
        // A mirror made before the delta was computed may still differ in declared types.
        let existing = self.column_types(&def.name)?;
        rebuild |= def
            .columns()
            .any(|c| existing.iter().any(|(n, t)| n == &c.name && !t.eq_ignore_ascii_case(sql_type(&c.ty))));
        if rebuild { self.rebuild(def) } else { Ok(()) }
    }

    fn write_bookkeeping(&self, b: &Bookkeeping) -> Result<(), SinkError> {
        self.conn
            .execute(
                &format!(
                    "INSERT INTO {BOOKKEEPING} (source_namespace, source_table, timestamp, schema_version, target_schema, target_table, schema_description_format, schema_description)
                     VALUES (?1, ?2, ?3, ?4, ?1, ?2, 'json', ?5)
                     ON CONFLICT (source_namespace, source_table) DO UPDATE SET timestamp = excluded.timestamp,
                       schema_version = excluded.schema_version, schema_description = excluded.schema_description"
                ),
                params![b.namespace, b.table, time::format_fixed(b.watermark), b.schema_version, b.schema_description],
            )
            .map(|_| ())
            .map_err(|e| self.fail("writing the bookkeeping row", e))
    }

    /// Describes `def` in the data dictionary (replacing what was there), and the internal tables.
    fn write_dictionary(&self, def: &TableDef) -> Result<(), SinkError> {
        let fail = |e| self.fail("writing the data dictionary", e);
        for (name, description) in INTERNAL_TABLES {
            let kind = if description.starts_with("internal") { "internal" } else { "dictionary" };
            self.conn
                .execute(
                    &format!("INSERT OR REPLACE INTO {DICTIONARY_TABLES} VALUES (?1, ?2, NULL, NULL, ?3)"),
                    params![name, kind, description],
                )
                .map_err(fail)?;
        }
        self.conn
            .execute(
                &format!("INSERT OR REPLACE INTO {DICTIONARY_TABLES} VALUES (?1, 'data', ?2, ?3, ?4)"),
                params![def.name, def.namespace, def.version, def.comment],
            )
            .map_err(fail)?;
        self.conn
            .execute(&format!("DELETE FROM {DICTIONARY_COLUMNS} WHERE table_name = ?1"), params![def.name])
            .map_err(fail)?;
        let mut insert = self
            .conn
            .prepare(&format!("INSERT INTO {DICTIONARY_COLUMNS} VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"))
            .map_err(fail)?;
        for (position, column) in std::iter::once(&def.key).chain(&def.values).enumerate() {
            let enum_values = match &column.ty {
                ColumnType::Enum(v) => Some(serde_json::to_string(v).expect("strings serialise")),
                ColumnType::IntEnum(v) => Some(serde_json::to_string(v).expect("integers serialise")),
                _ => None,
            };
            let is_key = position == 0;
            insert
                .execute(params![
                    def.name,
                    position as i64 + 1,
                    column.name,
                    column.ty.describe(),
                    sql_type(&column.ty),
                    !(is_key || column.required),
                    is_key,
                    enum_values,
                    column.comment,
                ])
                .map_err(fail)?;
        }
        Ok(())
    }

    fn forget_in_dictionary(&self, table: &str) -> Result<(), SinkError> {
        for dictionary in [DICTIONARY_TABLES, DICTIONARY_COLUMNS] {
            self.conn
                .execute(&format!("DELETE FROM {dictionary} WHERE table_name = ?1"), params![table])
                .map_err(|e| self.fail("updating the data dictionary", e))?;
        }
        Ok(())
    }

    fn bookkeeping_rows(&self, filter: &str, args: &[&str]) -> Result<Vec<Bookkeeping>, SinkError> {
        if !self.has_table(BOOKKEEPING)? {
            return Ok(Vec::new()); // a read-only look at a file no write has prepared
        }
        let mut stmt = self
            .conn
            .prepare(&format!("SELECT source_namespace, source_table, timestamp, schema_version, schema_description FROM {BOOKKEEPING} WHERE {filter} ORDER BY source_table"))
            .map_err(|e| self.fail("reading the bookkeeping table", e))?;
        let rows = stmt
            .query_map(rusqlite::params_from_iter(args), |row| {
                Ok(Bookkeeping {
                    namespace: row.get(0)?,
                    table: row.get(1)?,
                    watermark: time::parse_rfc3339(&row.get::<_, String>(2)?).unwrap_or(0),
                    schema_version: row.get(3)?,
                    schema_description: row.get(4)?,
                })
            })
            .map_err(|e| self.fail("reading the bookkeeping table", e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.fail("reading the bookkeeping table", e))
    }
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[async_trait::async_trait]
impl Sink for SqliteSink {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn local_file(&self) -> Option<&Path> {
        Some(&self.path)
    }

    async fn bookkeeping(&self, namespace: &str, table: &str) -> Result<Option<Bookkeeping>, SinkError> {
        let (ns, t) = (namespace.to_string(), table.to_string());
        self.with(move |w| Ok(w.bookkeeping_rows("source_namespace = ?1 AND source_table = ?2", &[&ns, &t])?.pop()))
            .await
    }

    async fn all_bookkeeping(&self, namespace: &str) -> Result<Vec<Bookkeeping>, SinkError> {
        let ns = namespace.to_string();
        self.with(move |w| w.bookkeeping_rows("source_namespace = ?1", &[&ns])).await
    }

    async fn row_count(&self, _namespace: &str, table: &str) -> Result<u64, SinkError> {
        let t = table.to_string();
        self.with(move |w| {
            w.conn
                .query_row(&format!("SELECT count(*) FROM {}", quote(&t)), [], |r| r.get(0))
                .map_err(|e| w.fail(&format!("counting {t}"), e))
        })
        .await
    }

    async fn check_intact(&self, _namespace: &str, table: &str) -> Result<(), SinkError> {
        let (path, table) = (self.path.clone(), table.to_string());
        tokio::task::spawn_blocking(move || check_table(&path, &table))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    }

    async fn check_unowned(&self, namespace: &str, table: &str) -> Result<(), SinkError> {
        let (ns, t) = (namespace.to_string(), table.to_string());
        self.with(move |w| {
            let owners = w.bookkeeping_rows("source_table = ?1", &[&t])?;
            if let Some(other) = owners.iter().find(|b| b.namespace != ns) {
                return Err(w.refuse(format!(
                    "{ns}.{t}: this database already holds a table {t} of namespace {}; use another file for {ns} (--connection-string)",
                    other.namespace
                )));
            }
            if owners.is_empty() && w.has_table(&t)? {
                return Err(w.refuse(format!(
                    "{ns}.{t}: a table {t} exists without a bookkeeping row (not made by dap, or left half-loaded); \
                     drop it (`DROP TABLE {}`) or use another file, then run initdb again",
                    quote(&t)
                )));
            }
            Ok(())
        })
        .await
    }

    async fn stage(&self, def: &TableDef, job: &str) -> Result<Vec<String>, SinkError> {
        let (def, job) = (def.clone(), job.to_string());
        self.with(move |w| {
            let name = staging(&def.name);
            let mut stmt = w
                .conn
                .prepare(&format!(
                    "SELECT job_id, object FROM {CHECKPOINTS} WHERE source_namespace = ?1 AND source_table = ?2"
                ))
                .map_err(|e| w.fail("reading checkpoints", e))?;
            let done: Vec<(String, String)> = stmt
                .query_map(params![def.namespace, def.name], |r| Ok((r.get(0)?, r.get(1)?)))
                .and_then(|rows| rows.collect())
                .map_err(|e| w.fail("reading checkpoints", e))?;
            drop(stmt);
            if w.has_table(&name)? && !done.is_empty() && done.iter().all(|(j, _)| *j == job) {
                return Ok(done.into_iter().map(|(_, o)| o).collect());
            }
            let tx = w.conn.unchecked_transaction().map_err(|e| w.fail("starting a transaction", e))?;
            w.conn
                .execute(
                    &format!("DELETE FROM {CHECKPOINTS} WHERE source_namespace = ?1 AND source_table = ?2"),
                    params![def.namespace, def.name],
                )
                .map_err(|e| w.fail("clearing checkpoints", e))?;
            w.conn
                .execute_batch(&format!("DROP TABLE IF EXISTS {}", quote(&name)))
                .map_err(|e| w.fail("dropping an old staging table", e))?;
            w.create_table(&name, &def)?;
            tx.commit().map_err(|e| w.fail("creating the staging table", e))?;
            Ok(Vec::new())
        })
        .await
    }

    async fn load(&self, def: &TableDef, job: &str, mut feed: Feed) -> Result<u64, SinkError> {
        // The writer is taken once the feed has data: a table still waiting for its download
        // slot must not hold the file's one writer (the tables holding the slots wait for it).
        let first = feed.next().await?;
        let (def, job) = (def.clone(), job.to_string());
        self.with(move |w| {
            let name = staging(&def.name);
            let mut rows = 0;
            let mut piece = first;
            loop {
                match piece {
                    Piece::Begin(_) => {
                        w.conn.execute_batch("BEGIN IMMEDIATE").map_err(|e| w.fail("starting a transaction", e))?
                    }
                    Piece::Rows(batch) => {
                        w.write_rows(&name, &def, &batch, &mut Vec::new())?;
                        rows += batch.len() as u64;
                    }
                    Piece::End(object) => {
                        w.conn
                            .execute(
                                &format!("INSERT OR REPLACE INTO {CHECKPOINTS} (source_namespace, source_table, job_id, object) VALUES (?1, ?2, ?3, ?4)"),
                                params![def.namespace, def.name, job, object],
                            )
                            .map_err(|e| w.fail("recording a checkpoint", e))?;
                        w.conn.execute_batch("COMMIT").map_err(|e| w.fail(&format!("committing object {object}"), e))?;
                    }
                    Piece::Done => return Ok(rows),
                }
                piece = feed.blocking_next()?;
            }
        })
        .await
    }

    /// The staging table replaces the table whole (SQLite views refer to tables by name, so they
    /// keep working), so the delta needs no DDL here.
    async fn publish(&self, def: &TableDef, _delta: &SchemaDelta, bookkeeping: &Bookkeeping) -> Result<(), SinkError> {
        let (def, bookkeeping) = (def.clone(), bookkeeping.clone());
        self.with(move |w| {
            let tx = w.conn.unchecked_transaction().map_err(|e| w.fail("starting a transaction", e))?;
            w.swap_in(&def.name, &staging(&def.name))?;
            w.conn
                .execute(
                    &format!("DELETE FROM {CHECKPOINTS} WHERE source_namespace = ?1 AND source_table = ?2"),
                    params![def.namespace, def.name],
                )
                .map_err(|e| w.fail("clearing checkpoints", e))?;
            w.write_bookkeeping(&bookkeeping)?;
            w.write_dictionary(&def)?;
            w.start_epoch(&bookkeeping)?;
            tx.commit().map_err(|e| w.fail(&format!("committing {}", def.name), e))
        })
        .await
    }

    async fn apply_changes(
        &self,
        def: &TableDef,
        delta: &SchemaDelta,
        mut feed: Feed,
        bookkeeping: &Bookkeeping,
    ) -> Result<u64, SinkError> {
        let first = feed.next().await?; // see `load`: the writer waits for data
        let (def, delta, bookkeeping) = (def.clone(), delta.clone(), bookkeeping.clone());
        self.with(move |w| {
            w.conn.execute_batch("BEGIN IMMEDIATE").map_err(|e| w.fail("starting a transaction", e))?;
            w.apply_delta(&def, &delta)?;
            let mut rows = 0;
            let mut keys = Vec::new();
            let mut piece = first;
            loop {
                match piece {
                    Piece::Rows(batch) => {
                        w.write_rows(&def.name, &def, &batch, &mut keys)?;
                        rows += batch.len() as u64;
                    }
                    Piece::Begin(_) | Piece::End(_) => {}
                    Piece::Done => break,
                }
                piece = feed.blocking_next()?;
            }
            w.write_bookkeeping(&bookkeeping)?;
            w.write_dictionary(&def)?;
            let started = std::time::Instant::now();
            w.record_commit(&bookkeeping, &keys)?;
            tracing::debug!(
                "{}: change index: {} keys recorded in {} ms",
                def.name,
                keys.len(),
                started.elapsed().as_millis()
            );
            w.conn.execute_batch("COMMIT").map_err(|e| w.fail("committing the changes", e))?;
            Ok(rows)
        })
        .await
    }

    async fn drop_table(&self, namespace: &str, table: &str) -> Result<bool, SinkError> {
        let (ns, t) = (namespace.to_string(), table.to_string());
        self.with(move |w| {
            let tx = w.conn.unchecked_transaction().map_err(|e| w.fail("starting a transaction", e))?;
            let removed = w
                .conn
                .execute(
                    &format!("DELETE FROM {BOOKKEEPING} WHERE source_namespace = ?1 AND source_table = ?2"),
                    params![ns, t],
                )
                .map_err(|e| w.fail("removing the bookkeeping row", e))?;
            if removed > 0 {
                w.conn
                    .execute_batch(&format!("DROP TABLE IF EXISTS {}", quote(&t)))
                    .map_err(|e| w.fail(&format!("dropping {t}"), e))?;
                w.forget_in_dictionary(&t)?;
                for index in [COMMITS, CHANGES] {
                    w.conn
                        .execute(
                            &format!("DELETE FROM {index} WHERE source_namespace = ?1 AND source_table = ?2"),
                            params![ns, t],
                        )
                        .map_err(|e| w.fail("clearing the change index", e))?;
                }
            }
            tx.commit().map_err(|e| w.fail("committing the drop", e))?;
            Ok(removed > 0)
        })
        .await
    }

    /// VACUUM: the file is rewritten without the free pages.
    async fn reclaim_space(&self) -> Result<(), SinkError> {
        self.with(|w| w.conn.execute_batch("VACUUM").map_err(|e| w.fail("compacting the file (VACUUM)", e))).await
    }
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
