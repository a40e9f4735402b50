//! The local SQLite mirror as a source, for outward replication: it needs no DAP access at all.
//!
//! A target's position is the DAP watermark its `table_sync` row holds (written in the same
//! transaction as its rows, by whichever client wrote them). Against the mirror's change index
//! (`writer.rs`) that says what the target lacks: the keys changed in the mirror's commits
//! after that watermark, sent as their current rows (or as deletes when the mirror no longer has
//! them). A target older than the mirror's epoch (the mirror took a new snapshot of the table
//! since) needs a full reload; a target ahead of the mirror (synced straight from DAP since) is
//! left alone until the mirror catches up. Positions live in the targets, so a copied mirror
//! file knows nothing false about them, and any mirror of the same DAP data can serve any target.

use crate::source::SnapshotCause;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::{Connection, params};

use super::format::{BOOKKEEPING, CHANGES, COMMITS, LeaveNoTrace, from_sql, open_read_only, quote};
use crate::decode::Record;
use crate::feed::{Feed, FeedSender, Piece};
use crate::progress::TableProgress;
use crate::schema::TableDef;
use crate::sink::{EndedGone, VersionLoad, VersionScope};
use crate::source::{Extract, Reading, Schema, Source, SourceError};
use crate::time::{self, Micros};
use crate::value::Value;
/// Rows per snapshot part (an interrupted initdb of a target resumes after whole parts).
const PART_ROWS: i64 = 100_000;
/// Records per feed batch.
const BATCH: usize = 2_000;

pub struct MirrorSource {
    path: PathBuf,
    /// Reading leaves no `-wal`/`-shm` behind (dropped with the last clone of the source).
    _tidy: Arc<LeaveNoTrace>,
}

impl MirrorSource {
    /// The mirror file at `path`, which must exist (replication never creates a mirror).
    pub fn open(path: &Path) -> Result<MirrorSource, SourceError> {
        let source = MirrorSource { path: path.to_path_buf(), _tidy: Arc::new(LeaveNoTrace::note([path])) };
        let present =
            crate::mirror::folder::mirror_file_present(path).map_err(|e| SourceError::failed("", e.to_string()))?;
        if !present {
            return Err(SourceError::failed(
                "",
                format!(
                    "there is no mirror at {}; make it with `dap initdb` first (or name another with --from sqlite:///PATH.db)",
                    path.display()
                ),
            ));
        }
        source.connect()?;
        Ok(source)
    }

    fn io(&self, e: rusqlite::Error) -> SourceError {
        SourceError::failed(format!("reading the mirror {}", self.path.display()), e)
    }

    /// A read-only connection (the mirror's writer may be syncing meanwhile: WAL readers see a
    /// consistent snapshot per transaction).
    fn connect(&self) -> Result<Connection, SourceError> {
        open_read_only(&self.path).map_err(|e| self.io(e))
    }

