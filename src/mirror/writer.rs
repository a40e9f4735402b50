//! The mirror's writer: a [`Dialect`] of the load protocol over one SQLite file per namespace,
//! with the bookkeeping table inside the same file, written in the same transaction as the data it
//! describes (so a copied file can be synced anywhere), the data dictionary, and the change index.
//!
//! The change index (for outward replication, `reader.rs`): each sync records, in its own
//! transaction, a commit (its sequence number and DAP watermark) and, per key it wrote or deleted,
//! the last commit that touched it. One row per key the table has had, however long its history.
//! A publish (initdb, a re-snapshot) starts a new epoch: the index restarts at commit 0, whose
//! watermark is the snapshot's.
//!
//! SQLite has one writer per file: writes go through one connection, taken by one table at a
//! time and used on blocking threads; a write access holds the file's writer lock (which a second
//! writer waits for, up to the lock timeout), so tables need no lock of their own. Whoever writes
//! the mirror, `state.json` beside it follows every commit and records every run.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{Connection, params};
use tokio::sync::{Mutex, OwnedMutexGuard};

use super::folder::{StateError, StateFile, WriterLock, mirror_file_present};
use super::format::*;
use super::history::{self, ChangeTime, Keeping, Recorder};
use super::load_file::{self, LoadFile, Staging};
use crate::decode::Record;
use crate::feed::Pump;
use crate::schema::delta::{Change, SchemaDelta};
use crate::schema::{ColumnType, TableDef};
use crate::sink::protocol::{Dialect, Provision, Replaces, Staged, StoredBookkeeping, shared_columns};
use crate::sink::{Access, Bookkeeping, ConnectionString, Gap, Refusal, RunRecord, SinkError, SinkOptions};
use crate::time;
use crate::value::Value;

