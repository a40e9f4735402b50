//! `dap export`: a mirror table (optionally filtered) or a read-only query, streamed into CSV, TSV,
//! JSON Lines or Parquet. A table's export carries its DAP types (Parquet timestamps, dates,
//! decimals, integers of their width); the file appears whole or not at all.

use std::io::Write;
use std::path::{Path, PathBuf};

use parquet::basic::{Compression, Repetition};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::types::Type;
use rusqlite::Connection;

use crate::parquet_columns::{Buf, leaf_type};
use crate::query::{self, QueryError};
use crate::schema::{ColumnType, TableDef};
use crate::value::Value;

/// The file formats `dap export` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    Csv,
    Tsv,
    Jsonl,
    Parquet,
}

/// What to export.
#[derive(Debug, Clone)]
pub enum Selection {
    /// A mirrored table, with an optional SQL condition on its rows.
    Table { namespace: String, table: String, condition: Option<String> },
    /// Any read-only query over the mirror.
    Query(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Query(#[from] QueryError),
    #[error("{namespace}.{table} is not in the mirror; {}", match elsewhere {
        Some(other) => format!("{other}.{table} is: give --namespace {other}"),
        None => "`dap status` lists what is".into(),
    })]
    NoTable { namespace: String, table: String, elsewhere: Option<String> },
    #[error("row {row}, column {column}: {reason}")]
    Value { row: u64, column: String, reason: String },
    #[error("writing {}: {source}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
    #[error("writing Parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error("writing CSV: {0}")]
    Csv(#[from] csv::Error),
    #[error("{0}")]
    Output(String),
    #[error(transparent)]
    Interrupted(#[from] crate::interrupt::Interrupted),
}

impl From<rusqlite::Error> for ExportError {
    fn from(e: rusqlite::Error) -> Self {
        if crate::interrupt::is_sqlite_interrupt(&e) {
            return ExportError::Interrupted(crate::interrupt::Interrupted);
        }
        ExportError::Query(QueryError::Sql(e))
    }
}

/// Where a result's column types come from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Typing {
    /// The table's DAP schema: every value is read back as that type.
    Schema,
    /// A query's declared SQLite types: integers, reals, else text.
    Declared,
}

/// The columns of a result and their types.
struct Plan {
    sql: String,
    columns: Vec<(String, ColumnType)>,
    typing: Typing,
}

/// A query cell as the value its declared column type holds.
fn declared_value(v: rusqlite::types::ValueRef<'_>, ty: &ColumnType) -> Result<Value, String> {
    use rusqlite::types::ValueRef as V;
    Ok(match (v, ty) {
        (V::Null, _) => Value::Null,
        (V::Integer(i), ColumnType::Float(_)) => Value::Float(i as f64),
        (V::Integer(i), _) => Value::Int(i),
        (V::Real(f), ColumnType::Int(_)) => return Err(format!("{f} is not an integer")),
        (V::Real(f), _) => Value::Float(f),
        (V::Text(t), ColumnType::Str { .. }) => Value::Str(String::from_utf8_lossy(t).into_owned()),
        (V::Text(t), ty) => return Err(format!("{:?} is no value of {}", String::from_utf8_lossy(t), ty.describe())),
        (V::Blob(b), _) => Value::Str(crate::query::blob_hex(b)),
    })
}

fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The stored definition of a mirrored table, from its bookkeeping row.
pub(crate) fn table_def(conn: &Connection, namespace: &str, table: &str) -> Result<TableDef, ExportError> {
    let missing = || ExportError::NoTable {
        namespace: namespace.into(),
        table: table.into(),
        elsewhere: namespace_holding(conn, table).filter(|other| other != namespace),
    };
    let sql = format!(
        "SELECT schema_version, schema_description FROM {}.instructure_dap__table_sync WHERE source_table = ?1",
        quote(namespace)
    );
    let (version, description): (u32, String) =
        conn.query_row(&sql, [table], |r| Ok((r.get(0)?, r.get(1)?))).map_err(|e| match e {
            rusqlite::Error::QueryReturnedNoRows | rusqlite::Error::SqliteFailure(..) => missing(),
            other => other.into(),
        })?;
    TableDef::from_description(namespace, table, version, &description).map_err(|e| ExportError::Value {
        row: 0,
        column: "(schema)".into(),
        reason: e.to_string(),
    })
}

