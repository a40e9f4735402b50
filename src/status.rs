//! Where the mirror (or another target) stands, as a typed report: per table its rows, schema
//! version, watermark, the last run `state.json` remembers, and how far each replication target
//! lags behind it. `dap status` prints it; the demo and any scheduler call it as a library.

use std::path::PathBuf;
use std::sync::Arc;

use crate::mirror::folder::StateFile;
use crate::privacy::SharedFiles;
use crate::sink::{Access, Bookkeeping, ConnectionString, Sink, SinkError, SinkOptions};
use crate::target::{self, TargetSpec};
use crate::time::{self, Micros};

/// What to look at.
#[derive(Debug, Clone)]
pub struct StatusRequest {
    /// One namespace; `None`: every namespace file of the folder (or every DAP namespace of a
    /// server target).
    pub namespace: Option<String>,
    pub location: Location,
    /// Replication targets whose position is shown against each table's watermark.
    pub targets: Vec<TargetSpec>,
    pub shared: SharedFiles,
}

/// Where the tables are.
#[derive(Debug, Clone)]
pub enum Location {
    /// A mirror folder: one file per namespace.
    Folder(PathBuf),
    /// A target as `--connection-string` names it (the default mirror when none is given).
    Target(TargetSpec),
}

/// One table of the report.
#[derive(Debug, Clone)]
pub struct TableStatus {
    pub namespace: String,
    pub table: String,
    pub rows: u64,
    pub schema_version: u32,
    pub watermark: Micros,
    /// Seconds from the watermark to the time of the report.
    pub staleness_seconds: i64,
    pub last_command: Option<String>,
    pub last_run: Option<String>,
    /// `ok`, or the error of the last run, as `state.json` recorded it.
    pub last_result: Option<String>,
    /// When a run last succeeded on the table.
    pub last_success: Option<String>,
    /// The file or database holding the table, as shown to users.
    pub file: String,
    pub targets: Vec<TargetStatus>,
    /// Set when the table keeps history in the mirror.
    pub history: Option<HistoryStatus>,
    /// Set for an append-only table (web_logs) in a mirror file: what its archive spans.
    pub archive: Option<ArchiveStatus>,
}

/// What the mirror holds of an append-only table, which DAP keeps for 30 days only.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ArchiveStatus {
    /// The oldest and newest row times (`timestamp`), as stored; `None` when empty.
    pub oldest: Option<String>,
    pub newest: Option<String>,
    /// Periods no sync could fetch (DAP had dropped them first): `(after, before)`, the end
    /// `None` until the snapshot that followed is published.
    pub gaps: Vec<(String, Option<String>)>,
}

/// The archive span and gaps of a mirror file's append-only tables, by table.
fn archive_of(file: &std::path::Path, namespace: &str) -> std::collections::BTreeMap<String, ArchiveStatus> {
    use crate::mirror::format;
    if !crate::schema::is_append_only_namespace(namespace) {
        return Default::default();
    }
    let read = || -> rusqlite::Result<_> {
        let conn = format::open_read_only(file)?;
        let mut out: std::collections::BTreeMap<String, ArchiveStatus> = Default::default();
        for (table, after, before) in format::gaps(&conn, namespace)? {
            out.entry(table).or_default().gaps.push((after, before));
        }
        let column = format::quote(crate::schema::APPEND_ONLY_TIME_COLUMN);
        for table in crate::schema::bundled::tables(namespace).map(|(t, _)| t) {
            if !format::has_table_named(&conn, table)? {
                continue;
            }
            let (oldest, newest) = conn.query_row(
                &format!("SELECT min({column}), max({column}) FROM {}", format::quote(table)),
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            let entry = out.entry(table.to_string()).or_default();
            (entry.oldest, entry.newest) = (oldest, newest);
        }
        Ok(out)
    };
    read().unwrap_or_else(|e| {
        tracing::warn!("{}: could not read the span of its logs: {e}", file.display());
        Default::default()
    })
}

/// A table's history in the mirror.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryStatus {
    /// When history began (stored text, RFC 3339).
    pub since: String,
    pub versions: u64,
    /// What the history takes in the file beyond the table's own rows.
    pub bytes: u64,
    /// `--history-days`, when versions are pruned.
    pub days: Option<u32>,
    /// The latest start or end of a version (what a target's copy is compared with); `None`
    /// when there is none, or the history is stored as an older dap did.
    pub latest: Option<Micros>,
}