    /// The table's bookkeeping row: version, description and watermark.
    fn bookkeeping(
        &self,
        conn: &Connection,
        namespace: &str,
        table: &str,
    ) -> Result<(u32, String, Micros), SourceError> {
        let row: Option<(u32, String, String)> = conn
            .query_row(
                &format!(
                    "SELECT schema_version, schema_description, timestamp FROM {BOOKKEEPING} WHERE source_namespace = ?1 AND source_table = ?2"
                ),
                params![namespace, table],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .map(Some)
            .or_else(|e| if e == rusqlite::Error::QueryReturnedNoRows { Ok(None) } else { Err(e) })
            .map_err(|e| self.io(e))?;
        let (version, description, watermark) = row.ok_or_else(|| {
            SourceError::failed(
                "",
                format!(
                    "{namespace}.{table} is not in the mirror {}; add it with `{}`",
                    self.path.display(),
                    crate::term::command(&["initdb", "--namespace", namespace, "--table", table])
                ),
            )
        })?;
        let watermark = time::parse_rfc3339(&watermark)
            .map_err(|e| SourceError::failed(format!("the mirror's watermark of {namespace}.{table}"), e))?;
        Ok((version, description, watermark))
    }

    /// The watermark of commit `seq` of a table's change index, if it has it.
    fn commit_watermark(conn: &Connection, def: &TableDef, seq: i64) -> rusqlite::Result<Option<Micros>> {
        let text: Option<String> = conn
            .query_row(
                &format!(
                    "SELECT watermark FROM {COMMITS} WHERE source_namespace = ?1 AND source_table = ?2 AND seq = ?3"
                ),
                params![def.namespace, def.name, seq],
                |r| r.get(0),
            )
            .map(Some)
            .or_else(|e| if e == rusqlite::Error::QueryReturnedNoRows { Ok(None) } else { Err(e) })?;
        Ok(text.and_then(|t| time::parse_rfc3339(&t).ok()))
    }

    /// `replicate --with-history`: what a target whose copy of the table's history holds changes
    /// up to `held` (`None`: it has no usable copy) lacks of it, as versions of `versions`
    /// ([`crate::schema::versions::versions_def`]); `None` when the mirror keeps no history of the
    /// table.
    pub fn history(
        &self,
        versions: &TableDef,
        held: Option<Micros>,
        watch: Arc<TableProgress>,
    ) -> Result<Option<VersionReading>, SourceError> {
        use super::history::{self, Storage, VALID_TO};
        let conn = self.connect()?;
        conn.execute_batch("BEGIN").map_err(|e| self.io(e))?;
        let (namespace, table) = (&versions.namespace, &versions.name);
        let stored = match history::storage_in(&conn, "main", table).map_err(|e| self.io(e))? {
            Storage::None => return Ok(None),
            Storage::Split => history::ended_table(table),
            Storage::Plain => history::table_name(table),
        };
        let began = history::setting(&conn, namespace, table)
            .map_err(|e| self.io(e))?
            .and_then(|s| time::parse_rfc3339(&s.since).ok());
        let epoch = Self::commit_watermark(&conn, versions, 0).map_err(|e| self.io(e))?;
        let (scope, first) = match lacking(held, began, epoch) {
            Lacking::Whole => (VersionScope::Whole, None),
            Lacking::ChangedAfter(at) => {
                let first: Option<i64> = conn
                    .query_row(
                        &format!(
                            "SELECT MIN(seq) FROM {COMMITS} WHERE source_namespace = ?1 AND source_table = ?2 AND seq > 0 AND watermark > ?3"
                        ),
                        params![namespace, table, time::format_fixed(at)],
                        |r| r.get(0),
                    )
                    .map_err(|e| self.io(e))?;
                (VersionScope::OfKeys, first)
            }
        };
        let oldest_end: Option<String> = conn
            .query_row(&format!("SELECT min({VALID_TO}) FROM {}", quote(&stored)), [], |r| r.get(0))
            .map_err(|e| self.io(e))?;
        let gone = match oldest_end.and_then(|t| time::parse_rfc3339(&t).ok()) {
            Some(at) => EndedGone::Before(at - at.rem_euclid(time::MICROS_PER_SECOND)),
            None => EndedGone::All,
        };
        let columns: Vec<String> = versions.columns().map(|c| quote(&c.name)).collect();
        let mut sql = format!("SELECT {} FROM {}", columns.join(", "), quote(&history::table_name(table)));
        let keys = match (scope, first) {
            (VersionScope::Whole, _) => None,
            (VersionScope::OfKeys, Some(seq)) => {
                sql.push_str(&format!(
                    " WHERE {} IN (SELECT key FROM {CHANGES} WHERE source_namespace = ?1 AND source_table = ?2 AND seq >= ?3)",
                    quote(&versions.key.name)
                ));
                Some(seq)
            }
            (VersionScope::OfKeys, None) => {
                sql.push_str(" WHERE 0");
                None
            }
        };
        watch.reading("reading the mirror's history", 0);
        let (tx, feed): (FeedSender, Feed) = Feed::channel(4);
        let (source, versions) =
            (MirrorSource { path: self.path.clone(), _tidy: self._tidy.clone() }, versions.clone());
        let task = tokio::task::spawn(async move {
            tokio::task::spawn_blocking(move || read_versions(&source, &conn, &versions, &sql, keys, &tx))
                .await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
        });
        Ok(Some(VersionReading { load: VersionLoad { scope, gone }, reading: Reading { feed, task } }))
    }
}

/// Sends a piece of a feed; an error when the target stopped reading.
fn send(tx: &FeedSender, piece: Piece) -> Result<(), SourceError> {
    tx.blocking_send(piece).map_err(|_| SourceError::failed("", "the target stopped reading"))
}

/// Records gathered into the feed's batches: each sent when it is full, the rest on `flush`.
struct Batches<'a> {
    tx: &'a FeedSender,
    batch: Vec<Record>,
    /// Records sent so far.
    sent: u64,
}