/// The attached namespace that mirrors `table`, if any (the first, by name).
fn namespace_holding(conn: &Connection, table: &str) -> Option<String> {
    let mut schemas: Vec<String> = conn
        .prepare("SELECT name FROM pragma_database_list WHERE name NOT IN ('main', 'temp')")
        .and_then(|mut stmt| stmt.query_map([], |r| r.get(0))?.collect())
        .ok()?;
    schemas.sort();
    schemas.into_iter().find(|schema| {
        let sql = format!("SELECT 1 FROM {}.instructure_dap__table_sync WHERE source_table = ?1", quote(schema));
        conn.query_row(&sql, [table], |_| Ok(())).is_ok()
    })
}

fn plan(conn: &Connection, selection: &Selection) -> Result<Plan, ExportError> {
    match selection {
        Selection::Table { namespace, table, condition } => {
            let def = table_def(conn, namespace, table)?;
            let columns: Vec<(String, ColumnType)> =
                std::iter::once(&def.key).chain(&def.values).map(|c| (c.name.clone(), c.ty.clone())).collect();
            let list: Vec<String> = columns.iter().map(|(n, _)| quote(n)).collect();
            let filter = condition.as_ref().map(|c| format!(" WHERE {c}")).unwrap_or_default();
            let sql = format!("SELECT {} FROM {}.{}{filter}", list.join(", "), quote(namespace), quote(table));
            Ok(Plan { sql, columns, typing: Typing::Schema })
        }
        Selection::Query(sql) => {
            let stmt = conn.prepare(sql)?;
            let columns = stmt
                .columns()
                .iter()
                .map(|c| {
                    let declared = c.decl_type().unwrap_or("").to_ascii_uppercase();
                    let ty = if declared.contains("INT") {
                        ColumnType::Int(64)
                    } else if declared.contains("REAL") || declared.contains("FLOA") || declared.contains("DOUB") {
                        ColumnType::Float(64)
                    } else {
                        ColumnType::Str { max_length: None, truncatable: false }
                    };
                    (c.name().to_string(), ty)
                })
                .collect();
            Ok(Plan { sql: sql.clone(), columns, typing: Typing::Declared })
        }
    }
}