/// What a replication target holds of a table's history (`replicate --with-history`), shown
/// for the tables whose mirror keeps history.
#[derive(Debug, Clone, PartialEq)]
pub enum HistoryCopy {
    /// The target has no history table of it.
    Absent,
    /// Its latest version change is the mirror's (within its last second on a server that keeps
    /// whole seconds, MySQL), or the mirror's history is empty or of an older dap.
    Current { latest: Option<Micros> },
    /// The mirror's history changed after the copy's latest change: the next `replicate
    /// --with-history` carries it.
    Behind { latest: Option<Micros> },
}

impl HistoryCopy {
    fn of(mirror_latest: Option<Micros>, held: Option<crate::sink::HistoryHeld>) -> HistoryCopy {
        let Some(held) = held else { return HistoryCopy::Absent };
        let latest = held.latest;
        let covered = match (mirror_latest, latest) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(m), Some(h)) => m <= crate::mirror::reader::latest_possible(h),
        };
        if covered { HistoryCopy::Current { latest } } else { HistoryCopy::Behind { latest } }
    }

    /// The word `dap status` shows.
    pub fn name(&self) -> &'static str {
        match self {
            HistoryCopy::Absent => "absent",
            HistoryCopy::Current { .. } => "current",
            HistoryCopy::Behind { .. } => "behind",
        }
    }

    pub fn latest(&self) -> Option<Micros> {
        match self {
            HistoryCopy::Absent => None,
            HistoryCopy::Current { latest } | HistoryCopy::Behind { latest } => *latest,
        }
    }
}

/// The history settings and sizes of a mirror file's tables, by table; nothing when it keeps
/// none (or cannot be read: the rest of the report still is).
fn history_of(file: &std::path::Path) -> std::collections::BTreeMap<(String, String), HistoryStatus> {
    use crate::mirror::history;
    let read = || -> rusqlite::Result<_> {
        let conn = crate::mirror::format::open_read_only(file)?;
        let mut out = std::collections::BTreeMap::new();
        for (ns, table, setting) in history::settings(&conn)? {
            let versions = history::version_count(&conn, &table)?;
            let bytes = history::stored_bytes(&conn, &table)?;
            let latest = match history::storage_in(&conn, "main", &table)? {
                history::Storage::Split => {
                    history::known_until(&conn, &table)?.and_then(|t| time::parse_rfc3339(&t).ok())
                }
                history::Storage::Plain | history::Storage::None => None,
            };
            out.insert(
                (ns, table),
                HistoryStatus { since: setting.since, versions, bytes, days: setting.days, latest },
            );
        }
        Ok(out)
    };
    read().unwrap_or_else(|e| {
        tracing::warn!("{}: could not read its history settings: {e}", file.display());
        Default::default()
    })
}

/// A replication target's position for one table.
#[derive(Debug, Clone)]
pub struct TargetStatus {
    /// The target, its password hidden.
    pub target: String,
    pub position: Position,
    /// Set when the mirror keeps the table's history and the target could be read.
    pub history: Option<HistoryCopy>,
}

/// Where a target stands against the mirror's watermark.
#[derive(Debug, Clone, PartialEq)]
pub enum Position {
    /// The table is not in the target.
    Absent,
    Current {
        watermark: Micros,
    },
    Ahead {
        watermark: Micros,
        seconds: i64,
    },
    Behind {
        watermark: Micros,
        seconds: i64,
    },
    /// The target could not be read.
    Unreadable {
        error: String,
    },
}

impl Position {
    fn of(mirror: Micros, target: Option<Micros>) -> Position {
        match target {
            None => Position::Absent,
            Some(t) if t == mirror => Position::Current { watermark: t },
            Some(t) if t > mirror => Position::Ahead { watermark: t, seconds: (t - mirror) / 1_000_000 },
            Some(t) => Position::Behind { watermark: t, seconds: (mirror - t) / 1_000_000 },
        }
    }

    /// The word `dap status` shows.
    pub fn name(&self) -> &'static str {
        match self {
            Position::Absent => "absent",
            Position::Current { .. } => "current",
            Position::Ahead { .. } => "ahead",
            Position::Behind { .. } => "behind",
            Position::Unreadable { .. } => "unreadable",
        }
    }

    pub fn watermark(&self) -> Option<Micros> {
        match self {
            Position::Current { watermark }
            | Position::Ahead { watermark, .. }
            | Position::Behind { watermark, .. } => Some(*watermark),
            Position::Absent | Position::Unreadable { .. } => None,
        }
    }
}

