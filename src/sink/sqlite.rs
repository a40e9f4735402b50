//! The SQLite mirror: one file per namespace, tables under their DAP names, and the bookkeeping
//! table `instructure_dap__table_sync` inside the same file, written in the same transaction as
//! the data it describes (so a copied file can be synced anywhere).
//!
//! Types: integers and booleans (0/1) are INTEGER; floats REAL, except NaN, which SQLite cannot
//! store as REAL and which is kept as the text `NaN` (distinct from NULL); decimals NUMERIC;
//! timestamps fixed-width UTC text `YYYY-MM-DDTHH:MM:SS.ffffffZ` (sorts in time order, and
//! SQLite's date functions read it); dates, times, UUIDs, IPs, enums and text as TEXT; nested
//! objects and arrays as JSON text.

use std::path::{Path, PathBuf};

use rusqlite::ToSql;
use rusqlite::types::{ToSqlOutput, Value as Sql, ValueRef};
use rusqlite::{Connection, OptionalExtension, params};

use super::{Bookkeeping, Sink, SinkError};
use crate::decode::Record;
use crate::schema::{ColumnType, TableDef};
use crate::time;
use crate::value::Value;

const BOOKKEEPING: &str = "instructure_dap__table_sync";
/// Objects of an initdb job already loaded into staging (the per-object checkpoint).
const CHECKPOINTS: &str = "_dap_checkpoint";

pub struct SqliteSink {
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
        ColumnType::Decimal { .. } => "NUMERIC",
        _ => "TEXT",
    }
}

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