#[async_trait::async_trait]
impl Provision for SqliteDialect {
    /// Opens the mirror file a `sqlite:` location names, off the async threads.
    async fn open(url: &ConnectionString, options: &SinkOptions) -> Result<Self, SinkError> {
        let file = PathBuf::from(&url.database);
        crate::privacy::check_mirror(&file, options.shared);
        let options = options.clone();
        tokio::task::spawn_blocking(move || {
            let mut opened = SqliteDialect::open(&file, options.access, options.lock_timeout)?;
            opened.history = Arc::new(options.history);
            Ok(opened)
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    }

    fn bookkeeping_statements() -> Vec<String> {
        bookkeeping_statements()
    }

    fn table_statements(def: &TableDef) -> Vec<String> {
        table_statements(def)
    }
}

/// A mirror file as the load protocol drives it.
pub struct SqliteDialect {
    path: PathBuf,
    shown: String,
    writer: Arc<Mutex<Writer>>,
    lock_timeout: Duration,
    /// The run's history choice, applied to each table written.
    history: Arc<history::Choice>,
    _lock: Option<WriterLock>,
    /// A reading access leaves no `-wal`/`-shm` behind (dropped after the connection).
    _tidy: Option<LeaveNoTrace>,
    /// The file was as the last clean run sealed it when this writer opened it: its tables'
    /// check for damage is skipped ([`super::seal`]).
    untouched: bool,
}

/// The connection and the statements built on it.
pub struct Writer {
    path: PathBuf,
    conn: Connection,
    /// The change time of the record being written, for the history triggers.
    change_time: ChangeTime,
    /// Where snapshots with a text key are staged ([`load_file`]).
    load: LoadFile,
}

/// The file's one connection, taken by one table at a time.
pub struct SqliteConn(Option<OwnedMutexGuard<Writer>>);

impl SqliteDialect {
    /// Opens the mirror file at `path`. A write access creates it (and its folder) when missing
    /// and takes its writer lock, waiting up to `lock_timeout` for another writer; a read access
    /// never creates anything.
    pub fn open(path: &Path, access: Access, lock_timeout: Duration) -> Result<SqliteDialect, SinkError> {
        let shown = path.display().to_string();
        let fail = |action: &str, e: rusqlite::Error| database_error(&shown, action, e);
        if path.is_dir() {
            return Err(SinkError::refused(
                &shown,
                Refusal::Input,
                "this is a folder, not a database file; name the file in it (e.g. sqlite:///PATH/canvas.db)",
            ));
        }
        refuse_foreign_file(path)?;
        let tidy = (access == Access::Read).then(|| LeaveNoTrace::note([path]));
        let mut untouched = false;
        let (conn, lock) = match access {
            Access::Write => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|e| {
                        SinkError::refused(
                            &dir.display().to_string(),
                            Refusal::NotAllowed,
                            format!("cannot create the folder: {e}"),
                        )
                    })?;
                }
                let lock = WriterLock::acquire_waiting(path, lock_timeout).map_err(|e| match e {
                    StateError::Folder(refused) => refused.refusal(),
                    other => SinkError::refused(&shown, Refusal::Locked, other.to_string()),
                })?;
                untouched = path.exists() && super::seal::take(path);
                (Connection::open(path).map_err(|e| fail("opening", e))?, Some(lock))
            }
            Access::Read => {
                if !mirror_file_present(path).map_err(|e| e.refusal())? {
                    return Err(SinkError::refused(
                        &shown,
                        Refusal::Missing,
                        "there is no mirror here yet; start with `dap initdb`",
                    ));
                }
                (open_read_only(path).map_err(|e| fail("reading the database", e))?, None)
            }
        };
        conn.execute_batch("PRAGMA busy_timeout = 5000;").map_err(|e| fail("opening", e))?;
        // Reading the schema fails at once on a file that is not a SQLite database.
        conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get::<_, i64>(0))
            .map_err(|e| fail("reading the database", e))?;
        let mut writer =
            Writer { path: path.to_path_buf(), conn, change_time: ChangeTime::default(), load: LoadFile::of(path) };
        if access == Access::Write {
            writer
                .change_time
                .register(&writer.conn)
                .and_then(|()| {
                    writer.conn.execute_batch(
                        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA legacy_alter_table = ON;",
                    )
                })
                .and_then(|()| writer.conn.execute_batch(&bookkeeping_statements().join(";\n")))
                .map_err(|e| fail("preparing the bookkeeping tables", e))?;
            writer.tidy_load_file()?;
            writer.save_state(|_| {});
        }
        Ok(SqliteDialect {
            path: path.to_path_buf(),
            shown,
            writer: Arc::new(Mutex::new(writer)),
            lock_timeout,
            history: Arc::default(),
            _lock: lock,
            _tidy: tidy,
            untouched,
        })
    }

    /// Runs `work` with the file's connection on a blocking thread.
    async fn run<T: Send + 'static>(
        c: &mut SqliteConn,
        work: impl FnOnce(&mut Writer) -> Result<T, SinkError> + Send + 'static,
    ) -> Result<T, SinkError> {
        let mut guard = c.0.take().expect("a connection is used by one task at a time");
        let (guard, result) = tokio::task::spawn_blocking(move || {
            let result = work(&mut guard);
            (guard, result)
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        c.0 = Some(guard);
        result
    }
}

impl Writer {
    fn fail(&self, what: &str, e: rusqlite::Error) -> SinkError {
        database_error(&self.path.display().to_string(), what, e)
    }

    fn refuse(&self, kind: Refusal, detail: String) -> SinkError {
        SinkError::refused(&self.path.display().to_string(), kind, detail)
    }

    /// Brings `state.json` beside the file in line with its bookkeeping rows (every namespace
    /// it holds), after `change`; a failure to write it is only a warning (the database is the
    /// authority, and the state file is rebuilt from it).
    fn save_state(&self, change: impl FnOnce(&mut StateFile)) {
        let rows = match self.stored_rows(None, None) {
            Ok(rows) => rows,
            Err(e) => return tracing::warn!("could not read the bookkeeping for the state file: {e}"),
        };
        let mut namespaces: Vec<String> = rows.iter().map(|r| r.namespace.clone()).collect();
        namespaces.sort();
        namespaces.dedup();
        let updated = StateFile::update(&self.path, |st| {
            change(st);
            for ns in &namespaces {
                let bookkeeping: Vec<Bookkeeping> = rows
                    .iter()
                    .filter(|r| &r.namespace == ns)
                    .filter_map(|r| {
                        Some(Bookkeeping {
                            namespace: r.namespace.clone(),
                            table: r.table.clone(),
                            watermark: r.watermark.clone().ok()?,
                            schema_version: u32::try_from(r.schema_version).ok()?,
                            schema_description: String::new(),
                        })
                    })
                    .collect();
                st.reconcile(ns, &self.path, &bookkeeping, &Default::default());
            }
            // A file whose last table was dropped: its entries go too.
            st.tables.retain(|_, e| e.file != self.path || namespaces.contains(&e.namespace));
        });
        if let Err(e) = updated {
            tracing::warn!("could not write the state file: {e}");
        }
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

    /// Writes records, and appends the keys they changed to `changed` (an unchanged row or an
    /// absent key's delete changes none). When the table keeps history, `history` is the time
    /// of a record without one (the sync's watermark): the history triggers read each record's
    /// change time.
    fn write_rows(
        &self,
        table: &str,
        def: &TableDef,
        rows: &[Record],
        changed: &mut Vec<Value>,
        history: Option<time::Micros>,
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
            if let Some(fallback) = history {
                self.change_time.set(r.ts.unwrap_or(fallback));
            }
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
        let keeps_history = history::setting(&self.conn, &def.namespace, &def.name).map_err(fail)?.is_some();
        if keeps_history { self.describe_history(def) } else { Ok(()) }
    }

    fn forget_in_dictionary(&self, table: &str) -> Result<(), SinkError> {
        for dictionary in [DICTIONARY_TABLES, DICTIONARY_COLUMNS] {
            self.conn
                .execute(&format!("DELETE FROM {dictionary} WHERE table_name = ?1"), params![table])
                .map_err(|e| self.fail("updating the data dictionary", e))?;
        }
        Ok(())
    }

    /// Removes the descriptions of the tables that store a history in the split form.
    fn forget_history_storage(&self, table: &str) -> Result<(), SinkError> {
        self.forget_in_dictionary(&history::ended_table(table))?;
        self.forget_in_dictionary(&history::since_table(table))
    }

    /// Publishes the staged snapshot of `def` (see the `publish` verb), in one transaction.
    fn publish(
        &self,
        def: &TableDef,
        b: &Bookkeeping,
        choice: &history::Choice,
        shared: &[String],
    ) -> Result<(), SinkError> {
        let tx = self.conn.unchecked_transaction().map_err(|e| self.fail("starting a transaction", e))?;
        if Staging::of(def) == Staging::Heap {
            let fail = |e| self.fail(&format!("ordering the snapshot of {} by its key", &def.name), e);
            // `main.`: unqualified, the name would find the heap in the attached file.
            self.conn
                .execute_batch(&format!("DROP TABLE IF EXISTS main.{}", quote(&staging(&def.name))))
                .map_err(fail)?;
            self.create_table(&staging(&def.name), def)?;
            self.conn.execute(&load_file::copy_in_key_order_sql(def), []).map_err(fail)?;
        }
        if self.has_table(&def.name)?
            && let Some(sql) = Replaces::of(def).carry_over_sql(
                &quote(&def.name),
                &quote(&staging(&def.name)),
                &quote(&def.key.name),
                shared,
            )
        {
            self.conn
                .execute(&sql, [])
                .map_err(|e| self.fail(&format!("keeping the older rows of {}", &def.name), e))?;
        }
        // History compares the table with its replacement, so it is written before the swap.
        let keeping = self.keeping_history(def, choice, b.watermark)?;
        if keeping != Keeping::No {
            history::record_snapshot(&self.conn, def, &staging(&def.name), shared, b.watermark)
                .and_then(|()| self.prune_history(def, b.watermark))
                .map_err(|e| self.fail(&format!("recording the history of {}", &def.name), e))?;
        }
        self.swap_in(&def.name, &staging(&def.name))?;
        super::indexes::ensure(&self.conn, &def.namespace, &def.name)
            .map_err(|e| self.fail(&format!("indexing {}", &def.name), e))?;
        if keeping != Keeping::No {
            history::refresh_view(&self.conn, &def.name)
                .map_err(|e| self.fail(&format!("recording the history of {}", &def.name), e))?;
        }
        self.conn
            .execute(
                &format!("DELETE FROM {CHECKPOINTS} WHERE source_namespace = ?1 AND source_table = ?2"),
                params![&def.namespace, &def.name],
            )
            .map_err(|e| self.fail("clearing checkpoints", e))?;
        self.write_bookkeeping(b)?;
        self.write_dictionary(def)?;
        self.start_epoch(b)?;
        tx.commit().map_err(|e| self.fail(&format!("committing {}", &def.name), e))?;
        self.save_state(|_| {});
        Ok(())
    }

    /// Drops the heaps of the load file whose loads have no checkpoint left in the mirror (a
    /// crash after a publish, before its heap was dropped), and the file when it is empty.
    fn tidy_load_file(&mut self) -> Result<(), SinkError> {
        let shown = self.load.path().display().to_string();
        let fail = |e| database_error(&shown, "tidying the load file", e);
        let heaps = self.load.heaps().map_err(fail)?;
        for table in heaps {
            let loading: bool = self
                .conn
                .query_row(&format!("SELECT count(*) > 0 FROM {CHECKPOINTS} WHERE source_table = ?1"), [&table], |r| {
                    r.get(0)
                })
                .map_err(|e| self.fail("reading checkpoints", e))?;
            if !loading {
                tracing::debug!("{table}: dropping the heap left in the load file");
                self.load.drop_heap(&table).map_err(fail)?;
            }
        }
        self.load.remove_if_empty().map_err(fail)
    }

    fn load_failed(&self, what: &str, e: rusqlite::Error) -> SinkError {
        database_error(&self.load.path().display().to_string(), what, e)
    }

    /// Appends a snapshot's records to the heap of `def` in the load file.
    fn append_rows(&mut self, def: &TableDef, rows: &[Record]) -> Result<(), SinkError> {
        let names: Vec<String> = def.columns().map(|c| quote(&c.name)).collect();
        let marks = vec!["?"; names.len()].join(", ");
        let sql = format!("INSERT INTO {} ({}) VALUES ({marks})", quote(&staging(&def.name)), names.join(", "));
        let shown = self.load.path().display().to_string();
        let fail = |what: &str, e| database_error(&shown, what, e);
        let conn = self.load.conn().map_err(|e| fail("opening the load file", e))?;
        let mut insert = conn.prepare_cached(&sql).map_err(|e| fail("preparing the load", e))?;
        for r in rows {
            let params = std::iter::once(Bind(&r.key)).chain(r.values.iter().map(Bind));
            insert
                .execute(rusqlite::params_from_iter(params))
                .map_err(|e| fail(&format!("loading {} key {}", def.name, r.key.to_text().unwrap_or_default()), e))?;
        }
        Ok(())
    }

    /// Drops a table's staging and its checkpoints (in the caller's transaction).
    fn forget_staging(&self, def: &TableDef) -> Result<(), SinkError> {
        self.conn
            .execute(
                &format!("DELETE FROM {CHECKPOINTS} WHERE source_namespace = ?1 AND source_table = ?2"),
                params![def.namespace, def.name],
            )
            .map_err(|e| self.fail("clearing checkpoints", e))?;
        self.conn
            .execute_batch(&format!("DROP TABLE IF EXISTS {}", quote(&staging(&def.name))))
            .map_err(|e| self.fail("dropping the staging table", e))
    }

    /// Applies the run's history choice to `def` (see `history::apply_choice`).
    fn keeping_history(
        &self,
        def: &TableDef,
        choice: &history::Choice,
        started: time::Micros,
    ) -> Result<Keeping, SinkError> {
        let keeping = history::apply_choice(&self.conn, def, choice, started)
            .map_err(|e| self.fail(&format!("applying the history choice to {}", def.name), e))?;
        if keeping == Keeping::No && choice.stop.selects(&def.name) {
            // Paused, the versions are one plain table (still described); dropped, nothing is.
            self.forget_history_storage(&def.name)?;
            if choice.recorded == history::Recorded::Drop {
                self.forget_in_dictionary(&history::table_name(&def.name))?;
            }
        }
        Ok(keeping)
    }

    /// `--history-days`: the table's ended versions older than its setting go.
    fn prune_history(&self, def: &TableDef, watermark: time::Micros) -> rusqlite::Result<()> {
        if let Some(days) = history::setting(&self.conn, &def.namespace, &def.name)?.and_then(|s| s.days) {
            let pruned = history::prune(&self.conn, &def.name, days, watermark)?;
            if pruned > 0 {
                tracing::info!("{}: {pruned} versions older than {days} days pruned from its history", def.name);
            }
        }
        Ok(())
    }

    /// The history table in the data dictionary: the table's columns, then history's three.
    fn describe_history(&self, def: &TableDef) -> Result<(), SinkError> {
        let fail = |e| self.fail("writing the data dictionary", e);
        let name = history::table_name(&def.name);
        let description = format!(
            "history: every version of {} since history was turned on for it (one per change a sync saw); \
             dap_valid_from/dap_valid_to bound each version, dap_deleted marks the one a delete ended",
            def.name
        );
        self.conn
            .execute(
                &format!("INSERT OR REPLACE INTO {DICTIONARY_TABLES} VALUES (?1, 'history', ?2, ?3, ?4)"),
                params![name, def.namespace, def.version, description],
            )
            .map_err(fail)?;
        self.conn
            .execute(&format!("DELETE FROM {DICTIONARY_COLUMNS} WHERE table_name = ?1"), params![name])
            .map_err(fail)?;
        self.conn
            .execute(
                &format!(
                    "INSERT INTO {DICTIONARY_COLUMNS} SELECT ?1, position, column_name, dap_type, sqlite_type, 1, 0, enum_values, description
                     FROM {DICTIONARY_COLUMNS} WHERE table_name = ?2"
                ),
                params![name, def.name],
            )
            .map_err(fail)?;
        let storage = [
            (
                history::ended_table(&def.name),
                format!("internal: the versions of {} that ended (see {name})", def.name),
            ),
            (
                history::since_table(&def.name),
                format!("internal: when each current row of {} began, for rows changed since history began", def.name),
            ),
        ];
        for (table, description) in storage {
            self.conn
                .execute(
                    &format!("INSERT OR REPLACE INTO {DICTIONARY_TABLES} VALUES (?1, 'internal', ?2, NULL, ?3)"),
                    params![table, def.namespace, description],
                )
                .map_err(fail)?;
        }
        let extra = [
            (
                history::VALID_FROM,
                "timestamp",
                "TEXT",
                0,
                "when this version began: DAP's change time of the record (the snapshot's time for a row a snapshot brought)",
            ),
            (history::VALID_TO, "timestamp", "TEXT", 1, "when this version ended; NULL while it is current"),
            (history::DELETED, "boolean", "INTEGER", 0, "1 for the version a delete ended"),
        ];
        let first = def.columns().count() as i64 + 1;
        for (i, (column, dap_type, sqlite_type, nullable, description)) in extra.into_iter().enumerate() {
            self.conn
                .execute(
                    &format!("INSERT INTO {DICTIONARY_COLUMNS} VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0, NULL, ?7)"),
                    params![name, first + i as i64, column, dap_type, sqlite_type, nullable, description],
                )
                .map_err(fail)?;
        }
        Ok(())
    }

    /// The bookkeeping rows of a namespace (every one when `None`), of one table when given.
    fn stored_rows(&self, namespace: Option<&str>, table: Option<&str>) -> Result<Vec<StoredBookkeeping>, SinkError> {
        if !self.has_table(BOOKKEEPING)? {
            return Ok(Vec::new()); // a read-only look at a file no write has prepared
        }
        let fail = |e| self.fail("reading the bookkeeping table", e);
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT source_namespace, source_table, timestamp, schema_version, schema_description FROM {BOOKKEEPING}
                 WHERE (?1 IS NULL OR source_namespace = ?1) AND (?2 IS NULL OR source_table = ?2) ORDER BY source_table, id"
            ))
            .map_err(fail)?;
        let rows = stmt
            .query_map(params![namespace, table], |row| {
                let stamp: String = row.get(2)?;
                Ok(StoredBookkeeping {
                    namespace: row.get(0)?,
                    table: row.get(1)?,
                    watermark: time::parse_rfc3339(&stamp).map_err(|_| stamp),
                    schema_version: row.get(3)?,
                    schema_description: row.get(4)?,
                })
            })
            .map_err(fail)?;
        rows.collect::<Result<_, _>>().map_err(fail)
    }
}