/// A replication target's bookkeeping, and the target itself when it may hold history copies (a
/// server: a mirror file keeps a history of its own).
type TargetRead = (Option<Arc<dyn Sink>>, Vec<Bookkeeping>);

/// The DAP namespaces a server target may hold.
const DAP_NAMESPACES: [&str; 4] = ["canvas", "canvas_logs", "catalog", "new_quizzes"];

/// The report, table by table in namespace order; opens everything read-only and creates nothing.
pub async fn status(request: &StatusRequest) -> Result<Vec<TableStatus>, SinkError> {
    let now = time::now();
    let options = SinkOptions { access: Access::Read, shared: request.shared, ..SinkOptions::default() };
    let mut report = Vec::new();
    for ns in namespaces(request)? {
        let local = match &request.location {
            Location::Folder(dir) => Some(dir.join(format!("{ns}.db"))),
            Location::Target(spec) => spec.local_file(&ns)?,
        };
        if let Some(path) = &local
            && !crate::mirror::folder::mirror_file_present(path).map_err(|e| e.refusal())?
        {
            continue;
        }
        let sink: Arc<dyn Sink> = match (&local, &request.location) {
            (Some(path), _) => target::open(&TargetSpec::Url(ConnectionString::sqlite(path)), &ns, &options).await?,
            (None, Location::Target(spec)) => target::open(spec, &ns, &options).await?,
            (None, Location::Folder(_)) => unreachable!("a folder's namespaces are files"),
        };
        let state = local.as_ref().map(|p| StateFile::load(&StateFile::path_for(p))).unwrap_or_default();
        let histories = local.as_deref().map(history_of).unwrap_or_default();
        let archives = local.as_deref().map(|f| archive_of(f, &ns)).unwrap_or_default();
        let file = sink.describe();
        let mut positions: Vec<(String, Result<TargetRead, String>)> = Vec::new();
        for spec in &request.targets {
            let server = spec.local_file(&ns)?.is_none();
            let read = match target::open(spec, &ns, &options).await {
                Ok(t) => {
                    t.all_bookkeeping(&ns).await.map(|rows| (server.then_some(t), rows)).map_err(|e| e.to_string())
                }
                Err(e) => Err(e.to_string()),
            };
            positions.push((spec.describe(), read));
        }
        for b in sink.all_bookkeeping(&ns).await? {
            let entry = local.as_ref().and_then(|db| state.entry(db, &ns, &b.table));
            let history = histories.get(&(ns.clone(), b.table.clone())).cloned();
            let mut targets = Vec::new();
            for (target, read) in &positions {
                let (position, copy) = match read {
                    Ok((sink, rows)) => {
                        let watermark = rows.iter().find(|t| t.table == b.table).map(|t| t.watermark);
                        let copy = match (&history, sink) {
                            (Some(h), Some(sink)) => match sink.history_held(&ns, &b.table).await {
                                Ok(held) => Some(HistoryCopy::of(h.latest, held)),
                                Err(e) => {
                                    tracing::warn!(
                                        "{target}: could not read its copy of {ns}.{}'s history: {e}",
                                        b.table
                                    );
                                    None
                                }
                            },
                            _ => None,
                        };
                        (Position::of(b.watermark, watermark), copy)
                    }
                    Err(e) => (Position::Unreadable { error: e.clone() }, None),
                };
                targets.push(TargetStatus { target: target.clone(), position, history: copy });
            }
            report.push(TableStatus {
                rows: sink.row_count(&ns, &b.table).await?,
                namespace: ns.clone(),
                table: b.table.clone(),
                schema_version: b.schema_version,
                watermark: b.watermark,
                staleness_seconds: (now - b.watermark) / 1_000_000,
                last_command: entry.and_then(|e| e.last_command.clone()),
                last_run: entry.and_then(|e| e.last_run.clone()),
                last_result: entry.and_then(|e| e.last_result.clone()),
                last_success: entry.and_then(|e| e.last_success.clone()),
                file: file.clone(),
                targets,
                history,
                archive: archives.get(&b.table).cloned(),
            });
        }
    }
    Ok(report)
}

/// An initdb that stopped before publishing: objects loaded into staging, no bookkeeping row
/// yet. `dap initdb` resumes it from its checkpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct Interrupted {
    pub namespace: String,
    pub table: String,
    /// Objects of its job already loaded.
    pub objects: u64,
}