/// Writes `selection` from the mirror folder `dir` to `output` as `format`; returns the rows.
/// With `as_of`, the tables read are as they were then (their history).
pub fn export(
    dir: &Path,
    selection: &Selection,
    as_of: Option<crate::as_of::AsOf>,
    format: ExportFormat,
    null: &str,
    output: &Path,
) -> Result<u64, ExportError> {
    crate::mirror::folder::refuse_mirror_output(dir, output).map_err(ExportError::Output)?;
    let conn = query::open_mirror(dir)?;
    crate::interrupt::watch(&conn);
    if let Selection::Query(sql) = selection {
        query::check_plain_names(&conn, sql)?;
    }
    let plan = plan(&conn, selection)?;
    let sql = match as_of {
        Some(as_of) => as_of.prepare(&conn, &plan.sql)?,
        None => plan.sql.clone(),
    };
    let mut stmt = conn.prepare(&sql)?;
    if !stmt.readonly() {
        return Err(QueryError::Writes.into());
    }
    let folder = output.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let write_err = |source| ExportError::Write { path: output.to_path_buf(), source };
    let mut file = tempfile::NamedTempFile::new_in(folder).map_err(write_err)?;
    let mut rows = stmt.query([])?;
    let mut next = |row_number: u64| -> Result<Option<Vec<Value>>, ExportError> {
        crate::interrupt::check()?;
        let Some(row) = rows.next()? else { return Ok(None) };
        plan.columns
            .iter()
            .enumerate()
            .map(|(i, (name, ty))| {
                let v = row.get_ref(i)?;
                let value = match plan.typing {
                    Typing::Schema => crate::mirror::format::from_sql(v, ty),
                    Typing::Declared => declared_value(v, ty),
                };
                value.map_err(|reason| ExportError::Value {
                    row: row_number,
                    column: name.clone(),
                    reason: format!("{reason} (cast it in the query to export it)"),
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    };
    let names: Vec<&str> = plan.columns.iter().map(|(n, _)| n.as_str()).collect();
    let mut count = 0u64;
    match format {
        ExportFormat::Csv | ExportFormat::Tsv => {
            let delimiter = if format == ExportFormat::Tsv { b'\t' } else { b',' };
            let mut w = csv::WriterBuilder::new().delimiter(delimiter).from_writer(std::io::BufWriter::new(&mut file));
            w.write_record(&names)?;
            while let Some(values) = next(count + 1)? {
                w.write_record(values.iter().map(|v| v.to_text().unwrap_or_else(|| null.to_string())))?;
                count += 1;
            }
            w.flush().map_err(write_err)?;
        }
        ExportFormat::Jsonl => {
            let mut w = std::io::BufWriter::new(&mut file);
            while let Some(values) = next(count + 1)? {
                let object: serde_json::Map<String, serde_json::Value> =
                    names.iter().zip(&values).map(|(n, v)| (n.to_string(), v.to_typed_json())).collect();
                writeln!(w, "{}", serde_json::Value::Object(object)).map_err(write_err)?;
                count += 1;
            }
            w.flush().map_err(write_err)?;
        }
        ExportFormat::Parquet => {
            let mut writer = ParquetWriter::new(&mut file, &plan.columns, Compression::SNAPPY)?;
            while let Some(values) = next(count + 1)? {
                writer.push(&values)?;
                count += 1;
            }
            writer.finish()?;
        }
    }
    file.as_file().sync_all().map_err(write_err)?;
    file.persist(output).map_err(|e| write_err(e.error))?;
    Ok(count)
}

/// Rows per Parquet row group.
const ROW_GROUP_ROWS: usize = 65_536;

/// A Parquet file written row by row, one row group of [`ROW_GROUP_ROWS`] at a time, each
/// column with its DAP type (memory holds one row group).
pub struct ParquetWriter<W: Write + Send> {
    writer: SerializedFileWriter<W>,
    leaves: Vec<(Buf, Vec<i16>)>,
    in_group: usize,
    rows: u64,
}

impl<W: Write + Send> ParquetWriter<W> {
    pub fn new(out: W, columns: &[(String, ColumnType)], compression: Compression) -> Result<Self, ExportError> {
        let mut leaves = Vec::new();
        let mut fields = Vec::new();
        for (name, ty) in columns {
            let (t, buf) = leaf_type(name, ty, Repetition::OPTIONAL)?;
            fields.push(std::sync::Arc::new(t));
            leaves.push((buf, Vec::<i16>::new()));
        }
        let root = std::sync::Arc::new(Type::group_type_builder("schema").with_fields(fields).build()?);
        let props = WriterProperties::builder().set_compression(compression).build();
        let writer = SerializedFileWriter::new(out, root, std::sync::Arc::new(props))?;
        Ok(ParquetWriter { writer, leaves, in_group: 0, rows: 0 })
    }

    pub fn push(&mut self, values: &[Value]) -> Result<(), ExportError> {
        for ((buf, defs), v) in self.leaves.iter_mut().zip(values) {
            if *v == Value::Null {
                defs.push(0);
            } else {
                defs.push(1);
                buf.push(v);
            }
        }
        self.rows += 1;
        self.in_group += 1;
        if self.in_group == ROW_GROUP_ROWS {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), ExportError> {
        let mut group = self.writer.next_row_group()?;
        for (buf, defs) in self.leaves.iter_mut() {
            let mut col = group.next_column()?.expect("a column writer per field");
            buf.write_to(&mut col, Some(defs))?;
            col.close()?;
            defs.clear();
        }
        group.close()?;
        self.in_group = 0;
        Ok(())
    }

    /// Writes the last row group and the footer; returns the rows written.
    pub fn finish(self) -> Result<u64, ExportError> {
        let rows = self.rows;
        self.into_inner()?;
        Ok(rows)
    }

    /// Writes the last row group and the footer; returns what it wrote to.
    pub fn into_inner(mut self) -> Result<W, ExportError> {
        if self.in_group > 0 || self.rows == 0 {
            self.flush()?;
        }
        Ok(self.writer.into_inner()?)
    }
}
