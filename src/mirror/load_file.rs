//! The load file: where the mirror stages a snapshot whose key is text (web_logs' UUIDs), in a
//! file of its own beside the mirror (`canvas_logs.db-load`), until it is published.
//!
//! Why: a text key is a `PRIMARY KEY` index beside the table, and a snapshot's keys arrive at
//! random, so once that index outgrows SQLite's page cache every row rewrites a random page of
//! it (a 10^7-row web_logs initdb slowed to 0.60 of its first tenth's pace). Staged here as a
//! heap (the table's columns without its key), a part only appends; the publish copies the heap
//! into the mirror in key order, so the key index is appended to as well (measured at 10^7
//! rows: the load flat, 0.83, and the initdb 208 s instead of 255 s, the copy 123 s of it). In
//! a file of its own because a heap staged inside the mirror would leave its pages free in the
//! mirror once it is dropped (measured: 6.75 GB instead of 5.00 GB at 10^7 rows); this file is
//! deleted instead.
//!
//! Integer keys are staged keyed inside the mirror as before ([`Staging::of`]): an integer key is
//! the table's rowid, and snapshots arrive nearly in key order, so their load already appends
//! (sorting them first cost 7 s of a 10 s load of 10^6 submissions).
//!
//! Crash safety: a part's rows are committed here before its checkpoint is committed in the
//! mirror (the load protocol's transaction ends here first), so a crash between the two leaves
//! rows without a checkpoint: the part is loaded again, and the publish keeps the later copy of
//! a repeated key. Commits here are synced (`synchronous = FULL`) so that a power cut cannot keep
//! the mirror's checkpoint and lose the rows it counts.

use std::path::{Path, PathBuf};

use rusqlite::Connection;

use super::format::{column_sql, database_error, quote, sibling, sql_type, staging};
use crate::schema::TableDef;
use crate::sink::SinkError;

/// The name under which the mirror's connection attaches the load file while publishing.
const ATTACHED: &str = "dap_load";

/// How a snapshot of a table is staged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Staging {
    /// In a keyed table inside the mirror, which the publish renames into place.
    Keyed,
    /// In a heap in the load file, copied into the mirror in key order at the publish.
    Heap,
}

impl Staging {
    pub fn of(def: &TableDef) -> Staging {
        if sql_type(&def.key.ty) == "INTEGER" { Staging::Keyed } else { Staging::Heap }
    }
}

/// The load file of the mirror file `mirror`.
pub fn path_of(mirror: &Path) -> PathBuf {
    sibling(mirror, "-load")
}

/// The load file of one mirror file, opened when first needed.
pub struct LoadFile {
    path: PathBuf,
    conn: Option<Connection>,
}

