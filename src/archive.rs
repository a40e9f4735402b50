//! `dap archive`: an append-only table of the mirror (web_logs, which DAP keeps for 30 days) as
//! day-partitioned, zstd-compressed Parquet in the hive layout, `DIR/date=YYYY-MM-DD/part-0.parquet`,
//! which DuckDB (`read_parquet('DIR/**/*.parquet', hive_partitioning = true)`), pyarrow/pandas
//! (`pyarrow.dataset.dataset(DIR, partitioning="hive")`) and Spark read as one dataset.
//!
//! Idempotent: a day the mirror's watermark has passed is complete and written once; the days
//! still filling (today) are rewritten while they change; a rerun with nothing new writes
//! nothing. `DIR/_dap_archive.json` remembers what each partition holds. Every file is written
//! under a hidden temporary name and renamed into place, so a reader (or a kill) only ever sees
//! whole partitions.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use parquet::basic::{Compression, ZstdLevel};
use serde::{Deserialize, Serialize};

use crate::export::{ExportError, ParquetWriter};
use crate::mirror::format::{BOOKKEEPING, quote};
use crate::query::QueryError;
use crate::schema::{APPEND_ONLY_TIME_COLUMN, ColumnType};
use crate::time::{self, MICROS_PER_DAY, Micros};
use crate::value::Value;

/// What to archive, and where.
#[derive(Debug, Clone)]
pub struct ArchiveRequest {
    /// The mirror folder.
    pub mirror: PathBuf,
    pub namespace: String,
    pub table: String,
    /// The archive's folder (made when missing).
    pub to: PathBuf,
    /// How long recording the archived days in the mirror waits for its writer.
    pub lock_timeout: std::time::Duration,
}

/// What a run wrote.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ArchiveReport {
    pub written: Vec<DayWritten>,
    /// Days already archived as they are.
    pub unchanged: usize,
    /// Rows written by this run.
    pub rows: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DayWritten {
    pub day: String,
    pub rows: u64,
    /// The mirror's watermark has passed the day's end: it is written once.
    pub complete: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error(
        "{namespace}.{table} is not an append-only log table; dap archive keeps the day-partitioned logs of canvas_logs \
         (web_logs). Export other tables with `dap export`"
    )]
    NotAppendOnly { namespace: String, table: String },
    #[error(
        "{} archives {found}, not {wanted}; give each table a folder of its own with --to",
        dir.display()
    )]
    OtherTable { dir: PathBuf, found: String, wanted: String },
    #[error("{}: {source}; the archive is left as it was", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: not an archive manifest ({source}); move it away or choose another --to", path.display())]
    Manifest { path: PathBuf, source: serde_json::Error },
}

impl From<rusqlite::Error> for ArchiveError {
    fn from(e: rusqlite::Error) -> Self {
        ArchiveError::Export(e.into())
    }
}

impl From<QueryError> for ArchiveError {
    fn from(e: QueryError) -> Self {
        ArchiveError::Export(e.into())
    }
}

/// What the archive holds: per day, the rows and newest time written, and whether it was complete.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Manifest {
    namespace: String,
    table: String,
    days: BTreeMap<String, DayEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct DayEntry {
    rows: u64,
    newest: String,
    complete: bool,
}

const MANIFEST: &str = "_dap_archive.json";
const PART: &str = "part-0.parquet";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ArchiveError + '_ {
    move |source| ArchiveError::Io { path: path.to_path_buf(), source }
}

impl Manifest {
    fn load(dir: &Path, namespace: &str, table: &str) -> Result<Manifest, ArchiveError> {
        let path = dir.join(MANIFEST);
        let manifest = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<Manifest>(&bytes)
                .map_err(|source| ArchiveError::Manifest { path: path.clone(), source })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Manifest { namespace: namespace.into(), table: table.into(), days: BTreeMap::new() });
            }
            Err(e) => return Err(io(&path)(e)),
        };
        if (manifest.namespace.as_str(), manifest.table.as_str()) != (namespace, table) {
            return Err(ArchiveError::OtherTable {
                dir: dir.to_path_buf(),
                found: format!("{}.{}", manifest.namespace, manifest.table),
                wanted: format!("{namespace}.{table}"),
            });
        }
        Ok(manifest)
    }

    /// Saved whole or not at all.
    fn save(&self, dir: &Path) -> Result<(), ArchiveError> {
        let path = dir.join(MANIFEST);
        let mut file = tempfile::Builder::new().prefix(".manifest-").tempfile_in(dir).map_err(io(dir))?;
        serde_json::to_writer_pretty(&mut file, self).map_err(|e| io(&path)(e.into()))?;
        file.as_file().sync_all().map_err(io(&path))?;
        file.persist(&path).map_err(|e| io(&path)(e.error))?;
        Ok(())
    }
}

/// A day of the mirror: its rows and newest time.
struct DayInMirror {
    rows: u64,
    newest: String,
}