impl<'a> Batches<'a> {
    fn new(tx: &'a FeedSender) -> Batches<'a> {
        Batches { tx, batch: Vec::with_capacity(BATCH), sent: 0 }
    }

    fn push(&mut self, record: Record) -> Result<(), SourceError> {
        self.batch.push(record);
        if self.batch.len() == BATCH { self.flush() } else { Ok(()) }
    }

    fn flush(&mut self) -> Result<(), SourceError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        self.sent += self.batch.len() as u64;
        send(self.tx, Piece::Rows(std::mem::replace(&mut self.batch, Vec::with_capacity(BATCH))))
    }
}

/// Sends the versions `sql` selects (`keys`: the first commit whose keys it takes) as one part,
/// in the read transaction `conn` holds.
fn read_versions(
    source: &MirrorSource,
    conn: &Connection,
    versions: &TableDef,
    sql: &str,
    keys: Option<i64>,
    tx: &FeedSender,
) -> Result<u64, SourceError> {
    const PART: &str = "history";
    let bad = |e: String| SourceError::Corrupt { table: versions.name.clone(), part: PART.into(), detail: e };
    send(tx, Piece::Begin(PART.into()))?;
    let mut stmt = conn.prepare(sql).map_err(|e| source.io(e))?;
    let mut rows = match keys {
        Some(seq) => stmt.query(params![versions.namespace, versions.name, seq]),
        None => stmt.query([]),
    }
    .map_err(|e| source.io(e))?;
    let mut out = Batches::new(tx);
    while let Some(row) = rows.next().map_err(|e| source.io(e))? {
        out.push(record(row, versions, 0).map_err(bad)?)?;
    }
    out.flush()?;
    send(tx, Piece::End(PART.into()))?;
    send(tx, Piece::Done)?;
    Ok(out.sent)
}

/// What a target lacks of a table's history (`replicate --with-history`): how its copy changes,
/// and the versions it needs, read in the same read transaction as the decision.
pub struct VersionReading {
    pub load: VersionLoad,
    pub reading: Reading,
}

/// Which versions a target's copy of a history lacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lacking {
    /// All of them: it has none, or the mirror's history started over after the latest change it
    /// holds (a new snapshot, history turned on again).
    Whole,
    /// The versions of the keys changed in the commits after this time (the latest change the
    /// target holds).
    ChangedAfter(Micros),
}

/// The latest true time a copy's latest change `held` may stand for: a time in whole seconds
/// may be a server's truncation (MySQL), so the true time may be anywhere in that second.
pub fn latest_possible(held: Micros) -> Micros {
    held + if held % time::MICROS_PER_SECOND == 0 { time::MICROS_PER_SECOND - 1 } else { 0 }
}