#[async_trait::async_trait]
impl Dialect for SqliteDialect {
    type Conn = SqliteConn;
    /// The file's writer lock covers every table.
    type LockSession = ();

    fn target(&self) -> &str {
        &self.shown
    }

    fn table_sql(&self, _namespace: &str, table: &str) -> String {
        quote(table)
    }

    fn bookkeeping_name(&self) -> &'static str {
        BOOKKEEPING
    }

    fn staging_keeps(&self) -> Staged {
        Staged::LatestPerKey
    }

    fn lock_timeout(&self) -> Duration {
        self.lock_timeout
    }

    async fn connect(&self) -> Result<SqliteConn, SinkError> {
        Ok(SqliteConn(Some(self.writer.clone().lock_owned().await)))
    }

    fn release(&self, _c: SqliteConn) {}

    /// A part's transaction: in the mirror, and in the load file when it is open.
    async fn begin(&self, c: &mut SqliteConn) -> Result<(), SinkError> {
        Self::run(c, |w| {
            w.conn.execute_batch("BEGIN IMMEDIATE").map_err(|e| w.fail("starting a transaction", e))?;
            w.load.begin().map_err(|e| w.load_failed("starting a transaction", e))
        })
        .await
    }

    /// The load file commits first: a crash between the two commits leaves rows without their
    /// checkpoint (loaded again), never a checkpoint without its rows.
    async fn commit(&self, c: &mut SqliteConn) -> Result<(), SinkError> {
        Self::run(c, |w| {
            w.load.commit().map_err(|e| w.load_failed("committing", e))?;
            w.conn.execute_batch("COMMIT").map_err(|e| w.fail("committing", e))
        })
        .await
    }

    /// The mirror's connection is shared by the run: what a failed step left open is rolled
    /// back before the next step takes it.
    async fn abandon(&self, mut c: SqliteConn) {
        let rolled_back = Self::run(&mut c, |w| {
            w.load.rollback().map_err(|e| w.load_failed("rolling back", e))?;
            if !w.conn.is_autocommit() {
                w.conn.execute_batch("ROLLBACK").map_err(|e| w.fail("rolling back", e))?;
            }
            Ok(())
        })
        .await;
        if let Err(e) = rolled_back {
            tracing::warn!("{e}");
        }
    }

    async fn stored_bookkeeping(
        &self,
        c: &mut SqliteConn,
        namespace: &str,
        table: Option<&str>,
    ) -> Result<Vec<StoredBookkeeping>, SinkError> {
        let (ns, t) = (namespace.to_string(), table.map(str::to_string));
        Self::run(c, move |w| w.stored_rows(Some(&ns), t.as_deref())).await
    }

    async fn write_bookkeeping(&self, c: &mut SqliteConn, b: &Bookkeeping) -> Result<(), SinkError> {
        let b = b.clone();
        Self::run(c, move |w| w.write_bookkeeping(&b)).await
    }

    async fn row_count(&self, c: &mut SqliteConn, _namespace: &str, table: &str) -> Result<u64, SinkError> {
        let t = table.to_string();
        Self::run(c, move |w| {
            w.conn
                .query_row(&format!("SELECT count(*) FROM {}", quote(&t)), [], |r| r.get(0))
                .map_err(|e| w.fail(&format!("counting {t}"), e))
        })
        .await
    }

    async fn table_exists(&self, c: &mut SqliteConn, _namespace: &str, table: &str) -> Result<bool, SinkError> {
        let t = table.to_string();
        Self::run(c, move |w| w.has_table(&t)).await
    }

    async fn column_names(&self, c: &mut SqliteConn, _namespace: &str, table: &str) -> Result<Vec<String>, SinkError> {
        let t = table.to_string();
        Self::run(c, move |w| {
            let read = || -> rusqlite::Result<Vec<String>> {
                let mut statement = w.conn.prepare("SELECT name FROM pragma_table_info(?1) ORDER BY cid")?;
                statement.query_map([&t], |r| r.get(0))?.collect()
            };
            read().map_err(|e| w.fail(&format!("reading the columns of {t}"), e))
        })
        .await
    }

    /// A table name is one per file: another namespace's table of that name is not ours.
    async fn check_owner(&self, c: &mut SqliteConn, namespace: &str, table: &str) -> Result<(), SinkError> {
        let (ns, t) = (namespace.to_string(), table.to_string());
        Self::run(c, move |w| {
            let owners = w.stored_rows(None, Some(&t))?;
            if let Some(other) = owners.iter().find(|b| b.namespace != ns) {
                return Err(w.refuse(
                    Refusal::NotOurs,
                    format!(
                        "{ns}.{t}: this database already holds a table {t} of namespace {}; use another file for {ns} (--connection-string)",
                        other.namespace
                    ),
                ));
            }
            Ok(())
        })
        .await
    }

    async fn check_intact(&self, _namespace: &str, table: &str) -> Result<(), SinkError> {
        if self.untouched {
            tracing::debug!("{table}: the file is as the last clean run sealed it; its check for damage is skipped");
            return Ok(());
        }
        tracing::debug!("{table}: checking it for damage");
        let (path, table) = (self.path.clone(), table.to_string());
        tokio::task::spawn_blocking(move || check_table(&path, &table))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    }

    async fn checkpoints(&self, c: &mut SqliteConn, def: &TableDef) -> Result<Vec<(String, String)>, SinkError> {
        let (ns, t) = (def.namespace.clone(), def.name.clone());
        Self::run(c, move |w| {
            let mut stmt = w
                .conn
                .prepare(&format!(
                    "SELECT job_id, object FROM {CHECKPOINTS} WHERE source_namespace = ?1 AND source_table = ?2"
                ))
                .map_err(|e| w.fail("reading checkpoints", e))?;
            stmt.query_map(params![ns, t], |r| Ok((r.get(0)?, r.get(1)?)))
                .and_then(|rows| rows.collect())
                .map_err(|e| w.fail("reading checkpoints", e))
        })
        .await
    }

    async fn checkpoint_counts(&self, c: &mut SqliteConn, namespace: &str) -> Result<Vec<(String, u64)>, SinkError> {
        let ns = namespace.to_string();
        Self::run(c, move |w| {
            if !w.has_table(CHECKPOINTS)? {
                return Ok(Vec::new()); // a file no write has prepared
            }
            let mut stmt = w
                .conn
                .prepare(&format!(
                    "SELECT source_table, count(*) FROM {CHECKPOINTS} WHERE source_namespace = ?1 GROUP BY source_table ORDER BY source_table"
                ))
                .map_err(|e| w.fail("reading checkpoints", e))?;
            stmt.query_map(params![ns], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))
                .and_then(|rows| rows.collect())
                .map_err(|e| w.fail("reading checkpoints", e))
        })
        .await
    }

    async fn staging_exists(&self, c: &mut SqliteConn, def: &TableDef) -> Result<bool, SinkError> {
        let def = def.clone();
        Self::run(c, move |w| match Staging::of(&def) {
            Staging::Keyed => w.has_table(&staging(&def.name)),
            Staging::Heap => w.load.has_heap(&def.name).map_err(|e| w.load_failed("reading the load file", e)),
        })
        .await
    }

    /// The mirror forgets the table's checkpoints first, then the load file gets a new heap: a
    /// crash between the two leaves a heap without checkpoints, which no load resumes.
    async fn create_staging(&self, c: &mut SqliteConn, def: &TableDef) -> Result<(), SinkError> {
        let def = def.clone();
        Self::run(c, move |w| {
            let tx = w.conn.unchecked_transaction().map_err(|e| w.fail("starting a transaction", e))?;
            w.forget_staging(&def)?;
            if Staging::of(&def) == Staging::Keyed {
                w.create_table(&staging(&def.name), &def)?;
            }
            tx.commit().map_err(|e| w.fail("creating the staging table", e))?;
            match Staging::of(&def) {
                Staging::Keyed => w.load.drop_heap(&def.name),
                Staging::Heap => w.load.create_heap(&def),
            }
            .map_err(|e| w.load_failed("creating the staging table", e))
        })
        .await
    }

    async fn drop_staging(&self, c: &mut SqliteConn, def: &TableDef) -> Result<(), SinkError> {
        let def = def.clone();
        Self::run(c, move |w| {
            let tx = w.conn.unchecked_transaction().map_err(|e| w.fail("starting a transaction", e))?;
            w.forget_staging(&def)?;
            tx.commit().map_err(|e| w.fail("dropping the staging table", e))?;
            w.load.drop_heap(&def.name).map_err(|e| w.load_failed("dropping the staging table", e))
        })
        .await
    }

    async fn load_part(&self, c: &mut SqliteConn, def: &TableDef, rows: &mut Pump<'_>) -> Result<(), SinkError> {
        let def = Arc::new(def.clone());
        while let Some(batch) = rows.next_batch().await? {
            let def = def.clone();
            Self::run(c, move |w| match Staging::of(&def) {
                Staging::Keyed => w.write_rows(&staging(&def.name), &def, &batch, &mut Vec::new(), None),
                Staging::Heap => w.append_rows(&def, &batch),
            })
            .await?;
        }
        Ok(())
    }

    async fn record_checkpoint(
        &self,
        c: &mut SqliteConn,
        def: &TableDef,
        job: &str,
        part: &str,
    ) -> Result<(), SinkError> {
        let (ns, t, job, part) = (def.namespace.clone(), def.name.clone(), job.to_string(), part.to_string());
        Self::run(c, move |w| {
            w.conn
                .execute(
                    &format!("INSERT OR REPLACE INTO {CHECKPOINTS} (source_namespace, source_table, job_id, object) VALUES (?1, ?2, ?3, ?4)"),
                    params![ns, t, job, part],
                )
                .map(|_| ())
                .map_err(|e| w.fail("recording a checkpoint", e))
        })
        .await
    }

    async fn staged_rows(&self, c: &mut SqliteConn, def: &TableDef) -> Result<u64, SinkError> {
        let def = def.clone();
        Self::run(c, move |w| match Staging::of(&def) {
            Staging::Keyed => w
                .conn
                .query_row(&format!("SELECT count(*) FROM {}", quote(&staging(&def.name))), [], |r| r.get(0))
                .map_err(|e| w.fail("counting the staged rows", e)),
            Staging::Heap => w.load.staged_rows(&def.name).map_err(|e| w.load_failed("counting the staged rows", e)),
        })
        .await
    }

    /// The staging table replaces the table whole (SQLite views refer to tables by name, so they
    /// keep working), so the delta needs no DDL here. A heap in the load file first becomes that
    /// staging table, in key order, in the same transaction; the heap is dropped after it.
    async fn publish(
        &self,
        c: &mut SqliteConn,
        def: &TableDef,
        delta: &SchemaDelta,
        b: &Bookkeeping,
    ) -> Result<(), SinkError> {
        let (def, b, choice) = (def.clone(), b.clone(), self.history.clone());
        let shared: Vec<String> = shared_columns(&def, delta).map(quote).collect();
        Self::run(c, move |w| match Staging::of(&def) {
            Staging::Keyed => w.publish(&def, &b, &choice, &shared),
            Staging::Heap => {
                w.load.attached(&w.conn, || w.publish(&def, &b, &choice, &shared))?;
                w.load.drop_heap(&def.name).map_err(|e| w.load_failed("dropping the staged snapshot", e))
            }
        })
        .await
    }

    async fn apply_changes(
        &self,
        c: &mut SqliteConn,
        def: &TableDef,
        delta: &SchemaDelta,
        rows: &mut Pump<'_>,
        b: &Bookkeeping,
    ) -> Result<(), SinkError> {
        let def = Arc::new(def.clone());
        let keeping = {
            let (def, delta, choice, watermark) = (def.clone(), delta.clone(), self.history.clone(), b.watermark);
            Self::run(c, move |w| {
                w.conn.execute_batch("BEGIN IMMEDIATE").map_err(|e| w.fail("starting a transaction", e))?;
                w.apply_delta(&def, &delta)?;
                // A mirror made before its log tables were indexed gets the indexes here, once.
                super::indexes::ensure(&w.conn, &def.namespace, &def.name)
                    .map_err(|e| w.fail(&format!("indexing {}", def.name), e))?;
                // History turned on by this sync begins at the table's watermark before it.
                let before = w.stored_rows(Some(&def.namespace), Some(&def.name))?;
                let started = before.first().and_then(|r| r.watermark.clone().ok()).unwrap_or(watermark);
                let keeping = w.keeping_history(&def, &choice, started)?;
                if keeping != Keeping::No {
                    Recorder::install(&w.conn, &def)
                        .map_err(|e| w.fail(&format!("recording the history of {}", def.name), e))?;
                }
                Ok(keeping)
            })
            .await?
        };
        let history = (keeping != Keeping::No).then_some(b.watermark);
        let mut keys: Vec<Value> = Vec::new();
        while let Some(records) = rows.next_batch().await? {
            let def = def.clone();
            keys = Self::run(c, move |w| {
                w.write_rows(&def.name, &def, &records, &mut keys, history)?;
                Ok(keys)
            })
            .await?;
        }
        self.finish_changes(c, &def, keys, b).await
    }

    async fn drop_table(&self, c: &mut SqliteConn, namespace: &str, table: &str) -> Result<bool, SinkError> {
        let (ns, t) = (namespace.to_string(), table.to_string());
        Self::run(c, move |w| {
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
                w.forget_in_dictionary(&history::table_name(&t))?;
                w.forget_history_storage(&t)?;
                history::forget(&w.conn, &ns, &t).map_err(|e| w.fail("dropping the history", e))?;
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
            w.save_state(|_| {});
            Ok(removed > 0)
        })
        .await
    }

    /// VACUUM: the file is rewritten without the free pages.
    async fn reclaim_space(&self, c: &mut SqliteConn) -> Result<(), SinkError> {
        Self::run(c, |w| w.conn.execute_batch("VACUUM").map_err(|e| w.fail("compacting the file (VACUUM)", e))).await
    }

    /// The gap's end is the oldest row newer than `after` up to the table's watermark (rows
    /// outside that range were not brought by the snapshot that followed the gap).
    async fn record_gap(
        &self,
        c: &mut SqliteConn,
        namespace: &str,
        table: &str,
        after: time::Micros,
    ) -> Result<Option<Gap>, SinkError> {
        let (ns, t) = (namespace.to_string(), table.to_string());
        Self::run(c, move |w| {
            let fail = |e| w.fail(&format!("recording the gap in {t}"), e);
            let watermark = w.stored_rows(Some(&ns), Some(&t))?.first().and_then(|b| b.watermark.clone().ok());
            let column = quote(crate::schema::APPEND_ONLY_TIME_COLUMN);
            let has_time = w.column_types(&t)?.iter().any(|(n, _)| n == crate::schema::APPEND_ONLY_TIME_COLUMN);
            let before: Option<String> = match watermark {
                Some(upto) if has_time => w
                    .conn
                    .query_row(
                        &format!("SELECT min({column}) FROM {} WHERE {column} > ?1 AND {column} <= ?2", quote(&t)),
                        params![time::format_fixed(after), time::format_fixed(upto)],
                        |r| r.get(0),
                    )
                    .map_err(fail)?,
                _ => None,
            };
            w.conn
                .execute_batch(&format!(
                    "CREATE TABLE IF NOT EXISTS {GAPS} (source_namespace TEXT NOT NULL, source_table TEXT NOT NULL, \
                     after TEXT NOT NULL, before TEXT, PRIMARY KEY (source_namespace, source_table, after))"
                ))
                .map_err(fail)?;
            w.conn
                .execute(
                    &format!("INSERT OR REPLACE INTO {GAPS} VALUES (?1, ?2, ?3, ?4)"),
                    params![ns, t, time::format_fixed(after), before],
                )
                .map_err(fail)?;
            let before = before.as_deref().map(time::parse_rfc3339).transpose().ok().flatten();
            Ok(Some(Gap { after, before }))
        })
        .await
    }

    async fn record_start(&self, c: &mut SqliteConn, start: &super::runs::Start) -> Option<i64> {
        let start = start.clone();
        let begun = Self::run(c, move |w| {
            super::runs::begin(&mut w.conn, &start, super::runs::kept()).map_err(|e| w.fail("recording the run", e))
        })
        .await;
        begun.map_err(|e| tracing::debug!("the start of the run was not recorded in the mirror: {e}")).ok()
    }

    async fn record_run(&self, namespace: &str, table: &str, run: &RunRecord) {
        let (path, ns, t, run) = (self.path.clone(), namespace.to_string(), table.to_string(), run.clone());
        let saved = tokio::task::spawn_blocking(move || {
            StateFile::update(&path, |st| {
                st.record_run(&ns, &t, &path, &run.command, run.job.as_deref(), run.result.clone());
                if let (Some(rows), Some(entry)) = (run.rows, st.tables.get_mut(&StateFile::key(&path, &ns, &t))) {
                    entry.rows = Some(rows);
                }
            })
        })
        .await;
        if let Ok(Err(e)) = saved {
            tracing::warn!("could not write the state file: {e}");
        }
    }

    async fn lock_session(&self) -> Result<(), SinkError> {
        Ok(())
    }

    async fn try_lock(&self, _s: &mut (), _namespace: &str, _table: &str) -> Result<bool, SinkError> {
        Ok(true)
    }

    async fn write_holder(&self, _s: &mut (), _namespace: &str, _table: &str, _holder: &str) -> Result<(), SinkError> {
        Ok(())
    }

    async fn read_holder(&self, _s: &mut (), _namespace: &str, _table: &str) -> Result<Option<String>, SinkError> {
        Ok(None)
    }
}