/// Archives what is new since the last run; see the module's documentation.
pub fn archive(request: &ArchiveRequest) -> Result<ArchiveReport, ArchiveError> {
    let (ns, table) = (request.namespace.as_str(), request.table.as_str());
    let conn = crate::query::open_mirror(&request.mirror)?;
    crate::interrupt::watch(&conn);
    let def = crate::export::table_def(&conn, ns, table)?;
    if !def.is_append_only() {
        return Err(ArchiveError::NotAppendOnly { namespace: ns.into(), table: table.into() });
    }
    std::fs::create_dir_all(&request.to).map_err(io(&request.to))?;
    let mut manifest = Manifest::load(&request.to, ns, table)?;
    remove_leftovers(&request.to)?;

    let watermark: String = conn.query_row(
        &format!("SELECT timestamp FROM {}.{BOOKKEEPING} WHERE source_table = ?1", quote(ns)),
        [table],
        |r| r.get(0),
    )?;
    let watermark = time::parse_rfc3339(&watermark).unwrap_or(Micros::MIN);
    let column = quote(APPEND_ONLY_TIME_COLUMN);
    let source = format!("{}.{}", quote(ns), quote(table));
    let mut days: BTreeMap<String, DayInMirror> = BTreeMap::new();
    {
        let mut stmt = conn.prepare(&format!(
            "SELECT substr({column}, 1, 10), count(*), max({column}) FROM {source} WHERE {column} IS NOT NULL GROUP BY 1"
        ))?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            days.insert(r.get(0)?, DayInMirror { rows: r.get::<_, i64>(1)? as u64, newest: r.get(2)? });
        }
    }
    // A day the mirror removed after it was archived (`syncdb --keep-days`) is never rewritten:
    // the mirror no longer holds its rows. Rows of it that arrived since stay in the mirror.
    let pruned = crate::mirror::retention::pruned_days(&conn, ns, ns, table)?;
    for (day, late) in days.iter().filter(|(day, _)| pruned.contains(*day)) {
        tracing::warn!(
            "{ns}.{table}: {day}: {} rows arrived after the day was archived and removed from the mirror; they stay in the mirror",
            late.rows
        );
    }
    days.retain(|day, _| !pruned.contains(day));
    let mut report = ArchiveReport::default();
    let stale: Vec<&String> = days
        .iter()
        .filter(|(day, now)| {
            let file = request.to.join(format!("date={day}")).join(PART);
            let as_written = manifest.days.get(*day).is_some_and(|e| e.rows == now.rows && e.newest == now.newest);
            !(as_written && file.exists())
        })
        .map(|(day, _)| day)
        .collect();
    report.unchanged = days.len() - stale.len();
    if stale.is_empty() {
        record_in_mirror(request, &manifest, &pruned);
        return Ok(report);
    }

    // One ordered pass over the days to write: each is written whole before the next begins,
    // so memory holds one row group whatever the table's size.
    let columns: Vec<(String, ColumnType)> = def.columns().map(|c| (c.name.clone(), c.ty.clone())).collect();
    let list: Vec<String> = columns.iter().map(|(n, _)| quote(n)).collect();
    let wanted: Vec<String> = stale.iter().map(|d| format!("'{d}'")).collect();
    let mut stmt = conn.prepare(&format!(
        "SELECT substr({column}, 1, 10), {} FROM {source} WHERE substr({column}, 1, 10) IN ({}) ORDER BY {column}",
        list.join(", "),
        wanted.join(", ")
    ))?;
    let mut rows = stmt.query([])?;
    let mut open: Option<OpenDay> = None;
    while let Some(row) = rows.next()? {
        crate::interrupt::check().map_err(ExportError::from)?;
        let day: String = row.get(0)?;
        if open.as_ref().is_none_or(|o| o.day != day) {
            if let Some(done) = open.take() {
                finish_day(done, &days, watermark, &mut manifest, request, &mut report)?;
            }
            open = Some(OpenDay::new(&request.to, day, &columns)?);
        }
        let o = open.as_mut().expect("opened above");
        let values = columns
            .iter()
            .enumerate()
            .map(|(i, (name, ty))| {
                crate::mirror::format::from_sql(row.get_ref(i + 1)?, ty).map_err(|reason| {
                    ArchiveError::Export(ExportError::Value { row: o.rows + 1, column: name.clone(), reason })
                })
            })
            .collect::<Result<Vec<Value>, ArchiveError>>()?;
        o.writer.push(&values)?;
        o.rows += 1;
    }
    if let Some(done) = open.take() {
        finish_day(done, &days, watermark, &mut manifest, request, &mut report)?;
    }
    record_in_mirror(request, &manifest, &pruned);
    Ok(report)
}