/// What a copy whose latest change is `held` (`None`: no usable copy) lacks, given when the
/// mirror's history began (`began`) and its table's epoch (the snapshot its change index starts
/// at); see [`latest_possible`].
fn lacking(held: Option<Micros>, began: Option<Micros>, epoch: Option<Micros>) -> Lacking {
    let (Some(held), Some(epoch)) = (held, epoch) else { return Lacking::Whole };
    let latest_possible = latest_possible(held);
    if epoch > latest_possible || began.is_some_and(|b| b > latest_possible) {
        Lacking::Whole
    } else {
        Lacking::ChangedAfter(held)
    }
}

/// A row of a mirror table as a record: the key, then the values in the definition's order.
fn record(row: &rusqlite::Row<'_>, def: &TableDef, offset: usize) -> Result<Record, String> {
    let mut values = Vec::with_capacity(def.values.len());
    let key = from_sql(row.get_ref(offset).map_err(|e| e.to_string())?, &def.key.ty)?;
    for (i, c) in def.values.iter().enumerate() {
        let v = row.get_ref(offset + 1 + i).map_err(|e| e.to_string())?;
        values.push(from_sql(v, &c.ty).map_err(|e| format!("{}: {e}", c.name))?);
    }
    Ok(Record { ts: None, action: Some('U'), key, values })
}

/// A part of an extract: a range of row ids of a snapshot, or the keys changed since a commit.
enum Part {
    Rows(i64, i64),
    ChangedSince(i64),
}

impl Part {
    fn parse(text: &str) -> Option<Part> {
        if let Some(range) = text.strip_prefix("rows:") {
            let (a, b) = range.split_once('-')?;
            return Some(Part::Rows(a.parse().ok()?, b.parse().ok()?));
        }
        text.strip_prefix("changes-since:").and_then(|s| s.parse().ok()).map(Part::ChangedSince)
    }
}

/// Reads the parts into the feed, in one read transaction (one consistent state of the mirror).
fn read_parts(source: &MirrorSource, def: &TableDef, parts: &[String], tx: &FeedSender) -> Result<u64, SourceError> {
    let conn = source.connect()?;
    conn.execute_batch("BEGIN").map_err(|e| source.io(e))?;
    let columns: Vec<String> = def.columns().map(|c| format!("t.{}", quote(&c.name))).collect();
    let table = quote(&def.name);
    let mut out = Batches::new(tx);
    for part in parts {
        let bad = |e: String| SourceError::Corrupt { table: def.name.clone(), part: part.clone(), detail: e };
        send(tx, Piece::Begin(part.clone()))?;
        match Part::parse(part).ok_or_else(|| bad("not a part of the mirror".into()))? {
            Part::Rows(first, last) => {
                let mut stmt = conn
                    .prepare(&format!(
                        "SELECT {} FROM {table} AS t WHERE t.rowid BETWEEN ?1 AND ?2 ORDER BY t.rowid",
                        columns.join(", ")
                    ))
                    .map_err(|e| source.io(e))?;
                let mut rows = stmt.query(params![first, last]).map_err(|e| source.io(e))?;
                while let Some(row) = rows.next().map_err(|e| source.io(e))? {
                    out.push(record(row, def, 0).map_err(bad)?)?;
                }
            }
            Part::ChangedSince(seq) => {
                // The current row of every key changed since the commit; none: it was deleted.
                let mut stmt = conn
                    .prepare(&format!(
                        "SELECT c.key, t.{key} IS NOT NULL, {} FROM {CHANGES} AS c LEFT JOIN {table} AS t ON t.{key} = c.key
                         WHERE c.source_namespace = ?1 AND c.source_table = ?2 AND c.seq >= ?3",
                        columns.join(", "),
                        key = quote(&def.key.name)
                    ))
                    .map_err(|e| source.io(e))?;
                let mut rows = stmt.query(params![def.namespace, def.name, seq]).map_err(|e| source.io(e))?;
                while let Some(row) = rows.next().map_err(|e| source.io(e))? {
                    let present: bool = row.get(1).map_err(|e| source.io(e))?;
                    let r = if present {
                        record(row, def, 2).map_err(bad)?
                    } else {
                        let key = from_sql(row.get_ref(0).map_err(|e| source.io(e))?, &def.key.ty).map_err(bad)?;
                        Record { ts: None, action: Some('D'), key, values: vec![Value::Null; def.values.len()] }
                    };
                    out.push(r)?;
                }
            }
        }
        out.flush()?;
        send(tx, Piece::End(part.clone()))?;
    }
    send(tx, Piece::Done)?;
    let _ = conn.execute_batch("COMMIT");
    Ok(out.sent)
}