impl SqliteSink {
    /// Opens (creating when needed) the mirror file at `path`.
    pub fn open(path: &Path) -> Result<SqliteSink, SinkError> {
        let fail =
            |e: rusqlite::Error| SinkError::Database { target: path.display().to_string(), detail: e.to_string() };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| SinkError::Database {
                target: dir.display().to_string(),
                detail: format!("cannot create the folder: {e}"),
            })?;
        }
        let conn = Connection::open(path).map_err(fail)?;
        conn.execute_batch(&format!(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 5000;
             PRAGMA legacy_alter_table = ON;
             CREATE TABLE IF NOT EXISTS {BOOKKEEPING} (
               id INTEGER PRIMARY KEY, source_namespace TEXT NOT NULL, source_table TEXT NOT NULL,
               timestamp TEXT NOT NULL, schema_version INTEGER NOT NULL, target_schema TEXT,
               target_table TEXT NOT NULL, schema_description_format TEXT NOT NULL, schema_description TEXT NOT NULL,
               UNIQUE (source_namespace, source_table));
             CREATE TABLE IF NOT EXISTS {CHECKPOINTS} (
               source_namespace TEXT NOT NULL, source_table TEXT NOT NULL, job_id TEXT NOT NULL, object TEXT NOT NULL,
               PRIMARY KEY (source_namespace, source_table, object));"
        ))
        .map_err(fail)?;
        Ok(SqliteSink { path: path.to_path_buf(), conn })
    }

    fn fail(&self, what: &str, e: rusqlite::Error) -> SinkError {
        SinkError::Database { target: self.path.display().to_string(), detail: format!("{what}: {e}") }
    }

    fn create_table(&self, name: &str, def: &TableDef) -> Result<(), SinkError> {
        let columns: Vec<String> = def
            .columns()
            .map(|c| format!("{} {}{}", quote(&c.name), sql_type(&c.ty), if c.required { " NOT NULL" } else { "" }))
            .collect();
        let sql =
            format!("CREATE TABLE {} ({}, PRIMARY KEY ({}))", quote(name), columns.join(", "), quote(&def.key.name));
        self.conn.execute_batch(&sql).map_err(|e| self.fail(&format!("creating {name}"), e))
    }

    /// `INSERT … ON CONFLICT DO UPDATE` of every column: whole-row upserts.
    fn upsert_sql(table: &str, def: &TableDef) -> String {
        let names: Vec<String> = def.columns().map(|c| quote(&c.name)).collect();
        let marks = vec!["?"; names.len()].join(", ");
        let updates: Vec<String> = def.values.iter().map(|c| format!("{0} = excluded.{0}", quote(&c.name))).collect();
        let action =
            if updates.is_empty() { "NOTHING".to_string() } else { format!("UPDATE SET {}", updates.join(", ")) };
        format!(
            "INSERT INTO {} ({}) VALUES ({marks}) ON CONFLICT ({}) DO {action}",
            quote(table),
            names.join(", "),
            quote(&def.key.name)
        )
    }

    fn write_rows(&self, table: &str, def: &TableDef, rows: &[Record]) -> Result<(), SinkError> {
        let mut upsert = self
            .conn
            .prepare_cached(&Self::upsert_sql(table, def))
            .map_err(|e| self.fail("preparing the upsert", e))?;
        let mut delete = self
            .conn
            .prepare_cached(&format!("DELETE FROM {} WHERE {} = ?", quote(table), quote(&def.key.name)))
            .map_err(|e| self.fail("preparing the delete", e))?;
        for r in rows {
            if r.action == Some('D') {
                delete.execute([to_sql(&r.key)]).map_err(|e| self.fail(&format!("deleting from {table}"), e))?;
                continue;
            }
            let params = std::iter::once(Bind(&r.key)).chain(r.values.iter().map(Bind));
            upsert
                .execute(rusqlite::params_from_iter(params))
                .map_err(|e| self.fail(&format!("writing {table} key {:?}", r.key.to_text()), e))?;
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

    /// Rebuilds a table whose column types changed: a new table with the schema's types (plus
    /// any columns the schema no longer names), filled from the old one, swapped in.
    fn rebuild(&self, def: &TableDef, existing: &[(String, String)]) -> Result<(), SinkError> {
        let temp = format!("_dap_rebuild__{}", def.name);
        let extra: Vec<&(String, String)> =
            existing.iter().filter(|(n, _)| !def.columns().any(|c| &c.name == n)).collect();
        let mut columns: Vec<String> = def
            .columns()
            .map(|c| format!("{} {}{}", quote(&c.name), sql_type(&c.ty), if c.required { " NOT NULL" } else { "" }))
            .collect();
        columns.extend(extra.iter().map(|(n, t)| format!("{} {t}", quote(n))));
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
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn read_bookkeeping(row: &rusqlite::Row) -> rusqlite::Result<(String, String, String, u32, String)> {
    Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?))
}

fn bookkeeping_of(
    (namespace, table, ts, schema_version, schema_description): (String, String, String, u32, String),
) -> Bookkeeping {
    Bookkeeping {
        namespace,
        table,
        watermark: time::parse_rfc3339(&ts).unwrap_or(0),
        schema_version,
        schema_description,
    }
}

impl Sink for SqliteSink {
    fn bookkeeping(&mut self, namespace: &str, table: &str) -> Result<Option<Bookkeeping>, SinkError> {
        self.conn
            .query_row(
                &format!("SELECT source_namespace, source_table, timestamp, schema_version, schema_description FROM {BOOKKEEPING} WHERE source_namespace = ?1 AND source_table = ?2"),
                params![namespace, table],
                read_bookkeeping,
            )
            .optional()
            .map(|r| r.map(bookkeeping_of))
            .map_err(|e| self.fail("reading the bookkeeping table", e))
    }

    fn owner(&mut self, table: &str) -> Result<Option<String>, SinkError> {
        self.conn
            .query_row(&format!("SELECT source_namespace FROM {BOOKKEEPING} WHERE source_table = ?1"), [table], |r| {
                r.get(0)
            })
            .optional()
            .map_err(|e| self.fail("reading the bookkeeping table", e))
    }

    fn all_bookkeeping(&mut self, namespace: &str) -> Result<Vec<Bookkeeping>, SinkError> {
        let mut stmt = self
            .conn
            .prepare(&format!("SELECT source_namespace, source_table, timestamp, schema_version, schema_description FROM {BOOKKEEPING} WHERE source_namespace = ?1 ORDER BY source_table"))
            .map_err(|e| self.fail("reading the bookkeeping table", e))?;
        let rows =
            stmt.query_map([namespace], read_bookkeeping).map_err(|e| self.fail("reading the bookkeeping table", e))?;
        rows.map(|r| r.map(bookkeeping_of))
            .collect::<Result<_, _>>()
            .map_err(|e| self.fail("reading the bookkeeping table", e))
    }

    fn row_count(&mut self, _namespace: &str, table: &str) -> Result<u64, SinkError> {
        self.conn
            .query_row(&format!("SELECT count(*) FROM {}", quote(table)), [], |r| r.get(0))
            .map_err(|e| self.fail(&format!("counting {table}"), e))
    }

    fn stage(&mut self, def: &TableDef, job: &str) -> Result<Vec<String>, SinkError> {
        let name = staging(&def.name);
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT job_id, object FROM {CHECKPOINTS} WHERE source_namespace = ?1 AND source_table = ?2"
            ))
            .map_err(|e| self.fail("reading checkpoints", e))?;
        let done: Vec<(String, String)> = stmt
            .query_map(params![def.namespace, def.name], |r| Ok((r.get(0)?, r.get(1)?)))
            .and_then(|rows| rows.collect())
            .map_err(|e| self.fail("reading checkpoints", e))?;
        drop(stmt);
        let staged: bool = self
            .conn
            .query_row("SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = ?1", [&name], |r| {
                r.get(0)
            })
            .map_err(|e| self.fail("looking for a staging table", e))?;
        if staged && !done.is_empty() && done.iter().all(|(j, _)| j == job) {
            return Ok(done.into_iter().map(|(_, o)| o).collect());
        }
        self.conn
            .execute(
                &format!("DELETE FROM {CHECKPOINTS} WHERE source_namespace = ?1 AND source_table = ?2"),
                params![def.namespace, def.name],
            )
            .map_err(|e| self.fail("clearing checkpoints", e))?;
        self.conn
            .execute_batch(&format!("DROP TABLE IF EXISTS {}", quote(&name)))
            .map_err(|e| self.fail("dropping an old staging table", e))?;
        self.create_table(&name, def)?;
        Ok(Vec::new())
    }

    fn begin_object(&mut self) -> Result<(), SinkError> {
        self.conn.execute_batch("BEGIN IMMEDIATE").map_err(|e| self.fail("starting a transaction", e))
    }

    fn stage_rows(&mut self, def: &TableDef, rows: &[Record]) -> Result<(), SinkError> {
        self.write_rows(&staging(&def.name), def, rows)
    }

    fn finish_object(&mut self, def: &TableDef, job: &str, object: &str) -> Result<(), SinkError> {
        self.conn
            .execute(
                &format!("INSERT OR REPLACE INTO {CHECKPOINTS} (source_namespace, source_table, job_id, object) VALUES (?1, ?2, ?3, ?4)"),
                params![def.namespace, def.name, job, object],
            )
            .map_err(|e| self.fail("recording a checkpoint", e))?;
        self.conn.execute_batch("COMMIT").map_err(|e| self.fail(&format!("committing object {object}"), e))
    }

    fn publish(&mut self, def: &TableDef, bookkeeping: &Bookkeeping) -> Result<(), SinkError> {
        let tx = self.conn.unchecked_transaction().map_err(|e| self.fail("starting a transaction", e))?;
        self.swap_in(&def.name, &staging(&def.name))?;
        self.conn
            .execute(
                &format!("DELETE FROM {CHECKPOINTS} WHERE source_namespace = ?1 AND source_table = ?2"),
                params![def.namespace, def.name],
            )
            .map_err(|e| self.fail("clearing checkpoints", e))?;
        self.write_bookkeeping(bookkeeping)?;
        tx.commit().map_err(|e| self.fail(&format!("committing {}", def.name), e))
    }

    fn begin_changes(&mut self, def: &TableDef) -> Result<(), SinkError> {
        self.conn.execute_batch("BEGIN IMMEDIATE").map_err(|e| self.fail("starting a transaction", e))?;
        let existing = self.column_types(&def.name)?;
        let changed_type = def
            .columns()
            .any(|c| existing.iter().any(|(n, t)| n == &c.name && !t.eq_ignore_ascii_case(sql_type(&c.ty))));
        if changed_type {
            return self.rebuild(def, &existing);
        }
        for c in def.values.iter().filter(|c| !existing.iter().any(|(n, _)| n == &c.name)) {
            // Additive change: a new column, NULL for the rows already here.
            self.conn
                .execute_batch(&format!(
                    "ALTER TABLE {} ADD COLUMN {} {}",
                    quote(&def.name),
                    quote(&c.name),
                    sql_type(&c.ty)
                ))
                .map_err(|e| self.fail(&format!("adding column {} to {}", c.name, def.name), e))?;
        }
        Ok(())
    }

    fn apply(&mut self, def: &TableDef, rows: &[Record]) -> Result<(), SinkError> {
        self.write_rows(&def.name, def, rows)
    }

    fn commit_changes(&mut self, bookkeeping: &Bookkeeping) -> Result<(), SinkError> {
        self.write_bookkeeping(bookkeeping)?;
        self.conn.execute_batch("COMMIT").map_err(|e| self.fail("committing the changes", e))
    }

    fn abort(&mut self) {
        if !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }

    fn drop_table(&mut self, namespace: &str, table: &str) -> Result<bool, SinkError> {
        let tx = self.conn.unchecked_transaction().map_err(|e| self.fail("starting a transaction", e))?;
        let removed = self
            .conn
            .execute(
                &format!("DELETE FROM {BOOKKEEPING} WHERE source_namespace = ?1 AND source_table = ?2"),
                params![namespace, table],
            )
            .map_err(|e| self.fail("removing the bookkeeping row", e))?;
        if removed > 0 {
            self.conn
                .execute_batch(&format!("DROP TABLE IF EXISTS {}", quote(table)))
                .map_err(|e| self.fail(&format!("dropping {table}"), e))?;
        }
        tx.commit().map_err(|e| self.fail("committing the drop", e))?;
        Ok(removed > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulator::dataset::envelope_def;
    use serde_json::json;

    fn def(version: u32, score_type: &str) -> TableDef {
        let flat = json!({"type": "object", "required": ["id"], "properties": {
            "id": {"type": "integer", "format": "int64"},
            "name": {"type": "string"},
            "score": {"type": score_type},
        }});
        envelope_def("canvas", "t", version, &flat).unwrap()
    }

    fn row(id: i64, name: &str, score: Value) -> Record {
        Record { ts: None, action: Some('U'), key: Value::Int(id), values: vec![Value::Str(name.into()), score] }
    }

    fn bk(version: u32) -> Bookkeeping {
        Bookkeeping {
            namespace: "canvas".into(),
            table: "t".into(),
            watermark: 1,
            schema_version: version,
            schema_description: "{}".into(),
        }
    }

    fn query(s: &SqliteSink, sql: &str) -> Vec<String> {
        let mut stmt = s.conn.prepare(sql).unwrap();
        stmt.query_map([], |r| r.get::<_, String>(0)).unwrap().map(Result::unwrap).collect()
    }

    #[test]
    fn user_indexes_and_views_survive_replacement_and_type_rebuilds() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SqliteSink::open(&dir.path().join("m.db")).unwrap();
        let v1 = def(1, "string");
        let load = |s: &mut SqliteSink| {
            assert!(s.stage(&v1, "job").unwrap().is_empty());
            s.begin_object().unwrap();
            s.stage_rows(&v1, &[row(1, "a", Value::Str("10".into())), row(2, "b", Value::Str("20".into()))]).unwrap();
            s.finish_object(&v1, "job", "part-0").unwrap();
            s.publish(&v1, &bk(1)).unwrap();
        };
        load(&mut s);
        s.conn
            .execute_batch("CREATE INDEX user_idx ON t (name); CREATE VIEW user_view AS SELECT id, score FROM t")
            .unwrap();

        load(&mut s); // initdb --replace
        assert_eq!(query(&s, "SELECT name FROM sqlite_master WHERE name = 'user_idx'"), ["user_idx"]);
        assert_eq!(query(&s, "SELECT score FROM user_view ORDER BY id"), ["10", "20"]);

        let v2 = def(2, "integer");
        s.begin_changes(&v2).unwrap();
        s.apply(&v2, &[row(3, "c", Value::Int(30))]).unwrap();
        s.commit_changes(&bk(2)).unwrap();
        assert_eq!(
            query(&s, "SELECT typeof(score) FROM t ORDER BY id"),
            ["integer", "integer", "integer"],
            "old values converted"
        );
        assert_eq!(query(&s, "SELECT name FROM sqlite_master WHERE name = 'user_idx'"), ["user_idx"]);
        assert_eq!(query(&s, "SELECT CAST(score AS TEXT) FROM user_view ORDER BY id"), ["10", "20", "30"]);
        assert_eq!(s.bookkeeping("canvas", "t").unwrap().unwrap().schema_version, 2);
    }

    #[test]
    fn a_failed_sync_rolls_back_to_the_previous_state() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SqliteSink::open(&dir.path().join("m.db")).unwrap();
        let v1 = def(1, "string");
        s.stage(&v1, "job").unwrap();
        s.begin_object().unwrap();
        s.stage_rows(&v1, &[row(1, "a", Value::Null)]).unwrap();
        s.finish_object(&v1, "job", "part-0").unwrap();
        s.publish(&v1, &bk(1)).unwrap();
        s.begin_changes(&v1).unwrap();
        s.apply(&v1, &[row(2, "b", Value::Null)]).unwrap();
        s.abort();
        assert_eq!(s.row_count("canvas", "t").unwrap(), 1);
        assert_eq!(s.bookkeeping("canvas", "t").unwrap().unwrap().watermark, 1);
    }

    #[test]
    fn an_interrupted_initdb_resumes_the_same_job_and_restarts_another() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SqliteSink::open(&dir.path().join("m.db")).unwrap();
        let v1 = def(1, "string");
        s.stage(&v1, "job-a").unwrap();
        s.begin_object().unwrap();
        s.stage_rows(&v1, &[row(1, "a", Value::Null)]).unwrap();
        s.finish_object(&v1, "job-a", "part-0").unwrap();
        s.begin_object().unwrap();
        s.stage_rows(&v1, &[row(2, "b", Value::Null)]).unwrap();
        s.abort(); // the process died while loading part-1

        assert_eq!(s.stage(&v1, "job-a").unwrap(), ["part-0"], "the same job resumes after part-0");
        assert_eq!(query(&s, "SELECT CAST(count(*) AS TEXT) FROM _dap_staging__t"), ["1"]);
        assert!(s.stage(&v1, "job-b").unwrap().is_empty(), "another job starts over");
        assert_eq!(query(&s, "SELECT CAST(count(*) AS TEXT) FROM _dap_staging__t"), ["0"]);
        assert!(s.bookkeeping("canvas", "t").unwrap().is_none(), "nothing is published before the swap");
    }
}