impl LoadFile {
    pub fn of(mirror: &Path) -> LoadFile {
        LoadFile { path: path_of(mirror), conn: None }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's connection, creating the file when it is missing.
    pub fn conn(&mut self) -> rusqlite::Result<&Connection> {
        if self.conn.is_none() {
            let conn = Connection::open(&self.path)?;
            conn.execute_batch("PRAGMA busy_timeout = 5000; PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;")?;
            self.conn = Some(conn);
        }
        Ok(self.conn.as_ref().expect("opened above"))
    }

    /// The file's connection when the file exists (never creates it).
    pub fn existing(&mut self) -> rusqlite::Result<Option<&Connection>> {
        if self.conn.is_none() && !self.path.exists() {
            return Ok(None);
        }
        self.conn().map(Some)
    }

    /// Whether the heap of `table` is here.
    pub fn has_heap(&mut self, table: &str) -> rusqlite::Result<bool> {
        let Some(conn) = self.existing()? else { return Ok(false) };
        conn.query_row(
            "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = ?1",
            [staging(table)],
            |r| r.get(0),
        )
    }

    /// A new, empty heap for `def` (replacing any left by an earlier load).
    pub fn create_heap(&mut self, def: &TableDef) -> rusqlite::Result<()> {
        let columns: Vec<String> = def.columns().map(column_sql).collect();
        let name = quote(&staging(&def.name));
        self.conn()?
            .execute_batch(&format!("DROP TABLE IF EXISTS {name}; CREATE TABLE {name} ({});", columns.join(", ")))
    }

    /// Drops the heap of `table`, if any; the file goes when it holds no heap any more.
    pub fn drop_heap(&mut self, table: &str) -> rusqlite::Result<()> {
        if let Some(conn) = self.existing()? {
            conn.execute_batch(&format!("DROP TABLE IF EXISTS {}", quote(&staging(table))))?;
        }
        self.remove_if_empty()
    }

    /// The tables whose heaps are here.
    pub fn heaps(&mut self) -> rusqlite::Result<Vec<String>> {
        let Some(conn) = self.existing()? else { return Ok(Vec::new()) };
        let prefix = staging("");
        let mut stmt = conn.prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")?;
        let names = stmt.query_map([], |r| r.get::<_, String>(0))?.collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(names.into_iter().filter_map(|n| n.strip_prefix(&prefix).map(str::to_string)).collect())
    }

    /// The rows staged for `table` (every record loaded, repeated keys included).
    pub fn staged_rows(&mut self, table: &str) -> rusqlite::Result<u64> {
        if !self.has_heap(table)? {
            return Ok(0);
        }
        self.conn()?.query_row(&format!("SELECT count(*) FROM {}", quote(&staging(table))), [], |r| r.get(0))
    }

    /// Starts a transaction here when the file is open (a part's rows are written in it).
    pub fn begin(&mut self) -> rusqlite::Result<()> {
        match &self.conn {
            Some(conn) if conn.is_autocommit() => conn.execute_batch("BEGIN IMMEDIATE"),
            _ => Ok(()),
        }
    }

    /// Commits what [`LoadFile::begin`] started; before the mirror's own commit.
    pub fn commit(&mut self) -> rusqlite::Result<()> {
        match &self.conn {
            Some(conn) if !conn.is_autocommit() => conn.execute_batch("COMMIT"),
            _ => Ok(()),
        }
    }

    pub fn rollback(&mut self) -> rusqlite::Result<()> {
        match &self.conn {
            Some(conn) if !conn.is_autocommit() => conn.execute_batch("ROLLBACK"),
            _ => Ok(()),
        }
    }

    /// Closes the file and deletes it (with its `-wal` and `-shm`) when it holds no heap.
    pub fn remove_if_empty(&mut self) -> rusqlite::Result<()> {
        if !self.heaps()?.is_empty() {
            return Ok(());
        }
        if let Some(conn) = self.conn.take() {
            conn.close().map_err(|(_, e)| e)?;
        }
        for file in [self.path.clone(), sibling(&self.path, "-wal"), sibling(&self.path, "-shm")] {
            match std::fs::remove_file(&file) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    tracing::warn!("could not delete {}: {e}", file.display());
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Runs `work` with this file attached to `mirror` (the mirror's connection, outside any
    /// transaction) as [`ATTACHED`]; detached afterwards, whether `work` succeeded or not.
    pub fn attached<T>(
        &self,
        mirror: &Connection,
        work: impl FnOnce() -> Result<T, SinkError>,
    ) -> Result<T, SinkError> {
        let fail = |what: &str, e| database_error(&self.path.display().to_string(), what, e);
        mirror
            .execute(&format!("ATTACH DATABASE ?1 AS {ATTACHED}"), [self.path.to_string_lossy()])
            .map_err(|e| fail("attaching the load file", e))?;
        let result = work();
        let detached = mirror.execute_batch(&format!("DETACH DATABASE {ATTACHED}"));
        let value = result?;
        detached.map_err(|e| fail("detaching the load file", e))?;
        Ok(value)
    }
}

/// The SQL that copies the heap of `def` (attached) into the keyed staging table of the mirror,
/// in key order; of a repeated key (a part loaded again after a crash), the later record wins.
pub fn copy_in_key_order_sql(def: &TableDef) -> String {
    let names: Vec<String> = def.columns().map(|c| quote(&c.name)).collect();
    let names = names.join(", ");
    let name = quote(&staging(&def.name));
    format!(
        "INSERT OR REPLACE INTO main.{name} ({names}) SELECT {names} FROM {ATTACHED}.{name} ORDER BY {key}, rowid",
        key = quote(&def.key.name)
    )
}