#[async_trait::async_trait]
impl Source for MirrorSource {
    async fn tables(&self, namespace: &str) -> Result<Vec<String>, SourceError> {
        let conn = self.connect()?;
        let mut stmt = conn
            .prepare(&format!(
                "SELECT source_table FROM {BOOKKEEPING} WHERE source_namespace = ?1 ORDER BY source_table"
            ))
            .map_err(|e| self.io(e))?;
        let rows = stmt.query_map([namespace], |r| r.get::<_, String>(0)).map_err(|e| self.io(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.io(e))
    }

    async fn schema(&self, namespace: &str, table: &str) -> Result<Schema, SourceError> {
        let conn = self.connect()?;
        let (version, description, _) = self.bookkeeping(&conn, namespace, table)?;
        let def = TableDef::from_description(namespace, table, version, &description)?;
        Ok(Schema { def, description })
    }

    async fn snapshot(&self, def: &TableDef, _watch: &TableProgress) -> Result<Extract, SourceError> {
        let conn = self.connect()?;
        conn.execute_batch("BEGIN").map_err(|e| self.io(e))?;
        let (_, _, watermark) = self.bookkeeping(&conn, &def.namespace, &def.name)?;
        let (first, last): (Option<i64>, Option<i64>) = conn
            .query_row(&format!("SELECT MIN(rowid), MAX(rowid) FROM {}", quote(&def.name)), [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .map_err(|e| self.io(e))?;
        let mut parts = Vec::new();
        if let (Some(first), Some(last)) = (first, last) {
            let mut at = first;
            while at <= last {
                let end = at.saturating_add(PART_ROWS - 1).min(last);
                parts.push(format!("rows:{at}-{end}"));
                at = end + 1;
            }
        }
        let epoch = Self::commit_watermark(&conn, def, 0).map_err(|e| self.io(e))?.unwrap_or(watermark);
        // The same mirror state gives the same extract, so an interrupted load resumes.
        let id = format!("mirror-epoch-{}-at-{}", time::format_wire(epoch), time::format_wire(watermark));
        Ok(Extract { id, watermark, parts, applied_through: None })
    }

    async fn changes(&self, def: &TableDef, since: Micros, _watch: &TableProgress) -> Result<Extract, SourceError> {
        let conn = self.connect()?;
        conn.execute_batch("BEGIN").map_err(|e| self.io(e))?;
        let (_, _, watermark) = self.bookkeeping(&conn, &def.namespace, &def.name)?;
        if since > watermark {
            return Err(SourceError::TargetAhead { mirror: watermark, target: since });
        }
        let Some(epoch) = Self::commit_watermark(&conn, def, 0).map_err(|e| self.io(e))? else {
            return Err(SourceError::SnapshotRequired {
                reason: "the mirror has no change index for the table yet (made by an older dap); it is reloaded once"
                    .into(),
                cause: SnapshotCause::Other,
            });
        };
        // A target that keeps whole seconds (MySQL) holds the epoch's start truncated.
        let whole_second_of_epoch =
            since % time::MICROS_PER_SECOND == 0 && since >= epoch - epoch.rem_euclid(time::MICROS_PER_SECOND);
        if since < epoch && !whole_second_of_epoch {
            return Err(SourceError::SnapshotRequired {
                reason: format!(
                    "the target holds {} but the mirror's copy starts at its snapshot of {}",
                    time::format_wire(since),
                    time::format_wire(epoch)
                ),
                cause: SnapshotCause::Other,
            });
        }
        // The first commit the target lacks: the one after the last whose watermark it holds.
        let first: Option<i64> = conn
            .query_row(
                &format!(
                    "SELECT MIN(seq) FROM {COMMITS} WHERE source_namespace = ?1 AND source_table = ?2 AND seq > 0 AND watermark > ?3"
                ),
                params![def.namespace, def.name, time::format_fixed(since)],
                |r| r.get(0),
            )
            .map_err(|e| self.io(e))?;
        let id = format!("mirror-since-{}-at-{}", time::format_wire(since), time::format_wire(watermark));
        let parts = first.map(|seq| vec![format!("changes-since:{seq}")]).unwrap_or_default();
        Ok(Extract { id, watermark, parts, applied_through: None })
    }

    fn read(&self, def: &TableDef, _extract: &Extract, parts: Vec<String>, watch: Arc<TableProgress>) -> Reading {
        // A snapshot's parts are rowid ranges: their sizes bound the rows (an ETA's total).
        let rows: u64 = parts
            .iter()
            .filter_map(|p| match Part::parse(p)? {
                Part::Rows(first, last) => Some((last - first + 1).max(0) as u64),
                Part::ChangedSince(_) => None,
            })
            .sum();
        watch.reading("reading the mirror", rows);
        let (tx, feed): (FeedSender, Feed) = Feed::channel(4);
        let source = MirrorSource { path: self.path.clone(), _tidy: self._tidy.clone() };
        let def = def.clone();
        let task = tokio::task::spawn(async move {
            tokio::task::spawn_blocking(move || read_parts(&source, &def, &parts, &tx))
                .await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
        });
        Reading { feed, task }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Micros = time::MICROS_PER_SECOND;

    #[test]
    fn a_copy_lacks_the_whole_history_only_when_it_has_none_or_the_history_started_over_after_it() {
        let (epoch, began) = (100 * S, Some(100 * S));
        assert_eq!(lacking(None, began, Some(epoch)), Lacking::Whole, "no copy");
        assert_eq!(lacking(Some(150 * S + 7), began, None), Lacking::Whole, "no change index to read changes from");
        assert_eq!(lacking(Some(150 * S + 7), began, Some(epoch)), Lacking::ChangedAfter(150 * S + 7));
        assert_eq!(lacking(Some(150 * S + 7), began, Some(160 * S)), Lacking::Whole, "a new snapshot since");
        assert_eq!(lacking(Some(150 * S + 7), Some(160 * S), Some(epoch)), Lacking::Whole, "history turned on again");
        assert_eq!(lacking(Some(150 * S + 7), None, Some(epoch)), Lacking::ChangedAfter(150 * S + 7), "history off");
    }

    #[test]
    fn a_time_in_whole_seconds_may_be_a_servers_truncation_of_any_time_in_that_second() {
        // MySQL keeps 100.5 s as 100 s: a snapshot or a start at 100.5 s is not after the copy.
        assert_eq!(
            lacking(Some(100 * S), Some(100 * S + S / 2), Some(100 * S + S / 2)),
            Lacking::ChangedAfter(100 * S)
        );
        assert_eq!(lacking(Some(100 * S), Some(100 * S), Some(101 * S)), Lacking::Whole);
        // A time with fractions is exact.
        assert_eq!(lacking(Some(100 * S + 1), Some(100 * S + 2), Some(epoch_of(100))), Lacking::Whole);
    }

    fn epoch_of(seconds: i64) -> Micros {
        seconds * S
    }
}