/// The interrupted initdbs the request looks at: per namespace, the tables with checkpoints of
/// a load and no bookkeeping row, in a mirror file or a server target alike.
pub async fn interrupted(request: &StatusRequest) -> Result<Vec<Interrupted>, SinkError> {
    let options = SinkOptions { access: Access::Read, shared: request.shared, ..SinkOptions::default() };
    let mut out = Vec::new();
    for ns in namespaces(request)? {
        let local = match &request.location {
            Location::Folder(dir) => Some(dir.join(format!("{ns}.db"))),
            Location::Target(spec) => spec.local_file(&ns)?,
        };
        let sink: Arc<dyn Sink> = match (&local, &request.location) {
            (Some(path), _) => {
                if !crate::mirror::folder::mirror_file_present(path).map_err(|e| e.refusal())? {
                    continue;
                }
                target::open(&TargetSpec::Url(ConnectionString::sqlite(path)), &ns, &options).await?
            }
            (None, Location::Target(spec)) => target::open(spec, &ns, &options).await?,
            (None, Location::Folder(_)) => unreachable!("a folder's namespaces are files"),
        };
        match sink.unfinished_loads(&ns).await {
            Ok(found) => out.extend(found.into_iter().map(|(table, objects)| Interrupted {
                namespace: ns.clone(),
                table,
                objects,
            })),
            Err(e) => tracing::warn!("{}: could not read its unfinished loads: {e}", sink.describe()),
        }
    }
    Ok(out)
}

/// The namespaces looked at: the one asked for, every DAP namespace of a connection string, or
/// every mirror file's of a folder.
fn namespaces(request: &StatusRequest) -> Result<Vec<String>, SinkError> {
    if let Some(ns) = &request.namespace {
        return Ok(vec![ns.clone()]);
    }
    let dir = match &request.location {
        Location::Folder(dir) => dir.clone(),
        Location::Target(TargetSpec::Url(_)) => return Ok(DAP_NAMESPACES.map(String::from).to_vec()),
        Location::Target(TargetSpec::DefaultMirror) => crate::mirror::folder::default_dir()?,
    };
    let files = crate::mirror::folder::namespace_files(&dir).map_err(|e| e.refusal())?;
    Ok(files.into_iter().map(|(ns, _)| ns).collect())
}

/// A duration in seconds as the official client shows staleness: `42s`, `2m 5s`, `3h 1m`,
/// `934d 11h`.
pub fn staleness(secs: i64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staleness_like_the_official_client() {
        assert_eq!(staleness(42), "42s");
        assert_eq!(staleness(125), "2m 5s");
        assert_eq!(staleness(3 * 3600 + 60), "3h 1m");
        assert_eq!(staleness(934 * 86_400 + 11 * 3600), "934d 11h");
    }

    #[test]
    fn a_target_is_absent_current_ahead_or_behind() {
        assert_eq!(Position::of(10_000_000, None), Position::Absent);
        assert_eq!(Position::of(10_000_000, Some(10_000_000)), Position::Current { watermark: 10_000_000 });
        assert_eq!(Position::of(10_000_000, Some(13_000_000)), Position::Ahead { watermark: 13_000_000, seconds: 3 });
        assert_eq!(Position::of(10_000_000, Some(4_000_000)), Position::Behind { watermark: 4_000_000, seconds: 6 });
    }

    #[test]
    fn a_history_copy_is_behind_only_when_the_mirror_changed_after_its_latest_possible_time() {
        let held = |latest: Option<Micros>| Some(crate::sink::HistoryHeld { columns: Vec::new(), latest });
        assert_eq!(HistoryCopy::of(Some(10_500_000), None), HistoryCopy::Absent);
        assert_eq!(HistoryCopy::of(Some(10_500_000), held(Some(10_500_000))).name(), "current");
        assert_eq!(HistoryCopy::of(Some(10_500_000), held(Some(10_400_000))).name(), "behind");
        // A copy in whole seconds (MySQL) may hold anything of its last second.
        assert_eq!(HistoryCopy::of(Some(10_500_000), held(Some(10_000_000))).name(), "current");
        assert_eq!(HistoryCopy::of(Some(11_000_000), held(Some(10_000_000))).name(), "behind");
        // An empty copy lacks what the mirror has; against an empty history nothing is lacking.
        assert_eq!(HistoryCopy::of(Some(10_500_000), held(None)), HistoryCopy::Behind { latest: None });
        assert_eq!(HistoryCopy::of(None, held(None)), HistoryCopy::Current { latest: None });
    }
}