/// Tells the mirror file which days the archive holds (what `syncdb --keep-days` may remove),
/// when that changed. The archive is whole without it: a failure is a warning, and the next
/// run records it.
fn record_in_mirror(request: &ArchiveRequest, manifest: &Manifest, pruned: &std::collections::BTreeSet<String>) {
    use crate::mirror::retention::{ArchivedDay, record_archived};
    let (ns, table) = (request.namespace.as_str(), request.table.as_str());
    let record = || -> Result<(), String> {
        let to = std::fs::canonicalize(&request.to).map_err(|e| e.to_string())?;
        let days: Vec<ArchivedDay> = manifest
            .days
            .iter()
            .filter(|(day, _)| !pruned.contains(*day))
            .map(|(day, e)| ArchivedDay {
                day: day.clone(),
                rows: e.rows,
                part: to.join(format!("date={day}")).join(PART),
                complete: e.complete,
            })
            .filter(|d| d.part.is_file())
            .collect();
        let file = crate::mirror::folder::namespace_files(&request.mirror)
            .map_err(|e| e.to_string())?
            .into_iter()
            .find(|(n, _)| n == ns)
            .map(|(_, f)| f)
            .ok_or_else(|| format!("no mirror file of {ns}"))?;
        // Read first: a rerun with nothing new neither waits for the writer nor writes.
        let recorded = crate::mirror::format::open_read_only(&file)
            .and_then(|conn| crate::mirror::retention::archived_days(&conn, ns, table))
            .map_err(|e| e.to_string())?;
        if recorded == days {
            return Ok(());
        }
        crate::mirror::folder::with_writer(&file, request.lock_timeout, |conn| record_archived(conn, ns, table, &days))
    };
    if let Err(e) = record() {
        tracing::warn!(
            "{ns}.{table}: the archive is written, but the mirror could not record it ({e}); the next `dap archive` does"
        );
    }
}

/// The partition being written: a hidden temporary file until it is whole.
struct OpenDay {
    day: String,
    folder: PathBuf,
    writer: ParquetWriter<tempfile::NamedTempFile>,
    rows: u64,
}

impl OpenDay {
    fn new(to: &Path, day: String, columns: &[(String, ColumnType)]) -> Result<OpenDay, ArchiveError> {
        let folder = to.join(format!("date={day}"));
        std::fs::create_dir_all(&folder).map_err(io(&folder))?;
        let file = tempfile::Builder::new().prefix(".part-").tempfile_in(&folder).map_err(io(&folder))?;
        let zstd = Compression::ZSTD(ZstdLevel::try_new(3).expect("3 is a zstd level"));
        Ok(OpenDay { day, writer: ParquetWriter::new(file, columns, zstd)?, folder, rows: 0 })
    }
}

/// Renames a whole partition into place and records it.
fn finish_day(
    done: OpenDay,
    days: &BTreeMap<String, DayInMirror>,
    watermark: Micros,
    manifest: &mut Manifest,
    request: &ArchiveRequest,
    report: &mut ArchiveReport,
) -> Result<(), ArchiveError> {
    let OpenDay { day, folder, writer, rows } = done;
    let file = writer.into_inner()?;
    let path = folder.join(PART);
    file.as_file().sync_all().map_err(io(&path))?;
    file.persist(&path).map_err(|e| io(&path)(e.error))?;
    let complete = day_end(&day).is_some_and(|end| watermark >= end);
    let newest = days.get(&day).map(|d| d.newest.clone()).unwrap_or_default();
    manifest.days.insert(day.clone(), DayEntry { rows, newest, complete });
    manifest.save(&request.to)?;
    tracing::info!("{}.{}: {day}: {rows} rows archived", request.namespace, request.table);
    report.rows += rows;
    report.written.push(DayWritten { day, rows, complete });
    Ok(())
}

/// The first instant after `day` (`YYYY-MM-DD`).
fn day_end(day: &str) -> Option<Micros> {
    time::parse_rfc3339(&format!("{day}T00:00:00Z")).ok().map(|start| start + MICROS_PER_DAY)
}

/// Temporary files a killed run left behind (never a whole partition).
fn remove_leftovers(to: &Path) -> Result<(), ArchiveError> {
    let entries = std::fs::read_dir(to).map_err(io(to))?;
    for folder in entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()) {
        let named_date = folder.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("date="));
        if !named_date {
            continue;
        }
        for file in std::fs::read_dir(&folder).map_err(io(&folder))?.flatten() {
            let name = file.file_name();
            let is_leftover = name.to_str().is_some_and(|n| n.starts_with(".part-"));
            // Only plain files: a link someone put there is not ours to follow or remove.
            if is_leftover && file.file_type().is_ok_and(|t| t.is_file()) {
                std::fs::remove_file(file.path()).map_err(io(&file.path()))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_day_ends_at_the_next_midnight() {
        assert_eq!(day_end("2026-03-01"), time::parse_rfc3339("2026-03-02T00:00:00Z").ok());
        assert_eq!(day_end("not a day"), None);
    }

    #[test]
    fn a_manifest_of_another_table_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let m = Manifest { namespace: "canvas_logs".into(), table: "web_logs".into(), days: BTreeMap::new() };
        m.save(dir.path()).unwrap();
        assert!(Manifest::load(dir.path(), "canvas_logs", "web_logs").is_ok());
        assert!(matches!(Manifest::load(dir.path(), "canvas_logs", "other"), Err(ArchiveError::OtherTable { .. })));
    }
}