impl SqliteDialect {
    /// The end of a sync, in its transaction: bookkeeping, dictionary, the change index, commit.
    async fn finish_changes(
        &self,
        c: &mut SqliteConn,
        def: &Arc<TableDef>,
        keys: Vec<Value>,
        b: &Bookkeeping,
    ) -> Result<(), SinkError> {
        let (def, b) = (def.clone(), b.clone());
        Self::run(c, move |w| {
            w.write_bookkeeping(&b)?;
            w.write_dictionary(&def)?;
            let recording = std::time::Instant::now();
            if Recorder::finish(&w.conn, &def)
                .map_err(|e| w.fail(&format!("recording the history of {}", def.name), e))?
            {
                tracing::debug!("{}: history recorded in {} ms", def.name, recording.elapsed().as_millis());
            }
            w.prune_history(&def, b.watermark).map_err(|e| w.fail("pruning history", e))?;
            let started = std::time::Instant::now();
            w.record_commit(&b, &keys)?;
            tracing::debug!(
                "{}: change index: {} keys recorded in {} ms",
                def.name,
                keys.len(),
                started.elapsed().as_millis()
            );
            w.conn.execute_batch("COMMIT").map_err(|e| w.fail("committing the changes", e))?;
            w.save_state(|_| {});
            Ok(())
        })
        .await
    }
}
